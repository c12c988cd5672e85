/*
 * compat/fdtab.c — what the epoll emulation knows about fd numbers, and the interposed calls
 * that keep it true.
 *
 * An epoll_ctl() may be queued (answered at once, handed to the kernel with the next wait)
 * only when its result is known: the set is one this process made and nobody else changes
 * (not inherited over fork, not reachable through a dup of its fd), the target fd names a
 * file that can be watched (a socket, pipe or eventfd this process saw made, or an fd whose
 * earlier ADD the kernel accepted), and the set's interest list says whether the fd has an
 * entry.  Everything else goes to the kernel at once, and its answer updates the list.
 *
 * The interest list is kept per fd number, for the file the number names now: closing the
 * number (close, close_range, closefrom, dup2/dup3 over it) clears its entries, and so does a
 * new file getting the number (socket, accept...), which also covers closes that did not come
 * through here.  Closing an fd that queued changes still name applies them first.
 *
 * One lock guards it all; the fast path of close() looks at the fd's entry without it (a
 * plain byte that only this process's own close/creation calls change).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include "preload.h"

struct fdent {
    uint8_t kind;    /* enum mpr_kind */
    uint16_t nwatch; /* sets with an entry for this number */
    uint32_t pend;   /* queued changes naming this number */
    uint32_t ep;     /* FK_EPOLL: index in g_eps */
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static struct fdent *g_fd; /* indexed by fd number, g_cap entries, mapped once */
static size_t g_cap;
static struct mpr_ep **g_eps;
static size_t g_neps, g_epcap;
static pthread_once_t g_tab_once = PTHREAD_ONCE_INIT;

/* fork: the sets stay the kernel's and are now shared with the child, so from here on every
 * change to them goes to the kernel at once (another process may change them too); queued
 * changes are applied before the fork so that both processes see them. */
static void mark_shared(struct mpr_ep *ep) { ep->shared = true; }

static void fork_prepare(void) {
    if (mpr_state <= 0) return;
    pthread_mutex_lock(&g_lock);
    mpr_pend_flush_all();
}

static void fork_done(void) {
    if (mpr_state <= 0) return;
    mpr_each_ep(mark_shared);
    pthread_mutex_unlock(&g_lock);
}

static void tab_init(void) {
    pthread_atfork(fork_prepare, fork_done, fork_done);
    struct rlimit rl;
    size_t n = 65536;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_max != RLIM_INFINITY && rl.rlim_max > n)
        n = rl.rlim_max;
    if (n > (1u << 22)) n = 1u << 22; /* fds above are simply not tracked (real calls) */
    void *p = mmap(NULL, n * sizeof *g_fd, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return;
    g_fd = p;
    g_cap = n;
}

void mpr_lock(void) {
    pthread_once(&g_tab_once, tab_init);
    pthread_mutex_lock(&g_lock);
}
void mpr_unlock(void) { pthread_mutex_unlock(&g_lock); }

static inline bool tracked(int fd) { return fd >= 0 && (size_t)fd < g_cap; }

enum mpr_kind mpr_kind_of(int fd) { return tracked(fd) ? (enum mpr_kind)g_fd[fd].kind : FK_UNKNOWN; }

void mpr_set_kind(int fd, enum mpr_kind k) {
    if (tracked(fd)) g_fd[fd].kind = (uint8_t)k;
}

struct mpr_ep *mpr_ep_of(int epfd) {
    if (!tracked(epfd) || g_fd[epfd].kind != FK_EPOLL) return NULL;
    struct mpr_ep *ep = g_eps[g_fd[epfd].ep];
    return ep->live && ep->epfd == epfd ? ep : NULL;
}

struct mpr_ep *mpr_ep_new(int epfd) {
    if (!tracked(epfd)) return NULL;
    size_t i;
    for (i = 0; i < g_neps; i++)
        if (!g_eps[i]->live) break;
    if (i == g_neps) {
        if (g_neps == g_epcap) {
            size_t cap = g_epcap ? g_epcap * 2 : 16;
            struct mpr_ep **n = realloc(g_eps, cap * sizeof *n);
            if (!n) return NULL;
            g_eps = n;
            g_epcap = cap;
        }
        struct mpr_ep *ep = calloc(1, sizeof *ep);
        if (!ep) return NULL;
        g_eps[g_neps++] = ep;
    }
    struct mpr_ep *ep = g_eps[i];
    uint32_t gen = ep->gen;
    memset(ep, 0, sizeof *ep);
    ep->gen = gen + 1;
    ep->epfd = epfd;
    ep->live = true;
    g_fd[epfd].kind = FK_EPOLL;
    g_fd[epfd].ep = (uint32_t)i;
    return ep;
}

