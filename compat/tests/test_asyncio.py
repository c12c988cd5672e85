#!/usr/bin/env python3
"""test_asyncio.py [--disable] MEGAPIPE_RUN — preload.asyncio.

An unmodified python3 running an asyncio echo server (asyncio_echo.py; asyncio's epoll
selector) under megapipe-run --stats.  100 connections at once, each sends 20 messages of
random sizes (1 B - 128 KiB) and checks every echo byte for byte, then half-closes and expects
EOF.  The preload must have served the server's epoll waits (none with --disable).
"""
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from preload_common import *  # noqa: E402,F403

disabled, (launcher,) = parse_args(1, __doc__)
tag = "asyncio" + (" --disable" if disabled else "")
here = os.path.dirname(os.path.abspath(__file__))

tmp = tmpdir("mprun-asyncio-")
errpath = os.path.join(tmp, "server.err")
cmd = [launcher, "--stats", "--no-lib-path", "-v"] + (["--disable"] if disabled else []) + \
      [sys.executable, os.path.join(here, "asyncio_echo.py")]
srv, port = start_port_server(cmd, errpath, "asyncio server")
log(f"{tag}: {' '.join(cmd)} on 127.0.0.1:{port}")


def client(i):
    rng = random.Random(i)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        for k in range(20):
            data = payload(rng, random_size(rng))
            got = exchange(s, data, half_close=False)
            if got != data:
                return f"conn {i} message {k}: sent {len(data)} bytes, got {len(got)} back, differing"
        s.setblocking(True)
        s.shutdown(socket.SHUT_WR)
        rest = s.recv(1)
        if rest:
            return f"conn {i}: bytes after the last echo: {rest!r}"
    return None


errors = concurrent_errors(client, 100)
if errors:
    fail(f"{tag}: {len(errors)} of 100 connections wrong: {errors[:5]}")
log(f"{tag}: 100 concurrent connections x 20 messages echoed byte for byte")
err = stop_server(srv, errpath, tag)
if "selector EpollSelector" not in err:
    fail(f"{tag}: asyncio did not run on its epoll selector:\n{err[-2000:]}")
check_activity(err, disabled, tag)
log(f"PASS: {tag}")
