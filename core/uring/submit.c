/*
 * uring/submit.c — handing requests to the kernel and waiting: SQEs straight into the shared
 * submission ring, one io_uring_enter() per batch (threshold, an empty event queue, or
 * mp_flush), the wait with adaptive min_wait, the eventfd behind mp_wake(), and the small
 * fire-and-forget requests (cancel, close of a direct descriptor).
 */
#include <errno.h>
#include <poll.h>
#include <unistd.h>

#include "uring.h"

int mp__u_flush(mp_channel *ch) {
    uring *u = U(ch);
    unsigned n = io_uring_sq_ready(&u->ring);
    if (!n) return 0;
    mp__u_enable(ch);
    for (int tries = 0;; tries++) {
        /* Every submit also runs the ring's task work (GETEVENTS, min_complete 0: no extra
         * system call).  With DEFER_TASKRUN, completions of operations that waited in the
         * kernel (a receive armed before its data came) reach the CQ ring only in task work,
         * while a receive whose data is already there completes inline at submit.  The wait
         * hands out what is in the CQ ring without entering the kernel, so a plain submit let
         * the connections that complete inline go round again and again while the others'
         * completions sat in task work (Fig. 6: p50 446 us, p99 40 ms at 1,024 connections).
         * It also makes a listener's cancel take effect at once (see detach). */
        int r = io_uring_submit_and_get_events(&u->ring);
        ch->st.syscalls++;
        if (r >= 0) {
            mp__batch_account(ch, (unsigned)r);
            return r;
        }
        if (r == -EINTR && tries < 8) continue;
        if ((r == -EBUSY || r == -EAGAIN) && tries < 8) {
            /* CQ overflow backlog: let the kernel flush it to the ring, mp__u_reap, try again. */
            ch->st.cq_overflows++;
            io_uring_get_events(&u->ring);
            ch->st.syscalls++;
            mp__u_reap(ch);
            continue;
        }
        return r;
    }
}

/* An SQE, flushing the ring when it is full (the paper's "automatic flush"). */
struct io_uring_sqe *mp__u_sqe(mp_channel *ch) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&U(ch)->ring);
    if (!sqe) {
        mp__u_flush(ch);
        sqe = io_uring_get_sqe(&U(ch)->ring);
    }
    return sqe;
}

/* After queueing an application request: submit when the batch is full. */
void mp__u_batch_check(mp_channel *ch) {
    if (mp__batch_full(ch, io_uring_sq_ready(&U(ch)->ring))) mp__u_flush(ch);
}

/* A request whose success nobody waits for (cancel, close of a direct descriptor). */
void mp__u_set_ignored(mp_channel *ch, struct io_uring_sqe *sqe) {
    io_uring_sqe_set_data64(sqe, ud(T_IGNORE, 0, 0));
    if (U(ch)->cqe_skip) sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
}

void mp__u_cancel(mp_channel *ch, uint64_t target) {
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) return; /* cannot happen after a flush; the completion is filtered anyway */
    io_uring_prep_cancel64(sqe, target, 0);
    mp__u_set_ignored(ch, sqe);
}

void mp__u_cancel_all(mp_channel *ch, uint64_t target) {
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) return;
    io_uring_prep_cancel64(sqe, target, IORING_ASYNC_CANCEL_ALL);
    mp__u_set_ignored(ch, sqe);
}

/* Free a direct-descriptor slot (queued; the kernel runs it in submission order, before any
 * accept queued after it). */
void mp__u_close_direct(mp_channel *ch, unsigned slot) {
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) return;
    io_uring_prep_close_direct(sqe, slot);
    mp__u_set_ignored(ch, sqe);
}

/* Close a regular fd the channel was given (mp_unregister_close), queued like the rest. */
void mp__u_close_later(mp_channel *ch, int fd) {
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) {
        ch->st.syscalls++;
        close(fd);
        return;
    }
    io_uring_prep_close(sqe, fd);
    mp__u_set_ignored(ch, sqe);
}

unsigned mp__u_ready(const mp_channel *ch) {
    return io_uring_cq_ready(&((const uring *)ch->eng_data)->ring);
}

void mp__u_arm_wake(mp_channel *ch) {
    uring *u = U(ch);
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) return;
    if (u->ms_poll)
        io_uring_prep_poll_multishot(sqe, u->efd, POLLIN);
    else
        io_uring_prep_poll_add(sqe, u->efd, POLLIN);
    io_uring_sqe_set_data64(sqe, ud(T_WAKE, 0, 0));
    u->wake_armed = true;
}

/* The eventfd was reported readable (by the ring's T_WAKE poll or by epoll_wait() on the
 * readiness set): read it, and say so if it was mp_wake()'s. */
void mp__u_wake_read(mp_channel *ch) {
    uring *u = U(ch);
    ch->st.syscalls++;
    if (read(u->efd, &u->efd_val, sizeof u->efd_val) > 0) mp__wake_seen(ch);
}

int mp__u_wake(mp_channel *ch) {
    uint64_t one = 1;
    if (write(U(ch)->efd, &one, sizeof one) < 0 && errno != EAGAIN) return -errno;
    return 0;
}

/* Make every SQE written so far visible to the kernel (for an io_uring_enter() of our own,
 * liburing 2.3 has no call for it): the number it has not taken yet, and the fd and flags to
 * enter with. */
