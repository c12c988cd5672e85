// test_badinput.cc — bad input never aborts: bad handles are -EBADF, bad arguments -EINVAL,
// resource exhaustion is an event and the channel keeps working, and nothing leaks.
#include <sys/resource.h>

#include <set>

#include "megapipe.h"
#include "test_util.h"

using namespace mpt;

namespace {

class BadInput : public ChannelTest {};

// A channel with MP_LWSOCKET on and a direct-descriptor table of max_lwsockets.
mp_channel *lwsocket_channel(int max_lwsockets) {
    mp_options opt;
    mp_options_init(&opt);
    opt.max_lwsockets = max_lwsockets;
    opt.lwsocket = 1;
    return mp_create(&opt);
}

void *cookie_of(int n) { return reinterpret_cast<void *>(static_cast<intptr_t>(n)); }

// Every handle-taking call on h must say -EBADF.
void expect_all_ebadf(mp_handle *h, const char *what) {
    SCOPED_TRACE(what);
    char buf[16] = {0};
    struct iovec iov = {buf, sizeof buf};
    sockaddr_in a = loopback_addr(1);
    cpu_set_t mask;
    CPU_ZERO(&mask);
    CPU_SET(0, &mask);
    EXPECT_EQ(mp_read(h, buf, sizeof buf), -EBADF);
    EXPECT_EQ(mp_read_buffered(h), -EBADF);
    EXPECT_EQ(mp_write(h, buf, sizeof buf), -EBADF);
    EXPECT_EQ(mp_writev(h, &iov, 1), -EBADF);
    EXPECT_EQ(mp_disconnect(h), -EBADF);
    EXPECT_EQ(mp_connect(h, (sockaddr *)&a, sizeof a), -EBADF);
    EXPECT_EQ(mp_accept(h, 1, 0), -EBADF);
    EXPECT_EQ(mp_accept(h, 0, MP_LWSOCKET), -EBADF);
    EXPECT_EQ(mp_export_fd(h), -EBADF);
    EXPECT_EQ(mp_handle_fd(h), -EBADF);
    EXPECT_EQ(mp_cookie(h), nullptr);
    EXPECT_EQ(mp_set_cpu_mask(h, &mask), -EBADF);
    EXPECT_EQ(mp_poll_mod(h, 0x001 /* EPOLLIN */, 0), -EBADF);
    EXPECT_EQ(mp_poll_del(h), -EBADF);
    EXPECT_EQ(mp_unregister(h), -EBADF);
    EXPECT_EQ(mp_unregister(h), -EBADF);
}

// ---------------------------------------------------------------------------------------------
// Bad handles and arguments
// ---------------------------------------------------------------------------------------------

TEST_F(BadInput, NullHandle) { expect_all_ebadf(nullptr, "NULL handle"); }

TEST_F(BadInput, UnknownHandle) {
    alignas(64) static unsigned char zero[4096];
    std::memset(zero, 0, sizeof zero);
    expect_all_ebadf(reinterpret_cast<mp_handle *>(zero), "zeroed buffer");
    // Garbage that is not a handle either.
    alignas(64) static unsigned char junk[4096];
    std::memset(junk, 0xA5, sizeof junk);
    expect_all_ebadf(reinterpret_cast<mp_handle *>(junk), "0xA5 buffer");
}

TEST_F(BadInput, UnregisteredHandle) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    mp_handle *h = reg(p.server.get(), cookie_of(1));
    ASSERT_NE(h, nullptr);
    ASSERT_EQ(mp_unregister(h), 0);
    expect_all_ebadf(h, "unregistered connection");
    // The fd stays the caller's and is still usable.
    EXPECT_TRUE(write_all(p.server.get(), "x", 1));

    int lfd = keep(make_listener());
    ASSERT_GE(lfd, 0);
    mp_handle *hl = reg(lfd, cookie_of(2));
    ASSERT_NE(hl, nullptr);
    ASSERT_EQ(mp_accept(hl, 0, 0), 0);
    mp_event ev;
    // The connection's one final event (no operation was in flight), then nothing.
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 1);
    EXPECT_EQ(ev.cmd, MP_EV_CLOSED);
    EXPECT_EQ(ev.handle, h);
    EXPECT_EQ(ev.cookie, cookie_of(1));
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0);
    ASSERT_EQ(mp_unregister(hl), 0);
    expect_all_ebadf(hl, "unregistered listener");
    // The listener's accept was in the kernel: its CLOSED comes once the cancel went through.
    ASSERT_TRUE(wait_event(ch, MP_EV_CLOSED, hl, &ev, 2000));
    EXPECT_EQ(ev.cookie, cookie_of(2));
    expect_all_ebadf(hl, "closed listener");
    for (const mp_event &e : collect_events(ch, 50)) ADD_FAILURE() << "stray " << describe(e);
}

