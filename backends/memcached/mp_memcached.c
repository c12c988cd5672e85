/*
 * mp_memcached.c — memcached's worker threads on MegaPipe channels (see mp_memcached.h for
 * the hooks and the two kinds of connection).  This file owns: the per-worker channel and
 * event loop, the partitioned TCP listeners, the per-connection read queue (channel buffers
 * or the epoll engine's read buffer) behind conn->read, the writes in flight behind
 * conn->sendmsg (copies of small responses, or memcached's own buffers), and when the state
 * machine runs again.
 *
 * The state machine is memcached's own.  A state that issues I/O is split only where a
 * completion must come back before it can go on:
 *   - reading: conn->read copies what the channel already received; with nothing queued it
 *     says EAGAIN and the machine parks (conn_waiting / conn_nread / conn_swallow) exactly as it
 *     does on a non-blocking socket.  The next READ (or DISCONNECT) event runs it again.
 *   - writing: transmit() hands the iovecs to conn->sendmsg.  A small response is copied and
 *     written from the copy (send_copy): sendmsg says it was sent, and nothing is split.  A
 *     larger one is issued as one mp_writev() from memcached's buffers, and sendmsg says
 *     EAGAIN: the machine parks in conn_mwrite.  The WRITE event finishes the responses it
 *     carried (_transmit_post: items released only now, after the kernel copied them) and runs
 *     the machine, which transmits what is left or goes on to the next command.
 * Nothing runs a connection while its write is in flight, so memcached never rebuilds or frees
 * the responses the kernel is still reading.
 */
#include "memcached.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sysexits.h>
#include <unistd.h>

#include <megapipe.h>

#define MPC_EVENTS 64        /* events taken from the channel per dispatch */
#define MPC_MAX_LISTENERS 64 /* TCP listening addresses (-l a,b,... resolving to several) */
#define MPC_STAGE_SIZE 16384 /* epoll engine: per-connection mp_read() buffer */
#define MPC_FREE_MAX 1024    /* ended connections' state kept per worker for new ones */
#define MPC_COPY_MAX 2048    /* responses up to this size are copied and sent behind memcached */
#define MPC_COPY_FREE_MAX 256 /* copy blocks kept per worker for reuse */
#define MPC_COPY_PER_CONN 8  /* copies one connection may have in the kernel; then memcached
                                waits for its writes as on a full socket */

enum mpc_kind { MPC_CONN, MPC_LISTENER, MPC_NOTIFY };

/* What an event's cookie points to: the kind comes first in every one of them. */
struct mpc_obj {
    enum mpc_kind kind;
};

struct mpc_buf {
    char *data;
    uint32_t len, off;
    int id; /* channel buffer id; -1: the connection's own stage buffer */
};

struct mpc_worker;

/* A small response copied out of memcached's buffers, in the kernel until its WRITE event. */
struct mpc_copy {
    struct mpc_copy *next;
    char data[MPC_COPY_MAX];
};

struct mpc_conn {
    struct mpc_obj obj;
    conn *c; /* NULL once memcached closed the connection (the handle is ending) */
    struct mpc_worker *w;
    mp_handle *h;
    int fd;
    bool poll;       /* readiness kind (UDP, TLS) */
    bool want_read;  /* the machine waits for input (EV_READ) */
    bool want_write; /* ... for its write to complete, or to be run again (EV_WRITE) */
    bool write_busy; /* an mp_writev() is in flight */
    bool read_busy;  /* epoll engine: an mp_read() into stage is in flight */
    bool eof;
    bool queued;     /* on the worker's run list */
    bool ended;      /* MP_EV_CLOSED seen while queued: free when taken off the list */
    bool budget_saved;
    int budget;      /* requests left to this run when it parked for its write */
    int rerr, werr;  /* receive / send error (errno) */
    uint32_t events; /* readiness kind: the interest the channel has now */
    struct mpc_buf *q;
    unsigned qhead, qlen, qcap;
    char *stage;
    struct mpc_conn *next_run;
    /* copied responses in the kernel, in issue order (their WRITE events come in this order,
     * before that of a write from memcached's own buffers, which only ever follows them) */
    struct mpc_copy *copy_head, *copy_tail;
    unsigned ncopies;
    bool close_pending; /* memcached closed it: unregistered once the copies are sent */
};

struct mpc_listener {
    struct mpc_obj obj;
    uint64_t conntag;
    enum protocol bproto;
    mp_handle *h;
};

