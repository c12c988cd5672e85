#!/usr/bin/env python3
"""bench_memcached.py — issue 13 point 3: Debian's memcached binary (libevent, epoll) vs
memcached-megapipe (the same memcached 1.6.18 adapted to channels), the paper's Fig. 5 and
Fig. 6 with its memcached workload.

Load: bench's loadgen in memcached mode (64 B keys, 1 KiB values, 9:1 get:set).
  txn sweep (Fig. 5):     CONNS connections, 1, 2, 4, ..., 128 requests per connection and
                          persistent; throughput, server CPU per request, system calls per
                          request, p50/p99.
  latency sweep (Fig. 6): persistent connections, LAT_CONNS of them; p50/p99 latency.
Server pinned to SERVER_CPU with one worker thread (-t 1), load generator pinned to
LOADGEN_CPU.  Variants interleaved per point and their order alternated per repetition;
medians over REPS.  Server CPU per request: all server threads' schedstat (loadgen -S).
System calls per request: perf stat -e raw_syscalls:sys_enter -p SERVER over the warmup and
the measured window, divided by requests over the same span (tps x span).

  bench_memcached.py --loadgen BUILD/bench/loadgen --mp BUILD/memcached-megapipe [--reps 5]
                     [--secs 2] [--csv out.csv] [--plot out.png] [--from-csv in.csv]
                     [--variant NAME:VAR=VALUE[,VAR=VALUE...]]...

--variant adds a memcached-megapipe run with those environment variables (e.g.
"wait20:MP_WAIT_USEC=20"), interleaved with the other two; the table gives its ratios to stock
too (the plots show stock and megapipe).  EXE=<path> in a variant runs that binary instead of
--mp (another build of memcached-megapipe, e.g. the code before a change).  QUIET_WAIT=<s> (env): before each run, wait up to
that long until the rest of the machine uses less than 0.2 CPUs (bench/mpbench.py's rule);
each run records others_cpus, the CPU time of everything else during the measured window.
"""
import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from mputil import free_port, loadgen_result, stop_proc, wait_port, wait_quiet  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--loadgen", required=True)
ap.add_argument("--mp", required=True, help="memcached-megapipe")
ap.add_argument("--stock", default="/usr/bin/memcached")
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--secs", type=float, default=2)
ap.add_argument("--warmup", type=float, default=1)
ap.add_argument("--conns", type=int, default=64)
ap.add_argument("--txns", default="1,2,4,8,16,32,64,128,0")
ap.add_argument("--lat-conns", default="16,64,256,1024")
ap.add_argument("--server-cpu", default="0")
ap.add_argument("--loadgen-cpu", default="1")
ap.add_argument("--csv", default=None)
ap.add_argument("--plot", default=None, help="PNG prefix: <prefix>_txn.png, <prefix>_latency.png")
ap.add_argument("--from-csv", default=None, help="no runs: summarize/plot this CSV")
ap.add_argument("--variant", action="append", default=[],
                help="NAME:VAR=VALUE[,...]: memcached-megapipe with this environment")
a = ap.parse_args()

perf = shutil.which("perf")
VARIANTS = ["stock", "megapipe"]
VENV = {"stock": {}, "megapipe": {}}
for spec in a.variant:
    name, _, envs = spec.partition(":")
    VARIANTS.append(name)
    VENV[name] = dict(kv.split("=", 1) for kv in envs.split(",") if kv)
KEYS = ("tps", "srv_us", "sys", "p50", "p99", "lg_us", "others")


