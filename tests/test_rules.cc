// test_rules.cc — the rules every engine keeps (DESIGN.md, "Rules every engine keeps").
// Each test runs on whichever engine MP_ENGINE selects (ctest runs the binary with uring and
// with epoll).
#include <signal.h>
#include <sys/resource.h>

#include <atomic>
#include <set>

#include "megapipe.h"
#include "test_util.h"

using namespace mpt;

namespace {

class Rules : public ChannelTest {};

// Restores the previous SIGPIPE disposition at scope exit.
struct SigpipeDefault {
    struct sigaction old;
    SigpipeDefault() {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_DFL;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGPIPE, &sa, &old);
    }
    ~SigpipeDefault() { sigaction(SIGPIPE, &old, nullptr); }
};

void *cookie_of(int n) { return reinterpret_cast<void *>(static_cast<intptr_t>(n)); }

// ---------------------------------------------------------------------------------------------
// Complete writes
// ---------------------------------------------------------------------------------------------

TEST_F(Rules, LargeWriteToSlowReaderCompletesOnceWithFullSize) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    set_bufs(p.server.get(), 16384, 0);
    set_bufs(p.client.get(), 0, 131072);
    const size_t N = 4u << 20;
    const std::string &data = keep_str(pattern(N, 1));
    void *ck = cookie_of(11);
    mp_handle *h = reg(p.server.get(), ck);
    ASSERT_NE(h, nullptr);
    ASSERT_EQ(mp_write(h, data.data(), N), 0);

    // A slow reader: small reads with pauses.
    std::string got;
    std::atomic<bool> reader_done{false};
    Joiner reader([&] {
        std::vector<char> b(16384);
        int64_t deadline = now_ms() + 30000;
        while (got.size() < N && now_ms() < deadline) {
            ssize_t r = recv_some(p.client.get(), b.data(), b.size(), 1000);
            if (r == -ETIMEDOUT || r == -EINTR) continue;
            if (r <= 0) break;
            got.append(b.data(), (size_t)r);
            if ((got.size() / b.size()) % 8 == 0) sleep_ms(1);
        }
        reader_done = true;
    });

    std::vector<mp_event> writes, others;
    int64_t deadline = now_ms() + 30000;
    while (now_ms() < deadline && (writes.empty() || !reader_done)) {
        mp_event ev;
        int r = mp_dispatch(ch, &ev, 50);
        ASSERT_GE(r, 0);
        if (r == 0) continue;
        (ev.cmd == MP_EV_WRITE ? writes : others).push_back(ev);
    }
    reader.join();
    for (const mp_event &ev : collect_events(ch, 100))
        (ev.cmd == MP_EV_WRITE ? writes : others).push_back(ev);

    ASSERT_EQ(writes.size(), 1u) << "a write must complete with exactly one WRITE event";
    EXPECT_EQ(writes[0].result, (ssize_t)N);
    EXPECT_EQ(writes[0].handle, h);
    EXPECT_EQ(writes[0].cookie, ck);
    EXPECT_TRUE(others.empty()) << "unexpected event " << describe(others[0]);
    ASSERT_EQ(got.size(), N);
    EXPECT_TRUE(got == data) << "the peer did not receive the bytes intact";
}

// ---------------------------------------------------------------------------------------------
// In-order writes under a full send buffer
// ---------------------------------------------------------------------------------------------

struct WriteOrderResult {
    std::vector<ssize_t> results;
    std::string received;
    bool error = false;
};

// The peer does not read until every request is issued and the send buffer is full; then it
// reads `total` bytes while we dispatch `nreq` WRITE events.
static void drain_writes(mp_channel *ch, TcpPair &p, mp_handle *h, size_t nreq, size_t total,
                         WriteOrderResult &out) {
    // Let the kernel take what fits; nothing has been read yet.
    for (const mp_event &ev : collect_events(ch, 50)) {
        if (ev.cmd != MP_EV_WRITE || ev.handle != h) {
            ADD_FAILURE() << "unexpected event " << describe(ev);
            out.error = true;
        } else {
            out.results.push_back(ev.result);
        }
    }
    // Precondition: the send path really was full, so later writes had to wait in order.
    EXPECT_LT(out.results.size(), nreq) << "precondition: the send buffer never filled up";
    Joiner reader([&] { out.received = read_n(p.client.get(), total, 30000); });
    int64_t deadline = now_ms() + 30000;
    while (out.results.size() < nreq && now_ms() < deadline) {
        mp_event ev;
        int r = mp_dispatch(ch, &ev, 100);
        if (r < 0) {
            ADD_FAILURE() << "mp_dispatch: " << r;
            out.error = true;
            break;
        }
        if (r == 0) continue;
        if (ev.cmd != MP_EV_WRITE || ev.handle != h) {
            ADD_FAILURE() << "unexpected event " << describe(ev);
            out.error = true;
            continue;
        }
        out.results.push_back(ev.result);
    }
    reader.join();
    // No extra WRITE events.
    for (const mp_event &ev : collect_events(ch, 50)) {
        ADD_FAILURE() << "extra event " << describe(ev);
        out.error = true;
    }
}

