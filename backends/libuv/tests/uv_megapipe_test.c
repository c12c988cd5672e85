/*
 * uv_megapipe_test.c — our checks of libuv on MegaPipe (backends/libuv/), linked against the
 * drop-in libuv.so.1 of the build tree.  One case per run:
 *
 *   uv_megapipe_test switch     UV_USE_MEGAPIPE=1 puts a loop on an io_uring channel (its epoll
 *                               set stays empty), without it the loop is stock; pipes, timers,
 *                               async from a thread, the thread pool, signals on both; a loop
 *                               created on one thread and run on another
 *   uv_megapipe_test fork       a forked child: uv_loop_fork() of the parent's loop, a loop of
 *                               its own, the inherited loop run without uv_loop_fork(); the
 *                               parent's loop keeps its own completions meanwhile
 *   uv_megapipe_test setuid     (root) after setgid()/setuid() no operation runs with the old
 *                               credentials: a unix socket only root may reach is refused, a
 *                               root-only file cannot be opened through the thread pool
 *   uv_megapipe_test fd_reuse   close of a watched fd and immediate reuse of its number (libuv
 *                               #4323): the new watcher sees only its own file; a closed pipe
 *                               end is released at once (the peer sees EOF)
 *   uv_megapipe_test cq_overflow  many connections on a tiny ring (MP_RING_ENTRIES=8: 128 CQ
 *                               entries): the CQ overflows and no event is lost (libuv #4598)
 *   uv_megapipe_test seccomp    io_uring denied by a seccomp filter: the loop falls back to
 *                               stock, logged once, and works
 *   uv_megapipe_test tcp        TCP through completions: accept, 4 MiB in 64 ordered writes,
 *                               uv_try_write (at once, then EAGAIN behind queued writes), read
 *                               stop/start, shutdown both ways, EOF, uv_fileno, close; the
 *                               channel's buffered-read counter proves the path
 *   uv_megapipe_test tcp_readiness  the same with UV_MEGAPIPE_TCP=0 (TCP on readiness watches)
 *   uv_megapipe_test reuseport  loops on two threads (pinned to CPUs 0 and 1) listening on one
 *                               address (SO_REUSEPORT): partitioned accept, each loop takes
 *                               the connections of clients on its CPU
 *   uv_megapipe_test share      a listener the process bound itself is accepted from
 *                               exclusively (a second loop on the same socket gets next to
 *                               nothing) until it is sent with uv_write2 or the process forks
 *                               (then both take turns); listeners opened from an fd, with
 *                               simultaneous accepts off or UV_MEGAPIPE_EXCLUSIVE_ACCEPT=0
 *                               take turns from the start
 *
 * Exit status: 0 pass, 1 fail (with a message), 77 skip.  Servers listen on 127.0.0.1, port 0.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <grp.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <uv.h>

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)
#define CHECK_UV(expr)                                                                  \
    do {                                                                                \
        int r_ = (expr);                                                                \
        if (r_ != 0) {                                                                  \
            fprintf(stderr, "%s:%d: %s = %s\n", __FILE__, __LINE__, #expr, uv_strerror(r_)); \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

/* ---- what the process holds --------------------------------------------------------- */

static int count_uring_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;
    CHECK(d != NULL);
    while ((e = readdir(d)) != NULL) {
        char path[PATH_MAX], link[256];
        ssize_t l;
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        l = readlink(path, link, sizeof link - 1);
        if (l <= 0) continue;
        link[l] = 0;
        if (strstr(link, "io_uring")) n++;
    }
    closedir(d);
    return n;
}

/* fds registered in the loop's epoll set (stock libuv's wait) */
static int epoll_entries(uv_loop_t *loop) {
    char path[64], line[512];
    FILE *f;
    int n = 0;
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", uv_backend_fd(loop));
    f = fopen(path, "r");
    CHECK(f != NULL);
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "tfd:", 4) == 0) n++;
    fclose(f);
    return n;
}

static void run_until(uv_loop_t *loop, const int *flag, int want) {
    for (int i = 0; i < 100000 && *flag < want; i++) uv_run(loop, UV_RUN_ONCE);
    CHECK(*flag >= want);
}

/* ---- a pipe echo through a loop: write "ping" on one end, read it on the other --------- */

struct echo {
    uv_pipe_t rd, wr;
    uv_write_t req;
    char buf[64];
    size_t got;
    int done, closed;
    int epoll_seen; /* epoll entries while the read was pending */
};

static void echo_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b) {
    struct echo *e = h->data;
    (void)sz;
    *b = uv_buf_init(e->buf + e->got, (unsigned)(sizeof e->buf - e->got));
}
static void echo_closed(uv_handle_t *h) {
    ((struct echo *)h->data)->closed++;
}
static void echo_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
    struct echo *e = s->data;
    (void)b;
    if (n > 0) e->got += (size_t)n;
    if (e->got >= 4 || n < 0) {
        uv_read_stop(s);
        e->done = 1;
    }
}
static void echo_written(uv_write_t *r, int status) {
    CHECK_UV(status);
    (void)r;
}

static void pipe_echo(uv_loop_t *loop, int expect_uring) {
    struct echo e;
    uv_file fds[2];
    memset(&e, 0, sizeof e);
    CHECK_UV(uv_pipe(fds, 0, 0));
    CHECK_UV(uv_pipe_init(loop, &e.rd, 0));
    CHECK_UV(uv_pipe_init(loop, &e.wr, 0));
    e.rd.data = e.wr.data = &e;
    CHECK_UV(uv_pipe_open(&e.rd, fds[0]));
    CHECK_UV(uv_pipe_open(&e.wr, fds[1]));
    CHECK_UV(uv_read_start((uv_stream_t *)&e.rd, echo_alloc, echo_read));
    uv_run(loop, UV_RUN_NOWAIT); /* the read watch is registered */
    e.epoll_seen = epoll_entries(loop);
    if (expect_uring) CHECK(e.epoll_seen == 0);
    else CHECK(e.epoll_seen > 0);
    uv_buf_t b = uv_buf_init("ping", 4);
    CHECK_UV(uv_write(&e.req, (uv_stream_t *)&e.wr, &b, 1, echo_written));
    run_until(loop, &e.done, 1);
    CHECK(e.got == 4 && memcmp(e.buf, "ping", 4) == 0);
    uv_close((uv_handle_t *)&e.rd, echo_closed);
    uv_close((uv_handle_t *)&e.wr, echo_closed);
    run_until(loop, &e.closed, 2);
}

/* ---- timers, async from a thread, thread pool, signals ------------------------------- */

static int fired;
static void on_timer(uv_timer_t *t) {
    (void)t;
    fired++;
}
static void on_async(uv_async_t *a) {
    (void)a;
    fired++;
}
static void async_thread(void *arg) {
    usleep(20000);
    uv_async_send(arg);
}
static void work(uv_work_t *w) {
    *(int *)w->data = 42;
}
static void work_done(uv_work_t *w, int status) {
    CHECK_UV(status);
    CHECK(*(int *)w->data == 42);
    fired++;
}
static void on_signal(uv_signal_t *s, int signum) {
    CHECK(signum == SIGUSR1);
    uv_signal_stop(s);
    fired++;
}
static void closed_cb(uv_handle_t *h) {
    (void)h;
}

