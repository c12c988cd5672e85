/*
 * megapipe_event.c — libevent 2.1's `megapipe` event method: readiness through a MegaPipe
 * channel (io_uring poll requests) instead of epoll.  Compiled inside libevent's tree (it uses
 * libevent's internal headers, like epoll.c) and linked against libmegapipe; it uses only the
 * public megapipe API (mp_create, mp_poll_add/mod/del, mp_dispatch_batch).
 *
 * Why the method is shaped the way it is:
 *
 *  - Interest changes are recorded, not applied.  add/del only update the per-fd record that
 *    libevent keeps for us (fdinfo) and put it on a dirty list; dispatch applies the list with
 *    mp_poll_* calls (queued SQEs, no system call) right before it waits, so a burst of
 *    event_add/event_del costs nothing until the one io_uring_enter of the wait.  This also keeps
 *    every call on the channel on the dispatching thread: libevent drops the base lock while it
 *    waits and other threads may call event_add meanwhile, but a channel is single-threaded
 *    (and its ring is bound to the first thread that submits, IORING_SETUP_SINGLE_ISSUER).
 *  - Level-triggered watches are one-shot polls.  Once one reported, it is parked (interest
 *    set to nothing) and re-armed at the start of the next dispatch, after the callbacks ran,
 *    so readiness is re-checked exactly when epoll would re-check it, and draining with timeout
 *    0 never re-reports an fd whose callback has not run yet.
 *  - A watch whose interest went to empty is deleted and, when wanted again, created anew, so
 *    a close() + reuse of the fd number between event_del and event_add (libuv #4323) never
 *    leaves a poll on the old file.
 *  - If the base is dispatched from another thread than before, the ring (bound to the old
 *    thread) cannot be used: the channel is rebuilt on the new thread and every watch re-added.
 *  - After fork() the child must not touch the parent's ring (its memory is shared with the
 *    parent): the channel refuses calls from the child, dealloc releases only the child's copy,
 *    and event_reinit() builds a fresh channel (need_reinit).
 */
#include "event2/event-config.h"
#include "evconfig-private.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
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
	mp_handle *h;              /* the watch (dispatching thread only) */
	struct mpev_fd *dirty_next; /* dirty list link (base lock) */
	struct mpev_fd *live_prev, *live_next; /* watches that exist (dispatching thread) */
	int fd;
	short want;                /* EV_READ|EV_WRITE|EV_CLOSED|EV_ET wanted (base lock) */
	unsigned char dirty;       /* on the dirty list (base lock) */
	unsigned char reset;       /* interest was empty since the last apply: new watch */
	unsigned char parked;      /* level-triggered watch that reported: re-arm next dispatch */
	unsigned char et;          /* the watch is edge-triggered (dispatching thread) */
};

struct mpev_pending {
	struct mpev_fd *fi;
	uint32_t revents;
};

struct mpev {
	mp_channel *ch;
	pid_t pid;                 /* process that owns ch */
	pthread_t owner;           /* thread the channel's ring is bound to */
	int owned;
	struct mpev_fd *dirty;
	struct mpev_fd live;       /* sentinel of the live list */
	struct mpev_pending *pend;
	int npend_cap;
	mp_event evs[MPEV_BATCH];  /* one dispatch's events */
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
	m->pid = getpid();
	m->live.live_next = m->live.live_prev = &m->live;
	m->npend_cap = 64;
	m->pend = mm_calloc(m->npend_cap, sizeof *m->pend);
	if (!m->pend) {
		mp_destroy(m->ch);
		mm_free(m);
		return NULL;
	}
	evsig_init_(base);
	return m;
}

static void live_link(struct mpev *m, struct mpev_fd *fi) {
	fi->live_next = m->live.live_next;
	fi->live_prev = &m->live;
	m->live.live_next->live_prev = fi;
	m->live.live_next = fi;
}

static void live_unlink(struct mpev_fd *fi) {
	fi->live_prev->live_next = fi->live_next;
	fi->live_next->live_prev = fi->live_prev;
	fi->live_next = fi->live_prev = NULL;
}

static void mark_dirty(struct mpev *m, struct mpev_fd *fi) {
	if (fi->dirty) return;
	fi->dirty = 1;
	fi->dirty_next = m->dirty;
	m->dirty = fi;
}

static int mpev_add(struct event_base *base, evutil_socket_t fd, short old, short events,
                    void *p) {
	struct mpev *m = base->evbase;
	struct mpev_fd *fi = p;
	short io = EV_READ | EV_WRITE | EV_CLOSED;
	fi->fd = fd;
	fi->want = (short)(((old | events) & io) | (events & EV_ET));
	mark_dirty(m, fi);
	return 0;
}

static int mpev_del(struct event_base *base, evutil_socket_t fd, short old, short events,
                    void *p) {
	struct mpev *m = base->evbase;
	struct mpev_fd *fi = p;
	short io = EV_READ | EV_WRITE | EV_CLOSED;
	fi->fd = fd;
	short left = (short)(old & ~events & io);
	fi->want = left ? (short)(left | (fi->want & EV_ET)) : 0;
	if (!left) fi->reset = 1;
	mark_dirty(m, fi);
	return 0;
}

static uint32_t poll_mask(short want) {
	uint32_t mask = 0;
	if (want & EV_READ) mask |= EPOLLIN;
	if (want & EV_WRITE) mask |= EPOLLOUT;
	if (want & EV_CLOSED) mask |= EPOLLRDHUP;
	return mask;
}

