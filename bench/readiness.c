/*
 * readiness.c — what serving readiness costs: server CPU per readiness event with N watched
 * fds of which a tenth are active, for the readiness set's two io_uring forms and for plain
 * epoll as the reference.
 *
 *   readiness -m poll|epoll|ering|raw -n N [-s SECS] [-w WARMUP] [-S CPU] [-C CPU]
 *
 *   poll   a channel with MP_READINESS=poll (one poll request per watched fd)
 *   epoll  a channel with MP_READINESS=epoll (a kernel epoll set changed through
 *          IORING_OP_EPOLL_CTL; with only watches on the channel, waited on with epoll_wait)
 *   ering  MP_READINESS=epoll-ring: the same set, every wait an IORING_OP_EPOLL_WAIT
 *   raw    epoll_ctl + epoll_wait, no library
 *
 * Watched fds: N/10 (at least 1) active AF_UNIX stream pairs, the rest idle UDP sockets watched
 * for EPOLLIN (never readable).  A client thread (CPU -C, default 1) writes one byte to every
 * active pair, then reads every answer, round after round; the server thread (CPU -S, default
 * 0) answers each readiness event with read() + write() of one byte.  Level-triggered watches,
 * so every event is one the server must look at.  Prints one line:
 *   result mode=.. n=.. active=.. secs=.. events=.. cpu_us_per_ev=.. core_us_per_ev=..
 *          engine_syscalls_per_ev=.. watch_ops_per_ev=..
 * cpu_us_per_ev: the server thread's CPU time (user+sys) per event; core_us_per_ev: the server
 * CPU's busy time (user, system, irq and softirq from /proc/stat) per event.
 */
#define _GNU_SOURCE 1
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <megapipe.h>

static int n_watched = 10, n_active;
static int *srv, *cli; /* server ends (watched), client ends of the active pairs */
static double secs = 3, warmup = 1;
static int srv_cpu = 0, cli_cpu = 1;
static atomic_int phase;       /* 0 warm-up, 1 measuring, 2 window over */
static atomic_int client_done; /* the client stopped: the server may stop too */

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s) < 0) die("sched_setaffinity");
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Busy jiffies of one CPU (user nice system irq softirq steal) from /proc/stat. */
static unsigned long long core_busy(int cpu) {
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return 0;
    char line[512], want[16];
    snprintf(want, sizeof want, "cpu%d ", cpu);
    unsigned long long u = 0, ni = 0, sy = 0, id = 0, io = 0, irq = 0, si = 0, st = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, want, strlen(want))) {
            sscanf(line + strlen(want), "%llu %llu %llu %llu %llu %llu %llu %llu", &u, &ni, &sy,
                   &id, &io, &irq, &si, &st);
            break;
        }
    fclose(f);
    return u + ni + sy + irq + si + st;
}

static void *client(void *arg) {
    (void)arg;
    pin(cli_cpu);
    char b = 'x';
    while (atomic_load(&phase) < 2) {
        for (int i = 0; i < n_active; i++)
            if (write(cli[i], &b, 1) != 1) die("client write");
        for (int i = 0; i < n_active; i++)
            if (read(cli[i], &b, 1) != 1) die("client read");
    }
    return NULL;
}

/* Answer one readiness event of watched fd. */
static inline int serve(int fd) {
    char b[16];
    ssize_t r = read(fd, b, sizeof b);
    if (r <= 0) return 0;
    for (ssize_t i = 0; i < r; i++)
        if (write(fd, "y", 1) != 1) die("server write");
    return 1;
}

struct counters {
    uint64_t events, syscalls, watch_ops;
};

/* Where the server is in the measured window, looked at after each wait: events count only
 * inside it; the counters are taken at its two ends. */
enum { W_BEFORE, W_START, W_IN, W_END, W_AFTER };
static int window_step(int *state) {
    int ph = atomic_load(&phase);
    if (*state == W_BEFORE && ph >= 1) return *state = W_START;
    if ((*state == W_START || *state == W_IN) && ph == 2) return *state = W_END;
    if (*state == W_START) return *state = W_IN;
    if (*state == W_END) return *state = W_AFTER;
    return *state;
}

static void run_mp(int readiness, struct counters *c) {
    mp_options o;
    mp_options_init(&o);
    o.engine = MP_ENGINE_URING;
    o.readiness = readiness;
    o.lwsocket = 0;
    o.max_lwsockets = 1;
    mp_channel *ch = mp_create(&o);
    if (!ch) die("mp_create");
    for (int i = 0; i < n_watched; i++) {
        int r = mp_watch(ch, srv[i], EPOLLIN, 0, NULL);
        if (r < 0) {
            errno = -r;
            die("mp_watch");
        }
    }
    mp_event evs[256];
    mp_stats s0 = {0}, s1 = {0};
    int w = W_BEFORE;
    while (!atomic_load(&client_done)) {
        int n = mp_dispatch_batch(ch, evs, 256, 100);
        if (n < 0 && n != -EINTR) {
            errno = -n;
            die("mp_dispatch");
        }
        int step = window_step(&w);
        if (step == W_START) mp_get_stats(ch, &s0);
        if (step == W_END) mp_get_stats(ch, &s1);
        uint64_t k = 0;
        for (int i = 0; i < n; i++)
            if (evs[i].cmd == MP_EV_POLL) k += (uint64_t)serve(evs[i].u.poll.fd);
        if (step == W_START || step == W_IN) c->events += k;
    }
    c->syscalls = s1.syscalls - s0.syscalls;
    c->watch_ops = s1.watch_ops - s0.watch_ops;
    if (strcmp(s1.readiness, readiness == MP_READINESS_POLL ? "poll" : "epoll")) {
        fprintf(stderr, "readiness: asked for %s, channel uses %s\n",
                readiness == MP_READINESS_POLL ? "poll" : "epoll", s1.readiness);
        exit(1);
    }
    mp_destroy(ch);
}

