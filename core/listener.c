/*
 * listener.c — partitioned listening sockets (the paper's per-core accept queues).
 *
 * Each channel that registers a listening address with a cpu_mask gets its own socket in
 * one SO_REUSEPORT group, and a classic-BPF program attached to the group sends every new
 * connection to the member whose mask holds the CPU that handled the SYN (SKF_AD_CPU).  CPUs
 * in no mask get an out-of-range index, which makes the kernel fall back to its own hash.
 *
 * The program returns an *index* into the kernel's member array, so we must know that array's
 * order: members are appended at listen(), and when one leaves (shutdown/close) the kernel
 * moves the last member into its slot.  The group table below mirrors that order.  It is the
 * library's one piece of process-wide state, by necessity: the kernel group itself spans the
 * channels (and threads) of the process.  A mutex guards it; it is touched only when
 * partitions are created, closed or re-masked, never on the I/O path.
 */
#include <errno.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <fcntl.h>
#include <unistd.h>

#include "internal.h"

#ifndef SO_ATTACH_REUSEPORT_CBPF
#define SO_ATTACH_REUSEPORT_CBPF 51
#endif

#define MAX_MEMBERS 256

struct mp_group;

struct mp_partition {
    struct mp_group *g;
    int fd;
    cpu_set_t mask;
};

typedef struct mp_group {
    struct mp_group *next;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int backlog;
    unsigned n;
    struct mp_partition *members[MAX_MEMBERS]; /* kernel order */
} mp_group;

static pthread_mutex_t groups_lock = PTHREAD_MUTEX_INITIALIZER;
static mp_group *groups;

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

/* Rebuild and attach the steering program.  Called with groups_lock held. */
static int group_steer(mp_group *g) {
    if (g->n == 0) return 0;
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
    mp_group *g = group_find(&ss, sl, true);
    if (g && g->n == 0) g->backlog = backlog > 0 ? backlog : SOMAXCONN;
    pthread_mutex_unlock(&groups_lock);
    return fd;
}

int mp__partition_open(mp_channel *ch, mp_handle *h, int listen_fd, const cpu_set_t *mask) {
    (void)ch;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(listen_fd, (struct sockaddr *)&ss, &sl) < 0) return -errno;
    struct mp_partition *pt = calloc(1, sizeof *pt);
    if (!pt) return -ENOMEM;
    pt->mask = *mask;
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
    mp_group *g = err ? NULL : group_find(&ss, sl, true);
    if (!err && !g) err = -ENOMEM;
    if (!err && g->n == MAX_MEMBERS) err = -ENOSPC;
    /* listen() appends the socket to the kernel group: do it under the lock so the mirrored
     * order is the kernel's. */
    if (!err && listen(fd, g->backlog) < 0) err = -errno;
    if (!err) {
        pt->g = g;
        pt->fd = fd;
        g->members[g->n++] = pt;
        err = group_steer(g);
        if (err) {
            g->n--;
            shutdown(fd, SHUT_RDWR);
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
    /* shutdown() leaves the kernel group now, even while io_uring still holds the file. */
    shutdown(pt->fd, SHUT_RDWR);
    for (unsigned i = 0; i < g->n; i++)
        if (g->members[i] == pt) {
            g->members[i] = g->members[--g->n];
            break;
        }
    if (g->n)
        group_steer(g);
    else
        group_drop(g);
    pthread_mutex_unlock(&groups_lock);
    close(pt->fd);
    free(pt);
    h->acc.part = NULL;
    h->fd = -1;
}

int mp_set_cpu_mask(mp_handle *h, const cpu_set_t *cpu_mask) {
    if (!mp__live(h)) return -EBADF;
    if (!h->acc.part || !cpu_mask || CPU_COUNT(cpu_mask) == 0) return -EINVAL;
    pthread_mutex_lock(&groups_lock);
    cpu_set_t old = h->acc.part->mask;
    h->acc.part->mask = *cpu_mask;
    int r = group_steer(h->acc.part->g);
    if (r < 0) h->acc.part->mask = old;
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
    if (!pt) return -1;
    int fd = -1;
    pthread_mutex_lock(&groups_lock);
    mp_group *g = pt->g;
    unsigned best = 0;
    for (unsigned i = 0; i < g->n; i++) {
        if (g->members[i] == pt) continue;
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
