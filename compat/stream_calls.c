/*
 * compat/stream_calls.c — stream mode's interposed socket calls: read/recv/recvmsg/readv and
 * write/send/sendmsg/writev served from a stream's state (stream.c), and the calls that must
 * see the stream as the application wrote and read it (sendfile, splice, shutdown, ioctl
 * FIONREAD, fcntl O_NONBLOCK, getsockopt SO_ERROR, setsockopt SO_LINGER/TCP_CORK/TCP_NODELAY).
 * An fd that is not an adopted stream gets the real call.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <unistd.h>

#include "stream_int.h"

static int fail(int err) {
    errno = err;
    return -1;
}

#define REAL(name) (mpr_real.name ? mpr_real.name : (mpr_init(), mpr_real.name))

ssize_t read(int fd, void *buf, size_t n) {
    struct mpr_stream *s = adopted(fd);
    if (!s) return REAL(read)(fd, buf, n);
    struct iovec v = {buf, n};
    return mps_recv(s, &v, 1, 0);
}

ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen) {
    if (n > buflen) __builtin_trap();
    return read(fd, buf, n);
}

ssize_t readv(int fd, const struct iovec *iov, int cnt) {
    struct mpr_stream *s = adopted(fd);
    if (!s || cnt <= 0 || cnt > IOV_MAX) return REAL(readv)(fd, iov, cnt);
    return mps_recv(s, iov, cnt, 0);
}

ssize_t recv(int fd, void *buf, size_t n, int flags) {
    struct mpr_stream *s = adopted(fd);
    if (!s || (flags & (MSG_OOB | MSG_ERRQUEUE))) return REAL(recv)(fd, buf, n, flags);
    struct iovec v = {buf, n};
    return mps_recv(s, &v, 1, flags);
}

ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags) {
    if (n > buflen) __builtin_trap();
    return recv(fd, buf, n, flags);
}

ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *a, socklen_t *al) {
    struct mpr_stream *s = adopted(fd);
    if (!s || (flags & (MSG_OOB | MSG_ERRQUEUE))) return REAL(recvfrom)(fd, buf, n, flags, a, al);
    struct iovec v = {buf, n};
    ssize_t r = mps_recv(s, &v, 1, flags);
    if (r >= 0 && a && al) *al = 0; /* a connected TCP socket names no sender */
    return r;
}

ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags, struct sockaddr *a,
                       socklen_t *al) {
    if (n > buflen) __builtin_trap();
    return recvfrom(fd, buf, n, flags, a, al);
}

ssize_t recvmsg(int fd, struct msghdr *m, int flags) {
    struct mpr_stream *s = adopted(fd);
    if (!s || !m || (flags & (MSG_OOB | MSG_ERRQUEUE)) || m->msg_iovlen > IOV_MAX)
        return REAL(recvmsg)(fd, m, flags);
    ssize_t r = mps_recv(s, m->msg_iov, (int)m->msg_iovlen, flags);
    if (r >= 0) {
        m->msg_namelen = 0;
        m->msg_controllen = 0;
        m->msg_flags = 0;
    }
    return r;
}

ssize_t write(int fd, const void *buf, size_t n) {
    struct mpr_stream *s = adopted(fd);
    if (!s) return REAL(write)(fd, buf, n);
    struct iovec v = {(void *)buf, n};
    return mps_send(s, &v, 1, 0);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    struct mpr_stream *s = adopted(fd);
    if (!s || cnt <= 0 || cnt > IOV_MAX) return REAL(writev)(fd, iov, cnt);
    return mps_send(s, iov, cnt, 0);
}

