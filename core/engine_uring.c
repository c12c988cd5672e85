/*
 * engine_uring.c — the io_uring engine (primary).
 *
 * Requests become SQEs written straight into the shared submission ring; the batcher's rules
 * decide when one io_uring_enter() hands them over.  Completions are read from the CQ ring in
 * user space and turned into events.  What it asks of the kernel, probed at mp_create():
 *   SINGLE_ISSUER + DEFER_TASKRUN (task work runs only when we wait: fewer interruptions),
 *   a registered ring fd, a sparse direct-descriptor table (lwsockets), multishot accept,
 *   FIXED_FD_INSTALL (mp_export_fd), provided-buffer rings and multishot receive (buffered
 *   reads), multishot poll (the readiness adapter).  Missing features are fallbacks, logged
 *   once and reported in mp_stats.missing.
 *
 * user_data = tag << 56 | seq << 32 | handle index.  Handles are never reused while the kernel
 * holds one of their operations, so the index alone finds the handle; seq is the handle's
 * generation (for polls: the arm sequence, so a cancelled arm's late completion is told apart
 * from the current one).
 */
#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"

/* Newer than Debian's liburing 2.3 headers: defined here, used only when probed. */
#ifndef IORING_OP_FIXED_FD_INSTALL
#define IORING_OP_FIXED_FD_INSTALL 54
#endif
#ifndef IORING_CQE_F_SOCK_NONEMPTY
#define IORING_CQE_F_SOCK_NONEMPTY (1U << 2)
#endif
#ifndef IORING_FEAT_MIN_TIMEOUT
#define IORING_FEAT_MIN_TIMEOUT (1U << 15) /* getevents_arg.min_wait_usec (the old pad) */
#endif

enum tag { T_IGNORE = 0, T_READ, T_WRITE, T_ACCEPT, T_STEAL, T_TIMER, T_POLL, T_EXPORT, T_WAKE };

#define BUF_GROUP 0
#define BACKOFF_NS (10 * 1000 * 1000) /* re-try accepting 10 ms after an error */
#define BALANCE_POLL_MS 5             /* how often an idle balancing channel looks at siblings */
#define REAP_MAX 256

typedef struct uring {
    struct io_uring ring;
    bool enabled;        /* ring created disabled; enabled by the thread that first submits */
    bool ring_fd_tried;  /* registered ring fd attempted (on the owning thread) */
    int efd;             /* mp_wake() eventfd */
    uint64_t efd_val;
    bool wake_armed;
    unsigned nfixed;     /* direct-descriptor table size, 0 = no lwsockets */
    bool ms_accept, fixed_install, ms_poll;
    bool cqe_skip;       /* IORING_FEAT_CQE_SKIP: fire-and-forget SQEs post no CQE */
    bool min_wait;       /* IORING_FEAT_MIN_TIMEOUT and MP_WAIT_USEC > 0 */
    bool ring_fd_registered;
    unsigned last_burst; /* CQEs the last wait brought: is gathering worth it? */
    bool balancing;      /* some listener may steal from siblings */
    int export_res;
    bool export_done;
    /* buffered reads */
    struct io_uring_buf_ring *br;
    char *bufs;
    uint8_t *buf_busy;   /* buffer id -> held by the application */
    unsigned nbufs, bufsz;
    bool br_failed;
    struct buf_owner { uint32_t idx1, gen; } *buf_owner; /* buffer id -> holding handle */
    unsigned lw_inflight; /* one-shot direct accepts in the kernel: each may take a slot */
    bool run_task_work;   /* the next flush also runs the ring's task work (see detach) */
    struct __kernel_timespec backoff_ts;
} uring;

#define U(ch) ((uring *)(ch)->eng_data)

static inline uint64_t ud(enum tag t, uint32_t seq, uint32_t idx) {
    return (uint64_t)t << 56 | (uint64_t)(seq & 0xffffff) << 32 | idx;
}

/* ---- submission ----------------------------------------------------------------------- */

