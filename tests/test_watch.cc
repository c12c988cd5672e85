// test_watch.cc — the readiness set (mp_watch / mp_unwatch): epoll's semantics on both engines
// and the io_uring forms (MP_READINESS=epoll, the default; MP_READINESS=poll, run by ctest
// as "uring_poll."; MP_READINESS=epoll-ring, "uring_ering."): one event per fd per dispatch,
// merging, one-shot, close and fd reuse, and interest changes from threads that do not wait.
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include "test_util.h"

using namespace mpt;

namespace {

struct Watch : ::testing::Test {
    Channel ch;
    void SetUp() override {
        mp_options o = opts();
        ch.reset(mp_create(&o));
        ASSERT_NE(ch.get(), nullptr) << strerror(errno);
    }
    std::string mode() {
        mp_stats st;
        mp_get_stats(ch, &st);
        return st.readiness;
    }
    // Every event one mp_dispatch_batch call hands out within timeout_ms.
    std::vector<mp_event> one_dispatch(int timeout_ms) {
        mp_event evs[64];
        int n = mp_dispatch_batch(ch, evs, 64, timeout_ms);
        EXPECT_GE(n, 0) << strerror(-n);
        return std::vector<mp_event>(evs, evs + (n > 0 ? n : 0));
    }
    static int polls_of(const std::vector<mp_event> &v, int fd) {
        int k = 0;
        for (auto &e : v)
            if (e.cmd == MP_EV_POLL && e.u.poll.fd == fd) k++;
        return k;
    }
};

int cookie_of(const mp_event &ev) { return (int)(intptr_t)ev.cookie; }

} // namespace

TEST_F(Watch, ModeIsReported) {
    std::string m = mode();
    const char *want = getenv("MP_READINESS");
    bool poll = is_uring(ch) && want && !strcmp(want, "poll");
    EXPECT_EQ(m, poll ? "poll" : "epoll");
}

TEST_F(Watch, BadArguments) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    EXPECT_EQ(mp_watch(nullptr, p.a.get(), EPOLLIN, 0, nullptr), -EBADF);
    EXPECT_EQ(mp_watch(ch, -1, EPOLLIN, 0, nullptr), -EBADF);
    EXPECT_EQ(mp_watch(ch, p.a.get(), EPOLLIN | 0x100000u, 0, nullptr), -EINVAL);
    EXPECT_EQ(mp_watch(ch, p.a.get(), EPOLLIN, 0x80, nullptr), -EINVAL);
    EXPECT_EQ(mp_unwatch(ch, p.a.get()), -ENOENT);
    int closed = dup(p.a.get());
    ASSERT_GE(closed, 0);
    close(closed);
    EXPECT_EQ(mp_watch(ch, closed, EPOLLIN, 0, nullptr), -EBADF);
    EXPECT_EQ(mp_watch(ch, p.a.get(), EPOLLIN, 0, nullptr), 0);
    EXPECT_EQ(mp_unwatch(ch, p.a.get()), 0);
    EXPECT_EQ(mp_unwatch(ch, p.a.get()), -ENOENT); // double unwatch
}

// Level-triggered: unread data is reported once per dispatch call, never twice in one.
TEST_F(Watch, LevelOncePerDispatch) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_EQ(mp_watch(ch, p.a.get(), EPOLLIN, 0, (void *)7), 0);
    ASSERT_TRUE(write_all(p.b.get(), "x", 1));
    int total = 0;
    for (int round = 0; round < 5; round++) {
        auto v = one_dispatch(round == 0 ? 2000 : 500);
        int k = polls_of(v, p.a.get());
        EXPECT_EQ(k, 1) << "round " << round; // still readable: reported again, once
        for (auto &e : v)
            if (e.cmd == MP_EV_POLL) {
                EXPECT_EQ(cookie_of(e), 7);
                EXPECT_TRUE(e.u.poll.revents & EPOLLIN);
                EXPECT_EQ(e.result, (ssize_t)e.u.poll.revents);
            }
        total += k;
    }
    EXPECT_EQ(total, 5);
    drain(p.a.get());
    auto v = one_dispatch(200);
    EXPECT_EQ(polls_of(v, p.a.get()), 0); // drained: quiet
}