static void loop_features(uv_loop_t *loop) {
    uv_timer_t t;
    uv_async_t a;
    uv_thread_t th;
    uv_work_t w;
    uv_signal_t s;
    int result = 0;

    fired = 0;
    CHECK_UV(uv_timer_init(loop, &t));
    CHECK_UV(uv_timer_start(&t, on_timer, 10, 0));
    run_until(loop, &fired, 1);

    CHECK_UV(uv_async_init(loop, &a, on_async));
    CHECK_UV(uv_thread_create(&th, async_thread, &a));
    run_until(loop, &fired, 2);
    CHECK_UV(uv_thread_join(&th));

    w.data = &result;
    CHECK_UV(uv_queue_work(loop, &w, work, work_done));
    run_until(loop, &fired, 3);

    CHECK_UV(uv_signal_init(loop, &s));
    CHECK_UV(uv_signal_start(&s, on_signal, SIGUSR1));
    raise(SIGUSR1);
    run_until(loop, &fired, 4);

    uv_close((uv_handle_t *)&t, closed_cb);
    uv_close((uv_handle_t *)&a, closed_cb);
    uv_close((uv_handle_t *)&s, closed_cb);
    uv_run(loop, UV_RUN_DEFAULT);
}

static void loop_close(uv_loop_t *loop) {
    CHECK_UV(uv_loop_close(loop));
}

/* ---- switch -------------------------------------------------------------------------- */

static void run_on_thread(void *arg) {
    uv_loop_t *loop = arg;
    pipe_echo(loop, 1);
    loop_features(loop);
}

static int case_switch(void) {
    uv_loop_t loop;
    int base = count_uring_fds();

    unsetenv("UV_USE_MEGAPIPE");
    CHECK_UV(uv_loop_init(&loop));
    CHECK(count_uring_fds() == base);
    pipe_echo(&loop, 0);
    loop_features(&loop);
    loop_close(&loop);

    setenv("UV_USE_MEGAPIPE", "0", 1);
    CHECK_UV(uv_loop_init(&loop));
    CHECK(count_uring_fds() == base);
    loop_close(&loop);

    setenv("UV_USE_MEGAPIPE", "1", 1);
    CHECK_UV(uv_loop_init(&loop));
    CHECK(count_uring_fds() == base + 1);
    pipe_echo(&loop, 1);
    loop_features(&loop);
    pipe_echo(&loop, 1);
    loop_close(&loop);
    CHECK(count_uring_fds() == base);

    /* Created here, run on another thread (the channel is rebuilt there), then run here. */
    CHECK_UV(uv_loop_init(&loop));
    pipe_echo(&loop, 1);
    uv_thread_t th;
    CHECK_UV(uv_thread_create(&th, run_on_thread, &loop));
    CHECK_UV(uv_thread_join(&th));
    pipe_echo(&loop, 1);
    loop_close(&loop);
    CHECK(count_uring_fds() == base);
    printf("switch: ok\n");
    return 0;
}

/* ---- fork ---------------------------------------------------------------------------- */

struct parent_read {
    uv_pipe_t p;
    char buf[256];
    size_t got;
    int done;
};
static void pr_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b) {
    struct parent_read *r = h->data;
    (void)sz;
    *b = uv_buf_init(r->buf + r->got, (unsigned)(sizeof r->buf - r->got));
}
static void pr_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
    struct parent_read *r = s->data;
    (void)b;
    CHECK(n != UV_EOF);
    if (n > 0) r->got += (size_t)n;
    if (r->got >= 100) r->done = 1;
}

static int child_status(pid_t pid) {
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static int case_fork(void) {
    uv_loop_t loop;
    struct parent_read r;
    uv_file fds[2];
    char msg[100];
    int mode;

    setenv("UV_USE_MEGAPIPE", "1", 1);
    CHECK_UV(uv_loop_init(&loop));
    CHECK(count_uring_fds() == 1);
    memset(&r, 0, sizeof r);
    CHECK_UV(uv_pipe(fds, 0, 0));
    CHECK_UV(uv_pipe_init(&loop, &r.p, 0));
    r.p.data = &r;
    CHECK_UV(uv_pipe_open(&r.p, fds[0]));
    CHECK_UV(uv_read_start((uv_stream_t *)&r.p, pr_alloc, pr_read));
    uv_run(&loop, UV_RUN_NOWAIT); /* the parent's watch is armed in its ring */
    memset(msg, 'x', sizeof msg);

    /* mode 0: uv_loop_fork(); mode 1: a loop of its own; mode 2: the inherited loop as is */
    for (mode = 0; mode < 3; mode++) {
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            uv_loop_t own;
            close(fds[1]);
            if (mode == 0) {
                CHECK_UV(uv_loop_fork(&loop));
                CHECK(count_uring_fds() == 1); /* the inherited ring was released, one new */
                /* the parent's pipe stays the parent's: stop reading it here */
                uv_read_stop((uv_stream_t *)&r.p);
                pipe_echo(&loop, 1);
                loop_features(&loop);
            } else if (mode == 1) {
                CHECK_UV(uv_loop_init(&own));
                CHECK(count_uring_fds() == 2);
                pipe_echo(&own, 1);
                loop_features(&own);
                loop_close(&own);
            } else {
                uv_read_stop((uv_stream_t *)&r.p);
                pipe_echo(&loop, 1);
            }
            _exit(0);
        }
        /* The parent writes while the child runs: its completions must stay its own. */
        CHECK(write(fds[1], msg, sizeof msg) == (ssize_t)sizeof msg);
        r.got = 0;
        r.done = 0;
        run_until(&loop, &r.done, 1);
        CHECK(r.got == sizeof msg);
        int st = child_status(pid);
        if (st != 0) {
            fprintf(stderr, "fork: child (mode %d) failed with status %d\n", mode, st);
            return 1;
        }
    }
    uv_close((uv_handle_t *)&r.p, closed_cb);
    uv_run(&loop, UV_RUN_DEFAULT);
    close(fds[1]);
    loop_close(&loop);
    printf("fork: ok\n");
    return 0;
}

/* ---- setuid -------------------------------------------------------------------------- */

static int connect_status;
static void on_connect(uv_connect_t *req, int status) {
    connect_status = status;
    uv_close((uv_handle_t *)req->handle, closed_cb);
}
static int fs_status;
static void on_open(uv_fs_t *req) {
    fs_status = (int)req->result;
    if (req->result >= 0) close((int)req->result);
    uv_fs_req_cleanup(req);
}

static int try_connect(uv_loop_t *loop, const char *path) {
    uv_pipe_t c;
    uv_connect_t req;
    connect_status = 1;
    CHECK_UV(uv_pipe_init(loop, &c, 0));
    uv_pipe_connect(&req, &c, path, on_connect);
    uv_run(loop, UV_RUN_DEFAULT);
    return connect_status;
}
static int try_open(uv_loop_t *loop, const char *path) {
    uv_fs_t req;
    fs_status = 1;
    CHECK_UV(uv_fs_open(loop, &req, path, O_RDONLY, 0, on_open));
    uv_run(loop, UV_RUN_DEFAULT);
    return fs_status;
}