ssize_t send(int fd, const void *buf, size_t n, int flags) {
    struct mpr_stream *s = adopted(fd);
    if (!s) return REAL(send)(fd, buf, n, flags);
    if (flags & MSG_OOB) { /* not queued: after every byte queued before it */
        if (!mps_flush_before(s, 0, flags & MSG_DONTWAIT)) return fail(EAGAIN);
        return mpr_real.send(fd, buf, n, flags);
    }
    struct iovec v = {(void *)buf, n};
    return mps_send(s, &v, 1, flags);
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *a, socklen_t al) {
    struct mpr_stream *s = adopted(fd);
    if (!s) return REAL(sendto)(fd, buf, n, flags, a, al);
    if (flags & MSG_OOB) {
        if (!mps_flush_before(s, 0, flags & MSG_DONTWAIT)) return fail(EAGAIN);
        return mpr_real.sendto(fd, buf, n, flags, a, al);
    }
    struct iovec v = {(void *)buf, n};
    return mps_send(s, &v, 1, flags);
}

ssize_t sendmsg(int fd, const struct msghdr *m, int flags) {
    struct mpr_stream *s = adopted(fd);
    if (!s) return REAL(sendmsg)(fd, m, flags);
    if (!m || (flags & MSG_OOB) || m->msg_controllen || m->msg_iovlen > IOV_MAX) {
        if (!mps_flush_before(s, 0, flags & MSG_DONTWAIT)) return fail(EAGAIN);
        return mpr_real.sendmsg(fd, m, flags);
    }
    return mps_send(s, m->msg_iov, (int)m->msg_iovlen, flags);
}

/* A real send on a stream returned EAGAIN: OUT is reported again when the kernel says so. */
static void kout_wait(struct mpr_stream *s) {
    pthread_mutex_lock(&s->mu);
    if (is_owner(s)) {
        bool was = mpr_t.busy;
        mpr_t.busy = true;
        if (mp_watch(s->own->ch, s->fd, EPOLLOUT, MP_POLL_ONESHOT, (char *)s + 1) == 0) {
            s->kout_blocked = true;
            s->kout_watch = true;
        }
        mpr_t.busy = was;
    }
    pthread_mutex_unlock(&s->mu);
}

/* sendfile to a stream: through the queue when mps_sendfile takes it; else every queued byte
 * goes first (with MSG_MORE: the body follows), then the real call. */
static ssize_t stream_sendfile(ssize_t (*fn)(int, int, off_t *, size_t), struct mpr_stream *s,
                               int out, int in, off_t *off, size_t n) {
    ssize_t r;
    if (mps_sendfile(s, in, off, n, &r)) return r;
    if (!mps_flush_before(s, MSG_MORE, false)) return fail(EAGAIN);
    r = fn(out, in, off, n);
    if (r < 0 && errno == EAGAIN) kout_wait(s);
    return r;
}

ssize_t sendfile(int out, int in, off_t *off, size_t n) {
    struct mpr_stream *s = adopted(out);
    if (!s) return REAL(sendfile)(out, in, off, n);
    return stream_sendfile(mpr_real.sendfile, s, out, in, off, n);
}

ssize_t sendfile64(int out, int in, off_t *off, size_t n) {
    struct mpr_stream *s = adopted(out);
    ssize_t (*fn)(int, int, off_t *, size_t) = mpr_real.sendfile64 ? mpr_real.sendfile64 : REAL(sendfile);
    if (!s) return fn(out, in, off, n);
    return stream_sendfile(fn, s, out, in, off, n);
}

ssize_t splice(int in, loff_t *offin, int out, loff_t *offout, size_t n, unsigned flags) {
    struct mpr_stream *si = adopted(in), *so = adopted(out);
    if (!si && !so) return REAL(splice)(in, offin, out, offout, n, flags);
    if (si) {
        /* From a stream: the bytes it holds, written to out (a pipe) with the real call. */
        pthread_mutex_lock(&si->mu);
        int64_t until = mps_deadline(si->rcvtimeo);
        ssize_t r;
        for (;;) {
            if (si->rx_bytes) {
                struct rxb *b = &si->rx[si->rx_head];
                size_t k = b->len - b->off < n ? b->len - b->off : n;
                r = mpr_real.write(out, b->p + b->off, k);
                if (r > 0) { /* consume the r bytes written */
                    char tmp[4096];
                    size_t left = (size_t)r;
                    while (left) {
                        size_t m = left < sizeof tmp ? left : sizeof tmp;
                        struct iovec tv = {tmp, m};
                        mps_take(si, &tv, 1, false);
                        left -= m;
                    }
                } else if (r < 0) {
                    r = -errno;
                }
                break;
            }
            if (si->rx_err) {
                r = -si->rx_err;
                si->rx_err = si->so_err = 0;
                si->rx_eof = true;
                break;
            }
            if (si->rx_eof || n == 0) {
                r = 0;
                break;
            }
            if (si->nonblock || (flags & SPLICE_F_NONBLOCK) || mps_past(until)) {
                r = -EAGAIN;
                break;
            }
            mps_block_on(si, until);
        }
        pthread_mutex_unlock(&si->mu);
        if (r < 0) return fail((int)-r);
        return r;
    }
    if (!mps_flush_before(so, MSG_MORE, flags & SPLICE_F_NONBLOCK)) return fail(EAGAIN);
    ssize_t r = mpr_real.splice(in, offin, out, offout, n, flags);
    if (r < 0 && errno == EAGAIN) kout_wait(so);
    return r;
}

