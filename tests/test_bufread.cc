// test_bufread.cc — buffered reads (mp_read_buffered / mp_buffer_release): io_uring provided-
// buffer rings; -ENOTSUP on the epoll engine.
#include <sys/resource.h>

#include <atomic>
#include <thread>

#include "test_util.h"

using namespace mpt;

namespace {

mp_channel *make_ch(int buf_size = MP_OPT_DEFAULT, int buf_count = MP_OPT_DEFAULT) {
    mp_options o = opts();
    o.buf_size = buf_size;
    o.buf_count = buf_count;
    return mp_create(&o);
}

std::string pattern(size_t n) {
    std::string s(n, '\0');
    for (size_t i = 0; i < n; i++) s[i] = (char)('A' + (i * 7 + i / 251) % 61);
    return s;
}

} // namespace

// A channel from make_ch(buf_size, buf_count), a loopback pair, and p.a registered on it.
static void open_conn(Channel &ch, Pair &p, mp_handle *&h, int buf_size = MP_OPT_DEFAULT,
                      int buf_count = MP_OPT_DEFAULT) {
    ch.reset(make_ch(buf_size, buf_count));
    ASSERT_NE(ch.get(), nullptr);
    ASSERT_TRUE(tcp_pair(p));
    h = mp_register(ch, p.a.get(), nullptr, nullptr);
    ASSERT_NE(h, nullptr);
}

TEST(BufRead, EpollReturnsEnotsup) {
    Channel ch;
    Pair p;
    mp_handle *h = nullptr;
    ASSERT_NO_FATAL_FAILURE(open_conn(ch, p, h));
    if (is_uring(ch)) {
        EXPECT_EQ(mp_read_buffered(h), 0);
    } else {
        EXPECT_EQ(mp_read_buffered(h), -ENOTSUP);
        // The handle is not switched to buffered mode: plain reads still work.
        char buf[8];
        ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
        ASSERT_TRUE(write_all(p.b.get(), "ok", 2));
        bool got = pump(ch, 2000, [&](const mp_event &ev) {
            if (ev.cmd != MP_EV_READ) return false;
            EXPECT_EQ(ev.result, 2);
            EXPECT_FALSE(ev.flags & MP_EVF_BUFFER);
            EXPECT_EQ(std::string(buf, 2), "ok");
            return true;
        });
        EXPECT_TRUE(got);
        // No buffers to give back on epoll.
        EXPECT_LT(mp_buffer_release(ch, 0), 0);
    }
    EXPECT_EQ(mp_read_buffered(nullptr), -EBADF);
    EXPECT_EQ(mp_buffer_release(nullptr, 0), -EBADF);
    EXPECT_EQ(mp_unregister(h), 0);
}

