/*
 * uv-megapipe.c — libuv 1.44's poll phase on a MegaPipe channel.  Compiled inside libuv's tree
 * (it uses libuv's internal headers, like src/unix/epoll.c, whose job it takes over) and
 * linked against libmegapipe; it uses only the public megapipe API (mp_create, mp_poll_add /
 * mod / del, mp_dispatch_batch, mp_flush, mp_destroy).
 *
 * A loop created with UV_USE_MEGAPIPE=1 in the environment gets a channel (io_uring only);
 * TCP streams go through completions (uv-megapipe-tcp.c; UV_MEGAPIPE_TCP=0 puts them on
 * readiness too), every other uv__io_t watcher (pipes, UDP, TTYs, uv_poll, the signal pipe,
 * async/threadpool eventfd, a TCP stream while it connects) becomes a level-triggered
 * readiness watch on it, and the loop's wait is the channel's one io_uring_enter
 * (mp_dispatch_batch).  Without the variable, or where
 * io_uring cannot be set up, the loop is stock (its epoll fd is made as always; the fallback
 * is logged once per process).
 *
 * Why it is shaped the way it is:
 *
 *  - Interest changes are applied where stock libuv applies them: at the start of the poll
 *    phase, from the loop's watcher_queue.  Each is a queued SQE, handed to the kernel by the
 *    wait's own io_uring_enter, so a burst of uv__io_start/stop costs no system call.  Every
 *    call on the channel is made by the thread that runs the loop.
 *  - A watch holds a reference to its file in the kernel (an io_uring poll, unlike an epoll
 *    entry, keeps the file open).  So when libuv invalidates an fd before closing it, the
 *    watch is removed at once and the removal submitted at once (stock libuv pays one
 *    epoll_ctl there too): a pipe's peer sees EOF when libuv closes its end, and the number
 *    can be reused immediately (libuv #4323).  A watcher libuv registers afresh (its events
 *    field is 0) always gets a new watch, never a changed old one that may poll an old file.
 *  - Events of one batch whose watch was removed by an earlier callback of the same batch are
 *    skipped (stock libuv does the same with its events array).
 *  - The channel belongs to one thread and one process.  If the loop is run by another thread
 *    than before, or in a forked child without uv_loop_fork(), the channel is rebuilt there
 *    and every watcher registered again; if that fails the loop goes on stock (epoll).
 *  - Credentials: the operations in the kernel are polls, accepts, receives, sends and
 *    shutdowns on sockets that are already open, which check no credentials; every operation
 *    that does (connect, open, bind) is still made by libuv itself, at the moment it is asked
 *    for, with the caller's current credentials (CVE-2024-22017 cannot arise;
 *    backends/libuv/tests prove it).
 */
#include "uv.h"
#include "unix/internal.h" /* libuv's src/ is on the include path */

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <megapipe.h>

#include "uv-megapipe.h"
#include "uv-megapipe-int.h"

/* Interest bits libuv uses; the same values as EPOLLIN/OUT/RDHUP/PRI. */
#define UVMP_EVENTS (POLLIN | POLLOUT | UV__POLLRDHUP | UV__POLLPRI)

static atomic_ulong uvmp_forkgen;
static atomic_ulong uvmp_sharegen;
static pthread_once_t uvmp_once = PTHREAD_ONCE_INIT;
static atomic_flag uvmp_logged = ATOMIC_FLAG_INIT;

static void uvmp_parent(void) {
  /* The child holds every listening socket of ours (uv_spawn forks too): each loop shares its
   * exclusive listeners before it waits again. */
  atomic_fetch_add(&uvmp_sharegen, 1);
}

static void uvmp_child(void) {
  atomic_fetch_add(&uvmp_forkgen, 1);
  /* ... and the parent holds every socket the child inherited (a prefork worker that listens
   * on its parent's socket shares it with its siblings). */
  atomic_fetch_add(&uvmp_sharegen, 1);
}

static void uvmp_init_once(void) {
  pthread_atfork(NULL, uvmp_parent, uvmp_child);
}

unsigned long uv__mp_sharegen(void) {
  return atomic_load(&uvmp_sharegen);
}

void uv__mp_sharegen_bump(void) {
  atomic_fetch_add(&uvmp_sharegen, 1);
}

struct uvmp* uv__mp_of(const uv_loop_t* loop) {
  const uv__loop_internal_fields_t* lf = loop->internal_fields;
  return lf == NULL ? NULL : (struct uvmp*) lf->megapipe;
}

static void uvmp_set(uv_loop_t* loop, struct uvmp* m) {
  ((uv__loop_internal_fields_t*) loop->internal_fields)->megapipe = m;
}

