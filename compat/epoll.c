/*
 * compat/epoll.c — the interposed epoll calls.
 *
 * epoll_create*: the kernel's set, recorded (fdtab.c).  epoll_ctl: answered from the set's
 * interest list and queued when its result is known and nobody waits on the set (fdtab.c says
 * when); otherwise the real call, whose answer updates the list.  epoll_wait/pwait/pwait2 on a
 * set this process made: the calling thread's channel hands every queued change of every set
 * to the kernel and waits, in one io_uring_enter() (mp_epoll_wait()).
 */
#include <errno.h>
#include <limits.h>

#include "preload.h"

#define PASS (mpr_init(), mpr_state < 0 || mpr_t.busy)

/* A set this process just made. */
static int made(int r) {
    if (r >= 0 && !PASS) {
        mpr_fd_new(r, FK_UNKNOWN);
        mpr_lock();
        mpr_ep_new(r);
        mpr_unlock();
    }
    return r;
}

int epoll_create(int size) {
    mpr_init();
    return made(mpr_real.epoll_create(size));
}

int epoll_create1(int flags) {
    mpr_init();
    return made(mpr_real.epoll_create1(flags));
}

static int fail(int err) {
    errno = err;
    return -1;
}

/* The kernel's answer, recorded.  Lock held. */
static int ctl_now(struct mpr_ep *ep, int op, int fd, struct epoll_event *ev) {
    if (ep) mpr_pend_flush_sync(ep); /* keep the order of the changes */
    int r = mpr_real.epoll_ctl(ep ? ep->epfd : -1, op, fd, ev);
    int err = errno;
    if (ep) {
        if (r == 0) {
            mpr_set_present(ep, fd, op != EPOLL_CTL_DEL);
            if (op == EPOLL_CTL_ADD && mpr_kind_of(fd) == FK_UNKNOWN) mpr_set_kind(fd, FK_POLLABLE);
        } else if (err == ENOENT && op != EPOLL_CTL_ADD) {
            mpr_set_present(ep, fd, false);
        } else if (err == EEXIST) {
            mpr_set_present(ep, fd, true);
        }
    }
    errno = err;
    return r;
}

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event) {
    if (PASS) return mpr_real.epoll_ctl(epfd, op, fd, event);
    mpr_lock();
    struct mpr_ep *ep = mpr_ep_of(epfd);
    int r;
    if (mpr_streams && mpr_is_stream(fd)) {
        /* stream mode (stream.c): the stream's interest is kept there, not in the kernel's set,
         * when the set is one the emulation serves; otherwise the fd is a plain one */
        bool excl = event && op != EPOLL_CTL_DEL && (event->events & EPOLLEXCLUSIVE);
        if (ep && !ep->shared && !excl && fd != epfd) {
            r = mpr_stream_ctl(ep, op, fd, event);
            if (r != -EBUSY) {
                mpr_unlock();
                return r < 0 ? fail(-r) : 0;
            }
        }
        mpr_stream_unstream(fd); /* a candidate only; an adopted stream stays (documented) */
    }
    if (!ep || ep->shared) {
        r = mpr_real.epoll_ctl(epfd, op, fd, event);
        if (r == 0 && mpr_kind_of(fd) == FK_EPOLL) {
            struct mpr_ep *inner = mpr_ep_of(fd);
            if (inner) inner->nested = true;
        }
        mpr_unlock();
        return r;
    }
    enum mpr_kind k = mpr_kind_of(fd);
    bool bad_args = (op != EPOLL_CTL_ADD && op != EPOLL_CTL_MOD && op != EPOLL_CTL_DEL) ||
                    fd == epfd || (op != EPOLL_CTL_DEL && !event);
    if (bad_args || k != FK_POLLABLE || (event && op != EPOLL_CTL_DEL && (event->events & EPOLLEXCLUSIVE))) {
        /* The kernel decides: unknown fds, epoll fds (ELOOP, nesting), EPOLLEXCLUSIVE's rules,
         * invalid arguments. */
        if (k == FK_EPOLL) {
            struct mpr_ep *inner = mpr_ep_of(fd);
            if (inner && op != EPOLL_CTL_DEL) {
                mpr_pend_flush_sync(inner);
                inner->nested = true;
            }
        }
        r = bad_args ? mpr_real.epoll_ctl(epfd, op, fd, event) : ctl_now(ep, op, fd, event);
        mpr_unlock();
        return r;
    }
    bool present = mpr_present(ep, fd);
    if (op == EPOLL_CTL_ADD && present) {
        mpr_unlock();
        return fail(EEXIST);
    }
    if (op != EPOLL_CTL_ADD && !present) {
        mpr_unlock();
        return fail(ENOENT);
    }
    if (ep->nested || ep->waiters || mpr_pend_push(ep, op, fd, event) != 0) {
        /* Someone waits on the set (or on a set that watches it): the change must reach the
         * kernel now, as epoll_ctl's would. */
        r = ctl_now(ep, op, fd, event);
        mpr_unlock();
        return r;
    }
    mpr_set_present(ep, fd, op != EPOLL_CTL_DEL);
    mpr_unlock();
    return 0;
}

