#!/usr/bin/env python3
"""bench_nginx.py — the paper's Fig. 7 on Debian's stock nginx: `use epoll` vs `use megapipe`.

    flock -x /tmp/mp-quiet.lock backends/nginx/bench_nginx.py --build BUILD_DIR --out DIR
        [--pairs 5] [--seconds 4] [--conns 64] [--mixes specweb,yahoo,yahoo2,keepalive]

Not a test.  For each mix, PAIRS interleaved pairs of runs (stock first in odd pairs,
megapipe first in even ones), each on a fresh nginx: 1 worker pinned to CPU 0
(worker_cpu_affinity 01), loadgen pinned to CPU 1, same configuration (Debian's defaults that
matter: sendfile on, tcp_nopush on, keepalive).  Per run: throughput, p50/p99, server CPU
per request (the worker's schedstat: process time) and CPU 0's busy time per request (with
softirq, /proc/stat).  Then one short census run per engine under strace -c -f (slow, so
not timed) for system calls per request.  Then 2 workers (affinity 01 10, `listen ...
reuseport`) with load from both CPUs, to show how connections split by CPU.  Medians and
ratios go to DIR/summary.md, every run to DIR/runs.csv, plots to DIR/*.png (gnuplot).

Mixes (bench/gen_fileset.py): specweb (6 requests per connection), yahoo and yahoo2 (Zipf-like
requests per connection, mean 2.3); keepalive = the SpecWeb-like files on persistent
connections (loadgen -n 0).
"""
import argparse
import csv
import os
import re
import signal
import statistics
import subprocess
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "tests"))
sys.path.insert(0, os.path.join(here, "..", "..", "scripts"))
from ngxlib import Nginx  # noqa: E402
from mputil import free_port, loadgen_result  # noqa: E402

MIXES = {
    "specweb": ("specweb", ["-n", "6"]),
    "yahoo": ("yahoo", ["-Z", "2.3"]),
    "yahoo2": ("yahoo2", ["-Z", "2.3"]),
    "keepalive": ("specweb", ["-n", "0"]),
}
KEYS = ["tps", "p50_us", "p99_us", "server_cpu_us_per_txn", "core_us_per_txn",
        "core_softirq_us_per_txn", "errors", "timeouts", "txns", "others_cpus", "core_busy",
        "lg_util"]


def server(args, engine, port, docroot, workers=1, affinity="01", reuseport=False,
           logfmt=False):
    n = Nginx(args.module if engine == "megapipe" else None, engine=engine, workers=workers,
              docroot=docroot, main=f"worker_cpu_affinity {affinity};",
              events="multi_accept off;")
    log = fmt = ""
    if logfmt:
        fmt = 'log_format bypid "$pid";'
        log = f'access_log {n.dir}/logs/access.log bypid buffer=64k flush=1s;'
    n.conf = n.conf.replace("  access_log off;", f"""  access_log off; {fmt}
  sendfile on; tcp_nopush on; keepalive_timeout 65; keepalive_requests 100000;
  server {{ listen 127.0.0.1:{port} backlog=4096 {"reuseport" if reuseport else ""};
           root {docroot}; {log} }}""", 1)
    return n.start()


