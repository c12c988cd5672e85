/*
 * uv-megapipe-tcp.c — libuv TCP streams through MegaPipe completions (on a MegaPipe loop, unless
 * UV_MEGAPIPE_TCP=0).  A connected TCP stream becomes a channel handle (mp_register) when it
 * is accepted on the channel, or else the first time it is read, written or shut down; from
 * then on:
 *
 *  - reads are buffered reads (mp_read_buffered: the kernel picks one of the channel's
 *    provided buffers when data arrives), one outstanding while the application reads; each
 *    is copied into the buffers alloc_cb hands out, as many read_cb calls as it takes.  What
 *    arrives after uv_read_stop (at most the one outstanding read) waits in the stream's stash,
 *    EOF and errors behind it.  Posted reads straight into alloc_cb's buffer would need a
 *    per-read cancel for uv_read_stop (CORE-GAP: mp_cancel_reads, docs/libuv.md);
 *  - uv_write/uv_write2 hand every request to mp_writev at once (the core keeps the order,
 *    retries short sends and batches the SQEs into the next io_uring_enter); a request
 *    completes when its last part did, and its callback runs from libuv's pending phase, as
 *    stock libuv's do.  uv_try_write writes directly only when no write is in flight;
 *  - uv_shutdown is mp_disconnect (ordered after the writes issued before it);
 *  - uv_close ends the handle and gives the channel its fd (mp_unregister_close: the channel
 *    closes it, queued with its next submission, once the kernel let go of the handle; no
 *    flush, no close() of libuv's), and libuv's close machinery (write callbacks with
 *    UV_ECANCELED, then the close callback) runs only at the handle's MP_EV_CLOSED, when the
 *    kernel holds none of its buffers.  The loop stays alive meanwhile.
 *
 *  - uv_listen registers the listening socket and accepts on the channel (mp_accept, count 0);
 *    a socket with SO_REUSEPORT is registered with the calling thread's CPUs, so loops on
 *    several threads listening on one address are partitioned (one multishot accept each).
 *    Without it, a socket the process made itself (uv_tcp_bind, uv_listen on a fresh handle)
 *    is accepted from exclusively (one multishot accept) until it may be shared: sent with
 *    uv_write2, or a fork() (then mp_accept_share: one-shot accepts that take turns with the
 *    other process).  A socket opened from an fd (uv_tcp_open, received over IPC) may be
 *    shared from birth: one-shot accepts from the start.
 *    Each connection is registered on the channel at its ACCEPT event (no system call) and
 *    handed to connection_cb through server->accepted_fd (more wait in server->queued_fds, as
 *    uv_accept expects).  EMFILE/ENFILE run stock libuv's emfile trick.  The accepted fds are
 *    blocking (the core accepts with SOCK_CLOEXEC only: CORE-GAP, MP_ACCEPT_NONBLOCK in
 *    docs/libuv.md), so uv_try_write on a stream of the channel uses MSG_DONTWAIT.
 *
 * Connecting (uv_tcp_connect) stays libuv's own non-blocking connect() on readiness.
 */
#include "uv.h"
#include "unix/internal.h" /* libuv's src/ is on the include path */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <sys/socket.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include <megapipe.h>

#include "uv-megapipe.h"
#include "uv-megapipe-int.h"

enum { ST_DATA, ST_EOF, ST_ERROR };

struct uvmp_stash {
  int kind;
  int err;         /* ST_ERROR */
  char* buf;       /* ST_DATA: channel buffer */
  size_t len, off;
  unsigned int id;
};

#define UVMP_PARTS_INLINE 8
#define UVMP_STASH_INLINE 4

struct uvmp_conn {
  struct uvmp_conn* next;
  struct uvmp_conn* prev;
  uv_stream_t* stream;  /* NULL once the stream is closed (waiting for MP_EV_CLOSED) */
  uv_stream_t* stream_closed; /* ... and then the closed stream, for its close callback */
  mp_handle* h;
  int rd_posted;        /* one mp_read_buffered() outstanding */
  int rd_done;          /* EOF or a receive error came: no more reads */
  int shut_posted;      /* mp_disconnect() issued for stream->shutdown_req */
  int closing;          /* handle ended, close callback waits for MP_EV_CLOSED */
  int listener;         /* a listening stream accepting on the channel */
  int excl;             /* ... with MP_ACCEPT_EXCLUSIVE (until mp_accept_share) */
  int pre;              /* accepted, registered, not yet adopted by a stream (fd below) */
  int fd;
  /* writes handed to the channel: the first `posted` requests of write_queue, the last of
   * them last_posted; parts[parts_head + i] is how many mp_writev calls request i took (0:
   * completes when it reaches the head).  Both keep each write O(1): a stream can have tens
   * of thousands of writes queued behind a slow reader. */
  unsigned int posted;
  QUEUE* last_posted;
  unsigned int parts_done;  /* of the head request */
  unsigned int* parts;
  unsigned int parts_head, parts_cap;
  struct uvmp_stash* stash;
  unsigned int stash_head, nstash, stash_cap; /* entries stash[stash_head ..+nstash) */
  /* parts and stash start here: no allocation per connection for the usual few entries */
  unsigned int parts_inline[UVMP_PARTS_INLINE];
  struct uvmp_stash stash_inline[UVMP_STASH_INLINE];
};

