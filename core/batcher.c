/*
 * batcher.c — the paper's transparent batching (§3.4.3), engine-independent part: when a
 * batch is due and what each submission contributes to the statistics.  Requests are
 * queued (in the SQ ring, for io_uring) and handed to the kernel in one system call when
 *   1. the number queued reaches the threshold (MP_BATCH, default 32), or
 *   2. mp_dispatch() has no completion left to hand out (it submits while it waits), or
 *   3. the application calls mp_flush().
 * MP_BATCH=1 makes every request its own system call, to measure what batching is worth.
 */
#include "internal.h"

bool mp__batch_full(const mp_channel *ch, unsigned queued) {
    return queued >= (unsigned)ch->cfg.batch;
}

void mp__batch_account(mp_channel *ch, unsigned submitted) {
    if (!submitted) return;
    ch->st.submits++;
    ch->st.sqes += submitted;
    unsigned b = 0;
    while (b < MP_STATS_HIST - 1 && submitted >= (2u << b)) b++;
    ch->st.batch_hist[b]++;
}
