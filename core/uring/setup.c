/*
 * uring/setup.c — the io_uring engine's life: the ring (best flags first, fewer on older
 * kernels), what the kernel offers (probed once, reported in mp_stats), the direct-descriptor
 * table, enabling the ring on the owning thread, teardown, and the engine's vtable.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include "uring.h"

void mp__u_enable(mp_channel *ch) {
    uring *u = U(ch);
    if (!u->enabled) {
        mpu_enable_rings(&u->ring);
        ch->st.syscalls++;
        u->enabled = true;
    }
    if (!u->ring_fd_tried) {
        /* Registered ring fds belong to the registering thread: register on the thread that
         * owns the channel (the first to submit), not the one that created it. */
        u->ring_fd_tried = true;
        ch->st.syscalls++;
        if (io_uring_register_ring_fd(&u->ring) == 1) {
            u->ring_fd_registered = true;
            ch->st.features |= MP_FEAT_REGISTERED_RING;
            ch->st.missing &= ~MP_FEAT_REGISTERED_RING;
        }
    }
}

static int ring_init(mp_channel *ch, uring *u) {
    struct io_uring_params p;
    unsigned entries = (unsigned)ch->cfg.ring_entries;
    /* Try the best set of flags first, then drop them one at a time for older kernels. */
    static const unsigned flag_sets[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_R_DISABLED,
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_R_DISABLED,
        IORING_SETUP_COOP_TASKRUN,
        0,
    };
    int r = -ENOSYS;
    for (size_t i = 0; i < sizeof flag_sets / sizeof flag_sets[0]; i++) {
        memset(&p, 0, sizeof p);
        p.flags = flag_sets[i] | IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
        p.cq_entries = entries * 16;
        r = io_uring_queue_init_params(entries, &u->ring, &p);
        if (r == -EINVAL) {
            p.flags &= ~(unsigned)IORING_SETUP_SUBMIT_ALL;
            r = io_uring_queue_init_params(entries, &u->ring, &p);
        }
        if (r == 0) {
            if (p.flags & IORING_SETUP_SINGLE_ISSUER) ch->st.features |= MP_FEAT_SINGLE_ISSUER;
            else ch->st.missing |= MP_FEAT_SINGLE_ISSUER;
            if (p.flags & IORING_SETUP_DEFER_TASKRUN) ch->st.features |= MP_FEAT_DEFER_TASKRUN;
            else ch->st.missing |= MP_FEAT_DEFER_TASKRUN;
            u->enabled = !(p.flags & IORING_SETUP_R_DISABLED);
            break;
        }
        if (r != -EINVAL) return r; /* ENOSYS, EPERM, ENOMEM...: no io_uring here */
    }
    if (r < 0) return r;
    if (p.features & IORING_FEAT_NODROP) ch->st.features |= MP_FEAT_NODROP;
    else ch->st.missing |= MP_FEAT_NODROP;
    u->cqe_skip = p.features & IORING_FEAT_CQE_SKIP;
    if (ch->cfg.wait_usec > 0) {
        u->min_wait = p.features & IORING_FEAT_MIN_TIMEOUT;
        if (u->min_wait) ch->st.features |= MP_FEAT_MIN_WAIT;
        else ch->st.missing |= MP_FEAT_MIN_WAIT;
    }
    u->ext_arg = p.features & IORING_FEAT_EXT_ARG;
    if (u->ext_arg) ch->st.features |= MP_FEAT_EXT_ARG;
    else ch->st.missing |= MP_FEAT_EXT_ARG;
    return 0;
}

static void probe(mp_channel *ch, uring *u) {
    struct io_uring_probe *pr = io_uring_get_probe_ring(&u->ring);
    bool has_install = false, has_ectl = false, has_ewait = false;
    if (pr) {
        has_install = io_uring_opcode_supported(pr, IORING_OP_FIXED_FD_INSTALL);
        has_ectl = io_uring_opcode_supported(pr, IORING_OP_EPOLL_CTL);
        has_ewait = io_uring_opcode_supported(pr, IORING_OP_EPOLL_WAIT);
        io_uring_free_probe(pr);
    }
    u->fixed_install = has_install;
    /* The readiness set: a kernel epoll set unless MP_READINESS=poll (or no EPOLL_CTL op). */
    u->eset = ch->cfg.readiness != MP_READINESS_POLL && has_ectl;
    u->epoll_wait_op = has_ewait;
    u->epoll_ctl_op = has_ectl;
    if (has_ewait) ch->st.features |= MP_FEAT_EPOLL_WAIT;
    else ch->st.missing |= MP_FEAT_EPOLL_WAIT;
    snprintf(ch->st.readiness, sizeof ch->st.readiness, "%s", u->eset ? "epoll" : "poll");
    if (has_install) ch->st.features |= MP_FEAT_FIXED_FD_INSTALL;
    else ch->st.missing |= MP_FEAT_FIXED_FD_INSTALL;
    /* Multishot accept and poll have no opcode of their own: they are tried, and refused
     * with -EINVAL on kernels without them (then the engine falls back at run time).
     * IORING_FEAT_NATIVE_WORKERS (5.12) predates both; FEAT_LINKED_FILE (5.17) is close. */
    u->ms_accept = true;
    u->ms_poll = true;
    ch->st.features |= MP_FEAT_MULTISHOT_ACCEPT | MP_FEAT_POLL_MULTISHOT;
}