static int case_setuid(void) {
    char dir[] = "/tmp/uvmp-setuid.XXXXXX";
    char sock[64], file[64];
    struct sockaddr_un sun;
    uv_loop_t loop;
    int ls, fd;

    if (geteuid() != 0) {
        printf("setuid: SKIP (needs root)\n");
        return 77;
    }
    setenv("UV_USE_MEGAPIPE", "1", 1);
    CHECK(mkdtemp(dir) != NULL);
    CHECK(chmod(dir, 0700) == 0);
    snprintf(sock, sizeof sock, "%s/sock", dir);
    snprintf(file, sizeof file, "%s/secret", dir);
    fd = open(file, O_CREAT | O_WRONLY, 0600);
    CHECK(fd >= 0);
    close(fd);
    ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(ls >= 0);
    memset(&sun, 0, sizeof sun);
    sun.sun_family = AF_UNIX;
    memcpy(sun.sun_path, sock, strlen(sock) + 1);
    CHECK(bind(ls, (struct sockaddr *)&sun, sizeof sun) == 0);
    CHECK(listen(ls, 16) == 0);

    CHECK_UV(uv_loop_init(&loop));
    CHECK(count_uring_fds() == 1);
    /* As root both work (and the ring, its worker threads included, exists by now). */
    pipe_echo(&loop, 1);
    CHECK(try_connect(&loop, sock) == 0);
    CHECK(try_open(&loop, file) >= 0);

    /* Drop to nobody: setgid/setuid change every thread's credentials (glibc). */
    CHECK(setgroups(0, NULL) == 0);
    CHECK(setgid(65534) == 0);
    CHECK(setuid(65534) == 0);
    CHECK(geteuid() == 65534);

    int cs = try_connect(&loop, sock);
    int os = try_open(&loop, file);
    pipe_echo(&loop, 1); /* the loop itself still works */
    loop_close(&loop);
    close(ls);
    /* Clean up as far as nobody may; the rest is removed by the parent runner's tmp cleanup. */
    if (cs != UV_EACCES || os != UV_EACCES) {
        fprintf(stderr, "setuid: after setuid(nobody): connect %s, open %s (want EACCES)\n",
                cs == 0 ? "succeeded" : uv_err_name(cs), os >= 0 ? "succeeded" : uv_err_name(os));
        return 1;
    }
    printf("setuid: ok (connect and open refused after the change)\n");
    return 0;
}

/* ---- fd_reuse ------------------------------------------------------------------------ */

struct reuse {
    uv_poll_t old_w, new_w;
    int old_fd, new_fd, spare_fd;
    int old_calls, new_calls, new_wrong, closed;
    uv_timer_t quiet;
    int quiet_done;
};

static void new_cb(uv_poll_t *w, int status, int events) {
    struct reuse *r = w->data;
    char c[16];
    CHECK_UV(status);
    CHECK(events & UV_READABLE);
    ssize_t n = recv(r->new_fd, c, sizeof c, MSG_DONTWAIT);
    if (n == 1 && c[0] == 'N') {
        r->new_calls++;
        uv_poll_stop(w);
    } else {
        r->new_wrong++; /* readiness of a file the watcher never had */
    }
}
static void reuse_closed(uv_handle_t *h) {
    ((struct reuse *)h->data)->closed++;
}
static void old_cb(uv_poll_t *w, int status, int events) {
    struct reuse *r = w->data;
    int b[2];
    CHECK_UV(status);
    CHECK(events & UV_READABLE);
    r->old_calls++;
    /* Stop, close the fd and reuse its number at once, from inside the callback, with the old
     * socket's peer still holding unread data for it. */
    uv_poll_stop(w);
    uv_close((uv_handle_t *)w, reuse_closed);
    CHECK(close(r->old_fd) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b) == 0);
    if (b[0] != r->old_fd) { /* the lowest free number is usually the old one already */
        CHECK(dup3(b[0], r->old_fd, O_CLOEXEC) == r->old_fd);
        close(b[0]);
    }
    r->new_fd = r->old_fd;
    r->spare_fd = b[1];
    CHECK_UV(uv_poll_init(w->loop, &r->new_w, r->new_fd));
    r->new_w.data = r;
    CHECK_UV(uv_poll_start(&r->new_w, UV_READABLE, new_cb));
}
static void quiet_cb(uv_timer_t *t) {
    ((struct reuse *)t->data)->quiet_done = 1;
}

static int case_fd_reuse(void) {
    struct reuse r;
    uv_loop_t loop;
    int a[2], p[2];

    setenv("UV_USE_MEGAPIPE", "1", 1);
    CHECK_UV(uv_loop_init(&loop));
    CHECK(count_uring_fds() == 1);

    /* 1. libuv #4323: a closed fd's number reused at once. */
    memset(&r, 0, sizeof r);
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a) == 0);
    r.old_fd = a[0];
    CHECK_UV(uv_poll_init(&loop, &r.old_w, r.old_fd));
    r.old_w.data = &r;
    CHECK_UV(uv_poll_start(&r.old_w, UV_READABLE, old_cb));
    CHECK(write(a[1], "OOOO", 4) == 4); /* the old socket stays readable */
    run_until(&loop, &r.old_calls, 1);
    /* 100 ms of quiet: the new watcher must not hear the old socket. */
    CHECK_UV(uv_timer_init(&loop, &r.quiet));
    r.quiet.data = &r;
    CHECK_UV(uv_timer_start(&r.quiet, quiet_cb, 100, 0));
    run_until(&loop, &r.quiet_done, 1);
    CHECK(r.new_calls == 0 && r.new_wrong == 0);
    CHECK(write(r.spare_fd, "N", 1) == 1);
    run_until(&loop, &r.new_calls, 1);
    CHECK(r.new_wrong == 0 && r.old_calls == 1);
    uv_close((uv_handle_t *)&r.new_w, reuse_closed);
    uv_close((uv_handle_t *)&r.quiet, reuse_closed);
    run_until(&loop, &r.closed, 3);
    close(r.new_fd);
    close(r.spare_fd);
    close(a[1]);

    /* 2. A watched pipe end closed by libuv is released at once: the peer sees EOF (an
     *    io_uring poll holds its file until it is cancelled and the cancel has run). */
    CHECK(pipe2(p, O_CLOEXEC | O_NONBLOCK) == 0);
    r.closed = 0;
    CHECK_UV(uv_poll_init(&loop, &r.old_w, p[1]));
    r.old_w.data = &r;
    /* A write end is never readable: this watch stays armed in the kernel. */
    CHECK_UV(uv_poll_start(&r.old_w, UV_READABLE, old_cb));
    uv_run(&loop, UV_RUN_NOWAIT);
    uv_run(&loop, UV_RUN_NOWAIT);
    uv_close((uv_handle_t *)&r.old_w, reuse_closed);
    CHECK(close(p[1]) == 0);
    struct pollfd pf = {.fd = p[0], .events = POLLIN};
    int pr = poll(&pf, 1, 1000); /* the loop is not run meanwhile */
    CHECK(pr == 1 && (pf.revents & POLLHUP));
    run_until(&loop, &r.closed, 1);
    close(p[0]);
    CHECK(r.old_calls == 1); /* old_cb never ran for the write end */
    CHECK_UV(uv_loop_close(&loop));
    printf("fd_reuse: ok\n");
    return 0;
}

/* ---- cq_overflow --------------------------------------------------------------------- */

#define OVF_CONNS 1000
#define OVF_MSG 64

struct ovf_conn {
    uv_tcp_t tcp;
    uv_connect_t creq;
    uv_write_t wreq;
    char buf[OVF_MSG];
    size_t got;
    int id;
    int server;
};
static uv_tcp_t ovf_listener;
static int ovf_echoed, ovf_closed, ovf_accepted;
static char ovf_msgs[OVF_CONNS][OVF_MSG];