TEST_F(Rules, WritesCompleteInIssueOrderUnderFullSendBuffer) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    // Small send buffer; the receive buffer stays at its default: loopback's MSS is ~64 KiB
    // and a receive window below it makes TCP crawl on zero-window probes once reading starts.
    set_bufs(p.server.get(), 8192, 0);
    mp_handle *h = reg(p.server.get(), cookie_of(21));
    ASSERT_NE(h, nullptr);

    const size_t NREQ = 50;
    std::vector<size_t> sizes;
    std::string expect;
    std::set<size_t> distinct;
    for (size_t i = 0; i < NREQ; i++) {
        size_t sz = (i % 7 == 3) ? 200000 + i * 1000 : (i % 5 == 0 ? 1 + i : 1000 + i * 37);
        sizes.push_back(sz);
        distinct.insert(sz);
    }
    ASSERT_EQ(distinct.size(), NREQ) << "test bug: sizes must be distinct to identify writes";
    for (size_t i = 0; i < NREQ; i++) {
        const std::string &b = keep_str(pattern(sizes[i], 1000 + (uint32_t)i));
        expect += b;
        ASSERT_EQ(mp_write(h, b.data(), b.size()), 0) << "write " << i;
    }

    WriteOrderResult res;
    drain_writes(ch, p, h, NREQ, expect.size(), res);
    ASSERT_EQ(res.results.size(), NREQ);
    for (size_t i = 0; i < NREQ; i++)
        EXPECT_EQ(res.results[i], (ssize_t)sizes[i]) << "WRITE event " << i << " out of order or short";
    ASSERT_EQ(res.received.size(), expect.size());
    EXPECT_TRUE(res.received == expect) << "byte stream is not the concatenation in issue order";
}

TEST_F(Rules, WritevsCompleteInIssueOrderUnderFullSendBuffer) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    // Small send buffer; the receive buffer stays at its default: loopback's MSS is ~64 KiB
    // and a receive window below it makes TCP crawl on zero-window probes once reading starts.
    set_bufs(p.server.get(), 8192, 0);
    mp_handle *h = reg(p.server.get(), cookie_of(22));
    ASSERT_NE(h, nullptr);

    const size_t NREQ = 50;
    std::vector<size_t> totals;
    std::string expect;
    std::set<size_t> distinct;
    for (size_t i = 0; i < NREQ; i++) {
        int cnt = 1 + (int)(i % 9); // 1..9 iovecs: both sides of 4
        std::vector<struct iovec> iov((size_t)cnt);
        size_t total = 0;
        for (int j = 0; j < cnt; j++) {
            size_t len = 100 + 13 * (size_t)j + 50 * i;
            if (i % 6 == 5 && j == cnt / 2) len = 150000 + i;
            const std::string &piece = keep_str(pattern(len, (uint32_t)(5000 + i * 16 + (size_t)j)));
            iov[(size_t)j].iov_base = const_cast<char *>(piece.data());
            iov[(size_t)j].iov_len = piece.size();
            expect += piece;
            total += len;
        }
        totals.push_back(total);
        distinct.insert(total);
        // The iovec array is copied: scribble over ours after the call.
        ASSERT_EQ(mp_writev(h, iov.data(), cnt), 0) << "writev " << i;
        for (auto &v : iov) v = {nullptr, 0};
    }
    ASSERT_EQ(distinct.size(), NREQ) << "test bug: totals must be distinct";

    WriteOrderResult res;
    drain_writes(ch, p, h, NREQ, expect.size(), res);
    ASSERT_EQ(res.results.size(), NREQ);
    for (size_t i = 0; i < NREQ; i++)
        EXPECT_EQ(res.results[i], (ssize_t)totals[i]) << "WRITE event " << i << " out of order or short";
    ASSERT_EQ(res.received.size(), expect.size());
    EXPECT_TRUE(res.received == expect) << "byte stream is not the concatenation in issue order";
}

// ---------------------------------------------------------------------------------------------
// In-order reads
// ---------------------------------------------------------------------------------------------

