#!/usr/bin/env python3
"""startup.py EXE CERTDIR — memcached-megapipe's start-up paths and the options that stay on
memcached's own paths (run inside a private network namespace by run-startup.sh).

Each case starts the server, checks what it must (serves requests, runs on channels or not,
privileges), and stops it by its pid.  Cases: foreground; -u nobody (channels are created
after the privilege drop: the worker rings belong to the unprivileged process); -d -P
(daemonised: the channels are the daemon's); MEMCACHED_MEGAPIPE=0 (stock libevent, no ring);
-U (UDP on the readiness adapter); -s (unix socket: dispatcher accepts, channel serves);
-Z (TLS on the readiness adapter); -t 8 on fewer CPUs (partitions share CPUs); "stats conns"
after a burst of connections accepted in one pass (addresses asked for late); pipelined
responses (copied) all sent before "quit" closes the connection; and a start-up
failure that must be clear (MP_ENGINE=bogus: mp_create() refuses, the server exits with a
message instead of running without channels)."""
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

EXE, CERTS = sys.argv[1], sys.argv[2]
tmp = tempfile.mkdtemp()
os.chmod(tmp, 0o1777)
failed = []


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rings(pid):
    n = 0
    for f in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "io_uring" in os.readlink(f"/proc/{pid}/fd/{f}"):
                n += 1
        except OSError:
            pass
    return n


def talk(sock, req, until=b"END\r\n"):
    sock.sendall(req)
    buf = b""
    while not buf.endswith(until):
        d = sock.recv(65536)
        if not d:
            break
        buf += d
    return buf


def set_get(sock):
    r1 = talk(sock, b"set k 7 0 5\r\nhello\r\n", b"\r\n")
    r2 = talk(sock, b"get k\r\n")
    return r1 == b"STORED\r\n" and r2 == b"VALUE k 7 5\r\nhello\r\nEND\r\n"


def connect(port, tries=100):
    for _ in range(tries):
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failed.append(name)


def start(args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.Popen([EXE] + args, env=e, stderr=subprocess.PIPE, text=True)


def stop(pid, proc=None):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if proc:
        proc.wait(timeout=10)
    else:
        for _ in range(200):
            if not os.path.exists(f"/proc/{pid}"):
                return
            time.sleep(0.05)


def case(name, args, env=None, want_rings=None, probe=set_get, port=None):
    port = port or free_port()
    p = start(["-l", "127.0.0.1", "-p", str(port)] + args, env)
    try:
        s = connect(port)
        ok = probe(s)
        s.close()
        n = rings(p.pid)
        check(name, ok and (want_rings is None or want_rings(n)), f"(io_uring instances: {n})")
    except Exception as ex:  # report and go on with the other cases
        check(name, False, repr(ex))
    finally:
        stop(p.pid, p)
    return p


# Foreground, 4 workers: 4 rings.
case("foreground -t 4", ["-u", "root", "-U", "0", "-t", "4"], want_rings=lambda n: n == 4)

# -u nobody: the workers' rings belong to the process after setuid.
port = free_port()
p = start(["-u", "nobody", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "2"])
try:
    s = connect(port)
    ok = set_get(s)
    s.close()
    uid = [l.split()[1] for l in open(f"/proc/{p.pid}/status") if l.startswith("Uid:")][0]
    check("-u nobody", ok and uid == "65534" and rings(p.pid) == 2, f"(uid {uid}, rings {rings(p.pid)})")
finally:
    stop(p.pid, p)

# -d -P: daemonised, channels made in the daemon.
port = free_port()
pidfile = os.path.join(tmp, "mc.pid")
r = subprocess.run([EXE, "-d", "-P", pidfile, "-u", "nobody", "-l", "127.0.0.1", "-p", str(port),
                    "-U", "0", "-t", "2"], capture_output=True, text=True, timeout=10)
try:
    s = connect(port)
    ok = set_get(s)
    s.close()
    pid = int(open(pidfile).read())
    ppid = [l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("PPid:")][0]
    check("-d -P -u nobody", r.returncode == 0 and ok and rings(pid) == 2 and ppid != str(os.getpid()),
          f"(daemon pid {pid}, parent {ppid}, rings {rings(pid)})")
    stop(pid)
except Exception as ex:
    check("-d -P -u nobody", False, repr(ex) + r.stderr)

# MEMCACHED_MEGAPIPE=0: memcached as shipped, on libevent.
case("MEMCACHED_MEGAPIPE=0", ["-u", "root", "-U", "0"], env={"MEMCACHED_MEGAPIPE": "0"},
     want_rings=lambda n: n == 0)

# MP_ENGINE=epoll: channels on the epoll engine (reads into each connection's buffer).
case("MP_ENGINE=epoll", ["-u", "root", "-U", "0"], env={"MP_ENGINE": "epoll"},
     want_rings=lambda n: n == 0)

# UDP beside TCP: the UDP socket is watched through each worker's readiness adapter.
udp = free_port(socket.SOCK_DGRAM)


def udp_probe(s):
    if not set_get(s):
        return False
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.sendto(b"\x00\x07\x00\x00\x00\x01\x00\x00get k\r\n", ("127.0.0.1", udp))
    d, _ = u.recvfrom(65536)
    return d[:2] == b"\x00\x07" and d[8:] == b"VALUE k 7 5\r\nhello\r\nEND\r\n"


case("-U (UDP)", ["-u", "root", "-U", str(udp), "-t", "2"], probe=udp_probe,
     want_rings=lambda n: n == 2)

# Unix socket: the dispatcher accepts, the worker's channel serves.
path = os.path.join(tmp, "mc.sock")
p = start(["-u", "root", "-s", path, "-t", "2"])
try:
    for _ in range(100):
        if os.path.exists(path):
            break
        time.sleep(0.05)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    check("-s (unix socket)", set_get(s) and rings(p.pid) == 2, f"(rings {rings(p.pid)})")
    s.close()
finally:
    stop(p.pid, p)


# TLS: SSL_accept in the dispatcher, the connection on the worker's readiness adapter.
def tls_probe(s):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    t = ctx.wrap_socket(s)
    return set_get(t)


case("-Z (TLS)", ["-u", "root", "-U", "0", "-t", "2", "-Z", "-o",
                  f"ssl_chain_cert={CERTS}/server_crt.pem,ssl_key={CERTS}/server_key.pem"],
     probe=tls_probe, want_rings=lambda n: n == 2)

# More workers than CPUs: partitions share CPUs; every connection is served.


def many(s):
    port = s.getpeername()[1]
    conns = [connect(port) for _ in range(64)]
    ok = all(set_get(c) for c in conns)
    for c in conns:
        c.close()
    return ok and set_get(s)


case("-t 8, 64 connections", ["-u", "root", "-U", "0", "-t", "8"], probe=many,
     want_rings=lambda n: n == 8)

# "stats conns" names every client, also those whose address the channel did not look up
# (MP_ACCEPT_ADDR_KNOWN: one multishot pass takes the burst, only the latest address is in its
# buffer; memcached asks getpeername() when "stats conns" wants the others).  The server is
# stopped while the clients connect, so that it accepts them all in one pass.


def burst_stats(s):
    pid = burst_pid[0]
    port = s.getpeername()[1]
    os.kill(pid, signal.SIGSTOP)
    try:
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(32)]
    finally:
        os.kill(pid, signal.SIGCONT)
    ok = all(set_get(c) for c in conns)
    listed = talk(s, b"stats conns\r\n").decode()
    missing = [c.getsockname()[1] for c in conns
               if f"addr tcp:127.0.0.1:{c.getsockname()[1]}\r\n" not in listed]
    for c in conns:
        c.close()
    if missing:
        print(f"  stats conns lacks the clients on ports {missing[:8]}...", flush=True)
    return ok and not missing


