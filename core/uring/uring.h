/*
 * uring/uring.h — what the io_uring engine's files share: its per-channel state, the
 * user_data layout, and the calls between its jobs (setup.c: the ring and what the kernel
 * offers; submit.c: batches and waits; requests.c: the core's requests as SQEs; complete.c:
 * completion demultiplexing; bufring.c: buffered reads).  Nothing here is seen above the seam
 * (core/engine.h).
 *
 * Requests become SQEs written straight into the shared submission ring; the batcher's rules
 * decide when one io_uring_enter() hands them over.  Completions are read from the CQ ring in
 * user space and turned into events.  What the engine asks of the kernel, probed at
 * mp_create(): SINGLE_ISSUER + DEFER_TASKRUN (task work runs only when we wait: fewer
 * interruptions), a registered ring fd, a sparse direct-descriptor table (lwsockets),
 * multishot accept, FIXED_FD_INSTALL (mp_export_fd), provided-buffer rings and multishot
 * receive (buffered reads), multishot poll (the readiness adapter).  Missing features are
 * fallbacks, logged once and reported in mp_stats.missing.
 *
 * user_data = tag << 56 | seq << 32 | handle index.  Handles are never reused while the kernel
 * holds one of their operations, so the index alone finds the handle; seq is the handle's
 * generation (for polls: the arm sequence, so a cancelled arm's late completion is told apart
 * from the current one).
 */
#ifndef MP_URING_H
#define MP_URING_H

#include <liburing.h>
#include <sys/epoll.h>

#include "../internal.h"
#include "compat.h"

/* The tag also says what an accept yields: T_ACCEPT_LW and T_STEAL_LW direct descriptors
 * (lwsockets), T_ACCEPT and T_STEAL fds; several accepts of one listener may be in flight. */
enum tag {
    T_IGNORE = 0, T_READ, T_WRITE, T_ACCEPT, T_ACCEPT_LW, T_STEAL, T_STEAL_LW, T_TIMER, T_POLL,
    T_EXPORT, T_WAKE,
    /* an accept that writes the peer's address (acceptaddr.c): seq is its slot, and
     * the slot holds the request's own tag (one of the four above) */
    T_ACCEPT_ADDR,
    /* readiness set as a kernel epoll set (epollset.c) */
    T_ECTL_ADD, T_ECTL_MOD, T_ECTL_DEL, T_EWAIT,
    /* foreign epoll sets (fepoll.c) */
    T_FCTL, T_FWAIT, T_FTIMEOUT, T_FCLOSE
};

#define BUF_GROUP 0
#define BACKOFF_NS (10 * 1000 * 1000) /* re-try accepting 10 ms after an error */
#define BALANCE_POLL_MS 5             /* how often an idle balancing channel looks at siblings */
#define REAP_MAX 256
#define EWAIT_MAX 256 /* epoll events one IORING_OP_EPOLL_WAIT may return */
#define EWAKE_DATA UINT64_MAX /* the set's entry for the mp_wake() eventfd */
#define FCTL_RING 4096u /* mp_epoll_ctl() records (a power of 2) */

/* One accept request's address buffer (acceptaddr.c). */
typedef struct uring_aslot {
    struct sockaddr_storage ss; /* written by the kernel */
    socklen_t len;              /* in: sizeof ss; out: the address's length */
    uint32_t idx, gen;          /* the handle */
    uint32_t id, next;          /* slot number; free list (id + 1) */
    uint8_t tag;                /* T_ACCEPT, T_ACCEPT_LW, T_STEAL, T_STEAL_LW */
    bool busy;
    bool multishot;             /* shared by every connection of a multishot accept */
    bool lookup;                /* an overwritten address is asked for (not MP_ACCEPT_ADDR_KNOWN) */
    uint32_t scan;              /* reap pass that last saw it (complete.c) */
    struct sockaddr_storage seen; /* multishot: ss as the reap found it, before anything it
                                     does can enter the kernel (which may write ss again) */
    socklen_t seen_len;
} uring_aslot;

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
    /* address buffers of accepts in flight (MP_ACCEPT_ADDR), chunks of them; free list */
    uring_aslot **aslots;
    uint32_t naslot_chunks, aslot_free;
    unsigned ms_addr;     /* multishot accepts in flight that write addresses */
    uint32_t reap_pass;
    /* readiness set (epollset.c): a kernel epoll set instead of a poll request per fd */
    bool eset;            /* MP_READINESS=epoll and IORING_OP_EPOLL_CTL supported */
    bool epoll_wait_op;   /* IORING_OP_EPOLL_WAIT (else a one-shot poll on epfd) */
    int epfd;             /* -1 until the first watch */
    bool ewait_armed;
    bool direct_wait;     /* the set may be waited on with epoll_wait() (see mp__u_wait) */
    struct epoll_event *ectl_ev; /* per SQ slot: the event an EPOLL_CTL in that slot reads */
    struct epoll_event *ewait_evs; /* EWAIT_MAX: what IORING_OP_EPOLL_WAIT fills */
    struct __kernel_timespec backoff_ts;
    /* foreign epoll sets (fepoll.c) */
    bool epoll_ctl_op;    /* IORING_OP_EPOLL_CTL (Linux 5.6+) */
    bool ext_arg;         /* IORING_FEAT_EXT_ARG: a timeout (and sigmask) in io_uring_enter */
    /* Queued ctls, FCTL_RING of them by sequence number: a success posts no CQE
     * (IOSQE_CQE_SKIP_SUCCESS, or a wait would end at its own submission), so a record is
     * only looked at when the kernel refused it, and is overwritten FCTL_RING requests later. */
    struct fctl { uint32_t seq; int epfd, op; uint64_t data; } *fctl;
    uint32_t fctl_seq;
    uint64_t fw_noise;    /* CQEs that end no wait (ignored requests, ctl results) */
    bool fw_done;         /* the EPOLL_WAIT of the current mp_epoll_wait() completed */
    bool ft_pending;      /* its linked timeout has not posted its completion yet */
    bool fc_done;         /* mp_close(): the close completed, with fc_res */
    int fc_res;
    int fw_res;
    struct __kernel_timespec fw_ts;
} uring;

