/*
 * accept.c — mp_accept() and the ACCEPT events: how many connections a listener still wants,
 * which kind (fd or lwsocket), and what each accepted connection or failure reports.
 * Engines decide how to ask the kernel (multishot, one at a time, back-off after errors).
 */
#include <errno.h>

#include "internal.h"

int mp_accept(mp_handle *h, unsigned count, int flags) {
    int e = mp__h_enter(h);
    if (e < 0) return e;
    if (h->kind != HK_LISTENER) return -EINVAL;
    if (flags & ~(MP_LWSOCKET | MP_ACCEPT_EXCLUSIVE | MP_ACCEPT_ADDR | MP_ACCEPT_ADDR_KNOWN))
        return -EINVAL;
    if ((flags & MP_ACCEPT_ADDR_KNOWN) && !(flags & MP_ACCEPT_ADDR)) return -EINVAL;
    mp_channel *ch = h->ch;
    h->acc.lw = (flags & MP_LWSOCKET) && ch->cfg.lwsocket;
    h->acc.excl = (flags & MP_ACCEPT_EXCLUSIVE) != 0;
    h->acc.addr = (flags & MP_ACCEPT_ADDR) != 0;
    h->acc.addr_known = (flags & MP_ACCEPT_ADDR_KNOWN) != 0;
    if (count == 0)
        h->acc.forever = true;
    else
        h->acc.left = (h->acc.left + count < h->acc.left) ? ~0u : h->acc.left + count;
    ch->st.requests++;
    if (h->acc.backoff) return 0; /* the engine goes on by itself after the back-off */
    return ch->eng->arm_accept(ch, h);
}

int mp_accept_share(mp_handle *h) {
    int e = mp__h_enter(h);
    if (e < 0) return e;
    if (h->kind != HK_LISTENER) return -EINVAL;
    if (!h->acc.excl) return 0;
    mp_channel *ch = h->ch;
    h->acc.excl = false;
    if (!ch->eng->share_accept) return 0;
    int r = ch->eng->share_accept(ch, h);
    if (r < 0) return r;
    /* As at a listener's end (mp__handle_end): the queue's other waiters get their turn from
     * now on, not from this thread's next wait. */
    if (h->inflight) ch->eng->flush(ch);
    return 0;
}

void mp__accept_done(mp_handle *h, int res, bool more, bool stolen, const struct sockaddr *addr,
                     socklen_t addrlen) {
    mp_channel *ch = h->ch;
    if (res >= 0) {
        if (!h->acc.forever && h->acc.left) h->acc.left--;
        if (mp_is_lwsocket(res)) mp__lwmap_set(ch, (unsigned)(res - MP_LWSOCKET_BASE), 1);
        if (stolen) ch->st.stolen_accepts++;
    } else {
        ch->st.accept_errors++;
    }
    mp_event *ev = mp__event_push_ref(ch, h, MP_EV_ACCEPT, res, more ? MP_EVF_MORE : 0);
    if (!ev) return;
    ev->u.accept.fd = res;
    /* the record behind ev (its first member) keeps the address until ev is handed out */
    if (res >= 0 && addr) ((mp_qev *)ev)->addr1 = mp__addr_put(ch, addr, addrlen);
    if (ch->cfg.balance && h->acc.part)
        ev->u.accept.backlog = mp__partition_backlog(h->fd);
    else
        ev->u.accept.backlog = more ? 1 : 0;
}
