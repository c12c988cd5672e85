/*
 * megapipe.h — MegaPipe on io_uring: the public API.
 *
 * MegaPipe (Han et al., OSDI 2012) replaces the BSD socket API for message-oriented servers
 * with a per-core *channel*: a bidirectional pipe that carries asynchronous I/O requests to
 * the kernel and completion events back.  This library builds the channel in user space over
 * io_uring (with an epoll engine behind the same API where io_uring is unavailable):
 *
 *   - partitioned listening sockets: one SO_REUSEPORT socket per channel, steered per CPU by a
 *     classic-BPF program (mp_register() with a cpu_mask);
 *   - lightweight sockets (lwsockets): accepted connections that live only in the ring's
 *     direct-descriptor table, never in the process fd table (mp_accept() with MP_LWSOCKET);
 *   - transparent batching: requests are queued in the submission ring and handed to the kernel
 *     in one system call per batch (threshold, no events left, or mp_flush()).
 *
 * Completion model.  mp_read(), mp_write(), mp_writev(), mp_accept() and mp_disconnect() start
 * an operation and return at once (0, or -errno when the request itself is invalid).  Each
 * operation later produces exactly one event through mp_dispatch() (an accept with count 0
 * produces one per connection), unless the handle is unregistered first.
 *
 * Return conventions.  Functions returning int return >= 0 on success and a negative errno on
 * failure (-EBADF, -EINVAL, ...).  They never abort, assert or exit on bad input and never set
 * errno.  Functions returning a pointer return NULL and set errno.
 *
 * Threads.  A channel and every handle registered on it belong to one thread: the first thread
 * that calls a function on the channel after mp_create() (creating it elsewhere is fine).  On
 * both engines a call from any other thread fails with -EPERM (NULL and errno EPERM for the
 * functions returning pointers) and touches nothing.  mp_wake() is the one call that is safe
 * from any thread, with the readiness set's mp_watch() and mp_unwatch() (see there);
 * mp_get_stats(), mp_pending() and mp_destroy() may be called from another
 * thread when the owner is not inside a call on the channel.  Different channels are
 * independent and may be used concurrently from different threads.
 *
 * fork().  A channel belongs to the process that created it.  In a forked child every call on
 * an inherited channel fails with -EPERM without touching the parent's rings (the child would
 * otherwise steal the parent's completions); mp_destroy() in the child only releases the
 * child's copy (unmaps, closes its descriptors; cancels nothing, shuts down nothing).  Create
 * a new channel in the child.
 *
 * Lifetimes.  A handle lives from mp_register() (or mp_poll_add()) to its MP_EV_CLOSED event.
 * mp_unregister() ends it at once: from then on no other event of the handle is delivered and
 * every call on it fails with -EBADF.  The kernel may still hold operations of the handle;
 * when it holds none, the channel delivers one MP_EV_CLOSED event for it.  Between the two the
 * kernel may still read the buffer of a write that was in flight and write the buffer of a
 * read that was in flight (the head of each queue; requests queued behind them are dropped at
 * mp_unregister()); nothing else.  From the CLOSED event on, every buffer given to the handle
 * is the caller's again and the mp_handle pointer is dead (its slot may be reused, like a libuv
 * handle after its close callback).  Until that event the slot is never reused, so a stale
 * pointer gets -EBADF and never reaches another connection.  Events that were queued but not
 * yet delivered when the handle ended are dropped, and what they carry is released: accepted
 * fds and lwsockets are closed, channel buffers of buffered reads are given back.
 *
 * Versions and ABI.  The library's version is MEGAPIPE_VERSION (header) and mp_version()
 * (library).  mp_options, mp_stats and mp_event may grow at their end in later versions: the
 * calls that take them are told the caller's size (the macros below pass sizeof), so a program
 * built against an older header keeps working with a newer library.
 *
 * Environment.  mp_create(NULL) reads the MP_* variables listed at struct mp_options; with a
 * non-NULL options pointer, fields left at MP_OPT_DEFAULT are still taken from the environment.
 */
#ifndef MEGAPIPE_H
#define MEGAPIPE_H

#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/epoll.h> /* struct epoll_event, sigset_t (also in strict C11) */
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The one place the version is defined (CMake and megapipe.pc read it from here). */
#define MEGAPIPE_VERSION_MAJOR 0
#define MEGAPIPE_VERSION_MINOR 2
#define MEGAPIPE_VERSION_PATCH 0
#define MEGAPIPE_VERSION \
    (MEGAPIPE_VERSION_MAJOR * 10000 + MEGAPIPE_VERSION_MINOR * 100 + MEGAPIPE_VERSION_PATCH)

/* The version of the library actually linked (MEGAPIPE_VERSION of the header it was built
 * with), and the same as "major.minor.patch".  Thread-safe. */
int mp_version(void);
const char *mp_version_string(void);

/* cpu_set_t is always declared by glibc's <sched.h>, but its CPU_* macros only under
 * _GNU_SOURCE, which must come before the first system header: when megapipe.h is included
 * after one without it, the macros are defined here from glibc's own __CPU_*_S helpers, so
 * the header works in any include order. */
#if !defined(CPU_SETSIZE) && defined(__CPU_SETSIZE)
#define CPU_SETSIZE __CPU_SETSIZE
#endif
#if !defined(CPU_ZERO) && defined(__CPU_ZERO_S)
#define CPU_ZERO(set) __CPU_ZERO_S(sizeof(cpu_set_t), set)
#define CPU_SET(cpu, set) __CPU_SET_S(cpu, sizeof(cpu_set_t), set)
#define CPU_CLR(cpu, set) __CPU_CLR_S(cpu, sizeof(cpu_set_t), set)
#define CPU_ISSET(cpu, set) __CPU_ISSET_S(cpu, sizeof(cpu_set_t), set)
#define CPU_COUNT(set) __CPU_COUNT_S(sizeof(cpu_set_t), set)
#endif

/* lwsocket ids are MP_LWSOCKET_BASE + slot in the channel's direct-descriptor table; they are
 * never valid file descriptors.  Use mp_is_lwsocket() to tell them from fds. */