struct mpc_worker {
    LIBEVENT_THREAD *me;
    mp_channel *ch;
    int idx;
    bool buffered; /* buffered reads (io_uring); else mp_read() into each connection's stage */
    bool adopted;  /* this worker's partitions are registered */
    struct mpc_obj notify;
    struct mpc_listener lst[MPC_MAX_LISTENERS];
    struct mpc_conn *runq;
    /* ended connections' state (with its read queue and stage), reused by new connections:
     * no allocation per connection once the worker has seen its peak */
    struct mpc_conn *free_conns;
    unsigned nfree;
    struct mpc_copy *free_copies;
    unsigned ncopies_free;
    /* while conn_new() runs for the accepted peer_fd (else -1): the ACCEPT event's peer
     * address, NULL when the channel has none (mpc_peer_addr) */
    const struct sockaddr *peer;
    socklen_t peerlen;
    int peer_fd;
};

/* TCP listeners: lfd[i][k] is worker k's socket for listening address i. */
static struct {
    int *fds;
    uint64_t conntag;
    enum protocol bproto;
} listeners[MPC_MAX_LISTENERS];
static int nlisteners;

static pthread_mutex_t mpc_lock = PTHREAD_MUTEX_INITIALIZER;
static struct mpc_worker **workers; /* settings.num_threads of them, in start order */
static int nworkers;
static bool listeners_ready;

static __thread struct mpc_worker *self;

static bool mpc_enabled(void) {
    static int on = -1;
    if (on < 0) {
        const char *e = getenv("MEMCACHED_MEGAPIPE");
        on = !(e && strcmp(e, "0") == 0);
    }
    return on;
}

/* ---------------------------------------------------------------------------------------- */
/* Listeners                                                                                 */
/* ---------------------------------------------------------------------------------------- */

static bool partitioned(enum network_transport transport, bool ssl_enabled) {
    /* TLS handshakes run in the dispatcher (SSL_accept) and -N picks workers by NAPI id:
     * both stay on memcached's accept path. */
    return mpc_enabled() && IS_TCP(transport) && !ssl_enabled && settings.num_napi_ids == 0;
}

void mpc_listener_prepare(int sfd, enum network_transport transport, bool ssl_enabled) {
    int one = 1;
    if (partitioned(transport, ssl_enabled) &&
        setsockopt(sfd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0)
        perror("setsockopt(SO_REUSEPORT)");
}

/* One more listening socket in sfd's SO_REUSEPORT group, with sfd's options.
 * CORE-GAP: mp_register() on a bound, non-listening socket makes the partition sockets
 * itself but copies none of the template's options (TCP_NODELAY, SO_KEEPALIVE, SO_LINGER),
 * so memcached makes and adopts its own; proposed: partitions inherit a documented list of
 * the template's SOL_SOCKET/IPPROTO_TCP options (or mp_listen_socket() takes them). */
static int sibling_socket(int sfd) {
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(sfd, (struct sockaddr *)&ss, &sl) != 0) return -1;
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    static const struct {
        int level, name;
    } opts[] = {{SOL_SOCKET, SO_REUSEADDR}, {SOL_SOCKET, SO_REUSEPORT},
                {SOL_SOCKET, SO_KEEPALIVE}, {SOL_SOCKET, SO_LINGER},
                {IPPROTO_TCP, TCP_NODELAY}, {IPPROTO_IPV6, IPV6_V6ONLY}};
    for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++) {
        char v[64];
        socklen_t vl = sizeof v;
        if (opts[i].level == IPPROTO_IPV6 && ss.ss_family != AF_INET6) continue;
        if (getsockopt(sfd, opts[i].level, opts[i].name, v, &vl) != 0 ||
            setsockopt(fd, opts[i].level, opts[i].name, v, vl) != 0)
            goto fail;
    }
    if (bind(fd, (struct sockaddr *)&ss, sl) != 0 || listen(fd, settings.backlog) != 0) goto fail;
    return fd;
fail:;
    int e = errno;
    close(fd);
    errno = e;
    return -1;
}

