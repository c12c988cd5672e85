/*
 * compat/stream.c — stream mode (MEGAPIPE_STREAMS=1, megapipe-run --streams): TCP connections
 * accepted through the interposed accept/accept4 are served by the core's buffered multishot
 * reads and by write-behind through mp_write(), and their readiness in the application's epoll
 * sets is derived from that state.
 *
 * A connection is a *candidate* from its accept until a thread waits on an epoll set this
 * process made that holds it; that thread's channel then *adopts* it (mp_register +
 * mp_read_buffered) and owns it for good.  Before that (and for a connection never put in a
 * set, or put in a set the emulation does not serve) it is a plain fd: every call is the real
 * one.  A stream's fd is never in the kernel's epoll set: its interest (events, data, ET,
 * one-shot) is kept here, and a wait reports it from the stream's state.
 *
 * State of a stream (per-stream mutex; the owner thread does every channel call):
 *   rx: channel buffers received and not yet read (a FIFO), EOF, a receive error;
 *   tx: bytes written and not yet given to the channel (pend), bytes given and not yet
 *       completed (inflight, a FIFO of chunks), a send error;
 *   pend + inflight <= MEGAPIPE_STREAM_WBUF (the write-behind bound): past it a write takes
 *   what fits, or fails with EAGAIN (blocks, on a blocking socket), as a full socket buffer.
 * The owner's channel (struct mpr_schan) keeps the streams that have pend bytes or a close to
 * finish (dirty), and the streams whose readiness may have changed (rdy), which its waits
 * look at.  Other threads append under the stream's mutex and wake the owner (mp_wake).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <time.h>
#include <unistd.h>

#include "stream_int.h"

bool mpr_streams;
static bool g_wanted;
static size_t g_wbuf = 256 * 1024;      /* MEGAPIPE_STREAM_WBUF */
static size_t g_flush_at = 64 * 1024;   /* pend bytes that go to the channel at once */
static size_t g_sendfile_copy = 64 * 1024; /* MEGAPIPE_STREAM_SENDFILE_COPY */

struct mpr_stream **g_st; /* fd -> stream */
static uint8_t *g_lcls;          /* listener fd -> 0 unknown, 1 TCP, 2 other */
size_t g_cap;
static pthread_mutex_t g_sclock = PTHREAD_MUTEX_INITIALIZER;
static struct mpr_schan *g_schans;
static uint32_t g_gen;
static pid_t g_pid; /* the process the streams belong to (not a vfork child) */
static atomic_bool g_adopted; /* this process has adopted a stream (else exit has nothing to send) */

/* ---- helpers --------------------------------------------------------------------------- */

static int fail(int err) {
    errno = err;
    return -1;
}

/* A size from the environment ("64k", "1m", bytes); below min or unreadable: def. */
static size_t env_size(const char *name, size_t def, size_t min) {
    const char *v = getenv(name);
    if (!v || !*v) return def;
    char *end;
    unsigned long long n = strtoull(v, &end, 0);
    if (*end == 'k' || *end == 'K') n <<= 10;
    else if (*end == 'm' || *end == 'M') n <<= 20;
    return n >= min ? (size_t)n : def;
}

void mpr_streams_init(bool wanted) {
    g_wanted = wanted;
    if (!wanted) return;
    g_pid = getpid();
    g_wbuf = env_size("MEGAPIPE_STREAM_WBUF", g_wbuf, 4096);
    g_flush_at = g_wbuf / 4 < g_flush_at ? g_wbuf / 4 : g_flush_at;
    g_sendfile_copy = env_size("MEGAPIPE_STREAM_SENDFILE_COPY", g_sendfile_copy, 0);
    if (g_sendfile_copy > g_wbuf) g_sendfile_copy = g_wbuf;
    g_cap = mpr_fd_cap();
    if (!g_cap) return;
    void *p = mmap(NULL, g_cap * sizeof *g_st, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    void *q = mmap(NULL, g_cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED || q == MAP_FAILED) return;
    g_st = p;
    g_lcls = q;
    mpr_streams = true; /* until the first channel says otherwise */
}

void mpr_streams_check(mp_channel *ch) {
    if (!mpr_streams) return;
    mp_stats st;
    mp_get_stats(ch, &st);
    /* (buffered reads are probed at the first one: see adopt()) */
    if (!(st.features & MP_FEAT_EPOLL_WAIT)) {
        mpr_streams = false;
        fprintf(stderr, "megapipe-preload[%d]: stream mode needs IORING_OP_EPOLL_WAIT "
                        "(Linux 6.15+): epoll-only mode\n", (int)getpid());
    } else if (mpr_verbose) {
        fprintf(stderr, "megapipe-preload[%d]: stream mode: write-behind bound %zu bytes\n",
                (int)getpid(), g_wbuf);
    }
}

bool mpr_is_stream(int fd) { return st_of(fd) != NULL; }

static struct mpr_schan *schan_of(mp_channel *ch) {
    if (mpr_t.sc && mpr_t.sc->ch == ch) return mpr_t.sc;
    struct mpr_schan *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->ch = ch;
    c->tid = pthread_self();
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_lock(&g_sclock);
    c->next = g_schans;
    g_schans = c;
    pthread_mutex_unlock(&g_sclock);
    mpr_t.sc = c;
    return c;
}

/* ---- candidates -------------------------------------------------------------------------- */

static bool tcp_listener(int lfd) {
    if (lfd < 0 || (size_t)lfd >= g_cap) return false;
    if (!g_lcls[lfd]) {
        int proto = 0, dom = 0;
        socklen_t l1 = sizeof proto, l2 = sizeof dom;
        bool tcp = mpr_real.getsockopt(lfd, SOL_SOCKET, SO_PROTOCOL, &proto, &l1) == 0 &&
                   mpr_real.getsockopt(lfd, SOL_SOCKET, SO_DOMAIN, &dom, &l2) == 0 &&
                   proto == IPPROTO_TCP && (dom == AF_INET || dom == AF_INET6);
        g_lcls[lfd] = tcp ? 1 : 2;
    }
    return g_lcls[lfd] == 1;
}

static void stream_free(struct mpr_stream *s) {
    free(s->rx);
    free(s->rel);
    free(s->pend);
    for (size_t i = 0; i < s->tx_n; i++) free(s->tx[(s->tx_head + i) % s->tx_cap].p);
    free(s->tx);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    s->gen = 0;
    free(s);
}

void mpr_stream_accepted(int lfd, int fd, int flags) {
    if (!mpr_streams || fd < 0 || (size_t)fd >= g_cap) return;
    if (!tcp_listener(lfd)) return; /* (a stale record of the number: mpr_fd_new) */
    struct mpr_stream *s = calloc(1, sizeof *s);
    if (!s) return;
    s->fd = fd;
    s->epfd = -1;
    s->linger = -1;
    s->nonblock = (flags & SOCK_NONBLOCK) != 0;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    mpr_lock();
    s->gen = ++g_gen ? g_gen : ++g_gen;
    g_st[fd] = s;
    mpr_unlock();
}

/* lock held */
void mpr_stream_unstream(int fd) {
    struct mpr_stream *s = st_of(fd);
    if (!s || s->own) return; /* adopted: stays a stream (documented) */
    g_st[fd] = NULL;
    stream_free(s);
}

/* lock held */
void mpr_stream_forget(int fd) {
    struct mpr_stream *s = st_of(fd);
    if (!s) return;
    g_st[fd] = NULL;
    if (!s->own) stream_free(s); /* an adopted one stays its channel's (unreachable) */
}

/* ---- readiness ------------------------------------------------------------------------- */

static uint32_t ready_bits(struct mpr_stream *s) {
    uint32_t r = 0;
    if (s->rx_bytes || s->rx_eof || s->rx_err) r |= EPOLLIN | EPOLLRDNORM;
    if (s->rx_eof || s->rx_err) r |= EPOLLRDHUP;
    if (!s->kout_blocked && (s->wr_err || s->shut_wr || s->pend_len + s->inflight < g_wbuf))
        r |= EPOLLOUT | EPOLLWRNORM;
    if (s->so_err) r |= EPOLLERR;
    if ((s->rx_eof && s->shut_wr) || s->rx_err) r |= EPOLLHUP;
    return r;
}

static bool push_rdy(struct rdy **a, size_t *n, size_t *cap, struct rdy e) {
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 64;
        struct rdy *m = realloc(*a, c * sizeof *m);
        if (!m) return false;
        *a = m;
        *cap = c;
    }
    (*a)[(*n)++] = e;
    return true;
}

