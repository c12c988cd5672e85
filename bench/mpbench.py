#!/usr/bin/env python3
"""mpbench.py — runs the paper's microbenchmarks with mpserver and loadgen (stdlib only).

    bench/mpbench.py [--build DIR] [--reps N] [--secs S] [--warmup W] EXPERIMENT...

EXPERIMENT is one of
    quick    baseline vs megapipe(P+B+L) at 1, 8, 128 txn/conn (the README's first command)
    txn      Fig. 1(a) + Table 3: throughput vs txn/conn 1..128, variants baseline, +P, +P+B, +P+B+L
    size     Fig. 1(b): throughput and server CPU vs message size 64 B..64 KiB (10 txn/conn)
    cores    Fig. 1(c) / Fig. 3: throughput and speedup vs server cores 1..nproc/2
    latency  Fig. 6: p50/p99 latency vs persistent connections
    all      txn size cores latency
    replot   no runs: redraw the plots from the CSVs in --results (e.g. the ones bench/travel.sh
             wrote on another machine; the plots then name that machine)

Every point runs the compared variants interleaved (A B A B ...), --reps times, and reports
medians.  Each run starts a fresh server (so its own syscall and transaction counters cover
exactly that run), waits for "port N", runs the load generator with --server-pid, stops the
server with SIGTERM and reads its totals.  Raw runs and medians go to bench/results/*.csv
(--results DIR); plots (gnuplot, PNG) to docs/img/ (--img DIR).

CPUs.  Server and load generator never share a CPU.  With n = nproc CPUs (those this process
may use), the server gets the first k (k = 1 unless the experiment varies it, at most n/2) and
the load generator all the others; on this 2-core machine: server CPU 0, load CPU 1.  Override
with SERVER_CPUS / LOADGEN_CPUS (cpu lists such as "0-3").

Shared machines.  Other work on the same CPUs steals time from both sides; throughput then
says little, server CPU per transaction (which counts only the server's own time) much more.
NICE=-5 (env) runs server and load generator at that priority (root; no help when the other
work sits in other cgroups).  QUIET_WAIT=20 (env) waits up to 20 s before each run until the
rest of the machine uses less than 0.2 CPUs.  Each run records "others_cpus": the CPU time of
everything but server and load generator during the measured interval.
"""
import argparse
import csv
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from mputil import find_result, number, parse_kv, wait_quiet  # noqa: E402
RESULTS = os.path.join(HERE, "results")
IMG = os.path.join(ROOT, "docs", "img")

VARIANTS = {
    "baseline": ["-e", "baseline"],
    "+P": ["-e", "megapipe", "-P", "1", "-B", "0", "-L", "0"],
    "+P+B": ["-e", "megapipe", "-P", "1", "-B", "1", "-L", "0"],
    "megapipe": ["-e", "megapipe", "-P", "1", "-B", "1", "-L", "1"],  # = +P+B+L
    # extensions, not in the paper's tables: buffered reads; the library's epoll engine
    "megapipe+R": ["-e", "megapipe", "-P", "1", "-B", "1", "-L", "1", "-R", "1"],
    "mp-epoll": ["-e", "megapipe", "-P", "1", "-B", "1", "-L", "1", "-E", "epoll"],
}

FEATURES = [
    (0x001, "SINGLE_ISSUER"), (0x002, "DEFER_TASKRUN"), (0x004, "REGISTERED_RING"),
    (0x008, "DIRECT_DESCRIPTORS"), (0x010, "MULTISHOT_ACCEPT"), (0x020, "FIXED_FD_INSTALL"),
    (0x040, "BUF_RING"), (0x080, "RECV_MULTISHOT"), (0x100, "NODROP"), (0x200, "EXT_ARG"),
    (0x400, "POLL_MULTISHOT"),
]

children = []  # every process we started and have not reaped
NETNS = None   # (server ns, client ns, server addr) when --netns is on


def cleanup(*_):
    for p in children:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(timeout=5)
            except Exception:
                pass
    children.clear()
    netns_teardown()


def sh(*cmd):
    q = subprocess.run(list(cmd), capture_output=True, text=True)
    if q.returncode:
        raise RuntimeError("%s: %s" % (" ".join(cmd), q.stderr.strip()))
    return q.stdout