#define MP_LWSOCKET_BASE (1 << 30)
static inline int mp_is_lwsocket(int id) { return id >= MP_LWSOCKET_BASE; }

typedef struct mp_channel mp_channel;
typedef struct mp_handle mp_handle;

/* ---------------------------------------------------------------------------------------- */
/* Options                                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* A field set to MP_OPT_DEFAULT takes its value from the environment variable named beside it,
 * or, when that is unset, from the default named there. */
#define MP_OPT_DEFAULT (-1)

typedef enum mp_engine_kind {
    MP_ENGINE_AUTO = 0,  /* io_uring when it can be set up, else epoll (logged once) */
    MP_ENGINE_URING = 1, /* io_uring only: mp_create() fails when it cannot be set up */
    MP_ENGINE_EPOLL = 2, /* epoll + non-blocking syscalls */
} mp_engine_kind;

typedef struct mp_options {
    /* Set by mp_options_init() to the caller's sizeof(mp_options); mp_create() reads only the
     * fields that fit in it.  Must not be changed. */
    uint32_t size;
    /* MP_ENGINE=auto|uring|epoll.  Default auto. */
    int engine;
    /* MP_BATCH=<n>: submit as soon as n requests are queued (the paper's threshold).
     * 1 = no batching (every request is its own system call).  Default 32. */
    int batch;
    /* MP_PARTITION=0|1: 1 = a cpu_mask given to mp_register() on a listening socket creates a
     * partition (own SO_REUSEPORT socket, CPU steering); 0 = cpu_mask is ignored and all
     * channels share the one accept queue (the paper's baseline).  Default 1. */
    int partition;
    /* MP_LWSOCKET=0|1: 0 = mp_accept() ignores MP_LWSOCKET and accepts regular fds;
     * 1 = honour MP_LWSOCKET.  Default 1. */
    int lwsocket;
    /* MP_STATS=1: print the channel's statistics to stderr at mp_destroy().  Default 0. */
    int stats;
    /* MP_RING_ENTRIES=<n>: submission ring size (completion ring is 16x).  Default 256. */
    int ring_entries;
    /* MP_MAX_LWSOCKETS=<n>: size of the direct-descriptor table, at most RLIMIT_NOFILE (the
     * kernel's limit for it); with MP_LWSOCKET=0 no table is made.  Default 16384. */
    int max_lwsockets;
    /* MP_BUF_SIZE=<bytes>, MP_BUF_COUNT=<n>: the provided-buffer ring used by buffered reads
     * (mp_read_buffered()).  Defaults 4096 and 1024 (count is rounded up to a power of 2). */
    int buf_size;
    int buf_count;
    /* MP_BALANCE=0|1 and MP_BALANCE_THRESHOLD=<n>: accept load balancing.  With 1, a channel
     * whose own partition is idle accepts from a sibling partition whose accept backlog is at
     * least the threshold.  Defaults 0 and 16.  io_uring engine only. */
    int balance;
    int balance_threshold;
    /* MP_LOG=0|1: log fallbacks and misuse to stderr (each kind once).  Default 1. */
    int log;
    /* MP_WAIT_USEC=<us>: completion batching on the wait side.  When mp_dispatch() has to
     * block and the previous wait brought a burst of completions (at least MP_BATCH/4), it
     * lets the kernel gather up to MP_BATCH completions for at most this many microseconds
     * after the first one, instead of waking up for each (io_uring min_wait, kernel 6.12+;
     * ignored elsewhere).  Light loads never wait, nor do channels with fewer than
     * 2 x MP_BATCH live handles.  0 = always wake at the first completion.
     * Default 20. */
    int wait_usec;
    /* MP_BUF_PER_CONN=<n>: buffered reads: at most this many channel buffers held by one
     * connection (received and not yet asked for, plus handed out and not yet given back).
     * Past it the connection's receive pauses (data waits in the socket, TCP flow control
     * slows the peer) until it gives buffers back, so one stalled connection cannot empty the
     * pool for all others.  An application that must hold more than this to make progress must
     * copy data out and release buffers.  Default MP_BUF_COUNT/4, at least 16 (or MP_BUF_COUNT
     * when smaller). */
    int buf_per_conn;
    /* MP_READINESS=auto|poll|epoll|epoll-ring: how the io_uring engine serves readiness watches
     * (mp_watch(), mp_poll_add()).  poll: one poll request per watched fd, re-armed after each
     * level-triggered report; epoll: one kernel epoll set per channel, changed through
     * IORING_OP_EPOLL_CTL requests and waited on with IORING_OP_EPOLL_WAIT (Linux 6.15+; on
     * older kernels a poll on the set's fd, then epoll_wait() without blocking).  Both keep the
     * semantics described at mp_watch(); they differ in cost (docs/benchmarks.md, "Readiness")
     * and in one point: a poll request holds its file open, an epoll set does not (see
     * mp_watch()).  With epoll, a wait that has nothing to submit on a channel whose only
     * handles are readiness watches is an epoll_wait() on the set instead of an
     * io_uring_enter() (the cheaper sleep; needs DEFER_TASKRUN); epoll-ring: the same set,
     * but every wait goes through the ring.  auto = epoll.  The epoll engine always uses an
     * epoll set and epoll_wait(). */
    int readiness;
} mp_options;

enum {
    MP_READINESS_AUTO = 0,
    MP_READINESS_POLL = 1,
    MP_READINESS_EPOLL = 2,
    MP_READINESS_EPOLL_RING = 3,
};

/* Fill *opt with MP_OPT_DEFAULT everywhere (the environment and built-in defaults apply) and
 * record the caller's sizeof(mp_options) in opt->size.  Use the macro. */
void mp_options_init_sized(mp_options *opt, size_t size);
#define mp_options_init(opt) mp_options_init_sized((opt), sizeof(mp_options))

/* ---------------------------------------------------------------------------------------- */
/* Events                                                                                    */
/* ---------------------------------------------------------------------------------------- */

