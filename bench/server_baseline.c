/*
 * server_baseline.c — the paper's §2.2 baseline: one listening socket shared by every thread,
 * one thread per core (pinned), each with its own epoll set, non-blocking BSD calls
 * (accept4 / recv / send / close).  Every system call the server makes is counted (SYS()).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "server.h"

#define MAX_EVENTS 256
#define ACCEPT_BURST 64

typedef struct bconn {
    int fd;
    int writing;          /* waiting for EPOLLOUT to finish a response */
    const char *resp;
    size_t resp_len, sent;
    proto_conn pc;
} bconn;

#define SYS(w, call) ((w)->app_syscalls++, (call))

static int listener_marker; /* epoll data.ptr of the shared listening socket */

int baseline_prepare(srv_config *cfg, srv_worker *w) {
    (void)cfg;
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (w->epfd < 0) {
        perror("epoll_create1");
        return -1;
    }
    return 0;
}

void baseline_wake(srv_worker *w) { (void)w; /* threads wait at most 100 ms */ }

static void conn_close(srv_worker *w, bconn *c, uint64_t *nopen) {
    SYS(w, close(c->fd)); /* also leaves the epoll set */
    free(c);
    (*nopen)--;
}

/* Push the pending response; 1 = all sent, 0 = wait for EPOLLOUT, -1 = error. */
static int conn_send(srv_worker *w, bconn *c) {
    while (c->sent < c->resp_len) {
        ssize_t r = SYS(w, send(c->fd, c->resp + c->sent, c->resp_len - c->sent, MSG_NOSIGNAL));
        if (r > 0) {
            c->sent += (size_t)r;
            continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->writing) {
                struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
                SYS(w, epoll_ctl(w->epfd, EPOLL_CTL_MOD, c->fd, &ev));
                c->writing = 1;
            }
            return 0;
        }
        if (r < 0 && errno == EINTR) continue;
        w->conn_errors++;
        return -1;
    }
    atomic_fetch_add_explicit(&w->txns, 1, memory_order_relaxed);
    proto_reset(&w->cfg->proto, &c->pc);
    if (c->writing) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        SYS(w, epoll_ctl(w->epfd, EPOLL_CTL_MOD, c->fd, &ev));
        c->writing = 0;
    }
    return 1;
}

/* Read what is there; answer a complete request.  Returns -1 when the connection is done. */
static int conn_read(srv_worker *w, bconn *c) {
    const proto_config *pcfg = &w->cfg->proto;
    for (;;) {
        size_t want = proto_want(pcfg, &c->pc);
        ssize_t r = SYS(w, recv(c->fd, c->pc.buf + c->pc.have, want, 0));
        if (r == 0) return -1;
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            if (errno == EINTR) continue;
            w->conn_errors += errno != ECONNRESET; /* RST is how clients close */
            return -1;
        }
        c->pc.have += (size_t)r;
        const void *resp;
        size_t len;
        int k = proto_input(pcfg, &c->pc, &resp, &len);
        if (k < 0) {
            w->conn_errors++;
            return -1;
        }
        if (k == 0) {
            if ((size_t)r < want) return 0; /* drained: level-triggered epoll will call again */
            continue;
        }
        c->resp = resp;
        c->resp_len = len;
        c->sent = 0;
        int s = conn_send(w, c);
        /* Next request is not there yet as a rule: wait for epoll rather than pay an EAGAIN. */
        return s < 0 ? -1 : 0;
    }
}

static void do_accept(srv_worker *w, uint64_t *nopen, int *reserve_fd) {
    const srv_config *cfg = w->cfg;
    for (int i = 0; i < ACCEPT_BURST; i++) {
        int fd = SYS(w, accept4(cfg->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC));
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno == EINTR || errno == ECONNABORTED) continue;
            w->accept_errors++;
            if ((errno == EMFILE || errno == ENFILE) && *reserve_fd >= 0) {
                /* Out of descriptors: use the reserve one to take the connection off the
                 * queue and drop it, so the listener does not stay readable forever. */
                SYS(w, close(*reserve_fd));
                int k = SYS(w, accept4(cfg->listen_fd, NULL, NULL, SOCK_CLOEXEC));
                if (k >= 0) SYS(w, close(k));
                *reserve_fd = SYS(w, open("/dev/null", O_RDONLY | O_CLOEXEC));
            }
            return;
        }
        atomic_fetch_add_explicit(&w->accepts, 1, memory_order_relaxed);
        bconn *c = malloc(sizeof *c + proto_bufsize(&cfg->proto));
        if (!c) {
            SYS(w, close(fd));
            w->accept_errors++;
            continue;
        }
        memset(c, 0, sizeof *c);
        c->fd = fd;
        c->pc.buf = (char *)(c + 1);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (SYS(w, epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev)) < 0) {
            SYS(w, close(fd));
            free(c);
            continue;
        }
        if (++*nopen > w->peak_conns) w->peak_conns = *nopen;
        /* The request often arrives with the connection: read it now (saves an epoll round). */
        if (conn_read(w, c) < 0) conn_close(w, c, nopen);
    }
}

void *baseline_thread(void *arg) {
    srv_worker *w = arg;
    const srv_config *cfg = w->cfg;
    pin_self(w->cpu);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listener_marker};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, cfg->listen_fd, &ev) < 0) {
        perror("epoll_ctl(listener)");
        w->failed = 1;
        return NULL;
    }
    int reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    uint64_t open_conns = 0;
    struct epoll_event evs[MAX_EVENTS];
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        int n = SYS(w, epoll_wait(w->epfd, evs, MAX_EVENTS, 100));
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &listener_marker) {
                do_accept(w, &open_conns, &reserve_fd);
                continue;
            }
            bconn *c = evs[i].data.ptr;
            int r = 0;
            if (c->writing) {
                if (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) r = conn_send(w, c);
            } else {
                r = conn_read(w, c);
            }
            if (r < 0) conn_close(w, c, &open_conns);
        }
    }
    /* Connections still open at exit are left to the process exit (they hold only memory). */
    if (reserve_fd >= 0) close(reserve_fd);
    return NULL;
}
