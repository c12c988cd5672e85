#!/usr/bin/env python3
"""bench-libuv.py — libuv stock vs libuv on MegaPipe (UV_USE_MEGAPIPE=1), one run, interleaved.

The same server binary (backends/libuv/bench/uv_bench_server.c, linked against the build tree's
drop-in libuv.so.1) runs with and without the variable; bench/'s loadgen drives it.  Servers
echo 64-byte messages (rpc) or answer a minimal HTTP GET (http), with persistent connections
(-n 0) and one request per connection (-n 1).  Every (workload, variant) point is run once per
round; rounds alternate the variant order; medians are reported.  Server pinned to one CPU,
loadgen to another.  Server CPU per request comes from loadgen (-S: the server's schedstat);
system calls per request from `perf stat -e raw_syscalls:sys_enter -p SERVER` over the server's
life divided by the transactions the server counted.

  bench-libuv.py --build BUILD [--secs 5] [--warmup 1] [--rounds 3] [--conns 32]
                 [--srv-cpu 0] [--lg-cpu 1] [--csv FILE] [--png FILE]

Run it under `flock -x /tmp/mp-quiet.lock` on a shared machine.  Not a test: nothing is
asserted; it prints a table (and the ratios against the issue's targets).
"""
import argparse
import csv
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                                "scripts"))
from mputil import find_result  # noqa: E402

WORKLOADS = [("rpc", 0), ("rpc", 1), ("http", 0), ("http", 1)]
# The environment of each variant: stock libuv (no variable); TCP through completions; TCP on
# the channel's readiness watches; completions without the core's wait-side batching;
# completions with one-shot accepts that take turns with other processes even for the listener
# the server bound itself (UV_MEGAPIPE_EXCLUSIVE_ACCEPT=0; by default it gets one multishot);
# completions with accepting never deferred (MP_ACCEPT_DEFER=0; the backend's default is 1 ms).
VARIANT_ENV = {
    "stock": {},
    "megapipe": {"UV_USE_MEGAPIPE": "1"},
    "megapipe-readiness": {"UV_USE_MEGAPIPE": "1", "UV_MEGAPIPE_TCP": "0"},
    "megapipe-nowait": {"UV_USE_MEGAPIPE": "1", "MP_WAIT_USEC": "0"},
    "megapipe-shared": {"UV_USE_MEGAPIPE": "1", "UV_MEGAPIPE_EXCLUSIVE_ACCEPT": "0"},
    "megapipe-nodefer": {"UV_USE_MEGAPIPE": "1", "MP_ACCEPT_DEFER": "0"},
}
VARIANTS = ["stock", "megapipe", "megapipe-readiness"]