typedef enum mp_cmd {
    MP_EV_NONE = 0,
    MP_EV_ACCEPT,     /* result: new fd or lwsocket id (>= 0), or -errno; u.accept */
    MP_EV_READ,       /* result: bytes read (> 0), or -errno for a failed request; u.read */
    MP_EV_WRITE,      /* result: bytes written (all of them), or -errno */
    MP_EV_CONNECT,    /* result: 0 or -errno */
    MP_EV_DISCONNECT, /* result: 0 = peer closed (EOF) or local mp_disconnect() done
                         (flag MP_EVF_LOCAL), -errno = connection failed (e.g. -ECONNRESET) */
    MP_EV_POLL,       /* readiness adapter: result = revents; u.poll */
    MP_EV_WAKE,       /* mp_wake() was called; handle and cookie are NULL */
    MP_EV_CLOSED,     /* the final event of an ended handle (see "Lifetimes"): the kernel
                         holds none of its operations; result 0.  The pointer is dead after */
} mp_cmd;

/* mp_event.flags */
#define MP_EVF_LOCAL 0x1u    /* DISCONNECT: completion of our own mp_disconnect() */
#define MP_EVF_BUFFER 0x2u   /* READ: u.read.buf is a channel buffer; give it back with
                                mp_buffer_release() */
#define MP_EVF_MORE 0x4u     /* ACCEPT: the partition had more connections waiting */

typedef struct mp_event {
    mp_cmd cmd;
    uint32_t flags;       /* MP_EVF_* */
    ssize_t result;       /* >= 0 success value, < 0 -errno */
    mp_handle *handle;    /* the handle the operation was issued on */
    void *cookie;         /* that handle's cookie */
    union {
        struct {
            int fd;               /* = result on success: fd, or lwsocket id */
            unsigned backlog;     /* connections still waiting in the accept queue, when known */
            const struct sockaddr *addr; /* the peer's address when the accept was started
                                     with MP_ACCEPT_ADDR, else NULL; points into storage of
                                     the channel, valid until the next mp_dispatch*() call */
            socklen_t addrlen;    /* its length (0 when addr is NULL) */
        } accept;
        struct {
            void *buf;            /* where the data is: the caller's buffer, or a channel
                                     buffer when flags has MP_EVF_BUFFER */
            size_t len;           /* = result when > 0 */
            unsigned buf_id;      /* channel buffer id, for mp_buffer_release() */
        } read;
        struct {
            int fd;               /* the polled fd */
            uint32_t revents;     /* EPOLLIN/EPOLLOUT/EPOLLERR/EPOLLHUP/EPOLLRDHUP bits */
        } poll;
    } u;
} mp_event;

/* ---------------------------------------------------------------------------------------- */
/* Channels                                                                                  */
/* ---------------------------------------------------------------------------------------- */

/* Create a channel.  opt may be NULL (environment and defaults).  The channel belongs to the
 * calling thread (see "Threads").  Errors (NULL, errno): EINVAL bad option; ENOMEM; ENOSYS,
 * EPERM or ENOTSUP when MP_ENGINE=uring and io_uring cannot be set up; any errno of the
 * kernel calls that build the ring or the epoll set (EMFILE, ENFILE, ...). */
mp_channel *mp_create(const mp_options *opt);

/* Destroy a channel: cancels every operation, unregisters every handle (closing lwsockets and
 * the channel's partition sockets; regular fds the application registered stay open), prints
 * statistics when MP_STATS=1, frees everything.  NULL is ignored.  Not thread-safe: no other
 * thread may be inside a call on this channel (mp_wake() included). */
void mp_destroy(mp_channel *ch);

/* Wait for events and copy up to max of them into evs (an array of max records of ev_size
 * bytes each: pass sizeof(mp_event), which the macros do).  timeout_ms: -1 = forever, 0 = do
 * not block.  Returns the number of events copied (1..max), 0 on timeout, -EBADF (bad
 * channel), -EPERM (not the owning thread or process), -EINVAL (NULL evs, max 0, ev_size
 * smaller than the first version's mp_event), -EINTR when a signal interrupted the wait, or
 * another -errno from the kernel.  Completions are reaped in batches: events already queued
 * are handed out without a system call; when none are left, queued requests are submitted
 * and completions reaped in one system call, and as many events as that produced (up to max)
 * are returned. */
int mp_dispatch_events(mp_channel *ch, mp_event *evs, size_t ev_size, unsigned max,
                       int timeout_ms);
/* Up to max events into the array evs (mp_event evs[max]). */
#define mp_dispatch_batch(ch, evs, max, timeout_ms) \
    mp_dispatch_events((ch), (evs), sizeof(mp_event), (max), (timeout_ms))
/* One event into *ev: returns 1, 0 on timeout, or -errno as above. */
int mp_dispatch(mp_channel *ch, mp_event *ev, int timeout_ms);
#define mp_dispatch(ch, ev, timeout_ms) \
    mp_dispatch_events((ch), (ev), sizeof(mp_event), 1, (timeout_ms))

/* Are events waiting?  Returns an upper bound of the events the next mp_dispatch*() can hand
 * out without blocking (events queued in the channel plus completions the kernel has posted
 * to the ring), without a system call; 0 when nothing is known to be waiting (the epoll engine
 * only knows what it already collected).  Some may turn out to be dropped (their handle
 * ended).  -EBADF for a bad channel.  Callable from any thread (the answer is then a hint). */
int mp_pending(const mp_channel *ch);

/* Submit every queued request now.  Returns the number submitted, or -errno. */
int mp_flush(mp_channel *ch);

/* Make a blocked or future mp_dispatch() on ch return an MP_EV_WAKE event.  Safe from any
 * thread and from signal handlers.  Several wakes before a dispatch may be merged into one
 * event.  Returns 0 or -errno (-EBADF for NULL). */
int mp_wake(mp_channel *ch);

/* Name of the engine the channel runs on: "uring" or "epoll". */
const char *mp_engine_name(const mp_channel *ch);

