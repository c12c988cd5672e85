/* epoll_echo — a plain epoll echo server for the preload tests (no MegaPipe in it: the
 * preload serves its epoll calls when run under megapipe-run).
 *
 * Level-triggered, non-blocking, one thread.  Each connection has a bounded buffer: while it
 * holds bytes not yet written back, the connection waits for EPOLLOUT and is not read, so a
 * peer that never reads backs up only its own connection.  EOF from the peer (shutdown
 * SHUT_WR) is read only once everything before it was written back: then it closes.  A write
 * error (reset) closes.
 *
 *   epoll_echo [-p PORT] [-b BUFSIZE]   prints "port N" on stdout once listening on 127.0.0.1;
 *                                       SIGTERM/SIGINT: closes everything and exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

struct conn {
    int fd;
    size_t len, off;  /* buf[off..len) still to write back */
    char buf[];
};

static volatile sig_atomic_t stop;
static size_t bufsize = 16384;
static long nconns;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static void conn_close(int ep, struct conn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
    nconns--;
}

static int conn_interest(int ep, struct conn *c)
{
    struct epoll_event ev = {.data.ptr = c};
    ev.events = c->off < c->len ? EPOLLOUT : EPOLLIN;
    return epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Writes back what is buffered; 0 all written, 1 would block, -1 error. */
static int conn_flush(struct conn *c)
{
    while (c->off < c->len) {
        ssize_t n = write(c->fd, c->buf + c->off, c->len - c->off);
        if (n > 0) {
            c->off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 1;
        } else {
            return -1;
        }
    }
    c->off = c->len = 0;
    return 0;
}

static void conn_event(int ep, struct conn *c, unsigned events)
{
    if (c->off < c->len) {  /* waiting for EPOLLOUT (or an error/hang-up to find out) */
        int r = conn_flush(c);
        if (r < 0 || (r == 0 && conn_interest(ep, c) < 0))
            conn_close(ep, c);
        return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        ssize_t n = read(c->fd, c->buf, bufsize);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        if (n <= 0) {  /* EOF or error: nothing left to write back (we only read when empty) */
            conn_close(ep, c);
            return;
        }
        c->off = 0;
        c->len = (size_t)n;
        int r = conn_flush(c);
        if (r < 0) {
            conn_close(ep, c);
        } else if (r == 1 && conn_interest(ep, c) < 0) {
            conn_close(ep, c);
        }
    }
}

int main(int argc, char **argv)
{
    int port = 0, opt;
    while ((opt = getopt(argc, argv, "p:b:h")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'b': bufsize = (size_t)atol(optarg); break;
        default:
            fprintf(stderr, "usage: %s [-p PORT] [-b BUFSIZE]\n"
                            "  level-triggered epoll echo server on 127.0.0.1; prints \"port N\"\n",
                    argv[0]);
            return opt == 'h' ? 0 : 2;
        }
    }
    if (bufsize == 0)
        bufsize = 16384;
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 1024) < 0) {
        perror("epoll_echo: listen");
        return 1;
    }
    socklen_t al = sizeof a;
    getsockname(ls, (struct sockaddr *)&a, &al);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("epoll_echo: epoll_create1");
        return 1;
    }
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev) < 0) {
        perror("epoll_echo: epoll_ctl");
        return 1;
    }
    printf("port %d\n", ntohs(a.sin_port));
    fflush(stdout);

    struct epoll_event evs[64];
    while (!stop) {
        int n = epoll_wait(ep, evs, 64, 500);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_echo: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr) {
                conn_event(ep, evs[i].data.ptr, evs[i].events);
                continue;
            }
            for (;;) {
                int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0)
                    break;
                struct conn *c = calloc(1, sizeof *c + bufsize);
                if (!c) {
                    close(fd);
                    continue;
                }
                c->fd = fd;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
                    perror("epoll_echo: epoll_ctl ADD");
                    close(fd);
                    free(c);
                    continue;
                }
                nconns++;
            }
        }
    }
    fprintf(stderr, "epoll_echo: stopping, %ld connection(s) open\n", nconns);
    close(ep);
    close(ls);
    return 0;
}