void mpc_listener_add(conn *lc, bool ssl_enabled) {
    if (!partitioned(lc->transport, ssl_enabled)) return;
    int sfd = lc->sfd;
    event_del(&lc->event); /* the workers accept, not the dispatcher */
    if (nlisteners == MPC_MAX_LISTENERS) {
        fprintf(stderr, "megapipe: more than %d TCP listening addresses\n", MPC_MAX_LISTENERS);
        exit(EX_OSERR);
    }
    int n = settings.num_threads;
    int *fds = calloc(n, sizeof *fds);
    if (!fds) {
        fprintf(stderr, "megapipe: out of memory\n");
        exit(EXIT_FAILURE);
    }
    fds[0] = sfd; /* memcached's own socket is worker 0's partition */
    for (int k = 1; k < n; k++) {
        fds[k] = sibling_socket(sfd);
        if (fds[k] < 0) {
            perror("megapipe: listening socket for a worker partition");
            exit(EX_OSERR);
        }
    }
    listeners[nlisteners].fds = fds;
    listeners[nlisteners].conntag = lc->tag;
    listeners[nlisteners].bproto = lc->protocol;
    nlisteners++;
}

void mpc_listeners_ready(void) {
    if (!mpc_enabled()) return;
    pthread_mutex_lock(&mpc_lock);
    listeners_ready = true;
    for (int i = 0; i < nworkers; i++) mp_wake(workers[i]->ch);
    pthread_mutex_unlock(&mpc_lock);
    if (settings.verbose > 0)
        fprintf(stderr, "megapipe: %d worker channel(s), %d partitioned TCP listener(s)%s%s\n",
                settings.num_threads, nlisteners,
                settings.udpport ? "; UDP on the readiness adapter" : "",
#ifdef TLS
                settings.ssl_enabled ? "; TLS accepted by the dispatcher" : ""
#else
                ""
#endif
        );
}

/* This worker's partition of every TCP listener: adopted (the socket listens, has
 * SO_REUSEPORT), steered to one CPU the worker may run on, accepting until the end. */
static void adopt_partitions(struct mpc_worker *w) {
    cpu_set_t allowed, mask;
    CPU_ZERO(&mask);
    if (sched_getaffinity(0, sizeof allowed, &allowed) == 0 && CPU_COUNT(&allowed) > 0) {
        int want = w->idx % CPU_COUNT(&allowed), seen = 0;
        for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
            if (CPU_ISSET(cpu, &allowed) && seen++ == want) {
                CPU_SET(cpu, &mask);
                break;
            }
    } else {
        CPU_SET(0, &mask);
    }
    for (int i = 0; i < nlisteners; i++) {
        struct mpc_listener *l = &w->lst[i];
        l->obj.kind = MPC_LISTENER;
        l->conntag = listeners[i].conntag;
        l->bproto = listeners[i].bproto;
        l->h = mp_register(w->ch, listeners[i].fds[w->idx], l, &mask);
        /* MP_ACCEPT_ADDR: the client's address comes with the ACCEPT event (conn_new()'s
         * getpeername() without the system call: mpc_peer_addr()); _KNOWN: where the channel
         * would have to ask the kernel, memcached asks when it needs it. */
        int r = l->h ? mp_accept(l->h, 0, MP_ACCEPT_ADDR | MP_ACCEPT_ADDR_KNOWN) : -errno;
        if (r < 0) {
            fprintf(stderr, "megapipe: worker %d cannot accept on its partition: %s\n", w->idx,
                    strerror(-r));
            exit(EX_OSERR);
        }
    }
    w->adopted = true;
}

/* ---------------------------------------------------------------------------------------- */
/* Connections                                                                               */
/* ---------------------------------------------------------------------------------------- */

static uint32_t poll_events(int flags) {
    return (flags & EV_READ ? EPOLLIN : 0) | (flags & EV_WRITE ? EPOLLOUT : 0);
}

static bool has_input(const struct mpc_conn *m) {
    return m->qhead < m->qlen || m->eof || m->rerr;
}

/* Can the state machine make progress now, and is it memcached's to run?  (conn_io_queue: the
 * connection is with a side thread; conn_watch: with the logger.) */
static bool runnable(const struct mpc_conn *m) {
    if (!m->c || m->poll || m->write_busy) return false;
    enum conn_states s = m->c->state;
    if (s == conn_io_queue || s == conn_watch || s == conn_closed) return false;
    return m->want_write || (m->want_read && has_input(m));
}

static void run_later(struct mpc_conn *m) {
    if (m->queued) return;
    m->queued = true;
    m->next_run = m->w->runq;
    m->w->runq = m;
}

