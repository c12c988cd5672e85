"""preload_common.py — what the preload.* tests share (compat/tests/).

Processes started here are tracked by PID and ended at exit (also on failure, SIGTERM or
SIGINT): TERM, then KILL, only those PIDs and the children they made that are still ours.
Every server listens on 127.0.0.1 on a free port.  Python's subprocess closes inherited fds
(close_fds), so daemons never hold the caller's lock files (/tmp/mp-quiet.lock).

Proof that the preload served a program: with MEGAPIPE_STATS=1 each process prints its
channels' statistics on stderr at exit, lines prefixed "megapipe-preload[PID]", one of them
"epoll_waits N"; `served_waits` sums N per PID.
"""
import atexit
import os
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

_procs = []       # Popen objects we started
_extra_pids = []  # PIDs we learned (daemons' pid files, their children)
_tmpdirs = []     # removed at exit, after the processes


def log(*a):
    print(*a, flush=True)


def fail(msg):
    log("FAIL: " + msg)
    sys.exit(1)


def skip(msg):
    log("SKIP: " + msg)
    sys.exit(77)


def tmpdir(prefix):
    """A temp directory removed at exit (kept with MP_KEEP=1, to look at the logs)."""
    d = tempfile.mkdtemp(prefix=prefix)
    if os.environ.get("MP_KEEP") != "1":
        _tmpdirs.append(d)
    else:
        log(f"(MP_KEEP=1: {d} is kept)")
    return d


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        return st[st.rindex(")") + 2] != "Z"
    except OSError:
        return False


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        if int(st[st.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(d))
    return out


def track_pid(pid):
    """A PID we caused to exist (a daemon's), to end at exit if it is still alive."""
    if pid not in _extra_pids:
        _extra_pids.append(pid)


def start(cmd, stderr_path=None, stdout=subprocess.PIPE, env=None, **kw):
    err = open(stderr_path, "wb") if stderr_path else None
    p = subprocess.Popen(cmd, stdout=stdout, stderr=err, env=env, close_fds=True, **kw)
    if err:
        err.close()
    _procs.append(p)
    return p


def _end(pids, timeout=5):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in pids if alive(p)]
        for p in live:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        end = time.time() + timeout
        while time.time() < end and any(alive(p) for p in live):
            time.sleep(0.05)


def cleanup():
    pids = []
    for p in _procs:
        if p.poll() is None:
            pids += [p.pid] + children(p.pid)
    for pid in _extra_pids:
        if alive(pid):
            pids += [pid] + children(pid)
    if pids:
        _end(pids)
    for p in _procs:
        try:
            p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    for d in _tmpdirs:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(cleanup)


def _on_signal(sig, frame):
    sys.exit(128 + sig)


signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGINT, _on_signal)


def stop(p, sig=signal.SIGTERM, timeout=10):
    """Signal one process we started and wait for it; True if it exited by itself."""
    if p.poll() is None:
        p.send_signal(sig)
    try:
        p.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return False


_STATS_RE = re.compile(r"megapipe-preload\[(\d+)\][^\n]*?\bepoll_waits[\s:=]+(\d+)")


def served_waits(text):
    """{pid: epoll waits served by io_uring channels} from MEGAPIPE_STATS output."""
    out = {}
    for m in _STATS_RE.finditer(text):
        out[int(m.group(1))] = out.get(int(m.group(1)), 0) + int(m.group(2))
    return out


def check_activity(text, disabled, what, min_procs=1):
    """The preload served epoll for at least min_procs processes (or, under --disable, none)."""
    waits = served_waits(text)
    active = {p: n for p, n in waits.items() if n > 0}
    if disabled:
        if active:
            fail(f"{what}: --disable, yet the preload served epoll waits: {active}")
        log(f"{what}: --disable: no epoll wait served by the preload (as expected)")
        return waits
    if len(active) < min_procs:
        tail = "\n".join(text.splitlines()[-30:])
        fail(f"{what}: the preload was not active: epoll waits served per process {waits} "
             f"(need > 0 in {min_procs} process(es)); stderr tail:\n{tail}")
    log(f"{what}: preload active: epoll waits served per process {waits}")
    return waits


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_port(port, timeout=10, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            fail(f"server exited with status {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    fail(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def exchange(sock, data, timeout=30.0, half_close=True):
    """Send data while reading the echo (non-blocking, no deadlock on large sizes); with
    half_close, shutdown(SHUT_WR) after the last byte and read to EOF.  Returns the bytes read."""
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    got = bytearray()
    sent = 0
    end = time.time() + timeout
    mv = memoryview(data)
    try:
        while True:
            if time.time() > end:
                raise TimeoutError(f"exchange stuck: sent {sent}/{len(data)}, got {len(got)}")
            for key, ev in sel.select(timeout=1.0):
                if ev & selectors.EVENT_WRITE and sent < len(data):
                    try:
                        sent += sock.send(mv[sent:sent + 65536])
                    except BlockingIOError:
                        pass
                    if sent == len(data):
                        if half_close:
                            sock.shutdown(socket.SHUT_WR)
                        sel.modify(sock, selectors.EVENT_READ)
                if ev & selectors.EVENT_READ:
                    try:
                        b = sock.recv(262144)
                    except BlockingIOError:
                        continue
                    if not b:
                        return bytes(got)
                    got += b
                    if not half_close and len(got) >= len(data):
                        return bytes(got)
            if len(data) == 0 and not half_close:
                return b""
    finally:
        sel.close()


def random_size(rng):
    """Mostly small messages, some large: 1 B - 4 KiB (80 %), up to 128 KiB (20 %)."""
    if rng.random() < 0.8:
        return rng.randint(1, 4096)
    return rng.randint(4097, 131072)


def payload(rng, n):
    return rng.randbytes(n) if hasattr(rng, "randbytes") else os.urandom(n)


__all__ = ["log", "fail", "skip", "tmpdir", "free_port", "start", "stop", "cleanup", "served_waits",
           "check_activity", "fd_count", "rss_kib", "wait_port", "exchange", "random_size",
           "payload", "alive", "children", "track_pid", "random"]
