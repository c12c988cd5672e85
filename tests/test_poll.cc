// test_poll.cc — the readiness adapter (mp_poll_add / mp_poll_mod / mp_poll_del), both engines.
#include <sys/epoll.h>
#include <sys/socket.h>

#include <map>
#include <set>

#include "test_util.h"

using namespace mpt;

namespace {

struct PollFixture : ::testing::Test {
    Channel ch;
    void SetUp() override {
        mp_options o = opts();
        ch.reset(mp_create(&o));
        ASSERT_NE(ch.get(), nullptr) << strerror(errno);
        if (env_engine() == "uring" || env_engine() == "epoll") {
            ASSERT_STREQ(mp_engine_name(ch), env_engine().c_str());
        }
    }
    // Next POLL event within timeout_ms (other events are a failure); false on timeout.
    bool next_poll(mp_event &out, int timeout_ms = 2000) {
        bool got = pump(ch, timeout_ms, [&](const mp_event &ev) {
            if (ev.cmd == MP_EV_CLOSED) return false; // a deleted watch's final event
            if (ev.cmd != MP_EV_POLL) {
                ADD_FAILURE() << "unexpected event cmd " << ev.cmd;
                return false;
            }
            out = ev;
            return true;
        });
        return got;
    }
    std::vector<mp_event> polls_within(int ms) {
        std::vector<mp_event> v;
        for (auto &ev : collect(ch, ms))
            if (ev.cmd == MP_EV_POLL) v.push_back(ev);
        return v;
    }
};

using Poll = PollFixture;

int cookie_of(const mp_event &ev) { return (int)(intptr_t)ev.cookie; }

} // namespace

TEST_F(Poll, BadArguments) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    errno = 0;
    EXPECT_EQ(mp_poll_add(nullptr, p.a.get(), EPOLLIN, 0, nullptr), nullptr);
    EXPECT_EQ(errno, EBADF);
    errno = 0;
    EXPECT_EQ(mp_poll_add(ch, -1, EPOLLIN, 0, nullptr), nullptr);
    EXPECT_EQ(errno, EBADF);
    errno = 0;
    EXPECT_EQ(mp_poll_add(ch, p.a.get(), EPOLLIN | EPOLLET, 0, nullptr), nullptr);
    EXPECT_EQ(errno, EINVAL);
    errno = 0;
    EXPECT_EQ(mp_poll_add(ch, p.a.get(), EPOLLIN, 0x100, nullptr), nullptr);
    EXPECT_EQ(errno, EINVAL);
    mp_handle *w = mp_poll_add(ch, p.a.get(), EPOLLIN, 0, nullptr);
    ASSERT_NE(w, nullptr);
    EXPECT_EQ(mp_poll_mod(w, EPOLLIN | EPOLLONESHOT, 0), -EINVAL);
    EXPECT_EQ(mp_poll_mod(nullptr, EPOLLIN, 0), -EBADF);
    EXPECT_EQ(mp_poll_del(w), 0);
    EXPECT_EQ(mp_poll_del(w), -EBADF);
    EXPECT_EQ(mp_poll_mod(w, EPOLLIN, 0), -EBADF);
    EXPECT_EQ(mp_poll_del(nullptr), -EBADF);
}

TEST_F(Poll, LevelTriggeredRepeatsUntilDrained) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    void *ck = (void *)(intptr_t)0x1234;
    mp_handle *w = mp_poll_add(ch, p.a.get(), EPOLLIN, 0, ck);
    ASSERT_NE(w, nullptr);

    // Nothing to read: no event.
    EXPECT_TRUE(polls_within(150).empty());

    ASSERT_TRUE(write_all(p.b.get(), "hello", 5));
    for (int i = 0; i < 4; i++) { // reported again at every dispatch while data is unread
        mp_event ev;
        ASSERT_TRUE(next_poll(ev)) << "level-triggered report #" << i << " missing";
        EXPECT_EQ(ev.handle, w);
        EXPECT_EQ(ev.cookie, ck);
        EXPECT_EQ(ev.u.poll.fd, p.a.get());
        EXPECT_TRUE(ev.u.poll.revents & EPOLLIN);
        EXPECT_EQ((uint32_t)ev.result, ev.u.poll.revents);
    }
    EXPECT_EQ(drain(p.a.get()), 5u);
    // Drained: at most nothing more (no queued stale EPOLLIN once the data is gone).
    auto later = polls_within(300);
    EXPECT_TRUE(later.empty()) << later.size() << " EPOLLIN events after draining the socket";

    // New data: reported again.
    ASSERT_TRUE(write_all(p.b.get(), "x", 1));
    mp_event ev;
    ASSERT_TRUE(next_poll(ev));
    EXPECT_TRUE(ev.u.poll.revents & EPOLLIN);
    EXPECT_EQ(mp_poll_del(w), 0);
}

