#!/usr/bin/env python3
"""wake-profile.py — why the libuv bench server sleeps and wakes: per connection, how often it
goes to sleep, and (on MegaPipe) what each wake-up brought.

Runs uv_bench_server (stock, or UV_USE_MEGAPIPE=1) pinned to one CPU and bench/'s loadgen pinned
to another, as bench-libuv.py does, and then

  * counts the server's context switches and system calls with `perf stat -p` (cheap: this
    measurement does not move the server's CPU per request beyond the round-to-round noise),
  * on MegaPipe only, records `sched:sched_switch`, `io_uring:io_uring_complete` and
    `io_uring:io_uring_poll_arm` of the server (`perf record -p`, a few seconds) and splits the
    run into wakes: from one voluntary switch-out (the wait went to sleep) to the next.  Each
    wake is classified by the completions the server's task work produced in it: accepts (A),
    receives with data (Rdata), receives that ended the connection (Rend: EOF, RST).  It also
    prints how long the server slept before each wake (switch-out to its first event).

The completion kinds come from the user_data tag of the core's io_uring engine, whose enum is
read from core/uring/uring.h at run time.  Tracing slows the server (its CPU per request in
that part is not a measurement: use bench-libuv.py).  Stock libuv's wakes are only counted:
tracing its system calls slows it so much that its wakes gather more events than untraced.

  wake-profile.py --build BUILD [--variant stock|megapipe] [--proto rpc|http] [--secs 3]
                  [--conns 32] [--srv-cpu 0] [--lg-cpu 1]

Run it under `flock -x /tmp/mp-quiet.lock` on a shared machine.  Not a test.
"""
import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..", "..", "..")
sys.path.insert(0, os.path.join(REPO, "scripts"))
from mputil import find_result, stop_proc  # noqa: E402


