/*
 * watch.c — the readiness set's fd-keyed form, mp_watch()/mp_unwatch(), callable from any
 * thread.  The owner applies a change at once (poll.c, a queued request to its engine).
 * Another thread (or any thread before the channel has an owner) records it under the set's
 * lock and wakes the owner if this is the first change waiting; the owner applies the record at the top of each mp_dispatch*() round (and
 * before any mp_poll_add), in the order the calls were made.  The set keeps, under the same
 * lock, which fds are in it as the callers see them, so that mp_unwatch() of an unknown fd
 * answers -ENOENT from any thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#include "internal.h"

#define WATCH_EVENTS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI)
#define WATCH_FLAGS (MP_POLL_ET | MP_POLL_ONESHOT)

struct wchange {
    int fd;
    uint32_t events; /* 0: remove */
    int flags;
    void *cookie;
};

struct mp_wset {
    pthread_mutex_t lock;
    uint8_t *in; /* fd -> in the set (the callers' view, recorded changes included) */
    size_t in_len;
    struct wchange *q; /* recorded by other threads, not yet applied */
    size_t n, cap;
};

static struct mp_wset *wset(mp_channel *ch) {
    /* Made on first use by whichever thread comes first; the pointer is published once. */
    struct mp_wset *ws = __atomic_load_n(&ch->ws, __ATOMIC_ACQUIRE);
    if (ws) return ws;
    ws = calloc(1, sizeof *ws);
    if (!ws) return NULL;
    pthread_mutex_init(&ws->lock, NULL);
    struct mp_wset *expected = NULL;
    if (!__atomic_compare_exchange_n(&ch->ws, &expected, ws, false, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        pthread_mutex_destroy(&ws->lock);
        free(ws);
        return expected;
    }
    return ws;
}

static int in_set(struct mp_wset *ws, int fd, bool v) {
    if ((size_t)fd >= ws->in_len) {
        if (!v) return 0;
        size_t n = ws->in_len ? ws->in_len : 64;
        while (n <= (size_t)fd) n *= 2;
        uint8_t *p = realloc(ws->in, n);
        if (!p) return -ENOMEM;
        memset(p + ws->in_len, 0, n - ws->in_len);
        ws->in = p;
        ws->in_len = n;
    }
    ws->in[fd] = v;
    return 0;
}

static bool is_in(const struct mp_wset *ws, int fd) {
    return (size_t)fd < ws->in_len && ws->in[fd];
}

/* Owner thread: make the channel's watch of fd what c says. */
static int apply_one(mp_channel *ch, const struct wchange *c) {
    uint32_t idx1 = mp__pollmap_get(ch, c->fd);
    mp_handle *h = idx1 ? mp__handle_at(ch, idx1 - 1) : NULL;
    if (h && h->state != H_LIVE) h = NULL;
    if (!c->events) {
        if (!h) return -ENOENT;
        ch->st.requests++;
        mp__handle_end(h);
        return 0;
    }
    if (h) return mp__poll_mod(h, c->events, c->flags, c->cookie, true);
    int err = 0;
    return mp__poll_add(ch, c->fd, c->events, c->flags, c->cookie, &err) ? 0 : -err;
}

void mp__watch_apply(mp_channel *ch) {
    if (!atomic_load_explicit(&ch->ws_pending, memory_order_acquire)) return;
    struct mp_wset *ws = ch->ws;
    pthread_mutex_lock(&ws->lock);
    atomic_store(&ch->ws_pending, 0);
    for (size_t i = 0; i < ws->n; i++) {
        int r = apply_one(ch, &ws->q[i]);
        /* The caller was told 0 when it recorded the change; a file closed since then (EBADF)
         * leaves nothing to watch, as with epoll.  Keep the callers' view true. */
        if (r < 0 && ws->q[i].events) in_set(ws, ws->q[i].fd, mp__pollmap_get(ch, ws->q[i].fd));
    }
    ws->n = 0;
    pthread_mutex_unlock(&ws->lock);
}

static int record(mp_channel *ch, struct mp_wset *ws, const struct wchange *c) {
    if (ws->n == ws->cap) {
        size_t n = ws->cap ? ws->cap * 2 : 16;
        struct wchange *q = realloc(ws->q, n * sizeof *q);
        if (!q) return -ENOMEM;
        ws->q = q;
        ws->cap = n;
    }
    ws->q[ws->n++] = *c;
    ch->st.watch_remote++;
    return 0;
}

static int watch(mp_channel *ch, int fd, uint32_t events, int flags, void *cookie) {
    if (!ch || ch->magic != MP_CHANNEL_MAGIC) return -EBADF;
    if (fd < 0) return -EBADF;
    if ((events & ~(uint32_t)WATCH_EVENTS) || (flags & ~WATCH_FLAGS)) return -EINVAL;
    if (mp__forked(ch)) return -EPERM;
    struct mp_wset *ws = wset(ch);
    if (!ws) return -ENOMEM;
    struct wchange c = {fd, events, flags, cookie};
    /* Only the owner applies; everyone else records, and so does every thread while the
     * channel has no owner yet: the thread that dispatches first becomes the owner and applies
     * what was recorded (event libraries set watches up on one thread and dispatch on another:
     * memcached's workers get their libevent bases from the main thread). */
    bool owner = ch->owned && pthread_equal(ch->owner, pthread_self());
    pthread_mutex_lock(&ws->lock);
    int r = 0;
    if (events && !owner && !is_in(ws, fd) && fcntl(fd, F_GETFD) < 0) {
        r = -EBADF; /* (the owner's add checks it itself, mp__poll_add) */
    } else if (!events && !is_in(ws, fd) && !(owner && mp__pollmap_get(ch, fd))) {
        r = -ENOENT;
    } else if (in_set(ws, fd, events != 0) < 0) {
        r = -ENOMEM;
    } else if (owner) {
        pthread_mutex_unlock(&ws->lock);
        mp__watch_apply(ch); /* what other threads recorded before this call comes first */
        r = apply_one(ch, &c);
        pthread_mutex_lock(&ws->lock);
        if (r < 0) in_set(ws, fd, mp__pollmap_get(ch, fd) != 0);
        if (r == -ENOENT) r = 0; /* in the callers' view, dropped by the owner meanwhile */
    } else {
        r = record(ch, ws, &c);
        if (r == 0 && atomic_fetch_add(&ch->ws_pending, 1) == 0) ch->eng->wake(ch);
    }
    pthread_mutex_unlock(&ws->lock);
    return r;
}

int mp_watch(mp_channel *ch, int fd, uint32_t events, int flags, void *cookie) {
    return watch(ch, fd, events, flags, cookie);
}

int mp_unwatch(mp_channel *ch, int fd) { return watch(ch, fd, 0, 0, NULL); }

void mp__watch_free(mp_channel *ch) {
    struct mp_wset *ws = ch->ws;
    if (!ws) return;
    pthread_mutex_destroy(&ws->lock);
    free(ws->in);
    free(ws->q);
    free(ws);
    ch->ws = NULL;
}