TEST_F(Poll, EdgeTriggeredOncePerArrival) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    void *ck = (void *)(intptr_t)77;
    mp_handle *w = mp_poll_add(ch, p.a.get(), EPOLLIN, MP_POLL_ET, ck);
    ASSERT_NE(w, nullptr);
    EXPECT_TRUE(polls_within(150).empty());

    for (int round = 0; round < 3; round++) {
        ASSERT_TRUE(write_all(p.b.get(), "abc", 3));
        auto evs = polls_within(400);
        ASSERT_EQ(evs.size(), 1u) << "round " << round
                                  << ": edge-triggered watch must report each arrival once";
        EXPECT_EQ(evs[0].cookie, ck);
        EXPECT_EQ(evs[0].handle, w);
        EXPECT_TRUE(evs[0].u.poll.revents & EPOLLIN);
        // data stays unread: still nothing more
        EXPECT_TRUE(polls_within(200).empty()) << "round " << round << ": repeated while unread";
    }
    EXPECT_EQ(drain(p.a.get()), 9u);
    EXPECT_EQ(mp_poll_del(w), 0);
}

TEST_F(Poll, WritableAndModSwitchesInterest) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    void *ck = (void *)(intptr_t)5;
    // EPOLLIN on a quiet socket: nothing.
    mp_handle *w = mp_poll_add(ch, p.a.get(), EPOLLIN, 0, ck);
    ASSERT_NE(w, nullptr);
    EXPECT_TRUE(polls_within(150).empty());

    // Switch to EPOLLOUT: the socket is writable at once.
    ASSERT_EQ(mp_poll_mod(w, EPOLLOUT, 0), 0);
    mp_event ev;
    ASSERT_TRUE(next_poll(ev)) << "EPOLLOUT after mp_poll_mod never reported";
    EXPECT_EQ(ev.handle, w);
    EXPECT_EQ(ev.cookie, ck);
    EXPECT_TRUE(ev.u.poll.revents & EPOLLOUT);
    EXPECT_FALSE(ev.u.poll.revents & EPOLLIN);
    ASSERT_TRUE(next_poll(ev)) << "level-triggered EPOLLOUT not repeated";
    EXPECT_TRUE(ev.u.poll.revents & EPOLLOUT);

    // Back to EPOLLIN: the (still true) writability is no longer reported.
    ASSERT_EQ(mp_poll_mod(w, EPOLLIN, 0), 0);
    auto evs = polls_within(300);
    EXPECT_TRUE(evs.empty()) << evs.size() << " events after switching to EPOLLIN on a quiet socket";
    ASSERT_TRUE(write_all(p.b.get(), "z", 1));
    ASSERT_TRUE(next_poll(ev));
    EXPECT_TRUE(ev.u.poll.revents & EPOLLIN);
    EXPECT_FALSE(ev.u.poll.revents & EPOLLOUT);

    // Both at once.
    ASSERT_EQ(mp_poll_mod(w, EPOLLIN | EPOLLOUT, 0), 0);
    ASSERT_TRUE(next_poll(ev));
    EXPECT_EQ(ev.u.poll.revents & (EPOLLIN | EPOLLOUT), (uint32_t)(EPOLLIN | EPOLLOUT));

    // Edge-triggered EPOLLOUT: one report, not repeated while it stays writable.
    ASSERT_EQ(mp_poll_mod(w, EPOLLOUT, MP_POLL_ET), 0);
    evs = polls_within(400);
    ASSERT_GE(evs.size(), 1u);
    EXPECT_LE(evs.size(), 2u); // a report queued before the mod may not be told apart
    EXPECT_TRUE(evs.back().u.poll.revents & EPOLLOUT);
    EXPECT_TRUE(polls_within(200).empty());
    EXPECT_EQ(mp_poll_del(w), 0);
}

