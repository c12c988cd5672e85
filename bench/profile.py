#!/usr/bin/env python3
"""profile.py — where the server's CPU time goes, per transaction (perf, stdlib only).

    bench/profile.py [--build DIR] [--txn N] [--secs S] [--conns C] [variant ...]

For each variant (default: baseline megapipe), starts mpserver on the server CPU, drives it
with loadgen on the other CPUs, and samples the server process only (perf record -p PID,
so softirq work done in the server's own context is included, as it is in the server CPU
time that loadgen reads from /proc/PID/task/*/schedstat).  Each sample's leaf symbol is put in
one bucket:

    user       the server program and libc/liburing in user space
    entry      system-call entry/exit and dispatch (entry_SYSCALL_64, do_syscall_64, ...)
    io_uring   the io_uring core (io_*, __io_*, io_uring_*)
    epoll      epoll (ep_*, do_epoll_*)
    file/fd    file, inode and fd-table work (alloc_file, fput, fd_install, d_alloc, ...):
               what lwsockets avoid
    tcp/ip     the network stack: TCP, IP, sockets, skbs, loopback device
    sched/irq  scheduler, wake-ups, softirq entry
    mem        allocators (kmem_cache_*, kmalloc, page allocator)
    other      everything else (listed in the raw report)

and the shares are turned into microseconds per transaction with the server CPU time per
transaction measured in the same run.  Needs perf and perf_event_paranoid <= 1 (or root).
Writes bench/results/profile_<variant>_<txn>.txt (perf report) and prints a table.
"""
import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpbench  # noqa: E402

BUCKETS = ["user", "entry", "io_uring", "epoll", "file/fd", "tcp/ip", "sched/irq", "mem", "other"]

RULES = [
    ("entry", r"^(entry_SYSCALL|do_syscall_64|syscall_exit|syscall_return|__x64_sys_|__do_sys_|"
              r"__sys_|exit_to_user_mode|syscall_enter|x64_sys_call|__ia32_sys|"
              r"entry_|int80|syscall_trace|fpregs_restore|switch_fpu|restore_fpregs|__rseq|rseq_)"),
    ("io_uring", r"^(io_|__io_|io_uring|__io_uring|tctx_task_work|task_work_run|__se_sys_io_uring)"),
    ("epoll", r"^(ep_|do_epoll|__ep_|epoll|ep_poll)"),
    ("file/fd", r"^(alloc_file|__alloc_file|alloc_empty_file|fput|__fput|____fput|fget|__fget|"
                r"fd_install|alloc_fd|__alloc_fd|get_unused_fd|put_unused_fd|close_fd|file_close_fd|"
                r"filp_close|filp_flush|d_alloc|__d_alloc|dput|__dentry_kill|dentry_|d_instantiate|"
                r"new_inode|alloc_inode|iput|evict|destroy_inode|sock_alloc_file|sock_alloc|"
                r"sock_release|sock_close|__sock_release|inode_|security_file|security_inode|"
                r"file_free|fdget|__fdget|fd_|locks_remove|task_work_add|mntput|mntget|"
                r"path_|d_set|dentry|__close_range|expand_files|pick_file|do_close_on_exec|"
                r"init_file|file_init|__f_unlock|lookup_fdget)"),
    ("tcp/ip", r"^(tcp|__tcp|ip_|__ip|ipv4|inet|__inet|sk_|__sk_|sock_|__sock|skb|__skb|"
               r"kfree_skb|consume_skb|__kfree_skb|alloc_skb|__alloc_skb|net_|__net|netif|__netif|"
               r"process_backlog|loopback|dev_|__dev_|napi|__napi|nf_|raw_|lock_sock|release_sock|"
               r"csum|__copy_skb|validate_xmit|dst_|__dst|fib_|rt_|reqsk|inet_csk|__inet_csk|"
               r"security_sock|security_sk|bpf_|sk_filter|reuseport|__reuseport|ktime_get_with|"
               r"copy_to_iter|_copy_to_iter|copy_from_iter|_copy_from_iter|__copy_from|simple_copy|"
               r"skb_copy|mem_cgroup_charge_skmem|mem_cgroup_uncharge_skmem|__sk_mem|sock_def|"
               r"sk_stream|ipt_|neigh|eth_|qdisc|__qdisc|sch_|pfifo|__dev_queue|rps_|"
               r"secure_tcp|siphash|__siphash|tcp_|udp|icmp|__xfrm|xfrm|sock_rfree|sock_wfree|"
               r"__build_skb|build_skb|page_frag|skb_release|__napi_alloc|rcu_read)"),
    ("sched/irq", r"^(schedule|__schedule|finish_task_switch|try_to_wake_up|ttwu|wake_up|__wake_up|"
                  r"autoremove_wake|default_wake|pick_next|enqueue|dequeue|update_curr|"
                  r"update_load|__update_load|do_softirq|__do_softirq|handle_softirqs|"
                  r"__local_bh|local_bh|irq_|__irq|do_IRQ|sysvec|asm_sysvec|common_interrupt|"
                  r"native_|hrtimer|__hrtimer|tick_|raw_spin|_raw_spin|queued_spin|"
                  r"native_queued|psi_|set_next|put_prev|select_task|check_preempt|resched|"
                  r"prepare_to_wait|finish_wait|__cond_resched|preempt|sched_|__sched|"
                  r"update_rq|newidle|load_balance|cpuacct|cgroup_|__cgroup|account_)"),
    ("mem", r"^(kmem_cache|__kmem_cache|kmalloc|__kmalloc|kfree|__kfree|slab|__slab|___slab|"
            r"get_page|__get_free|alloc_pages|__alloc_pages|free_pages|__free_pages|"
            r"free_unref|rmqueue|mod_memcg|__mod_memcg|memcg|__memcg|obj_cgroup|refill_obj|"
            r"kmalloc_reserve|krealloc|memset|memcpy|__memcpy|__memset|clear_page|kvfree|"
            r"put_cpu_partial|__put_partials|discard_slab|kmem_)"),
]
COMPILED = [(b, re.compile(p)) for b, p in RULES]