static void ovf_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b) {
    struct ovf_conn *c = h->data;
    (void)sz;
    *b = uv_buf_init(c->buf + c->got, (unsigned)(sizeof c->buf - c->got));
}
static void ovf_closed_cb(uv_handle_t *h) {
    free(h->data);
    ovf_closed++;
}
static void ovf_written(uv_write_t *w, int status) {
    CHECK_UV(status);
    (void)w;
}
static void ovf_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
    struct ovf_conn *c = s->data;
    (void)b;
    if (n == UV_EOF && c->server) {
        uv_close((uv_handle_t *)s, ovf_closed_cb);
        return;
    }
    CHECK(n >= 0);
    c->got += (size_t)n;
    if (c->got < OVF_MSG) return;
    if (c->server) {
        /* echo it back */
        uv_buf_t wb = uv_buf_init(c->buf, OVF_MSG);
        CHECK_UV(uv_write(&c->wreq, s, &wb, 1, ovf_written));
        c->got = 0;
    } else {
        CHECK(memcmp(c->buf, ovf_msgs[c->id], OVF_MSG) == 0);
        ovf_echoed++;
        uv_close((uv_handle_t *)s, ovf_closed_cb);
    }
}
static void ovf_on_conn(uv_stream_t *l, int status) {
    CHECK_UV(status);
    struct ovf_conn *c = calloc(1, sizeof *c);
    CHECK(c != NULL);
    c->server = 1;
    CHECK_UV(uv_tcp_init(l->loop, &c->tcp));
    c->tcp.data = c;
    CHECK_UV(uv_accept(l, (uv_stream_t *)&c->tcp));
    CHECK_UV(uv_read_start((uv_stream_t *)&c->tcp, ovf_alloc, ovf_read));
    ovf_accepted++;
}
static void ovf_connected(uv_connect_t *req, int status) {
    struct ovf_conn *c = req->data;
    CHECK_UV(status);
    uv_buf_t wb = uv_buf_init(ovf_msgs[c->id], OVF_MSG);
    CHECK_UV(uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &wb, 1, ovf_written));
    CHECK_UV(uv_read_start((uv_stream_t *)&c->tcp, ovf_alloc, ovf_read));
}

static int case_cq_overflow(void) {
    struct sockaddr_in addr;
    int namelen = sizeof addr;
    struct rlimit rl;
    uv_loop_t loop;
    int errpipe[2], saved_err;
    char stats[8192];
    ssize_t n;
    size_t len = 0;

    CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0);
    if (rl.rlim_cur < 3 * OVF_CONNS) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0);
        if (rl.rlim_cur < 3 * OVF_CONNS) {
            printf("cq_overflow: SKIP (RLIMIT_NOFILE %llu)\n", (unsigned long long)rl.rlim_cur);
            return 77;
        }
    }
    setenv("UV_USE_MEGAPIPE", "1", 1);
    setenv("MP_RING_ENTRIES", "8", 1); /* the smallest ring: 128 completion entries */
    setenv("MP_STATS", "1", 1);       /* the channel's counters, printed at uv_loop_close */
    CHECK_UV(uv_loop_init(&loop));
    CHECK(count_uring_fds() == 1);

    CHECK_UV(uv_tcp_init(&loop, &ovf_listener));
    CHECK_UV(uv_ip4_addr("127.0.0.1", 0, &addr));
    CHECK_UV(uv_tcp_bind(&ovf_listener, (struct sockaddr *)&addr, 0));
    CHECK_UV(uv_tcp_getsockname(&ovf_listener, (struct sockaddr *)&addr, &namelen));
    CHECK_UV(uv_listen((uv_stream_t *)&ovf_listener, 4096, ovf_on_conn));
    for (int i = 0; i < OVF_CONNS; i++) {
        struct ovf_conn *c = calloc(1, sizeof *c);
        CHECK(c != NULL);
        c->id = i;
        for (int j = 0; j < OVF_MSG; j++) ovf_msgs[i][j] = (char)('a' + (i * 7 + j) % 26);
        CHECK_UV(uv_tcp_init(&loop, &c->tcp));
        c->tcp.data = c;
        c->creq.data = c;
        CHECK_UV(uv_tcp_connect(&c->creq, &c->tcp, (struct sockaddr *)&addr, ovf_connected));
    }
    /* Every client is written and read back, every server side sees EOF and closes. */
    run_until(&loop, &ovf_closed, 2 * OVF_CONNS);
    CHECK(ovf_echoed == OVF_CONNS && ovf_accepted == OVF_CONNS);
    uv_close((uv_handle_t *)&ovf_listener, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);

    /* Read the statistics the channel prints at its end. */
    CHECK(pipe(errpipe) == 0);
    fflush(stderr);
    saved_err = dup(2);
    CHECK(dup2(errpipe[1], 2) == 2);
    CHECK_UV(uv_loop_close(&loop));
    fflush(stderr);
    CHECK(dup2(saved_err, 2) == 2);
    close(errpipe[1]);
    while ((n = read(errpipe[0], stats + len, sizeof stats - 1 - len)) > 0) len += (size_t)n;
    stats[len] = 0;
    close(errpipe[0]);
    const char *o = strstr(stats, "cq_overflows=");
    CHECK(o != NULL);
    unsigned long long ovf = strtoull(o + strlen("cq_overflows="), NULL, 10);
    CHECK(ovf > 0); /* the test did what it is named for */
    printf("cq_overflow: ok (%d connections echoed, %llu CQ overflows survived)\n", OVF_CONNS,
           ovf);
    return 0;
}


/* ---- tcp: streams through completions ---------------------------------------------- */

#define TCP_CHUNK 65536
#define TCP_CHUNKS 64 /* 4 MiB */

struct tside {
    uv_tcp_t tcp;
    uv_shutdown_t sreq;
    char rbuf[1000]; /* small: one channel buffer spans several read_cb calls */
    size_t got;
    int eof, shut, closed, paused;
};
static struct tside t_srv, t_cli;
static uv_tcp_t t_listener;
static uv_write_t t_wreq[TCP_CHUNKS], t_reply_req;
static char *t_data;
static int t_wdone[TCP_CHUNKS], t_worder, t_bad_order, t_listener_closed;
static uv_timer_t t_timer;
static char t_reply[100];

