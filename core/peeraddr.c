/*
 * peeraddr.c — the peer addresses of ACCEPT events (mp_accept() with MP_ACCEPT_ADDR): copied
 * here when the engine reports the connection, held while the event waits in the queue, handed
 * out as a pointer (mp_event.u.accept.addr) and kept until the next mp_dispatch*() call.
 * Entries live in chunks that are never moved, so a pointer handed out stays valid while the
 * pool grows; most channels never ask for addresses and allocate nothing.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define ADDR_CHUNK 64u

struct mp_peeraddr {
    struct sockaddr_storage ss;
    socklen_t len;
    uint32_t next; /* idx + 1 in the free or held list */
};

static struct mp_peeraddr *entry(const mp_channel *ch, uint32_t i) {
    return &ch->addr_chunks[i / ADDR_CHUNK][i % ADDR_CHUNK];
}

static int grow(mp_channel *ch) {
    struct mp_peeraddr **c = realloc(ch->addr_chunks, (ch->addr_nchunks + 1) * sizeof *c);
    if (!c) return -ENOMEM;
    ch->addr_chunks = c;
    struct mp_peeraddr *e = malloc(ADDR_CHUNK * sizeof *e);
    if (!e) return -ENOMEM;
    c[ch->addr_nchunks] = e;
    uint32_t base = ch->addr_nchunks++ * ADDR_CHUNK;
    for (uint32_t i = ADDR_CHUNK; i-- > 0;) {
        e[i].next = ch->addr_free;
        ch->addr_free = base + i + 1;
    }
    return 0;
}

/* Keep a copy of addr; returns its entry + 1, or 0 when none could be had (no memory, no
 * address: the event then carries none). */
uint32_t mp__addr_put(mp_channel *ch, const struct sockaddr *addr, socklen_t addrlen) {
    if (!addr || !addrlen) return 0;
    if (!ch->addr_free && grow(ch) < 0) return 0;
    uint32_t a1 = ch->addr_free;
    struct mp_peeraddr *e = entry(ch, a1 - 1);
    ch->addr_free = e->next;
    if (addrlen > sizeof e->ss) addrlen = sizeof e->ss;
    memcpy(&e->ss, addr, addrlen);
    e->len = addrlen;
    return a1;
}

/* The event is handed out: point it at the entry, which stays until the next dispatch. */
void mp__addr_hand_out(mp_channel *ch, uint32_t addr1, mp_event *ev) {
    struct mp_peeraddr *e = entry(ch, addr1 - 1);
    ev->u.accept.addr = (const struct sockaddr *)&e->ss;
    ev->u.accept.addrlen = e->len;
    e->next = ch->addr_held;
    ch->addr_held = addr1;
}

/* The event was dropped before anyone saw it. */
void mp__addr_drop(mp_channel *ch, uint32_t addr1) {
    struct mp_peeraddr *e = entry(ch, addr1 - 1);
    e->next = ch->addr_free;
    ch->addr_free = addr1;
}

void mp__addr_expire(mp_channel *ch) {
    while (ch->addr_held) {
        uint32_t a1 = ch->addr_held;
        ch->addr_held = entry(ch, a1 - 1)->next;
        mp__addr_drop(ch, a1);
    }
}

void mp__addr_free(mp_channel *ch) {
    for (uint32_t i = 0; i < ch->addr_nchunks; i++) free(ch->addr_chunks[i]);
    free(ch->addr_chunks);
    ch->addr_chunks = NULL;
    ch->addr_nchunks = ch->addr_free = ch->addr_held = 0;
}
