/*
 * channel.c — the channel's life and its dispatch loop: mp_create() (engine choice and
 * fallback), mp_destroy(), mp_dispatch(), mp_flush(), mp_wake().
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

mp_channel *mp_create(const mp_options *opt) {
    mp_channel *ch = calloc(1, sizeof *ch);
    if (!ch) {
        errno = ENOMEM;
        return NULL;
    }
    ch->magic = MP_CHANNEL_MAGIC;
    ch->pid = getpid();
    mp__config_resolve(opt, &ch->cfg);
    if (!mp__config_valid(&ch->cfg)) {
        free(ch);
        errno = EINVAL;
        return NULL;
    }
    int r = -ENOSYS;
    if (ch->cfg.engine != MP_ENGINE_EPOLL) {
        ch->eng = &mp__engine_uring;
        r = ch->eng->init(ch);
        if (r < 0 && ch->cfg.engine == MP_ENGINE_URING) {
            free(ch);
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
            free(ch);
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
    if (!mp__forked(ch)) mp__detach_all(ch);
    if (ch->cfg.stats) mp_print_stats(&ch->st, stderr);
    ch->eng->fini(ch); /* the kernel drops whatever was still in flight */
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
    }
    free(ch->chunks);
    while (ch->op_free) {
        mp_op *n = ch->op_free->next;
        free(ch->op_free);
        ch->op_free = n;
    }
    mp__events_free(ch);
    free(ch->fdmap);
    free(ch->lwmap);
    free(ch->pollmap);
    ch->magic = 0;
    free(ch);
}

int mp_dispatch(mp_channel *ch, mp_event *ev, int timeout_ms) {
    if (!ch || ch->magic != MP_CHANNEL_MAGIC) return -EBADF;
    if (!ev) return -EINVAL;
    int64_t deadline = timeout_ms > 0 ? mp__now_ms() + timeout_ms : 0;
    for (bool waited = false;; waited = true) {
        if (mp__event_pop(ch, ev)) {
            ch->st.events++;
            return 1;
        }
        int wait = timeout_ms;
        if (timeout_ms > 0) {
            int64_t left = deadline - mp__now_ms();
            if (left <= 0 && waited) return 0;
            wait = left > 0 ? (int)left : 0;
        } else if (timeout_ms == 0 && waited) {
            return 0;
        }
        int r = ch->eng->wait(ch, wait);
        if (r < 0 && r != -ETIME && !mp__event_count(ch)) return r;
    }
}

int mp_flush(mp_channel *ch) {
    if (!ch || ch->magic != MP_CHANNEL_MAGIC) return -EBADF;
    return ch->eng->flush(ch);
}

int mp_wake(mp_channel *ch) {
    if (!ch || ch->magic != MP_CHANNEL_MAGIC) return -EBADF;
    return ch->eng->wake(ch);
}

const char *mp_engine_name(const mp_channel *ch) {
    if (!ch || ch->magic != MP_CHANNEL_MAGIC) return "none";
    return ch->eng->name;
}