TEST_F(Rules, ReadsCompleteInIssueOrder) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    void *ck = cookie_of(31);
    mp_handle *h = reg(p.server.get(), ck);
    ASSERT_NE(h, nullptr);

    struct Req {
        char *buf;
        size_t size;
    };
    std::deque<Req> issued;
    size_t next_size = 100;
    auto issue = [&] {
        size_t sz = next_size;
        next_size = next_size % 900 + 100;
        Req r{buffer(sz), sz};
        ASSERT_EQ(mp_read(h, r.buf, r.size), 0);
        issued.push_back(r);
    };
    for (int i = 0; i < 8; i++) issue();
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0) << "no data yet, got " << describe(ev);

    const std::string sent = pattern(20000, 77);
    // Send in uneven chunks so reads see varied amounts.
    for (size_t off = 0; off < sent.size();) {
        size_t n = std::min<size_t>(777 + off % 1234, sent.size() - off);
        ASSERT_TRUE(write_all(p.client.get(), sent.data() + off, n));
        off += n;
    }

    std::string got;
    int nevents = 0;
    bool ok = dispatch_until(
        ch,
        [&](const mp_event &e) {
            EXPECT_EQ(e.cmd, MP_EV_READ) << describe(e);
            if (e.cmd != MP_EV_READ) return true;
            EXPECT_EQ(e.handle, h);
            EXPECT_EQ(e.cookie, ck);
            EXPECT_FALSE(issued.empty());
            if (issued.empty()) return true;
            Req r = issued.front();
            issued.pop_front();
            EXPECT_EQ(e.u.read.buf, (void *)r.buf) << "READ event " << nevents << " out of order";
            EXPECT_GT(e.result, 0);
            EXPECT_LE((size_t)e.result, r.size);
            EXPECT_EQ(e.u.read.len, (size_t)e.result);
            if (e.u.read.buf != (void *)r.buf || e.result <= 0 || (size_t)e.result > r.size)
                return true;
            got.append(r.buf, (size_t)e.result);
            nevents++;
            if (got.size() >= sent.size()) return true;
            issue(); // keep several reads queued
            return false;
        },
        10000);
    ASSERT_TRUE(ok) << "timed out with " << got.size() << " of " << sent.size() << " bytes";
    EXPECT_GE(nevents, 8) << "expected at least the 8 initially queued reads to complete";
    ASSERT_EQ(got.size(), sent.size());
    EXPECT_TRUE(got == sent) << "concatenated reads differ from the sent stream";
}

// ---------------------------------------------------------------------------------------------
// DISCONNECT on EOF / reset
// ---------------------------------------------------------------------------------------------

TEST_F(Rules, PeerCloseIsDisconnectZero) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    void *ck = cookie_of(41);
    mp_handle *h = reg(p.server.get(), ck);
    ASSERT_NE(h, nullptr);
    char *buf = buffer(256);
    ASSERT_EQ(mp_read(h, buf, 256), 0);
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0);
    p.client.reset();
    ASSERT_TRUE(dispatch_until(ch, [&](const mp_event &e) { ev = e; return true; }, 5000));
    EXPECT_EQ(ev.cmd, MP_EV_DISCONNECT) << describe(ev);
    EXPECT_EQ(ev.result, 0);
    EXPECT_EQ(ev.handle, h);
    EXPECT_EQ(ev.cookie, ck);
    EXPECT_EQ(ev.flags & MP_EVF_LOCAL, 0u);
}

// Each operation produces exactly one event: three reads pending at EOF are three
// DISCONNECT events (result 0), then nothing more.
TEST_F(Rules, EveryPendingReadEndsAtEof) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    mp_handle *h = reg(p.server.get(), cookie_of(44));
    ASSERT_NE(h, nullptr);
    for (int i = 0; i < 3; i++) ASSERT_EQ(mp_read(h, buffer(64), 64), 0);
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0);
    p.client.reset();
    int n = 0;
    ASSERT_TRUE(dispatch_until(
        ch,
        [&](const mp_event &e) {
            EXPECT_EQ(e.cmd, MP_EV_DISCONNECT) << describe(e);
            EXPECT_EQ(e.result, 0);
            EXPECT_EQ(e.handle, h);
            return ++n == 3;
        },
        5000))
        << "only " << n << " of 3 reads ended";
    for (const mp_event &e : collect_events(ch, 100)) ADD_FAILURE() << "extra " << describe(e);
}

TEST_F(Rules, PeerResetIsDisconnectError) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    mp_handle *h = reg(p.server.get(), cookie_of(42));
    ASSERT_NE(h, nullptr);
    char *buf = buffer(256);
    ASSERT_EQ(mp_read(h, buf, 256), 0);
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0);
    close_rst(p.client);
    ASSERT_TRUE(dispatch_until(ch, [&](const mp_event &e) { ev = e; return true; }, 5000));
    EXPECT_EQ(ev.cmd, MP_EV_DISCONNECT) << describe(ev);
    EXPECT_EQ(ev.handle, h);
    EXPECT_LT(ev.result, 0) << "a reset must be DISCONNECT with -errno";
    EXPECT_EQ(ev.result, -ECONNRESET);
    EXPECT_EQ(ev.flags & MP_EVF_LOCAL, 0u);
}

// Reset before the read is issued: the read still ends as DISCONNECT (< 0), not a READ.
TEST_F(Rules, ReadAfterPeerResetIsDisconnectError) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    mp_handle *h = reg(p.server.get(), cookie_of(43));
    ASSERT_NE(h, nullptr);
    close_rst(p.client);
    ASSERT_TRUE(wait_readable(p.server.get())); // the RST has arrived
    char *buf = buffer(256);
    ASSERT_EQ(mp_read(h, buf, 256), 0);
    mp_event ev;
    ASSERT_TRUE(dispatch_until(ch, [&](const mp_event &e) { ev = e; return true; }, 5000));
    EXPECT_EQ(ev.cmd, MP_EV_DISCONNECT) << describe(ev);
    EXPECT_LT(ev.result, 0);
}

