/* stream_semantics — what a TCP connection must look like to a program in stream mode
 * (MEGAPIPE_STREAMS=1): the same as the kernel's socket.  One process is both sides: the
 * server side accepts (accept4/accept: under the preload these become streams once an epoll
 * wait on their set happened), the client side is a plain connect()ed socket.
 *
 *   stream_semantics            checks that hold on the kernel's sockets (preload.streams_kernel)
 *   stream_semantics --streams  the same under the preload in stream mode, plus: a write is
 *                               queued (the peer has nothing yet) until the writer's next epoll
 *                               wait hands it to the kernel (preload.streams)
 *
 * Checks: partial reads and readv across receive buffers; MSG_PEEK; FIONREAD; half-close both
 * ways (EPOLLRDHUP, EOF, writing after the peer's FIN); a reset in the middle of the writes
 * surfacing as EPIPE/ECONNRESET on the next call and in SO_ERROR; close sends what was queued;
 * SO_LINGER 0 close drops it and resets the peer; a blocking socket blocks in read and write
 * until the peer acts, and give up at SO_RCVTIMEO/SO_SNDTIMEO (also inherited from the listener);
 * a peer that never reads: writes fail with EAGAIN after a bounded amount,
 * EPOLLOUT is not reported while full, a sendfile then fails with EAGAIN and TCP_NODELAY
 * returns at once (neither waits for that peer), and every accepted byte arrives once the peer
 * reads;
 * sendfile after queued writes keeps the order, for a large range and for small ones (which
 * stream mode copies into its queue) with TCP_CORK set and read back; poll() on a stream; a thread that is not the
 * one waiting on the set writes (sent at once, the waiter is woken) and reads; a process that
 * writes and at once execs, or whose other thread does when the process exits, loses none of
 * the bytes.  Exit 0 when all pass.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int failures;
static bool streams;
static int lfd, ep;
static struct sockaddr_in addr;

#define CHECK(cond, ...)                                                                     \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                  \
            fprintf(stderr, __VA_ARGS__);                                                    \
            fputc('\n', stderr);                                                             \
            failures++;                                                                      \
        }                                                                                    \
    } while (0)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

static void msleep(int ms) {
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000};
    nanosleep(&t, NULL);
}

/* A connected pair: *cli (plain, blocking) and *srv (accepted; in the epoll set with events,
 * data = srv; one wait has happened, so under the preload it is a stream now). */
static void pair(int *cli, int *srv, bool nonblock, uint32_t events) {
    *cli = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(*cli, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("connect");
        exit(1);
    }
    *srv = nonblock ? accept4(lfd, NULL, NULL, SOCK_NONBLOCK) : accept(lfd, NULL, NULL);
    if (*srv < 0) {
        perror("accept");
        exit(1);
    }
    struct epoll_event ev = {.events = events, .data.fd = *srv};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, *srv, &ev) < 0) {
        perror("epoll_ctl");
        exit(1);
    }
    struct epoll_event out[8];
    epoll_wait(ep, out, 8, 0);
}

/* Wait until fd is reported with any of want (in ep), up to ms; the events reported, or 0. */
static uint32_t wait_for(int fd, uint32_t want, int ms) {
    double end = now() + ms / 1000.0;
    do {
        struct epoll_event out[16];
        int left = (int)((end - now()) * 1000);
        int n = epoll_wait(ep, out, 16, left > 0 ? left : 0);
        for (int i = 0; i < n; i++)
            if (out[i].data.fd == fd && (out[i].events & want)) return out[i].events;
    } while (now() < end);
    return 0;
}

static void done(int cli, int srv) {
    epoll_ctl(ep, EPOLL_CTL_DEL, srv, NULL);
    close(srv);
    close(cli);
}

static ssize_t read_full(int fd, char *buf, size_t n, double timeout) {
    size_t got = 0;
    double end = now() + timeout;
    while (got < n && now() < end) {
        ssize_t r = recv(fd, buf + got, n - got, MSG_DONTWAIT);
        if (r > 0) got += (size_t)r;
        else if (r == 0) break;
        else if (errno == EAGAIN) {
            struct pollfd p = {fd, POLLIN, 0};
            poll(&p, 1, 50);
        } else return -1;
    }
    return (ssize_t)got;
}

static void fill(char *b, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) b[i] = (char)((i * 131 + seed * 7 + (i >> 9)) & 0xff);
}

/* An unlinked temporary file holding n bytes of b (for sendfile). */
static int file_with(const char *b, size_t n) {
    char tmpl[] = "/tmp/stream_semantics.XXXXXX";
    int f = mkstemp(tmpl);
    unlink(tmpl);
    CHECK(f >= 0 && write(f, b, n) == (ssize_t)n, "temporary file");
    return f;
}

