/*
 * uring/epollset.c — the readiness set as one kernel epoll set per channel, driven through the
 * ring (MP_READINESS=epoll): interest changes are IORING_OP_EPOLL_CTL requests (queued with the
 * rest, no system call of their own), and the wait is one IORING_OP_EPOLL_WAIT (Linux 6.15+)
 * armed with every wait; on kernels without it, a one-shot poll on the set's fd, then
 * epoll_wait() without blocking.  An entry stays in the set between reports (no re-arm per
 * event, unlike a poll request), and the set holds no reference to the files it watches:
 * closing a watched fd's last descriptor removes it, as with epoll.  poll.c keeps the
 * semantics (merging, one-shot, level re-reports once per dispatch) for both forms.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "uring.h"

int mp__u_eset_init(mp_channel *ch) {
    uring *u = U(ch);
    u->epfd = -1;
    /* per SQ slot: also for mp_epoll_ctl() (fepoll.c) */
    u->ectl_ev = calloc(u->ring.sq.ring_entries, sizeof *u->ectl_ev);
    if (!u->ectl_ev) return -ENOMEM;
    if (!u->eset) return 0;
    u->ewait_evs = calloc(EWAIT_MAX, sizeof *u->ewait_evs);
    if (!u->ewait_evs) return -ENOMEM;
    /* Made with the channel, not at the first watch: a program that runs out of descriptors
     * later (libuv's emfile test) must still be able to watch. */
    ch->st.syscalls++;
    u->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (u->epfd < 0) return -errno;
    /* Waiting on the set without the ring (mp__u_wait) needs mp_wake() to reach that wait
     * too: the eventfd is in the set, edge-triggered (one report per mp_wake()).  Only with
     * DEFER_TASKRUN, where completions of the ring never interrupt a system call of ours. */
    if ((ch->st.features & MP_FEAT_DEFER_TASKRUN) && ch->cfg.readiness != MP_READINESS_EPOLL_RING) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = EWAKE_DATA};
        ch->st.syscalls++;
        u->direct_wait = epoll_ctl(u->epfd, EPOLL_CTL_ADD, u->efd, &ev) == 0;
    }
    return 0;
}

void mp__u_eset_fini(mp_channel *ch) {
    uring *u = U(ch);
    if (u->epfd >= 0) close(u->epfd);
    free(u->ectl_ev);
    free(u->ewait_evs);
}

/* Queue one EPOLL_CTL for watch h.  The kernel reads the epoll_event when it takes the SQE
 * (at the next submit), so it lives in a slot of our own that belongs to the SQE's index. */
static int ctl(mp_channel *ch, mp_handle *h, int op) {
    uring *u = U(ch);
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) return -EAGAIN;
    struct epoll_event *ev = &u->ectl_ev[sqe - u->ring.sq.sqes];
    ev->events = h->pw.events | ((h->pw.flags & MP_POLL_ET) ? EPOLLET : 0) |
                 ((h->pw.flags & MP_POLL_ONESHOT) ? EPOLLONESHOT : 0);
    ev->data.u64 = (uint64_t)h->gen << 32 | h->idx;
    io_uring_prep_epoll_ctl(sqe, u->epfd, h->fd, op, op == EPOLL_CTL_DEL ? NULL : ev);
    enum tag t = op == EPOLL_CTL_ADD ? T_ECTL_ADD : op == EPOLL_CTL_MOD ? T_ECTL_MOD : T_ECTL_DEL;
    io_uring_sqe_set_data64(sqe, ud(t, h->gen, h->idx));
    h->inflight++;
    ch->st.watch_ops++;
    return 0;
}

int mp__u_eset_arm(mp_channel *ch, mp_handle *h) {
    int r;
    if (h->state != H_LIVE) return 0;
    if (!h->pw.events) { /* paused: out of the set (an entry would still report ERR/HUP) */
        if (!h->pw.armed) return 0;
        h->pw.armed = false;
        return ctl(ch, h, EPOLL_CTL_DEL);
    }
    r = ctl(ch, h, h->pw.armed ? EPOLL_CTL_MOD : EPOLL_CTL_ADD); /* MOD re-enables ONESHOT */
    if (r == 0) h->pw.armed = true;
    return r;
}

void mp__u_eset_detach(mp_channel *ch, mp_handle *h) {
    /* EPOLL_CTL_DEL names the fd number: if a new watch of this channel has that number now
     * (the fd was closed and reused), the old entry went away with the close and DEL would
     * remove the new one. */
    if (h->pw.armed && !mp__pollmap_get(ch, h->fd)) ctl(ch, h, EPOLL_CTL_DEL);
    h->pw.armed = false;
}

void mp__u_eset_wait_arm(mp_channel *ch) {
    uring *u = U(ch);
    if (u->epfd < 0 || u->ewait_armed) return;
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) return;
    if (u->epoll_wait_op) {
        io_uring_prep_rw(IORING_OP_EPOLL_WAIT, sqe, u->epfd, u->ewait_evs, EWAIT_MAX, 0);
    } else {
        /* One-shot: a poll checks the set's ready list when armed, so entries that stay ready
         * (level-triggered) are seen again at every wait; a multishot poll would not. */
        io_uring_prep_poll_add(sqe, u->epfd, POLLIN);
    }
    io_uring_sqe_set_data64(sqe, ud(T_EWAIT, 0, 0));
    u->ewait_armed = true;
}

