/*
 * loadgen.c — the load generator (rpc, memcached, http), on raw liburing.
 *
 *   loadgen -p PORT [-a 127.0.0.1] [-m rpc|memcached|http] [-c conns] [-n txns/conn]
 *           [-s bytes] [-t threads] [-C cpulist] [-d seconds] [-w warmup-seconds]
 *           [-T op-timeout-ms] [-S server-pid] [-X cpus] [-K keys] [-V bytes] [-G get-%] [-f list] [-Z mean]
 *
 * C connections (spread over the threads), each doing N request/response transactions (rpc:
 * S-byte messages; memcached: 64 B keys, get:set 9:1 by default; http: GETs over a weighted file
 * list, see loadgen_proto.c), then closed with an RST (SO_LINGER {1,0}, as the paper did) and replaced by a new
 * connection; N = 0 keeps connections open (persistent).  Each thread is pinned and drives its
 * connections through one ring: every loop iteration submits all pending SQEs and reaps all
 * CQEs with one io_uring_enter, so the generator pays about one system call per batch plus
 * socket()/setsockopt()/close() per connection.  When the kernel says task work is pending
 * (IORING_SQ_TASKRUN) the loop's enter runs all of it without blocking, so connections whose
 * responses completed in the kernel are not overtaken round after round by those that
 * complete inline (LG_DRAIN=0: the capped behaviour of earlier measurements).
 *
 * Measured after the warmup for the duration: throughput, latency (request sent -> whole
 * response received) p50/p99/p99.9, errors, the generator's own CPU (getrusage) and, with
 * -S PID, the server's CPU time summed over all its threads (/proc/PID/task/ * /schedstat).
 * Prints human text, then one line "result key=value ..." (the scripts parse it).  Every
 * operation has a timeout (-T), so nothing hangs: a stuck connection is cancelled, counted as
 * a timeout and replaced.  Exit status 0 if transactions were measured, 1 otherwise.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <liburing.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"
#include "loadgen_hist.h"
#include "loadgen_proto.h"

#define MAX_THREADS 256

enum op { OP_NONE = 0, OP_CONNECT, OP_SEND, OP_RECV, OP_CANCEL };

typedef struct lconn {
    int fd;
    enum op op;           /* the one operation in flight (OP_NONE: none) */
    uint32_t gen;         /* bumped at each new socket: stale completions are ignored */
    int timed_out;
    unsigned done;        /* transactions on this connection */
    uint64_t mdone;       /* transactions of this connection slot in the measured interval */
    unsigned ntx;         /* ... and how many it will do (0 = persistent) */
    size_t sent;
    const char *req;
    size_t req_len;
    uint64_t t_send, t_op;
    lgp_conn p;           /* request buffer and response framing */
} lconn;

typedef struct config {
    struct sockaddr_in addr;
    int conns, txns_per_conn, threads, ncpus, cpus[MAX_THREADS];
    size_t size;
    lg_proto proto;
    double duration, warmup;
    int timeout_ms;
    pid_t server_pid;
    int nxcpus, xcpus[MAX_THREADS]; /* -X: the server's CPUs, for whole-core busy time */
} config;

typedef struct lthread {
    pthread_t tid;
    int idx, cpu, nconns;
    const struct config *cfg;
    struct io_uring ring;
    int drain; /* run all pending task work each loop (LG_DRAIN=0: the old, capped way) */
    lconn *c;
    char *sbuf, *rbuf;
    size_t rbuf_len;
    uint64_t rng;
    _Atomic uint64_t txns, proto_errors, errors, conn_errors, timeouts, connects;
    hist lat;
    int failed, ring_ok;
} __attribute__((aligned(64))) lthread;

static atomic_int g_measure, g_stop;

static inline uint64_t ud_of(int i, uint32_t gen, enum op op) {
    return (uint64_t)op << 56 | (uint64_t)(gen & 0xffffff) << 32 | (uint32_t)i;
}

static struct io_uring_sqe *sqe_get(lthread *t) {
    struct io_uring_sqe *s = io_uring_get_sqe(&t->ring);
    while (!s) {
        io_uring_submit(&t->ring);
        s = io_uring_get_sqe(&t->ring);
    }
    return s;
}

static void conn_start(lthread *t, int i);

