/*
 * ngx_megapipe_module.c — the nginx event method "megapipe" (`events { use megapipe; }`):
 * one MegaPipe channel per worker process, as the paper's §4.2 did for nginx, built as a
 * dynamic module that loads into a stock nginx built --with-compat.  Nothing in nginx changes.
 *
 * What goes through the channel:
 *   - accepting: every listening socket of the worker is registered on its channel and
 *     accepted from with one multishot accept.  `listen ... reuseport` sockets (one per worker,
 *     made by the master) are adopted as partitions steered to the worker's CPU when
 *     worker_cpu_affinity is set (SO_INCOMING_CPU); other listening sockets are shared.
 *   - plain HTTP connections ("stream" connections below): c->recv, c->recv_chain, c->send
 *     and c->send_chain are the module's.  A read (mp_read) is kept in flight into a buffer of
 *     the module; recv copies out of it.  send/send_chain copy into one of two write buffers of
 *     the module and issue mp_write; while bytes are not yet in the socket the connection
 *     carries NGX_MP_BUFFERED in c->buffered, so nginx's HTTP code waits for them (as it does
 *     for OpenSSL's buffer) before it finalizes, keeps alive, shuts down or lingers.  Requests
 *     are batched: they reach the kernel with the next dispatch, one system call per loop.
 *     nginx frees pools and closes c->fd itself: none of its buffers is ever given to the
 *     kernel, the module's buffers are freed at the handle's MP_EV_CLOSED.
 *   - everything else (HTTPS and other TLS connections, upstream connections, the master's
 *     channel, UDP, stream and mail): the channel's readiness set (mp_poll_*), edge-triggered
 *     like nginx's epoll, with nginx's own I/O functions (ngx_os_io) on the real fd.
 *   - thread pools: ngx_notify() is mp_wake(), the MP_EV_WAKE event runs the handler.
 *
 * Decisions against nginx's epoll method (docs/nginx.md has the reasoning per code path):
 * ngx_event_flags is NGX_USE_CLEAR_EVENT | NGX_USE_GREEDY_EVENT, without NGX_USE_EPOLL_EVENT,
 * so nginx takes its generic (kqueue-less, rdhup-less) paths; sendfile stays as configured and
 * is emulated for stream connections (pread() of the file range into the write buffer).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_http.h> /* to tell plain HTTP listeners from TLS ones (nginx built with http) */

#include <megapipe.h>

/* A lower-level buffered bit of c->buffered (NGX_LOWLEVEL_BUFFERED is 0x0f; SSL has 0x01,
 * HTTP/2 0x02): written bytes not yet in the socket's send queue. */
#define NGX_MP_BUFFERED 0x08

#define NGX_MP_RBUF_SIZE (16 * 1024)   /* per stream connection, while a read is wanted */
#define NGX_MP_WBUF_SIZE (64 * 1024)   /* two per stream connection while it writes */
#define NGX_MP_WBUF_CACHE 256          /* idle write buffers kept for reuse */
#define NGX_MP_NEVENTS 512

typedef enum {
    NGX_MP_STREAM = 1, /* completion I/O through the channel */
    NGX_MP_POLL,       /* readiness watch, nginx's own I/O */
    NGX_MP_LISTEN      /* partition / shared listener accepted from by the channel */
} ngx_mp_kind_e;

typedef struct ngx_mp_conn_s ngx_mp_conn_t;

struct ngx_mp_conn_s {
    ngx_connection_t *c;      /* NULL once nginx let go of the connection */
    mp_handle        *h;
    ngx_mp_kind_e     kind;

    /* NGX_MP_POLL */
    uint32_t          events; /* EPOLLIN/EPOLLOUT interest */
    int               pflags; /* MP_POLL_ET or 0 */

    /* NGX_MP_LISTEN */
    ngx_listening_t  *ls;
    unsigned          stream_ok:1; /* its connections may be NGX_MP_STREAM */

    /* NGX_MP_STREAM: reads */
    u_char           *rbuf;
    size_t            rpos, rlen;
    unsigned          reading:1, eof:1, wblocked:1;
    int               rerr, werr;

    /* NGX_MP_STREAM: writes, double-buffered: wbuf[wfill] fills while the other is in flight */
    u_char           *wbuf[2];
    size_t            wlen[2];
    int               wfill;
    int               wfly;   /* index of the buffer in flight, or -1 */
};

static ngx_int_t ngx_mp_init(ngx_cycle_t *cycle, ngx_msec_t timer);
static void ngx_mp_done(ngx_cycle_t *cycle);
static ngx_int_t ngx_mp_add_event(ngx_event_t *ev, ngx_int_t event, ngx_uint_t flags);
static ngx_int_t ngx_mp_del_event(ngx_event_t *ev, ngx_int_t event, ngx_uint_t flags);
static ngx_int_t ngx_mp_add_connection(ngx_connection_t *c);
static ngx_int_t ngx_mp_del_connection(ngx_connection_t *c, ngx_uint_t flags);
static ngx_int_t ngx_mp_notify(ngx_event_handler_pt handler);
static ngx_int_t ngx_mp_process_events(ngx_cycle_t *cycle, ngx_msec_t timer,
    ngx_uint_t flags);

static ssize_t ngx_mp_recv(ngx_connection_t *c, u_char *buf, size_t size);
static ssize_t ngx_mp_recv_chain(ngx_connection_t *c, ngx_chain_t *in, off_t limit);
static ssize_t ngx_mp_send(ngx_connection_t *c, u_char *buf, size_t size);
static ngx_chain_t *ngx_mp_send_chain(ngx_connection_t *c, ngx_chain_t *in, off_t limit);

static void ngx_mp_exit_process(ngx_cycle_t *cycle);

static ngx_str_t megapipe_name = ngx_string("megapipe");

static ngx_event_module_t ngx_megapipe_module_ctx = {
    &megapipe_name,
    NULL, /* create configuration */
    NULL, /* init configuration */
    {
        ngx_mp_add_event,      /* add an event */
        ngx_mp_del_event,      /* delete an event */
        ngx_mp_add_event,      /* enable an event */
        ngx_mp_del_event,      /* disable an event */
        ngx_mp_add_connection, /* add an connection */
        ngx_mp_del_connection, /* delete an connection */
        ngx_mp_notify,         /* trigger a notify */
        ngx_mp_process_events, /* process the events */
        ngx_mp_init,           /* init the events */
        ngx_mp_done,           /* done the events */
    }
};