static void drive(struct mpc_conn *m) {
    drive_machine(m->c);
    /* Handed to the logger's watcher or the LRU crawler's metadump, which write to the socket
     * themselves from their own threads: copied responses go to the kernel now, ahead of them
     * (a send that finds the socket buffer full would still wait, as it would behind a
     * blocked socket write of memcached's own). */
    if (m->copy_head && m->c && m->c->state == conn_watch) mp_flush(m->w->ch);
    if (runnable(m)) run_later(m);
}

/* Keep one read request outstanding.  Buffered: re-issued at every READ event (each request
 * yields one event; the channel stashes what arrives meanwhile, and pauses the receive at
 * MP_BUF_PER_CONN buffers held).  Stage (epoll engine): re-issued once memcached has copied
 * the stage buffer out, so the buffer is never written while it still holds input. */
static int read_more(struct mpc_conn *m) {
    if (m->read_busy || m->eof || m->rerr) return 0;
    if (!m->w->buffered && m->qhead < m->qlen) return 0;
    int r = m->w->buffered ? mp_read_buffered(m->h) : mp_read(m->h, m->stage, MPC_STAGE_SIZE);
    if (r == 0) m->read_busy = true;
    return r;
}

static ssize_t mpc_read(conn *c, void *buf, size_t count) {
    struct mpc_conn *m = c->mpc;
    /* A side thread that owns the connection for a while (the LRU crawler's metadump) only
     * reads to notice the client going away: a non-blocking recv() on the socket, as on a
     * socket memcached accepted itself; the channel's queue is the worker's alone. */
    if (m->w != self) return recv(m->fd, buf, count, MSG_DONTWAIT);
    size_t got = 0;
    while (got < count && m->qhead < m->qlen) {
        struct mpc_buf *b = &m->q[m->qhead];
        size_t n = b->len - b->off;
        if (n > count - got) n = count - got;
        memcpy((char *)buf + got, b->data + b->off, n);
        b->off += n;
        got += n;
        if (b->off == b->len) {
            if (b->id >= 0) mp_buffer_release(m->w->ch, (unsigned)b->id);
            m->qhead++;
        }
    }
    if (m->qhead == m->qlen) {
        m->qhead = m->qlen = 0;
        int r = read_more(m);
        if (r < 0) m->rerr = -r;
    }
    if (got) return (ssize_t)got;
    if (m->rerr) {
        errno = m->rerr;
        return -1;
    }
    if (m->eof) return 0;
    errno = EAGAIN;
    return -1;
}

static struct mpc_copy *copy_get(struct mpc_worker *w) {
    struct mpc_copy *b = w->free_copies;
    if (!b) return malloc(sizeof *b);
    w->free_copies = b->next;
    w->ncopies_free--;
    return b;
}

static void copy_put(struct mpc_worker *w, struct mpc_copy *b) {
    if (w->ncopies_free < MPC_COPY_FREE_MAX) {
        b->next = w->free_copies;
        w->free_copies = b;
        w->ncopies_free++;
        return;
    }
    free(b);
}

/* A small response is copied and written behind memcached's back: transmit() sees it sent, as
 * on a socket, and the machine goes on at once, while the connection's state, its responses and
 * items are still in the cache; the WRITE event only gives the copy back.  (Written from
 * memcached's own buffers, the machine waits in conn_mwrite for the event, which comes a batch
 * later: with 1,024 connections everything it touches then is cold again.)  Returns the bytes
 * taken, 0 when the response is not copied, or -errno. */
static ssize_t send_copy(struct mpc_conn *m, const struct msghdr *msg) {
    /* A client that sends and does not read fills the socket: from here on the machine waits
     * for the write (behind the copies), so the copies cannot grow without bound. */
    if (m->ncopies >= MPC_COPY_PER_CONN) return 0;
    size_t total = 0;
    for (size_t i = 0; i < msg->msg_iovlen; i++) {
        total += msg->msg_iov[i].iov_len;
        if (total > MPC_COPY_MAX) return 0;
    }
    if (!total) return 0;
    struct mpc_copy *b = copy_get(m->w);
    if (!b) return 0;
    char *p = b->data;
    for (size_t i = 0; i < msg->msg_iovlen; i++) {
        memcpy(p, msg->msg_iov[i].iov_base, msg->msg_iov[i].iov_len);
        p += msg->msg_iov[i].iov_len;
    }
    int r = mp_write(m->h, b->data, total);
    if (r < 0) {
        copy_put(m->w, b);
        return r;
    }
    b->next = NULL;
    if (m->copy_tail) m->copy_tail->next = b;
    else m->copy_head = b;
    m->copy_tail = b;
    m->ncopies++;
    return (ssize_t)total;
}

