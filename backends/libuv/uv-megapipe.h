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


/* TCP streams through completions (uv-megapipe-tcp.c; UV_MEGAPIPE_TCP=1).  Each returns 1 when
 * the stream is handled on the channel (the caller's stock path is skipped), 0 for stock. */
/* uv__read_start: after read_cb/alloc_cb and the flags are set. */
int uv__mp_stream_read_start(uv_stream_t* stream);
/* uv_write2: after the request joined write_queue. */
int uv__mp_stream_write(uv_stream_t* stream);
/* uv__stream_io (pending phase, or readiness while connecting). */
int uv__mp_stream_io(uv_stream_t* stream);
/* uv__tcp_listen: after listen() succeeded, before the readiness watch starts. */
int uv__mp_tcp_listen(uv_tcp_t* tcp);
/* new_socket (tcp.c): the process made this socket itself, so no other process holds it yet
 * (fork() may change that: see uv__mp_tcp_listen). */
void uv__mp_tcp_socket_made(uv_tcp_t* tcp);
/* uv_write2 / uv_try_write2 with a send_handle: another process may accept from it now. */
void uv__mp_handle_sent(uv_stream_t* handle);
/* uv_try_write2: a non-blocking write for streams on the channel (their fds may be blocking). */
int uv__mp_try_write(uv_stream_t* stream, const uv_buf_t bufs[], unsigned int nbufs, int* result);
/* uv__stream_close: first thing. */
void uv__mp_stream_close(uv_stream_t* stream);
/* uv_close: 1 = uv__make_close_pending() comes later, at the handle's MP_EV_CLOSED. */
int uv__mp_close_deferred(uv_handle_t* handle);
/* uv_run, before it returns: submit what the loop's channel still queues (a stream's fd is
 * closed by the channel, queued: see uv__mp_stream_close), so that no close waits for a next
 * uv_run.  No system call when nothing is queued. */
void uv__mp_run_end(uv_loop_t* loop);

#endif