def netns_setup(srv_cpus, lg_cpus):
    """Two network namespaces joined by a veth pair; RPS sends each side's receive work to its
    own CPUs, so each side pays for its own receive path as with a NIC (needs root)."""
    global NETNS
    tag = os.getpid() % 100000
    ns_s, ns_c = "mpb_s%d" % tag, "mpb_c%d" % tag
    vs, vc = "mpbs%d" % tag, "mpbc%d" % tag
    NETNS = (ns_s, ns_c, "10.213.0.1")
    sh("ip", "netns", "add", ns_s)
    sh("ip", "netns", "add", ns_c)
    sh("ip", "link", "add", vs, "type", "veth", "peer", "name", vc)
    sh("ip", "link", "set", vs, "netns", ns_s)
    sh("ip", "link", "set", vc, "netns", ns_c)
    for ns, dev, addr, cpus in ((ns_s, vs, "10.213.0.1/24", srv_cpus), (ns_c, vc, "10.213.0.2/24", lg_cpus)):
        sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", dev, "up")
        mask = 0
        for c in cpus:
            mask |= 1 << c
        hexmask = "%x" % mask
        # rps_cpus is a comma-separated list of 32-bit words
        words = [hexmask[max(0, i - 8):i] for i in range(len(hexmask), 0, -8)][::-1]
        sh("ip", "netns", "exec", ns, "sh", "-c",
           "for q in /sys/class/net/%s/queues/rx-*; do echo %s > $q/rps_cpus; done" % (dev, ",".join(words)))


def netns_teardown():
    global NETNS
    if NETNS:
        for ns in NETNS[:2]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        NETNS = None


def in_ns(side, cmd):
    """The command line for one side: in its namespace (--netns), at priority NICE (env)."""
    if NETNS:
        cmd = ["ip", "netns", "exec", NETNS[0] if side == "server" else NETNS[1]] + cmd + \
            ["-a", NETNS[2]]
    if os.environ.get("NICE"):
        cmd = ["nice", "-n", os.environ["NICE"]] + cmd
    return cmd


def on_signal(sig, _frame):
    cleanup()
    sys.exit(128 + sig)


def cpu_list(cpus):
    return ",".join(str(c) for c in cpus)


def parse_list(s):
    out = []
    for part in s.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def allowed_cpus():
    return sorted(os.sched_getaffinity(0))


def split_cpus(k=1):
    """Server gets k CPUs, the load generator the rest (at least one)."""
    if os.environ.get("SERVER_CPUS") and k == 1:
        srv = parse_list(os.environ["SERVER_CPUS"])
    else:
        cpus = allowed_cpus()
        srv = cpus[:k]
    lg = parse_list(os.environ["LOADGEN_CPUS"]) if os.environ.get("LOADGEN_CPUS") else \
        [c for c in allowed_cpus() if c not in srv]
    if not lg:
        lg = srv[-1:]
    return srv, lg


def kv(line):
    """A result line's key=value fields, numbers as int or float (mputil.number)."""
    return parse_kv(line, number)


def machine_static():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "allowed_cpus": len(allowed_cpus()),
            "kernel": platform.release(), "cpu": model}


def machine_short(info):
    return "%s CPUs, %s, %s" % (info["nproc"], info["kernel"], info["cpu"])


def machine_from_file(path):
    """The machine a results directory was measured on, from its machine.txt (written by a
    sweep here or by bench/travel.sh elsewhere); None when there is none."""
    try:
        with open(path) as f:
            m = re.match(r"machine: nproc=(\S+) \(allowed \S+\), kernel (\S+), CPU (.*)",
                         f.readline().strip())
    except OSError:
        return None
    return {"nproc": m.group(1), "kernel": m.group(2), "cpu": m.group(3)} if m else None


