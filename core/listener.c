/*
 * listener.c — partitioned listening sockets (the paper's per-core accept queues).
 *
 * A channel that registers a listening address with a cpu_mask gets its own socket in the
 * address's SO_REUSEPORT group (or, for a socket the application already listens on, steers
 * that very socket: adoption).  The kernel then picks the member for each new connection; how
 * it is told which member belongs to which CPU depends on the kernel:
 *
 *   Linux >= 6.1: SO_INCOMING_CPU.  Reuseport selection prefers a listener whose
 *     SO_INCOMING_CPU is the CPU handling the SYN (reuseport_select_sock_by_hash scans from
 *     the hash slot to the first such member; with none it takes the hash slot).  The option
 *     lives on each socket, so forked workers steer without knowing about each other, and no
 *     user-space table is involved.  A reuseport BPF program would override it for the whole
 *     group: none is ever attached in this mode, and one found on the group is detached.
 *   older kernels: a classic-BPF program (SO_ATTACH_REUSEPORT_CBPF over SKF_AD_CPU) returns
 *     the index of the first member whose mask holds the CPU, so the process must mirror the
 *     kernel's member order (append at listen(), the last member moves into a leaving one's
 *     slot).  That mirror is per process: it steers the channels of one process only.
 *
 * SO_INCOMING_CPU takes one CPU: a mask of several CPUs prefers the lowest CPU of the mask that
 * the registering thread may run on (its own CPU when it is pinned), or the mask's lowest CPU.
 *
 * The group list below is per process (a forked child starts with an empty one).  It holds the
 * backlog that mp_listen_socket() was given, the member order for cBPF steering, and the
 * siblings that accept balancing may take from.  A mutex guards it; it is touched only when
 * partitions are created, closed or re-masked, never on the I/O path.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "internal.h"

#ifndef SO_INCOMING_CPU
#define SO_INCOMING_CPU 49
#endif
#ifndef SO_ATTACH_REUSEPORT_CBPF
#define SO_ATTACH_REUSEPORT_CBPF 51
#endif
#ifndef SO_DETACH_REUSEPORT_BPF
#define SO_DETACH_REUSEPORT_BPF 68
#endif

/* Log-once bits of this file (high bits, clear of internal.h's). */
#define MP_LOG_DETACHED_BPF 0x40000000u
#define MP_LOG_ADOPT_UNSTEERED 0x20000000u

#define MAX_MEMBERS 256

enum mp_steer { STEER_CPU = 1, STEER_CBPF = 2 };

struct mp_group;

struct mp_partition {
    struct mp_group *g; /* NULL: adopted and not steered (cBPF kernels) */
    int fd;
    bool adopted;       /* the application's socket: never shut down or closed here */
    int cpu;            /* STEER_CPU: the SO_INCOMING_CPU set on fd */
    cpu_set_t mask;
};

typedef struct mp_group {
    struct mp_group *next;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int backlog;
    int steer;          /* enum mp_steer, fixed while the group has members */
    unsigned n;
    struct mp_partition *members[MAX_MEMBERS]; /* cBPF: kernel order */
} mp_group;

static pthread_mutex_t groups_lock = PTHREAD_MUTEX_INITIALIZER;
static mp_group *groups;
static pid_t groups_pid;

/* With groups_lock held.  A forked child inherits a copy of the parent's list: its members
 * are the parent's sockets, which this process neither steers nor may take from. */
static void groups_own(void) {
    pid_t me = getpid();
    if (groups_pid == me) return;
    groups_pid = me;
    for (mp_group *g = groups; g; g = g->next) g->n = 0;
}

static mp_group *group_find(const struct sockaddr_storage *a, socklen_t l, bool create) {
    for (mp_group *g = groups; g; g = g->next)
        if (g->addrlen == l && !memcmp(&g->addr, a, l)) return g;
    if (!create) return NULL;
    mp_group *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    memcpy(&g->addr, a, l);
    g->addrlen = l;
    g->backlog = SOMAXCONN;
    g->next = groups;
    groups = g;
    return g;
}

