/* megapipe-run — run an unmodified program with its epoll calls served by MegaPipe.
 *
 * Owns: finding libmegapipe-preload.so, putting it at the front of LD_PRELOAD, putting the
 * project's libevent and libuv builds (when they exist) at the front of LD_LIBRARY_PATH,
 * turning the launcher's options into the MEGAPIPE_* variables the preload reads, and exec.
 * It does nothing after exec: what happens next is the preload's (compat/), and the exit
 * status is the program's own.
 *
 * Build-time inputs (compile definitions from compat/run.cmake):
 *   MP_RUN_VERSION        the project version
 *   MP_RUN_INSTALLED      ${CMAKE_INSTALL_FULL_LIBDIR}/megapipe/libmegapipe-preload.so
 *   MP_RUN_REL_LIBDIR     ${CMAKE_INSTALL_LIBDIR} when relative ("" otherwise): an installed
 *                         launcher moved with its prefix still finds ../LIBDIR/megapipe/
 *   MP_RUN_LIBEVENT_DIR   ${CMAKE_BINARY_DIR}/libevent/lib (cmake/libevent.cmake's output)
 *   MP_RUN_LIBUV_DIR      ${CMAKE_BINARY_DIR}/libuv/lib    (cmake/libuv.cmake's output)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MP_RUN_VERSION
#define MP_RUN_VERSION "unknown"
#endif
#ifndef MP_RUN_INSTALLED
#define MP_RUN_INSTALLED "/usr/local/lib/megapipe/libmegapipe-preload.so"
#endif
#ifndef MP_RUN_REL_LIBDIR
#define MP_RUN_REL_LIBDIR "lib"
#endif
#ifndef MP_RUN_LIBEVENT_DIR
#define MP_RUN_LIBEVENT_DIR ""
#endif
#ifndef MP_RUN_LIBUV_DIR
#define MP_RUN_LIBUV_DIR ""
#endif

#define PRELOAD_NAME "libmegapipe-preload.so"

/* Exit statuses of the launcher itself (the program's own status otherwise). */
enum { EXIT_LAUNCHER = 1, EXIT_USAGE = 2, EXIT_NOEXEC = 126, EXIT_NOTFOUND = 127 };

static const char *prog = "megapipe-run";

static void usage_short(FILE *f)
{
    fprintf(f, "usage: %s [-v] [--stats] [--streams] [--disable] [--preload PATH] [--no-lib-path] [--] CMD [ARGS...]\n"
               "       %s --help | --version\n", prog, prog);
}

