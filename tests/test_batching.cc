// Transparent batching (the paper's §3.4.3): requests queue in the submission ring and go to
// the kernel in one system call per batch — at the threshold (MP_BATCH), when mp_dispatch()
// runs out of events, or at mp_flush().  Measured through mp_get_stats().
#include <gtest/gtest.h>

#include <array>
#include <numeric>
#include <sstream>

#include "megapipe.h"
#include "test_util.h"

namespace {

constexpr size_t kMsg = 64;

uint64_t hist_from(const mp_stats &s, int lo) {
    uint64_t n = 0;
    for (int i = lo; i < MP_STATS_HIST; i++) n += s.batch_hist[i];
    return n;
}
uint64_t hist_total(const mp_stats &s) { return hist_from(s, 0); }

mp_stats get_stats(mp_channel *ch) {
    mp_stats s;
    memset(&s, 0, sizeof s);
    EXPECT_EQ(mp_get_stats(ch, &s), 0);
    return s;
}

std::string describe(const char *tag, const mp_stats &a, const mp_stats &b) {
    std::ostringstream os;
    os << tag << ": requests=" << (b.requests - a.requests)
       << " syscalls=" << (b.syscalls - a.syscalls) << " submits=" << (b.submits - a.submits)
       << " sqes=" << (b.sqes - a.sqes) << " cqes=" << (b.cqes - a.cqes)
       << " events=" << (b.events - a.events) << " hist=[";
    for (int i = 0; i < MP_STATS_HIST; i++)
        os << (i ? " " : "") << (b.batch_hist[i] - a.batch_hist[i]);
    os << "]";
    return os.str();
}

// n connections; the server (one channel, given batch threshold) posts a 64-byte read on
// each; every client then sends 64 bytes; the server echoes on each READ with mp_write.
struct EchoRun {
    std::string engine;
    mp_stats post0{}, post1{}; // around posting the reads (before any flush)
    mp_stats echo0{}, echo1{}; // the echo phase: from the clients' sends to the last WRITE
    size_t reads = 0, writes = 0;
    bool ok = false;
};

void run_echo(int batch, size_t n, EchoRun *out) {
    mpt::Pairs p;
    ASSERT_TRUE(mpt::make_pairs(n, &p)) << "could not make " << n << " loopback connections";
    mpt::ChanPtr chp(mpt::create_channel(batch));
    mp_channel *ch = chp.get();
    ASSERT_NE(ch, nullptr) << strerror(errno);
    out->engine = mp_engine_name(ch);
    std::vector<mp_handle *> hs(n);
    std::vector<std::array<char, kMsg>> bufs(n);
    std::vector<size_t> got(n, 0), put(n, 0);
    for (size_t i = 0; i < n; i++) {
        hs[i] = mp_register(ch, p.servers[i], (void *)(uintptr_t)i, nullptr);
        ASSERT_NE(hs[i], nullptr) << "register " << i << ": " << strerror(errno);
    }
    out->post0 = get_stats(ch);
    for (size_t i = 0; i < n; i++) ASSERT_EQ(mp_read(hs[i], bufs[i].data(), kMsg), 0);
    out->post1 = get_stats(ch);
    ASSERT_GE(mp_flush(ch), 0);
    out->echo0 = get_stats(ch);

    for (size_t i = 0; i < n; i++) {
        char msg[kMsg];
        for (size_t k = 0; k < kMsg; k++) msg[k] = (char)(i * 7 + k);
        ASSERT_TRUE(mpt::write_all(p.clients[i], msg, kMsg));
    }
    size_t written = 0;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (written < n * kMsg) {
        ASSERT_LT(std::chrono::steady_clock::now(), deadline)
            << "echo stalled: " << written << " of " << n * kMsg << " bytes written";
        mp_event ev;
        int r = mp_dispatch(ch, &ev, 1000);
        ASSERT_GE(r, 0) << strerror(-r);
        if (r == 0) continue;
        size_t i = (size_t)(uintptr_t)ev.cookie;
        switch (ev.cmd) {
        case MP_EV_READ: {
            ASSERT_GT(ev.result, 0);
            out->reads++;
            size_t at = got[i];
            got[i] += (size_t)ev.result;
            ASSERT_LE(got[i], kMsg);
            ASSERT_EQ(mp_write(hs[i], bufs[i].data() + at, (size_t)ev.result), 0);
            if (got[i] < kMsg) {
                ASSERT_EQ(mp_read(hs[i], bufs[i].data() + got[i], kMsg - got[i]), 0);
            }
            break;
        }
        case MP_EV_WRITE:
            ASSERT_GT(ev.result, 0) << "write failed: " << strerror((int)-ev.result);
            out->writes++;
            put[i] += (size_t)ev.result;
            written += (size_t)ev.result;
            break;
        case MP_EV_WAKE:
            break;
        default:
            FAIL() << "unexpected event " << ev.cmd << " result " << ev.result;
        }
    }
    out->echo1 = get_stats(ch);
    for (size_t i = 0; i < n; i++) {
        char back[kMsg];
        ASSERT_EQ(mpt::recv_exact(p.clients[i], back, kMsg), kMsg) << "connection " << i;
        for (size_t k = 0; k < kMsg; k++) ASSERT_EQ(back[k], (char)(i * 7 + k)) << "connection " << i;
    }
    for (auto *h : hs) EXPECT_EQ(mp_unregister(h), 0);
    chp.reset();
    out->ok = true;
}

bool channel_is_uring() {
    mp_channel *ch = mp_create(nullptr);
    if (!ch) return false;
    bool u = mpt::is_uring(ch);
    mp_destroy(ch);
    return u;
}

#define URING_ONLY()                                                                           \
    do {                                                                                       \
        if (!channel_is_uring()) GTEST_SKIP() << "io_uring engine only (batching)";            \
    } while (0)

} // namespace

