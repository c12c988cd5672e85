/*
 * compat/preload.c — the LD_PRELOAD library's frame: the real libc functions, the re-entrancy
 * guard, one MegaPipe channel per thread that waits, the environment, fork and exit.
 *
 * Environment (read once, at the first interposed call):
 *   MEGAPIPE_DISABLE=1   step aside: every interposed call goes straight to libc.
 *   MEGAPIPE_VERBOSE=1   one line on stderr per process when the first channel is made (or
 *                        why the emulation stepped aside).
 *   MEGAPIPE_STATS=1     each channel's statistics on stderr when its thread exits, and those
 *                        of every channel left at process exit.
 *   MEGAPIPE_STREAMS=1   stream mode (stream.c): accepted TCP connections served by buffered
 *                        reads and write-behind through the waiting thread's channel.
 *   MEGAPIPE_STREAM_WBUF=<bytes>  stream mode's write-behind bound per connection (256k).
 *   MP_*                 the core's channel options (MP_RING_ENTRIES, MP_BATCH, ...), except
 *                        those the emulation sets itself: no lwsockets, no partitions, no
 *                        readiness set of its own.
 */
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "preload.h"

struct real_fns mpr_real;
int mpr_state;
__thread struct mpr_thread mpr_t;

bool mpr_verbose, mpr_stats;
#define g_verbose mpr_verbose
#define g_stats mpr_stats
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static pthread_key_t g_key;
static pthread_mutex_t g_chlock = PTHREAD_MUTEX_INITIALIZER;
static mp_channel **g_chans; /* every live channel of this process (stats at exit, fork) */
static size_t g_nchans, g_chcap;

#define RESOLVE(name) mpr_real.name = (__typeof__(mpr_real.name))dlsym(RTLD_NEXT, #name)

static void print_stats(mp_channel *ch, const char *when) {
    mp_stats st;
    if (mp_get_stats(ch, &st) != 0) return;
    char *buf = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&buf, &len);
    if (!m) return;
    mp_print_stats(&st, m);
    fclose(m);
    /* one write per line, each prefixed: several processes may share stderr */
    for (char *line = buf, *nl; line && *line; line = nl ? nl + 1 : NULL) {
        nl = strchr(line, '\n');
        if (nl) *nl = '\0';
        fprintf(stderr, "megapipe-preload[%d] %s: %s\n", (int)getpid(), when, line);
    }
    free(buf);
    char sl[160];
    mpr_stream_stats(ch, sl, sizeof sl);
    if (sl[0]) fprintf(stderr, "megapipe-preload[%d] %s: %s\n", (int)getpid(), when, sl);
}

static void chan_forget(mp_channel *ch) {
    pthread_mutex_lock(&g_chlock);
    for (size_t i = 0; i < g_nchans; i++)
        if (g_chans[i] == ch) {
            g_chans[i] = g_chans[--g_nchans];
            break;
        }
    pthread_mutex_unlock(&g_chlock);
}

/* A thread that made a channel exits. */
static void thread_exit(void *p) {
    mp_channel *ch = p;
    if (!ch) return;
    bool was = mpr_t.busy;
    if (mpr_streams) mpr_stream_chan_done(ch, true); /* queued bytes go out first */
    mpr_t.busy = true;
    if (g_stats) print_stats(ch, "thread exit");
    chan_forget(ch);
    mp_destroy(ch);
    mpr_t.ch = NULL;
    mpr_t.busy = was;
}

static void process_exit(void) {
    if (mpr_streams) mpr_stream_last_flush(); /* every thread's queued bytes */
    if (!g_stats) return;
    mpr_t.busy = true;
    pthread_mutex_lock(&g_chlock);
    for (size_t i = 0; i < g_nchans; i++) print_stats(g_chans[i], "exit");
    pthread_mutex_unlock(&g_chlock);
    mpr_t.busy = false;
}

/* fork: the child drops its copies of the parent's channels (their rings are the parent's)
 * and makes its own when it waits.  (What fork means for the epoll sets is fdtab.c's.) */
static void fork_prepare(void) {
    if (mpr_state > 0) mpr_stream_fork_prepare();
    if (mpr_state > 0) pthread_mutex_lock(&g_chlock);
}

static void fork_parent(void) {
    if (mpr_state > 0) pthread_mutex_unlock(&g_chlock);
}

static void fork_child(void) {
    if (mpr_state <= 0) return;
    bool was = mpr_t.busy;
    mpr_t.busy = true;
    for (size_t i = 0; i < g_nchans; i++) mp_destroy(g_chans[i]); /* the child's copies only */
    g_nchans = 0;
    mpr_t.ch = NULL;
    mpr_t.no_channel = false;
    pthread_setspecific(g_key, NULL);
    mpr_stream_fork_child();
    pthread_mutex_unlock(&g_chlock);
    mpr_t.busy = was;
}

