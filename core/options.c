/*
 * options.c — mp_options: defaults, MP_* environment variables, validation, and the
 * library's version.  Every knob is documented at struct mp_options in include/megapipe.h.
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "internal.h"

#define STR2(x) #x
#define STR(x) STR2(x)

int mp_version(void) { return MEGAPIPE_VERSION; }

const char *mp_version_string(void) {
    return STR(MEGAPIPE_VERSION_MAJOR) "." STR(MEGAPIPE_VERSION_MINOR) "." STR(
        MEGAPIPE_VERSION_PATCH);
}

/* Older callers pass a smaller struct: only the fields that fit are touched. */
#define HAS(opt, size, field) (offsetof(mp_options, field) + sizeof((opt)->field) <= (size))

void mp_options_init_sized(mp_options *opt, size_t size) {
    if (!opt || size < offsetof(mp_options, engine)) return;
    if (size > sizeof *opt) size = sizeof *opt;
    opt->size = (uint32_t)size;
    opt->engine = MP_OPT_DEFAULT;
    opt->batch = MP_OPT_DEFAULT;
    opt->partition = MP_OPT_DEFAULT;
    opt->lwsocket = MP_OPT_DEFAULT;
    opt->stats = MP_OPT_DEFAULT;
    opt->ring_entries = MP_OPT_DEFAULT;
    opt->max_lwsockets = MP_OPT_DEFAULT;
    opt->buf_size = MP_OPT_DEFAULT;
    opt->buf_count = MP_OPT_DEFAULT;
    opt->balance = MP_OPT_DEFAULT;
    opt->balance_threshold = MP_OPT_DEFAULT;
    opt->log = MP_OPT_DEFAULT;
    opt->wait_usec = MP_OPT_DEFAULT;
    if (HAS(opt, size, buf_per_conn)) opt->buf_per_conn = MP_OPT_DEFAULT;
    if (HAS(opt, size, readiness)) opt->readiness = MP_OPT_DEFAULT;
}

/* An integer from the environment; def when unset, -2 (invalid) when malformed. */
static int env_int(const char *name, int def) {
    const char *s = getenv(name);
    if (!s || !*s) return def;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < 0 || v > (1L << 30)) return -2;
    return (int)v;
}

static int env_engine(void) {
    const char *s = getenv("MP_ENGINE");
    if (!s || !*s || !strcasecmp(s, "auto")) return MP_ENGINE_AUTO;
    if (!strcasecmp(s, "uring") || !strcasecmp(s, "io_uring")) return MP_ENGINE_URING;
    if (!strcasecmp(s, "epoll")) return MP_ENGINE_EPOLL;
    return -2;
}

static int env_readiness(void) {
    const char *s = getenv("MP_READINESS");
    if (!s || !*s || !strcasecmp(s, "auto")) return MP_READINESS_AUTO;
    if (!strcasecmp(s, "poll")) return MP_READINESS_POLL;
    if (!strcasecmp(s, "epoll")) return MP_READINESS_EPOLL;
    if (!strcasecmp(s, "epoll-ring")) return MP_READINESS_EPOLL_RING;
    return -2;
}

#define PICK(field, envexpr)                                                                 \
    cfg->field = (opt && HAS(opt, opt->size, field) && opt->field != MP_OPT_DEFAULT)          \
                     ? opt->field                                                             \
                     : (envexpr)

void mp__config_resolve(const mp_options *opt, mp_config *cfg) {
    PICK(engine, env_engine());
    PICK(batch, env_int("MP_BATCH", 32));
    PICK(partition, env_int("MP_PARTITION", 1));
    PICK(lwsocket, env_int("MP_LWSOCKET", 1));
    PICK(stats, env_int("MP_STATS", 0));
    PICK(ring_entries, env_int("MP_RING_ENTRIES", 256));
    PICK(max_lwsockets, env_int("MP_MAX_LWSOCKETS", 16384));
    PICK(buf_size, env_int("MP_BUF_SIZE", 4096));
    PICK(buf_count, env_int("MP_BUF_COUNT", 1024));
    PICK(balance, env_int("MP_BALANCE", 0));
    PICK(balance_threshold, env_int("MP_BALANCE_THRESHOLD", 16));
    PICK(log, env_int("MP_LOG", 1));
    PICK(wait_usec, env_int("MP_WAIT_USEC", 20));
    /* A quarter of the pool, but never fewer than 16 (or the whole of a smaller pool). */
    int per_conn = cfg->buf_count / 4, floor = cfg->buf_count < 16 ? cfg->buf_count : 16;
    PICK(buf_per_conn, env_int("MP_BUF_PER_CONN", per_conn > floor ? per_conn : floor));
    PICK(readiness, env_readiness());
}

int mp__config_valid(const mp_config *c) {
    if (c->engine < MP_ENGINE_AUTO || c->engine > MP_ENGINE_EPOLL) return 0;
    if (c->batch < 1 || c->batch > 4096) return 0;
    if (c->partition < 0 || c->partition > 1) return 0;
    if (c->lwsocket < 0 || c->lwsocket > 1) return 0;
    if (c->stats < 0 || c->log < 0 || c->balance < 0 || c->balance > 1) return 0;
    if (c->ring_entries < 8 || c->ring_entries > 32768) return 0;
    if (c->max_lwsockets < 1 || c->max_lwsockets > (1 << 20)) return 0;
    if (c->buf_size < 64 || c->buf_size > (1 << 24)) return 0;
    if (c->buf_count < 1 || c->buf_count > 32768) return 0;
    if (c->balance_threshold < 1) return 0;
    if (c->wait_usec < 0 || c->wait_usec > 1000000) return 0;
    if (c->buf_per_conn < 1) return 0;
    if (c->readiness < MP_READINESS_AUTO || c->readiness > MP_READINESS_EPOLL_RING) return 0;
    return 1;
}