TEST(Batching, BatchedEchoNeedsFarFewerSyscallsThanOperations) {
    URING_ONLY();
    EchoRun e;
    run_echo(MP_OPT_DEFAULT, 256, &e); // MP_BATCH default: 32
    ASSERT_TRUE(e.ok);
    ASSERT_EQ(e.engine, "uring");
    SCOPED_TRACE(describe("posting", e.post0, e.post1));
    SCOPED_TRACE(describe("echo", e.echo0, e.echo1));

    // Posting 256 reads: threshold submits of 32 each, no more.
    uint64_t post_submits = e.post1.submits - e.post0.submits;
    EXPECT_GE(post_submits, 1u) << "threshold never triggered a submit";
    EXPECT_LE(post_submits, 256u / 32 + 1);
    EXPECT_EQ(e.post1.batch_hist[0] - e.post0.batch_hist[0], 0u) << "single-SQE submits while posting";

    size_t ops = e.reads + e.writes;
    EXPECT_GE(ops, 512u);
    uint64_t sys = e.echo1.syscalls - e.echo0.syscalls;
    EXPECT_GT(sys, 0u) << "syscalls are not counted";
    EXPECT_LT(sys * 4, ops) << sys << " system calls for " << ops << " operations";
    EXPECT_GT(hist_from(e.echo1, 4) - hist_from(e.echo0, 4), 0u) << "no batch of 16 or more SQEs";
    EXPECT_GE(e.echo1.cqes - e.echo0.cqes, ops) << "completions not counted";
    EXPECT_GE(e.echo1.events - e.echo0.events, ops);
}

TEST(Batching, BatchOneSubmitsEveryRequest) {
    URING_ONLY();
    EchoRun one, many;
    run_echo(1, 256, &one);
    ASSERT_TRUE(one.ok);
    run_echo(32, 256, &many);
    ASSERT_TRUE(many.ok);
    SCOPED_TRACE(describe("batch=1 posting", one.post0, one.post1));
    SCOPED_TRACE(describe("batch=1 echo", one.echo0, one.echo1));
    SCOPED_TRACE(describe("batch=32 echo", many.echo0, many.echo1));

    // Posting: each mp_read is its own io_uring_enter with one SQE.
    EXPECT_EQ(one.post1.submits - one.post0.submits, 256u);
    EXPECT_EQ(one.post1.sqes - one.post0.sqes, 256u);
    EXPECT_EQ(one.post1.batch_hist[0] - one.post0.batch_hist[0], 256u);

    // Echo: one submit per write request (plus the odd wait that carries an internal SQE).
    uint64_t req = one.echo1.requests - one.echo0.requests;
    uint64_t sub = one.echo1.submits - one.echo0.submits;
    EXPECT_GE(req, 256u);
    EXPECT_GE(sub, req) << "requests shared a submission with batch = 1";
    EXPECT_LE(sub, req + 16) << "submits should roughly equal requests";
    uint64_t h0 = one.echo1.batch_hist[0] - one.echo0.batch_hist[0];
    EXPECT_GE(h0 * 10, sub * 9) << "batch_hist[0] (single-SQE submits) must dominate";
    EXPECT_EQ(hist_from(one.echo1, 1) - hist_from(one.echo0, 1), sub - h0);

    uint64_t sys1 = one.echo1.syscalls - one.echo0.syscalls;
    uint64_t sys32 = many.echo1.syscalls - many.echo0.syscalls;
    EXPECT_GE(sys1, 256u);
    EXPECT_GE(sys1, 4 * sys32) << "batching saved too little: " << sys1 << " vs " << sys32;
}