int shutdown(int fd, int how) {
    struct mpr_stream *s = adopted(fd);
    if (!s) return REAL(shutdown)(fd, how);
    if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR) return fail(EINVAL);
    if (how != SHUT_WR && mpr_real.shutdown(fd, SHUT_RD) < 0) return -1;
    if (how == SHUT_RD) return 0;
    pthread_mutex_lock(&s->mu);
    s->shut_wr = true; /* the FIN follows every byte queued before it */
    if (is_owner(s)) {
        bool was = mpr_t.busy;
        mpr_t.busy = true;
        mps_service(s);
        pthread_mutex_unlock(&s->mu);
        mps_kick(s->own); /* shutdown flushes: the bytes and the FIN go now */
        pthread_mutex_lock(&s->mu);
        mpr_t.busy = was;
    } else {
        mps_mark_dirty(s);
    }
    mps_mark_rdy(s);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

int getsockopt(int fd, int level, int name, void *val, socklen_t *len) {
    struct mpr_stream *s = adopted(fd);
    if (s && level == IPPROTO_TCP && name == TCP_CORK && val && len && *len >= sizeof(int)) {
        pthread_mutex_lock(&s->mu);
        bool user = !s->kcork, on = s->cork;
        pthread_mutex_unlock(&s->mu);
        if (user) { /* the cork the stream keeps (see setsockopt) */
            *(int *)val = on;
            *len = sizeof(int);
            return 0;
        }
    }
    if (!s || level != SOL_SOCKET || name != SO_ERROR || !val || !len || *len < sizeof(int))
        return REAL(getsockopt)(fd, level, name, val, len);
    pthread_mutex_lock(&s->mu);
    int e = s->so_err;
    s->so_err = 0;
    if (e && s->rx_err) { /* taken here: reads then see the end, writes EPIPE (the kernel's) */
        s->rx_err = 0;
        s->rx_eof = true;
    }
    if (e && s->wr_err == ECONNRESET) s->wr_err = EPIPE;
    pthread_mutex_unlock(&s->mu);
    if (!e) return mpr_real.getsockopt(fd, level, name, val, len);
    *(int *)val = e;
    *len = sizeof(int);
    return 0;
}

static bool is_timeo(int level, int name) {
    if (level != SOL_SOCKET) return false;
#if defined(SO_RCVTIMEO_NEW) && defined(SO_SNDTIMEO_NEW)
    if (name == SO_RCVTIMEO_NEW || name == SO_SNDTIMEO_NEW) return true;
#endif
    return name == SO_RCVTIMEO || name == SO_SNDTIMEO;
}

static bool is_rcvtimeo(int name) {
#ifdef SO_RCVTIMEO_NEW
    if (name == SO_RCVTIMEO_NEW) return true;
#endif
    return name == SO_RCVTIMEO;
}