/* ---------------------------------------------------------------------------------------- */

static void t_partial_reads(void) {
    int c, s;
    pair(&c, &s, true, EPOLLIN);
    enum { N = 20000 };
    static char out[N], in[N];
    fill(out, N, 1);
    CHECK(write(c, out, N) == N, "client write");
    CHECK(wait_for(s, EPOLLIN, 2000) & EPOLLIN, "EPOLLIN for data");
    size_t got = 0;
    double end = now() + 3;
    while (got < N && now() < end) {
        size_t want = got < 100 ? 100 - got : (got < 10000 ? 777 : N - got);
        ssize_t r;
        if (got >= 5000 && got < 12000) { /* readv across buffers */
            struct iovec v[3] = {{in + got, 10}, {in + got + 10, 1000}, {in + got + 1010, 3000}};
            size_t tot = 4010;
            if (got + tot > N) tot = N - got;
            v[2].iov_len = tot > 1010 ? tot - 1010 : 0;
            r = readv(s, v, 3);
        } else {
            r = read(s, in + got, want);
        }
        if (r > 0) {
            CHECK((size_t)r <= want || (got >= 5000 && got < 12000), "read more than asked: %zd", r);
            got += (size_t)r;
        } else if (r < 0 && errno == EAGAIN) {
            wait_for(s, EPOLLIN, 200);
        } else {
            CHECK(0, "read: %zd %s", r, strerror(errno));
            break;
        }
    }
    CHECK(got == N && memcmp(in, out, N) == 0, "partial reads: got %zu of %d, same bytes %d", got, N,
          got == N && memcmp(in, out, N) == 0);
    /* nothing left: EAGAIN, and a level-triggered EPOLLIN is no longer reported */
    char x;
    CHECK(read(s, &x, 1) == -1 && errno == EAGAIN, "empty read: EAGAIN (%s)", strerror(errno));
    CHECK(!(wait_for(s, EPOLLIN, 100) & EPOLLIN), "EPOLLIN while empty");
    done(c, s);
}

static void t_peek_fionread(void) {
    int c, s;
    pair(&c, &s, true, EPOLLIN);
    CHECK(write(c, "abcdef", 6) == 6, "write");
    CHECK(wait_for(s, EPOLLIN, 2000), "EPOLLIN");
    int n = -1;
    double end = now() + 2;
    while (now() < end && (ioctl(s, FIONREAD, &n) < 0 || n < 6)) wait_for(s, EPOLLIN, 20);
    CHECK(n == 6, "FIONREAD %d, want 6", n);
    char b[16] = {0};
    CHECK(recv(s, b, 3, MSG_PEEK) == 3 && memcmp(b, "abc", 3) == 0, "MSG_PEEK 3: %.3s", b);
    CHECK(recv(s, b, 16, MSG_PEEK) == 6 && memcmp(b, "abcdef", 6) == 0, "MSG_PEEK all");
    CHECK(recv(s, b, 2, 0) == 2 && memcmp(b, "ab", 2) == 0, "recv 2 after peek");
    CHECK(ioctl(s, FIONREAD, &n) == 0 && n == 4, "FIONREAD after 2 read: %d", n);
    CHECK(recv(s, b, 16, MSG_PEEK) == 4 && memcmp(b, "cdef", 4) == 0, "peek rest");
    struct sockaddr_in from;
    socklen_t fl = sizeof from;
    CHECK(recvfrom(s, b, 16, 0, (struct sockaddr *)&from, &fl) == 4 && memcmp(b, "cdef", 4) == 0,
          "recvfrom rest");
    CHECK(ioctl(s, FIONREAD, &n) == 0 && n == 0, "FIONREAD empty: %d", n);
    done(c, s);
}

static void t_half_close(void) {
    int c, s;
    pair(&c, &s, true, EPOLLIN | EPOLLRDHUP);
    CHECK(write(c, "hello", 5) == 5, "write");
    CHECK(shutdown(c, SHUT_WR) == 0, "client shutdown");
    char b[16];
    size_t got = 0;
    double end = now() + 2;
    uint32_t seen = 0;
    while (now() < end) {
        seen |= wait_for(s, EPOLLIN | EPOLLRDHUP, 200);
        ssize_t r = read(s, b + got, sizeof b - got);
        if (r > 0) got += (size_t)r;
        else if (r == 0) break;
    }
    CHECK(got == 5 && memcmp(b, "hello", 5) == 0, "data before EOF: %zu", got);
    CHECK(seen & EPOLLRDHUP, "EPOLLRDHUP after the peer's FIN (events %#x)", seen);
    CHECK(read(s, b, sizeof b) == 0, "EOF again");
    /* the other direction still works, then our FIN after it */
    CHECK(write(s, "bye", 3) == 3, "write after peer FIN");
    CHECK(shutdown(s, SHUT_WR) == 0, "server shutdown");
    CHECK(write(s, "x", 1) == -1 && errno == EPIPE, "write after own shutdown: EPIPE (%s)", strerror(errno));
    wait_for(s, EPOLLIN, 50); /* (stream mode: the wait hands the bytes and the FIN over) */
    char r[8];
    CHECK(read_full(c, r, sizeof r, 2) == 3 && memcmp(r, "bye", 3) == 0, "client gets bye + EOF");
    uint32_t ev = wait_for(s, EPOLLHUP, 500);
    CHECK(ev & EPOLLHUP, "EPOLLHUP when both sides are shut (%#x)", ev);
    done(c, s);
}

