/*
 * poll.c — the readiness adapter: mp_poll_add/mod/del for event libraries that need
 * readiness (libevent, libuv's non-stream handles, the compat epoll layer).  A watch is a
 * handle of kind HK_POLL; engines arm it (io_uring: one-shot poll re-armed at the next wait
 * for level-triggered, multishot poll for edge-triggered; epoll: the epoll set itself) and
 * report through mp__poll_done().  Arming, changing and removing are queued requests.
 */
#include <errno.h>
#include <fcntl.h>
#include <sys/epoll.h>

#include "internal.h"

#define POLL_EVENTS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI)

mp_handle *mp_poll_add(mp_channel *ch, int fd, uint32_t events, int flags, void *cookie) {
    int e = mp__ch_enter(ch);
    if (e < 0) {
        errno = -e;
        return NULL;
    }
    if (fd < 0 || fcntl(fd, F_GETFD) < 0) {
        errno = EBADF;
        return NULL;
    }
    if ((events & ~(uint32_t)POLL_EVENTS) || (flags & ~MP_POLL_ET)) {
        errno = EINVAL;
        return NULL;
    }
    if (mp__pollmap_get(ch, fd)) {
        errno = EEXIST;
        return NULL;
    }
    mp_handle *h = mp__handle_alloc(ch);
    if (!h || mp__pollmap_set(ch, fd, h->idx + 1) < 0) {
        if (h) mp__handle_free(h);
        errno = ENOMEM;
        return NULL;
    }
    h->kind = HK_POLL;
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
        errno = -r;
        return NULL;
    }
    ch->st.handles++;
    ch->st.requests++;
    return h;
}

int mp_poll_mod(mp_handle *h, uint32_t events, int flags) {
    int e = mp__h_enter(h);
    if (e < 0) return e;
    if (h->kind != HK_POLL) return -EBADF;
    if ((events & ~(uint32_t)POLL_EVENTS) || (flags & ~MP_POLL_ET)) return -EINVAL;
    if (events == h->pw.events && flags == h->pw.flags && h->pw.armed) return 0;
    h->pw.events = events;
    h->pw.flags = flags;
    h->ch->st.requests++;
    return h->ch->eng->poll_arm(h->ch, h);
}

int mp_poll_del(mp_handle *h) {
    int e = mp__h_enter(h);
    if (e < 0) return e;
    if (h->kind != HK_POLL) return -EBADF;
    h->ch->st.requests++;
    mp__handle_end(h); /* from here on only the watch's CLOSED event is delivered */
    return 0;
}

void mp__poll_done(mp_handle *h, uint32_t revents) {
    revents &= h->pw.events | EPOLLERR | EPOLLHUP;
    if (!revents) return;
    mp_event *ev = mp__event_push_ref(h->ch, h, MP_EV_POLL, (ssize_t)revents, 0);
    if (ev) {
        ev->u.poll.fd = h->id;
        ev->u.poll.revents = revents;
    }
}
