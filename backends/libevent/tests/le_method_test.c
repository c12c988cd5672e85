/*
 * le_method_test.c — checks of libevent's `megapipe` method beyond libevent's own regress:
 * which method a base gets (argv[1]: the expected name, "megapipe" by default or "epoll" with
 * EVENT_NOMEGAPIPE=1), level-triggered re-reporting, edge-triggered, EV_CLOSED, close + fd
 * reuse between event_del and event_add, dispatch moving to another thread, fork + reinit.
 * With "--no-uring" first, io_uring_setup is refused by a seccomp filter (as in containers that
 * block it): the method must decline and libevent fall back to epoll.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/filter.h>
#include <linux/io_uring.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/event.h>
#include <event2/thread.h>

static int failures;
#define CHECK(c)                                                                           \
    do {                                                                                   \
        if (!(c)) {                                                                        \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #c);          \
            failures++;                                                                    \
        }                                                                                  \
    } while (0)

static void pair(int sv[2]) {
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) < 0) {
        perror("socketpair");
        exit(2);
    }
}

static int count;
static short last_what;
static void count_cb(evutil_socket_t fd, short what, void *arg) {
    (void)fd;
    (void)arg;
    count++;
    last_what = what;
}

static void run_once(struct event_base *b) {
    struct timeval tv = {0, 50 * 1000};
    event_base_loopexit(b, &tv);
    event_base_dispatch(b);
}

/* Level-triggered: unread data is reported at every loop; read data is not. */
static void test_level(struct event_base *b) {
    int sv[2];
    pair(sv);
    struct event *ev = event_new(b, sv[0], EV_READ | EV_PERSIST, count_cb, NULL);
    event_add(ev, NULL);
    count = 0;
    run_once(b);
    CHECK(count == 0);
    CHECK(write(sv[1], "x", 1) == 1);
    event_base_loop(b, EVLOOP_ONCE);
    CHECK(count == 1);
    event_base_loop(b, EVLOOP_ONCE);
    CHECK(count == 2); /* still unread: reported again */
    char c;
    CHECK(read(sv[0], &c, 1) == 1);
    int before = count;
    run_once(b);
    CHECK(count == before); /* drained: not reported (no stale readiness) */
    event_free(ev);
    close(sv[0]);
    close(sv[1]);
}

/* Edge-triggered: one report per arrival. */
static void test_edge(struct event_base *b) {
    int sv[2];
    pair(sv);
    struct event *ev = event_new(b, sv[0], EV_READ | EV_PERSIST | EV_ET, count_cb, NULL);
    event_add(ev, NULL);
    count = 0;
    CHECK(write(sv[1], "x", 1) == 1);
    run_once(b);
    CHECK(count == 1);
    run_once(b);
    CHECK(count == 1);
    CHECK(write(sv[1], "y", 1) == 1);
    run_once(b);
    CHECK(count == 2);
    event_free(ev);
    close(sv[0]);
    close(sv[1]);
}

/* EV_CLOSED when the peer closes. */
static void test_closed(struct event_base *b) {
    if (!(event_base_get_features(b) & EV_FEATURE_EARLY_CLOSE)) return;
    int sv[2];
    pair(sv);
    struct event *ev = event_new(b, sv[0], EV_CLOSED, count_cb, NULL);
    event_add(ev, NULL);
    count = 0;
    last_what = 0;
    close(sv[1]);
    run_once(b);
    CHECK(count == 1);
    CHECK(last_what & EV_CLOSED);
    event_free(ev);
    close(sv[0]);
}

/* event_del, close, a new socket on the same number, event_add: the new one is watched. */
static void test_fd_reuse(struct event_base *b) {
    int sv[2];
    pair(sv);
    struct event *ev = event_new(b, sv[0], EV_READ | EV_PERSIST, count_cb, NULL);
    event_add(ev, NULL);
    run_once(b);
    event_del(ev);
    int num = sv[0];
    close(sv[0]);
    close(sv[1]);
    int nv[2];
    pair(nv);
    if (nv[0] != num) { /* make the reuse happen */
        dup2(nv[0], num);
        close(nv[0]);
        nv[0] = num;
    }
    event_assign(ev, b, nv[0], EV_READ | EV_PERSIST, count_cb, NULL);
    event_add(ev, NULL);
    count = 0;
    CHECK(write(nv[1], "z", 1) == 1);
    run_once(b);
    CHECK(count >= 1);
    event_free(ev);
    close(nv[0]);
    close(nv[1]);
}