static void group_drop(mp_group *g) {
    for (mp_group **p = &groups; *p; p = &(*p)->next)
        if (*p == g) {
            *p = g->next;
            free(g);
            return;
        }
}

/* Reuseport selection honours SO_INCOMING_CPU since Linux 6.1 (commit b261eda84ec1,
 * "soreuseport: Fix socket selection for SO_INCOMING_CPU"; before it the option was ignored
 * for reuseport listeners).  MP_PARTITION_STEER=cpu|cbpf overrides the choice (diagnostics,
 * and tests of the cBPF path on new kernels); read when a group gets its first member. */
static int steer_mode(void) {
    const char *e = getenv("MP_PARTITION_STEER");
    if (e && !strcmp(e, "cbpf")) return STEER_CBPF;
    if (e && !strcmp(e, "cpu")) return STEER_CPU;
    static int kernel_mode; /* computed once (callers hold groups_lock) */
    if (!kernel_mode) {
        struct utsname u;
        unsigned major = 0, minor = 0;
        int m = STEER_CBPF;
        if (uname(&u) == 0 && sscanf(u.release, "%u.%u", &major, &minor) == 2 &&
            (major > 6 || (major == 6 && minor >= 1)))
            m = STEER_CPU;
        kernel_mode = m;
    }
    return kernel_mode;
}

/* The one CPU a mask asks SO_INCOMING_CPU for: the lowest CPU of the mask that the calling
 * thread (the channel's) may run on, else the lowest of the mask. */
static int preferred_cpu(const cpu_set_t *mask) {
    cpu_set_t aff;
    if (pthread_getaffinity_np(pthread_self(), sizeof aff, &aff) == 0)
        for (int c = 0; c < CPU_SETSIZE; c++)
            if (CPU_ISSET(c, mask) && CPU_ISSET(c, &aff)) return c;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, mask)) return c;
    return -1;
}

static int set_incoming_cpu(int fd, int cpu) {
    return setsockopt(fd, SOL_SOCKET, SO_INCOMING_CPU, &cpu, sizeof cpu) < 0 ? -errno : 0;
}

/* A reuseport program overrides SO_INCOMING_CPU for the whole group: remove any (one left by
 * a cBPF-steering process, or the application's own on an adopted socket). */
static void detach_group_program(mp_channel *ch, int fd) {
    int dummy = 0;
    if (setsockopt(fd, SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, &dummy, sizeof dummy) == 0)
        mp__log_once(ch, MP_LOG_DETACHED_BPF,
                     "partition: detached a reuseport BPF program from the group of fd %d "
                     "(it would override SO_INCOMING_CPU steering)", fd);
}

/* Rebuild and attach the cBPF steering program.  Called with groups_lock held. */
static int group_steer(mp_group *g) {
    if (g->n == 0 || g->steer != STEER_CBPF) return 0;
    static const unsigned max_insns = 2 * CPU_SETSIZE + 2;
    struct sock_filter *p = malloc(max_insns * sizeof *p);
    if (!p) return -ENOMEM;
    unsigned k = 0;
    p[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, (uint32_t)(SKF_AD_OFF + SKF_AD_CPU));
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        for (unsigned i = 0; i < g->n; i++) {
            if (CPU_ISSET(cpu, &g->members[i]->mask)) {
                p[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)cpu, 0, 1);
                p[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, i);
                break;
            }
        }
    }
    p[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, 0xffffffffu); /* kernel hash */
    struct sock_fprog prog = {.len = (unsigned short)k, .filter = p};
    int r = setsockopt(g->members[0]->fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof prog);
    int err = r < 0 ? -errno : 0;
    free(p);
    return err;
}

static void group_remove(mp_group *g, struct mp_partition *pt) {
    for (unsigned i = 0; i < g->n; i++)
        if (g->members[i] == pt) {
            g->members[i] = g->members[--g->n];
            break;
        }
}

