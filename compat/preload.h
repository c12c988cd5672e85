/*
 * compat/preload.h — what the files of the LD_PRELOAD epoll emulation share (megapipe-run).
 *
 * preload.c: the real libc functions, the re-entrancy guard, one channel per waiting thread,
 *            the environment, fork and exit (for channels).  Calls nothing above it.
 * fdtab.c:   what the emulation knows about fd numbers (a socket it saw made, an epoll set it
 *            made) and each set's interest list and queued changes, and what fork does to
 *            them; the interposed calls that make, duplicate and close fds keep that knowledge
 *            true.  Uses preload.c.
 * epoll.c:   the interposed epoll_* calls.  Uses both.
 *
 * Nothing here is seen by the application: the library exports only the interposed names
 * (compat/preload.map).
 */
#ifndef MP_PRELOAD_H
#define MP_PRELOAD_H

#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#include "megapipe.h"

/* The real functions, looked up with dlsym(RTLD_NEXT) once. */
struct real_fns {
    int (*epoll_create)(int);
    int (*epoll_create1)(int);
    int (*epoll_ctl)(int, int, int, struct epoll_event *);
    int (*epoll_wait)(int, struct epoll_event *, int, int);
    int (*epoll_pwait)(int, struct epoll_event *, int, int, const sigset_t *);
    int (*epoll_pwait2)(int, struct epoll_event *, int, const struct timespec *, const sigset_t *);
    int (*close)(int);
    int (*close_range)(unsigned, unsigned, int);
    void (*closefrom)(int);
    int (*dup)(int);
    int (*dup2)(int, int);
    int (*dup3)(int, int, int);
    int (*socket)(int, int, int);
    int (*socketpair)(int, int, int, int[2]);
    int (*accept)(int, struct sockaddr *, socklen_t *);
    int (*accept4)(int, struct sockaddr *, socklen_t *, int);
    int (*pipe)(int[2]);
    int (*pipe2)(int[2], int);
    int (*eventfd)(unsigned, int);
};
extern struct real_fns mpr_real;

/* 0: not decided yet, 1: serving, -1: stepped aside (MEGAPIPE_DISABLE, no io_uring). */
extern int mpr_state;

/* Resolve mpr_real (idempotent, thread-safe) and read the environment. */
void mpr_init(void);

/* Per-thread state.  busy: the thread is inside the emulation (or the core it calls), so
 * interposed calls it makes go straight to libc. */
struct mpr_thread {
    mp_channel *ch;
    bool busy;
    bool no_channel; /* making this thread's channel failed */
};
extern __thread struct mpr_thread mpr_t;

/* This thread's channel, made at first need; NULL when it cannot be made (then the caller
 * uses the real calls; the first failure makes the whole process step aside, and the caller
 * must apply what the sets had queued: mpr_pend_flush_all()). */
mp_channel *mpr_channel(void);

/* ---- fdtab.c ------------------------------------------------------------------------- */

enum mpr_kind { FK_UNKNOWN = 0, FK_POLLABLE, FK_EPOLL };

/* One epoll set this process made. */
struct mpr_ep {
    int epfd;
    uint32_t gen;      /* bumped when the record is retired (a waiter's stale pointer) */
    bool live;
    bool shared;       /* another process (fork) or another fd number (dup) may change it:
                          every change goes to the kernel at once */
    bool nested;       /* watched by another epoll set: its changes must not wait for a wait */
    unsigned waiters;  /* threads inside a wait on it */
    uint8_t *in;       /* fd -> 1: the set has an entry for the file that number names now */
    size_t in_len;
    struct mpr_pend { int op, fd; struct epoll_event ev; } *pend; /* queued changes, in order */
    size_t npend, pend_cap;
};

/* The global lock: fd knowledge, sets, queued changes. */
void mpr_lock(void);
void mpr_unlock(void);

/* With the lock held. */
struct mpr_ep *mpr_ep_of(int epfd);         /* NULL: not a set this process tracks */
struct mpr_ep *mpr_ep_new(int epfd);        /* a set just made */
enum mpr_kind mpr_kind_of(int fd);
void mpr_set_kind(int fd, enum mpr_kind k);
bool mpr_present(const struct mpr_ep *ep, int fd);
int mpr_set_present(struct mpr_ep *ep, int fd, bool on); /* 0 or -ENOMEM */
int mpr_pend_push(struct mpr_ep *ep, int op, int fd, const struct epoll_event *ev);
void mpr_pend_count(int fd, int delta);     /* queued changes naming fd, in all sets */
/* Apply ep's queued changes now, in order (the real epoll_ctl). */
void mpr_pend_flush_sync(struct mpr_ep *ep);
/* Apply every set's queued changes (before fork, before a close of a named fd). */
void mpr_pend_flush_all(void);
/* Hand every set's queued changes to ch (the waiting thread's channel). */
void mpr_drain_into(mp_channel *ch);
/* Every set (fork handlers). */
void mpr_each_ep(void (*fn)(struct mpr_ep *));

/* fd number n names a new file: forget what was known of the old one. */
void mpr_fd_new(int fd, enum mpr_kind k);
/* fd number n is being closed. */
void mpr_fd_closing(int fd);

#endif
