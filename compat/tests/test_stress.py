#!/usr/bin/env python3
"""test_stress.py [--disable] MEGAPIPE_RUN EPOLL_ECHO — preload.stress / preload.stress_disabled.

epoll_echo (a plain level-triggered epoll server, compat/tests/epoll_echo.c) under
megapipe-run --stats.  Checks:
  * 10,000 short connections (STRESS_CONNS), random sizes 1 B - 128 KiB, 16 at a time: each
    sends its bytes, half-closes, reads the echo to EOF; length and SHA-256 must match.
  * at the same time, hostile peers: one that never reads (its echo backs up in the server),
    resets in the middle of the server's writes (SO_LINGER 0 close), half-closes and then reads
    only after a pause (its data must still all come back).  The normal connections must not
    notice: every checksum right, no connection slower than 5 s.
  * the server's fd count returns to what it was after a warm-up, RSS to within 10 MiB of it.
  * the preload served the server's epoll waits (MEGAPIPE_STATS "epoll_waits N" > 0); with
    --disable (the control, on real epoll) it served none.
"""
import concurrent.futures
import hashlib
import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from preload_common import *  # noqa: E402,F403

disabled, (launcher, echo) = parse_args(2, __doc__)
nconns = int(os.environ.get("STRESS_CONNS", 10000))
tag = "stress" + (" --disable" if disabled else "")

tmp = tmpdir("mprun-stress-")
errpath = os.path.join(tmp, "server.err")
cmd = [launcher, "--stats", "--no-lib-path"] + (["--disable"] if disabled else []) + [echo, "-p", "0"]
srv, port = start_port_server(cmd, errpath, "epoll_echo")
log(f"{tag}: {' '.join(cmd)} on 127.0.0.1:{port}, pid {srv.pid}")


def one(seed):
    rng = random.Random(seed)
    data = payload(rng, random_size(rng))
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = exchange(s, data)
    dt = time.monotonic() - t0
    if len(got) != len(data) or hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
        return f"conn {seed}: sent {len(data)} bytes, got {len(got)} (checksum mismatch)", dt
    return None, dt


def run_many(n, base):
    errors, lat = [], []
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        for err, dt in ex.map(one, range(base, base + n)):
            lat.append(dt)
            if err:
                errors.append(err)
    return errors, lat


# Warm-up, then the baseline the server must come back to.
errors, _ = run_many(300, 10**6)
if errors:
    fail(f"{tag}: warm-up: {errors[:3]}")
time.sleep(0.3)
fd0, rss0 = fd_count(srv.pid), rss_kib(srv.pid)
log(f"{tag}: after warm-up: {fd0} fds, RSS {rss0} KiB")

done = threading.Event()
hostile = {"never_reads": 0, "resets": 0, "half_closes": 0}
hostile_errors = []


def never_reads():
    """Sends until the server's echo fills every buffer between us, then just holds on."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    chunk = b"n" * 65536
    sent, stalls = 0, 0
    while not done.is_set() and stalls < 20:
        try:
            sent += s.send(chunk)
            stalls = 0
        except BlockingIOError:
            stalls += 1
            time.sleep(0.05)
    hostile["never_reads"] = sent
    done.wait()
    s.close()


def resets():
    """Makes the server write to us, stops reading, then resets (RST) mid-write."""
    while not done.is_set():
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        end = time.time() + 0.3
        while time.time() < end:
            try:
                s.send(b"r" * 65536)
            except BlockingIOError:
                time.sleep(0.01)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        hostile["resets"] += 1


def half_closes():
    """Sends, half-closes, waits before reading: all of it must still come back."""
    rng = random.Random(7)
    while not done.is_set():
        data = payload(rng, rng.randint(65536, 1 << 20))
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setblocking(False)
            sent = 0
            end = time.time() + 0.5
            while sent < len(data) and time.time() < end:
                try:
                    sent += s.send(data[sent:sent + 65536])
                except BlockingIOError:
                    time.sleep(0.01)
            data = data[:sent]
            s.shutdown(socket.SHUT_WR)
            time.sleep(0.5)
            got = _read_all(s)
        if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
            hostile_errors.append(f"half-close peer: sent {len(data)}, got {len(got)}")
        hostile["half_closes"] += 1


def _read_all(s, timeout=20):
    s.setblocking(True)
    s.settimeout(timeout)
    got = bytearray()
    while True:
        b = s.recv(262144)
        if not b:
            return bytes(got)
        got += b


threads = [threading.Thread(target=f, daemon=True) for f in (never_reads, resets, half_closes)]
for t in threads:
    t.start()
time.sleep(0.5)

t0 = time.monotonic()
errors, lat = run_many(nconns, 0)
elapsed = time.monotonic() - t0
peak_fd, peak_rss = fd_count(srv.pid), rss_kib(srv.pid)
done.set()
for t in threads:
    t.join(timeout=30)
if errors:
    fail(f"{tag}: {len(errors)} of {nconns} connections wrong: {errors[:5]}")
if hostile_errors:
    fail(f"{tag}: {hostile_errors[:5]}")
lat.sort()
p50, p99, worst = lat[len(lat) // 2], lat[int(len(lat) * 0.99)], lat[-1]
log(f"{tag}: {nconns} connections checksummed in {elapsed:.1f} s "
    f"(latency p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {worst * 1e3:.0f} ms); "
    f"hostile peers: never-reading one sent {hostile['never_reads']} bytes, "
    f"{hostile['resets']} resets mid-write, {hostile['half_closes']} delayed half-closes")
if hostile["resets"] < 1 or hostile["half_closes"] < 1 or hostile["never_reads"] < 65536:
    fail(f"{tag}: hostile peers did not run: {hostile}")
if worst > 5.0:
    fail(f"{tag}: a connection took {worst:.1f} s: stuck behind a hostile peer?")

# Everything closed: the fds and memory go back to where they were.
end = time.time() + 10
while time.time() < end and fd_count(srv.pid) > fd0:
    time.sleep(0.1)
fd1, rss1 = fd_count(srv.pid), rss_kib(srv.pid)
log(f"{tag}: server fds {fd0} -> peak {peak_fd} -> {fd1}; RSS {rss0} -> {peak_rss} -> {rss1} KiB")
if fd1 > fd0:
    fail(f"{tag}: server holds {fd1} fds, {fd0} before the stress: "
         + " ".join(sorted(os.readlink(f"/proc/{srv.pid}/fd/{f}")
                           for f in os.listdir(f"/proc/{srv.pid}/fd")))[:2000])
if rss1 > rss0 + 10 * 1024:
    fail(f"{tag}: server RSS {rss1} KiB, {rss0} KiB before the stress")

err = stop_server(srv, errpath, tag)
check_activity(err, disabled, tag)
log(f"PASS: {tag}")