static void run_raw(struct counters *c) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < n_watched; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = srv[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, srv[i], &ev) < 0) die("epoll_ctl");
    }
    struct epoll_event evs[256];
    int w = W_BEFORE;
    while (!atomic_load(&client_done)) {
        int n = epoll_wait(ep, evs, 256, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        int step = window_step(&w);
        uint64_t k = 0;
        for (int i = 0; i < n; i++) k += (uint64_t)serve(evs[i].data.fd);
        if (step == W_START || step == W_IN) {
            c->events += k;
            c->syscalls++;
        }
    }
    close(ep);
}

struct srv_arg {
    const char *mode;
    struct counters c;
};

static void *server(void *arg) {
    struct srv_arg *a = arg;
    pin(srv_cpu);
    /* The main thread takes this thread's CPU time around the measured window (a clock id). */
    if (!strcmp(a->mode, "raw")) run_raw(&a->c);
    else run_mp(!strcmp(a->mode, "poll")    ? MP_READINESS_POLL
                : !strcmp(a->mode, "ering") ? MP_READINESS_EPOLL_RING
                                            : MP_READINESS_EPOLL,
                &a->c);
    return NULL;
}

int main(int argc, char **argv) {
    const char *mode = "epoll";
    int opt;
    while ((opt = getopt(argc, argv, "m:n:s:w:S:C:h")) != -1) {
        switch (opt) {
        case 'm': mode = optarg; break;
        case 'n': n_watched = atoi(optarg); break;
        case 's': secs = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'S': srv_cpu = atoi(optarg); break;
        case 'C': cli_cpu = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: %s -m poll|epoll|ering|raw -n N [-s SECS] [-w WARMUP] [-S CPU] "
                            "[-C CPU]\n", argv[0]);
            return opt == 'h' ? 0 : 2;
        }
    }
    if (strcmp(mode, "poll") && strcmp(mode, "epoll") && strcmp(mode, "ering") &&
        strcmp(mode, "raw")) {
        fprintf(stderr, "readiness: unknown mode %s\n", mode);
        return 2;
    }
    if (n_watched < 1 || secs <= 0) {
        fprintf(stderr, "readiness: bad -n or -s\n");
        return 2;
    }
    n_active = n_watched / 10 ? n_watched / 10 : 1;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    srv = calloc((size_t)n_watched, sizeof *srv);
    cli = calloc((size_t)n_active, sizeof *cli);
    if (!srv || !cli) die("calloc");
    /* Active pairs spread over the watched set (every tenth), idle UDP sockets between. */
    int a = 0;
    for (int i = 0; i < n_watched; i++) {
        if (a < n_active && i % 10 == 0) {
            int sv[2];
            if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
            srv[i] = sv[0];
            cli[a++] = sv[1];
        } else {
            srv[i] = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
            if (srv[i] < 0) die("socket");
        }
    }

    struct srv_arg sa = {.mode = mode};
    pthread_t st, ct;
    pthread_create(&st, NULL, server, &sa);
    clockid_t scpu;
    pthread_getcpuclockid(st, &scpu);
    pthread_create(&ct, NULL, client, NULL);
    struct timespec ws = {(time_t)warmup, (long)((warmup - (time_t)warmup) * 1e9)};
    nanosleep(&ws, NULL);
    struct timespec c0, c1;
    clock_gettime(scpu, &c0);
    unsigned long long b0 = core_busy(srv_cpu);
    double t0 = now();
    atomic_store(&phase, 1);
    struct timespec ms = {(time_t)secs, (long)((secs - (time_t)secs) * 1e9)};
    nanosleep(&ms, NULL);
    clock_gettime(scpu, &c1);
    unsigned long long b1 = core_busy(srv_cpu);
    double t1 = now();
    atomic_store(&phase, 2); /* the server counts until it sees this (within one dispatch) */
    pthread_join(ct, NULL);   /* its last round is answered by the server */
    atomic_store(&client_done, 1);
    pthread_join(st, NULL);
    uint64_t events = sa.c.events;
    double cpu = (c1.tv_sec - c0.tv_sec) + (c1.tv_nsec - c0.tv_nsec) / 1e9;
    double core = (double)(b1 - b0) / (double)sysconf(_SC_CLK_TCK);
    if (!events) {
        fprintf(stderr, "readiness: no events served\n");
        return 1;
    }
    printf("result mode=%s n=%d active=%d secs=%.3f events=%llu ev_per_s=%.0f cpu_us_per_ev=%.4f "
           "core_us_per_ev=%.4f engine_syscalls_per_ev=%.4f watch_ops_per_ev=%.4f\n",
           mode, n_watched, n_active, t1 - t0, (unsigned long long)events, events / (t1 - t0),
           cpu * 1e6 / events, core * 1e6 / events, (double)sa.c.syscalls / events,
           (double)sa.c.watch_ops / events);
    return 0;
}
