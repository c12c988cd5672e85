/*
 * uring/compat.h — the gaps between the kernels we run on and Debian's liburing 2.3: opcodes
 * and flags newer than its headers (used only after probing), a helper it declares but does
 * not export, and a prep helper whose encoding it gets wrong.  One place, so that a newer
 * liburing shrinks this file and nothing else.
 */
#ifndef MP_URING_COMPAT_H
#define MP_URING_COMPAT_H

#include <liburing.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Newer than Debian's liburing 2.3 headers: defined here, used only when probed. */
#ifndef IORING_OP_FIXED_FD_INSTALL
#define IORING_OP_FIXED_FD_INSTALL 54
#endif
#ifndef IORING_OP_EPOLL_WAIT
#define IORING_OP_EPOLL_WAIT 59 /* Linux 6.15 */
#endif
#ifndef IORING_CQE_F_SOCK_NONEMPTY
#define IORING_CQE_F_SOCK_NONEMPTY (1U << 2)
#endif
#ifndef IORING_ACCEPT_DONTWAIT
#define IORING_ACCEPT_DONTWAIT (1U << 1) /* Linux 6.10: an accept that never waits */
#endif
#ifndef IORING_FEAT_MIN_TIMEOUT
#define IORING_FEAT_MIN_TIMEOUT (1U << 15) /* getevents_arg.min_wait_usec (the old pad) */
#endif

/* liburing 2.3 declares io_uring_enable_rings() but does not export it. */
static inline int mpu_enable_rings(struct io_uring *ring) {
    return (int)syscall(__NR_io_uring_register, ring->ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
}

/* A one-shot accept into a free direct-descriptor slot the kernel picks.  liburing 2.3's
 * io_uring_prep_accept_direct() stores file_index + 1, which wraps IORING_FILE_INDEX_ALLOC to 0
 * ("no slot"): set the field ourselves. */
static inline void mpu_prep_accept_direct_alloc(struct io_uring_sqe *sqe, int fd,
                                                struct sockaddr *addr, socklen_t *addrlen) {
    io_uring_prep_accept(sqe, fd, addr, addrlen, 0);
    sqe->file_index = IORING_FILE_INDEX_ALLOC;
}

#endif
