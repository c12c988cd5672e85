/*
 * uv-megapipe.h — the hooks libuv's patched sources call (patches/libuv/): a loop created
 * with UV_USE_MEGAPIPE=1 in the environment runs its poll phase on a MegaPipe channel.
 * Included by libuv's src/unix/internal.h when built with UV_HAVE_MEGAPIPE.
 */
#ifndef UV_MEGAPIPE_H
#define UV_MEGAPIPE_H

#include "uv.h"

/* Called at the end of uv__platform_loop_init (the epoll fd exists).  Without the variable it
 * does nothing; with it, it attaches a channel to the loop, or logs once and leaves the loop
 * stock when io_uring cannot be set up. */
void uv__mp_loop_init(uv_loop_t* loop);
/* Called from uv__platform_loop_delete (uv_loop_close, uv_loop_fork): releases the channel. */
void uv__mp_loop_delete(uv_loop_t* loop);
/* 1 when the loop runs on a channel. */
int uv__mp_active(const uv_loop_t* loop);
/* The poll phase on the channel: uv__io_poll's job, same contract.  Returns 0, or UV_ENOSYS
 * when the loop is (or just became) stock and epoll must do it. */
int uv__mp_io_poll(uv_loop_t* loop, int timeout);
/* uv__platform_invalidate_fd: the fd is being closed; drop its watch and its pending events. */
void uv__mp_invalidate_fd(uv_loop_t* loop, int fd);

#endif