static bool push_st(struct mpr_stream ***a, size_t *n, size_t *cap, struct mpr_stream *s) {
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 64;
        struct mpr_stream **m = realloc(*a, c * sizeof *m);
        if (!m) return false;
        *a = m;
        *cap = c;
    }
    (*a)[(*n)++] = s;
    return true;
}

/* Another thread added to c's lists: wake its owner if it waits (seq_cst: the owner sets
 * `waiting`, then looks at `remote`; we set `remote`, then look at `waiting`). */
static void remote_added(struct mpr_schan *c) {
    atomic_store(&c->remote, true);
    if (atomic_load(&c->waiting)) mp_wake(c->ch);
}

/* Something about s changed: its owner's next wait looks at it.  s->mu held. */
void mps_mark_rdy(struct mpr_stream *s) {
    s->edge = true;
    if (s->sleepers) pthread_cond_broadcast(&s->cv);
    struct mpr_schan *c = s->own;
    if (!c || s->in_rdy || s->epfd < 0) return;
    if (is_owner(s)) {
        if (push_rdy(&c->rdy, &c->nrdy, &c->rcap, (struct rdy){s, s->gen})) s->in_rdy = true;
        return;
    }
    pthread_mutex_lock(&c->mu);
    bool ok = push_rdy(&c->rrdy, &c->nrrdy, &c->rrcap, (struct rdy){s, s->gen});
    if (ok) s->in_rdy = true;
    pthread_mutex_unlock(&c->mu);
    if (ok) remote_added(c);
}

/* s has pend bytes or a close to finish: its owner's next wait does it.  s->mu held. */
void mps_mark_dirty(struct mpr_stream *s) {
    struct mpr_schan *c = s->own;
    if (!c || s->dirty) return;
    if (is_owner(s)) {
        if (push_st(&c->dirty, &c->ndirty, &c->dcap, s)) s->dirty = true;
        return;
    }
    pthread_mutex_lock(&c->mu);
    bool ok = push_st(&c->rdirty, &c->nrdirty, &c->rdcap, s);
    if (ok) s->dirty = true;
    pthread_mutex_unlock(&c->mu);
    if (ok) remote_added(c);
}

/* The owner takes what other threads added.  (Not under any stream's mutex.) */
static void take_remote(struct mpr_schan *c) {
    if (!atomic_load(&c->remote)) return;
    pthread_mutex_lock(&c->mu);
    atomic_store(&c->remote, false);
    for (size_t i = 0; i < c->nrrdy; i++)
        if (!push_rdy(&c->rdy, &c->nrdy, &c->rcap, c->rrdy[i])) c->rrdy[i].s->in_rdy = false;
    for (size_t i = 0; i < c->nrdirty; i++)
        if (!push_st(&c->dirty, &c->ndirty, &c->dcap, c->rdirty[i])) c->rdirty[i]->dirty = false;
    c->nrrdy = c->nrdirty = 0;
    pthread_mutex_unlock(&c->mu);
}

static void rdy_drop(struct rdy *l, size_t *n, const struct mpr_stream *s) {
    size_t k = 0;
    for (size_t i = 0; i < *n; i++)
        if (l[i].s != s) l[k++] = l[i];
    *n = k;
}

static void st_drop(struct mpr_stream **l, size_t *n, const struct mpr_stream *s) {
    size_t k = 0;
    for (size_t i = 0; i < *n; i++)
        if (l[i] != s) l[k++] = l[i];
    *n = k;
}

/* s is about to be freed: out of its owner's lists (owner thread). */
static void lists_forget(struct mpr_schan *c, struct mpr_stream *s) {
    rdy_drop(c->rdy, &c->nrdy, s);
    st_drop(c->dirty, &c->ndirty, s);
    pthread_mutex_lock(&c->mu);
    rdy_drop(c->rrdy, &c->nrrdy, s);
    st_drop(c->rdirty, &c->nrdirty, s);
    pthread_mutex_unlock(&c->mu);
}

/* ---- the owner's side: channel calls ---------------------------------------------------- */

/* Give s's pend bytes to the channel (owner, s->mu held, busy set). */
static void submit(struct mpr_stream *s) {
    if (!s->pend_len || s->wr_err) return;
    if (s->tx_n == s->tx_cap) {
        size_t cap = s->tx_cap ? s->tx_cap * 2 : 8;
        struct txc *n = malloc(cap * sizeof *n);
        if (!n) return; /* stays pending; tried again at the next wait */
        for (size_t i = 0; i < s->tx_n; i++) n[i] = s->tx[(s->tx_head + i) % s->tx_cap];
        free(s->tx);
        s->tx = n;
        s->tx_head = 0;
        s->tx_cap = cap;
    }
    int r = mp_write(s->h, s->pend, s->pend_len);
    if (r < 0) {
        if (r == -ENOMEM) return;
        s->wr_err = -r;
        return;
    }
    s->tx[(s->tx_head + s->tx_n++) % s->tx_cap] = (struct txc){s->pend, s->pend_len};
    s->inflight += s->pend_len;
    s->own->tx_submits++;
    s->pend = NULL;
    s->pend_len = s->pend_cap = 0;
}