static char t_byte(size_t i) {
    return (char)('A' + (i * 31 + i / 7) % 53);
}
static void t_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b) {
    struct tside *t = h->data;
    (void)sz;
    *b = uv_buf_init(t->rbuf, sizeof t->rbuf);
}
static void t_closed(uv_handle_t *h) {
    struct tside *t = h->data;
    if (t) t->closed++;
    else t_listener_closed++;
}
static void t_written(uv_write_t *w, int status) {
    int i = (int)(w - t_wreq);
    CHECK_UV(status);
    if (i != t_worder) t_bad_order++;
    t_worder++;
    t_wdone[i] = 1;
}
static void t_srv_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b);
static void t_resume(uv_timer_t *tm) {
    (void)tm;
    t_srv.paused = 2;
    CHECK_UV(uv_read_start((uv_stream_t *)&t_srv.tcp, t_alloc, t_srv_read));
}
static void t_reply_written(uv_write_t *w, int status) {
    (void)w;
    CHECK_UV(status);
}
static void t_srv_shut(uv_shutdown_t *r, int status) {
    (void)r;
    CHECK_UV(status);
    t_srv.shut = 1;
}
static void t_srv_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
    if (n == UV_EOF) {
        t_srv.eof = 1;
        uv_buf_t rb = uv_buf_init(t_reply, sizeof t_reply);
        CHECK_UV(uv_write(&t_reply_req, s, &rb, 1, t_reply_written));
        CHECK_UV(uv_shutdown(&t_srv.sreq, s, t_srv_shut));
        return;
    }
    CHECK(n > 0);
    for (ssize_t i = 0; i < n; i++)
        if (b->base[i] != t_byte(t_srv.got + (size_t)i)) {
            fprintf(stderr, "tcp: byte %zu differs\n", t_srv.got + (size_t)i);
            exit(1);
        }
    t_srv.got += (size_t)n;
    if (t_srv.paused == 0 && t_srv.got >= TCP_CHUNK * 8) {
        /* stop reading for 20 ms in the middle of the stream */
        t_srv.paused = 1;
        CHECK_UV(uv_read_stop(s));
        CHECK_UV(uv_timer_start(&t_timer, t_resume, 20, 0));
    }
}
static void t_on_conn(uv_stream_t *l, int status) {
    CHECK_UV(status);
    CHECK_UV(uv_tcp_init(l->loop, &t_srv.tcp));
    t_srv.tcp.data = &t_srv;
    CHECK_UV(uv_accept(l, (uv_stream_t *)&t_srv.tcp));
    CHECK_UV(uv_read_start((uv_stream_t *)&t_srv.tcp, t_alloc, t_srv_read));
}
static void t_cli_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
    (void)s;
    if (n == UV_EOF) {
        t_cli.eof = 1;
        return;
    }
    CHECK(n > 0);
    CHECK(t_cli.got + (size_t)n <= sizeof t_reply);
    CHECK(memcmp(b->base, t_reply + t_cli.got, (size_t)n) == 0);
    t_cli.got += (size_t)n;
}
static void t_cli_shut(uv_shutdown_t *r, int status) {
    (void)r;
    CHECK_UV(status);
    t_cli.shut = 1;
}
static uv_connect_t t_creq;
static int t_cancel_seen;
static void t_written_any(uv_write_t *w, int status) {
    int i = (int)(w - t_wreq);
    CHECK(status == 0 || status == UV_ECANCELED);
    if (status == UV_ECANCELED) t_cancel_seen++;
    if (i != t_worder) t_bad_order++;
    t_worder++;
}
static void t_closed_after_writes(uv_handle_t *h) {
    CHECK(t_worder == TCP_CHUNKS); /* every write callback came first */
    t_closed(h);
}
static void t_connected_noread(uv_connect_t *r, int status) {
    CHECK_UV(status);
    for (int i = 0; i < TCP_CHUNKS; i++) {
        uv_buf_t b = uv_buf_init(t_data + (size_t)i * TCP_CHUNK, TCP_CHUNK);
        CHECK_UV(uv_write(&t_wreq[i], r->handle, &b, 1, t_written_any));
    }
}
static void t_connected(uv_connect_t *r, int status) {
    uv_stream_t *s = r->handle;
    CHECK_UV(status);
    /* uv_try_write while nothing is queued: written at once */
    uv_buf_t first = uv_buf_init(t_data, 10);
    int n = uv_try_write(s, &first, 1);
    CHECK(n == 10);
    for (int i = 0; i < TCP_CHUNKS; i++) {
        size_t off = 10 + (size_t)i * TCP_CHUNK;
        size_t len = i == TCP_CHUNKS - 1 ? TCP_CHUNK - 10 : TCP_CHUNK;
        uv_buf_t b[2] = {uv_buf_init(t_data + off, (unsigned)(len / 2)),
                         uv_buf_init(t_data + off + len / 2, (unsigned)(len - len / 2))};
        CHECK_UV(uv_write(&t_wreq[i], s, b, 2, t_written));
    }
    /* with writes queued, uv_try_write must not jump the queue */
    CHECK(uv_try_write(s, &first, 1) == UV_EAGAIN);
    CHECK(s->write_queue_size > 0);
    CHECK_UV(uv_shutdown(&t_cli.sreq, s, t_cli_shut));
    CHECK_UV(uv_read_start(s, t_alloc, t_cli_read));
}

/* the channel's counters, printed by MP_STATS=1 when the loop closes */
static unsigned long long close_loop_stat(uv_loop_t *loop, const char *key) {
    int errpipe[2], saved;
    char out[8192];
    size_t len = 0;
    ssize_t n;
    CHECK(pipe(errpipe) == 0);
    fflush(stderr);
    saved = dup(2);
    CHECK(dup2(errpipe[1], 2) == 2);
    CHECK_UV(uv_loop_close(loop));
    fflush(stderr);
    CHECK(dup2(saved, 2) == 2);
    close(saved);
    close(errpipe[1]);
    while ((n = read(errpipe[0], out + len, sizeof out - 1 - len)) > 0) len += (size_t)n;
    out[len] = 0;
    close(errpipe[0]);
    const char *p = strstr(out, key);
    CHECK(p != NULL);
    return strtoull(p + strlen(key), NULL, 10);
}