def machine(build):
    info = machine_static()
    # Engine features: a one-shot megapipe server, stopped at once.
    try:
        r = run_server(build, VARIANTS["megapipe"], allowed_cpus()[:1], [])
        time.sleep(0.2)  # features such as the registered ring are set at the first submit
        srv = stop_server(r)
        feats = srv.get("features", 0)
        info["engine"] = srv.get("mp_engine", "?")
        info["features"] = " ".join(n for b, n in FEATURES if feats & b) or "-"
        miss = srv.get("missing", 0)
        info["missing"] = " ".join(n for b, n in FEATURES if miss & b) or "-"
    except Exception as e:  # noqa: BLE001 - report, do not die
        info["engine"] = "? (%s)" % e
    return info


def print_machine(info, out=sys.stdout):
    print("machine: nproc=%s (allowed %s), kernel %s, CPU %s" % (
        info["nproc"], info["allowed_cpus"], info["kernel"], info["cpu"]), file=out)
    print("engine: %s; features: %s; missing: %s" % (
        info.get("engine"), info.get("features", "?"), info.get("missing", "?")), file=out)


def run_server(build, vargs, srv_cpus, extra):
    exe = os.path.join(build, "bench", "mpserver")
    cmd = in_ns("server", [exe] + vargs + ["-c", cpu_list(srv_cpus), "-d", "300", "-i", "20"] + extra)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children.append(p)
    line = p.stdout.readline()
    if not line.startswith("port "):
        err = p.stderr.read() if p.poll() is not None else ""
        stop_server(p)
        raise RuntimeError("server did not start: %r %s" % (line, err.strip()))
    p.port = int(line.split()[1])
    return p