// ---------------------------------------------------------------------------------------------
// Writing to a reset peer: an error, never SIGPIPE
// ---------------------------------------------------------------------------------------------

TEST_F(Rules, WriteToResetPeerFailsWithoutSigpipe) {
    SigpipeDefault sigpipe; // SIGPIPE would kill the process
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    mp_handle *h = reg(p.server.get(), cookie_of(51));
    ASSERT_NE(h, nullptr);
    close_rst(p.client);
    ASSERT_TRUE(wait_readable(p.server.get()));

    const std::string &chunk = keep_str(pattern(65536, 5));
    ssize_t err = 0;
    for (int i = 0; i < 200 && err == 0; i++) {
        ASSERT_EQ(mp_write(h, chunk.data(), chunk.size()), 0);
        mp_event ev;
        ASSERT_TRUE(wait_event(ch, MP_EV_WRITE, h, &ev)) << "no WRITE event for write " << i;
        if (ev.result < 0) {
            err = ev.result;
        } else {
            EXPECT_EQ(ev.result, (ssize_t)chunk.size());
        }
    }
    ASSERT_LT(err, 0) << "writes to a reset peer never failed";
    EXPECT_TRUE(err == -EPIPE || err == -ECONNRESET) << "error " << err;

    // Later writes fail too (the first error is often -ECONNRESET, the next ones -EPIPE: the
    // error that raises SIGPIPE without MSG_NOSIGNAL).
    for (int i = 0; i < 3; i++) {
        ASSERT_EQ(mp_write(h, chunk.data(), chunk.size()), 0);
        mp_event ev;
        ASSERT_TRUE(wait_event(ch, MP_EV_WRITE, h, &ev));
        EXPECT_LT(ev.result, 0) << "write after the error " << i;
    }
    // A gathering write fails the same way.
    struct iovec iov[2] = {{const_cast<char *>(chunk.data()), 1000},
                           {const_cast<char *>(chunk.data()) + 1000, 2000}};
    ASSERT_EQ(mp_writev(h, iov, 2), 0);
    mp_event ev;
    ASSERT_TRUE(wait_event(ch, MP_EV_WRITE, h, &ev));
    EXPECT_LT(ev.result, 0);
}

// ---------------------------------------------------------------------------------------------
// Half-close
// ---------------------------------------------------------------------------------------------

TEST_F(Rules, HalfCloseBothDirections) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    void *ck = cookie_of(61);
    mp_handle *h = reg(p.server.get(), ck);
    ASSERT_NE(h, nullptr);
    char *buf = buffer(128);
    ASSERT_EQ(mp_read(h, buf, 128), 0);
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0);

    // Peer half-closes: the pending read ends as DISCONNECT 0 (not local).
    ASSERT_EQ(shutdown(p.client.get(), SHUT_WR), 0);
    ASSERT_TRUE(dispatch_until(ch, [&](const mp_event &e) { ev = e; return true; }, 5000));
    EXPECT_EQ(ev.cmd, MP_EV_DISCONNECT) << describe(ev);
    EXPECT_EQ(ev.result, 0);
    EXPECT_EQ(ev.flags & MP_EVF_LOCAL, 0u);
    EXPECT_EQ(ev.handle, h);

    // We can still write; the peer receives it.
    const std::string &m1 = keep_str("still talking after your FIN");
    ASSERT_EQ(mp_write(h, m1.data(), m1.size()), 0);
    ASSERT_TRUE(wait_event(ch, MP_EV_WRITE, h, &ev));
    EXPECT_EQ(ev.result, (ssize_t)m1.size());
    EXPECT_EQ(read_n(p.client.get(), m1.size()), m1);

    // A write then our half-close: WRITE first, then DISCONNECT with MP_EVF_LOCAL; the peer
    // reads the data, then EOF.
    const std::string &m2 = keep_str(pattern(100000, 62));
    ASSERT_EQ(mp_write(h, m2.data(), m2.size()), 0);
    ASSERT_EQ(mp_disconnect(h), 0);
    std::vector<mp_event> evs;
    Joiner reader;
    std::string got;
    reader.t = std::thread([&] { got = read_n(p.client.get(), m2.size() + 1, 10000); });
    ASSERT_TRUE(dispatch_until(
        ch,
        [&](const mp_event &e) {
            evs.push_back(e);
            return evs.size() == 2;
        },
        10000));
    reader.join();
    EXPECT_EQ(evs[0].cmd, MP_EV_WRITE) << describe(evs[0]);
    EXPECT_EQ(evs[0].result, (ssize_t)m2.size());
    EXPECT_EQ(evs[1].cmd, MP_EV_DISCONNECT) << describe(evs[1]);
    EXPECT_EQ(evs[1].result, 0);
    EXPECT_EQ(evs[1].flags & MP_EVF_LOCAL, MP_EVF_LOCAL);
    EXPECT_EQ(evs[1].handle, h);
    EXPECT_EQ(evs[1].cookie, ck);
    EXPECT_EQ(got.size(), m2.size()) << "peer should read all data, then EOF";
    EXPECT_TRUE(got == m2);
    char c;
    EXPECT_EQ(recv_some(p.client.get(), &c, 1), 0) << "peer must read EOF after mp_disconnect";
}