static ssize_t mpc_sendmsg(conn *c, struct msghdr *msg, int flags) {
    (void)flags;
    struct mpc_conn *m = c->mpc;
    if (m->werr) {
        errno = m->werr;
        return -1;
    }
    if (!m->write_busy) {
        ssize_t n = send_copy(m, msg);
        if (n < 0) {
            errno = (int)-n;
            return -1;
        }
        if (n > 0) return n;
        int r = mp_writev(m->h, msg->msg_iov, (int)msg->msg_iovlen);
        if (r < 0) {
            errno = -r;
            return -1;
        }
        m->write_busy = true;
    }
    /* "Would block": transmit() asks for EV_WRITE and the machine parks in conn_mwrite until
     * the WRITE event. */
    errno = EAGAIN;
    return -1;
}

/* conn->write: used only by side threads (the logger's watchers, the LRU crawler), which
 * poll() the socket and expect a non-blocking write.  Sockets the channel accepted are
 * blocking (io_uring waits for them), so the write is made non-blocking per call. */
static ssize_t mpc_write(conn *c, void *buf, size_t count) {
    return send(c->sfd, buf, count, MSG_DONTWAIT | MSG_NOSIGNAL);
}

/* A connection's state: a reused one (its read queue's and stage's memory kept) or a new one. */
static struct mpc_conn *conn_state_get(struct mpc_worker *w) {
    struct mpc_conn *m = w->free_conns;
    if (!m) return calloc(1, sizeof *m);
    w->free_conns = m->next_run;
    w->nfree--;
    struct mpc_buf *q = m->q;
    unsigned qcap = m->qcap;
    char *stage = m->stage;
    memset(m, 0, sizeof *m);
    m->q = q;
    m->qcap = qcap;
    m->stage = stage;
    return m;
}

static void conn_state_put(struct mpc_worker *w, struct mpc_conn *m) {
    if (w->nfree < MPC_FREE_MAX) {
        m->next_run = w->free_conns;
        w->free_conns = m;
        w->nfree++;
        return;
    }
    free(m->q);
    free(m->stage);
    free(m);
}

int mpc_conn_attach(conn *c) {
    struct mpc_worker *w = self;
    c->mpc = NULL;
    if (!w) return 0;
    struct mpc_conn *m = conn_state_get(w);
    if (!m) return -1;
    m->obj.kind = MPC_CONN;
    m->c = c;
    m->w = w;
    m->fd = c->sfd;
    m->poll = IS_UDP(c->transport);
#ifdef TLS
    m->poll = m->poll || c->ssl_enabled;
#endif
    if (m->poll) {
        m->events = poll_events(c->ev_flags);
        m->h = mp_poll_add(w->ch, c->sfd, m->events, 0, m);
        if (!m->h) goto fail;
    } else {
        m->h = mp_register(w->ch, c->sfd, m, NULL);
        if (!m->h) goto fail;
        int r = w->buffered ? read_more(m) : -ENOTSUP;
        if (r == -ENOTSUP) {
            w->buffered = false;
            if (!m->stage) m->stage = malloc(MPC_STAGE_SIZE);
            r = m->stage ? read_more(m) : -ENOMEM;
        }
        if (r < 0) {
            mp_unregister(m->h); /* m is freed at its CLOSED event */
            m->c = NULL;
            m->fd = -1; /* conn_new()'s caller closes it */
            errno = -r;
            perror("megapipe: reading from a new connection");
            return -1;
        }
        c->read = mpc_read;
        c->sendmsg = mpc_sendmsg;
        c->write = mpc_write;
        m->want_read = (c->ev_flags & EV_READ) != 0;
    }
    c->mpc = m;
    return 1;
fail:
    perror("megapipe: registering a connection");
    conn_state_put(w, m);
    return -1;
}

int mpc_reqs_budget(conn *c) {
    struct mpc_conn *m = c->mpc;
    if (m && m->budget_saved) {
        m->budget_saved = false;
        return m->budget;
    }
    return settings.reqs_per_event;
}

void mpc_save_budget(conn *c, int nreqs) {
    struct mpc_conn *m = c->mpc;
    if (m && m->write_busy) {
        m->budget_saved = true;
        m->budget = nreqs;
    }
}

