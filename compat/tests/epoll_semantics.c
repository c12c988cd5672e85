/*
 * epoll_semantics.c — epoll's semantics, checked the same way with and without the
 * megapipe-run preload (ctest runs it both ways: what passes on the kernel's epoll must pass on
 * the emulation).  Each check prints its name; the exit status is the number that failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int failures;
#define CHECK(cond)                                                                       \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "  FAILED %s:%d: %s (errno %d %s)\n", __func__, __LINE__, #cond, \
                    errno, strerror(errno));                                              \
            failures++;                                                                   \
        }                                                                                 \
    } while (0)

static int add(int ep, int fd, uint32_t events, uint64_t data, int op) {
    struct epoll_event ev = {.events = events, .data.u64 = data};
    return epoll_ctl(ep, op, fd, &ev);
}

/* Wait once; the data of the first event (or -1 when none) and how many came. */
static int wait1(int ep, int timeout_ms, uint64_t *data, uint32_t *events) {
    struct epoll_event evs[16];
    int n = epoll_wait(ep, evs, 16, timeout_ms);
    if (n > 0) {
        if (data) *data = evs[0].data.u64;
        if (events) *events = evs[0].events;
    }
    return n;
}

static void pair(int sv[2]) {
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) abort();
}

static void errors(void) {
    int ep = epoll_create1(EPOLL_CLOEXEC), sv[2];
    pair(sv);
    CHECK(add(ep, sv[0], EPOLLIN, 1, EPOLL_CTL_ADD) == 0);
    CHECK(add(ep, sv[0], EPOLLIN, 1, EPOLL_CTL_ADD) == -1 && errno == EEXIST);
    CHECK(add(ep, sv[1], EPOLLIN, 1, EPOLL_CTL_MOD) == -1 && errno == ENOENT);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, sv[1], NULL) == -1 && errno == ENOENT);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, sv[0], NULL) == 0);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, sv[0], NULL) == -1 && errno == ENOENT);
    CHECK(add(ep, 100000, EPOLLIN, 1, EPOLL_CTL_ADD) == -1 && errno == EBADF);
    CHECK(add(ep, ep, EPOLLIN, 1, EPOLL_CTL_ADD) == -1 && errno == EINVAL);
    CHECK(add(ep, sv[0], EPOLLIN, 1, 99) == -1 && errno == EINVAL);
    char path[] = "/tmp/mp-sem-XXXXXX";
    int f = mkstemp(path);
    unlink(path);
    CHECK(add(ep, f, EPOLLIN, 1, EPOLL_CTL_ADD) == -1 && errno == EPERM);
    CHECK(add(ep, sv[0], EPOLLIN | EPOLLEXCLUSIVE, 1, EPOLL_CTL_ADD) == 0);
    CHECK(add(ep, sv[0], EPOLLIN | EPOLLEXCLUSIVE, 1, EPOLL_CTL_MOD) == -1 && errno == EINVAL);
    int ep2 = epoll_create1(EPOLL_CLOEXEC);
    CHECK(add(ep2, ep, EPOLLIN, 2, EPOLL_CTL_ADD) == 0);
    CHECK(add(ep, ep2, EPOLLIN, 3, EPOLL_CTL_ADD) == -1 && errno == ELOOP);
    struct epoll_event evs[1];
    CHECK(epoll_wait(sv[0], evs, 1, 0) == -1 && errno == EINVAL);
    CHECK(epoll_wait(ep, evs, 0, 0) == -1 && errno == EINVAL);
    close(f);
    close(ep2);
    close(ep);
    close(sv[0]);
    close(sv[1]);
}

static void triggers(void) {
    int ep = epoll_create1(0), sv[2];
    pair(sv);
    uint64_t d = 0;
    uint32_t e = 0;
    CHECK(add(ep, sv[0], EPOLLIN, 10, EPOLL_CTL_ADD) == 0);
    CHECK(wait1(ep, 0, &d, &e) == 0);
    CHECK(write(sv[1], "a", 1) == 1);
    CHECK(wait1(ep, 1000, &d, &e) == 1 && d == 10 && (e & EPOLLIN));
    CHECK(wait1(ep, 0, &d, &e) == 1); /* level: again */
    CHECK(add(ep, sv[0], EPOLLIN | EPOLLET, 11, EPOLL_CTL_MOD) == 0);
    CHECK(wait1(ep, 1000, &d, &e) == 1 && d == 11); /* MOD re-reports what is ready */
    CHECK(wait1(ep, 0, &d, &e) == 0);                /* edge: not again */
    CHECK(write(sv[1], "b", 1) == 1);
    CHECK(wait1(ep, 1000, &d, &e) == 1 && d == 11);
    CHECK(add(ep, sv[0], EPOLLIN | EPOLLONESHOT, 12, EPOLL_CTL_MOD) == 0);
    CHECK(wait1(ep, 1000, &d, &e) == 1 && d == 12);
    CHECK(wait1(ep, 0, &d, &e) == 0); /* one-shot */
    CHECK(add(ep, sv[0], EPOLLIN | EPOLLONESHOT, 13, EPOLL_CTL_MOD) == 0);
    CHECK(wait1(ep, 1000, &d, &e) == 1 && d == 13);
    char buf[8];
    CHECK(read(sv[0], buf, sizeof buf) == 2);
    CHECK(add(ep, sv[0], EPOLLIN | EPOLLRDHUP, 14, EPOLL_CTL_MOD) == 0);
    CHECK(wait1(ep, 0, &d, &e) == 0);
    CHECK(shutdown(sv[1], SHUT_WR) == 0);
    CHECK(wait1(ep, 1000, &d, &e) == 1 && d == 14 && (e & EPOLLRDHUP));
    close(ep);
    close(sv[0]);
    close(sv[1]);
}

