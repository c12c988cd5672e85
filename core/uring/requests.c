/*
 * uring/requests.c — the core's requests as SQEs: reads and writes (the head of a handle's
 * queue), accepts (multishot or one at a time, slots reserved for lwsockets, back-off after
 * errors, balancing steals), readiness polls, a handle's end (cancels), and the one
 * synchronous request, mp_export_fd().
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

#include "uring.h"

ssize_t mp__u_start_read(mp_channel *ch, mp_handle *h, mp_op *op) {
    uring *u = U(ch);
    struct io_uring_sqe *sqe;
    if (op->type == OP_READBUF) { /* the buffer ring exists: mp_read_buffered made it */
        mp_op *s = mp__opq_pop(&h->stash);
        if (s) { /* data that arrived before this request asked for it */
            ssize_t res = (ssize_t)s->len;
            op->evflags = s->evflags;
            op->buf_id = s->buf_id;
            op->rbuf = s->rbuf;
            mp__op_free(ch, s);
            return res;
        }
        if (UH(h)->readbuf_armed) return MP_INPROGRESS;
        if (u->nbufs && ch->st.bufs_in_use >= u->nbufs) { /* starved: re-armed at next wait */
            ch->st.buf_starved++;
            mp__rearm_add(h);
            return MP_INPROGRESS;
        }
        if (rb_room(ch, h) <= 0) { /* resumed by a release of one of its buffers */
            if (!UH(h)->rb_capped) ch->st.buf_paused++;
            UH(h)->rb_capped = true;
            return MP_INPROGRESS;
        }
        /* The kernel picks a buffer only when data arrives: an idle connection holds none.
         * Far below MP_BUF_PER_CONN one multishot receive feeds the handle (and reads ahead
         * into the stash); near it, one receive of one buffer per request, so that a
         * connection whose application stops reading holds at most one buffer more. */
        if (!(sqe = mp__u_sqe(ch))) return -EAGAIN;
        UH(h)->rb_multishot = rb_multishot_ok(ch, h);
        if (UH(h)->rb_multishot) io_uring_prep_recv_multishot(sqe, h->fd, NULL, 0, 0);
        else io_uring_prep_recv(sqe, h->fd, NULL, 0, 0);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = BUF_GROUP;
        /* A connection's first receive usually comes before its first data (a connection just
         * accepted: the client's request follows its handshake): the kernel arms the poll at
         * once instead of trying the receive first (a socket lock, a buffer picked and put
         * back, -EAGAIN).  Data already there is found by the poll's own first look.  Every
         * kernel with buffer rings (5.19) knows the flag. */
        if (!UH(h)->rb_started) sqe->ioprio |= IORING_RECVSEND_POLL_FIRST;
        UH(h)->rb_started = true;
        UH(h)->readbuf_armed = true;
    } else {
        if (!(sqe = mp__u_sqe(ch))) return -EAGAIN;
        io_uring_prep_recv(sqe, h->fd, op->buf, op->len, 0);
    }
    set_file(sqe, h);
    io_uring_sqe_set_data64(sqe, ud(T_READ, h->gen, h->idx));
    h->inflight++;
    mp__u_batch_check(ch);
    return MP_INPROGRESS;
}

ssize_t mp__u_start_write(mp_channel *ch, mp_handle *h, mp_op *op) {
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) return -EAGAIN;
    switch (op->type) {
    case OP_WRITE:
        io_uring_prep_send(sqe, h->fd, (char *)op->buf + op->done, op->len - op->done,
                           MSG_NOSIGNAL);
        break;
    case OP_WRITEV:
        if (op->iovcnt == 1) { /* what is left is one buffer: a send, no message header */
            io_uring_prep_send(sqe, h->fd, op->iov[0].iov_base, op->iov[0].iov_len, MSG_NOSIGNAL);
            break;
        }
        memset(&op->msg, 0, sizeof op->msg);
        op->msg.msg_iov = op->iov;
        op->msg.msg_iovlen = (size_t)op->iovcnt;
        io_uring_prep_sendmsg(sqe, h->fd, &op->msg, MSG_NOSIGNAL);
        break;
    case OP_SHUTDOWN:
        io_uring_prep_shutdown(sqe, h->fd, SHUT_WR);
        break;
    case OP_CONNECT:
        io_uring_prep_connect(sqe, h->fd, (struct sockaddr *)&op->addr, op->addrlen);
        break;
    default:
        return -EINVAL;
    }
    set_file(sqe, h);
    io_uring_sqe_set_data64(sqe, ud(T_WRITE, h->gen, h->idx));
    h->inflight++;
    mp__u_batch_check(ch);
    return MP_INPROGRESS;
}

