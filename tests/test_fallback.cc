// Engine fallback: when io_uring cannot be set up (seccomp EPERM/ENOSYS, as under a container
// policy or kernel.io_uring_disabled), MP_ENGINE=auto falls back to epoll and says so in the
// statistics; MP_ENGINE=uring fails with the kernel's errno.  Each case runs in a forked child
// because a seccomp filter cannot be removed.
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "megapipe.h"
#include "test_util.h"

namespace {

// Deny io_uring_setup with the given errno; allow everything else.
int deny_io_uring(int err) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (unsigned)(err & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {(unsigned short)(sizeof f / sizeof f[0]), f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return -1;
    return (int)syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

// Runs fn in a child with io_uring denied by err; returns the child's exit code.
template <typename F> int in_child(int err, F fn) {
    pid_t pid = fork();
    if (pid == 0) {
        if (deny_io_uring(err) < 0) _exit(90);
        _exit(fn());
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status);
}

int auto_falls_back() {
    mp_options o = mpt::opts();
    o.engine = MP_ENGINE_AUTO;
    mp_channel *ch = mp_create(&o);
    if (!ch) return 1;
    mp_stats st;
    mp_get_stats(ch, &st);
    int rc = 0;
    if (std::string(mp_engine_name(ch)) != "epoll") rc = 2;
    else if (!(st.fallbacks & MP_FALLBACK_EPOLL_ENGINE)) rc = 3;
    else {
        // and it works: a wake round trip through the fallback engine
        mp_event ev;
        mp_wake(ch);
        if (mp_dispatch(ch, &ev, 1000) != 1 || ev.cmd != MP_EV_WAKE) rc = 4;
    }
    mp_destroy(ch);
    return rc;
}

int uring_only_fails(int err) {
    mp_options o = mpt::opts();
    o.engine = MP_ENGINE_URING;
    mp_channel *ch = mp_create(&o);
    if (ch) {
        mp_destroy(ch);
        return 1;
    }
    return errno == err ? 0 : 2;
}

}  // namespace

TEST(Fallback, SeccompEpermFallsBackToEpoll) {
    EXPECT_EQ(in_child(EPERM, auto_falls_back), 0);
}

TEST(Fallback, SeccompEnosysFallsBackToEpoll) {
    EXPECT_EQ(in_child(ENOSYS, auto_falls_back), 0);
}

TEST(Fallback, UringOnlyReportsTheKernelsErrno) {
    EXPECT_EQ(in_child(EPERM, [] { return uring_only_fails(EPERM); }), 0);
    EXPECT_EQ(in_child(ENOSYS, [] { return uring_only_fails(ENOSYS); }), 0);
}

TEST(Fallback, EnvironmentSelectsEngine) {
    // MP_ENGINE is set by ctest for the whole suite; an explicit option overrides it.
    mp_options o;
    mp_options_init(&o);
    o.engine = MP_ENGINE_EPOLL;
    mp_channel *ch = mp_create(&o);
    ASSERT_NE(ch, nullptr);
    EXPECT_STREQ(mp_engine_name(ch), "epoll");
    mp_destroy(ch);
}