static void help(void)
{
    printf(
"NAME\n"
"    megapipe-run - run an unmodified program with epoll served by MegaPipe over io_uring\n"
"\n"
"SYNOPSIS\n"
"    megapipe-run [OPTIONS] [--] CMD [ARGS...]\n"
"    megapipe-run --help | --version\n"
"\n"
"DESCRIPTION\n"
"    megapipe-run executes CMD with the MegaPipe preload library (" PRELOAD_NAME ")\n"
"    at the front of LD_PRELOAD.  The preload interposes epoll_create, epoll_create1,\n"
"    epoll_ctl, epoll_wait, epoll_pwait and epoll_pwait2 and serves them from a MegaPipe\n"
"    channel's readiness set over io_uring (\"epoll-only mode\"): every wait is one\n"
"    io_uring_enter, epoll_ctl calls are queued in the ring, and epoll's semantics (level,\n"
"    edge, one-shot, EPOLLEXCLUSIVE, fork, exec, dup, threads) are kept.  The program is\n"
"    not modified or rebuilt; everything else it does reaches the kernel as before.  If\n"
"    io_uring is unavailable (old kernel, seccomp, kernel.io_uring_disabled) the preload\n"
"    steps aside and the program runs on the real calls.\n"
"\n"
"    The launcher also puts the project's own libevent and libuv builds at the front of\n"
"    LD_LIBRARY_PATH when those directories exist (they are the build tree's\n"
"    libevent/lib and libuv/lib, made with MP_WITH_LIBEVENT / MP_WITH_LIBUV):\n"
"        %s\n"
"        %s\n"
"    Then it replaces itself with CMD (execvp: CMD is looked up in PATH when it has no\n"
"    slash), so CMD keeps the launcher's process id, and its exit status is CMD's.\n"
"\n"
"    The preload library is the first of:\n"
"        1. --preload PATH\n"
"        2. $MEGAPIPE_PRELOAD\n"
"        3. " PRELOAD_NAME " in the launcher's own directory (the build tree:\n"
"           both are built into BUILD/compat/)\n"
"        4. ../" MP_RUN_REL_LIBDIR "/megapipe/" PRELOAD_NAME " relative to that directory\n"
"           (an installed prefix, also after it was moved)\n"
"        5. " MP_RUN_INSTALLED " (the configured install path)\n"
"    A path given with --preload or $MEGAPIPE_PRELOAD must exist: it is never silently\n"
"    replaced by another.\n"
"\n"
"OPTIONS\n"
"    -v, --verbose\n"
"        Print on stderr what the launcher set (every variable, its value) and the command\n"
"        it executes, and set MEGAPIPE_VERBOSE=1, so that each process of CMD says at its\n"
"        first epoll call whether epoll is served by an io_uring channel or why the\n"
"        preload stepped aside.\n"
"    --stats\n"
"        Set MEGAPIPE_STATS=1: at process exit, and at each thread's exit, the statistics\n"
"        of every channel (system calls, SQEs, CQEs, events, batch sizes, and the line\n"
"        \"epoll_waits N\") are printed on stderr, each line prefixed with\n"
"        \"megapipe-preload[PID]\".  Daemons that redirect stderr (nginx: to its error log)\n"
"        print them there.\n"
"    --disable\n"
"        Set MEGAPIPE_DISABLE=1: the preload is loaded but steps aside, every epoll call\n"
"        goes to the real libc function.  A control run, to compare with or to tell\n"
"        whether a problem comes from the preload.\n"
"    --preload PATH\n"
"        Use the preload library at PATH.\n"
"    --no-lib-path\n"
"        Do not add the project's libevent and libuv directories to LD_LIBRARY_PATH (the\n"
"        program then uses the system's libevent and libuv, whose epoll calls the preload\n"
"        serves).\n"
"    --streams\n"
"        Set MEGAPIPE_STREAMS=1: stream mode.  TCP connections the program accepts (accept,\n"
"        accept4 on an IPv4/IPv6 TCP listener) and puts in an epoll set are served by the\n"
"        channel of the thread that waits on that set: the kernel's data is received into\n"
"        the channel's buffers (multishot receives), read, recv, recvfrom, recvmsg and readv\n"
"        copy from them without a system call, and write, send, sendto, sendmsg and writev\n"
"        copy into a write-behind queue that the thread's next epoll wait hands to the\n"
"        kernel (one io_uring_enter for every connection's bytes and the wait).  epoll\n"
"        reports such a connection from that state: EPOLLIN while bytes, end of file or an\n"
"        error wait; EPOLLOUT while the queue is under its bound (MEGAPIPE_STREAM_WBUF).\n"
"        A full queue makes writes take what fits and then fail with EAGAIN (a blocking\n"
"        socket blocks), as a full socket buffer does.  Send and receive errors (EPIPE,\n"
"        ECONNRESET) come back from the next call and from getsockopt(SO_ERROR).  close\n"
"        and shutdown send every queued byte first (SO_LINGER 0: dropped, and the peer is\n"
"        reset).  A sendfile of a small range joins the queue (read from the file;\n"
"        MEGAPIPE_STREAM_SENDFILE_COPY), and TCP_CORK is kept by the stream (its queue\n"
"        already leaves in one send); other sendfiles, splice and MSG_OOB follow the\n"
"        queued bytes (a non-blocking socket gets EAGAIN while they cannot go); FIONREAD\n"
"        counts the buffered bytes; MSG_PEEK and poll/select see the buffers.  Needs\n"
"        IORING_OP_EPOLL_WAIT\n"
"        (Linux 6.15+), provided-buffer rings and multishot receives; otherwise the\n"
"        preload says so and runs in epoll-only mode.  docs/megapipe-run.md lists what\n"
"        differs from the kernel's sockets.\n"
"    -h, --help\n"
"        This text.\n"
"    -V, --version\n"
"        The launcher's version.\n"
"    --\n"
"        End of options: what follows is CMD, even if it starts with '-'.\n"
"    Options are read up to the first argument that is not an option: everything from\n"
"    CMD on is passed to CMD untouched.\n"
"\n"
"ENVIRONMENT\n"
"    Read by the launcher:\n"
"    MEGAPIPE_PRELOAD=PATH\n"
"        The preload library, when --preload is not given.\n"
"    LD_PRELOAD, LD_LIBRARY_PATH\n"
"        Kept: the launcher prepends to them (the preload is not added twice).\n"
"    Read by the preload in CMD's processes (the options above set them; they may also be\n"
"    set by hand):\n"
"    MEGAPIPE_DISABLE=1\n"
"        Step aside: every call goes to the real libc function.\n"
"    MEGAPIPE_VERBOSE=1\n"
"        One line on stderr per process at first use, \"megapipe-preload[PID]: epoll served\n"
"        by io_uring channel (engine uring, EPOLL_WAIT yes)\" or why it stepped aside.\n"
"    MEGAPIPE_STATS=1\n"
"        Each channel's statistics on stderr at process and thread exit (see --stats).\n"
"    MEGAPIPE_STREAMS=1\n"
"        Stream mode (see --streams).  With MEGAPIPE_STATS, each channel also prints\n"
"        \"streams N (reads served R, writes queued W, sends S)\": N connections adopted.\n"
"    MEGAPIPE_STREAM_SENDFILE_COPY=BYTES\n"
"        Stream mode: a sendfile to a stream of at most this many bytes, with an offset,\n"
"        that fits the write-behind bound is read from the file into the queue (one pread\n"
"        instead of a real send of the queued bytes plus the sendfile).  Suffix k or m;\n"
"        0: never; default 64k; at most MEGAPIPE_STREAM_WBUF.\n"
"    MEGAPIPE_STREAM_WBUF=BYTES\n"
"        Stream mode's write-behind bound per connection (suffix k or m; at least 4096;\n"
"        default 256k).  The receive side is bounded by the core's MP_BUF_PER_CONN x\n"
"        MP_BUF_SIZE (default 256 x 4096 bytes): past it the connection's receive pauses\n"
"        and the kernel's socket buffer and TCP flow control hold the peer back.\n"
"    The core's MP_* knobs (MP_ENGINE, MP_BATCH, ...; docs/api.md) apply to the preload's\n"
"    channels as to any channel.\n"
"\n"
"EXIT STATUS\n"
"    CMD's exit status when CMD was executed.  Otherwise:\n"
"    1    no preload library found (or another launcher error)\n"
"    2    usage error\n"
"    126  CMD was found but could not be executed\n"
"    127  CMD was not found\n"
"\n"
"EXAMPLES\n"
"    megapipe-run -v memcached -l 127.0.0.1 -p 11211 -t 4\n"
"        memcached (Debian's binary) with its libevent epoll backend served by io_uring.\n"
"    megapipe-run --stats nginx -p /tmp/ngx -c /tmp/ngx/nginx.conf\n"
"        nginx, stock epoll event method; the workers' statistics land in its error log\n"
"        (keep the variables with \"env MEGAPIPE_STATS;\" in nginx.conf if the workers should\n"
"        see them: nginx clears the workers' environment).\n"
"    megapipe-run --disable python3 server.py\n"
"        The same program with the preload stepping aside, as a control.\n"
"    MEGAPIPE_PRELOAD=$PWD/build/compat/" PRELOAD_NAME " megapipe-run ./a.out\n"
"\n"
"LIMITATIONS\n"
"    Without --streams only epoll is served (epoll-only mode): select, poll and the socket\n"
"    calls go to the kernel as before, and a program that does not use epoll gains\n"
"    nothing; with --streams only accepted TCP connections in an epoll set are streams\n"
"    (connect()ed sockets, UNIX sockets and pipes stay plain fds).  Programs that make epoll system calls without going through libc's\n"
"    functions (raw syscall(), static binaries, Go programs) are not affected: LD_PRELOAD\n"
"    only interposes dynamically linked calls.  Set-user-ID and set-group-ID programs ignore\n"
"    LD_PRELOAD paths outside the trusted directories (secure execution), so the preload\n"
"    does not load into them.  A program that rewrites its own environment before it\n"
"    execs a child drops the preload for that child (nginx keeps the loaded preload in its\n"
"    forked workers, but their environment only has what \"env\" directives keep).\n"
"\n"
"SEE ALSO\n"
"    docs/megapipe-run.md, docs/api.md, epoll(7), ld.so(8)\n",
        MP_RUN_LIBEVENT_DIR[0] ? MP_RUN_LIBEVENT_DIR : "(no libevent build configured)",
        MP_RUN_LIBUV_DIR[0] ? MP_RUN_LIBUV_DIR : "(no libuv build configured)");
}

