/*
 * handle.c — the channel's handle table: allocation in stable chunks, generations,
 * fd/lwsocket lookup maps, mp_register() and mp_unregister().
 *
 * Handle memory is allocated in chunks of 256 that never move or shrink until mp_destroy(),
 * so a stale mp_handle pointer still points at a handle record whose state says FREE or DEAD:
 * calls on it fail with -EBADF instead of touching freed memory.  A slot is reused only after
 * the kernel has finished every operation that referenced it, and each reuse bumps the
 * generation carried in io_uring user_data and in queued events.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

mp_handle *mp__handle_at(const mp_channel *ch, uint32_t idx) {
    uint32_t c = idx >> MP_CHUNK_SHIFT;
    if (c >= ch->nchunks) return NULL;
    return &ch->chunks[c][idx & (MP_CHUNK_SIZE - 1)];
}

mp_handle *mp__handle_alloc(mp_channel *ch) {
    if (!ch->free_head) {
        mp_handle **nc = realloc(ch->chunks, (ch->nchunks + 1) * sizeof *nc);
        if (!nc) return NULL;
        ch->chunks = nc;
        char **np = realloc(ch->privchunks, (ch->nchunks + 1) * sizeof *np);
        if (!np) return NULL;
        ch->privchunks = np;
        mp_handle *chunk = calloc(MP_CHUNK_SIZE, sizeof *chunk);
        char *priv = ch->eng->handle_priv ? calloc(MP_CHUNK_SIZE, ch->eng->handle_priv) : NULL;
        if (!chunk || (ch->eng->handle_priv && !priv)) {
            free(chunk);
            free(priv);
            return NULL;
        }
        ch->chunks[ch->nchunks] = chunk;
        ch->privchunks[ch->nchunks] = priv;
        uint32_t base = ch->nchunks << MP_CHUNK_SHIFT;
        ch->nchunks++;
        for (uint32_t i = MP_CHUNK_SIZE; i-- > 0;) {
            chunk[i].magic = MP_HANDLE_MAGIC;
            chunk[i].idx = base + i;
            chunk[i].state = H_FREE;
            chunk[i].next_free = ch->free_head;
            ch->free_head = base + i + 1;
        }
    }
    mp_handle *h = mp__handle_at(ch, ch->free_head - 1);
    ch->free_head = h->next_free;
    uint32_t idx = h->idx, gen = h->gen;
    memset(h, 0, sizeof *h);
    h->magic = MP_HANDLE_MAGIC;
    h->idx = idx;
    h->gen = (gen + 1) & 0xffffff;
    h->ch = ch;
    h->state = H_LIVE;
    h->fd = -1;
    ch->used_slots++;
    if (ch->eng->handle_priv) memset(mp__handle_priv(h), 0, ch->eng->handle_priv);
    return h;
}

void mp__handle_free(mp_handle *h) {
    mp_channel *ch = h->ch;
    mp__rearm_remove(h);
    mp__opq_drop(ch, &h->rq, false);
    mp__opq_drop(ch, &h->wq, false);
    mp__opq_drop(ch, &h->stash, false);
    ch->used_slots--;
    if (h->kind == HK_POLL) ch->poll_slots--;
    h->state = H_FREE;
    h->next_free = ch->free_head;
    ch->free_head = h->idx + 1;
}

/* The kernel let go of the last operation of an ended handle: queue its final event.  The
 * slot is freed only when that event is handed out (events.c), so a stale pointer keeps
 * meeting a DEAD or ZOMBIE record (-EBADF) until the application has been told. */
static void handle_close_event(mp_handle *h) {
    if (h->close_fd) { /* mp_unregister_close(): the kernel holds nothing of it now */
        h->close_fd = false;
        h->ch->eng->close_later(h->ch, h->id);
    }
    h->state = H_ZOMBIE;
    mp__rearm_remove(h);
    if (mp__event_push(h->ch, h, MP_EV_CLOSED, 0, 0) < 0) mp__handle_free(h); /* no memory */
}

void mp__handle_settled(mp_handle *h) {
    if (h->inflight) h->inflight--;
    if (h->state == H_DEAD && h->inflight == 0) handle_close_event(h);
}