TEST_F(Poll, PeerCloseReportsRdhup) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    mp_handle *w = mp_poll_add(ch, p.a.get(), EPOLLIN | EPOLLRDHUP, 0, (void *)1);
    ASSERT_NE(w, nullptr);
    EXPECT_TRUE(polls_within(100).empty());
    p.b.reset(); // FIN
    mp_event ev;
    ASSERT_TRUE(next_poll(ev));
    EXPECT_TRUE(ev.u.poll.revents & EPOLLRDHUP) << std::hex << ev.u.poll.revents;
    EXPECT_TRUE(ev.u.poll.revents & EPOLLIN) << std::hex << ev.u.poll.revents;
    // Both directions shut: EPOLLHUP as well.
    shutdown(p.a.get(), SHUT_WR);
    bool hup = pump(ch, 2000, [&](const mp_event &e) {
        return e.cmd == MP_EV_POLL && (e.u.poll.revents & EPOLLHUP);
    });
    EXPECT_TRUE(hup) << "no EPOLLHUP after both sides shut down";
    EXPECT_EQ(mp_poll_del(w), 0);
}

TEST_F(Poll, PeerResetReportsHupOrErr) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    // Only EPOLLIN requested; EPOLLERR/EPOLLHUP are always reported.
    mp_handle *w = mp_poll_add(ch, p.a.get(), EPOLLIN, MP_POLL_ET, (void *)2);
    ASSERT_NE(w, nullptr);
    close_rst(p.b);
    mp_event ev;
    ASSERT_TRUE(next_poll(ev));
    EXPECT_TRUE(ev.u.poll.revents & (EPOLLIN | EPOLLHUP | EPOLLERR)) << std::hex << ev.u.poll.revents;
    EXPECT_FALSE(ev.u.poll.revents & EPOLLRDHUP) << "EPOLLRDHUP reported without being requested";
    EXPECT_EQ(mp_poll_del(w), 0);
}

// Events already reaped but not yet handed out are dropped by mp_poll_del.
TEST_F(Poll, DelDropsQueuedEvents) {
    const int N = 8;
    std::vector<Pair> pairs(N);
    std::vector<mp_handle *> w(N);
    for (int i = 0; i < N; i++) {
        ASSERT_TRUE(tcp_pair(pairs[i]));
        ASSERT_TRUE(write_all(pairs[i].b.get(), "d", 1));
    }
    for (int i = 0; i < N; i++) {
        w[i] = mp_poll_add(ch, pairs[i].a.get(), EPOLLIN, 0, (void *)(intptr_t)(100 + i));
        ASSERT_NE(w[i], nullptr);
    }
    // One dispatch reaps the readiness of all N (one system call) but hands out one.
    mp_event ev;
    ASSERT_TRUE(next_poll(ev));
    int first = cookie_of(ev) - 100;
    ASSERT_GE(first, 0);
    ASSERT_LT(first, N);
    for (int i = 0; i < N; i++) ASSERT_EQ(mp_poll_del(w[i]), 0);
    auto evs = polls_within(300);
    for (auto &e : evs)
        ADD_FAILURE() << "event of a deleted watch delivered: cookie " << cookie_of(e);

    // Control: the same situation without deleting reports every watch (level-triggered).
    std::vector<mp_handle *> w2(N);
    for (int i = 0; i < N; i++) {
        w2[i] = mp_poll_add(ch, pairs[i].a.get(), EPOLLIN, 0, (void *)(intptr_t)(200 + i));
        ASSERT_NE(w2[i], nullptr);
    }
    std::set<int> seen;
    pump(ch, 3000, [&](const mp_event &e) {
        if (e.cmd == MP_EV_POLL) {
            EXPECT_GE(cookie_of(e), 200) << "old cookie after re-adding the fd";
            seen.insert(cookie_of(e));
        }
        return (int)seen.size() == N;
    });
    EXPECT_EQ((int)seen.size(), N);
    for (int i = 0; i < N; i++) EXPECT_EQ(mp_poll_del(w2[i]), 0);
}