static int case_tcp(int completions) {
    struct sockaddr_in addr;
    int namelen = sizeof addr;
    uv_loop_t loop;

    setenv("UV_USE_MEGAPIPE", "1", 1);
    setenv("UV_MEGAPIPE_TCP", completions ? "1" : "0", 1);
    setenv("MP_STATS", "1", 1);
    t_data = malloc((size_t)TCP_CHUNKS * TCP_CHUNK);
    CHECK(t_data != NULL);
    for (size_t i = 0; i < (size_t)TCP_CHUNKS * TCP_CHUNK; i++) t_data[i] = t_byte(i);
    for (size_t i = 0; i < sizeof t_reply; i++) t_reply[i] = (char)('a' + i % 26);
    CHECK_UV(uv_loop_init(&loop));
    CHECK(count_uring_fds() == 1);
    CHECK_UV(uv_timer_init(&loop, &t_timer));
    CHECK_UV(uv_tcp_init(&loop, &t_listener));
    CHECK_UV(uv_ip4_addr("127.0.0.1", 0, &addr));
    CHECK_UV(uv_tcp_bind(&t_listener, (struct sockaddr *)&addr, 0));
    CHECK_UV(uv_tcp_getsockname(&t_listener, (struct sockaddr *)&addr, &namelen));
    CHECK_UV(uv_listen((uv_stream_t *)&t_listener, 16, t_on_conn));
    CHECK_UV(uv_tcp_init(&loop, &t_cli.tcp));
    t_cli.tcp.data = &t_cli;
    CHECK_UV(uv_tcp_connect(&t_creq, &t_cli.tcp, (struct sockaddr *)&addr, t_connected));
    for (int i = 0; i < 200000 && !(t_cli.eof && t_srv.shut && t_cli.shut); i++)
        uv_run(&loop, UV_RUN_ONCE);
    CHECK(t_cli.eof && t_srv.shut && t_cli.shut && t_srv.eof);
    CHECK(t_srv.got == (size_t)TCP_CHUNKS * TCP_CHUNK);
    CHECK(t_srv.paused == 2);
    CHECK(t_cli.got == sizeof t_reply);
    CHECK(t_worder == TCP_CHUNKS && t_bad_order == 0);
    CHECK(t_cli.tcp.write_queue_size == 0);
    /* uv_fileno works on a stream of the channel */
    uv_os_fd_t fd;
    CHECK_UV(uv_fileno((uv_handle_t *)&t_srv.tcp, &fd));
    CHECK(fd >= 0);

    uv_close((uv_handle_t *)&t_srv.tcp, t_closed);
    uv_close((uv_handle_t *)&t_cli.tcp, t_closed);
    for (int i = 0; i < 1000 && !(t_srv.closed && t_cli.closed); i++) uv_run(&loop, UV_RUN_ONCE);
    CHECK(t_srv.closed == 1 && t_cli.closed == 1);

    /* Close with writes in flight (a peer that does not read): every write callback runs (done
     * or UV_ECANCELED), in order, and only then the close callback. */
    memset(&t_srv, 0, sizeof t_srv);
    memset(&t_cli, 0, sizeof t_cli);
    t_worder = 0;
    CHECK_UV(uv_tcp_init(&loop, &t_cli.tcp));
    t_cli.tcp.data = &t_cli;
    CHECK_UV(uv_tcp_connect(&t_creq, &t_cli.tcp, (struct sockaddr *)&addr, t_connected_noread));
    for (int i = 0; i < 100000 && !t_srv.tcp.data; i++) uv_run(&loop, UV_RUN_ONCE);
    CHECK(t_srv.tcp.data == &t_srv);
    CHECK(uv_read_stop((uv_stream_t *)&t_srv.tcp) == 0); /* the server never reads */
    for (int i = 0; i < 20; i++) uv_run(&loop, UV_RUN_NOWAIT);
    CHECK(t_worder < TCP_CHUNKS); /* the socket buffers are full: writes are in flight */
    t_cancel_seen = 0;
    uv_close((uv_handle_t *)&t_cli.tcp, t_closed_after_writes);
    for (int i = 0; i < 1000 && !t_cli.closed; i++) uv_run(&loop, UV_RUN_ONCE);
    CHECK(t_cli.closed == 1 && t_worder == TCP_CHUNKS && t_bad_order == 0 && t_cancel_seen > 0);
    uv_close((uv_handle_t *)&t_srv.tcp, t_closed);
    uv_close((uv_handle_t *)&t_listener, t_closed);
    uv_close((uv_handle_t *)&t_timer, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(t_srv.closed == 1 && t_cli.closed == 1 && t_listener_closed == 1);
    unsigned long long peak = close_loop_stat(&loop, "peak=");
    free(t_data);
    /* Completions: the data came through the channel's buffers; readiness: never. */
    if (completions ? peak == 0 : peak != 0) {
        fprintf(stderr, "tcp: buffered-read peak %llu with UV_MEGAPIPE_TCP=%d\n", peak, completions);
        return 1;
    }
    printf("tcp: ok (%s: 4 MiB in 64 ordered writes, try_write, read stop/start, shutdown both "
           "ways, close; channel buffers peak %llu)\n",
           completions ? "completions" : "readiness", peak);
    return 0;
}


/* ---- reuseport: loops on several threads listening on one address ------------------- */

#define RP_PER_CPU 50

struct rp_loop {
    uv_loop_t loop;
    uv_tcp_t listener;
    uv_async_t stop;
    int cpu, fd, accepted, echoed;
    uv_barrier_t *ready;
};
struct rp_conn {
    uv_tcp_t tcp;
    uv_write_t w;
    char buf[8];
    struct rp_loop *owner;
};
static uint16_t rp_port;

static void rp_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b) {
    struct rp_conn *c = h->data;
    (void)sz;
    *b = uv_buf_init(c->buf, sizeof c->buf);
}
static void rp_free(uv_handle_t *h) {
    free(h->data);
}
static void rp_written(uv_write_t *w, int status) {
    (void)w;
    (void)status;
}
static void rp_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
    struct rp_conn *c = s->data;
    if (n <= 0) {
        uv_close((uv_handle_t *)s, rp_free);
        return;
    }
    /* answer with the CPU of the loop that accepted */
    c->buf[0] = (char)('0' + c->owner->cpu);
    uv_buf_t o = uv_buf_init(b->base, 1);
    CHECK_UV(uv_write(&c->w, s, &o, 1, rp_written));
    c->owner->echoed++;
}
static void rp_on_conn(uv_stream_t *l, int status) {
    struct rp_loop *r = l->data;
    CHECK_UV(status);
    struct rp_conn *c = calloc(1, sizeof *c);
    CHECK(c != NULL);
    c->owner = r;
    CHECK_UV(uv_tcp_init(l->loop, &c->tcp));
    c->tcp.data = c;
    CHECK_UV(uv_accept(l, (uv_stream_t *)&c->tcp));
    CHECK_UV(uv_read_start((uv_stream_t *)&c->tcp, rp_alloc, rp_read));
    r->accepted++;
}
static void rp_close_all(uv_handle_t *h, void *arg) {
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, h->type == UV_TCP && h->data && ((struct rp_conn *)h->data)->owner ? rp_free : NULL);
}
static void rp_on_stop(uv_async_t *a) {
    uv_walk(a->loop, rp_close_all, NULL);
}
static int rp_socket(void) {
    struct sockaddr_in a;
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    CHECK(fd >= 0);
    CHECK(setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) == 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(rp_port);
    CHECK(bind(fd, (struct sockaddr *)&a, sizeof a) == 0);
    if (rp_port == 0) {
        socklen_t l = sizeof a;
        CHECK(getsockname(fd, (struct sockaddr *)&a, &l) == 0);
        rp_port = ntohs(a.sin_port);
    }
    return fd;
}
static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    CHECK(pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0);
}
static void rp_thread(void *arg) {
    struct rp_loop *r = arg;
    pin(r->cpu);
    CHECK_UV(uv_loop_init(&r->loop));
    CHECK_UV(uv_tcp_init(&r->loop, &r->listener));
    r->listener.data = r;
    CHECK_UV(uv_tcp_open(&r->listener, r->fd));
    CHECK_UV(uv_listen((uv_stream_t *)&r->listener, 128, rp_on_conn));
    CHECK_UV(uv_async_init(&r->loop, &r->stop, rp_on_stop));
    uv_barrier_wait(r->ready);
    uv_run(&r->loop, UV_RUN_DEFAULT);
    CHECK_UV(uv_loop_close(&r->loop));
}
/* n blocking connections from a thread pinned to cpu; returns how many the loop of that CPU
 * answered */
struct rp_client {
    int cpu, same, other;
};
static void rp_client(void *arg) {
    struct rp_client *k = arg;
    struct sockaddr_in a;
    pin(k->cpu);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(rp_port);
    for (int i = 0; i < RP_PER_CPU; i++) {
        char c = 'x';
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        CHECK(fd >= 0);
        CHECK(connect(fd, (struct sockaddr *)&a, sizeof a) == 0);
        CHECK(write(fd, &c, 1) == 1);
        CHECK(read(fd, &c, 1) == 1);
        if (c == '0' + k->cpu) k->same++;
        else k->other++;
        close(fd);
    }
}