ngx_module_t ngx_megapipe_module = {
    NGX_MODULE_V1,
    &ngx_megapipe_module_ctx, /* module context */
    NULL,                     /* module directives */
    NGX_EVENT_MODULE,         /* module type */
    NULL,                     /* init master */
    NULL,                     /* init module */
    NULL,                     /* init process */
    NULL,                     /* init thread */
    NULL,                     /* exit thread */
    ngx_mp_exit_process,      /* exit process */
    NULL,                     /* exit master */
    NGX_MODULE_V1_PADDING
};

/* One channel per process that runs the event loop (worker, single process, helpers). */
static mp_channel *ngx_mp_ch;
static ngx_mp_conn_t **ngx_mp_conns; /* by index in ngx_cycle->connections */
static ngx_uint_t ngx_mp_nconns;
static mp_event *ngx_mp_evs;
/* Events taken from the channel outside process_events (see ngx_mp_reap()), handled first
 * by the next process_events. */
static mp_event *ngx_mp_pend;
static ngx_uint_t ngx_mp_npend, ngx_mp_pend_cap;
/* A timer while events are pending: an exiting worker (reload, QUIT) leaves its loop as soon
 * as no timer is left, which would drop connections accepted before its listeners stopped. */
static ngx_event_t ngx_mp_pend_ev;
static u_char *ngx_mp_wcache[NGX_MP_WBUF_CACHE];
static ngx_uint_t ngx_mp_nwcache;
static ngx_event_handler_pt ngx_mp_notify_handler;
static ngx_event_t ngx_mp_notify_event;
static ngx_log_t *ngx_mp_log;

static ngx_os_io_t ngx_mp_stream_io = {
    ngx_mp_recv, ngx_mp_recv_chain, NULL, ngx_mp_send, NULL, NULL, ngx_mp_send_chain, 0
};


/* ---------------------------------------------------------------------------------------- */
/* per-connection state                                                                      */
/* ---------------------------------------------------------------------------------------- */

static ngx_mp_conn_t **
ngx_mp_slot(ngx_connection_t *c)
{
    ngx_uint_t i;

    if (ngx_cycle->connections == NULL || c < ngx_cycle->connections) {
        return NULL;
    }
    i = (ngx_uint_t) (c - ngx_cycle->connections);
    return i < ngx_mp_nconns ? &ngx_mp_conns[i] : NULL;
}

static ngx_mp_conn_t *
ngx_mp_get(ngx_connection_t *c)
{
    ngx_mp_conn_t **s = ngx_mp_slot(c);
    return s ? *s : NULL;
}

static u_char *
ngx_mp_wbuf_get(void)
{
    if (ngx_mp_nwcache) {
        return ngx_mp_wcache[--ngx_mp_nwcache];
    }
    return ngx_alloc(NGX_MP_WBUF_SIZE, ngx_mp_log);
}

static void
ngx_mp_wbuf_put(u_char *b)
{
    if (b == NULL) {
        return;
    }
    if (ngx_mp_nwcache < NGX_MP_WBUF_CACHE) {
        ngx_mp_wcache[ngx_mp_nwcache++] = b;
        return;
    }
    ngx_free(b);
}

/* The state dies at the handle's MP_EV_CLOSED: then the kernel holds none of its buffers. */
static void
ngx_mp_conn_free(ngx_mp_conn_t *m)
{
    ngx_free(m->rbuf);
    ngx_mp_wbuf_put(m->wbuf[0]);
    ngx_mp_wbuf_put(m->wbuf[1]);
    ngx_free(m);
}

static ngx_mp_conn_t *
ngx_mp_conn_new(ngx_connection_t *c, ngx_mp_kind_e kind)
{
    ngx_mp_conn_t *m = ngx_calloc(sizeof(ngx_mp_conn_t), ngx_mp_log);
    if (m == NULL) {
        return NULL;
    }
    m->c = c;
    m->kind = kind;
    m->wfly = -1;
    return m;
}


/* ---------------------------------------------------------------------------------------- */
/* init / done                                                                               */
/* ---------------------------------------------------------------------------------------- */

static ngx_int_t
ngx_mp_init(ngx_cycle_t *cycle, ngx_msec_t timer)
{
    mp_options opt;

    (void) timer;
    ngx_mp_log = cycle->log;

    if (ngx_mp_ch == NULL) {
        /* Here, in the worker's init_process, privileges are already dropped and the
         * worker's CPU affinity is set: the channel is the worker's from the start.  Knobs
         * come from MP_* variables (pass them with nginx's `env` directive). */
        mp_options_init(&opt);
        ngx_mp_ch = mp_create(&opt);
        if (ngx_mp_ch == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno, "megapipe: mp_create() failed");
            return NGX_ERROR;
        }
        ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0, "megapipe: channel on engine \"%s\"",
                      mp_engine_name(ngx_mp_ch));
    }

    if (ngx_mp_nconns < cycle->connection_n) {
        ngx_free(ngx_mp_conns);
        ngx_mp_conns = ngx_calloc(sizeof(ngx_mp_conn_t *) * cycle->connection_n, cycle->log);
        if (ngx_mp_conns == NULL) {
            return NGX_ERROR;
        }
        ngx_mp_nconns = cycle->connection_n;
    }

    if (ngx_mp_evs == NULL) {
        ngx_mp_evs = ngx_alloc(sizeof(mp_event) * NGX_MP_NEVENTS, cycle->log);
        if (ngx_mp_evs == NULL) {
            return NGX_ERROR;
        }
    }

    ngx_mp_notify_event.log = cycle->log;
    ngx_mp_notify_event.active = 1;

    /* Connections that are not stream connections use nginx's own socket calls. */
    ngx_io = ngx_os_io;
    /* sendfile: nginx enables it per location when NGX_IO_SENDFILE is here; stream
     * connections then get file buffers, which ngx_mp_send_chain() copies with pread(). */
    ngx_mp_stream_io.flags = ngx_os_io.flags;

    ngx_event_actions = ngx_megapipe_module_ctx.actions;
    ngx_event_flags = NGX_USE_CLEAR_EVENT | NGX_USE_GREEDY_EVENT;

    return NGX_OK;
}

