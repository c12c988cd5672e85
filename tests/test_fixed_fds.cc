// test_fixed_fds.cc — MP_FIXED_FDS (mp_options.fixed_fds): connections registered from regular
// fds get a registered-file slot on io_uring, their reads (plain and buffered) and writes go
// through it and carry the right bytes; unregistering empties the slot, so closing the fd at
// the CLOSED event ends the connection; past the last slot connections use their fds; a slot
// is not handed to a new connection before the request that empties it reached the kernel.
// The epoll engine has no such table: the same traffic, no slot (fixed_files 0).  Both engines.
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "test_util.h"

using namespace mpt;

namespace {

mp_options fixed_opts(int n) {
    mp_options o = opts();
    o.fixed_fds = n;
    return o;
}

uint64_t fixed_files(mp_channel *ch) {
    mp_stats st;
    EXPECT_EQ(mp_get_stats(ch, &st), 0);
    return st.fixed_files;
}

// What the channel reads on h from its peer: n bytes (plain mp_read into buf, or buffered).
std::string read_n_on(mp_channel *ch, mp_handle *h, size_t n, bool buffered) {
    std::string got;
    std::vector<char> buf(n);
    while (got.size() < n) {
        int r = buffered ? mp_read_buffered(h) : mp_read(h, buf.data(), n - got.size());
        EXPECT_EQ(r, 0);
        if (r != 0) break;
        mp_event ev;
        if (!wait_event(ch, &ev, [&](const mp_event &e) {
                return e.handle == h && (e.cmd == MP_EV_READ || e.cmd == MP_EV_DISCONNECT);
            }, 5000)) {
            ADD_FAILURE() << "no READ event";
            break;
        }
        if (ev.cmd != MP_EV_READ || ev.result <= 0) {
            ADD_FAILURE() << describe(ev);
            break;
        }
        if (ev.flags & MP_EVF_BUFFER) {
            got.append((const char *)ev.u.read.buf, (size_t)ev.result);
            EXPECT_EQ(mp_buffer_release(ch, ev.u.read.buf_id), 0);
        } else {
            got.append(buf.data(), (size_t)ev.result);
        }
    }
    return got;
}

// The peer sends msg, the channel reads it, writes it back, the peer reads it back.
void echo(mp_channel *ch, mp_handle *h, int peer, const std::string &msg, bool buffered) {
    ASSERT_TRUE(write_all(peer, msg.data(), msg.size()));
    std::string got = read_n_on(ch, h, msg.size(), buffered);
    ASSERT_EQ(got, msg);
    ASSERT_EQ(mp_write(h, got.data(), got.size()), 0);
    mp_event ev;
    ASSERT_TRUE(wait_cmd(ch, &ev, MP_EV_WRITE, h));
    ASSERT_EQ(ev.result, (ssize_t)msg.size());
    ASSERT_EQ(read_n(peer, msg.size()), msg);
}

// Unregister h, close its fd at its CLOSED event (as the API says), and check the peer sees
// the connection end.
void end_and_close(mp_channel *ch, mp_handle *h, Fd &fd, int peer) {
    ASSERT_EQ(mp_unregister(h), 0);
    mp_event ev;
    ASSERT_TRUE(wait_cmd(ch, &ev, MP_EV_CLOSED, h));
    ::close(fd.release());
    ASSERT_GE(mp_flush(ch), 0);
    EXPECT_TRUE(sees_eof(peer, 3000)) << "the connection outlived its fd";
}

bool buffered_ok(mp_channel *ch) { return is_uring(ch); }

} // namespace

TEST(FixedFds, ReadsWritesAndCloseEndTheConnection) {
    mp_options o = fixed_opts(8);
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    const int n = 4;
    std::vector<Pair> p(n);
    std::vector<mp_handle *> h(n);
    for (int i = 0; i < n; i++) {
        ASSERT_TRUE(tcp_pair(p[i]));
        h[i] = mp_register(ch, p[i].a.get(), nullptr, nullptr);
        ASSERT_NE(h[i], nullptr);
        EXPECT_EQ(mp_handle_fd(h[i]), p[i].a.get()) << "the fd stays the application's";
    }
    EXPECT_EQ(fixed_files(ch), is_uring(ch) ? (uint64_t)n : 0u);
    for (int round = 0; round < 3; round++)
        for (int i = 0; i < n; i++) {
            bool buffered = buffered_ok(ch) && (i % 2 == 1);
            echo(ch, h[i], p[i].b.get(), pattern(100 + 1000 * round + i, (uint32_t)(round * n + i)),
                 buffered);
        }
    // The fd still works for the application's own calls beside the channel's.
    ASSERT_EQ(::send(p[0].a.get(), "x", 1, MSG_NOSIGNAL), 1);
    ASSERT_EQ(read_n(p[0].b.get(), 1), "x");
    for (int i = 0; i < n; i++) end_and_close(ch, h[i], p[i].a, p[i].b.get());
}