def run_point(a, proto, txn, variant):
    env = dict(os.environ)
    for k in ("UV_USE_MEGAPIPE", "UV_MEGAPIPE_TCP", "MP_WAIT_USEC", "UV_MEGAPIPE_EXCLUSIVE_ACCEPT",
              "UV_TCP_SINGLE_ACCEPT"):
        env.pop(k, None)
    env.update(VARIANT_ENV[variant])
    srv = subprocess.Popen(["taskset", "-c", str(a.srv_cpu),
                            os.path.join(a.build, "uv_bench_server"), "-m", proto, "-s", "64"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    perf = None
    try:
        line = srv.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError("server did not start: %r %s" % (line, srv.stderr.read()))
        port = line.split()[1]
        pf = tempfile.NamedTemporaryFile(prefix="uvbench-perf.", delete=False)
        pf.close()
        perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p",
                                 str(srv.pid), "-o", pf.name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # perf attached
        lg = [os.path.join(a.build, "bench", "loadgen"), "-p", port, "-m", proto,
              "-c", str(a.conns), "-n", str(txn), "-s", "64", "-t", "1", "-C", str(a.lg_cpu),
              "-d", str(a.secs), "-w", str(a.warmup), "-S", str(srv.pid), "-X", str(a.srv_cpu)]
        q = subprocess.run(lg, capture_output=True, text=True, timeout=a.secs + a.warmup + 60)
        res = find_result(q.stdout, conv=float) or {}
        if not res:
            raise RuntimeError("loadgen failed: %s" % q.stderr.strip()[-300:])
    finally:
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=10)
        if srv.poll() is None:
            srv.send_signal(signal.SIGTERM)
        out, err = srv.communicate(timeout=20)
    sres = find_result(out, conv=float) or {}
    sysc = float("nan")
    with open(pf.name) as f:
        for l in f:
            parts = l.strip().split(",")
            if len(parts) > 2 and "raw_syscalls:sys_enter" in l and parts[0].isdigit():
                sysc = float(parts[0])
    os.unlink(pf.name)
    st = sres.get("transactions", 0)
    return {"proto": proto, "txn": txn, "variant": variant, "tps": res["tps"],
            "srv_cpu_us_txn": res["server_cpu_us_per_txn"], "p50_us": res["p50_us"],
            "p99_us": res["p99_us"], "sys_txn": sysc / st if st else float("nan"),
            "errors": res["errors"] + res["connect_errors"] + res["timeouts"]}


def main():
    global VARIANTS, WORKLOADS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--secs", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--srv-cpu", type=int, default=0)
    ap.add_argument("--lg-cpu", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated, from: " + ", ".join(VARIANT_ENV))
    ap.add_argument("--workloads", default="rpc:0,rpc:1,http:0,http:1",
                    help="comma-separated proto:txn_per_conn (0 = persistent)")
    ap.add_argument("--csv")
    ap.add_argument("--png")
    a = ap.parse_args()
    VARIANTS = a.variants.split(",")
    if "stock" not in VARIANTS or any(v not in VARIANT_ENV for v in VARIANTS):
        ap.error("--variants: stock plus any of " + ", ".join(VARIANT_ENV))
    WORKLOADS = [(w.split(":")[0], int(w.split(":")[1])) for w in a.workloads.split(",")]

    rows = []
    for rnd in range(a.rounds):
        order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[:rnd % len(VARIANTS)]
        for proto, txn in WORKLOADS:
            for v in order:
                r = run_point(a, proto, txn, v)
                r["round"] = rnd
                rows.append(r)
                print("round %d %-4s %-10s %-18s tps=%9.0f cpu=%6.2fus/txn sys=%5.2f/txn "
                      "p50=%7.1fus p99=%7.1fus errors=%d" % (
                          rnd, proto, "persistent" if txn == 0 else "1/conn", v, r["tps"],
                          r["srv_cpu_us_txn"], r["sys_txn"], r["p50_us"], r["p99_us"],
                          r["errors"]), flush=True)
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)

    def med(proto, txn, v, key):
        return statistics.median(r[key] for r in rows
                                 if r["proto"] == proto and r["txn"] == txn and r["variant"] == v)

    def paired(proto, txn, v, key):
        by_round = {}
        for r in rows:
            if r["proto"] == proto and r["txn"] == txn and r["variant"] in (v, "stock"):
                by_round.setdefault(r["round"], {})[r["variant"]] = r[key]
        return [d[v] / d["stock"] for d in by_round.values() if v in d and d.get("stock")]

    print("\nmedians of %d rounds (%d connections, 64 B, server CPU %d, loadgen CPU %d):" % (
        a.rounds, a.conns, a.srv_cpu, a.lg_cpu))
    print("| workload | variant | req/s | server CPU us/req | syscalls/req | p50 us | p99 us |")
    print("|---|---|---:|---:|---:|---:|---:|")
    summary = []
    for proto, txn in WORKLOADS:
        name = "%s, %s" % ("echo" if proto == "rpc" else "http",
                           "persistent" if txn == 0 else "1 req/conn")
        for v in VARIANTS:
            print("| %s | %s | %.0f | %.2f | %.2f | %.1f | %.1f |" % (
                name, v, med(proto, txn, v, "tps"), med(proto, txn, v, "srv_cpu_us_txn"),
                med(proto, txn, v, "sys_txn"), med(proto, txn, v, "p50_us"),
                med(proto, txn, v, "p99_us")))
        for v in [x for x in VARIANTS if x != "stock"]:
            summary.append((name, txn, v,
                            med(proto, txn, v, "srv_cpu_us_txn") / med(proto, txn, "stock",
                                                                      "srv_cpu_us_txn"),
                            med(proto, txn, v, "p99_us") / med(proto, txn, "stock", "p99_us"),
                            paired(proto, txn, v, "srv_cpu_us_txn"),
                            paired(proto, txn, v, "p99_us")))
    print("\nratios against stock, ratio of medians and paired (the ratio within each round: "
          "median, min-max) (targets for megapipe: CPU/req <= 0.8 at 1 req/conn, <= 0.9 "
          "persistent; p99 <= 1.0):")
    for name, txn, v, c, p, pc, pp in summary:
        target = 0.8 if txn == 1 else 0.9
        print("  %-22s %-18s CPU/req %.2f, paired %.2f (%.2f-%.2f) (%s)  "
              "p99 %.2f, paired %.2f (%.2f-%.2f) (%s)" % (
                  name, v, c, statistics.median(pc), min(pc), max(pc),
                  "met" if max(c, statistics.median(pc)) <= target else "NOT met",
                  p, statistics.median(pp), min(pp), max(pp),
                  "met" if max(p, statistics.median(pp)) <= 1.0 else "NOT met"))

    if a.png:
        dat = tempfile.NamedTemporaryFile("w", suffix=".dat", delete=False)
        for proto, txn in WORKLOADS:
            name = "%s/%s" % ("echo" if proto == "rpc" else "http",
                              "persistent" if txn == 0 else "1-per-conn")
            dat.write('"%s" %s\n' % (name, " ".join(
                "%f" % med(proto, txn, v, "srv_cpu_us_txn") for v in VARIANTS)))
        dat.close()
        gp = """set terminal png size 800,450
set output '%s'
set title 'libuv server CPU per request (median of %d rounds, lower is better)'
set ylabel 'server CPU us / request'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set yrange [0:*]
set key top left
set yrange [0:*]
set offsets 0, 0, graph 0.25, 0
plot %s
""" % (a.png, a.rounds, ", ".join(
            "'%s' using %d%s title '%s'" % (
                dat.name if i == 0 else "", i + 2, ":xtic(1)" if i == 0 else "",
                "stock libuv 1.44.2" if v == "stock" else
                " ".join("%s=%s" % kv for kv in VARIANT_ENV[v].items()).replace("_", "\\_"))
            for i, v in enumerate(VARIANTS)))
        subprocess.run(["gnuplot"], input=gp, text=True, check=False)
        os.unlink(dat.name)
        print("plot: %s" % a.png)


if __name__ == "__main__":
    main()
