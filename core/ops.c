/*
 * ops.c — the application's I/O requests and the per-handle FIFOs that order them.
 *
 * Each handle has a read queue and a write queue.  Only the head of each queue is ever in the
 * kernel, so reads complete in issue order and so do writes; a short send leaves the head in
 * place and restarts it from where it stopped, so a WRITE event always means "all bytes are
 * in the send queue" (or an error).  Engines start heads and report outcomes through
 * mp__read_done() / mp__write_done(); they may also complete a head at once (the epoll
 * engine's try-first path), which the pump loops handle without recursion.
 */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define OP_FREE_MAX 4096 /* spare op records kept per channel */

mp_op *mp__op_alloc(mp_channel *ch) {
    mp_op *op = ch->op_free;
    if (op) {
        ch->op_free = op->next;
        ch->op_free_n--;
    } else {
        op = malloc(sizeof *op);
        if (!op) return NULL;
    }
    memset(op, 0, offsetof(mp_op, msg));
    return op;
}

void mp__op_free(mp_channel *ch, mp_op *op) {
    if (op->type == OP_WRITEV && op->buf != (void *)op->iov_inline) free(op->buf);
    if (ch->op_free_n >= OP_FREE_MAX) {
        free(op);
        return;
    }
    op->next = ch->op_free;
    ch->op_free = op;
    ch->op_free_n++;
}

void mp__opq_push(mp_opq *q, mp_op *op) {
    op->next = NULL;
    if (q->tail)
        q->tail->next = op;
    else
        q->head = op;
    q->tail = op;
}

mp_op *mp__opq_pop(mp_opq *q) {
    mp_op *op = q->head;
    if (op) {
        q->head = op->next;
        if (!q->head) q->tail = NULL;
    }
    return op;
}

void mp__opq_drop(mp_channel *ch, mp_opq *q, bool keep_head) {
    mp_op *op = q->head;
    if (keep_head && op) {
        op = op->next;
        q->head->next = NULL;
        q->tail = q->head;
    } else {
        q->head = q->tail = NULL;
    }
    while (op) {
        mp_op *n = op->next;
        mp__op_free(ch, op);
        op = n;
    }
}

/* A connection handle the calling thread may use: 0, -EBADF or -EPERM. */
static int conn_enter(mp_handle *h) {
    int e = mp__h_enter(h);
    if (e < 0) return e;
    return h->kind == HK_CONN ? 0 : -EBADF;
}

/* ---- reads ---------------------------------------------------------------------------- */

/* Outcome of the head read.  res > 0: data; 0: EOF; < 0: error (DISCONNECT). */
static void read_result(mp_handle *h, ssize_t res, uint32_t flags, unsigned buf_id, void *buf) {
    mp_channel *ch = h->ch;
    mp_op *op = mp__opq_pop(&h->rq);
    if (op && op->evflags & MP_EVF_BUFFER) { /* completed at once from the engine's stash */
        flags = op->evflags;
        buf_id = op->buf_id;
        buf = op->rbuf;
    }
    if (res > 0) {
        mp_event *ev = mp__event_push_ref(ch, h, MP_EV_READ, res, flags);
        if (ev) {
            ev->u.read.buf = buf ? buf : (op ? op->buf : NULL);
            ev->u.read.len = (size_t)res;
            ev->u.read.buf_id = buf_id;
        }
    } else {
        mp__event_push(ch, h, MP_EV_DISCONNECT, res, 0);
    }
    if (op) mp__op_free(ch, op);
}

void mp__pump_reads(mp_handle *h) {
    while (h->state == H_LIVE && !h->r_busy && h->rq.head) {
        ssize_t r = h->ch->eng->start_read(h->ch, h, h->rq.head);
        if (r == MP_INPROGRESS) {
            h->r_busy = 1;
            return;
        }
        read_result(h, r, 0, 0, NULL);
    }
}

void mp__read_done(mp_handle *h, ssize_t res, uint32_t evflags, unsigned buf_id, void *buf) {
    h->r_busy = 0;
    if (h->state != H_LIVE) {
        mp_op *op = mp__opq_pop(&h->rq);
        if (op) mp__op_free(h->ch, op);
        return;
    }
    read_result(h, res, evflags, buf_id, buf);
    mp__pump_reads(h);
}

static int queue_read(mp_handle *h, int type, void *buf, size_t size) {
    mp_op *op = mp__op_alloc(h->ch);
    if (!op) return -ENOMEM;
    op->type = (uint8_t)type;
    op->buf = buf;
    op->len = size;
    mp__opq_push(&h->rq, op);
    h->ch->st.requests++;
    mp__pump_reads(h);
    return 0;
}

int mp_read(mp_handle *h, void *buf, size_t size) {
    int e = conn_enter(h);
    if (e < 0) return e;
    if (!buf || size == 0 || size > INT_MAX || h->readbuf) return -EINVAL;
    return queue_read(h, OP_READ, buf, size);
}

int mp_read_buffered(mp_handle *h) {
    int e = conn_enter(h);
    if (e < 0) return e;
    if (!h->ch->eng->buf_setup) return -ENOTSUP;
    if (!h->readbuf && h->rq.head) return -EINVAL; /* plain reads still pending */
    int r = h->ch->eng->buf_setup(h->ch); /* fail here, not later as an event */
    if (r < 0) return r;
    h->readbuf = true;
    return queue_read(h, OP_READBUF, NULL, 0);
}

