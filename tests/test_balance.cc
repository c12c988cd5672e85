// test_balance.cc — accept load balancing between partitions (io_uring only; ignored on epoll)
// and run-time cpu_mask changes (mp_set_cpu_mask), including under a connection storm.
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <thread>

#include "test_util.h"

using namespace mpt;

namespace {

int listen_socket_any() {
    sockaddr_in a = loopback_addr(0);
    return mp_listen_socket((sockaddr *)&a, sizeof a, 2048);
}

cpu_set_t all_cpus() {
    cpu_set_t s;
    CPU_ZERO(&s);
    for (int i = 0; i < CPU_SETSIZE; i++) CPU_SET(i, &s);
    return s;
}

cpu_set_t one_cpu(int c) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(c, &s);
    return s;
}

bool wait_for(const std::function<bool()> &cond, int timeout_ms) {
    int64_t deadline = now_ms() + timeout_ms;
    while (!cond()) {
        if (now_ms() > deadline) return false;
        sleep_ms(2);
    }
    return true;
}

struct Outcome {
    int a_accepted = 0, b_accepted = 0, b_before_a_started = 0;
    uint64_t a_stolen = 0, b_stolen = 0;
    unsigned a_max_backlog = 0;
    bool a_uring = false;
    int connect_failures = 0, server_errors = 0, clients_served = 0;
    bool all_accepted = false;
};

// What a channel's thread does with events: count accepts; with serve, register each accepted
// connection (fd or lwsocket), read "hi" and answer "ok".
struct Server {
    mp_channel *ch;
    bool serve;
    std::vector<int> fds;
    std::vector<std::unique_ptr<char[]>> bufs;
    int served = 0, errors = 0;
    unsigned max_backlog = 0;
    // 1 when ev was a successful accept.
    int on(const mp_event &ev) {
        if (ev.cmd == MP_EV_ACCEPT) {
            if (ev.result < 0) {
                errors++;
                return 0;
            }
            max_backlog = std::max(max_backlog, ev.u.accept.backlog);
            int id = (int)ev.result;
            if (!mp_is_lwsocket(id)) fds.push_back(id);
            if (serve) {
                bufs.emplace_back(new char[8]);
                mp_handle *h = mp_register(ch, id, bufs.back().get(), nullptr);
                if (!h || mp_read(h, bufs.back().get(), 2) != 0) errors++;
            }
            return 1;
        }
        if (ev.cmd == MP_EV_READ) {
            if (ev.result != 2 || memcmp(ev.u.read.buf, "hi", 2) != 0) errors++;
            if (mp_write(ev.handle, "ok", 2) != 0) errors++;
        } else if (ev.cmd == MP_EV_WRITE) {
            if (ev.result == 2)
                served++;
            else
                errors++;
        } else if (ev.cmd == MP_EV_DISCONNECT) {
            mp_unregister(ev.handle);
        }
        return 0;
    }
    void close_all() {
        for (int fd : fds) ::close(fd);
        fds.clear();
    }
};

