// test_accept_exclusive.cc — mp_accept(..., MP_ACCEPT_EXCLUSIVE) on a listener registered
// without a partition: every connection is still one ACCEPT event, in order and intact, and
// on io_uring one multishot accept serves them all (a handful of accept requests for 40
// connections, where one-shot accepts take one request each).  mp_accept_share() makes the
// listener shared again: another channel accepting from the same socket then gets its turns,
// and no connection is lost on the way.  Both engines.
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "test_util.h"

using namespace mpt;

namespace {

// Accept n connections made one after another on a shared listener with these mp_accept
// flags; returns the submission entries the channel handed to the kernel meanwhile (only
// accepts: the accepted fds are closed unregistered), or -1 on failure.
long accept_n(int flags, int n) {
    uint16_t port = 0;
    int lfd = plain_listener(&port);
    if (lfd < 0) return -1;
    mp_options o = opts();
    Channel ch(mp_create(&o));
    if (!ch.get()) return -1;
    mp_handle *hl = mp_register(ch, lfd, nullptr, nullptr);
    EXPECT_NE(hl, nullptr) << strerror(errno);
    if (!hl) return -1;
    EXPECT_EQ(mp_accept(hl, 0, flags), 0);
    EXPECT_GE(mp_flush(ch), 0);
    mp_stats before;
    mp_get_stats(ch, &before);
    for (int i = 0; i < n; i++) {
        int c = connect_client(port);
        EXPECT_GE(c, 0);
        if (c < 0) return -1;
        mp_event ev;
        bool got = false;
        for (auto dl = deadline_in(3000); !got && std::chrono::steady_clock::now() < dl;)
            if (mp_dispatch(ch, &ev, 50) == 1 && ev.cmd == MP_EV_ACCEPT) got = true;
        EXPECT_TRUE(got) << "connection " << i << " not accepted";
        if (!got) return -1;
        EXPECT_GE(ev.result, 0);
        // the accepted socket is this client's
        EXPECT_EQ(peer_port((int)ev.result), local_port(c));
        ::close((int)ev.result);
        ::close(c);
    }
    mp_stats after;
    mp_get_stats(ch, &after);
    mp_unregister(hl);
    mp_event ev;
    for (auto dl = deadline_in(1000); std::chrono::steady_clock::now() < dl;)
        if (mp_dispatch(ch, &ev, 50) == 1 && ev.cmd == MP_EV_CLOSED) break;
    ch.reset(nullptr);
    ::close(lfd);
    return (long)(after.sqes - before.sqes);
}

// Connect n clients to port one after another, each waited for until channel a or b accepted
// it (3 s).  Adds the clients' source ports to *ports and their fds to *fds; false when one
// was not accepted in time.
bool connect_one_by_one(uint16_t port, int n, ChannelThread &a, ChannelThread &b,
                        std::vector<uint16_t> *ports, std::vector<Fd> *fds) {
    for (int i = 0; i < n; i++) {
        size_t before = a.accepted() + b.accepted();
        int c = connect_client(port);
        if (c < 0) return false;
        fds->emplace_back(c);
        ports->push_back(local_port(c));
        auto dl = deadline_in(3000);
        while (a.accepted() + b.accepted() == before) {
            if (std::chrono::steady_clock::now() >= dl) return false;
            sleep_ms(1);
        }
    }
    return true;
}

} // namespace

TEST(AcceptExclusive, FlagIsKnown) {
    uint16_t port = 0;
    int lfd = plain_listener(&port);
    ASSERT_GE(lfd, 0);
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    mp_handle *hl = mp_register(ch, lfd, nullptr, nullptr);
    ASSERT_NE(hl, nullptr);
    EXPECT_EQ(mp_accept(hl, 0, MP_ACCEPT_EXCLUSIVE), 0);
    EXPECT_EQ(mp_accept(hl, 0, MP_ACCEPT_EXCLUSIVE | 0x100), -EINVAL);
    ch.reset(nullptr);
    ::close(lfd);
}