static void dup_and_reuse(void) {
    int ep = epoll_create1(0), sv[2];
    pair(sv);
    uint64_t d = 0;
    CHECK(add(ep, sv[0], EPOLLIN, 20, EPOLL_CTL_ADD) == 0);
    int keep = dup(sv[0]);
    int num = sv[0];
    close(sv[0]); /* the file lives on through keep: its entry stays, and reports */
    CHECK(write(sv[1], "x", 1) == 1);
    CHECK(wait1(ep, 1000, &d, NULL) == 1 && d == 20);
    /* The number names a new file now: it has no entry. */
    int nv[2];
    pair(nv);
    int other = nv[0] == num ? nv[1] : nv[0];
    int again = nv[0] == num ? nv[0] : nv[1];
    CHECK(again == num);
    CHECK(add(ep, again, EPOLLIN, 21, EPOLL_CTL_MOD) == -1 && errno == ENOENT);
    /* ADD of the new file at the old number: entries are per (file, number), so the old
     * file's lingering entry does not stand in the way. */
    CHECK(add(ep, again, EPOLLIN, 21, EPOLL_CTL_ADD) == 0);
    close(keep); /* last reference: the old entry goes */
    CHECK(write(other, "y", 1) == 1);
    CHECK(wait1(ep, 1000, &d, NULL) == 1 && d == 21);
    /* close, reuse, ADD: no stale EEXIST */
    close(again);
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CHECK(s == again);
    CHECK(add(ep, s, EPOLLOUT, 22, EPOLL_CTL_ADD) == 0);
    /* dup2 over a watched fd closes it */
    int t = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CHECK(add(ep, t, EPOLLOUT, 23, EPOLL_CTL_ADD) == 0);
    CHECK(dup2(s, t) == t);
    CHECK(add(ep, t, EPOLLOUT, 24, EPOLL_CTL_ADD) == 0); /* t names s's file: a new entry */
    /* close_range over watched fds */
    int u = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CHECK(add(ep, u, EPOLLOUT, 25, EPOLL_CTL_ADD) == 0);
    CHECK(close_range((unsigned)u, (unsigned)u, 0) == 0);
    int u2 = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CHECK(u2 == u);
    CHECK(add(ep, u2, EPOLLOUT, 26, EPOLL_CTL_ADD) == 0);
    close(u2);
    close(t);
    close(s);
    close(other);
    close(sv[1]);
    close(ep);
}

static void nested(void) {
    int inner = epoll_create1(0), outer = epoll_create1(0), sv[2];
    pair(sv);
    uint64_t d = 0;
    CHECK(add(outer, inner, EPOLLIN, 30, EPOLL_CTL_ADD) == 0);
    CHECK(add(inner, sv[0], EPOLLIN, 31, EPOLL_CTL_ADD) == 0);
    CHECK(write(sv[1], "n", 1) == 1);
    CHECK(wait1(outer, 1000, &d, NULL) == 1 && d == 30);
    CHECK(wait1(inner, 0, &d, NULL) == 1 && d == 31);
    close(outer);
    close(inner);
    close(sv[0]);
    close(sv[1]);
}

static void forked(void) {
    int ep = epoll_create1(0), p[2];
    CHECK(pipe(p) == 0);
    uint64_t d = 0;
    CHECK(add(ep, p[0], EPOLLIN, 40, EPOLL_CTL_ADD) == 0);
    CHECK(wait1(ep, 0, &d, NULL) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        int bad = 0;
        /* the inherited set, changed and waited on in the child */
        if (write(p[1], "f", 1) != 1) bad++;
        if (wait1(ep, 1000, &d, NULL) != 1 || d != 40) bad++;
        if (add(ep, p[0], EPOLLIN, 41, EPOLL_CTL_MOD) != 0) bad++;
        /* a set of the child's own */
        int ep2 = epoll_create1(0), sv[2];
        pair(sv);
        if (add(ep2, sv[0], EPOLLIN, 42, EPOLL_CTL_ADD) != 0) bad++;
        if (write(sv[1], "c", 1) != 1) bad++;
        if (wait1(ep2, 1000, &d, NULL) != 1 || d != 42) bad++;
        _exit(bad);
    }
    int st = -1;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* the child's MOD changed the shared set */
    CHECK(wait1(ep, 1000, &d, NULL) == 1 && d == 41);
    CHECK(add(ep, p[0], EPOLLIN, 43, EPOLL_CTL_MOD) == 0);
    CHECK(wait1(ep, 1000, &d, NULL) == 1 && d == 43);
    close(ep);
    close(p[0]);
    close(p[1]);
}