// n loopback pairs and a uring channel with batch threshold `batch`, every p.servers[i]
// registered on it with cookie i.
static void open_reads(size_t n, int batch, mpt::Pairs &p, mpt::ChanPtr &chp,
                       std::vector<mp_handle *> &hs) {
    ASSERT_TRUE(mpt::make_pairs(n, &p));
    chp.reset(mpt::create_channel(batch));
    mp_channel *ch = chp.get();
    ASSERT_NE(ch, nullptr);
    ASSERT_TRUE(mpt::is_uring(ch));
    hs.assign(n, nullptr);
    for (size_t i = 0; i < n; i++) {
        hs[i] = mp_register(ch, p.servers[i], (void *)(uintptr_t)i, nullptr);
        ASSERT_NE(hs[i], nullptr);
    }
}

TEST(Batching, FlushSubmitsQueuedRequests) {
    URING_ONLY();
    const size_t n = 5;
    mpt::Pairs p;
    mpt::ChanPtr chp;
    std::vector<mp_handle *> hs;
    ASSERT_NO_FATAL_FAILURE(open_reads(n, 32, p, chp, hs));
    mp_channel *ch = chp.get();
    char bufs[n][16];
    EXPECT_EQ(mp_flush(ch), 0) << "nothing queued yet";
    mp_stats s0 = get_stats(ch);
    for (size_t i = 0; i < n; i++) ASSERT_EQ(mp_read(hs[i], bufs[i], sizeof bufs[i]), 0);
    mp_stats s1 = get_stats(ch);
    EXPECT_EQ(s1.requests - s0.requests, n);
    EXPECT_EQ(s1.submits, s0.submits) << "below the threshold nothing may be submitted";
    EXPECT_EQ(s1.sqes, s0.sqes);
    EXPECT_EQ(s1.syscalls, s0.syscalls) << "queuing a request must not make a system call";

    int r = mp_flush(ch);
    EXPECT_GE(r, (int)n) << "mp_flush must submit the queued reads";
    mp_stats s2 = get_stats(ch);
    EXPECT_EQ(s2.submits - s1.submits, 1u);
    EXPECT_EQ(s2.sqes - s1.sqes, (uint64_t)(r > 0 ? r : 0));
    EXPECT_EQ(hist_total(s2) - hist_total(s1), 1u);
    EXPECT_EQ(mp_flush(ch), 0) << "second flush has nothing left";

    // The reads really are in the kernel: data completes them.
    for (size_t i = 0; i < n; i++) ASSERT_TRUE(mpt::write_all(p.clients[i], "flushed", 7));
    std::vector<bool> seen(n, false);
    for (size_t k = 0; k < n; k++) {
        mp_event ev;
        ASSERT_TRUE(mpt::wait_cmd(ch, &ev, MP_EV_READ)) << "read " << k << " never completed";
        size_t i = (size_t)(uintptr_t)ev.cookie;
        ASSERT_LT(i, n);
        EXPECT_EQ(ev.result, 7);
        EXPECT_EQ(std::string(bufs[i], 7), "flushed");
        seen[i] = true;
    }
    for (size_t i = 0; i < n; i++) EXPECT_TRUE(seen[i]);
}

