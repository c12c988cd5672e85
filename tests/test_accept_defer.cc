// test_accept_defer.cc — deferred accepting (mp_options.accept_defer, MP_ACCEPT_DEFER): while a
// connection the channel accepted has not yet completed its first receive, an exclusive
// listener is not armed; what queues in its backlog is taken by the next wait that follows a
// receive, or once the bound has passed.  No connection is lost or starved: a client that says
// nothing delays the next one by at most the bound, and a listener that becomes shared, or is
// unregistered, while accepting is deferred behaves as without the option.  On the epoll engine
// the option is accepted and changes nothing.  Both engines.
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <vector>

#include "test_util.h"

using namespace mpt;

namespace {

struct Server {
    uint16_t port = 0;
    int lfd = -1;
    Channel ch{nullptr};
    mp_handle *hl = nullptr;
    bool buffered = false;

    // A plain listener on 127.0.0.1, served by a channel with accept_defer ms, exclusive.
    bool start(int defer_ms, bool want_buffered) {
        lfd = plain_listener(&port);
        if (lfd < 0) return false;
        mp_options o = opts();
        o.accept_defer = defer_ms;
        ch.reset(mp_create(&o));
        if (!ch.get()) return false;
        hl = mp_register(ch, lfd, nullptr, nullptr);
        if (!hl) return false;
        buffered = want_buffered && is_uring(ch);
        return mp_accept(hl, 0, MP_ACCEPT_EXCLUSIVE) == 0 && mp_flush(ch) >= 0;
    }
    ~Server() {
        ch.reset(nullptr);
        if (lfd >= 0) ::close(lfd);
    }
    // Register an accepted connection and start its first receive.
    mp_handle *adopt(int fd, std::vector<char> *buf) {
        mp_handle *h = mp_register(ch, fd, nullptr, nullptr);
        EXPECT_NE(h, nullptr);
        if (!h) return nullptr;
        int r = buffered ? mp_read_buffered(h) : mp_read(h, buf->data(), buf->size());
        EXPECT_EQ(r, 0);
        return h;
    }
};

} // namespace

TEST(AcceptDefer, OptionIsChecked) {
    mp_options o = opts();
    o.accept_defer = 60001;
    errno = 0;
    EXPECT_EQ(mp_create(&o), nullptr) << "a bound over a minute is refused";
    EXPECT_EQ(errno, EINVAL);
    o.accept_defer = -5;
    EXPECT_EQ(mp_create(&o), nullptr);
    o.accept_defer = 0;
    Channel off(mp_create(&o));
    EXPECT_NE(off.get(), nullptr);
    o.accept_defer = 3;
    Channel on(mp_create(&o));
    EXPECT_NE(on.get(), nullptr);
}