bool mpc_update_event(conn *c, int new_flags) {
    struct mpc_conn *m = c->mpc;
    c->ev_flags = (short)new_flags;
    if (m->poll) {
        uint32_t ev = poll_events(new_flags);
        if (ev != m->events) {
            if (mp_poll_mod(m->h, ev, 0) < 0) return false;
            m->events = ev;
        }
        return true;
    }
    m->want_read = (new_flags & EV_READ) != 0;
    m->want_write = (new_flags & EV_WRITE) != 0;
    /* Run again without an event when one will not come: input already queued, or memcached
     * yielding (EV_WRITE with no write in flight: "call me back", reqs_per_event).  Whether
     * it may run is decided when the run list is taken, not now: conn_worker_readd() (a
     * connection back from the logger, the LRU crawler or extstore) asks for EV_READ first and
     * sets the state it resumes in after; input that arrived meanwhile must not be left
     * waiting for an event that already came. */
    if (!m->write_busy && (m->want_write || (m->want_read && has_input(m)))) run_later(m);
    return true;
}

static void drop_queue(struct mpc_conn *m) {
    for (unsigned i = m->qhead; i < m->qlen; i++)
        if (m->q[i].id >= 0) mp_buffer_release(m->w->ch, (unsigned)m->q[i].id);
    m->qhead = m->qlen = 0;
}

void mpc_conn_close(conn *c) {
    struct mpc_conn *m = c->mpc;
    if (!m) {
        close(c->sfd);
        return;
    }
    c->mpc = NULL;
    m->c = NULL;
    if (m->w != self) {
        /* memcached's graceful stop (conn_close_all) from the main thread, workers hung: the
         * process is ending; the channel is not this thread's to touch. */
        close(m->fd);
        return;
    }
    drop_queue(m);
    if (m->poll) {
        mp_poll_del(m->h);
        close(m->fd); /* no event of the watch comes after mp_poll_del() */
        m->fd = -1;
    } else {
        /* The channel closes the fd when the kernel let go of the connection, queued with the
         * next batch (no close() of our own).  (lwsockets would not fit: memcached indexes
         * conns[] by fd and hands fds to side threads, the logger's watchers and the LRU
         * crawler, which write() to them.) */
        if (m->copy_head) {
            /* Copied responses are still to be sent (memcached took them as sent): the handle
             * ends when the last one has been (on_copy_sent), as close() after a send would
             * leave them to the kernel. */
            m->close_pending = true;
            return;
        }
        mp_unregister_close(m->h);
        m->fd = -1;
    }
}

static void queue_input(struct mpc_conn *m, const mp_event *ev) {
    if (m->qlen == m->qcap) {
        if (m->qhead > 0) {
            memmove(m->q, m->q + m->qhead, (m->qlen - m->qhead) * sizeof *m->q);
            m->qlen -= m->qhead;
            m->qhead = 0;
        } else {
            unsigned cap = m->qcap ? m->qcap * 2 : 8;
            struct mpc_buf *q = realloc(m->q, cap * sizeof *q);
            if (!q) {
                if (ev->flags & MP_EVF_BUFFER) mp_buffer_release(m->w->ch, ev->u.read.buf_id);
                m->rerr = ENOMEM;
                return;
            }
            m->q = q;
            m->qcap = cap;
        }
    }
    struct mpc_buf *b = &m->q[m->qlen++];
    b->data = ev->u.read.buf;
    b->len = (uint32_t)ev->u.read.len;
    b->off = 0;
    b->id = (ev->flags & MP_EVF_BUFFER) ? (int)ev->u.read.buf_id : -1;
}

bool mpc_peer_addr(conn *c, int sfd) {
    struct mpc_worker *w = self;
    if (!w || w->peer_fd < 0 || w->peer_fd != sfd) return false;
    if (!w->peer) {
        /* The channel did not ask the kernel for it (MP_ACCEPT_ADDR_KNOWN: a multishot accept
         * took this connection together with later ones).  memcached needs it for connection
         * events, asked for now if they are watched, and for "stats conns", asked for then
         * (mpc_peer_addr_fetch). */
        if (w->me->l && (w->me->l->eflags & LOG_CONNEVENTS)) return false;
        memset(&c->request_addr, 0, sizeof c->request_addr);
        c->request_addr_size = 0;
        return true;
    }
    socklen_t n = w->peerlen < c->request_addr_size ? w->peerlen : c->request_addr_size;
    memcpy(&c->request_addr, w->peer, n);
    c->request_addr_size = w->peerlen; /* as getpeername() reports it: the whole length */
    return true;
}

