/*
 * log.c — diagnostics: each kind of fallback or misuse is printed once per channel, so a
 * degraded run is visible without flooding stderr.  MP_LOG=0 silences it.
 */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

void mp__log_once(mp_channel *ch, uint32_t bit, const char *fmt, ...) {
    if (ch) {
        if (ch->logged & bit) return;
        ch->logged |= bit;
        if (!ch->cfg.log) return;
    }
    va_list ap;
    va_start(ap, fmt);
    fputs("megapipe: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}