static void t_reset_mid_write(void) {
    int c, s;
    pair(&c, &s, true, EPOLLOUT);
    static char buf[65536];
    fill(buf, sizeof buf, 3);
    CHECK(write(s, buf, 1000) == 1000, "first write");
    wait_for(s, EPOLLOUT, 100);
    struct linger lg = {1, 0};
    setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(c); /* RST */
    int err = 0;
    double end = now() + 5;
    while (now() < end && !err) {
        ssize_t r = write(s, buf, sizeof buf);
        if (r < 0 && errno != EAGAIN) err = errno;
        else wait_for(s, EPOLLOUT | EPOLLERR, 50);
    }
    CHECK(err == EPIPE || err == ECONNRESET, "write after reset: %s", strerror(err));
    /* it stays failed: the next write too */
    errno = 0;
    CHECK(write(s, buf, 10) == -1 && (errno == EPIPE || errno == ECONNRESET), "next write: %s",
          strerror(errno));
    int so = -1;
    socklen_t l = sizeof so;
    CHECK(getsockopt(s, SOL_SOCKET, SO_ERROR, &so, &l) == 0, "SO_ERROR");
    CHECK(so == 0 || so == ECONNRESET || so == EPIPE, "SO_ERROR %d", so);
    char b[8];
    ssize_t r = read(s, b, sizeof b);
    CHECK(r == 0 || (r < 0 && (errno == ECONNRESET || errno == EPIPE)), "read after reset: %zd %s", r,
          strerror(errno));
    epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL);
    close(s);
}

static void t_reset_surfaces_in_so_error(void) {
    int c, s;
    pair(&c, &s, true, EPOLLIN);
    struct linger lg = {1, 0};
    setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(c);
    uint32_t ev = wait_for(s, EPOLLIN | EPOLLERR | EPOLLHUP, 2000);
    CHECK(ev & (EPOLLERR | EPOLLHUP), "reset reported as EPOLLERR/EPOLLHUP (%#x)", ev);
    int so = -1;
    socklen_t l = sizeof so;
    CHECK(getsockopt(s, SOL_SOCKET, SO_ERROR, &so, &l) == 0 && so == ECONNRESET, "SO_ERROR %d", so);
    char b[8];
    ssize_t r = read(s, b, sizeof b);
    CHECK(r == 0, "read after SO_ERROR took the error: %zd (%s)", r, strerror(errno));
    epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL);
    close(s);
}

static void t_close_flushes(void) {
    int c, s;
    pair(&c, &s, true, EPOLLOUT);
    enum { N = 200000 };
    static char out[N], in[N + 1];
    fill(out, N, 5);
    size_t put = 0;
    double end = now() + 5;
    while (put < N && now() < end) {
        ssize_t r = write(s, out + put, N - put);
        if (r > 0) put += (size_t)r;
        else wait_for(s, EPOLLOUT, 100);
    }
    CHECK(put == N, "queued %zu", put);
    if (streams) {
        /* write-behind: nothing has reached the peer before the writer's next wait */
        char x;
        CHECK(recv(c, &x, 1, MSG_DONTWAIT) == -1 && errno == EAGAIN,
              "stream mode: a write reached the peer before the writer's next wait");
    }
    epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL);
    CHECK(close(s) == 0, "close");
    ssize_t got = read_full(c, in, N + 1, 5); /* to EOF */
    CHECK(got == N && memcmp(in, out, N) == 0, "close sent everything queued: %zd of %d", got, N);
    close(c);
}

