// test_accept_exclusive.cc — mp_accept(..., MP_ACCEPT_EXCLUSIVE) on a listener registered
// without a partition: every connection is still one ACCEPT event, in order and intact, and
// on io_uring one multishot accept serves them all (a handful of accept requests for 40
// connections, where one-shot accepts take one request each).  Both engines.
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