/* ---------------------------------------------------------------------------------------- */
/* Handles                                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* Register fd on ch and return its handle.  fd may be:
 *   - a TCP socket to accept from, with cpu_mask != NULL and partitioning on (MP_PARTITION):
 *     the channel accepts the connections whose SYN a CPU of cpu_mask handled (a partition).
 *     Two kinds of socket:
 *       . bound, not listening, SO_REUSEPORT (what mp_listen_socket() makes): the channel
 *         makes its own socket in the address's SO_REUSEPORT group, steers it and closes it at
 *         mp_unregister() (connections still queued in it are reset: tcp_migrate_req is 0 by
 *         default);
 *       . already listening with SO_REUSEPORT (adoption: e.g. nginx's per-worker `listen ...
 *         reuseport` sockets, inherited over fork, or a socket a worker made before it dropped
 *         privileges): the channel steers and accepts from that very socket; it stays the
 *         application's (never shut down or closed by the channel, its CPU preference left in
 *         place, so a worker that comes back and adopts it again gets what waited in it).
 *     Steering: Linux 6.1+ sets SO_INCOMING_CPU on the socket (works across threads and forked
 *     processes, no BPF); older kernels attach a classic-BPF program that steers the channels
 *     of one process.  SO_INCOMING_CPU takes one CPU: a mask of several prefers the lowest CPU
 *     of the mask the calling thread may run on (its own CPU when pinned), the others reach
 *     the channel through the kernel's hash.  Channels that prefer the same CPU (more channels
 *     than CPUs) share its connections by the kernel's hash.  MP_PARTITION_STEER=cpu|cbpf
 *     forces one mechanism (diagnostics).  Any other socket with a mask fails with EINVAL.
 *   - a listening socket with cpu_mask NULL (or partitioning off): shared; it is put in
 *     listening state if it is not already, and every channel that registers it accepts from
 *     the one queue.
 *   - a connected socket (fd), or an lwsocket id from an ACCEPT event of this channel.
 * Registering a connection from an ACCEPT event before the next mp_dispatch*() call makes no
 * system call on io_uring (one epoll_ctl() on epoll); any other fd is probed (getsockopt,
 * getpeername; counted in mp_stats.probes).  The epoll engine sets O_NONBLOCK on listening
 * sockets (adopted ones included: the flag is shared by every process holding the socket)
 * and on sockets given to mp_connect().  cookie is returned in every event of the handle.
 * Regular fds stay owned by the caller (close them at the handle's MP_EV_CLOSED); lwsockets
 * are owned by the channel (ending the handle closes them).
 * Errors (NULL, errno): EBADF (bad ch, bad fd, lwsocket id not owned by ch), EPERM (not the
 * owning thread or process), EINVAL (socket not fit for partitioning, empty cpu_mask),
 * EEXIST (fd or id already registered on ch), ENOMEM, or the errno of socket(), bind(),
 * listen(), setsockopt() for a partition. */
mp_handle *mp_register(mp_channel *ch, int fd, void *cookie, const cpu_set_t *cpu_mask);

/* mp_register() of a connection the caller knows to be a connected stream socket (one it
 * accepted itself, as the epoll emulation's stream mode does): no probe, no system call on
 * io_uring (one epoll_ctl() on epoll).  Anything else fails at its first operation, not here.
 * Errors (NULL, errno): EBADF (bad ch, negative fd or an lwsocket id), EEXIST (fd already
 * registered on ch), EPERM (not the owning thread or process), ENOMEM; on the epoll engine the
 * epoll_ctl() error (EBADF for a closed fd). */
mp_handle *mp_register_connected(mp_channel *ch, int fd, void *cookie);

/* End h (see "Lifetimes" above): returns at once; cancels its pending operations; after this
 * returns no event of h is delivered except its one MP_EV_CLOSED, which comes when the kernel
 * holds none of its operations (on the epoll engine: at once).  lwsockets and partition sockets
 * are closed; regular fds stay the caller's (close them after the CLOSED event, or at once if
 * no operation was in flight).  A listener stops taking connections at once (its cancellation
 * is submitted right away: one system call).  No system call otherwise on io_uring; one
 * epoll_ctl() on epoll.  Returns 0, -EBADF for NULL, unknown or already ended handles, -EPERM
 * (not the owning thread). */
int mp_unregister(mp_handle *h);

/* mp_unregister(), and the channel takes the handle's fd: when the kernel has let go of the
 * handle's last operation (when MP_EV_CLOSED is queued) it queues the fd's close (io_uring:
 * IORING_OP_CLOSE, handed to the kernel with the channel's next submission, at the latest the
 * next mp_dispatch*() that waits or mp_flush(); no system call of its own; epoll engine:
 * close(2) at once).  From this call on the fd number is not the caller's: it may name another
 * file (a later accept) once the close has run.  mp_destroy() closes what is still held.  For
 * connections and listeners registered from a regular fd; lwsockets are always the channel's
 * (this is mp_unregister() for them).  Returns 0, -EBADF (bad or ended handle), -EINVAL (a
 * readiness watch: its fd is never the channel's), -EPERM (wrong thread, forked child). */
int mp_unregister_close(mp_handle *h);

/* Close a connection from an ACCEPT event that was not registered: an lwsocket id (its
 * direct-descriptor slot is freed) or a regular fd (close()).  Returns 0, -EBADF (bad channel,
 * or an lwsocket id that is not an accepted, unregistered one of ch), -EPERM (not the owning
 * thread). */
int mp_close_accepted(mp_channel *ch, int id);

/* Change the cpu_mask of a partitioned listener at run time (the paper's footnote 3): its
 * SO_INCOMING_CPU is set again (older kernels: the group's steering program is rebuilt);
 * connections already queued stay queued.  Returns 0, -EBADF, -EPERM, -EINVAL (h is not a
 * partitioned listener, or the mask is empty). */
int mp_set_cpu_mask(mp_handle *h, const cpu_set_t *cpu_mask);

/* The cookie given to mp_register(), or NULL for a bad handle. */
void *mp_cookie(const mp_handle *h);

