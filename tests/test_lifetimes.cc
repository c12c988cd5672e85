// test_lifetimes.cc — the core that front-ends stand on: the end of a handle's life (one
// CLOSED event once the kernel let go, dropped events release what they carry, no slot reuse
// before it), batch dispatch and mp_pending(), registration without probing, and the ABI
// (sized structs, one version).  Every test runs on both engines.
#include "test_util.h"

#include <fstream>

using namespace mpt;

namespace {

using Lifetimes = ChannelTest;

void *cookie_of(int i) { return (void *)(intptr_t)i; }

// Dispatch until the CLOSED event of h; every other event goes to *others.
bool wait_closed(mp_channel *ch, mp_handle *h, std::vector<mp_event> *others = nullptr,
                 int timeout_ms = 3000) {
    mp_event ev;
    return wait_event(
        ch, &ev, [&](const mp_event &e) { return e.cmd == MP_EV_CLOSED && e.handle == h; },
        timeout_ms, others);
}

// Connect n clients to port and wait until the server side has them queued.
std::vector<Fd> connect_n(uint16_t port, int n) {
    std::vector<Fd> v;
    for (int i = 0; i < n; i++) v.emplace_back(connect_client(port));
    sleep_ms(30);
    return v;
}

// ---------------------------------------------------------------------------------------------
// Ending a handle
// ---------------------------------------------------------------------------------------------

// A multishot listener is unregistered while three accepted connections wait in the event
// queue: the channel closes them (nobody else could), so the fd count returns to where it was.
TEST_F(Lifetimes, EndedListenerClosesUndeliveredAccepts) {
    int lfd = keep(make_listener(64));
    ASSERT_GE(lfd, 0);
    mp_handle *hl = reg(lfd, cookie_of(1));
    ASSERT_NE(hl, nullptr);
    ASSERT_EQ(mp_accept(hl, 0, 0), 0);
    ASSERT_EQ(mp_dispatch(ch, nullptr, 0), -EINVAL);
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0); // the accept is in the kernel now
    std::vector<Fd> clients = connect_n(local_port(lfd), 4);
    const int fds_before = count_fds();

    // One event handed out; the wait that produced it reaped the other three.
    ASSERT_EQ(mp_dispatch(ch, &ev, 2000), 1);
    ASSERT_EQ(ev.cmd, MP_EV_ACCEPT) << describe(ev);
    ASSERT_GE(ev.result, 0);
    ::close((int)ev.result);
    int queued = mp_pending(ch);
    ASSERT_GE(queued, 3) << "precondition: three ACCEPT events queued";
    EXPECT_EQ(count_fds(), fds_before + 3) << "three accepted fds nobody was told about";

    ASSERT_EQ(mp_unregister(hl), 0);
    std::vector<mp_event> others;
    ASSERT_TRUE(wait_closed(ch, hl, &others));
    EXPECT_EQ(ev.cookie, cookie_of(1));
    for (const mp_event &e : others) ADD_FAILURE() << "event of an ended listener: " << describe(e);
    EXPECT_EQ(count_fds(), fds_before) << "undelivered accepted connections were not closed";
    // The clients see their connections closed.
    for (size_t i = 1; i < clients.size(); i++) {
        char c;
        pollfd p = {clients[i].get(), POLLIN, 0};
        ASSERT_EQ(poll(&p, 1, 1000), 1) << "client " << i << " never saw its connection closed";
        EXPECT_LE(recv(clients[i].get(), &c, 1, 0), 0);
    }
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.handles, 0u);
}

