// test_fepoll.cc — foreign epoll sets (mp_epoll_ctl / mp_epoll_wait): an epoll set the
// application made, served through the channel on both engines.  On io_uring with
// IORING_OP_EPOLL_WAIT, interest changes are queued and a wait is one system call; the tests
// check that, epoll's semantics (level, one-shot), timeouts, signals (EINTR, and the caller's
// array untouched after the call returns), refused requests, and that the channel's own
// completions keep flowing during such a wait.
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstring>

#include "test_util.h"

using namespace mpt;

namespace {

struct Fepoll : ::testing::Test {
    Channel ch;
    Fd ep;
    void SetUp() override {
        mp_options o = opts();
        ch.reset(mp_create(&o));
        ASSERT_NE(ch.get(), nullptr) << strerror(errno);
        ep.reset(epoll_create1(EPOLL_CLOEXEC));
        ASSERT_TRUE(ep.ok());
    }
    mp_stats stats() {
        mp_stats st;
        mp_get_stats(ch, &st);
        return st;
    }
    // Queued requests and one wait in one system call: io_uring with IORING_OP_EPOLL_WAIT.
    bool one_call() {
        mp_stats st = stats();
        return is_uring(ch) && (st.features & MP_FEAT_EPOLL_WAIT);
    }
    int add(int fd, uint32_t events, uint64_t data, int op = EPOLL_CTL_ADD) {
        epoll_event ev{};
        ev.events = events;
        ev.data.u64 = data;
        return mp_epoll_ctl(ch, ep.get(), op, fd, &ev);
    }
};

volatile sig_atomic_t g_sigs;
void on_usr1(int) { g_sigs = g_sigs + 1; }

} // namespace

TEST_F(Fepoll, BadArguments) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    epoll_event ev{}, out[4];
    ev.events = EPOLLIN;
    EXPECT_EQ(mp_epoll_ctl(nullptr, ep.get(), EPOLL_CTL_ADD, p.a.get(), &ev), -EBADF);
    EXPECT_EQ(mp_epoll_ctl(ch, ep.get(), 77, p.a.get(), &ev), -EINVAL);
    EXPECT_EQ(mp_epoll_ctl(ch, ep.get(), EPOLL_CTL_ADD, p.a.get(), nullptr), -EFAULT);
    EXPECT_EQ(mp_epoll_ctl(ch, -1, EPOLL_CTL_ADD, p.a.get(), &ev), -EBADF);
    EXPECT_EQ(mp_epoll_wait(nullptr, ep.get(), out, 4, 0, nullptr), -EBADF);
    EXPECT_EQ(mp_epoll_wait(ch, ep.get(), out, 0, 0, nullptr), -EINVAL);
    EXPECT_EQ(mp_epoll_wait(ch, ep.get(), nullptr, 4, 0, nullptr), -EFAULT);
    EXPECT_EQ(mp_epoll_wait(ch, -1, out, 4, 0, nullptr), -EBADF);
    // Not an epoll fd, blocking and not: the kernel's answer, no hang.
    EXPECT_EQ(mp_epoll_wait(ch, p.a.get(), out, 4, 0, nullptr), -EINVAL);
    EXPECT_EQ(mp_epoll_wait(ch, p.a.get(), out, 4, 1000000000, nullptr), -EINVAL);
    // A closed epoll fd.
    int dead = epoll_create1(EPOLL_CLOEXEC);
    ::close(dead);
    EXPECT_EQ(mp_epoll_wait(ch, dead, out, 4, 1000000000, nullptr), -EBADF);
}

TEST_F(Fepoll, QueuedAddAndWaitAreOneSystemCall) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_EQ(::write(p.b.get(), "x", 1), 1);
    // Warm up: the first submission enables the ring and registers its fd (two calls, once).
    epoll_event out[4];
    Pair q;
    ASSERT_TRUE(tcp_pair(q));
    ASSERT_EQ(add(q.a.get(), EPOLLOUT, 1), 0);
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 1000000000LL, nullptr), 1);
    ASSERT_EQ(add(q.a.get(), 0, 1, EPOLL_CTL_MOD), 0);
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 0, nullptr), 0);
    uint64_t before = stats().syscalls;
    ASSERT_EQ(add(p.a.get(), EPOLLIN, 42), 0);
    if (one_call()) {
        EXPECT_EQ(stats().syscalls, before) << "a queued ctl made a system call";
    }
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 2000000000LL, nullptr), 1);
    EXPECT_EQ(out[0].data.u64, 42u);
    EXPECT_TRUE(out[0].events & EPOLLIN);
    mp_stats st = stats();
    EXPECT_EQ(st.epoll_waits, 3u);
    EXPECT_EQ(st.epoll_ctls, 3u);
    EXPECT_EQ(st.syscalls - before, one_call() ? 1u : 2u);
    // Level-triggered: reported again while readable.
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 0, nullptr), 1);
    EXPECT_EQ(out[0].data.u64, 42u);
}