burst_pid = [0]
port = free_port()
p = start(["-l", "127.0.0.1", "-p", str(port), "-u", "root", "-U", "0", "-t", "1"])
try:
    burst_pid[0] = p.pid
    s = connect(port)
    check("stats conns after an accept burst", burst_stats(s))
    s.close()
except Exception as ex:
    check("stats conns after an accept burst", False, repr(ex))
finally:
    stop(p.pid, p)

# Small responses are copied and taken by memcached as sent before the kernel has them.  A
# client that pipelines many gets and reads nothing for a while fills the socket: the copies
# wait in the channel (at most a few per connection, then memcached waits for its writes).
# "quit" closes the connection after them: every response must still reach the client.


def pipelined_quit(s):
    val = b"v" * 1500
    if talk(s, b"set k 7 0 1500\r\n" + val + b"\r\n", b"\r\n") != b"STORED\r\n":
        return False
    n = 3000
    s.sendall(b"get k\r\n" * n + b"quit\r\n")
    time.sleep(0.5)  # the server's sends block meanwhile
    got = talk(s, b"", b"\0never")
    want = b"VALUE k 7 1500\r\n" + val + b"\r\nEND\r\n"
    if got != want * n:
        print(f"  {got.count(b'END')} of {n} responses before the close", flush=True)
    return got == want * n


case("pipelined responses sent before quit closes", ["-u", "root", "-U", "0", "-t", "1"],
     probe=pipelined_quit)

# A start-up failure is clear: no channel, no server.
port = free_port()
r = subprocess.run([EXE, "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-U", "0"],
                   env=dict(os.environ, MP_ENGINE="bogus"), capture_output=True, text=True,
                   timeout=20)
check("MP_ENGINE=bogus fails at start-up", r.returncode != 0 and "megapipe" in r.stderr,
      f"(exit {r.returncode}: {r.stderr.strip()[:120]})")

print("startup:", "FAILED: " + ", ".join(failed) if failed else "all cases pass")
sys.exit(1 if failed else 0)