static void
ngx_mp_done(ngx_cycle_t *cycle)
{
    (void) cycle;
    mp_destroy(ngx_mp_ch);
    ngx_mp_ch = NULL;
    ngx_free(ngx_mp_conns);
    ngx_mp_conns = NULL;
    ngx_mp_nconns = 0;
    ngx_free(ngx_mp_evs);
    ngx_mp_evs = NULL;
    ngx_free(ngx_mp_pend);
    ngx_mp_pend = NULL;
    ngx_mp_npend = ngx_mp_pend_cap = 0;
    while (ngx_mp_nwcache) {
        ngx_free(ngx_mp_wcache[--ngx_mp_nwcache]);
    }
}


/* nginx 1.22 never calls actions.done: the worker's exit hook destroys the channel (and
 * prints its statistics with MP_STATS=1, into the error log: the worker's stderr). */
static void
ngx_mp_exit_process(ngx_cycle_t *cycle)
{
    if (ngx_mp_ch) {
        ngx_mp_done(cycle);
    }
}


/* ---------------------------------------------------------------------------------------- */
/* stream connections: reads                                                                 */
/* ---------------------------------------------------------------------------------------- */

/* Keep one read in flight while the buffer is empty and the connection is readable. */
static void
ngx_mp_read_start(ngx_mp_conn_t *m)
{
    int rc;

    if (m->reading || m->eof || m->rerr || m->rpos < m->rlen) {
        return;
    }
    if (m->rbuf == NULL) {
        m->rbuf = ngx_alloc(NGX_MP_RBUF_SIZE, ngx_mp_log);
        if (m->rbuf == NULL) {
            m->rerr = NGX_ENOMEM;
            return;
        }
    }
    m->rpos = m->rlen = 0;
    rc = mp_read(m->h, m->rbuf, NGX_MP_RBUF_SIZE);
    if (rc < 0) {
        m->rerr = -rc;
        return;
    }
    m->reading = 1;
}

/* Copy what the module holds into buf; NGX_AGAIN/0/NGX_ERROR like ngx_unix_recv(). */
static ssize_t
ngx_mp_copy_in(ngx_connection_t *c, ngx_mp_conn_t *m, u_char *buf, size_t size)
{
    size_t n;
    ngx_event_t *rev = c->read;

    if (m->rpos < m->rlen) {
        n = ngx_min(size, m->rlen - m->rpos);
        ngx_memcpy(buf, m->rbuf + m->rpos, n);
        m->rpos += n;
        if (m->rpos == m->rlen) {
            ngx_mp_read_start(m);
        }
        rev->available = (int) (m->rlen - m->rpos);
        rev->ready = m->rpos < m->rlen;
        return (ssize_t) n;
    }

    if (m->eof) {
        rev->ready = 0;
        rev->eof = 1;
        return 0;
    }

    if (m->rerr) {
        rev->ready = 0;
        rev->error = 1;
        ngx_connection_error(c, m->rerr, "megapipe recv failed");
        return NGX_ERROR;
    }

    ngx_mp_read_start(m);
    rev->ready = 0;
    rev->available = 0;
    return NGX_AGAIN;
}

static ssize_t
ngx_mp_recv(ngx_connection_t *c, u_char *buf, size_t size)
{
    ngx_mp_conn_t *m = ngx_mp_get(c);

    if (m == NULL || m->kind != NGX_MP_STREAM) {
        return ngx_os_io.recv(c, buf, size);
    }
    if (size == 0) {
        return 0;
    }
    return ngx_mp_copy_in(c, m, buf, size);
}

static ssize_t
ngx_mp_recv_chain(ngx_connection_t *c, ngx_chain_t *in, off_t limit)
{
    ssize_t n, total = 0;
    size_t size;
    ngx_mp_conn_t *m = ngx_mp_get(c);

    if (m == NULL || m->kind != NGX_MP_STREAM) {
        return ngx_os_io.recv_chain(c, in, limit);
    }

    for (; in; in = in->next) {
        size = (size_t) (in->buf->end - in->buf->last);
        if (limit && (off_t) (total + size) > limit) {
            size = (size_t) (limit - total);
        }
        if (size == 0) {
            if (limit && total >= limit) {
                break;
            }
            continue;
        }
        n = ngx_mp_copy_in(c, m, in->buf->last, size);
        if (n <= 0) {
            return total ? total : n;
        }
        total += n;
        if ((size_t) n < size) {
            break;
        }
    }
    return total;
}


/* ---------------------------------------------------------------------------------------- */
/* stream connections: writes                                                                */
/* ---------------------------------------------------------------------------------------- */

static void
ngx_mp_write_start(ngx_mp_conn_t *m)
{
    int rc, i = m->wfill;

    if (m->wfly >= 0 || m->wlen[i] == 0 || m->werr) {
        return;
    }
    rc = mp_write(m->h, m->wbuf[i], m->wlen[i]);
    if (rc < 0) {
        m->werr = -rc;
        return;
    }
    m->wfly = i;
    m->wfill = i ^ 1;
}

static size_t
ngx_mp_wspace(ngx_mp_conn_t *m)
{
    if (m->wbuf[m->wfill] == NULL) {
        m->wbuf[m->wfill] = ngx_mp_wbuf_get();
        if (m->wbuf[m->wfill] == NULL) {
            m->werr = NGX_ENOMEM; /* fails this and the next send: no wait without a wakeup */
            return 0;
        }
    }
    return NGX_MP_WBUF_SIZE - m->wlen[m->wfill];
}

static ssize_t
ngx_mp_send(ngx_connection_t *c, u_char *buf, size_t size)
{
    size_t n;
    ngx_mp_conn_t *m = ngx_mp_get(c);
    ngx_event_t *wev = c->write;

    if (m == NULL || m->kind != NGX_MP_STREAM) {
        return ngx_os_io.send(c, buf, size);
    }
    if (m->werr) {
        wev->error = 1;
        ngx_connection_error(c, m->werr, "megapipe send failed");
        return NGX_ERROR;
    }

    n = ngx_min(size, ngx_mp_wspace(m));
    if (m->werr) {
        wev->error = 1;
        return NGX_ERROR;
    }
    if (n == 0 && size) {
        wev->ready = 0;
        m->wblocked = 1;
        ngx_mp_write_start(m);
        return NGX_AGAIN;
    }

    ngx_memcpy(m->wbuf[m->wfill] + m->wlen[m->wfill], buf, n);
    m->wlen[m->wfill] += n;
    c->sent += n;
    c->buffered |= NGX_MP_BUFFERED;
    if (n < size) {
        wev->ready = 0;
        m->wblocked = 1;
    }
    ngx_mp_write_start(m);
    return (ssize_t) n;
}