static void uvmp_log_fallback(int err) {
  if (atomic_flag_test_and_set(&uvmp_logged))
    return;
  fprintf(stderr,
          "libuv: UV_USE_MEGAPIPE=1 but io_uring is unavailable (%s): "
          "loops run on stock libuv (epoll)\n",
          strerror(err));
}

static mp_channel* uvmp_channel(void) {
  mp_options o;
  mp_options_init(&o);
  /* io_uring only: where it is missing, stock libuv (itself an epoll loop) is the fallback. */
  o.engine = MP_ENGINE_URING;
  /* Readiness only: no lwsockets, so no direct-descriptor table worth its memory. */
  o.lwsocket = 0;
  o.max_lwsockets = 1;
  /* Deferred accepting (MP_ACCEPT_DEFER in megapipe.h), 1 ms unless the variable says
   * otherwise (MP_ACCEPT_DEFER=0 turns it off): a listener's new connections come with the
   * first data of those accepted before them instead of each waking the loop.  A server whose
   * clients wait for it to speak first pays up to 1 ms of accept latency under load. */
  if (getenv("MP_ACCEPT_DEFER") == NULL)
    o.accept_defer = 1;
  return mp_create(&o);
}

/* An on/off environment variable: "1" is on, "0" is off, unset (or anything else) is def.
 *  UV_USE_MEGAPIPE=1: loops run on a channel (off by default);
 *  UV_MEGAPIPE_TCP=0|1: TCP streams through completions (1, the default) or through readiness
 *    watches like every other handle (0: for comparison and diagnosis);
 *  UV_MEGAPIPE_EXCLUSIVE_ACCEPT=0|1: a listener whose socket this process made itself is
 *    served by one multishot accept until it may be shared (1, the default), or every
 *    listener by one-shot accepts that take turns with other processes (0; uv-megapipe-tcp.c). */
static int uvmp_env_flag(const char* name, int def) {
  const char* v = getenv(name);
  if (v != NULL && strcmp(v, "1") == 0)
    return 1;
  if (v != NULL && strcmp(v, "0") == 0)
    return 0;
  return def;
}

/* The loop's channel may be used from here: it is bound to this thread, and made in this
 * process (not inherited over fork). */
static int uvmp_on_owner(const struct uvmp* m) {
  return m->bound && pthread_equal(m->owner, pthread_self()) &&
         m->forkgen == atomic_load(&uvmp_forkgen);
}

int uv__mp_on_owner(const struct uvmp* m) {
  return uvmp_on_owner(m);
}

int uv__mp_active(const uv_loop_t* loop) {
  return uv__mp_of(loop) != NULL;
}

void uv__mp_loop_init(uv_loop_t* loop) {
  struct uvmp* m;

  if (!uvmp_env_flag("UV_USE_MEGAPIPE", 0))
    return;
  pthread_once(&uvmp_once, uvmp_init_once);
  m = uv__calloc(1, sizeof(*m));
  if (m == NULL) {
    uvmp_log_fallback(ENOMEM);
    return;
  }
  m->ch = uvmp_channel();
  if (m->ch == NULL) {
    uvmp_log_fallback(errno);
    uv__free(m);
    return;
  }
  m->forkgen = atomic_load(&uvmp_forkgen);
  m->tcp = uvmp_env_flag("UV_MEGAPIPE_TCP", 1);
  m->excl_accept = uvmp_env_flag("UV_MEGAPIPE_EXCLUSIVE_ACCEPT", 1);
  m->sharegen = atomic_load(&uvmp_sharegen);
  uvmp_set(loop, m);
}

void uv__mp_loop_delete(uv_loop_t* loop) {
  struct uvmp* m = uv__mp_of(loop);

  if (m == NULL)
    return;
  uv__mp_conns_orphan(loop, m);
  /* In a forked child this releases only the child's copy; from another thread than the
   * owner it is allowed because the owner is not inside a call (the loop is not running). */
  mp_destroy(m->ch);
  uv__free(m->fds);
  uv__free(m);
  uvmp_set(loop, NULL);
}

/* Every watcher libuv has started is registered again at the next poll phase. */
static void uvmp_requeue_all(uv_loop_t* loop) {
  unsigned int i;
  uv__io_t* w;

  for (i = 0; i < loop->nwatchers; i++) {
    w = loop->watchers[i];
    if (w == NULL || w->pevents == 0)
      continue;
    w->events = 0;
    if (QUEUE_EMPTY(&w->watcher_queue))
      QUEUE_INSERT_TAIL(&loop->watcher_queue, &w->watcher_queue);
  }
}

/* The channel cannot be used here (other thread, forked child): make a new one.  Returns 0, or
 * -1 when the loop fell back to stock. */