TEST_F(BadInput, ChannelCalls) {
    mp_event ev;
    mp_stats st;
    EXPECT_EQ(mp_dispatch(nullptr, &ev, 0), -EBADF);
    EXPECT_EQ(mp_dispatch(nullptr, &ev, 10), -EBADF);
    EXPECT_EQ(mp_dispatch(nullptr, nullptr, 0), -EBADF);
    EXPECT_EQ(mp_dispatch(ch, nullptr, 0), -EINVAL);
    EXPECT_EQ(mp_dispatch(ch, nullptr, 10), -EINVAL);
    EXPECT_EQ(mp_flush(nullptr), -EBADF);
    EXPECT_EQ(mp_wake(nullptr), -EBADF);
    EXPECT_EQ(mp_get_stats(nullptr, &st), -EBADF);
    EXPECT_EQ(mp_get_stats(ch, nullptr), -EINVAL);
    EXPECT_EQ(mp_buffer_release(nullptr, 0), -EBADF);
    mp_destroy(nullptr); // ignored
    // The channel is unharmed.
    EXPECT_EQ(mp_dispatch(ch, &ev, 0), 0);
}

TEST_F(BadInput, RegisterErrors) {
    errno = 0;
    EXPECT_EQ(mp_register(ch, -1, nullptr, nullptr), nullptr);
    EXPECT_EQ(errno, EBADF);

    int closed = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(closed, 0);
    ::close(closed);
    errno = 0;
    EXPECT_EQ(mp_register(ch, closed, nullptr, nullptr), nullptr);
    EXPECT_EQ(errno, EBADF);

    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    errno = 0;
    EXPECT_EQ(mp_register(nullptr, p.server.get(), nullptr, nullptr), nullptr);
    EXPECT_EQ(errno, EBADF);

    mp_handle *h = reg(p.server.get(), cookie_of(3));
    ASSERT_NE(h, nullptr);
    errno = 0;
    EXPECT_EQ(mp_register(ch, p.server.get(), nullptr, nullptr), nullptr);
    EXPECT_EQ(errno, EEXIST);
    // The first registration is unharmed.
    EXPECT_EQ(mp_cookie(h), cookie_of(3));
    EXPECT_EQ(mp_handle_fd(h), p.server.get());

    // An lwsocket id this channel does not own.
    errno = 0;
    EXPECT_EQ(mp_register(ch, MP_LWSOCKET_BASE + 5, nullptr, nullptr), nullptr);
    EXPECT_EQ(errno, EBADF);

    // Empty cpu_mask.
    int lfd = keep(make_listener());
    ASSERT_GE(lfd, 0);
    cpu_set_t empty;
    CPU_ZERO(&empty);
    errno = 0;
    EXPECT_EQ(mp_register(ch, lfd, nullptr, &empty), nullptr);
    EXPECT_EQ(errno, EINVAL);

    // After unregistering, the fd may be registered again.
    ASSERT_EQ(mp_unregister(h), 0);
    mp_handle *h2 = reg(p.server.get(), cookie_of(4));
    EXPECT_NE(h2, nullptr);
}

TEST_F(BadInput, InvalidArguments) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    mp_handle *h = reg(p.server.get(), cookie_of(5));
    ASSERT_NE(h, nullptr);
    char buf[16];
    struct iovec iov = {buf, sizeof buf};
    EXPECT_EQ(mp_read(h, buf, 0), -EINVAL);
    EXPECT_EQ(mp_read(h, nullptr, 16), -EINVAL);
    EXPECT_EQ(mp_write(h, buf, 0), -EINVAL);
    EXPECT_EQ(mp_writev(h, &iov, 0), -EINVAL);
    EXPECT_EQ(mp_writev(h, &iov, -1), -EINVAL);
    EXPECT_EQ(mp_writev(h, nullptr, 1), -EINVAL);
    sockaddr_in a = loopback_addr(1);
    EXPECT_EQ(mp_connect(h, (sockaddr *)&a, (socklen_t)(sizeof(sockaddr_storage) + 1)), -EINVAL);

    // None of the rejected requests produces an event; the handle still works.
    for (const mp_event &ev : collect_events(ch, 50)) ADD_FAILURE() << describe(ev);
    ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
    ASSERT_TRUE(write_all(p.client.get(), "ok", 2));
    mp_event ev;
    ASSERT_TRUE(wait_event(ch, MP_EV_READ, h, &ev));
    EXPECT_EQ(ev.result, 2);
}

