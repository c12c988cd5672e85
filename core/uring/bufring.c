/*
 * uring/bufring.c — buffered reads: the channel's provided-buffer ring, which connection holds
 * which buffer (MP_BUF_PER_CONN), and the completions of buffered receives (multishot far
 * below the cap, one buffer per request near it; a stash keeps data that came before a
 * request asked, so it is still one event per request, in order).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "uring.h"

int mp__u_bufring_setup(mp_channel *ch) {
    uring *u = U(ch);
    if (u->br) return 0;
    if (u->br_failed) return -ENOTSUP;
    unsigned n = 1;
    while (n < (unsigned)ch->cfg.buf_count) n <<= 1;
    size_t ring_sz = n * sizeof(struct io_uring_buf);
    void *mem = mmap(NULL, ring_sz, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (mem == MAP_FAILED) return -ENOMEM;
    char *bufs = malloc((size_t)n * (size_t)ch->cfg.buf_size);
    uint8_t *busy = calloc(n, 1);
    struct buf_owner *owner = calloc(n, sizeof *owner);
    if (!bufs || !busy || !owner) {
        munmap(mem, ring_sz);
        free(bufs);
        free(busy);
        free(owner);
        return -ENOMEM;
    }
    struct io_uring_buf_reg reg = {.ring_addr = (uint64_t)(uintptr_t)mem, .ring_entries = n,
                                   .bgid = BUF_GROUP};
    int r = io_uring_register_buf_ring(&u->ring, &reg, 0);
    ch->st.syscalls++;
    if (r < 0) {
        munmap(mem, ring_sz);
        free(bufs);
        free(busy);
        free(owner);
        u->br_failed = true;
        ch->st.missing |= MP_FEAT_BUF_RING;
        mp__log_once(ch, MP_LOG_NO_BUFRING, "provided-buffer rings unavailable (%s)", strerror(-r));
        return -ENOTSUP;
    }
    u->br = mem;
    u->bufs = bufs;
    u->buf_busy = busy;
    u->buf_owner = owner;
    u->nbufs = n;
    u->bufsz = (unsigned)ch->cfg.buf_size;
    io_uring_buf_ring_init(u->br);
    for (unsigned i = 0; i < n; i++)
        io_uring_buf_ring_add(u->br, bufs + (size_t)i * u->bufsz, u->bufsz, (unsigned short)i,
                              io_uring_buf_ring_mask(n), (int)i);
    io_uring_buf_ring_advance(u->br, (int)n);
    ch->st.features |= MP_FEAT_BUF_RING;
    return 0;
}

/* A buffer the kernel filled for h: h holds it until it is given back. */
void mp__u_buf_take(mp_channel *ch, mp_handle *h, unsigned id) {
    uring *u = U(ch);
    u->buf_busy[id] = 1;
    if (++ch->st.bufs_in_use > ch->st.bufs_peak) ch->st.bufs_peak = ch->st.bufs_in_use;
    u->buf_owner[id].idx1 = h->idx + 1;
    u->buf_owner[id].gen = h->gen;
    UH(h)->bufs_held++;
}

int mp__u_buf_release(mp_channel *ch, unsigned id) {
    uring *u = U(ch);
    if (!u->br || id >= u->nbufs || !u->buf_busy[id]) return -EINVAL;
    u->buf_busy[id] = 0;
    struct buf_owner *o = &u->buf_owner[id];
    mp_handle *h = o->idx1 ? mp__handle_at(ch, o->idx1 - 1) : NULL;
    if (h && h->gen == o->gen && UH(h)->bufs_held) {
        UH(h)->bufs_held--;
        /* A receive paused at MP_BUF_PER_CONN resumes at the next wait. */
        if (UH(h)->rb_capped && UH(h)->bufs_held < (uint32_t)ch->cfg.buf_per_conn && h->state == H_LIVE) {
            UH(h)->rb_capped = false;
            if (h->r_busy && !UH(h)->readbuf_armed) mp__rearm_add(h);
        }
    }
    o->idx1 = 0;
    io_uring_buf_ring_add(u->br, u->bufs + (size_t)id * u->bufsz, u->bufsz, (unsigned short)id,
                          io_uring_buf_ring_mask(u->nbufs), 0);
    io_uring_buf_ring_advance(u->br, 1);
    ch->st.bufs_in_use--; /* receives starved of buffers restart at the next wait */
    return 0;
}

/* A completion of h's multishot buffered receive. */
void mp__u_readbuf_done(mp_channel *ch, mp_handle *h, int res, unsigned flags) {
    uring *u = U(ch);
    bool final = !(flags & IORING_CQE_F_MORE);
    if (final) {
        h->inflight--;
        UH(h)->readbuf_armed = false;
    }
    if (res == -ENOBUFS) { /* ring empty: no data lost, it stays in the socket */
        ch->st.buf_starved++;
        if (h->r_busy) {
            h->r_busy = 0;
            mp__rearm_add(h);
        }
        return;
    }
    if (res == -ECANCELED && UH(h)->rb_cancelling) { /* ours: go on one buffer at a time */
        UH(h)->rb_cancelling = false;
        if (h->r_busy && h->state == H_LIVE) {
            h->r_busy = 0;
            mp__pump_reads(h);
        }
        return;
    }
    unsigned id = 0;
    void *buf = NULL;
    uint32_t evf = 0;
    if (flags & IORING_CQE_F_BUFFER) {
        id = flags >> IORING_CQE_BUFFER_SHIFT;
        mp__u_buf_take(ch, h, id);
        if (res <= 0) {
            mp__u_buf_release(ch, id);
        } else {
            buf = u->bufs + (size_t)id * u->bufsz;
            evf = MP_EVF_BUFFER;
        }
    }
    if (h->r_busy && h->rq.head && h->rq.head->type == OP_READBUF) {
        mp__read_done(h, res, evf, id, buf);
    } else {
        mp_op *s = mp__op_alloc(ch);
        if (!s) { /* cannot keep it: give the buffer back rather than leak it */
            if (evf) mp__u_buf_release(ch, id);
        } else {
            s->type = OP_READBUF;
            s->len = (size_t)(ssize_t)res;
            s->evflags = evf;
            s->buf_id = id;
            s->rbuf = buf;
            mp__opq_push(&h->stash, s);
        }
    }
    /* One connection may not hold the whole pool: near MP_BUF_PER_CONN the multishot stops
     * (the data waits in the socket); requests then take one buffer each, and past the limit
     * the receive pauses until the connection gives buffers back (start_read). */
    if (!final && UH(h)->rb_multishot && !UH(h)->rb_cancelling && !rb_multishot_ok(ch, h)) {
        UH(h)->rb_cancelling = true;
        mp__u_cancel(ch, ud(T_READ, h->gen, h->idx));
    }
    /* Ended although the connection goes on (e.g. CQ overflow): start it again. */
    if (final && res > 0 && h->state == H_LIVE && h->r_busy) {
        h->r_busy = 0;
        mp__pump_reads(h);
    }
}
