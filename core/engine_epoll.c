/*
 * engine_epoll.c — the epoll engine: the same API and rules over epoll and non-blocking
 * system calls.  Used where io_uring cannot be set up (ENOSYS, EPERM from seccomp or
 * kernel.io_uring_disabled) or with MP_ENGINE=epoll, and as the API-level baseline.
 *
 * LAIO-style: every operation is tried at once (recv/send/accept with MSG_DONTWAIT); only
 * when the kernel says EAGAIN does it wait, for an edge-triggered readiness event of the fd,
 * which is added to the epoll set once at mp_register().  There is nothing to batch: each
 * attempt is a system call, which is exactly what the io_uring engine saves.
 */
#include <errno.h>
#include <poll.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define WAKE_TAG UINT64_MAX
#define POLLSET_TAG (UINT64_MAX - 1)
#define MAX_EVENTS 256
#define BACKOFF_MS 10

/* Readiness watches live in an epoll set of their own (pepfd), nested in the main one, so a
 * watch and a completion registration may share an fd (epoll keeps one item per fd and set,
 * and a watch's level/edge/one-shot flags must not change how the engine waits for its own
 * operations, which is always edge-triggered).  Made with the channel (ep_init). */
typedef struct epeng {
    int epfd, efd, pepfd;
    int64_t retry_at; /* accept back-off: when to try again (ms, monotonic), 0 = none */
    struct epoll_event evs[MAX_EVENTS], pevs[MAX_EVENTS];
} epeng;

#define E(ch) ((epeng *)(ch)->eng_data)

static uint64_t tag(const mp_handle *h) { return (uint64_t)h->gen << 32 | h->idx; }

static int set_nonblock(mp_channel *ch, int fd) {
    int fl = fcntl(fd, F_GETFL);
    ch->st.syscalls++;
    if (fl < 0) return -errno;
    if (fl & O_NONBLOCK) return 0;
    ch->st.syscalls++;
    return fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ? -errno : 0;
}

static int ep_ctl_on(mp_channel *ch, int epfd, int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev = {.events = events, .data.u64 = data};
    ch->st.syscalls++;
    return epoll_ctl(epfd, op, fd, &ev) < 0 ? -errno : 0;
}

static int ep_ctl(mp_channel *ch, int op, int fd, uint32_t events, uint64_t data) {
    return ep_ctl_on(ch, E(ch)->epfd, op, fd, events, data);
}

static int pollset(mp_channel *ch) {
    epeng *e = E(ch);
    if (e->pepfd >= 0) return e->pepfd;
    ch->st.syscalls += 2;
    int fd = epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0) return -errno;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = POLLSET_TAG};
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    return e->pepfd = fd;
}

static int ep_attach(mp_channel *ch, mp_handle *h) {
    if (h->kind == HK_POLL) { /* added by poll_arm */
        int r = pollset(ch);
        return r < 0 ? r : 0;
    }
    if (h->kind == HK_LISTENER) {
        int r = set_nonblock(ch, h->fd);
        if (r < 0) return r;
        if (ch->cfg.balance)
            mp__log_once(ch, MP_LOG_NO_BALANCE, "accept balancing needs the io_uring engine");
        return ep_ctl(ch, EPOLL_CTL_ADD, h->fd, EPOLLIN | EPOLLET, tag(h));
    }
    return ep_ctl(ch, EPOLL_CTL_ADD, h->fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, tag(h));
}

static unsigned ep_detach(mp_channel *ch, mp_handle *h) {
    /* EPOLL_CTL_DEL names the fd *number*.  If the application closed the fd and the number
     * now belongs to another handle of the same set, deleting would remove the new
     * registration (libuv #4323); the old one went away with the close.  (The maps no longer
     * name h: mp__handle_end cleared its own entry.) */
    if (h->kind == HK_POLL) {
        if (h->pw.armed && !mp__pollmap_get(ch, h->fd))
            ep_ctl_on(ch, E(ch)->pepfd, EPOLL_CTL_DEL, h->fd, 0, 0);
    } else if (!mp__fdmap_get(ch, h->fd)) {
        ep_ctl(ch, EPOLL_CTL_DEL, h->fd, 0, 0);
    }
    h->pw.armed = false;
    return 0; /* nothing of ours stays in the kernel */
}

