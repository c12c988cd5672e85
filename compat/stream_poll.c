/*
 * compat/stream_poll.c — stream mode's poll(), ppoll(), select() and pselect(): when the fds
 * asked about include adopted streams (stream.c), the streams answer from their state and the
 * other fds from the kernel; the calling thread's own streams are waited for on its channel,
 * anything else is looked at again every 10 ms while nothing is ready.  Without streams among
 * them every call is the real one.  Uses stream.c (mpr_stream_poll, mpr_stream_pump).
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "preload.h"

#define REAL(name) (mpr_real.name ? mpr_real.name : (mpr_init(), mpr_real.name))

static int fail(int err) {
    errno = err;
    return -1;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* fd is an adopted stream (its events are not asked for here). */
static bool is_stream(int fd) {
    short r;
    bool owner;
    return mpr_stream_poll(fd, 0, &r, &owner);
}

/* poll() over a set that holds streams: streams answer from their state, the other fds from
 * the kernel.  The calling thread's own streams are waited for on its channel; anything else
 * is looked at again every 10 ms while nothing is ready. */
static int poll_streams(struct pollfd *fds, nfds_t n, int64_t ns, const sigset_t *mask) {
    int64_t deadline = ns > 0 ? now_ns() + ns : 0;
    struct pollfd *k = n <= 64 ? (struct pollfd[64]){{0}} : calloc(n, sizeof *k);
    if (!k) return fail(ENOMEM);
    for (;;) {
        int ready = 0;
        nfds_t nk = 0;
        bool own_only = true;
        for (nfds_t i = 0; i < n; i++) {
            bool owner;
            if (mpr_stream_poll(fds[i].fd, fds[i].events, &fds[i].revents, &owner)) {
                if (fds[i].revents) ready++;
                if (!owner) own_only = false;
            } else {
                k[nk] = fds[i];
                k[nk++].revents = 0;
            }
        }
        int64_t t = ready ? 0 : ns;
        if (t > 0) {
            t = deadline - now_ns();
            if (t < 0) t = 0;
        }
        int kr = 0;
        if (!nk && t != 0 && own_only &&
            mpr_stream_pump(t < 0 || t > 1000000000 ? 1000 : (int)(t / 1000000) + 1)) {
            /* waited on this thread's channel, which its streams' events end */
        } else if (nk || t != 0) {
            /* the kernel's fds, or a slice of sleep while other threads' streams get ready */
            int64_t slice = t < 0 || t > 10000000 ? 10000000 : t;
            struct timespec ts = {slice / 1000000000, slice % 1000000000};
            kr = REAL(ppoll)(k, nk, &ts, mask);
            if (kr < 0 && !ready) {
                if (n > 64) free(k);
                return -1;
            }
        }
        mpr_stream_pump(0);
        if (kr > 0 || ready) {
            nfds_t j = 0;
            int total = 0;
            for (nfds_t i = 0; i < n; i++) {
                if (is_stream(fds[i].fd)) {
                    if (fds[i].revents) total++;
                } else {
                    fds[i].revents = kr > 0 ? k[j].revents : 0;
                    if (fds[i].revents) total++;
                    j++;
                }
            }
            if (n > 64) free(k);
            return total;
        }
        if (ns == 0 || (ns > 0 && now_ns() >= deadline)) {
            for (nfds_t i = 0; i < n; i++) fds[i].revents = 0;
            if (n > 64) free(k);
            return 0;
        }
    }
}

static bool any_stream(const struct pollfd *fds, nfds_t n) {
    if (!mpr_streams || mpr_t.busy) return false;
    for (nfds_t i = 0; i < n; i++)
        if (is_stream(fds[i].fd)) return true;
    return false;
}

/* glibc declares poll/ppoll's array write-only (access attribute: __fortify_function), which
 * is not true of poll(2) (it reads fd and events) nor of this interposer: some builds (the
 * sanitizer's) then warn that reading it may see uninitialized memory. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
int poll(struct pollfd *fds, nfds_t n, int timeout) {
    if (!any_stream(fds, n)) return REAL(poll)(fds, n, timeout);
    return poll_streams(fds, n, timeout < 0 ? -1 : (int64_t)timeout * 1000000, NULL);
}

int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t fdslen) {
    if (fdslen / sizeof *fds < n) __builtin_trap();
    return poll(fds, n, timeout);
}

int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts, const sigset_t *mask) {
    if (!any_stream(fds, n)) return REAL(ppoll)(fds, n, ts, mask);
    return poll_streams(fds, n, ts ? (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec : -1, mask);
}
#pragma GCC diagnostic pop

/* select()/pselect(): when a stream is in the sets, the same as poll() over them. */
static int select_streams(int nfds, fd_set *r, fd_set *w, fd_set *e, int64_t ns, const sigset_t *mask) {
    struct pollfd *p = calloc((size_t)nfds, sizeof *p);
    if (!p) return fail(ENOMEM);
    nfds_t n = 0;
    for (int fd = 0; fd < nfds; fd++) {
        short ev = 0;
        if (r && FD_ISSET(fd, r)) ev |= POLLIN;
        if (w && FD_ISSET(fd, w)) ev |= POLLOUT;
        if (e && FD_ISSET(fd, e)) ev |= POLLPRI;
        if (ev) p[n++] = (struct pollfd){.fd = fd, .events = ev};
    }
    int k = poll_streams(p, n, ns, mask);
    if (k < 0) {
        free(p);
        return -1;
    }
    if (r) FD_ZERO(r);
    if (w) FD_ZERO(w);
    if (e) FD_ZERO(e);
    int total = 0;
    for (nfds_t i = 0; i < n; i++) {
        short rv = p[i].revents;
        if (rv & POLLNVAL) {
            free(p);
            return fail(EBADF);
        }
        if (r && (p[i].events & POLLIN) && (rv & (POLLIN | POLLHUP | POLLERR))) FD_SET(p[i].fd, r), total++;
        if (w && (p[i].events & POLLOUT) && (rv & (POLLOUT | POLLERR))) FD_SET(p[i].fd, w), total++;
        if (e && (p[i].events & POLLPRI) && (rv & POLLPRI)) FD_SET(p[i].fd, e), total++;
    }
    free(p);
    return total;
}

static bool select_has_stream(int nfds, fd_set *r, fd_set *w) {
    if (!mpr_streams || mpr_t.busy || nfds <= 0 || nfds > FD_SETSIZE) return false;
    for (int fd = 0; fd < nfds; fd++)
        if (((r && FD_ISSET(fd, r)) || (w && FD_ISSET(fd, w))) && is_stream(fd)) return true;
    return false;
}

int select(int nfds, fd_set *r, fd_set *w, fd_set *e, struct timeval *tv) {
    if (!select_has_stream(nfds, r, w)) return REAL(select)(nfds, r, w, e, tv);
    return select_streams(nfds, r, w, e, tv ? (int64_t)tv->tv_sec * 1000000000 + tv->tv_usec * 1000 : -1,
                          NULL);
}

int pselect(int nfds, fd_set *r, fd_set *w, fd_set *e, const struct timespec *ts, const sigset_t *mask) {
    if (!select_has_stream(nfds, r, w)) return REAL(pselect)(nfds, r, w, e, ts, mask);
    return select_streams(nfds, r, w, e, ts ? (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec : -1, mask);
}