// Our half-close first: the peer reads EOF, the handle can still read what the peer sends.
TEST_F(Rules, LocalHalfCloseKeepsReading) {
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    mp_handle *h = reg(p.server.get(), cookie_of(63));
    ASSERT_NE(h, nullptr);
    char *buf = buffer(64);
    ASSERT_EQ(mp_read(h, buf, 64), 0);
    ASSERT_EQ(mp_disconnect(h), 0);
    mp_event ev;
    ASSERT_TRUE(dispatch_until(ch, [&](const mp_event &e) { ev = e; return true; }, 5000));
    EXPECT_EQ(ev.cmd, MP_EV_DISCONNECT) << describe(ev);
    EXPECT_EQ(ev.result, 0);
    EXPECT_EQ(ev.flags & MP_EVF_LOCAL, MP_EVF_LOCAL);
    char c;
    EXPECT_EQ(recv_some(p.client.get(), &c, 1), 0) << "peer must read EOF";

    // The pending read is still there and gets the peer's reply.
    ASSERT_TRUE(write_all(p.client.get(), "reply", 5));
    ASSERT_TRUE(dispatch_until(ch, [&](const mp_event &e) { ev = e; return true; }, 5000));
    EXPECT_EQ(ev.cmd, MP_EV_READ) << describe(ev);
    EXPECT_EQ(ev.result, 5);
    EXPECT_EQ(std::string(buf, 5), "reply");

    // Then the peer closes: the next read is DISCONNECT 0 without MP_EVF_LOCAL.
    ASSERT_EQ(mp_read(h, buf, 64), 0);
    p.client.reset();
    ASSERT_TRUE(dispatch_until(ch, [&](const mp_event &e) { ev = e; return true; }, 5000));
    EXPECT_EQ(ev.cmd, MP_EV_DISCONNECT) << describe(ev);
    EXPECT_EQ(ev.result, 0);
    EXPECT_EQ(ev.flags & MP_EVF_LOCAL, 0u);
}

// ---------------------------------------------------------------------------------------------
// After unregister: only the one CLOSED event, once the kernel let go
// ---------------------------------------------------------------------------------------------

TEST_F(Rules, NoEventAfterUnregisterWithOperationsInFlight) {
    TcpPair &p = pair();
    TcpPair &ctl = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok() && ctl.server.ok() && ctl.client.ok());
    set_bufs(p.server.get(), 16384, 0);
    set_bufs(p.client.get(), 0, 16384);
    void *ck = cookie_of(71);
    mp_handle *h = reg(p.server.get(), ck);
    ASSERT_NE(h, nullptr);
    for (int i = 0; i < 3; i++) ASSERT_EQ(mp_read(h, buffer(4096), 4096), 0);
    const std::string &big = keep_str(pattern(8u << 20, 71));
    ASSERT_EQ(mp_write(h, big.data(), big.size()), 0);
    const std::string &small = keep_str("queued behind the big write");
    ASSERT_EQ(mp_write(h, small.data(), small.size()), 0);
    ASSERT_EQ(mp_disconnect(h), 0);

    // Let everything reach the kernel; nothing can complete yet.
    for (const mp_event &ev : collect_events(ch, 100))
        ADD_FAILURE() << "event before unregister: " << describe(ev);

    // Control connection, registered before h goes away (a handle slot freed by
    // mp_unregister may be reused by the next registration): the channel still delivers
    // other handles' events.
    void *cctl = cookie_of(72);
    mp_handle *hc = reg(ctl.server.get(), cctl);
    ASSERT_NE(hc, nullptr);
    ASSERT_NE(hc, h);
    char *cbuf = buffer(64);
    ASSERT_EQ(mp_read(hc, cbuf, 64), 0);

    mp_stats st0;
    ASSERT_EQ(mp_get_stats(ch, &st0), 0);
    ASSERT_EQ(mp_unregister(h), 0);
    mp_stats st1;
    ASSERT_EQ(mp_get_stats(ch, &st1), 0);
    EXPECT_EQ(st1.handles + 1, st0.handles);

    // The peer now sends data, reads (unblocking the write) and closes.
    ASSERT_TRUE(write_all(p.client.get(), "data for a dead handle", 22));
    ASSERT_TRUE(write_all(ctl.client.get(), "ctl", 3));
    std::vector<char> sink(1 << 16);
    int64_t until = now_ms() + 100;
    while (now_ms() < until) {
        if (recv_some(p.client.get(), sink.data(), sink.size(), 10) <= 0) continue;
    }
    close_rst(p.client);

    bool ctl_seen = false;
    int closed = 0;
    EXPECT_EQ(mp_unregister(h), -EBADF) << "double unregister";
    for (const mp_event &ev : collect_events(ch, 250)) {
        if (ev.handle == h && ev.cmd == MP_EV_CLOSED) {
            EXPECT_EQ(ev.cookie, ck);
            closed++;
            continue;
        }
        EXPECT_NE(ev.handle, h) << "event after unregister: " << describe(ev);
        EXPECT_NE(ev.cookie, ck) << "event after unregister: " << describe(ev);
        if (ev.handle == hc && ev.cmd == MP_EV_READ) ctl_seen = true;
    }
    EXPECT_TRUE(ctl_seen) << "the control connection's READ did not arrive";
    EXPECT_EQ(closed, 1) << "exactly one CLOSED event once the kernel let go of h";
}