static bool is_file(const char *p)
{
    struct stat st;
    return p && *p && stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static bool is_dir(const char *p)
{
    struct stat st;
    return p && *p && stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* The directory of the running launcher, from /proc/self/exe; false if unknown. */
static bool self_dir(char *out, size_t size)
{
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0)
        return false;
    exe[n] = '\0';
    char *slash = strrchr(exe, '/');
    if (!slash)
        return false;
    *slash = '\0';
    return (size_t)snprintf(out, size, "%s", exe[0] ? exe : "/") < size;
}

/* Finds the preload; returns a malloc'ed absolute path, or NULL after saying why. */
static char *find_preload(const char *opt_path)
{
    const char *given = opt_path ? opt_path : getenv("MEGAPIPE_PRELOAD");
    const char *from = opt_path ? "--preload" : "MEGAPIPE_PRELOAD";
    if (given && *given) {
        char *abs = realpath(given, NULL);
        if (!abs || !is_file(abs)) {
            fprintf(stderr, "%s: %s %s: %s\n", prog, from, given,
                    abs ? "not a regular file" : strerror(errno));
            free(abs);
            return NULL;
        }
        return abs;
    }
    char tried[4][PATH_MAX + 64];
    int ntried = 0;
    char dir[PATH_MAX];
    if (self_dir(dir, sizeof dir)) {
        snprintf(tried[ntried++], sizeof tried[0], "%s/" PRELOAD_NAME, dir);
        if (MP_RUN_REL_LIBDIR[0])
            snprintf(tried[ntried++], sizeof tried[0], "%s/../%s/megapipe/" PRELOAD_NAME, dir,
                     MP_RUN_REL_LIBDIR);
    }
    snprintf(tried[ntried++], sizeof tried[0], "%s", MP_RUN_INSTALLED);
    for (int i = 0; i < ntried; i++) {
        if (is_file(tried[i])) {
            char *abs = realpath(tried[i], NULL);
            if (abs)
                return abs;
        }
    }
    fprintf(stderr, "%s: no " PRELOAD_NAME " found; looked at:\n", prog);
    for (int i = 0; i < ntried; i++)
        fprintf(stderr, "    %s\n", tried[i]);
    fprintf(stderr, "%s: give one with --preload PATH or MEGAPIPE_PRELOAD=PATH "
                    "(is the build configured with MP_BUILD_PRELOAD=ON?)\n", prog);
    return NULL;
}

/* True if LIST (separated by ':' or ' ', as ld.so reads LD_PRELOAD) holds ITEM. */
static bool list_has(const char *list, const char *item)
{
    size_t n = strlen(item);
    for (const char *p = list; p && *p;) {
        size_t len = strcspn(p, ": ");
        if (len == n && strncmp(p, item, n) == 0)
            return true;
        p += len;
        p += strspn(p, ": ");
    }
    return false;
}

/* VAR = ITEM + ':' + old value (or ITEM alone); false on allocation failure. */
static bool prepend(const char *var, const char *item)
{
    const char *old = getenv(var);
    if (old && *old) {
        char *v;
        if (asprintf(&v, "%s:%s", item, old) < 0)
            return false;
        int r = setenv(var, v, 1);
        free(v);
        return r == 0;
    }
    return setenv(var, item, 1) == 0;
}

static bool verbose;

static bool set_var(const char *var, const char *value)
{
    if (setenv(var, value, 1) != 0) {
        fprintf(stderr, "%s: setenv %s: %s\n", prog, var, strerror(errno));
        return false;
    }
    if (verbose)
        fprintf(stderr, "%s: %s=%s\n", prog, var, value);
    return true;
}

int main(int argc, char **argv)
{
    enum { OPT_STATS = 256, OPT_DISABLE, OPT_PRELOAD, OPT_STREAMS, OPT_NO_LIB_PATH };
    static const struct option opts[] = {
        {"verbose", no_argument, NULL, 'v'},
        {"stats", no_argument, NULL, OPT_STATS},
        {"disable", no_argument, NULL, OPT_DISABLE},
        {"preload", required_argument, NULL, OPT_PRELOAD},
        {"no-lib-path", no_argument, NULL, OPT_NO_LIB_PATH},
        {"streams", no_argument, NULL, OPT_STREAMS},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    bool stats = false, disable = false, lib_path = true, streams = false;
    const char *preload_opt = NULL;
    opterr = 0;
    int c;
    /* '+': stop at the first non-option, so CMD's own options are CMD's. */
    while ((c = getopt_long(argc, argv, "+:vhV", opts, NULL)) != -1) {
        switch (c) {
        case 'v': verbose = true; break;
        case OPT_STATS: stats = true; break;
        case OPT_DISABLE: disable = true; break;
        case OPT_PRELOAD: preload_opt = optarg; break;
        case OPT_NO_LIB_PATH: lib_path = false; break;
        case OPT_STREAMS: streams = true; break;
        case 'h': help(); return 0;
        case 'V': printf("megapipe-run %s\n", MP_RUN_VERSION); return 0;
        case ':':
            fprintf(stderr, "%s: option %s needs an argument\n", prog, argv[optind - 1]);
            usage_short(stderr);
            return EXIT_USAGE;
        default:
            if (optopt)
                fprintf(stderr, "%s: unknown option -%c\n", prog, optopt);
            else
                fprintf(stderr, "%s: unknown option %s\n", prog, argv[optind - 1]);
            usage_short(stderr);
            return EXIT_USAGE;
        }
    }
    if (optind >= argc) {
        fprintf(stderr, "%s: no command given\n", prog);
        usage_short(stderr);
        return EXIT_USAGE;
    }
    if (argv[optind][0] == '\0') {
        fprintf(stderr, "%s: empty command name\n", prog);
        return EXIT_NOTFOUND;
    }

    char *preload = find_preload(preload_opt);
    if (!preload)
        return EXIT_LAUNCHER;
    const char *old_preload = getenv("LD_PRELOAD");
    if (list_has(old_preload, preload)) {
        if (verbose)
            fprintf(stderr, "%s: LD_PRELOAD already holds %s: kept as it is (%s)\n", prog, preload,
                    old_preload);
    } else {
        if (!prepend("LD_PRELOAD", preload)) {
            fprintf(stderr, "%s: cannot set LD_PRELOAD: %s\n", prog, strerror(errno));
            return EXIT_LAUNCHER;
        }
        if (verbose)
            fprintf(stderr, "%s: LD_PRELOAD=%s\n", prog, getenv("LD_PRELOAD"));
    }
    free(preload);

    if (lib_path) {
        /* Added in this order at the front: libuv's, then libevent's before it. */
        const char *dirs[] = {MP_RUN_LIBUV_DIR, MP_RUN_LIBEVENT_DIR};
        bool changed = false;
        for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
            if (!is_dir(dirs[i]) || list_has(getenv("LD_LIBRARY_PATH"), dirs[i]))
                continue;
            if (!prepend("LD_LIBRARY_PATH", dirs[i])) {
                fprintf(stderr, "%s: cannot set LD_LIBRARY_PATH: %s\n", prog, strerror(errno));
                return EXIT_LAUNCHER;
            }
            changed = true;
        }
        if (verbose) {
            if (changed)
                fprintf(stderr, "%s: LD_LIBRARY_PATH=%s\n", prog, getenv("LD_LIBRARY_PATH"));
            else
                fprintf(stderr, "%s: LD_LIBRARY_PATH unchanged (no project libevent/libuv build "
                                "at %s, %s)\n", prog,
                        MP_RUN_LIBEVENT_DIR[0] ? MP_RUN_LIBEVENT_DIR : "-",
                        MP_RUN_LIBUV_DIR[0] ? MP_RUN_LIBUV_DIR : "-");
        }
    } else if (verbose) {
        fprintf(stderr, "%s: LD_LIBRARY_PATH left as it is (--no-lib-path)\n", prog);
    }

    if (verbose && !set_var("MEGAPIPE_VERBOSE", "1"))
        return EXIT_LAUNCHER;
    if (stats && !set_var("MEGAPIPE_STATS", "1"))
        return EXIT_LAUNCHER;
    if (disable && !set_var("MEGAPIPE_DISABLE", "1"))
        return EXIT_LAUNCHER;
    if (streams && !set_var("MEGAPIPE_STREAMS", "1"))
        return EXIT_LAUNCHER;

    if (verbose) {
        fprintf(stderr, "%s: exec", prog);
        for (int i = optind; i < argc; i++)
            fprintf(stderr, " %s", argv[i]);
        fputc('\n', stderr);
    }
    fflush(NULL);
    execvp(argv[optind], argv + optind);
    int err = errno;
    fprintf(stderr, "%s: %s: %s\n", prog, argv[optind],
            err == ENOENT ? "command not found" : strerror(err));
    return err == ENOENT || err == ENOTDIR ? EXIT_NOTFOUND : EXIT_NOEXEC;
}