def run_point(variant, txns, conns):
    wait_quiet(float(os.environ.get("QUIET_WAIT", 0)))
    port = free_port()
    env = dict(VENV[variant])
    exe = a.stock if variant == "stock" else env.pop("EXE", a.mp)
    srv = subprocess.Popen(["taskset", "-c", a.server_cpu, exe, "-u", "root", "-l", "127.0.0.1",
                            "-p", str(port), "-U", "0", "-t", "1", "-c", "8192", "-m", "256"],
                           env=dict(os.environ, **env))
    try:
        if not wait_port(port):
            raise RuntimeError(f"{variant}: memcached did not come up")
        pst = None
        if perf:
            pst = subprocess.Popen([perf, "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p",
                                    str(srv.pid), "--", "sleep", str(a.warmup + a.secs)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        out = subprocess.run([a.loadgen, "-m", "memcached", "-p", str(port), "-c", str(conns),
                              "-n", str(txns), "-d", str(a.secs), "-w", str(a.warmup), "-C",
                              a.loadgen_cpu, "-t", "1", "-S", str(srv.pid)],
                             capture_output=True, text=True, timeout=a.secs + a.warmup + 60)
        r = loadgen_result(out)
        res = {"tps": float(r["tps"]), "srv_us": float(r["server_cpu_us_per_txn"]),
               "lg_us": float(r["lg_cpu_us_per_txn"]), "p50": float(r["p50_us"]),
               "p99": float(r["p99_us"]), "errors": int(r["errors"]) + int(r["timeouts"]) +
               int(r["proto_errors"]), "sys": float("nan"),
               "others": float(r.get("others_cpus", "nan"))}
        if pst:
            _, err = pst.communicate(timeout=30)
            mm = re.search(r"^(\d+),,raw_syscalls:sys_enter", err, re.M)
            if mm and res["tps"] > 0:
                res["sys"] = int(mm.group(1)) / (res["tps"] * (a.warmup + a.secs))
        return res
    finally:
        stop_proc(srv, timeout=5)


txns_list = [int(x) for x in a.txns.split(",")] if a.txns else []
lat_list = [int(x) for x in a.lat_conns.split(",")] if a.lat_conns else []
points = [("txn", t, a.conns) for t in txns_list] + [("lat", 0, c) for c in lat_list]
rows = []
if a.from_csv:
    for r in csv.DictReader(open(a.from_csv)):
        rows.append({"sweep": r["sweep"], "variant": r["variant"], "txns": int(r["txns_per_conn"]),
                     "conns": int(r["conns"]), "rep": int(r["rep"]), "tps": float(r["tps"]),
                     "srv_us": float(r["server_us_per_req"]), "sys": float(r["syscalls_per_req"]),
                     "p50": float(r["p50_us"]), "p99": float(r["p99_us"]),
                     "lg_us": float(r["loadgen_us_per_req"]), "errors": int(r["errors"]),
                     "others": float(r.get("others_cpus") or "nan")})
        if r["variant"] not in VARIANTS:
            VARIANTS.append(r["variant"])
    a.reps = 0
    points = sorted({(r["sweep"], r["txns"], r["conns"]) for r in rows},
                    key=lambda p: (p[0] != "txn", p[1] == 0, p[1], p[2]))
for rep in range(a.reps):
    for sweep, txns, conns in points:
        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            res = run_point(variant, txns, conns)
            res.update(sweep=sweep, variant=variant, txns=txns, conns=conns, rep=rep)
            rows.append(res)
            print(f"rep {rep} {sweep} conns {conns} txns/conn {txns or 'persistent'} {variant:8s} "
                  f"{res['tps']:9.0f} req/s  server {res['srv_us']:6.2f} us/req  "
                  f"syscalls {res['sys']:5.2f}/req  p50 {res['p50']:7.0f} us  p99 {res['p99']:7.0f} us  "
                  f"loadgen {res['lg_us']:5.2f} us/req  others {res['others']:.2f} CPU  "
                  f"errors {res['errors']}", flush=True)

if a.csv and not a.from_csv:
    with open(a.csv, "w") as f:
        f.write("sweep,variant,txns_per_conn,conns,rep,tps,server_us_per_req,syscalls_per_req,"
                "p50_us,p99_us,loadgen_us_per_req,errors,others_cpus\n")
        for r in rows:
            f.write(f"{r['sweep']},{r['variant']},{r['txns']},{r['conns']},{r['rep']},{r['tps']:.1f},"
                    f"{r['srv_us']:.3f},{r['sys']:.3f},{r['p50']:.1f},{r['p99']:.1f},"
                    f"{r['lg_us']:.3f},{r['errors']},{r['others']:.3f}\n")


def med(sweep, variant, txns, conns):
    sel = [r for r in rows if (r["sweep"], r["variant"], r["txns"], r["conns"]) ==
           (sweep, variant, txns, conns)]
    return {k: statistics.median(r[k] for r in sel) for k in KEYS} | \
        {"n": len(sel), "errors": sum(r["errors"] for r in sel)}


def ratio(x, y):
    return x / y if y else float("nan")


n_reps = max((r["rep"] for r in rows), default=-1) + 1
print(f"\nmedians of {n_reps} (ratio = megapipe / stock)")
print("| sweep | conns | requests/conn | variant | req/s | server CPU µs/req | syscalls/req | "
      "p50 µs | p99 µs | loadgen CPU µs/req | errors |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
meds = {}
for sweep, txns, conns in points:
    for v in VARIANTS:
        m = meds[(sweep, txns, conns, v)] = med(sweep, v, txns, conns)
        print(f"| {sweep} | {conns} | {txns or 'persistent'} | {v} | {m['tps']:.0f} | "
              f"{m['srv_us']:.2f} | {m['sys']:.2f} | {m['p50']:.0f} | {m['p99']:.0f} | "
              f"{m['lg_us']:.2f} | {m['errors']} |")
    s = meds[(sweep, txns, conns, "stock")]
    for v in VARIANTS[1:]:
        m = meds[(sweep, txns, conns, v)]
        label = "**ratio**" if v == "megapipe" else f"ratio {v}"
        print(f"| {sweep} | {conns} | {txns or 'persistent'} | {label} | {ratio(m['tps'], s['tps']):.2f}× | "
              f"**{ratio(m['srv_us'], s['srv_us']):.2f}×** | {ratio(m['sys'], s['sys']):.2f}× | "
              f"{ratio(m['p50'], s['p50']):.2f}× | **{ratio(m['p99'], s['p99']):.2f}×** | "
              f"{ratio(m['lg_us'], s['lg_us']):.2f}× | |")

# Paired ratios: each repetition's variant run against the stock run next to it, which cancels
# slow drifts of the shared machine that a ratio of medians keeps.
print("\npaired server CPU/request ratios (variant / stock of the same repetition): median [min-max]")
for sweep, txns, conns in points:
    by_rep = {}
    for r in rows:
        if (r["sweep"], r["txns"], r["conns"]) == (sweep, txns, conns):
            by_rep.setdefault(r["rep"], {})[r["variant"]] = r
    parts = []
    for v in VARIANTS[1:]:
        rs = sorted(ratio(d[v]["srv_us"], d["stock"]["srv_us"]) for d in by_rep.values()
                    if v in d and "stock" in d)
        if rs:
            parts.append(f"{v} {statistics.median(rs):.2f}× [{rs[0]:.2f}-{rs[-1]:.2f}] n={len(rs)}")
    print(f"  {sweep} conns {conns} req/conn {txns or 'persistent'}: " + "; ".join(parts))


def plot_paired(prefix):
    """<prefix>_paired.png: every repetition's server CPU per request against the stock run
    next to it, per point and variant (dots), and their median (square): what a run with variants
    (--variant) compares."""
    vs = VARIANTS[1:]
    dat = prefix + "_paired.dat"
    labels = []
    with open(dat, "w") as f:
        for i, (sweep, txns, conns) in enumerate(points):
            labels.append(f"{conns} conns, {txns or 'persistent'}")
            by_rep = {}
            for r in rows:
                if (r["sweep"], r["txns"], r["conns"]) == (sweep, txns, conns):
                    by_rep.setdefault(r["rep"], {})[r["variant"]] = r
            for j, v in enumerate(vs):
                rs = [ratio(d[v]["srv_us"], d["stock"]["srv_us"]) for d in by_rep.values()
                      if v in d and "stock" in d]
                x = i * (len(vs) + 1) + j
                for r in rs:
                    f.write(f"{x} {r:.4f} {j}\n")
                if rs:
                    f.write(f"{x} {statistics.median(rs):.4f} {len(vs) + j}\n")
    xt = ", ".join(f'"{v}\\n{labels[i]}" {i * (len(vs) + 1) + j}'
                   for i in range(len(points)) for j, v in enumerate(vs))
    gp = f"""set terminal pngcairo size {max(760, 300 + 160 * len(points) * len(vs))},480 font ",10"
set output '{prefix}_paired.png'
set title "memcached, 1 worker: server CPU/request ÷ stock's in the same repetition\\n{n_reps} repetitions: dots each, squares the median; dashed: 0.85"
set bmargin 5
set ylabel "CPU per request, ratio to stock"
set xtics ({xt})
set xrange [-1:{len(points) * (len(vs) + 1) - 1}]
set yrange [0.5:1.3]
set grid ytics
set key off
plot '{dat}' using 1:($3 < {len(vs)} ? $2 : 1/0) with points pt 7 ps 1 lc 1, \\
     '' using 1:($3 >= {len(vs)} ? $2 : 1/0) with points pt 5 ps 3 lc 2, \\
     0.85 with lines dt 2 lc 0
"""
    subprocess.run(["gnuplot"], input=gp, text=True, check=True)
    os.unlink(dat)


if a.plot and len(VARIANTS) > 2:
    plot_paired(a.plot)
if a.plot and any(p[0] == "txn" for p in points):
    dat = a.plot + "_txn.dat"
    with open(dat, "w") as f:
        for sweep, txns, conns in points:
            if sweep != "txn":
                continue
            s, m = meds[(sweep, txns, conns, "stock")], meds[(sweep, txns, conns, "megapipe")]
            f.write(f"{txns or 'pers.'} {s['tps'] / 1000:.1f} {m['tps'] / 1000:.1f} {s['srv_us']:.2f} "
                    f"{m['srv_us']:.2f} {s['sys']:.2f} {m['sys']:.2f} {ratio(m['srv_us'], s['srv_us']):.3f}\n")
    gp = f"""set terminal pngcairo size 1400,420 font ",10"
set output '{a.plot}_txn.png'
set multiplot layout 1,3 title "memcached 1.6.18, 1 worker, {a.conns} connections: Debian's binary (libevent) vs memcached-megapipe, medians of {n_reps} (cf. paper Fig. 5)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set key top left
set yrange [0:*]
set xlabel "requests per connection"
set ylabel "kreq/s"; set title "throughput"
plot '{dat}' using 2:xtic(1) title 'stock', '' using 3 title 'megapipe'
set ylabel "us/req"; set title "server CPU per request"
plot '{dat}' using 4:xtic(1) title 'stock', '' using 5 title 'megapipe'
set ylabel "syscalls/req"; set title "server system calls per request"
plot '{dat}' using 6:xtic(1) title 'stock', '' using 7 title 'megapipe'
unset multiplot
"""
    subprocess.run(["gnuplot"], input=gp, text=True, check=True)
    os.unlink(dat)
if a.plot:
    lat = [p for p in points if p[0] == "lat"]
    if len(lat) > 1:
        dat = a.plot + "_lat.dat"
        with open(dat, "w") as f:
            for sweep, txns, conns in lat:
                s, m = meds[(sweep, txns, conns, "stock")], meds[(sweep, txns, conns, "megapipe")]
                f.write(f"{conns} {s['p50']:.1f} {s['p99']:.1f} {m['p50']:.1f} {m['p99']:.1f} "
                        f"{s['tps'] / 1000:.1f} {m['tps'] / 1000:.1f}\n")
        gp = f"""set terminal pngcairo size 1000,420 font ",10"
set output '{a.plot}_latency.png'
set multiplot layout 1,2 title "memcached, persistent connections, 1 worker: latency (cf. paper Fig. 6), medians of {n_reps}"
set logscale x 2
set logscale y
set xlabel "persistent connections"
set key top left
set ylabel "latency (us)"; set title "p50 and p99"
plot '{dat}' using 1:2 with linespoints lc 1 dt 2 title 'stock p50', '' using 1:3 with linespoints lc 1 title 'stock p99', \\
     '' using 1:4 with linespoints lc 2 dt 2 title 'megapipe p50', '' using 1:5 with linespoints lc 2 title 'megapipe p99'
unset logscale y
set yrange [0:*]
set ylabel "kreq/s"; set title "throughput"
plot '{dat}' using 1:6 with linespoints title 'stock', '' using 1:7 with linespoints title 'megapipe'
unset multiplot
"""
        subprocess.run(["gnuplot"], input=gp, text=True, check=True)
        os.unlink(dat)