static void t_linger0_discards(void) {
    int c, s;
    pair(&c, &s, true, EPOLLOUT);
    int small = 4096;
    setsockopt(c, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    static char buf[65536];
    fill(buf, sizeof buf, 6);
    for (int i = 0; i < 4; i++) (void)write(s, buf, sizeof buf);
    struct linger lg = {1, 0};
    CHECK(setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) == 0, "SO_LINGER");
    epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL);
    CHECK(close(s) == 0, "close");
    struct epoll_event out[8];
    epoll_wait(ep, out, 8, 20); /* (stream mode: the wait runs the close) */
    size_t got = 0;
    int err = 0;
    double end = now() + 5;
    while (now() < end) {
        ssize_t r = recv(c, buf, sizeof buf, 0);
        if (r > 0) got += (size_t)r;
        else {
            if (r < 0) err = errno;
            break;
        }
    }
    CHECK(err == ECONNRESET, "SO_LINGER 0 close resets the peer (got %zu bytes, then %s)", got,
          err ? strerror(err) : "EOF");
    close(c);
}

struct delayed {
    int fd, ms;
    const char *data;
    size_t len;
    size_t drained;
};

static void *send_later(void *p) {
    struct delayed *d = p;
    msleep(d->ms);
    (void)send(d->fd, d->data, d->len, MSG_NOSIGNAL);
    return NULL;
}

static void *drain_later(void *p) {
    struct delayed *d = p;
    msleep(d->ms);
    char buf[65536];
    ssize_t r;
    while ((r = recv(d->fd, buf, sizeof buf, 0)) > 0) d->drained += (size_t)r;
    return NULL;
}

static void t_blocking(void) {
    int c, s;
    pair(&c, &s, false, EPOLLIN);
    /* read blocks until the peer sends */
    struct delayed d = {c, 150, "late", 4, 0};
    pthread_t t;
    pthread_create(&t, NULL, send_later, &d);
    double t0 = now();
    char b[8];
    ssize_t r = read(s, b, sizeof b);
    double took = now() - t0;
    pthread_join(t, NULL);
    CHECK(r == 4 && memcmp(b, "late", 4) == 0, "blocking read: %zd", r);
    CHECK(took >= 0.1, "blocking read returned after %.3f s, before the data was sent", took);
    /* write blocks while the peer does not read, and completes in full once it does */
    enum { N = 8 << 20 };
    char *big = malloc(N);
    fill(big, N, 7);
    struct delayed dr = {c, 300, NULL, 0, 0};
    pthread_create(&t, NULL, drain_later, &dr);
    t0 = now();
    size_t put = 0;
    while (put < N) {
        r = write(s, big + put, N - put);
        if (r <= 0) break;
        put += (size_t)r;
    }
    took = now() - t0;
    CHECK(put == N, "blocking write wrote %zu of %d", put, N);
    CHECK(took >= 0.2, "an 8 MiB blocking write to a peer that reads after 0.3 s took %.3f s", took);
    shutdown(s, SHUT_WR);
    pthread_join(t, NULL);
    CHECK(dr.drained == N, "peer got %zu of %d", dr.drained, N);
    free(big);
    done(c, s);
}

struct timed_io {
    int fd;
    bool write;
    size_t n;
    ssize_t r;
    int err;
    double took;
    volatile bool finished;
};

static void *timed_io(void *p) {
    struct timed_io *t = p;
    char *b = malloc(t->n);
    fill(b, t->n, 3);
    double t0 = now();
    t->r = t->write ? write(t->fd, b, t->n) : read(t->fd, b, t->n);
    t->err = errno;
    t->took = now() - t0;
    t->finished = true;
    free(b);
    return NULL;
}

/* Run t in a thread; if it has not returned within 3 s, say so and let unblock() end it. */
static void run_timed(struct timed_io *t, const char *what, void (*unblock)(int), int arg) {
    pthread_t th;
    pthread_create(&th, NULL, timed_io, t);
    double end = now() + 3;
    while (!t->finished && now() < end) msleep(10);
    CHECK(t->finished, "%s did not time out (still blocked after 3 s)", what);
    if (!t->finished) unblock(arg);
    pthread_join(th, NULL);
}

static void unblock_read(int c) { CHECK(write(c, "x", 1) == 1, "unblocking write"); }
static void unblock_write(int c) {
    static char sink[1 << 16];
    double end = now() + 5;
    while (now() < end && recv(c, sink, sizeof sink, MSG_DONTWAIT) != 0) msleep(1);
}

/* SO_RCVTIMEO / SO_SNDTIMEO on a blocking socket: a read with nothing to read fails with EAGAIN
 * after the timeout; a write to a peer that never reads returns what it took (or EAGAIN) after
 * it.  Set on the connection, and inherited from a listener. */