/* The fd or lwsocket id the handle was registered with (for a partitioned listener: the
 * channel's own partition socket), or -EBADF. */
int mp_handle_fd(const mp_handle *h);

/* Create a TCP listening socket ready for partitioning on addr (IPv4 or IPv6): SO_REUSEADDR,
 * SO_REUSEPORT, bound, *not* listening (each channel's partition listens).  A port of 0 is
 * resolved at bind; read it back with getsockname().  backlog is remembered for the
 * partitions (0: SOMAXCONN).  Returns the fd (O_CLOEXEC) or -errno. */
int mp_listen_socket(const struct sockaddr *addr, socklen_t addrlen, int backlog);

/* ---------------------------------------------------------------------------------------- */
/* Operations (each completes with one event)                                                */
/* ---------------------------------------------------------------------------------------- */

/* mp_accept() flags */
#define MP_LWSOCKET 0x1 /* accept as lwsockets (direct descriptors) when the engine can;
                           otherwise regular fds, logged once */
#define MP_ACCEPT_EXCLUSIVE 0x2 /* the caller is the only one accepting from this listener's
                           queue (no other channel, thread or process accepts from the socket).
                           A listener registered without a partition is then served as a
                           partition is: on io_uring one multishot accept stays armed and takes
                           every connection, instead of one-shot accepts re-armed for each
                           connection so that channels sharing the queue take turns (each costs
                           a request, a failed first try and a poll armed anew).  Others that do
                           accept from the socket get next to nothing while this channel keeps
                           up.  No effect on partitions (always multishot) nor on the epoll
                           engine (accept4() at readiness either way).  mp_accept_share()
                           drops it again when the socket becomes shared. */
#define MP_ACCEPT_ADDR 0x4 /* each successful ACCEPT event carries the peer's address, as
                           accept(2) returns it: u.accept.addr (a struct sockaddr of
                           u.accept.addrlen bytes, at most sizeof(struct sockaddr_storage)) in
                           storage the channel owns, valid until the next mp_dispatch*() call on
                           the channel; copy it to keep it.  On epoll accept4() fills it in.  On
                           io_uring the accept request does; a multishot accept writes every
                           connection's address into one buffer and may take several connections
                           before the channel looks, so only the latest of those is read from
                           it, and the others' are asked for with getpeername() (one system
                           call each, mp_stats.peer_lookups; none while connections come one at
                           a time).  lwsockets cannot be asked: with MP_LWSOCKET the accepts
                           are one-shot instead (one request per connection).  A multishot
                           already running without the flag keeps going, and its events have
                           addr NULL.  Without the flag, for failed accepts and when memory ran
                           out, addr is NULL and addrlen 0. */
#define MP_ACCEPT_ADDR_KNOWN 0x8 /* with MP_ACCEPT_ADDR: only the addresses the accept itself
                           returned, never a getpeername(): on io_uring the events of the
                           connections whose address a multishot accept overwrote (those the
                           channel would look up, above) carry addr NULL and addrlen 0, and
                           the application asks the kernel itself if and when it needs the
                           address.  For servers that need it only now and then (a log, a
                           status page).  No effect on epoll (accept4() fills every one in).
                           Without MP_ACCEPT_ADDR: -EINVAL. */

/* Accept count connections on listener h (count 0 = keep accepting until h is unregistered).
 * Calls add up: two calls with count 1 accept two connections.  flags apply to accepts started
 * from this call on (a count-0 accept already running keeps the kind it was started with).  Each connection is one
 * MP_EV_ACCEPT event whose result is the new fd or lwsocket id; register it with
 * mp_register() to use it (or close it unregistered with mp_close_accepted()).  A failed
 * accept (-EMFILE, -ENFILE when the process's descriptor table is full, ...) is an ACCEPT event
 * with that error; accepting resumes by itself 10 ms later (again and again while the error
 * lasts: one event per retry, never a busy loop), and the connection stays in the backlog.
 * When the channel's lwsocket table (MP_MAX_LWSOCKETS) is full, accepting lwsockets pauses
 * without an event (mp_stats.accept_paused) and the connections stay in the backlog until
 * the application frees a slot (mp_unregister of an lwsocket, mp_close_accepted()).  Returns
 * 0, -EBADF (bad handle), -EPERM (not the owning thread), -EINVAL (h is not a listener, or
 * unknown flags). */
int mp_accept(mp_handle *h, unsigned count, int flags);

/* Listener h may no longer be the only one accepting from its queue (its socket was passed to
 * another process, inherited across fork(), ...): drop MP_ACCEPT_EXCLUSIVE, so that from now
 * on it accepts as a listener without a partition does, taking turns with the others.  On
 * io_uring the armed multishot accept is cancelled (the cancel is submitted before this
 * returns) and one-shot accepts take over; no connection is lost: those the multishot took
 * before the cancel are still delivered as ACCEPT events, and the count given to mp_accept()
 * (or "until unregistered") carries on.  On the epoll engine only the flag changes.  No effect
 * on partitions (their queue is their own).  A later mp_accept() with MP_ACCEPT_EXCLUSIVE makes
 * h exclusive again.  Idempotent.  Returns 0, -EBADF (bad or ended handle), -EPERM (not the
 * owning thread, forked child), -EINVAL (h is not a listener). */
int mp_accept_share(mp_handle *h);

/* Connect h (a socket the caller created; non-blocking is fine) to addr.  Completes with
 * MP_EV_CONNECT, result 0 or -errno.  Returns 0, -EBADF, -EINVAL (addrlen too big). */
int mp_connect(mp_handle *h, const struct sockaddr *addr, socklen_t addrlen);

/* Read up to size bytes into buf (size > 0).  Completes with MP_EV_READ and result = bytes
 * read (> 0).  EOF and receive errors complete instead with MP_EV_DISCONNECT (0 or -errno).
 * Reads on one handle complete in issue order; buf must stay valid until the event.  Returns
 * 0, -EBADF, -EINVAL (NULL buf, size 0 or > INT_MAX, handle in buffered mode), -ENOMEM. */
