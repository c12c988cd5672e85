/*
 * loadgen_hist.c — the latency histogram (see loadgen_hist.h).
 */
#include "loadgen_hist.h"

static unsigned bucket_of(uint64_t v) {
    if (v < 64) return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v); /* >= 6 */
    unsigned sub = (unsigned)(v >> (e - 5)) & 31u;
    return 64u + (e - 6u) * 32u + sub;
}

static uint64_t bucket_low(unsigned i) {
    if (i < 64) return i;
    unsigned e = (i - 64) / 32 + 6, sub = (i - 64) % 32;
    return ((uint64_t)(32 + sub)) << (e - 5);
}

void hist_add(hist *h, uint64_t ns) {
    h->b[bucket_of(ns)]++;
    h->n++;
}

void hist_merge(hist *into, const hist *from) {
    for (unsigned i = 0; i < HIST_BUCKETS; i++) into->b[i] += from->b[i];
    into->n += from->n;
}

uint64_t hist_quantile(const hist *h, double q) {
    if (!h->n) return 0;
    uint64_t rank = (uint64_t)(q * (double)h->n);
    if (rank >= h->n) rank = h->n - 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += h->b[i];
        if (seen > rank) {
            uint64_t lo = bucket_low(i), hi = i + 1 < HIST_BUCKETS ? bucket_low(i + 1) : lo;
            return (lo + hi) / 2;
        }
    }
    return 0;
}