TEST_F(Fepoll, ManyQueuedChangesOneWait) {
    constexpr int N = 100;
    std::vector<Pair> ps(N);
    for (auto &p : ps) ASSERT_TRUE(tcp_pair(p));
    for (int i = 0; i < N; i++) ASSERT_EQ(::write(ps[i].b.get(), "y", 1), 1);
    uint64_t before = stats().syscalls;
    for (int i = 0; i < N; i++) ASSERT_EQ(add(ps[i].a.get(), EPOLLIN, 1000 + i), 0);
    std::vector<epoll_event> out(2 * N);
    std::vector<bool> seen(N);
    int got = 0;
    for (auto dl = deadline_in(5000); got < N && std::chrono::steady_clock::now() < dl;) {
        int n = mp_epoll_wait(ch, ep.get(), out.data(), (int)out.size(), 1000000000LL, nullptr);
        ASSERT_GT(n, 0) << strerror(-n);
        for (int i = 0; i < n; i++) {
            uint64_t k = out[i].data.u64 - 1000;
            ASSERT_LT(k, (uint64_t)N);
            if (!seen[k]) got++;
            seen[k] = true;
        }
    }
    EXPECT_EQ(got, N);
    // io_uring: the changes went in batches (MP_BATCH), not one system call each.
    if (one_call()) {
        EXPECT_LT(stats().syscalls - before, 12u);
    }
}

TEST_F(Fepoll, TimeoutsAndOneShot) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    epoll_event out[4];
    ASSERT_EQ(add(p.a.get(), EPOLLIN | EPOLLONESHOT, 7), 0);
    auto t0 = std::chrono::steady_clock::now();
    EXPECT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 0, nullptr), 0);
    EXPECT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 60 * 1000000LL, nullptr), 0);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::steady_clock::now() - t0).count();
    EXPECT_GE(ms, 55);
    EXPECT_LT(ms, 2000);
    ASSERT_EQ(::write(p.b.get(), "z", 1), 1);
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 2000000000LL, nullptr), 1);
    EXPECT_EQ(out[0].data.u64, 7u);
    EXPECT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 20 * 1000000LL, nullptr), 0) << "one-shot";
    ASSERT_EQ(add(p.a.get(), EPOLLIN | EPOLLONESHOT, 8, EPOLL_CTL_MOD), 0); // re-armed, queued
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 0, nullptr), 1);
    EXPECT_EQ(out[0].data.u64, 8u);
}

TEST_F(Fepoll, SignalInterruptsAndArrayIsLeftAlone) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    struct sigaction sa{}, old{};
    sa.sa_handler = on_usr1; // no SA_RESTART
    sigaction(SIGUSR1, &sa, &old);
    sigset_t block, prev, during;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &block, &prev);
    during = prev;
    sigdelset(&during, SIGUSR1);
    ASSERT_EQ(add(p.a.get(), EPOLLIN, 5), 0); // queued: goes in with the wait
    g_sigs = 0;
    pthread_t self = pthread_self();
    Joiner killer([self] {
        std::this_thread::sleep_for(std::chrono::milliseconds(80));
        pthread_kill(self, SIGUSR1);
    });
    epoll_event out[4];
    memset(out, 0xab, sizeof out);
    int n = mp_epoll_wait(ch, ep.get(), out, 4, -1, &during);
    killer.join();
    EXPECT_EQ(n, -EINTR);
    EXPECT_EQ(g_sigs, 1);
    // The wait was taken back: readiness now must not land in the caller's array.
    ASSERT_EQ(::write(p.b.get(), "s", 1), 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    unsigned char *raw = reinterpret_cast<unsigned char *>(out);
    for (size_t i = 0; i < sizeof out; i++) ASSERT_EQ(raw[i], 0xab) << "written at byte " << i;
    // ... and the set still works (the queued ADD did reach the kernel).
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 2000000000LL, &during), 1);
    EXPECT_EQ(out[0].data.u64, 5u);
    // A signal blocked during the wait does not interrupt it.
    Joiner k2([self] {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        pthread_kill(self, SIGUSR1);
    });
    char c;
    ASSERT_EQ(::read(p.a.get(), &c, 1), 1);
    EXPECT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 100 * 1000000LL, &block), 0);
    k2.join();
    EXPECT_EQ(g_sigs, 1);
    pthread_sigmask(SIG_SETMASK, &prev, nullptr); // the pending signal runs its handler now
    EXPECT_EQ(g_sigs, 2);
    sigaction(SIGUSR1, &old, nullptr);
}