static void conn_link(struct uvmp* m, struct uvmp_conn* c) {
  c->prev = NULL;
  c->next = m->conns;
  if (m->conns != NULL)
    m->conns->prev = c;
  m->conns = c;
}

static void conn_unlink(struct uvmp* m, struct uvmp_conn* c) {
  if (c->prev != NULL)
    c->prev->next = c->next;
  else
    m->conns = c->next;
  if (c->next != NULL)
    c->next->prev = c->prev;
}

static struct uvmp_conn* conn_new(void) {
  struct uvmp_conn* c = uv__calloc(1, sizeof(*c));
  if (c == NULL)
    return NULL;
  c->parts = c->parts_inline;
  c->parts_cap = UVMP_PARTS_INLINE;
  c->stash = c->stash_inline;
  c->stash_cap = UVMP_STASH_INLINE;
  return c;
}

static void conn_free(struct uvmp_conn* c) {
  if (c->parts != c->parts_inline)
    uv__free(c->parts);
  if (c->stash != c->stash_inline)
    uv__free(c->stash);
  uv__free(c);
}

/* Room for twice as many entries of size sz in *arr (its inline storage is not freed). */
static int grow(void** arr, unsigned int* cap, const void* inl, size_t sz) {
  void* n;
  if (*arr == inl) {
    n = uv__malloc(2 * *cap * sz);
    if (n != NULL)
      memcpy(n, *arr, *cap * sz);
  } else {
    n = uv__realloc(*arr, 2 * *cap * sz);
  }
  if (n == NULL)
    return UV_ENOMEM;
  *arr = n;
  *cap *= 2;
  return 0;
}

/* Room for one more entry after the n at arr[*head]: slide them down when the room freed at
 * the front is at least n (no more work than the pops that freed it), else grow. */
static int room(void** arr, unsigned int* head, unsigned int n, unsigned int* cap,
                const void* inl, size_t sz) {
  if (*head + n < *cap)
    return 0;
  if (*head >= n && *head > 0) {
    memmove(*arr, (char*) *arr + (size_t) *head * sz, (size_t) n * sz);
    *head = 0;
    return 0;
  }
  return grow(arr, cap, inl, sz);
}

/* The stream's record, where the stream keeps it: in the handle's spare union (unused by the
 * unix build for TCP handles). */
static struct uvmp_conn* conn_of(const uv_stream_t* s) {
  return (struct uvmp_conn*) s->u.reserved[0];
}

static void conn_set(uv_stream_t* s, struct uvmp_conn* c) {
  s->u.reserved[0] = c;
}

/* A stream that may go through completions: TCP, connected, on a loop whose channel does TCP. */
static struct uvmp* eligible(uv_stream_t* s) {
  struct uvmp* m;
  if (s->type != UV_TCP || s->connect_req != NULL || uv__stream_fd(s) < 0)
    return NULL;
  if (!(s->flags & (UV_HANDLE_READABLE | UV_HANDLE_WRITABLE)) || uv__is_closing(s))
    return NULL;
  m = uv__mp_of(s->loop);
  if (m == NULL || !m->tcp || !m->bound)
    return NULL;
  return m;
}

/* Make s a channel handle.  NULL: it stays on stock readiness. */
static struct uvmp_conn* conn_get(uv_stream_t* s) {
  struct uvmp_conn* c = conn_of(s);
  struct uvmp* m;
  int fd;

  if (c != NULL)
    return c;
  m = eligible(s);
  if (m == NULL)
    return NULL;
  fd = uv__stream_fd(s);
  if ((unsigned int) fd < m->nfds && m->fds[fd].pre != NULL) {
    /* accepted on the channel: registered already */
    c = m->fds[fd].pre;
    m->fds[fd].pre = NULL;
    c->pre = 0;
    c->stream = s;
    conn_set(s, c);
    return c;
  }
  c = conn_new();
  if (c == NULL)
    return NULL;
  c->h = mp_register(m->ch, fd, c, NULL);
  if (c->h == NULL) {
    uv__free(c);
    return NULL;
  }
  c->stream = s;
  conn_set(s, c);
  conn_link(m, c);
  /* No readiness for this stream from now on (a watch left from connecting is dropped). */
  uv__io_stop(s->loop, &s->io_watcher, POLLIN | POLLOUT);
  if (fd >= 0 && (unsigned int) fd < m->nfds && m->fds[fd].h != NULL) {
    mp_poll_del(m->fds[fd].h);
    m->fds[fd].h = NULL;
    m->fds[fd].events = 0;
  }
  return c;
}