static int uvmp_rebuild(uv_loop_t* loop, struct uvmp* m) {
  uv__mp_conns_orphan(loop, m);
  mp_destroy(m->ch);
  memset(m->fds, 0, m->nfds * sizeof(*m->fds));
  m->bound = 0;
  m->forkgen = atomic_load(&uvmp_forkgen);
  m->ch = uvmp_channel();
  uvmp_requeue_all(loop);
  if (m->ch != NULL)
    return 0;
  uvmp_log_fallback(errno);
  uv__free(m->fds);
  uv__free(m);
  uvmp_set(loop, NULL);
  return -1;
}

struct uvmp_fd* uv__mp_slot(struct uvmp* m, int fd) {
  struct uvmp_fd* n;
  unsigned int cap;

  if ((unsigned int) fd < m->nfds)
    return &m->fds[fd];
  cap = m->nfds ? m->nfds : 64;
  while (cap <= (unsigned int) fd)
    cap *= 2;
  n = uv__realloc(m->fds, cap * sizeof(*n));
  if (n == NULL)
    return NULL;
  memset(n + m->nfds, 0, (cap - m->nfds) * sizeof(*n));
  m->fds = n;
  m->nfds = cap;
  return &m->fds[fd];
}

static void uvmp_del(struct uvmp_fd* f) {
  mp_poll_del(f->h);
  f->h = NULL;
  f->events = 0;
}

void uv__mp_invalidate_fd(uv_loop_t* loop, int fd) {
  struct uvmp* m = uv__mp_of(loop);
  struct uvmp_fd* f;

  if (m == NULL || fd < 0 || (unsigned int) fd >= m->nfds)
    return;
  f = &m->fds[fd];
  if (f->h == NULL)
    return;
  if (!uvmp_on_owner(m)) {
    /* Not the loop's thread: the channel is rebuilt when the loop runs here, which drops the
     * watch with everything else. */
    f->h = NULL;
    f->events = 0;
    return;
  }
  uvmp_del(f);
  /* Let the kernel drop its reference to the file now, before libuv closes the fd. */
  mp_flush(m->ch);
}

void uv__mp_run_end(uv_loop_t* loop) {
  struct uvmp* m = uv__mp_of(loop);

  if (m == NULL || !uvmp_on_owner(m))
    return;
  mp_flush(m->ch);
}

/* Apply the watcher queue: new watches, changed interest sets. */
static void uvmp_apply(uv_loop_t* loop, struct uvmp* m) {
  struct uvmp_fd* f;
  uv__io_t* w;
  uint32_t want;
  QUEUE* q;

  while (!QUEUE_EMPTY(&loop->watcher_queue)) {
    q = QUEUE_HEAD(&loop->watcher_queue);
    QUEUE_REMOVE(q);
    QUEUE_INIT(q);

    w = QUEUE_DATA(q, uv__io_t, watcher_queue);
    assert(w->pevents != 0);
    assert(w->fd >= 0);
    assert(w->fd < (int) loop->nwatchers);
    if (w->cb == uv__mp_server_io) {
      /* A listener accepting on the channel: uv_accept() "restarts" it; nothing to watch. */
      w->events = w->pevents;
      continue;
    }

    f = uv__mp_slot(m, w->fd);
    if (f == NULL)
      abort(); /* stock libuv aborts when epoll_ctl fails */
    want = w->pevents & UVMP_EVENTS;
    if (f->h != NULL && w->events == 0)
      uvmp_del(f); /* a fresh registration: the old watch may poll an old file */
    if (f->h == NULL) {
      f->h = mp_poll_add(m->ch, w->fd, want, 0, NULL);
      if (f->h == NULL)
        abort(); /* as stock libuv on a failed EPOLL_CTL_ADD (closed fd, ENOMEM) */
    } else if (f->events != want) {
      if (mp_poll_mod(f->h, want, 0) < 0)
        abort();
    }
    f->events = want;
    w->events = w->pevents;
  }
}

