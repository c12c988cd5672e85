/*
 * poll.c — the readiness set's semantics, shared by both engines and every front-end: a watch
 * is a handle of kind HK_POLL; engines only arm it (io_uring: a poll request per fd, or an
 * entry in a kernel epoll set driven through the ring; epoll engine: an epoll set) and report
 * what the kernel saw through mp__poll_done().  Here:
 *   - level-triggered: one event per fd in the queue at most (later readiness merges into it);
 *     a poll request is re-armed only after that event was handed out (mp__poll_popped), so
 *     the next wait looks again exactly when epoll_wait() would;
 *   - edge-triggered: each report the kernel makes (a transition) becomes an event, merged
 *     into the queued one if the application has not taken it yet;
 *   - one-shot: after one event the watch stays quiet until its interest is set again.
 * mp_poll_add/mod/del are the owner-thread handle form; watch.c is the fd-keyed form that any
 * thread may call.
 */
#include <errno.h>
#include <fcntl.h>
#include <sys/epoll.h>

#include "internal.h"

#define POLL_EVENTS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI)
#define POLL_FLAGS (MP_POLL_ET | MP_POLL_ONESHOT)

mp_handle *mp__poll_add(mp_channel *ch, int fd, uint32_t events, int flags, void *cookie,
                        int *err) {
    if (fd < 0 || fcntl(fd, F_GETFD) < 0) {
        *err = EBADF;
        return NULL;
    }
    if ((events & ~(uint32_t)POLL_EVENTS) || (flags & ~POLL_FLAGS)) {
        *err = EINVAL;
        return NULL;
    }
    if (mp__pollmap_get(ch, fd)) {
        *err = EEXIST;
        return NULL;
    }
    mp_handle *h = mp__handle_alloc(ch);
    if (!h || mp__pollmap_set(ch, fd, h->idx + 1) < 0) {
        if (h) mp__handle_free(h);
        *err = ENOMEM;
        return NULL;
    }
    h->kind = HK_POLL;
    ch->poll_slots++;
    h->fd = h->id = fd;
    h->cookie = cookie;
    h->pw.events = events;
    h->pw.flags = flags;
    int r = ch->eng->attach(ch, h);
    if (r == 0) r = ch->eng->poll_arm(ch, h);
    if (r < 0) {
        ch->eng->detach(ch, h);
        mp__pollmap_set(ch, fd, 0);
        mp__handle_free(h);
        *err = -r;
        return NULL;
    }
    ch->st.handles++;
    ch->st.requests++;
    return h;
}

mp_handle *mp_poll_add(mp_channel *ch, int fd, uint32_t events, int flags, void *cookie) {
    int e = mp__ch_enter(ch);
    if (e < 0) {
        errno = -e;
        return NULL;
    }
    mp__watch_apply(ch); /* changes other threads recorded come first */
    int err = 0;
    mp_handle *h = mp__poll_add(ch, fd, events, flags, cookie, &err);
    if (!h) errno = err;
    return h;
}

int mp__poll_mod(mp_handle *h, uint32_t events, int flags, void *cookie, bool again) {
    if ((events & ~(uint32_t)POLL_EVENTS) || (flags & ~POLL_FLAGS)) return -EINVAL;
    h->cookie = cookie;
    bool same = events == h->pw.events && flags == h->pw.flags;
    if (same && h->pw.armed && !h->pw.fired && !again) return 0;
    h->pw.events = events;
    h->pw.flags = flags;
    h->pw.fired = false;
    h->ch->st.requests++;
    return h->ch->eng->poll_arm(h->ch, h);
}

int mp_poll_mod(mp_handle *h, uint32_t events, int flags) {
    int e = mp__h_enter(h);
    if (e < 0) return e;
    if (h->kind != HK_POLL) return -EBADF;
    return mp__poll_mod(h, events, flags, h->cookie, false);
}

int mp_poll_del(mp_handle *h) {
    int e = mp__h_enter(h);
    if (e < 0) return e;
    if (h->kind != HK_POLL) return -EBADF;
    h->ch->st.requests++;
    mp__handle_end(h); /* from here on only the watch's CLOSED event is delivered */
    return 0;
}

/* The queued record of h's latest event, or NULL when it was handed out (or dropped). */
static mp_event *queued_event(const mp_handle *h) {
    const mp_channel *ch = h->ch;
    if (!h->pw.qseq || h->pw.qseq <= ch->evq_popped) return NULL;
    uint64_t pos = h->pw.qseq - 1 - ch->evq_popped;
    if (pos >= ch->evq_len) return NULL;
    mp_qev *q = &ch->evq[(ch->evq_head + pos) % ch->evq_cap];
    if (q->ev.handle != h || q->gen != h->gen || q->ev.cmd != MP_EV_POLL) return NULL;
    return &q->ev;
}

bool mp__poll_queued(const mp_handle *h) { return queued_event(h) != NULL; }

bool mp__poll_done(mp_handle *h, uint32_t revents) {
    revents &= h->pw.events | EPOLLERR | EPOLLHUP;
    mp_event *ev = queued_event(h);
    if (!revents || h->pw.fired) return ev != NULL;
    if (ev) { /* not taken yet: one event per fd in the queue */
        ev->u.poll.revents |= revents;
        ev->result = (ssize_t)ev->u.poll.revents;
        return true;
    }
    ev = mp__event_push_ref(h->ch, h, MP_EV_POLL, (ssize_t)revents, 0);
    if (!ev) return false; /* no memory: a level-triggered watch reports it again */
    ev->u.poll.fd = h->id;
    ev->u.poll.revents = revents;
    h->pw.qseq = h->ch->evq_pushed; /* push number of this record (1-based) */
    if (h->pw.flags & MP_POLL_ONESHOT) h->pw.fired = true;
    return true;
}

void mp__poll_popped(mp_handle *h) {
    if (!h->pw.armed && !h->pw.fired && h->pw.events) mp__rearm_add(h);
}