/* ---- reads ------------------------------------------------------------------------- */

static int stash_push(struct uvmp_conn* c, const struct uvmp_stash* e) {
  void* p = c->stash;
  if (room(&p, &c->stash_head, c->nstash, &c->stash_cap, c->stash_inline, sizeof(*c->stash)) < 0)
    return UV_ENOMEM;
  c->stash = p;
  c->stash[c->stash_head + c->nstash++] = *e;
  return 0;
}

static struct uvmp_stash* stash_first(struct uvmp_conn* c) {
  return &c->stash[c->stash_head];
}

static void stash_pop(struct uvmp_conn* c) {
  c->nstash--;
  c->stash_head = c->nstash ? c->stash_head + 1 : 0;
}

static void stash_release(struct uvmp* m, struct uvmp_conn* c) {
  unsigned int i;
  for (i = c->stash_head; i < c->stash_head + c->nstash; i++)
    if (c->stash[i].kind == ST_DATA)
      mp_buffer_release(m->ch, c->stash[i].id);
  c->nstash = 0;
  c->stash_head = 0;
}

/* Hand what waits in the stash to read_cb while the application reads. */
static void deliver(struct uvmp* m, struct uvmp_conn* c) {
  uv_stream_t* s = c->stream;
  struct uvmp_stash* e;
  uv_buf_t b;
  size_t n;

  while (c->stream != NULL && c->nstash > 0 && (s->flags & UV_HANDLE_READING) &&
         !uv__is_closing(s)) {
    /* Stock libuv shuts down synchronously once the writes drained, so a shutdown callback
     * always precedes the EOF the peer sends in answer: hold EOF and errors until ours came. */
    if (stash_first(c)->kind != ST_DATA && c->shut_posted && s->shutdown_req != NULL)
      return;
    /* As stock uv__read: a buffer from alloc_cb before each read, EOF and errors included. */
    b = uv_buf_init(NULL, 0);
    s->alloc_cb((uv_handle_t*) s, 64 * 1024, &b);
    if (b.base == NULL || b.len == 0) {
      s->read_cb(s, UV_ENOBUFS, &b);
      return;
    }
    e = stash_first(c);
    if (e->kind == ST_DATA) {
      /* As a stock read(): everything received so far that fits, across the channel's
       * buffers (one read_cb per 64 KiB rather than per buffer). */
      size_t got = 0;
      while (got < b.len && c->nstash > 0 && (e = stash_first(c))->kind == ST_DATA) {
        n = e->len - e->off < b.len - got ? e->len - e->off : b.len - got;
        memcpy(b.base + got, e->buf + e->off, n);
        got += n;
        e->off += n;
        if (e->off < e->len)
          break;
        mp_buffer_release(m->ch, e->id);
        stash_pop(c);
      }
      s->read_cb(s, (ssize_t) got, &b);
    } else if (e->kind == ST_EOF) {
      stash_pop(c);
      s->flags |= UV_HANDLE_READ_EOF;
      s->flags &= ~UV_HANDLE_READING;
      uv__handle_stop(s);
      s->read_cb(s, UV_EOF, &b);
    } else {
      int err = e->err;
      stash_pop(c);
      s->flags &= ~(UV_HANDLE_READABLE | UV_HANDLE_WRITABLE);
      s->read_cb(s, err, &b);
      if (s->flags & UV_HANDLE_READING) {
        s->flags &= ~UV_HANDLE_READING;
        uv__handle_stop(s);
      }
    }
  }
}

/* Keep one read outstanding while the application reads (and nothing waits in the stash). */
static void read_post(struct uvmp_conn* c) {
  uv_stream_t* s = c->stream;
  struct uvmp_stash e;
  int r;

  if (s == NULL || c->rd_posted || c->rd_done || c->nstash > 0 ||
      !(s->flags & UV_HANDLE_READING) || uv__is_closing(s))
    return;
  r = mp_read_buffered(c->h);
  if (r == 0) {
    c->rd_posted = 1;
    return;
  }
  /* The request itself failed (no buffer ring in this kernel: -ENOTSUP): an error read_cb
   * from the pending phase. */
  memset(&e, 0, sizeof(e));
  e.kind = ST_ERROR;
  e.err = r;
  c->rd_done = 1;
  if (stash_push(c, &e) == 0)
    uv__io_feed(s->loop, &s->io_watcher);
}