static int map_set(uint32_t **map, size_t *len, size_t key, uint32_t v) {
    if (key >= *len) {
        if (!v) return 0;
        size_t n = *len ? *len : 64;
        while (n <= key) n *= 2;
        uint32_t *m = realloc(*map, n * sizeof *m);
        if (!m) return -ENOMEM;
        memset(m + *len, 0, (n - *len) * sizeof *m);
        *map = m;
        *len = n;
    }
    (*map)[key] = v;
    return 0;
}

int mp__fdmap_set(mp_channel *ch, int fd, uint32_t v) {
    return map_set(&ch->fdmap, &ch->fdmap_len, (size_t)fd, v);
}
uint32_t mp__fdmap_get(const mp_channel *ch, int fd) {
    return (size_t)fd < ch->fdmap_len ? ch->fdmap[fd] : 0;
}
int mp__lwmap_set(mp_channel *ch, unsigned slot, uint32_t v) {
    uint32_t old = mp__lwmap_get(ch, slot);
    int r = map_set(&ch->lwmap, &ch->lwmap_len, slot, v);
    if (r == 0 && !old != !v) {
        if (v) ch->lw_used++;
        else ch->lw_used--;
    }
    return r;
}
uint32_t mp__lwmap_get(const mp_channel *ch, unsigned slot) {
    return slot < ch->lwmap_len ? ch->lwmap[slot] : 0;
}

int mp__pollmap_set(mp_channel *ch, int fd, uint32_t v) {
    return map_set(&ch->pollmap, &ch->pollmap_len, (size_t)fd, v);
}
uint32_t mp__pollmap_get(const mp_channel *ch, int fd) {
    return (size_t)fd < ch->pollmap_len ? ch->pollmap[fd] : 0;
}

/* A getsockopt() that mp_register() makes to learn what a foreign fd is: counted. */
static int probe_int(mp_channel *ch, int fd, int level, int opt, int *out) {
    socklen_t l = sizeof *out;
    ch->st.syscalls++;
    ch->st.probes++;
    return getsockopt(fd, level, opt, out, &l);
}

/* Not connected (getpeername failed): is it a bound, not listening TCP socket with
 * SO_REUSEPORT, what mp_listen_socket() makes? */
static bool ready_for_partition(mp_channel *ch, int fd) {
    int v = 0;
    if (probe_int(ch, fd, SOL_SOCKET, SO_REUSEPORT, &v) < 0 || !v) return false;
    ch->st.syscalls++;
    ch->st.probes++;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) return false;
    if (ss.ss_family == AF_INET) return ((struct sockaddr_in *)&ss)->sin_port != 0;
    if (ss.ss_family == AF_INET6) return ((struct sockaddr_in6 *)&ss)->sin6_port != 0;
    return false;
}

static mp_handle *fail(mp_handle *h, int err) {
    if (h) mp__handle_free(h);
    errno = err;
    return NULL;
}

/* A connection: attach it to the engine and index it. */
static mp_handle *register_conn(mp_channel *ch, mp_handle *h) {
    int r = ch->eng->attach(ch, h);
    if (r < 0) return fail(h, -r);
    if (mp__fdmap_set(ch, h->id, h->idx + 1) < 0) {
        ch->eng->detach(ch, h);
        return fail(h, ENOMEM);
    }
    ch->st.handles++;
    return h;
}

mp_handle *mp_register_connected(mp_channel *ch, int fd, void *cookie) {
    int e = mp__ch_enter(ch);
    if (e < 0) return fail(NULL, -e);
    if (fd < 0 || mp_is_lwsocket(fd)) return fail(NULL, EBADF);
    uint32_t known = mp__fdmap_get(ch, fd);
    if (known && known != MP_FD_ACCEPTED) return fail(NULL, EEXIST);
    mp_handle *h = mp__handle_alloc(ch); /* the caller vouches: no probe */
    if (!h) return fail(NULL, ENOMEM);
    h->kind = HK_CONN;
    h->id = h->fd = fd;
    h->cookie = cookie;
    return register_conn(ch, h);
}