/* s's pend bytes go to the channel: now by the owner, else at the owner's next wait.  s->mu
 * held. */
static void push_out(struct mpr_stream *s) {
    if (is_owner(s)) {
        bool was = mpr_t.busy;
        mpr_t.busy = true;
        submit(s);
        mpr_t.busy = was;
    } else {
        mps_mark_dirty(s);
    }
}

static void release_rx(struct mpr_stream *s) {
    mp_channel *ch = s->own->ch;
    for (size_t i = 0; i < s->nrel; i++) mp_buffer_release(ch, s->rel[i]);
    s->nrel = 0;
}

/* The close of s can finish: no byte left to send (or an error / SO_LINGER 0 drops them). */
static void finish_close(struct mpr_stream *s) {
    if (s->closed_sent) return;
    s->closed_sent = true;
    release_rx(s);
    for (size_t i = 0; i < s->rx_n; i++) mp_buffer_release(s->own->ch, s->rx[(s->rx_head + i) % s->rx_cap].id);
    s->rx_n = s->rx_bytes = 0;
    if (s->kout_watch) mp_unwatch(s->own->ch, s->fd);
    s->kout_watch = false;
    /* The fd is the channel's now: closed when the kernel let go of the handle (its CLOSED
     * event frees the record). */
    int r = s->detach ? mp_unregister(s->h) : mp_unregister_close(s->h);
    if (r < 0) {
        /* Cannot happen for a live handle; if it did, no CLOSED event would come: the fd is
         * closed here and the record (its caller holds its mutex) is left, unreachable. */
        if (!s->detach) mpr_real.close(s->fd);
        s->own->closing--;
        lists_forget(s->own, s);
    }
}

/* What the owner does for a dirty stream.  s->mu held, busy set. */
void mps_service(struct mpr_stream *s) {
    s->dirty = false;
    release_rx(s);
    submit(s);
    if (s->closing) {
        if (s->linger == 0 || s->wr_err || (!s->pend_len && !s->inflight)) finish_close(s);
        return;
    }
    if (s->shut_wr && !s->shut_sent && !s->pend_len && !s->wr_err) {
        s->shut_sent = true;
        mp_disconnect(s->h);
    }
}

static void service_dirty(struct mpr_schan *c) {
    take_remote(c);
    while (c->ndirty) {
        struct mpr_stream *s = c->dirty[--c->ndirty];
        pthread_mutex_lock(&s->mu);
        bool freed = s->closing && s->closed_sent;
        if (!freed) mps_service(s);
        pthread_mutex_unlock(&s->mu);
    }
}

/* One event of the owner's channel.  busy set. */
static void route(struct mpr_schan *c, const mp_event *ev) {
    struct mpr_stream *s = ev->cookie;
    if (!s) return; /* MP_EV_WAKE */
    if ((uintptr_t)s & 1) { /* the stream's POLLOUT watch (see kout_wait) */
        if (ev->cmd != MP_EV_POLL) return; /* its CLOSED: the stream may be gone */
        s = (struct mpr_stream *)((char *)s - 1);
    } else if (ev->cmd == MP_EV_CLOSED) {
        c->closing--;
        lists_forget(c, s);
        if (s->hold) s->dead = true;
        else stream_free(s);
        return;
    }
    pthread_mutex_lock(&s->mu);
    switch (ev->cmd) {
    case MP_EV_READ:
        if ((ev->flags & MP_EVF_BUFFER) && ev->result > 0) {
            if (s->closing) {
                mp_buffer_release(c->ch, ev->u.read.buf_id);
                break;
            }
            if (s->rx_n == s->rx_cap) {
                size_t cap = s->rx_cap ? s->rx_cap * 2 : 8;
                struct rxb *n = malloc(cap * sizeof *n);
                if (!n) { /* cannot keep it: the connection is broken rather than lose it */
                    mp_buffer_release(c->ch, ev->u.read.buf_id);
                    s->rx_err = s->so_err = ENOMEM;
                    break;
                }
                for (size_t i = 0; i < s->rx_n; i++) n[i] = s->rx[(s->rx_head + i) % s->rx_cap];
                free(s->rx);
                s->rx = n;
                s->rx_head = 0;
                s->rx_cap = cap;
            }
            s->rx[(s->rx_head + s->rx_n++) % s->rx_cap] =
                (struct rxb){ev->u.read.buf_id, ev->u.read.buf, (uint32_t)ev->result, 0};
            s->rx_bytes += (size_t)ev->result;
            /* one request per event: the next one (the multishot receive stays armed, and
             * what arrived meanwhile is handed out from the core's stash) */
            int r = mp_read_buffered(s->h);
            if (r < 0 && !s->rx_err) s->rx_err = s->so_err = -r;
        } else if (ev->result < 0) {
            s->rx_err = s->so_err = (int)-ev->result;
        }
        break;
    case MP_EV_DISCONNECT:
        if (ev->flags & MP_EVF_LOCAL) {
            if (ev->result < 0 && !s->wr_err) s->wr_err = (int)-ev->result;
        } else if (ev->result == 0) {
            s->rx_eof = true;
        } else {
            s->rx_err = s->so_err = (int)-ev->result;
            if (!s->wr_err) s->wr_err = (int)-ev->result;
        }
        break;
    case MP_EV_WRITE:
        if (s->tx_n) {
            struct txc t = s->tx[s->tx_head];
            s->tx_head = (s->tx_head + 1) % s->tx_cap;
            s->tx_n--;
            s->inflight -= t.len;
            free(t.p);
        }
        if (ev->result < 0 && !s->wr_err) {
            s->wr_err = (int)-ev->result;
            if (!s->so_err) s->so_err = s->wr_err;
        }
        if (s->wr_err) { /* nothing more can be sent: what is pending goes */
            free(s->pend);
            s->pend = NULL;
            s->pend_len = s->pend_cap = 0;
        }
        if (s->closing && !s->inflight) mps_service(s);
        else if (s->shut_wr && !s->shut_sent) mps_service(s);
        break;
    case MP_EV_POLL:
        s->kout_blocked = false;
        break;
    default:
        break;
    }
    mps_mark_rdy(s);
    pthread_mutex_unlock(&s->mu);
}

