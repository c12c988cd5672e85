"""asyncio_echo.py — an ordinary asyncio echo server (run by an unmodified python3 under
megapipe-run in preload.asyncio).  Listens on 127.0.0.1 (port 0: any), prints "port N",
echoes every connection until EOF, exits 0 on SIGTERM.  asyncio's default loop on Linux uses
select.epoll: the epoll calls the preload serves."""
import asyncio
import signal
import sys


async def echo(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(port):
    server = await asyncio.start_server(echo, "127.0.0.1", port, backlog=512)
    print("port", server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with server:
        await stop
    print("asyncio_echo: selector", type(asyncio.get_running_loop()._selector).__name__,
          file=sys.stderr)


asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