static ngx_chain_t *
ngx_mp_send_chain(ngx_connection_t *c, ngx_chain_t *in, off_t limit)
{
    off_t sent = 0;
    size_t space, n;
    ssize_t r;
    ngx_buf_t *b;
    ngx_chain_t *cl;
    u_char *dst;
    ngx_mp_conn_t *m = ngx_mp_get(c);
    ngx_event_t *wev = c->write;

    if (m == NULL || m->kind != NGX_MP_STREAM) {
        return ngx_os_io.send_chain(c, in, limit);
    }
    if (m->werr) {
        wev->error = 1;
        ngx_connection_error(c, m->werr, "megapipe send failed");
        return NGX_CHAIN_ERROR;
    }
    if (limit == 0 || limit > (off_t) (NGX_MAX_SIZE_T_VALUE - ngx_pagesize)) {
        limit = NGX_MAX_SIZE_T_VALUE - ngx_pagesize;
    }

    for (cl = in; cl && sent < limit; cl = cl->next) {
        b = cl->buf;
        if (ngx_buf_special(b)) {
            continue;
        }
        space = ngx_mp_wspace(m);
        if (m->werr) {
            wev->error = 1;
            return NGX_CHAIN_ERROR;
        }
        if (space == 0) {
            break;
        }
        dst = m->wbuf[m->wfill] + m->wlen[m->wfill];

        if (ngx_buf_in_memory(b)) {
            n = ngx_min((size_t) (b->last - b->pos), space);
            n = ngx_min(n, (size_t) (limit - sent));
            ngx_memcpy(dst, b->pos, n);

        } else {
            /* sendfile, emulated: the file range is read into the write buffer. */
            n = ngx_min((size_t) (b->file_last - b->file_pos), space);
            n = ngx_min(n, (size_t) (limit - sent));
            if (n == 0) {
                continue;
            }
            r = pread(b->file->fd, dst, n, b->file_pos);
            if (r == -1) {
                wev->error = 1;
                ngx_log_error(NGX_LOG_CRIT, c->log, ngx_errno, "pread() \"%s\" failed",
                              b->file->name.data);
                return NGX_CHAIN_ERROR;
            }
            if (r == 0) {
                ngx_log_error(NGX_LOG_ALERT, c->log, 0,
                              "pread() reported that \"%s\" was truncated at %O",
                              b->file->name.data, b->file_pos);
                return NGX_CHAIN_ERROR;
            }
            n = (size_t) r;
        }

        m->wlen[m->wfill] += n;
        sent += (off_t) n;
        if (n < space && sent < limit && n < (size_t) ngx_buf_size(b)) {
            break; /* a short pread: take the rest next time */
        }
    }

    if (sent) {
        c->sent += sent;
        c->buffered |= NGX_MP_BUFFERED;
        in = ngx_chain_update_sent(in, sent);
        ngx_mp_write_start(m);
    }

    if (in && sent < limit) {
        /* chain left and no room: wait for a write completion */
        for (cl = in; cl; cl = cl->next) {
            if (!ngx_buf_special(cl->buf) && ngx_buf_size(cl->buf)) {
                wev->ready = 0;
                m->wblocked = 1;
                break;
            }
        }
    }

    return in;
}


/* ---------------------------------------------------------------------------------------- */
/* listeners and accepting                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* Plain HTTP listeners give stream connections; TLS ones (OpenSSL reads and writes the fd
 * itself, and nginx peeks at it first), stream, mail and UDP ones give readiness ones. */
static ngx_uint_t
ngx_mp_listener_streams(ngx_listening_t *ls)
{
    ngx_uint_t i;
    ngx_http_port_t *port;

    if (ls->type != SOCK_STREAM || ls->handler != ngx_http_init_connection || !ls->servers) {
        return 0;
    }
    port = ls->servers;
    for (i = 0; i < port->naddrs; i++) {
        ngx_http_addr_conf_t *conf;
#if (NGX_HAVE_INET6)
        if (ls->sockaddr->sa_family == AF_INET6) {
            conf = &((ngx_http_in6_addr_t *) port->addrs)[i].conf;
        } else
#endif
        {
            conf = &((ngx_http_in_addr_t *) port->addrs)[i].conf;
        }
        if (conf->ssl) {
            return 0;
        }
    }
    return 1;
}

static ngx_int_t ngx_mp_poll_add(ngx_connection_t *c, uint32_t events, int pflags);

