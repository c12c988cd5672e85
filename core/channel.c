/*
 * channel.c — the channel's life, ownership and dispatch loop: mp_create() (engine choice and
 * fallback), mp_destroy(), mp_dispatch_events(), mp_pending(), mp_flush(), mp_wake().
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif

/* The smallest mp_event a caller may pass: the layout of version 0.2. */
#define MP_EVENT_SIZE_V1 sizeof(mp_event)

/* A page that reads as zero in a forked child, so the fork check is a load, not getpid(). */
static void fork_mark_init(mp_channel *ch) {
    ch->pid = getpid();
    long pg = sysconf(_SC_PAGESIZE);
    void *p = mmap(NULL, (size_t)pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return;
    if (madvise(p, (size_t)pg, MADV_WIPEONFORK) < 0) { /* before 4.14: compare pids */
        munmap(p, (size_t)pg);
        return;
    }
    ch->fork_mark = p;
    *ch->fork_mark = MP_CHANNEL_MAGIC;
}

int mp__ch_enter(mp_channel *ch) {
    if (!ch || ch->magic != MP_CHANNEL_MAGIC) return -EBADF;
    pthread_t self = pthread_self();
    if (__builtin_expect(ch->owned, 1) && pthread_equal(ch->owner, self) && !mp__forked(ch))
        return 0;
    if (mp__forked(ch)) {
        mp__log_once(ch, MP_LOG_MISUSE, "a channel was used in a forked child: "
                                        "create a new channel there (mp_destroy the inherited one)");
        return -EPERM;
    }
    if (!ch->owned) {
        ch->owner = self;
        ch->owned = true;
        return 0;
    }
    mp__log_once(ch, MP_LOG_MISUSE, "a channel was used from a thread that does not own it");
    return -EPERM;
}

mp_channel *mp_create(const mp_options *opt) {
    if (opt && (opt->size < offsetof(mp_options, wait_usec) + sizeof opt->wait_usec ||
                opt->size > 65536)) {
        errno = EINVAL; /* not made by mp_options_init() */
        return NULL;
    }
    mp_channel *ch = calloc(1, sizeof *ch);
    if (!ch) {
        errno = ENOMEM;
        return NULL;
    }
    ch->magic = MP_CHANNEL_MAGIC;
    mp__config_resolve(opt, &ch->cfg);
    if (!mp__config_valid(&ch->cfg)) {
        free(ch);
        errno = EINVAL;
        return NULL;
    }
    fork_mark_init(ch);
    int r = -ENOSYS;
    if (ch->cfg.engine != MP_ENGINE_EPOLL) {
        ch->eng = &mp__engine_uring;
        r = ch->eng->init(ch);
        if (r < 0 && ch->cfg.engine == MP_ENGINE_URING) {
            ch->eng = NULL;
            mp_destroy(ch);
            errno = -r;
            return NULL;
        }
        if (r < 0) {
            mp__log_once(ch, MP_LOG_NO_URING,
                         "io_uring unavailable (%s): using the epoll engine", strerror(-r));
            memset(&ch->st, 0, sizeof ch->st);
            ch->st.fallbacks |= MP_FALLBACK_EPOLL_ENGINE;
        }
    }
    if (r < 0) {
        ch->eng = &mp__engine_epoll;
        r = ch->eng->init(ch);
        if (r < 0) {
            ch->eng = NULL;
            mp_destroy(ch);
            errno = -r;
            return NULL;
        }
    }
    snprintf(ch->st.engine, sizeof ch->st.engine, "%s", ch->eng->name);
    return ch;
}

void mp_destroy(mp_channel *ch) {
    if (!ch || ch->magic != MP_CHANNEL_MAGIC) return;
    /* In a forked child the rings and partition sockets are shared with the parent: only
     * release this process's copies, never cancel, shut down or unregister anything. */
    bool child = mp__forked(ch);
    if (ch->eng && !child) {
        mp__detach_all(ch);
        mp__events_drain(ch); /* close accepted connections nobody was told about */
        mp__handle_close_held(ch);
        ch->eng->flush(ch); /* the closes of mp_unregister_close()d fds go with it */
    }
    if (ch->eng && ch->cfg.stats) {
        mp_stats st;
        mp_get_stats(ch, &st);
        mp_print_stats(&st, stderr);
    }
    if (child) mp__partition_forget_all(ch);
    if (ch->eng) ch->eng->fini(ch); /* the kernel drops whatever was still in flight */
    for (uint32_t c = 0; c < ch->nchunks; c++) {
        for (uint32_t i = 0; i < MP_CHUNK_SIZE; i++) {
            mp_handle *h = &ch->chunks[c][i];
            if (h->state != H_FREE) {
                mp__opq_drop(ch, &h->rq, false);
                mp__opq_drop(ch, &h->wq, false);
                mp__opq_drop(ch, &h->stash, false);
            }
        }
        free(ch->chunks[c]);
        free(ch->privchunks[c]);
    }
    free(ch->chunks);
    free(ch->privchunks);
    while (ch->op_free) {
        mp_op *n = ch->op_free->next;
        free(ch->op_free);
        ch->op_free = n;
    }
    mp__events_free(ch);
    mp__addr_free(ch);
    mp__watch_free(ch);
    free(ch->fefail);
    free(ch->fdmap);
    free(ch->lwmap);
    free(ch->pollmap);
    free(ch->accepted);
    if (ch->fork_mark) munmap((void *)ch->fork_mark, (size_t)sysconf(_SC_PAGESIZE));
    ch->magic = 0;
    free(ch);
}

/* Hand out up to max queued events; the number handed out. */
static unsigned pop_events(mp_channel *ch, mp_event *evs, size_t ev_size, unsigned max) {
    unsigned n = 0;
    char *out = (char *)evs;
    for (; n < max; n++, out += ev_size) {
        mp_event *ev = (mp_event *)(void *)out;
        if (ev_size == sizeof(mp_event)) {
            if (!mp__event_pop(ch, ev)) break;
        } else { /* a caller built against another version of the header */
            mp_event tmp;
            if (!mp__event_pop(ch, &tmp)) break;
            memset(out, 0, ev_size);
            memcpy(out, &tmp, ev_size < sizeof tmp ? ev_size : sizeof tmp);
        }
    }
    ch->st.events += n;
    return n;
}

#undef mp_dispatch
int mp_dispatch(mp_channel *ch, mp_event *ev, int timeout_ms) {
    return mp_dispatch_events(ch, ev, sizeof(mp_event), 1, timeout_ms);
}

int mp_dispatch_events(mp_channel *ch, mp_event *evs, size_t ev_size, unsigned max,
                       int timeout_ms) {
    int e = mp__ch_enter(ch);
    if (e < 0) return e;
    if (!evs || !max || ev_size < MP_EVENT_SIZE_V1 || max > (1u << 24)) return -EINVAL;
    if (ch->naccepted) mp__accepted_forget(ch);
    if (ch->addr_held) mp__addr_expire(ch);
    /* Fairness: operations that complete at once (the epoll engine's try-first, stashed
     * buffered data) keep the event queue from running dry, and the engine looks at the
     * kernel only when it does.  After a good batch of events, look without blocking, so
     * connections whose completions wait in the kernel get their turn (at the queue's tail). */
    unsigned fair = 2u * (unsigned)ch->cfg.batch < 64 ? 64 : 2u * (unsigned)ch->cfg.batch;
    if (ch->since_wait >= fair && mp__event_count(ch)) {
        ch->since_wait = 0;
        ch->eng->wait(ch, 0);
    }
    int64_t deadline = timeout_ms > 0 ? mp__now_ms() + timeout_ms : 0;
    for (bool waited = false;; waited = true) {
        mp__watch_apply(ch); /* interest changes other threads made (woken for them) */
        unsigned n = pop_events(ch, evs, ev_size, max);
        ch->since_wait += n;
        if (n) return (int)n;
        int wait = timeout_ms;
        if (timeout_ms > 0) {
            int64_t left = deadline - mp__now_ms();
            if (left <= 0 && waited) return 0;
            wait = left > 0 ? (int)left : 0;
        } else if (timeout_ms == 0 && waited) {
            return 0;
        }
        ch->since_wait = 0;
        int r = ch->eng->wait(ch, wait);
        if (r < 0 && r != -ETIME && !mp__event_count(ch)) return r;
    }
}

int mp_pending(const mp_channel *ch) {
    if (!ch || ch->magic != MP_CHANNEL_MAGIC) return -EBADF;
    size_t n = ch->evq_len + ch->eng->ready(ch);
    return n > INT32_MAX ? INT32_MAX : (int)n;
}

int mp_flush(mp_channel *ch) {
    int e = mp__ch_enter(ch);
    if (e < 0) return e;
    return ch->eng->flush(ch);
}

int mp_wake(mp_channel *ch) {
    if (!ch || ch->magic != MP_CHANNEL_MAGIC) return -EBADF;
    atomic_store(&ch->user_wake, 1);
    return ch->eng->wake(ch);
}

/* The engine's eventfd fired: for mp_wake() an MP_EV_WAKE event; for the readiness set's own
 * wake-ups (watch.c) nothing: the dispatch loop applies the recorded changes. */
void mp__wake_seen(mp_channel *ch) {
    if (atomic_exchange(&ch->user_wake, 0)) mp__event_push(ch, NULL, MP_EV_WAKE, 0, 0);
}

const char *mp_engine_name(const mp_channel *ch) {
    if (!ch || ch->magic != MP_CHANNEL_MAGIC) return "none";
    return ch->eng->name;
}