int setsockopt(int fd, int level, int name, const void *val, socklen_t len) {
    struct mpr_stream *s = st_of(fd);
    if (is_timeo(level, name) && mpr_streams && !mpr_t.busy) {
        /* Blocking stream calls honour the timeouts: the stream keeps the kernel's value (read
         * back: the kernel's rounding and its rules for odd values); a socket accepted later
         * inherits a listener's, read at its adoption. */
        int r = REAL(setsockopt)(fd, level, name, val, len);
        if (r == 0) {
            atomic_store(&mpr_timeo_seen, true);
            if (s) {
                bool rcv = is_rcvtimeo(name);
                int64_t ns = mps_kernel_timeo(fd, rcv ? SO_RCVTIMEO : SO_SNDTIMEO);
                pthread_mutex_lock(&s->mu);
                if (rcv) s->rcvtimeo = ns;
                else s->sndtimeo = ns;
                pthread_mutex_unlock(&s->mu);
            }
        }
        return r;
    }
    if (!s || mpr_t.busy) return REAL(setsockopt)(fd, level, name, val, len);
    if (level == SOL_SOCKET && name == SO_LINGER && val && len >= sizeof(struct linger)) {
        int r = mpr_real.setsockopt(fd, level, name, val, len);
        if (r == 0) {
            const struct linger *l = val;
            pthread_mutex_lock(&s->mu);
            s->linger = l->l_onoff ? l->l_linger : -1;
            pthread_mutex_unlock(&s->mu);
        }
        return r;
    }
    bool cork = level == IPPROTO_TCP && name == TCP_CORK && val && len >= sizeof(int);
    if (cork && s->own) {
        /* TCP_CORK asks the kernel to hold partial segments until it is cleared.  Write-behind
         * already holds every byte until the owner's next wait and hands them to the socket in
         * one send, so an adopted stream keeps the option itself: no system call, and no real
         * send of the queued bytes that a kernel cork would have to follow.  Only a cork set on
         * the kernel's socket (before the stream was adopted) is cleared there. */
        pthread_mutex_lock(&s->mu);
        bool user = !s->kcork;
        if (user) s->cork = *(const int *)val != 0;
        pthread_mutex_unlock(&s->mu);
        if (user) return 0;
    }
    /* TCP_NODELAY (and a cork the kernel's socket already has) go to the kernel at once,
     * without waiting for the queue: queued bytes leave in whole batches anyway, and a peer
     * that does not read must not stall the thread in a setsockopt. */
    int r = mpr_real.setsockopt(fd, level, name, val, len);
    if (r == 0 && cork) {
        pthread_mutex_lock(&s->mu);
        s->kcork = *(const int *)val != 0;
        pthread_mutex_unlock(&s->mu);
    }
    return r;
}

static void set_nonblock(int fd, bool on) {
    struct mpr_stream *s = st_of(fd);
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->nonblock = on;
    pthread_mutex_unlock(&s->mu);
}

int ioctl(int fd, unsigned long req, ...) {
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    struct mpr_stream *s = st_of(fd);
    if (!s || mpr_t.busy) return REAL(ioctl)(fd, req, arg);
    if (req == FIONREAD && s->own && arg) {
        int k = 0;
        if (mpr_real.ioctl(fd, req, &k) < 0) k = 0;
        pthread_mutex_lock(&s->mu);
        size_t tot = s->rx_bytes + (size_t)k;
        pthread_mutex_unlock(&s->mu);
        *(int *)arg = tot > INT_MAX ? INT_MAX : (int)tot;
        return 0;
    }
    int r = mpr_real.ioctl(fd, req, arg);
    if (r == 0 && req == FIONBIO && arg) set_nonblock(fd, *(int *)arg != 0);
    return r;
}

static int fcntl_common(int (*fn)(int, int, ...), int fd, int cmd, void *arg) {
    int r = fn(fd, cmd, arg);
    if (r >= 0 && cmd == F_SETFL && mpr_streams && !mpr_t.busy)
        set_nonblock(fd, ((long)(intptr_t)arg & O_NONBLOCK) != 0);
    return r;
}

int fcntl(int fd, int cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return fcntl_common(REAL(fcntl), fd, cmd, arg);
}

int fcntl64(int fd, int cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    REAL(fcntl);
    return fcntl_common(mpr_real.fcntl64 ? mpr_real.fcntl64 : mpr_real.fcntl, fd, cmd, arg);
}