static ngx_int_t
ngx_mp_listen_start(ngx_event_t *rev)
{
    ngx_connection_t *lc = rev->data;
    ngx_listening_t *ls = lc->listening;
    ngx_mp_conn_t *m, **slot;
    ngx_cpuset_t *mask = NULL;
    int rc;

    rev->active = 1;
    if (ngx_process == NGX_PROCESS_HELPER) {
        return NGX_OK; /* cache manager/loader: they close listening sockets at once */
    }

    slot = ngx_mp_slot(lc);
    if (slot == NULL) {
        return NGX_ERROR;
    }
    if (*slot) {
        return NGX_OK;
    }

    if (ls->type == SOCK_STREAM) {
        m = ngx_mp_conn_new(lc, NGX_MP_LISTEN);
        if (m == NULL) {
            return NGX_ERROR;
        }
        m->ls = ls;
        m->stream_ok = ngx_mp_listener_streams(ls);

#if (NGX_HAVE_REUSEPORT) && (NGX_HAVE_CPU_AFFINITY)
        /* A worker's own `reuseport` socket becomes its partition, steered to the CPU of
         * worker_cpu_affinity; without affinity the kernel's hash spreads connections over
         * the workers' sockets as with stock nginx. */
        if (ls->reuseport && ngx_process == NGX_PROCESS_WORKER) {
            mask = ngx_get_cpu_affinity(ngx_worker);
        }
#endif
        m->h = mp_register(ngx_mp_ch, lc->fd, m, mask);
        if (m->h == NULL) {
            ngx_log_error(NGX_LOG_WARN, ngx_mp_log, ngx_errno,
                          "megapipe: mp_register(listening %V) failed, "
                          "accepting through readiness instead", &ls->addr_text);
            ngx_free(m);
            return ngx_mp_poll_add(lc, EPOLLIN, 0);
        }
        rc = mp_accept(m->h, 0, 0); /* regular fds: nginx owns and closes them */
        if (rc < 0) {
            ngx_log_error(NGX_LOG_ALERT, ngx_mp_log, -rc, "megapipe: mp_accept() failed");
            mp_unregister(m->h);
            m->c = NULL;
            return NGX_ERROR;
        }
        *slot = m;
        ngx_log_error(NGX_LOG_INFO, ngx_mp_log, 0,
                      "megapipe: accepting on %V (%s, %s connections)", &ls->addr_text,
                      mask ? "partition" : "shared",
                      m->stream_ok ? "channel I/O" : "readiness");
        return NGX_OK;
    }

    /* UDP: nginx's ngx_event_recvmsg() on a level-triggered watch, as with epoll. */
    return ngx_mp_poll_add(lc, EPOLLIN, 0);
}

/* Take every event the channel has now into the pending list (process_events handles them
 * next).  Used before a listener is ended: an ended handle's undelivered ACCEPT events are
 * dropped (and their connections closed) by the core, so the ones already accepted are
 * fetched first.
 * CORE-GAP: there is no "stop accepting, but deliver what was accepted" call; proposed:
 * int mp_accept_stop(mp_handle *listener) — cancels the listener's accepts; ACCEPT events
 * the kernel posted before the cancellation are still delivered; a later mp_unregister()
 * ends the handle without dropping connections. */
static void
ngx_mp_pend_timer(ngx_event_t *ev)
{
    (void) ev; /* the pending events are handled at the start of the next process_events */
}

static void
ngx_mp_reap(void)
{
    int n;
    mp_event *p;

    for (;;) {
        if (ngx_mp_npend + 64 > ngx_mp_pend_cap) {
            ngx_uint_t cap = ngx_mp_pend_cap ? ngx_mp_pend_cap * 2 : 256;
            p = ngx_alloc(sizeof(mp_event) * cap, ngx_mp_log);
            if (p == NULL) {
                return;
            }
            if (ngx_mp_npend) {
                ngx_memcpy(p, ngx_mp_pend, sizeof(mp_event) * ngx_mp_npend);
            }
            ngx_free(ngx_mp_pend);
            ngx_mp_pend = p;
            ngx_mp_pend_cap = cap;
        }
        n = mp_dispatch_batch(ngx_mp_ch, ngx_mp_pend + ngx_mp_npend, 64, 0);
        if (n <= 0) {
            break;
        }
        ngx_mp_npend += (ngx_uint_t) n;
    }
    if (ngx_mp_npend && !ngx_mp_pend_ev.timer_set) {
        ngx_mp_pend_ev.handler = ngx_mp_pend_timer;
        ngx_mp_pend_ev.log = ngx_mp_log;
        ngx_mp_pend_ev.cancelable = 0;
        ngx_add_timer(&ngx_mp_pend_ev, 1);
    }
}

static ngx_int_t
ngx_mp_listen_stop(ngx_event_t *rev)
{
    ngx_connection_t *lc = rev->data;
    ngx_mp_conn_t *m, **slot;

    rev->active = 0;
    slot = ngx_mp_slot(lc);
    if (slot == NULL || *slot == NULL) {
        return NGX_OK;
    }
    m = *slot;
    *slot = NULL;
    if (m->kind == NGX_MP_POLL) {
        m->c = NULL;
        mp_poll_del(m->h);
        return NGX_OK;
    }
    ngx_mp_reap();
    m->c = NULL;
    mp_unregister(m->h); /* the socket stays nginx's: it closes it or keeps it for the next
                            generation of workers */
    return NGX_OK;
}

static void
ngx_mp_close_accepted(ngx_connection_t *c)
{
    ngx_socket_t fd;

    ngx_free_connection(c);
    fd = c->fd;
    c->fd = (ngx_socket_t) -1;
    if (ngx_close_socket(fd) == -1) {
        ngx_log_error(NGX_LOG_ALERT, c->log, ngx_socket_errno, ngx_close_socket_n " failed");
    }
    if (c->pool) {
        ngx_destroy_pool(c->pool);
    }
#if (NGX_STAT_STUB)
    (void) ngx_atomic_fetch_add(ngx_stat_active, -1);
#endif
}