void mpc_peer_addr_fetch(conn *c) {
    if (!c->mpc || !IS_TCP(c->transport) || c->request_addr_size != 0) return;
    socklen_t n = sizeof c->request_addr;
    if (getpeername(c->sfd, (struct sockaddr *)&c->request_addr, &n) == 0)
        c->request_addr_size = n;
}

static void on_accept(struct mpc_worker *w, struct mpc_listener *l, const mp_event *ev) {
    int fd = (int)ev->result;
    if (fd < 0) {
        if (settings.verbose > 0)
            fprintf(stderr, "megapipe: accept: %s\n", strerror((int)-ev->result));
        return; /* the channel resumes accepting by itself */
    }
    if (settings.maxconns_fast && fd >= settings.maxconns - 1) {
        static const char str[] = "ERROR Too many open connections\r\n";
        STATS_LOCK();
        stats.rejected_conns++;
        STATS_UNLOCK();
        if (write(fd, str, sizeof str - 1) < 0) { /* the client may be gone already */
        }
        close(fd);
        return;
    }
    /* conn_new() takes the client's address (logs, "stats conns") from the event, through
     * mpc_peer_addr(), instead of asking getpeername(). */
    w->peer = ev->u.accept.addr;
    w->peerlen = ev->u.accept.addrlen;
    w->peer_fd = fd;
    conn *c = conn_new(fd, conn_new_cmd, EV_READ | EV_PERSIST, READ_BUFFER_CACHED,
                       tcp_transport, w->me->base, NULL, l->conntag, l->bproto);
    w->peer = NULL;
    w->peer_fd = -1;
    if (!c) {
        close(fd);
        return;
    }
    c->thread = w->me;
    conn_io_queue_setup(c);
}

/* The WRITE event of a copied response (the oldest in the kernel). */
static void on_copy_sent(struct mpc_conn *m, const mp_event *ev) {
    struct mpc_copy *b = m->copy_head;
    m->copy_head = b->next;
    if (!m->copy_head) m->copy_tail = NULL;
    m->ncopies--;
    copy_put(m->w, b);
    if (ev->result < 0 && !m->werr) m->werr = (int)-ev->result; /* the next transmit says so */
    if (m->close_pending && !m->copy_head) {
        m->close_pending = false;
        mp_unregister_close(m->h);
        m->fd = -1;
    }
}

static void on_conn_event(struct mpc_conn *m, const mp_event *ev) {
    if (ev->cmd == MP_EV_WRITE && m->copy_head) {
        on_copy_sent(m, ev);
        return;
    }
    if (settings.verbose > 2)
        fprintf(stderr, "megapipe: fd %d event %d result %zd flags %x state %d busy %d want %d/%d\n",
                m->fd, ev->cmd, ev->result, ev->flags, m->c ? (int)m->c->state : -1,
                m->write_busy, m->want_read, m->want_write);
    if (!m->c) { /* ended while this batch was handed out */
        if (ev->cmd == MP_EV_READ && (ev->flags & MP_EVF_BUFFER))
            mp_buffer_release(m->w->ch, ev->u.read.buf_id);
        return;
    }
    switch (ev->cmd) {
    case MP_EV_POLL:
        drive_machine(m->c);
        return;
    case MP_EV_READ: {
        m->read_busy = false;
        if (ev->result > 0) queue_input(m, ev);
        else m->rerr = ev->result < 0 ? (int)-ev->result : EIO;
        int r = read_more(m);
        if (r < 0) m->rerr = -r;
        break;
    }
    case MP_EV_DISCONNECT:
        if (ev->result == 0) m->eof = true;
        else m->rerr = (int)-ev->result;
        m->read_busy = false;
        break;
    case MP_EV_WRITE:
        m->write_busy = false;
        if (ev->result < 0) {
            m->werr = (int)-ev->result;
        } else {
            conn *c = m->c;
            pthread_mutex_lock(&c->thread->stats.mutex);
            c->thread->stats.bytes_written += ev->result;
            pthread_mutex_unlock(&c->thread->stats.mutex);
            _transmit_post(c, ev->result);
        }
        break;
    default:
        return;
    }
    if (runnable(m)) drive(m);
}