TEST_F(Rules, CompletedButUndispatchedEventsAreDropped) {
    const int N = 4;
    std::vector<mp_handle *> hs;
    std::vector<TcpPair *> ps;
    for (int i = 0; i < N; i++) {
        TcpPair &p = pair();
        ASSERT_TRUE(p.server.ok() && p.client.ok());
        ps.push_back(&p);
        hs.push_back(reg(p.server.get(), cookie_of(80 + i)));
        ASSERT_NE(hs.back(), nullptr);
    }
    // Data is waiting on every connection before the reads are issued, so each read completes
    // at its first attempt.
    for (int i = 0; i < N; i++) ASSERT_TRUE(write_all(ps[i]->client.get(), "ping", 4));
    for (int i = 0; i < N; i++) ASSERT_TRUE(wait_readable(ps[i]->server.get()));
    for (int i = 0; i < N; i++) ASSERT_EQ(mp_read(hs[i], buffer(64), 64), 0);
    ASSERT_GE(mp_flush(ch), 0);
    sleep_ms(20);

    mp_event first;
    ASSERT_EQ(mp_dispatch(ch, &first, 2000), 1);
    ASSERT_EQ(first.cmd, MP_EV_READ) << describe(first);
    if (is_uring(ch)) {
        // Precondition: the dispatch reaped every read's completion (so the others' events
        // are queued, completed but not dispatched).
        mp_stats st;
        ASSERT_EQ(mp_get_stats(ch, &st), 0);
        ASSERT_GE(st.cqes, (uint64_t)N) << "precondition: completions not reaped together";
    }
    int kept = -1;
    for (int i = 0; i < N; i++) {
        if (hs[i] == first.handle) {
            kept = i;
        } else {
            ASSERT_EQ(mp_unregister(hs[i]), 0);
        }
    }
    ASSERT_GE(kept, 0);
    // Slots are not reused before their CLOSED event: new registrations get other pointers.
    for (int i = 0; i < N - 1; i++) {
        TcpPair &p = pair();
        ASSERT_TRUE(p.server.ok() && p.client.ok());
        mp_handle *nh = reg(p.server.get(), cookie_of(90 + i));
        ASSERT_NE(nh, nullptr);
        for (int j = 0; j < N; j++) EXPECT_NE(nh, hs[j]) << "slot reused before its CLOSED event";
    }
    // The read events that were completed but not dispatched are dropped; each ended handle
    // gets its CLOSED event.
    int closed = 0;
    for (const mp_event &ev : collect_events(ch, 200)) {
        if (ev.cmd == MP_EV_CLOSED) {
            closed++;
            continue;
        }
        EXPECT_EQ(ev.handle, hs[kept]) << "event of an unregistered handle: " << describe(ev);
        for (int i = 0; i < N; i++)
            if (i != kept) {
                EXPECT_NE(ev.cookie, cookie_of(80 + i)) << describe(ev);
            }
    }
    EXPECT_EQ(closed, N - 1);
    // The kept handle still works.
    ASSERT_EQ(mp_read(hs[kept], buffer(64), 64), 0);
    ASSERT_TRUE(write_all(ps[kept]->client.get(), "pong", 4));
    mp_event ev;
    ASSERT_TRUE(wait_event(ch, MP_EV_READ, hs[kept], &ev));
    EXPECT_EQ(ev.result, 4);
}

// ---------------------------------------------------------------------------------------------
// mp_wake from another thread
// ---------------------------------------------------------------------------------------------