static void t_timeouts(void) {
    struct timeval tv = {0, 200000};
    int c, s;
    pair(&c, &s, false, EPOLLIN);
    CHECK(setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0, "SO_RCVTIMEO");
    CHECK(setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) == 0, "SO_SNDTIMEO");
    struct timed_io rd = {.fd = s, .n = 16};
    run_timed(&rd, "a read with SO_RCVTIMEO", unblock_read, c);
    CHECK(rd.r < 0 && rd.err == EAGAIN, "timed-out read: %zd (%s)", rd.r, strerror(rd.err));
    CHECK(rd.took >= 0.15 && rd.took < 2.5, "the read waited %.3f s for a 0.2 s timeout", rd.took);
    struct timed_io wr = {.fd = s, .write = true, .n = 64 << 20};
    run_timed(&wr, "a write with SO_SNDTIMEO", unblock_write, c);
    CHECK(wr.r > 0 && (size_t)wr.r < wr.n, "timed-out write took %zd of %zu (%s)", wr.r, wr.n,
          strerror(wr.err));
    CHECK(wr.took >= 0.15 && wr.took < 2.5, "the write waited %.3f s for a 0.2 s timeout", wr.took);
    done(c, s);

    /* inherited: a listener with SO_RCVTIMEO; its accepted connection times out too */
    int l2 = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a2 = addr;
    a2.sin_port = 0;
    socklen_t al = sizeof a2;
    CHECK(bind(l2, (struct sockaddr *)&a2, sizeof a2) == 0 && listen(l2, 4) == 0 &&
              getsockname(l2, (struct sockaddr *)&a2, &al) == 0, "second listener");
    CHECK(setsockopt(l2, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0, "listener SO_RCVTIMEO");
    int keep_l = lfd;
    struct sockaddr_in keep_a = addr;
    lfd = l2;
    addr = a2;
    pair(&c, &s, false, EPOLLIN);
    lfd = keep_l;
    addr = keep_a;
    struct timed_io rd2 = {.fd = s, .n = 16};
    run_timed(&rd2, "a read on a connection accepted from a listener with SO_RCVTIMEO",
              unblock_read, c);
    CHECK(rd2.r < 0 && rd2.err == EAGAIN, "inherited timeout: %zd (%s)", rd2.r, strerror(rd2.err));
    done(c, s);
    close(l2);
}

struct full_try {
    int s, f;
    ssize_t small, large;
    int small_err, large_err, nodelay;
    volatile bool finished;
};

static void *full_try(void *p) {
    struct full_try *t = p;
    off_t o1 = 0, o2 = 0;
    t->small = sendfile(t->s, t->f, &o1, 1000);
    t->small_err = errno;
    t->large = sendfile(t->s, t->f, &o2, 131072);
    t->large_err = errno;
    int one = 1;
    t->nodelay = setsockopt(t->s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    t->finished = true;
    return NULL;
}

static void t_never_reading_peer(void) {
    int c, s;
    pair(&c, &s, true, EPOLLOUT);
    static char buf[65536];
    fill(buf, sizeof buf, 8);
    size_t put = 0;
    bool again = false;
    double end = now() + 10;
    while (!again && now() < end && put < ((size_t)256 << 20)) {
        ssize_t r = write(s, buf, sizeof buf);
        if (r > 0) put += (size_t)r;
        else if (r < 0 && errno == EAGAIN) {
            /* full: EAGAIN until the peer reads, and EPOLLOUT is not reported meanwhile */
            if (!(wait_for(s, EPOLLOUT, 200) & EPOLLOUT)) again = true;
        } else {
            CHECK(0, "write: %s", strerror(errno));
            break;
        }
    }
    CHECK(again, "a peer that never reads: writes never settled at EAGAIN (%zu bytes taken)", put);
    CHECK(put < ((size_t)64 << 20), "a peer that never reads: %zu bytes taken", put);
    errno = 0;
    ssize_t more = write(s, buf, sizeof buf); /* (the kernel's buffers may have grown a bit) */
    if (more > 0) put += (size_t)more;
    else CHECK(errno == EAGAIN, "still EAGAIN (%s)", strerror(errno));
    /* neither a sendfile (small or large) nor TCP_NODELAY waits for that peer: the thread has
     * other connections to serve (a thread, so that a call that blocks fails the check) */
    struct full_try ft = {.s = s, .f = file_with(buf, sizeof buf)};
    CHECK(write(ft.f, buf, sizeof buf) == (ssize_t)sizeof buf, "file write"); /* 128 KiB */
    pthread_t ftt;
    pthread_create(&ftt, NULL, full_try, &ft);
    double e1 = now() + 3;
    while (!ft.finished && now() < e1) msleep(10);
    CHECK(ft.finished, "a sendfile or setsockopt(TCP_NODELAY) blocked on a peer that never reads");
    if (ft.finished) { /* (the kernel's sendfile may still place pages where write could not) */
        CHECK((ft.small < 0 && ft.small_err == EAGAIN) || (!streams && ft.small > 0),
              "small sendfile on a full queue: %zd (%s)", ft.small, strerror(ft.small_err));
        CHECK((ft.large < 0 && ft.large_err == EAGAIN) || (!streams && ft.large > 0),
              "large sendfile on a full queue: %zd (%s)", ft.large, strerror(ft.large_err));
        CHECK(ft.nodelay == 0, "TCP_NODELAY: %d", ft.nodelay);
    }
    /* the peer reads now: everything taken arrives, and EPOLLOUT comes back */
    struct delayed dr = {c, 0, NULL, 0, 0};
    pthread_t t;
    pthread_create(&t, NULL, drain_later, &dr);
    CHECK(wait_for(s, EPOLLOUT, 3000) & EPOLLOUT, "EPOLLOUT once the peer reads");
    shutdown(s, SHUT_WR);
    double e2 = now() + 5;
    while (now() < e2 && dr.drained < put) wait_for(s, EPOLLIN, 50);
    pthread_join(ftt, NULL); /* (a call that blocked has returned: this thread pumped) */
    close(ft.f);
    pthread_join(t, NULL);
    if (ft.small > 0) put += (size_t)ft.small; /* (what the kernel's sendfile took) */
    if (ft.large > 0) put += (size_t)ft.large;
    CHECK(dr.drained == put, "peer got %zu of the %zu bytes taken", dr.drained, put);
    done(c, s);
}

static void t_sendfile_order(void) {
    int c, s;
    pair(&c, &s, true, EPOLLOUT);
    static char fb[100000];
    fill(fb, sizeof fb, 9);
    int f = file_with(fb, sizeof fb);
    CHECK(write(s, "HEAD", 4) == 4, "queued head");
    off_t off = 0;
    size_t sent = 0;
    double end = now() + 5;
    while (sent < sizeof fb && now() < end) {
        ssize_t r = sendfile(s, f, &off, sizeof fb - sent);
        if (r > 0) sent += (size_t)r;
        else if (r < 0 && errno == EAGAIN) wait_for(s, EPOLLOUT, 100);
        else break;
    }
    CHECK(sent == sizeof fb, "sendfile %zu", sent);
    CHECK(write(s, "TAIL", 4) == 4, "queued tail");
    epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL);
    close(s);
    static char in[sizeof fb + 9];
    ssize_t got = read_full(c, in, sizeof in, 5);
    CHECK(got == (ssize_t)sizeof fb + 8 && memcmp(in, "HEAD", 4) == 0 &&
              memcmp(in + 4, fb, sizeof fb) == 0 && memcmp(in + 4 + sizeof fb, "TAIL", 4) == 0,
          "write, sendfile, write arrive in order (%zd bytes)", got);
    close(c);
    close(f);
}