static void post_send(lthread *t, int i) {
    lconn *c = &t->c[i];
    struct io_uring_sqe *s = sqe_get(t);
    io_uring_prep_send(s, c->fd, c->req + c->sent, c->req_len - c->sent, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(s, ud_of(i, c->gen, OP_SEND));
    c->op = OP_SEND;
    c->t_op = now_ns();
}

static void post_recv(lthread *t, int i) {
    lconn *c = &t->c[i];
    struct io_uring_sqe *s = sqe_get(t);
    char *buf;
    size_t len;
    lgp_recv_target(&t->cfg->proto, &c->p, t->rbuf, t->rbuf_len, &buf, &len);
    io_uring_prep_recv(s, c->fd, buf, len, 0);
    io_uring_sqe_set_data64(s, ud_of(i, c->gen, OP_RECV));
    c->op = OP_RECV;
    c->t_op = now_ns();
}

static void begin_txn(lthread *t, int i) {
    lconn *c = &t->c[i];
    c->sent = 0;
    lgp_build(&t->cfg->proto, &c->p, t->sbuf, &t->rng, &c->req, &c->req_len);
    c->t_send = now_ns();
    post_send(t, i);
}

/* Close (RST) and open a replacement connection. */
static void conn_restart(lthread *t, int i) {
    lconn *c = &t->c[i];
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->op = OP_NONE;
    conn_start(t, i);
}

static void conn_start(lthread *t, int i) {
    lconn *c = &t->c[i];
    c->gen++;
    c->done = 0;
    c->ntx = lgp_txns_for_conn(&t->cfg->proto, (unsigned)t->cfg->txns_per_conn, &t->rng);
    c->timed_out = 0;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        atomic_fetch_add_explicit(&t->conn_errors, 1, memory_order_relaxed);
        c->op = OP_NONE; /* retried by the timeout scan */
        c->t_op = now_ns();
        return;
    }
    struct linger lg = {.l_onoff = 1, .l_linger = 0}; /* close() sends RST, no TIME_WAIT */
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    struct io_uring_sqe *s = sqe_get(t);
    io_uring_prep_connect(s, c->fd, (const struct sockaddr *)&t->cfg->addr, sizeof t->cfg->addr);
    io_uring_sqe_set_data64(s, ud_of(i, c->gen, OP_CONNECT));
    c->op = OP_CONNECT;
    c->t_op = now_ns();
}

static void on_error(lthread *t, int i, int is_connect) {
    lconn *c = &t->c[i];
    if (c->timed_out) atomic_fetch_add_explicit(&t->timeouts, 1, memory_order_relaxed);
    else if (is_connect) atomic_fetch_add_explicit(&t->conn_errors, 1, memory_order_relaxed);
    else atomic_fetch_add_explicit(&t->errors, 1, memory_order_relaxed);
    conn_restart(t, i);
}

static void on_cqe(lthread *t, uint64_t ud, int res) {
    enum op op = (enum op)(ud >> 56);
    int i = (int)(uint32_t)ud;
    if (op == OP_CANCEL || op == OP_NONE || i >= t->nconns) return;
    lconn *c = &t->c[i];
    if (((ud >> 32) & 0xffffff) != (c->gen & 0xffffff) || c->op != op) return; /* stale */
    c->op = OP_NONE;
    int k;
    switch (op) {
    case OP_CONNECT:
        if (res < 0) return on_error(t, i, 1);
        atomic_fetch_add_explicit(&t->connects, 1, memory_order_relaxed);
        begin_txn(t, i);
        break;
    case OP_SEND:
        if (res <= 0) return on_error(t, i, 0);
        c->sent += (size_t)res;
        if (c->sent < c->req_len) post_send(t, i);
        else post_recv(t, i);
        break;
    case OP_RECV:
        if (res <= 0) return on_error(t, i, 0);
        k = lgp_input(&t->cfg->proto, &c->p, (size_t)res);
        if (k < 0) return on_error(t, i, 0);
        if (k == 0) {
            post_recv(t, i);
            break;
        }
        if (c->p.bad) atomic_fetch_add_explicit(&t->proto_errors, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&t->txns, 1, memory_order_relaxed);
        if (atomic_load_explicit(&g_measure, memory_order_relaxed)) {
            hist_add(&t->lat, now_ns() - c->t_send);
            c->mdone++;
        }
        c->done++;
        if (c->ntx > 0 && c->done >= c->ntx)
            conn_restart(t, i);
        else
            begin_txn(t, i);
        break;
    default:
        break;
    }
}