static void enable_ring(mp_channel *ch) {
    uring *u = U(ch);
    if (!u->enabled) {
        /* liburing 2.3 declares io_uring_enable_rings() but does not export it. */
        syscall(__NR_io_uring_register, u->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
        ch->st.syscalls++;
        u->enabled = true;
    }
    if (!u->ring_fd_tried) {
        /* Registered ring fds belong to the registering thread: register on the thread that
         * owns the channel (the first to submit), not the one that created it. */
        u->ring_fd_tried = true;
        ch->st.syscalls++;
        if (io_uring_register_ring_fd(&u->ring) == 1) {
            u->ring_fd_registered = true;
            ch->st.features |= MP_FEAT_REGISTERED_RING;
            ch->st.missing &= ~MP_FEAT_REGISTERED_RING;
        }
    }
}

static void reap(mp_channel *ch);

static int uring_flush(mp_channel *ch) {
    uring *u = U(ch);
    unsigned n = io_uring_sq_ready(&u->ring);
    if (!n) return 0;
    enable_ring(ch);
    for (int tries = 0;; tries++) {
        int r = u->run_task_work ? io_uring_submit_and_get_events(&u->ring)
                                 : io_uring_submit(&u->ring);
        u->run_task_work = false;
        ch->st.syscalls++;
        if (r >= 0) {
            mp__batch_account(ch, (unsigned)r);
            return r;
        }
        if (r == -EINTR && tries < 8) continue;
        if ((r == -EBUSY || r == -EAGAIN) && tries < 8) {
            /* CQ overflow backlog: let the kernel flush it to the ring, reap, try again. */
            ch->st.cq_overflows++;
            io_uring_get_events(&u->ring);
            ch->st.syscalls++;
            reap(ch);
            continue;
        }
        return r;
    }
}

/* An SQE, flushing the ring when it is full (the paper's "automatic flush"). */
static struct io_uring_sqe *get_sqe(mp_channel *ch) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&U(ch)->ring);
    if (!sqe) {
        uring_flush(ch);
        sqe = io_uring_get_sqe(&U(ch)->ring);
    }
    return sqe;
}

/* After queueing an application request: submit when the batch is full. */
static void batch_check(mp_channel *ch) {
    if (mp__batch_full(ch, io_uring_sq_ready(&U(ch)->ring))) uring_flush(ch);
}

/* A request whose success nobody waits for (cancel, close of a direct descriptor). */
static void set_ignored(mp_channel *ch, struct io_uring_sqe *sqe) {
    io_uring_sqe_set_data64(sqe, ud(T_IGNORE, 0, 0));
    if (U(ch)->cqe_skip) sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
}

static void prep_cancel(mp_channel *ch, uint64_t target) {
    struct io_uring_sqe *sqe = get_sqe(ch);
    if (!sqe) return; /* cannot happen after a flush; the completion is filtered anyway */
    io_uring_prep_cancel64(sqe, target, 0);
    set_ignored(ch, sqe);
}

static void set_file(struct io_uring_sqe *sqe, mp_handle *h) {
    if (h->fixed) sqe->flags |= IOSQE_FIXED_FILE;
}

/* Free a direct-descriptor slot (queued; the kernel runs it in submission order, before any
 * accept queued after it). */
static void uring_close_direct(mp_channel *ch, unsigned slot) {
    struct io_uring_sqe *sqe = get_sqe(ch);
    if (!sqe) return;
    io_uring_prep_close_direct(sqe, slot);
    set_ignored(ch, sqe);
}

static unsigned uring_ready(const mp_channel *ch) {
    return io_uring_cq_ready(&((const uring *)ch->eng_data)->ring);
}

/* ---- wake ----------------------------------------------------------------------------- */

static void arm_wake(mp_channel *ch) {
    uring *u = U(ch);
    struct io_uring_sqe *sqe = get_sqe(ch);
    if (!sqe) return;
    if (u->ms_poll)
        io_uring_prep_poll_multishot(sqe, u->efd, POLLIN);
    else
        io_uring_prep_poll_add(sqe, u->efd, POLLIN);
    io_uring_sqe_set_data64(sqe, ud(T_WAKE, 0, 0));
    u->wake_armed = true;
}

static int uring_wake(mp_channel *ch) {
    uint64_t one = 1;
    if (write(U(ch)->efd, &one, sizeof one) < 0 && errno != EAGAIN) return -errno;
    return 0;
}

/* ---- buffered reads: the provided-buffer ring ----------------------------------------- */

