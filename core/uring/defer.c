/*
 * uring/defer.c — deferred accepting (MP_ACCEPT_DEFER, documented at mp_options): while
 * connections the channel accepted wait for their first data, exclusive listeners and
 * partitions stay unarmed; what queues in their backlogs meanwhile is taken, without waiting,
 * by the wait that follows a completed receive, so that new connections come in the same
 * wake-up as data instead of each waking the thread.  Bounded in time: the listeners are armed
 * again at most MP_ACCEPT_DEFER ms after the latest connection was taken.
 *
 * Every listener change happens at a wait, after the application has registered what the last
 * wake-up brought and armed its first receives.  The requests it queues there post completions
 * that end no sleep (a drain that finds the backlog empty ends with -EAGAIN, a cancelled waiting
 * accept with -ECANCELED): the wait counts them and asks the kernel for that many more.
 */
#include <errno.h>

#include "uring.h"

void mp__u_defer_setup(mp_channel *ch) {
    uring *u = U(ch);
    u->defer_us = 0;
    if (ch->cfg.accept_defer <= 0) return;
    /* Everything happens inside our own io_uring_enter() only with DEFER_TASKRUN (6.1), which
     * the counting above relies on; IORING_ACCEPT_DONTWAIT is newer still (6.10), and its
     * absence shows as -EINVAL on the first drain (mp__u_defer_refused).  Multishot accept
     * (needed by the drain) is found missing only at run time: applies() checks it. */
    if (!(ch->st.features & MP_FEAT_DEFER_TASKRUN)) {
        mp__log_once(ch, MP_LOG_NO_DONTWAIT, "MP_ACCEPT_DEFER needs DEFER_TASKRUN: accepting "
                                             "is not deferred");
        return;
    }
    u->defer_us = (int64_t)ch->cfg.accept_defer * 1000;
}

/* Does deferral apply to listener l?  Its queue must be its own (a drain of a shared queue
 * would take other processes' connections), its accepting unbounded, and not of lwsockets
 * (their slots are reserved per accept, arm_accept). */
static bool applies(const mp_channel *ch, const mp_handle *l) {
    const uring *u = U(ch);
    return u->defer_us && l->kind == HK_LISTENER && l->acc.forever &&
           (l->acc.excl || l->acc.part) && !(l->acc.lw && u->nfixed) && u->ms_accept;
}

/* Is accepting deferred right now?  When the window has ended, every connection marked so far
 * stops counting (their epoch is over). */
static bool holding(mp_channel *ch) {
    uring *u = U(ch);
    if (!u->fresh) return false;
    if (mp__now_us() < u->defer_until) return true;
    u->fresh = 0;
    u->fresh_epoch++;
    return false;
}

void mp__u_defer_mark(mp_channel *ch, mp_handle *h) {
    uring *u = U(ch);
    if (!u->defer_head || !h->accepted || UH(h)->fresh) return;
    UH(h)->fresh = true;
    UH(h)->fresh_epoch = u->fresh_epoch;
    u->fresh++;
    u->defer_until = mp__now_us() + u->defer_us;
}

void mp__u_defer_unmark(mp_channel *ch, mp_handle *h) {
    uring *u = U(ch);
    if (!UH(h)->fresh) return;
    UH(h)->fresh = false;
    if (UH(h)->fresh_epoch == u->fresh_epoch && u->fresh) u->fresh--;
}

void mp__u_defer_read_done(mp_channel *ch, mp_handle *h) {
    mp__u_defer_unmark(ch, h);
    U(ch)->defer_drain = true; /* we are awake: take what queued, with this wait */
}

bool mp__u_defer_hold(mp_channel *ch, mp_handle *l) {
    uring *u = U(ch);
    if (!applies(ch, l)) return false;
    if (!UH(l)->deferring) {
        UH(l)->deferring = true;
        UH(l)->defer_next = u->defer_head;
        u->defer_head = l->idx + 1;
    }
    return holding(ch);
}

void mp__u_defer_forget(mp_channel *ch, mp_handle *h) {
    uring *u = U(ch);
    mp__u_defer_unmark(ch, h);
    if (!UH(h)->deferring) return;
    UH(h)->deferring = false;
    for (uint32_t *p = &u->defer_head; *p;) {
        mp_handle *l = mp__handle_at(ch, *p - 1);
        if (l == h) {
            *p = UH(h)->defer_next;
            break;
        }
        p = &UH(l)->defer_next;
    }
}

/* A drain was refused (-EINVAL): the kernel predates IORING_ACCEPT_DONTWAIT.  Deferral ends
 * for the channel; the caller arms the listener as usual. */
void mp__u_defer_refused(mp_channel *ch) {
    uring *u = U(ch);
    u->defer_us = 0;
    u->fresh = 0;
    u->fresh_epoch++;
    mp__log_once(ch, MP_LOG_NO_DONTWAIT, "kernel lacks IORING_ACCEPT_DONTWAIT (Linux 6.10): "
                                         "accepting is not deferred (MP_ACCEPT_DEFER)");
}

static void drain(mp_channel *ch, mp_handle *l) {
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) return;
    mp__u_prep_accept(ch, l, sqe, l->fd, true, false);
    sqe->ioprio |= IORING_ACCEPT_DONTWAIT;
    UH(l)->ms_armed = true;
    UH(l)->drain = true;
    UH(l)->nflight++;
    l->inflight++;
    ch->st.accept_drains++;
}

int mp__u_defer_wait(mp_channel *ch, int timeout_ms, unsigned *quiet) {
    uring *u = U(ch);
    if (!u->defer_head) return timeout_ms;
    bool hold = holding(ch), take = hold && u->defer_drain;
    u->defer_drain = false; /* "a receive completed since the last wait" */
    for (uint32_t i = u->defer_head; i;) {
        mp_handle *l = mp__handle_at(ch, i - 1);
        i = UH(l)->defer_next;
        if (l->state != H_LIVE || l->acc.backoff) continue;
        bool deferrable = applies(ch, l);
        if (!hold || !deferrable) {
            /* Not deferred any more (or no longer deferrable: shared with mp_accept_share(),
             * count-limited by mp_accept()): armed as without the option.  A listener that
             * no longer applies leaves the list (arm_accept puts it back if it applies again). */
            if (!deferrable) mp__u_defer_forget(ch, l);
            mp__u_arm_accept(ch, l); /* no-op when armed already */
        } else if (UH(l)->nflight && !UH(l)->drain) {
            /* Waiting accepts armed before these connections came (a multishot, or the
             * one-shots of a listener that was shared): stop them (each ends with -ECANCELED,
             * which re-arms nothing while accepting is deferred). */
            mp__u_cancel_accepts(ch, l);
            *quiet += UH(l)->nflight;
        } else if (take && !UH(l)->nflight) {
            drain(ch, l);
            (*quiet)++; /* its final -EAGAIN */
        }
    }
    if (hold) {
        int64_t left = u->defer_until - mp__now_us();
        int ms = left <= 0 ? 1 : (int)((left + 999) / 1000);
        if (timeout_ms < 0 || timeout_ms > ms) timeout_ms = ms;
    }
    return timeout_ms;
}