TEST(BufRead, DeliversBufferAndRelease) {
    Channel ch(make_ch(4096, 16));
    ASSERT_NE(ch.get(), nullptr);
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    void *ck = (void *)0xb0f;
    mp_handle *h = mp_register(ch, p.a.get(), ck, nullptr);
    ASSERT_NE(h, nullptr);
    if (!is_uring(ch)) {
        EXPECT_EQ(mp_read_buffered(h), -ENOTSUP) << "documented: epoll has no provided buffers";
        return;
    }
    ASSERT_EQ(mp_read_buffered(h), 0);
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, 0u) << "an idle buffered read must hold no buffer";

    const std::string msg = "buffered hello";
    ASSERT_TRUE(write_all(p.b.get(), msg.data(), msg.size()));
    mp_event got{};
    ASSERT_TRUE(pump(ch, 3000, [&](const mp_event &ev) {
        EXPECT_EQ(ev.cmd, MP_EV_READ);
        got = ev;
        return ev.cmd == MP_EV_READ;
    }));
    EXPECT_EQ(got.handle, h);
    EXPECT_EQ(got.cookie, ck);
    EXPECT_TRUE(got.flags & MP_EVF_BUFFER);
    ASSERT_EQ(got.result, (ssize_t)msg.size());
    ASSERT_EQ(got.u.read.len, msg.size());
    ASSERT_NE(got.u.read.buf, nullptr);
    EXPECT_EQ(std::string((const char *)got.u.read.buf, got.u.read.len), msg);
    EXPECT_LT(got.u.read.buf_id, 16u);
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, 1u);
    EXPECT_GE(st.bufs_peak, 1u);
    EXPECT_TRUE(st.features & MP_FEAT_BUF_RING);

    // Plain reads are refused on a buffered handle.
    char plain[16];
    EXPECT_EQ(mp_read(h, plain, sizeof plain), -EINVAL);

    EXPECT_EQ(mp_buffer_release(ch, got.u.read.buf_id), 0);
    EXPECT_EQ(mp_buffer_release(ch, got.u.read.buf_id), -EINVAL) << "double release";
    EXPECT_EQ(mp_buffer_release(ch, 16), -EINVAL) << "id out of range";
    EXPECT_EQ(mp_buffer_release(ch, 1u << 20), -EINVAL);
    EXPECT_EQ(mp_buffer_release(nullptr, 0), -EBADF);
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, 0u);

    // A second message reuses the pool; EOF is a DISCONNECT after the data.
    ASSERT_EQ(mp_read_buffered(h), 0);
    ASSERT_EQ(mp_read_buffered(h), 0);
    ASSERT_TRUE(write_all(p.b.get(), "second", 6));
    p.b.reset();
    std::string data;
    bool eof = false;
    pump(ch, 3000, [&](const mp_event &ev) {
        if (ev.cmd == MP_EV_READ) {
            EXPECT_TRUE(ev.flags & MP_EVF_BUFFER);
            data.append((const char *)ev.u.read.buf, ev.u.read.len);
            EXPECT_EQ(mp_buffer_release(ch, ev.u.read.buf_id), 0);
        } else if (ev.cmd == MP_EV_DISCONNECT) {
            EXPECT_EQ(ev.result, 0);
            eof = true;
        }
        return eof;
    });
    EXPECT_EQ(data, "second");
    EXPECT_TRUE(eof);
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, 0u);
    EXPECT_EQ(mp_unregister(h), 0);
}

TEST(BufRead, PlainReadPendingThenBufferedIsInvalid) {
    Channel ch;
    Pair p;
    mp_handle *h = nullptr;
    ASSERT_NO_FATAL_FAILURE(open_conn(ch, p, h));
    char buf[16];
    ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
    int r = mp_read_buffered(h);
    if (is_uring(ch)) {
        EXPECT_EQ(r, -EINVAL) << "mixing plain and buffered reads on one handle";
    } else {
        EXPECT_EQ(r, -ENOTSUP);
    }
    EXPECT_EQ(mp_unregister(h), 0);
}

