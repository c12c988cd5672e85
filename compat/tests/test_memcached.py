#!/usr/bin/env python3
"""test_memcached.py [--disable] MEGAPIPE_RUN — preload.memcached.

Debian's memcached (/usr/bin/memcached, unmodified; its libevent runs on epoll) under
megapipe-run --stats:
  1. in the foreground with 4 worker threads (-t 4);
  2. daemonized (-d: memcached forks, the parent exits, the child serves; -v keeps its
     stderr, where the statistics go), its pid from -P.
  3. when the build has the project's libevent (MP_LIBEVENT_LIBDIR), once more without
     --no-lib-path: memcached on libevent's megapipe method with the preload beside it.
Runs 1 and 2 use --no-lib-path: Debian's memcached on Debian's libevent, whose epoll the
preload serves.  Each run: set/get/delete/incr/decr, add/replace failures, a multi-get, a
512 KiB value back byte for byte, 200 connections open at once each storing and reading a
key.  Then SIGTERM: memcached exits normally and the preload prints its statistics; in runs
1 and 2 the serving process must show epoll waits served by the preload (none with
--disable).
"""
import os
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from preload_common import *  # noqa: E402,F403

MEMCACHED = os.environ.get("MEMCACHED_EXE", "/usr/bin/memcached")
disabled, (launcher,) = parse_args(1, __doc__)
if not os.access(MEMCACHED, os.X_OK):
    skip(f"no {MEMCACHED} (scripts/setup.sh --full installs Debian's memcached)")
user = ["-u", "root"] if os.getuid() == 0 else []
tmp = tmpdir("mprun-memcached-")


