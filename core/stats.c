/*
 * stats.c — per-channel statistics: mp_get_stats() and the MP_STATS=1 report.
 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

/* The first version's mp_stats ends at handles. */
#define STATS_SIZE_V1 (offsetof(mp_stats, handles) + sizeof(uint64_t))
#define HAS(st, field) (offsetof(mp_stats, field) + sizeof((st)->field) <= (st)->size)

int mp_get_stats_sized(const mp_channel *ch, mp_stats *st, size_t size) {
    if (!ch || ch->magic != MP_CHANNEL_MAGIC) return -EBADF;
    if (!st || size < STATS_SIZE_V1) return -EINVAL;
    if (size > sizeof *st) size = sizeof *st;
    mp_stats cur = ch->st;
    cur.size = (uint32_t)size;
    memcpy(st, &cur, size);
    return 0;
}

static void feat_list(FILE *f, uint32_t bits) {
    static const struct { uint32_t bit; const char *name; } names[] = {
        {MP_FEAT_SINGLE_ISSUER, "single_issuer"}, {MP_FEAT_DEFER_TASKRUN, "defer_taskrun"},
        {MP_FEAT_REGISTERED_RING, "registered_ring"},
        {MP_FEAT_DIRECT_DESCRIPTORS, "direct_descriptors"},
        {MP_FEAT_MULTISHOT_ACCEPT, "multishot_accept"},
        {MP_FEAT_FIXED_FD_INSTALL, "fixed_fd_install"}, {MP_FEAT_BUF_RING, "buf_ring"},
        {MP_FEAT_RECV_MULTISHOT, "recv_multishot"}, {MP_FEAT_NODROP, "nodrop"},
        {MP_FEAT_EXT_ARG, "ext_arg"}, {MP_FEAT_POLL_MULTISHOT, "poll_multishot"},
        {MP_FEAT_MIN_WAIT, "min_wait"}, {MP_FEAT_EPOLL_WAIT, "epoll_wait"},
        {MP_FALLBACK_EPOLL_ENGINE, "epoll_engine"},
    };
    int any = 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (bits & names[i].bit) fprintf(f, "%s%s", any++ ? "," : "", names[i].name);
    if (!any) fputs("-", f);
}

void mp_print_stats(const mp_stats *st, void *stdio_file) {
    FILE *f = stdio_file ? (FILE *)stdio_file : stderr;
    if (!st || st->size < STATS_SIZE_V1) return;
    fprintf(f, "megapipe stats: engine=%s features=", st->engine);
    feat_list(f, st->features);
    fputs(" missing=", f);
    feat_list(f, st->missing);
    fputs(" fallbacks=", f);
    feat_list(f, st->fallbacks);
    fprintf(f,
            "\n  requests=%llu events=%llu syscalls=%llu submits=%llu sqes=%llu cqes=%llu"
            " cq_overflows=%llu accept_errors=%llu stolen_accepts=%llu handles=%llu\n",
            (unsigned long long)st->requests, (unsigned long long)st->events,
            (unsigned long long)st->syscalls, (unsigned long long)st->submits,
            (unsigned long long)st->sqes, (unsigned long long)st->cqes,
            (unsigned long long)st->cq_overflows, (unsigned long long)st->accept_errors,
            (unsigned long long)st->stolen_accepts, (unsigned long long)st->handles);
    fprintf(f, "  buffers: in_use=%llu peak=%llu starved=%llu",
            (unsigned long long)st->bufs_in_use, (unsigned long long)st->bufs_peak,
            (unsigned long long)st->buf_starved);
    if (HAS(st, buf_paused))
        fprintf(f, " paused=%llu\n  probes=%llu accept_paused=%llu",
                (unsigned long long)st->buf_paused, (unsigned long long)st->probes,
                (unsigned long long)st->accept_paused);
    if (HAS(st, watch_remote))
        fprintf(f, "\n  readiness=%s watch_ops=%llu watch_remote=%llu", st->readiness,
                (unsigned long long)st->watch_ops, (unsigned long long)st->watch_remote);
    if (HAS(st, set_waits) && st->set_waits)
        fprintf(f, " set_waits=%llu", (unsigned long long)st->set_waits);
    if (HAS(st, peer_lookups) && st->peer_lookups)
        fprintf(f, " peer_lookups=%llu", (unsigned long long)st->peer_lookups);
    if (HAS(st, epoll_ctl_failed) && (st->epoll_waits || st->epoll_ctls))
        fprintf(f, "\n  epoll_waits %llu epoll_ctls %llu epoll_ctl_failed %llu",
                (unsigned long long)st->epoll_waits, (unsigned long long)st->epoll_ctls,
                (unsigned long long)st->epoll_ctl_failed);
    fputc('\n', f);
    static const char *lbl[MP_STATS_HIST] = {"1", "2-3", "4-7", "8-15", "16-31", "32-63",
                                             "64-127", "128+"};
    fputs("  batch sizes:", f);
    for (int i = 0; i < MP_STATS_HIST; i++)
        fprintf(f, " %s:%llu", lbl[i], (unsigned long long)st->batch_hist[i]);
    fputc('\n', f);
}