static void exec_leaks_nothing(void) {
    int ep = epoll_create1(EPOLL_CLOEXEC), sv[2];
    pair(sv);
    CHECK(add(ep, sv[0], EPOLLOUT, 50, EPOLL_CTL_ADD) == 0);
    CHECK(wait1(ep, 1000, NULL, NULL) == 1); /* a channel exists now, if preloaded */
    int out[2];
    CHECK(pipe2(out, O_CLOEXEC) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(out[1], 1);
        execl("/bin/sh", "sh", "-c", "ls -l /proc/$$/fd", (char *)NULL);
        _exit(127);
    }
    close(out[1]);
    char buf[8192];
    size_t len = 0;
    ssize_t n;
    while ((n = read(out[0], buf + len, sizeof buf - 1 - len)) > 0) len += (size_t)n;
    buf[len] = 0;
    waitpid(pid, NULL, 0);
    CHECK(len > 0);
    CHECK(strstr(buf, "io_uring") == NULL);
    CHECK(strstr(buf, "eventpoll") == NULL);
    if (strstr(buf, "io_uring") || strstr(buf, "eventpoll")) fprintf(stderr, "%s", buf);
    close(out[0]);
    close(ep);
    close(sv[0]);
    close(sv[1]);
}

struct waiter {
    int ep;
    int n;
    uint64_t d;
};
static void *waiter_main(void *p) {
    struct waiter *w = p;
    w->n = wait1(w->ep, 3000, &w->d, NULL);
    return NULL;
}

static void threads(void) {
    /* A thread waits with nothing in the set; another adds a ready fd: the waiter wakes. */
    int ep = epoll_create1(0), sv[2];
    pair(sv);
    CHECK(write(sv[1], "t", 1) == 1);
    struct waiter w = {.ep = ep};
    pthread_t t;
    pthread_create(&t, NULL, waiter_main, &w);
    usleep(100 * 1000);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK(add(ep, sv[0], EPOLLIN, 60, EPOLL_CTL_ADD) == 0);
    pthread_join(t, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
    CHECK(w.n == 1 && w.d == 60);
    CHECK(ms < 1000);
    /* Changes made by a thread that never waits reach the set another thread waits on. */
    int ep2 = epoll_create1(0), sv2[2];
    pair(sv2);
    CHECK(add(ep2, sv2[0], EPOLLIN, 61, EPOLL_CTL_ADD) == 0); /* before anyone waits */
    struct waiter w2 = {.ep = ep2};
    pthread_create(&t, NULL, waiter_main, &w2);
    usleep(50 * 1000);
    CHECK(write(sv2[1], "u", 1) == 1);
    pthread_join(t, NULL);
    CHECK(w2.n == 1 && w2.d == 61);
    close(ep);
    close(ep2);
    close(sv[0]);
    close(sv[1]);
    close(sv2[0]);
    close(sv2[1]);
}

static volatile sig_atomic_t got_sig;
static void on_sig(int s) {
    (void)s;
    got_sig = 1;
}
static void *kill_later(void *p) {
    usleep(100 * 1000);
    pthread_kill(*(pthread_t *)p, SIGUSR1);
    return NULL;
}

static void signals(void) {
    int ep = epoll_create1(0);
    struct sigaction sa = {.sa_handler = on_sig, .sa_flags = SA_RESTART};
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t block, old, during;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    during = old;
    sigdelset(&during, SIGUSR1);
    pthread_t self = pthread_self(), t;
    pthread_create(&t, NULL, kill_later, &self);
    struct epoll_event evs[4];
    /* epoll_pwait is never restarted, even with SA_RESTART */
    int n = epoll_pwait(ep, evs, 4, 5000, &during);
    CHECK(n == -1 && errno == EINTR);
    CHECK(got_sig == 1);
    pthread_join(t, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    /* the plain epoll_wait too */
    got_sig = 0;
    pthread_create(&t, NULL, kill_later, &self);
    n = epoll_wait(ep, evs, 4, 5000);
    CHECK(n == -1 && errno == EINTR);
    CHECK(got_sig == 1);
    pthread_join(t, NULL);
    struct timespec ts = {0, 30 * 1000 * 1000};
    CHECK(epoll_pwait2(ep, evs, 4, &ts, NULL) == 0);
    close(ep);
}

int main(void) {
    struct {
        const char *name;
        void (*fn)(void);
    } checks[] = {{"errors", errors},     {"triggers", triggers}, {"dup_and_reuse", dup_and_reuse},
                  {"nested", nested},     {"forked", forked},     {"exec_leaks_nothing", exec_leaks_nothing},
                  {"threads", threads},   {"signals", signals}};
    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++) {
        int before = failures;
        checks[i].fn();
        printf("%s %s\n", failures == before ? "ok  " : "FAIL", checks[i].name);
    }
    fflush(stdout);
    return failures ? 1 : 0;
}