TEST_F(BadInput, AcceptOnConnectedHandleIsEinval) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    mp_handle *h = reg(p.server.get(), cookie_of(6));
    ASSERT_NE(h, nullptr);
    EXPECT_EQ(mp_accept(h, 1, 0), -EINVAL);
    EXPECT_EQ(mp_accept(h, 0, MP_LWSOCKET), -EINVAL);

    // Unknown accept flags on a listener.
    int lfd = keep(make_listener());
    ASSERT_GE(lfd, 0);
    mp_handle *hl = reg(lfd, cookie_of(7));
    ASSERT_NE(hl, nullptr);
    EXPECT_EQ(mp_accept(hl, 1, 0x100), -EINVAL);
    // A listener cannot be read from or written to.
    char buf[8];
    EXPECT_LT(mp_read(hl, buf, sizeof buf), 0);
    EXPECT_LT(mp_write(hl, buf, sizeof buf), 0);
}

TEST_F(BadInput, PlainListenerWithCpuMaskWhilePartitioningIsEinval) {
    mp_options opt;
    mp_options_init(&opt);
    opt.partition = 1;
    ch.reset(mp_create(&opt));
    ASSERT_NE(ch.get(), nullptr);
    cpu_set_t mask;
    CPU_ZERO(&mask);
    CPU_SET(0, &mask);

    int lfd = keep(make_listener()); // listening, no SO_REUSEPORT
    ASSERT_GE(lfd, 0);
    errno = 0;
    EXPECT_EQ(mp_register(ch, lfd, nullptr, &mask), nullptr);
    EXPECT_EQ(errno, EINVAL);

    int bound = keep(make_listener(16, false)); // bound, not listening, no SO_REUSEPORT
    ASSERT_GE(bound, 0);
    errno = 0;
    EXPECT_EQ(mp_register(ch, bound, nullptr, &mask), nullptr);
    EXPECT_EQ(errno, EINVAL);

    // Nothing was left registered: the same fd registers fine without a mask.
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.handles, 0u);
    mp_handle *h = reg(lfd, nullptr);
    EXPECT_NE(h, nullptr);
}

TEST_F(BadInput, BadOptions) {
    struct Case {
        const char *name;
        void (*set)(mp_options &);
    } cases[] = {
        {"batch 0", [](mp_options &o) { o.batch = 0; }},
        {"batch -5", [](mp_options &o) { o.batch = -5; }},
        {"partition 2", [](mp_options &o) { o.partition = 2; }},
        {"lwsocket 7", [](mp_options &o) { o.lwsocket = 7; }},
        {"engine 9", [](mp_options &o) { o.engine = 9; }},
        {"ring_entries 1", [](mp_options &o) { o.ring_entries = 1; }},
        {"max_lwsockets 0", [](mp_options &o) { o.max_lwsockets = 0; }},
    };
    for (const Case &c : cases) {
        mp_options opt;
        mp_options_init(&opt);
        c.set(opt);
        errno = 0;
        mp_channel *bad = mp_create(&opt);
        EXPECT_EQ(bad, nullptr) << c.name;
        EXPECT_EQ(errno, EINVAL) << c.name;
        if (bad) mp_destroy(bad);
    }
}

// ---------------------------------------------------------------------------------------------
// Descriptor exhaustion on accept
// ---------------------------------------------------------------------------------------------