// 4 buffers of 64 bytes, 64 KiB sent: receiving pauses while the application holds buffers
// and resumes when they come back; nothing lost, nothing reordered.  ahead = 1: one buffered
// read at a time, re-issued after each event (completions wait in the stash).  ahead = 2048:
// every read is issued up front and never again, so only buffer releases can restart the
// receive after the kernel ran out of buffers.
static void starved_run(int ahead) {
    Channel ch;
    Pair p;
    mp_handle *h = nullptr;
    ASSERT_NO_FATAL_FAILURE(open_conn(ch, p, h, 64, 4));
    if (!is_uring(ch)) {
        EXPECT_EQ(mp_read_buffered(h), -ENOTSUP);
        return;
    }
    const std::string sent = pattern(64 * 1024);
    std::thread writer([&] {
        write_all(p.b.get(), sent.data(), sent.size());
        shutdown(p.b.get(), SHUT_WR);
    });
    for (int i = 0; i < ahead; i++) ASSERT_EQ(mp_read_buffered(h), 0);
    std::string got;
    std::vector<unsigned> held;
    bool eof = false;
    int reads = 0;
    bool ok = pump(ch, 8000, [&](const mp_event &ev) {
        if (ev.cmd == MP_EV_READ) {
            reads++;
            EXPECT_FALSE(eof) << "data after EOF";
            EXPECT_TRUE(ev.flags & MP_EVF_BUFFER);
            EXPECT_GT(ev.result, 0);
            EXPECT_LE(ev.u.read.len, 64u);
            EXPECT_LT(ev.u.read.buf_id, 4u);
            for (unsigned id : held) EXPECT_NE(id, ev.u.read.buf_id) << "buffer handed out twice";
            got.append((const char *)ev.u.read.buf, ev.u.read.len);
            held.push_back(ev.u.read.buf_id);
            mp_stats st;
            mp_get_stats(ch, &st);
            EXPECT_GE(st.bufs_in_use, held.size());
            EXPECT_LE(st.bufs_in_use, 4u);
            if (held.size() == 3) { // give buffers back only every third event
                for (unsigned id : held) EXPECT_EQ(mp_buffer_release(ch, id), 0);
                held.clear();
            }
            if (ahead == 1) {
                EXPECT_EQ(mp_read_buffered(h), 0);
            }
        } else if (ev.cmd == MP_EV_DISCONNECT) {
            EXPECT_EQ(ev.result, 0);
            eof = true;
        } else {
            ADD_FAILURE() << "unexpected event " << ev.cmd << " result " << ev.result;
        }
        return eof;
    });
    writer.join();
    EXPECT_TRUE(ok) << "stalled after " << got.size() << " of " << sent.size() << " bytes";
    ASSERT_EQ(got.size(), sent.size());
    EXPECT_TRUE(got == sent) << "data reordered or corrupted";
    EXPECT_GE(reads, (int)(sent.size() / 64));
    for (unsigned id : held) EXPECT_EQ(mp_buffer_release(ch, id), 0);
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, 0u);
    EXPECT_LE(st.bufs_peak, 4u);
    EXPECT_GT(st.buf_starved, 0u) << "4 buffers for 64 KiB must have run out at some point";
    EXPECT_EQ(mp_unregister(h), 0);
}

TEST(BufRead, StarvedNoLossNoReorder) { starved_run(1); }

TEST(BufRead, StarvedNoLossNoReorderReadsAhead) { starved_run(2048); }

// Several connections share a tiny pool; each stream arrives whole and in order.
TEST(BufRead, SharedPoolManyConnections) {
    Channel ch(make_ch(128, 8));
    ASSERT_NE(ch.get(), nullptr);
    const int N = 6;
    std::vector<Pair> pairs(N);
    std::vector<mp_handle *> hs(N);
    for (int i = 0; i < N; i++) {
        ASSERT_TRUE(tcp_pair(pairs[i]));
        hs[i] = mp_register(ch, pairs[i].a.get(), (void *)(intptr_t)i, nullptr);
        ASSERT_NE(hs[i], nullptr);
    }
    if (!is_uring(ch)) {
        for (int i = 0; i < N; i++) EXPECT_EQ(mp_read_buffered(hs[i]), -ENOTSUP);
        return;
    }
    std::vector<std::string> sent(N), got(N);
    for (int i = 0; i < N; i++) {
        sent[i] = pattern(8192 + 1000 * i);
        for (auto &c : sent[i]) c = (char)(c + i);
        ASSERT_EQ(mp_read_buffered(hs[i]), 0);
    }
    std::vector<std::thread> writers;
    for (int i = 0; i < N; i++)
        writers.emplace_back([&, i] {
            write_all(pairs[i].b.get(), sent[i].data(), sent[i].size());
            shutdown(pairs[i].b.get(), SHUT_WR);
        });
    int eofs = 0;
    std::vector<unsigned> held;
    pump(ch, 8000, [&](const mp_event &ev) {
        int i = (int)(intptr_t)ev.cookie;
        if (ev.cmd == MP_EV_READ) {
            got[i].append((const char *)ev.u.read.buf, ev.u.read.len);
            held.push_back(ev.u.read.buf_id);
            if (held.size() >= 5) {
                for (unsigned id : held) EXPECT_EQ(mp_buffer_release(ch, id), 0);
                held.clear();
            }
            EXPECT_EQ(mp_read_buffered(hs[i]), 0);
        } else if (ev.cmd == MP_EV_DISCONNECT) {
            eofs++;
        }
        return eofs == N;
    });
    for (auto &t : writers) t.join();
    EXPECT_EQ(eofs, N);
    for (int i = 0; i < N; i++) EXPECT_TRUE(got[i] == sent[i]) << "connection " << i;
    for (unsigned id : held) EXPECT_EQ(mp_buffer_release(ch, id), 0);
    for (int i = 0; i < N; i++) EXPECT_EQ(mp_unregister(hs[i]), 0);
}