/* Cancel operations stuck longer than the timeout; retry connections that could not start. */
static void timeout_scan(lthread *t) {
    uint64_t now = now_ns(), limit = (uint64_t)t->cfg->timeout_ms * 1000000u;
    for (int i = 0; i < t->nconns; i++) {
        lconn *c = &t->c[i];
        if (now - c->t_op < limit) continue;
        if (c->op == OP_NONE && c->fd < 0) {
            conn_start(t, i);
        } else if (c->op != OP_NONE && !c->timed_out) {
            c->timed_out = 1;
            struct io_uring_sqe *s = sqe_get(t);
            io_uring_prep_cancel64(s, ud_of(i, c->gen, c->op), 0);
            io_uring_sqe_set_data64(s, ud_of(i, 0, OP_CANCEL));
        } else if (c->op != OP_NONE && now - c->t_op >= 2 * limit) {
            /* cancel did not take: give up on this socket */
            atomic_fetch_add_explicit(&t->timeouts, 1, memory_order_relaxed);
            shutdown(c->fd, SHUT_RDWR);
            c->t_op = now;
        }
    }
}

static int ring_setup(lthread *t) {
    unsigned entries = 64;
    while (entries < (unsigned)t->nconns * 2 + 16 && entries < 32768) entries *= 2;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_CQSIZE |
              IORING_SETUP_SUBMIT_ALL | IORING_SETUP_TASKRUN_FLAG;
    p.cq_entries = entries * 4;
    int r = io_uring_queue_init_params(entries, &t->ring, &p);
    if (r == -EINVAL) { /* without the flag: no draining (the flag says when to) */
        p.flags &= ~(unsigned)IORING_SETUP_TASKRUN_FLAG;
        t->drain = 0;
        r = io_uring_queue_init_params(entries, &t->ring, &p);
    }
    if (r == -EINVAL) {
        memset(&p, 0, sizeof p);
        p.flags = IORING_SETUP_CQSIZE;
        p.cq_entries = entries * 4;
        r = io_uring_queue_init_params(entries, &t->ring, &p);
    }
    if (r < 0) {
        fprintf(stderr, "loadgen: io_uring_queue_init: %s\n", strerror(-r));
        return -1;
    }
    if (!(p.flags & IORING_SETUP_DEFER_TASKRUN)) t->drain = 0;
    t->ring_ok = 1;
    return 0;
}

static void *run(void *arg) {
    lthread *t = arg;
    pin_self(t->cpu);
    t->drain = !(getenv("LG_DRAIN") && !atoi(getenv("LG_DRAIN")));
    if (ring_setup(t) < 0) {
        t->failed = 1;
        return NULL;
    }
    for (int i = 0; i < t->nconns; i++) {
        t->c[i].fd = -1;
        conn_start(t, i);
    }
    uint64_t last_scan = now_ns();
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        struct io_uring_cqe *cqe;
        struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = 100 * 1000 * 1000};
        int r = 0;
        if (t->drain && (IO_URING_READ_ONCE(*t->ring.sq.kflags) & IORING_SQ_TASKRUN)) {
            /* Task work is pending: run all of it, do not block.  A GETEVENTS enter runs at
             * most max(20, min_complete) deferred completions (Linux 6.13+) while sends and
             * receives whose data is there complete inline: with hundreds of connections the
             * generator served those again and again and left the others' responses waiting
             * for several rounds, which showed as the servers' p99.9 (docs/benchmarks.md,
             * "1,024 connections: why MegaPipe's tail lost there"). */
            struct __kernel_timespec z = {0, 0};
            struct io_uring_getevents_arg arg = {.ts = (uint64_t)(uintptr_t)&z};
            struct io_uring_sq *sq = &t->ring.sq;
            if (sq->sqe_head != sq->sqe_tail) {
                sq->sqe_head = sq->sqe_tail;
                io_uring_smp_store_release(sq->ktail, sq->sqe_tail);
            }
            unsigned n = sq->sqe_tail - io_uring_smp_load_acquire(sq->khead);
            r = io_uring_enter2((unsigned)t->ring.ring_fd, n, t->ring.cq.ring_entries,
                                IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, (sigset_t *)&arg,
                                sizeof arg);
            if (r == -ETIME) r = 0;
        }
        if (!t->drain || !io_uring_cq_ready(&t->ring))
            r = io_uring_submit_and_wait_timeout(&t->ring, &cqe, 1, &ts, NULL);
        if (r < 0 && r != -ETIME && r != -EINTR && r != -EBUSY) {
            fprintf(stderr, "loadgen: io_uring_submit_and_wait_timeout: %s\n", strerror(-r));
            t->failed = 1;
            break;
        }
        unsigned head, n = 0;
        io_uring_for_each_cqe(&t->ring, head, cqe) {
            on_cqe(t, cqe->user_data, cqe->res);
            n++;
        }
        io_uring_cq_advance(&t->ring, n);
        uint64_t now = now_ns();
        if (now - last_scan > 50 * 1000000u) {
            last_scan = now;
            timeout_scan(t);
        }
    }
    return NULL;
}