/* Hand out and route the channel's events: without blocking (timeout 0: only what is known to
 * be there, no system call), or waiting up to timeout_ms for at least one.  busy set. */
static int pump(struct mpr_schan *c, int timeout_ms) {
    mp_event evs[64];
    int total = 0;
    for (;;) {
        if (timeout_ms == 0 && mp_pending(c->ch) <= 0) return total;
        int n = mp_dispatch_batch(c->ch, evs, 64, timeout_ms);
        if (n < 0) return total ? total : n;
        for (int i = 0; i < n; i++) route(c, &evs[i]);
        total += n;
        if (n < 64) {
            if (timeout_ms != 0 && mp_pending(c->ch) <= 0) return total;
            timeout_ms = 0;
        }
    }
}

/* Hand what is queued to the kernel and take what it has done, now: one system call (the
 * kernel sends inline what fits in the socket).  busy set. */
void mps_kick(struct mpr_schan *c) {
    mp_event evs[64];
    int n = mp_dispatch_batch(c->ch, evs, 64, 0);
    for (int i = 0; i < n; i++) route(c, &evs[i]);
    pump(c, 0);
}

/* A socket's SO_RCVTIMEO or SO_SNDTIMEO in ns (0: none). */
int64_t mps_kernel_timeo(int fd, int name) {
    struct timeval tv;
    socklen_t len = sizeof tv;
    if (mpr_real.getsockopt(fd, SOL_SOCKET, name, &tv, &len) < 0) return 0;
    return (int64_t)tv.tv_sec * 1000000000 + (int64_t)tv.tv_usec * 1000;
}

atomic_bool mpr_timeo_seen;

/* Adopt s into c.  lock held, busy set.  false: it stays a plain fd. */
static bool g_nobuf;

static bool adopt(struct mpr_schan *c, struct mpr_stream *s) {
    if (g_nobuf) return false;
    mp_handle *h = mp_register_connected(c->ch, s->fd, s); /* accept() made it: no probe */
    if (!h) return false;
    int r = mp_read_buffered(h);
    if (r < 0) {
        mp_unregister(h);
        if (r == -ENOTSUP && !g_nobuf) {
            g_nobuf = true; /* no provided-buffer rings: no streams from now on */
            fprintf(stderr, "megapipe-preload[%d]: stream mode needs provided-buffer rings and "
                            "multishot receives: connections stay plain fds\n", (int)getpid());
        }
        return false;
    }
    pthread_mutex_lock(&s->mu);
    s->h = h;
    s->own = c;
    c->adopted++;
    atomic_store_explicit(&g_adopted, true, memory_order_relaxed);
    if (atomic_load_explicit(&mpr_timeo_seen, memory_order_relaxed)) {
        /* SO_RCVTIMEO/SO_SNDTIMEO were set in this process (perhaps on the listener, which
         * the accepted socket inherits): the kernel's values, read once. */
        s->rcvtimeo = mps_kernel_timeo(s->fd, SO_RCVTIMEO);
        s->sndtimeo = mps_kernel_timeo(s->fd, SO_SNDTIMEO);
    }
    mps_mark_rdy(s);
    pthread_mutex_unlock(&s->mu);
    return true;
}

/* ---- epoll ------------------------------------------------------------------------------ */

/* lock held */
int mpr_stream_ctl(struct mpr_ep *ep, int op, int fd, struct epoll_event *ev) {
    struct mpr_stream *s = st_of(fd);
    if (op != EPOLL_CTL_ADD && op != EPOLL_CTL_MOD && op != EPOLL_CTL_DEL) return -EINVAL;
    if (op != EPOLL_CTL_DEL && !ev) return -EFAULT;
    pthread_mutex_lock(&s->mu);
    int r = 0;
    if (op == EPOLL_CTL_ADD) {
        if (s->epfd == ep->epfd) r = -EEXIST;
        else if (s->epfd >= 0) r = -EBUSY; /* in another set: the caller decides */
        else s->epfd = ep->epfd;
    } else if (s->epfd != ep->epfd) {
        r = -ENOENT;
    } else if (op == EPOLL_CTL_DEL) {
        s->epfd = -1;
    }
    if (r == 0 && op != EPOLL_CTL_DEL) {
        s->events = ev->events;
        s->data = ev->data.u64;
        s->fired = false;
        mps_mark_rdy(s);
    }
    pthread_mutex_unlock(&s->mu);
    if (r == 0 && op == EPOLL_CTL_ADD && !s->own && (ep->waiters || mpr_ep_adopt_push(ep, fd) < 0)) {
        /* A thread waits on the set now and would not see the candidate until its wait
         * ends: the connection stays a plain fd, in the kernel's set. */
        s->epfd = -1;
        return -EBUSY; /* the caller makes it a plain fd */
    }
    return r;
}