// Many short connections (request, echo, close) from 8 threads: every one is served with its
// own bytes, and on io_uring the listener's backlog was taken by drains (accepting was
// deferred at all).
TEST(AcceptDefer, EveryConnectionIsServed) {
    for (bool buffered : {false, true}) {
        SCOPED_TRACE(buffered ? "buffered reads" : "posted reads");
        Server s;
        ASSERT_TRUE(s.start(5, buffered));
        int accepted = 0;
        const int threads = 8, per_thread = 60, total = threads * per_thread;
        std::atomic<int> ok{0}, bad{0};
        std::vector<std::thread> clients;
        for (int t = 0; t < threads; t++)
            clients.emplace_back([&, t] {
                for (int i = 0; i < per_thread; i++) {
                    Fd c(connect_client(s.port));
                    std::string msg = pattern(40 + (size_t)(t * 7 + i) % 200, (uint32_t)(t * 1000 + i));
                    // a little time between connect and request, so that connections
                    // wait for their first data while others connect (accepting deferred)
                    if ((i + t) % 2) sleep_ms(1);
                    if (!c.ok() || !write_all(c.get(), msg.data(), msg.size())) {
                        bad++;
                        continue;
                    }
                    if (read_n(c.get(), msg.size(), 10000) == msg) ok++;
                    else bad++;
                }
            });
        struct Conn { std::vector<char> buf; };
        std::vector<Conn> conns(4096);
        int served = 0;
        auto until = deadline_in(60000);
        bool done = false;
        while (!done && std::chrono::steady_clock::now() < until) {
            mp_event ev;
            int r = mp_dispatch(s.ch, &ev, 20);
            ASSERT_GE(r, 0);
            done = ok + bad == total && served >= total;
            if (r != 1) continue;
            if (ev.cmd == MP_EV_ACCEPT) {
                EXPECT_GE(ev.result, 0);
                if (ev.result < 0 || ev.result >= (int64_t)conns.size()) continue;
                accepted++;
                conns[(size_t)ev.result].buf.assign(512, 0);
                s.adopt((int)ev.result, &conns[(size_t)ev.result].buf);
            } else if (ev.cmd == MP_EV_READ) {
                int fd = mp_handle_fd(ev.handle);
                std::vector<char> &keep = conns[(size_t)fd].buf;
                if (ev.flags & MP_EVF_BUFFER) { // copy out, give the channel buffer back
                    const char *p = (const char *)ev.u.read.buf;
                    keep.assign(p, p + ev.result);
                    mp_buffer_release(s.ch, ev.u.read.buf_id);
                }
                // each client writes its whole request before reading: echo what came
                EXPECT_EQ(mp_write(ev.handle, keep.data(), (size_t)ev.result), 0);
            } else if (ev.cmd == MP_EV_WRITE) {
                served++;
                mp_unregister_close(ev.handle);
            } else if (ev.cmd == MP_EV_DISCONNECT) {
                mp_unregister_close(ev.handle);
            }
            done = ok + bad == total && served >= total;
        }
        for (auto &t : clients) t.join();
        EXPECT_TRUE(done) << "ok " << ok << " bad " << bad << " served " << served << " accepted " << accepted;
        EXPECT_EQ(bad.load(), 0);
        EXPECT_EQ(ok.load(), total);
        EXPECT_EQ(served, total);
        mp_stats st;
        mp_get_stats(s.ch, &st);
        if (is_uring(s.ch)) {
            EXPECT_GT(st.accept_drains, 0u) << "accepting was never deferred";
        } else {
            EXPECT_EQ(st.accept_drains, 0u) << "the epoll engine ignores the option";
        }
    }
}

namespace {

// Dispatch until connection number `want` (counting ACCEPT events from 1) is accepted; each
// accepted connection is adopted (first receive started).  Returns the fd, or -1 by timeout_ms.
int accept_next(Server &s, std::vector<std::vector<char>> &bufs, int timeout_ms) {
    int fd = -1;
    pump(s.ch, timeout_ms, [&](const mp_event &ev) {
        if (ev.cmd != MP_EV_ACCEPT) return false;
        EXPECT_GE(ev.result, 0);
        bufs.emplace_back(256);
        s.adopt((int)ev.result, &bufs.back());
        fd = (int)ev.result;
        return true;
    });
    return fd;
}

} // namespace