/* The base dispatched on one thread, then on another (the ring is bound to the first). */
static void *dispatch_thread(void *arg) {
    struct event_base *b = arg;
    int sv[2];
    pair(sv);
    struct event *ev = event_new(b, sv[0], EV_READ | EV_PERSIST, count_cb, NULL);
    event_add(ev, NULL);
    count = 0;
    CHECK(write(sv[1], "t", 1) == 1);
    run_once(b);
    CHECK(count >= 1);
    event_free(ev);
    close(sv[0]);
    close(sv[1]);
    return NULL;
}

static void test_other_thread(struct event_base *b) {
    pthread_t t;
    pthread_create(&t, NULL, dispatch_thread, b);
    pthread_join(t, NULL);
    dispatch_thread(b); /* and back */
}

/* Another thread adds an event while the loop waits (libevent's notify fd wakes it). */
static int sv_t[2];
static void *adder(void *arg) {
    struct event_base *b = arg;
    usleep(50 * 1000);
    struct event *ev = event_new(b, sv_t[0], EV_READ, count_cb, NULL);
    event_add(ev, NULL);
    CHECK(write(sv_t[1], "a", 1) == 1);
    return ev;
}

static void test_cross_thread_add(struct event_base *b) {
    pair(sv_t);
    count = 0;
    pthread_t t;
    pthread_create(&t, NULL, adder, b);
    struct timeval tv = {0, 100 * 1000};
    static int ticks;
    struct event *keep = event_new(b, -1, EV_PERSIST, NULL, NULL);
    event_add(keep, &tv); /* the loop's only event until the adder has added its own */
    for (ticks = 0; count == 0 && ticks < 100; ticks++) event_base_loop(b, EVLOOP_ONCE);
    void *ev;
    pthread_join(t, &ev);
    CHECK(count == 1);
    event_free(ev);
    event_free(keep);
    close(sv_t[0]);
    close(sv_t[1]);
}

/* fork + event_reinit: child and parent both keep working. */
static void test_fork(struct event_base *b) {
    int sv[2];
    pair(sv);
    struct event *ev = event_new(b, sv[0], EV_READ | EV_PERSIST, count_cb, NULL);
    event_add(ev, NULL);
    run_once(b);
    pid_t pid = fork();
    if (pid == 0) {
        if (event_reinit(b) < 0) _exit(3);
        count = 0;
        if (write(sv[1], "c", 1) != 1) _exit(4);
        run_once(b);
        _exit(count >= 1 ? 0 : 5);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    char buf[8];
    while (read(sv[0], buf, sizeof buf) > 0) {
    }
    count = 0;
    CHECK(write(sv[1], "p", 1) == 1);
    run_once(b);
    CHECK(count >= 1);
    event_free(ev);
    close(sv[0]);
    close(sv[1]);
}

/* io_uring_setup fails with ENOSYS from here on (x86-64/aarch64 syscall numbers alike). */
static void block_io_uring(void) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof f / sizeof f[0], .filter = f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0) {
        perror("seccomp");
        exit(2);
    }
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: le_method_test [--no-uring] [METHOD]\n"
            "  Checks libevent's megapipe event method: the method a new event_base gets must be\n"
            "  METHOD (default megapipe; epoll with EVENT_NOMEGAPIPE=1), then level- and\n"
            "  edge-triggered events, EV_CLOSED, fd reuse, dispatch from other threads, fork.\n"
            "  --no-uring  block io_uring_setup with a seccomp filter first (the method must\n"
            "              decline and libevent fall back to epoll)\n"
            "  -h, --help  this text\n"
            "  Exit status: 0 passed, 1 failed, 77 skipped (METHOD megapipe, no io_uring here).\n");
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        }
    }
    if (argc > 1 && !strcmp(argv[1], "--no-uring")) {
        block_io_uring();
        argc--;
        argv++;
    }
    const char *want = argc > 1 ? argv[1] : "megapipe";
    if (!strcmp(want, "megapipe")) {
        /* Where io_uring is blocked the method must decline: nothing to test here. */
        struct io_uring_params p;
        memset(&p, 0, sizeof p);
        long fd = syscall(__NR_io_uring_setup, 4, &p);
        if (fd < 0) {
            printf("io_uring unavailable (%s): skipped\n", strerror(errno));
            return 77;
        }
        close((int)fd);
    }
    evthread_use_pthreads();
    struct event_base *b = event_base_new();
    if (!b) {
        fprintf(stderr, "event_base_new failed\n");
        return 1;
    }
    const char *got = event_base_get_method(b);
    printf("method: %s (expected %s)\n", got, want);
    if (strcmp(got, want) != 0) return 1;
    test_level(b);
    test_edge(b);
    test_closed(b);
    test_fd_reuse(b);
    test_other_thread(b);
    test_cross_thread_add(b);
    test_fork(b);
    event_base_free(b);
    printf("%s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
