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
 * stream.c:  stream mode (MEGAPIPE_STREAMS=1): accepted TCP connections served by a channel's
 *            buffered reads and write-behind, and their readiness in the application's sets.
 * stream_calls.c: stream mode's interposed socket calls (read, write, send, sendfile, ...),
 *            over stream.c's state (stream_int.h).
 * stream_poll.c: stream mode's poll/ppoll/select/pselect, over mpr_stream_poll/_pump.
 * exec.c:    the exec family: stream mode's queued bytes reach the kernel before the image
 *            is replaced (mpr_stream_last_flush).
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
#include <poll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/uio.h>
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
    /* stream mode (stream.c) */
    ssize_t (*read)(int, void *, size_t);
    ssize_t (*readv)(int, const struct iovec *, int);
    ssize_t (*recv)(int, void *, size_t, int);
    ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
    ssize_t (*recvmsg)(int, struct msghdr *, int);
    ssize_t (*write)(int, const void *, size_t);
    ssize_t (*writev)(int, const struct iovec *, int);
    ssize_t (*send)(int, const void *, size_t, int);
    ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    ssize_t (*sendmsg)(int, const struct msghdr *, int);
    int (*shutdown)(int, int);
    int (*getsockopt)(int, int, int, void *, socklen_t *);
    int (*setsockopt)(int, int, int, const void *, socklen_t);
    int (*ioctl)(int, unsigned long, ...);
    int (*fcntl)(int, int, ...);
    int (*fcntl64)(int, int, ...);
    ssize_t (*sendfile)(int, int, off_t *, size_t);
    ssize_t (*sendfile64)(int, int, off_t *, size_t);
    ssize_t (*splice)(int, loff_t *, int, loff_t *, size_t, unsigned);
    int (*poll)(struct pollfd *, nfds_t, int);
    int (*ppoll)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
    int (*select)(int, fd_set *, fd_set *, fd_set *, struct timeval *);
    int (*pselect)(int, fd_set *, fd_set *, fd_set *, const struct timespec *, const sigset_t *);
};
extern struct real_fns mpr_real;

/* 0: not decided yet, 1: serving, -1: stepped aside (MEGAPIPE_DISABLE, no io_uring). */
extern int mpr_state;

/* Resolve mpr_real (idempotent, thread-safe) and read the environment. */
void mpr_init(void);

/* MEGAPIPE_STREAMS=1 was asked for and the first channel can serve it (stream.c). */
extern bool mpr_streams;
extern bool mpr_verbose, mpr_stats;

/* Per-thread state.  busy: the thread is inside the emulation (or the core it calls), so
 * interposed calls it makes go straight to libc. */
struct mpr_schan;
struct mpr_thread {
    mp_channel *ch;
    struct mpr_schan *sc; /* stream mode: this thread's channel's streams (stream.c) */
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
    int *adopt; /* stream mode: candidate streams added to the set, adopted at its next wait */
    size_t nadopt, adopt_cap;
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
/* Stream mode: candidates waiting for the set's next wait. */
int mpr_ep_adopt_push(struct mpr_ep *ep, int fd); /* 0 or -ENOMEM */
int mpr_ep_adopt_pop(struct mpr_ep *ep); /* -1: none */
/* Every set (fork handlers). */
void mpr_each_ep(void (*fn)(struct mpr_ep *));

/* fd number n names a new file: forget what was known of the old one. */
void mpr_fd_new(int fd, enum mpr_kind k);
/* fd number n is being closed. */
void mpr_fd_closing(int fd);

/* Number of fd numbers tracked (fds at or above are never streams nor sets). */
size_t mpr_fd_cap(void);

/* ---- stream.c ------------------------------------------------------------------------ */

/* Stream mode was asked for: decide with the first channel (features), at init. */
void mpr_streams_init(bool wanted);
/* The first channel was made: stream mode stays on only if it has what streams need. */
void mpr_streams_check(mp_channel *ch);
/* A connection was accepted from listener lfd (flags: accept4's). */
void mpr_stream_accepted(int lfd, int fd, int flags);
/* With the lock held: is fd a stream (adopted or not)? */
bool mpr_is_stream(int fd);
/* epoll_ctl on a set this process made for a stream fd (lock held).  Returns 0 / -errno. */
int mpr_stream_ctl(struct mpr_ep *ep, int op, int fd, struct epoll_event *ev);
/* A stream fd is being added to a set the emulation cannot serve it in (shared, unknown):
 * it becomes a plain fd for good (lock held). */
void mpr_stream_unstream(int fd);
/* Number fd names a new file (a close bypassed the emulation): forget its stream (lock held). */
void mpr_stream_forget(int fd);
/* The wait of a stream-mode process on set ep through ch (lock NOT held; called with
 * mpr_t.busy set).  Returns as epoll_wait (>= 0 or -errno). */
int mpr_stream_wait(mp_channel *ch, int epfd, struct epoll_event *evs, int max, int64_t ns,
                    const sigset_t *mask);
/* poll()/select() (stream_poll.c): when fd is an adopted stream (and the caller is not inside
 * the emulation), its poll(2) bits for events in *revents, whether the calling thread owns it
 * in *owner, and 1; else 0. */
int mpr_stream_poll(int fd, short events, short *revents, bool *owner);
/* Send what the calling thread's streams queued and take its channel's completions, waiting
 * up to timeout_ms for one (0: none).  false: the thread has no stream channel. */
bool mpr_stream_pump(int timeout_ms);
/* close() of a stream fd: returns 1 when handled (result in *res), 0 when not a stream. */
int mpr_stream_close(int fd, int *res);
/* The number fd is about to be closed by dup2/dup3/close_range/closefrom. */
void mpr_stream_detach(int fd);
/* A thread's channel is about to be destroyed (thread exit, process exit): flush. */
void mpr_stream_chan_done(mp_channel *ch, bool destroying);
/* One line of stream statistics for ch into buf ("" when none). */
void mpr_stream_stats(mp_channel *ch, char *buf, size_t len);
/* fork handlers */
void mpr_stream_fork_prepare(void);
void mpr_stream_fork_child(void);
/* The image is about to end (exec.c, process exit): every stream's queued bytes go to the
 * kernel. */
void mpr_stream_last_flush(void);

#endif