int uv__mp_stream_read_start(uv_stream_t* s) {
  struct uvmp_conn* c = conn_get(s);

  if (c == NULL)
    return 0;
  uv__handle_start(s);
  if (c->rd_done && c->nstash == 0) {
    /* Reading again after EOF or an error: stock libuv's read() says EOF again. */
    struct uvmp_stash e;
    memset(&e, 0, sizeof(e));
    e.kind = ST_EOF;
    if (stash_push(c, &e) < 0)
      return 0;
  }
  if (c->nstash > 0)
    uv__io_feed(s->loop, &s->io_watcher); /* delivered from the pending phase */
  else
    read_post(c);
  return 1;
}

/* ---- writes ------------------------------------------------------------------------ */

static int parts_push(struct uvmp_conn* c, unsigned int parts) {
  void* p = c->parts;
  if (room(&p, &c->parts_head, c->posted, &c->parts_cap, c->parts_inline, sizeof(*c->parts)) < 0)
    return UV_ENOMEM;
  c->parts = p;
  c->parts[c->parts_head + c->posted] = parts;
  return 0;
}

/* The head request was finished or given up: off the posted list. */
static void parts_pop(struct uvmp_conn* c) {
  c->posted--;
  c->parts_head = c->posted ? c->parts_head + 1 : 0;
  c->parts_done = 0;
}

/* As stock uv__write_req_finish: off the write queue, onto the completed queue, callback
 * from the pending phase. */
static void write_req_finish(uv_stream_t* s, uv_write_t* req) {
  QUEUE_REMOVE(&req->queue);
  if (req->error == 0) {
    s->write_queue_size -= uv__count_bufs(req->bufs + req->write_index,
                                          req->nbufs - req->write_index);
    if (req->bufs != req->bufsml)
      uv__free(req->bufs);
    req->bufs = NULL;
  }
  QUEUE_INSERT_TAIL(&s->write_completed_queue, &req->queue);
  uv__io_feed(s->loop, &s->io_watcher);
}

/* Finish posted requests at the head whose parts are all done. */
static void writes_settle(struct uvmp_conn* c) {
  uv_stream_t* s = c->stream;
  uv_write_t* req;

  while (c->posted > 0 && c->parts_done >= c->parts[c->parts_head] &&
         !QUEUE_EMPTY(&s->write_queue)) {
    req = QUEUE_DATA(QUEUE_HEAD(&s->write_queue), uv_write_t, queue);
    parts_pop(c);
    write_req_finish(s, req);
  }
}

static void writes_post(struct uvmp_conn* c) {
  uv_stream_t* s = c->stream;
  unsigned int parts, off, n;
  uv_write_t* req;
  QUEUE* q;
  int r;

  /* The requests after the last posted one (writes are only added at the tail, and only
   * taken from the head). */
  for (q = c->posted ? QUEUE_NEXT(c->last_posted) : QUEUE_HEAD(&s->write_queue);
       q != &s->write_queue; q = QUEUE_NEXT(q)) {
    req = QUEUE_DATA(q, uv_write_t, queue);
    parts = 0;
    r = 0;
    if (uv__count_bufs(req->bufs + req->write_index, req->nbufs - req->write_index) > 0) {
      for (off = req->write_index; off < req->nbufs && r == 0; off += n) {
        n = req->nbufs - off > IOV_MAX ? IOV_MAX : req->nbufs - off;
        /* uv_buf_t is laid out as struct iovec on unix; the core copies the array. */
        r = mp_writev(c->h, (const struct iovec*) (req->bufs + off), (int) n);
        if (r == 0)
          parts++;
      }
    }
    if (r < 0 && req->error == 0)
      req->error = r < -4095 ? UV_EINVAL : r;
    if (parts_push(c, parts) < 0)
      abort(); /* out of memory with requests already in the kernel */
    c->posted++;
    c->last_posted = q;
  }
  writes_settle(c);
}

int uv__mp_stream_write(uv_stream_t* s) {
  struct uvmp_conn* c = conn_get(s);
  if (c == NULL || c->stream == NULL)
    return 0;
  writes_post(c);
  return 1;
}