// Two channels on two threads, partitions of one address.  A (mask {0}) gets every connection,
// all made from a client thread pinned to CPU 0; B (mask {1}) gets none of its own.  (With
// SO_INCOMING_CPU steering two partitions preferring one CPU would share it by the kernel's
// hash, so B's mask must not hold the clients' CPU.)  A does not accept at all until told to,
// so its backlog builds up.
// slow_a: A accepts from the start but sleeps between dispatches instead.
// lw: both accept lwsockets and serve every connection ("hi" -> "ok"), checked by the clients.
Outcome run_balance(int balance, int n_conns, bool slow_a = false, bool lw = false) {
    Outcome out;
    Fd lfd(listen_socket_any());
    EXPECT_GE(lfd.get(), 0);
    if (lfd.get() < 0) return out;
    const uint16_t port = local_port(lfd.get());

    std::atomic<int> a_state{0}, b_state{0}; // 1 registered, 2 accepting, -1 failed
    std::atomic<bool> a_go{false}, stop{false};
    std::atomic<int> a_acc{0}, b_acc{0};
    std::atomic<bool> uring{false};
    std::mutex mu;

    auto make = [&]() {
        mp_options o = opts();
        o.balance = balance;
        o.balance_threshold = 4;
        return mp_create(&o);
    };

    std::thread ta([&] {
        Channel ch(make());
        if (!ch.get()) {
            a_state = -1;
            return;
        }
        cpu_set_t m = one_cpu(0);
        mp_handle *h = mp_register(ch, lfd.get(), (void *)"A", &m);
        if (!h) {
            a_state = -1;
            return;
        }
        uring = is_uring(ch);
        a_state = 1;
        mp_event ev;
        if (!slow_a)
            while (!a_go && !stop) mp_dispatch(ch, &ev, 10); // idle: no accept requested
        if (mp_accept(h, 0, lw ? MP_LWSOCKET : 0) != 0) {
            a_state = -1;
            return;
        }
        a_state = 2;
        Server srv{ch.get(), lw, {}, {}};
        while (!stop) {
            int r = mp_dispatch(ch, &ev, slow_a ? 0 : 10);
            if (r == 1) a_acc += srv.on(ev);
            if (slow_a && r == 0 && !a_go) sleep_ms(40); // a busy thread: rarely dispatches
        }
        mp_stats st;
        mp_get_stats(ch, &st);
        std::lock_guard<std::mutex> g(mu);
        out.a_stolen = st.stolen_accepts;
        out.a_max_backlog = srv.max_backlog;
        out.a_uring = is_uring(ch);
        out.server_errors += srv.errors;
        ch.reset();
        srv.close_all();
    });
    if (!wait_for([&] { return a_state != 0; }, 5000) || a_state < 0) {
        ADD_FAILURE() << "channel A failed to register";
        stop = true;
        ta.join();
        return out;
    }
    std::thread tb([&] {
        Channel ch(make());
        if (!ch.get()) {
            b_state = -1;
            return;
        }
        cpu_set_t m = one_cpu(1);
        mp_handle *h = mp_register(ch, lfd.get(), (void *)"B", &m);
        if (!h || mp_accept(h, 0, lw ? MP_LWSOCKET : 0) != 0) {
            b_state = -1;
            return;
        }
        mp_event ev;
        mp_dispatch(ch, &ev, 0);
        b_state = 2;
        Server srv{ch.get(), lw, {}, {}};
        while (!stop) {
            if (mp_dispatch(ch, &ev, 10) == 1) b_acc += srv.on(ev);
        }
        mp_stats st;
        mp_get_stats(ch, &st);
        std::lock_guard<std::mutex> g(mu);
        out.b_stolen = st.stolen_accepts;
        out.server_errors += srv.errors;
        ch.reset();
        srv.close_all();
    });
    bool ready = wait_for([&] { return b_state != 0; }, 5000) && b_state > 0;
    EXPECT_TRUE(ready) << "channel B failed to register";
    std::vector<int> clients;
    cpu_set_t saved, c0 = one_cpu(0);
    pthread_getaffinity_np(pthread_self(), sizeof saved, &saved);
    EXPECT_EQ(pthread_setaffinity_np(pthread_self(), sizeof c0, &c0), 0); // SYNs on CPU 0
    if (ready) {
        for (int i = 0; i < n_conns; i++) {
            if (slow_a) sleep_ms(2); // a stream of connections spanning A's naps
            int c = connect_to(port);
            if (c < 0) {
                out.connect_failures++;
                continue;
            }
            clients.push_back(c);
            if (lw) write_all(c, "hi", 2);
        }
        // Give B time to take its share (balancing: until A's queue is under the threshold).
        if (slow_a)
            wait_for([&] { return a_acc + b_acc >= (int)clients.size(); }, 5000);
        else if (balance && uring)
            wait_for([&] { return b_acc >= n_conns - 5; }, 3000);
        else
            sleep_ms(300);
        out.b_before_a_started = b_acc;
        a_go = true;
        out.all_accepted =
            wait_for([&] { return a_acc + b_acc >= (int)clients.size(); }, 5000);
        if (lw) {
            for (int c : clients) {
                pollfd pf = {c, POLLIN, 0};
                char rb[2];
                if (poll(&pf, 1, 3000) == 1 && ::recv(c, rb, 2, MSG_WAITALL) == 2 &&
                    memcmp(rb, "ok", 2) == 0)
                    out.clients_served++;
            }
        }
    }
    pthread_setaffinity_np(pthread_self(), sizeof saved, &saved);
    stop = true;
    ta.join();
    tb.join();
    out.a_accepted = a_acc;
    out.b_accepted = b_acc;
    for (int c : clients) ::close(c);
    return out;
}

} // namespace