int mp_read(mp_handle *h, void *buf, size_t size);

/* Buffered read: like mp_read() but the kernel picks a buffer from the channel's provided-
 * buffer ring when data arrives, so idle connections hold no buffer.  The READ event has
 * MP_EVF_BUFFER, u.read.buf/len/buf_id; give the buffer back with mp_buffer_release().
 * The handle stays in buffered mode: mp_read() on it fails with -EINVAL.
 * Returns 0, -EBADF, -EINVAL (plain mp_read() requests still pending), -ENOTSUP (epoll engine
 * or no provided-buffer rings in the kernel). */
int mp_read_buffered(mp_handle *h);

/* Give a buffer from a buffered READ event back to the channel.  Returns 0, -EBADF, -EINVAL
 * (unknown id, or not held by the application), -ENOTSUP (epoll engine). */
int mp_buffer_release(mp_channel *ch, unsigned buf_id);

/* Write size bytes from buf.  Completes with MP_EV_WRITE once *all* bytes are in the socket's
 * send queue (short sends are retried inside) with result = size, or with -errno (e.g. -EPIPE,
 * -ECONNRESET; never SIGPIPE).  Writes on one handle complete in issue order; buf must stay
 * valid until the event.  Returns 0, -EBADF, -EINVAL, -ENOMEM. */
int mp_write(mp_handle *h, const void *buf, size_t size);

/* Gathering write: like mp_write() for iovcnt buffers (1..IOV_MAX).  The iovec array is copied;
 * the buffers it points to must stay valid until the event. */
int mp_writev(mp_handle *h, const struct iovec *iov, int iovcnt);

/* Half-close: after every write issued before it has completed, shut down the sending side
 * (shutdown(SHUT_WR); the peer reads EOF).  The handle stays registered and can still read.
 * Completes with MP_EV_DISCONNECT, flag MP_EVF_LOCAL, result 0 or -errno. */
int mp_disconnect(mp_handle *h);

/* Return a new regular fd for the socket behind h, owned by the caller (close it when done).
 * For an lwsocket this installs the direct descriptor in the fd table
 * (IORING_OP_FIXED_FD_INSTALL); for a regular fd it is a dup().  The handle keeps working.
 * Returns the fd, -EBADF, -ENOTSUP (kernel without FIXED_FD_INSTALL), or -errno. */
int mp_export_fd(mp_handle *h);

/* ---------------------------------------------------------------------------------------- */
/* Readiness adapter (for event libraries that need readiness rather than completions)       */
/* ---------------------------------------------------------------------------------------- */

/* Watch flags (mp_watch(), mp_poll_add()) */
#define MP_POLL_ET 0x1      /* edge-triggered (EPOLLET); default level-triggered */
#define MP_POLL_ONESHOT 0x2 /* report once, then stay quiet until the interest is set again
                               (EPOLLONESHOT) */

/* The readiness set: one implementation of epoll's readiness semantics for every front-end
 * (the libevent method, libuv's non-stream handles, the nginx module, the epoll emulation).
 *
 * mp_watch() sets the interest of fd (events: EPOLLIN, EPOLLOUT, EPOLLRDHUP, EPOLLPRI; flags:
 * MP_POLL_ET, MP_POLL_ONESHOT) and the cookie its events carry, adding the fd to the set or
 * changing its entry.  events == 0 removes it (as mp_unwatch()).  Readiness is reported as
 * MP_EV_POLL events: u.poll.fd, u.poll.revents (the interest that is ready, plus EPOLLERR and
 * EPOLLHUP, always watched), result = revents, the cookie; ev.handle names the set's internal
 * watch (only useful to mp_poll_mod()/mp_poll_del()).  The semantics are epoll's:
 *   - level-triggered: an fd is reported while the condition holds, once per mp_dispatch call
 *     at most: after its event was handed out, the next wait looks again.  While one event of
 *     an fd waits in the queue, further readiness merges into it (never two events of one fd
 *     in the queue);
 *   - MP_POLL_ET: reported when new readiness arrives (a transition), not again for old;
 *   - MP_POLL_ONESHOT: one report, then nothing until mp_watch() sets the interest again;
 *   - EPOLLRDHUP: the peer shut down its sending side.
 * After mp_unwatch() (or mp_watch(.., 0, ..)) no event of the fd's old entry is delivered,
 * even if the fd is closed and its number reused at once.  Polls and completion operations
 * (mp_register()) may be on the same fd.
 * Close before unwatching: with MP_READINESS=poll the kernel's poll request holds the file
 * open (a socket stays connected) until the watch is removed or changed; with the epoll set
 * (the default) closing the last descriptor of a file removes it from the set, as with epoll.
 * Either way, an entry whose fd number is later reused follows the new file at the next
 * mp_watch() of that number.
 *
 * Threads: mp_watch() and mp_unwatch() may be called from any thread of the owning process
 * (programs call epoll_ctl() and event_add() from threads that do not wait).  Called by the
 * owner they take effect at once (a queued request, no system call); called by another thread
 * they are recorded and applied by the owner's mp_dispatch*(), which is woken for it if it
 * waits (no MP_EV_WAKE event is delivered for such a wake-up).  They do not make the caller
 * the owner: before any other call has, they are recorded, and the thread that first
 * dispatches (or makes any other call) becomes the owner and applies them, so a set prepared
 * on one thread can be dispatched on another.
 *
 * Returns 0 or -EBADF (bad channel, or fd not open), -EINVAL (bad events or flags), -ENOENT
 * (mp_unwatch() of an fd not in the set), -ENOMEM, -EPERM (forked child).  What the kernel
 * refuses later (with an epoll set: EPERM for a file epoll cannot watch, such as a regular file;
 * ELOOP) is reported as one MP_EV_POLL event with EPOLLERR | EPOLLHUP, after which the entry
 * stays quiet until it is set again. */
int mp_watch(mp_channel *ch, int fd, uint32_t events, int flags, void *cookie);
int mp_unwatch(mp_channel *ch, int fd);