TEST(FixedFds, MoreConnectionsThanSlots) {
    mp_options o = fixed_opts(2);
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    const int n = 5;
    std::vector<Pair> p(n);
    std::vector<mp_handle *> h(n);
    for (int i = 0; i < n; i++) {
        ASSERT_TRUE(tcp_pair(p[i]));
        h[i] = mp_register(ch, p[i].a.get(), nullptr, nullptr);
        ASSERT_NE(h[i], nullptr);
    }
    EXPECT_EQ(fixed_files(ch), is_uring(ch) ? 2u : 0u) << "only as many slots as asked for";
    for (int i = 0; i < n; i++) echo(ch, h[i], p[i].b.get(), pattern(3000, (uint32_t)i), false);
    for (int i = 0; i < n; i++) end_and_close(ch, h[i], p[i].a, p[i].b.get());
    // The slots are free again (their removals went to the kernel with the flushes above).
    std::vector<Pair> q(3);
    std::vector<mp_handle *> g(3);
    for (int i = 0; i < 3; i++) {
        ASSERT_TRUE(tcp_pair(q[i]));
        g[i] = mp_register(ch, q[i].a.get(), nullptr, nullptr);
        ASSERT_NE(g[i], nullptr);
    }
    EXPECT_EQ(fixed_files(ch), is_uring(ch) ? 4u : 0u) << "freed slots were not reused";
    for (int i = 0; i < 3; i++)
        echo(ch, g[i], q[i].b.get(), pattern(5000, (uint32_t)(10 + i)), buffered_ok(ch));
    for (int i = 0; i < 3; i++) end_and_close(ch, g[i], q[i].a, q[i].b.get());
}

// A connection ended with its receive still queued (not yet handed to the kernel), and a new
// connection registered at once: the new one must not take the slot, or the old one's queued
// requests (its slot's update reads the fd array at submission) would run on the new socket.
// It uses its fd; the next connection after a submission gets the slot again.
TEST(FixedFds, SlotReusedOnlyAfterItsRemovalWasSubmitted) {
    mp_options o = fixed_opts(1);
    o.batch = 64; // nothing is submitted behind the test's back
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    bool buffered = buffered_ok(ch);
    Pair a, b, c;
    ASSERT_TRUE(tcp_pair(a));
    ASSERT_TRUE(tcp_pair(b));
    ASSERT_TRUE(tcp_pair(c));
    mp_handle *ha = mp_register(ch, a.a.get(), nullptr, nullptr);
    ASSERT_NE(ha, nullptr);
    echo(ch, ha, a.b.get(), pattern(700, 1), buffered);
    // Queued, not submitted: a receive on a's slot, then a's end.
    static char sink[64];
    ASSERT_EQ(buffered ? mp_read_buffered(ha) : mp_read(ha, sink, sizeof sink), 0);
    ASSERT_EQ(mp_unregister(ha), 0);
    mp_handle *hb = mp_register(ch, b.a.get(), nullptr, nullptr);
    ASSERT_NE(hb, nullptr);
    EXPECT_EQ(fixed_files(ch), is_uring(ch) ? 1u : 0u) << "the slot went to b before a let go";
    // b's data reaches b, nothing of it is taken by a's receive.
    const std::string msg = pattern(2000, 2);
    ASSERT_TRUE(write_all(b.b.get(), msg.data(), msg.size()));
    mp_event ev;
    ASSERT_TRUE(wait_cmd(ch, &ev, MP_EV_CLOSED, ha));
    ::close(a.a.release());
    ASSERT_EQ(read_n_on(ch, hb, msg.size(), buffered), msg);
    EXPECT_TRUE(sees_eof(a.b.get(), 3000));
    // Everything queued was handed over since: the slot is free for c.
    mp_handle *hc = mp_register(ch, c.a.get(), nullptr, nullptr);
    ASSERT_NE(hc, nullptr);
    EXPECT_EQ(fixed_files(ch), is_uring(ch) ? 2u : 0u);
    echo(ch, hc, c.b.get(), pattern(1500, 3), buffered);
    echo(ch, hb, b.b.get(), pattern(1500, 4), buffered);
    end_and_close(ch, hb, b.a, b.b.get());
    end_and_close(ch, hc, c.a, c.b.get());
}

// The channel's requests name the registered file, not the number: after the application
// puts another socket at the connection's fd number (dup2), the channel still talks to the
// connection it registered, and unregistering lets that connection go.  io_uring only (the
// epoll engine uses the number, which is what the slot saves).
TEST(FixedFds, RequestsUseTheRegisteredFile) {
    mp_options o = fixed_opts(4);
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    if (!is_uring(ch)) GTEST_SKIP() << "no registered-file table on the epoll engine";
    Pair p, other;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_TRUE(tcp_pair(other));
    mp_handle *h = mp_register(ch, p.a.get(), nullptr, nullptr);
    ASSERT_NE(h, nullptr);
    ASSERT_EQ(fixed_files(ch), 1u);
    ASSERT_GE(mp_flush(ch), 0); // the slot is filled
    ASSERT_EQ(::dup2(other.a.get(), p.a.get()), p.a.get());
    const std::string msg = pattern(1200, 7);
    ASSERT_EQ(mp_write(h, msg.data(), msg.size()), 0);
    mp_event ev;
    ASSERT_TRUE(wait_cmd(ch, &ev, MP_EV_WRITE, h));
    ASSERT_EQ(ev.result, (ssize_t)msg.size());
    EXPECT_EQ(read_n(p.b.get(), msg.size(), 2000), msg) << "the write went to the number's socket";
    EXPECT_EQ(drain(other.b.get()), 0u);
    ASSERT_TRUE(write_all(p.b.get(), msg.data(), msg.size()));
    EXPECT_EQ(read_n_on(ch, h, msg.size(), true), msg);
    // Only the slot holds the registered connection now: unregistering ends it.
    ASSERT_EQ(mp_unregister(h), 0);
    ASSERT_TRUE(wait_cmd(ch, &ev, MP_EV_CLOSED, h));
    ASSERT_GE(mp_flush(ch), 0);
    EXPECT_TRUE(sees_eof(p.b.get(), 3000)) << "the slot kept the connection";
}

TEST(FixedFds, OptionIsChecked) {
    mp_options o = fixed_opts((1 << 20) + 1);
    mp_channel *ch = mp_create(&o);
    EXPECT_EQ(ch, nullptr);
    if (ch) mp_destroy(ch);
    EXPECT_EQ(errno, EINVAL);
}