// The same with lwsockets: the dropped ones are closed too (their clients see EOF), though no
// fd of them ever existed in the process.
TEST_F(Lifetimes, EndedListenerClosesUndeliveredLwsockets) {
    if (!is_uring(ch)) GTEST_SKIP() << "lwsockets need io_uring";
    int lfd = keep(make_listener(64));
    mp_handle *hl = reg(lfd, cookie_of(1));
    ASSERT_NE(hl, nullptr);
    ASSERT_EQ(mp_accept(hl, 0, MP_LWSOCKET), 0);
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0);
    std::vector<Fd> clients = connect_n(local_port(lfd), 4);
    ASSERT_EQ(mp_dispatch(ch, &ev, 2000), 1);
    ASSERT_EQ(ev.cmd, MP_EV_ACCEPT) << describe(ev);
    ASSERT_TRUE(mp_is_lwsocket((int)ev.result)) << describe(ev);
    if (mp_pending(ch) < 3) GTEST_SKIP() << "precondition: accepts were not reaped together";
    ASSERT_EQ(mp_close_accepted(ch, (int)ev.result), 0);
    EXPECT_EQ(mp_close_accepted(ch, (int)ev.result), -EBADF) << "double close";
    ASSERT_EQ(mp_unregister(hl), 0);
    std::vector<mp_event> others;
    ASSERT_TRUE(wait_closed(ch, hl, &others));
    for (const mp_event &e : others) ADD_FAILURE() << "event of an ended listener: " << describe(e);
    ASSERT_GE(mp_flush(ch), 0); // the queued closes
    for (auto &f : clients) {
        pollfd p = {f.get(), POLLIN, 0};
        ASSERT_EQ(poll(&p, 1, 2000), 1) << "an undelivered lwsocket was never closed";
        char c;
        EXPECT_LE(recv(f.get(), &c, 1, 0), 0);
    }
}

// An accepted lwsocket can be closed without registering it; bad ids are -EBADF.
TEST_F(Lifetimes, CloseAcceptedWithoutRegistering) {
    mp_options o = opts();
    o.max_lwsockets = 2;
    ch.reset(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    EXPECT_EQ(mp_close_accepted(nullptr, 3), -EBADF);
    EXPECT_EQ(mp_close_accepted(ch, -1), -EBADF);
    EXPECT_EQ(mp_close_accepted(ch, MP_LWSOCKET_BASE + 1), -EBADF) << "never accepted";
    int lfd = keep(make_listener(64));
    mp_handle *hl = reg(lfd, cookie_of(1));
    ASSERT_NE(hl, nullptr);
    ASSERT_EQ(mp_accept(hl, 0, MP_LWSOCKET), 0);
    const int fds0 = count_fds();
    std::vector<Fd> clients;
    // Three rounds of two through a table of two: only works if closing frees the slots.
    for (int round = 0; round < 3; round++) {
        std::vector<Fd> c = connect_n(local_port(lfd), 2);
        int got = 0;
        ASSERT_TRUE(pump(ch, 3000, [&](const mp_event &e) {
            if (e.cmd != MP_EV_ACCEPT) return false;
            EXPECT_GE(e.result, 0) << describe(e);
            if (e.result < 0) return false;
            EXPECT_EQ(mp_close_accepted(ch, (int)e.result), 0);
            return ++got == 2;
        })) << "round " << round << ": " << got << " of 2";
        ASSERT_GE(mp_flush(ch), 0); // closing an lwsocket is a queued request
        for (auto &f : c) {
            char b;
            pollfd p = {f.get(), POLLIN, 0};
            EXPECT_EQ(poll(&p, 1, 2000), 1) << "the client never saw its connection closed";
            EXPECT_LE(recv(f.get(), &b, 1, 0), 0);
        }
    }
    if (!is_uring(ch)) {
        EXPECT_EQ(count_fds(), fds0) << "regular fds closed by mp_close_accepted";
    }
    ASSERT_EQ(mp_unregister(hl), 0);
}

// A buffered READ event that was queued but not handed out when its handle ended gives its
// buffer back: bufs_in_use returns to what the application itself holds.
TEST_F(Lifetimes, DroppedBufferedReadReturnsItsBuffer) {
    Pair a, b;
    ASSERT_TRUE(tcp_pair(a) && tcp_pair(b));
    mp_handle *ha = mp_register(ch, a.a.get(), cookie_of(1), nullptr);
    mp_handle *hb = mp_register(ch, b.a.get(), cookie_of(2), nullptr);
    ASSERT_TRUE(ha && hb);
    int r = mp_read_buffered(ha);
    if (r == -ENOTSUP) GTEST_SKIP() << "no buffered reads on this engine";
    ASSERT_EQ(r, 0);
    ASSERT_EQ(mp_read_buffered(hb), 0);
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0); // both receives armed
    ASSERT_TRUE(write_all(a.b.get(), "aaaa", 4));
    ASSERT_TRUE(write_all(b.b.get(), "bbbb", 4));
    sleep_ms(30);
    ASSERT_EQ(mp_dispatch(ch, &ev, 2000), 1);
    ASSERT_EQ(ev.cmd, MP_EV_READ) << describe(ev);
    ASSERT_TRUE(ev.flags & MP_EVF_BUFFER);
    mp_handle *other = ev.handle == ha ? hb : ha;
    ASSERT_GE(mp_pending(ch), 1) << "precondition: the other READ is queued";
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    ASSERT_EQ(st.bufs_in_use, 2u);
    ASSERT_EQ(mp_unregister(other), 0);
    ASSERT_TRUE(wait_closed(ch, other));
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, 1u) << "the dropped READ kept its buffer";
    ASSERT_EQ(mp_buffer_release(ch, ev.u.read.buf_id), 0);
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, 0u);
    mp_handle *kept = ev.handle;
    ASSERT_EQ(mp_unregister(kept), 0);
    ASSERT_TRUE(wait_closed(ch, kept));
}