static void on_signal(int sig) {
    (void)sig;
    atomic_store(&g_stop, 1);
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: loadgen -p PORT [-a ADDR] [-m rpc|memcached|http] [-c conns] [-n txns-per-conn]\n"
            "               [-s bytes] [-t threads] [-C cpulist] [-d seconds] [-w warmup]\n"
            "               [-T timeout-ms] [-S server-pid] [-X cpus] [-K keys] [-V value-bytes] [-G get-%%]\n"
            "               [-f filelist] [-Z mean] [-h|--help]\n"
            "  -c concurrent connections (default 256); -n transactions per connection\n"
            "     (default 1; 0 = persistent); -s rpc request = response size (default 64)\n"
            "  -t threads (default: one per CPU of -C, or 1); -C CPUs to pin to (e.g. 1)\n"
            "  -d measured seconds (default 5) after -w warmup seconds (default 1)\n"
            "  -T per-operation timeout in ms (default 2000)\n"
            "  -S PID: report the server's CPU time per transaction (/proc/PID/task/*/schedstat)\n"
            "  -X CPUS: also report those CPUs' busy time per transaction (/proc/stat)\n"
            "  memcached: -K key space (default 10000; keys are 64 B), -V set value size\n"
            "     (default 1024), -G %% of gets (default 90)\n"
            "  http: -f file list (lines: PATH [WEIGHT]; default: GET /), -Z MEAN: requests per\n"
            "     connection Zipf-like with this mean instead of -n\n"
            "  -h, --help  this text\n");
}

static double rusage_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static uint64_t sum_field(lthread *ts, int n, size_t off) {
    uint64_t s = 0;
    for (int i = 0; i < n; i++)
        s += atomic_load_explicit((_Atomic uint64_t *)((char *)&ts[i] + off), memory_order_relaxed);
    return s;
}
#define SUM(ts, n, f) sum_field(ts, n, offsetof(lthread, f))

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void sleep_s(double s) {
    uint64_t end = now_ns() + (uint64_t)(s * 1e9);
    while (!atomic_load(&g_stop)) {
        uint64_t now = now_ns();
        if (now >= end) break;
        uint64_t left = end - now;
        usleep((useconds_t)(left > 50000000u ? 50000 : left / 1000 + 1));
    }
}