// Edge-triggered: two arrivals before the application looks are one event (merged), and old
// data is not reported again.
TEST_F(Watch, EdgeMergesUntakenEvents) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_EQ(mp_watch(ch, p.a.get(), EPOLLIN, MP_POLL_ET, nullptr), 0);
    EXPECT_EQ(polls_of(one_dispatch(50), p.a.get()), 0); // armed, nothing to report
    for (int i = 0; i < 4; i++) {
        ASSERT_TRUE(write_all(p.b.get(), "y", 1));
        sleep_ms(20);
        mp_flush(ch); // the kernel reports each arrival; nothing is handed out yet
    }
    auto v = one_dispatch(2000);
    EXPECT_EQ(polls_of(v, p.a.get()), 1);
    v = one_dispatch(200);
    EXPECT_EQ(polls_of(v, p.a.get()), 0) << "old data reported again by an edge watch";
    ASSERT_TRUE(write_all(p.b.get(), "z", 1));
    v = one_dispatch(2000);
    EXPECT_EQ(polls_of(v, p.a.get()), 1) << "new data not reported";
}

TEST_F(Watch, OneShotUntilRearmed) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_TRUE(write_all(p.b.get(), "x", 1));
    ASSERT_EQ(mp_watch(ch, p.a.get(), EPOLLIN, MP_POLL_ONESHOT, (void *)1), 0);
    auto v = one_dispatch(2000);
    EXPECT_EQ(polls_of(v, p.a.get()), 1);
    for (int i = 0; i < 3; i++) {
        v = one_dispatch(150);
        EXPECT_EQ(polls_of(v, p.a.get()), 0) << "one-shot watch reported twice";
    }
    ASSERT_EQ(mp_watch(ch, p.a.get(), EPOLLIN, MP_POLL_ONESHOT, (void *)2), 0); // re-arm
    v = one_dispatch(2000);
    ASSERT_EQ(polls_of(v, p.a.get()), 1);
    EXPECT_EQ(cookie_of(v[0]), 2);
    v = one_dispatch(150);
    EXPECT_EQ(polls_of(v, p.a.get()), 0);
}

TEST_F(Watch, RdhupAndInterestChange) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_EQ(mp_watch(ch, p.a.get(), EPOLLOUT, 0, nullptr), 0);
    auto v = one_dispatch(2000);
    ASSERT_EQ(polls_of(v, p.a.get()), 1);
    EXPECT_TRUE(v[0].u.poll.revents & EPOLLOUT);
    ASSERT_EQ(mp_watch(ch, p.a.get(), EPOLLRDHUP, 0, nullptr), 0); // writable no longer wanted
    v = one_dispatch(200);
    EXPECT_EQ(polls_of(v, p.a.get()), 0);
    shutdown(p.b.get(), SHUT_WR);
    v = one_dispatch(2000);
    ASSERT_EQ(polls_of(v, p.a.get()), 1);
    EXPECT_TRUE(v[0].u.poll.revents & EPOLLRDHUP);
    EXPECT_FALSE(v[0].u.poll.revents & EPOLLOUT);
}

// Unwatch drops an event that is queued and not yet handed out.
TEST_F(Watch, UnwatchDropsQueuedEvent) {
    Pair p, q;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_TRUE(tcp_pair(q));
    ASSERT_EQ(mp_watch(ch, p.a.get(), EPOLLIN, 0, nullptr), 0);
    ASSERT_EQ(mp_watch(ch, q.a.get(), EPOLLIN, 0, nullptr), 0);
    ASSERT_TRUE(write_all(p.b.get(), "x", 1));
    ASSERT_TRUE(write_all(q.b.get(), "x", 1));
    sleep_ms(20);
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 2000), 1); // one handed out, the other queued
    ASSERT_EQ(ev.cmd, MP_EV_POLL);
    int other = ev.u.poll.fd == p.a.get() ? q.a.get() : p.a.get();
    ASSERT_EQ(mp_unwatch(ch, other), 0);
    for (auto &e : collect(ch, 200))
        EXPECT_FALSE(e.cmd == MP_EV_POLL && e.u.poll.fd == other) << "event after unwatch";
}

// Closing a watched fd without unwatching: with an epoll set the file really closes (the peer
// sees EOF); a number reused at once and watched again reports for the new file only.
TEST_F(Watch, CloseAndReuseOfTheNumber) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    int fd = p.a.get();
    ASSERT_EQ(mp_watch(ch, fd, EPOLLIN, 0, (void *)1), 0);
    one_dispatch(50);
    Pair n;
    ASSERT_TRUE(tcp_pair(n));
    close(p.a.release());
    if (mode() == "epoll") {
        EXPECT_TRUE(sees_eof(p.b.get(), 2000)) << "the set kept the file open";
    }
    ASSERT_EQ(dup2(n.a.get(), fd), fd); // the old number names the new connection now
    Fd nfd(fd);
    ASSERT_EQ(mp_watch(ch, fd, EPOLLIN, 0, (void *)2), 0); // same number, new file
    for (auto &e : one_dispatch(100)) EXPECT_NE(e.cmd, MP_EV_POLL) << describe(e);
    ASSERT_TRUE(write_all(n.b.get(), "x", 1));
    auto v = one_dispatch(2000);
    ASSERT_EQ(polls_of(v, fd), 1);
    EXPECT_EQ(cookie_of(v[0]), 2);
    ASSERT_EQ(mp_unwatch(ch, fd), 0);
}

