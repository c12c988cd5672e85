/*
 * mp_memcached.h — the hooks patches/memcached/ puts into memcached 1.6 (memcached.c, thread.c)
 * to run its worker threads on MegaPipe channels.  Included at the end of memcached.h.
 *
 * Each worker thread owns a channel.  TCP listeners (not TLS, not -N) are one SO_REUSEPORT
 * socket per worker, each adopted as that worker's partition: workers accept in parallel, no
 * hand-off through the dispatcher's notify pipe.  Connections served by a channel come in two
 * kinds:
 *   - completion: TCP and unix-socket streams.  Reads are buffered multishot receives (the
 *     channel's provided buffers; mp_read() into a per-connection buffer on the epoll
 *     engine), copied out by conn->read; responses go out with one mp_writev() per transmit
 *     and the responses are finished (_transmit_post) when the write has completed.
 *   - readiness: UDP and TLS connections keep memcached's own read/sendmsg and are driven by
 *     the channel's readiness adapter (mp_poll_*), as libevent drove them.
 * MEMCACHED_MEGAPIPE=0 in the environment runs memcached unchanged (libevent everywhere).
 */
#ifndef MP_MEMCACHED_H
#define MP_MEMCACHED_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

/* memcached's own functions the hooks call (made non-static by the patch). */
void drive_machine(conn *c);
void _transmit_post(conn *c, ssize_t res);
void thread_libevent_process(evutil_socket_t fd, short which, void *arg);

/* conn_new(): serve c by the calling worker's channel.  1 = attached (memcached must not add
 * c->event to libevent), 0 = not a MegaPipe worker thread (libevent as usual), -1 = failed. */
int mpc_conn_attach(conn *c);
/* conn_new(), instead of getpeername(): when sfd is the connection the calling worker is
 * accepting, fill c->request_addr/request_addr_size from its ACCEPT event and return true
 * (no system call); false otherwise (getpeername() as usual).  When the event has none (the
 * channel does not look it up), request_addr_size is left 0 and the address is asked for only
 * when memcached needs it: at once while connection events are watched, else by
 * mpc_peer_addr_fetch(). */
bool mpc_peer_addr(conn *c, int sfd);
/* conn_to_str() ("stats conns") and conn_close()'s connection event: the client's address of
 * a TCP connection that conn_new() left without one (getpeername() now). */
void mpc_peer_addr_fetch(conn *c);
/* drive_machine(): how many requests this run may process (reqs_per_event, -R), and what was
 * left of it when the machine parked for its write to complete: the run that the WRITE
 * completion starts goes on with that budget, so -R yields as it does on a socket. */
int mpc_reqs_budget(conn *c);
void mpc_save_budget(conn *c, int nreqs);
/* update_event() for an attached connection: what the state machine waits for next. */
bool mpc_update_event(conn *c, int new_flags);
/* conn_close(): instead of close(c->sfd). */
void mpc_conn_close(conn *c);
/* server_socket(), before bind(): SO_REUSEPORT on a TCP socket the workers will partition. */
void mpc_listener_prepare(int sfd, enum network_transport transport, bool ssl_enabled);
/* server_socket(), once memcached made its listening conn lc: when lc is partitioned (TCP,
 * not TLS, no -N) the workers accept from lc's socket and from siblings made here, and lc is
 * taken off the dispatcher's event loop (it stays in listen_conn: "stats conns", maxconns). */
void mpc_listener_add(conn *lc, bool ssl_enabled);
/* main(), once every listening socket exists: workers start accepting. */
void mpc_listeners_ready(void);
/* worker_libevent(): run the worker on its channel until memcached stops it.  false = the
 * MegaPipe path is off; run libevent's loop. */
bool mpc_worker_loop(LIBEVENT_THREAD *me);

#endif