/* As stock uv__write_callbacks. */
static void write_callbacks(uv_stream_t* s) {
  uv_write_t* req;
  QUEUE* q;
  QUEUE pq;

  if (QUEUE_EMPTY(&s->write_completed_queue))
    return;
  QUEUE_MOVE(&s->write_completed_queue, &pq);
  while (!QUEUE_EMPTY(&pq)) {
    q = QUEUE_HEAD(&pq);
    req = QUEUE_DATA(q, uv_write_t, queue);
    QUEUE_REMOVE(q);
    uv__req_unregister(s->loop, req);
    if (req->bufs != NULL) {
      s->write_queue_size -= uv__count_bufs(req->bufs + req->write_index,
                                            req->nbufs - req->write_index);
      if (req->bufs != req->bufsml)
        uv__free(req->bufs);
      req->bufs = NULL;
    }
    if (req->cb)
      req->cb(req, req->error);
  }
}

/* ---- the stream's io callback (pending phase), shutdown ----------------------------- */

int uv__mp_stream_io(uv_stream_t* s) {
  struct uvmp_conn* c;
  struct uvmp* m;

  if (s->connect_req != NULL)
    return 0;
  c = conn_get(s);
  if (c == NULL)
    return 0;
  m = uv__mp_of(s->loop);
  writes_post(c);
  deliver(m, c);
  read_post(c);
  if (c->stream == NULL || uv__stream_fd(s) < 0)
    return 1;
  write_callbacks(s);
  if (c->stream == NULL || uv__stream_fd(s) < 0)
    return 1;
  if ((s->flags & UV_HANDLE_SHUTTING) && !c->shut_posted) {
    if (mp_disconnect(c->h) == 0)
      c->shut_posted = 1;
  }
  return 1;
}

static void shutdown_done(uv_stream_t* s, int err) {
  uv_shutdown_t* req = s->shutdown_req;
  if (req == NULL)
    return;
  s->shutdown_req = NULL;
  s->flags &= ~UV_HANDLE_SHUTTING;
  if (err == 0)
    s->flags |= UV_HANDLE_SHUT;
  uv__req_unregister(s->loop, req);
  if (req->cb != NULL)
    req->cb(req, err);
}

/* ---- listening ------------------------------------------------------------------- */

/* A socket's mark (the handle's spare u.reserved[1], cleared by uv__stream_init): NULL, or
 * the share generation when new_socket made it, plus one (so never NULL). */
static void* made_here_mark(void) {
  return (void*) (uintptr_t) (uv__mp_sharegen() + 1);
}

static int made_here_ok(const uv_stream_t* s) {
  return s->u.reserved[1] != NULL && s->u.reserved[1] == made_here_mark();
}

void uv__mp_tcp_socket_made(uv_tcp_t* tcp) {
  tcp->u.reserved[1] = made_here_mark();
}

static void listener_share(struct uvmp_conn* c) {
  if (mp_accept_share(c->h) == 0)
    c->excl = 0;
}

void uv__mp_handle_sent(uv_stream_t* s) {
  struct uvmp_conn* c;
  struct uvmp* m;

  if (s->type != UV_TCP)
    return;
  s->u.reserved[1] = NULL; /* not exclusive if it listens later */
  c = conn_of(s);
  if (c == NULL || !c->listener || !c->excl)
    return;
  m = uv__mp_of(s->loop);
  if (m != NULL && uv__mp_on_owner(m)) {
    listener_share(c);
    return;
  }
  /* The listener's loop runs on another thread: it shares its exclusive listeners before it
   * waits again (woken now, so that is soon). */
  uv__mp_sharegen_bump();
  if (m != NULL)
    mp_wake(m->ch);
}

void uv__mp_listeners_share(struct uvmp* m) {
  struct uvmp_conn* c;

  m->sharegen = uv__mp_sharegen();
  for (c = m->conns; c != NULL; c = c->next)
    if (c->listener && c->excl && c->stream != NULL)
      listener_share(c);
}

void uv__mp_server_io(uv_loop_t* loop, uv__io_t* w, unsigned int events) {
  /* Never called: the poller does not watch listeners that accept on the channel (their
   * connections come as MP_EV_ACCEPT).  Present so the watcher has a callback of its own. */
  (void) loop;
  (void) w;
  (void) events;
}