static bool accept_wanted(const mp_handle *h) {
    return h->state == H_LIVE && (h->acc.forever || h->acc.left > 0);
}

/* An accept of h on fd (h's own queue, or a sibling's when steal), with its user_data.
 * Returns whether it yields direct descriptors (lwsockets). */
bool mp__u_prep_accept(mp_channel *ch, mp_handle *h, struct io_uring_sqe *sqe, int fd,
                       bool multishot, bool steal) {
    uring *u = U(ch);
    bool direct = h->acc.lw && u->nfixed;
    enum tag t = steal ? (direct ? T_STEAL_LW : T_STEAL) : (direct ? T_ACCEPT_LW : T_ACCEPT);
    /* The peer's address: a one-shot accept writes it into a buffer of its own; a multishot
     * writes every connection's into one (complete.c tells which one it holds).  Not with
     * lwsockets: arm_accept makes their accepts one-shot. */
    uring_aslot *as = h->acc.addr ? mp__u_aslot_get(ch, h, t, multishot) : NULL;
    struct sockaddr *addr = as ? (struct sockaddr *)&as->ss : NULL;
    socklen_t *addrlen = as ? &as->len : NULL;
    if (h->acc.lw && !u->nfixed)
        mp__log_once(ch, MP_LOG_NO_LWSOCKET,
                     "lwsockets unavailable (no direct-descriptor table): accepting regular fds");
    /* Direct descriptors have no close-on-exec flag (the kernel refuses SOCK_CLOEXEC). */
    if (multishot && direct) {
        io_uring_prep_multishot_accept_direct(sqe, fd, addr, addrlen, 0);
    } else if (multishot) {
        io_uring_prep_multishot_accept(sqe, fd, addr, addrlen, SOCK_CLOEXEC);
    } else if (direct) {
        mpu_prep_accept_direct_alloc(sqe, fd, addr, addrlen);
    } else {
        io_uring_prep_accept(sqe, fd, addr, addrlen, SOCK_CLOEXEC);
    }
    io_uring_sqe_set_data64(sqe, as ? ud(T_ACCEPT_ADDR, as->id, h->idx) : ud(t, h->gen, h->idx));
    return direct;
}

unsigned mp__u_lw_free(const mp_channel *ch) {
    const uring *u = U(ch);
    unsigned used = ch->lw_used + u->lw_inflight;
    return used < u->nfixed ? u->nfixed - used : 0;
}

/* No slot for an lwsocket: accepting pauses (the connections stay in the backlog) and is
 * looked at again at each wait, after the application had the chance to free slots. */
void mp__u_accept_pause(mp_channel *ch, mp_handle *h) {
    if (!UH(h)->lw_full) {
        ch->st.accept_paused++;
        mp__log_once(ch, MP_LOG_LW_FULL, "lwsocket table full (%u slots, MP_MAX_LWSOCKETS): "
                     "accepting pauses until a slot is freed", U(ch)->nfixed);
    }
    UH(h)->lw_full = true;
    mp__rearm_add(h);
}