// libuv #4323: mp_poll_del, close(fd), a new socket gets the same number and is watched with a
// new cookie.  No event may ever carry the old cookie, whatever state the old watch was in.
TEST_F(Poll, DelThenFdReuseNeverReportsOldCookie) {
    Fd lst(make_listener(64));
    ASSERT_GE(lst.get(), 0);
    const uint16_t port = local_port(lst.get());
    const intptr_t OLD = 0x01d, NEW = 0x2ee;
    int old_seen = 0, new_seen = 0;
    for (int iter = 0; iter < 32; iter++) {
        SCOPED_TRACE("iteration " + std::to_string(iter));
        Pair p;
        ASSERT_TRUE(tcp_pair(p));
        const bool et = iter & 1;
        const bool data_before = iter & 2;
        ASSERT_TRUE(write_all(p.b.get(), "old", 3));
        mp_handle *w = mp_poll_add(ch, p.a.get(), EPOLLIN | EPOLLRDHUP, et ? MP_POLL_ET : 0,
                                   (void *)OLD);
        ASSERT_NE(w, nullptr);
        mp_event ev;
        ASSERT_TRUE(next_poll(ev));
        ASSERT_EQ(ev.cookie, (void *)OLD);
        if (iter & 4) {
            // let the level-triggered watch re-arm (and fire into the queue) before the delete
            (void)mp_dispatch(ch, &ev, 0);
        }
        if (data_before) {
            ASSERT_TRUE(write_all(p.b.get(), "more", 4)); // the old watch may fire now
        }
        const bool close_first = iter & 16; // the order libuv-style callers often use
        int fd = p.a.release();
        if (close_first) ::close(fd);
        ASSERT_EQ(mp_poll_del(w), 0);
        if (!close_first) ::close(fd);
        // If the kernel still holds the old socket (an io_uring poll keeps a file reference),
        // it keeps producing readiness; otherwise this send fails with ECONNRESET.
        (void)write_all(p.b.get(), "late", 4);
        int nfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        ASSERT_GE(nfd, 0);
        if (nfd != fd) { // the lowest free number is not ours: move it there
            ASSERT_EQ(dup3(nfd, fd, O_CLOEXEC), fd);
            ::close(nfd);
            nfd = fd;
        }
        Fd nsock(nfd);
        sockaddr_in a = loopback_addr(port);
        ASSERT_EQ(connect(nfd, (sockaddr *)&a, sizeof a), 0);
        Fd peer(accept_timeout(lst.get()));
        ASSERT_GE(peer.get(), 0);
        ASSERT_TRUE(write_all(peer.get(), "new", 3));
        mp_handle *w2 = mp_poll_add(ch, nfd, EPOLLIN | EPOLLRDHUP, et ? 0 : MP_POLL_ET, (void *)NEW);
        ASSERT_NE(w2, nullptr);
        bool got_new = false;
        pump(ch, 150, [&](const mp_event &e) {
            if (e.cmd != MP_EV_POLL) return false;
            // (handle pointers are slots and may be reused by w2: only the cookie tells)
            if (e.cookie == (void *)OLD) {
                if (old_seen++ < 5)
                    ADD_FAILURE() << "event for the deleted watch (revents " << std::hex
                                  << e.u.poll.revents << ")";
            } else if (e.cookie == (void *)NEW) {
                EXPECT_EQ(e.handle, w2);
                EXPECT_EQ(e.u.poll.fd, nfd);
                got_new = true;
                new_seen++;
            }
            return got_new && !(iter & 8); // half the time keep listening for stragglers
        });
        EXPECT_TRUE(got_new) << "the new registration was never reported";
        // Close the old peer too: a HUP on the old socket must not leak either.
        p.b.reset();
        for (auto &e : polls_within(30))
            EXPECT_NE(e.cookie, (void *)OLD) << "old cookie after peer close";
        ASSERT_EQ(mp_poll_del(w2), 0);
    }
    EXPECT_EQ(old_seen, 0);
    EXPECT_GE(new_seen, 32);
}