// Unregistering a handle that holds stashed / in-flight buffers gives them back.
TEST(BufRead, UnregisterReturnsBuffers) {
    Channel ch;
    Pair p;
    mp_handle *h = nullptr;
    ASSERT_NO_FATAL_FAILURE(open_conn(ch, p, h, 64, 4));
    if (!is_uring(ch)) {
        EXPECT_EQ(mp_read_buffered(h), -ENOTSUP);
        return;
    }
    ASSERT_EQ(mp_read_buffered(h), 0);
    std::string data = pattern(1000);
    ASSERT_TRUE(write_all(p.b.get(), data.data(), data.size()));
    mp_event ev{};
    ASSERT_TRUE(pump(ch, 3000, [&](const mp_event &e) {
        ev = e;
        return e.cmd == MP_EV_READ;
    }));
    // Let more completions arrive into the stash.
    collect(ch, 100);
    ASSERT_EQ(mp_unregister(h), 0);
    EXPECT_EQ(mp_buffer_release(ch, ev.u.read.buf_id), 0);
    collect(ch, 100);
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, 0u) << "buffers leaked by an unregistered handle";
    // The pool is whole again: a new connection can use all of it.
    Pair q;
    ASSERT_TRUE(tcp_pair(q));
    mp_handle *h2 = mp_register(ch, q.a.get(), nullptr, nullptr);
    ASSERT_NE(h2, nullptr);
    ASSERT_EQ(mp_read_buffered(h2), 0);
    ASSERT_TRUE(write_all(q.b.get(), "abc", 3));
    ASSERT_TRUE(pump(ch, 3000, [&](const mp_event &e) {
        if (e.cmd == MP_EV_READ) {
            EXPECT_EQ(std::string((const char *)e.u.read.buf, e.u.read.len), "abc");
            EXPECT_EQ(mp_buffer_release(ch, e.u.read.buf_id), 0);
        }
        return e.cmd == MP_EV_READ;
    }));
    EXPECT_EQ(mp_unregister(h2), 0);
}