TEST(Balance, IdleSiblingStealsFromBusyPartition) {
    const int N = 48;
    Outcome o = run_balance(1, N);
    RecordProperty("b_accepted", o.b_accepted);
    EXPECT_EQ(o.connect_failures, 0);
    EXPECT_TRUE(o.all_accepted) << o.a_accepted << " + " << o.b_accepted << " of " << N;
    EXPECT_EQ(o.a_accepted + o.b_accepted, N);
    if (o.a_uring) {
        EXPECT_GT(o.b_accepted, 0) << "balancing on: the idle channel must take a share";
        EXPECT_GT(o.b_before_a_started, 0);
        EXPECT_LE(o.b_accepted, N - 3) << "stealing must stop once A's backlog is under 4";
        EXPECT_EQ(o.b_stolen, (uint64_t)o.b_accepted)
            << "B's own partition gets nothing: everything it accepted was stolen";
        EXPECT_EQ(o.a_stolen, 0u);
        // It stops stealing once the sibling's queue is under the threshold.
        EXPECT_GE(o.a_accepted, 1);
    } else {
        // epoll: balancing is io_uring-only and ignored; connections are accepted normally,
        // all by the partition the steering program chose.
        EXPECT_EQ(o.b_accepted, 0);
        EXPECT_EQ(o.b_stolen, 0u);
        EXPECT_EQ(o.a_accepted, N);
        // The accept event reports the partition's backlog (A started with N waiting).
        EXPECT_GT(o.a_max_backlog, 0u);
    }
}

TEST(Balance, SlowChannelGetsHelp) {
    const int N = 60;
    Outcome o = run_balance(1, N, true);
    EXPECT_EQ(o.connect_failures, 0);
    EXPECT_TRUE(o.all_accepted) << o.a_accepted << " + " << o.b_accepted << " of " << N;
    EXPECT_EQ(o.a_accepted + o.b_accepted, N);
    RecordProperty("b_accepted", o.b_accepted);
    if (o.a_uring) {
        EXPECT_GT(o.b_accepted, 0) << "balancing on: the idle channel must help the slow one";
        EXPECT_EQ(o.b_stolen, (uint64_t)o.b_accepted);
    } else {
        EXPECT_EQ(o.b_accepted, 0);
        EXPECT_EQ(o.b_stolen, 0u);
    }
    Outcome off = run_balance(0, N, true);
    EXPECT_TRUE(off.all_accepted);
    EXPECT_EQ(off.a_accepted, N);
    EXPECT_EQ(off.b_accepted, 0) << "balancing off: no help";
}

// Stolen connections are ordinary connections of the thief: as lwsockets they register, read
// and write like the channel's own.
TEST(Balance, StolenLwsocketsAreUsable) {
    const int N = 24;
    Outcome o = run_balance(1, N, false, true);
    EXPECT_EQ(o.connect_failures, 0);
    EXPECT_TRUE(o.all_accepted) << o.a_accepted << " + " << o.b_accepted << " of " << N;
    EXPECT_EQ(o.server_errors, 0);
    EXPECT_EQ(o.clients_served, N) << "every client must get its answer";
    if (o.a_uring) {
        EXPECT_GT(o.b_accepted, 0);
        EXPECT_EQ(o.b_stolen, (uint64_t)o.b_accepted);
    } else {
        EXPECT_EQ(o.b_accepted, 0);
    }
}

TEST(Balance, OffMeansNoStealing) {
    const int N = 32;
    Outcome o = run_balance(0, N);
    EXPECT_EQ(o.connect_failures, 0);
    EXPECT_TRUE(o.all_accepted) << o.a_accepted << " + " << o.b_accepted << " of " << N;
    EXPECT_EQ(o.b_accepted, 0) << "balancing off: the idle channel must not take connections";
    EXPECT_EQ(o.b_stolen, 0u);
    EXPECT_EQ(o.a_accepted, N);
}

TEST(Balance, SetCpuMaskErrors) {
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    Fd lfd(listen_socket_any());
    ASSERT_GE(lfd.get(), 0);
    cpu_set_t m = one_cpu(0), empty;
    CPU_ZERO(&empty);
    mp_handle *h = mp_register(ch, lfd.get(), nullptr, &m);
    ASSERT_NE(h, nullptr);
    EXPECT_EQ(mp_set_cpu_mask(nullptr, &m), -EBADF);
    EXPECT_EQ(mp_set_cpu_mask(h, &empty), -EINVAL);
    EXPECT_EQ(mp_set_cpu_mask(h, nullptr), -EINVAL);
    EXPECT_EQ(mp_set_cpu_mask(h, &m), 0);
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    mp_handle *c = mp_register(ch, p.a.get(), nullptr, nullptr);
    ASSERT_NE(c, nullptr);
    EXPECT_EQ(mp_set_cpu_mask(c, &m), -EINVAL) << "not a partitioned listener";
    Fd shared(make_listener());
    mp_handle *s = mp_register(ch, shared.get(), nullptr, nullptr);
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(mp_set_cpu_mask(s, &m), -EINVAL) << "shared (unpartitioned) listener";
    EXPECT_EQ(mp_unregister(h), 0);
    EXPECT_EQ(mp_set_cpu_mask(h, &m), -EBADF);
}