#define U(ch) ((uring *)(ch)->eng_data)

/* The engine's own state of one handle (mp__handle_priv: beside the handle, zeroed when the
 * slot is allocated). */
typedef struct uhandle {
    /* listeners */
    unsigned nflight;   /* accepts in the kernel (a multishot counts one) */
    bool ms_armed;      /* the accept in the kernel is one multishot */
    bool steal_busy;    /* a balancing accept on a sibling is in the kernel */
    bool lw_full;       /* paused: no free lwsocket slot (re-checked at each wait) */
    /* buffered reads */
    bool readbuf_armed; /* the receive is in the kernel */
    bool rb_capped;     /* receive paused: MP_BUF_PER_CONN buffers held */
    bool rb_multishot;  /* the receive in the kernel is multishot (else one buffer) */
    bool rb_cancelling; /* we cancelled the multishot: its -ECANCELED end is ours */
    bool rb_started;    /* a receive was armed before (the first one polls first) */
    uint32_t bufs_held; /* channel buffers this connection holds (stashed + handed out) */
    /* readiness watches in poll-request form */
    uint32_t poll_seq;  /* arm sequence, carried in user_data */
} uhandle;

static inline uhandle *UH(const mp_handle *h) { return (uhandle *)mp__handle_priv(h); }


/* A multishot receive may fill 1 + 32 buffers in one pass (the kernel's retry limit) and run
 * more than one pass before its completions are reaped: it is used only while a connection
 * holds this many fewer buffers than MP_BUF_PER_CONN, and cancelled when it gets closer. */
#define RB_MULTISHOT_MARGIN 96

/* lwsockets: a direct accept whose connection finds no free slot in the table is closed by
 * the kernel after it left the backlog.  So the engine reserves a slot for every accept it
 * arms: one-shot accepts, at most as many as slots are free, and multishot only while more
 * slots are free than a full accept queue can hand over at once. */
#define LW_MULTISHOT_HEADROOM 4608u /* > net.core.somaxconn's default of 4096 */

/* One-shot accepts a listener keeps in the kernel at once (lwsockets near a full table, count-
 * limited mp_accept calls, kernels without multishot accept): up to this many connections per
 * wait instead of one. */
#define ACCEPT_ONESHOT_MAX 32u
/* ... and on a queue shared with other channels: few, so that they take turns. */
#define ACCEPT_SHARED_MAX 4u

static inline uint64_t ud(enum tag t, uint32_t seq, uint32_t idx) {
    return (uint64_t)t << 56 | (uint64_t)(seq & 0xffffff) << 32 | idx;
}

static inline void set_file(struct io_uring_sqe *sqe, mp_handle *h) {
    if (h->fixed) sqe->flags |= IOSQE_FIXED_FILE;
}

/* Buffers h may still take before MP_BUF_PER_CONN (negative past it). */
static inline int64_t rb_room(const mp_channel *ch, const mp_handle *h) {
    return (int64_t)ch->cfg.buf_per_conn - (int64_t)UH(h)->bufs_held;
}

/* May h's receive be multishot?  Always when MP_BUF_PER_CONN is the whole pool (then the pool
 * is the only bound, and running out of it is handled: ENOBUFS, re-armed on release). */