static int case_reuseport(void) {
    struct rp_loop r[2];
    struct rp_client k[2];
    uv_thread_t lt[2], ct[2];
    uv_barrier_t ready;
    cpu_set_t all;

    CHECK(sched_getaffinity(0, sizeof all, &all) == 0);
    if (!CPU_ISSET(0, &all) || !CPU_ISSET(1, &all)) {
        printf("reuseport: SKIP (needs CPUs 0 and 1)\n");
        return 77;
    }
    setenv("UV_USE_MEGAPIPE", "1", 1);
    CHECK_UV(uv_barrier_init(&ready, 3));
    memset(r, 0, sizeof r);
    for (int i = 0; i < 2; i++) {
        r[i].cpu = i;
        r[i].fd = rp_socket();
        r[i].ready = &ready;
        CHECK_UV(uv_thread_create(&lt[i], rp_thread, &r[i]));
    }
    uv_barrier_wait(&ready);
    memset(k, 0, sizeof k);
    for (int i = 0; i < 2; i++) {
        k[i].cpu = i;
        CHECK_UV(uv_thread_create(&ct[i], rp_client, &k[i]));
    }
    for (int i = 0; i < 2; i++) CHECK_UV(uv_thread_join(&ct[i]));
    for (int i = 0; i < 2; i++) CHECK_UV(uv_async_send(&r[i].stop));
    for (int i = 0; i < 2; i++) CHECK_UV(uv_thread_join(&lt[i]));
    uv_barrier_destroy(&ready);
    printf("reuseport: loop on CPU 0 accepted %d, CPU 1 %d; clients on CPU 0 answered by CPU 0: "
           "%d/%d, on CPU 1 by CPU 1: %d/%d\n", r[0].accepted, r[1].accepted, k[0].same,
           RP_PER_CPU, k[1].same, RP_PER_CPU);
    CHECK(r[0].accepted + r[1].accepted == 2 * RP_PER_CPU);
    CHECK(r[0].echoed + r[1].echoed == 2 * RP_PER_CPU);
    /* partitioned: each loop takes the connections whose SYN its CPU handled */
    CHECK(k[0].same == RP_PER_CPU && k[1].same == RP_PER_CPU);
    printf("reuseport: ok\n");
    return 0;
}

/* ---- exclusive accept by default, shared when the listener may be ------------------------ */

/* A listening loop on its own thread, counting the connections it accepts.  Commands run on
 * the loop's thread (uv_async). */
enum { SH_BIND, SH_BIND_SINGLE, SH_OPEN };

struct sh_srv {
    uv_loop_t loop;
    uv_tcp_t tcp;
    uv_async_t cmd;
    void (*cmd_fn)(struct sh_srv *);
    uv_sem_t ready, done;
    uv_thread_t th;
    int mode;
    int fd;          /* SH_OPEN: the socket to uv_tcp_open; otherwise out: the listener's fd */
    uint16_t port;   /* out */
    int ipc_fd;      /* for sh_cmd_send: our end of a unix socket pair */
    uv_pipe_t ipc;
    int have_ipc;
    uv_write_t wr;
    volatile int accepted;
};

static void sh_free_cb(uv_handle_t *h) { free(h); }

static void sh_on_conn(uv_stream_t *server, int status) {
    struct sh_srv *s = server->data;
    uv_tcp_t *c;
    CHECK(status == 0);
    c = malloc(sizeof *c);
    CHECK(c != NULL);
    CHECK_UV(uv_tcp_init(&s->loop, c));
    CHECK_UV(uv_accept(server, (uv_stream_t *)c));
    uv_close((uv_handle_t *)c, sh_free_cb);
    __atomic_add_fetch(&s->accepted, 1, __ATOMIC_SEQ_CST);
}

static void sh_on_cmd(uv_async_t *a) {
    struct sh_srv *s = a->data;
    if (s->cmd_fn) s->cmd_fn(s);
    uv_sem_post(&s->done);
}

static void sh_thread(void *arg) {
    struct sh_srv *s = arg;
    struct sockaddr_in a;
    int len = sizeof a;
    uv_os_fd_t fd;
    CHECK_UV(uv_loop_init(&s->loop));
    CHECK_UV(uv_tcp_init(&s->loop, &s->tcp));
    s->tcp.data = s;
    if (s->mode == SH_OPEN) {
        CHECK_UV(uv_tcp_open(&s->tcp, s->fd));
    } else {
        CHECK_UV(uv_ip4_addr("127.0.0.1", 0, &a));
        CHECK_UV(uv_tcp_bind(&s->tcp, (const struct sockaddr *)&a, 0));
        if (s->mode == SH_BIND_SINGLE) CHECK_UV(uv_tcp_simultaneous_accepts(&s->tcp, 0));
    }
    CHECK_UV(uv_listen((uv_stream_t *)&s->tcp, 128, sh_on_conn));
    CHECK_UV(uv_fileno((uv_handle_t *)&s->tcp, &fd));
    s->fd = fd;
    CHECK_UV(uv_tcp_getsockname(&s->tcp, (struct sockaddr *)&a, &len));
    s->port = ntohs(a.sin_port);
    CHECK_UV(uv_async_init(&s->loop, &s->cmd, sh_on_cmd));
    s->cmd.data = s;
    uv_sem_post(&s->ready);
    CHECK(uv_run(&s->loop, UV_RUN_DEFAULT) == 0);
    CHECK_UV(uv_loop_close(&s->loop));
}

/* f on the loop's thread, waited for.  The loop has waited on its channel since the
 * previous command, so whatever that queued (the accepts of uv_listen) is in the kernel. */
static void sh_run(struct sh_srv *s, void (*f)(struct sh_srv *)) {
    s->cmd_fn = f;
    CHECK_UV(uv_async_send(&s->cmd));
    uv_sem_wait(&s->done);
}

static void sh_cmd_nothing(struct sh_srv *s) { (void)s; }

static void sh_cmd_send(struct sh_srv *s) {
    uv_buf_t b = uv_buf_init("L", 1);
    CHECK_UV(uv_pipe_init(&s->loop, &s->ipc, 1));
    CHECK_UV(uv_pipe_open(&s->ipc, s->ipc_fd));
    s->have_ipc = 1;
    CHECK_UV(uv_write2(&s->wr, (uv_stream_t *)&s->ipc, &b, 1, (uv_stream_t *)&s->tcp, NULL));
}

static void sh_cmd_stop(struct sh_srv *s) {
    uv_close((uv_handle_t *)&s->tcp, NULL);
    uv_close((uv_handle_t *)&s->cmd, NULL);
    if (s->have_ipc) uv_close((uv_handle_t *)&s->ipc, NULL);
}

static void sh_start(struct sh_srv *s, int mode, int fd) {
    memset(s, 0, sizeof *s);
    s->mode = mode;
    s->fd = fd;
    CHECK_UV(uv_sem_init(&s->ready, 0));
    CHECK_UV(uv_sem_init(&s->done, 0));
    CHECK_UV(uv_thread_create(&s->th, sh_thread, s));
    uv_sem_wait(&s->ready);
    sh_run(s, sh_cmd_nothing); /* its accepts are armed */
}

static void sh_stop(struct sh_srv *s) {
    sh_run(s, sh_cmd_stop);
    CHECK_UV(uv_thread_join(&s->th));
    uv_sem_destroy(&s->ready);
    uv_sem_destroy(&s->done);
}

#define SH_N 40

/* SH_N connections one after another, each until a or b accepted it; *ga, *gb: how many
 * each took. */
static void sh_connect(struct sh_srv *a, struct sh_srv *b, int *ga, int *gb) {
    int a0 = __atomic_load_n(&a->accepted, __ATOMIC_SEQ_CST);
    int b0 = __atomic_load_n(&b->accepted, __ATOMIC_SEQ_CST);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons(a->port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int i = 0; i < SH_N; i++) {
        int before = a->accepted + b->accepted, c, w;
        c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        CHECK(c >= 0);
        CHECK(connect(c, (struct sockaddr *)&sa, sizeof sa) == 0);
        for (w = 0; w < 3000 && __atomic_load_n(&a->accepted, __ATOMIC_SEQ_CST) +
                                        __atomic_load_n(&b->accepted, __ATOMIC_SEQ_CST) == before; w++)
            usleep(1000);
        CHECK(w < 3000); /* accepted by one of them within 3 s */
        close(c);
    }
    *ga = __atomic_load_n(&a->accepted, __ATOMIC_SEQ_CST) - a0;
    *gb = __atomic_load_n(&b->accepted, __ATOMIC_SEQ_CST) - b0;
}