int uv__mp_tcp_listen(uv_tcp_t* tcp) {
  struct uvmp* m = uv__mp_of(tcp->loop);
  struct uvmp_conn* c;
  cpu_set_t cpus;
  socklen_t len;
  int reuseport = 0;
  int fd = tcp->io_watcher.fd;

  if (m == NULL || !m->tcp || fd < 0)
    return 0;
  if (m->bound && !pthread_equal(m->owner, pthread_self()))
    return 0;
  c = conn_new();
  if (c == NULL)
    return 0;
  len = sizeof(reuseport);
  if (getsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &reuseport, &len) != 0)
    reuseport = 0;
  c->h = NULL;
  /* SO_REUSEPORT: a partition of its group steered to this thread's CPUs. */
  if (reuseport && sched_getaffinity(0, sizeof(cpus), &cpus) == 0)
    c->h = mp_register(m->ch, fd, c, &cpus);
  if (c->h == NULL)
    c->h = mp_register(m->ch, fd, c, NULL);
  if (c->h == NULL) {
    uv__free(c);
    return 0;
  }
  if (!m->bound) {
    /* The channel now belongs to this thread; another one running the loop rebuilds it. */
    m->owner = pthread_self();
    m->bound = 1;
  }
  /* One multishot accept serves every connection of a listener nobody else accepts from,
   * instead of one accept request (a failed first try, a poll armed anew) per connection.
   * But a multishot accept keeps its place at the head of the socket's wait queue, so another
   * process accepting from the same socket would get nothing (libuv's ipc_listen_* tests).
   * So only a socket this process made itself, with no fork() since (made_here_ok), and
   * until it may become shared (uv__mp_handle_sent, uv__mp_listeners_share);
   * UV_MEGAPIPE_EXCLUSIVE_ACCEPT=0, UV_TCP_SINGLE_ACCEPT=1 or
   * uv_tcp_simultaneous_accepts(h, 0) before uv_listen keep one-shot accepts. */
  c->excl = m->excl_accept && !(tcp->flags & UV_HANDLE_TCP_SINGLE_ACCEPT) &&
            made_here_ok((uv_stream_t*) tcp);
  if (mp_accept(c->h, 0, c->excl ? MP_ACCEPT_EXCLUSIVE : 0) < 0)
    abort(); /* a registered listener always accepts */
  c->listener = 1;
  c->stream = (uv_stream_t*) tcp;
  c->fd = fd;
  conn_set((uv_stream_t*) tcp, c);
  conn_link(m, c);
  /* libuv's bookkeeping as for a watched listener (uv_accept restarts it); the poller skips
   * watchers with this callback. */
  tcp->io_watcher.cb = uv__mp_server_io;
  uv__io_start(tcp->loop, &tcp->io_watcher, POLLIN);
  return 1;
}

/* As stock uv__stream_queue_fd: one more accepted fd waiting for uv_accept. */
static int queue_fd(uv_stream_t* s, int fd) {
  uv__stream_queued_fds_t* q = s->queued_fds;
  unsigned int size;

  if (q == NULL) {
    size = 8;
    q = uv__malloc((size - 1) * sizeof(*q->fds) + sizeof(*q));
    if (q == NULL)
      return UV_ENOMEM;
    q->size = size;
    q->offset = 0;
    s->queued_fds = q;
  } else if (q->size == q->offset) {
    size = q->size + 8;
    q = uv__realloc(q, (size - 1) * sizeof(*q->fds) + sizeof(*q));
    if (q == NULL)
      return UV_ENOMEM;
    q->size = size;
    s->queued_fds = q;
  }
  q->fds[q->offset++] = fd;
  return 0;
}

/* As stock uv__emfile_trick: give the spare fd back, accept and close what waits (the
 * clients see their connection closed, not a hang), take the spare again. */
static int emfile_trick(uv_loop_t* loop, int accept_fd) {
  int err;
  int spare;

  if (loop->emfile_fd == -1)
    return UV_EMFILE;
  uv__close(loop->emfile_fd);
  loop->emfile_fd = -1;
  do {
    err = uv__accept(accept_fd);
    if (err >= 0)
      uv__close(err);
  } while (err >= 0 || err == UV_EINTR);
  spare = uv__open_cloexec("/", O_RDONLY);
  if (spare >= 0)
    loop->emfile_fd = spare;
  return err;
}

static void accept_event(struct uvmp* m, struct uvmp_conn* c, const mp_event* ev) {
  uv_stream_t* s = c->stream;
  struct uvmp_conn* pc;
  struct uvmp_fd* f;
  int err, fd;

  if (ev->result < 0) {
    err = (int) ev->result;
    if (err == UV_ECONNABORTED)
      return;
    if (err == UV_EMFILE || err == UV_ENFILE) {
      err = emfile_trick(s->loop, uv__stream_fd(s));
      if (err == UV_EAGAIN || err == UV__ERR(EWOULDBLOCK))
        return;
    }
    s->connection_cb(s, err);
    return;
  }
  fd = (int) ev->result;
  /* Registered now, before the next dispatch: the core needs no system call for it. */
  pc = conn_new();
  f = uv__mp_slot(m, fd);
  if (pc != NULL && f != NULL) {
    pc->h = mp_register(m->ch, fd, pc, NULL);
    if (pc->h != NULL) {
      pc->pre = 1;
      pc->fd = fd;
      conn_link(m, pc);
      f->pre = pc;
    } else {
      uv__free(pc);
    }
  } else {
    uv__free(pc);
  }
  if (s->accepted_fd == -1) {
    s->accepted_fd = fd;
  } else if (queue_fd(s, fd) < 0) {
    uv__close(fd); /* as stock libuv when it cannot queue: the client sees a reset */
    return;
  }
  s->connection_cb(s, 0);
}

