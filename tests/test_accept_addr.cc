// test_accept_addr.cc — mp_accept(..., MP_ACCEPT_ADDR): every ACCEPT event carries its own
// connection's peer address (u.accept.addr / addrlen), on a partition and on a shared
// listener, as fds and as lwsockets, for connections that arrive together (on io_uring one
// multishot pass: only the latest address is in its buffer, the others are looked up) and are
// handed out in one batch; connections that come one at a time need no lookup; the addresses
// stay readable until the next dispatch; without the flag the event carries none; a listener
// with such accepts in flight ends cleanly.  Both engines.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>
#include <set>
#include <vector>

#include "test_util.h"

using namespace mpt;

namespace {

struct Seen {
    int id;
    sockaddr_storage addr;
    socklen_t len;
};

// A listener on 127.0.0.1: a partition (every usable CPU) or a plain shared listening socket.
struct Listener {
    Fd lfd;
    uint16_t port = 0;
    mp_handle *h = nullptr;
    Listener(mp_channel *ch, bool partition) {
        if (partition) {
            lfd.reset(mp_listen_loopback(&port, 256));
            std::vector<int> cpus = usable_cpus();
            cpu_set_t all;
            CPU_ZERO(&all);
            for (int c : cpus) CPU_SET(c, &all);
            if (lfd.ok()) h = mp_register(ch, lfd.get(), nullptr, &all);
        } else {
            lfd.reset(plain_listener(&port));
            if (lfd.ok()) h = mp_register(ch, lfd.get(), nullptr, nullptr);
        }
    }
};

// Connect n clients at once, then dispatch in batches of up to 8 until n ACCEPT events came.
// Checks, per batch, that each event's address is still what it was when handed out after the
// whole batch was looked at (no two events share storage), and returns what each carried.
std::vector<Seen> accept_burst(mp_channel *ch, uint16_t port, int n, std::vector<Fd> *clients) {
    for (int i = 0; i < n; i++) {
        clients->emplace_back(connect_client(port));
        EXPECT_TRUE(clients->back().ok());
    }
    std::vector<Seen> out;
    for (auto dl = deadline_in(5000); (int)out.size() < n && std::chrono::steady_clock::now() < dl;) {
        mp_event evs[8];
        int k = mp_dispatch_batch(ch, evs, 8, 50);
        EXPECT_GE(k, 0);
        std::vector<Seen> batch;
        for (int i = 0; i < k; i++) {
            if (evs[i].cmd != MP_EV_ACCEPT) continue;
            EXPECT_GE(evs[i].result, 0);
            Seen s{(int)evs[i].result, {}, evs[i].u.accept.addrlen};
            if (evs[i].u.accept.addr) {
                EXPECT_LE(s.len, sizeof s.addr);
                std::memcpy(&s.addr, evs[i].u.accept.addr, s.len);
            } else {
                s.len = 0;
                EXPECT_EQ(evs[i].u.accept.addrlen, 0u);
            }
            batch.push_back(s);
        }
        // Still there at the end of the batch: each event points to its own copy.
        for (int i = 0, j = 0; i < k; i++) {
            if (evs[i].cmd != MP_EV_ACCEPT) continue;
            if (evs[i].u.accept.addr) {
                EXPECT_EQ(std::memcmp(evs[i].u.accept.addr, &batch[j].addr, batch[j].len), 0)
                    << "event " << i << "'s address changed before the next dispatch";
            }
            j++;
        }
        out.insert(out.end(), batch.begin(), batch.end());
    }
    EXPECT_EQ((int)out.size(), n);
    return out;
}

uint16_t port_of(const Seen &s) {
    if (s.len < sizeof(sockaddr_in) || s.addr.ss_family != AF_INET) return 0;
    return ntohs(((const sockaddr_in *)&s.addr)->sin_port);
}

void end_listener(mp_channel *ch, mp_handle *h) {
    ASSERT_EQ(mp_unregister(h), 0);
    bool closed = false;
    mp_event ev;
    for (auto dl = deadline_in(2000); !closed && std::chrono::steady_clock::now() < dl;)
        if (mp_dispatch(ch, &ev, 50) == 1 && ev.cmd == MP_EV_CLOSED && ev.handle == h)
            closed = true;
    EXPECT_TRUE(closed) << "the listener's accepts in flight were not all cancelled";
}

// Every connection of a burst, accepted with MP_ACCEPT_ADDR (and these other flags), carries
// its own client's address.
void check_addresses(bool partition, int extra_flags) {
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    Listener l(ch, partition);
    ASSERT_TRUE(l.lfd.ok());
    ASSERT_NE(l.h, nullptr) << strerror(errno);
    ASSERT_EQ(mp_accept(l.h, 0, MP_ACCEPT_ADDR | extra_flags), 0);
    ASSERT_GE(mp_flush(ch), 0);
    const int n = 24;
    std::vector<Fd> clients;
    std::vector<Seen> seen = accept_burst(ch, l.port, n, &clients);
    std::set<uint16_t> want;
    for (auto &c : clients) want.insert(local_port(c.get()));
    std::set<uint16_t> got;
    for (const Seen &s : seen) {
        ASSERT_EQ(s.len, sizeof(sockaddr_in)) << "no or a wrong-sized address";
        const sockaddr_in *a = (const sockaddr_in *)&s.addr;
        EXPECT_EQ(a->sin_family, AF_INET);
        EXPECT_EQ(ntohl(a->sin_addr.s_addr), INADDR_LOOPBACK);
        uint16_t p = port_of(s);
        got.insert(p);
        if (!mp_is_lwsocket(s.id)) {
            // the address is this very connection's
            EXPECT_EQ(p, peer_port(s.id));
            ::close(s.id);
        } else {
            EXPECT_EQ(mp_close_accepted(ch, s.id), 0);
        }
    }
    EXPECT_EQ(got, want) << "each client's address once";
    end_listener(ch, l.h);
}

} // namespace

