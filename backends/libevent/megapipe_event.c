/*
 * megapipe_event.c — libevent 2.1's `megapipe` event method: readiness through a MegaPipe
 * channel's readiness set (mp_watch, served by io_uring) instead of epoll.  Compiled inside
 * libevent's tree (it uses libevent's internal headers, like epoll.c) and linked against
 * libmegapipe; it uses only the public megapipe API.
 *
 * The method is a translation table: libevent's add/del become mp_watch()/mp_unwatch() with
 * EV_READ/EV_WRITE/EV_CLOSED/EV_ET mapped to EPOLLIN/EPOLLOUT/EPOLLRDHUP/MP_POLL_ET, and its
 * dispatch is one mp_dispatch_batch() whose MP_EV_POLL events become evmap_io_active_() calls.
 * The policy an epoll-like method needs lives in the core, shared with the other front-ends
 * (include/megapipe.h, "The readiness set"): interest changes from threads that do not
 * dispatch (libevent drops the base lock while it waits), level-triggered reports once per
 * dispatch and never twice in the queue, edge-triggered, fd reuse after close, fork.
 *
 * What stays here is libevent's own business:
 *  - If the base is dispatched from another thread than the channel's owner (the ring is
 *    bound to one thread), the channel is rebuilt on the new thread and libevent re-adds every
 *    fd it watches (evmap_reinit_).
 *  - After fork() the child must not touch the parent's ring: the channel refuses calls from
 *    the child, dealloc releases only the child's copy, and event_reinit() builds a fresh
 *    channel (need_reinit).
 */
#include "event2/event-config.h"
#include "evconfig-private.h"

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/queue.h>
#include <sys/types.h>
#include <unistd.h>

#include <megapipe.h>

#include "event-internal.h"
#include "evsignal-internal.h"
#include "event2/thread.h"
#include "evthread-internal.h"
#include "log-internal.h"
#include "evmap-internal.h"
#include "mm-internal.h"
#include "util-internal.h"

/* Events handed to libevent per dispatch at most; the rest stay queued in the channel. */
#define MPEV_BATCH 256

/* Per-fd record, stored by libevent next to its evmap entry (zeroed when first used). */
struct mpev_fd {
	short et; /* the fd's events are edge-triggered */
};

struct mpev {
	mp_channel *ch;
	mp_event evs[MPEV_BATCH]; /* one dispatch's events */
};

static void *mpev_init(struct event_base *);
static int mpev_add(struct event_base *, evutil_socket_t, short, short, void *);
static int mpev_del(struct event_base *, evutil_socket_t, short, short, void *);
static int mpev_dispatch(struct event_base *, struct timeval *);
static void mpev_dealloc(struct event_base *);

const struct eventop megapipeops = {
	"megapipe",
	mpev_init,
	mpev_add,
	mpev_del,
	mpev_dispatch,
	mpev_dealloc,
	1, /* need_reinit: the ring must not be shared with a forked child */
	EV_FEATURE_ET | EV_FEATURE_O1 | EV_FEATURE_EARLY_CLOSE,
	sizeof(struct mpev_fd),
};

static mp_channel *mpev_channel(void) {
	mp_options o;
	mp_options_init(&o);
	/* io_uring only: where it is missing (old kernel, seccomp, io_uring_disabled) we decline
	 * and libevent takes its next method (epoll), which is better than our epoll engine. */
	o.engine = MP_ENGINE_URING;
	/* Readiness only: no lwsockets, so no direct-descriptor table worth its memory. */
	o.lwsocket = 0;
	o.max_lwsockets = 1;
	return mp_create(&o);
}

static void *mpev_init(struct event_base *base) {
	struct mpev *m = mm_calloc(1, sizeof *m);
	if (!m) return NULL;
	m->ch = mpev_channel();
	if (!m->ch) {
		event_debug(("%s: no io_uring channel (%s); declining", __func__, strerror(errno)));
		mm_free(m);
		return NULL;
	}
	evsig_init_(base);
	return m;
}