// Buffers live until the CLOSED event, and are the caller's after it: a read and a write in
// flight at mp_unregister; the test frees both at CLOSED (ASan checks that nothing in the
// library touches them afterwards), and a sentinel buffer shows the kernel wrote nothing into
// the read buffer after CLOSED.
TEST_F(Lifetimes, BuffersAreTheCallersAtClosed) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    set_bufs(p.server.get(), 16384, 0);
    set_bufs(p.client.get(), 0, 16384);
    mp_handle *h = reg(p.server.get(), cookie_of(7));
    ASSERT_NE(h, nullptr);
    const size_t RB = 4096, WB = 4u << 20;
    char *rbuf = (char *)malloc(RB);
    char *wbuf = (char *)malloc(WB);
    struct iovec *iov = (struct iovec *)malloc(2 * sizeof *iov);
    ASSERT_TRUE(rbuf && wbuf && iov);
    memset(wbuf, 'w', WB);
    iov[0] = {wbuf, WB / 2};
    iov[1] = {wbuf + WB / 2, WB / 2};
    ASSERT_EQ(mp_read(h, rbuf, RB), 0);
    ASSERT_EQ(mp_writev(h, iov, 2), 0);
    free(iov); // the iovec array is copied
    for (const mp_event &e : collect_events(ch, 100)) ADD_FAILURE() << describe(e);
    ASSERT_EQ(mp_unregister(h), 0);
    EXPECT_EQ(mp_unregister(h), -EBADF);
    EXPECT_EQ(mp_read(h, rbuf, RB), -EBADF);
    EXPECT_EQ(mp_write(h, wbuf, 1), -EBADF);
    bool closed = false;
    // The peer drains what was sent, so the kernel lets go of the write.
    std::vector<char> sink(1 << 16);
    int64_t until = now_ms() + 5000;
    while (!closed && now_ms() < until) {
        recv_some(p.client.get(), sink.data(), sink.size(), 5);
        for (const mp_event &e : collect_events(ch, 5)) {
            if (e.cmd == MP_EV_CLOSED && e.handle == h) {
                closed = true;
                EXPECT_EQ(e.cookie, cookie_of(7));
                EXPECT_EQ(e.result, 0);
            } else {
                ADD_FAILURE() << "after unregister: " << describe(e);
            }
        }
    }
    ASSERT_TRUE(closed) << "no CLOSED event";
    free(wbuf);
    memset(rbuf, 0x5a, RB);
    ASSERT_TRUE(write_all(p.client.get(), "late data", 9));
    sleep_ms(50);
    for (const mp_event &e : collect_events(ch, 20)) ADD_FAILURE() << describe(e);
    for (size_t i = 0; i < RB; i++)
        if (rbuf[i] != 0x5a) {
            ADD_FAILURE() << "the kernel wrote into a buffer after CLOSED (offset " << i << ")";
            break;
        }
    free(rbuf);
}