// Memory grows with active, not open, connections.
TEST(BufRead, IdleConnectionsHoldNoBuffers) {
    NofileRaise lim;
    const int BUF_SIZE = 16384;
    mp_options o = opts();
    o.buf_size = BUF_SIZE;
    o.buf_count = 256;
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    {
        Pair p;
        ASSERT_TRUE(tcp_pair(p));
        mp_handle *h = mp_register(ch, p.a.get(), nullptr, nullptr);
        ASSERT_NE(h, nullptr);
        if (!is_uring(ch)) {
            EXPECT_EQ(mp_read_buffered(h), -ENOTSUP);
            return;
        }
        mp_unregister(h);
    }
    // Clients are regular fds; the server side uses lwsockets (no fds), so N clients need N
    // descriptors plus some slack.
    rlim_t soft = lim.soft();
    int N = 10000;
    if ((rlim_t)N + 200 > soft) N = (int)soft - 200;
    ASSERT_GE(N, 1000) << "RLIMIT_NOFILE too small for a meaningful test";
    RecordProperty("connections", N);

    Fd lst(make_listener(4096));
    ASSERT_GE(lst.get(), 0);
    uint16_t port = local_port(lst.get());
    mp_handle *lh = mp_register(ch, lst.get(), nullptr, nullptr);
    ASSERT_NE(lh, nullptr);
    ASSERT_EQ(mp_accept(lh, 0, MP_LWSOCKET), 0);
    std::vector<int> clients;
    std::vector<mp_handle *> conns;
    clients.reserve(N);
    conns.reserve(N);
    // Prime the allocator and the pool so the baseline includes fixed costs.
    long rss0 = -1;
    int accept_err = 0;
    auto accept_some = [&](size_t want) {
        return pump(ch, 5000, [&](const mp_event &ev) {
            if (ev.cmd == MP_EV_ACCEPT) {
                if (ev.result < 0) {
                    accept_err++;
                    return false;
                }
                mp_handle *c = mp_register(ch, (int)ev.result, nullptr, nullptr);
                EXPECT_NE(c, nullptr);
                if (c) {
                    EXPECT_EQ(mp_read_buffered(c), 0);
                    conns.push_back(c);
                }
            } else if (ev.cmd != MP_EV_CLOSED) { // connections ended earlier
                ADD_FAILURE() << "unexpected event " << ev.cmd << " result " << ev.result;
            }
            return conns.size() >= want;
        });
    };
    const int STEP = 500;
    for (int i = 0; i < N; i += STEP) {
        int n = std::min(STEP, N - i);
        for (int k = 0; k < n; k++) {
            int c = connect_to(port);
            ASSERT_GE(c, 0) << "connect #" << clients.size() << ": " << strerror(-c);
            clients.push_back(c);
        }
        ASSERT_TRUE(accept_some(clients.size())) << conns.size() << " accepted of " << clients.size();
        if (rss0 < 0) {
            collect(ch, 20);
            rss0 = rss_bytes();
        }
    }
    collect(ch, 100);
    long rss1 = rss_bytes();
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(accept_err, 0);
    EXPECT_EQ(st.bufs_in_use, 0u) << N << " idle connections must hold no buffer";
    EXPECT_EQ(st.bufs_peak, 0u);
    const long per_conn_buffers = (long)(N - STEP) * BUF_SIZE; // what per-connection buffers cost
    long growth = rss1 - rss0;
    RecordProperty("rss_growth_kib", (int)(growth / 1024));
    EXPECT_LT(growth, per_conn_buffers / 8)
        << "RSS grew by " << growth / 1024 << " KiB for " << N - STEP
        << " idle buffered connections (per-connection buffers: " << per_conn_buffers / 1024
        << " KiB)";

    // A few connections become active: buffers in use = READ events not released.
    const int ACTIVE = 7;
    for (int i = 0; i < ACTIVE; i++) {
        int idx = (i * 1409) % N;
        ASSERT_TRUE(write_all(clients[idx], "ping-data", 9));
    }
    std::vector<unsigned> held;
    size_t bytes = 0;
    ASSERT_TRUE(pump(ch, 5000, [&](const mp_event &ev) {
        if (ev.cmd == MP_EV_READ) {
            EXPECT_TRUE(ev.flags & MP_EVF_BUFFER);
            held.push_back(ev.u.read.buf_id);
            bytes += ev.u.read.len;
        }
        return bytes >= (size_t)ACTIVE * 9;
    }));
    EXPECT_EQ(bytes, (size_t)ACTIVE * 9);
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, held.size());
    for (size_t i = 0; i < held.size() / 2; i++) EXPECT_EQ(mp_buffer_release(ch, held[i]), 0);
    size_t left = held.size() - held.size() / 2;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, left);
    for (size_t i = held.size() / 2; i < held.size(); i++)
        EXPECT_EQ(mp_buffer_release(ch, held[i]), 0);
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, 0u);

    ch.reset(); // closes the lwsockets first: the server side takes the TIME_WAITs
    for (int c : clients) ::close(c);
}