bool mpr_present(const struct mpr_ep *ep, int fd) {
    return fd >= 0 && (size_t)fd < ep->in_len && ep->in[fd];
}

int mpr_set_present(struct mpr_ep *ep, int fd, bool on) {
    if (!tracked(fd)) return 0;
    if ((size_t)fd >= ep->in_len) {
        if (!on) return 0;
        size_t n = ep->in_len ? ep->in_len : 256;
        while (n <= (size_t)fd) n *= 2;
        uint8_t *p = realloc(ep->in, n);
        if (!p) return -ENOMEM;
        memset(p + ep->in_len, 0, n - ep->in_len);
        ep->in = p;
        ep->in_len = n;
    }
    if (ep->in[fd] == on) return 0;
    ep->in[fd] = on;
    if (on) g_fd[fd].nwatch++;
    else if (g_fd[fd].nwatch) g_fd[fd].nwatch--;
    return 0;
}

int mpr_pend_push(struct mpr_ep *ep, int op, int fd, const struct epoll_event *ev) {
    if (ep->npend == ep->pend_cap) {
        size_t cap = ep->pend_cap ? ep->pend_cap * 2 : 64;
        struct mpr_pend *n = realloc(ep->pend, cap * sizeof *n);
        if (!n) return -ENOMEM;
        ep->pend = n;
        ep->pend_cap = cap;
    }
    struct mpr_pend *p = &ep->pend[ep->npend++];
    p->op = op;
    p->fd = fd;
    if (ev) p->ev = *ev;
    else memset(&p->ev, 0, sizeof p->ev);
    mpr_pend_count(fd, 1);
    return 0;
}

void mpr_pend_count(int fd, int delta) {
    if (!tracked(fd)) return;
    if (delta < 0 && g_fd[fd].pend < (uint32_t)-delta) g_fd[fd].pend = 0;
    else g_fd[fd].pend += (uint32_t)delta;
}

void mpr_pend_flush_sync(struct mpr_ep *ep) {
    for (size_t i = 0; i < ep->npend; i++) {
        struct mpr_pend *p = &ep->pend[i];
        /* The result was given already; a refusal now (the fd was closed behind our back)
         * leaves the set as the kernel has it. */
        mpr_real.epoll_ctl(ep->epfd, p->op, p->fd, p->op == EPOLL_CTL_DEL ? NULL : &p->ev);
        mpr_pend_count(p->fd, -1);
    }
    ep->npend = 0;
}

void mpr_pend_flush_all(void) {
    for (size_t i = 0; i < g_neps; i++)
        if (g_eps[i]->live && g_eps[i]->npend) mpr_pend_flush_sync(g_eps[i]);
}

void mpr_drain_into(mp_channel *ch) {
    for (size_t i = 0; i < g_neps; i++) {
        struct mpr_ep *ep = g_eps[i];
        if (!ep->live || !ep->npend) continue;
        for (size_t j = 0; j < ep->npend; j++) {
            struct mpr_pend *p = &ep->pend[j];
            /* queued in the ring (a refusal comes back as an event of the set, see
             * mp_epoll_ctl()); where the core cannot queue, it is the real call */
            mp_epoll_ctl(ch, ep->epfd, p->op, p->fd, p->op == EPOLL_CTL_DEL ? NULL : &p->ev);
            mpr_pend_count(p->fd, -1);
        }
        ep->npend = 0;
    }
}

int mpr_ep_adopt_push(struct mpr_ep *ep, int fd) {
    if (ep->nadopt == ep->adopt_cap) {
        size_t cap = ep->adopt_cap ? ep->adopt_cap * 2 : 16;
        int *n = realloc(ep->adopt, cap * sizeof *n);
        if (!n) return -ENOMEM;
        ep->adopt = n;
        ep->adopt_cap = cap;
    }
    ep->adopt[ep->nadopt++] = fd;
    return 0;
}