class Mc:
    """A minimal text-protocol client."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def close(self):
        self.s.close()

    def send(self, b):
        self.s.sendall(b)

    def _fill(self):
        b = self.s.recv(1 << 20)
        if not b:
            raise ConnectionError("memcached closed the connection")
        self.buf += b

    def line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        ln, self.buf = self.buf.split(b"\r\n", 1)
        return ln

    def exact(self, n):
        while len(self.buf) < n:
            self._fill()
        b, self.buf = self.buf[:n], self.buf[n:]
        return b

    def cmd(self, text):
        self.send(text.encode() + b"\r\n")
        return self.line().decode()

    def store(self, verb, key, value, flags=0):
        self.send(f"{verb} {key} {flags} 0 {len(value)}\r\n".encode() + value + b"\r\n")
        return self.line().decode()

    def get(self, *keys):
        self.send(("get " + " ".join(keys) + "\r\n").encode())
        out = {}
        while True:
            ln = self.line().decode()
            if ln == "END":
                return out
            p = ln.split()
            if p[0] != "VALUE":
                raise AssertionError(f"get: unexpected line {ln!r}")
            out[p[1]] = (int(p[2]), self.exact(int(p[3])))
            if self.exact(2) != b"\r\n":
                raise AssertionError("get: value not followed by CRLF")


def expect(what, got, want):
    if got != want:
        fail(f"memcached {what}: got {got!r}, expected {want!r}")


def functional(port, tag):
    c = Mc(port)
    expect("set", c.store("set", "foo", b"bar", 5), "STORED")
    expect("get", c.get("foo"), {"foo": (5, b"bar")})
    expect("add existing", c.store("add", "foo", b"x"), "NOT_STORED")
    expect("replace missing", c.store("replace", "nope", b"x"), "NOT_STORED")
    expect("append", c.store("append", "foo", b"baz"), "STORED")
    expect("get appended", c.get("foo"), {"foo": (5, b"barbaz")})
    expect("delete", c.cmd("delete foo"), "DELETED")
    expect("delete again", c.cmd("delete foo"), "NOT_FOUND")
    expect("get deleted", c.get("foo"), {})
    expect("set counter", c.store("set", "n", b"41"), "STORED")
    expect("incr", c.cmd("incr n 1"), "42")
    expect("incr big", c.cmd("incr n 1000"), "1042")
    expect("decr", c.cmd("decr n 2000"), "0")
    expect("incr missing", c.cmd("incr missing 1"), "NOT_FOUND")
    keys = [f"k{i}" for i in range(50)]
    for i, k in enumerate(keys):
        expect("set " + k, c.store("set", k, str(i).encode() * (i + 1)), "STORED")
    got = c.get(*keys, "absent1", "absent2")
    expect("multi-get", got, {k: (0, str(i).encode() * (i + 1)) for i, k in enumerate(keys)})
    rng = random.Random(11)
    big = payload(rng, 512 * 1024)
    expect("set 512 KiB", c.store("set", "big", big), "STORED")
    v = c.get("big")
    if "big" not in v or v["big"][1] != big:
        fail(f"memcached 512 KiB value: got {len(v.get('big', (0, b''))[1])} bytes back, differing")
    c.close()

    conns = [Mc(port) for _ in range(200)]
    for i, m in enumerate(conns):
        m.send(f"set c{i} 0 0 {len(str(i))}\r\n{i}\r\n".encode())
    for i, m in enumerate(conns):
        expect(f"set c{i} (200 connections)", m.line().decode(), "STORED")
    for i, m in enumerate(conns):
        m.send(f"get c{199 - i}\r\n".encode())
    for i, m in enumerate(conns):
        j = 199 - i
        want = f"VALUE c{j} 0 {len(str(j))}"
        expect(f"get c{j} (200 connections)", m.line().decode(), want)
        expect(f"value c{j}", m.line().decode(), str(j))
        expect("END", m.line().decode(), "END")
    st = Mc(port)
    st.send(b"stats\r\n")
    stats = {}
    for ln in iter(lambda: st.line().decode(), "END"):
        if ln.startswith("STAT "):
            stats[ln.split()[1]] = ln.split()[2]
    curr = int(stats.get("curr_connections", 0))
    for m in conns:
        m.close()
    st.close()
    if curr < 200:
        fail(f"memcached reports {curr} current connections with 200 open")
    log(f"{tag}: set/get/add/replace/append/delete/incr/decr, multi-get of 52 keys, "
        f"512 KiB value byte-identical, 200 connections at once (curr_connections {curr})")


flags = ["--stats", "--no-lib-path"] + (["--disable"] if disabled else [])

# 1. Foreground, 4 worker threads.
tag = "memcached -t 4" + (" --disable" if disabled else "")
port = free_port()
err1 = os.path.join(tmp, "fg.err")
srv = start([launcher] + flags + [MEMCACHED] + user +
            ["-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "4", "-c", "1024"],
            stderr_path=err1, stdout=subprocess.DEVNULL)
wait_port(port, proc=srv)
functional(port, tag)
if not stop(srv):
    fail(f"{tag}: did not exit on SIGTERM")
text = read_text(err1)
waits = check_activity(text, disabled, tag)
if not disabled and srv.pid not in waits:
    fail(f"{tag}: no statistics from memcached's own pid {srv.pid}: {waits}")

# 2. Daemonized: memcached forks; the child that serves must be on the preload.
tag = "memcached -d" + (" --disable" if disabled else "")
port = free_port()
err2 = os.path.join(tmp, "daemon.err")
pidfile = os.path.join(tmp, "memcached.pid")
p = start([launcher] + flags + [MEMCACHED] + user +
          ["-d", "-v", "-P", pidfile, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "2"],
          stderr_path=err2, stdout=subprocess.DEVNULL)
if p.wait(timeout=10) != 0:
    fail(f"{tag}: memcached -d exited {p.returncode}\n" + read_text(err2))
daemon = read_pidfile(pidfile, timeout=10)
if not daemon:
    fail(f"{tag}: no pid file")
track_pid(daemon)
if daemon == p.pid:
    fail(f"{tag}: memcached -d did not fork")
wait_port(port)
functional(port, tag)
os.kill(daemon, signal.SIGTERM)
if not wait_exit([daemon], timeout=10):
    fail(f"{tag}: daemon {daemon} did not exit on SIGTERM")
time.sleep(0.1)
text = read_text(err2)
waits = check_activity(text, disabled, tag)
if not disabled and waits.get(daemon, 0) <= 0:
    fail(f"{tag}: the daemon (pid {daemon}, forked by {p.pid}) served no epoll wait "
         f"through the preload: {waits}")
# 3. With the project's libevent (MP_WITH_LIBEVENT builds it; the launcher puts it on
# LD_LIBRARY_PATH unless --no-lib-path): memcached then runs on libevent's `megapipe` method,
# which uses the core directly, with the preload loaded beside it and idle.  The combination
# must work; the proof is in the maps (our libevent and the preload both mapped), not in
# epoll waits, since libevent makes none.
lelib = os.environ.get("MP_LIBEVENT_LIBDIR", "")
if not disabled and os.path.isfile(os.path.join(lelib, "libevent-2.1.so.7")):
    tag = "memcached on the project's libevent"
    port = free_port()
    srv = start([launcher, "--stats", MEMCACHED] + user +
                ["-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "4"],
                stderr_path=os.path.join(tmp, "le.err"), stdout=subprocess.DEVNULL)
    wait_port(port, proc=srv)
    maps = open(f"/proc/{srv.pid}/maps").read()
    if os.path.realpath(os.path.join(lelib, "libevent-2.1.so.7")) not in maps \
            or "libmegapipe-preload.so" not in maps:
        fail(f"{tag}: memcached does not map both {lelib}/libevent-2.1.so.7 and the preload")
    functional(port, tag)
    if not stop(srv) or srv.returncode != 0:
        fail(f"{tag}: exit status {srv.returncode}")
    log(f"{tag}: served by libevent's megapipe method, the preload loaded beside it")
elif not disabled:
    log(f"(no project libevent at {lelib or 'MP_LIBEVENT_LIBDIR unset'}: the third run is skipped)")
log(f"PASS: memcached" + (" --disable" if disabled else ""))