static int mp__u_init(mp_channel *ch) {
    uring *u = calloc(1, sizeof *u);
    if (!u) return -ENOMEM;
    int r = ring_init(ch, u);
    if (r < 0) {
        free(u);
        return r;
    }
    ch->eng_data = u;
    u->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (u->efd < 0) {
        r = -errno;
        io_uring_queue_exit(&u->ring);
        free(u);
        ch->eng_data = NULL;
        return r;
    }
    ch->st.missing |= MP_FEAT_REGISTERED_RING; /* until mp__u_enable() registers it */
    /* The direct-descriptor table may not exceed RLIMIT_NOFILE.  MP_LWSOCKET=0: none. */
    unsigned want = ch->cfg.lwsocket ? (unsigned)ch->cfg.max_lwsockets : 0;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && want > rl.rlim_cur)
        want = (unsigned)rl.rlim_cur; /* documented at MP_MAX_LWSOCKETS; not worth a log line */
    r = want ? io_uring_register_files_sparse(&u->ring, want) : -ENOTSUP;
    if (r == 0) {
        u->nfixed = want;
        ch->st.features |= MP_FEAT_DIRECT_DESCRIPTORS;
    } else if (want) {
        ch->st.missing |= MP_FEAT_DIRECT_DESCRIPTORS;
        mp__log_once(ch, MP_LOG_NO_DIRECT, "no direct-descriptor table (%s): lwsockets off",
                     strerror(-r));
    }
    probe(ch, u);
    u->backoff_ts.tv_nsec = BACKOFF_NS;
    r = mp__u_eset_init(ch);
    if (r < 0) {
        mp__u_eset_fini(ch);
    mp__u_fepoll_fini(ch);
        close(u->efd);
        io_uring_queue_exit(&u->ring);
        free(u);
        ch->eng_data = NULL;
        return r;
    }
    return 0;
}

static void mp__u_fini(mp_channel *ch) {
    uring *u = U(ch);
    if (!u) return;
    if (u->br && !mp__forked(ch)) io_uring_unregister_buf_ring(&u->ring, BUF_GROUP);
    io_uring_queue_exit(&u->ring);
    if (u->br) munmap(u->br, u->nbufs * sizeof(struct io_uring_buf));
    free(u->bufs);
    free(u->buf_busy);
    free(u->buf_owner);
    mp__u_aslot_fini(ch);
    close(u->efd);
    mp__u_eset_fini(ch);
    mp__u_fepoll_fini(ch);
    free(u);
    ch->eng_data = NULL;
}

const mp_engine mp__engine_uring = {
    .name = "uring",
    .handle_priv = sizeof(uhandle),
    .init = mp__u_init,
    .fini = mp__u_fini,
    .attach = mp__u_attach,
    .detach = mp__u_detach,
    .start_read = mp__u_start_read,
    .start_write = mp__u_start_write,
    .arm_accept = mp__u_arm_accept,
    .share_accept = mp__u_share_accept,
    .poll_arm = mp__u_poll_arm,
    .flush = mp__u_flush,
    .wait = mp__u_wait,
    .wake = mp__u_wake,
    .export_fd = mp__u_export_fd,
    .buf_setup = mp__u_bufring_setup,
    .buf_release = mp__u_buf_release,
    .close_direct = mp__u_close_direct,
    .ready = mp__u_ready,
    .epoll_ctl = mp__u_fepoll_ctl,
    .epoll_wait = mp__u_fepoll_wait,
    .close_fd = mp__u_close_fd,
    .close_later = mp__u_close_later,
};
