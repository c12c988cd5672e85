#!/usr/bin/env python3
"""readiness.py — which form of the readiness set costs less: one poll request per watched fd
(MP_READINESS=poll) or a kernel epoll set changed through io_uring, waited on with epoll_wait
when only watches are on the channel (MP_READINESS=epoll) or always through io_uring
(MP_READINESS=epoll-ring, mode "ering"), with plain epoll as the reference.  Runs bench/readiness (server pinned to --srv-cpu, client to
--cli-cpu) for every mode and watched-set size, interleaved: each repetition runs every
(size, mode) once, in a rotated order.  Prints per point the medians of server-thread CPU per
event, server-core busy time per event, events/s and engine system calls per event, the ratio
of each mode to `poll`, and writes bench/results/readiness.csv and docs/img/readiness.png.

  bench/readiness.py --build build [--reps 5] [--secs 3] [--warmup 1] [--sizes 10,10000]

QUIET_WAIT=<s> (env) waits up to that long before each run until others use < 0.2 CPUs.
"""
import argparse
import csv
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
from mpbench import has_cairo  # noqa: E402
from mputil import find_result, wait_quiet  # noqa: E402

MODES = ["poll", "epoll", "ering", "raw"]
LABEL = {"poll": "poll request per fd", "epoll": "epoll set, epoll_wait on it",
         "ering": "epoll set, waits via io_uring", "raw": "plain epoll (no library)"}
FIELDS = ["cpu_us_per_ev", "core_us_per_ev", "ev_per_s", "engine_syscalls_per_ev",
          "watch_ops_per_ev"]


def run(args, mode, n):
    wait_quiet(float(os.environ.get("QUIET_WAIT", 0)))
    cmd = [os.path.join(args.build, "bench", "readiness"), "-m", mode, "-n", str(n),
           "-s", str(args.secs), "-w", str(args.warmup), "-S", str(args.srv_cpu),
           "-C", str(args.cli_cpu)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.secs * 4 + 60)
    r = find_result(out.stdout)
    if r is not None:
        return r
    raise RuntimeError("%s: %s%s" % (" ".join(cmd), out.stdout, out.stderr))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--secs", type=float, default=3)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--sizes", default="10,10000")
    ap.add_argument("--srv-cpu", type=int, default=0)
    ap.add_argument("--cli-cpu", type=int, default=1)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--img", default=os.path.join(HERE, "..", "docs", "img"))
    ap.add_argument("--replot", action="store_true",
                    help="no runs: redraw the plot from the results directory's readiness.csv")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.replot:
        with open(os.path.join(args.results, "readiness.csv")) as f:
            rows = [dict(r, n=int(r["n"]), **{k: float(r[k]) for k in FIELDS})
                    for r in csv.DictReader(f)]
        plot(args, rows, sizes)
        return
    points = [(n, m) for n in sizes for m in MODES]
    runs = {p: [] for p in points}
    for rep in range(args.reps):
        k = rep % len(points)
        for n, m in points[k:] + points[:k]:  # rotated: no mode always first or last
            r = run(args, m, n)
            runs[(n, m)].append(r)
            print("rep %d n=%-6d %-6s cpu/ev %8.3f us  core/ev %8.3f us  %9.0f ev/s" % (
                rep + 1, n, m, float(r["cpu_us_per_ev"]), float(r["core_us_per_ev"]),
                float(r["ev_per_s"])), file=sys.stderr)
    os.makedirs(args.results, exist_ok=True)
    csvp = os.path.join(args.results, "readiness.csv")
    rows = []
    for n, m in points:
        med = {f: statistics.median(float(r[f]) for r in runs[(n, m)]) for f in FIELDS}
        rows.append(dict(n=n, mode=m, reps=len(runs[(n, m)]), **med))
    with open(csvp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["n", "mode", "reps"] + FIELDS)
        w.writeheader()
        w.writerows(rows)
    print("\n| watched fds (active) | form | server CPU/event (us) | server core busy/event (us) "
          "| events/s | engine syscalls/event | kernel watch ops/event | CPU vs poll |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        base = next(r for r in rows if r["n"] == n and r["mode"] == "poll")
        for r in (r for r in rows if r["n"] == n):
            print("| %d (%d) | %s | %.3f | %.3f | %.0f | %.4f | %.4f | %.3f |" % (
                n, max(1, n // 10), LABEL[r["mode"]], r["cpu_us_per_ev"], r["core_us_per_ev"],
                r["ev_per_s"], r["engine_syscalls_per_ev"], r["watch_ops_per_ev"],
                r["cpu_us_per_ev"] / base["cpu_us_per_ev"]))
    print("\nmedians of %d interleaved runs, %g s each: %s" % (args.reps, args.secs,
                                                              " ".join(sys.argv)))
    plot(args, rows, sizes)


def plot(args, rows, sizes):
    if subprocess.run(["sh", "-c", "command -v gnuplot"], capture_output=True).returncode:
        print("gnuplot not found: no plot", file=sys.stderr)
        return
    os.makedirs(args.img, exist_ok=True)
    datp = os.path.join(args.results, "readiness.dat")
    with open(datp, "w") as f:
        f.write("# size " + " ".join(MODES) + " (server CPU us/event), then core busy\n")
        for n in sizes:
            by = {r["mode"]: r for r in rows if r["n"] == n}
            f.write('"%d fds" %s %s\n' % (n, " ".join("%.4f" % by[m]["cpu_us_per_ev"] for m in MODES),
                                          " ".join("%.4f" % by[m]["core_us_per_ev"] for m in MODES)))
    png = os.path.join(args.img, "readiness.png")
    script = ["set terminal pngcairo size 1000,420 font ',10'" if has_cairo() else
              "set terminal png size 1000,420",
              "set output '%s'" % png,
              "set multiplot layout 1,2 title 'Serving readiness: a tenth of the watched fds active'",
              "set style data histograms", "set style histogram clustered gap 1",
              "set style fill solid 0.8 border -1", "set grid ytics", "set yrange [0:*]",
              "set termoption noenhanced", "set key below horizontal",
              "set ylabel 'server thread CPU per event (us)'",
              "plot " + ", ".join("'%s' using %d:xtic(1) title '%s'" % (datp, i + 2, LABEL[m])
                                  for i, m in enumerate(MODES)),
              "set ylabel 'server core busy per event (us)'",
              "plot " + ", ".join("'%s' using %d:xtic(1) title '%s'" % (datp, i + 2 + len(MODES), LABEL[m])
                                  for i, m in enumerate(MODES)),
              "unset multiplot"]
    q = subprocess.run(["gnuplot"], input="\n".join(script) + "\n", capture_output=True, text=True)
    if q.returncode:
        print("gnuplot failed: %s" % q.stderr.strip(), file=sys.stderr)
    else:
        print("plot: %s" % png, file=sys.stderr)


if __name__ == "__main__":
    main()
