/*
 * internal.h — the core's shared data structures: channel, handle, operation, event queue,
 * and the callbacks through which engines report completions.
 */
#ifndef MP_INTERNAL_H
#define MP_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "megapipe.h"
#include "engine.h"

#define MP_HANDLE_MAGIC 0x4d504831u /* "MPH1" */
#define MP_CHANNEL_MAGIC 0x4d504331u

#define MP_CHUNK_SHIFT 8 /* handles are allocated 256 at a time and never move */
#define MP_CHUNK_SIZE (1u << MP_CHUNK_SHIFT)

/* Resolved options (no MP_OPT_DEFAULT left). */
typedef struct mp_config {
    int engine, batch, partition, lwsocket, stats, ring_entries, max_lwsockets;
    int buf_size, buf_count, balance, balance_threshold, log, wait_usec, buf_per_conn;
    int readiness, accept_defer;
} mp_config;

void mp__config_resolve(const mp_options *opt, mp_config *cfg);
int mp__config_valid(const mp_config *cfg);

enum mp_op_type { OP_READ = 1, OP_READBUF, OP_WRITE, OP_WRITEV, OP_SHUTDOWN, OP_CONNECT };

/* One queued application request.  The head of a handle's queue may be in the kernel. */
typedef struct mp_op {
    struct mp_op *next;
    uint8_t type;
    void *buf;              /* READ/WRITE */
    size_t len;             /* total bytes (WRITEV: sum of iov) */
    size_t done;            /* bytes already sent (writes) */
    struct iovec *iov;      /* WRITEV: remaining iovecs (advanced in place on short sends) */
    int iovcnt;
    /* READBUF completed by the engine at once, or stashed: the channel buffer it filled */
    uint32_t evflags;
    unsigned buf_id;
    void *rbuf;
    struct msghdr msg;      /* WRITEV on io_uring: stable until submitted */
    struct iovec iov_inline[4];
    struct sockaddr_storage addr; /* CONNECT */
    socklen_t addrlen;
} mp_op;

typedef struct mp_opq {
    mp_op *head, *tail;
} mp_opq;

/* LIVE -> (mp_unregister) DEAD -> (kernel holds nothing) ZOMBIE, CLOSED event queued ->
 * (CLOSED handed out) FREE, slot reusable. */
enum mp_hstate { H_FREE = 0, H_LIVE, H_DEAD, H_ZOMBIE };
enum mp_hkind { HK_CONN = 1, HK_LISTENER, HK_POLL };

struct mp_partition;

struct mp_handle {
    uint32_t magic;
    uint32_t idx;      /* slot in the channel's handle arena */
    uint32_t gen;      /* bumped at every registration of this slot */
    uint8_t state;     /* enum mp_hstate */
    uint8_t kind;      /* enum mp_hkind */
    uint8_t r_busy;    /* head of rq is in the kernel */
    uint8_t w_busy;    /* head of wq is in the kernel */
    mp_channel *ch;
    int id;            /* what the application registered: fd or lwsocket id */
    int fd;            /* the kernel handle ops use: fd, or direct slot when fixed */
    bool fixed;        /* fd is a direct-descriptor slot (lwsocket) */
    bool close_fd;     /* mp_unregister_close(): the channel closes id when the handle settles */
    bool accepted;     /* a connection this channel accepted (MP_ACCEPT_DEFER counts them) */
    void *cookie;
    mp_opq rq, wq;
    unsigned inflight; /* kernel operations that still reference this handle */
    uint32_t next_free;
    /* listeners */
    struct {
        struct mp_partition *part; /* NULL: shared accept queue */
        unsigned left;             /* accepts still wanted (count > 0 calls) */
        bool forever;              /* count 0: until unregistered */
        bool lw;                   /* accept as lwsockets (the latest mp_accept's wish) */
        bool excl;                 /* MP_ACCEPT_EXCLUSIVE: nobody else accepts from the queue */
        bool addr;                 /* MP_ACCEPT_ADDR: events carry the peer's address */
        bool addr_known;           /* MP_ACCEPT_ADDR_KNOWN: ... only what the accept returned */
        bool backoff;              /* waiting after an accept error */
    } acc;
    /* readiness set (poll.c; engines arm) */
    struct {
        uint32_t events;  /* interest */
        int flags;        /* MP_POLL_ET, MP_POLL_ONESHOT */
        bool armed;       /* the kernel watches: a poll request, or an entry in the epoll set */
        bool fired;       /* MP_POLL_ONESHOT: reported; quiet until the interest is set again */
        uint64_t qseq;    /* push number of this watch's latest event (merging, see poll.c) */
    } pw;
    /* re-arm list (events.c) */
    bool in_rearm_list;
    uint32_t rearm_next;  /* idx+1 of next handle in the channel's re-arm list */
    /* buffered reads */
    bool readbuf;         /* buffered-read mode: the engine feeds this handle channel buffers */
    mp_opq stash;         /* buffered completions that arrived before a request asked */
    /* The engine's own per-handle state is not here: it lives in a parallel array the core
     * allocates with the handles (mp_engine.handle_priv bytes each, mp__handle_priv()). */
};