def loadgen(args, port, listfile, extra, pid=None, cpus="1", seconds=None, threads=None):
    cmd = [args.loadgen, "-p", str(port), "-m", "http", "-f", listfile, "-c", str(args.conns),
           "-d", str(seconds or args.seconds), "-w", "1", "-C", cpus, "-X", "0", *extra]
    if threads:
        cmd += ["-t", str(threads)]
    if pid:
        cmd += ["-S", str(pid)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    r = loadgen_result(out)
    r["core_busy"] = r["core_busy_s"] / r["seconds"] if r["seconds"] else 0  # CPU 0, 0..1
    return r, " ".join(cmd)


def one_run(args, engine, mix):
    fs, extra = MIXES[mix]
    port = free_port()
    n = server(args, engine, port, os.path.join(args.fileset, "docroot"))
    try:
        w = n.wait_workers(1)[0]
        r, cmd = loadgen(args, port, os.path.join(args.fileset, fs + ".list"), extra, pid=w)
        if n.problems():
            raise RuntimeError("\n".join(n.problems()))
        return r, cmd
    finally:
        n.cleanup()


def census(args, engine, mix):
    """System calls per request: the worker under strace -c -f for a short run; requests
    counted from a one-line-per-request access log (flushed when nginx stops)."""
    fs, extra = MIXES[mix]
    port = free_port()
    n = server(args, engine, port, os.path.join(args.fileset, "docroot"), logfmt=True)
    try:
        w = n.wait_workers(1)[0]
        trace = os.path.join(args.out, f"strace-{engine}-{mix}.txt")
        st = subprocess.Popen(["strace", "-c", "-f", "-p", str(w), "-o", trace],
                              stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        loadgen(args, port, os.path.join(args.fileset, fs + ".list"), extra, seconds=2)
        time.sleep(0.3)
        st.send_signal(signal.SIGINT)
        st.wait(timeout=30)
        n.stop()
        served = sum(count_pids(n).values())
        total = 0
        with open(trace) as f:
            for line in f:
                t = line.split()
                if t and t[-1] == "total":
                    total = int(t[3])
        return total, served
    finally:
        n.cleanup()


def split_by_cpu(args, engine):
    port = free_port()
    n = server(args, engine, port, os.path.join(args.fileset, "docroot"), workers=2,
               affinity="01 10", reuseport=True, logfmt=True)
    try:
        ws = n.wait_workers(2)
        cpu = {}
        for w in ws:
            with open(f"/proc/{w}/status") as f:
                cpu[w] = re.search(r"^Cpus_allowed_list:\s+(\S+)", f.read(), re.M).group(1)
        res = {}
        for client_cpu in ("0", "1"):
            with open(os.path.join(n.dir, "logs", "access.log"), "a"):
                pass
            before = count_pids(n)
            loadgen(args, port, os.path.join(args.fileset, "specweb.list"), ["-n", "6"],
                    cpus=client_cpu, seconds=2)
            time.sleep(1.2)
            after = count_pids(n)
            res[client_cpu] = {cpu[int(p)]: after.get(p, 0) - before.get(p, 0) for p in after}
        return res
    finally:
        n.cleanup()


def count_pids(n):
    c = {}
    try:
        with open(os.path.join(n.dir, "logs", "access.log")) as f:
            for line in f:
                c[line.strip()] = c.get(line.strip(), 0) + 1
    except OSError:
        pass
    return c


def gnuplot(out, rows, mixes):
    dat = os.path.join(out, "medians.dat")
    with open(dat, "w") as f:
        f.write("# mix stock_tps mp_tps stock_cpu mp_cpu stock_core mp_core stock_p99 mp_p99\n")
        for mix in mixes:
            s, m = rows[mix]["epoll"], rows[mix]["megapipe"]
            f.write(f"{mix} {s['tps']:.0f} {m['tps']:.0f} {s['server_cpu_us_per_txn']:.2f} "
                    f"{m['server_cpu_us_per_txn']:.2f} {s['core_us_per_txn']:.2f} "
                    f"{m['core_us_per_txn']:.2f} {s['p99_us']:.0f} {m['p99_us']:.0f}\n")
    common = ('set terminal pngcairo size 900,450 font ",10"\nset style data histograms\n'
              'set style histogram clustered gap 1\nset style fill solid 0.8 border -1\n'
              'set key outside right top\nset grid ytics\nset yrange [0:*]\n')
    plots = {
        "nginx_throughput.png": ("requests/s (1 worker, CPU 0)", "2:xtic(1) t 'stock epoll', '' u 3 t 'megapipe'"),
        "nginx_cpu.png": ("server CPU per request, us (worker process time; hatched: CPU 0 busy incl. softirq)",
                          "4:xtic(1) t 'stock epoll (process)', '' u 5 t 'megapipe (process)', "
                          "'' u 6 t 'stock epoll (core busy)' fs pattern 4, '' u 7 t 'megapipe (core busy)' fs pattern 5"),
        "nginx_p99.png": ("p99 latency, us", "8:xtic(1) t 'stock epoll', '' u 9 t 'megapipe'"),
    }
    for png, (title, using) in plots.items():
        script = common + f"set output '{os.path.join(out, png)}'\nset title \"{title}\"\n" \
            f"plot '{dat}' using {using}\n"
        subprocess.run(["gnuplot"], input=script, text=True, check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--mixes", default="specweb,yahoo,yahoo2,keepalive")
    ap.add_argument("--no-census", action="store_true")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the plots from OUT/runs.csv (no measurement)")
    args = ap.parse_args()
    if args.replot:
        per = {}
        with open(os.path.join(args.out, "runs.csv")) as f:
            for r in csv.DictReader(f):
                per.setdefault(r["mix"], {}).setdefault(r["engine"], []).append(r)
        rows = {m: {e: {k: statistics.median(float(x[k]) for x in v) for k in KEYS if k in v[0]}
                    for e, v in d.items()} for m, d in per.items()}
        gnuplot(os.path.abspath(args.out), rows, [m for m in MIXES if m in rows])
        return
    args.module = os.path.abspath(os.path.join(args.build, "nginx", "ngx_megapipe_module.so"))
    args.loadgen = os.path.abspath(os.path.join(args.build, "bench", "loadgen"))
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    args.fileset = os.path.join(os.path.abspath(args.build), "nginx", "fileset")
    mixes = args.mixes.split(",")
    gen = os.path.join(here, "..", "..", "bench", "gen_fileset.py")
    for fs in sorted({MIXES[m][0] for m in mixes}):
        if not os.path.exists(os.path.join(args.fileset, fs + ".list")):
            subprocess.run([sys.executable, gen, fs, args.fileset], check=True,
                           stdout=subprocess.DEVNULL)
    os.system(f"chmod -R a+rX {args.fileset}")

    runs, cmds, rows = [], {}, {}
    for mix in mixes:
        per = {"epoll": [], "megapipe": []}
        for i in range(args.pairs):
            order = ["epoll", "megapipe"] if i % 2 == 0 else ["megapipe", "epoll"]
            for engine in order:
                r, cmd = one_run(args, engine, mix)
                per[engine].append(r)
                cmds[(mix, engine)] = cmd
                runs.append({"mix": mix, "engine": engine, "pair": i,
                             **{k: r[k] for k in KEYS}})
                print(f"{mix:9} pair {i} {engine:8} {r['tps']:9.0f} req/s  "
                      f"{r['server_cpu_us_per_txn']:6.2f} us/req  core {r['core_us_per_txn']:6.2f}"
                      f"  p99 {r['p99_us']:7.0f} us  errors {r['errors']:.0f}", flush=True)
        rows[mix] = {e: {k: statistics.median(x[k] for x in v) for k in KEYS}
                     for e, v in per.items()}
        rows[mix]["ratios"] = [
            (a["tps"] / b["tps"], a["server_cpu_us_per_txn"] / b["server_cpu_us_per_txn"],
             a["core_us_per_txn"] / b["core_us_per_txn"])
            for a, b in zip(per["megapipe"], per["epoll"])]

    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["mix", "engine", "pair", *KEYS])
        w.writeheader()
        w.writerows(runs)

    census_rows = {}
    if not args.no_census:
        for mix in ("specweb", "keepalive"):
            if mix in mixes:
                for engine in ("epoll", "megapipe"):
                    census_rows[(mix, engine)] = census(args, engine, mix)

    split = {e: split_by_cpu(args, e) for e in ("epoll", "megapipe")}

    gnuplot(args.out, rows, mixes)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("| mix | engine | req/s | server CPU us/req (process) | CPU 0 busy us/req "
                "(softirq) | CPU 0 busy | loadgen CPU 1 | p50 us | p99 us | errors |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n")
        for mix in mixes:
            for e in ("epoll", "megapipe"):
                r = rows[mix][e]
                f.write(f"| {mix} | {e} | {r['tps']:.0f} | {r['server_cpu_us_per_txn']:.2f} | "
                        f"{r['core_us_per_txn']:.2f} ({r['core_softirq_us_per_txn']:.2f}) | "
                        f"{r['core_busy']:.0%} | {r['lg_util']:.0%} | "
                        f"{r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['errors']:.0f} |\n")
        f.write("\n| mix | throughput megapipe/stock | server CPU/req megapipe/stock | "
                "core busy/req megapipe/stock |\n|---|---|---|---|\n")
        for mix in mixes:
            rt = rows[mix]["ratios"]
            med = [statistics.median(x[i] for x in rt) for i in range(3)]
            f.write(f"| {mix} | {med[0]:.2f} (pairs: {', '.join(f'{x[0]:.2f}' for x in rt)}) | "
                    f"{med[1]:.2f} (pairs: {', '.join(f'{x[1]:.2f}' for x in rt)}) | "
                    f"{med[2]:.2f} |\n")
        f.write("\nCommand lines (the port differs per run):\n\n")
        for (mix, e), c in sorted(cmds.items()):
            f.write(f"- {mix}, {e}: `{c}`\n")
        if census_rows:
            f.write("\nSystem calls per request (strace -c -f on the worker, 3 s of load, "
                    "not timed):\n\n| mix | engine | syscalls | requests | per request |\n"
                    "|---|---|---|---|---|\n")
            for (mix, e), (tot, served) in census_rows.items():
                f.write(f"| {mix} | {e} | {tot} | {served} | "
                        f"{tot / served if served else float('nan'):.2f} |\n")
        f.write("\n2 workers (worker_cpu_affinity 01 10, listen reuseport), requests served "
                "per worker CPU, by the CPU the client ran on:\n\n")
        for e, res in split.items():
            for ccpu, by in res.items():
                f.write(f"- {e}: client on CPU {ccpu}: " +
                        ", ".join(f"worker on CPU {k}: {v}" for k, v in sorted(by.items())) + "\n")
    print(open(os.path.join(args.out, "summary.md")).read())


if __name__ == "__main__":
    main()