mp_handle *mp_register(mp_channel *ch, int fd, void *cookie, const cpu_set_t *cpu_mask) {
    int e = mp__ch_enter(ch);
    if (e < 0) return fail(NULL, -e);
    if (fd < 0) return fail(NULL, EBADF);

    if (mp_is_lwsocket(fd)) {
        unsigned slot = (unsigned)(fd - MP_LWSOCKET_BASE);
        uint32_t st = mp__lwmap_get(ch, slot);
        if (st == 0) return fail(NULL, EBADF);
        if (st != 1) return fail(NULL, EEXIST);
        mp_handle *h = mp__handle_alloc(ch);
        if (!h) return fail(NULL, ENOMEM);
        h->kind = HK_CONN;
        h->id = fd;
        h->fd = (int)slot;
        h->fixed = true;
        h->accepted = true;
        h->cookie = cookie;
        int r = ch->eng->attach(ch, h);
        if (r < 0) return fail(h, -r);
        mp__lwmap_set(ch, slot, h->idx + 2);
        ch->st.handles++;
        return h;
    }

    if (cpu_mask && CPU_COUNT(cpu_mask) == 0) return fail(NULL, EINVAL);
    uint32_t known = mp__fdmap_get(ch, fd);
    if (known == MP_FD_ACCEPTED) { /* this channel accepted it: a connected stream socket */
        mp_handle *h = mp__handle_alloc(ch);
        if (!h) return fail(NULL, ENOMEM);
        h->kind = HK_CONN;
        h->id = h->fd = fd;
        h->cookie = cookie;
        h->accepted = true;
        return register_conn(ch, h);
    }
    if (known) return fail(NULL, EEXIST);

    /* A foreign fd: as few probes as tell a connection from a listener (counted). */
    int type = SOCK_STREAM, listening = 0;
    bool is_sock = true, ready = false;
    if (probe_int(ch, fd, SOL_SOCKET, SO_ACCEPTCONN, &listening) < 0) {
        if (errno != ENOTSOCK) return fail(NULL, EBADF);
        is_sock = false;
    }
    if (listening && cpu_mask && probe_int(ch, fd, SOL_SOCKET, SO_TYPE, &type) < 0)
        return fail(NULL, errno);
    if (is_sock && !listening) {
        struct sockaddr_storage peer;
        socklen_t pl = sizeof peer;
        ch->st.syscalls++;
        ch->st.probes++;
        bool connected = getpeername(fd, (struct sockaddr *)&peer, &pl) == 0;
        if (!connected && probe_int(ch, fd, SOL_SOCKET, SO_TYPE, &type) == 0 &&
            type == SOCK_STREAM)
            ready = ready_for_partition(ch, fd);
    }

    mp_handle *h = mp__handle_alloc(ch);
    if (!h) return fail(NULL, ENOMEM);
    h->id = fd;
    h->fd = fd;
    h->cookie = cookie;
    h->kind = HK_CONN;

    if (is_sock && type == SOCK_STREAM && cpu_mask && ch->cfg.partition) {
        /* Already listening with SO_REUSEPORT: adopted, steered in place (listener.c). */
        if (listening) ready = ready_for_partition(ch, fd);
        if (!ready) {
            mp__log_once(ch, MP_LOG_NOT_READY,
                         "mp_register: fd %d cannot be partitioned: create it with "
                         "mp_listen_socket() (SO_REUSEPORT, bound, not listening), or "
                         "listen on it with SO_REUSEPORT set", fd);
            return fail(h, EINVAL);
        }
        h->kind = HK_LISTENER;
        int r = mp__partition_open(ch, h, fd, cpu_mask);
        if (r < 0) return fail(h, -r);
    } else if (listening || ready) {
        if (!listening && listen(fd, SOMAXCONN) < 0) return fail(h, errno);
        h->kind = HK_LISTENER;
    }

    int r = ch->eng->attach(ch, h);
    if (r < 0) {
        if (h->acc.part) mp__partition_close(h);
        return fail(h, -r);
    }
    if (mp__fdmap_set(ch, fd, h->idx + 1) < 0) {
        ch->eng->detach(ch, h);
        if (h->acc.part) mp__partition_close(h);
        return fail(h, ENOMEM);
    }
    ch->st.handles++;
    return h;
}