static inline bool rb_multishot_ok(const mp_channel *ch, const mp_handle *h) {
    return (unsigned)ch->cfg.buf_per_conn >= U(ch)->nbufs || rb_room(ch, h) > RB_MULTISHOT_MARGIN;
}

/* setup.c */
void mp__u_enable(mp_channel *ch);
/* submit.c */
int mp__u_flush(mp_channel *ch);
struct io_uring_sqe *mp__u_sqe(mp_channel *ch);
void mp__u_batch_check(mp_channel *ch);
void mp__u_set_ignored(mp_channel *ch, struct io_uring_sqe *sqe);
void mp__u_cancel(mp_channel *ch, uint64_t target);
void mp__u_cancel_all(mp_channel *ch, uint64_t target); /* every request with this user_data */
void mp__u_close_direct(mp_channel *ch, unsigned slot);
void mp__u_close_later(mp_channel *ch, int fd);
unsigned mp__u_ready(const mp_channel *ch);
void mp__u_arm_wake(mp_channel *ch);
int mp__u_wake(mp_channel *ch);
void mp__u_wake_read(mp_channel *ch);
int mp__u_wait(mp_channel *ch, int timeout_ms);
unsigned mp__u_publish(mp_channel *ch, int *fd, unsigned *flags);
/* bufring.c */
int mp__u_bufring_setup(mp_channel *ch);
void mp__u_buf_take(mp_channel *ch, mp_handle *h, unsigned id);
int mp__u_buf_release(mp_channel *ch, unsigned id);
void mp__u_readbuf_done(mp_channel *ch, mp_handle *h, int res, unsigned flags);
/* requests.c */
ssize_t mp__u_start_read(mp_channel *ch, mp_handle *h, mp_op *op);
ssize_t mp__u_start_write(mp_channel *ch, mp_handle *h, mp_op *op);
bool mp__u_prep_accept(mp_channel *ch, mp_handle *h, struct io_uring_sqe *sqe, int fd,
                       bool multishot, bool steal);
void mp__u_cancel_accepts(mp_channel *ch, mp_handle *h);
unsigned mp__u_lw_free(const mp_channel *ch);
void mp__u_accept_pause(mp_channel *ch, mp_handle *h);
int mp__u_arm_accept(mp_channel *ch, mp_handle *h);
int mp__u_share_accept(mp_channel *ch, mp_handle *h);
void mp__u_accept_backoff(mp_channel *ch, mp_handle *h);
void mp__u_balance(mp_channel *ch);
int mp__u_poll_arm(mp_channel *ch, mp_handle *h);
unsigned mp__u_detach(mp_channel *ch, mp_handle *h);
int mp__u_attach(mp_channel *ch, mp_handle *h);
int mp__u_export_fd(mp_channel *ch, mp_handle *h);
/* epollset.c */
int mp__u_eset_init(mp_channel *ch);
void mp__u_eset_fini(mp_channel *ch);
int mp__u_eset_arm(mp_channel *ch, mp_handle *h);
void mp__u_eset_detach(mp_channel *ch, mp_handle *h);
void mp__u_eset_wait_arm(mp_channel *ch);
bool mp__u_eset_direct(mp_channel *ch);
int mp__u_eset_wait_direct(mp_channel *ch, int timeout_ms);
void mp__u_eset_complete(mp_channel *ch, enum tag t, mp_handle *h, int res);
/* fepoll.c */
int mp__u_fepoll_ctl(mp_channel *ch, int epfd, int op, int fd, const struct epoll_event *ev);
int mp__u_fepoll_wait(mp_channel *ch, int epfd, struct epoll_event *evs, int max,
                      int64_t timeout_ns, const sigset_t *sigmask, int flags);
void mp__u_fepoll_complete(mp_channel *ch, enum tag t, uint32_t idx, int res);
void mp__u_fepoll_fini(mp_channel *ch);
int mp__u_close_fd(mp_channel *ch, int fd);
/* acceptaddr.c */
uring_aslot *mp__u_aslot_get(mp_channel *ch, mp_handle *h, enum tag t, bool multishot);
uring_aslot *mp__u_aslot_find(const mp_channel *ch, uint32_t id);
void mp__u_aslot_put(mp_channel *ch, uring_aslot *s);
void mp__u_aslot_cancel(mp_channel *ch, mp_handle *h);
void mp__u_aslot_fini(mp_channel *ch);
/* complete.c */
void mp__u_reap(mp_channel *ch);
/* submit.c: re-arm what waits for the next wait (rearm list) */
void mp__u_rearm(mp_channel *ch);

#endif
