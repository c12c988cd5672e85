/*
 * uring/complete.c — completion demultiplexing: CQEs are copied out of the completion ring in
 * batches, and each is routed by its user_data (tag, generation or arm sequence, handle slot)
 * to the core's mp__*_done callbacks; completions of ended handles release what they carry.
 */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

#include "uring.h"

struct reaped { uint64_t data; int res; unsigned flags; bool last; };

/* last: for a multishot accept's connection, no later connection of it was reaped, so the
 * address buffer it shares with them holds this one's (see mp__u_reap). */
static void mp__u_complete(mp_channel *ch, uint64_t data, int res, unsigned flags, bool last) {
    uring *u = U(ch);
    enum tag t = (enum tag)(data >> 56);
    uint32_t seq = (uint32_t)(data >> 32) & 0xffffff, idx = (uint32_t)data;
    bool final = !(flags & IORING_CQE_F_MORE);
    if (t == T_IGNORE || data == LIBURING_UDATA_TIMEOUT) {
        u->fw_noise++;
        return;
    }
    if (t == T_WAKE) {
        if (final) u->wake_armed = false;
        if (res >= 0) mp__u_wake_read(ch);
        if (!u->wake_armed) mp__u_arm_wake(ch);
        return;
    }
    if (t == T_EWAIT) {
        mp__u_eset_complete(ch, t, NULL, res);
        return;
    }
    if (t == T_FCTL || t == T_FWAIT || t == T_FTIMEOUT || t == T_FCLOSE) {
        mp__u_fepoll_complete(ch, t, idx, res);
        return;
    }
    /* An accept that wrote the peer's address: its slot says what it was. */
    struct sockaddr_storage peer;
    socklen_t peerlen = 0;
    if (t == T_ACCEPT_ADDR) {
        uring_aslot *s = mp__u_aslot_find(ch, seq);
        if (!s || s->idx != idx) return;
        t = (enum tag)s->tag;
        seq = s->gen;
        if (res >= 0 && !s->multishot) {
            peerlen = s->len <= sizeof s->ss ? s->len : sizeof s->ss;
            memcpy(&peer, &s->ss, peerlen);
        } else if (res >= 0 && last) {
            peerlen = s->seen_len;
            memcpy(&peer, &s->seen, peerlen);
        } else if (res >= 0 && t == T_ACCEPT && s->lookup) {
            /* An earlier connection of a multishot pass: its address was overwritten by a
             * later one's before we looked.  Asked for (one system call), unless the
             * application said it asks itself (MP_ACCEPT_ADDR_KNOWN: the event has none). */
            peerlen = sizeof peer;
            ch->st.syscalls++;
            ch->st.peer_lookups++;
            if (getpeername(res, (struct sockaddr *)&peer, &peerlen) < 0) peerlen = 0;
        }
        if (!(flags & IORING_CQE_F_MORE)) mp__u_aslot_put(ch, s);
    }
    mp_handle *h = mp__handle_at(ch, idx);
    if (!h || h->state == H_FREE) return;
    if (t != T_POLL && seq != h->gen) return;

    bool steal = t == T_STEAL || t == T_STEAL_LW;
    bool acc = steal || t == T_ACCEPT || t == T_ACCEPT_LW;
    bool acc_direct = t == T_ACCEPT_LW || t == T_STEAL_LW;
    bool acc_ms = acc && !steal && UH(h)->ms_armed;
    if (acc && final) {
        /* A one-shot direct accept ended: the slot it reserved is taken (counted in lwmap
         * from the ACCEPT event on) or was not needed. */
        if (acc_direct && !acc_ms && u->lw_inflight) u->lw_inflight--;
        if (steal) {
            UH(h)->steal_busy = false;
        } else {
            if (UH(h)->nflight) UH(h)->nflight--;
            if (acc_ms) UH(h)->ms_armed = false;
        }
    }

    if (h->state != H_LIVE) {
        /* Ended: release what the completion carries, deliver nothing. */
        if (acc && res >= 0) {
            if (acc_direct) mp__u_close_direct(ch, (unsigned)res);
            else close(res);
        }
        if (flags & IORING_CQE_F_BUFFER) {
            unsigned id = flags >> IORING_CQE_BUFFER_SHIFT;
            mp__u_buf_take(ch, h, id);
            mp__u_buf_release(ch, id);
        }
        if (t == T_READ && final) mp__read_done(h, res, 0, 0, NULL);
        if (t == T_WRITE) mp__write_done(h, res);
        if (t == T_EXPORT) {
            u->export_res = res >= 0 ? (close(res), -EBADF) : res;
            u->export_done = true;
        }
        if (final) mp__handle_settled(h);
        return;
    }

    switch (t) {
    case T_READ:
        if (h->readbuf) {
            mp__u_readbuf_done(ch, h, res, flags);
            return;
        }
        h->inflight--;
        mp__read_done(h, res, 0, 0, NULL);
        return;
    case T_WRITE:
        h->inflight--;
        mp__write_done(h, res);
        return;
    case T_ACCEPT:
    case T_ACCEPT_LW:
    case T_STEAL:
    case T_STEAL_LW:
        if (final) h->inflight--;
        if (res == -EINVAL && acc_ms) {
            /* multishot accept refused: fall back to one-shot accepts */
            u->ms_accept = false;
            ch->st.features &= ~MP_FEAT_MULTISHOT_ACCEPT;
            ch->st.missing |= MP_FEAT_MULTISHOT_ACCEPT;
            mp__log_once(ch, MP_LOG_NO_MULTISHOT, "multishot accept refused: one-shot accepts");
            mp__u_arm_accept(ch, h);
            return;
        }
        if (res == -ECANCELED) { /* ours: a steal, or accepts stopped (errors, headroom) */
            if (!steal) mp__u_arm_accept(ch, h); /* nothing while backing off */
            return;
        }
        /* The other one-shots of a round that failed fail the same way: one event a retry. */
        if (res < 0 && !steal && h->acc.backoff) return;
        if (res >= 0 && acc_direct) res += MP_LWSOCKET_BASE;
        mp__accept_done(h, res, flags & IORING_CQE_F_SOCK_NONEMPTY, steal,
                        peerlen ? (const struct sockaddr *)&peer : NULL, peerlen);
        if (res < 0 && !steal) {
            /* EMFILE, ENFILE (for lwsockets: the table filled under a multishot burst, and
             * the kernel closed that connection)...: stop every accept of h (one error event
             * per retry, not one per accept in flight) and try again a little later. */
            if (UH(h)->nflight) mp__u_cancel_accepts(ch, h);
            if (!h->acc.backoff) mp__u_accept_backoff(ch, h);
            return;
        }
        /* A multishot of lwsockets stops once the table runs low: one-shots from then on. */
        if (acc_ms && !final && acc_direct && mp__u_lw_free(ch) <= LW_MULTISHOT_HEADROOM)
            mp__u_cancel(ch, data);
        if (final && !steal) mp__u_arm_accept(ch, h);
        return;
    case T_TIMER:
        h->inflight--;
        h->acc.backoff = false;
        mp__u_arm_accept(ch, h);
        return;
    case T_POLL:
        if (final) h->inflight--;
        if (seq != UH(h)->poll_seq || h->kind != HK_POLL) return; /* an old arm */
        if (final) h->pw.armed = false;
        if (res == -ECANCELED) {
            if (!h->pw.armed) mp__u_poll_arm(ch, h);
            return;
        }
        bool queued = mp__poll_done(h, res < 0 ? (uint32_t)(POLLERR | POLLHUP) : (uint32_t)res);
        if (res < 0) h->pw.fired = true; /* refused (EBADF...): quiet until set again */
        if (final && !h->pw.armed && !h->pw.fired) {
            if ((h->pw.flags & (MP_POLL_ET | MP_POLL_ONESHOT)) == MP_POLL_ET)
                mp__u_poll_arm(ch, h); /* a multishot ended: re-arm */
            else if (!queued)
                mp__rearm_add(h); /* level, nothing to report: look again at the next wait */
            /* else re-armed once its event was handed out (poll.c, mp__poll_popped) */
        }
        return;
    case T_ECTL_ADD:
    case T_ECTL_MOD:
    case T_ECTL_DEL:
        mp__u_eset_complete(ch, t, h, res);
        return;
    case T_EXPORT:
        h->inflight--;
        u->export_res = res;
        u->export_done = true;
        return;
    default:
        return;
    }
}