/* A connection the channel accepted: what ngx_event_accept() does after accept4(). */
static void
ngx_mp_accepted(ngx_mp_conn_t *lm, int fd)
{
    ngx_listening_t *ls = lm->ls;
    ngx_connection_t *c;
    ngx_event_t *rev, *wev;
    ngx_log_t *log;
    ngx_sockaddr_t sa;
    socklen_t socklen = sizeof(ngx_sockaddr_t);
    ngx_mp_conn_t *m, **slot;

#if (NGX_STAT_STUB)
    (void) ngx_atomic_fetch_add(ngx_stat_accepted, 1);
#endif

    ngx_accept_disabled = ngx_cycle->connection_n / 8 - ngx_cycle->free_connection_n;

    c = ngx_get_connection(fd, &ls->log);
    if (c == NULL) {
        if (ngx_close_socket(fd) == -1) {
            ngx_log_error(NGX_LOG_ALERT, &ls->log, ngx_socket_errno,
                          ngx_close_socket_n " failed");
        }
        return;
    }
    c->type = SOCK_STREAM;

#if (NGX_STAT_STUB)
    (void) ngx_atomic_fetch_add(ngx_stat_active, 1);
#endif

    c->pool = ngx_create_pool(ls->pool_size, &ls->log);
    if (c->pool == NULL) {
        ngx_mp_close_accepted(c);
        return;
    }

    /* CORE-GAP: the ACCEPT event carries no peer address and the fd is blocking; proposed:
     * mp_accept() flags MP_ACCEPT_NONBLOCK (SOCK_NONBLOCK on the accepted socket) and
     * MP_ACCEPT_PEER (the peer's sockaddr in the event, u.accept.addr/addrlen, from
     * single-shot accepts with an address buffer).  Until then: getpeername() + FIONBIO. */
    if (getpeername(fd, &sa.sockaddr, &socklen) == -1) {
        ngx_log_error(NGX_LOG_INFO, &ls->log, ngx_socket_errno, "getpeername() failed");
        ngx_mp_close_accepted(c);
        return;
    }
    if (socklen > (socklen_t) sizeof(ngx_sockaddr_t)) {
        socklen = sizeof(ngx_sockaddr_t);
    }
    /* nginx itself makes system calls on c->fd that must not block: the MSG_PEEK tests of
     * a broken connection, OpenSSL, lingering close. */
    if (ngx_nonblocking(fd) == -1) {
        ngx_log_error(NGX_LOG_ALERT, &ls->log, ngx_socket_errno, ngx_nonblocking_n " failed");
        ngx_mp_close_accepted(c);
        return;
    }

    c->sockaddr = ngx_palloc(c->pool, socklen);
    log = ngx_palloc(c->pool, sizeof(ngx_log_t));
    if (c->sockaddr == NULL || log == NULL) {
        ngx_mp_close_accepted(c);
        return;
    }
    ngx_memcpy(c->sockaddr, &sa, socklen);
    *log = ls->log;

    c->recv = ngx_recv;
    c->send = ngx_send;
    c->recv_chain = ngx_recv_chain;
    c->send_chain = ngx_send_chain;
    c->log = log;
    c->pool->log = log;
    c->socklen = socklen;
    c->listening = ls;
    c->local_sockaddr = ls->sockaddr;
    c->local_socklen = ls->socklen;

#if (NGX_HAVE_UNIX_DOMAIN)
    if (c->sockaddr->sa_family == AF_UNIX) {
        c->tcp_nopush = NGX_TCP_NOPUSH_DISABLED;
        c->tcp_nodelay = NGX_TCP_NODELAY_DISABLED;
    }
#endif

    rev = c->read;
    wev = c->write;
    wev->ready = 1;
    rev->log = log;
    wev->log = log;

    c->number = ngx_atomic_fetch_add(ngx_connection_counter, 1);
    c->start_time = ngx_current_msec;

#if (NGX_STAT_STUB)
    (void) ngx_atomic_fetch_add(ngx_stat_handled, 1);
#endif

    if (ls->addr_ntop) {
        c->addr_text.data = ngx_pnalloc(c->pool, ls->addr_text_max_len);
        if (c->addr_text.data == NULL) {
            ngx_mp_close_accepted(c);
            return;
        }
        c->addr_text.len = ngx_sock_ntop(c->sockaddr, c->socklen, c->addr_text.data,
                                         ls->addr_text_max_len, 0);
        if (c->addr_text.len == 0) {
            ngx_mp_close_accepted(c);
            return;
        }
    }

    ngx_log_debug2(NGX_LOG_DEBUG_EVENT, log, 0, "*%uA megapipe accept: fd:%d", c->number, fd);

    m = NULL;
    slot = ngx_mp_slot(c);
    if (lm->stream_ok && slot) {
        m = ngx_mp_conn_new(c, NGX_MP_STREAM);
        if (m) {
            m->h = mp_register(ngx_mp_ch, fd, m, NULL);
            if (m->h == NULL) {
                ngx_log_error(NGX_LOG_WARN, log, ngx_errno, "megapipe: mp_register() failed");
                ngx_free(m);
                m = NULL;
            }
        }
    }

    if (m) {
        *slot = m;
        c->recv = ngx_mp_stream_io.recv;
        c->recv_chain = ngx_mp_stream_io.recv_chain;
        c->send = ngx_mp_stream_io.send;
        c->send_chain = ngx_mp_stream_io.send_chain;
        /* like epoll's add_connection: both directions watched for good */
        rev->active = 1;
        wev->active = 1;
        /* the request's first read goes to the kernel in the same batch as the accept's
         * next round */
        ngx_mp_read_start(m);

    } else if (ngx_mp_add_connection(c) == NGX_ERROR) {
        ngx_mp_close_accepted(c);
        return;
    }

    log->data = NULL;
    log->handler = NULL;

    ls->handler(c);
}


/* ---------------------------------------------------------------------------------------- */
/* readiness watches                                                                         */
/* ---------------------------------------------------------------------------------------- */

static ngx_int_t
ngx_mp_poll_add(ngx_connection_t *c, uint32_t events, int pflags)
{
    ngx_mp_conn_t *m, **slot = ngx_mp_slot(c);

    if (slot == NULL) {
        ngx_log_error(NGX_LOG_ALERT, c->log, 0, "megapipe: connection outside the cycle");
        return NGX_ERROR;
    }
    m = *slot;
    if (m == NULL) {
        m = ngx_mp_conn_new(c, NGX_MP_POLL);
        if (m == NULL) {
            return NGX_ERROR;
        }
        m->events = events;
        m->pflags = pflags;
        m->h = mp_poll_add(ngx_mp_ch, c->fd, events, pflags, m);
        if (m->h == NULL) {
            ngx_log_error(NGX_LOG_ALERT, c->log, ngx_errno,
                          "megapipe: mp_poll_add(%d) failed", c->fd);
            ngx_free(m);
            return NGX_ERROR;
        }
        *slot = m;
        return NGX_OK;
    }
    if (m->kind != NGX_MP_POLL) {
        return NGX_OK;
    }
    if ((m->events | events) != m->events || m->pflags != pflags) {
        m->events |= events;
        m->pflags = pflags;
        if (mp_poll_mod(m->h, m->events, m->pflags) < 0) {
            ngx_log_error(NGX_LOG_ALERT, c->log, 0, "megapipe: mp_poll_mod(%d) failed", c->fd);
            return NGX_ERROR;
        }
    }
    return NGX_OK;
}

static void
ngx_mp_poll_end(ngx_mp_conn_t **slot)
{
    ngx_mp_conn_t *m = *slot;

    *slot = NULL;
    m->c = NULL;
    mp_poll_del(m->h); /* nothing of it is delivered any more; m dies at MP_EV_CLOSED */
}