// A stale pointer never reaches another connection: the slot of an ended handle is not reused
// before its CLOSED event, so calls on the old pointer are -EBADF while a new connection runs.
TEST_F(Lifetimes, StalePointerNeverReachesANewConnection) {
    TcpPair &p1 = pair();
    TcpPair &p2 = pair();
    mp_handle *h1 = reg(p1.server.get(), cookie_of(1));
    ASSERT_NE(h1, nullptr);
    ASSERT_EQ(mp_unregister(h1), 0);
    mp_handle *h2 = reg(p2.server.get(), cookie_of(2));
    ASSERT_NE(h2, nullptr);
    EXPECT_NE(h1, h2) << "slot reused before its CLOSED event";
    EXPECT_EQ(mp_unregister(h1), -EBADF);
    char buf[8];
    EXPECT_EQ(mp_read(h1, buf, sizeof buf), -EBADF);
    EXPECT_EQ(mp_write(h1, "x", 1), -EBADF);
    ASSERT_EQ(mp_read(h2, buf, sizeof buf), 0);
    ASSERT_TRUE(write_all(p2.client.get(), "two", 3));
    mp_event ev;
    ASSERT_TRUE(wait_event(ch, MP_EV_READ, h2, &ev));
    EXPECT_EQ(ev.cookie, cookie_of(2));
    EXPECT_EQ(std::string(buf, 3), "two");
}

// ---------------------------------------------------------------------------------------------
// Batch dispatch
// ---------------------------------------------------------------------------------------------

using Dispatch = ChannelTest;

TEST_F(Dispatch, BatchHandsOutEveryEventOfOneWait) {
    const int N = 10;
    std::vector<TcpPair *> ps;
    std::vector<mp_handle *> hs;
    for (int i = 0; i < N; i++) {
        ps.push_back(&pair());
        hs.push_back(reg(ps.back()->server.get(), cookie_of(i)));
        ASSERT_NE(hs.back(), nullptr);
        ASSERT_TRUE(write_all(ps.back()->client.get(), "x", 1));
    }
    for (auto *p : ps) ASSERT_TRUE(wait_readable(p->server.get()));
    mp_event evs[32];
    ASSERT_EQ(mp_dispatch_batch(ch, evs, 32, 0), 0); // first use: ring enabled, fd registered
    for (auto *h : hs) ASSERT_EQ(mp_read(h, buffer(8), 8), 0);
    mp_stats s0, s1;
    ASSERT_EQ(mp_get_stats(ch, &s0), 0);
    int n = mp_dispatch_batch(ch, evs, 32, 2000);
    ASSERT_EQ(mp_get_stats(ch, &s1), 0);
    ASSERT_EQ(n, N) << "one call, every completed read";
    EXPECT_LE(s1.syscalls - s0.syscalls, is_uring(ch) ? 1u : 0u) << "one wait at most";
    std::set<void *> seen;
    for (int i = 0; i < n; i++) {
        EXPECT_EQ(evs[i].cmd, MP_EV_READ);
        EXPECT_EQ(evs[i].result, 1);
        seen.insert(evs[i].cookie);
    }
    EXPECT_EQ(seen.size(), (size_t)N);
    EXPECT_EQ(mp_pending(ch), 0);
    EXPECT_EQ(mp_dispatch_batch(ch, evs, 32, 0), 0);
    // max limits; the rest stays queued and costs no system call.
    for (int i = 0; i < N; i++) ASSERT_TRUE(write_all(ps[i]->client.get(), "y", 1));
    for (auto *p : ps) ASSERT_TRUE(wait_readable(p->server.get()));
    for (auto *h : hs) ASSERT_EQ(mp_read(h, buffer(8), 8), 0);
    int total = mp_dispatch_batch(ch, evs, 3, 2000);
    ASSERT_EQ(total, 3);
    ASSERT_EQ(mp_get_stats(ch, &s0), 0);
    EXPECT_GE(mp_pending(ch), N - 3);
    while (total < N) {
        int k = mp_dispatch_batch(ch, evs, 3, 0);
        ASSERT_GT(k, 0);
        total += k;
    }
    ASSERT_EQ(mp_get_stats(ch, &s1), 0);
    EXPECT_EQ(s1.syscalls, s0.syscalls) << "queued events were handed out with system calls";
}

