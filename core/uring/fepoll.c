/*
 * uring/fepoll.c — foreign epoll sets on io_uring: mp_epoll_ctl() as an IORING_OP_EPOLL_CTL
 * queued with the channel's other requests, mp_epoll_wait() as one IORING_OP_EPOLL_WAIT
 * (Linux 6.15+) writing straight into the caller's array, submitted and waited for in one
 * io_uring_enter() (whose own timeout bounds the wait; one that expires costs a second call,
 * to cancel).  A wait a signal interrupts is cancelled before the call
 * returns, so the kernel never writes the array after it.  Kernels without the opcodes get the
 * system calls themselves.
 */
#include <errno.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "uring.h"

void mp__u_fepoll_fini(mp_channel *ch) {
    free(U(ch)->fctl);
    U(ch)->fctl = NULL;
}

int mp__u_fepoll_ctl(mp_channel *ch, int epfd, int op, int fd, const struct epoll_event *ev) {
    uring *u = U(ch);
    if (!u->epoll_ctl_op || !u->ectl_ev || !u->cqe_skip) {
        ch->st.syscalls++;
        return epoll_ctl(epfd, op, fd, (struct epoll_event *)ev) < 0 ? -errno : 0;
    }
    if (!u->fctl && !(u->fctl = calloc(FCTL_RING, sizeof *u->fctl))) return -ENOMEM;
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) return -EAGAIN;
    /* The kernel copies the event when it takes the SQE: it lives in the slot's own place. */
    struct epoll_event *slot = &u->ectl_ev[sqe - u->ring.sq.sqes];
    if (ev) *slot = *ev;
    io_uring_prep_epoll_ctl(sqe, epfd, fd, op, op == EPOLL_CTL_DEL ? NULL : slot);
    uint32_t seq = u->fctl_seq++;
    io_uring_sqe_set_data64(sqe, ud(T_FCTL, 0, seq));
    sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    struct fctl *f = &u->fctl[seq & (FCTL_RING - 1)];
    f->seq = seq;
    f->epfd = epfd;
    f->op = op;
    f->data = ev ? ev->data.u64 : 0;
    ch->st.requests++;
    mp__u_batch_check(ch);
    return 0;
}

void mp__u_fepoll_complete(mp_channel *ch, enum tag t, uint32_t idx, int res) {
    uring *u = U(ch);
    if (t == T_FWAIT) {
        u->fw_done = true;
        u->fw_res = res;
        return;
    }
    if (t == T_FCLOSE) {
        u->fc_done = true;
        u->fc_res = res;
        return;
    }
    if (t == T_FTIMEOUT) {
        /* -ETIME: it fired, the wait's own completion follows; -ECANCELED: the wait ended
         * first, and this one says nothing */
        u->ft_pending = false;
        if (res != -ETIME) u->fw_noise++;
        return;
    }
    if (res >= 0 || !u->fctl) { /* (a success posts no CQE) */
        u->fw_noise++;
        return;
    }
    struct fctl *f = &u->fctl[idx & (FCTL_RING - 1)];
    if (f->seq == idx) mp__fepoll_failed(ch, f->epfd, f->op, f->data, res);
    else ch->st.epoll_ctl_failed++; /* its record was reused: counted, not reported */
}

/* The system call, after handing the queued requests over. */
static int wait_syscall(mp_channel *ch, int epfd, struct epoll_event *evs, int max,
                        int64_t timeout_ns, const sigset_t *sigmask) {
    if (io_uring_sq_ready(&U(ch)->ring)) {
        int r = mp__u_flush(ch);
        if (r < 0) return r;
    }
    mp__u_reap(ch);
    struct timespec ts = {.tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000};
    ch->st.syscalls++;
    int n = epoll_pwait2(epfd, evs, max, timeout_ns < 0 ? NULL : &ts, sigmask);
    return n < 0 ? -errno : n;
}

static int64_t elapsed_ns(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)(t.tv_sec - t0->tv_sec) * 1000000000 + (t.tv_nsec - t0->tv_nsec);
}

/* Submit what is queued and wait for `want` completions (rem_ns >= 0: at most that long),
 * with the caller's signal mask. */
