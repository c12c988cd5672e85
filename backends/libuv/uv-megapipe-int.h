/*
 * uv-megapipe-int.h — what uv-megapipe.c (the loop and its readiness watches) and
 * uv-megapipe-tcp.c (TCP streams through completions) share: the loop's channel record.
 */
#ifndef UV_MEGAPIPE_INT_H
#define UV_MEGAPIPE_INT_H

#include <pthread.h>
#include <stdint.h>

#include <megapipe.h>

#include "uv.h"

/* Events taken from the channel per wait at most (stock libuv: 1024 epoll events). */
#define UVMP_BATCH 1024

struct uvmp_conn;

struct uvmp_fd {
  mp_handle* h;     /* the readiness watch on this fd number, or NULL */
  uint32_t events;  /* its interest set */
  struct uvmp_conn* pre;  /* a connection accepted on the channel, registered at once, not
                             yet taken by uv_accept() + a read/write */
};

struct uvmp {
  mp_channel* ch;
  pthread_t owner;           /* thread that runs the loop (valid when bound) */
  int bound;
  int tcp;                   /* TCP streams go through completions (UV_MEGAPIPE_TCP) */
  int excl_accept;           /* UV_MEGAPIPE_EXCLUSIVE_ACCEPT (default 1): listeners this
                                process made itself accept exclusively (one multishot) */
  unsigned long forkgen;     /* uvmp_forkgen when the channel was made */
  unsigned long sharegen;    /* uv__mp_sharegen() when this loop's listeners were last
                                looked at (exclusive ones are shared when it moves) */
  struct uvmp_fd* fds;       /* readiness watches, indexed by fd */
  unsigned int nfds;
  struct uvmp_conn* conns;   /* TCP streams on completions (list), closing ones included */
  mp_event evs[UVMP_BATCH];
};

struct uvmp* uv__mp_of(const uv_loop_t* loop);
/* The readiness record of fd (grown as needed), or NULL (no memory). */
struct uvmp_fd* uv__mp_slot(struct uvmp* m, int fd);
/* The io callback of a listening TCP stream that accepts on the channel: never registered
 * for readiness. */
void uv__mp_server_io(uv_loop_t* loop, uv__io_t* w, unsigned int events);
/* One completion event of a TCP stream (cookie = its uvmp_conn). */
void uv__mp_conn_event(uv_loop_t* loop, struct uvmp* m, const mp_event* ev);
/* The share generation: moves at every fork() in the parent (a child may accept from every
 * listening socket it inherited) and when a handle of another loop's thread is sent
 * (uv__mp_sharegen_bump).  A listener may stay exclusive only while it has not moved since
 * its socket was made. */
unsigned long uv__mp_sharegen(void);
void uv__mp_sharegen_bump(void);
/* The generation moved: every exclusive listener of the loop accepts shared from now on. */
void uv__mp_listeners_share(struct uvmp* m);
/* The loop's channel may be used from this thread. */
int uv__mp_on_owner(const struct uvmp* m);
/* The channel is going away (rebuild, fork): streams go back to stock readiness. */
void uv__mp_conns_orphan(uv_loop_t* loop, struct uvmp* m);

#endif