/* A small sendfile (copied into the queue in stream mode) and TCP_CORK as the application set
 * it: order, the offset and the file position as sendfile's, and in stream mode nothing reaches
 * the peer before the writer's next wait. */
static void t_sendfile_small_corked(void) {
    int c, s;
    pair(&c, &s, true, EPOLLOUT);
    static char fb[4000];
    fill(fb, sizeof fb, 5);
    int f = file_with(fb, sizeof fb);
    CHECK(write(s, "HEAD", 4) == 4, "queued head");
    off_t off = 100;
    CHECK(sendfile(s, f, &off, 3000) == 3000, "small sendfile: %s", strerror(errno));
    CHECK(off == 3100, "offset advanced to %lld", (long long)off);
    CHECK(lseek(f, 0, SEEK_CUR) == (off_t)sizeof fb, "file position untouched");
    if (streams) {
        char x[8];
        CHECK(recv(c, x, sizeof x, MSG_DONTWAIT) < 0 && errno == EAGAIN,
              "nothing reached the peer before the wait (the head and the body are queued)");
    }
    int one = 1, v = 0;
    socklen_t vl = sizeof v;
    CHECK(setsockopt(s, IPPROTO_TCP, TCP_CORK, &one, sizeof one) == 0, "cork");
    CHECK(getsockopt(s, IPPROTO_TCP, TCP_CORK, &v, &vl) == 0 && v == 1, "TCP_CORK reads 1: %d", v);
    off = 3900;
    CHECK(sendfile(s, f, &off, 500) == 100, "sendfile past the end is short");
    CHECK(lseek(f, 200, SEEK_SET) == 200, "seek");
    CHECK(sendfile(s, f, NULL, 500) == 500, "sendfile at the file position");
    CHECK(lseek(f, 0, SEEK_CUR) == 700, "file position advanced");
    int zero = 0;
    CHECK(setsockopt(s, IPPROTO_TCP, TCP_CORK, &zero, sizeof zero) == 0, "uncork");
    vl = sizeof v;
    CHECK(getsockopt(s, IPPROTO_TCP, TCP_CORK, &v, &vl) == 0 && v == 0, "TCP_CORK reads 0: %d", v);
    CHECK(write(s, "TAIL", 4) == 4, "queued tail");
    epoll_ctl(ep, EPOLL_CTL_DEL, s, NULL);
    close(s);
    static char in[4 + 3000 + 100 + 500 + 4 + 1], want[sizeof in - 1];
    memcpy(want, "HEAD", 4);
    memcpy(want + 4, fb + 100, 3000);
    memcpy(want + 3004, fb + 3900, 100);
    memcpy(want + 3104, fb + 200, 500);
    memcpy(want + 3604, "TAIL", 4);
    ssize_t got = read_full(c, in, sizeof in, 5);
    CHECK(got == (ssize_t)sizeof want && memcmp(in, want, sizeof want) == 0,
          "head, two small sendfiles, one at the file position, tail arrive in order (%zd bytes)",
          got);
    close(c);
    close(f);
}