static int enter_wait(mp_channel *ch, const sigset_t *sigmask, unsigned want, int64_t rem_ns) {
    int fd;
    unsigned flags;
    unsigned to_submit = mp__u_publish(ch, &fd, &flags);
    flags |= IORING_ENTER_GETEVENTS;
    if (rem_ns < 0)
        return io_uring_enter2((unsigned)fd, to_submit, want, flags, (sigset_t *)sigmask, _NSIG / 8);
    struct __kernel_timespec ts = {.tv_sec = rem_ns / 1000000000, .tv_nsec = rem_ns % 1000000000};
    struct io_uring_getevents_arg arg = {.sigmask = (uint64_t)(uintptr_t)sigmask,
                                         .sigmask_sz = _NSIG / 8,
                                         .ts = (uint64_t)(uintptr_t)&ts};
    return io_uring_enter2((unsigned)fd, to_submit, want, flags | IORING_ENTER_EXT_ARG,
                           (sigset_t *)&arg, sizeof arg);
}

int mp__u_fepoll_wait(mp_channel *ch, int epfd, struct epoll_event *evs, int max,
                      int64_t timeout_ns, const sigset_t *sigmask, int flags) {
    uring *u = U(ch);
    bool any = flags & MP_EPOLL_WAIT_CHANNEL;
    mp__u_reap(ch); /* what is already there would end the wait at once */
    if (any) {
        /* The channel's own completions end this wait: it must be woken by them, and what
         * waits for a wait (paused buffered receives, level-triggered polls) is re-armed. */
        if (!u->epoll_wait_op) return -ENOTSUP; /* epoll_pwait2() cannot see the ring */
        if (mp__event_count(ch)) timeout_ns = 0;
        else {
            mp__u_rearm(ch);
            if (!u->wake_armed) mp__u_arm_wake(ch);
        }
    }
    /* The last wait's timeout, if its completion is still to come, would end this wait as if
     * a signal had (it was cancelled when that wait ended: it comes at once). */
    for (int tries = 0; u->ft_pending && tries < 4; tries++) {
        ch->st.syscalls++;
        if (enter_wait(ch, NULL, 1, -1) < 0) break;
        mp__u_reap(ch);
    }
    /* Not blocking and nothing to hand over: the plain call is the cheapest.  (Blocking waits
     * with nothing to hand over stay in the ring: epoll_pwait2() there was tried, and an
     * interruptible sleep right after ring activity could end in a spurious EINTR.) */
    if (!u->epoll_wait_op || (timeout_ns == 0 && !io_uring_sq_ready(&u->ring)))
        return wait_syscall(ch, epfd, evs, max, timeout_ns, sigmask);
    mp__u_enable(ch);
    if (io_uring_sq_space_left(&u->ring) < 2) { /* the linked pair must go in one submission */
        int r = mp__u_flush(ch);
        if (r < 0) return r;
    }
    struct io_uring_sqe *wsqe = io_uring_get_sqe(&u->ring), *tsqe = NULL, *csqe = NULL;
    io_uring_prep_rw(IORING_OP_EPOLL_WAIT, wsqe, epfd, evs, (unsigned)max, 0);
    io_uring_sqe_set_data64(wsqe, ud(T_FWAIT, 0, 0));
    /* A timeout: the wait's own (io_uring_enter's), which costs nothing unless it expires;
     * then the request is cancelled, a second call.  A wait that must not block (0: changes
     * to hand over) is cancelled by the next request of the same submission; without the
     * enter's own timeout (no EXT_ARG) a timed wait gets a linked timeout. */
    struct timespec t0 = {0, 0};
    bool ext_ts = timeout_ns > 0 && u->ext_arg;
    if (ext_ts) {
        clock_gettime(CLOCK_MONOTONIC, &t0);
    } else if (timeout_ns == 0) {
        /* Not blocking: the wait, then its cancellation, in the same submission.  The wait
         * either finds events at once or is armed and cancelled right after (-ECANCELED: no
         * event), all inside this one call, with no timer to arm and fire. */
        csqe = io_uring_get_sqe(&u->ring);
        io_uring_prep_cancel64(csqe, ud(T_FWAIT, 0, 0), 0);
        mp__u_set_ignored(ch, csqe);
    } else if (timeout_ns >= 0) {
        wsqe->flags |= IOSQE_IO_LINK;
        u->fw_ts.tv_sec = timeout_ns / 1000000000;
        u->fw_ts.tv_nsec = timeout_ns % 1000000000;
        tsqe = io_uring_get_sqe(&u->ring);
        io_uring_prep_link_timeout(tsqe, &u->fw_ts, 0);
        io_uring_sqe_set_data64(tsqe, ud(T_FTIMEOUT, 0, 0));
        u->ft_pending = true;
    }
    u->fw_done = false;
    bool cancelled = false, submitted = false, timed_out = false, woken = false;
    while (!u->fw_done) {
        unsigned n = io_uring_sq_ready(&u->ring);
        uint64_t cqes = ch->st.cqes, noise = u->fw_noise;
        int64_t rem = -1;
        if (ext_ts && !cancelled) {
            rem = timeout_ns - elapsed_ns(&t0);
            if (rem < 1) rem = 1; /* expired: one look, then cancelled below */
        }
        /* With a linked timeout, its completion comes with the wait's: ask for both. */
        int r = enter_wait(ch, cancelled ? NULL : sigmask, tsqe && u->ft_pending ? 2 : 1, rem);
        ch->st.syscalls++;
        unsigned left = io_uring_sq_ready(&u->ring);
        if (n > left) {
            mp__batch_account(ch, n - left);
            submitted = true;
        }
        if (r < 0 && !submitted) {
            /* Nothing reached the kernel (EAGAIN for want of memory, a dead ring): take the
             * wait back, so that no later submission writes the caller's array. */
            io_uring_prep_nop(wsqe);
            mp__u_set_ignored(ch, wsqe);
            if (csqe) { /* it must not cancel a later wait */
                io_uring_prep_nop(csqe);
                mp__u_set_ignored(ch, csqe);
            }
            if (tsqe) {
                io_uring_prep_nop(tsqe);
                mp__u_set_ignored(ch, tsqe);
                u->ft_pending = false;
            }
            return r;
        }
        mp__u_reap(ch);
        if (r == -EBUSY) ch->st.cq_overflows++;
        /* The wait ends with a completion, a signal or its timeout.  A call that also
         * submitted returns the number submitted even then: no completion that can end a
         * wait (ctl refusals and ignored requests cannot) means a signal or the timeout. */
        bool empty = r == -EINTR || r == -ETIME || (r >= 0 && ch->st.cqes - cqes == u->fw_noise - noise);
        if (any && !cancelled && !u->fw_done && mp__event_count(ch)) {
            /* The channel has events of its own: the caller wants them now. */
            struct io_uring_sqe *c = mp__u_sqe(ch);
            if (c) {
                io_uring_prep_cancel64(c, ud(T_FWAIT, 0, 0), 0);
                mp__u_set_ignored(ch, c);
            }
            cancelled = woken = true;
        } else if (empty && !cancelled && !u->fw_done) {
            /* Take the wait back; it may still complete with events first. */
            timed_out = ext_ts && (r == -ETIME || elapsed_ns(&t0) >= timeout_ns);
            struct io_uring_sqe *c = mp__u_sqe(ch);
            if (c) {
                io_uring_prep_cancel64(c, ud(T_FWAIT, 0, 0), 0);
                mp__u_set_ignored(ch, c);
            }
            cancelled = true;
        }
    }
    int res = u->fw_res;
    if (res >= 0) return res;
    if (res == -ECANCELED || res == -EINTR || res == -ETIME)
        return cancelled && !timed_out && !woken ? -EINTR : 0; /* interrupted, or timed out */
    return res;
}