// Arming, changing and removing watches are queued requests: on io_uring 100 watches cost a
// handful of system calls, not 100.  Both engines must report exactly the ready watches.
TEST_F(Poll, ManyWatchesBatchedAndAccurate) {
    const int N = 100;
    std::vector<Fd> mine(N), peers(N);
    for (int i = 0; i < N; i++) {
        int sv[2];
        ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
        mine[i].reset(sv[0]);
        peers[i].reset(sv[1]);
    }
    // Get the ring enabled and the wake poll armed first, so only the watches are measured.
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0);
    mp_stats s0, s1, s2, s3, s4;
    ASSERT_EQ(mp_get_stats(ch, &s0), 0);
    std::vector<mp_handle *> w(N);
    for (int i = 0; i < N; i++) {
        w[i] = mp_poll_add(ch, mine[i].get(), EPOLLIN, 0, (void *)(intptr_t)(1000 + i));
        ASSERT_NE(w[i], nullptr);
    }
    ASSERT_EQ(mp_get_stats(ch, &s1), 0);
    EXPECT_EQ(s1.requests - s0.requests, (uint64_t)N);
    EXPECT_EQ(s1.handles - s0.handles, (uint64_t)N);
    if (is_uring(ch)) {
        EXPECT_LE(s1.syscalls - s0.syscalls, 3u) << "arming 100 polls must not be 100 syscalls";
        int n = mp_flush(ch);
        EXPECT_GE(n, N);
        ASSERT_EQ(mp_get_stats(ch, &s2), 0);
        EXPECT_LE(s2.submits - s0.submits, 3u);
        EXPECT_LE(s2.syscalls - s0.syscalls, 4u);
        EXPECT_GE(s2.sqes - s0.sqes, (uint64_t)N);
        // Changing all of them: still batched.
        for (int i = 0; i < N; i++) ASSERT_EQ(mp_poll_mod(w[i], EPOLLIN | EPOLLRDHUP, 0), 0);
        mp_flush(ch);
        ASSERT_EQ(mp_get_stats(ch, &s3), 0);
        EXPECT_LE(s3.syscalls - s2.syscalls, 6u) << "100 mp_poll_mod calls";
        EXPECT_GE(s3.sqes - s2.sqes, (uint64_t)N);
    } else {
        // epoll: the watches are the epoll set itself (one epoll_ctl each, counted).
        EXPECT_GE(s1.syscalls - s0.syscalls, (uint64_t)N);
        EXPECT_EQ(mp_flush(ch), 0);
        for (int i = 0; i < N; i++) ASSERT_EQ(mp_poll_mod(w[i], EPOLLIN | EPOLLRDHUP, 0), 0);
    }
    // Exactly the watches whose peer wrote report.
    std::set<int> want, seen;
    for (int i = 0; i < N; i += 7) {
        ASSERT_TRUE(write_all(peers[i].get(), "r", 1));
        want.insert(1000 + i);
    }
    pump(ch, 3000, [&](const mp_event &e) {
        if (e.cmd == MP_EV_POLL) {
            EXPECT_TRUE(want.count(cookie_of(e))) << "cookie " << cookie_of(e) << " not ready";
            EXPECT_EQ(e.handle, w[cookie_of(e) - 1000]);
            seen.insert(cookie_of(e));
        }
        return seen.size() == want.size();
    });
    EXPECT_EQ(seen, want);
    ASSERT_EQ(mp_get_stats(ch, &s3), 0);
    for (int i = 0; i < N; i++) ASSERT_EQ(mp_poll_del(w[i]), 0);
    ASSERT_EQ(mp_get_stats(ch, &s4), 0);
    EXPECT_EQ(s3.handles - s4.handles, (uint64_t)N);
    if (is_uring(ch)) {
        EXPECT_LE(s4.syscalls - s3.syscalls, 3u) << "100 mp_poll_del calls";
    }
    // Nothing of the deleted watches afterwards, though their fds are still readable.
    for (auto &e : polls_within(200)) ADD_FAILURE() << "deleted watch reported: " << cookie_of(e);
}

