/*
 * fepoll.c — foreign epoll sets: mp_epoll_ctl() and mp_epoll_wait() serve an epoll set the
 * application made itself through the channel's engine (on io_uring: EPOLL_CTL requests
 * queued with the rest, one EPOLL_WAIT per wait), and mp_close() closes an fd of the
 * application's with them.  The core checks arguments and keeps the queued requests the
 * kernel refused, to report them as events of their set.
 */
#include <errno.h>
#include <stdlib.h>
#include <sys/epoll.h>

#include "internal.h"

int mp_epoll_ctl(mp_channel *ch, int epfd, int op, int fd, const struct epoll_event *event) {
    int r = mp__ch_enter(ch);
    if (r) return r;
    if (op != EPOLL_CTL_ADD && op != EPOLL_CTL_MOD && op != EPOLL_CTL_DEL) return -EINVAL;
    if (op != EPOLL_CTL_DEL && !event) return -EFAULT;
    if (epfd < 0 || fd < 0) return -EBADF;
    ch->st.epoll_ctls++;
    return ch->eng->epoll_ctl(ch, epfd, op, fd, event);
}

void mp__fepoll_failed(mp_channel *ch, int epfd, int op, uint64_t data, int res) {
    ch->st.epoll_ctl_failed++;
    /* DEL: nothing to report.  EBADF/ENOENT: the fd was closed before the request ran, and
     * its data may name what the application freed with it: never hand that out. */
    if (op == EPOLL_CTL_DEL || res == -EBADF || res == -ENOENT) return;
    if (ch->nfefail == ch->fefail_cap) {
        size_t cap = ch->fefail_cap ? ch->fefail_cap * 2 : 8;
        struct mp_fefail *n = realloc(ch->fefail, cap * sizeof *n);
        if (!n) return; /* counted above; cannot report */
        ch->fefail = n;
        ch->fefail_cap = cap;
    }
    ch->fefail[ch->nfefail++] = (struct mp_fefail){epfd, EPOLLERR | EPOLLHUP, data};
}

/* Hand out refused requests of epfd as events (they were made before anything the wait
 * would return). */
static int take_failed(mp_channel *ch, int epfd, struct epoll_event *evs, int max) {
    int n = 0;
    size_t keep = 0;
    for (size_t i = 0; i < ch->nfefail; i++) {
        struct mp_fefail f = ch->fefail[i];
        if (f.epfd == epfd && n < max)
            evs[n++] = (struct epoll_event){.events = f.events, .data.u64 = f.data};
        else
            ch->fefail[keep++] = f;
    }
    ch->nfefail = keep;
    return n;
}

int mp_epoll_wait(mp_channel *ch, int epfd, struct epoll_event *events, int maxevents,
                  int64_t timeout_ns, const sigset_t *sigmask) {
    return mp_epoll_wait_flags(ch, epfd, events, maxevents, timeout_ns, sigmask, 0);
}

int mp_epoll_wait_flags(mp_channel *ch, int epfd, struct epoll_event *events, int maxevents,
                        int64_t timeout_ns, const sigset_t *sigmask, int flags) {
    int r = mp__ch_enter(ch);
    if (r) return r;
    if (flags & ~MP_EPOLL_WAIT_CHANNEL) return -EINVAL;
    if (maxevents <= 0) return -EINVAL;
    if (!events) return -EFAULT;
    if (epfd < 0) return -EBADF;
    ch->st.epoll_waits++;
    if (ch->nfefail && (r = take_failed(ch, epfd, events, maxevents)) > 0) return r;
    if (timeout_ns < -1) timeout_ns = -1;
    r = ch->eng->epoll_wait(ch, epfd, events, maxevents, timeout_ns, sigmask, flags);
    if (r == 0 && ch->nfefail) r = take_failed(ch, epfd, events, maxevents);
    return r;
}

int mp_close(mp_channel *ch, int fd) {
    int r = mp__ch_enter(ch);
    if (r) return r;
    if (fd < 0 || mp_is_lwsocket(fd)) return -EBADF;
    return ch->eng->close_fd(ch, fd);
}