/* close(2) through the ring, with what is queued: one system call (a file whose close must
 * wait, one with a ->flush such as NFS, completes in a worker: then a second, to wait). */
int mp__u_close_fd(mp_channel *ch, int fd) {
    uring *u = U(ch);
    mp__u_enable(ch);
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) {
        ch->st.syscalls++;
        return close(fd) < 0 ? -errno : 0;
    }
    io_uring_prep_close(sqe, fd);
    io_uring_sqe_set_data64(sqe, ud(T_FCLOSE, 0, 0));
    u->fc_done = false;
    ch->st.requests++;
    unsigned queued = io_uring_sq_ready(&u->ring);
    int r = mp__u_flush(ch); /* also runs task work: an inline close has posted its CQE */
    if (r < 0 && io_uring_sq_ready(&u->ring) == queued) {
        io_uring_prep_nop(sqe); /* not taken: it must not close the number later */
        mp__u_set_ignored(ch, sqe);
        return r;
    }
    mp__u_reap(ch);
    while (r >= 0 && !u->fc_done) {
        ch->st.syscalls++;
        r = enter_wait(ch, NULL, 1, -1);
        if (r == -EINTR) r = 0;
        mp__u_reap(ch);
    }
    if (!u->fc_done) return r < 0 ? r : -EIO;
    return u->fc_res;
}