static int wait_ns(int epfd, struct epoll_event *evs, int max, int64_t ns, const sigset_t *mask) {
    mp_channel *ch = mpr_channel(); /* before the lock: making it may step aside */
    mpr_lock();
    struct mpr_ep *ep = mpr_ep_of(epfd);
    if (!ch || !ep) {
        if (!ch) mpr_pend_flush_all(); /* stepped aside: every set gets what it had queued */
        else if (ep) mpr_pend_flush_sync(ep);
        mpr_unlock();
        struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
        return mpr_real.epoll_pwait2(epfd, evs, max, ns < 0 ? NULL : &ts, mask);
    }
    /* Every set's queued changes go with this wait (a set nested in this one, or one another
     * thread will wait on, needs them in the kernel as much as this one). */
    mpr_t.busy = true;
    mpr_drain_into(ch);
    ep->waiters++;
    uint32_t gen = ep->gen;
    mpr_unlock();
    int n = mpr_streams ? mpr_stream_wait(ch, epfd, evs, max, ns, mask)
                        : mp_epoll_wait(ch, epfd, evs, max, ns, mask);
    mpr_lock();
    if (ep->gen == gen && ep->waiters) ep->waiters--;
    mpr_unlock();
    mpr_t.busy = false;
    if (n < 0) return fail(-n);
    return n;
}

int epoll_pwait2(int epfd, struct epoll_event *evs, int max, const struct timespec *timeout,
                 const sigset_t *mask) {
    if (PASS) return mpr_real.epoll_pwait2(epfd, evs, max, timeout, mask);
    int64_t ns = -1;
    if (timeout) {
        if (timeout->tv_sec < 0 || timeout->tv_nsec < 0 || timeout->tv_nsec >= 1000000000)
            return fail(EINVAL);
        ns = timeout->tv_sec > INT64_MAX / 1000000000 - 1 ? INT64_MAX
                                                          : timeout->tv_sec * 1000000000 + timeout->tv_nsec;
    }
    return wait_ns(epfd, evs, max, ns, mask);
}

int epoll_pwait(int epfd, struct epoll_event *evs, int max, int timeout, const sigset_t *mask) {
    if (PASS) return mpr_real.epoll_pwait(epfd, evs, max, timeout, mask);
    return wait_ns(epfd, evs, max, timeout < 0 ? -1 : (int64_t)timeout * 1000000, mask);
}

int epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout) {
    if (PASS) return mpr_real.epoll_wait(epfd, evs, max, timeout);
    return wait_ns(epfd, evs, max, timeout < 0 ? -1 : (int64_t)timeout * 1000000, NULL);
}