unsigned mp__u_publish(mp_channel *ch, int *fd, unsigned *flags) {
    uring *u = U(ch);
    struct io_uring_sq *sq = &u->ring.sq;
    unsigned tail = sq->sqe_tail;
    if (sq->sqe_head != tail) {
        sq->sqe_head = tail;
        io_uring_smp_store_release(sq->ktail, tail);
    }
    *fd = u->ring_fd_registered ? u->ring.enter_ring_fd : u->ring.ring_fd;
    *flags = u->ring_fd_registered ? IORING_ENTER_REGISTERED_RING : 0;
    return tail - io_uring_smp_load_acquire(sq->khead);
}

/* Submit everything and wait with the kernel's min_wait: up to MP_BATCH completions, for at
 * most MP_WAIT_USEC after the first (liburing 2.3 has no helper for it). */
static int enter_batched(mp_channel *ch, int timeout_ms, unsigned quiet) {
    uring *u = U(ch);
    int fd;
    unsigned flags;
    unsigned to_submit = mp__u_publish(ch, &fd, &flags);
    struct __kernel_timespec ts = {.tv_sec = timeout_ms / 1000,
                                   .tv_nsec = (long long)(timeout_ms % 1000) * 1000000};
    struct io_uring_getevents_arg arg = {.pad = (uint32_t)ch->cfg.wait_usec,
                                         .ts = timeout_ms > 0 ? (uint64_t)(uintptr_t)&ts : 0};
    flags |= IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG;
    /* Wait for MP_BATCH completions, or fewer when fewer can come: asking for more than are
     * in flight only sits out the whole min_wait (16 persistent connections, batch 32: half
     * the throughput).  What can come is estimated from the last wait's burst and the live
     * handles (about one operation each in flight; half of them, for idle ones). */
    unsigned want = (unsigned)ch->st.handles / 2;
    if (want < u->last_burst) want = u->last_burst;
    if (want > (unsigned)ch->cfg.batch) want = (unsigned)ch->cfg.batch;
    int r = io_uring_enter2((unsigned)fd, to_submit, (want ? want : 1) + quiet, flags,
                            (sigset_t *)&arg,
                            sizeof arg);
    return r;
}

/* Level-triggered polls whose event was handed out, receives starved of buffers, accepts
 * paused for want of lwsocket slots: re-armed before a wait.  What is still stuck goes back on
 * the list for the next wait. */
void mp__u_rearm(mp_channel *ch) {
    uint32_t list = mp__rearm_take(ch);
    mp_handle *h;
    while ((h = mp__rearm_next(ch, &list))) {
        if (h->kind == HK_POLL) {
            if (!h->pw.armed) mp__u_poll_arm(ch, h);
        } else if (h->kind == HK_LISTENER) {
            if (UH(h)->lw_full) mp__u_arm_accept(ch, h);
        } else if (h->kind == HK_CONN) {
            if (!UH(h)->readbuf_armed) h->r_busy = 0;
            mp__pump_reads(h);
        }
    }
}

int mp__u_wait(mp_channel *ch, int timeout_ms) {
    uring *u = U(ch);
    mp__u_reap(ch); /* completions already in the ring cost no system call */
    if (mp__event_count(ch)) return 0;
    mp__u_rearm(ch);
    if (u->balancing) {
        mp__u_balance(ch);
        if (u->balancing && (timeout_ms < 0 || timeout_ms > BALANCE_POLL_MS))
            timeout_ms = BALANCE_POLL_MS;
    }
    /* Completions the wait's own requests will post that end no sleep (defer.c) */
    unsigned quiet = 0;
    if (u->defer_head) timeout_ms = mp__u_defer_wait(ch, timeout_ms, &quiet);
    if (!u->wake_armed) mp__u_arm_wake(ch);
    if (u->eset && !quiet && mp__u_eset_direct(ch)) return mp__u_eset_wait_direct(ch, timeout_ms);
    if (u->eset) mp__u_eset_wait_arm(ch);
    mp__u_enable(ch);
    unsigned n = io_uring_sq_ready(&u->ring);
    int r;
    if (timeout_ms == 0) {
        r = io_uring_submit_and_get_events(&u->ring);
    } else if (u->min_wait && u->last_burst * 4 >= (unsigned)ch->cfg.batch &&
               (unsigned)ch->st.handles >= 2u * (unsigned)ch->cfg.batch) {
        /* Adaptive: gather only while completions come in bursts (long connections, many
         * in flight).  With short connections each wake-up brings one or two, and holding
         * the thread in a timed wait costs more than the system call it saves.  And only with
         * at least 2 x MP_BATCH live handles: with fewer, the completions a gather waits for
         * are mostly the next requests of clients that wait for the responses this very wait
         * submits (closed loops: memcached with 16 persistent connections ran at 0.8x stock's
         * throughput and 1.07x its CPU per request gathering, 0.86x CPU without). */
        r = enter_batched(ch, timeout_ms, quiet);
    } else if (timeout_ms < 0) {
        r = io_uring_submit_and_wait(&u->ring, 1 + quiet);
    } else {
        struct __kernel_timespec ts = {.tv_sec = timeout_ms / 1000,
                                       .tv_nsec = (long long)(timeout_ms % 1000) * 1000000};
        struct io_uring_cqe *cqe;
        r = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1 + quiet, &ts, NULL);
    }
    ch->st.syscalls++;
    unsigned left = io_uring_sq_ready(&u->ring);
    if (n > left) mp__batch_account(ch, n - left);
    if (r == -EBUSY) {
        ch->st.cq_overflows++;
        r = 0;
    }
    uint64_t before = ch->st.cqes;
    mp__u_reap(ch);
    u->last_burst = (unsigned)(ch->st.cqes - before);
    return (r >= 0 || r == -ETIME) ? 0 : r;
}