// The caller tells the size of its mp_event: a bigger record (a newer header) gets the known
// part and zeros; a smaller one than the first version is refused.
TEST_F(Dispatch, RecordSizeIsTheCallers) {
    EXPECT_EQ(mp_dispatch_events(ch, nullptr, sizeof(mp_event), 4, 0), -EINVAL);
    mp_event one;
    EXPECT_EQ(mp_dispatch_events(ch, &one, sizeof(mp_event), 0, 0), -EINVAL);
    EXPECT_EQ(mp_dispatch_events(ch, &one, sizeof(mp_event) - 8, 1, 0), -EINVAL);
    EXPECT_EQ(mp_dispatch_events(nullptr, &one, sizeof(mp_event), 1, 0), -EBADF);
    EXPECT_EQ(mp_pending(nullptr), -EBADF);
    struct Big {
        mp_event ev;
        char extra[24];
    };
    Big big[4];
    memset(big, 0xee, sizeof big);
    for (int i = 0; i < 2; i++) ASSERT_EQ(mp_wake(ch), 0);
    TcpPair &p = pair();
    mp_handle *h = reg(p.server.get(), cookie_of(5));
    ASSERT_EQ(mp_unregister(h), 0); // a CLOSED event
    int n = mp_dispatch_events(ch, &big[0].ev, sizeof(Big), 4, 1000);
    ASSERT_GE(n, 1);
    bool closed = false;
    for (int i = 0; i < n; i++) {
        for (char c : big[i].extra) EXPECT_EQ(c, 0) << "tail of a bigger record not zeroed";
        if (big[i].ev.cmd == MP_EV_CLOSED) closed = big[i].ev.cookie == cookie_of(5);
    }
    for (int i = n; i < 4; i++) EXPECT_EQ((unsigned char)big[i].extra[0], 0xee) << "wrote past n";
    if (!closed) {
        mp_event ev;
        ASSERT_TRUE(wait_event(ch, MP_EV_CLOSED, h, &ev, 1000));
    }
}

// ---------------------------------------------------------------------------------------------
// Registration without probing
// ---------------------------------------------------------------------------------------------

TEST_F(Lifetimes, RegisteringAnAcceptedConnectionMakesNoProbe) {
    int lfd = keep(make_listener(64));
    mp_handle *hl = reg(lfd, cookie_of(1));
    ASSERT_NE(hl, nullptr);
    ASSERT_EQ(mp_accept(hl, 0, 0), 0);
    std::vector<Fd> clients = connect_n(local_port(lfd), 8);
    int done = 0;
    std::vector<int> fds;
    ASSERT_TRUE(pump(ch, 3000, [&](const mp_event &e) {
        if (e.cmd != MP_EV_ACCEPT || e.result < 0) return false;
        mp_stats a, b;
        mp_get_stats(ch, &a);
        mp_handle *h = mp_register(ch, (int)e.result, nullptr, nullptr);
        mp_get_stats(ch, &b);
        EXPECT_NE(h, nullptr);
        EXPECT_EQ(b.probes, a.probes) << "probed a connection the channel accepted itself";
        EXPECT_EQ(b.syscalls - a.syscalls, is_uring(ch) ? 0u : 1u)
            << "io_uring: no system call; epoll: the one epoll_ctl";
        if (h) mp_unregister(h);
        fds.push_back((int)e.result);
        return ++done == 8;
    }));
    // A foreign fd is probed, and the probes are counted.
    TcpPair &p = pair();
    mp_stats a, b;
    mp_get_stats(ch, &a);
    mp_handle *h = reg(p.server.get());
    mp_get_stats(ch, &b);
    ASSERT_NE(h, nullptr);
    EXPECT_GT(b.probes, a.probes);
    EXPECT_GE(b.syscalls - a.syscalls, b.probes - a.probes);
    for (const mp_event &e : collect_events(ch, 50)) EXPECT_EQ(e.cmd, MP_EV_CLOSED) << describe(e);
    for (int fd : fds) ::close(fd);
}