TEST_F(Rules, WakeFromAnotherThreadWakesBlockedDispatch) {
    // An idle connection with a pending read, so the channel has real work in the kernel.
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    mp_handle *h = reg(p.server.get(), cookie_of(91));
    ASSERT_NE(h, nullptr);
    ASSERT_EQ(mp_read(h, buffer(64), 64), 0);
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0);

    std::atomic<int> wake_rc{1};
    std::atomic<bool> woken{false};
    mp_channel *c = ch.get();
    Joiner waker([&] {
        sleep_ms(100);
        woken = true;
        wake_rc = mp_wake(c);
    });
    int r = mp_dispatch(ch, &ev, -1);
    bool after_wake = woken.load();
    waker.join();
    EXPECT_EQ(wake_rc.load(), 0);
    ASSERT_EQ(r, 1);
    EXPECT_EQ(ev.cmd, MP_EV_WAKE) << describe(ev);
    EXPECT_EQ(ev.handle, nullptr);
    EXPECT_EQ(ev.cookie, nullptr);
    EXPECT_TRUE(after_wake) << "dispatch returned before mp_wake was called";

    // A wake before the dispatch is not lost.
    ASSERT_EQ(mp_wake(ch), 0);
    r = mp_dispatch(ch, &ev, 2000);
    ASSERT_EQ(r, 1);
    EXPECT_EQ(ev.cmd, MP_EV_WAKE) << describe(ev);
    EXPECT_EQ(ev.handle, nullptr);
    // Merged wakes: at least one event, and then the channel is quiet again.
    for (int i = 0; i < 3; i++) ASSERT_EQ(mp_wake(ch), 0);
    int wakes = 0;
    for (const mp_event &e : collect_events(ch, 200)) {
        EXPECT_EQ(e.cmd, MP_EV_WAKE) << describe(e);
        wakes++;
    }
    EXPECT_GE(wakes, 1);
    EXPECT_LE(wakes, 3);

    // And from another thread again (the wake-up must re-arm).
    Joiner waker2([&] {
        sleep_ms(50);
        wake_rc = mp_wake(c);
    });
    r = mp_dispatch(ch, &ev, -1);
    waker2.join();
    ASSERT_EQ(r, 1);
    EXPECT_EQ(ev.cmd, MP_EV_WAKE) << describe(ev);
    EXPECT_EQ(ev.handle, nullptr);
}

// ---------------------------------------------------------------------------------------------
// mp_dispatch timeouts
// ---------------------------------------------------------------------------------------------

TEST_F(Rules, DispatchTimeouts) {
    mp_event ev;
    for (int round = 0; round < 2; round++) {
        int64_t t0 = now_ms();
        EXPECT_EQ(mp_dispatch(ch, &ev, 0), 0);
        EXPECT_LT(now_ms() - t0, 500) << "timeout 0 must not block";

        t0 = now_ms();
        EXPECT_EQ(mp_dispatch(ch, &ev, 100), 0);
        int64_t dt = now_ms() - t0;
        EXPECT_GE(dt, 90) << "timeout 100 returned early";
        EXPECT_LT(dt, 2000) << "timeout 100 returned late";
    }
    // With an idle registered connection and a pending read.
    TcpPair &p = pair();
    ASSERT_TRUE(p.server.ok() && p.client.ok());
    mp_handle *h = reg(p.server.get(), nullptr);
    ASSERT_NE(h, nullptr);
    ASSERT_EQ(mp_read(h, buffer(64), 64), 0);
    int64_t t0 = now_ms();
    EXPECT_EQ(mp_dispatch(ch, &ev, 0), 0);
    EXPECT_LT(now_ms() - t0, 500);
    t0 = now_ms();
    EXPECT_EQ(mp_dispatch(ch, &ev, 100), 0);
    int64_t dt = now_ms() - t0;
    EXPECT_GE(dt, 90);
    EXPECT_LT(dt, 2000);
}

// ---------------------------------------------------------------------------------------------
// mp_connect
// ---------------------------------------------------------------------------------------------