/* The handle form of the same set, for the owning thread only.  mp_poll_add() adds fd (errors,
 * NULL and errno: EBADF, EINVAL, EEXIST (fd already in the set), ENOMEM, EPERM) and returns its
 * watch; the registration is a queued request, not a system call. */
mp_handle *mp_poll_add(mp_channel *ch, int fd, uint32_t events, int flags, void *cookie);

/* Change the interest set (and flags) of a watch; re-enables a MP_POLL_ONESHOT watch that
 * reported.  Returns 0, -EBADF, -EINVAL, -EPERM. */
int mp_poll_mod(mp_handle *h, uint32_t events, int flags);

/* Stop watching: after this returns, no readiness event of this watch is delivered, even if
 * fd is closed and its number reused at once; the watch's one MP_EV_CLOSED follows when the
 * kernel let go of its poll (see "Lifetimes").  Returns 0, -EBADF or -EPERM. */
int mp_poll_del(mp_handle *h);

/* ---------------------------------------------------------------------------------------- */
/* Foreign epoll sets                                                                        */
/* ---------------------------------------------------------------------------------------- */

/* Serving an epoll set the application made itself (epoll_create1(2)), through the channel:
 * the interest changes of many fds and the wait become one system call.  This is what the
 * epoll emulation behind megapipe-run (compat/) stands on; the epoll set stays the kernel's,
 * so fork, exec, dup, nesting and close keep epoll's semantics.
 *
 * mp_epoll_ctl() is epoll_ctl(2) as a request.  On io_uring it is an IORING_OP_EPOLL_CTL
 * queued with the channel's other requests (no system call) and returns 0 once queued; the
 * kernel runs it with the channel's next submission (mp_epoll_wait(), mp_dispatch*(),
 * mp_flush(), or a full batch), in the order the requests were made.  The caller must know
 * the result already (as the emulation does, which keeps each set's interest list) or not
 * care.  A queued ADD or MOD the kernel refuses for a reason that leaves the fd open (ENOMEM,
 * ENOSPC, EPERM, EINVAL, ELOOP, EEXIST) is reported by the next mp_epoll_wait() on that epfd as
 * one event with EPOLLERR | EPOLLHUP and the request's data, so the fd does not silently go
 * deaf; a refused DEL, and EBADF/ENOENT (the fd was closed before the request ran: its data
 * may name something the application freed), are only counted (mp_stats.epoll_ctl_failed).
 * Close an fd only after the requests that name it were submitted (mp_flush()): a request
 * names an fd number, and a number closed and reused before the kernel runs it names another
 * file.  On the epoll engine, and where the kernel lacks IORING_OP_EPOLL_CTL, the call is
 * epoll_ctl(2) itself and returns its result.
 * Returns 0, or -EBADF (bad channel), -EINVAL (op not ADD/MOD/DEL), -EFAULT (NULL event for
 * ADD or MOD), -EPERM (wrong thread, forked child), -ENOMEM, or epoll_ctl(2)'s -errno where
 * the call is synchronous.
 *
 * mp_epoll_wait() is epoll_pwait2(2): it hands every queued request to the kernel and waits up
 * to timeout_ns nanoseconds (-1: no limit; 0: do not block) for events of epfd, with the signal
 * mask sigmask during the wait (NULL: unchanged), in one io_uring_enter() (IORING_OP_EPOLL_WAIT,
 * Linux 6.15+; the enter's own timeout bounds the wait, and a wait that times out costs a second
 * call, which cancels the request; timeout 0 with requests to hand over submits the wait and
 * its cancellation together, so it never blocks and arms no timer; timeout 0 with nothing to
 * hand over is epoll_pwait2(2) itself).
 * The kernel writes the events straight
 * into events[0..maxevents), which belongs to the kernel until the call returns (it does not
 * return before the wait request has completed, cancelled if a signal interrupted it).  Other
 * completions that arrive meanwhile are turned into the channel's events as a wait in
 * mp_dispatch() would and stay queued for it.  Without IORING_OP_EPOLL_WAIT (and on the epoll
 * engine) the queued requests are submitted first, then epoll_pwait2(2) waits: two system calls
 * when requests were queued, one otherwise.
 * Returns the number of events (0 on timeout), or -EINTR (a signal arrived, no event), -EBADF
 * (bad channel or epfd), -EINVAL (epfd not an epoll fd, maxevents <= 0), -EFAULT (NULL events),
 * -EPERM (wrong thread, forked child), or another epoll_pwait2(2) -errno.
 *
 * Threads: the owner thread only, like every channel call. */
int mp_epoll_ctl(mp_channel *ch, int epfd, int op, int fd, const struct epoll_event *event);
/* mp_close() is close(2) of a regular fd through the channel: the requests queued so far (such
 * as an EPOLL_CTL_DEL of that fd) and the close go to the kernel in one system call on io_uring
 * (IORING_OP_CLOSE); on the epoll engine it is close(2).  It returns when the fd is closed (the
 * number may be reused at once) with close(2)'s result: 0, or -EBADF (fd not open; bad
 * channel), -EINTR, -EIO, -EPERM (wrong thread, forked child).  Not for fds registered with
 * mp_register() (mp_unregister() them) nor lwsockets (mp_close_accepted()). */
int mp_close(mp_channel *ch, int fd);
int mp_epoll_wait(mp_channel *ch, int epfd, struct epoll_event *events, int maxevents,
                  int64_t timeout_ns, const sigset_t *sigmask);