// mp_register_connected(): a connection the caller vouches for is registered without a probe
// (io_uring: no system call at all) and works; the errors it can tell without one.
TEST_F(Lifetimes, RegisterConnectedMakesNoProbeAndWorks) {
    TcpPair &p = pair();
    mp_stats a, b;
    mp_get_stats(ch, &a);
    mp_handle *h = mp_register_connected(ch, p.server.get(), cookie_of(3));
    mp_get_stats(ch, &b);
    ASSERT_NE(h, nullptr) << strerror(errno);
    EXPECT_EQ(b.probes, a.probes);
    EXPECT_EQ(b.syscalls - a.syscalls, is_uring(ch) ? 0u : 1u);
    EXPECT_EQ(mp_cookie(h), cookie_of(3));
    errno = 0;
    EXPECT_EQ(mp_register_connected(ch, p.server.get(), nullptr), nullptr);
    EXPECT_EQ(errno, EEXIST);
    EXPECT_EQ(mp_register_connected(ch, -1, nullptr), nullptr);
    EXPECT_EQ(errno, EBADF);
    EXPECT_EQ(mp_register_connected(nullptr, p.server.get(), nullptr), nullptr);
    EXPECT_EQ(errno, EBADF);
    // It reads and writes like any registered connection.
    char buf[8];
    ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
    ASSERT_EQ(::write(p.client.get(), "ping", 4), 4);
    ASSERT_EQ(mp_write(h, "pong", 4), 0);
    int got = 0;
    ASSERT_TRUE(pump(ch, 3000, [&](const mp_event &e) {
        if (e.cmd == MP_EV_READ || e.cmd == MP_EV_WRITE) {
            EXPECT_EQ(e.result, 4);
        }
        return (e.cmd == MP_EV_READ || e.cmd == MP_EV_WRITE) && ++got == 2;
    }));
    EXPECT_EQ(memcmp(buf, "ping", 4), 0);
    char in[4];
    ASSERT_EQ(::read(p.client.get(), in, 4), 4);
    EXPECT_EQ(memcmp(in, "pong", 4), 0);
    mp_unregister(h);
}

// ---------------------------------------------------------------------------------------------
// ABI: one version, sized structs
// ---------------------------------------------------------------------------------------------

TEST(Abi, OneVersionEverywhere) {
    EXPECT_EQ(mp_version(), MEGAPIPE_VERSION);
    char want[32];
    snprintf(want, sizeof want, "%d.%d.%d", MEGAPIPE_VERSION_MAJOR, MEGAPIPE_VERSION_MINOR,
             MEGAPIPE_VERSION_PATCH);
    EXPECT_STREQ(mp_version_string(), want);
#ifdef MP_BUILD_DIR
    std::ifstream pc(std::string(MP_BUILD_DIR) + "/megapipe.pc");
    ASSERT_TRUE(pc.good()) << "no megapipe.pc in the build directory";
    std::string line, ver;
    while (std::getline(pc, line))
        if (line.rfind("Version:", 0) == 0) ver = line.substr(line.find_first_not_of(" ", 8));
    EXPECT_EQ(ver, want) << "megapipe.pc disagrees with megapipe.h";
    std::ifstream cv(std::string(MP_BUILD_DIR) + "/megapipeConfigVersion.cmake");
    ASSERT_TRUE(cv.good());
    std::string all((std::istreambuf_iterator<char>(cv)), std::istreambuf_iterator<char>());
    EXPECT_NE(all.find("PACKAGE_VERSION \"" + std::string(want) + "\""), std::string::npos)
        << "the CMake package disagrees with megapipe.h";
#endif
}

