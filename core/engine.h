/*
 * engine.h — the one seam between the API and the kernel.
 *
 * An engine turns the core's requests (start this read, this write, arm this accept, watch
 * this fd) into kernel work and feeds the outcomes back through the mp__*_done() callbacks in
 * internal.h.  Everything else — handles, per-handle FIFOs, the event queue, statistics — is
 * engine-independent and lives in the core.  Two engines implement it: core/uring/
 * (io_uring, primary) and engine_epoll.c (epoll + non-blocking syscalls, fallback).
 */
#ifndef MP_ENGINE_H
#define MP_ENGINE_H

#include <signal.h>
#include <stdint.h>
#include <sys/types.h>

struct mp_channel;
struct mp_handle;
struct mp_op;
struct epoll_event;

/* Returned by start_read/start_write when the operation went to the kernel and will complete
 * later through mp__read_done()/mp__write_done(). */
#define MP_INPROGRESS ((ssize_t)-0x7fffffff)

typedef struct mp_engine {
    const char *name;
    /* Bytes of engine-private state per handle, kept by the core beside the handle and zeroed
     * whenever the slot is (re)allocated (mp__handle_priv()).  0: none. */
    size_t handle_priv;
    /* Build the engine's kernel objects for ch; 0 or -errno (then the core may fall back). */
    int (*init)(struct mp_channel *ch);
    /* Tear down (handles are already detached). */
    void (*fini)(struct mp_channel *ch);
    /* A handle was registered (epoll: add the fd to the set).  0 or -errno. */
    int (*attach)(struct mp_channel *ch, struct mp_handle *h);
    /* A handle was unregistered: stop all its kernel work.  Returns the number of kernel
     * operations still referencing h; the engine calls mp__handle_settled() when each ends. */
    unsigned (*detach)(struct mp_channel *ch, struct mp_handle *h);
    /* Start the head read of h (op->type OP_READ or OP_READBUF): a result (>= 0 or -errno)
     * when it completed at once, or MP_INPROGRESS. */
    ssize_t (*start_read)(struct mp_channel *ch, struct mp_handle *h, struct mp_op *op);
    /* Start the head of h's write queue (OP_WRITE, OP_WRITEV from op->done on, OP_SHUTDOWN,
     * OP_CONNECT): a result or MP_INPROGRESS. */
    ssize_t (*start_write)(struct mp_channel *ch, struct mp_handle *h, struct mp_op *op);
    /* (Re)arm accepting on listener h as h->acc describes.  0 or -errno. */
    int (*arm_accept)(struct mp_channel *ch, struct mp_handle *h);
    /* Listener h stopped being exclusive (mp_accept_share: h->acc.excl is now false): accept
     * from its queue so that others accepting from it take turns, without losing what the
     * engine already took.  0 or -errno.  NULL: the engine accepts the same way either way. */
    int (*share_accept)(struct mp_channel *ch, struct mp_handle *h);
    /* Readiness adapter: (re)arm or change the watch h (h->pw describes it).  0 or -errno. */
    int (*poll_arm)(struct mp_channel *ch, struct mp_handle *h);
    /* Submit every queued request.  Number submitted or -errno. */
    int (*flush)(struct mp_channel *ch);
    /* Hand queued requests to the kernel and wait up to timeout_ms (-1 forever, 0 not at all)
     * for completions; turn them into events.  0, -ETIME, -EINTR or -errno. */
    int (*wait)(struct mp_channel *ch, int timeout_ms);
    /* Thread-safe wake-up of wait(). */
    int (*wake)(struct mp_channel *ch);
    /* New regular fd for h's socket, or -errno. */
    int (*export_fd)(struct mp_channel *ch, struct mp_handle *h);
    /* Buffered reads: make the channel's provided-buffer ring (once).  0, -ENOTSUP or
     * -errno.  NULL: the engine has no buffered reads. */
    int (*buf_setup)(struct mp_channel *ch);
    /* Buffered reads: give buffer id back to the kernel's ring.  0 or -errno. */
    int (*buf_release)(struct mp_channel *ch, unsigned buf_id);
    /* Close an lwsocket slot that no handle owns (queued, no system call).  NULL: no lwsockets. */
    void (*close_direct)(struct mp_channel *ch, unsigned slot);
    /* Completions the kernel has posted and the engine not yet reaped (no system call). */
    unsigned (*ready)(const struct mp_channel *ch);
    /* Foreign epoll sets (fepoll.c): epoll_ctl(2) on the application's set epfd, queued (0)
     * or done at once (its result); a queued request the kernel refuses is handed to
     * mp__fepoll_failed().  Arguments are checked by the core. */
    int (*epoll_ctl)(struct mp_channel *ch, int epfd, int op, int fd,
                     const struct epoll_event *ev);
    /* Submit what is queued and wait for events of epfd, as epoll_pwait2(2) (timeout_ns -1:
     * no limit).  With MP_EPOLL_WAIT_CHANNEL in flags, also end the wait (with the events of
     * epfd gathered so far, maybe none) once the channel has events of its own queued.
     * Number of events or -errno. */
    int (*epoll_wait)(struct mp_channel *ch, int epfd, struct epoll_event *evs, int max,
                      int64_t timeout_ns, const sigset_t *sigmask, int flags);
    /* close(2) of fd with what is queued, done when it returns: 0 or -errno. */
    int (*close_fd)(struct mp_channel *ch, int fd);
    /* close(2) of fd as a queued request whose result nobody waits for. */
    void (*close_later)(struct mp_channel *ch, int fd);
} mp_engine;

extern const mp_engine mp__engine_uring;
extern const mp_engine mp__engine_epoll;

#endif