static int bufring_setup(mp_channel *ch) {
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
static void buf_take(mp_channel *ch, mp_handle *h, unsigned id) {
    uring *u = U(ch);
    u->buf_busy[id] = 1;
    if (++ch->st.bufs_in_use > ch->st.bufs_peak) ch->st.bufs_peak = ch->st.bufs_in_use;
    u->buf_owner[id].idx1 = h->idx + 1;
    u->buf_owner[id].gen = h->gen;
    h->bufs_held++;
}

static int uring_buf_release(mp_channel *ch, unsigned id) {
    uring *u = U(ch);
    if (!u->br || id >= u->nbufs || !u->buf_busy[id]) return -EINVAL;
    u->buf_busy[id] = 0;
    struct buf_owner *o = &u->buf_owner[id];
    mp_handle *h = o->idx1 ? mp__handle_at(ch, o->idx1 - 1) : NULL;
    if (h && h->gen == o->gen && h->bufs_held) {
        h->bufs_held--;
        /* A receive paused at MP_BUF_PER_CONN resumes at the next wait. */
        if (h->rb_capped && h->bufs_held < (uint32_t)ch->cfg.buf_per_conn && h->state == H_LIVE) {
            h->rb_capped = false;
            if (h->r_busy && !h->readbuf_armed) mp__rearm_add(h);
        }
    }
    o->idx1 = 0;
    io_uring_buf_ring_add(u->br, u->bufs + (size_t)id * u->bufsz, u->bufsz, (unsigned short)id,
                          io_uring_buf_ring_mask(u->nbufs), 0);
    io_uring_buf_ring_advance(u->br, 1);
    ch->st.bufs_in_use--; /* receives starved of buffers restart at the next wait */
    return 0;
}

/* ---- operations ------------------------------------------------------------------------- */

/* A multishot receive may fill 1 + 32 buffers in one pass (the kernel's retry limit) and run
 * more than one pass before its completions are reaped: it is used only while a connection
 * holds this many fewer buffers than MP_BUF_PER_CONN, and cancelled when it gets closer. */
#define RB_MULTISHOT_MARGIN 96

/* Buffers h may still take before MP_BUF_PER_CONN (negative past it). */
static inline int64_t rb_room(const mp_channel *ch, const mp_handle *h) {
    return (int64_t)ch->cfg.buf_per_conn - (int64_t)h->bufs_held;
}

/* May h's receive be multishot?  Always when MP_BUF_PER_CONN is the whole pool (then the pool
 * is the only bound, and running out of it is handled: ENOBUFS, re-armed on release). */
static inline bool rb_multishot_ok(const mp_channel *ch, const mp_handle *h) {
    return (unsigned)ch->cfg.buf_per_conn >= U(ch)->nbufs || rb_room(ch, h) > RB_MULTISHOT_MARGIN;
}

static ssize_t uring_start_read(mp_channel *ch, mp_handle *h, mp_op *op) {
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
        if (h->readbuf_armed) return MP_INPROGRESS;
        if (u->nbufs && ch->st.bufs_in_use >= u->nbufs) { /* starved: re-armed at next wait */
            ch->st.buf_starved++;
            mp__rearm_add(h);
            return MP_INPROGRESS;
        }
        if (rb_room(ch, h) <= 0) { /* resumed by a release of one of its buffers */
            if (!h->rb_capped) ch->st.buf_paused++;
            h->rb_capped = true;
            return MP_INPROGRESS;
        }
        /* The kernel picks a buffer only when data arrives: an idle connection holds none.
         * Far below MP_BUF_PER_CONN one multishot receive feeds the handle (and reads ahead
         * into the stash); near it, one receive of one buffer per request, so that a
         * connection whose application stops reading holds at most one buffer more. */
        if (!(sqe = get_sqe(ch))) return -EAGAIN;
        h->rb_multishot = rb_multishot_ok(ch, h);
        if (h->rb_multishot) io_uring_prep_recv_multishot(sqe, h->fd, NULL, 0, 0);
        else io_uring_prep_recv(sqe, h->fd, NULL, 0, 0);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = BUF_GROUP;
        h->readbuf_armed = true;
    } else {
        if (!(sqe = get_sqe(ch))) return -EAGAIN;
        io_uring_prep_recv(sqe, h->fd, op->buf, op->len, 0);
    }
    set_file(sqe, h);
    io_uring_sqe_set_data64(sqe, ud(T_READ, h->gen, h->idx));
    h->inflight++;
    batch_check(ch);
    return MP_INPROGRESS;
}