TEST(AcceptAddr, FlagIsKnown) {
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    Listener l(ch, false);
    ASSERT_NE(l.h, nullptr);
    EXPECT_EQ(mp_accept(l.h, 0, MP_ACCEPT_ADDR), 0);
    EXPECT_EQ(mp_accept(l.h, 0, MP_ACCEPT_ADDR | 0x100), -EINVAL);
    EXPECT_EQ(mp_accept(l.h, 0, MP_ACCEPT_ADDR_KNOWN), -EINVAL) << "KNOWN without ADDR";
    EXPECT_EQ(mp_accept(l.h, 0, MP_ACCEPT_ADDR | MP_ACCEPT_ADDR_KNOWN), 0);
    end_listener(ch, l.h);
}

TEST(AcceptAddr, PartitionEveryEventCarriesItsPeer) { check_addresses(true, 0); }

TEST(AcceptAddr, SharedListenerEveryEventCarriesItsPeer) { check_addresses(false, 0); }

TEST(AcceptAddr, ExclusiveListenerEveryEventCarriesItsPeer) {
    check_addresses(false, MP_ACCEPT_EXCLUSIVE);
}

TEST(AcceptAddr, LwsocketsCarryTheirPeer) { check_addresses(true, MP_LWSOCKET); }

// A count-limited accept: exactly that many events, each with its address.
TEST(AcceptAddr, CountLimited) {
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    Listener l(ch, true);
    ASSERT_NE(l.h, nullptr);
    ASSERT_EQ(mp_accept(l.h, 3, MP_ACCEPT_ADDR), 0);
    std::vector<Fd> clients;
    std::vector<Seen> seen = accept_burst(ch, l.port, 3, &clients);
    for (const Seen &s : seen) {
        EXPECT_EQ(port_of(s), peer_port(s.id));
        ::close(s.id);
    }
    end_listener(ch, l.h);
}

// Without the flag no address is carried (and nothing is allocated for one).
TEST(AcceptAddr, WithoutTheFlagNone) {
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    Listener l(ch, true);
    ASSERT_NE(l.h, nullptr);
    ASSERT_EQ(mp_accept(l.h, 0, 0), 0);
    std::vector<Fd> clients;
    std::vector<Seen> seen = accept_burst(ch, l.port, 4, &clients);
    for (const Seen &s : seen) {
        EXPECT_EQ(s.len, 0u);
        ::close(s.id);
    }
    end_listener(ch, l.h);
}

// Connections that come one at a time: each one's address is the one its accept wrote, no
// getpeername() (on io_uring the multishot's buffer held only that connection's).
TEST(AcceptAddr, OneAtATimeNeedsNoLookup) {
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    Listener l(ch, true);
    ASSERT_NE(l.h, nullptr);
    ASSERT_EQ(mp_accept(l.h, 0, MP_ACCEPT_ADDR), 0);
    ASSERT_GE(mp_flush(ch), 0);
    const int n = 12;
    for (int i = 0; i < n; i++) {
        std::vector<Fd> clients;
        std::vector<Seen> seen = accept_burst(ch, l.port, 1, &clients);
        ASSERT_EQ(seen.size(), 1u);
        EXPECT_EQ(port_of(seen[0]), local_port(clients[0].get()));
        ::close(seen[0].id);
    }
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.peer_lookups, 0u) << "addresses asked for although none was overwritten";
    end_listener(ch, l.h);
}

// MP_ACCEPT_ADDR_KNOWN: a burst (on io_uring one multishot pass) is never looked up; each event
// carries its own connection's address or none, and the latest of each pass carries its own
// (on epoll every one: accept4() fills them in).
TEST(AcceptAddr, KnownOnlyNeverLooksUp) {
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    Listener l(ch, true);
    ASSERT_NE(l.h, nullptr);
    ASSERT_EQ(mp_accept(l.h, 0, MP_ACCEPT_ADDR | MP_ACCEPT_ADDR_KNOWN), 0);
    ASSERT_GE(mp_flush(ch), 0);
    const int n = 24;
    std::vector<Fd> clients;
    std::vector<Seen> seen = accept_burst(ch, l.port, n, &clients);
    int with = 0;
    for (const Seen &s : seen) {
        if (s.len) {
            with++;
            EXPECT_EQ(s.len, sizeof(sockaddr_in));
            EXPECT_EQ(port_of(s), peer_port(s.id)) << "an address that is not this connection's";
        }
        ::close(s.id);
    }
    EXPECT_GE(with, 1) << "not even a pass's latest connection carried its address";
    if (std::string(mp_engine_name(ch)) == "epoll") {
        EXPECT_EQ(with, n);
    }
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.peer_lookups, 0u) << "getpeername() although the application asks itself";
    end_listener(ch, l.h);
}