// Steering follows the new mask: connections made from a thread pinned to CPU 0 go to the
// partition whose mask holds CPU 0, before and after swapping the masks.
TEST(Balance, SetCpuMaskMovesSteering) {
    cpu_set_t allowed;
    ASSERT_EQ(sched_getaffinity(0, sizeof allowed, &allowed), 0);
    if (!CPU_ISSET(0, &allowed) || !CPU_ISSET(1, &allowed) || CPU_COUNT(&allowed) < 2)
        GTEST_SKIP() << "needs CPUs 0 and 1";
    mp_options o = opts();
    Channel a(mp_create(&o)), b(mp_create(&o));
    ASSERT_NE(a.get(), nullptr);
    ASSERT_NE(b.get(), nullptr);
    Fd lfd(listen_socket_any());
    ASSERT_GE(lfd.get(), 0);
    const uint16_t port = local_port(lfd.get());
    cpu_set_t m0 = one_cpu(0), m1 = one_cpu(1);
    mp_handle *ha = mp_register(a, lfd.get(), nullptr, &m0);
    mp_handle *hb = mp_register(b, lfd.get(), nullptr, &m1);
    ASSERT_NE(ha, nullptr);
    ASSERT_NE(hb, nullptr);
    ASSERT_EQ(mp_accept(ha, 0, 0), 0);
    ASSERT_EQ(mp_accept(hb, 0, 0), 0);

    auto connect_pinned = [&](int n, std::vector<int> &out) {
        std::thread t([&] {
            cpu_set_t c0 = one_cpu(0);
            pthread_setaffinity_np(pthread_self(), sizeof c0, &c0);
            for (int i = 0; i < n; i++) {
                int c = connect_to(port);
                if (c >= 0) out.push_back(c);
            }
        });
        t.join();
    };
    auto count = [&](mp_channel *ch, std::vector<int> &fds) {
        mp_event ev;
        int k = 0;
        while (mp_dispatch(ch, &ev, 50) == 1) {
            if (ev.cmd == MP_EV_ACCEPT && ev.result >= 0) {
                fds.push_back((int)ev.result);
                k++;
            }
        }
        return k;
    };
    std::vector<int> clients, fds;
    const int N = 10;
    connect_pinned(N, clients);
    ASSERT_EQ((int)clients.size(), N);
    int ka = count(a, fds), kb = count(b, fds);
    EXPECT_EQ(ka, N) << "CPU 0 belongs to A";
    EXPECT_EQ(kb, 0);

    ASSERT_EQ(mp_set_cpu_mask(ha, &m1), 0);
    ASSERT_EQ(mp_set_cpu_mask(hb, &m0), 0);
    connect_pinned(N, clients);
    ASSERT_EQ((int)clients.size(), 2 * N);
    ka = count(a, fds);
    kb = count(b, fds);
    EXPECT_EQ(kb, N) << "after the swap CPU 0 belongs to B";
    EXPECT_EQ(ka, 0);
    a.reset();
    b.reset();
    for (int f : fds) ::close(f);
    for (int c : clients) ::close(c);
}