static uint32_t watch_mask(short what) {
	uint32_t mask = 0;
	if (what & EV_READ) mask |= EPOLLIN;
	if (what & EV_WRITE) mask |= EPOLLOUT;
	if (what & EV_CLOSED) mask |= EPOLLRDHUP;
	return mask;
}

static int watch(struct mpev *m, evutil_socket_t fd, short what, struct mpev_fd *fi) {
	int r = what ? mp_watch(m->ch, fd, watch_mask(what), fi->et ? MP_POLL_ET : 0, NULL)
	             : mp_unwatch(m->ch, fd);
	if (r == -ENOENT) r = 0; /* removing what is gone already (the fd was closed) */
	if (r < 0) {
		errno = -r;
		event_warn("%s: mp_watch(fd %d)", __func__, (int)fd);
		return -1;
	}
	return 0;
}

static int mpev_add(struct event_base *base, evutil_socket_t fd, short old, short events,
                    void *p) {
	struct mpev_fd *fi = p;
	fi->et = (short)((events & EV_ET) != 0);
	return watch(base->evbase, fd, (short)((old | events) & (EV_READ | EV_WRITE | EV_CLOSED)),
	             fi);
}

static int mpev_del(struct event_base *base, evutil_socket_t fd, short old, short events,
                    void *p) {
	struct mpev_fd *fi = p;
	short left = (short)(old & ~events & (EV_READ | EV_WRITE | EV_CLOSED));
	if (!left) fi->et = 0;
	return watch(base->evbase, fd, left, fi);
}

/* The base is dispatched from a thread the ring is not bound to (or in a forked child that did
 * not call event_reinit): a new channel here, and libevent adds every fd to it again. */
static int migrate(struct event_base *base, struct mpev *m) {
	mp_channel *ch = mpev_channel();
	if (!ch) {
		event_warn("%s: mp_create", __func__);
		return -1;
	}
	mp_destroy(m->ch); /* its owner is not inside it: libevent holds the base lock */
	m->ch = ch;
	return evmap_reinit_(base);
}

static short io_events(uint32_t what) {
	if (what & EPOLLERR) return EV_READ | EV_WRITE;
	if ((what & EPOLLHUP) && !(what & EPOLLRDHUP)) return EV_READ | EV_WRITE;
	short evs = 0;
	if (what & EPOLLIN) evs |= EV_READ;
	if (what & EPOLLOUT) evs |= EV_WRITE;
	if (what & EPOLLRDHUP) evs |= EV_CLOSED;
	return evs;
}

static int mpev_dispatch(struct event_base *base, struct timeval *tv) {
	struct mpev *m = base->evbase;
	int timeout = -1;
	if (tv) {
		long ms = evutil_tv_to_msec_(tv);
		timeout = (ms < 0 || ms > INT_MAX) ? INT_MAX : (int)ms;
	}

	mp_channel *ch = m->ch;
	EVBASE_RELEASE_LOCK(base, th_base_lock);
	/* One call hands out every event the wait produced (up to the array); anything left is
	 * handed out by the next dispatch without a system call. */
	int n = mp_dispatch_batch(ch, m->evs, MPEV_BATCH, timeout);
	EVBASE_ACQUIRE_LOCK(base, th_base_lock);

	if (n == -EPERM) { /* another thread (or a forked child): see migrate() */
		if (migrate(base, m) < 0) return -1;
		return 0; /* libevent loops: the next dispatch waits on the new channel */
	}
	if (n < 0 && n != -EINTR) {
		errno = -n;
		event_warn("mp_dispatch");
		return -1;
	}
	for (int i = 0; i < n; i++) {
		const mp_event *ev = &m->evs[i];
		if (ev->cmd != MP_EV_POLL) continue; /* CLOSED of removed watches */
		short evs = io_events(ev->u.poll.revents);
		if (evs) evmap_io_active_(base, ev->u.poll.fd, evs | EV_ET);
	}
	return 0;
}

static void mpev_dealloc(struct event_base *base) {
	struct mpev *m = base->evbase;
	evsig_dealloc_(base);
	/* In a forked child this only releases the child's copy of the ring (megapipe.h, fork). */
	mp_destroy(m->ch);
	memset(m, 0, sizeof *m);
	mm_free(m);
}