int uv__mp_io_poll(uv_loop_t* loop, int timeout) {
  struct uvmp* m = uv__mp_of(loop);
  struct uvmp_fd* f;
  mp_event* ev;
  sigset_t sigset;
  uint64_t base;
  uv__io_t* w;
  uint32_t revents;
  int real_timeout;
  int user_timeout;
  int reset_timeout;
  int have_signals;
  int sigprof;
  int nevents;
  int count;
  int n;
  int i;
  int fd;

  if (m == NULL)
    return UV_ENOSYS;
  if (m->bound && !uvmp_on_owner(m))
    if (uvmp_rebuild(loop, m) != 0)
      return UV_ENOSYS;
  if (!m->bound) {
    m->owner = pthread_self();
    m->bound = 1;
  }

  if (loop->nfds == 0 && m->conns == NULL) {
    assert(QUEUE_EMPTY(&loop->watcher_queue));
    return 0;
  }

  /* A fork() since the last wait (or a listener sent from another thread): the exclusive
   * listeners take turns with the other processes from now on. */
  if (m->sharegen != atomic_load(&uvmp_sharegen))
    uv__mp_listeners_share(m);

  uvmp_apply(loop, m);

  sigprof = (loop->flags & UV_LOOP_BLOCK_SIGPROF) != 0;
  if (sigprof) {
    sigemptyset(&sigset);
    sigaddset(&sigset, SIGPROF);
  }

  assert(timeout >= -1);
  base = loop->time;
  count = 48; /* as stock: at most this many full batches without blocking */
  real_timeout = timeout;

  if (uv__get_internal_fields(loop)->flags & UV_METRICS_IDLE_TIME) {
    reset_timeout = 1;
    user_timeout = timeout;
    timeout = 0;
  } else {
    reset_timeout = 0;
    user_timeout = 0;
  }

  for (;;) {
    if (timeout != 0)
      uv__metrics_set_provider_entry_time(loop);

    if (sigprof && pthread_sigmask(SIG_BLOCK, &sigset, NULL))
      abort();
    n = mp_dispatch_batch(m->ch, m->evs, UVMP_BATCH, timeout);
    if (sigprof && pthread_sigmask(SIG_UNBLOCK, &sigset, NULL))
      abort();

    SAVE_ERRNO(uv__update_time(loop));

    if (n == 0) {
      assert(timeout != -1);
      if (reset_timeout != 0) {
        timeout = user_timeout;
        reset_timeout = 0;
      }
      if (timeout == -1)
        continue;
      if (timeout == 0)
        return 0;
      goto update_timeout;
    }

    if (n < 0) {
      if (n != -EINTR)
        abort(); /* as stock libuv on an epoll_wait error other than EINTR */
      if (reset_timeout != 0) {
        timeout = user_timeout;
        reset_timeout = 0;
      }
      if (timeout == -1)
        continue;
      if (timeout == 0)
        return 0;
      goto update_timeout;
    }

    have_signals = 0;
    nevents = 0;

    for (i = 0; i < n; i++) {
      ev = &m->evs[i];
      if (ev->cookie != NULL) {
        /* A TCP stream's completion (readiness watches have no cookie). */
        uv__metrics_update_idle_time(loop);
        uv__mp_conn_event(loop, m, ev);
        nevents++;
        continue;
      }
      if (ev->cmd != MP_EV_POLL)
        continue; /* MP_EV_CLOSED of removed watches */
      fd = ev->u.poll.fd;
      /* Skip events of watches an earlier callback of this batch removed. */
      if (fd < 0 || (unsigned int) fd >= m->nfds || m->fds[fd].h != ev->handle)
        continue;
      f = &m->fds[fd];
      w = (unsigned int) fd < loop->nwatchers ? loop->watchers[fd] : NULL;
      if (w == NULL) {
        /* A file descriptor we stopped watching: disarm it (stock libuv does it lazily too). */
        uvmp_del(f);
        continue;
      }

      /* Only the events the watcher wants now (a callback earlier in this batch may have
       * changed them), plus errors. */
      revents = ev->u.poll.revents & (w->pevents | POLLERR | POLLHUP);
      /* As stock: an error or hangup alone still moves the watcher's read/write along. */
      if (revents == POLLERR || revents == POLLHUP)
        revents |= w->pevents & UVMP_EVENTS;

      if (revents != 0) {
        /* Signal watchers run last; child process watchers are signal watchers. */
        if (w == &loop->signal_io_watcher) {
          have_signals = 1;
        } else {
          uv__metrics_update_idle_time(loop);
          w->cb(loop, w, revents);
        }
        nevents++;
      }
    }

    if (reset_timeout != 0) {
      timeout = user_timeout;
      reset_timeout = 0;
    }

    if (have_signals != 0) {
      uv__metrics_update_idle_time(loop);
      loop->signal_io_watcher.cb(loop, &loop->signal_io_watcher, POLLIN);
      return 0; /* the loop should cycle now */
    }

    if (nevents != 0) {
      if (n == UVMP_BATCH && --count != 0) {
        /* Take what else is there, without blocking. */
        timeout = 0;
        uvmp_apply(loop, m);
        continue;
      }
      return 0;
    }

    if (timeout == 0)
      return 0;
    if (timeout == -1) {
      uvmp_apply(loop, m);
      continue;
    }

update_timeout:
    assert(timeout > 0);
    real_timeout -= (loop->time - base);
    if (real_timeout <= 0)
      return 0;
    timeout = real_timeout;
    uvmp_apply(loop, m);
  }
}