int mp_buffer_release(mp_channel *ch, unsigned buf_id) {
    int e = mp__ch_enter(ch);
    if (e < 0) return e;
    if (!ch->eng->buf_release) return -ENOTSUP;
    return ch->eng->buf_release(ch, buf_id);
}

/* ---- writes --------------------------------------------------------------------------- */

/* Drop n sent bytes from the front of a WRITEV op's remaining iovecs. */
static void iov_advance(mp_op *op, size_t n) {
    while (n && op->iovcnt) {
        if (n >= op->iov->iov_len) {
            n -= op->iov->iov_len;
            op->iov++;
            op->iovcnt--;
        } else {
            op->iov->iov_base = (char *)op->iov->iov_base + n;
            op->iov->iov_len -= n;
            n = 0;
        }
    }
}

/* Outcome of (part of) the head write: finish the head, or leave it for a restart. */
static void write_result(mp_handle *h, ssize_t res) {
    mp_channel *ch = h->ch;
    mp_op *op = h->wq.head;
    if (op->type == OP_WRITE || op->type == OP_WRITEV) {
        if (res >= 0) {
            op->done += (size_t)res;
            if (op->type == OP_WRITEV) iov_advance(op, (size_t)res);
            if (op->done < op->len && res > 0) return; /* short send: restart the rest */
            if (op->done < op->len) res = -EPIPE;      /* 0 bytes accepted: cannot go on */
            else res = (ssize_t)op->len;
        }
        mp__event_push(ch, h, MP_EV_WRITE, res, 0);
    } else if (op->type == OP_SHUTDOWN) {
        mp__event_push(ch, h, MP_EV_DISCONNECT, res < 0 ? res : 0, MP_EVF_LOCAL);
    } else if (op->type == OP_CONNECT) {
        mp__event_push(ch, h, MP_EV_CONNECT, res < 0 ? res : 0, 0);
    }
    mp__opq_pop(&h->wq);
    mp__op_free(ch, op);
}

void mp__pump_writes(mp_handle *h) {
    while (h->state == H_LIVE && !h->w_busy && h->wq.head) {
        ssize_t r = h->ch->eng->start_write(h->ch, h, h->wq.head);
        if (r == MP_INPROGRESS) {
            h->w_busy = 1;
            return;
        }
        write_result(h, r);
    }
}

void mp__write_done(mp_handle *h, ssize_t res) {
    h->w_busy = 0;
    if (h->state != H_LIVE) {
        mp_op *op = mp__opq_pop(&h->wq);
        if (op) mp__op_free(h->ch, op);
        return;
    }
    write_result(h, res);
    mp__pump_writes(h);
}

static int queue_write(mp_handle *h, mp_op *op) {
    mp__opq_push(&h->wq, op);
    h->ch->st.requests++;
    mp__pump_writes(h);
    return 0;
}

int mp_write(mp_handle *h, const void *buf, size_t size) {
    int e = conn_enter(h);
    if (e < 0) return e;
    if (!buf || size == 0 || size > INT_MAX) return -EINVAL;
    mp_op *op = mp__op_alloc(h->ch);
    if (!op) return -ENOMEM;
    op->type = OP_WRITE;
    op->buf = (void *)buf;
    op->len = size;
    return queue_write(h, op);
}

int mp_writev(mp_handle *h, const struct iovec *iov, int iovcnt) {
    int e = conn_enter(h);
    if (e < 0) return e;
    if (!iov || iovcnt <= 0 || iovcnt > IOV_MAX) return -EINVAL;
    size_t total = 0;
    for (int i = 0; i < iovcnt; i++) {
        if (iov[i].iov_len && !iov[i].iov_base) return -EINVAL;
        total += iov[i].iov_len;
        if (total > INT_MAX) return -EINVAL;
    }
    if (total == 0) return -EINVAL;
    mp_op *op = mp__op_alloc(h->ch);
    if (!op) return -ENOMEM;
    op->type = OP_WRITEV;
    op->len = total;
    if (iovcnt <= (int)(sizeof op->iov_inline / sizeof op->iov_inline[0])) {
        op->iov = op->iov_inline;
    } else {
        op->iov = malloc((size_t)iovcnt * sizeof *op->iov);
        if (!op->iov) {
            mp__op_free(h->ch, op);
            return -ENOMEM;
        }
    }
    memcpy(op->iov, iov, (size_t)iovcnt * sizeof *iov);
    op->buf = op->iov; /* the allocation, for freeing after iov advances */
    op->iovcnt = iovcnt;
    return queue_write(h, op);
}

int mp_disconnect(mp_handle *h) {
    int e = conn_enter(h);
    if (e < 0) return e;
    mp_op *op = mp__op_alloc(h->ch);
    if (!op) return -ENOMEM;
    op->type = OP_SHUTDOWN;
    return queue_write(h, op);
}

int mp_connect(mp_handle *h, const struct sockaddr *addr, socklen_t addrlen) {
    int e = conn_enter(h);
    if (e < 0) return e;
    if (h->fixed) return -EBADF;
    if (!addr || addrlen == 0 || addrlen > sizeof(struct sockaddr_storage)) return -EINVAL;
    mp_op *op = mp__op_alloc(h->ch);
    if (!op) return -ENOMEM;
    op->type = OP_CONNECT;
    memcpy(&op->addr, addr, addrlen);
    op->addrlen = addrlen;
    return queue_write(h, op);
}

int mp_export_fd(mp_handle *h) {
    int e = mp__h_enter(h);
    if (e < 0) return e;
    if (h->kind == HK_POLL) return -EBADF;
    return h->ch->eng->export_fd(h->ch, h);
}