TEST(Abi, OptionsAndStatsAreSized) {
    // A program built against an older, shorter mp_options: fields past its size are not read.
    mp_options o;
    memset(&o, 0x7f, sizeof o); // garbage past the old size
    mp_options_init_sized(&o, offsetof(mp_options, buf_per_conn));
    EXPECT_EQ(o.size, offsetof(mp_options, buf_per_conn));
    o.log = 0;
    mp_channel *ch = mp_create(&o);
    ASSERT_NE(ch, nullptr) << "an older, shorter mp_options was refused: " << strerror(errno);
    mp_destroy(ch);
    // Not made by mp_options_init: refused, not misread.
    mp_options z;
    memset(&z, 0, sizeof z);
    errno = 0;
    EXPECT_EQ(mp_create(&z), nullptr);
    EXPECT_EQ(errno, EINVAL);

    Channel c(mp_create(nullptr));
    ASSERT_NE(c.get(), nullptr);
    mp_stats st;
    memset(&st, 0xab, sizeof st);
    const size_t old = offsetof(mp_stats, probes); // the first version ended at handles
    ASSERT_EQ(mp_get_stats_sized(c, &st, old), 0);
    EXPECT_EQ(st.size, old);
    EXPECT_EQ(st.probes, 0xababababababababull) << "wrote past the caller's size";
    EXPECT_EQ(mp_get_stats_sized(c, &st, old - 8), -EINVAL);
    ASSERT_EQ(mp_get_stats(c, &st), 0);
    EXPECT_EQ(st.size, sizeof st);
}

} // namespace

namespace {

// One-shot accepts (a small lwsocket table keeps the engine off multishot; so do count-limited
// mp_accept calls) still take a burst of connections in a few waits, not one per wait.
TEST(AcceptBurst, OneShotAcceptsTakeManyPerWait) {
    mp_options o = opts();
    o.max_lwsockets = 256;
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    Fd lfd(make_listener(256));
    mp_handle *hl = mp_register(ch, lfd.get(), nullptr, nullptr);
    ASSERT_NE(hl, nullptr);
    ASSERT_EQ(mp_accept(hl, 0, MP_LWSOCKET), 0);
    mp_event evs[64];
    ASSERT_EQ(mp_dispatch_batch(ch, evs, 64, 0), 0); // armed
    const int N = 32;
    std::vector<Fd> clients;
    for (int i = 0; i < N; i++) clients.emplace_back(connect_client(local_port(lfd.get())));
    sleep_ms(30);
    mp_stats s0, s1;
    ASSERT_EQ(mp_get_stats(ch, &s0), 0);
    int got = 0, calls = 0;
    while (got < N && calls < 100) {
        int n = mp_dispatch_batch(ch, evs, 64, 1000);
        ASSERT_GE(n, 0);
        calls++;
        for (int i = 0; i < n; i++) {
            ASSERT_EQ(evs[i].cmd, MP_EV_ACCEPT);
            ASSERT_GE(evs[i].result, 0);
            ASSERT_EQ(mp_close_accepted(ch, (int)evs[i].result), 0);
            got++;
        }
    }
    ASSERT_EQ(mp_get_stats(ch, &s1), 0);
    EXPECT_EQ(got, N);
    if (is_uring(ch)) { // (the epoll engine makes one accept4 per connection, by design)
        EXPECT_LE(s1.syscalls - s0.syscalls, (uint64_t)N / 4)
            << "accepting " << N << " queued connections took a system call each";
    }
}

} // namespace