def uring_tags():
    """The values of the core's `enum tag` (user_data >> 56), by name."""
    src = open(os.path.join(REPO, "core", "uring", "uring.h")).read()
    body = re.search(r"enum tag \{(.*?)\};", src, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    tags, nxt = {}, 0
    for item in [x.strip() for x in body.split(",") if x.strip()]:
        name, _, val = item.partition("=")
        nxt = int(val) if val.strip() else nxt
        tags[name.strip()] = nxt
        nxt += 1
    return tags


def perf_stat(pid, secs):
    out = tempfile.NamedTemporaryFile(prefix="wakeprof.", delete=False)
    out.close()
    subprocess.run(["perf", "stat", "-x,", "-o", out.name, "-e", "context-switches", "-e",
                    "raw_syscalls:sys_enter", "-p", str(pid), "--", "sleep", str(secs)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    vals = {}
    for line in open(out.name):
        parts = line.strip().split(",")
        if len(parts) > 2 and parts[0].isdigit():
            vals[parts[2]] = int(parts[0])
    os.unlink(out.name)
    return vals


def perf_trace(pid, secs):
    data = tempfile.NamedTemporaryFile(prefix="wakeprof.", suffix=".data", delete=False)
    data.close()
    subprocess.run(["perf", "record", "-q", "-o", data.name, "-e", "sched:sched_switch", "-e",
                    "io_uring:io_uring_complete", "-e", "io_uring:io_uring_poll_arm", "-p",
                    str(pid), "--", "sleep", str(secs)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    txt = subprocess.run(["perf", "script", "-i", data.name, "-F", "tid,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(data.name)
    return txt


def classify(txt, pid):
    """Wakes (segments between voluntary switch-outs) and the completions in each."""
    tags = uring_tags()
    kind_of = {tags["T_READ"]: "R", tags["T_WRITE"]: "W", tags["T_ACCEPT"]: "A"}
    segs, cur = [], None
    for line in txt.splitlines():
        m = re.match(r"\s*(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)", line)
        if not m:
            continue
        t, ev, rest = float(m.group(2)), m.group(3), m.group(4)
        if ev == "sched:sched_switch":
            if re.search(r"prev_pid=(\d+)", rest).group(1) != str(pid):
                continue
            if cur is not None:
                segs.append(cur)
            cur = {"after": re.search(r"prev_state=(\S+)", rest).group(1), "out": t,
                   "first": None, "kinds": collections.Counter()}
        elif cur is not None:
            if cur["first"] is None:
                cur["first"] = t
            if ev == "io_uring:io_uring_complete":
                ud = int(re.search(r"user_data 0x([0-9a-f]+)", rest).group(1), 16)
                res = int(re.search(r"result (-?\d+)", rest).group(1))
                k = kind_of.get(ud >> 56, "other")
                if k == "R":
                    k = "Rdata" if res > 0 else "Rend"
                cur["kinds"][k] += 1
            elif ev == "io_uring:io_uring_poll_arm":
                cur["kinds"]["poll_arm"] += 1
    return [s for s in segs if s["after"].startswith("S")], segs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--variant", choices=["stock", "megapipe"], default="megapipe")
    ap.add_argument("--proto", choices=["rpc", "http"], default="rpc")
    ap.add_argument("--secs", type=float, default=3)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--srv-cpu", type=int, default=0)
    ap.add_argument("--lg-cpu", type=int, default=1)
    a = ap.parse_args()

    env = dict(os.environ)
    for k in ("UV_USE_MEGAPIPE", "UV_MEGAPIPE_TCP", "UV_MEGAPIPE_EXCLUSIVE_ACCEPT"):
        env.pop(k, None)
    if a.variant == "megapipe":
        env["UV_USE_MEGAPIPE"] = "1"
    srv = subprocess.Popen(["taskset", "-c", str(a.srv_cpu),
                            os.path.join(a.build, "uv_bench_server"), "-m", a.proto, "-s", "64"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lg = None
    try:
        line = srv.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError("server did not start: %r" % line)
        port = line.split()[1]
        # one loadgen run covers both measurements (1 s to settle, then stat, then trace)
        total = 1 + a.secs + (a.secs if a.variant == "megapipe" else 0) + 1
        lg = subprocess.Popen([os.path.join(a.build, "bench", "loadgen"), "-p", port, "-m",
                               a.proto, "-c", str(a.conns), "-n", "1", "-s", "64", "-t", "1",
                               "-C", str(a.lg_cpu), "-d", str(total), "-w", "0", "-S",
                               str(srv.pid), "-X", str(a.srv_cpu)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        st = perf_stat(srv.pid, a.secs)
        txt = perf_trace(srv.pid, a.secs) if a.variant == "megapipe" else None
        out, _ = lg.communicate(timeout=total + 60)
        lg = None
        res = find_result(out, conv=float) or {}
    finally:
        if lg is not None:
            stop_proc(lg)
        stop_proc(srv)

    conns = res.get("tps", 0) * a.secs
    print("%s %s: %.0f connections/s (loadgen, whole run)" % (a.variant, a.proto, res.get("tps", 0)))
    if conns:
        print("  untraced (perf stat, %.0f s): context switches %.3f, system calls %.3f per "
              "connection" % (a.secs, st.get("context-switches", 0) / conns,
                              st.get("raw_syscalls:sys_enter", 0) / conns))
    if txt is None:
        return
    wakes, segs = classify(txt, srv.pid)
    tot = collections.Counter()
    for s in segs:
        tot.update(s["kinds"])
    acc = tot["A"] or 1
    print("  traced (perf record, %.0f s; per accepted connection): wakes %.3f; completions %s"
          % (a.secs, len(wakes) / acc,
             " ".join("%s %.2f" % (k, v / acc) for k, v in sorted(tot.items()))))
    agg = collections.defaultdict(lambda: [0, collections.Counter()])
    for s in wakes:
        key = "+".join(k for k in ("A", "Rdata", "Rend") if s["kinds"][k]) or "none"
        agg[key][0] += 1
        agg[key][1].update(s["kinds"])
    print("  wakes by what they brought (per connection; mean completions in one such wake):")
    for key, (n, c) in sorted(agg.items(), key=lambda x: -x[1][0]):
        print("    %-14s %.3f  (%s)" % (key, n / acc, " ".join(
            "%s %.1f" % (k, v / n) for k, v in sorted(c.items()))))
    slept = sorted((s["first"] - s["out"]) * 1e6 for s in wakes if s["first"] is not None)
    if slept:
        def q(p):
            return slept[int(p * (len(slept) - 1))]
        print("  sleep before a wake (switch-out to the first event after it): p10 %.0f, "
              "p50 %.0f, p90 %.0f us; %.0f %% under 5 us, %.0f %% under 10 us; median %.0f us" % (
                  q(.1), q(.5), q(.9), 100.0 * sum(x < 5 for x in slept) / len(slept),
                  100.0 * sum(x < 10 for x in slept) / len(slept), statistics.median(slept)))


if __name__ == "__main__":
    main()