int mpr_ep_adopt_pop(struct mpr_ep *ep) { return ep->nadopt ? ep->adopt[--ep->nadopt] : -1; }

size_t mpr_fd_cap(void) {
    pthread_once(&g_tab_once, tab_init);
    return g_cap;
}

void mpr_each_ep(void (*fn)(struct mpr_ep *)) {
    for (size_t i = 0; i < g_neps; i++)
        if (g_eps[i]->live) fn(g_eps[i]);
}

static void ep_retire(struct mpr_ep *ep) {
    for (size_t i = 0; i < ep->npend; i++) mpr_pend_count(ep->pend[i].fd, -1);
    for (size_t fd = 0; fd < ep->in_len; fd++)
        if (ep->in[fd] && g_fd[fd].nwatch) g_fd[fd].nwatch--;
    free(ep->in);
    free(ep->pend);
    free(ep->adopt);
    ep->adopt = NULL;
    ep->nadopt = ep->adopt_cap = 0;
    ep->in = NULL;
    ep->pend = NULL;
    ep->in_len = ep->npend = ep->pend_cap = 0;
    ep->live = false;
    ep->gen++;
}

/* With the lock held: number fd stops naming its file. */
static void closing_locked(int fd) {
    if (!tracked(fd)) return;
    struct fdent *e = &g_fd[fd];
    if (e->pend) mpr_pend_flush_all(); /* changes naming fd reach the kernel before the close */
    if (e->nwatch)
        for (size_t i = 0; i < g_neps && e->nwatch; i++)
            if (g_eps[i]->live) mpr_set_present(g_eps[i], fd, false);
    if (e->kind == FK_EPOLL) {
        struct mpr_ep *ep = g_eps[e->ep];
        if (ep->live && ep->epfd == fd) ep_retire(ep);
    }
    e->kind = FK_UNKNOWN;
    e->nwatch = 0;
}

static inline bool interesting(int fd) {
    if (!tracked(fd)) return false;
    const struct fdent *e = &g_fd[fd];
    return e->kind || e->nwatch || e->pend;
}

void mpr_fd_closing(int fd) {
    if (!interesting(fd)) return;
    mpr_lock();
    closing_locked(fd);
    mpr_unlock();
}

void mpr_fd_new(int fd, enum mpr_kind k) {
    if (!tracked(fd)) return;
    mpr_lock();
    closing_locked(fd); /* what a close that bypassed us left behind */
    if (mpr_streams) mpr_stream_forget(fd);
    g_fd[fd].kind = (uint8_t)k;
    mpr_unlock();
}

/* ---- interposed: closing ----------------------------------------------------------------- */

#define PASS (mpr_init(), mpr_state < 0 || mpr_t.busy)

int close(int fd) {
    if (PASS) return mpr_real.close(fd);
    int res;
    if (mpr_streams && mpr_stream_close(fd, &res)) return res; /* stream.c */
    if (!interesting(fd)) return mpr_real.close(fd);
    /* Changes still queued that name fd (typically the EPOLL_CTL_DEL just before it) go to
     * the kernel with the close itself, in one system call, through this thread's channel. */
    mp_channel *ch = mpr_t.ch;
    mpr_lock();
    bool ring = ch && g_fd[fd].pend;
    if (ring) {
        mpr_t.busy = true;
        mpr_drain_into(ch);
    }
    closing_locked(fd);
    mpr_unlock();
    if (!ring) return mpr_real.close(fd);
    int r = mp_close(ch, fd);
    mpr_t.busy = false;
    if (r < 0) {
        errno = -r;
        return -1;
    }
    return 0;
}

static void closing_range(unsigned first, unsigned last) {
    if (mpr_streams)
        for (size_t fd = first; fd <= last && fd < g_cap; fd++)
            if (mpr_is_stream((int)fd)) mpr_stream_detach((int)fd);
    mpr_lock();
    for (size_t fd = first; fd <= last && fd < g_cap; fd++)
        if (interesting((int)fd)) closing_locked((int)fd);
    mpr_unlock();
}