def stop_server(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        out, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    if p in children:
        children.remove(p)
    res = find_result(out, conv=number)
    if res is not None:
        return res
    raise RuntimeError("server printed no result (rc %s): %s" % (p.returncode, err.strip()[-300:]))


def run_point(build, variant, srv_cpus, lg_cpus, conns, txn, size, secs, warmup):
    wait_quiet(float(os.environ.get("QUIET_WAIT", 0)))
    extra = ["-s", str(size)]
    p = run_server(build, VARIANTS[variant], srv_cpus, extra)
    lg = [os.path.join(build, "bench", "loadgen"), "-p", str(p.port), "-C", cpu_list(lg_cpus),
          "-c", str(conns), "-n", str(txn), "-s", str(size), "-d", str(secs), "-w", str(warmup),
          "-S", str(p.pid), "-X", cpu_list(srv_cpus)]
    lg = in_ns("client", lg)
    res = {}
    try:
        q = subprocess.run(lg, capture_output=True, text=True, timeout=secs + warmup + 30)
        res = find_result(q.stdout, conv=number) or {}
        if not res:
            raise RuntimeError("loadgen failed: %s" % q.stderr.strip()[-300:])
    finally:
        srv = stop_server(p)
    row = {"variant": variant, "conns": conns, "txn": txn, "size": size,
           "srv_cores": len(srv_cpus)}
    row["tps"] = res["tps"]
    row["p50_us"] = res["p50_us"]
    row["p99_us"] = res["p99_us"]
    row["p999_us"] = res["p999_us"]
    row["errors"] = res["errors"] + res["connect_errors"] + res["timeouts"]
    row["srv_cpu_us_txn"] = res["server_cpu_us_per_txn"]
    row["srv_util"] = res["server_cpu_s"] / res["seconds"] / len(srv_cpus)
    row["core_us_txn"] = res.get("core_us_per_txn", float("nan"))
    row["core_si_us_txn"] = res.get("core_softirq_us_per_txn", float("nan"))
    row["others_cpus"] = res.get("others_cpus", float("nan"))
    # fairness: transactions per connection in the measured interval (persistent connections)
    row["pc_min"] = res.get("pc_min", float("nan"))
    row["pc_med"] = res.get("pc_med", float("nan"))
    row["pc_max"] = res.get("pc_max", float("nan"))
    row["pc_zero"] = res.get("pc_zero", float("nan"))
    row["lg_cpu_us_txn"] = res["lg_cpu_us_per_txn"]
    row["lg_util"] = res["lg_util"]
    st = srv.get("transactions", 0)
    row["sys_txn"] = srv["syscalls"] / st if st else float("nan")
    if "sqes" in srv:
        subs = srv.get("submits", 0)
        row["sqes_per_submit"] = srv["sqes"] / subs if subs else 0
        row["batch_hist"] = srv.get("batch_hist", "")
    else:
        row["sqes_per_submit"] = ""
        row["batch_hist"] = ""
    return row


NUMERIC = ["tps", "p50_us", "p99_us", "p999_us", "errors", "srv_cpu_us_txn", "srv_util",
           "lg_cpu_us_txn", "lg_util", "sys_txn", "core_us_txn", "core_si_us_txn", "others_cpus",
           "pc_min", "pc_med", "pc_max", "pc_zero"]


def sweep(args, name, points, variants):
    """points: list of dicts (conns, txn, size, srv_cpus, lg_cpus, key); interleaved runs."""
    name += "_veth" if NETNS else ""
    os.makedirs(RESULTS, exist_ok=True)
    raw = []
    total = len(points) * len(variants) * args.reps
    n = 0
    t0 = time.time()
    for pt in points:
        for rep in range(args.reps):
            for v in variants:
                n += 1
                try:
                    row = run_point(args.build, v, pt["srv_cpus"], pt["lg_cpus"], pt["conns"],
                                    pt["txn"], pt["size"], args.secs, args.warmup)
                except Exception as e:  # noqa: BLE001 - one bad run must not end a sweep
                    print("  run failed (%s %s): %s" % (v, pt, e), file=sys.stderr)
                    continue
                row["rep"] = rep
                raw.append(row)
                print("  [%d/%d %.0fs] %-9s conns=%-5d txn=%-4d size=%-6d cores=%d  %9.0f txn/s  "
                      "srv %6.2f us/txn  %5.2f sys/txn  lg %3.0f%%  p99 %.0f us  others %.2f CPUs%s" % (
                          n, total, time.time() - t0, v, pt["conns"], pt["txn"], pt["size"],
                          len(pt["srv_cpus"]), row["tps"], row["srv_cpu_us_txn"], row["sys_txn"],
                          100 * row["lg_util"], row["p99_us"], row["others_cpus"],
                          ("  errors=%d" % row["errors"]) if row["errors"] else ""),
                      file=sys.stderr, flush=True)
    fields = ["variant", "conns", "txn", "size", "srv_cores", "rep"] + NUMERIC + \
        ["sqes_per_submit", "batch_hist"]
    args.raw = raw
    with open(os.path.join(RESULTS, name + "_raw.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(raw)
    med = []
    for pt in points:
        for v in variants:
            rows = [r for r in raw if r["variant"] == v and r["conns"] == pt["conns"] and
                    r["txn"] == pt["txn"] and r["size"] == pt["size"] and
                    r["srv_cores"] == len(pt["srv_cpus"])]
            if not rows:
                continue
            m = {"variant": v, "conns": pt["conns"], "txn": pt["txn"], "size": pt["size"],
                 "srv_cores": len(pt["srv_cpus"]), "reps": len(rows)}
            for k in NUMERIC:
                m[k] = statistics.median(r[k] for r in rows)
            med.append(m)
    with open(os.path.join(RESULTS, name + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "conns", "txn", "size", "srv_cores", "reps"] +
                           NUMERIC)
        w.writeheader()
        w.writerows(med)
    return med


def find(med, variant, **kw):
    for m in med:
        if m["variant"] == variant and all(m[k] == v for k, v in kw.items()):
            return m
    return None


def ratio(a, b):
    return a / b if a and b else float("nan")


# ---- experiments ---------------------------------------------------------------------------

def exp_quick(args):
    srv, lg = split_cpus(1)
    txns = [int(x) for x in args.txns.split(",")]
    pts = [dict(conns=256, txn=t, size=64, srv_cpus=srv, lg_cpus=lg) for t in txns]
    variants = args.variants.split(",") if args.variants else ["baseline", "megapipe"]
    med = sweep(args, "quick", pts, variants)
    print("\nserver CPUs %s, load generator CPUs %s, 256 connections, 64 B, %d reps x %gs "
          "(medians)%s" % (cpu_list(srv), cpu_list(lg), args.reps, args.secs,
                           ", veth + RPS" if NETNS else ", loopback"))
    print("srv us/txn: server process CPU (all threads, schedstat); core us/txn: busy time of the "
          "server's CPUs (/proc/stat, incl. softirq outside the process and other tasks)")
    hdr = ("txn/conn", "variant", "txn/s", "srv us/txn", "core us/txn", "sys/txn", "srv CPU",
           "lg CPU", "p99 us", "errors")
    print("%-8s %-9s %10s %10s %11s %8s %7s %7s %8s %6s" % hdr)
    for t in txns:
        b = find(med, "baseline", txn=t)
        for v in variants:
            r = find(med, v, txn=t)
            if r:
                print("%-8d %-9s %10.0f %10.2f %11.2f %8.3f %6.0f%% %6.0f%% %8.0f %6d" % (
                    t, r["variant"], r["tps"], r["srv_cpu_us_txn"], r["core_us_txn"], r["sys_txn"],
                    100 * r["srv_util"], 100 * r["lg_util"], r["p99_us"], r["errors"]))
        for v in variants:
            m = find(med, v, txn=t)
            if b and m and v != "baseline":
                print("%-8s %-9s %9.2fx %9.3fx %10.3fx %7.3fx" % (
                    "", "mp/base" if len(variants) == 2 else v + "/base",
                    ratio(m["tps"], b["tps"]), ratio(m["srv_cpu_us_txn"], b["srv_cpu_us_txn"]),
                    ratio(m["core_us_txn"], b["core_us_txn"]), ratio(m["sys_txn"], b["sys_txn"])))
    # Paired ratios: run i of a variant against run i of the baseline (adjacent in time).
    for v in variants:
        if v == "baseline":
            continue
        for t in txns:
            rs = []
            for rep in range(args.reps):
                b = [r for r in args.raw if r["variant"] == "baseline" and r["txn"] == t and r["rep"] == rep]
                m = [r for r in args.raw if r["variant"] == v and r["txn"] == t and r["rep"] == rep]
                if b and m:
                    rs.append(ratio(m[0]["srv_cpu_us_txn"], b[0]["srv_cpu_us_txn"]))
            if rs:
                print("paired server CPU/txn ratio %s/baseline at %d txn/conn: median %.3f, "
                      "range %.3f-%.3f over %d pairs" % (v, t, statistics.median(rs), min(rs),
                                                          max(rs), len(rs)))
    oth = [r["others_cpus"] for r in med]
    print("other load on the machine during the runs (CPUs busy outside server and load "
          "generator): median %.2f, max %.2f%s" % (
              statistics.median(oth), max(oth),
              "  <- shared machine: throughput unreliable" if max(oth) > 0.15 else ""))
    # The project's acceptance targets for this benchmark (one server core, load generator on
    # another, 64 B messages, 256 connections; docs/benchmarks.md).  They are the project's own:
    # the paper's gains (Fig. 1(a), Table 3) are measured on 8 cores and are larger.
    checks = []
    for t, lim in ((1, 0.80), (128, 0.92)):
        b, m = find(med, "baseline", txn=t), find(med, "megapipe", txn=t)
        if b and m:
            r = ratio(m["srv_cpu_us_txn"], b["srv_cpu_us_txn"])
            checks.append(("server CPU per transaction, MegaPipe / baseline, at %d txn/conn" % t,
                           "<= %.2fx" % lim, "%.3fx" % r, r <= lim))
    m = find(med, "megapipe", txn=128)
    if m:
        checks.append(("MegaPipe system calls per transaction at 128 txn/conn (baseline: 2-3)",
                       "<= 0.10", "%.3f" % m["sys_txn"], m["sys_txn"] <= 0.1))
    if checks:
        print("\nacceptance targets (the project's own for this benchmark: server on one core, 64 B, "
              "256 connections; see docs/benchmarks.md):")
        for what, target, got, ok in checks:
            print("  %-72s %-8s measured %-7s %s" % (what, target, got, "met" if ok else "not met"))
        if len(srv) != 1:
            print("  (the targets are set for a one-core server; this run used %d)" % len(srv))
    return med


TXNS = [1, 2, 4, 8, 16, 32, 64, 128]
T3VARIANTS = ["baseline", "+P", "+P+B", "megapipe"]


def exp_txn(args):
    srv, lg = split_cpus(1)
    pts = [dict(conns=args.conns, txn=t, size=64, srv_cpus=srv, lg_cpus=lg) for t in TXNS]
    med = sweep(args, "fig1a_txn", pts, T3VARIANTS)
    # Table 3: improvement over baseline (%), throughput and server CPU per transaction
    path = os.path.join(RESULTS, "table3%s.csv" % ("_veth" if NETNS else ""))
    with open(path, "w") as f:
        f.write("txn,metric,+P,+P+B,+P+B+L\n")
        for metric in ("tps", "srv_cpu_us_txn"):
            for t in TXNS:
                b = find(med, "baseline", txn=t)
                vals = []
                for v in ("+P", "+P+B", "megapipe"):
                    m = find(med, v, txn=t)
                    if metric == "tps":
                        vals.append(100 * (ratio(m["tps"], b["tps"]) - 1) if b and m else float("nan"))
                    else:  # CPU saved per transaction, % of baseline
                        vals.append(100 * (1 - ratio(m[metric], b[metric])) if b and m else float("nan"))
                f.write("%d,%s,%s\n" % (t, metric, ",".join("%.1f" % x for x in vals)))
    print("\nTable 3 (improvement over baseline, %; throughput, then server CPU per txn saved)")
    with open(path) as f:
        print(f.read())
    plot(args, "fig1a_txn", "Fig. 1(a): throughput vs transactions per connection",
         "transactions per connection", "txn", T3VARIANTS, logx=True)
    return med


SIZES = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


def exp_size(args):
    srv, lg = split_cpus(1)
    pts = [dict(conns=args.conns, txn=10, size=s, srv_cpus=srv, lg_cpus=lg) for s in SIZES]
    med = sweep(args, "fig1b_size", pts, ["baseline", "megapipe"])
    plot(args, "fig1b_size", "Fig. 1(b): message size (10 txn/conn)", "message size (bytes)",
         "size", ["baseline", "megapipe"], logx=True)
    return med


def exp_cores(args):
    n = len(allowed_cpus())
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= max(1, n // 2)]
    pts = []
    for k in ks:
        srv, lg = split_cpus(k)
        pts.append(dict(conns=args.conns * k, txn=args.cores_txn, size=64, srv_cpus=srv, lg_cpus=lg))
    med = sweep(args, "fig1c_cores", pts, ["baseline", "megapipe"])
    plot(args, "fig1c_cores", "Fig. 1(c)/3: server cores (%d txn/conn)" % args.cores_txn,
         "server cores", "srv_cores", ["baseline", "megapipe"], logx=False)
    return med


def exp_latency(args):
    srv, lg = split_cpus(1)
    conns = [int(c) for c in args.latency_conns.split(",")] if args.latency_conns else \
        [1, 4, 16, 64, 256, 1024, 4096]
    # A subset of the points (more runs where single runs scatter) goes to a file of its own.
    name = "fig6_latency" if not args.latency_conns else \
        "fig6_latency_" + "_".join(str(c) for c in conns)
    pts = [dict(conns=c, txn=0, size=64, srv_cpus=srv, lg_cpus=lg) for c in conns]
    med = sweep(args, name, pts, ["baseline", "megapipe"])
    plot(args, name, "Fig. 6: latency vs persistent connections",
         "persistent connections", "conns", ["baseline", "megapipe"], logx=True, latency=True)
    return med


# ---- plots -------------------------------------------------------------------------------

LABELS = {"baseline": "baseline", "+P": "+P", "+P+B": "+P+B", "megapipe": "MegaPipe (P+B+L)",
          "megapipe+R": "MegaPipe + buffered reads", "mp-epoll": "MegaPipe, epoll engine"}


def plot(args, name, title, xlabel, xcol, variants, logx, latency=False):
    if NETNS:
        name += "_veth"
        title += ", veth + RPS"
    if subprocess.run(["sh", "-c", "command -v gnuplot"], capture_output=True).returncode:
        print("gnuplot not found: no plot for %s" % name, file=sys.stderr)
        return
    os.makedirs(IMG, exist_ok=True)
    csvp = os.path.join(RESULTS, name + ".csv")
    with open(csvp) as f:
        rows = list(csv.DictReader(f))
    cols = ["variant", "conns", "txn", "size", "srv_cores", "reps"] + NUMERIC
    idx = {c: i + 1 for i, c in enumerate(cols)}
    datp = os.path.join(RESULTS, name + ".dat")
    with open(datp, "w") as f:  # one gnuplot block per variant
        for v in variants:
            f.write("# %s\n" % v)
            for r in sorted((r for r in rows if r["variant"] == v), key=lambda r: float(r[xcol])):
                f.write(" ".join(r[c] for c in cols) + "\n")
            f.write("\n\n")
    script = ["set terminal pngcairo size 1000,420 font ',10'" if has_cairo() else
              "set terminal png size 1000,420",
              "set output '%s'" % os.path.join(IMG, name + ".png"),
              "set multiplot layout 1,2 title '%s (%s)'" % (title, args.machine_short),
              "set grid", "set key top left", "set xlabel '%s'" % xlabel]
    if logx:
        script.append("set logscale x 2")
    x = idx[xcol]
    if latency:
        script += ["set ylabel 'latency (us)'", "set logscale y",
                   "plot " + ", ".join(
                       "'%s' index %d using %d:%d with linespoints title '%s p50', "
                       "'%s' index %d using %d:%d with linespoints dt 2 title '%s p99'" % (
                           datp, i, x, idx["p50_us"], LABELS[v], datp, i, x, idx["p99_us"], LABELS[v])
                       for i, v in enumerate(variants)),
                   "unset logscale y", "set ylabel 'throughput (txn/s)'",
                   "plot " + ", ".join("'%s' index %d using %d:%d with linespoints title '%s'" % (
                       datp, i, x, idx["tps"], LABELS[v]) for i, v in enumerate(variants))]
    else:
        script += ["set ylabel 'throughput (txn/s)'", "set yrange [0:*]",
                   "plot " + ", ".join("'%s' index %d using %d:%d with linespoints title '%s'" % (
                       datp, i, x, idx["tps"], LABELS[v]) for i, v in enumerate(variants)),
                   "set ylabel 'server CPU per transaction (us)'",
                   "plot " + ", ".join("'%s' index %d using %d:%d with linespoints title '%s'" % (
                       datp, i, x, idx["srv_cpu_us_txn"], LABELS[v]) for i, v in enumerate(variants))]
    script.append("unset multiplot")
    q = subprocess.run(["gnuplot"], input="\n".join(script) + "\n", capture_output=True, text=True)
    if q.returncode:
        print("gnuplot failed for %s: %s" % (name, q.stderr.strip()), file=sys.stderr)
    else:
        print("plot: %s" % os.path.join(IMG, name + ".png"), file=sys.stderr)


_cairo = None


def has_cairo():
    global _cairo
    if _cairo is None:
        q = subprocess.run(["gnuplot", "-e", "set terminal"], capture_output=True, text=True)
        _cairo = "pngcairo" in (q.stdout + q.stderr)
    return _cairo


def exp_replot(args):
    """Redraw every plot from the CSVs already in the results directory (--results, default
    bench/results/; no runs).  Also for CSVs written by bench/travel.sh on another machine: the
    plots then name that machine (its machine.txt)."""
    cores_txn = args.cores_txn
    found = 0
    try:  # the cores sweep's txn/conn, as recorded in its CSV
        with open(os.path.join(RESULTS, "fig1c_cores%s.csv" % ("_veth" if NETNS else ""))) as f:
            cores_txn = int(next(csv.DictReader(f))["txn"])
    except (OSError, StopIteration, KeyError, ValueError):
        pass
    for name, title, xl, xc, vs, logx, lat in (
            ("fig1a_txn", "Fig. 1(a): throughput vs transactions per connection",
             "transactions per connection", "txn", T3VARIANTS, True, False),
            ("fig1b_size", "Fig. 1(b): message size (10 txn/conn)", "message size (bytes)", "size",
             ["baseline", "megapipe"], True, False),
            ("fig1c_cores", "Fig. 1(c)/3: server cores (%d txn/conn)" % cores_txn,
             "server cores", "srv_cores", ["baseline", "megapipe"], False, False),
            ("fig6_latency", "Fig. 6: latency vs persistent connections", "persistent connections",
             "conns", ["baseline", "megapipe"], True, True)):
        if os.path.exists(os.path.join(RESULTS, name + ("_veth" if NETNS else "") + ".csv")):
            plot(args, name, title, xl, xc, vs, logx, latency=lat)
            found += 1
    if not found:
        print("replot: no sweep CSVs (fig1a_txn.csv, fig1b_size.csv, fig1c_cores.csv, "
              "fig6_latency.csv) in %s" % RESULTS, file=sys.stderr)


EXPERIMENTS = {"replot": exp_replot, "quick": exp_quick, "txn": exp_txn, "size": exp_size, "cores": exp_cores,
               "latency": exp_latency}


def main():
    global RESULTS, IMG
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiments", nargs="+", choices=list(EXPERIMENTS) + ["all"])
    ap.add_argument("--build", default=os.environ.get("BUILD_DIR", os.path.join(ROOT, "build")),
                    help="build directory (env BUILD_DIR; default <repo>/build)")
    ap.add_argument("--reps", type=int, default=int(os.environ.get("REPS", 3)))
    ap.add_argument("--secs", type=float, default=float(os.environ.get("SECS", 3)),
                    help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=float(os.environ.get("WARMUP", 0.5)))
    ap.add_argument("--conns", type=int, default=256, help="connections (per server core)")
    ap.add_argument("--txns", default="1,8,128", help="quick: transactions per connection")
    ap.add_argument("--latency-conns", default="",
                    help="latency: only these connection counts (e.g. 1024,4096), to "
                         "fig6_latency_<counts>.csv")
    ap.add_argument("--variants", default="",
                    help="quick: comma-separated variants (default baseline,megapipe; also +P, "
                         "+P+B, megapipe+R, mp-epoll)")
    ap.add_argument("--netns", action="store_true",
                    help="client and server in two network namespaces joined by a veth pair, "
                         "RPS on (root); result files get a _veth suffix")
    ap.add_argument("--cores-txn", type=int, default=10, help="txn/conn in the cores sweep")
    ap.add_argument("--results", default=os.environ.get("RESULTS_DIR", RESULTS),
                    help="directory of the CSVs: written by sweeps, read by replot (env "
                         "RESULTS_DIR; default <repo>/bench/results)")
    ap.add_argument("--img", default=IMG, help="directory the PNG plots go to (default "
                                               "<repo>/docs/img)")
    args = ap.parse_args()
    RESULTS, IMG = os.path.abspath(args.results), os.path.abspath(args.img)
    args.build = os.path.abspath(args.build)
    only_replot = set(args.experiments) == {"replot"}
    for exe in ("mpserver", "loadgen"):
        if not only_replot and not os.access(os.path.join(args.build, "bench", exe), os.X_OK):
            sys.exit("%s/bench/%s not found: build first (cmake -S . -B build && cmake --build "
                     "build; or, after bash scripts/bench.sh, use --build build-bench)"
                     % (args.build, exe))
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if only_replot:  # no runs: name the machine the CSVs came from
            info = machine_from_file(os.path.join(RESULTS, "machine.txt"))
            where = "measured on"
            if not info:
                info, where = machine_static(), "no machine.txt there; labelled with this machine:"
            args.machine_short = machine_short(info)
            print("replot: CSVs in %s (%s %s), plots to %s" % (RESULTS, where, args.machine_short, IMG))
            exp_replot(args)
            return
        info = machine(args.build)
        print_machine(info)
        args.machine_short = machine_short(info)
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "machine.txt"), "w") as f:
            print_machine(info, f)
        exps = ["txn", "size", "cores", "latency"] if "all" in args.experiments else args.experiments
        if args.netns:
            srv, lg = split_cpus(1)
            netns_setup(srv, lg)
            print("netns mode: server in %s (%s, RPS -> CPU %s), load in %s (RPS -> CPU %s)" % (
                NETNS[0], NETNS[2], cpu_list(srv), NETNS[1], cpu_list(lg)))
        for e in exps:
            print("\n== %s" % e, flush=True)
            EXPERIMENTS[e](args)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