/* An accepted connection no stream took is closed: its registration goes too. */
static void pre_drop(struct uvmp* m, int fd) {
  struct uvmp_conn* pc;
  if (fd < 0 || (unsigned int) fd >= m->nfds || (pc = m->fds[fd].pre) == NULL)
    return;
  m->fds[fd].pre = NULL;
  pc->pre = 0;
  pc->closing = 1; /* freed at its MP_EV_CLOSED; nothing waits for it */
  mp_unregister(pc->h);
}

/* ---- uv_try_write ------------------------------------------------------------------ */

int uv__mp_try_write(uv_stream_t* s, const uv_buf_t bufs[], unsigned int nbufs, int* result) {
  struct uvmp* m;
  struct msghdr msg;
  ssize_t n;
  int fd = uv__stream_fd(s);

  if (s->type != UV_TCP || fd < 0 || (m = uv__mp_of(s->loop)) == NULL)
    return 0;
  if (conn_of(s) == NULL && ((unsigned int) fd >= m->nfds || m->fds[fd].pre == NULL))
    return 0;
  memset(&msg, 0, sizeof(msg));
  msg.msg_iov = (struct iovec*) bufs;
  msg.msg_iovlen = nbufs > (unsigned int) uv__getiovmax() ? (size_t) uv__getiovmax() : nbufs;
  do
    n = sendmsg(fd, &msg, MSG_DONTWAIT);
  while (n == -1 && errno == EINTR);
  if (n >= 0)
    *result = (int) n;
  else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)
    *result = UV_EAGAIN;
  else
    *result = UV__ERR(errno);
  return 1;
}

/* ---- events ------------------------------------------------------------------------ */

void uv__mp_conn_event(uv_loop_t* loop, struct uvmp* m, const mp_event* ev) {
  struct uvmp_conn* c = ev->cookie;
  struct uvmp_stash e;
  uv_stream_t* s = c->stream;

  if (ev->cmd == MP_EV_CLOSED) {
    conn_unlink(m, c);
    if (c->stream_closed != NULL) {
      /* uv_close() waited for this: the kernel holds none of the stream's buffers now. */
      uv_handle_t* hd = (uv_handle_t*) c->stream_closed;
      loop->active_reqs.count--;
      conn_set((uv_stream_t*) hd, NULL);
      conn_free(c);
      uv__make_close_pending(hd);
    } else {
      conn_free(c);
    }
    return;
  }
  if (s == NULL)
    return;
  if (c->listener) {
    if (ev->cmd == MP_EV_ACCEPT)
      accept_event(m, c, ev);
    return;
  }
  memset(&e, 0, sizeof(e));
  switch (ev->cmd) {
  case MP_EV_READ:
    c->rd_posted = 0;
    if (ev->result <= 0)
      return;
    e.kind = ST_DATA;
    e.buf = ev->u.read.buf;
    e.len = (size_t) ev->result;
    e.id = ev->u.read.buf_id;
    if (stash_push(c, &e) < 0) {
      mp_buffer_release(m->ch, e.id);
      e.kind = ST_ERROR;
      e.err = UV_ENOMEM;
      if (stash_push(c, &e) < 0)
        abort();
    }
    deliver(m, c);
    read_post(c);
    return;
  case MP_EV_DISCONNECT:
    if (ev->flags & MP_EVF_LOCAL) {
      shutdown_done(s, (int) ev->result);
      if (c->stream != NULL)
        deliver(m, c); /* an EOF that waited for it */
      return;
    }
    c->rd_posted = 0;
    c->rd_done = 1;
    e.kind = ev->result == 0 ? ST_EOF : ST_ERROR;
    e.err = (int) ev->result;
    stash_push(c, &e);
    deliver(m, c);
    return;
  case MP_EV_WRITE:
    if (c->posted == 0 || QUEUE_EMPTY(&s->write_queue))
      return;
    if (ev->result < 0) {
      uv_write_t* req = QUEUE_DATA(QUEUE_HEAD(&s->write_queue), uv_write_t, queue);
      if (req->error == 0)
        req->error = (int) ev->result;
    }
    c->parts_done++;
    writes_settle(c);
    return;
  default:
    return;
  }
}

/* ---- close ------------------------------------------------------------------------- */