/* Bring the channel's watches in line with the dirty list (base lock held, owner thread). */
static void apply_changes(struct mpev *m) {
	struct mpev_fd *fi;
	while ((fi = m->dirty)) {
		m->dirty = fi->dirty_next;
		fi->dirty_next = NULL;
		fi->dirty = 0;
		uint32_t mask = poll_mask(fi->want);
		int flags = (fi->want & EV_ET) ? MP_POLL_ET : 0;
		if (fi->h && (fi->reset || !mask)) {
			mp_poll_del(fi->h);
			live_unlink(fi);
			fi->h = NULL;
		}
		fi->reset = 0;
		fi->parked = 0;
		if (!mask) continue;
		if (fi->h) {
			int r = mp_poll_mod(fi->h, mask, flags);
			if (r < 0) event_warnx("%s: mp_poll_mod(fd %d): %s", __func__, fi->fd,
			                       strerror(-r));
		} else {
			fi->h = mp_poll_add(m->ch, fi->fd, mask, flags, fi);
			if (!fi->h) {
				/* EBADF: the fd was closed after event_add; epoll forgets closed fds
				 * silently, and so do we. */
				if (errno != EBADF)
					event_warn("%s: mp_poll_add(fd %d)", __func__, fi->fd);
				continue;
			}
			live_link(m, fi);
		}
		fi->et = (unsigned char)(flags != 0);
	}
}

/* The base is dispatched from a thread the ring is not bound to: rebuild the channel here. */
static int migrate(struct mpev *m) {
	mp_channel *ch = mpev_channel();
	if (!ch) {
		event_warn("%s: mp_create", __func__);
		return -1;
	}
	mp_destroy(m->ch); /* drops every watch; their records are rebuilt below */
	m->ch = ch;
	while (m->live.live_next != &m->live) {
		struct mpev_fd *fi = m->live.live_next;
		live_unlink(fi);
		fi->h = NULL;
		fi->parked = 0;
		mark_dirty(m, fi);
	}
	return 0;
}

static int record(struct mpev *m, int n, const mp_event *ev) {
	if (ev->cmd != MP_EV_POLL || !ev->cookie) return n; /* CLOSED of deleted watches, WAKE */
	struct mpev_fd *fi = ev->cookie;
	if (n == m->npend_cap) {
		struct mpev_pending *np = mm_realloc(m->pend, 2 * (size_t)m->npend_cap * sizeof *np);
		if (!np) return n; /* dropped, not parked: a level-triggered watch reports it again */
		m->pend = np;
		m->npend_cap *= 2;
	}
	if (!fi->et && !fi->parked) {
		/* one-shot reported: keep the channel from re-arming it before the callback runs */
		mp_poll_mod(ev->handle, 0, 0);
		fi->parked = 1;
	}
	m->pend[n].fi = fi;
	m->pend[n].revents = ev->u.poll.revents;
	return n + 1;
}

static int mpev_dispatch(struct event_base *base, struct timeval *tv) {
	struct mpev *m = base->evbase;
	pthread_t self = pthread_self();
	if (!m->owned) {
		m->owner = self;
		m->owned = 1;
	} else if (!pthread_equal(m->owner, self)) {
		if (migrate(m) < 0) return -1;
		m->owner = self;
	}
	apply_changes(m);

	int timeout = -1;
	if (tv) {
		long ms = evutil_tv_to_msec_(tv);
		timeout = (ms < 0 || ms > INT_MAX) ? INT_MAX : (int)ms;
	}

	EVBASE_RELEASE_LOCK(base, th_base_lock);
	/* One call hands out every event the wait produced (up to the array); anything left is
	 * handed out by the next dispatch without a system call. */
	int n = 0;
	int r = mp_dispatch_batch(m->ch, m->evs, MPEV_BATCH, timeout);
	for (int i = 0; i < r; i++) n = record(m, n, &m->evs[i]);
	EVBASE_ACQUIRE_LOCK(base, th_base_lock);

	if (r < 0 && r != -EINTR && n == 0) {
		errno = -r;
		event_warn("mp_dispatch");
		return -1;
	}

	for (int i = 0; i < n; i++) {
		struct mpev_fd *fi = m->pend[i].fi;
		uint32_t what = m->pend[i].revents;
		short evs = 0;
		if (fi->parked) mark_dirty(m, fi);
		if (what & EPOLLERR) {
			evs = EV_READ | EV_WRITE;
		} else if ((what & EPOLLHUP) && !(what & EPOLLRDHUP)) {
			evs = EV_READ | EV_WRITE;
		} else {
			if (what & EPOLLIN) evs |= EV_READ;
			if (what & EPOLLOUT) evs |= EV_WRITE;
			if (what & EPOLLRDHUP) evs |= EV_CLOSED;
		}
		if (evs) evmap_io_active_(base, fi->fd, evs | EV_ET);
	}
	return 0;
}

static void mpev_dealloc(struct event_base *base) {
	struct mpev *m = base->evbase;
	evsig_dealloc_(base);
	/* In a forked child this only releases the child's copy of the ring (megapipe.h, fork). */
	mp_destroy(m->ch);
	mm_free(m->pend);
	memset(m, 0, sizeof *m);
	mm_free(m);
}
