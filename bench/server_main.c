/*
 * server_main.c — mpserver: options, listening socket, worker threads, exit totals.
 *
 *   mpserver [-e baseline|megapipe] [-P 0|1] [-B 0|1] [-L 0|1] [-R 0|1] [-E auto|uring|epoll]
 *            [-t threads] [-c cpulist] [-p port] [-d seconds] [-i idle-seconds]
 *            [-m rpc|http] [-s bytes] [-b backlog] [-a addr]
 *
 * Listens on 127.0.0.1 (-a: another local address, e.g. a veth in a private netns).  Line 1
 * of stdout is "port N".  Stops by itself after -d
 * seconds (default 600), after -i seconds without a transaction or accept (default 60;
 * 0 = never), or on SIGINT/SIGTERM, and then prints one line of totals:
 *   result engine=... transactions=... syscalls=... [sqes=... submits=... batch_hist=...]
 * syscalls counts every system call of the serving threads: the library's own count
 * (mp_stats.syscalls) plus the calls the server code makes itself; for the baseline a counter
 * sits around every call.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "server.h"

atomic_int g_stop;

static void on_signal(int sig) {
    (void)sig;
    atomic_store(&g_stop, 1);
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: mpserver [-e baseline|megapipe] [-P 0|1] [-B 0|1] [-L 0|1] [-R 0|1]\n"
            "                [-E auto|uring|epoll] [-t threads] [-c cpulist] [-p port]\n"
            "                [-d seconds] [-i idle-seconds] [-m rpc|http] [-s bytes] [-b backlog]\n"
            "                [-a addr] [-h|--help]\n"
            "  -e  engine: baseline = shared socket + epoll + BSD calls; megapipe = the library\n"
            "  -P -B -L  megapipe: partitioned listener, batching (32 vs 1), lwsockets (default 1)\n"
            "  -R  megapipe: buffered reads (multishot receive into provided buffers; default 0)\n"
            "  -E  the library's engine (default auto)\n"
            "  -t  threads (default: one per CPU of -c, or nproc); -c CPUs to pin to, e.g. 0 or 0-3\n"
            "  -p  port (0 = any free one; default 0); -a IPv4 address (default 127.0.0.1)\n"
            "  -d  stop after this many seconds (default 600); -i stop after this many idle\n"
            "      seconds (default 60, 0 = never)\n"
            "  -m  protocol (default rpc); -s rpc message size (default 64)\n"
            "  -b  listen backlog (default 4096)\n"
            "  -h, --help  this text\n");
}

static int parse01(const char *s) { return atoi(s) ? 1 : 0; }

int main(int argc, char **argv) {
    static srv_config cfg;
    cfg.P = cfg.B = cfg.L = 1;
    cfg.mp_engine = MP_ENGINE_AUTO;
    cfg.backlog = 4096;
    cfg.proto.kind = PROTO_RPC;
    cfg.proto.size = 64;
    int port = 0, duration = 600, idle = 60, opt;
    const char *cpulist = NULL, *addr = "127.0.0.1";
    static const struct option longopts[] = {{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    while ((opt = getopt_long(argc, argv, "e:P:B:L:R:E:t:c:p:d:i:m:s:b:a:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'e':
            if (!strcmp(optarg, "baseline")) cfg.megapipe = 0;
            else if (!strcmp(optarg, "megapipe")) cfg.megapipe = 1;
            else { usage(stderr); return 2; }
            break;
        case 'P': cfg.P = parse01(optarg); break;
        case 'B': cfg.B = parse01(optarg); break;
        case 'L': cfg.L = parse01(optarg); break;
        case 'R': cfg.R = parse01(optarg); break;
        case 'E':
            if (!strcmp(optarg, "auto")) cfg.mp_engine = MP_ENGINE_AUTO;
            else if (!strcmp(optarg, "uring")) cfg.mp_engine = MP_ENGINE_URING;
            else if (!strcmp(optarg, "epoll")) cfg.mp_engine = MP_ENGINE_EPOLL;
            else { usage(stderr); return 2; }
            break;
        case 't': cfg.threads = atoi(optarg); break;
        case 'c': cpulist = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'd': duration = atoi(optarg); break;
        case 'i': idle = atoi(optarg); break;
        case 'm':
            if (proto_parse(optarg, &cfg.proto.kind) < 0) { usage(stderr); return 2; }
            break;
        case 's': cfg.proto.size = (size_t)atol(optarg); break;
        case 'b': cfg.backlog = atoi(optarg); break;
        case 'a': addr = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (cfg.proto.size < 1 || cfg.proto.size > (16u << 20) || port < 0 || port > 65535) {
        fprintf(stderr, "mpserver: bad size or port\n");
        return 2;
    }
    if (cpulist) {
        cfg.ncpus = parse_cpu_list(cpulist, cfg.cpus, MAX_THREADS);
        if (cfg.ncpus <= 0) {
            fprintf(stderr, "mpserver: bad cpu list '%s'\n", cpulist);
            return 2;
        }
    } else {
        cfg.ncpus = online_cpus(cfg.cpus, MAX_THREADS);
    }
    if (cfg.threads <= 0) cfg.threads = cfg.ncpus;
    if (cfg.threads > MAX_THREADS) cfg.threads = MAX_THREADS;
    raise_nofile();

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1) {
        fprintf(stderr, "mpserver: bad address '%s'\n", addr);
        return 2;
    }
    if (cfg.megapipe) {
        /* bound, not listening: each partition listens (or the shared registration does) */
        cfg.listen_fd = mp_listen_socket((struct sockaddr *)&sa, sizeof sa, cfg.backlog);
        if (cfg.listen_fd < 0) {
            fprintf(stderr, "mp_listen_socket: %s\n", strerror(-cfg.listen_fd));
            return 1;
        }
    } else {
        int one = 1;
        cfg.listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (cfg.listen_fd < 0 ||
            setsockopt(cfg.listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
            bind(cfg.listen_fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
            listen(cfg.listen_fd, cfg.backlog) < 0) {
            perror("listening socket");
            return 1;
        }
    }
    socklen_t sl = sizeof sa;
    getsockname(cfg.listen_fd, (struct sockaddr *)&sa, &sl);

    struct sigaction sact = {.sa_handler = on_signal};
    sigaction(SIGINT, &sact, NULL);
    sigaction(SIGTERM, &sact, NULL);
    signal(SIGPIPE, SIG_IGN);

    srv_worker *ws = aligned_alloc(64, sizeof(srv_worker) * (size_t)cfg.threads);
    if (!ws) return 1;
    memset(ws, 0, sizeof(srv_worker) * (size_t)cfg.threads);
    for (int i = 0; i < cfg.threads; i++) {
        ws[i].idx = i;
        ws[i].cpu = cfg.cpus[i % cfg.ncpus];
        ws[i].cfg = &cfg;
        if ((cfg.megapipe ? megapipe_prepare : baseline_prepare)(&cfg, &ws[i]) < 0) return 1;
    }
    int started = 0;
    for (int i = 0; i < cfg.threads; i++) {
        if (pthread_create(&ws[i].tid, NULL, cfg.megapipe ? megapipe_thread : baseline_thread,
                           &ws[i]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            atomic_store(&g_stop, 1);
            break;
        }
        started++;
    }
    printf("port %d\n", ntohs(sa.sin_port));
    fflush(stdout);

    uint64_t t0 = now_ns(), last_activity = t0, last_count = 0;
    while (!atomic_load(&g_stop)) {
        usleep(50000);
        uint64_t now = now_ns(), count = 0;
        for (int i = 0; i < started; i++) {
            count += atomic_load_explicit(&ws[i].txns, memory_order_relaxed);
            count += atomic_load_explicit(&ws[i].accepts, memory_order_relaxed);
            if (ws[i].failed) atomic_store(&g_stop, 1);
        }
        if (count != last_count) {
            last_count = count;
            last_activity = now;
        }
        if (duration > 0 && now - t0 >= (uint64_t)duration * 1000000000u) break;
        if (idle > 0 && now - last_activity >= (uint64_t)idle * 1000000000u) break;
    }
    atomic_store(&g_stop, 1);
    for (int i = 0; i < started; i++) (cfg.megapipe ? megapipe_wake : baseline_wake)(&ws[i]);

    uint64_t txns = 0, accepts = 0, app_sys = 0, aerr = 0, cerr = 0, peak = 0;
    mp_stats tot;
    memset(&tot, 0, sizeof tot);
    int failed = 0;
    for (int i = 0; i < started; i++) {
        pthread_join(ws[i].tid, NULL);
        if (cfg.megapipe) megapipe_finish(&ws[i]);
        srv_worker *w = &ws[i];
        failed |= w->failed;
        txns += w->txns;
        accepts += w->accepts;
        app_sys += w->app_syscalls;
        aerr += w->accept_errors;
        cerr += w->conn_errors;
        peak += w->peak_conns;
        if (cfg.megapipe) {
            if (i == 0) {
                memcpy(tot.engine, w->st.engine, sizeof tot.engine);
                tot.features = w->st.features;
                tot.missing = w->st.missing;
            }
            tot.fallbacks |= w->st.fallbacks;
            tot.requests += w->st.requests;
            tot.syscalls += w->st.syscalls;
            tot.submits += w->st.submits;
            tot.sqes += w->st.sqes;
            tot.cqes += w->st.cqes;
            tot.events += w->st.events;
            for (int b = 0; b < MP_STATS_HIST; b++) tot.batch_hist[b] += w->st.batch_hist[b];
            tot.cq_overflows += w->st.cq_overflows;
            tot.accept_errors += w->st.accept_errors;
            tot.stolen_accepts += w->st.stolen_accepts;
        }
    }
    double secs = (double)(now_ns() - t0) / 1e9;
    if (cfg.megapipe) {
        printf("result engine=megapipe mp_engine=%s P=%d B=%d L=%d R=%d threads=%d size=%zu "
               "seconds=%.2f transactions=%llu accepts=%llu syscalls=%llu app_syscalls=%llu "
               "mp_syscalls=%llu submits=%llu sqes=%llu cqes=%llu events=%llu requests=%llu "
               "cq_overflows=%llu accept_errors=%llu conn_errors=%llu peak_conns=%llu "
               "features=0x%x missing=0x%x fallbacks=0x%x batch_hist=",
               tot.engine, cfg.P, cfg.B, cfg.L, cfg.R, cfg.threads, cfg.proto.size, secs,
               (unsigned long long)txns, (unsigned long long)accepts,
               (unsigned long long)(tot.syscalls + app_sys), (unsigned long long)app_sys,
               (unsigned long long)tot.syscalls, (unsigned long long)tot.submits,
               (unsigned long long)tot.sqes, (unsigned long long)tot.cqes,
               (unsigned long long)tot.events, (unsigned long long)tot.requests,
               (unsigned long long)tot.cq_overflows, (unsigned long long)aerr,
               (unsigned long long)cerr, (unsigned long long)peak, tot.features, tot.missing,
               tot.fallbacks);
        for (int b = 0; b < MP_STATS_HIST; b++)
            printf("%s%llu", b ? "," : "", (unsigned long long)tot.batch_hist[b]);
        printf("\n");
        fflush(stdout);
        if (getenv("MP_STATS")) mp_print_stats(&tot, stderr);
    } else {
        printf("result engine=baseline threads=%d size=%zu seconds=%.2f transactions=%llu "
               "accepts=%llu syscalls=%llu app_syscalls=%llu accept_errors=%llu "
               "conn_errors=%llu peak_conns=%llu\n",
               cfg.threads, cfg.proto.size, secs, (unsigned long long)txns,
               (unsigned long long)accepts, (unsigned long long)app_sys,
               (unsigned long long)app_sys, (unsigned long long)aerr, (unsigned long long)cerr,
               (unsigned long long)peak);
        fflush(stdout);
    }
    close(cfg.listen_fd);
    free(ws);
    return failed ? 1 : 0;
}
