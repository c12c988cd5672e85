#!/usr/bin/env python3
"""bench_memcached.py — issue 5 point 6: Debian's memcached on stock libevent (epoll) vs on the
megapipe libevent (LD_LIBRARY_PATH), same binary, same run, variants interleaved.

Load: bench's loadgen in memcached mode (64 B keys, 1 KiB values, 9:1 get:set), persistent
connections and 1, 4, 16 requests per connection.  Server pinned to SERVER_CPU with one worker
thread, load generator to LOADGEN_CPU.  Per point: throughput, server CPU per request (loadgen
-S: all server threads' schedstat), system calls per request (perf stat on raw_syscalls for
the server during the measured window), load generator CPU per request.  Medians over REPS.

  bench_memcached.py --loadgen BUILD/bench/loadgen --lelib BUILD/libevent/lib [--reps 3]
                     [--secs 3] [--conns 64] [--csv out.csv]

With --client memcaslap the load is libmemcached-tools' memcaslap instead (its defaults: 64 B
keys, 1 KiB values, 9:1 get:set; -T 1 -c CONNS, persistent connections only): throughput is
memcaslap's TPS, server CPU per request the server's utime+stime over the run divided by its
operations.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from mputil import free_port, loadgen_result, proc_cpu, stop_proc, wait_port  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--loadgen", required=True)
ap.add_argument("--lelib", required=True)
ap.add_argument("--memcached", default="/usr/bin/memcached")
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--secs", type=float, default=3)
ap.add_argument("--warmup", type=float, default=1)
ap.add_argument("--conns", type=int, default=64)
ap.add_argument("--txns", default="0,1,4,16")
ap.add_argument("--server-cpu", default="0")
ap.add_argument("--loadgen-cpu", default="1")
ap.add_argument("--csv", default=None)
ap.add_argument("--plot", default=None, help="PNG: medians plotted with gnuplot")
ap.add_argument("--from-csv", default=None, help="no runs: summarize/plot this CSV")
ap.add_argument("--client", choices=["loadgen", "memcaslap"], default="loadgen")
ap.add_argument("--poll-too", action="store_true",
                help="a third variant: the megapipe method with MP_READINESS=poll (one poll "
                     "request per fd instead of the epoll set)")
ap.add_argument("--ring-too", action="store_true",
                help="another variant: the megapipe method with MP_READINESS=epoll-ring (the "
                     "epoll set, every wait through the ring instead of epoll_wait on the set)")
a = ap.parse_args()
extra = (["megapipe-poll"] if a.poll_too else []) + (["megapipe-ring"] if a.ring_too else [])

perf = shutil.which("perf")


def run_memcaslap(port, srv):
    mc = shutil.which("memcaslap")
    if not mc:
        raise RuntimeError("memcaslap not found (Debian: libmemcached-tools)")
    # warm-up run fills the cache, so that gets hit in the measured one
    subprocess.run(["taskset", "-c", a.loadgen_cpu, mc, "-s", "127.0.0.1:%d" % port, "-T", "1",
                    "-c", str(a.conns), "-t", "%ds" % max(1, int(a.warmup))],
                   capture_output=True, text=True, timeout=a.warmup + 60)
    c0 = proc_cpu(srv.pid)
    out = subprocess.run(["taskset", "-c", a.loadgen_cpu, mc, "-s", "127.0.0.1:%d" % port, "-T",
                          "1", "-c", str(a.conns), "-t", "%ds" % int(a.secs)],
                         capture_output=True, text=True, timeout=a.secs + 60)
    c1 = proc_cpu(srv.pid)
    m = re.search(r"Run time:\s*([\d.]+)s\s+Ops:\s*(\d+)\s+TPS:\s*(\d+)", out.stdout)
    if not m:
        raise RuntimeError("memcaslap: " + out.stdout[-2000:] + out.stderr[-2000:])
    ops, tps = int(m.group(2)), float(m.group(3))
    return {"tps": tps, "srv_us": (c1 - c0) * 1e6 / max(1, ops), "lg_us": float("nan"),
            "errors": 0, "sys": float("nan")}


def run_point(variant, txns):
    port = free_port()
    env = dict(os.environ)
    env.pop("LD_LIBRARY_PATH", None)
    if variant == "megapipe-poll":
        env["MP_READINESS"] = "poll"
    if variant == "megapipe-ring":
        env["MP_READINESS"] = "epoll-ring"
    if variant.startswith("megapipe"):
        env["LD_LIBRARY_PATH"] = a.lelib
    srv = subprocess.Popen(["taskset", "-c", a.server_cpu, a.memcached, "-u", "root", "-l",
                            "127.0.0.1", "-p", str(port), "-U", "0", "-t", "1", "-c", "4096",
                            "-m", "256"], env=env)
    try:
        if not wait_port(port):
            raise RuntimeError("memcached did not come up")
        if a.client == "memcaslap":
            return run_memcaslap(port, srv)
        pst = None
        if perf:
            # counts the server's system calls from the start of the warmup; scaled below to the
            # measured window by time
            pst = subprocess.Popen([perf, "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p",
                                    str(srv.pid), "--", "sleep", str(a.warmup + a.secs)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        out = subprocess.run([a.loadgen, "-m", "memcached", "-p", str(port), "-c", str(a.conns),
                              "-n", str(txns), "-d", str(a.secs), "-w", str(a.warmup), "-C",
                              a.loadgen_cpu, "-t", "1", "-S", str(srv.pid)],
                             capture_output=True, text=True, timeout=a.secs + a.warmup + 60)
        r = loadgen_result(out)
        res = {"tps": float(r["tps"]), "srv_us": float(r["server_cpu_us_per_txn"]),
               "lg_us": float(r["lg_cpu_us_per_txn"]), "errors": int(r["errors"]) +
               int(r["timeouts"]) + int(r["proto_errors"]), "sys": float("nan")}
        if pst:
            _, err = pst.communicate(timeout=30)
            mm = re.search(r"^(\d+),,raw_syscalls:sys_enter", err, re.M)
            if mm and float(r["tps"]) > 0:
                calls = int(mm.group(1))
                # calls over warmup+measured; requests over the same span ~ tps * span
                res["sys"] = calls / (float(r["tps"]) * (a.warmup + a.secs))
        return res
    finally:
        stop_proc(srv, timeout=5)


txns_list = [int(x) for x in a.txns.split(",")] if a.client == "loadgen" else [0]
rows = []
if a.from_csv:
    import csv
    for r in csv.DictReader(open(a.from_csv)):
        rows.append({"variant": r["variant"], "txns": int(r["txns_per_conn"]), "rep": int(r["rep"]),
                     "tps": float(r["tps"]), "srv_us": float(r["server_us_per_req"]),
                     "sys": float(r["syscalls_per_req"]), "lg_us": float(r["loadgen_us_per_req"]),
                     "errors": int(r["errors"])})
    a.reps = 0
for rep in range(a.reps):
    for txns in txns_list:
        order = ["stock", "megapipe"] + extra
        k = rep % len(order)
        for variant in order[k:] + order[:k]:  # rotated: no variant always first
            res = run_point(variant, txns)
            res.update(variant=variant, txns=txns, rep=rep)
            rows.append(res)
            print(f"rep {rep} txns/conn {txns or 'persistent'} {variant:8s} "
                  f"{res['tps']:10.0f} req/s  server {res['srv_us']:6.2f} us/req  "
                  f"syscalls {res['sys']:5.2f}/req  loadgen {res['lg_us']:5.2f} us/req  "
                  f"errors {res['errors']}", flush=True)

if a.csv:
    with open(a.csv, "w") as f:
        f.write("variant,txns_per_conn,rep,tps,server_us_per_req,syscalls_per_req,"
                "loadgen_us_per_req,errors\n")
        for r in rows:
            f.write(f"{r['variant']},{r['txns']},{r['rep']},{r['tps']:.1f},{r['srv_us']:.3f},"
                    f"{r['sys']:.3f},{r['lg_us']:.3f},{r['errors']}\n")

print("\nmedians (megapipe / stock):")
print("| requests/conn | variant | req/s | server CPU us/req | syscalls/req | loadgen CPU us/req |")
print("|---|---|---|---|---|---|")
for txns in txns_list:
    med = {}
    for v in ["stock", "megapipe"] + extra:
        sel = [r for r in rows if r["variant"] == v and r["txns"] == txns]
        med[v] = {k: statistics.median(r[k] for r in sel) for k in ("tps", "srv_us", "sys", "lg_us")}
        print(f"| {txns or 'persistent'} | {v} | {med[v]['tps']:.0f} | {med[v]['srv_us']:.2f} | "
              f"{med[v]['sys']:.2f} | {med[v]['lg_us']:.2f} |")
    for v in [v for v in med if v != "stock"]:
        pr = [(m["tps"] / s["tps"], m["srv_us"] / s["srv_us"]) for s, m in (
            (next(r for r in rows if r["variant"] == "stock" and r["txns"] == txns and r["rep"] == i),
             next(r for r in rows if r["variant"] == v and r["txns"] == txns and r["rep"] == i))
            for i in sorted({r["rep"] for r in rows}))]
        print(f"| {txns or 'persistent'} | {v} / stock, paired medians | "
              f"{statistics.median(x[0] for x in pr):.3f}x | {statistics.median(x[1] for x in pr):.3f}x | | |")
    s, m = med["stock"], med["megapipe"]
    print(f"| {txns or 'persistent'} | ratio | {m['tps'] / s['tps']:.2f}x | "
          f"{m['srv_us'] / s['srv_us']:.2f}x | {m['sys'] / s['sys'] if s['sys'] else float('nan'):.2f}x | "
          f"{m['lg_us'] / s['lg_us']:.2f}x |")

if a.plot:
    dat = a.plot + ".dat"
    with open(dat, "w") as f:
        for txns in txns_list:
            m = {v: {k: statistics.median(r[k] for r in rows if r["variant"] == v and r["txns"] == txns)
                     for k in ("tps", "srv_us", "sys")} for v in ("stock", "megapipe")}
            f.write(f"{txns or 'persistent'} {m['stock']['tps'] / 1000:.1f} {m['megapipe']['tps'] / 1000:.1f} "
                    f"{m['stock']['srv_us']:.2f} {m['megapipe']['srv_us']:.2f} "
                    f"{m['stock']['sys']:.2f} {m['megapipe']['sys']:.2f}\n")
    gp = f"""set terminal pngcairo size 1200,420 font ",10"
set output '{a.plot}'
set multiplot layout 1,3 title "memcached (Debian binary, 1 worker) on libevent 2.1.12: stock epoll vs megapipe, medians"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set key top right
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
