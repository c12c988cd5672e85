/*
 * events.c — the channel's event queue: completions become mp_event records here and
 * mp_dispatch*() hands them out.  Each record keeps the generation of its handle.  Events of a
 * handle that ended before they were handed out are dropped, and what they carry (an accepted
 * connection, a channel buffer) is released here; the handle's final CLOSED event, queued
 * after all of them, frees its slot when it is handed out.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
    ch->evq_pushed++;
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

/* An event nobody will see: give back what it holds. */
static void event_release(mp_channel *ch, const mp_qev *q) {
    const mp_event *ev = &q->ev;
    if (ev->cmd == MP_EV_ACCEPT && ev->result >= 0) {
        if (q->addr1) mp__addr_drop(ch, q->addr1);
        int id = (int)ev->result;
        if (mp_is_lwsocket(id)) {
            unsigned slot = (unsigned)(id - MP_LWSOCKET_BASE);
            if (mp__lwmap_get(ch, slot) == 1) {
                if (ch->eng->close_direct) ch->eng->close_direct(ch, slot);
                mp__lwmap_set(ch, slot, 0);
            }
        } else {
            ch->st.syscalls++;
            close(id);
        }
    } else if (ev->cmd == MP_EV_READ && (ev->flags & MP_EVF_BUFFER) && ch->eng->buf_release) {
        ch->eng->buf_release(ch, ev->u.read.buf_id);
    }
}

/* Remember a regular fd handed out in an ACCEPT event: registering it needs no probing. */
static void accepted_note(mp_channel *ch, int fd) {
    if (ch->naccepted == ch->accepted_cap) {
        size_t n = ch->accepted_cap ? ch->accepted_cap * 2 : 64;
        int *a = realloc(ch->accepted, n * sizeof *a);
        if (!a) return; /* then it is probed: slower, not wrong */
        ch->accepted = a;
        ch->accepted_cap = n;
    }
    if (mp__fdmap_get(ch, fd) == 0 && mp__fdmap_set(ch, fd, MP_FD_ACCEPTED) == 0)
        ch->accepted[ch->naccepted++] = fd;
}

/* The marks last until the next dispatch: an fd the application closed and whose number was
 * reused since must not be taken for an accepted connection. */
void mp__accepted_forget(mp_channel *ch) {
    for (size_t i = 0; i < ch->naccepted; i++)
        if (mp__fdmap_get(ch, ch->accepted[i]) == MP_FD_ACCEPTED)
            mp__fdmap_set(ch, ch->accepted[i], 0);
    ch->naccepted = 0;
}

bool mp__event_pop(mp_channel *ch, mp_event *ev) {
    while (ch->evq_len) {
        mp_qev *q = &ch->evq[ch->evq_head];
        ch->evq_head = (ch->evq_head + 1) % ch->evq_cap;
        ch->evq_len--;
        ch->evq_popped++;
        mp_handle *h = q->ev.handle;
        if (h && h->gen == q->gen && q->ev.cmd == MP_EV_CLOSED && h->state == H_ZOMBIE) {
            *ev = q->ev;
            mp__handle_free(h); /* the pointer the application holds is dead from here */
            return true;
        }
        if (h && (h->state != H_LIVE || h->gen != q->gen)) {
            event_release(ch, q);
            continue;
        }
        *ev = q->ev;
        if (q->addr1) mp__addr_hand_out(ch, q->addr1, ev);
        if (ev->cmd == MP_EV_ACCEPT && ev->result >= 0 && !mp_is_lwsocket((int)ev->result))
            accepted_note(ch, (int)ev->result);
        else if (ev->cmd == MP_EV_POLL && h)
            mp__poll_popped(h);
        return true;
    }
    return false;
}

void mp__events_drain(mp_channel *ch) {
    while (ch->evq_len) {
        mp_qev *q = &ch->evq[ch->evq_head];
        ch->evq_head = (ch->evq_head + 1) % ch->evq_cap;
        ch->evq_len--;
        ch->evq_popped++;
        if (q->ev.cmd != MP_EV_CLOSED) event_release(ch, q);
    }
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

uint32_t mp__rearm_take(mp_channel *ch) {
    uint32_t list = ch->rearm_head;
    ch->rearm_head = 0;
    return list;
}

mp_handle *mp__rearm_next(mp_channel *ch, uint32_t *list) {
    while (*list) {
        mp_handle *h = mp__handle_at(ch, *list - 1);
        *list = h->rearm_next;
        h->in_rearm_list = false;
        if (h->state == H_LIVE) return h;
    }
    return NULL;
}