// The header lists EEXIST: a second watch of the same fd on one channel is refused (epoll
// refuses it natively; the io_uring engine must behave the same).
TEST_F(Poll, DuplicateWatchIsEexist) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    mp_handle *w = mp_poll_add(ch, p.a.get(), EPOLLIN, 0, (void *)1);
    ASSERT_NE(w, nullptr);
    errno = 0;
    mp_handle *w2 = mp_poll_add(ch, p.a.get(), EPOLLOUT, 0, (void *)2);
    EXPECT_EQ(w2, nullptr) << "second watch of fd " << p.a.get() << " accepted";
    EXPECT_EQ(errno, EEXIST);
    if (w2) {
        mp_poll_del(w2);
    }
    EXPECT_EQ(mp_poll_del(w), 0);
    // After the delete the fd can be watched again.
    w = mp_poll_add(ch, p.a.get(), EPOLLIN, 0, (void *)3);
    EXPECT_NE(w, nullptr);
    if (w) {
        EXPECT_EQ(mp_poll_del(w), 0);
    }
}

// Edge-triggered watches are multishot polls on io_uring; when the kernel ends one (e.g. on CQ
// overflow, which a tiny ring and 300 ready watches may provoke) it must be re-armed, so every
// later arrival is still reported.
TEST_F(Poll, EdgeTriggeredManyWatchesSmallRing) {
    mp_options o = opts();
    o.ring_entries = 8; // completion ring: 128 entries
    ch.reset(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    const int N = 300;
    std::vector<Fd> mine(N), peers(N);
    std::vector<mp_handle *> w(N);
    for (int i = 0; i < N; i++) {
        int sv[2];
        ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
        mine[i].reset(sv[0]);
        peers[i].reset(sv[1]);
        w[i] = mp_poll_add(ch, sv[0], EPOLLIN, MP_POLL_ET, (void *)(intptr_t)i);
        ASSERT_NE(w[i], nullptr);
    }
    mp_event ev;
    for (int k = 0; k < 5; k++) ASSERT_GE(mp_dispatch(ch, &ev, 10), 0); // all armed
    for (int round = 0; round < 3; round++) {
        SCOPED_TRACE("round " + std::to_string(round));
        for (int i = 0; i < N; i++) ASSERT_TRUE(write_all(peers[i].get(), "e", 1));
        std::vector<int> seen(N, 0);
        int distinct = 0;
        pump(ch, 5000, [&](const mp_event &e) {
            if (e.cmd == MP_EV_POLL) {
                int i = (int)(intptr_t)e.cookie;
                if (seen[i]++ == 0) distinct++;
            }
            return distinct == N;
        });
        EXPECT_EQ(distinct, N) << "edge-triggered watches lost after the kernel ended them";
    }
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    RecordProperty("cq_overflows", (int)st.cq_overflows);
    for (int i = 0; i < N; i++) EXPECT_EQ(mp_poll_del(w[i]), 0);
}

// Level-triggered watches wait in a re-arm list between dispatches.  Deleting one of them and
// adding a new watch at once (which may reuse the deleted watch's slot) must not make the
// others go silent: each still reports at the next dispatches while its data is unread.
TEST_F(Poll, DelAndAddDoNotLoseOtherLevelWatches) {
    const int N = 4;
    for (int victim = 0; victim < N; victim++) {
        SCOPED_TRACE("deleted watch #" + std::to_string(victim));
        std::vector<Pair> pairs(N);
        std::vector<mp_handle *> w(N);
        for (int i = 0; i < N; i++) {
            ASSERT_TRUE(tcp_pair(pairs[i]));
            ASSERT_TRUE(write_all(pairs[i].b.get(), "lt", 2)); // readable before the watch
        }
        for (int i = 0; i < N; i++) {
            w[i] = mp_poll_add(ch, pairs[i].a.get(), EPOLLIN, 0, (void *)(intptr_t)(10 + i));
            ASSERT_NE(w[i], nullptr);
        }
        // One report of each (all reaped together, handed out one by one).
        std::set<int> seen;
        ASSERT_TRUE(pump(ch, 3000, [&](const mp_event &e) {
            if (e.cmd == MP_EV_POLL) seen.insert(cookie_of(e));
            return (int)seen.size() == N;
        }));
        // Delete one, add another watch straight away.
        ASSERT_EQ(mp_poll_del(w[victim]), 0);
        Pair extra;
        ASSERT_TRUE(tcp_pair(extra));
        mp_handle *x = mp_poll_add(ch, extra.a.get(), EPOLLIN, 0, (void *)(intptr_t)99);
        ASSERT_NE(x, nullptr);
        // Every surviving watch keeps reporting (data still unread).
        std::map<int, int> count;
        pump(ch, 600, [&](const mp_event &e) {
            if (e.cmd == MP_EV_POLL) count[cookie_of(e)]++;
            return false;
        });
        for (int i = 0; i < N; i++) {
            if (i == victim) {
                EXPECT_EQ(count[10 + i], 0) << "deleted watch reported";
            } else {
                EXPECT_GE(count[10 + i], 2) << "level-triggered watch #" << i
                                            << " went silent with data unread";
            }
        }
        EXPECT_EQ(count[99], 0) << "the extra watch has nothing to read";
        for (int i = 0; i < N; i++) {
            if (i != victim) {
                EXPECT_EQ(mp_poll_del(w[i]), 0);
            }
        }
        EXPECT_EQ(mp_poll_del(x), 0);
        collect(ch, 20);
    }
}

// An empty interest set pauses a watch; restoring it resumes reporting.
TEST_F(Poll, ModToEmptyInterestPauses) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    mp_handle *w = mp_poll_add(ch, p.a.get(), EPOLLIN, 0, (void *)7);
    ASSERT_NE(w, nullptr);
    ASSERT_TRUE(write_all(p.b.get(), "q", 1));
    mp_event ev;
    ASSERT_TRUE(next_poll(ev));
    ASSERT_EQ(mp_poll_mod(w, 0, 0), 0);
    auto evs = polls_within(300);
    EXPECT_TRUE(evs.empty()) << evs.size() << " reports with an empty interest set";
    ASSERT_EQ(mp_poll_mod(w, EPOLLIN, 0), 0);
    ASSERT_TRUE(next_poll(ev)) << "no report after restoring the interest set";
    EXPECT_TRUE(ev.u.poll.revents & EPOLLIN);
    EXPECT_EQ(mp_poll_del(w), 0);
}