// Lowers RLIMIT_NOFILE to just above the highest open fd and fills every free slot below it;
// restore() (or the destructor) gives everything back.
struct FdExhaustion {
    rlimit old{};
    bool lowered = false;
    std::vector<int> fillers;
    bool exhaust() {
        if (getrlimit(RLIMIT_NOFILE, &old) < 0) return false;
        int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (devnull < 0) return false;
        fillers.push_back(devnull);
        int maxfd = devnull;
        if (DIR *d = opendir("/proc/self/fd")) {
            while (dirent *e = readdir(d))
                if (e->d_name[0] != '.') maxfd = std::max(maxfd, atoi(e->d_name));
            closedir(d);
        }
        rlimit low = old;
        low.rlim_cur = (rlim_t)maxfd + 1;
        if (setrlimit(RLIMIT_NOFILE, &low) < 0) return false;
        lowered = true;
        for (;;) {
            int f = fcntl(devnull, F_DUPFD_CLOEXEC, 0);
            if (f < 0) return errno == EMFILE;
            fillers.push_back(f);
        }
    }
    void restore() {
        for (int f : fillers) ::close(f);
        fillers.clear();
        if (lowered) setrlimit(RLIMIT_NOFILE, &old);
        lowered = false;
    }
    ~FdExhaustion() { restore(); }
};