TEST(AcceptExclusive, OneMultishotServesEveryConnection) {
    const int n = 40;
    long excl = accept_n(MP_ACCEPT_EXCLUSIVE, n);
    long turns = accept_n(0, n);
    ASSERT_GE(excl, 0);
    ASSERT_GE(turns, 0);
    mp_options o = opts();
    Channel probe(mp_create(&o));
    ASSERT_NE(probe.get(), nullptr);
    if (is_uring(probe)) {
        // one multishot (re-armed only if the kernel ended it) vs one request per connection
        EXPECT_LE(excl, 4) << "exclusive accepts should not be re-armed per connection";
        EXPECT_GE(turns, n) << "one-shot accepts take one request per connection";
    }
}

// mp_accept_share(): errors, idempotence, and the thread rule.
TEST(AcceptExclusive, ShareChecksItsHandle) {
    EXPECT_EQ(mp_accept_share(nullptr), -EBADF);
    uint16_t port = 0;
    Fd lfd(plain_listener(&port));
    ASSERT_TRUE(lfd.ok());
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    int pr[2];
    ASSERT_EQ(pipe2(pr, O_CLOEXEC | O_NONBLOCK), 0);
    Fd pr0(pr[0]), pr1(pr[1]);
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    mp_handle *hl = mp_register(ch, lfd.get(), nullptr, nullptr);
    ASSERT_NE(hl, nullptr);
    mp_handle *hc = mp_register(ch, p.a.get(), nullptr, nullptr);
    ASSERT_NE(hc, nullptr);
    mp_handle *hp = mp_poll_add(ch, pr0.get(), EPOLLIN, 0, nullptr);
    ASSERT_NE(hp, nullptr);
    EXPECT_EQ(mp_accept_share(hc), -EINVAL) << "a connection is not a listener";
    EXPECT_EQ(mp_accept_share(hp), -EINVAL) << "a readiness watch is not a listener";
    EXPECT_EQ(mp_accept_share(hl), 0) << "a listener that was never exclusive";
    ASSERT_EQ(mp_accept(hl, 0, MP_ACCEPT_EXCLUSIVE), 0);
    ASSERT_GE(mp_flush(ch), 0);
    int other = 1;
    std::thread([&] { other = mp_accept_share(hl); }).join();
    EXPECT_EQ(other, -EPERM);
    EXPECT_EQ(mp_accept_share(hl), 0);
    EXPECT_EQ(mp_accept_share(hl), 0) << "not idempotent";
    // Still accepting after all that.
    Fd c(connect_client(port));
    ASSERT_TRUE(c.ok());
    mp_event ev;
    ASSERT_TRUE(wait_cmd(ch, &ev, MP_EV_ACCEPT, hl, 3000));
    ASSERT_GE(ev.result, 0) << describe(ev);
    EXPECT_EQ(peer_port((int)ev.result), local_port(c.get()));
    ::close((int)ev.result);
    EXPECT_EQ(mp_unregister(hl), 0);
    EXPECT_EQ(mp_accept_share(hl), -EBADF) << "an ended listener";
    EXPECT_EQ(mp_unregister(hc), 0);
    EXPECT_EQ(mp_poll_del(hp), 0);
}