// Interest changes from a thread that does not wait: the owner, blocked in mp_dispatch, is
// woken and reports; no MP_EV_WAKE is delivered for it; mp_wake() still is one.
TEST_F(Watch, ChangesFromAnotherThread) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_TRUE(write_all(p.b.get(), "x", 1));
    mp_event first;
    ASSERT_EQ(mp_dispatch(ch, &first, 0), 0); // the owner is this thread
    int fd = p.a.get();
    std::thread t([&] {
        sleep_ms(100);
        EXPECT_EQ(mp_watch(ch, fd, EPOLLIN, MP_POLL_ONESHOT, (void *)9), 0);
        EXPECT_EQ(mp_unwatch(ch, fd + 1000), -ENOENT);
    });
    int64_t t0 = now_ms();
    mp_event ev;
    int n = mp_dispatch(ch, &ev, 5000);
    int64_t took = now_ms() - t0;
    t.join();
    ASSERT_EQ(n, 1);
    EXPECT_EQ(ev.cmd, MP_EV_POLL) << describe(ev);
    EXPECT_EQ(cookie_of(ev), 9);
    EXPECT_LT(took, 2000);
    mp_stats st;
    mp_get_stats(ch, &st);
    EXPECT_GE(st.watch_remote, 1u);
    // removal from another thread: nothing more is reported (level data still unread)
    std::thread t2([&] { EXPECT_EQ(mp_unwatch(ch, fd), 0); });
    t2.join();
    ASSERT_EQ(mp_watch(ch, p.b.get(), 0, 0, nullptr), -ENOENT);
    for (auto &e : collect(ch, 200)) EXPECT_NE(e.cmd, MP_EV_POLL) << describe(e);
    std::thread t3([&] { EXPECT_EQ(mp_wake(ch), 0); });
    t3.join();
    ASSERT_EQ(mp_dispatch(ch, &ev, 2000), 1);
    EXPECT_EQ(ev.cmd, MP_EV_WAKE);
}

// Many threads change interest while the owner dispatches: once they are done, every watch
// they left wanted reports, with its own cookie.
TEST_F(Watch, ConcurrentChanges) {
    Pairs ps;
    const int N = 64;
    ASSERT_TRUE(make_pairs(N, &ps));
    mp_event evs[64];
    ASSERT_EQ(mp_dispatch_batch(ch, evs, 64, 0), 0); // the owner is this thread
    for (int i = 0; i < N; i++) ASSERT_TRUE(write_all(ps.clients[i], "x", 1));
    std::atomic<int> done{0};
    std::vector<std::thread> ts;
    for (int t = 0; t < 3; t++)
        ts.emplace_back([&, t] {
            for (int r = 0; r < 200; r++)
                for (int i = t; i < N; i += 3) {
                    int fd = ps.servers[i];
                    if (r % 2) mp_unwatch(ch, fd);
                    else mp_watch(ch, fd, EPOLLIN, 0, (void *)(intptr_t)(i + 1));
                }
            for (int i = t; i < N; i += 3) // at the end: all wanted
                EXPECT_EQ(mp_watch(ch, ps.servers[i], EPOLLIN, 0, (void *)(intptr_t)(i + 1)), 0);
            done++;
        });
    while (done < 3) ASSERT_GE(mp_dispatch_batch(ch, evs, 64, 10), 0); // meanwhile: anything
    for (auto &t : ts) t.join();
    std::set<int> seen;
    auto deadline = deadline_in(5000);
    while ((int)seen.size() < N && ms_until(deadline) > 0) {
        int n = mp_dispatch_batch(ch, evs, 64, 50);
        ASSERT_GE(n, 0);
        for (int i = 0; i < n; i++)
            if (evs[i].cmd == MP_EV_POLL) {
                int c = cookie_of(evs[i]);
                ASSERT_TRUE(c >= 1 && c <= N);
                EXPECT_EQ(ps.servers[c - 1], evs[i].u.poll.fd);
                seen.insert(c);
            }
    }
    EXPECT_EQ((int)seen.size(), N);
    mp_stats st;
    mp_get_stats(ch, &st);
    EXPECT_GT(st.watch_remote, 0u);
}