/* Internal event record: the generation lets dispatch drop events of unregistered handles. */
typedef struct mp_qev {
    mp_event ev;
    uint32_t gen;
    uint32_t addr1; /* ACCEPT with a peer address: its entry in the channel's pool + 1 */
} mp_qev;

struct mp_channel {
    uint32_t magic;
    const mp_engine *eng;
    void *eng_data;
    mp_config cfg;
    /* handle arena; privchunks: the engine's per-handle state, chunk for chunk */
    mp_handle **chunks;
    char **privchunks;
    uint32_t nchunks;
    uint32_t free_head; /* idx+1, 0 = none */
    uint32_t nslots;    /* handles ever allocated */
    uint32_t used_slots; /* slots not free (live, ended, or waiting for their CLOSED event) */
    uint32_t poll_slots; /* ... of which readiness watches */
    /* fd -> handle idx+1 (EEXIST checks) */
    uint32_t *fdmap;
    size_t fdmap_len;
    /* readiness watches: fd -> handle idx+1 (EEXIST checks) */
    uint32_t *pollmap;
    size_t pollmap_len;
    /* lwsocket slot -> 0 free, 1 accepted not registered, idx+2 registered */
    uint32_t *lwmap;
    size_t lwmap_len;
    uint32_t lw_used;   /* slots not free in lwmap */
    /* regular fds of ACCEPT events handed out by the last dispatch: registering one of them
     * needs no probing (fdmap holds MP_FD_ACCEPTED for them until the next dispatch) */
    int *accepted;
    size_t naccepted, accepted_cap;
    /* peer addresses of ACCEPT events (peeraddr.c): entries in chunks that never move, a
     * free list, and the list of entries handed out by the last dispatch (idx + 1 links) */
    struct mp_peeraddr **addr_chunks;
    uint32_t addr_nchunks, addr_free, addr_held;
    /* event queue (ring); pushed/popped count records ever queued and taken out, so that a
     * record's place can be found from its push number */
    mp_qev *evq;
    size_t evq_cap, evq_head, evq_len;
    uint64_t evq_pushed, evq_popped;
    /* readiness set: interest changes made by other threads, applied by the owner (watch.c) */
    struct mp_wset *ws;
    atomic_uint ws_pending; /* changes recorded and not yet applied */
    atomic_uint user_wake;  /* mp_wake() called: the next wake-up is an MP_EV_WAKE event */
    /* level-triggered polls / backed-off accepts waiting for the next wait() */
    uint32_t rearm_head;
    /* events handed out since the engine last looked at the kernel (fairness, channel.c) */
    unsigned since_wait;
    /* op free list */
    mp_op *op_free;
    unsigned op_free_n;
    mp_stats st;
    uint32_t logged; /* log-once bits */
    /* Ownership: the thread that first used the channel, and the creating process.  The
     * fork check costs no system call: fork_mark lives in a MADV_WIPEONFORK page, which reads
     * as zero in a forked child.  (Kernels before 4.14: pid compared at each check.) */
    /* foreign epoll sets: refused queued ADD/MOD, reported by the next wait on their set */
    struct mp_fefail { int epfd; uint32_t events; uint64_t data; } *fefail;
    size_t nfefail, fefail_cap;
    pthread_t owner;
    bool owned;
    volatile uint32_t *fork_mark;
    pid_t pid;
};