TEST_F(Fepoll, RefusedRequests) {
    // A regular file cannot be watched: EPERM, at once (synchronous form) or as one
    // EPOLLERR|EPOLLHUP event with the request's data (queued form).
    char path[] = "/tmp/mp-fepoll-XXXXXX";
    Fd file(mkstemp(path));
    ASSERT_TRUE(file.ok());
    unlink(path);
    epoll_event out[4];
    int r = add(file.get(), EPOLLIN, 99);
    if (r == 0) {
        ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 0, nullptr), 1);
        EXPECT_EQ(out[0].data.u64, 99u);
        EXPECT_EQ(out[0].events, (uint32_t)(EPOLLERR | EPOLLHUP));
        EXPECT_EQ(stats().epoll_ctl_failed, 1u);
    } else {
        EXPECT_EQ(r, -EPERM);
    }
    EXPECT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 0, nullptr), 0) << "reported once";
    // A DEL of an fd that was closed: counted, never reported (its data may be freed).
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_EQ(add(p.a.get(), EPOLLIN, 3), 0);
    ASSERT_GE(mp_flush(ch), 0); // submitted
    p.a.reset();
    r = mp_epoll_ctl(ch, ep.get(), EPOLL_CTL_DEL, 1 << 20, nullptr);
    EXPECT_TRUE(r == 0 || r == -EBADF) << r;
    EXPECT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 10 * 1000000LL, nullptr), 0);
}

TEST_F(Fepoll, ChannelCompletionsFlowDuringTheWait) {
    Pair conn, other;
    ASSERT_TRUE(tcp_pair(conn));
    ASSERT_TRUE(tcp_pair(other));
    mp_handle *h = mp_register(ch, conn.a.get(), nullptr, nullptr);
    ASSERT_NE(h, nullptr) << strerror(errno);
    char buf[16];
    ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
    ASSERT_EQ(add(other.a.get(), EPOLLIN, 11), 0);
    ASSERT_GE(mp_flush(ch), 0); // nothing queued: the wait must still look after the read
    Joiner peer([&] {
        ::write(conn.b.get(), "data", 4); // completes the channel's read first
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        ::write(other.b.get(), "e", 1);   // then the foreign set's fd
    });
    epoll_event out[4];
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 3000000000LL, nullptr), 1);
    EXPECT_EQ(out[0].data.u64, 11u);
    peer.join();
    mp_event ev;
    int got = 0;
    for (auto dl = deadline_in(2000); !got && std::chrono::steady_clock::now() < dl;)
        if (mp_dispatch(ch, &ev, 100) == 0 && ev.cmd == MP_EV_READ) got = 1;
    ASSERT_EQ(got, 1);
    EXPECT_EQ(ev.result, 4);
    EXPECT_EQ(memcmp(buf, "data", 4), 0);
    mp_unregister(h);
}

TEST_F(Fepoll, OtherThreadIsRefused) {
    epoll_event out[1];
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 1, 0, nullptr), 0); // this thread owns it
    int r1 = 0, r2 = 0;
    Joiner t([&] {
        epoll_event ev{};
        ev.events = EPOLLIN;
        r1 = mp_epoll_ctl(ch, ep.get(), EPOLL_CTL_ADD, 0, &ev);
        r2 = mp_epoll_wait(ch, ep.get(), out, 1, 0, nullptr);
    });
    t.join();
    EXPECT_EQ(r1, -EPERM);
    EXPECT_EQ(r2, -EPERM);
}

