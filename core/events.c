/*
 * events.c — the channel's event queue: completions become mp_event records here and
 * mp_dispatch() hands them out one at a time.  Each record keeps the generation of its handle
 * so that events of a handle unregistered in the meantime are dropped, never delivered.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static int evq_grow(mp_channel *ch) {
    size_t ncap = ch->evq_cap ? ch->evq_cap * 2 : 256;
    mp_qev *n = malloc(ncap * sizeof *n);
    if (!n) return -ENOMEM;
    for (size_t i = 0; i < ch->evq_len; i++) n[i] = ch->evq[(ch->evq_head + i) % ch->evq_cap];
    free(ch->evq);
    ch->evq = n;
    ch->evq_cap = ncap;
    ch->evq_head = 0;
    return 0;
}

mp_event *mp__event_push_ref(mp_channel *ch, mp_handle *h, mp_cmd cmd, ssize_t res,
                             uint32_t flags) {
    if (ch->evq_len == ch->evq_cap && evq_grow(ch) < 0) return NULL;
    mp_qev *q = &ch->evq[(ch->evq_head + ch->evq_len) % ch->evq_cap];
    ch->evq_len++;
    memset(q, 0, sizeof *q);
    q->ev.cmd = cmd;
    q->ev.result = res;
    q->ev.flags = flags;
    q->ev.handle = h;
    q->ev.cookie = h ? h->cookie : NULL;
    q->gen = h ? h->gen : 0;
    return &q->ev;
}

int mp__event_push(mp_channel *ch, mp_handle *h, mp_cmd cmd, ssize_t res, uint32_t flags) {
    return mp__event_push_ref(ch, h, cmd, res, flags) ? 0 : -ENOMEM;
}

bool mp__event_pop(mp_channel *ch, mp_event *ev) {
    while (ch->evq_len) {
        mp_qev *q = &ch->evq[ch->evq_head];
        ch->evq_head = (ch->evq_head + 1) % ch->evq_cap;
        ch->evq_len--;
        mp_handle *h = q->ev.handle;
        if (h && (h->state != H_LIVE || h->gen != q->gen)) continue;
        *ev = q->ev;
        return true;
    }
    return false;
}

void mp__events_free(mp_channel *ch) {
    free(ch->evq);
    ch->evq = NULL;
    ch->evq_cap = ch->evq_len = ch->evq_head = 0;
}

void mp__rearm_add(mp_handle *h) {
    if (h->in_rearm_list) return;
    h->in_rearm_list = true;
    h->rearm_next = h->ch->rearm_head;
    h->ch->rearm_head = h->idx + 1;
}

void mp__rearm_remove(mp_handle *h) {
    if (!h->in_rearm_list) return;
    mp_channel *ch = h->ch;
    uint32_t *link = &ch->rearm_head;
    while (*link && *link != h->idx + 1) link = &mp__handle_at(ch, *link - 1)->rearm_next;
    if (*link) *link = h->rearm_next;
    h->in_rearm_list = false;
}

mp_handle *mp__rearm_pop(mp_channel *ch) {
    while (ch->rearm_head) {
        mp_handle *h = mp__handle_at(ch, ch->rearm_head - 1);
        ch->rearm_head = h->rearm_next;
        h->in_rearm_list = false;
        if (h->state == H_LIVE) return h;
    }
    return NULL;
}