/* direct: from epoll_wait() on the set, where the wake-up eventfd's report is ours to read
 * (through the ring it is the T_WAKE poll's). */
static void deliver(mp_channel *ch, const struct epoll_event *evs, int n, bool direct) {
    for (int i = 0; i < n; i++) {
        if (evs[i].data.u64 == EWAKE_DATA) {
            if (direct) mp__u_wake_read(ch);
            continue;
        }
        mp_handle *h = mp__handle_at(ch, (uint32_t)evs[i].data.u64);
        if (h && h->state == H_LIVE && h->kind == HK_POLL &&
            h->gen == (uint32_t)(evs[i].data.u64 >> 32))
            mp__poll_done(h, evs[i].events);
    }
}

/* May this wait be an epoll_wait() on the set instead of an io_uring_enter()?  When the set
 * is all the ring would wait for: nothing to submit, no wait request of the set in the
 * kernel, and no handle but readiness watches (their only requests, EPOLL_CTLs, complete when
 * submitted).  epoll_wait() is the cheaper sleep: an IORING_OP_EPOLL_WAIT that finds nothing
 * ready arms a poll on the set, and its wake-up runs through task work (memcached on the
 * libevent method: 4-6 % more CPU per request than on epoll with the ring's wait). */
bool mp__u_eset_direct(mp_channel *ch) {
    uring *u = U(ch);
    return u->direct_wait && !u->ewait_armed && ch->used_slots == ch->poll_slots &&
           io_uring_sq_ready(&u->ring) == 0 && !io_uring_cq_ready(&u->ring);
}

int mp__u_eset_wait_direct(mp_channel *ch, int timeout_ms) {
    uring *u = U(ch);
    ch->st.syscalls++;
    ch->st.set_waits++;
    int n = epoll_wait(u->epfd, u->ewait_evs, EWAIT_MAX, timeout_ms);
    if (n < 0) return -errno;
    deliver(ch, u->ewait_evs, n, true);
    return 0;
}

void mp__u_eset_complete(mp_channel *ch, enum tag t, mp_handle *h, int res) {
    uring *u = U(ch);
    if (t == T_EWAIT) {
        u->ewait_armed = false;
        if (res <= 0) return; /* -ECANCELED at teardown, -EINTR: armed again at the next wait */
        if (u->epoll_wait_op) {
            deliver(ch, u->ewait_evs, res < EWAIT_MAX ? res : EWAIT_MAX, false);
        } else {
            ch->st.syscalls++;
            int n = epoll_wait(u->epfd, u->ewait_evs, EWAIT_MAX, 0);
            if (n > 0) deliver(ch, u->ewait_evs, n, false);
        }
        return;
    }
    h->inflight--;
    if (h->state != H_LIVE || h->kind != HK_POLL || res >= 0 || t == T_ECTL_DEL) return;
    if (t == T_ECTL_ADD && res == -EEXIST) {
        /* An entry for this fd number lingers: the fd was closed while a dup of its file stayed
         * open (epoll keeps the entry; a DEL by number could not reach it), and the number names
         * that file again.  Take the entry over now, and report what is ready at once, since
         * the wait that this completion came with may have read the set already. */
        struct epoll_event ev = {.events = h->pw.events | EPOLLERR | EPOLLHUP |
                                           ((h->pw.flags & MP_POLL_ET) ? EPOLLET : 0) |
                                           ((h->pw.flags & MP_POLL_ONESHOT) ? EPOLLONESHOT : 0),
                                 .data.u64 = (uint64_t)h->gen << 32 | h->idx};
        struct pollfd p = {.fd = h->fd, .events = (short)h->pw.events};
        ch->st.syscalls += 2;
        ch->st.watch_ops++;
        if (epoll_ctl(u->epfd, EPOLL_CTL_MOD, h->fd, &ev) < 0) {
            h->pw.armed = false;
            mp__poll_done(h, EPOLLERR | EPOLLHUP);
            h->pw.fired = true; /* quiet until set again */
        } else if (poll(&p, 1, 0) > 0) {
            mp__poll_done(h, (uint32_t)p.revents);
        }
    } else if (t == T_ECTL_MOD && res == -ENOENT && h->pw.armed) {
        /* The fd was closed (its entry left the set) and maybe its number reused: the
         * interest was set again, so it is for the file that has the number now. */
        ctl(ch, h, EPOLL_CTL_ADD);
    } else if (h->pw.armed) {
        /* EBADF (closed before the request ran), EPERM (a file epoll cannot watch, such as a
         * regular file), ELOOP: the watch cannot be served; say so once. */
        h->pw.armed = false;
        mp__poll_done(h, EPOLLERR | EPOLLHUP);
        h->pw.fired = true; /* quiet until set again */
    }
}
