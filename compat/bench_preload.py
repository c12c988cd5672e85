#!/usr/bin/env python3
"""bench_preload.py — Debian's memcached and nginx, stock vs under megapipe-run (epoll-only
mode, and stream mode with --streams), same run, interleaved, pinned.  Not a test.

    flock -x /tmp/mp-quiet.lock python3 compat/bench_preload.py --build BUILD --out DIR
        [--pairs 5] [--seconds 4] [--conns 64] [--workloads mc-persistent,mc-short,ngx-specweb,ngx-keepalive]
        [--variants stock,preload,streams]

(Run without the lock, it takes it itself: it re-executes under `flock -x /tmp/mp-quiet.lock`.)
QUIET_WAIT (env, default 8): before each run, wait up to that many seconds until the other
users of the machine take < 0.2 CPUs (scripts/mputil.py's wait_quiet, bench/mpbench.py's rule).

Servers: /usr/bin/memcached (-t 1) pinned to CPU 0 with taskset; /usr/sbin/nginx, 1 worker,
worker_cpu_affinity 01, configured as backends/nginx/bench_nginx.py configures it (its
server() and ngxlib).  "preload" = the same binary started by BUILD/compat/megapipe-run
(epoll-only mode); "streams" = the same with megapipe-run --streams (stream mode).
Load: bench's loadgen (BUILD/bench/loadgen) pinned to CPU 1, in memcached mode (64 B keys,
1 KiB values, 9:1 get:set, as backends/libevent/bench_memcached.py runs it) or in http mode on
bench/gen_fileset.py's SpecWeb-like file set (through bench_nginx.loadgen).

Per run: throughput; p99 latency; server CPU per request (loadgen -S: the server process's
CPU time over the measured window, all threads — utime+stime at ns resolution from
schedstat); CPU 0's busy time per request including softirq (loadgen -X 0, /proc/stat); the
server's system calls per request (perf stat -e raw_syscalls:sys_enter -p PID over warm-up +
window, divided by tps x that span; skipped with a note when perf cannot count).  PAIRS rounds
per workload, each running every variant once, the order rotating from round to round.  Prints
a table of medians, and for each variant against stock the median of the per-round ratios
("paired") and the ratio of the medians; writes
DIR/runs.csv, DIR/summary.md and DIR/bench_preload.png (matplotlib when importable, else
gnuplot; said which).
"""
import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOCK = "/tmp/mp-quiet.lock"