int main(int argc, char **argv) {
    static config cfg;
    cfg.addr.sin_family = AF_INET;
    cfg.addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cfg.conns = 256;
    cfg.txns_per_conn = 1;
    cfg.size = 64;
    cfg.proto.keys = 10000;
    cfg.proto.value_size = 1024;
    cfg.proto.get_pct = 90;
    const char *filelist = NULL;
    cfg.duration = 5;
    cfg.warmup = 1;
    cfg.timeout_ms = 2000;
    int port = -1, opt;
    const char *cpulist = NULL;
    static const struct option longopts[] = {{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    while ((opt = getopt_long(argc, argv, "p:a:m:c:n:s:t:C:d:w:T:S:X:K:V:G:f:Z:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'a':
            if (inet_pton(AF_INET, optarg, &cfg.addr.sin_addr) != 1) {
                fprintf(stderr, "loadgen: bad address %s\n", optarg);
                return 2;
            }
            break;
        case 'm':
            if (!strcmp(optarg, "rpc")) cfg.proto.mode = LG_RPC;
            else if (!strcmp(optarg, "memcached")) cfg.proto.mode = LG_MEMCACHED;
            else if (!strcmp(optarg, "http")) cfg.proto.mode = LG_HTTP;
            else { usage(stderr); return 2; }
            break;
        case 'K': cfg.proto.keys = (unsigned)atol(optarg); break;
        case 'V': cfg.proto.value_size = (size_t)atol(optarg); break;
        case 'G': cfg.proto.get_pct = (unsigned)atoi(optarg); break;
        case 'f': filelist = optarg; break;
        case 'Z': cfg.proto.zipf_mean = atof(optarg); break;
        case 'c': cfg.conns = atoi(optarg); break;
        case 'n': cfg.txns_per_conn = atoi(optarg); break;
        case 's': cfg.size = (size_t)atol(optarg); break;
        case 't': cfg.threads = atoi(optarg); break;
        case 'C': cpulist = optarg; break;
        case 'd': cfg.duration = atof(optarg); break;
        case 'w': cfg.warmup = atof(optarg); break;
        case 'T': cfg.timeout_ms = atoi(optarg); break;
        case 'S': cfg.server_pid = (pid_t)atoi(optarg); break;
        case 'X':
            cfg.nxcpus = parse_cpu_list(optarg, cfg.xcpus, MAX_THREADS);
            if (cfg.nxcpus <= 0) {
                fprintf(stderr, "loadgen: bad cpu list '%s'\n", optarg);
                return 2;
            }
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (port <= 0 || port > 65535 || cfg.conns < 1 || cfg.size < 1 || cfg.size > (16u << 20) ||
        cfg.duration <= 0 || cfg.warmup < 0 || cfg.timeout_ms < 1 || cfg.txns_per_conn < 0) {
        usage(stderr);
        return 2;
    }
    cfg.addr.sin_port = htons((uint16_t)port);
    cfg.proto.size = cfg.size;
    if (lgp_init(&cfg.proto, filelist) < 0) return 2;
    static const char *const mode_names[] = {"rpc", "memcached", "http"};
    const char *mode = mode_names[cfg.proto.mode];
    if (cpulist) {
        cfg.ncpus = parse_cpu_list(cpulist, cfg.cpus, MAX_THREADS);
        if (cfg.ncpus <= 0) {
            fprintf(stderr, "loadgen: bad cpu list '%s'\n", cpulist);
            return 2;
        }
        if (cfg.threads <= 0) cfg.threads = cfg.ncpus;
    } else {
        cfg.ncpus = 0;
        if (cfg.threads <= 0) cfg.threads = 1;
    }
    if (cfg.threads > MAX_THREADS) cfg.threads = MAX_THREADS;
    if (cfg.threads > cfg.conns) cfg.threads = cfg.conns;
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sact = {.sa_handler = on_signal};
    sigaction(SIGINT, &sact, NULL);
    sigaction(SIGTERM, &sact, NULL);

    lthread *ts = aligned_alloc(64, sizeof(lthread) * (size_t)cfg.threads);
    if (!ts) return 1;
    memset(ts, 0, sizeof(lthread) * (size_t)cfg.threads);
    int started = 0;
    for (int i = 0; i < cfg.threads; i++) {
        lthread *t = &ts[i];
        t->idx = i;
        t->cfg = &cfg;
        t->cpu = cfg.ncpus ? cfg.cpus[i % cfg.ncpus] : -1;
        t->nconns = cfg.conns / cfg.threads + (i < cfg.conns % cfg.threads);
        t->c = calloc((size_t)t->nconns, sizeof *t->c);
        t->sbuf = malloc(cfg.size);
        t->rbuf_len = cfg.proto.mode == LG_RPC ? cfg.size : 65536;
        t->rbuf = malloc(t->rbuf_len);
        t->rng = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1) ^ now_ns();
        if (!t->c || !t->sbuf || !t->rbuf) return 1;
        memset(t->sbuf, 'x', cfg.size);
    }
    /* SINGLE_ISSUER rings belong to the thread that creates them: each thread sets up its
     * own ring and connections inside run(). */
    for (int i = 0; i < cfg.threads; i++) {
        if (pthread_create(&ts[i].tid, NULL, run, &ts[i]) != 0) {
            atomic_store(&g_stop, 1);
            break;
        }
        started++;
    }

    sleep_s(cfg.warmup);
    uint64_t t0 = now_ns();
    uint64_t tx0 = SUM(ts, started, txns), er0 = SUM(ts, started, errors),
             pe0 = SUM(ts, started, proto_errors),
             ce0 = SUM(ts, started, conn_errors), to0 = SUM(ts, started, timeouts),
             cn0 = SUM(ts, started, connects);
    double cpu0 = rusage_s();
    int64_t srv0 = cfg.server_pid ? proc_cpu_ns(cfg.server_pid) : -1, si0 = 0, si1 = 0;
    int64_t core0 = cfg.nxcpus ? cpus_busy_ns(cfg.xcpus, cfg.nxcpus, &si0) : -1;
    static int allcpus[CPU_SETSIZE];
    int nall = online_cpus(allcpus, CPU_SETSIZE);
    int64_t all0 = cpus_busy_ns(allcpus, nall, NULL);
    atomic_store(&g_measure, 1);
    sleep_s(cfg.duration);
    atomic_store(&g_measure, 0);
    uint64_t t1 = now_ns();
    int64_t srv1 = cfg.server_pid ? proc_cpu_ns(cfg.server_pid) : -1;
    int64_t core1 = cfg.nxcpus ? cpus_busy_ns(cfg.xcpus, cfg.nxcpus, &si1) : -1;
    int64_t all1 = cpus_busy_ns(allcpus, nall, NULL);
    double cpu1 = rusage_s();
    uint64_t tx = SUM(ts, started, txns) - tx0, er = SUM(ts, started, errors) - er0,
             pe = SUM(ts, started, proto_errors) - pe0,
             ce = SUM(ts, started, conn_errors) - ce0, to = SUM(ts, started, timeouts) - to0,
             cn = SUM(ts, started, connects) - cn0;
    int interrupted = atomic_load(&g_stop);
    atomic_store(&g_stop, 1);

    /* Threads look at g_stop at least every 100 ms; do not wait for ever. */
    int hung = 0, failed = 0;
    for (int i = 0; i < started; i++) {
        struct timespec dl;
        clock_gettime(CLOCK_REALTIME, &dl);
        dl.tv_sec += 5;
        if (pthread_timedjoin_np(ts[i].tid, NULL, &dl) != 0) hung = 1;
        failed |= ts[i].failed;
    }
    if (hung) {
        fprintf(stderr, "loadgen: a thread did not stop; exiting\n");
        _exit(1);
    }
    hist lat;
    memset(&lat, 0, sizeof lat);
    for (int i = 0; i < started; i++) {
        hist_merge(&lat, &ts[i].lat);
        if (ts[i].ring_ok) io_uring_queue_exit(&ts[i].ring); /* cancels what is in flight */
        for (int k = 0; k < ts[i].nconns; k++)
            if (ts[i].c[k].fd >= 0) close(ts[i].c[k].fd);
    }

    /* Fairness: transactions per connection slot in the measured interval. */
    uint64_t *per = malloc(sizeof *per * (size_t)cfg.conns);
    int nper = 0;
    for (int i = 0; per && i < started; i++)
        for (int k = 0; k < ts[i].nconns; k++) per[nper++] = ts[i].c[k].mdone;
    uint64_t pc_min = 0, pc_p1 = 0, pc_med = 0, pc_p99 = 0, pc_max = 0;
    double pc_zero = 0;
    if (per && nper) {
        qsort(per, (size_t)nper, sizeof *per, cmp_u64);
        pc_min = per[0];
        pc_p1 = per[nper / 100];
        pc_med = per[nper / 2];
        pc_p99 = per[nper - 1 - nper / 100];
        pc_max = per[nper - 1];
        int z = 0;
        for (int i = 0; i < nper; i++) z += per[i] == 0;
        pc_zero = (double)z / nper;
    }
    free(per);

    double secs = (double)(t1 - t0) / 1e9, lg_cpu = cpu1 - cpu0;
    double tps = secs > 0 ? (double)tx / secs : 0;
    double srv_cpu = (srv0 >= 0 && srv1 >= 0) ? (double)(srv1 - srv0) / 1e9 : -1;
    double core_cpu = (core0 >= 0 && core1 >= 0) ? (double)(core1 - core0) / 1e9 : -1;
    double core_si = (double)(si1 - si0) / 1e9;
    /* CPU time of everything else on the machine (other processes, softirq outside tasks):
     * a measure of how much a shared machine disturbed this run. */
    double others = (double)(all1 - all0) / 1e9 - lg_cpu - (srv_cpu > 0 ? srv_cpu : 0);
    if (others < 0) others = 0;
    double p50 = (double)hist_quantile(&lat, 0.50) / 1e3, p99 = (double)hist_quantile(&lat, 0.99) / 1e3,
           p999 = (double)hist_quantile(&lat, 0.999) / 1e3;
    printf("loadgen: %s, %d conns, %d txn/conn, %zu B, %d threads, %.2f s measured%s\n", mode,
           cfg.conns, cfg.txns_per_conn, cfg.size, started, secs, interrupted ? " (interrupted)" : "");
    printf("  throughput %.0f txn/s (%llu txns, %llu new connections)\n", tps,
           (unsigned long long)tx, (unsigned long long)cn);
    printf("  latency p50 %.1f us  p99 %.1f us  p99.9 %.1f us\n", p50, p99, p999);
    printf("  per-connection txns: min %llu  p1 %llu  median %llu  p99 %llu  max %llu  zero %.3f\n",
           (unsigned long long)pc_min, (unsigned long long)pc_p1, (unsigned long long)pc_med,
           (unsigned long long)pc_p99, (unsigned long long)pc_max, pc_zero);
    printf("  errors %llu  connect errors %llu  timeouts %llu  error responses %llu\n",
           (unsigned long long)er, (unsigned long long)ce, (unsigned long long)to,
           (unsigned long long)pe);
    printf("  loadgen CPU %.3f s (%.0f%% of %d threads)\n", lg_cpu,
           secs > 0 ? 100.0 * lg_cpu / (secs * started) : 0, started);
    if (srv_cpu >= 0)
        printf("  server CPU %.3f s = %.2f us/txn (pid %d, all threads)\n", srv_cpu,
               tx ? srv_cpu * 1e6 / (double)tx : 0, (int)cfg.server_pid);
    else if (cfg.server_pid)
        printf("  server CPU: pid %d not readable\n", (int)cfg.server_pid);
    printf("  everything else on the machine: %.2f CPUs (other processes, softirq outside tasks)\n",
           secs > 0 ? others / secs : 0);
    if (core_cpu >= 0)
        printf("  server cores busy %.3f s = %.2f us/txn (softirq %.2f us/txn; /proc/stat, any task)\n",
               core_cpu, tx ? core_cpu * 1e6 / (double)tx : 0, tx ? core_si * 1e6 / (double)tx : 0);
    printf("result mode=%s conns=%d txn_per_conn=%d zipf_mean=%.2f size=%zu threads=%d seconds=%.3f txns=%llu "
           "tps=%.1f p50_us=%.2f p99_us=%.2f p999_us=%.2f errors=%llu connect_errors=%llu "
           "timeouts=%llu proto_errors=%llu connects=%llu lg_cpu_s=%.4f lg_util=%.3f lg_cpu_us_per_txn=%.3f "
           "server_cpu_s=%.4f server_cpu_us_per_txn=%.3f core_busy_s=%.4f core_us_per_txn=%.3f "
           "core_softirq_us_per_txn=%.3f others_cpus=%.3f pc_min=%llu pc_p1=%llu pc_med=%llu "
           "pc_p99=%llu pc_max=%llu pc_zero=%.4f\n",
           mode, cfg.conns, cfg.txns_per_conn, cfg.proto.zipf_mean, cfg.size, started, secs, (unsigned long long)tx,
           tps, p50, p99, p999, (unsigned long long)er, (unsigned long long)ce,
           (unsigned long long)to, (unsigned long long)pe, (unsigned long long)cn, lg_cpu, secs > 0 ? lg_cpu / (secs * started) : 0,
           tx ? lg_cpu * 1e6 / (double)tx : 0, srv_cpu,
           (tx && srv_cpu >= 0) ? srv_cpu * 1e6 / (double)tx : -1, core_cpu,
           (tx && core_cpu >= 0) ? core_cpu * 1e6 / (double)tx : -1,
           (tx && core_cpu >= 0) ? core_si * 1e6 / (double)tx : -1, secs > 0 ? others / secs : 0,
           (unsigned long long)pc_min, (unsigned long long)pc_p1, (unsigned long long)pc_med,
           (unsigned long long)pc_p99, (unsigned long long)pc_max, pc_zero);
    fflush(stdout);
    for (int i = 0; i < started; i++) {
        free(ts[i].c);
        free(ts[i].sbuf);
        free(ts[i].rbuf);
    }
    free(ts);
    return (tx > 0 && !failed) ? 0 : 1;
}