// Watch p.a (cookie 0x01d), then close it and reuse its number for q.a at once (dup3 does
// both atomically): old_w is the stale watch, fd the reused number (now q.a).
static void watch_then_reuse(mp_channel *ch, Pair &p, Pair &q, mp_handle *&old_w, int &fd) {
    ASSERT_TRUE(tcp_pair(p));
    old_w = mp_poll_add(ch, p.a.get(), EPOLLIN, 0, (void *)0x01d);
    ASSERT_NE(old_w, nullptr);
    collect(ch, 20);
    ASSERT_TRUE(tcp_pair(q));
    fd = p.a.release();
    ASSERT_EQ(dup3(q.a.get(), fd, O_CLOEXEC), fd);
    q.a.reset(fd);
}

// The other order (libuv #4323 itself): the fd is closed while still watched, its number is
// reused, and only then is the stale watch deleted.  Deleting the stale watch must not affect
// whatever now uses the number: a new watch (mp_poll_add may refuse it with EEXIST while the
// stale watch holds the number; then it is added after the delete) ...
TEST_F(Poll, StaleDelAfterReuseKeepsNewWatch) {
    Pair p, q;
    mp_handle *old_w = nullptr;
    int fd = -1;
    ASSERT_NO_FATAL_FAILURE(watch_then_reuse(ch, p, q, old_w, fd));
    errno = 0;
    mp_handle *new_w = mp_poll_add(ch, fd, EPOLLIN, 0, (void *)0x2ee);
    if (!new_w) {
        EXPECT_EQ(errno, EEXIST);
        ASSERT_EQ(mp_poll_del(old_w), 0);
        new_w = mp_poll_add(ch, fd, EPOLLIN, 0, (void *)0x2ee);
        ASSERT_NE(new_w, nullptr) << strerror(errno);
    } else {
        ASSERT_EQ(mp_poll_del(old_w), 0);
    }
    ASSERT_TRUE(write_all(q.b.get(), "n", 1));
    int new_seen = 0;
    pump(ch, 1000, [&](const mp_event &e) {
        if (e.cmd != MP_EV_POLL) return false;
        EXPECT_EQ(e.cookie, (void *)0x2ee) << "stale watch reported";
        if (e.cookie == (void *)0x2ee) new_seen++;
        return new_seen > 0;
    });
    EXPECT_GT(new_seen, 0) << "the new watch of fd " << fd << " never reported";
    EXPECT_EQ(mp_poll_del(new_w), 0);
}