/* In a forked child: the connection waiting on lfd, accepted and made a stream of this
 * process (put in an epoll set, one wait). */
static int child_stream(void) {
    int s = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
    int e = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = s};
    epoll_ctl(e, EPOLL_CTL_ADD, s, &ev);
    epoll_wait(e, &ev, 1, 0); /* adopted by this process's channel */
    return s;
}

enum { CHILD_BYTES = 3000 };

/* A forked child runs child(out), which writes the CHILD_BYTES of out to a connection it
 * accepts and ends the process (what: how); this side, the peer, must get every byte and the
 * child's status 0. */
static void expect_from_child(void (*child)(const char *out), unsigned seed, const char *what) {
    int c = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(c, (struct sockaddr *)&addr, sizeof addr) == 0, "connect");
    static char out[CHILD_BYTES], in[CHILD_BYTES + 1];
    fill(out, sizeof out, seed);
    pid_t pid = fork();
    if (pid == 0) {
        child(out);
        _exit(3);
    }
    ssize_t got = read_full(c, in, sizeof in, 5);
    int st = -1;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the child %s (status %#x)", what, st);
    CHECK(got == (ssize_t)sizeof out && memcmp(in, out, sizeof out) == 0,
          "every byte written before the child %s arrived (%zd of %zu)", what, got, sizeof out);
    close(c);
}

/* exec does not lose what was written: the child (its own channel, in stream mode) writes
 * into its queue and execs /bin/true at once. */
static void write_then_exec(const char *out) {
    int s = child_stream();
    if (write(s, out, CHILD_BYTES) != CHILD_BYTES) _exit(2);
    execl("/bin/true", "true", (char *)NULL);
}

static void t_exec_flushes(void) { expect_from_child(write_then_exec, 11, "exec'd /bin/true"); }

static volatile int exit_ready;

static void *write_then_sleep(void *p) {
    int s = child_stream();
    if (write(s, p, CHILD_BYTES) != CHILD_BYTES) _exit(2);
    exit_ready = 1;
    msleep(10000); /* blocked outside the emulation: its queue waits */
    return NULL;
}

/* exit() does not lose what another thread wrote: the child's second thread writes into its
 * stream's queue and sleeps; the main thread calls exit(). */
static void other_thread_then_exit(const char *out) {
    pthread_t t;
    pthread_create(&t, NULL, write_then_sleep, (void *)out);
    while (!exit_ready) msleep(1);
    exit(0);
}

static void t_exit_flushes(void) {
    expect_from_child(other_thread_then_exit, 12, "exited with another thread's bytes queued");
}

struct other {
    int s, c;
    double arrived; /* when the client got the other thread's bytes */
    char got[16];
    ssize_t n;
};

static void *other_writer(void *p) {
    struct other *o = p;
    msleep(50);
    (void)write(o->s, "from-other", 10);
    return NULL;
}

static void *client_reader(void *p) {
    struct other *o = p;
    ssize_t n = read_full(o->c, o->got, 10, 3);
    if (n == 10) o->arrived = now();
    return NULL;
}

static void *other_reader(void *p) {
    struct other *o = p;
    o->n = read(o->s, o->got, sizeof o->got);
    return NULL;
}

/* A stream written and read by a thread that is not the one waiting on its set (the owner):
 * the owner, asleep in epoll_wait, sends the bytes at once; the other thread reads them. */