// A watch and a completion registration on one fd (both engines).
TEST_F(Watch, SharesAnFdWithARegistration) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    mp_handle *h = mp_register(ch, p.a.get(), nullptr, nullptr);
    ASSERT_NE(h, nullptr) << strerror(errno);
    ASSERT_EQ(mp_watch(ch, p.a.get(), EPOLLOUT, MP_POLL_ONESHOT, (void *)5), 0);
    char buf[8];
    ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
    ASSERT_TRUE(write_all(p.b.get(), "hi", 2));
    bool got_read = false, got_poll = false;
    pump(ch, 2000, [&](const mp_event &e) {
        if (e.cmd == MP_EV_READ) got_read = e.result == 2;
        if (e.cmd == MP_EV_POLL) got_poll = cookie_of(e) == 5;
        return got_read && got_poll;
    });
    EXPECT_TRUE(got_read);
    EXPECT_TRUE(got_poll);
    EXPECT_EQ(mp_unwatch(ch, p.a.get()), 0);
    EXPECT_EQ(mp_unregister(h), 0);
}

// Forked child: refused, the parent's set untouched.
TEST_F(Watch, ForkedChildIsRefused) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_EQ(mp_watch(ch, p.a.get(), EPOLLIN, 0, nullptr), 0);
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        int r1 = mp_watch(ch, p.a.get(), EPOLLOUT, 0, nullptr);
        int r2 = mp_unwatch(ch, p.a.get());
        _exit(r1 == -EPERM && r2 == -EPERM ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ASSERT_TRUE(write_all(p.b.get(), "x", 1));
    auto v = one_dispatch(2000);
    EXPECT_EQ(polls_of(v, p.a.get()), 1);
}

// Never two events of one fd in the queue: with every level watch ready and the application
// taking one event per call, the channel's fairness rule looks at the kernel again while
// events wait; the set's re-reports merge into the events still queued.
TEST_F(Watch, QueueHoldsOneEventPerFd) {
    Pairs ps;
    const int N = 100;
    ASSERT_TRUE(make_pairs(N, &ps));
    for (int i = 0; i < N; i++) {
        ASSERT_TRUE(write_all(ps.clients[i], "x", 1));
        ASSERT_EQ(mp_watch(ch, ps.servers[i], EPOLLIN, 0, (void *)(intptr_t)(i + 1)), 0);
    }
    sleep_ms(50);
    std::map<int, int> count;
    int max_pending = 0;
    for (int k = 0; k < 400; k++) {
        mp_event ev;
        int n = mp_dispatch(ch, &ev, k == 0 ? 2000 : 100);
        ASSERT_EQ(n, 1) << "at " << k;
        ASSERT_EQ(ev.cmd, MP_EV_POLL) << describe(ev);
        count[cookie_of(ev)]++;
        max_pending = std::max(max_pending, mp_pending(ch));
    }
    EXPECT_LE(max_pending, N + 2) << "an fd had two events queued";
    EXPECT_EQ((int)count.size(), N);
    for (auto &kv : count) EXPECT_GE(kv.second, 2) << "fd of cookie " << kv.first << " starved";
}

// memcached's pattern: a set prepared on one thread (before anyone dispatched) and dispatched
// on another: the dispatching thread becomes the owner and applies what was recorded.
TEST_F(Watch, PreparedOnOneThreadDispatchedOnAnother) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_TRUE(write_all(p.b.get(), "x", 1));
    ASSERT_EQ(mp_watch(ch, p.a.get(), EPOLLIN, 0, (void *)3), 0); // no owner yet: recorded
    int got = -1;
    std::thread worker([&] {
        mp_event ev;
        int n = mp_dispatch(ch, &ev, 2000);
        got = n == 1 && ev.cmd == MP_EV_POLL ? cookie_of(ev) : -n;
        EXPECT_EQ(mp_watch(ch, p.a.get(), EPOLLIN | EPOLLOUT, 0, (void *)4), 0); // the owner now
    });
    worker.join();
    EXPECT_EQ(got, 3);
    mp_event ev;
    EXPECT_EQ(mp_dispatch(ch, &ev, 0), -EPERM); // this thread is not the owner
}