/* Up to max events of set epfd from c's streams.  Owner thread, busy set. */
static int collect(struct mpr_schan *c, int epfd, struct epoll_event *evs, int max) {
    take_remote(c);
    int n = 0;
    size_t keep = 0, nl = c->nrdy;
    struct rdy *l = c->rdy;
    for (size_t i = 0; i < nl; i++) {
        struct mpr_stream *s = l[i].s;
        if (n >= max) {
            l[keep++] = l[i];
            continue;
        }
        pthread_mutex_lock(&s->mu);
        if (s->epfd != epfd) {
            if (s->epfd >= 0 && !s->closing) l[keep++] = l[i];
            else s->in_rdy = false;
            pthread_mutex_unlock(&s->mu);
            continue;
        }
        uint32_t want = (s->events & (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLRDNORM | EPOLLWRNORM |
                                      EPOLLPRI)) | EPOLLERR | EPOLLHUP;
        uint32_t got = ready_bits(s) & want;
        bool et = s->events & EPOLLET, one = s->events & EPOLLONESHOT;
        if (!got || s->closing || (one && s->fired) || (et && !s->edge)) {
            s->in_rdy = false;
        } else {
            evs[n].events = got;
            evs[n].data.u64 = s->data;
            n++;
            s->edge = false;
            if (one) s->fired = true;
            if (et || one) s->in_rdy = false;
            else l[keep++] = l[i];
        }
        pthread_mutex_unlock(&s->mu);
    }
    /* (nothing in the loop adds to c->rdy: the owner is here, other threads use rrdy) */
    c->nrdy = keep;
    return n;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

int mpr_stream_wait(mp_channel *ch, int epfd, struct epoll_event *evs, int max, int64_t ns,
                    const sigset_t *mask) {
    struct mpr_schan *c = schan_of(ch);
    if (!c) return mp_epoll_wait(ch, epfd, evs, max, ns, mask);
    /* Candidates of this set become this channel's. */
    mpr_lock();
    struct mpr_ep *ep = mpr_ep_of(epfd);
    if (ep) {
        int fd;
        while ((fd = mpr_ep_adopt_pop(ep)) >= 0) {
            struct mpr_stream *s = st_of(fd);
            if (!s || s->own || s->epfd != epfd) continue;
            if (!adopt(c, s)) {
                /* a plain fd after all: into the kernel's set with its interest */
                struct epoll_event e = {.events = s->events, .data.u64 = s->data};
                g_st[fd] = NULL;
                stream_free(s);
                if (mpr_real.epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e) == 0) mpr_set_present(ep, fd, true);
            }
        }
    }
    mpr_unlock();
    int64_t deadline = ns > 0 ? now_ns() + ns : 0;
    for (;;) {
        service_dirty(c);
        pump(c, 0);
        int n = collect(c, epfd, evs, max);
        if (n == max) return n;
        atomic_store(&c->waiting, true);
        /* what another thread added before it saw `waiting`: do not sleep on it */
        bool remote = atomic_load(&c->remote);
        service_dirty(c);
        int64_t t = n || remote ? 0 : ns;
        if (t > 0) {
            t = deadline - now_ns();
            if (t < 0) t = 0;
        }
        int r = mp_epoll_wait_flags(ch, epfd, evs + n, max - n, t, mask, MP_EPOLL_WAIT_CHANNEL);
        atomic_store(&c->waiting, false);
        c->flushes++;
        if (r < 0) return n ? n : r;
        if (n || r) {
            pump(c, 0);
            return n + r;
        }
        pump(c, 0);
        n = collect(c, epfd, evs, max);
        if (n) return n;
        if (ns == 0 || (ns > 0 && now_ns() >= deadline)) return 0;
        /* woken for something no interest of this set wanted: wait again */
    }
}

/* ---- blocking ---------------------------------------------------------------------------- */

/* The deadline of a blocking call that may wait timeo_ns (SO_RCVTIMEO/SO_SNDTIMEO; 0: none,
 * the deadline 0 then), and whether it has passed. */
int64_t mps_deadline(int64_t timeo_ns) { return timeo_ns > 0 ? now_ns() + timeo_ns : 0; }
bool mps_past(int64_t until) { return until && now_ns() >= until; }

/* Wait for s to change (s->mu held; released meanwhile), or until the deadline `until` (0:
 * none).  The owner pumps its channel; other threads sleep on the stream's condition variable
 * (the owner's waits route its events). */
void mps_block_on(struct mpr_stream *s, int64_t until) {
    int64_t ms = 1000;
    if (until) {
        int64_t left = until - now_ns();
        if (left <= 0) return;
        if (left / 1000000 + 1 < ms) ms = left / 1000000 + 1;
    }
    if (is_owner(s)) {
        struct mpr_schan *c = s->own;
        pthread_mutex_unlock(&s->mu);
        bool was = mpr_t.busy;
        mpr_t.busy = true;
        service_dirty(c);
        pump(c, (int)ms);
        mpr_t.busy = was;
        pthread_mutex_lock(&s->mu);
    } else {
        s->sleepers++;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += (ms < 50 ? ms : 50) * 1000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&s->cv, &s->mu, &ts);
        s->sleepers--;
    }
}


/* With nothing in flight, s's pend bytes go with one real non-blocking send: what the socket
 * takes leaves the queue; a send error fails the stream (what is pending goes).  s->mu held. */
static void send_pend_now(struct mpr_stream *s, int more) {
    if (!s->pend_len || s->inflight || s->wr_err) return;
    ssize_t r = mpr_real.send(s->fd, s->pend, s->pend_len, MSG_DONTWAIT | MSG_NOSIGNAL | more);
    if (r > 0) {
        memmove(s->pend, s->pend + r, s->pend_len - (size_t)r);
        s->pend_len -= (size_t)r;
    } else if (r < 0 && errno != EAGAIN && errno != EINTR) {
        s->wr_err = s->so_err = errno;
        free(s->pend);
        s->pend = NULL;
        s->pend_len = s->pend_cap = 0;
    }
}

/* Every byte written so far is in the socket (or failed), or the deadline `until` passed (0:
 * none; the bytes left stay queued).  s->mu held.  With nothing in flight, the bytes not yet
 * given to the channel go with one real send (what a program that mixes writes with sendfile
 * would have made itself), without a round trip through the ring; `more` is MSG_MORE when the
 * caller's real call (sendfile, splice) follows at once, so that the kernel does not push the
 * queued bytes out in a segment of their own. */
static void drain_until(struct mpr_stream *s, int more, int64_t until) {
    send_pend_now(s, more);
    while ((s->pend_len || s->inflight) && !s->wr_err && !mps_past(until)) {
        push_out(s);
        if (!s->pend_len && !s->inflight) break;
        mps_block_on(s, until);
    }
}

/* ---- reading ----------------------------------------------------------------------------- */

/* Note buffer id for the owner to give back (s->mu held).  false: no memory. */
static bool rel_push(struct mpr_stream *s, unsigned id) {
    if (s->nrel == s->rel_cap) {
        size_t cap = s->rel_cap ? s->rel_cap * 2 : 16;
        unsigned *n = realloc(s->rel, cap * sizeof *n);
        if (!n) return false;
        s->rel = n;
        s->rel_cap = cap;
    }
    s->rel[s->nrel++] = id;
    return true;
}

/* Copy up to len bytes of s's received data into the iovecs (peek: leave them).  s->mu held. */
size_t mps_take(struct mpr_stream *s, const struct iovec *iov, int iovcnt, bool peek) {
    size_t done = 0, bi = 0, boff = s->rx_n ? s->rx[s->rx_head].off : 0;
    for (int v = 0; v < iovcnt && bi < s->rx_n; v++) {
        size_t vo = 0;
        while (vo < iov[v].iov_len && bi < s->rx_n) {
            struct rxb *b = &s->rx[(s->rx_head + bi) % s->rx_cap];
            size_t avail = b->len - boff, k = iov[v].iov_len - vo;
            if (k > avail) k = avail;
            memcpy((char *)iov[v].iov_base + vo, b->p + boff, k);
            vo += k;
            done += k;
            boff += k;
            if (boff == b->len) {
                bi++;
                boff = bi < s->rx_n ? s->rx[(s->rx_head + bi) % s->rx_cap].off : 0;
            }
        }
    }
    if (peek) return done;
    /* consume */
    bool owner = is_owner(s);
    for (size_t i = 0; i < bi; i++) {
        struct rxb *b = &s->rx[s->rx_head];
        if (owner) {
            bool was = mpr_t.busy;
            mpr_t.busy = true;
            mp_buffer_release(s->own->ch, b->id);
            mpr_t.busy = was;
        } else if (rel_push(s, b->id)) {
            mps_mark_dirty(s);
        } /* else out of memory: that one buffer is not given back to the channel */
        s->rx_head = (s->rx_head + 1) % s->rx_cap;
        s->rx_n--;
    }
    if (s->rx_n) s->rx[s->rx_head].off = (uint32_t)boff;
    s->rx_bytes -= done;
    return done;
}

