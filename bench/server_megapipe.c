/*
 * server_megapipe.c — the same server on the library: one channel per thread (pinned), the
 * paper's ping-pong loop (examples/pingpong.c) with the protocol's framing.  P, B and L are
 * switched one by one through mp_options and the calls they change:
 *   P: cpu_mask on mp_register() of the listener (partition) vs NULL (one shared queue),
 *   B: mp_options.batch 32 vs 1,
 *   L: mp_accept(..., MP_LWSOCKET) vs regular fds.
 * And an extension beyond the paper, -R: buffered reads (mp_read_buffered(): one multishot
 * receive per connection into the channel's provided buffers; bytes are copied out and the
 * buffer given back at once).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "server.h"

typedef struct mconn {
    mp_handle *h;
    int fd;               /* fd or lwsocket id */
    proto_conn pc;
} mconn;

int megapipe_prepare(srv_config *cfg, srv_worker *w) {
    mp_options opt;
    mp_options_init(&opt);
    opt.engine = cfg->mp_engine;
    opt.batch = cfg->B ? 32 : 1;
    opt.partition = cfg->P;
    opt.lwsocket = cfg->L;
    opt.stats = 0;
    w->ch = mp_create(&opt);
    if (!w->ch) {
        fprintf(stderr, "mp_create: %s\n", strerror(errno));
        return -1;
    }
    return 0;
}

void megapipe_wake(srv_worker *w) {
    if (w->ch) mp_wake(w->ch);
}

void megapipe_finish(srv_worker *w) {
    if (w->ch) {
        mp_get_stats(w->ch, &w->st);
        mp_destroy(w->ch);
        w->ch = NULL;
    }
}

/* End the connection; its memory and fd are released at its CLOSED event, once the kernel
 * holds none of its operations (and so none of its buffer). */
static void conn_close(srv_worker *w, mconn *c, uint64_t *open) {
    (void)w;
    mp_unregister(c->h);
    (*open)--;
}

static void conn_free(srv_worker *w, mconn *c) {
    if (!mp_is_lwsocket(c->fd)) {
        close(c->fd); /* regular fds stay ours (lwsockets: the channel closed it) */
        w->app_syscalls++;
    }
    free(c);
}

static void conn_read_more(srv_worker *w, mconn *c, uint64_t *open) {
    const proto_config *pcfg = &w->cfg->proto;
    int r = w->cfg->R ? mp_read_buffered(c->h)
                      : mp_read(c->h, c->pc.buf + c->pc.have, proto_want(pcfg, &c->pc));
    if (r < 0) {
        w->conn_errors++;
        conn_close(w, c, open);
    }
}

void *megapipe_thread(void *arg) {
    srv_worker *w = arg;
    const srv_config *cfg = w->cfg;
    const proto_config *pcfg = &cfg->proto;
    mp_channel *ch = w->ch;
    pin_self(w->cpu);

    cpu_set_t mask;
    CPU_ZERO(&mask);
    CPU_SET(w->cpu, &mask);
    int listener_cookie;
    mp_handle *lh = mp_register(ch, cfg->listen_fd, &listener_cookie, cfg->P ? &mask : NULL);
    if (!lh) {
        fprintf(stderr, "mp_register(listener): %s\n", strerror(errno));
        w->failed = 1;
        return NULL;
    }
    int r = mp_accept(lh, 0, cfg->L ? MP_LWSOCKET : 0);
    if (r < 0) {
        fprintf(stderr, "mp_accept: %s\n", strerror(-r));
        w->failed = 1;
        return NULL;
    }
    uint64_t open_conns = 0;
    enum { BATCH = 64 };
    mp_event evs[BATCH];
    int nev = 0, next = 0;
    while (!atomic_load_explicit(&g_stop, memory_order_relaxed)) {
        if (next == nev) {
            next = 0;
            nev = mp_dispatch_batch(ch, evs, BATCH, -1);
            if (nev < 0 && nev != -EINTR) {
                fprintf(stderr, "mp_dispatch: %s\n", strerror(-nev));
                break;
            }
            if (nev <= 0) {
                nev = 0;
                continue;
            }
        }
        const mp_event ev = evs[next++];
        if (ev.cmd == MP_EV_WAKE) continue;
        mconn *c = ev.cookie;
        switch (ev.cmd) {
        case MP_EV_ACCEPT: {
            if (ev.result < 0) { /* EMFILE and friends: the channel retries by itself */
                w->accept_errors++;
                break;
            }
            int fd = (int)ev.result;
            atomic_fetch_add_explicit(&w->accepts, 1, memory_order_relaxed);
            c = malloc(sizeof *c + proto_bufsize(pcfg));
            if (c) {
                memset(c, 0, sizeof *c);
                c->fd = fd;
                c->pc.buf = (char *)(c + 1);
                c->h = mp_register(ch, fd, c, NULL);
            }
            if (!c || !c->h) {
                w->accept_errors++;
                mp_close_accepted(ch, fd); /* an fd or an lwsocket nobody registered */
                if (!mp_is_lwsocket(fd)) w->app_syscalls++;
                free(c);
                break;
            }
            if (++open_conns > w->peak_conns) w->peak_conns = open_conns;
            conn_read_more(w, c, &open_conns);
            break;
        }
        case MP_EV_READ: {
            if (ev.result <= 0) {
                w->conn_errors++;
                conn_close(w, c, &open_conns);
                break;
            }
            if (ev.flags & MP_EVF_BUFFER) {
                /* more than the protocol wants (a client sending ahead) is dropped: memory
                 * per connection stays bounded */
                size_t n = (size_t)ev.result, want = proto_want(pcfg, &c->pc);
                memcpy(c->pc.buf + c->pc.have, ev.u.read.buf, n < want ? n : want);
                mp_buffer_release(ch, ev.u.read.buf_id);
                c->pc.have += n < want ? n : want;
            } else {
                c->pc.have += (size_t)ev.result;
            }
            const void *resp;
            size_t len;
            int k = proto_input(pcfg, &c->pc, &resp, &len);
            if (k < 0) {
                w->conn_errors++;
                conn_close(w, c, &open_conns);
            } else if (k == 0) {
                conn_read_more(w, c, &open_conns);
            } else if (mp_write(c->h, resp, len) < 0) {
                w->conn_errors++;
                conn_close(w, c, &open_conns);
            }
            break;
        }
        case MP_EV_WRITE:
            if (ev.result < 0) {
                w->conn_errors++;
                conn_close(w, c, &open_conns);
                break;
            }
            atomic_fetch_add_explicit(&w->txns, 1, memory_order_relaxed);
            proto_reset(pcfg, &c->pc);
            conn_read_more(w, c, &open_conns);
            break;
        case MP_EV_DISCONNECT:
            /* EOF or -ECONNRESET (how the load generator closes): not an error */
            if (ev.result < 0 && ev.result != -ECONNRESET) w->conn_errors++;
            conn_close(w, c, &open_conns);
            break;
        case MP_EV_CLOSED:
            if (ev.cookie != &listener_cookie) conn_free(w, c);
            break;
        default:
            break;
        }
    }
    /* Open connections are released by mp_destroy() (handles) and process exit (memory). */
    return NULL;
}