// Two channels accept from one socket: a with MP_ACCEPT_EXCLUSIVE, b with shared (one-shot)
// accepts.  After mp_accept_share(a's listener), b gets its turns, a keeps accepting, and every
// connection, including those made while the share happens, is accepted exactly once.
TEST(AcceptExclusive, ShareLetsAnotherChannelAccept) {
    const int n = 40;
    uint16_t port = 0;
    Fd lfd(plain_listener(&port));
    ASSERT_TRUE(lfd.ok());
    std::vector<Fd> clients;
    std::vector<uint16_t> ports;
    mp_options o = opts();
    {
        ChannelThread a(-1, &o), b(-1, &o);
        ASSERT_TRUE(a.ok() && b.ok());
        int fd = lfd.get();
        mp_handle *ha = a.run([fd](mp_channel *ch) -> mp_handle * {
            mp_handle *h = mp_register(ch, fd, nullptr, nullptr);
            if (!h || mp_accept(h, 0, MP_ACCEPT_EXCLUSIVE) != 0 || mp_flush(ch) < 0) return nullptr;
            return h;
        });
        ASSERT_NE(ha, nullptr);
        mp_handle *hb = b.run([fd](mp_channel *ch) -> mp_handle * {
            mp_handle *h = mp_register(ch, fd, nullptr, nullptr);
            if (!h || mp_accept(h, 0, 0) != 0 || mp_flush(ch) < 0) return nullptr;
            return h;
        });
        ASSERT_NE(hb, nullptr);
        bool uring = a.engine() == "uring";

        // Exclusive: on io_uring a's multishot stays first in the socket's wait queue (b gets
        // at most the connections its first one-shots found queued).
        ASSERT_TRUE(connect_one_by_one(port, n, a, b, &ports, &clients));
        size_t a1 = a.accepted(), b1 = b.accepted();
        if (uring) {
            EXPECT_LT(b1, (size_t)n / 4) << "exclusive: the other channel should get next to "
                                            "nothing (a " << a1 << ", b " << b1 << ")";
        }

        // Connections waiting (or taken by the multishot, not yet reaped) while the share
        // happens: each must still be accepted by one of the channels.
        std::vector<int> burst = a.run([port, ha](mp_channel *) {
            std::vector<int> fds;
            for (int i = 0; i < 8; i++) fds.push_back(connect_client(port));
            fds.push_back(mp_accept_share(ha));
            fds.push_back(mp_accept_share(ha));
            return fds;
        });
        EXPECT_EQ(burst[8], 0);
        EXPECT_EQ(burst[9], 0) << "mp_accept_share is idempotent";
        for (int i = 0; i < 8; i++) {
            ASSERT_GE(burst[i], 0);
            clients.emplace_back(burst[i]);
            ports.push_back(local_port(burst[i]));
        }
        for (auto dl = deadline_in(3000); a.accepted() + b.accepted() < ports.size() &&
                                          std::chrono::steady_clock::now() < dl;)
            sleep_ms(1);
        EXPECT_EQ(a.accepted() + b.accepted(), ports.size()) << "connections lost in the share";

        // Shared: on io_uring both take turns (one-shot accepts, each re-armed at the back of
        // the queue: here they alternate).  The epoll engine accepts the same way either way
        // (both channels race their accept4() at readiness), so only the accounting below
        // holds there.
        size_t a2 = a.accepted(), b2 = b.accepted();
        ASSERT_TRUE(connect_one_by_one(port, n, a, b, &ports, &clients));
        size_t a3 = a.accepted() - a2, b3 = b.accepted() - b2;
        if (uring) {
            EXPECT_GE(b3, (size_t)n / 4) << "after mp_accept_share the other channel gets its "
                                            "turns (a " << a3 << ", b " << b3 << "; before: a "
                                         << a1 << ", b " << b1 << ")";
            EXPECT_GE(a3, (size_t)n / 4) << "the shared listener keeps accepting";
        }

        std::vector<uint16_t> got = a.take_ports(), gb = b.take_ports();
        got.insert(got.end(), gb.begin(), gb.end());
        std::sort(got.begin(), got.end());
        std::vector<uint16_t> want = ports;
        std::sort(want.begin(), want.end());
        EXPECT_EQ(got, want) << "every connection accepted exactly once";
        EXPECT_EQ(a.accept_errors() + b.accept_errors(), 0);
        EXPECT_EQ(a.odd_events() + b.odd_events(), 0);
        a.run([ha](mp_channel *) { return mp_unregister(ha); });
        b.run([hb](mp_channel *) { return mp_unregister(hb); });
    }
}