ssize_t mps_recv(struct mpr_stream *s, const struct iovec *iov, int iovcnt, int flags) {
    size_t want = 0;
    for (int i = 0; i < iovcnt; i++) want += iov[i].iov_len;
    pthread_mutex_lock(&s->mu);
    bool nb = s->nonblock || (flags & MSG_DONTWAIT);
    int64_t until = nb ? 0 : mps_deadline(s->rcvtimeo);
    ssize_t r;
    size_t got = 0;
    struct iovec local[64];
    for (;;) {
        if (s->rx_bytes) {
            if (got == 0) {
                got = mps_take(s, iov, iovcnt, flags & MSG_PEEK);
            } else { /* MSG_WAITALL continuing: the iovecs past what was filled */
                int k = 0;
                size_t skip = got;
                for (int i = 0; i < iovcnt && k < 64; i++) {
                    if (skip >= iov[i].iov_len) {
                        skip -= iov[i].iov_len;
                        continue;
                    }
                    local[k].iov_base = (char *)iov[i].iov_base + skip;
                    local[k++].iov_len = iov[i].iov_len - skip;
                    skip = 0;
                }
                got += mps_take(s, local, k, false);
            }
            s->own->rx_served++;
            if (!(flags & MSG_WAITALL) || (flags & MSG_PEEK) || got >= want || nb) {
                r = (ssize_t)got;
                break;
            }
            continue;
        }
        if (got) { /* WAITALL: what came before EOF / an error */
            if (s->rx_eof || s->rx_err) {
                r = (ssize_t)got;
                break;
            }
        } else if (s->rx_err) {
            r = -s->rx_err;
            if (!(flags & MSG_PEEK)) {
                s->rx_err = 0;
                s->so_err = 0;
                s->rx_eof = true; /* then end of file, as after a reset */
            }
            break;
        } else if (s->rx_eof || want == 0) {
            r = 0;
            break;
        }
        if (nb && !got) {
            r = -EAGAIN;
            break;
        }
        if (mps_past(until)) { /* SO_RCVTIMEO: what came, or EAGAIN, as the kernel's */
            r = got ? (ssize_t)got : -EAGAIN;
            break;
        }
        drain_until(s, 0, until); /* a blocking reader may wait for the answer to what it wrote */
        mps_block_on(s, until);
    }
    pthread_mutex_unlock(&s->mu);
    if (r < 0) return fail((int)-r);
    return r;
}

/* ---- writing ----------------------------------------------------------------------------- */

/* s->pend can take k more bytes (s->mu held).  false: no memory. */
static bool pend_room(struct mpr_stream *s, size_t k) {
    if (s->pend_len + k <= s->pend_cap) return true;
    size_t cap = s->pend_cap ? s->pend_cap : 4096;
    while (cap < s->pend_len + k) cap *= 2;
    char *p = realloc(s->pend, cap);
    if (!p) return false;
    s->pend = p;
    s->pend_cap = cap;
    return true;
}

/* After k bytes were added to s->pend by a write of the application (s->mu held): they go to
 * the channel now when enough are pending, else at the owner's next wait. */
static void queued(struct mpr_stream *s) {
    s->own->tx_queued++;
    if (is_owner(s) && s->pend_len >= g_flush_at) {
        bool was = mpr_t.busy;
        mpr_t.busy = true;
        submit(s);
        mpr_t.busy = was;
    }
    mps_mark_dirty(s);
}

ssize_t mps_send(struct mpr_stream *s, const struct iovec *iov, int iovcnt, int flags) {
    size_t want = 0;
    for (int i = 0; i < iovcnt; i++) want += iov[i].iov_len;
    if (!want) return 0;
    pthread_mutex_lock(&s->mu);
    bool nb = s->nonblock || (flags & MSG_DONTWAIT);
    int64_t until = nb ? 0 : mps_deadline(s->sndtimeo);
    size_t done = 0;
    int err = 0;
    while (done < want) {
        if (s->wr_err || s->shut_wr) {
            err = s->shut_wr && !s->wr_err ? EPIPE : s->wr_err;
            if (s->wr_err == ECONNRESET) s->wr_err = EPIPE; /* reported once, as the kernel */
            s->so_err = 0;
            break;
        }
        size_t used = s->pend_len + s->inflight;
        size_t space = used < g_wbuf ? g_wbuf - used : 0;
        if (!space) {
            if (nb || mps_past(until)) { /* what fitted, or EAGAIN (also at SO_SNDTIMEO) */
                if (!done) err = EAGAIN;
                break;
            }
            if (is_owner(s)) {
                bool was = mpr_t.busy;
                mpr_t.busy = true;
                submit(s);
                mpr_t.busy = was;
            }
            mps_block_on(s, until);
            continue;
        }
        size_t k = want - done < space ? want - done : space;
        if (!pend_room(s, k)) {
            if (!done) err = ENOBUFS;
            break;
        }
        /* copy k bytes from the iovecs, starting at offset done */
        size_t skip = done, left = k;
        for (int i = 0; i < iovcnt && left; i++) {
            if (skip >= iov[i].iov_len) {
                skip -= iov[i].iov_len;
                continue;
            }
            size_t m = iov[i].iov_len - skip;
            if (m > left) m = left;
            memcpy(s->pend + s->pend_len, (const char *)iov[i].iov_base + skip, m);
            s->pend_len += m;
            left -= m;
            skip = 0;
        }
        done += k;
        queued(s);
    }
    /* A blocking socket's write returns when its bytes are in the socket, as the kernel's
     * does: nothing is left queued behind a thread that goes on to block elsewhere. */
    if (!nb && done) drain_until(s, 0, until);
    pthread_mutex_unlock(&s->mu);
    if (done) return (ssize_t)done;
    if (err == EPIPE && !(flags & MSG_NOSIGNAL)) pthread_kill(pthread_self(), SIGPIPE);
    return fail(err);
}