def bucket(dso, sym):
    if not dso.startswith("[kernel"):
        return "user"
    for b, rx in COMPILED:
        if rx.search(sym):
            return b
    return "other"


def profile(args, variant):
    srv, lg = mpbench.split_cpus(1)
    p = mpbench.run_server(args.build, mpbench.VARIANTS[variant], srv, ["-s", "64"])
    data = os.path.join(mpbench.RESULTS, "perf_%s_%d.data" % (variant.strip("+"), args.txn))
    loadgen = [os.path.join(args.build, "bench", "loadgen"), "-p", str(p.port),
               "-C", mpbench.cpu_list(lg), "-c", str(args.conns), "-n", str(args.txn),
               "-d", str(args.secs), "-w", "0.5", "-S", str(p.pid)]
    lgp = subprocess.Popen(loadgen, stdout=subprocess.PIPE, text=True)
    mpbench.children.append(lgp)
    # record the measured window (after the warmup)
    subprocess.run(["sleep", "0.5"])
    rec = subprocess.run(["perf", "record", "-q", "-F", "2999", "-p", str(p.pid), "-o", data,
                          "--", "sleep", str(max(1.0, args.secs - 0.5))],
                         capture_output=True, text=True)
    out = lgp.communicate(timeout=args.secs + 30)[0]
    mpbench.children.remove(lgp)
    srvres = mpbench.stop_server(p)
    res = {}
    for line in out.splitlines():
        if line.startswith("result "):
            res = mpbench.kv(line)
    if rec.returncode:
        raise RuntimeError("perf record failed: %s" % rec.stderr.strip())
    rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym",
                          "--stdio", "--percent-limit", "0"], capture_output=True, text=True)
    txt = os.path.join(mpbench.RESULTS, "profile_%s_%d.txt" % (variant.strip("+"), args.txn))
    with open(txt, "w") as f:
        f.write(rep.stdout)
    shares = dict.fromkeys(BUCKETS, 0.0)
    other = []
    for line in rep.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(\S+)", line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(3)
        b = bucket(dso, sym)
        shares[b] += pct
        if b == "other":
            other.append((pct, sym))
    os.unlink(data)
    tx = srvres.get("transactions", 0)
    return {"variant": variant, "us_txn": res.get("server_cpu_us_per_txn", float("nan")),
            "tps": res.get("tps", 0), "sys_txn": srvres["syscalls"] / tx if tx else float("nan"),
            "shares": shares, "other": sorted(other, reverse=True)[:8], "report": txt}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", default=["baseline", "megapipe"])
    ap.add_argument("--build", default=os.environ.get("BUILD_DIR", os.path.join(mpbench.ROOT, "build")))
    ap.add_argument("--txn", type=int, default=1)
    ap.add_argument("--conns", type=int, default=256)
    ap.add_argument("--secs", type=float, default=4)
    args = ap.parse_args()
    args.build = os.path.abspath(args.build)
    os.makedirs(mpbench.RESULTS, exist_ok=True)
    rows = []
    try:
        for v in args.variants:
            rows.append(profile(args, v))
    finally:
        mpbench.cleanup()
    print("server CPU per transaction by bucket (us), %d txn/conn, %d conns, 64 B" % (args.txn, args.conns))
    print("%-10s %8s %7s " % ("variant", "total", "sys/txn") + " ".join("%9s" % b for b in BUCKETS))
    for r in rows:
        tot = sum(r["shares"].values()) or 1
        print("%-10s %8.2f %7.2f " % (r["variant"], r["us_txn"], r["sys_txn"]) +
              " ".join("%9.2f" % (r["us_txn"] * r["shares"][b] / tot) for b in BUCKETS))
    for r in rows:
        print("  %s: top 'other' symbols: %s" % (r["variant"], ", ".join(
            "%s %.1f%%" % (s, p) for p, s in r["other"])))
        print("  %s: full report %s" % (r["variant"], r["report"]))


if __name__ == "__main__":
    main()