TEST(Batching, ThresholdSubmitsWithoutFlushOrDispatch) {
    URING_ONLY();
    const size_t n = 8;
    mpt::Pairs p;
    mpt::ChanPtr chp;
    std::vector<mp_handle *> hs;
    ASSERT_NO_FATAL_FAILURE(open_reads(n, 4, p, chp, hs));
    mp_channel *ch = chp.get();
    char bufs[n][16];
    mp_stats prev = get_stats(ch);
    for (size_t i = 0; i < n; i++) {
        ASSERT_EQ(mp_read(hs[i], bufs[i], sizeof bufs[i]), 0);
        mp_stats s = get_stats(ch);
        if ((i + 1) % 4 == 0) {
            EXPECT_EQ(s.submits - prev.submits, 1u) << "4th queued read (#" << i << ") must submit";
            EXPECT_EQ(s.sqes - prev.sqes, 4u);
            EXPECT_EQ(s.batch_hist[2] - prev.batch_hist[2], 1u) << "a batch of 4 goes to bucket 4-7";
            prev = s;
        } else {
            EXPECT_EQ(s.submits, prev.submits) << "read #" << i << " submitted below the threshold";
            EXPECT_EQ(s.sqes, prev.sqes);
        }
    }
    EXPECT_EQ(mp_flush(ch), 0) << "everything was already submitted by the threshold";

    for (size_t i = 0; i < n; i++) ASSERT_TRUE(mpt::write_all(p.clients[i], "x", 1));
    for (size_t k = 0; k < n; k++) {
        mp_event ev;
        ASSERT_TRUE(mpt::wait_cmd(ch, &ev, MP_EV_READ));
        EXPECT_EQ(ev.result, 1);
    }
}

// The epoll engine has nothing to batch, but its statistics must still count: every request
// costs at least one system call there.
TEST(Batching, EpollCountsRequestsAndSyscalls) {
    mp_channel *probe = mp_create(nullptr);
    ASSERT_NE(probe, nullptr);
    std::string eng = mp_engine_name(probe);
    mp_destroy(probe);
    if (eng != "epoll") GTEST_SKIP() << "epoll engine only";
    EchoRun e;
    run_echo(MP_OPT_DEFAULT, 64, &e);
    ASSERT_TRUE(e.ok);
    EXPECT_EQ(e.engine, "epoll");
    SCOPED_TRACE(describe("epoll posting+echo", e.post0, e.echo1));
    uint64_t req = e.echo1.requests - e.post0.requests;
    uint64_t sys = e.echo1.syscalls - e.post0.syscalls;
    EXPECT_GE(req, 128u) << "64 reads + 64 writes at least";
    EXPECT_GE(sys, req) << "epoll: every request is at least one system call";
    EXPECT_GE(e.echo1.events - e.post0.events, 128u);
    mp_stats s;
    mpt::ChanPtr ch(mp_create(nullptr));
    ASSERT_NE(ch, nullptr);
    ASSERT_EQ(mp_get_stats(ch.get(), &s), 0);
    EXPECT_STREQ(s.engine, "epoll");
}

// MP_WAIT_USEC: the wait side gathers completions (kernel min_wait); echo stays correct, the
// feature is reported, an idle timed dispatch still times out, and a single completion (a
// wake) is delivered without waiting for a full batch.
TEST(Batching, MinWaitGathersCompletionsAndKeepsTimeouts) {
    URING_ONLY();
    setenv("MP_WAIT_USEC", "1000", 1);
    EchoRun e;
    run_echo(MP_OPT_DEFAULT, 256, &e);
    mp_channel *ch = mp_create(nullptr);
    unsetenv("MP_WAIT_USEC");
    ASSERT_TRUE(e.ok);
    ASSERT_NE(ch, nullptr);
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_TRUE((st.features | st.missing) & MP_FEAT_MIN_WAIT) << "min_wait neither found nor missing";
    size_t ops = e.reads + e.writes;
    uint64_t sys = e.echo1.syscalls - e.echo0.syscalls;
    EXPECT_LT(sys * 4, ops) << sys << " system calls for " << ops << " operations";

    mp_event ev;
    int64_t t0 = mpt::now_ms();
    EXPECT_EQ(mp_dispatch(ch, &ev, 100), 0);
    int64_t dt = mpt::now_ms() - t0;
    EXPECT_GE(dt, 90);
    EXPECT_LT(dt, 2000);
    ASSERT_EQ(mp_wake(ch), 0);
    t0 = mpt::now_ms();
    ASSERT_EQ(mp_dispatch(ch, &ev, 5000), 1);
    EXPECT_EQ(ev.cmd, MP_EV_WAKE);
    EXPECT_LT(mpt::now_ms() - t0, 1000);
    mp_destroy(ch);
}