int mp__u_arm_accept(mp_channel *ch, mp_handle *h) {
    uring *u = U(ch);
    if (h->acc.backoff || !accept_wanted(h) || UH(h)->ms_armed) return 0;
    bool direct = h->acc.lw && u->nfixed;
    unsigned slots = direct ? mp__u_lw_free(ch) : ~0u;
    /* A socket's accept wake-ups are exclusive, first waiter first: a multishot accept keeps
     * its place at the head of the queue, so on a queue that other channels share (no
     * partition of our own) it would take every connection.  One-shot accepts go to the back
     * of the queue each time they are armed, and the channels take turns.  A caller that
     * says nobody else accepts from the queue (MP_ACCEPT_EXCLUSIVE) gets the multishot. */
    bool shared = !h->acc.part && !h->acc.excl;
    /* Peer addresses of lwsockets: one-shot accepts (a multishot's lost ones could only be
     * had with getpeername(), which a direct descriptor does not allow). */
    bool ms = h->acc.forever && u->ms_accept && !shared && !(h->acc.addr && direct) &&
              (!direct || slots > LW_MULTISHOT_HEADROOM);
    if (ms && UH(h)->nflight) return 0; /* one-shots still out: multishot when they are back */
    /* One-shot accepts: as many as are wanted, slots allow (each may take one) and the cap. */
    unsigned want = ms ? 1 : shared ? ACCEPT_SHARED_MAX : ACCEPT_ONESHOT_MAX;
    if (!h->acc.forever && h->acc.left < want) want = h->acc.left;
    if (!ms && slots < want) want = slots;
    if (direct && !slots && !UH(h)->nflight) {
        mp__u_accept_pause(ch, h);
        return 0;
    }
    UH(h)->lw_full = false;
    while (UH(h)->nflight < want) {
        struct io_uring_sqe *sqe = mp__u_sqe(ch);
        if (!sqe) return -EAGAIN;
        bool lw = mp__u_prep_accept(ch, h, sqe, h->fd, ms, false);
        if (lw && !ms) u->lw_inflight++;
        UH(h)->ms_armed = ms;
        UH(h)->nflight++;
        h->inflight++;
        if (ms) break;
    }
    if (ch->cfg.balance && h->acc.part && h->acc.forever) u->balancing = true;
    mp__u_batch_check(ch);
    return 0;
}

/* mp_accept_share: a multishot accept armed because the listener was exclusive is cancelled;
 * its -ECANCELED end re-arms (mp__u_arm_accept) with one-shot accepts, which take turns with
 * the queue's other waiters.  Connections it took before the cancel are still completions,
 * delivered as ACCEPT events.  A partition keeps its multishot (the queue is its own). */
int mp__u_share_accept(mp_channel *ch, mp_handle *h) {
    if (h->acc.part || !UH(h)->ms_armed) return 0;
    mp__u_cancel_accepts(ch, h);
    return 0;
}

/* Stop every accept of h in the kernel (both kinds). */
void mp__u_cancel_accepts(mp_channel *ch, mp_handle *h) {
    mp__u_cancel_all(ch, ud(T_ACCEPT, h->gen, h->idx));
    mp__u_cancel_all(ch, ud(T_ACCEPT_LW, h->gen, h->idx));
    mp__u_aslot_cancel(ch, h);
}

void mp__u_accept_backoff(mp_channel *ch, mp_handle *h) {
    uring *u = U(ch);
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) return;
    io_uring_prep_timeout(sqe, &u->backoff_ts, 0, 0);
    io_uring_sqe_set_data64(sqe, ud(T_TIMER, h->gen, h->idx));
    h->acc.backoff = true;
    h->inflight++;
}

/* Accept load balancing: an idle partition takes one connection from a busy sibling. */
void mp__u_balance(mp_channel *ch) {
    uring *u = U(ch);
    u->balancing = false;
    for (uint32_t c = 0; c < ch->nchunks; c++)
        for (uint32_t i = 0; i < MP_CHUNK_SIZE; i++) {
            mp_handle *h = &ch->chunks[c][i];
            if (h->state != H_LIVE || h->kind != HK_LISTENER || !h->acc.part || !h->acc.forever)
                continue;
            u->balancing = true;
            if (UH(h)->steal_busy || mp__partition_backlog(h->fd) > 0) continue;
            if (h->acc.lw && u->nfixed && !mp__u_lw_free(ch)) continue;
            int fd = mp__partition_busy_sibling(h, (unsigned)ch->cfg.balance_threshold);
            ch->st.syscalls += 2;
            if (fd < 0) continue;
            struct io_uring_sqe *sqe = mp__u_sqe(ch);
            if (sqe) {
                bool lw = mp__u_prep_accept(ch, h, sqe, fd, false, true);
                if (lw) u->lw_inflight++;
                UH(h)->steal_busy = true;
                h->inflight++;
                mp__u_flush(ch); /* the kernel takes its own reference to the file here */
            }
            close(fd);
        }
}

