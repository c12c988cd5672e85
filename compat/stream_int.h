/*
 * compat/stream_int.h — what the files of stream mode share (stream.c: the streams' state,
 * their channel and readiness; stream_calls.c: the interposed socket calls that read and
 * write them).  Not seen outside the preload.
 */
#ifndef MP_STREAM_INT_H
#define MP_STREAM_INT_H

#include <stdatomic.h>
#include <sys/uio.h>

#include "preload.h"

struct rxb {
    unsigned id;
    char *p;
    uint32_t len, off;
};
struct txc {
    char *p;
    size_t len;
};

struct mpr_schan;

struct mpr_stream {
    int fd;
    uint32_t gen;
    struct mpr_schan *own; /* NULL: candidate (plain fd) */
    mp_handle *h;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned sleepers; /* threads blocked on cv */
    /* rx */
    struct rxb *rx;
    size_t rx_head, rx_n, rx_cap, rx_bytes;
    bool rx_eof;
    int rx_err;
    unsigned *rel; /* consumed by another thread: released by the owner */
    size_t nrel, rel_cap;
    /* tx */
    char *pend;
    size_t pend_len, pend_cap;
    struct txc *tx;
    size_t tx_head, tx_n, tx_cap, inflight;
    int wr_err;
    bool shut_wr, shut_sent;
    int so_err; /* for SO_ERROR and EPOLLERR, until read */
    bool nonblock;
    bool kout_blocked, kout_watch; /* a real send got EAGAIN: OUT waits for POLLOUT */
    int linger;                    /* -1: off; else seconds */
    int64_t rcvtimeo, sndtimeo;    /* SO_RCVTIMEO, SO_SNDTIMEO in ns (0: none) */
    bool cork;  /* TCP_CORK as the application set it while the kernel's is off (kcork) */
    bool kcork; /* TCP_CORK set on the kernel's socket (before adoption, or while it was) */
    bool closing, closed_sent, dirty;
    bool detach; /* the number is closed by someone else (dup2, close_range): unregister only */
    unsigned hold; /* the owner's close() still uses the record: its CLOSED only marks it dead */
    bool dead;
    /* epoll */
    int epfd; /* -1: in no set */
    uint32_t events;
    uint64_t data;
    bool fired; /* one-shot reported */
    bool edge;  /* something happened since the last ET report */
    bool in_rdy;
};

struct rdy {
    struct mpr_stream *s;
    uint32_t gen;
};

struct mpr_schan {
    mp_channel *ch;
    pthread_t tid;
    /* the owner's lists (only its thread touches them) */
    struct mpr_stream **dirty;
    size_t ndirty, dcap;
    struct rdy *rdy;
    size_t nrdy, rcap;
    /* what other threads add, under mu; `remote` says there is some */
    pthread_mutex_t mu;
    struct mpr_stream **rdirty;
    size_t nrdirty, rdcap;
    struct rdy *rrdy;
    size_t nrrdy, rrcap;
    atomic_bool remote;
    atomic_bool waiting;
    unsigned closing; /* streams whose close is not finished */
    uint64_t adopted, rx_served, tx_queued, tx_submits, flushes;
    struct mpr_schan *next;
};

extern struct mpr_stream **g_st; /* fd -> stream (stream.c) */
extern size_t g_cap;

static inline struct mpr_stream *st_of(int fd) {
    if (!mpr_streams || fd < 0 || (size_t)fd >= g_cap) return NULL;
    return g_st[fd];
}

/* An adopted stream, or NULL (then the caller makes the real call). */
static inline struct mpr_stream *adopted(int fd) {
    struct mpr_stream *s = st_of(fd);
    return s && s->own && !mpr_t.busy ? s : NULL;
}

static inline bool is_owner(const struct mpr_stream *s) {
    return s->own && s->own == mpr_t.sc && mpr_t.ch == s->own->ch;
}

/* stream.c, for stream_calls.c (each documented at its definition). */
void mps_mark_rdy(struct mpr_stream *s);   /* its owner's next wait looks at it; s->mu held */
void mps_mark_dirty(struct mpr_stream *s); /* pend bytes or a close for the owner; s->mu held */
void mps_service(struct mpr_stream *s);    /* the owner's work for a dirty stream */
void mps_kick(struct mpr_schan *c);        /* hand what is queued to the kernel now */
void mps_block_on(struct mpr_stream *s, int64_t until); /* wait for s to change; s->mu held */
int64_t mps_deadline(int64_t timeo_ns);    /* now + timeo_ns, or 0 (none) for 0 */
bool mps_past(int64_t until);              /* a deadline (not 0) has passed */
extern atomic_bool mpr_timeo_seen;         /* SO_RCVTIMEO/SO_SNDTIMEO set on some socket */
int64_t mps_kernel_timeo(int fd, int name); /* the kernel's SO_RCVTIMEO/SO_SNDTIMEO, ns */
size_t mps_take(struct mpr_stream *s, const struct iovec *iov, int iovcnt, bool peek);
ssize_t mps_recv(struct mpr_stream *s, const struct iovec *iov, int iovcnt, int flags);
ssize_t mps_send(struct mpr_stream *s, const struct iovec *iov, int iovcnt, int flags);
bool mps_sendfile(struct mpr_stream *s, int in, off_t *off, size_t n, ssize_t *res);
bool mps_flush_before(struct mpr_stream *s, int more, bool dontwait); /* queue empty; mu not held */

#endif
