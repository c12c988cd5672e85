"""preload_common.py — what the preload.* tests share (compat/tests/).

Processes started here are tracked by PID and ended at exit (also on failure, SIGTERM or
SIGINT): TERM, then KILL, only those PIDs and the children they made that are still ours.
Every server listens on 127.0.0.1 on a free port.  Python's subprocess closes inherited fds
(close_fds), so daemons never hold the caller's lock files (/tmp/mp-quiet.lock).

Proof that the preload served a program: with MEGAPIPE_STATS=1 each process prints its
channels' statistics on stderr at exit, lines prefixed "megapipe-preload[PID]", one of them
"epoll_waits N"; `served_waits` sums N per PID.  In stream mode (MEGAPIPE_STREAMS=1 in the
environment, or a test's --streams option, which sets it for every process it starts) each
channel also prints "streams N (...)", N connections it adopted; `check_activity` then also
requires N > 0 in as many processes (`stream_counts`).
"""
import atexit
import concurrent.futures
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import mputil  # noqa: E402
from mputil import free_port  # noqa: E402,F401  (re-exported)

alive = mputil.pid_alive      # pid exists and is not a zombie
children = mputil.child_pids  # direct children of a pid
wait_exit = mputil.wait_exit  # wait until none of some pids is alive
read_pidfile = mputil.read_pidfile

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
        mputil.wait_exit(live, timeout)


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


stop = mputil.stop_proc  # stop(p, sig=SIGTERM, timeout=10): signal, wait, kill; True if it exited


_STATS_RE = re.compile(r"megapipe-preload\[(\d+)\][^\n]*?\bepoll_waits[\s:=]+(\d+)")
_STREAMS_RE = re.compile(r"megapipe-preload\[(\d+)\][^\n]*?\bstreams (\d+) \(")


def streams_mode():
    """Stream mode asked for (MEGAPIPE_STREAMS=1, or --streams)."""
    return os.environ.get("MEGAPIPE_STREAMS", "") not in ("", "0")


def stream_counts(text):
    """{pid: connections adopted as streams} from MEGAPIPE_STATS output (stream mode)."""
    out = {}
    for m in _STREAMS_RE.finditer(text):
        out[int(m.group(1))] = out.get(int(m.group(1)), 0) + int(m.group(2))
    return out


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
    if streams_mode():
        st = {p: n for p, n in stream_counts(text).items() if n > 0}
        if len(st) < min_procs:
            tail = "\n".join(text.splitlines()[-30:])
            fail(f"{what}: stream mode asked for, but connections were served as streams in "
                 f"{len(st)} process(es) (need {min_procs}): {stream_counts(text)}; stderr "
                 f"tail:\n{tail}")
        log(f"{what}: stream mode: connections adopted as streams per process {st}")
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
    """Wait until 127.0.0.1:port accepts connections; fail if proc (optional) exits first or
    nothing listens after timeout seconds."""
    if mputil.wait_port(port, timeout, proc=proc, connect_timeout=1):
        return
    if proc is not None and proc.poll() is not None:
        fail(f"server exited with status {proc.returncode} before listening on {port}")
    fail(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def read_text(path):
    with open(path, errors="replace") as f:
        return f.read()


def parse_args(n, doc):
    """The tests' command line, '[--disable] [--streams] ARG...' with n ARGs: (disabled, args);
    prints doc and exits 2 otherwise.  --streams sets MEGAPIPE_STREAMS=1 for every process the
    test starts (stream mode; the activity check then also wants streams)."""
    args = sys.argv[1:]
    disabled = bool(args) and args[0] == "--disable"
    if disabled:
        args = args[1:]
    if args and args[0] == "--streams":
        os.environ["MEGAPIPE_STREAMS"] = "1"
        args = args[1:]
    if len(args) != n:
        print(doc)
        sys.exit(2)
    return disabled, args


def start_port_server(cmd, errpath, what):
    """Start a server that prints "port N" as its first stdout line (stderr to errpath):
    (process, N); fail with its stderr when it does not."""
    srv = start(cmd, stderr_path=errpath)
    line = srv.stdout.readline().decode()
    if not line.startswith("port "):
        fail(f"{what} did not start: {line!r}\n" + read_text(errpath))
    return srv, int(line.split()[1])


def stop_server(srv, errpath, tag):
    """SIGTERM the server, which must exit by itself with status 0: its stderr text."""
    if not stop(srv):
        fail(f"{tag}: server did not exit on SIGTERM")
    err = read_text(errpath)
    if srv.returncode != 0:
        fail(f"{tag}: server exit status {srv.returncode}\n{err[-3000:]}")
    return err


def concurrent_errors(fn, n, workers=None):
    """fn(0), ..., fn(n - 1) on workers threads (n by default): the results that are not None
    (error strings)."""
    with concurrent.futures.ThreadPoolExecutor(workers or n) as ex:
        return [e for e in ex.map(fn, range(n)) if e]


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
           "payload", "alive", "children", "track_pid", "random", "read_text", "parse_args",
           "start_port_server", "stop_server", "wait_exit", "read_pidfile", "concurrent_errors",
           "streams_mode", "stream_counts"]