// A program that runs out of descriptors can still watch what it has (libuv's emfile test):
// the set's kernel objects are made with the channel, not at the first watch.
TEST_F(Watch, WatchWithNoDescriptorLeft) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_TRUE(write_all(p.b.get(), "x", 1));
    struct rlimit old;
    ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &old), 0);
    std::vector<int> fill;
    struct rlimit low = old;
    low.rlim_cur = (rlim_t)count_open_fds() + 16;
    ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
    for (int fd; (fd = dup(0)) >= 0;) fill.push_back(fd);
    int err = errno;
    int r = mp_watch(ch, p.a.get(), EPOLLIN, 0, (void *)1);
    mp_event ev;
    int n = r == 0 ? mp_dispatch(ch, &ev, 2000) : r;
    for (int fd : fill) close(fd);
    setrlimit(RLIMIT_NOFILE, &old);
    EXPECT_EQ(err, EMFILE);
    EXPECT_EQ(r, 0) << strerror(-r);
    ASSERT_EQ(n, 1) << strerror(-n);
    EXPECT_EQ(ev.cmd, MP_EV_POLL);
    EXPECT_EQ(cookie_of(ev), 1);
}

// io_uring engine, epoll-set form: a wait with nothing to submit, on a channel whose only
// handles are watches, is an epoll_wait() on the set (mp_stats.set_waits); once a handle with
// requests of its own exists, waits go through the ring again (its completions must end them),
// and back to the set when that handle's CLOSED event is handed out.  MP_READINESS=epoll-ring:
// never on the set.
TEST_F(Watch, WaitsOnTheSetWhenOnlyWatchesAreLeft) {
    mp_stats st;
    mp_get_stats(ch, &st);
    const char *want = getenv("MP_READINESS");
    bool direct = is_uring(ch) && mode() == "epoll" && (st.features & MP_FEAT_DEFER_TASKRUN) &&
                  !(want && !strcmp(want, "epoll-ring"));
    Pair p, q;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_TRUE(tcp_pair(q));
    ASSERT_EQ(mp_watch(ch, p.a.get(), EPOLLIN, 0, (void *)1), 0);
    auto rounds = [&](int n) { // n blocking waits that each end with the watch's event
        for (int i = 0; i < n; i++) {
            ASSERT_TRUE(write_all(p.b.get(), "x", 1));
            auto v = one_dispatch(2000);
            ASSERT_EQ(polls_of(v, p.a.get()), 1);
            char c;
            ASSERT_EQ(read(p.a.get(), &c, 1), 1);
        }
    };
    rounds(4);
    mp_get_stats(ch, &st);
    uint64_t set0 = st.set_waits;
    if (direct) EXPECT_GE(set0, 2u); else EXPECT_EQ(set0, 0u);

    // A registration with a read in flight: the ring must be waited on, or the read's
    // completion would sit there while epoll_wait sleeps.
    mp_handle *h = mp_register(ch, q.a.get(), (void *)2, nullptr);
    ASSERT_NE(h, nullptr) << strerror(errno);
    char buf[8];
    ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
    std::thread t([&] {
        sleep_ms(100);
        write_all(q.b.get(), "hi", 2);
    });
    int64_t t0 = now_ms();
    bool got = false;
    pump(ch, 3000, [&](const mp_event &e) {
        if (e.cmd == MP_EV_READ) got = e.result == 2;
        return got;
    });
    t.join();
    EXPECT_TRUE(got);
    EXPECT_LT(now_ms() - t0, 2000);
    mp_get_stats(ch, &st);
    EXPECT_EQ(st.set_waits, set0);
    rounds(2);
    mp_get_stats(ch, &st);
    EXPECT_EQ(st.set_waits, set0); // the handle still exists

    ASSERT_EQ(mp_unregister(h), 0);
    bool closed = false;
    pump(ch, 2000, [&](const mp_event &e) {
        closed = closed || e.cmd == MP_EV_CLOSED;
        return closed;
    });
    ASSERT_TRUE(closed);
    rounds(4);
    mp_get_stats(ch, &st);
    if (direct) EXPECT_GE(st.set_waits, set0 + 2); else EXPECT_EQ(st.set_waits, 0u);

    // mp_wake() from another thread ends a wait on the set.
    std::thread w([&] {
        sleep_ms(100);
        EXPECT_EQ(mp_wake(ch), 0);
    });
    t0 = now_ms();
    mp_event ev;
    int n = mp_dispatch(ch, &ev, 5000);
    w.join();
    ASSERT_EQ(n, 1);
    EXPECT_EQ(ev.cmd, MP_EV_WAKE);
    EXPECT_LT(now_ms() - t0, 2000);
    EXPECT_EQ(mp_unwatch(ch, p.a.get()), 0);
}
