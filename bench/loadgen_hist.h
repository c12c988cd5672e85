/*
 * loadgen_hist.h — a log-linear latency histogram (32 sub-buckets per power of two: about 3%
 * resolution from 64 ns to minutes), one per thread, merged at the end.
 */
#ifndef LOADGEN_HIST_H
#define LOADGEN_HIST_H

#include <stdint.h>

#define HIST_BUCKETS (64 + 58 * 32)

typedef struct hist {
    uint64_t n;
    uint64_t b[HIST_BUCKETS];
} hist;

void hist_add(hist *h, uint64_t ns);
void hist_merge(hist *into, const hist *from);
/* The value (ns, bucket midpoint) at quantile q in [0,1]; 0 for an empty histogram. */
uint64_t hist_quantile(const hist *h, double q);

#endif