TEST_F(Fepoll, BlockingWaitWithQueuedChangesIsOneSystemCall) {
    // The queued changes' own completions must not end the wait (they post none on success),
    // nor may the previous wait's timeout: each round is one io_uring_enter().
    epoll_event out[4];
    Pair q;
    ASSERT_TRUE(tcp_pair(q));
    ASSERT_EQ(add(q.a.get(), EPOLLOUT, 1), 0); // warm-up: ring enabled, fd registered
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 1000000000LL, nullptr), 1);
    ASSERT_EQ(mp_epoll_ctl(ch, ep.get(), EPOLL_CTL_DEL, q.a.get(), nullptr), 0);
    for (int round = 0; round < 3; round++) {
        Pair p;
        ASSERT_TRUE(tcp_pair(p));
        uint64_t before = stats().syscalls;
        ASSERT_EQ(add(p.a.get(), EPOLLIN, 100 + round), 0);
        Joiner w([&] {
            std::this_thread::sleep_for(std::chrono::milliseconds(40));
            ::write(p.b.get(), "w", 1);
        });
        int n = mp_epoll_wait(ch, ep.get(), out, 4, 5000000000LL, nullptr);
        w.join();
        ASSERT_EQ(n, 1) << "round " << round;
        EXPECT_EQ(out[0].data.u64, (uint64_t)(100 + round));
        if (one_call()) {
            EXPECT_EQ(stats().syscalls - before, 1u) << "round " << round;
        }
        ASSERT_EQ(mp_epoll_ctl(ch, ep.get(), EPOLL_CTL_DEL, p.a.get(), nullptr), 0);
        ASSERT_GE(mp_flush(ch), 0);
    }
    // A wait that times out costs one more call (its request is cancelled), no more; the
    // wait after it is one call again.
    for (int round = 0; round < 2; round++) {
        uint64_t before = stats().syscalls;
        ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 30 * 1000000LL, nullptr), 0);
        if (one_call()) {
            EXPECT_LE(stats().syscalls - before, 2u) << "timeout round " << round;
        }
    }
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_EQ(add(p.a.get(), EPOLLIN, 200), 0);
    Joiner w([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(40));
        ::write(p.b.get(), "w", 1);
    });
    uint64_t before = stats().syscalls;
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 5000000000LL, nullptr), 1);
    EXPECT_EQ(out[0].data.u64, 200u);
    if (one_call()) {
        EXPECT_EQ(stats().syscalls - before, 1u) << "after timeouts";
    }
}

TEST_F(Fepoll, CloseWithQueuedChanges) {
    EXPECT_EQ(mp_close(nullptr, 0), -EBADF);
    EXPECT_EQ(mp_close(ch, -1), -EBADF);
    int dead = ::dup(0);
    ::close(dead);
    EXPECT_EQ(mp_close(ch, dead), -EBADF);
    epoll_event out[4];
    Pair q;
    ASSERT_TRUE(tcp_pair(q)); // warm-up (ring enabled, fd registered)
    ASSERT_EQ(add(q.a.get(), EPOLLOUT, 1), 0);
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 1000000000LL, nullptr), 1);
    // The DEL and the close in one call; the number is free when mp_close returns.
    ASSERT_EQ(mp_epoll_ctl(ch, ep.get(), EPOLL_CTL_DEL, q.a.get(), nullptr), 0);
    uint64_t before = stats().syscalls;
    int fd = q.a.release();
    EXPECT_EQ(mp_close(ch, fd), 0);
    if (one_call()) {
        EXPECT_EQ(stats().syscalls - before, 1u);
    }
    EXPECT_EQ(fcntl(fd, F_GETFD), -1);
    EXPECT_EQ(errno, EBADF);
    // The peer sees the close.
    char c;
    EXPECT_EQ(::read(q.b.get(), &c, 1), 0);
    EXPECT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 0, nullptr), 0);
    EXPECT_EQ(stats().epoll_ctl_failed, 0u);
}