def _lock_inherited():
    """An fd on LOCK came with the process: `flock -x LOCK python3 …` (flock(1) passes its
    descriptor on), so the lock is held already; taking it again would wait forever."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == LOCK:
                return True
        except OSError:
            pass
    return False


if os.environ.get("MP_PRELOAD_BENCH_LOCKED") != "1" and not _lock_inherited():
    os.environ["MP_PRELOAD_BENCH_LOCKED"] = "1"
    os.execvp("flock", ["flock", "-x", LOCK, sys.executable, os.path.abspath(__file__)] + sys.argv[1:])

sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "backends", "nginx"))
sys.path.insert(0, os.path.join(ROOT, "backends", "nginx", "tests"))
from mputil import free_port, loadgen_result, stop_proc, wait_port, wait_quiet  # noqa: E402
import ngxlib  # noqa: E402
import bench_nginx  # noqa: E402  (server(), loadgen())

MEMCACHED = "/usr/bin/memcached"
NGINX = ngxlib.NGINX
WORKLOADS = {
    "mc-persistent": ("memcached", ["-n", "0"]),
    "mc-short": ("memcached", ["-n", "4"]),
    "ngx-specweb": ("nginx", ["-n", "6"]),
    "ngx-keepalive": ("nginx", ["-n", "0"]),
}
VARIANTS = ["stock", "preload", "streams"]
LAUNCH = {"stock": [], "preload": ["--no-lib-path"], "streams": ["--no-lib-path", "--streams"]}
KEYS = ["tps", "p99_us", "srv_us", "core_us", "sys"]
perf = shutil.which("perf")
perf_note = None


def perf_start(pid, span):
    if not perf or perf_note:
        return None
    return subprocess.Popen([perf, "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p", str(pid),
                             "--", "sleep", str(span)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def perf_end(pst, tps, span):
    global perf_note
    if not pst:
        return float("nan")
    _, err = pst.communicate(timeout=span + 30)
    m = re.search(r"^(\d+),,raw_syscalls:sys_enter", err, re.M)
    if not m:
        perf_note = "perf stat -e raw_syscalls:sys_enter could not count: " + err.strip()[-200:]
        return float("nan")
    return int(m.group(1)) / (tps * span) if tps > 0 else float("nan")


def run_memcached(a, variant, extra):
    port = free_port()
    cmd = ["taskset", "-c", "0"] + ([a.launcher] + LAUNCH[variant] if LAUNCH[variant] else []) + \
          [MEMCACHED, "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "1",
           "-c", "4096", "-m", "256"]
    srv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not wait_port(port, 10.0):
            raise RuntimeError("memcached did not come up: " + " ".join(cmd))
        span = a.warmup + a.seconds
        pst = perf_start(srv.pid, span)
        out = subprocess.run([a.loadgen, "-m", "memcached", "-p", str(port), "-c", str(a.conns),
                              "-d", str(a.seconds), "-w", str(a.warmup), "-C", "1", "-t", "1",
                              "-S", str(srv.pid), "-X", "0"] + extra,
                             capture_output=True, text=True, timeout=span + 60)
        r = loadgen_result(out)
        return {"tps": r["tps"], "p99_us": r["p99_us"], "srv_us": r["server_cpu_us_per_txn"],
                "core_us": r["core_us_per_txn"], "sys": perf_end(pst, r["tps"], span),
                "errors": r.get("errors", 0) + r.get("timeouts", 0)}, " ".join(cmd)
    finally:
        stop_proc(srv, timeout=10)


def run_nginx(a, variant, extra):
    ngxlib.NGINX = a.ngx_wrapper[variant] if variant != "stock" else NGINX
    port = free_port()
    args = argparse.Namespace(module=None, loadgen=a.loadgen, conns=a.conns, seconds=a.seconds)
    n = bench_nginx.server(args, "epoll", port, os.path.join(a.fileset, "docroot"))
    try:
        w = n.wait_workers(1)[0]
        span = 1 + a.seconds  # bench_nginx.loadgen warms up for 1 s
        pst = perf_start(w, span)
        r, cmd = bench_nginx.loadgen(args, port, os.path.join(a.fileset, "specweb.list"), extra,
                                     pid=w)
        if n.problems():
            raise RuntimeError("\n".join(n.problems()))
        return {"tps": r["tps"], "p99_us": r["p99_us"], "srv_us": r["server_cpu_us_per_txn"],
                "core_us": r["core_us_per_txn"], "sys": perf_end(pst, r["tps"], span),
                "errors": r.get("errors", 0) + r.get("timeouts", 0)}, \
            ("megapipe-run " + " ".join(LAUNCH[variant]) + " " if variant != "stock" else "") + NGINX
    finally:
        n.cleanup()


def plot(out, rows, wls):
    med = {(w, v): {k: statistics.median(r[k] for r in rows if r["workload"] == w and r["variant"] == v)
                    for k in KEYS} for w in wls for v in VARIANTS}
    titles = [("tps", "throughput (req/s)"), ("srv_us", "server CPU us/req"),
              ("sys", "server syscalls/req"), ("p99_us", "p99 latency (us)")]
    png = os.path.join(out, "bench_preload.png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 4, figsize=(16, 4))
        for ax, (k, t) in zip(axes, titles):
            x = range(len(wls))
            bw = 0.8 / len(VARIANTS)
            for i, v in enumerate(VARIANTS):
                ax.bar([j + i * bw for j in x], [med[(w, v)][k] for w in wls], bw, label=v)
            ax.set_xticks([j + 0.4 - bw / 2 for j in x])
            ax.set_xticklabels(wls, rotation=20)
            ax.set_title(t)
        axes[0].legend()
        fig.suptitle("Debian memcached / nginx: stock epoll vs megapipe-run (" + ", ".join(VARIANTS[1:])
                     + "), medians")
        fig.tight_layout()
        fig.savefig(png)
        return png, "matplotlib"
    except ImportError:
        pass
    dat = png + ".dat"
    with open(dat, "w") as f:
        for w in wls:
            f.write(w + " " + " ".join(f"{med[(w, v)][k]:.3f}" for k, _ in titles for v in VARIANTS)
                    + "\n")
    gp = [f"set terminal pngcairo size 1600,420 font ',10'", f"set output '{png}'",
          "set multiplot layout 1,4 title 'Debian memcached / nginx: stock epoll vs "
          "megapipe-run (epoll-only mode), medians'",
          "set style data histograms", "set style histogram clustered gap 1",
          "set style fill solid 0.8 border -1", "set yrange [0:*]", "set xtics rotate by -20",
          "set key below"]
    nv = len(VARIANTS)
    for i, (k, t) in enumerate(titles):
        c = 2 + nv * i
        gp.append(f"set title '{t}'")
        gp.append(f"plot '{dat}' using {c}:xtic(1) title '{VARIANTS[0]}', " +
                  ", ".join(f"'' using {c + j} title '{VARIANTS[j]}'" for j in range(1, nv)))
    gp.append("unset multiplot")
    r = subprocess.run(["gnuplot"], input="\n".join(gp) + "\n", text=True, capture_output=True)
    os.unlink(dat)
    if r.returncode != 0:
        return None, "gnuplot failed: " + r.stderr[-300:]
    return png, "gnuplot (matplotlib is not installed)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", required=True, help="build directory (compat/megapipe-run, bench/loadgen)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="stock first; any of preload (epoll-only), streams (--streams)")
    a = ap.parse_args()
    a.build = os.path.abspath(a.build)
    a.out = os.path.abspath(a.out)
    a.launcher = os.path.join(a.build, "compat", "megapipe-run")
    a.loadgen = os.path.join(a.build, "bench", "loadgen")
    for f in (a.launcher, a.loadgen):
        if not os.access(f, os.X_OK):
            sys.exit(f"bench_preload: no {f} (build the megapipe-run and loadgen targets)")
    os.makedirs(a.out, exist_ok=True)
    wls = a.workloads.split(",")
    VARIANTS[:] = a.variants.split(",")
    if VARIANTS[0] != "stock" or any(v not in LAUNCH for v in VARIANTS):
        sys.exit("bench_preload: --variants: stock first, then preload and/or streams")
    if any(WORKLOADS[w][0] == "nginx" for w in wls):
        a.fileset = os.path.join(a.out, "fileset")
        if not os.path.exists(os.path.join(a.fileset, "specweb.list")):
            subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gen_fileset.py"), "specweb",
                            a.fileset], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["chmod", "-R", "a+rX", a.out], check=True)
        a.ngx_wrapper = {}
        for v in VARIANTS[1:]:
            a.ngx_wrapper[v] = os.path.join(a.out, "nginx-" + v)
            with open(a.ngx_wrapper[v], "w") as f:
                f.write(f'#!/bin/sh\nexec "{a.launcher}" {" ".join(LAUNCH[v])} "{NGINX}" "$@"\n')
            os.chmod(a.ngx_wrapper[v], 0o755)
    quiet = float(os.environ.get("QUIET_WAIT", 8))
    # The launcher must find a preload that serves epoll: say so once, loudly, before measuring.
    chk = subprocess.run([a.launcher, "-v", sys.executable, "-c", "import select; select.epoll().poll(0)"],
                         capture_output=True, text=True)
    if "epoll served by io_uring channel" not in chk.stderr:
        sys.exit("bench_preload: the preload does not serve epoll here:\n" + chk.stderr)
    print(chk.stderr.strip().splitlines()[-1])

    rows, cmds = [], {}
    for w in wls:
        kind, extra = WORKLOADS[w]
        for i in range(a.pairs):
            k = i % len(VARIANTS)
            for v in VARIANTS[k:] + VARIANTS[:k]:
                wait_quiet(quiet)
                res, cmd = (run_memcached if kind == "memcached" else run_nginx)(a, v, extra)
                cmds[(w, v)] = cmd
                res.update(workload=w, variant=v, pair=i)
                rows.append(res)
                print(f"{w:14} pair {i} {v:8} {res['tps']:9.0f} req/s  server {res['srv_us']:6.2f} us/req"
                      f"  core0 {res['core_us']:6.2f} us/req  syscalls {res['sys']:5.2f}/req"
                      f"  p99 {res['p99_us']:7.0f} us  errors {res['errors']:.0f}", flush=True)

    with open(os.path.join(a.out, "runs.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["workload", "variant", "pair"] + KEYS + ["errors"])
        wr.writeheader()
        for r in rows:
            wr.writerow({k: r[k] for k in wr.fieldnames})
    lines = ["| workload | variant | req/s | server CPU us/req | CPU 0 us/req (incl. softirq) "
             "| syscalls/req | p99 us |", "|---|---|---|---|---|---|---|"]
    for w in wls:
        med = {}
        for v in VARIANTS:
            sel = [r for r in rows if r["workload"] == w and r["variant"] == v]
            med[v] = {k: statistics.median(r[k] for r in sel) for k in KEYS}
            m = med[v]
            lines.append(f"| {w} | {v} | {m['tps']:.0f} | {m['srv_us']:.2f} | {m['core_us']:.2f} | "
                         f"{m['sys']:.2f} | {m['p99_us']:.0f} |")
        for v in VARIANTS[1:]:
            ratio = {}
            for k in KEYS:
                pr = []
                for i in range(a.pairs):
                    s = next(r for r in rows if r["workload"] == w and r["variant"] == "stock" and r["pair"] == i)
                    p = next(r for r in rows if r["workload"] == w and r["variant"] == v and r["pair"] == i)
                    if s[k] and s[k] == s[k] and p[k] == p[k]:
                        pr.append(p[k] / s[k])
                ratio[k] = statistics.median(pr) if pr else float("nan")
            lines.append(f"| {w} | {v} / stock (median of paired ratios) | {ratio['tps']:.3f}x | "
                         f"{ratio['srv_us']:.3f}x | {ratio['core_us']:.3f}x | {ratio['sys']:.3f}x | "
                         f"{ratio['p99_us']:.3f}x |")
            rm = {k: med[v][k] / med["stock"][k] if med["stock"][k] else float("nan") for k in KEYS}
            lines.append(f"| {w} | {v} / stock (ratio of medians) | {rm['tps']:.3f}x | "
                         f"{rm['srv_us']:.3f}x | {rm['core_us']:.3f}x | {rm['sys']:.3f}x | "
                         f"{rm['p99_us']:.3f}x |")
    png, how = plot(a.out, rows, wls)
    notes = [f"{a.pairs} interleaved rounds per workload ({', '.join(VARIANTS)}), {a.seconds:g} s each after {a.warmup:g} s warm-up, "
             f"{a.conns} connections; server on CPU 0, loadgen on CPU 1.  Kernel {os.uname().release}, "
             f"{os.cpu_count()} CPUs."]
    if perf_note:
        notes.append("system calls per request not measured: " + perf_note)
    elif not perf:
        notes.append("system calls per request not measured: no perf")
    notes.append(f"plot: {png} ({how})" if png else f"no plot: {how}")
    for (w, v), c in sorted(cmds.items()):
        notes.append(f"{w} {v}: {c}")
    text = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