TEST_F(Rules, ConnectToListenerSucceeds) {
    Fd l(make_listener());
    ASSERT_TRUE(l.ok());
    sockaddr_in a = loopback_addr(local_port(l.get()));
    int s = keep(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_GE(s, 0);
    void *ck = cookie_of(101);
    mp_handle *h = reg(s, ck);
    ASSERT_NE(h, nullptr);
    ASSERT_EQ(mp_connect(h, (sockaddr *)&a, sizeof a), 0);
    mp_event ev;
    ASSERT_TRUE(dispatch_until(ch, [&](const mp_event &e) { ev = e; return true; }, 5000));
    EXPECT_EQ(ev.cmd, MP_EV_CONNECT) << describe(ev);
    EXPECT_EQ(ev.result, 0);
    EXPECT_EQ(ev.handle, h);
    EXPECT_EQ(ev.cookie, ck);
    Fd srv(accept_timeout(l.get()));
    ASSERT_TRUE(srv.ok());
    // The connection carries data.
    const std::string &m = keep_str("hello via mp_connect");
    ASSERT_EQ(mp_write(h, m.data(), m.size()), 0);
    ASSERT_TRUE(wait_event(ch, MP_EV_WRITE, h, &ev));
    EXPECT_EQ(ev.result, (ssize_t)m.size());
    EXPECT_EQ(read_n(srv.get(), m.size()), m);
}

TEST_F(Rules, ConnectToClosedPortIsRefused) {
    uint16_t port;
    {
        Fd tmp(make_listener(1, false)); // bound, never listening
        ASSERT_TRUE(tmp.ok());
        port = local_port(tmp.get());
    }
    sockaddr_in a = loopback_addr(port);
    int s = keep(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_GE(s, 0);
    mp_handle *h = reg(s, cookie_of(102));
    ASSERT_NE(h, nullptr);
    ASSERT_EQ(mp_connect(h, (sockaddr *)&a, sizeof a), 0);
    mp_event ev;
    ASSERT_TRUE(dispatch_until(ch, [&](const mp_event &e) { ev = e; return true; }, 5000));
    EXPECT_EQ(ev.cmd, MP_EV_CONNECT) << describe(ev);
    EXPECT_EQ(ev.result, -ECONNREFUSED);
    EXPECT_EQ(ev.handle, h);
}

// ---------------------------------------------------------------------------------------------
// Accept count semantics
// ---------------------------------------------------------------------------------------------

TEST_F(Rules, AcceptCountAcceptsExactlyThatMany) {
    int lfd = keep(make_listener());
    ASSERT_GE(lfd, 0);
    uint16_t port = local_port(lfd);
    void *ck = cookie_of(111);
    mp_handle *hl = reg(lfd, ck);
    ASSERT_NE(hl, nullptr);
    ASSERT_EQ(mp_accept(hl, 2, 0), 0);

    std::vector<Fd> clients;
    for (int i = 0; i < 3; i++) {
        clients.emplace_back(connect_client(port));
        ASSERT_TRUE(clients.back().ok());
    }
    auto accepted = [&](int want, int ms) {
        int n = 0;
        dispatch_until(
            ch,
            [&](const mp_event &e) {
                EXPECT_EQ(e.cmd, MP_EV_ACCEPT) << describe(e);
                if (e.cmd != MP_EV_ACCEPT) return false;
                EXPECT_EQ(e.handle, hl);
                EXPECT_EQ(e.cookie, ck);
                EXPECT_GE(e.result, 0);
                if (e.result >= 0) {
                    EXPECT_FALSE(mp_is_lwsocket((int)e.result)) << "flags 0: regular fds";
                    EXPECT_EQ(e.u.accept.fd, (int)e.result);
                    keep((int)e.result);
                    n++;
                }
                return want > 0 && n >= want;
            },
            ms);
        return n;
    };
    EXPECT_EQ(accepted(2, 5000), 2);
    EXPECT_EQ(accepted(0, 300), 0) << "mp_accept(h, 2, 0) accepted more than two";

    // Another call accepts the third.
    ASSERT_EQ(mp_accept(hl, 1, 0), 0);
    EXPECT_EQ(accepted(1, 5000), 1);
    EXPECT_EQ(accepted(0, 200), 0);

    // Calls add up: two calls with count 1 accept two connections.
    ASSERT_EQ(mp_accept(hl, 1, 0), 0);
    ASSERT_EQ(mp_accept(hl, 1, 0), 0);
    for (int i = 0; i < 3; i++) {
        clients.emplace_back(connect_client(port));
        ASSERT_TRUE(clients.back().ok());
    }
    EXPECT_EQ(accepted(2, 5000), 2);
    EXPECT_EQ(accepted(0, 300), 0) << "two mp_accept(h, 1, 0) calls accepted more than two";
}

}  // namespace

// A forked child that destroys its copy of a channel must not disturb the parent: the rings
// and the partition sockets are shared across fork().
TEST(Fork, ChildDestroyLeavesParentChannelWorking) {
    uint16_t port = 0;
    mpt::Fd lfd(mpt::mp_listen_loopback(&port));
    ASSERT_GE(lfd.get(), 0);
    mp_channel *ch = mp_create(nullptr);
    ASSERT_NE(ch, nullptr);
    cpu_set_t all;
    sched_getaffinity(0, sizeof all, &all);
    mp_handle *lh = mp_register(ch, lfd.get(), nullptr, &all);
    ASSERT_NE(lh, nullptr) << strerror(errno);
    ASSERT_EQ(mp_accept(lh, 0, 0), 0);
    mpt::Pair p;
    ASSERT_TRUE(mpt::tcp_pair(p));
    mp_handle *h = mp_register(ch, p.a.get(), nullptr, nullptr);
    ASSERT_NE(h, nullptr);
    char buf[16];
    ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
    mp_event ev;
    EXPECT_EQ(mp_dispatch(ch, &ev, 50), 0); // the parent's requests are in the kernel now

    pid_t pid = fork();
    if (pid == 0) {
        mp_destroy(ch);
        _exit(0);
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);

    ASSERT_TRUE(mpt::write_all(p.b.get(), "ping", 4));
    ASSERT_TRUE(mpt::wait_event(ch, MP_EV_READ, h, &ev));
    EXPECT_EQ(ev.result, 4);
    mpt::Fd c(mpt::connect_client(port));
    ASSERT_GE(c.get(), 0);
    ASSERT_TRUE(mpt::wait_event(ch, MP_EV_ACCEPT, lh, &ev)) << "partition lost after the child's destroy";
    EXPECT_GE(ev.result, 0);
    if (ev.result >= 0 && !mp_is_lwsocket((int)ev.result)) close((int)ev.result);
    mp_destroy(ch);
}