/* ---------------------------------------------------------------------------------------- */
/* ngx_event_actions_t                                                                       */
/* ---------------------------------------------------------------------------------------- */

static ngx_int_t
ngx_mp_add_event(ngx_event_t *ev, ngx_int_t event, ngx_uint_t flags)
{
    ngx_connection_t *c = ev->data;
    ngx_mp_conn_t *m;

    if (ev->accept) {
        return ngx_mp_listen_start(ev);
    }

    m = ngx_mp_get(c);
    if (m && m->kind == NGX_MP_STREAM) {
        ev->active = 1;
        if (event == NGX_READ_EVENT) {
            ngx_mp_read_start(m);
        }
        return NGX_OK;
    }

    ev->active = 1;
    ev->oneshot = (flags & NGX_ONESHOT_EVENT) ? 1 : 0;
    return ngx_mp_poll_add(c, event == NGX_READ_EVENT ? (EPOLLIN | EPOLLRDHUP) : EPOLLOUT,
                           (flags & NGX_CLEAR_EVENT) ? MP_POLL_ET : 0);
}

static ngx_int_t
ngx_mp_del_event(ngx_event_t *ev, ngx_int_t event, ngx_uint_t flags)
{
    ngx_connection_t *c = ev->data;
    ngx_mp_conn_t *m, **slot;
    uint32_t events;

    if (ev->accept) {
        return ngx_mp_listen_stop(ev);
    }

    ev->active = 0;
    slot = ngx_mp_slot(c);
    m = slot ? *slot : NULL;
    if (m == NULL || m->kind != NGX_MP_POLL) {
        return NGX_OK; /* stream connections: nothing to tell the kernel */
    }

    events = m->events & ~(event == NGX_READ_EVENT ? (EPOLLIN | EPOLLRDHUP) : EPOLLOUT);
    if (events == 0 || (flags & NGX_CLOSE_EVENT)) {
        ngx_event_t *other = (event == NGX_READ_EVENT) ? c->write : c->read;
        if (events == 0 || !other->active || (flags & NGX_CLOSE_EVENT)) {
            ngx_mp_poll_end(slot);
            return NGX_OK;
        }
    }
    if (events != m->events) {
        m->events = events;
        if (mp_poll_mod(m->h, m->events, m->pflags) < 0) {
            return NGX_ERROR;
        }
    }
    return NGX_OK;
}

static ngx_int_t
ngx_mp_add_connection(ngx_connection_t *c)
{
    if (ngx_mp_poll_add(c, EPOLLIN | EPOLLOUT | EPOLLRDHUP, MP_POLL_ET) != NGX_OK) {
        return NGX_ERROR;
    }
    c->read->active = 1;
    c->write->active = 1;
    return NGX_OK;
}

static ngx_int_t
ngx_mp_del_connection(ngx_connection_t *c, ngx_uint_t flags)
{
    ngx_mp_conn_t *m, **slot = ngx_mp_slot(c);

    (void) flags;
    c->read->active = 0;
    c->write->active = 0;
    m = slot ? *slot : NULL;
    if (m == NULL) {
        return NGX_OK;
    }
    if (m->kind == NGX_MP_POLL) {
        ngx_mp_poll_end(slot);
        return NGX_OK;
    }
    if (m->kind == NGX_MP_STREAM) {
        /* nginx closes c->fd right after this: the handle ends now (its reads and a write
         * still in flight are cancelled), the buffers live until MP_EV_CLOSED.  HTTP does not
         * get here with bytes still to write: NGX_MP_BUFFERED holds the request until then;
         * only errors, timeouts and aborts do, and they drop the rest as stock nginx would.
         * CORE-GAP: a handle names its socket by fd number, so it cannot outlive nginx's
         * close(c->fd) (the number is reused at the next accept).  Proposed: mp_register()
         * flag MP_REG_OWN_REF (the channel keeps its own reference, e.g. a registered-file
         * slot, and closes it at MP_EV_CLOSED) plus mp_close_after_writes(h) (end the handle
         * once its queued writes completed).  Then write-behind would not hold nginx's
         * request, its file descriptor and pool until the write completes. */
        *slot = NULL;
        m->c = NULL;
        mp_unregister(m->h);
    }
    return NGX_OK;
}

static ngx_int_t
ngx_mp_notify(ngx_event_handler_pt handler)
{
    /* from a thread-pool thread: mp_wake() is the one call safe from any thread */
    ngx_mp_notify_handler = handler;
    if (mp_wake(ngx_mp_ch) < 0) {
        return NGX_ERROR;
    }
    return NGX_OK;
}


/* ---------------------------------------------------------------------------------------- */
/* the loop                                                                                  */
/* ---------------------------------------------------------------------------------------- */

static void
ngx_mp_run(ngx_event_t *ev, ngx_uint_t flags)
{
    /* add_connection watches both directions (nginx calls it without NGX_USE_EPOLL_EVENT
     * for the master's channel too, whose write event has no handler) */
    if (ev->handler == NULL) {
        return;
    }
    if (flags & NGX_POST_EVENTS) {
        ngx_post_event(ev, ev->accept ? &ngx_posted_accept_events : &ngx_posted_events);
    } else {
        ev->handler(ev);
    }
}

static void
ngx_mp_on_read(ngx_mp_conn_t *m, const mp_event *e, ngx_uint_t flags)
{
    ngx_event_t *rev;

    m->reading = 0;
    if (e->cmd == MP_EV_READ) {
        if (e->result > 0) {
            m->rpos = 0;
            m->rlen = (size_t) e->result;
        } else {
            m->rerr = e->result < 0 ? (int) -e->result : EIO;
        }
    } else if (e->result == 0) { /* DISCONNECT: peer closed */
        m->eof = 1;
    } else {
        m->rerr = (int) -e->result;
    }

    if (m->c == NULL) {
        return;
    }
    rev = m->c->read;
    rev->ready = 1;
    rev->available = (int) (m->rlen - m->rpos);
    if (m->eof || m->rerr) {
        rev->pending_eof = 1;
    }
    if (rev->active) {
        ngx_mp_run(rev, flags);
    }
}

