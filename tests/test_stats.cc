// test_stats.cc — per-channel statistics (mp_get_stats, mp_print_stats, MP_STATS=1 report).
#include <sys/utsname.h>

#include "test_util.h"

using namespace mpt;

namespace {

int kernel_major() {
    struct utsname u;
    if (uname(&u) != 0) return 0;
    return atoi(u.release);
}

// n echo round trips through the channel on one connection: write from the peer, mp_read,
// mp_write back, the peer reads it.
void echo_rounds(mp_channel *ch, int n) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    mp_handle *h = mp_register(ch, p.a.get(), nullptr, nullptr);
    ASSERT_NE(h, nullptr);
    char buf[64];
    for (int i = 0; i < n; i++) {
        ASSERT_TRUE(write_all(p.b.get(), "0123456789", 10));
        ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
        size_t got = 0;
        ASSERT_TRUE(pump(ch, 3000, [&](const mp_event &ev) {
            if (ev.cmd == MP_EV_READ) {
                got += (size_t)ev.result;
                if (got < 10) {
                    EXPECT_EQ(mp_read(h, buf, sizeof buf), 0);
                }
            }
            return got >= 10;
        }));
        ASSERT_EQ(mp_write(h, "abcdefghij", 10), 0);
        ASSERT_TRUE(pump(ch, 3000, [&](const mp_event &ev) {
            if (ev.cmd == MP_EV_WRITE) {
                EXPECT_EQ(ev.result, 10);
            }
            return ev.cmd == MP_EV_WRITE;
        }));
        char rb[10];
        size_t r = 0;
        while (r < 10) {
            ssize_t k = ::recv(p.b.get(), rb + r, 10 - r, 0);
            ASSERT_GT(k, 0);
            r += (size_t)k;
        }
    }
    EXPECT_EQ(mp_unregister(h), 0);
}

} // namespace

TEST(Stats, BadArguments) {
    mp_stats st;
    EXPECT_EQ(mp_get_stats(nullptr, &st), -EBADF);
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    EXPECT_EQ(mp_get_stats(ch, nullptr), -EINVAL);
    EXPECT_EQ(mp_get_stats(nullptr, nullptr), -EBADF);
    mp_print_stats(nullptr, stderr); // ignored, no crash
}

TEST(Stats, EngineAndFeatures) {
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_STREQ(st.engine, mp_engine_name(ch));
    std::string want = env_engine();
    if (want == "uring" || want == "epoll") {
        EXPECT_STREQ(st.engine, want.c_str());
    }
    EXPECT_EQ(st.requests, 0u);
    EXPECT_EQ(st.events, 0u);
    EXPECT_EQ(st.handles, 0u);
    EXPECT_EQ(st.bufs_in_use, 0u);
    EXPECT_EQ(st.features & st.missing, 0u) << "a feature both found and missing";
    if (is_uring(ch)) {
        EXPECT_EQ(st.fallbacks & MP_FALLBACK_EPOLL_ENGINE, 0u);
        if (kernel_major() >= 6) {
            EXPECT_TRUE(st.features & MP_FEAT_DIRECT_DESCRIPTORS) << std::hex << st.features;
            EXPECT_TRUE(st.features & MP_FEAT_MULTISHOT_ACCEPT) << std::hex << st.features;
            EXPECT_TRUE(st.features & MP_FEAT_SINGLE_ISSUER);
            EXPECT_TRUE(st.features & MP_FEAT_DEFER_TASKRUN);
            EXPECT_TRUE(st.features & MP_FEAT_NODROP);
            EXPECT_TRUE(st.features & MP_FEAT_EXT_ARG);
            EXPECT_TRUE(st.features & MP_FEAT_POLL_MULTISHOT);
        }
    } else {
        EXPECT_EQ(st.features & MP_FEAT_DIRECT_DESCRIPTORS, 0u);
        EXPECT_EQ(st.features & MP_FEAT_BUF_RING, 0u);
    }
}

TEST(Stats, CountersGrowWithIo) {
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    mp_stats s0, s1;
    ASSERT_EQ(mp_get_stats(ch, &s0), 0);
    const int ROUNDS = 20;
    echo_rounds(ch, ROUNDS);
    ASSERT_EQ(mp_get_stats(ch, &s1), 0);
    // At least one read and one write request and event per round.
    EXPECT_GE(s1.requests - s0.requests, 2u * ROUNDS);
    EXPECT_GE(s1.events - s0.events, 2u * ROUNDS);
    EXPECT_LE(s1.events - s0.events, 4u * ROUNDS) << "implausibly many events";
    EXPECT_GE(s1.syscalls - s0.syscalls, (uint64_t)ROUNDS);
    EXPECT_LT(s1.syscalls - s0.syscalls, 100u * ROUNDS) << "implausibly many syscalls";
    EXPECT_EQ(s1.handles, 0u);
    EXPECT_EQ(hist_sum(s1), s1.submits) << "batch histogram must sum to submits";
    if (is_uring(ch)) {
        EXPECT_GE(s1.sqes - s0.sqes, 2u * ROUNDS);
        EXPECT_GE(s1.cqes - s0.cqes, 2u * ROUNDS);
        EXPECT_GE(s1.submits - s0.submits, 1u);
        EXPECT_LE(s1.submits, s1.syscalls);
        EXPECT_LE(s1.submits, s1.sqes);
        EXPECT_GE(s1.cqes, s1.events - s1.events / 2); // every event came from a CQE or two
    } else {
        // epoll: nothing is submitted in batches; each attempt is its own system call.
        EXPECT_EQ(s1.sqes, 0u);
        EXPECT_EQ(s1.cqes, 0u);
        EXPECT_EQ(s1.submits, 0u);
        EXPECT_GE(s1.syscalls - s0.syscalls, 2u * ROUNDS);
    }
}

