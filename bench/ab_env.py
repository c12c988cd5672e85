#!/usr/bin/env python3
"""ab_env.py — interleaved A/B of mpserver variants that differ by environment variables
(library knobs such as MP_WAIT_USEC=0, loadgen's LG_DRAIN=0), persistent connections, 64 B.

  bench/ab_env.py BUILD CONNS REPS SECS NAME=VARIANT[:ENV=V,ENV=V] ...

VARIANT is one of mpbench.py's (baseline, megapipe, ...).  Runs NAME1 NAME2 ... REPS times in
that order (2 s warm-up each, server on the first CPU, generator on the rest, QUIET_WAIT as in
mpbench.py), prints each run, then per variant the medians and, against the first, the paired
ratios (run i against run i: median and range) and the ratio of medians of p50, p99 and server
CPU per transaction.  The environment reaches both the server and the load generator.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpbench  # noqa: E402


def main():
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    build, conns, reps, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    vs = []
    for spec in sys.argv[5:]:
        name, rest = spec.split("=", 1)
        parts = rest.split(":", 1)
        env = dict(kv.split("=", 1) for kv in parts[1].split(",")) if len(parts) > 1 else {}
        vs.append((name, parts[0], env))
    srv, lg = mpbench.split_cpus(1)
    rows = {n: [] for n, _, _ in vs}
    saved = dict(os.environ)
    try:
        for rep in range(reps):
            for name, var, env in vs:
                os.environ.clear()
                os.environ.update(saved)
                os.environ.update(env)
                r = mpbench.run_point(build, var, srv, lg, conns, 0, 64, secs, 2)
                rows[name].append(r)
                print("%d %-6s tps=%.0f p50=%.0f p99=%.0f p999=%.0f us/txn=%.2f sys/txn=%.3f "
                      "txn/conn=%s-%s lg=%.2f others=%.2f" % (
                          rep, name, r["tps"], r["p50_us"], r["p99_us"], r["p999_us"],
                          r["srv_cpu_us_txn"], r["sys_txn"], r["pc_min"], r["pc_max"],
                          r["lg_util"], r["others_cpus"]), flush=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        mpbench.cleanup()
    base = rows[vs[0][0]]
    for name, _, _ in vs:
        rs = rows[name]

        def med(k, rr=rs):
            return statistics.median(x[k] for x in rr)
        line = "%-6s tps=%.0f p50=%.0f p99=%.0f p999=%.0f us/txn=%.2f txn/conn=%.0f-%.0f" % (
            name, med("tps"), med("p50_us"), med("p99_us"), med("p999_us"),
            med("srv_cpu_us_txn"), med("pc_min"), med("pc_max"))
        if rs is not base:
            for k in ("p50_us", "p99_us", "srv_cpu_us_txn"):
                pr = [x[k] / y[k] for x, y in zip(rs, base)]
                line += " | %s paired %.3f (%.2f-%.2f) medians %.3f" % (
                    k, statistics.median(pr), min(pr), max(pr), med(k) / med(k, base))
        print(line, flush=True)


if __name__ == "__main__":
    main()