static void
ngx_mp_on_write(ngx_mp_conn_t *m, const mp_event *e, ngx_uint_t flags)
{
    ngx_event_t *wev;
    ngx_connection_t *c;
    ngx_uint_t wake;

    if (m->wfly >= 0) {
        m->wlen[m->wfly] = 0;
        m->wfly = -1;
    }
    if (e->result < 0) {
        m->werr = (int) -e->result;
    } else {
        ngx_mp_write_start(m);
    }

    c = m->c;
    if (c == NULL) {
        return;
    }
    wake = m->wblocked || m->werr;
    if (m->wfly < 0 && (m->wlen[m->wfill] == 0 || m->werr)) {
        /* all bytes in the socket (or failed): nginx may finalize now */
        if (c->buffered & NGX_MP_BUFFERED) {
            c->buffered &= ~NGX_MP_BUFFERED;
            wake = 1;
        }
        ngx_mp_wbuf_put(m->wbuf[0]);
        ngx_mp_wbuf_put(m->wbuf[1]);
        m->wbuf[0] = m->wbuf[1] = NULL;
        m->wlen[0] = m->wlen[1] = 0;
    }
    if (!wake) {
        return;
    }
    m->wblocked = 0;
    wev = c->write;
    wev->ready = 1;
#if (NGX_THREADS)
    wev->complete = 1;
#endif
    if (m->werr) {
        wev->error = 1;
    }
    if (wev->active) {
        ngx_mp_run(wev, flags);
    }
}

static void
ngx_mp_on_poll(ngx_mp_conn_t *m, uint32_t revents, ngx_uint_t flags)
{
    ngx_connection_t *c = m->c;
    ngx_event_t *rev, *wev;

    if (revents & (EPOLLERR | EPOLLHUP)) {
        revents |= EPOLLIN | EPOLLOUT;
    }
    rev = c->read;
    if ((revents & EPOLLIN) && rev->active) {
        rev->ready = 1;
        rev->available = -1;
        if (revents & EPOLLRDHUP) {
            rev->pending_eof = 1;
        }
        ngx_mp_run(rev, flags);
    }
    /* the read handler may have closed the connection */
    if (m->c == NULL || c->fd == (ngx_socket_t) -1) {
        return;
    }
    wev = c->write;
    if ((revents & EPOLLOUT) && wev->active) {
        wev->ready = 1;
#if (NGX_THREADS)
        wev->complete = 1;
#endif
        ngx_mp_run(wev, flags);
    }
}

static void
ngx_mp_handle(const mp_event *e, ngx_uint_t flags)
{
    ngx_mp_conn_t *m = e->cookie;

    switch (e->cmd) {

    case MP_EV_ACCEPT:
        if (e->result < 0) {
            ngx_uint_t level = NGX_LOG_ERR;
            if (e->result == -NGX_EMFILE || e->result == -NGX_ENFILE) {
                level = NGX_LOG_CRIT; /* the channel retries by itself 10 ms later */
            }
            ngx_log_error(level, ngx_mp_log, (ngx_err_t) -e->result, "megapipe accept failed");
            return;
        }
        /* also after the listener stopped: these were accepted before (ngx_mp_reap()) */
        ngx_mp_accepted(m, (int) e->result);
        return;

    case MP_EV_READ:
    case MP_EV_DISCONNECT:
        if (m->kind == NGX_MP_STREAM && !(e->flags & MP_EVF_LOCAL)) {
            ngx_mp_on_read(m, e, flags);
        }
        return;

    case MP_EV_WRITE:
        if (m->kind == NGX_MP_STREAM) {
            ngx_mp_on_write(m, e, flags);
        }
        return;

    case MP_EV_POLL:
        if (m->c && m->c->fd != (ngx_socket_t) -1) {
            ngx_mp_on_poll(m, e->u.poll.revents, flags);
        }
        return;

    case MP_EV_WAKE:
        if (ngx_mp_notify_handler) {
            ngx_mp_notify_event.handler = ngx_mp_notify_handler;
            ngx_mp_run(&ngx_mp_notify_event, flags);
        }
        return;

    case MP_EV_CLOSED:
        if (m->kind == NGX_MP_LISTEN || m->kind == NGX_MP_POLL) {
            ngx_free(m);
        } else {
            ngx_mp_conn_free(m);
        }
        return;

    default:
        return;
    }
}

static ngx_int_t
ngx_mp_process_events(ngx_cycle_t *cycle, ngx_msec_t timer, ngx_uint_t flags)
{
    int n, i, tmo;
    ngx_uint_t level, k, np;
    ngx_err_t err;
    mp_event *pend;

    if (ngx_mp_npend) {
        /* events fetched early (ngx_mp_reap()); handlers may add more */
        while (ngx_mp_npend) {
            np = ngx_mp_npend;
            pend = ngx_mp_pend;
            ngx_mp_pend = NULL;
            ngx_mp_npend = ngx_mp_pend_cap = 0;
            for (k = 0; k < np; k++) {
                ngx_mp_handle(&pend[k], flags);
            }
            ngx_free(pend);
        }
        timer = 0;
    }

    if (timer == NGX_TIMER_INFINITE) {
        tmo = -1;
    } else {
        tmo = timer > (ngx_msec_t) NGX_MAX_INT32_VALUE ? (int) NGX_MAX_INT32_VALUE : (int) timer;
    }

    n = mp_dispatch_batch(ngx_mp_ch, ngx_mp_evs, NGX_MP_NEVENTS, tmo);
    err = n < 0 ? -n : 0;

    if (flags & NGX_UPDATE_TIME || ngx_event_timer_alarm) {
        ngx_time_update();
    }

    if (err) {
        if (err == NGX_EINTR) {
            if (ngx_event_timer_alarm) {
                ngx_event_timer_alarm = 0;
                return NGX_OK;
            }
            level = NGX_LOG_INFO;
        } else {
            level = NGX_LOG_ALERT;
        }
        ngx_log_error(level, cycle->log, err, "mp_dispatch_batch() failed");
        return NGX_ERROR;
    }

    if (n == 0) {
        if (timer != NGX_TIMER_INFINITE) {
            return NGX_OK;
        }
        ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                      "mp_dispatch_batch() returned no events without timeout");
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        ngx_mp_handle(&ngx_mp_evs[i], flags);
    }

    return NGX_OK;
}
