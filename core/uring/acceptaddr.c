/*
 * uring/acceptaddr.c — where accepts that want the peer's address (MP_ACCEPT_ADDR) have the
 * kernel write it: one slot per accept request in flight (a multishot keeps its slot for all its
 * connections), named by the request's user_data (tag T_ACCEPT_ADDR, seq = slot), which also
 * records what the request is (its own tag: accept or steal, fd or lwsocket) and whose (handle
 * slot and generation).  Slots live in chunks that never move while the kernel may write to
 * them; freed at mp_destroy.
 */
#include <stdlib.h>
#include <string.h>

#include "uring.h"

#define ASLOT_CHUNK 32u
#define ASLOT_MAX 0xffffffu /* seq is 24 bits */

static uring_aslot *at(const uring *u, uint32_t i) {
    return &u->aslots[i / ASLOT_CHUNK][i % ASLOT_CHUNK];
}

/* A free slot for an accept of h tagged t, its address buffer ready for the kernel; NULL
 * when memory ran out (the accept then goes without an address). */
uring_aslot *mp__u_aslot_get(mp_channel *ch, mp_handle *h, enum tag t, bool multishot) {
    uring *u = U(ch);
    if (!u->aslot_free) {
        if ((uint64_t)(u->naslot_chunks + 1) * ASLOT_CHUNK > ASLOT_MAX) return NULL;
        uring_aslot **c = realloc(u->aslots, (u->naslot_chunks + 1) * sizeof *c);
        if (!c) return NULL;
        u->aslots = c;
        uring_aslot *e = calloc(ASLOT_CHUNK, sizeof *e);
        if (!e) return NULL;
        c[u->naslot_chunks] = e;
        uint32_t base = u->naslot_chunks++ * ASLOT_CHUNK;
        for (uint32_t i = ASLOT_CHUNK; i-- > 0;) {
            e[i].id = base + i;
            e[i].next = u->aslot_free;
            u->aslot_free = base + i + 1;
        }
    }
    uring_aslot *s = at(u, u->aslot_free - 1);
    u->aslot_free = s->next;
    s->busy = true;
    s->tag = (uint8_t)t;
    s->idx = h->idx;
    s->gen = h->gen;
    s->len = sizeof s->ss;
    s->multishot = multishot;
    s->lookup = !h->acc.addr_known;
    if (multishot) u->ms_addr++;
    return s;
}

/* The slot of request id, while the request is in flight; NULL otherwise. */
uring_aslot *mp__u_aslot_find(const mp_channel *ch, uint32_t id) {
    const uring *u = U(ch);
    if (id >= u->naslot_chunks * ASLOT_CHUNK) return NULL;
    uring_aslot *s = at(u, id);
    return s->busy ? s : NULL;
}

/* The request's last completion came. */
void mp__u_aslot_put(mp_channel *ch, uring_aslot *s) {
    uring *u = U(ch);
    if (s->multishot && u->ms_addr) u->ms_addr--;
    s->busy = false;
    s->next = u->aslot_free;
    u->aslot_free = s->id + 1;
}

/* Cancel every accept of h that is waiting for an address. */
void mp__u_aslot_cancel(mp_channel *ch, mp_handle *h) {
    uring *u = U(ch);
    for (uint32_t i = 0; i < u->naslot_chunks * ASLOT_CHUNK; i++) {
        uring_aslot *s = at(u, i);
        if (s->busy && s->idx == h->idx && s->gen == h->gen)
            mp__u_cancel(ch, ud(T_ACCEPT_ADDR, i, h->idx));
    }
}

void mp__u_aslot_fini(mp_channel *ch) {
    uring *u = U(ch);
    for (uint32_t i = 0; i < u->naslot_chunks; i++) free(u->aslots[i]);
    free(u->aslots);
    u->aslots = NULL;
    u->naslot_chunks = u->aslot_free = 0;
}