// A client that connects and says nothing holds accepting back only while the bound lasts (on
// io_uring); the next client's data ends it at once.
TEST(AcceptDefer, SilentClientDelaysTheNextOneAtMostTheBound) {
    for (bool buffered : {false, true}) {
        SCOPED_TRACE(buffered ? "buffered reads" : "posted reads");
        Server s;
        const int bound = 400;
        ASSERT_TRUE(s.start(bound, buffered));
        std::vector<std::vector<char>> bufs;
        bufs.reserve(16);
        Fd a(connect_client(s.port));
        ASSERT_TRUE(a.ok());
        ASSERT_GE(accept_next(s, bufs, 3000), 0) << "an idle server accepts at once";
        // A is accepted and says nothing: B waits in the backlog (io_uring) ...
        int64_t t0 = now_ms();
        Fd b(connect_client(s.port));
        ASSERT_TRUE(b.ok());
        int fb = accept_next(s, bufs, 5000);
        int64_t waited = now_ms() - t0;
        ASSERT_GE(fb, 0) << "B was never accepted: a silent client starved the listener";
        if (is_uring(s.ch)) {
            EXPECT_GE(waited, bound / 2) << "B accepted at once: accepting was not deferred";
        }
        EXPECT_LT(waited, 3000) << "B waited far past the bound";
        // ... and once the window is over the listener is armed again: C comes at once.
        t0 = now_ms();
        Fd c(connect_client(s.port));
        ASSERT_TRUE(c.ok());
        // B has not spoken either: C may wait up to the bound again; then D's turn shows that
        // data ends the wait early: D speaks, and E, queued behind, is taken with D's data.
        ASSERT_GE(accept_next(s, bufs, 5000), 0);
        sleep_ms(bound + 100); // everything accepted so far is past the window
        // D and D2 connect together (one wake-up takes both), then E: D's data takes E from
        // the backlog at once (D2 still holds accepting back, so only a drain can take E).
        Fd d(connect_client(s.port)), d2(connect_client(s.port));
        ASSERT_TRUE(d.ok() && d2.ok());
        sleep_ms(20);
        ASSERT_GE(accept_next(s, bufs, 3000), 0) << "after the window an idle listener is armed";
        ASSERT_GE(accept_next(s, bufs, 3000), 0);
        t0 = now_ms();
        Fd e(connect_client(s.port));
        ASSERT_TRUE(e.ok());
        sleep_ms(50);
        ASSERT_TRUE(write_all(d.get(), "x", 1));
        int fe = accept_next(s, bufs, 5000);
        waited = now_ms() - t0;
        ASSERT_GE(fe, 0);
        EXPECT_LT(waited, bound) << "D's data should have taken E from the backlog";
        mp_stats st;
        mp_get_stats(s.ch, &st);
        if (is_uring(s.ch)) {
            EXPECT_GT(st.accept_drains, 0u);
        }
    }
}

// While accepting is deferred: mp_accept_share() makes the listener take turns as usual (the
// connection waiting in the backlog is accepted at once), and mp_unregister() ends it cleanly.
TEST(AcceptDefer, ShareAndUnregisterWhileDeferred) {
    Server s;
    ASSERT_TRUE(s.start(60000, false)); // a bound no test waits out
    std::vector<std::vector<char>> bufs;
    bufs.reserve(16);
    Fd a(connect_client(s.port));
    ASSERT_TRUE(a.ok());
    ASSERT_GE(accept_next(s, bufs, 3000), 0);
    Fd b(connect_client(s.port));
    ASSERT_TRUE(b.ok());
    if (is_uring(s.ch)) { // deferred: B waits while A says nothing
        mp_event ev;
        EXPECT_FALSE(wait_event(s.ch, MP_EV_ACCEPT, s.hl, &ev, 300)) << "B accepted at once";
    }
    ASSERT_EQ(mp_accept_share(s.hl), 0);
    int64_t t0 = now_ms();
    ASSERT_GE(accept_next(s, bufs, 5000), 0) << "a shared listener is not deferred";
    EXPECT_LT(now_ms() - t0, 3000);
    // exclusive again, and deferred again (A and B say nothing): C waits; unregistering the
    // listener then ends it with one CLOSED event, and the connections go on working.
    ASSERT_EQ(mp_accept(s.hl, 0, MP_ACCEPT_EXCLUSIVE), 0);
    mp_event ev;
    // one wait first: it stops the one-shot accepts the shared listener had waiting
    EXPECT_FALSE(wait_event(s.ch, MP_EV_ACCEPT, s.hl, &ev, 50));
    Fd c(connect_client(s.port));
    ASSERT_TRUE(c.ok());
    if (is_uring(s.ch)) {
        EXPECT_FALSE(wait_event(s.ch, MP_EV_ACCEPT, s.hl, &ev, 300)) << "C accepted at once";
    } else {
        ASSERT_TRUE(wait_event(s.ch, MP_EV_ACCEPT, s.hl, &ev, 3000));
        ::close((int)ev.result);
    }
    ASSERT_EQ(mp_unregister(s.hl), 0);
    EXPECT_EQ(mp_unregister(s.hl), -EBADF) << "double unregister";
    ASSERT_TRUE(wait_event(s.ch, MP_EV_CLOSED, s.hl, &ev, 3000));
    s.hl = nullptr;
    ASSERT_TRUE(write_all(a.get(), "ping", 4));
    ASSERT_TRUE(wait_event(s.ch, MP_EV_READ, nullptr, &ev, 3000)) << "A's data after the end";
    EXPECT_EQ(ev.result, 4);
}