int mp_listen_socket(const struct sockaddr *addr, socklen_t addrlen, int backlog) {
    if (!addr || addrlen < sizeof(struct sockaddr_in) || addrlen > sizeof(struct sockaddr_storage))
        return -EINVAL;
    if (addr->sa_family != AF_INET && addr->sa_family != AF_INET6) return -EAFNOSUPPORT;
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0 ||
        bind(fd, addr, addrlen) < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    pthread_mutex_lock(&groups_lock);
    groups_own();
    mp_group *g = group_find(&ss, sl, true);
    if (g && g->n == 0) g->backlog = backlog > 0 ? backlog : SOMAXCONN;
    pthread_mutex_unlock(&groups_lock);
    return fd;
}

/* Steer a socket the application already listens on (SO_REUSEPORT set): set its CPU, accept
 * from it, never shut it down or close it. */
static int partition_adopt(mp_channel *ch, mp_handle *h, int fd, const cpu_set_t *mask) {
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) return -errno;
    struct mp_partition *pt = calloc(1, sizeof *pt);
    if (!pt) return -ENOMEM;
    pt->fd = fd;
    pt->adopted = true;
    pt->mask = *mask;
    pt->cpu = -1;
    int err = 0;
    pthread_mutex_lock(&groups_lock);
    groups_own();
    mp_group *g = group_find(&ss, sl, true);
    if (!g) err = -ENOMEM;
    if (!err && g->n == MAX_MEMBERS) err = -ENOSPC;
    if (!err) {
        int steer = g->n ? g->steer : steer_mode();
        if (steer == STEER_CPU) {
            pt->cpu = preferred_cpu(mask);
            err = set_incoming_cpu(fd, pt->cpu);
            if (!err) {
                detach_group_program(ch, fd);
                g->steer = STEER_CPU;
                pt->g = g;
                g->members[g->n++] = pt;
            }
        } else {
            /* A cBPF index needs the kernel's member order, which sockets listening before
             * we saw them hide: accept from the socket unsteered (the kernel's hash). */
            mp__log_once(ch, MP_LOG_ADOPT_UNSTEERED,
                         "partition: fd %d adopted without CPU steering (needs Linux >= 6.1)",
                         fd);
        }
    }
    if (g && g->n == 0 && err) group_drop(g);
    pthread_mutex_unlock(&groups_lock);
    if (err) {
        free(pt);
        return err;
    }
    h->acc.part = pt;
    h->fd = fd;
    return 0;
}

int mp__partition_open(mp_channel *ch, mp_handle *h, int listen_fd, const cpu_set_t *mask) {
    int listening = 0;
    socklen_t ll = sizeof listening;
    if (getsockopt(listen_fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &ll) == 0 && listening)
        return partition_adopt(ch, h, listen_fd, mask);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(listen_fd, (struct sockaddr *)&ss, &sl) < 0) return -errno;
    struct mp_partition *pt = calloc(1, sizeof *pt);
    if (!pt) return -ENOMEM;
    pt->mask = *mask;
    pt->cpu = -1;
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        free(pt);
        return -errno;
    }
    int one = 1, err = 0;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&ss, sl) < 0)
        err = -errno;
    pthread_mutex_lock(&groups_lock);
    groups_own();
    mp_group *g = err ? NULL : group_find(&ss, sl, true);
    if (!err && !g) err = -ENOMEM;
    if (!err && g->n == MAX_MEMBERS) err = -ENOSPC;
    int steer = (!err && g->n) ? g->steer : steer_mode();
    /* STEER_CPU: the preference is on the socket before it joins the group, so it never takes
     * other CPUs' connections as an unsteered member. */
    if (!err && steer == STEER_CPU) {
        pt->cpu = preferred_cpu(mask);
        err = set_incoming_cpu(fd, pt->cpu);
    }
    /* listen() appends the socket to the kernel group: under the lock, so the mirrored order
     * (cBPF) is the kernel's. */
    if (!err && listen(fd, g->backlog) < 0) err = -errno;
    if (!err) {
        g->steer = steer;
        pt->g = g;
        pt->fd = fd;
        g->members[g->n++] = pt;
        if (steer == STEER_CPU) {
            detach_group_program(ch, fd);
        } else {
            err = group_steer(g);
            if (err) {
                g->n--;
                shutdown(fd, SHUT_RDWR);
            }
        }
    }
    if (g && g->n == 0 && err) group_drop(g);
    pthread_mutex_unlock(&groups_lock);
    if (err) {
        close(fd);
        free(pt);
        return err;
    }
    h->acc.part = pt;
    h->fd = fd;
    return 0;
}