int close_range(unsigned first, unsigned last, int flags) {
    if (PASS) return mpr_real.close_range(first, last, flags);
    if (!(flags & CLOSE_RANGE_CLOEXEC) && first <= last) closing_range(first, last);
    return mpr_real.close_range(first, last, flags);
}

void closefrom(int lowfd) {
    if (PASS) {
        mpr_real.closefrom(lowfd);
        return;
    }
    if (lowfd >= 0) closing_range((unsigned)lowfd, ~0u);
    mpr_real.closefrom(lowfd);
}

/* ---- interposed: duplicating ------------------------------------------------------------- */

/* newfd names oldfd's file now. */
static void dup_done(int oldfd, int newfd) {
    mpr_lock();
    closing_locked(newfd);
    enum mpr_kind k = mpr_kind_of(oldfd);
    if (k == FK_EPOLL) {
        /* The set can now be changed through another number: no more queueing on it. */
        struct mpr_ep *ep = mpr_ep_of(oldfd);
        if (ep) {
            mpr_pend_flush_sync(ep);
            ep->shared = true;
        }
        k = FK_UNKNOWN;
    }
    mpr_set_kind(newfd, k);
    mpr_unlock();
}

int dup(int oldfd) {
    if (PASS) return mpr_real.dup(oldfd);
    int r = mpr_real.dup(oldfd);
    if (r >= 0) dup_done(oldfd, r);
    return r;
}

int dup2(int oldfd, int newfd) {
    if (PASS || oldfd == newfd) return mpr_real.dup2(oldfd, newfd);
    if (mpr_streams) mpr_stream_detach(newfd);
    mpr_fd_closing(newfd);
    int r = mpr_real.dup2(oldfd, newfd);
    if (r >= 0) dup_done(oldfd, r);
    return r;
}

int dup3(int oldfd, int newfd, int flags) {
    if (PASS || oldfd == newfd) return mpr_real.dup3(oldfd, newfd, flags);
    if (mpr_streams) mpr_stream_detach(newfd);
    mpr_fd_closing(newfd);
    int r = mpr_real.dup3(oldfd, newfd, flags);
    if (r >= 0) dup_done(oldfd, r);
    return r;
}

/* ---- interposed: files that can be watched ----------------------------------------------- */

int socket(int domain, int type, int protocol) {
    mpr_init();
    int r = mpr_real.socket(domain, type, protocol);
    if (r >= 0 && !PASS) mpr_fd_new(r, FK_POLLABLE);
    return r;
}

int socketpair(int domain, int type, int protocol, int sv[2]) {
    mpr_init();
    int r = mpr_real.socketpair(domain, type, protocol, sv);
    if (r == 0 && !PASS) {
        mpr_fd_new(sv[0], FK_POLLABLE);
        mpr_fd_new(sv[1], FK_POLLABLE);
    }
    return r;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
    mpr_init();
    int r = mpr_real.accept(fd, addr, len);
    if (r >= 0 && !PASS) {
        mpr_fd_new(r, FK_POLLABLE);
        mpr_stream_accepted(fd, r, 0);
    }
    return r;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    mpr_init();
    int r = mpr_real.accept4(fd, addr, len, flags);
    if (r >= 0 && !PASS) {
        mpr_fd_new(r, FK_POLLABLE);
        mpr_stream_accepted(fd, r, flags);
    }
    return r;
}

int pipe(int fds[2]) {
    mpr_init();
    int r = mpr_real.pipe(fds);
    if (r == 0 && !PASS) {
        mpr_fd_new(fds[0], FK_POLLABLE);
        mpr_fd_new(fds[1], FK_POLLABLE);
    }
    return r;
}

int pipe2(int fds[2], int flags) {
    mpr_init();
    int r = mpr_real.pipe2(fds, flags);
    if (r == 0 && !PASS) {
        mpr_fd_new(fds[0], FK_POLLABLE);
        mpr_fd_new(fds[1], FK_POLLABLE);
    }
    return r;
}

int eventfd(unsigned initval, int flags) {
    mpr_init();
    int r = mpr_real.eventfd(initval, flags);
    if (r >= 0 && !PASS) mpr_fd_new(r, FK_POLLABLE);
    return r;
}