// Batch sizes go to the right histogram bucket, and batching really batches.
TEST(Stats, BatchHistogramBuckets) {
    mp_options o = opts();
    o.batch = 4096; // only mp_flush()/dispatch submits
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    const int N = 40;
    std::vector<Pair> pairs(N);
    std::vector<mp_handle *> hs(N);
    for (int i = 0; i < N; i++) {
        ASSERT_TRUE(tcp_pair(pairs[i]));
        hs[i] = mp_register(ch, pairs[i].a.get(), nullptr, nullptr);
        ASSERT_NE(hs[i], nullptr);
    }
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0); // ring enabled, wake armed
    mp_stats s0, s1;
    ASSERT_EQ(mp_get_stats(ch, &s0), 0);
    static char msg[] = "x";
    for (int i = 0; i < N; i++) ASSERT_EQ(mp_write(hs[i], msg, 1), 0);
    int flushed = mp_flush(ch);
    ASSERT_EQ(mp_get_stats(ch, &s1), 0);
    EXPECT_EQ(hist_sum(s1), s1.submits);
    if (is_uring(ch)) {
        EXPECT_EQ(flushed, N);
        EXPECT_EQ(s1.submits - s0.submits, 1u) << "40 writes, one submission";
        EXPECT_EQ(s1.sqes - s0.sqes, (uint64_t)N);
        EXPECT_EQ(s1.batch_hist[5] - s0.batch_hist[5], 1u) << "40 SQEs: the 32-63 bucket";
    } else {
        EXPECT_EQ(flushed, 0);
        EXPECT_GE(s1.syscalls - s0.syscalls, (uint64_t)N);
    }
    int writes = 0;
    pump(ch, 3000, [&](const mp_event &e) {
        if (e.cmd == MP_EV_WRITE) writes++;
        return writes == N;
    });
    EXPECT_EQ(writes, N);
    for (auto *h : hs) EXPECT_EQ(mp_unregister(h), 0);
}

TEST(Stats, MpStatsPrintsReportAtDestroy) {
    mp_options o = opts();
    o.stats = 1;
    std::string engine;
    {
        StderrCapture cap;
        ASSERT_TRUE(cap.start());
        mp_channel *ch = mp_create(&o);
        if (ch) {
            engine = mp_engine_name(ch);
            echo_rounds(ch, 3);
            mp_destroy(ch);
        }
        cap.stop();
        ASSERT_FALSE(engine.empty()) << "mp_create failed";
        EXPECT_NE(cap.out.find("megapipe stats:"), std::string::npos) << "stderr was: " << cap.out;
        EXPECT_NE(cap.out.find("engine=" + engine), std::string::npos) << cap.out;
        EXPECT_NE(cap.out.find("syscalls="), std::string::npos) << cap.out;
        EXPECT_NE(cap.out.find("batch sizes:"), std::string::npos) << cap.out;
        EXPECT_NE(cap.out.find("buffers:"), std::string::npos) << cap.out;
    }
    // And nothing without it.
    o.stats = 0;
    {
        StderrCapture cap;
        ASSERT_TRUE(cap.start());
        mp_channel *ch = mp_create(&o);
        if (ch) mp_destroy(ch);
        cap.stop();
        EXPECT_EQ(cap.out.find("megapipe stats:"), std::string::npos) << cap.out;
    }
    // The environment variable does the same for mp_create(NULL).
    {
        const char *old = getenv("MP_STATS");
        std::string saved = old ? old : "";
        setenv("MP_STATS", "1", 1);
        StderrCapture cap;
        ASSERT_TRUE(cap.start());
        mp_channel *ch = mp_create(nullptr);
        if (ch) mp_destroy(ch);
        cap.stop();
        if (old)
            setenv("MP_STATS", saved.c_str(), 1);
        else
            unsetenv("MP_STATS");
        ASSERT_NE(ch, nullptr);
        EXPECT_NE(cap.out.find("megapipe stats:"), std::string::npos) << cap.out;
    }
}

TEST(Stats, PrintStatsFormats) {
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    echo_rounds(ch, 2);
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    char *buf = nullptr;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ASSERT_NE(f, nullptr);
    mp_print_stats(&st, f);
    fclose(f);
    std::string s(buf, len);
    free(buf);
    EXPECT_NE(s.find("megapipe stats: engine=" + std::string(st.engine)), std::string::npos) << s;
    EXPECT_NE(s.find("requests=" + std::to_string(st.requests)), std::string::npos) << s;
    EXPECT_NE(s.find("events=" + std::to_string(st.events)), std::string::npos) << s;
    EXPECT_NE(s.find("syscalls=" + std::to_string(st.syscalls)), std::string::npos) << s;
    if (is_uring(ch)) {
        EXPECT_NE(s.find("direct_descriptors"), std::string::npos) << s;
    }
}