// Masks flipped a dozen times while clients connect and close continuously: every connection
// succeeds and is accepted exactly once by one of the channels.
TEST(Balance, CpuMaskFlipsUnderConnectionStorm) {
    mp_options o = opts();
    Fd lfd(listen_socket_any());
    ASSERT_GE(lfd.get(), 0);
    const uint16_t port = local_port(lfd.get());
    const int THREADS = 4, PER = 500, TOTAL = THREADS * PER, FLIPS = 12;
    std::atomic<int> connected{0}, failures{0}, started{0}, unserved{0};
    std::atomic<int> last_err{0};
    std::atomic<bool> server_ready{false}, clients_done{false};
    int accepted_a = 0, accepted_b = 0, accept_errors = 0, flips_done = 0, set_mask_errors = 0;
    bool server_ok = false;

    std::thread server([&] {
        Channel a(mp_create(&o)), b(mp_create(&o));
        if (!a.get() || !b.get()) return;
        cpu_set_t m0 = one_cpu(0), m1 = one_cpu(1);
        mp_handle *ha = mp_register(a, lfd.get(), nullptr, &m0);
        mp_handle *hb = mp_register(b, lfd.get(), nullptr, &m1);
        if (!ha || !hb || mp_accept(ha, 0, 0) || mp_accept(hb, 0, 0)) return;
        server_ok = true;
        server_ready = true;
        mp_event ev;
        int64_t deadline = now_ms() + 60000;
        while (now_ms() < deadline) {
            for (int side = 0; side < 2; side++) {
                mp_channel *ch = side ? b.get() : a.get();
                int r;
                int budget = 64;
                while (budget-- && (r = mp_dispatch(ch, &ev, side ? 1 : 0)) == 1) {
                    if (ev.cmd != MP_EV_ACCEPT) continue;
                    if (ev.result < 0) {
                        accept_errors++;
                        continue;
                    }
                    // answer, so the client knows its connection was really served
                    if (::send((int)ev.result, "a", 1, MSG_NOSIGNAL) != 1) accept_errors++;
                    ::close((int)ev.result);
                    (side ? accepted_b : accepted_a)++;
                }
            }
            // Flip at evenly spaced points of the storm.
            if (flips_done < FLIPS && connected >= (flips_done + 1) * TOTAL / (FLIPS + 1)) {
                flips_done++;
                bool swap = flips_done & 1;
                if (mp_set_cpu_mask(ha, swap ? &m1 : &m0) != 0) set_mask_errors++;
                if (mp_set_cpu_mask(hb, swap ? &m0 : &m1) != 0) set_mask_errors++;
            }
            if (clients_done && accepted_a + accepted_b >= connected) break;
        }
    });
    ASSERT_TRUE(wait_for([&] { return server_ready.load(); }, 5000));
    std::vector<std::thread> clients;
    for (int t = 0; t < THREADS; t++)
        clients.emplace_back([&] {
            started++;
            for (int i = 0; i < PER; i++) {
                int c = connect_to(port);
                if (c < 0) {
                    failures++;
                    last_err = -c;
                    continue;
                }
                connected++;
                pollfd pf = {c, POLLIN, 0};
                char b;
                ssize_t r = poll(&pf, 1, 10000) == 1 ? ::recv(c, &b, 1, 0) : -2;
                if (r != 1) {
                    unserved++;
                    if (r < 0) last_err = errno;
                }
                ::close(c);
            }
        });
    for (auto &t : clients) t.join();
    clients_done = true;
    server.join();
    ASSERT_TRUE(server_ok);
    EXPECT_EQ(failures, 0) << "client connect failed: " << strerror(last_err);
    EXPECT_EQ(connected, TOTAL);
    EXPECT_EQ(unserved, 0) << "connections reset or never answered; last errno "
                           << strerror(last_err);
    EXPECT_EQ(flips_done, FLIPS);
    EXPECT_EQ(set_mask_errors, 0);
    EXPECT_EQ(accept_errors, 0);
    EXPECT_EQ(accepted_a + accepted_b, connected.load())
        << "accepted A " << accepted_a << " + B " << accepted_b;
    EXPECT_GT(accepted_a, 0);
    EXPECT_GT(accepted_b, 0);
}

// With balancing on, the accept event reports how many connections are still queued on the
// channel's partition.
TEST(Balance, AcceptEventReportsBacklog) {
    mp_options o = opts();
    o.balance = 1;
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    Fd lfd(listen_socket_any());
    ASSERT_GE(lfd.get(), 0);
    cpu_set_t m = all_cpus();
    mp_handle *h = mp_register(ch, lfd.get(), nullptr, &m);
    ASSERT_NE(h, nullptr);
    const int N = 10;
    std::vector<Fd> clients;
    for (int i = 0; i < N; i++) {
        int c = connect_to(local_port(lfd.get()));
        ASSERT_GE(c, 0);
        clients.emplace_back(c);
    }
    sleep_ms(20);
    std::vector<int> fds;
    for (int i = 0; i < 3; i++) {
        ASSERT_EQ(mp_accept(h, 1, 0), 0);
        mp_event got{};
        ASSERT_TRUE(pump(ch, 3000, [&](const mp_event &e) {
            got = e;
            return e.cmd == MP_EV_ACCEPT;
        }));
        ASSERT_GE(got.result, 0);
        fds.push_back((int)got.result);
        EXPECT_EQ(got.u.accept.fd, (int)got.result);
        EXPECT_EQ(got.u.accept.backlog, (unsigned)(N - 1 - i)) << "accept #" << i;
    }
    EXPECT_EQ(mp_unregister(h), 0);
    for (int f : fds) ::close(f);
}