static void t_other_thread(void) {
    int c, s;
    pair(&c, &s, true, EPOLLIN);
    struct other o = {s, c, 0, {0}, 0};
    pthread_t w, r;
    pthread_create(&r, NULL, client_reader, &o);
    pthread_create(&w, NULL, other_writer, &o);
    double t0 = now();
    struct epoll_event out[4];
    epoll_wait(ep, out, 4, 600); /* nothing for the set: sleeps while the other thread writes */
    pthread_join(w, NULL);
    pthread_join(r, NULL);
    CHECK(o.arrived > 0 && memcmp(o.got, "from-other", 10) == 0, "another thread's write arrived");
    CHECK(o.arrived > 0 && o.arrived - t0 < 0.45,
          "another thread's write waited for the owner's wait to end (%.3f s)", o.arrived - t0);
    CHECK(write(c, "xyz", 3) == 3, "client write");
    CHECK(wait_for(s, EPOLLIN, 2000) & EPOLLIN, "EPOLLIN");
    pthread_create(&r, NULL, other_reader, &o);
    pthread_join(r, NULL);
    CHECK(o.n == 3 && memcmp(o.got, "xyz", 3) == 0, "another thread reads the stream: %zd", o.n);
    done(c, s);
}

static void t_poll(void) {
    int c, s;
    pair(&c, &s, true, EPOLLIN);
    struct pollfd p = {s, POLLIN, 0};
    CHECK(poll(&p, 1, 50) == 0, "poll: nothing yet (%#x)", p.revents);
    CHECK(write(c, "pq", 2) == 2, "write");
    p.revents = 0;
    CHECK(poll(&p, 1, 2000) == 1 && (p.revents & POLLIN), "poll sees the data (%#x)", p.revents);
    char b[4];
    CHECK(read(s, b, 4) == 2, "read");
    p.events = POLLOUT;
    CHECK(poll(&p, 1, 0) == 1 && (p.revents & POLLOUT), "poll POLLOUT");
    done(c, s);
}

struct poller {
    int s;
    int ms, r;
    short revents;
    double cpu; /* the polling thread's CPU time, seconds */
};

static void *poll_other(void *p) {
    struct poller *o = p;
    struct timespec a, b;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    struct pollfd pf = {o->s, POLLIN, 0};
    o->r = poll(&pf, 1, o->ms);
    o->revents = pf.revents;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    o->cpu = (double)(b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    return NULL;
}

/* poll() on a stream from a thread that does not own it, with no other fd: it sleeps between
 * its looks (on the kernel's sockets it sleeps in the kernel), and sees data the owner's wait
 * took in. */
static void t_poll_other_thread(void) {
    int c, s;
    pair(&c, &s, true, EPOLLIN);
    struct poller o = {s, 400, -2, 0, 0};
    pthread_t t;
    pthread_create(&t, NULL, poll_other, &o);
    pthread_join(t, NULL);
    CHECK(o.r == 0, "poll from another thread: nothing (%d, %#x)", o.r, o.revents);
    CHECK(o.cpu < 0.2, "... and it slept: %.3f s of CPU in a 0.4 s poll", o.cpu);
    o = (struct poller){s, 3000, -2, 0, 0};
    pthread_create(&t, NULL, poll_other, &o);
    msleep(50);
    CHECK(write(c, "pq", 2) == 2, "write");
    struct epoll_event out[4];
    epoll_wait(ep, out, 4, 500); /* the owner's wait takes the data in */
    pthread_join(t, NULL);
    CHECK(o.r == 1 && (o.revents & POLLIN), "poll from another thread sees the data (%d, %#x)",
          o.r, o.revents);
    done(c, s);
}

int main(int argc, char **argv) {
    streams = argc > 1 && strcmp(argv[1], "--streams") == 0;
    signal(SIGPIPE, SIG_IGN);
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 64) < 0) {
        perror("listen");
        return 1;
    }
    socklen_t al = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &al);
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct {
        const char *name;
        void (*fn)(void);
    } tests[] = {
        {"partial reads, readv", t_partial_reads},
        {"MSG_PEEK, FIONREAD", t_peek_fionread},
        {"half-close", t_half_close},
        {"reset mid-write", t_reset_mid_write},
        {"reset in SO_ERROR", t_reset_surfaces_in_so_error},
        {"close flushes", t_close_flushes},
        {"SO_LINGER 0", t_linger0_discards},
        {"blocking socket", t_blocking},
        {"SO_RCVTIMEO, SO_SNDTIMEO", t_timeouts},
        {"never-reading peer", t_never_reading_peer},
        {"sendfile order", t_sendfile_order},
        {"small sendfile, TCP_CORK", t_sendfile_small_corked},
        {"exec", t_exec_flushes},
        {"exit with another thread's bytes queued", t_exit_flushes},
        {"poll", t_poll},
        {"another thread", t_other_thread},
        {"poll from another thread", t_poll_other_thread},
    };
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        int before = failures;
        double t0 = now();
        tests[i].fn();
        printf("%s: %s (%.2f s)\n", failures == before ? "ok" : "FAILED", tests[i].name, now() - t0);
        fflush(stdout);
    }
    close(ep);
    close(lfd);
    if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
    return failures ? 1 : 0;
}