static void on_closed(struct mpc_obj *o) {
    if (o->kind != MPC_CONN) return;
    struct mpc_conn *m = (struct mpc_conn *)o;
    while (m->copy_head) { /* ended with copies unsent (the channel dropped them) */
        struct mpc_copy *b = m->copy_head;
        m->copy_head = b->next;
        copy_put(m->w, b);
    }
    m->copy_tail = NULL;
    m->ncopies = 0;
    if (m->fd >= 0 && !m->poll) close(m->fd);
    m->fd = -1;
    if (m->queued) {
        m->ended = true;
        return;
    }
    conn_state_put(m->w, m);
}

static void run_queued(struct mpc_worker *w) {
    struct mpc_conn *list = w->runq;
    w->runq = NULL;
    while (list) {
        struct mpc_conn *m = list;
        list = m->next_run;
        m->queued = false;
        if (m->ended) {
            m->fd = -1;
            on_closed(&m->obj);
        } else if (runnable(m)) {
            drive(m);
        }
    }
}

bool mpc_worker_loop(LIBEVENT_THREAD *me) {
    if (!mpc_enabled()) return false;
    struct mpc_worker *w = calloc(1, sizeof *w);
    if (!w) {
        fprintf(stderr, "megapipe: out of memory\n");
        exit(EXIT_FAILURE);
    }
    w->me = me;
    w->peer_fd = -1;
    /* Deferred accepting (MP_ACCEPT_DEFER in megapipe.h), 1 ms unless the variable says
     * otherwise: memcached's clients speak first, so a worker's new connections can wait in
     * its partition's backlog until the data of those it accepted before wakes it. */
    mp_options o;
    mp_options_init(&o);
    if (!getenv("MP_ACCEPT_DEFER")) o.accept_defer = 1;
    w->ch = mp_create(&o);
    if (!w->ch) {
        perror("megapipe: cannot create a worker's channel (mp_create)");
        exit(EX_OSERR);
    }
    w->buffered = strcmp(mp_engine_name(w->ch), "uring") == 0;
    w->notify.kind = MPC_NOTIFY;
#ifdef HAVE_EVENTFD
    int nfd = me->notify_event_fd;
#else
    int nfd = me->notify_receive_fd;
#endif
    /* The notify fd is the channel's now; memcached's base keeps only what queue_stop puts in
     * it (event_base_loopexit), run below after each notification. */
    event_del(&me->notify_event);
    if (!mp_poll_add(w->ch, nfd, EPOLLIN, 0, &w->notify)) {
        perror("megapipe: watching the worker's notify fd");
        exit(EX_OSERR);
    }
    self = w;
    pthread_mutex_lock(&mpc_lock);
    if (!workers) workers = calloc(settings.num_threads, sizeof *workers);
    if (!workers || nworkers == settings.num_threads) {
        fprintf(stderr, "megapipe: worker table\n");
        exit(EXIT_FAILURE);
    }
    w->idx = nworkers;
    workers[nworkers++] = w;
    bool ready = listeners_ready;
    pthread_mutex_unlock(&mpc_lock);
    if (ready) adopt_partitions(w);

    mp_event evs[MPC_EVENTS];
    bool stop = false;
    while (!stop) {
        int n = mp_dispatch_batch(w->ch, evs, MPC_EVENTS, w->runq ? 0 : -1);
        if (n < 0) {
            if (n == -EINTR) continue;
            fprintf(stderr, "megapipe: worker %d: mp_dispatch: %s\n", w->idx, strerror(-n));
            exit(EXIT_FAILURE);
        }
        for (int i = 0; i < n; i++) {
            const mp_event *ev = &evs[i];
            if (ev->cmd == MP_EV_WAKE) {
                pthread_mutex_lock(&mpc_lock);
                ready = listeners_ready;
                pthread_mutex_unlock(&mpc_lock);
                if (!w->adopted && ready) adopt_partitions(w);
                continue;
            }
            struct mpc_obj *o = ev->cookie;
            if (!o) continue;
            if (ev->cmd == MP_EV_CLOSED) {
                on_closed(o);
            } else if (o->kind == MPC_NOTIFY) {
                thread_libevent_process(nfd, EV_READ, me);
                /* queue_stop asks libevent to leave its loop: an empty base returns at once
                 * (no system call) unless that request is pending. */
                event_base_loop(me->base, EVLOOP_NONBLOCK);
                if (event_base_got_exit(me->base)) stop = true;
            } else if (o->kind == MPC_LISTENER) {
                if (ev->cmd == MP_EV_ACCEPT) on_accept(w, (struct mpc_listener *)o, ev);
            } else {
                on_conn_event((struct mpc_conn *)o, ev);
            }
        }
        run_queued(w);
    }
    return true;
}