#define MP_FD_ACCEPTED 0xffffffffu /* fdmap: accepted by this channel, not registered */

static inline bool mp__forked(const mp_channel *ch) {
    return ch->fork_mark ? *ch->fork_mark != MP_CHANNEL_MAGIC : getpid() != ch->pid;
}

/* May the calling thread use ch?  0, -EBADF (not a channel), -EPERM (another thread or a
 * forked child).  The first caller becomes the owner. */
int mp__ch_enter(mp_channel *ch);

static inline int64_t mp__now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static inline int64_t mp__now_ms(void) { return mp__now_us() / 1000; }

/* handle.c */
mp_handle *mp__handle_alloc(mp_channel *ch);
void mp__handle_free(mp_handle *h);
mp_handle *mp__handle_at(const mp_channel *ch, uint32_t idx);
/* The engine's private state of h (mp_engine.handle_priv bytes, zeroed at each allocation). */
static inline void *mp__handle_priv(const mp_handle *h) {
    const mp_channel *ch = h->ch;
    return ch->privchunks[h->idx >> MP_CHUNK_SHIFT] +
           (size_t)(h->idx & (MP_CHUNK_SIZE - 1)) * ch->eng->handle_priv;
}
static inline bool mp__live(const mp_handle *h) {
    return h && h->magic == MP_HANDLE_MAGIC && h->state == H_LIVE;
}
/* A live handle the calling thread may use: 0, -EBADF or -EPERM. */
static inline int mp__h_enter(mp_handle *h) {
    if (!mp__live(h)) return -EBADF;
    return mp__ch_enter(h->ch);
}
void mp__handle_end(mp_handle *h); /* LIVE -> DEAD: drop queues, detach; CLOSED when settled */
void mp__handle_settled(mp_handle *h); /* one kernel op of a dead handle ended */
void mp__detach_all(mp_channel *ch);
void mp__handle_close_held(mp_channel *ch); /* mp_destroy(), before its last flush */
int mp__fdmap_set(mp_channel *ch, int fd, uint32_t v);
uint32_t mp__fdmap_get(const mp_channel *ch, int fd);
int mp__lwmap_set(mp_channel *ch, unsigned slot, uint32_t v);
uint32_t mp__lwmap_get(const mp_channel *ch, unsigned slot);
int mp__pollmap_set(mp_channel *ch, int fd, uint32_t v);
uint32_t mp__pollmap_get(const mp_channel *ch, int fd);

/* ops.c: the per-handle FIFOs, shared by both engines */
void mp__read_done(mp_handle *h, ssize_t res, uint32_t evflags, unsigned buf_id, void *buf);
void mp__write_done(mp_handle *h, ssize_t res);
void mp__pump_reads(mp_handle *h);
void mp__pump_writes(mp_handle *h);
void mp__op_free(mp_channel *ch, mp_op *op);
mp_op *mp__op_alloc(mp_channel *ch);
void mp__opq_push(mp_opq *q, mp_op *op);
mp_op *mp__opq_pop(mp_opq *q);
void mp__opq_drop(mp_channel *ch, mp_opq *q, bool keep_head);

/* accept.c: addr (addrlen bytes) is the peer's address when the accept asked for it, or NULL */
void mp__accept_done(mp_handle *h, int res, bool more, bool stolen, const struct sockaddr *addr,
                     socklen_t addrlen);

/* peeraddr.c: the storage behind mp_event.u.accept.addr */
uint32_t mp__addr_put(mp_channel *ch, const struct sockaddr *addr, socklen_t addrlen);
void mp__addr_hand_out(mp_channel *ch, uint32_t addr1, mp_event *ev);
void mp__addr_drop(mp_channel *ch, uint32_t addr1);
void mp__addr_expire(mp_channel *ch); /* at each dispatch: handed-out addresses expire */
void mp__addr_free(mp_channel *ch);