void uv__mp_stream_close(uv_stream_t* s) {
  struct uvmp_conn* c = conn_of(s);
  struct uvmp* m = uv__mp_of(s->loop);
  unsigned int i;
  int fd;

  if (m == NULL || s->type != UV_TCP)
    return;
  fd = uv__stream_fd(s);
  if (c == NULL && fd >= 0 && (unsigned int) fd < m->nfds && m->fds[fd].pre != NULL) {
    /* accepted on the channel, closed before any read or write */
    c = m->fds[fd].pre;
    m->fds[fd].pre = NULL;
    c->pre = 0;
    c->stream = s;
  }
  if (c == NULL)
    return;
  if (c->listener) {
    /* connections accepted and not taken: stock libuv closes their fds next */
    pre_drop(m, s->accepted_fd);
    if (s->queued_fds != NULL)
      for (i = 0; i < ((uv__stream_queued_fds_t*) s->queued_fds)->offset; i++)
        pre_drop(m, ((uv__stream_queued_fds_t*) s->queued_fds)->fds[i]);
  }
  stash_release(m, c);
  if (c->listener) {
    mp_unregister(c->h);
    /* The listener stops taking connections now, before libuv closes its fd. */
    mp_flush(m->ch);
  } else {
    /* The channel takes the fd and closes it itself, queued with its next submission, when
     * the kernel holds none of the stream's operations: no flush and no close() of ours.
     * libuv must then not close it: its watcher forgets the number (stopped first, so no
     * readiness state of the number is left behind).  The number stays taken until that
     * close ran; an fd the application took with uv_fileno() is closed then, as stock
     * closes it at uv_close.  uv_tcp_close_reset's RST goes out with that close too, at the
     * loop's next wait (or when uv_run returns: uv__mp_run_end). */
    mp_unregister_close(c->h);
    uv__io_stop(s->loop, &s->io_watcher, POLLIN | POLLOUT | UV__POLLRDHUP | UV__POLLPRI);
    s->io_watcher.fd = -1;
  }
  c->stream = NULL;
  c->stream_closed = s;
  c->closing = 1;
  conn_set(s, c); /* an accepted one adopted just now; uv__mp_close_deferred looks here */
  /* Posted writes are no longer ours to finish: uv__stream_destroy cancels them at close. */
  c->posted = 0;
  c->parts_head = 0;
  /* The loop stays alive until the handle's MP_EV_CLOSED. */
  s->loop->active_reqs.count++;
}

int uv__mp_close_deferred(uv_handle_t* h) {
  struct uvmp_conn* c;

  if (h->type != UV_TCP)
    return 0;
  c = conn_of((uv_stream_t*) h);
  return c != NULL && c->closing && c->stream_closed == (uv_stream_t*) h;
}

/* ---- the channel goes away --------------------------------------------------------- */

void uv__mp_conns_orphan(uv_loop_t* loop, struct uvmp* m) {
  struct uvmp_conn* c;
  uv_stream_t* s;
  uv_write_t* req;
  QUEUE* q;

  while ((c = m->conns) != NULL) {
    conn_unlink(m, c);
    s = c->stream;
    if (c->pre) {
      /* accepted, not taken: the fd stays with the listener's queue; stock reads need it
       * non-blocking */
      if ((unsigned int) c->fd < m->nfds)
        m->fds[c->fd].pre = NULL;
      uv__nonblock(c->fd, 1);
    } else if (s == NULL) {
      /* a close waiting for MP_EV_CLOSED: the channel's end is that moment */
      if (c->stream_closed != NULL) {
        loop->active_reqs.count--;
        conn_set(c->stream_closed, NULL);
        uv__make_close_pending((uv_handle_t*) c->stream_closed);
      }
    } else if (c->listener) {
      conn_set(s, NULL);
      s->io_watcher.cb = uv__server_io;
      uv__io_start(loop, &s->io_watcher, POLLIN);
    } else {
      uv__nonblock(uv__stream_fd(s), 1);
      /* Back to stock readiness.  Writes the old channel held are reported cancelled (whether
       * their bytes went out is unknown); received data not yet read is lost with the
       * channel's buffers. */
      conn_set(s, NULL);
      while (c->posted > 0 && !QUEUE_EMPTY(&s->write_queue)) {
        q = QUEUE_HEAD(&s->write_queue);
        req = QUEUE_DATA(q, uv_write_t, queue);
        req->error = UV_ECANCELED;
        parts_pop(c);
        write_req_finish(s, req);
      }
      if (s->flags & UV_HANDLE_READING)
        uv__io_start(loop, &s->io_watcher, POLLIN);
      if (!QUEUE_EMPTY(&s->write_queue) || (s->flags & UV_HANDLE_SHUTTING))
        uv__io_start(loop, &s->io_watcher, POLLOUT);
    }
    c->nstash = 0; /* the buffers die with the channel */
    c->stash_head = 0;
    conn_free(c);
  }
}