/* sendfile(2) from a file to a stream, through the write-behind queue: the bytes are read
 * from the file (pread at *off, which advances as sendfile's does; the file position is not
 * used) into the queue behind what was written before, and leave with it in the next batch.
 * Taken for a range of at most MEGAPIPE_STREAM_SENDFILE_COPY bytes (default 64 KiB, 0: never),
 * and for a larger one while the queue holds bytes (a chunk of that size: the real call would
 * first have to wait for them).  At most what the write-behind bound has room for: fewer bytes
 * than asked (sendfile may), EAGAIN with no room on a non-blocking socket; a blocking socket's
 * call returns when its bytes are in the socket, as a write's.  A small response is then one
 * pread instead of a real send of the queued bytes and the real sendfile, and its header and
 * body leave in one send.  false: not taken (no offset, a larger range with the queue empty:
 * the real, zero-copy call; no room on a blocking socket; a send error or shutdown pending; a
 * file pread cannot read: a socket, a pipe); the caller then drains the queue and makes the
 * real call, which reports sendfile's own errors.  *res: the result (-1: errno set). */
bool mps_sendfile(struct mpr_stream *s, int in, off_t *off, size_t n, ssize_t *res) {
    if (!off || n == 0 || !g_sendfile_copy || *off < 0) return false;
    pthread_mutex_lock(&s->mu);
    bool taken = false;
    size_t used = s->pend_len + s->inflight, room = used < g_wbuf ? g_wbuf - used : 0;
    size_t k = n < g_sendfile_copy ? n : g_sendfile_copy;
    if (k > room) k = room;
    if (s->wr_err || s->shut_wr || (n > g_sendfile_copy && !used)) {
        /* the real call */
    } else if (!k) {
        if (s->nonblock) { /* a full queue, as a full socket buffer */
            taken = true;
            *res = -1;
            errno = EAGAIN;
        }
    } else if (pend_room(s, k)) {
        ssize_t r = pread(in, s->pend + s->pend_len, k, *off);
        if (r >= 0) {
            taken = true;
            *res = r;
            if (r > 0) {
                s->pend_len += (size_t)r;
                *off += r;
                queued(s);
                if (!s->nonblock) drain_until(s, 0, mps_deadline(s->sndtimeo));
            }
        }
    }
    pthread_mutex_unlock(&s->mu);
    return taken;
}

/* Before a real call that must follow every queued byte (sendfile, splice into the stream,
 * MSG_OOB, ancillary data): the queue is emptied.  A blocking socket waits for it (up to
 * SO_SNDTIMEO); a non-blocking one tries once (a real send when nothing is in flight; what is
 * left goes to the channel) and does not wait: false, and the caller fails with EAGAIN, as a
 * socket whose buffer is full (a blocked peer must not stall the thread and its other
 * connections; dontwait: the call's MSG_DONTWAIT or SPLICE_F_NONBLOCK).  `more`: as
 * drain_until's.  s->mu not held. */
bool mps_flush_before(struct mpr_stream *s, int more, bool dontwait) {
    pthread_mutex_lock(&s->mu);
    bool nb = s->nonblock || dontwait;
    if (!nb) {
        drain_until(s, more, mps_deadline(s->sndtimeo));
    } else {
        send_pend_now(s, more);
        if (s->pend_len && !s->wr_err) push_out(s); /* the rest goes by the channel */
    }
    bool empty = s->wr_err || (!s->pend_len && !s->inflight);
    pthread_mutex_unlock(&s->mu);
    return empty;
}

/* ---- what poll() and select() need (stream_poll.c) ------------------------------------ */

int mpr_stream_poll(int fd, short events, short *revents, bool *owner) {
    struct mpr_stream *s = adopted(fd);
    if (!s) return 0;
    pthread_mutex_lock(&s->mu);
    uint32_t r = ready_bits(s);
    pthread_mutex_unlock(&s->mu);
    short out = 0;
    if ((r & EPOLLIN) && (events & (POLLIN | POLLRDNORM))) out |= events & (POLLIN | POLLRDNORM);
    if ((r & EPOLLOUT) && (events & (POLLOUT | POLLWRNORM))) out |= events & (POLLOUT | POLLWRNORM);
    if ((r & EPOLLRDHUP) && (events & POLLRDHUP)) out |= POLLRDHUP;
    if (r & EPOLLERR) out |= POLLERR;
    if (r & EPOLLHUP) out |= POLLHUP;
    *revents = out;
    *owner = is_owner(s);
    return 1;
}

bool mpr_stream_pump(int timeout_ms) {
    if (!mpr_t.sc) return false;
    bool was = mpr_t.busy;
    mpr_t.busy = true;
    service_dirty(mpr_t.sc);
    pump(mpr_t.sc, timeout_ms);
    mpr_t.busy = was;
    return true;
}

/* ---- close, threads, fork, statistics ---------------------------------------------------- */

int mpr_stream_close(int fd, int *res) {
    struct mpr_stream *s = st_of(fd);
    if (!s || mpr_t.busy) return 0;
    mpr_lock();
    if (g_st[fd] != s) {
        mpr_unlock();
        return 0;
    }
    g_st[fd] = NULL;
    mpr_unlock();
    mpr_fd_closing(fd); /* the emulation's own bookkeeping of the number */
    if (!s->own) { /* a candidate: a plain fd */
        stream_free(s);
        *res = mpr_real.close(fd);
        return 1;
    }
    /* The number stays open (the channel holds it) until every byte queued is sent. */
    pthread_mutex_lock(&s->mu);
    s->closing = true;
    s->epfd = -1;
    if (s->linger == 0) { /* SO_LINGER 0: queued bytes are dropped, the kernel resets */
        free(s->pend);
        s->pend = NULL;
        s->pend_len = s->pend_cap = 0;
    }
    struct mpr_schan *c = s->own;
    pthread_mutex_lock(&c->mu);
    c->closing++;
    pthread_mutex_unlock(&c->mu);
    if (s->linger > 0 && !s->nonblock) { /* SO_LINGER n: wait up to n seconds for the bytes */
        int64_t until = now_ns() + (int64_t)s->linger * 1000000000;
        while ((s->pend_len || s->inflight) && !s->wr_err && now_ns() < until) {
            push_out(s);
            mps_block_on(s, until);
        }
    }
    if (is_owner(s)) {
        /* Bytes still to send go to the kernel now (close flushes), and when they are in the
         * socket the channel lets go of the connection and closes it (the FIN), without
         * waiting for the thread's next epoll wait: a few system calls, only for a close
         * with bytes still queued.  What the socket cannot take yet is sent on at the
         * thread's following waits (the number stays open until then). */
        bool was = mpr_t.busy;
        mpr_t.busy = true;
        bool work = (s->pend_len || s->inflight) && s->linger != 0 && !s->wr_err;
        s->hold++;
        submit(s);
        for (int i = 0; work && i < 4 && s->inflight && !s->wr_err; i++) {
            pthread_mutex_unlock(&s->mu);
            mps_kick(c);
            pthread_mutex_lock(&s->mu);
        }
        bool sent = s->closed_sent; /* (a completion above may have finished it) */
        if (!sent) mps_service(s);
        pthread_mutex_unlock(&s->mu);
        /* the cancel of its receive, then the close itself */
        for (int i = 0; work && i < 2; i++) mps_kick(c);
        if (!--s->hold && s->dead) stream_free(s);
        mpr_t.busy = was;
        *res = 0;
        return 1;
    }
    mps_mark_dirty(s);
    pthread_mutex_unlock(&s->mu);
    *res = 0;
    return 1;
}