/* Multishot accepts with addresses (MP_ACCEPT_ADDR) write every connection's peer address into
 * their one buffer, and may accept several before we look.  With DEFER_TASKRUN the kernel
 * accepts only inside our own io_uring_enter() calls, so when a batch is taken out of the ring
 * the buffer holds the address of the multishot's latest connection: its last successful
 * completion in the ring, when this batch empties the ring and no completion waits in the
 * kernel's overflow list.  That one (marked last) takes the buffer, copied now: handling the
 * batch may enter the kernel (a full submission batch is flushed), which may accept again.
 * Earlier ones are asked for.  (Rings without DEFER_TASKRUN could accept while we reap: never
 * marked there.) */
static void mark_last_accepts(mp_channel *ch, struct reaped *b, unsigned n) {
    uring *u = U(ch);
    bool trust = n < REAP_MAX && (ch->st.features & MP_FEAT_DEFER_TASKRUN) &&
                 !(IO_URING_READ_ONCE(*u->ring.sq.kflags) & IORING_SQ_CQ_OVERFLOW);
    u->reap_pass++;
    for (unsigned i = n; i-- > 0;) {
        if (b[i].data >> 56 != T_ACCEPT_ADDR || b[i].res < 0) continue;
        uring_aslot *s = mp__u_aslot_find(ch, (uint32_t)(b[i].data >> 32) & 0xffffff);
        if (!s || !s->multishot || s->scan == u->reap_pass) continue;
        s->scan = u->reap_pass;
        b[i].last = trust;
        s->seen_len = s->len <= sizeof s->ss ? s->len : sizeof s->ss;
        memcpy(&s->seen, &s->ss, s->seen_len);
        s->len = sizeof s->ss; /* whole again for the next accepts */
    }
}

void mp__u_reap(mp_channel *ch) {
    uring *u = U(ch);
    struct reaped batch[REAP_MAX];
    for (;;) {
        unsigned n = 0, head;
        struct io_uring_cqe *cqe;
        io_uring_for_each_cqe(&u->ring, head, cqe) {
            batch[n].data = cqe->user_data;
            batch[n].res = cqe->res;
            batch[n].flags = cqe->flags;
            batch[n].last = false;
            if (++n == REAP_MAX) break;
        }
        if (!n) break;
        io_uring_cq_advance(&u->ring, n);
        ch->st.cqes += n;
        if (u->ms_addr) mark_last_accepts(ch, batch, n);
        for (unsigned i = 0; i < n; i++)
            mp__u_complete(ch, batch[i].data, batch[i].res, batch[i].flags, batch[i].last);
        if (n < REAP_MAX) break;
    }
    if (io_uring_cq_has_overflow(&u->ring)) ch->st.cq_overflows++;
}