int mp__u_poll_arm(mp_channel *ch, mp_handle *h) {
    if (U(ch)->eset) return mp__u_eset_arm(ch, h);
    if (h->pw.armed) {
        mp__u_cancel(ch, ud(T_POLL, UH(h)->poll_seq, h->idx));
        h->pw.armed = false;
    }
    if (h->state != H_LIVE || !h->pw.events) return 0;
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) return -EAGAIN;
    unsigned mask = h->pw.events | POLLERR | POLLHUP;
    bool et = (h->pw.flags & (MP_POLL_ET | MP_POLL_ONESHOT)) == MP_POLL_ET && U(ch)->ms_poll;
    if (et)
        io_uring_prep_poll_multishot(sqe, h->fd, mask);
    else
        io_uring_prep_poll_add(sqe, h->fd, mask);
    /* seq doubles as the arm sequence carried in user_data */
    UH(h)->poll_seq = (UH(h)->poll_seq + 1) & 0xffffff;
    io_uring_sqe_set_data64(sqe, ud(T_POLL, UH(h)->poll_seq, h->idx));
    h->pw.armed = true;
    h->inflight++;
    ch->st.watch_ops++;
    return 0;
}

unsigned mp__u_detach(mp_channel *ch, mp_handle *h) {
    if (h->r_busy || UH(h)->readbuf_armed) mp__u_cancel(ch, ud(T_READ, h->gen, h->idx));
    for (mp_op *s; (s = mp__opq_pop(&h->stash));) {
        if (s->evflags & MP_EVF_BUFFER) mp__u_buf_release(ch, s->buf_id);
        mp__op_free(ch, s);
    }
    if (h->w_busy) mp__u_cancel(ch, ud(T_WRITE, h->gen, h->idx));
    if (UH(h)->nflight) mp__u_cancel_accepts(ch, h);
    if (UH(h)->steal_busy) {
        mp__u_cancel(ch, ud(T_STEAL, h->gen, h->idx));
        mp__u_cancel(ch, ud(T_STEAL_LW, h->gen, h->idx));
    }
    if (h->acc.backoff) mp__u_cancel(ch, ud(T_TIMER, h->gen, h->idx));
    if (h->kind == HK_POLL && U(ch)->eset) mp__u_eset_detach(ch, h);
    else if (h->pw.armed) mp__u_cancel(ch, ud(T_POLL, UH(h)->poll_seq, h->idx));
    if (h->fixed) mp__u_close_direct(ch, (unsigned)h->fd);
    /* With DEFER_TASKRUN a cancelled accept leaves the socket's wait queue only in task work,
     * which runs when we enter with GETEVENTS: until then it would keep taking the wake-ups
     * another channel on a shared queue needs.  The core flushes at once for listeners, and
     * every flush runs the task work. */
    return h->inflight;
}

int mp__u_attach(mp_channel *ch, mp_handle *h) {
    (void)ch;
    (void)h;
    return 0;
}

/* Run one synchronous request (export) to completion, keeping other completions as events. */
int mp__u_export_fd(mp_channel *ch, mp_handle *h) {
    uring *u = U(ch);
    if (!h->fixed) {
        int fd = fcntl(h->fd, F_DUPFD_CLOEXEC, 0);
        return fd < 0 ? -errno : fd;
    }
    if (!u->fixed_install) {
        mp__log_once(ch, MP_LOG_NO_INSTALL, "kernel lacks IORING_OP_FIXED_FD_INSTALL: "
                                            "mp_export_fd() of lwsockets is not supported");
        return -ENOTSUP;
    }
    struct io_uring_sqe *sqe = mp__u_sqe(ch);
    if (!sqe) return -EAGAIN;
    io_uring_prep_rw(IORING_OP_FIXED_FD_INSTALL, sqe, h->fd, NULL, 0, 0);
    sqe->flags |= IOSQE_FIXED_FILE;
    sqe->rw_flags = 0; /* install_fd_flags: O_CLOEXEC is the default */
    io_uring_sqe_set_data64(sqe, ud(T_EXPORT, h->gen, h->idx));
    h->inflight++;
    u->export_done = false;
    mp__u_enable(ch);
    while (!u->export_done) {
        unsigned n = io_uring_sq_ready(&u->ring);
        int r = io_uring_submit_and_wait(&u->ring, 1);
        ch->st.syscalls++;
        if (r < 0 && r != -EINTR && r != -EBUSY) return r;
        if (r > 0) mp__batch_account(ch, n - io_uring_sq_ready(&u->ring));
        mp__u_reap(ch);
    }
    return u->export_res;
}