/* The number fd is about to be closed by another call (dup2/dup3 over it, close_range,
 * closefrom): every byte queued is sent first (a queued write names the number, which must
 * not name another file when it runs), then the channel lets go without closing it. */
void mpr_stream_detach(int fd) {
    struct mpr_stream *s = st_of(fd);
    if (!s || mpr_t.busy) return;
    mpr_lock();
    if (g_st[fd] != s) {
        mpr_unlock();
        return;
    }
    g_st[fd] = NULL;
    mpr_unlock();
    if (!s->own) {
        stream_free(s);
        return;
    }
    pthread_mutex_lock(&s->mu);
    drain_until(s, 0, 0);
    s->closing = s->detach = true;
    s->epfd = -1;
    struct mpr_schan *c = s->own;
    pthread_mutex_lock(&c->mu);
    c->closing++;
    pthread_mutex_unlock(&c->mu);
    if (is_owner(s)) {
        bool was = mpr_t.busy;
        mpr_t.busy = true;
        mps_service(s);
        mpr_t.busy = was;
    } else {
        mps_mark_dirty(s);
        while (!s->closed_sent) mps_block_on(s, 0); /* the owner has unregistered it */
    }
    pthread_mutex_unlock(&s->mu);
}

/* Send what c's streams queued, for at most 2 s (a peer that never reads must not hold the
 * thread forever); with closing, also until the closes c started are done. */
static void flush_own(struct mpr_schan *c, bool closing) {
    int64_t until = now_ns() + 2000000000LL;
    bool was = mpr_t.busy;
    mpr_t.busy = true;
    for (;;) {
        service_dirty(c);
        bool left = false;
        for (size_t fd = 0; fd < g_cap && !left; fd++) {
            struct mpr_stream *s = g_st[fd];
            if (s && s->own == c && (s->pend_len || s->inflight) && !s->wr_err) left = true;
        }
        if ((!left && !(closing && c->closing)) || now_ns() >= until) break;
        pump(c, 50);
    }
    mpr_t.busy = was;
}

/* Streams of ch are flushed before it goes (flush_own). */
void mpr_stream_chan_done(mp_channel *ch, bool destroying) {
    struct mpr_schan *c = mpr_t.sc;
    if (!c || c->ch != ch) return;
    flush_own(c, true);
    if (!destroying) return;
    /* The channel goes: its streams become plain fds (what they had received and nobody read
     * goes with the channel's buffers). */
    mpr_lock();
    for (size_t fd = 0; fd < g_cap; fd++) {
        struct mpr_stream *s = g_st[fd];
        if (s && s->own == c) {
            g_st[fd] = NULL;
            s->gen = 0;
        }
    }
    mpr_unlock();
    mpr_t.sc = NULL;
    c->ch = NULL;
}

void mpr_stream_stats(mp_channel *ch, char *buf, size_t len) {
    buf[0] = '\0';
    if (!mpr_streams) return;
    pthread_mutex_lock(&g_sclock);
    for (struct mpr_schan *c = g_schans; c; c = c->next)
        if (c->ch == ch)
            snprintf(buf, len, "streams %llu (reads served %llu, writes queued %llu, sends %llu)",
                     (unsigned long long)c->adopted, (unsigned long long)c->rx_served,
                     (unsigned long long)c->tx_queued, (unsigned long long)c->tx_submits);
    pthread_mutex_unlock(&g_sclock);
}

void mpr_stream_fork_prepare(void) {
    if (!mpr_streams || !mpr_t.sc || !mpr_t.ch) return;
    /* What this thread's streams queued reaches the kernel before the child exists. */
    flush_own(mpr_t.sc, false);
}

/* The image ends (exec, exit): this thread's streams are flushed through its channel (up to
 * 2 s, as for fork).  Another thread's stream with bytes still queued and none in flight in its
 * owner's ring sends them with the real send (waiting for room, within the same 2 s); bytes
 * already in flight in another thread's ring are that ring's until exec or exit tears it down
 * (docs/megapipe-run.md). */
void mpr_stream_last_flush(void) {
    if (!mpr_streams || !atomic_load(&g_adopted)) return; /* (no stream: no fd table scan) */
    if (getpid() != g_pid) return;                          /* a vfork child: the parent's memory */
    bool was = mpr_t.busy;
    mpr_t.busy = true;
    if (mpr_t.sc && mpr_t.ch) flush_own(mpr_t.sc, true); /* also the closes it started */
    int64_t until = now_ns() + 2000000000LL;
    mpr_lock(); /* a stream in g_st is not freed while it is held */
    for (size_t fd = 0; fd < g_cap; fd++) {
        struct mpr_stream *s = g_st[fd];
        if (!s || !s->own || s->own == mpr_t.sc) continue;
        pthread_mutex_lock(&s->mu);
        while (s->pend_len && !s->inflight && !s->wr_err && now_ns() < until) {
            size_t before = s->pend_len;
            send_pend_now(s, 0);
            if (s->pend_len == before && !s->wr_err) { /* the socket is full: wait for room */
                pthread_mutex_unlock(&s->mu);
                struct pollfd p = {s->fd, POLLOUT, 0};
                mpr_real.poll(&p, 1, 50);
                pthread_mutex_lock(&s->mu);
            }
        }
        pthread_mutex_unlock(&s->mu);
    }
    mpr_unlock();
    mpr_t.busy = was;
}

void mpr_stream_fork_child(void) {
    if (!mpr_streams) return;
    /* The child's streams are plain fds: the channels are the parent's. */
    g_pid = getpid();
    atomic_store(&g_adopted, false);
    for (size_t fd = 0; fd < g_cap; fd++) g_st[fd] = NULL;
    g_schans = NULL;
    mpr_t.sc = NULL;
    pthread_mutex_init(&g_sclock, NULL);
}