/* events.c */
int mp__event_push(mp_channel *ch, mp_handle *h, mp_cmd cmd, ssize_t res, uint32_t flags);
mp_event *mp__event_push_ref(mp_channel *ch, mp_handle *h, mp_cmd cmd, ssize_t res,
                             uint32_t flags);
bool mp__event_pop(mp_channel *ch, mp_event *ev);
void mp__events_drain(mp_channel *ch); /* drop every queued event, releasing what it carries */
void mp__accepted_forget(mp_channel *ch); /* at each dispatch: see mp_channel.accepted */
static inline size_t mp__event_count(const mp_channel *ch) { return ch->evq_len; }
void mp__events_free(mp_channel *ch);

/* rearm list (level-triggered polls, accept back-off, paused receives and accepts).  An
 * engine takes the whole list at once and walks it, so that what it adds back while walking
 * waits for the next wait instead of being met again in the same walk. */
void mp__rearm_add(mp_handle *h);
uint32_t mp__rearm_take(mp_channel *ch);
mp_handle *mp__rearm_next(mp_channel *ch, uint32_t *list);
void mp__rearm_remove(mp_handle *h); /* before the slot is freed */

/* batcher.c */
void mp__batch_account(mp_channel *ch, unsigned submitted);
bool mp__batch_full(const mp_channel *ch, unsigned queued);

/* log.c */
#define MP_LOG_NO_URING 0x01u
#define MP_LOG_NO_LWSOCKET 0x02u
#define MP_LOG_NO_MULTISHOT 0x04u
#define MP_LOG_NO_DIRECT 0x08u
#define MP_LOG_NOT_READY 0x10u
#define MP_LOG_NO_INSTALL 0x20u
#define MP_LOG_NO_BUFRING 0x100u
#define MP_LOG_NO_BALANCE 0x200u
#define MP_LOG_MISUSE 0x400u
#define MP_LOG_LW_FULL 0x800u
#define MP_LOG_NO_DONTWAIT 0x1000u
void mp__log_once(mp_channel *ch, uint32_t bit, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* listener.c */
int mp__partition_open(mp_channel *ch, mp_handle *h, int listen_fd, const cpu_set_t *mask);
void mp__partition_close(mp_handle *h);
/* In a forked child: drop this process's copy of h's partition (close the fd; no shutdown,
 * no change to the kernel group the parent still uses). */
void mp__partition_forget(mp_handle *h);
void mp__partition_forget_all(mp_channel *ch);
unsigned mp__partition_backlog(int fd);
/* A sibling partition of h's group with at least threshold connections waiting, or -1. */
int mp__partition_busy_sibling(mp_handle *h, unsigned threshold);

/* poll.c: the readiness semantics shared by both engines */
mp_handle *mp__poll_add(mp_channel *ch, int fd, uint32_t events, int flags, void *cookie,
                        int *err);
/* again: tell the kernel even if nothing changed (mp_watch(): the fd's number may name
 * another file since the last time) */
int mp__poll_mod(mp_handle *h, uint32_t events, int flags, void *cookie, bool again);
/* The kernel reported revents for watch h: queue (or merge into its queued) MP_EV_POLL event.
 * Returns true when an event of h is queued afterwards. */
bool mp__poll_done(mp_handle *h, uint32_t revents);
/* h's MP_EV_POLL event was handed out (events.c): a level-triggered poll re-arms. */
void mp__poll_popped(mp_handle *h);
/* Is an event of watch h still queued? */
bool mp__poll_queued(const mp_handle *h);

/* watch.c: fd-keyed set, changes from any thread */
void mp__watch_apply(mp_channel *ch); /* owner: apply what other threads recorded */
void mp__watch_free(mp_channel *ch);

/* channel.c: the engine's wake-up eventfd was read; an MP_EV_WAKE event if mp_wake() asked */
void mp__wake_seen(mp_channel *ch);
/* fepoll.c: a queued mp_epoll_ctl() the kernel refused (engines call it from completions) */
void mp__fepoll_failed(mp_channel *ch, int epfd, int op, uint64_t data, int res);

#endif