/* mp_epoll_wait() with flags (0: exactly mp_epoll_wait()).
 *   MP_EPOLL_WAIT_CHANNEL: the channel's own events end the wait too.  For a front-end that
 *   serves some fds through the channel's handles (buffered reads, writes) and leaves the
 *   others in the application's epoll set, and must wake for either.  When the channel has
 *   events queued (completions of its handles, MP_EV_WAKE from mp_wake() in another thread)
 *   before or during the wait, the wait returns at once with the events of epfd the kernel had
 *   ready (possibly 0, which then is not a timeout); collect the channel's with
 *   mp_dispatch*() (without blocking: timeout 0).  Receives paused at MP_BUF_PER_CONN and other
 *   work that waits for the channel's next wait are re-armed first, as mp_dispatch*() does.
 *   On io_uring it needs IORING_OP_EPOLL_WAIT (Linux 6.15+; mp_stats.features has
 *   MP_FEAT_EPOLL_WAIT): without it the call fails with -ENOTSUP.  On the epoll engine a
 *   blocking wait is a ppoll() on epfd and the channel's own epoll set, then epoll_pwait2()
 *   without blocking on the one that is ready.
 * Returns as mp_epoll_wait(), and -EINVAL for unknown flags. */
#define MP_EPOLL_WAIT_CHANNEL 0x1
int mp_epoll_wait_flags(mp_channel *ch, int epfd, struct epoll_event *events, int maxevents,
                        int64_t timeout_ns, const sigset_t *sigmask, int flags);

/* ---------------------------------------------------------------------------------------- */
/* Statistics                                                                                */
/* ---------------------------------------------------------------------------------------- */

#define MP_STATS_HIST 8 /* batch-size buckets: 1, 2-3, 4-7, 8-15, 16-31, 32-63, 64-127, 128+ */

/* features / fallbacks bits */
#define MP_FEAT_SINGLE_ISSUER 0x001u
#define MP_FEAT_DEFER_TASKRUN 0x002u
#define MP_FEAT_REGISTERED_RING 0x004u
#define MP_FEAT_DIRECT_DESCRIPTORS 0x008u
#define MP_FEAT_MULTISHOT_ACCEPT 0x010u
#define MP_FEAT_FIXED_FD_INSTALL 0x020u
#define MP_FEAT_BUF_RING 0x040u
#define MP_FEAT_RECV_MULTISHOT 0x080u
#define MP_FEAT_NODROP 0x100u
#define MP_FEAT_EXT_ARG 0x200u
#define MP_FEAT_POLL_MULTISHOT 0x400u
#define MP_FEAT_MIN_WAIT 0x800u
#define MP_FEAT_EPOLL_WAIT 0x1000u /* IORING_OP_EPOLL_WAIT (readiness set, Linux 6.15+) */
#define MP_FALLBACK_EPOLL_ENGINE 0x10000u /* io_uring could not be set up */

typedef struct mp_stats {
    uint32_t size;             /* bytes of this struct mp_get_stats() filled */
    char engine[8];            /* "uring" or "epoll" */
    uint32_t features;         /* MP_FEAT_* the engine found and uses */
    uint32_t missing;          /* MP_FEAT_* the engine looked for and did not find */
    uint32_t fallbacks;        /* MP_FALLBACK_* taken */
    uint64_t requests;         /* operations requested by the application */
    uint64_t syscalls;         /* system calls made by the engine (io_uring_enter, epoll_wait,
                                  send/recv/accept on epoll, ...) */
    uint64_t submits;          /* system calls that submitted requests */
    uint64_t sqes;             /* submission entries handed to the kernel */
    uint64_t cqes;             /* completion entries reaped */
    uint64_t events;           /* events handed out by mp_dispatch() */
    uint64_t batch_hist[MP_STATS_HIST]; /* SQEs per submitting system call */
    uint64_t cq_overflows;     /* times the kernel reported a completion-ring overflow */
    uint64_t accept_errors;    /* failed accepts (EMFILE, ENFILE, ...) */
    uint64_t stolen_accepts;   /* connections accepted from a sibling partition */
    uint64_t bufs_in_use;      /* buffered reads: buffers held by the application now */
    uint64_t bufs_peak;        /* ... and at most */
    uint64_t buf_starved;      /* buffered reads that waited for a buffer */
    uint64_t handles;          /* handles registered now */
    uint64_t probes;           /* system calls mp_register() made to learn what a foreign fd
                                  is (also counted in syscalls); 0 for connections the channel
                                  accepted itself */
    uint64_t accept_paused;    /* times accepting paused because the lwsocket table was full */
    uint64_t buf_paused;       /* times a connection's buffered receive paused at MP_BUF_PER_CONN */
    char readiness[8];         /* how readiness watches are served: "poll" or "epoll" */
    uint64_t watch_ops;        /* readiness-set requests sent to the kernel (poll requests armed,
                                  epoll_ctl operations) */
    uint64_t watch_remote;     /* mp_watch()/mp_unwatch() calls from other threads */
    uint64_t epoll_waits;      /* mp_epoll_wait() calls */
    uint64_t epoll_ctls;       /* mp_epoll_ctl() calls (queued or synchronous) */
    uint64_t epoll_ctl_failed; /* queued mp_epoll_ctl() requests the kernel refused */
    uint64_t set_waits;        /* io_uring engine: waits that were an epoll_wait() on the
                                  readiness set, not an io_uring_enter() (MP_READINESS) */
    uint64_t peer_lookups;     /* MP_ACCEPT_ADDR on io_uring: peer addresses asked for with
                                  getpeername() (also counted in syscalls), for connections
                                  that a multishot accept took together with later ones (its
                                  one address buffer holds only the latest's); none with
                                  MP_ACCEPT_ADDR_KNOWN */
} mp_stats;

/* Copy the channel's counters into *st, at most size bytes (the caller's sizeof(mp_stats):
 * use the macro); st->size says how many were filled.  Returns 0, -EBADF (bad ch), -EINVAL
 * (NULL st or size smaller than the first version's).  Callable from any thread. */
int mp_get_stats_sized(const mp_channel *ch, mp_stats *st, size_t size);
#define mp_get_stats(ch, st) mp_get_stats_sized((ch), (st), sizeof(mp_stats))

/* Print st (filled by mp_get_stats) in a readable form to a stdio FILE* (e.g. stderr). */
void mp_print_stats(const mp_stats *st, void *stdio_file);

#ifdef __cplusplus
}
#endif
#endif /* MEGAPIPE_H */