/* A completion of h's multishot buffered receive. */
static void readbuf_done(mp_channel *ch, mp_handle *h, int res, unsigned flags) {
    uring *u = U(ch);
    bool final = !(flags & IORING_CQE_F_MORE);
    if (final) {
        h->inflight--;
        h->readbuf_armed = false;
    }
    if (res == -ENOBUFS) { /* ring empty: no data lost, it stays in the socket */
        ch->st.buf_starved++;
        if (h->r_busy) {
            h->r_busy = 0;
            mp__rearm_add(h);
        }
        return;
    }
    if (res == -ECANCELED && h->rb_cancelling) { /* ours: go on one buffer at a time */
        h->rb_cancelling = false;
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
        buf_take(ch, h, id);
        if (res <= 0) {
            uring_buf_release(ch, id);
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
            if (evf) uring_buf_release(ch, id);
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
    if (!final && h->rb_multishot && !h->rb_cancelling && !rb_multishot_ok(ch, h)) {
        h->rb_cancelling = true;
        prep_cancel(ch, ud(T_READ, h->gen, h->idx));
    }
    /* Ended although the connection goes on (e.g. CQ overflow): start it again. */
    if (final && res > 0 && h->state == H_LIVE && h->r_busy) {
        h->r_busy = 0;
        mp__pump_reads(h);
    }
}

static ssize_t uring_start_write(mp_channel *ch, mp_handle *h, mp_op *op) {
    struct io_uring_sqe *sqe = get_sqe(ch);
    if (!sqe) return -EAGAIN;
    switch (op->type) {
    case OP_WRITE:
        io_uring_prep_send(sqe, h->fd, (char *)op->buf + op->done, op->len - op->done,
                           MSG_NOSIGNAL);
        break;
    case OP_WRITEV:
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
    batch_check(ch);
    return MP_INPROGRESS;
}

static bool accept_wanted(const mp_handle *h) {
    return h->state == H_LIVE && (h->acc.forever || h->acc.left > 0);
}

/* Returns whether the accept yields direct descriptors (lwsockets). */
static bool prep_accept_on(mp_channel *ch, mp_handle *h, struct io_uring_sqe *sqe, int fd,
                           bool multishot) {
    uring *u = U(ch);
    bool direct = h->acc.lw && u->nfixed;
    if (h->acc.lw && !u->nfixed)
        mp__log_once(ch, MP_LOG_NO_LWSOCKET,
                     "lwsockets unavailable (no direct-descriptor table): accepting regular fds");
    /* Direct descriptors have no close-on-exec flag (the kernel refuses SOCK_CLOEXEC). */
    if (multishot && direct) {
        io_uring_prep_multishot_accept_direct(sqe, fd, NULL, NULL, 0);
    } else if (multishot) {
        io_uring_prep_multishot_accept(sqe, fd, NULL, NULL, SOCK_CLOEXEC);
    } else if (direct) {
        /* liburing 2.3's prep_accept_direct stores file_index + 1, which wraps
         * IORING_FILE_INDEX_ALLOC to 0 ("no slot"): set the field ourselves. */
        io_uring_prep_accept(sqe, fd, NULL, NULL, 0);
        sqe->file_index = IORING_FILE_INDEX_ALLOC;
    } else {
        io_uring_prep_accept(sqe, fd, NULL, NULL, SOCK_CLOEXEC);
    }
    return direct;
}

/* lwsockets: a direct accept whose connection finds no free slot in the table is closed by
 * the kernel after it left the backlog.  So the engine reserves a slot for every accept it
 * arms: one-shot accepts, at most as many as slots are free, and multishot only while more
 * slots are free than a full accept queue can hand over at once. */
#define LW_MULTISHOT_HEADROOM 4608u /* > net.core.somaxconn's default of 4096 */

static unsigned lw_free(const mp_channel *ch) {
    const uring *u = U(ch);
    unsigned used = ch->lw_used + u->lw_inflight;
    return used < u->nfixed ? u->nfixed - used : 0;
}

/* No slot for an lwsocket: accepting pauses (the connections stay in the backlog) and is
 * looked at again at each wait, after the application had the chance to free slots. */
static void accept_pause(mp_channel *ch, mp_handle *h) {
    if (!h->acc.lw_full) {
        ch->st.accept_paused++;
        mp__log_once(ch, MP_LOG_LW_FULL, "lwsocket table full (%u slots, MP_MAX_LWSOCKETS): "
                     "accepting pauses until a slot is freed", U(ch)->nfixed);
    }
    h->acc.lw_full = true;
    mp__rearm_add(h);
}

static int uring_arm_accept(mp_channel *ch, mp_handle *h) {
    uring *u = U(ch);
    if (h->acc.busy || h->acc.backoff || !accept_wanted(h)) return 0;
    bool direct = h->acc.lw && u->nfixed;
    unsigned slots = direct ? lw_free(ch) : 0;
    if (direct && !slots) {
        accept_pause(ch, h);
        return 0;
    }
    h->acc.lw_full = false;
    struct io_uring_sqe *sqe = get_sqe(ch);
    if (!sqe) return -EAGAIN;
    bool ms = h->acc.forever && u->ms_accept && (!direct || slots > LW_MULTISHOT_HEADROOM);
    h->acc.lw_armed = prep_accept_on(ch, h, sqe, h->fd, ms);
    h->acc.ms_armed = ms;
    if (direct && !ms) u->lw_inflight++;
    io_uring_sqe_set_data64(sqe, ud(T_ACCEPT, h->gen, h->idx));
    h->acc.busy = true;
    h->inflight++;
    if (ch->cfg.balance && h->acc.part && h->acc.forever) u->balancing = true;
    batch_check(ch);
    return 0;
}

static void accept_backoff(mp_channel *ch, mp_handle *h) {
    uring *u = U(ch);
    struct io_uring_sqe *sqe = get_sqe(ch);
    if (!sqe) return;
    io_uring_prep_timeout(sqe, &u->backoff_ts, 0, 0);
    io_uring_sqe_set_data64(sqe, ud(T_TIMER, h->gen, h->idx));
    h->acc.backoff = true;
    h->inflight++;
}

/* Accept load balancing: an idle partition takes one connection from a busy sibling. */
static void balance(mp_channel *ch) {
    uring *u = U(ch);
    u->balancing = false;
    for (uint32_t c = 0; c < ch->nchunks; c++)
        for (uint32_t i = 0; i < MP_CHUNK_SIZE; i++) {
            mp_handle *h = &ch->chunks[c][i];
            if (h->state != H_LIVE || h->kind != HK_LISTENER || !h->acc.part || !h->acc.forever)
                continue;
            u->balancing = true;
            if (h->acc.steal_busy || mp__partition_backlog(h->fd) > 0) continue;
            if (h->acc.lw && u->nfixed && !lw_free(ch)) continue;
            int fd = mp__partition_busy_sibling(h, (unsigned)ch->cfg.balance_threshold);
            ch->st.syscalls += 2;
            if (fd < 0) continue;
            struct io_uring_sqe *sqe = get_sqe(ch);
            if (sqe) {
                h->acc.lw_steal = prep_accept_on(ch, h, sqe, fd, false);
                if (h->acc.lw_steal) u->lw_inflight++;
                io_uring_sqe_set_data64(sqe, ud(T_STEAL, h->gen, h->idx));
                h->acc.steal_busy = true;
                h->inflight++;
                uring_flush(ch); /* the kernel takes its own reference to the file here */
            }
            close(fd);
        }
}

static int uring_poll_arm(mp_channel *ch, mp_handle *h) {
    if (h->pw.armed) {
        prep_cancel(ch, ud(T_POLL, h->pw.seq, h->idx));
        h->pw.armed = false;
    }
    if (h->state != H_LIVE || !h->pw.events) return 0;
    struct io_uring_sqe *sqe = get_sqe(ch);
    if (!sqe) return -EAGAIN;
    unsigned mask = h->pw.events | POLLERR | POLLHUP;
    bool et = (h->pw.flags & MP_POLL_ET) && U(ch)->ms_poll;
    if (et)
        io_uring_prep_poll_multishot(sqe, h->fd, mask);
    else
        io_uring_prep_poll_add(sqe, h->fd, mask);
    /* seq doubles as the arm sequence carried in user_data */
    h->pw.seq = (h->pw.seq + 1) & 0xffffff;
    io_uring_sqe_set_data64(sqe, ud(T_POLL, h->pw.seq, h->idx));
    h->pw.armed = true;
    h->inflight++;
    return 0;
}

static unsigned uring_detach(mp_channel *ch, mp_handle *h) {
    uring *u = U(ch);
    if (h->r_busy || h->readbuf_armed) prep_cancel(ch, ud(T_READ, h->gen, h->idx));
    for (mp_op *s; (s = mp__opq_pop(&h->stash));) {
        if (s->evflags & MP_EVF_BUFFER) uring_buf_release(ch, s->buf_id);
        mp__op_free(ch, s);
    }
    if (h->w_busy) prep_cancel(ch, ud(T_WRITE, h->gen, h->idx));
    if (h->acc.busy) prep_cancel(ch, ud(T_ACCEPT, h->gen, h->idx));
    if (h->acc.steal_busy) prep_cancel(ch, ud(T_STEAL, h->gen, h->idx));
    if (h->acc.backoff) prep_cancel(ch, ud(T_TIMER, h->gen, h->idx));
    if (h->pw.armed) prep_cancel(ch, ud(T_POLL, h->pw.seq, h->idx));
    if (h->fixed) uring_close_direct(ch, (unsigned)h->fd);
    /* With DEFER_TASKRUN a cancelled accept leaves the socket's wait queue only in task work,
     * which runs when we enter with GETEVENTS: until then it would keep taking the wake-ups
     * another channel on a shared queue needs.  The core flushes at once for listeners. */
    if (h->kind == HK_LISTENER) u->run_task_work = true;
    return h->inflight;
}

static int uring_attach(mp_channel *ch, mp_handle *h) {
    (void)ch;
    (void)h;
    return 0;
}

/* Run one synchronous request (export) to completion, keeping other completions as events. */
static int uring_export_fd(mp_channel *ch, mp_handle *h) {
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
    struct io_uring_sqe *sqe = get_sqe(ch);
    if (!sqe) return -EAGAIN;
    io_uring_prep_rw(IORING_OP_FIXED_FD_INSTALL, sqe, h->fd, NULL, 0, 0);
    sqe->flags |= IOSQE_FIXED_FILE;
    sqe->rw_flags = 0; /* install_fd_flags: O_CLOEXEC is the default */
    io_uring_sqe_set_data64(sqe, ud(T_EXPORT, h->gen, h->idx));
    h->inflight++;
    u->export_done = false;
    enable_ring(ch);
    while (!u->export_done) {
        unsigned n = io_uring_sq_ready(&u->ring);
        int r = io_uring_submit_and_wait(&u->ring, 1);
        ch->st.syscalls++;
        if (r < 0 && r != -EINTR && r != -EBUSY) return r;
        if (r > 0) mp__batch_account(ch, n - io_uring_sq_ready(&u->ring));
        reap(ch);
    }
    return u->export_res;
}

/* ---- completions ---------------------------------------------------------------------- */

static void complete(mp_channel *ch, uint64_t data, int res, unsigned flags) {
    uring *u = U(ch);
    enum tag t = (enum tag)(data >> 56);
    uint32_t seq = (uint32_t)(data >> 32) & 0xffffff, idx = (uint32_t)data;
    bool final = !(flags & IORING_CQE_F_MORE);
    if (t == T_IGNORE || data == LIBURING_UDATA_TIMEOUT) return;
    if (t == T_WAKE) {
        if (final) u->wake_armed = false;
        if (res >= 0 && read(u->efd, &u->efd_val, sizeof u->efd_val) > 0)
            mp__event_push(ch, NULL, MP_EV_WAKE, 0, 0);
        ch->st.syscalls++;
        if (!u->wake_armed) arm_wake(ch);
        return;
    }
    mp_handle *h = mp__handle_at(ch, idx);
    if (!h || h->state == H_FREE) return;
    if (t != T_POLL && seq != h->gen) return;

    bool acc = t == T_ACCEPT || t == T_STEAL;
    bool acc_direct = acc && (t == T_ACCEPT ? h->acc.lw_armed : h->acc.lw_steal);
    /* A one-shot direct accept ended: the slot it reserved is taken (counted in lwmap from
     * the ACCEPT event on) or was not needed. */
    if (acc && final && acc_direct && (t == T_STEAL || !h->acc.ms_armed) && u->lw_inflight)
        u->lw_inflight--;

    if (h->state != H_LIVE) {
        /* Ended: release what the completion carries, deliver nothing. */
        if (acc && res >= 0) {
            if (acc_direct) uring_close_direct(ch, (unsigned)res);
            else close(res);
        }
        if (flags & IORING_CQE_F_BUFFER) {
            unsigned id = flags >> IORING_CQE_BUFFER_SHIFT;
            buf_take(ch, h, id);
            uring_buf_release(ch, id);
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
            readbuf_done(ch, h, res, flags);
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
    case T_STEAL:
        if (final) {
            h->inflight--;
            if (t == T_ACCEPT) h->acc.busy = false;
            else h->acc.steal_busy = false;
        }
        if (res == -EINVAL && t == T_ACCEPT && h->acc.ms_armed) {
            /* multishot accept refused: fall back to one accept at a time */
            u->ms_accept = false;
            ch->st.features &= ~MP_FEAT_MULTISHOT_ACCEPT;
            ch->st.missing |= MP_FEAT_MULTISHOT_ACCEPT;
            mp__log_once(ch, MP_LOG_NO_MULTISHOT, "multishot accept refused: one at a time");
            uring_arm_accept(ch, h);
            return;
        }
        if (res == -ECANCELED) { /* ours: a steal, or a multishot stopped (errors, headroom) */
            if (t == T_ACCEPT) uring_arm_accept(ch, h); /* nothing while backing off */
            return;
        }
        if (res >= 0 && acc_direct) res += MP_LWSOCKET_BASE;
        mp__accept_done(h, res, flags & IORING_CQE_F_SOCK_NONEMPTY, t == T_STEAL);
        if (res < 0 && t == T_ACCEPT) {
            /* EMFILE, ENFILE (for lwsockets: the table filled under a multishot burst, and
             * the kernel closed that connection)...: try again a little later. */
            if (h->acc.busy) prep_cancel(ch, data); /* a multishot that goes on: stop it */
            if (!h->acc.backoff) accept_backoff(ch, h);
            return;
        }
        /* A multishot of lwsockets goes one at a time once the table runs low. */
        if (t == T_ACCEPT && h->acc.busy && acc_direct && lw_free(ch) <= LW_MULTISHOT_HEADROOM)
            prep_cancel(ch, data);
        if (final && t == T_ACCEPT) uring_arm_accept(ch, h);
        return;
    case T_TIMER:
        h->inflight--;
        h->acc.backoff = false;
        uring_arm_accept(ch, h);
        return;
    case T_POLL:
        if (final) h->inflight--;
        if (seq != h->pw.seq || h->kind != HK_POLL) return; /* an old arm */
        if (final) h->pw.armed = false;
        if (res == -ECANCELED) {
            if (!h->pw.armed) uring_poll_arm(ch, h);
            return;
        }
        mp__poll_done(h, res < 0 ? (uint32_t)POLLERR : (uint32_t)res);
        if (final && !h->pw.armed) {
            if (h->pw.flags & MP_POLL_ET) uring_poll_arm(ch, h); /* multishot ended: re-arm */
            else mp__rearm_add(h);                               /* level: at next wait */
        }
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

static void reap(mp_channel *ch) {
    uring *u = U(ch);
    struct { uint64_t data; int res; unsigned flags; } batch[REAP_MAX];
    for (;;) {
        unsigned n = 0, head;
        struct io_uring_cqe *cqe;
        io_uring_for_each_cqe(&u->ring, head, cqe) {
            batch[n].data = cqe->user_data;
            batch[n].res = cqe->res;
            batch[n].flags = cqe->flags;
            if (++n == REAP_MAX) break;
        }
        if (!n) break;
        io_uring_cq_advance(&u->ring, n);
        ch->st.cqes += n;
        for (unsigned i = 0; i < n; i++) complete(ch, batch[i].data, batch[i].res, batch[i].flags);
        if (n < REAP_MAX) break;
    }
    if (io_uring_cq_has_overflow(&u->ring)) ch->st.cq_overflows++;
}

/* Submit everything and wait with the kernel's min_wait: up to MP_BATCH completions, for at
 * most MP_WAIT_USEC after the first (liburing 2.3 has no helper for it). */
static int enter_batched(mp_channel *ch, int timeout_ms) {
    uring *u = U(ch);
    struct io_uring_sq *sq = &u->ring.sq;
    unsigned tail = sq->sqe_tail;
    if (sq->sqe_head != tail) {
        sq->sqe_head = tail;
        io_uring_smp_store_release(sq->ktail, tail);
    }
    unsigned to_submit = tail - io_uring_smp_load_acquire(sq->khead);
    struct __kernel_timespec ts = {.tv_sec = timeout_ms / 1000,
                                   .tv_nsec = (long long)(timeout_ms % 1000) * 1000000};
    struct io_uring_getevents_arg arg = {.pad = (uint32_t)ch->cfg.wait_usec,
                                         .ts = timeout_ms > 0 ? (uint64_t)(uintptr_t)&ts : 0};
    unsigned flags = IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG;
    int fd = u->ring.ring_fd;
    if (u->ring_fd_registered) {
        fd = u->ring.enter_ring_fd;
        flags |= IORING_ENTER_REGISTERED_RING;
    }
    int r = io_uring_enter2((unsigned)fd, to_submit, (unsigned)ch->cfg.batch, flags,
                            (sigset_t *)&arg, sizeof arg);
    return r;
}

static int uring_wait(mp_channel *ch, int timeout_ms) {
    uring *u = U(ch);
    reap(ch); /* completions already in the ring cost no system call */
    if (mp__event_count(ch)) return 0;
    /* Level-triggered polls whose event was handed out, receives starved of buffers, accepts
     * paused for want of lwsocket slots.  What is still stuck goes back on the list for the
     * next wait. */
    uint32_t list = mp__rearm_take(ch);
    mp_handle *h;
    while ((h = mp__rearm_next(ch, &list))) {
        if (h->kind == HK_POLL) {
            if (!h->pw.armed) uring_poll_arm(ch, h);
        } else if (h->kind == HK_LISTENER) {
            if (h->acc.lw_full) uring_arm_accept(ch, h);
        } else if (h->kind == HK_CONN) {
            if (!h->readbuf_armed) h->r_busy = 0;
            mp__pump_reads(h);
        }
    }
    if (u->balancing) {
        balance(ch);
        if (u->balancing && (timeout_ms < 0 || timeout_ms > BALANCE_POLL_MS))
            timeout_ms = BALANCE_POLL_MS;
    }
    if (!u->wake_armed) arm_wake(ch);
    enable_ring(ch);
    unsigned n = io_uring_sq_ready(&u->ring);
    int r;
    if (timeout_ms == 0) {
        r = io_uring_submit_and_get_events(&u->ring);
    } else if (u->min_wait && u->last_burst * 4 >= (unsigned)ch->cfg.batch) {
        /* Adaptive: gather only while completions come in bursts (long connections, many
         * in flight).  With short connections each wake-up brings one or two, and holding
         * the thread in a timed wait costs more than the system call it saves. */
        r = enter_batched(ch, timeout_ms);
    } else if (timeout_ms < 0) {
        r = io_uring_submit_and_wait(&u->ring, 1);
    } else {
        struct __kernel_timespec ts = {.tv_sec = timeout_ms / 1000,
                                       .tv_nsec = (long long)(timeout_ms % 1000) * 1000000};
        struct io_uring_cqe *cqe;
        r = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);
    }
    ch->st.syscalls++;
    unsigned left = io_uring_sq_ready(&u->ring);
    if (n > left) mp__batch_account(ch, n - left);
    if (r == -EBUSY) {
        ch->st.cq_overflows++;
        r = 0;
    }
    uint64_t before = ch->st.cqes;
    reap(ch);
    u->last_burst = (unsigned)(ch->st.cqes - before);
    return (r >= 0 || r == -ETIME) ? 0 : r;
}

/* ---- set-up --------------------------------------------------------------------------- */

static int ring_init(mp_channel *ch, uring *u) {
    struct io_uring_params p;
    unsigned entries = (unsigned)ch->cfg.ring_entries;
    /* Try the best set of flags first, then drop them one at a time for older kernels. */
    static const unsigned flag_sets[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_R_DISABLED,
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_R_DISABLED,
        IORING_SETUP_COOP_TASKRUN,
        0,
    };
    int r = -ENOSYS;
    for (size_t i = 0; i < sizeof flag_sets / sizeof flag_sets[0]; i++) {
        memset(&p, 0, sizeof p);
        p.flags = flag_sets[i] | IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
        p.cq_entries = entries * 16;
        r = io_uring_queue_init_params(entries, &u->ring, &p);
        if (r == -EINVAL) {
            p.flags &= ~(unsigned)IORING_SETUP_SUBMIT_ALL;
            r = io_uring_queue_init_params(entries, &u->ring, &p);
        }
        if (r == 0) {
            if (p.flags & IORING_SETUP_SINGLE_ISSUER) ch->st.features |= MP_FEAT_SINGLE_ISSUER;
            else ch->st.missing |= MP_FEAT_SINGLE_ISSUER;
            if (p.flags & IORING_SETUP_DEFER_TASKRUN) ch->st.features |= MP_FEAT_DEFER_TASKRUN;
            else ch->st.missing |= MP_FEAT_DEFER_TASKRUN;
            u->enabled = !(p.flags & IORING_SETUP_R_DISABLED);
            break;
        }
        if (r != -EINVAL) return r; /* ENOSYS, EPERM, ENOMEM...: no io_uring here */
    }
    if (r < 0) return r;
    if (p.features & IORING_FEAT_NODROP) ch->st.features |= MP_FEAT_NODROP;
    else ch->st.missing |= MP_FEAT_NODROP;
    u->cqe_skip = p.features & IORING_FEAT_CQE_SKIP;
    if (ch->cfg.wait_usec > 0) {
        u->min_wait = p.features & IORING_FEAT_MIN_TIMEOUT;
        if (u->min_wait) ch->st.features |= MP_FEAT_MIN_WAIT;
        else ch->st.missing |= MP_FEAT_MIN_WAIT;
    }
    if (p.features & IORING_FEAT_EXT_ARG) ch->st.features |= MP_FEAT_EXT_ARG;
    else ch->st.missing |= MP_FEAT_EXT_ARG;
    return 0;
}

static void probe(mp_channel *ch, uring *u) {
    struct io_uring_probe *pr = io_uring_get_probe_ring(&u->ring);
    bool has_install = false;
    if (pr) {
        has_install = io_uring_opcode_supported(pr, IORING_OP_FIXED_FD_INSTALL);
        io_uring_free_probe(pr);
    }
    u->fixed_install = has_install;
    if (has_install) ch->st.features |= MP_FEAT_FIXED_FD_INSTALL;
    else ch->st.missing |= MP_FEAT_FIXED_FD_INSTALL;
    /* Multishot accept and poll have no opcode of their own: they are tried, and refused
     * with -EINVAL on kernels without them (then the engine falls back at run time).
     * IORING_FEAT_NATIVE_WORKERS (5.12) predates both; FEAT_LINKED_FILE (5.17) is close. */
    u->ms_accept = true;
    u->ms_poll = true;
    ch->st.features |= MP_FEAT_MULTISHOT_ACCEPT | MP_FEAT_POLL_MULTISHOT;
}

static int uring_init(mp_channel *ch) {
    uring *u = calloc(1, sizeof *u);
    if (!u) return -ENOMEM;
    int r = ring_init(ch, u);
    if (r < 0) {
        free(u);
        return r;
    }
    ch->eng_data = u;
    u->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (u->efd < 0) {
        r = -errno;
        io_uring_queue_exit(&u->ring);
        free(u);
        ch->eng_data = NULL;
        return r;
    }
    ch->st.missing |= MP_FEAT_REGISTERED_RING; /* until enable_ring() registers it */
    /* The direct-descriptor table may not exceed RLIMIT_NOFILE.  MP_LWSOCKET=0: none. */
    unsigned want = ch->cfg.lwsocket ? (unsigned)ch->cfg.max_lwsockets : 0;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && want > rl.rlim_cur)
        want = (unsigned)rl.rlim_cur; /* documented at MP_MAX_LWSOCKETS; not worth a log line */
    r = want ? io_uring_register_files_sparse(&u->ring, want) : -ENOTSUP;
    if (r == 0) {
        u->nfixed = want;
        ch->st.features |= MP_FEAT_DIRECT_DESCRIPTORS;
    } else if (want) {
        ch->st.missing |= MP_FEAT_DIRECT_DESCRIPTORS;
        mp__log_once(ch, MP_LOG_NO_DIRECT, "no direct-descriptor table (%s): lwsockets off",
                     strerror(-r));
    }
    probe(ch, u);
    u->backoff_ts.tv_nsec = BACKOFF_NS;
    return 0;
}

static void uring_fini(mp_channel *ch) {
    uring *u = U(ch);
    if (!u) return;
    if (u->br && !mp__forked(ch)) io_uring_unregister_buf_ring(&u->ring, BUF_GROUP);
    io_uring_queue_exit(&u->ring);
    if (u->br) munmap(u->br, u->nbufs * sizeof(struct io_uring_buf));
    free(u->bufs);
    free(u->buf_busy);
    free(u->buf_owner);
    close(u->efd);
    free(u);
    ch->eng_data = NULL;
}

const mp_engine mp__engine_uring = {
    .name = "uring",
    .init = uring_init,
    .fini = uring_fini,
    .attach = uring_attach,
    .detach = uring_detach,
    .start_read = uring_start_read,
    .start_write = uring_start_write,
    .arm_accept = uring_arm_accept,
    .poll_arm = uring_poll_arm,
    .flush = uring_flush,
    .wait = uring_wait,
    .wake = uring_wake,
    .export_fd = uring_export_fd,
    .buf_setup = bufring_setup,
    .buf_release = uring_buf_release,
    .close_direct = uring_close_direct,
    .ready = uring_ready,
};