static bool env_on(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

static void init_once(void) {
    RESOLVE(epoll_create);
    RESOLVE(epoll_create1);
    RESOLVE(epoll_ctl);
    RESOLVE(epoll_wait);
    RESOLVE(epoll_pwait);
    RESOLVE(epoll_pwait2);
    RESOLVE(close);
    RESOLVE(close_range);
    RESOLVE(closefrom);
    RESOLVE(dup);
    RESOLVE(dup2);
    RESOLVE(dup3);
    RESOLVE(socket);
    RESOLVE(socketpair);
    RESOLVE(accept);
    RESOLVE(accept4);
    RESOLVE(pipe);
    RESOLVE(pipe2);
    RESOLVE(eventfd);
    RESOLVE(read);
    RESOLVE(readv);
    RESOLVE(recv);
    RESOLVE(recvfrom);
    RESOLVE(recvmsg);
    RESOLVE(write);
    RESOLVE(writev);
    RESOLVE(send);
    RESOLVE(sendto);
    RESOLVE(sendmsg);
    RESOLVE(shutdown);
    RESOLVE(getsockopt);
    RESOLVE(setsockopt);
    RESOLVE(ioctl);
    RESOLVE(fcntl);
    RESOLVE(fcntl64);
    RESOLVE(sendfile);
    RESOLVE(sendfile64);
    RESOLVE(splice);
    RESOLVE(poll);
    RESOLVE(ppoll);
    RESOLVE(select);
    RESOLVE(pselect);
    g_verbose = env_on("MEGAPIPE_VERBOSE");
    g_stats = env_on("MEGAPIPE_STATS");
    if (!mpr_real.epoll_ctl || !mpr_real.close || !mpr_real.epoll_wait) {
        mpr_state = -1; /* cannot happen with glibc; never run half-interposed */
        return;
    }
    if (env_on("MEGAPIPE_DISABLE")) {
        if (g_verbose)
            fprintf(stderr, "megapipe-preload[%d]: MEGAPIPE_DISABLE set: real epoll calls\n",
                    (int)getpid());
        mpr_state = -1;
        return;
    }
    mpr_streams_init(env_on("MEGAPIPE_STREAMS"));
    pthread_key_create(&g_key, thread_exit);
    pthread_atfork(fork_prepare, fork_parent, fork_child);
    atexit(process_exit);
    mpr_state = 1;
}

void mpr_init(void) { pthread_once(&g_once, init_once); }

/* The first channel decides for the process: an engine other than io_uring means there is
 * nothing to gain (the real calls are what the epoll engine would make). */
static void step_aside(const char *why) {
    if (g_verbose) fprintf(stderr, "megapipe-preload[%d]: %s: real epoll calls\n", (int)getpid(), why);
    mpr_state = -1; /* the caller hands over what the sets had queued */
}

mp_channel *mpr_channel(void) {
    if (mpr_t.ch) return mpr_t.ch;
    if (mpr_t.no_channel || mpr_state <= 0) return NULL;
    mp_options o;
    mp_options_init(&o);
    o.lwsocket = 0;
    o.partition = 0;
    o.readiness = MP_READINESS_POLL; /* no epoll set of the channel's own */
    o.stats = 0;
    o.log = g_verbose ? 1 : 0;
    bool was = mpr_t.busy;
    mpr_t.busy = true;
    mp_channel *ch = mp_create(&o);
    int err = errno;
    mpr_t.busy = was;
    if (!ch || strcmp(mp_engine_name(ch), "uring") != 0) {
        mpr_t.no_channel = true;
        char why[96];
        snprintf(why, sizeof why, "no io_uring channel (%s)", ch ? "epoll engine" : strerror(err));
        if (ch) {
            mpr_t.busy = true;
            mp_destroy(ch);
            mpr_t.busy = was;
        }
        step_aside(why);
        return NULL;
    }
    pthread_mutex_lock(&g_chlock);
    if (g_nchans == g_chcap) {
        size_t cap = g_chcap ? g_chcap * 2 : 8;
        mp_channel **n = realloc(g_chans, cap * sizeof *n);
        if (n) {
            g_chans = n;
            g_chcap = cap;
        }
    }
    if (g_nchans < g_chcap) g_chans[g_nchans++] = ch;
    bool first = g_nchans == 1;
    pthread_mutex_unlock(&g_chlock);
    pthread_setspecific(g_key, ch);
    mpr_t.ch = ch;
    if (first) mpr_streams_check(ch);
    if (g_verbose && first) {
        mp_stats st;
        mp_get_stats(ch, &st);
        fprintf(stderr, "megapipe-preload[%d]: epoll served by io_uring channel (engine %s, "
                "EPOLL_WAIT %s)\n", (int)getpid(), st.engine,
                (st.features & MP_FEAT_EPOLL_WAIT) ? "yes" : "no");
    }
    return ch;
}