// ... or a connection handle registered on the reused number.
TEST_F(Poll, StaleDelAfterReuseKeepsNewConnection) {
    Pair p, q;
    mp_handle *old_w = nullptr;
    int fd = -1;
    ASSERT_NO_FATAL_FAILURE(watch_then_reuse(ch, p, q, old_w, fd));
    mp_handle *c = mp_register(ch, fd, (void *)0xc0, nullptr);
    ASSERT_NE(c, nullptr) << strerror(errno);
    char buf[8];
    ASSERT_EQ(mp_read(c, buf, sizeof buf), 0);
    ASSERT_EQ(mp_poll_del(old_w), 0);
    ASSERT_TRUE(write_all(q.b.get(), "conn", 4));
    bool got = pump(ch, 2000, [&](const mp_event &e) {
        if (e.cmd != MP_EV_CLOSED) {
            EXPECT_NE(e.cookie, (void *)0x01d) << "stale watch reported";
        }
        return e.cmd == MP_EV_READ && e.handle == c;
    });
    EXPECT_TRUE(got) << "deleting the stale watch of fd " << fd
                     << " silenced the connection now registered on that number";
    if (got) {
        EXPECT_EQ(std::string(buf, 4), "conn");
    }
    EXPECT_EQ(mp_unregister(c), 0);
}

namespace {

// A readiness watch and a completion registration on the same fd, on both engines (the epoll
// engine keeps watches in a set of their own): each keeps working, and ending one leaves the
// other alone.
TEST_F(Poll, WatchAndConnectionShareAnFd) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    mp_handle *c = mp_register(ch, p.a.get(), (void *)0xc1, nullptr);
    ASSERT_NE(c, nullptr) << strerror(errno);
    mp_handle *w = mp_poll_add(ch, p.a.get(), EPOLLOUT, 0, (void *)0xa1);
    ASSERT_NE(w, nullptr) << "a watch on a registered connection's fd: " << strerror(errno);
    mp_event ev;
    ASSERT_TRUE(wait_event(ch, MP_EV_POLL, w, &ev));
    EXPECT_TRUE(ev.u.poll.revents & EPOLLOUT);
    char buf[16];
    ASSERT_EQ(mp_read(c, buf, sizeof buf), 0);
    ASSERT_TRUE(write_all(p.b.get(), "both", 4));
    ASSERT_TRUE(wait_event(ch, MP_EV_READ, c, &ev));
    EXPECT_EQ(ev.result, 4);
    EXPECT_EQ(std::string(buf, 4), "both");
    // End the watch: the connection goes on.
    ASSERT_EQ(mp_poll_del(w), 0);
    ASSERT_EQ(mp_read(c, buf, sizeof buf), 0);
    ASSERT_TRUE(write_all(p.b.get(), "more", 4));
    ASSERT_TRUE(wait_event(ch, MP_EV_READ, c, &ev));
    EXPECT_EQ(std::string(buf, 4), "more");
    // A new watch, then end the connection: the watch goes on.
    mp_handle *w2 = mp_poll_add(ch, p.a.get(), EPOLLIN, 0, (void *)0xa2);
    ASSERT_NE(w2, nullptr) << strerror(errno);
    ASSERT_EQ(mp_unregister(c), 0);
    ASSERT_TRUE(write_all(p.b.get(), "x", 1));
    ASSERT_TRUE(wait_event(ch, MP_EV_POLL, w2, &ev));
    EXPECT_TRUE(ev.u.poll.revents & EPOLLIN);
    ASSERT_EQ(mp_poll_del(w2), 0);
}

} // namespace
