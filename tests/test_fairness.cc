// test_fairness.cc — fair service between connections (bounded in time, not a benchmark).
//
// Connection A's client has thousands of requests queued in the socket, so every receive the
// server issues on A completes the moment it is submitted; connection B's client sends one
// request at a time, so B's receive always waits in the kernel for data.  A server that hands
// out what completed at submission without also collecting what completed while waiting
// serves A again and again while B's completions sit in the kernel (io_uring with
// DEFER_TASKRUN: Fig. 6's unfair tail).  B must keep being served while A's queue drains.
#include "test_util.h"

using namespace mpt;

namespace {

constexpr size_t kMsg = 8;

struct Conn {
    mp_handle *h = nullptr;
    char buf[kMsg];
};

// Connections "A" (48 of them, enough that the server's requests fill a submission batch
// between two waits) always have data; connection B sends one request at a time.
TEST(Fairness, WaitingConnectionIsServedWhileOthersAlwaysHaveData) {
    Channel ch(mp_create(nullptr));
    ASSERT_NE(ch.get(), nullptr);
    constexpr int kConnsA = 48, kPerA = 1500;
    std::vector<std::unique_ptr<Pair>> as;
    std::vector<std::unique_ptr<Conn>> cas;
    for (int i = 0; i < kConnsA; i++) {
        as.emplace_back(new Pair);
        ASSERT_TRUE(tcp_pair(*as.back()));
        set_bufs(as.back()->b.get(), 1 << 18, 1 << 18);
        cas.emplace_back(new Conn);
        cas.back()->h = mp_register(ch, as.back()->a.get(), cas.back().get(), nullptr);
        ASSERT_NE(cas.back()->h, nullptr);
    }
    Pair b;
    ASSERT_TRUE(tcp_pair(b));
    Conn cb;
    cb.h = mp_register(ch, b.a.get(), &cb, nullptr);
    ASSERT_NE(cb.h, nullptr);

    // A: deep pipelines, written and drained by two threads for all of them.
    std::atomic<long> a_answers{0};
    std::atomic<bool> a_done{false}, stop{false};
    Joiner a_writer([&] {
        std::string all(kMsg * kPerA, 'a');
        size_t off[kConnsA] = {};
        bool more = true;
        while (more && !stop) {
            more = false;
            for (int i = 0; i < kConnsA; i++) {
                if (off[i] == all.size()) continue;
                more = true;
                ssize_t w = send(as[i]->b.get(), all.data() + off[i], all.size() - off[i],
                                 MSG_DONTWAIT | MSG_NOSIGNAL);
                if (w > 0) off[i] += (size_t)w;
            }
            if (more) std::this_thread::yield();
        }
    });
    Joiner a_reader([&] {
        std::vector<char> sink(1 << 16);
        std::vector<pollfd> pf(kConnsA);
        for (int i = 0; i < kConnsA; i++) pf[i] = {as[i]->b.get(), POLLIN, 0};
        long got = 0;
        while (got < (long)kMsg * kPerA * kConnsA && !stop) {
            if (poll(pf.data(), kConnsA, 100) <= 0) continue;
            for (int i = 0; i < kConnsA; i++)
                if (pf[i].revents & POLLIN) {
                    ssize_t n = recv(pf[i].fd, sink.data(), sink.size(), MSG_DONTWAIT);
                    if (n > 0) got += n;
                }
        }
        a_answers = got / (long)kMsg;
        a_done = true;
    });
    // B: one request at a time; counts the answers it got while A was still being served.
    std::atomic<int> b_during{0}, b_total{0};
    Joiner b_client([&] {
        char m[kMsg] = {'b'}, r[kMsg];
        while (!stop) {
            if (!write_all(b.b.get(), m, kMsg)) break;
            if (recv_exact(b.b.get(), r, kMsg, 2000) != kMsg) break;
            b_total++;
            if (!a_done) b_during++;
        }
    });

    // The server: echo every message on every connection.
    for (auto &c : cas) ASSERT_EQ(mp_read(c->h, c->buf, kMsg), 0);
    ASSERT_EQ(mp_read(cb.h, cb.buf, kMsg), 0);
    int64_t start = now_ms(), a_finished_at = 0;
    mp_event evs[64];
    while (now_ms() - start < 15000) {
        if (a_done && !a_finished_at) a_finished_at = now_ms();
        if (a_finished_at && now_ms() - a_finished_at > 50) break;
        int n = mp_dispatch_batch(ch, evs, 64, 50);
        ASSERT_GE(n, 0);
        for (int i = 0; i < n; i++) {
            Conn *c = (Conn *)evs[i].cookie;
            if (evs[i].cmd == MP_EV_READ) {
                ASSERT_EQ(mp_write(c->h, c->buf, (size_t)evs[i].result), 0);
            } else if (evs[i].cmd == MP_EV_WRITE) {
                ASSERT_EQ(mp_read(c->h, c->buf, kMsg), 0);
            }
        }
    }
    stop = true;
    shutdown(b.b.get(), SHUT_RDWR);
    for (auto &p : as) shutdown(p->b.get(), SHUT_RDWR);
    a_writer.join();
    a_reader.join();
    b_client.join();
    int64_t a_ms = (a_finished_at ? a_finished_at : now_ms()) - start;
    std::printf("[ fairness ] %s: A %ld answers in %lld ms; B %d answers meanwhile (%d in all)\n",
                mp_engine_name(ch), a_answers.load(), (long long)a_ms, b_during.load(),
                b_total.load());
    EXPECT_EQ(a_answers, (long)kConnsA * kPerA) << "A was not served to the end";
    // Fair service: B, one request in flight, gets its turn at every look at the kernel while
    // the A connections drain.  A starved B gets a handful (or none) in that time.  The bound
    // is loose: B's client thread needs CPU too, on a 2-core machine shared with A's.
    EXPECT_GE(b_during, 20) << "B was starved while the others always had data";
    EXPECT_GE((long)b_during * 100, a_answers.load() / kConnsA) << "B got far less than its share";
}

} // namespace