static void sh_send(struct sh_srv *a);

/* Listener a (mode); b accepts from the same socket through a dup (uv_tcp_open: one-shot
 * accepts, like a process that received it over IPC).  a's accepts are armed first, so an
 * exclusive a (one multishot, first in the socket's wait queue) leaves b next to nothing,
 * while a shared one takes turns with b.  change: what happens between the two rounds
 * (NULL: nothing).  Returns through *r the four counts: a, b before; a, b after. */
static void sh_scenario(int mode, void (*change)(struct sh_srv *), int r[4]) {
    struct sh_srv a, b;
    int sv[2] = {-1, -1};
    sh_start(&a, mode, -1);
    sh_start(&b, SH_OPEN, fcntl(a.fd, F_DUPFD_CLOEXEC, 0));
    b.port = a.port;
    sh_connect(&a, &b, &r[0], &r[1]);
    if (change == sh_send) {
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        a.ipc_fd = sv[0];
    }
    if (change) change(&a);
    sh_connect(&a, &b, &r[2], &r[3]);
    sh_stop(&a);
    sh_stop(&b);
    if (sv[1] >= 0) close(sv[1]);
}

/* run on the test's own thread: a fork() (the child leaves at once) */
static void sh_fork(struct sh_srv *a) {
    (void)a;
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) _exit(0);
    CHECK(child_status(pid) == 0);
}

static void sh_send(struct sh_srv *a) { sh_run(a, sh_cmd_send); }

static int shared_ok(int na, int nb) { return na >= SH_N / 4 && nb >= SH_N / 4; }
static int excl_ok(int na, int nb) { return na > SH_N - SH_N / 4 && nb < SH_N / 4; }

static int case_share(void) {
    int r[4];
    setenv("UV_USE_MEGAPIPE", "1", 1);

    /* bound here: exclusive; uv_write2 of it: shared from then on */
    sh_scenario(SH_BIND, sh_send, r);
    printf("share: uv_tcp_bind'ed listener a vs b: a %d, b %d; after uv_write2 of a: a %d, b %d\n",
           r[0], r[1], r[2], r[3]);
    CHECK(excl_ok(r[0], r[1]));
    CHECK(shared_ok(r[2], r[3]));

    /* bound here: exclusive; a fork() in the parent: shared from then on */
    sh_scenario(SH_BIND, sh_fork, r);
    printf("share: uv_tcp_bind'ed listener a vs b: a %d, b %d; after fork(): a %d, b %d\n",
           r[0], r[1], r[2], r[3]);
    CHECK(excl_ok(r[0], r[1]));
    CHECK(shared_ok(r[2], r[3]));

    /* opened from an fd (uv_tcp_open): shared from birth */
    {
        struct sockaddr_in sa;
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        CHECK(fd >= 0);
        CHECK_UV(uv_ip4_addr("127.0.0.1", 0, &sa));
        CHECK(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
        struct sh_srv a, b;
        sh_start(&a, SH_OPEN, fd);
        sh_start(&b, SH_OPEN, fcntl(a.fd, F_DUPFD_CLOEXEC, 0));
        b.port = a.port;
        sh_connect(&a, &b, &r[0], &r[1]);
        sh_stop(&a);
        sh_stop(&b);
        printf("share: uv_tcp_open'ed listener a vs b: a %d, b %d\n", r[0], r[1]);
        CHECK(shared_ok(r[0], r[1]));
    }

    /* uv_tcp_simultaneous_accepts(h, 0): one-shot accepts */
    sh_scenario(SH_BIND_SINGLE, NULL, r);
    printf("share: uv_tcp_bind'ed listener with simultaneous accepts off a vs b: a %d, b %d\n",
           r[0], r[1]);
    CHECK(shared_ok(r[0], r[1]));

    /* UV_MEGAPIPE_EXCLUSIVE_ACCEPT=0: one-shot accepts */
    setenv("UV_MEGAPIPE_EXCLUSIVE_ACCEPT", "0", 1);
    sh_scenario(SH_BIND, NULL, r);
    unsetenv("UV_MEGAPIPE_EXCLUSIVE_ACCEPT");
    printf("share: UV_MEGAPIPE_EXCLUSIVE_ACCEPT=0, uv_tcp_bind'ed listener a vs b: a %d, b %d\n",
           r[0], r[1]);
    CHECK(shared_ok(r[0], r[1]));
    printf("share: ok\n");
    return 0;
}

/* ---- seccomp ------------------------------------------------------------------------- */

static void deny_io_uring(void) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_enter, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
    };
    struct sock_fprog prog = {.len = sizeof f / sizeof f[0], .filter = f};
    CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0);
    CHECK(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) == 0);
}

static int case_seccomp(void) {
    int errpipe[2];
    char out[4096];
    size_t len = 0;
    ssize_t n;
    pid_t pid;

    CHECK(pipe(errpipe) == 0);
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        uv_loop_t a, b;
        close(errpipe[0]);
        CHECK(dup2(errpipe[1], 2) == 2);
        deny_io_uring();
        setenv("UV_USE_MEGAPIPE", "1", 1);
        CHECK_UV(uv_loop_init(&a));
        CHECK_UV(uv_loop_init(&b));
        CHECK(count_uring_fds() == 0);
        pipe_echo(&a, 0); /* stock: its epoll set is used */
        loop_features(&a);
        pipe_echo(&b, 0);
        CHECK_UV(uv_loop_close(&a));
        CHECK_UV(uv_loop_close(&b));
        _exit(0);
    }
    close(errpipe[1]);
    while ((n = read(errpipe[0], out + len, sizeof out - 1 - len)) > 0) len += (size_t)n;
    out[len] = 0;
    close(errpipe[0]);
    int st = child_status(pid);
    fputs(out, stderr);
    CHECK(st == 0);
    /* The fallback is logged, once for the two loops. */
    const char *first = strstr(out, "UV_USE_MEGAPIPE=1 but io_uring is unavailable");
    CHECK(first != NULL);
    CHECK(strstr(first + 1, "UV_USE_MEGAPIPE=1 but io_uring is unavailable") == NULL);
    printf("seccomp: ok (fell back to stock, logged once)\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s switch|fork|setuid|fd_reuse|cq_overflow|seccomp|tcp|tcp_readiness|reuseport\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    if (!strcmp(argv[1], "switch")) return case_switch();
    if (!strcmp(argv[1], "fork")) return case_fork();
    if (!strcmp(argv[1], "setuid")) return case_setuid();
    if (!strcmp(argv[1], "fd_reuse")) return case_fd_reuse();
    if (!strcmp(argv[1], "cq_overflow")) return case_cq_overflow();
    if (!strcmp(argv[1], "seccomp")) return case_seccomp();
    if (!strcmp(argv[1], "tcp")) return case_tcp(1);
    if (!strcmp(argv[1], "reuseport")) return case_reuseport();
    if (!strcmp(argv[1], "tcp_readiness")) return case_tcp(0);
    if (!strcmp(argv[1], "share")) return case_share();
    fprintf(stderr, "unknown case %s\n", argv[1]);
    return 2;
}