// Connections starved of buffers wait in a re-arm list.  Unregistering one of them and
// registering a new connection at once (which may reuse its slot) must not strand the others:
// once buffers come back every waiting connection receives its data.
TEST(BufRead, StarvedConnectionsSurviveUnregisterAndReuse) {
    const int N = 3;
    for (int victim = 0; victim < N; victim++) {
        SCOPED_TRACE("unregistered connection #" + std::to_string(victim));
        Channel ch(make_ch(64, 2));
        ASSERT_NE(ch.get(), nullptr);
        Pair hog;
        ASSERT_TRUE(tcp_pair(hog));
        mp_handle *hh = mp_register(ch, hog.a.get(), (void *)(intptr_t)100, nullptr);
        ASSERT_NE(hh, nullptr);
        if (!is_uring(ch)) {
            EXPECT_EQ(mp_read_buffered(hh), -ENOTSUP);
            return;
        }
        // The hog takes both buffers and the application keeps them.
        ASSERT_EQ(mp_read_buffered(hh), 0);
        ASSERT_EQ(mp_read_buffered(hh), 0);
        std::string big = pattern(128);
        ASSERT_TRUE(write_all(hog.b.get(), big.data(), big.size()));
        std::vector<unsigned> held;
        ASSERT_TRUE(pump(ch, 3000, [&](const mp_event &e) {
            if (e.cmd == MP_EV_READ) held.push_back(e.u.read.buf_id);
            return held.size() == 2;
        }));
        mp_stats st;
        ASSERT_EQ(mp_get_stats(ch, &st), 0);
        ASSERT_EQ(st.bufs_in_use, 2u);
        // N connections ask for data while no buffer is free.
        std::vector<Pair> pairs(N);
        std::vector<mp_handle *> hs(N);
        for (int i = 0; i < N; i++) {
            ASSERT_TRUE(tcp_pair(pairs[i]));
            hs[i] = mp_register(ch, pairs[i].a.get(), (void *)(intptr_t)i, nullptr);
            ASSERT_NE(hs[i], nullptr);
            ASSERT_EQ(mp_read_buffered(hs[i]), 0);
            ASSERT_TRUE(write_all(pairs[i].b.get(), "wait", 4));
        }
        collect(ch, 50);
        // One of them goes away; a new connection is registered at once.
        ASSERT_EQ(mp_unregister(hs[victim]), 0);
        Pair extra;
        ASSERT_TRUE(tcp_pair(extra));
        mp_handle *xh = mp_register(ch, extra.a.get(), (void *)(intptr_t)99, nullptr);
        ASSERT_NE(xh, nullptr);
        // Buffers come back.
        for (unsigned id : held) ASSERT_EQ(mp_buffer_release(ch, id), 0);
        std::vector<std::string> got(N);
        int done = 0;
        pump(ch, 2000, [&](const mp_event &e) {
            if (e.cmd == MP_EV_READ) {
                int i = (int)(intptr_t)e.cookie;
                if (i >= 0 && i < N) {
                    got[i].append((const char *)e.u.read.buf, e.u.read.len);
                    if (got[i] == "wait") done++;
                }
                EXPECT_EQ(mp_buffer_release(ch, e.u.read.buf_id), 0);
            }
            return done == N - 1;
        });
        for (int i = 0; i < N; i++) {
            if (i == victim) {
                EXPECT_EQ(got[i], "") << "unregistered connection delivered data";
            } else {
                EXPECT_EQ(got[i], "wait") << "connection #" << i << " stranded after buffers returned";
            }
        }
    }
}