void mp__partition_close(mp_handle *h) {
    struct mp_partition *pt = h->acc.part;
    if (!pt) return;
    mp_group *g = pt->g;
    pthread_mutex_lock(&groups_lock);
    /* An adopted socket is the application's, perhaps shared with other processes: it keeps
     * listening, its queue and its CPU preference (clearing that could wipe the one a newer
     * adopter set: nginx starts new workers before the old ones leave); its CPU's connections
     * wait for whoever accepts from it next.  Our own partition leaves the kernel group now
     * by shutdown(), even while io_uring still holds the file; connections already queued on
     * it are reset (unless net.ipv4.tcp_migrate_req). */
    if (!pt->adopted) shutdown(pt->fd, SHUT_RDWR);
    if (g) {
        group_remove(g, pt);
        if (g->n)
            group_steer(g);
        else
            group_drop(g);
    }
    pthread_mutex_unlock(&groups_lock);
    if (!pt->adopted) close(pt->fd);
    free(pt);
    h->acc.part = NULL;
    h->fd = -1;
}

void mp__partition_forget(mp_handle *h) {
    struct mp_partition *pt = h->acc.part;
    if (!pt) return;
    mp_group *g = pt->g;
    pthread_mutex_lock(&groups_lock);
    for (unsigned i = 0; i < g->n; i++)
        if (g->members[i] == pt) {
            g->members[i] = g->members[--g->n];
            break;
        }
    if (!g->n) group_drop(g);
    pthread_mutex_unlock(&groups_lock);
    close(pt->fd);
    free(pt);
    h->acc.part = NULL;
    h->fd = -1;
}

int mp_set_cpu_mask(mp_handle *h, const cpu_set_t *cpu_mask) {
    int e = mp__h_enter(h); /* the owning thread of the owning process only */
    if (e < 0) return e;
    if (!h->acc.part || !cpu_mask || CPU_COUNT(cpu_mask) == 0) return -EINVAL;
    struct mp_partition *pt = h->acc.part;
    int r = 0;
    pthread_mutex_lock(&groups_lock);
    cpu_set_t old = pt->mask;
    pt->mask = *cpu_mask;
    if (pt->g && pt->g->steer == STEER_CPU) {
        int cpu = preferred_cpu(cpu_mask);
        r = set_incoming_cpu(pt->fd, cpu);
        if (r == 0) pt->cpu = cpu;
    } else if (pt->g) {
        r = group_steer(pt->g);
    }
    if (r < 0) pt->mask = old;
    pthread_mutex_unlock(&groups_lock);
    return r;
}

unsigned mp__partition_backlog(int fd) {
    struct tcp_info ti;
    socklen_t l = sizeof ti;
    memset(&ti, 0, sizeof ti);
    /* For a listening socket, tcpi_unacked is the accept-queue length. */
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &l) < 0) return 0;
    return ti.tcpi_unacked;
}

int mp__partition_busy_sibling(mp_handle *h, unsigned threshold) {
    struct mp_partition *pt = h->acc.part;
    if (!pt || !pt->g) return -1;
    int fd = -1;
    pthread_mutex_lock(&groups_lock);
    mp_group *g = pt->g;
    unsigned best = 0;
    for (unsigned i = 0; i < g->n; i++) {
        if (g->members[i] == pt || g->members[i]->fd == pt->fd) continue;
        unsigned b = mp__partition_backlog(g->members[i]->fd);
        if (b >= threshold && b > best) {
            best = b;
            if (fd >= 0) close(fd);
            fd = fcntl(g->members[i]->fd, F_DUPFD_CLOEXEC, 0); /* survives the sibling's close */
        }
    }
    pthread_mutex_unlock(&groups_lock);
    return fd;
}