void mp__handle_end(mp_handle *h) {
    mp_channel *ch = h->ch;
    h->state = H_DEAD;
    if (h->kind == HK_POLL) {
        if (mp__pollmap_get(ch, h->id) == h->idx + 1) mp__pollmap_set(ch, h->id, 0);
    } else if (!h->fixed) {
        if (mp__fdmap_get(ch, h->id) == h->idx + 1) mp__fdmap_set(ch, h->id, 0);
    } else {
        mp__lwmap_set(ch, (unsigned)h->fd, 0);
    }
    /* Requests not yet handed to the kernel are dropped now; heads in flight stay until
     * their completions arrive (the kernel may still read their buffers). */
    mp__opq_drop(ch, &h->rq, h->r_busy);
    mp__opq_drop(ch, &h->wq, h->w_busy);
    h->inflight = ch->eng->detach(ch, h);
    if (h->acc.part) mp__partition_close(h);
    /* A listener stops taking connections now, not at the thread's next wait: a shared
     * queue's connections must go to the channels still accepting. */
    if (h->kind == HK_LISTENER && h->inflight) ch->eng->flush(ch);
    ch->st.handles--;
    if (h->inflight == 0) handle_close_event(h);
}

int mp_unregister(mp_handle *h) {
    int e = mp__h_enter(h);
    if (e < 0) return e;
    if (h->kind == HK_POLL) h->ch->st.requests++;
    mp__handle_end(h);
    return 0;
}

int mp_unregister_close(mp_handle *h) {
    int e = mp__h_enter(h);
    if (e < 0) return e;
    if (h->kind == HK_POLL) return -EINVAL;
    h->close_fd = !h->fixed;
    mp__handle_end(h);
    return 0;
}

/* mp_destroy(): handles whose operations are still in the kernel will not settle before the
 * engine goes; what mp_unregister_close() gave the channel is closed with the last flush (the
 * operations hold their files, not the numbers, until the engine's fini drops them). */
void mp__handle_close_held(mp_channel *ch) {
    for (uint32_t c = 0; c < ch->nchunks; c++)
        for (uint32_t i = 0; i < MP_CHUNK_SIZE; i++) {
            mp_handle *h = &ch->chunks[c][i];
            if (h->state != H_FREE && h->close_fd) {
                h->close_fd = false;
                ch->eng->close_later(ch, h->id);
            }
        }
}

int mp_close_accepted(mp_channel *ch, int id) {
    int e = mp__ch_enter(ch);
    if (e < 0) return e;
    if (id < 0) return -EBADF;
    if (mp_is_lwsocket(id)) {
        unsigned slot = (unsigned)(id - MP_LWSOCKET_BASE);
        if (mp__lwmap_get(ch, slot) != 1 || !ch->eng->close_direct) return -EBADF;
        ch->eng->close_direct(ch, slot);
        mp__lwmap_set(ch, slot, 0);
        return 0;
    }
    uint32_t known = mp__fdmap_get(ch, id);
    if (known && known != MP_FD_ACCEPTED) return -EBADF; /* registered: unregister it */
    if (known) mp__fdmap_set(ch, id, 0);
    ch->st.syscalls++;
    return close(id) < 0 ? -errno : 0;
}

void mp__detach_all(mp_channel *ch) {
    for (uint32_t c = 0; c < ch->nchunks; c++)
        for (uint32_t i = 0; i < MP_CHUNK_SIZE; i++) {
            mp_handle *h = &ch->chunks[c][i];
            if (h->state == H_LIVE) mp__handle_end(h);
        }
}

void mp__partition_forget_all(mp_channel *ch) {
    for (uint32_t c = 0; c < ch->nchunks; c++)
        for (uint32_t i = 0; i < MP_CHUNK_SIZE; i++)
            if (ch->chunks[c][i].acc.part) mp__partition_forget(&ch->chunks[c][i]);
}

void *mp_cookie(const mp_handle *h) { return mp__live(h) ? h->cookie : NULL; }

int mp_handle_fd(const mp_handle *h) {
    if (!mp__live(h)) return -EBADF;
    return h->acc.part ? h->fd : h->id;
}