TEST_F(BadInput, AcceptEmfileIsAnEventAndChannelRecovers) {
    int lfd = keep(make_listener());
    ASSERT_GE(lfd, 0);
    uint16_t port = local_port(lfd);
    void *ck = cookie_of(8);
    mp_handle *hl = reg(lfd, ck);
    ASSERT_NE(hl, nullptr);
    // Client sockets exist before the table is full (connect() needs no new fd).
    Fd c1(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    Fd c2(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_TRUE(c1.ok() && c2.ok());
    sockaddr_in a = loopback_addr(port);

    FdExhaustion ex;
    ASSERT_TRUE(ex.exhaust()) << std::strerror(errno);
    ASSERT_EQ(mp_accept(hl, 0, 0), 0);
    ASSERT_EQ(connect(c1.get(), (sockaddr *)&a, sizeof a), 0);
    mp_event ev;
    bool got = wait_event(ch, MP_EV_ACCEPT, hl, &ev, 5000);
    ex.restore();
    ASSERT_TRUE(got) << "no ACCEPT event while the fd table was full";
    if (ev.result >= 0) keep((int)ev.result);
    EXPECT_EQ(ev.result, -EMFILE) << describe(ev);
    EXPECT_EQ(ev.cookie, ck);

    // The limit is back: accepting resumes by itself.  c1's connection (still queued) and a
    // new one are both accepted.
    ASSERT_EQ(connect(c2.get(), (sockaddr *)&a, sizeof a), 0);
    int ok = 0, errors = 0;
    dispatch_until(
        ch,
        [&](const mp_event &e) {
            EXPECT_EQ(e.cmd, MP_EV_ACCEPT) << describe(e);
            if (e.cmd != MP_EV_ACCEPT) return false;
            if (e.result >= 0) {
                keep((int)e.result);
                ok++;
            } else {
                errors++;
            }
            return ok == 2;
        },
        5000);
    EXPECT_EQ(ok, 2) << "the channel did not recover after EMFILE (" << errors << " more errors)";

    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_GE(st.accept_errors, 1u);
}

// lwsockets live in the channel's direct-descriptor table (io_uring only).  With a table of 4,
// the fifth connection is not accepted at all (accepting pauses: no ACCEPT event, no error, the
// connection waits in the backlog instead of being closed by the kernel); unregistering one
// lwsocket frees a slot and that waiting connection is accepted.  On epoll, MP_LWSOCKET yields
// regular fds.
TEST_F(BadInput, LwsocketTableExhaustion) {
    ch.reset(lwsocket_channel(4));
    ASSERT_NE(ch.get(), nullptr) << std::strerror(errno);
    int lfd = keep(make_listener());
    ASSERT_GE(lfd, 0);
    uint16_t port = local_port(lfd);
    mp_handle *hl = reg(lfd, cookie_of(9));
    ASSERT_NE(hl, nullptr);
    ASSERT_EQ(mp_accept(hl, 0, MP_LWSOCKET), 0);

    std::vector<Fd> clients;
    auto next_accept = [&](mp_event *out) { return wait_event(ch, MP_EV_ACCEPT, hl, out, 5000); };

    if (!is_uring(ch)) {
        for (int i = 0; i < 5; i++) {
            clients.emplace_back(connect_client(port));
            ASSERT_TRUE(clients.back().ok());
            mp_event ev;
            ASSERT_TRUE(next_accept(&ev)) << "accept " << i;
            ASSERT_GE(ev.result, 0) << describe(ev);
            keep((int)ev.result);
            EXPECT_FALSE(mp_is_lwsocket((int)ev.result)) << "epoll has no lwsockets";
            EXPECT_GE(fcntl((int)ev.result, F_GETFD), 0) << "not a valid fd";
        }
        return;
    }

    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    ASSERT_TRUE(st.features & MP_FEAT_DIRECT_DESCRIPTORS) << "kernel without direct descriptors";

    std::vector<mp_handle *> lws;
    std::set<int> ids;
    for (int i = 0; i < 4; i++) {
        clients.emplace_back(connect_client(port));
        ASSERT_TRUE(clients.back().ok());
        mp_event ev;
        ASSERT_TRUE(next_accept(&ev)) << "accept " << i;
        ASSERT_GE(ev.result, 0) << describe(ev);
        ASSERT_TRUE(mp_is_lwsocket((int)ev.result)) << "expected an lwsocket id, got " << ev.result;
        EXPECT_TRUE(ids.insert((int)ev.result).second) << "duplicate lwsocket id";
        mp_handle *h = mp_register(ch, (int)ev.result, cookie_of(100 + i), nullptr);
        ASSERT_NE(h, nullptr) << std::strerror(errno);
        lws.push_back(h);
    }
    // The fifth: the table is full.  Nothing happens to it: no event, and it stays queued.
    clients.emplace_back(connect_client(port));
    ASSERT_TRUE(clients.back().ok());
    for (const mp_event &e : collect(ch, 300)) ADD_FAILURE() << "table full, yet " << describe(e);
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_GE(st.accept_paused, 1u);
    EXPECT_EQ(st.accept_errors, 0u) << "a full table must not cost a connection";
    char probe;
    EXPECT_EQ(recv(clients.back().get(), &probe, 1, MSG_DONTWAIT), -1)
        << "the waiting client was closed or reset";
    EXPECT_EQ(errno, EAGAIN);

    // Free one slot; the waiting connection is accepted.
    ASSERT_EQ(mp_unregister(lws[1]), 0);
    int lw = -1;
    int errors = 0;
    mp_event ev;
    dispatch_until(
        ch,
        [&](const mp_event &e) {
            if (e.cmd == MP_EV_CLOSED && e.handle == lws[1]) return false;
            if (e.cmd != MP_EV_ACCEPT) {
                ADD_FAILURE() << describe(e);
                return false;
            }
            if (e.result < 0) {
                errors++;
                return false;
            }
            lw = (int)e.result;
            return true;
        },
        5000);
    ASSERT_GE(lw, 0) << "no connection accepted after freeing a slot (" << errors << " errors)";
    EXPECT_TRUE(mp_is_lwsocket(lw));
    mp_handle *h = mp_register(ch, lw, cookie_of(200), nullptr);
    ASSERT_NE(h, nullptr) << std::strerror(errno);
    // It is the connection that waited, and it carries data.
    char *buf = buffer(16);
    ASSERT_EQ(mp_read(h, buf, 16), 0);
    ASSERT_TRUE(write_all(clients.back().get(), "lw!", 3));
    ASSERT_TRUE(wait_event(ch, MP_EV_READ, h, &ev));
    EXPECT_EQ(ev.result, 3);
    EXPECT_EQ(std::string(buf, 3), "lw!");
}

// ---------------------------------------------------------------------------------------------
// 10,000 connections, no descriptor growth
// ---------------------------------------------------------------------------------------------

// Open and close `total` connections through a listener accepting with count 0 and `flags`:
// accept, register, read EOF (DISCONNECT 0), unregister, close.  Checks that nothing grows.
void churn_connections(mp_channel *ch, int total, int accept_flags, bool expect_lw,
                       std::deque<Fd> &keep_fds, char *scratch) {
    int lfd = make_listener(4096);
    ASSERT_GE(lfd, 0);
    keep_fds.emplace_back(lfd);
    uint16_t port = local_port(lfd);
    mp_handle *hl = mp_register(ch, lfd, cookie_of(10), nullptr);
    ASSERT_NE(hl, nullptr);
    ASSERT_EQ(mp_accept(hl, 0, accept_flags), 0);
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0);

    const int fds_before = count_fds();
    ASSERT_GT(fds_before, 0);
    mp_stats st0;
    ASSERT_EQ(mp_get_stats(ch, &st0), 0);

    const int BATCH = 100;
    int done = 0, accepted = 0, accept_errors = 0, bad_disconnects = 0, reads = 0, kinds = 0;
    int closed = 0;
    int64_t deadline = now_ms() + 60000;
    while (done < total && now_ms() < deadline) {
        int n = std::min(BATCH, total - done);
        for (int i = 0; i < n; i++) {
            int c = connect_client(port);
            ASSERT_GE(c, 0) << "connect " << done + i << ": " << std::strerror(errno);
            ::close(c); // FIN: the server reads EOF
        }
        int finished = 0;
        bool ok = dispatch_until(
            ch,
            [&](const mp_event &e) {
                if (e.cmd == MP_EV_ACCEPT) {
                    if (e.result < 0) {
                        accept_errors++;
                        return false;
                    }
                    accepted++;
                    int id = (int)e.result;
                    if (mp_is_lwsocket(id) != expect_lw) kinds++;
                    mp_handle *h = mp_register(ch, id, cookie_of(id), nullptr);
                    if (!h) {
                        ADD_FAILURE() << "mp_register(" << id << "): " << std::strerror(errno);
                        if (!mp_is_lwsocket(id)) ::close(id);
                        finished++;
                    } else if (mp_read(h, scratch, 64) != 0) {
                        ADD_FAILURE() << "mp_read failed";
                        mp_unregister(h);
                        if (!mp_is_lwsocket(id)) ::close(id);
                        finished++;
                    }
                    return finished == n;
                }
                if (e.cmd == MP_EV_DISCONNECT) {
                    if (e.result != 0) bad_disconnects++;
                    int id = (int)(intptr_t)e.cookie;
                    EXPECT_EQ(mp_handle_fd(e.handle), id);
                    EXPECT_EQ(mp_unregister(e.handle), 0);
                    if (!mp_is_lwsocket(id)) ::close(id); // lwsockets: mp_unregister closed it
                    finished++;
                    return finished == n;
                }
                if (e.cmd == MP_EV_READ) reads++;
                if (e.cmd == MP_EV_CLOSED) closed++;
                return false;
            },
            10000);
        ASSERT_TRUE(ok) << "batch stalled at connection " << done + finished << " ("
                        << accept_errors << " accept errors so far)";
        done += n;
    }
    ASSERT_EQ(done, total) << "too slow";
    EXPECT_EQ(accepted, total);
    EXPECT_EQ(accept_errors, 0);
    EXPECT_EQ(bad_disconnects, 0);
    EXPECT_EQ(reads, 0);
    EXPECT_EQ(kinds, 0) << "accepted the wrong kind (lwsocket vs fd)";

    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.handles, st0.handles) << "only the listener should remain";
    const int fds_after = count_fds();
    EXPECT_LE(fds_after, fds_before + 2) << "fd growth: " << fds_before << " -> " << fds_after;
    ASSERT_EQ(mp_unregister(hl), 0);
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.handles + 1, st0.handles);
    for (const mp_event &e : collect_events(ch, 50)) {
        if (e.cmd == MP_EV_CLOSED) closed++;
        else ADD_FAILURE() << "stray " << describe(e);
    }
    EXPECT_EQ(closed, accepted + 1) << "one CLOSED per ended handle (connections + listener)";
}

TEST_F(BadInput, TenThousandConnectionsNoFdGrowth) {
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    ASSERT_EQ(st.handles, 0u);
    churn_connections(ch, 10000, 0, false, fds_, buffer(64));
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.handles, 0u);
}

// The same through lwsockets with a small direct-descriptor table: a slot not given back at
// mp_unregister would fill the table within a few batches (accept errors, stall).  On epoll,
// MP_LWSOCKET gives regular fds and the fd count must not grow.
TEST_F(BadInput, TenThousandLwsocketConnectionsNoSlotLeak) {
    ch.reset(lwsocket_channel(256));
    ASSERT_NE(ch.get(), nullptr) << std::strerror(errno);
    bool lw = false;
    if (is_uring(ch)) {
        mp_stats st;
        ASSERT_EQ(mp_get_stats(ch, &st), 0);
        lw = (st.features & MP_FEAT_DIRECT_DESCRIPTORS) != 0;
    }
    churn_connections(ch, 10000, MP_LWSOCKET, lw, fds_, buffer(64));
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.handles, 0u);
}

}  // namespace