static ssize_t ep_start_read(mp_channel *ch, mp_handle *h, mp_op *op) {
    if (op->type != OP_READ) return -ENOTSUP;
    ch->st.syscalls++;
    ssize_t n = recv(h->fd, op->buf, op->len, MSG_DONTWAIT);
    if (n >= 0) return n;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return MP_INPROGRESS;
    return errno == EINTR ? MP_INPROGRESS : -errno;
}

static ssize_t ep_start_write(mp_channel *ch, mp_handle *h, mp_op *op) {
    ssize_t n;
    ch->st.syscalls++;
    switch (op->type) {
    case OP_WRITE:
        n = send(h->fd, (char *)op->buf + op->done, op->len - op->done, MSG_DONTWAIT | MSG_NOSIGNAL);
        break;
    case OP_WRITEV: {
        struct msghdr m = {.msg_iov = op->iov, .msg_iovlen = (size_t)op->iovcnt};
        n = sendmsg(h->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
        break;
    }
    case OP_SHUTDOWN:
        return shutdown(h->fd, SHUT_WR) < 0 ? -errno : 0;
    case OP_CONNECT: {
        if (op->done) { /* writable after EINPROGRESS: the outcome is in SO_ERROR */
            int err = 0;
            socklen_t l = sizeof err;
            if (getsockopt(h->fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0) return -errno;
            return err ? -err : 0;
        }
        int r = set_nonblock(ch, h->fd);
        if (r < 0) return r;
        if (connect(h->fd, (struct sockaddr *)&op->addr, op->addrlen) == 0) return 0;
        if (errno == EINPROGRESS || errno == EINTR) {
            op->done = 1;
            return MP_INPROGRESS;
        }
        return -errno;
    }
    default:
        return -EINVAL;
    }
    if (n >= 0) return n;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return MP_INPROGRESS;
    return -errno;
}

static int ep_arm_accept(mp_channel *ch, mp_handle *h) {
    if (h->acc.lw)
        mp__log_once(ch, MP_LOG_NO_LWSOCKET, "lwsockets need the io_uring engine: accepting fds");
    while (h->state == H_LIVE && !h->acc.backoff && (h->acc.forever || h->acc.left > 0)) {
        ch->st.syscalls++;
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        bool want = h->acc.addr;
        int fd = accept4(h->fd, want ? (struct sockaddr *)&ss : NULL, want ? &sl : NULL,
                         SOCK_CLOEXEC);
        if (fd >= 0) {
            mp__accept_done(h, fd, false, false, want ? (struct sockaddr *)&ss : NULL,
                            want ? sl : 0);
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        if (errno == EINTR || errno == ECONNABORTED) continue;
        /* EMFILE, ENFILE, ENOBUFS...: report, then try again a little later. */
        mp__accept_done(h, -errno, false, false, NULL, 0);
        h->acc.backoff = true;
        E(ch)->retry_at = mp__now_ms() + BACKOFF_MS;
        mp__rearm_add(h);
        break;
    }
    return 0;
}

static int ep_poll_arm(mp_channel *ch, mp_handle *h) {
    epeng *e = E(ch);
    if (!h->pw.events) { /* paused: out of the set (an entry would still report ERR/HUP) */
        if (!h->pw.armed) return 0;
        h->pw.armed = false;
        ch->st.watch_ops++;
        ep_ctl_on(ch, e->pepfd, EPOLL_CTL_DEL, h->fd, 0, 0);
        return 0;
    }
    uint32_t ev = h->pw.events | ((h->pw.flags & MP_POLL_ET) ? EPOLLET : 0) |
                  ((h->pw.flags & MP_POLL_ONESHOT) ? EPOLLONESHOT : 0);
    int op = h->pw.armed ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    ch->st.watch_ops++;
    int r = ep_ctl_on(ch, e->pepfd, op, h->fd, ev, tag(h));
    /* The fd was closed (its entry left the set) and its number maybe reused: the interest
     * is for the file that has the number now. */
    if (r == -ENOENT && op == EPOLL_CTL_MOD) r = ep_ctl_on(ch, e->pepfd, EPOLL_CTL_ADD, h->fd, ev, tag(h));
    if (r == -EEXIST && op == EPOLL_CTL_ADD) r = ep_ctl_on(ch, e->pepfd, EPOLL_CTL_MOD, h->fd, ev, tag(h));
    h->pw.armed = r == 0;
    return r;
}

static int ep_flush(mp_channel *ch) {
    (void)ch;
    return 0;
}

static void retry_read(mp_channel *ch, mp_handle *h) {
    h->r_busy = 0;
    ssize_t r = ep_start_read(ch, h, h->rq.head);
    if (r == MP_INPROGRESS)
        h->r_busy = 1;
    else
        mp__read_done(h, r, 0, 0, NULL);
}

static void retry_write(mp_channel *ch, mp_handle *h) {
    h->w_busy = 0;
    ssize_t r = ep_start_write(ch, h, h->wq.head);
    if (r == MP_INPROGRESS)
        h->w_busy = 1;
    else
        mp__write_done(h, r);
}

static int ep_wait(mp_channel *ch, int timeout_ms) {
    epeng *e = E(ch);
    if (e->retry_at) {
        int64_t left = e->retry_at - mp__now_ms();
        if (left <= 0) {
            e->retry_at = 0;
            /* Take the whole list: a retry that fails again goes on a new list (and sets a
             * new retry_at) for a later wait, instead of being met again in this walk. */
            uint32_t list = mp__rearm_take(ch);
            mp_handle *h;
            while ((h = mp__rearm_next(ch, &list))) {
                h->acc.backoff = false;
                ep_arm_accept(ch, h);
            }
            if (mp__event_count(ch)) return 0;
        } else if (timeout_ms < 0 || timeout_ms > left) {
            timeout_ms = (int)left;
        }
    }
    ch->st.syscalls++;
    int n = epoll_wait(e->epfd, e->evs, MAX_EVENTS, timeout_ms);
    if (n < 0) return -errno;
    if (n == 0) return -ETIME;
    for (int i = 0; i < n; i++) {
        uint64_t d = e->evs[i].data.u64;
        uint32_t rev = e->evs[i].events;
        if (d == POLLSET_TAG) { /* readiness watches: their own set, read without waiting */
            ch->st.syscalls++;
            int k = epoll_wait(e->pepfd, e->pevs, MAX_EVENTS, 0);
            for (int j = 0; j < k; j++) {
                mp_handle *w = mp__handle_at(ch, (uint32_t)e->pevs[j].data.u64);
                if (w && w->state == H_LIVE && w->kind == HK_POLL &&
                    w->gen == (uint32_t)(e->pevs[j].data.u64 >> 32))
                    mp__poll_done(w, e->pevs[j].events);
            }
            continue;
        }
        if (d == WAKE_TAG) {
            uint64_t v;
            ch->st.syscalls++;
            if (read(e->efd, &v, sizeof v) > 0) mp__wake_seen(ch);
            continue;
        }
        mp_handle *h = mp__handle_at(ch, (uint32_t)d);
        if (!h || h->state != H_LIVE || h->gen != (uint32_t)(d >> 32)) continue;
        switch (h->kind) {
        case HK_LISTENER:
            ep_arm_accept(ch, h);
            break;
        default:
            if ((rev & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)) && h->r_busy) retry_read(ch, h);
            if ((rev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && h->w_busy && h->state == H_LIVE)
                retry_write(ch, h);
        }
    }
    return 0;
}

static int ep_wake(mp_channel *ch) {
    uint64_t one = 1;
    if (write(E(ch)->efd, &one, sizeof one) < 0 && errno != EAGAIN) return -errno;
    return 0;
}

static int ep_export_fd(mp_channel *ch, mp_handle *h) {
    ch->st.syscalls++;
    int fd = fcntl(h->fd, F_DUPFD_CLOEXEC, 0);
    return fd < 0 ? -errno : fd;
}

static unsigned ep_ready(const mp_channel *ch) {
    (void)ch;
    return 0; /* the kernel's ready list is only read by epoll_wait() */
}

static int ep_init(mp_channel *ch) {
    epeng *e = calloc(1, sizeof *e);
    if (!e) return -ENOMEM;
    e->pepfd = -1;
    snprintf(ch->st.readiness, sizeof ch->st.readiness, "epoll");
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    e->efd = e->epfd < 0 ? -1 : eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = WAKE_TAG};
    if (e->epfd < 0 || e->efd < 0 || epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->efd, &ev) < 0) {
        int err = -errno;
        if (e->epfd >= 0) close(e->epfd);
        if (e->efd >= 0) close(e->efd);
        free(e);
        return err;
    }
    ch->eng_data = e;
    /* The readiness set's own epoll set is made with the channel, not at the first watch: a
     * program that runs out of descriptors later must still be able to watch. */
    int r = pollset(ch);
    if (r < 0) {
        close(e->epfd);
        close(e->efd);
        free(e);
        ch->eng_data = NULL;
        return r;
    }
    return 0;
}

static void ep_fini(mp_channel *ch) {
    epeng *e = E(ch);
    if (!e) return;
    close(e->epfd);
    close(e->efd);
    if (e->pepfd >= 0) close(e->pepfd);
    free(e);
    ch->eng_data = NULL;
}

/* Foreign epoll sets: the system calls themselves. */
static int ep_fepoll_ctl(mp_channel *ch, int epfd, int op, int fd, const struct epoll_event *ev) {
    ch->st.syscalls++;
    return epoll_ctl(epfd, op, fd, (struct epoll_event *)ev) < 0 ? -errno : 0;
}

static int ep_fepoll_wait(mp_channel *ch, int epfd, struct epoll_event *evs, int max,
                          int64_t timeout_ns, const sigset_t *sigmask, int flags) {
    struct timespec ts = {.tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000};
    if ((flags & MP_EPOLL_WAIT_CHANNEL) && mp__event_count(ch)) {
        ts.tv_sec = ts.tv_nsec = 0;
        timeout_ns = 0;
    }
    if ((flags & MP_EPOLL_WAIT_CHANNEL) && timeout_ns != 0) {
        /* Sleep on both sets: the application's and the channel's own (its handles, its
         * wake-up eventfd); then collect from whichever is ready without blocking. */
        struct pollfd pf[2] = {{.fd = epfd, .events = POLLIN}, {.fd = E(ch)->epfd, .events = POLLIN}};
        ch->st.syscalls++;
        int r = ppoll(pf, 2, timeout_ns < 0 ? NULL : &ts, sigmask);
        if (r < 0) return -errno;
        if (pf[0].revents & POLLNVAL) return -EBADF;
        if (pf[1].revents & POLLIN) {
            r = ep_wait(ch, 0);
            if (r < 0 && r != -ETIME) return r;
        }
        if (!(pf[0].revents & (POLLIN | POLLERR | POLLHUP))) return 0;
        ts.tv_sec = ts.tv_nsec = 0;
        sigmask = NULL;
    }
    ch->st.syscalls++;
    int n = epoll_pwait2(epfd, evs, max, timeout_ns < 0 ? NULL : &ts, sigmask);
    return n < 0 ? -errno : n;
}

static int ep_close_fd(mp_channel *ch, int fd) {
    ch->st.syscalls++;
    return close(fd) < 0 ? -errno : 0;
}

static void ep_close_later(mp_channel *ch, int fd) {
    ch->st.syscalls++;
    close(fd);
}

const mp_engine mp__engine_epoll = {
    .name = "epoll",
    .init = ep_init,
    .fini = ep_fini,
    .attach = ep_attach,
    .detach = ep_detach,
    .start_read = ep_start_read,
    .start_write = ep_start_write,
    .arm_accept = ep_arm_accept,
    .share_accept = NULL, /* accept4() at readiness either way */
    .poll_arm = ep_poll_arm,
    .flush = ep_flush,
    .wait = ep_wait,
    .wake = ep_wake,
    .export_fd = ep_export_fd,
    .buf_setup = NULL,
    .buf_release = NULL,
    .close_direct = NULL,
    .ready = ep_ready,
    .epoll_ctl = ep_fepoll_ctl,
    .epoll_wait = ep_fepoll_wait,
    .close_fd = ep_close_fd,
    .close_later = ep_close_later,
};