// MP_EPOLL_WAIT_CHANNEL: a completion of the channel's own handle ends a blocking wait on the
// foreign set (which has nothing ready), with 0 events and no EINTR; an mp_wake() from another
// thread does too; without the flag the same completion does not end it.
TEST_F(Fepoll, ChannelEventsEndTheWaitWithTheFlag) {
    Pair conn, other;
    ASSERT_TRUE(tcp_pair(conn));
    ASSERT_TRUE(tcp_pair(other));
    ASSERT_EQ(add(other.a.get(), EPOLLIN, 5), 0);
    mp_handle *h = mp_register(ch, conn.a.get(), nullptr, nullptr);
    ASSERT_NE(h, nullptr) << strerror(errno);
    char buf[16];
    ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
    epoll_event out[4];
    EXPECT_EQ(mp_epoll_wait_flags(ch, ep.get(), out, 4, 0, nullptr, 0x80), -EINVAL);
    if (is_uring(ch) && !(stats().features & MP_FEAT_EPOLL_WAIT)) {
        EXPECT_EQ(mp_epoll_wait_flags(ch, ep.get(), out, 4, -1, nullptr, MP_EPOLL_WAIT_CHANNEL),
                  -ENOTSUP);
        mp_unregister(h);
        return;
    }
    auto t0 = std::chrono::steady_clock::now();
    Joiner peer([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        ::write(conn.b.get(), "data", 4);
    });
    int n = mp_epoll_wait_flags(ch, ep.get(), out, 4, 5000000000LL, nullptr, MP_EPOLL_WAIT_CHANNEL);
    auto took = std::chrono::steady_clock::now() - t0;
    peer.join();
    EXPECT_EQ(n, 0);
    EXPECT_LT(took, std::chrono::milliseconds(4000)); // ended by the read, not the timeout
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 1);
    EXPECT_EQ(ev.cmd, MP_EV_READ);
    EXPECT_EQ(ev.result, 4);
    // Events already queued: the wait does not block at all.
    ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
    ::write(conn.b.get(), "more", 4);
    ::write(other.b.get(), "x", 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    n = mp_epoll_wait_flags(ch, ep.get(), out, 4, 5000000000LL, nullptr, MP_EPOLL_WAIT_CHANNEL);
    if (n == 0) // the read's completion ended it first; the set's fd is still ready
        n = mp_epoll_wait_flags(ch, ep.get(), out, 4, 5000000000LL, nullptr, MP_EPOLL_WAIT_CHANNEL);
    ASSERT_EQ(n, 1);
    EXPECT_EQ(out[0].data.u64, 5u);
    ASSERT_EQ(mp_dispatch(ch, &ev, 1000), 1);
    EXPECT_EQ(ev.cmd, MP_EV_READ);
    char c;
    ASSERT_EQ(::read(other.a.get(), &c, 1), 1);
    // mp_wake() from another thread ends it.
    t0 = std::chrono::steady_clock::now();
    Joiner waker([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        mp_wake(ch);
    });
    n = mp_epoll_wait_flags(ch, ep.get(), out, 4, 5000000000LL, nullptr, MP_EPOLL_WAIT_CHANNEL);
    waker.join();
    EXPECT_EQ(n, 0);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(4000));
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 1);
    EXPECT_EQ(ev.cmd, MP_EV_WAKE);
    // Without the flag a completion of the channel does not end the wait: the timeout does.
    ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
    Joiner late([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        ::write(conn.b.get(), "late", 4);
    });
    t0 = std::chrono::steady_clock::now();
    n = mp_epoll_wait(ch, ep.get(), out, 4, 300000000LL, nullptr);
    late.join();
    EXPECT_EQ(n, 0);
    EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(250));
    mp_unregister(h);
}

// A wait that must not block with changes to hand over: one system call, which hands them over
// and returns what is ready at once (the wait and its cancellation in one submission), and the
// next wait is not disturbed by that cancellation.
TEST_F(Fepoll, NonBlockingWaitWithQueuedChangesIsOneCall) {
    Pair p, q;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_TRUE(tcp_pair(q));
    epoll_event out[4];
    ASSERT_EQ(add(q.a.get(), EPOLLIN, 8), 0); // nothing to read on q
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 0, nullptr), 0); // warm up (ring enabled)
    ASSERT_EQ(::write(p.b.get(), "x", 1), 1);
    ASSERT_EQ(add(p.a.get(), EPOLLIN, 7), 0);
    uint64_t before = stats().syscalls;
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 0, nullptr), 1);
    EXPECT_EQ(out[0].data.u64, 7u);
    if (one_call()) {
        EXPECT_EQ(stats().syscalls - before, 1u);
    }
    ASSERT_EQ(add(p.a.get(), 0, 7, EPOLL_CTL_MOD), 0);
    before = stats().syscalls;
    auto t0 = std::chrono::steady_clock::now();
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 0, nullptr), 0);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(500));
    if (one_call()) {
        EXPECT_EQ(stats().syscalls - before, 1u);
    }
    // A blocking wait afterwards still waits for, and gets, q's data.
    Joiner peer([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
        ::write(q.b.get(), "y", 1);
    });
    ASSERT_EQ(mp_epoll_wait(ch, ep.get(), out, 4, 3000000000LL, nullptr), 1);
    EXPECT_EQ(out[0].data.u64, 8u);
}
