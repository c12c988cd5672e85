// Lightweight sockets: on io_uring, mp_accept(..., MP_LWSOCKET) accepts into the ring's
// direct-descriptor table — ids >= MP_LWSOCKET_BASE, no entry in the process fd table —
// usable only through the channel, convertible to a real fd with mp_export_fd().  Elsewhere
// (epoll engine, MP_LWSOCKET=0) the flag is ignored and regular fds come back.
#include <gtest/gtest.h>

#include <array>
#include <set>

#include "megapipe.h"
#include "test_util.h"

namespace {

class LwSocket : public ::testing::Test {
  protected:
    // A channel (lwsocket option as given) and a shared listener registered on it.
    void open(int lwsocket = MP_OPT_DEFAULT) {
        ch_.reset(mpt::create_channel(MP_OPT_DEFAULT, lwsocket));
        ASSERT_NE(ch_, nullptr) << strerror(errno);
        lfd_ = mpt::plain_listener(&port_);
        ASSERT_GE(lfd_, 0);
        lh_ = mp_register(ch_.get(), lfd_, nullptr, nullptr);
        ASSERT_NE(lh_, nullptr) << strerror(errno);
    }
    void TearDown() override {
        ch_.reset();
        mpt::close_all_rst(clients_);
        if (lfd_ >= 0) close(lfd_);
    }
    bool uring() const { return mpt::is_uring(ch_.get()); }

    int connect_client() {
        int c = mpt::connect_loopback(port_);
        if (c >= 0) clients_.push_back(c);
        return c;
    }

    // Accept one connection from a new client; returns the ACCEPT result.  The listener
    // accepts forever (count 0, multishot on io_uring), armed at the first call with flags.
    int accept_one(int flags, int *client) {
        if (!armed_) {
            EXPECT_EQ(mp_accept(lh_, 0, flags), 0);
            armed_ = true;
        }
        *client = connect_client();
        EXPECT_GE(*client, 0);
        mp_event ev;
        if (!mpt::wait_cmd(ch_.get(), &ev, MP_EV_ACCEPT, lh_)) {
            ADD_FAILURE() << "no ACCEPT event";
            return -ETIMEDOUT;
        }
        EXPECT_EQ(ev.u.accept.fd, (int)ev.result);
        return (int)ev.result;
    }

    // One request/response through the channel: client sends msg, server reads it and echoes.
    void round_trip(mp_handle *h, int client, const std::string &msg) {
        char buf[256];
        ASSERT_LT(msg.size(), sizeof buf);
        ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
        ASSERT_TRUE(mpt::write_all(client, msg.data(), msg.size()));
        mp_event ev;
        ASSERT_TRUE(mpt::wait_event(
            ch_.get(), &ev,
            [h](const mp_event &e) {
                return e.handle == h && (e.cmd == MP_EV_READ || e.cmd == MP_EV_DISCONNECT);
            }))
            << "no READ";
        ASSERT_EQ(ev.cmd, MP_EV_READ) << "DISCONNECT instead of READ, result " << ev.result << " ("
                                      << strerror((int)-ev.result) << ")";
        ASSERT_EQ(ev.result, (ssize_t)msg.size());
        ASSERT_EQ(std::string(buf, msg.size()), msg);
        ASSERT_EQ(mp_write(h, buf, (size_t)ev.result), 0);
        ASSERT_TRUE(mpt::wait_cmd(ch_.get(), &ev, MP_EV_WRITE, h)) << "no WRITE";
        ASSERT_EQ(ev.result, (ssize_t)msg.size());
        std::string back(msg.size(), '\0');
        ASSERT_EQ(mpt::recv_exact(client, &back[0], back.size()), back.size());
        EXPECT_EQ(back, msg);
    }

    mpt::ChanPtr ch_;
    int lfd_ = -1;
    uint16_t port_ = 0;
    mp_handle *lh_ = nullptr;
    bool armed_ = false;
    std::vector<int> clients_;
};

// When an "lwsocket id" is really BASE + a regular fd of this very connection, the accept went
// to the fd table instead of the direct-descriptor table: say so.
std::string fd_leak_diagnosis(int id, int client) {
    if (!mp_is_lwsocket(id)) return "";
    int fd = id - MP_LWSOCKET_BASE;
    if (mpt::fd_valid(fd) && mpt::peer_port(fd) == mpt::local_port(client))
        return " [id - MP_LWSOCKET_BASE = " + std::to_string(fd) +
               " is a regular fd of this connection in the process fd table: the accept was "
               "not a direct accept]";
    return "";
}

#define OPEN(...)                                                                              \
    do {                                                                                       \
        open(__VA_ARGS__);                                                                     \
        if (HasFatalFailure()) return;                                                         \
    } while (0)

#define URING_ONLY()                                                                           \
    do {                                                                                       \
        if (!uring()) GTEST_SKIP() << "lwsockets need the io_uring engine";                    \
    } while (0)

} // namespace

TEST_F(LwSocket, UringAcceptsLwsocketsAndEchoes) {
    OPEN();
    URING_ONLY();
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch_.get(), &st), 0);
    ASSERT_TRUE(st.features & MP_FEAT_DIRECT_DESCRIPTORS) << "no direct-descriptor table";

    ASSERT_EQ(mp_accept(lh_, 0, MP_LWSOCKET), 0);
    std::vector<int> cl;
    std::vector<mp_handle *> hs;
    std::set<int> ids;
    for (int k = 0; k < 3; k++) {
        int c = connect_client();
        ASSERT_GE(c, 0);
        mp_event ev;
        ASSERT_TRUE(mpt::wait_cmd(ch_.get(), &ev, MP_EV_ACCEPT, lh_));
        int id = (int)ev.result;
        ASSERT_GE(id, MP_LWSOCKET_BASE) << "MP_LWSOCKET gave a regular fd";
        EXPECT_TRUE(mp_is_lwsocket(id));
        EXPECT_EQ(ev.u.accept.fd, id);
        EXPECT_TRUE(ids.insert(id).second) << "id handed out twice";
        mp_handle *h = mp_register(ch_.get(), id, nullptr, nullptr);
        ASSERT_NE(h, nullptr) << strerror(errno);
        EXPECT_EQ(mp_handle_fd(h), id);
        cl.push_back(c);
        hs.push_back(h);
    }
    for (size_t k = 0; k < hs.size(); k++) {
        round_trip(hs[k], cl[k], "ping " + std::to_string(k));
        round_trip(hs[k], cl[k], "second message on lwsocket " + std::to_string(k));
    }
    for (auto *h : hs) EXPECT_EQ(mp_unregister(h), 0);
}

TEST_F(LwSocket, UringLwsocketsTakeNoFdTableEntries) {
    OPEN();
    URING_ONLY();
    const int n = 50;
    std::vector<int> cl;
    for (int i = 0; i < n; i++) {
        int c = connect_client();
        ASSERT_GE(c, 0);
        cl.push_back(c);
    }
    int before = mpt::count_open_fds();
    ASSERT_GT(before, 0);
    ASSERT_EQ(mp_accept(lh_, 0, MP_LWSOCKET), 0);
    std::vector<int> ids;
    for (int i = 0; i < n; i++) {
        mp_event ev;
        ASSERT_TRUE(mpt::wait_cmd(ch_.get(), &ev, MP_EV_ACCEPT, lh_)) << "accepted " << i;
        ASSERT_GE(ev.result, MP_LWSOCKET_BASE);
        ids.push_back((int)ev.result);
    }
    int after = mpt::count_open_fds();
    EXPECT_LE(after - before, 2) << n << " lwsockets grew the fd table from " << before << " to "
                                 << after;
    EXPECT_EQ(std::set<int>(ids.begin(), ids.end()).size(), (size_t)n);

    // They are live connections: register all, echo on all.
    std::vector<mp_handle *> hs;
    std::vector<std::array<char, 32>> bufs(n);
    for (int i = 0; i < n; i++) {
        mp_handle *h = mp_register(ch_.get(), ids[i], (void *)(uintptr_t)i, nullptr);
        ASSERT_NE(h, nullptr) << strerror(errno);
        hs.push_back(h);
        ASSERT_EQ(mp_read(h, bufs[i].data(), bufs[i].size()), 0);
    }
    for (int i = 0; i < n; i++) ASSERT_TRUE(mpt::write_all(cl[i], "lw!", 3));
    for (int k = 0; k < n; k++) {
        mp_event ev;
        ASSERT_TRUE(mpt::wait_cmd(ch_.get(), &ev, MP_EV_READ)) << "read " << k;
        size_t i = (size_t)(uintptr_t)ev.cookie;
        ASSERT_EQ(ev.result, 3);
        ASSERT_EQ(mp_write(hs[i], bufs[i].data(), 3), 0);
    }
    for (int k = 0; k < n; k++) {
        mp_event ev;
        ASSERT_TRUE(mpt::wait_cmd(ch_.get(), &ev, MP_EV_WRITE)) << "write " << k;
        EXPECT_EQ(ev.result, 3);
    }
    for (int i = 0; i < n; i++) {
        char b[3];
        ASSERT_EQ(mpt::recv_exact(cl[i], b, 3), 3u);
        EXPECT_EQ(std::string(b, 3), "lw!");
    }
    EXPECT_LE(mpt::count_open_fds() - before, 2);

    // mp_unregister closes lwsockets (the channel owns them): every client sees EOF.
    for (auto *h : hs) EXPECT_EQ(mp_unregister(h), 0);
    EXPECT_GE(mp_flush(ch_.get()), 0);
    int eof = 0;
    for (int c : cl) eof += mpt::sees_eof(c, 2000);
    EXPECT_EQ(eof, n) << "unregistered lwsockets were not closed";

    // The measurement is meaningful: the same accepts as regular fds (another listener on
    // the same channel) do take n entries.
    uint16_t port2 = 0;
    int lfd2 = mpt::plain_listener(&port2);
    ASSERT_GE(lfd2, 0);
    mp_handle *lh2 = mp_register(ch_.get(), lfd2, nullptr, nullptr);
    ASSERT_NE(lh2, nullptr);
    std::vector<int> cl2;
    for (int i = 0; i < n; i++) {
        int c2 = mpt::connect_loopback(port2);
        ASSERT_GE(c2, 0);
        cl2.push_back(c2);
    }
    int before2 = mpt::count_open_fds();
    ASSERT_EQ(mp_accept(lh2, 0, 0), 0);
    std::vector<int> fds;
    for (int i = 0; i < n; i++) {
        mp_event ev;
        ASSERT_TRUE(mpt::wait_cmd(ch_.get(), &ev, MP_EV_ACCEPT, lh2));
        ASSERT_GE(ev.result, 0);
        ASSERT_LT(ev.result, MP_LWSOCKET_BASE);
        fds.push_back((int)ev.result);
    }
    EXPECT_GE(mpt::count_open_fds() - before2, n);
    EXPECT_EQ(mp_unregister(lh2), 0);
    for (int fd : fds) close(fd);
    mpt::close_all_rst(cl2);
    close(lfd2);
}

// mp_accept with a count (not multishot: one accept SQE at a time) must give lwsockets too.
TEST_F(LwSocket, UringCountedAcceptGivesLwsockets) {
    OPEN();
    URING_ONLY();
    for (int k = 0; k < 3; k++) {
        int c = connect_client();
        ASSERT_GE(c, 0);
        int before = mpt::count_open_fds();
        ASSERT_EQ(mp_accept(lh_, 1, MP_LWSOCKET), 0);
        mp_event ev;
        ASSERT_TRUE(mpt::wait_cmd(ch_.get(), &ev, MP_EV_ACCEPT, lh_));
        int id = (int)ev.result;
        ASSERT_GE(id, MP_LWSOCKET_BASE);
        std::string leak = fd_leak_diagnosis(id, c);
        EXPECT_EQ(mpt::count_open_fds(), before) << "a counted lwsocket accept added an fd" << leak;
        if (!leak.empty()) close(id - MP_LWSOCKET_BASE); // the library lost track of it
        mp_handle *h = mp_register(ch_.get(), id, nullptr, nullptr);
        ASSERT_NE(h, nullptr);
        round_trip(h, c, "counted accept " + std::to_string(k));
        EXPECT_EQ(mp_unregister(h), 0);
        if (HasFailure()) break;
    }
}

TEST_F(LwSocket, UringExportFdGivesWorkingRealFd) {
    OPEN();
    URING_ONLY();
    ASSERT_EQ(mp_accept(lh_, 0, MP_LWSOCKET), 0);
    int c = connect_client();
    ASSERT_GE(c, 0);
    mp_event ev;
    ASSERT_TRUE(mpt::wait_cmd(ch_.get(), &ev, MP_EV_ACCEPT, lh_));
    int id = (int)ev.result;
    ASSERT_TRUE(mp_is_lwsocket(id));
    mp_handle *h = mp_register(ch_.get(), id, nullptr, nullptr);
    ASSERT_NE(h, nullptr);

    int fd = mp_export_fd(h);
    if (fd == -ENOTSUP) GTEST_SKIP() << "kernel without IORING_OP_FIXED_FD_INSTALL";
    ASSERT_GE(fd, 0) << strerror(-fd);
    EXPECT_LT(fd, MP_LWSOCKET_BASE);
    EXPECT_TRUE(mpt::fd_valid(fd));
    EXPECT_EQ(mpt::peer_port(fd), mpt::local_port(c)) << "exported fd is not this connection";
    EXPECT_EQ(mpt::local_port(fd), port_);
    // Plain socket calls work on it, both ways.
    ASSERT_TRUE(mpt::write_all(fd, "exported", 8));
    char b[16];
    ASSERT_EQ(mpt::recv_exact(c, b, 8), 8u);
    EXPECT_EQ(std::string(b, 8), "exported");
    ASSERT_TRUE(mpt::write_all(c, "reply", 5));
    ASSERT_EQ(mpt::recv_exact(fd, b, 5), 5u);
    EXPECT_EQ(std::string(b, 5), "reply");
    EXPECT_EQ(close(fd), 0);

    // Closing the exported fd leaves the lwsocket alone.
    round_trip(h, c, "still alive after export");
    int fd2 = mp_export_fd(h);
    ASSERT_GE(fd2, 0) << "second export: " << strerror(-fd2);
    close(fd2);
    round_trip(h, c, "and after a second export");

    EXPECT_EQ(mp_unregister(h), 0);
    errno = 0;
    EXPECT_EQ(mp_register(ch_.get(), id, nullptr, nullptr), nullptr)
        << "an unregistered lwsocket id must be invalid";
    EXPECT_EQ(errno, EBADF);
    EXPECT_EQ(mp_export_fd(h), -EBADF);
    EXPECT_GE(mp_flush(ch_.get()), 0);
    EXPECT_TRUE(mpt::sees_eof(c)) << "mp_unregister did not close the lwsocket";
}

// MP_LWSOCKET=0: the flag is ignored, on every engine.
TEST_F(LwSocket, OptionOffGivesRegularFds) {
    OPEN(0);
    int c = -1;
    int fd = accept_one(MP_LWSOCKET, &c);
    ASSERT_GE(fd, 0);
    EXPECT_LT(fd, MP_LWSOCKET_BASE) << "lwsocket option 0 must give regular fds ("
                                    << mp_engine_name(ch_.get()) << ")";
    EXPECT_FALSE(mp_is_lwsocket(fd));
    EXPECT_TRUE(mpt::fd_valid(fd));
    EXPECT_EQ(mpt::peer_port(fd), mpt::local_port(c));
    mp_handle *h = mp_register(ch_.get(), fd, nullptr, nullptr);
    ASSERT_NE(h, nullptr);
    round_trip(h, c, "regular fd");
    EXPECT_EQ(mp_unregister(h), 0);
    EXPECT_TRUE(mpt::fd_valid(fd)) << "mp_unregister must not close a regular fd";
    close(fd);
}

// The epoll engine has no direct descriptors: MP_LWSOCKET falls back to regular fds.
TEST_F(LwSocket, EpollGivesRegularFds) {
    OPEN();
    if (uring()) GTEST_SKIP() << "epoll engine only";
    EXPECT_STREQ(mp_engine_name(ch_.get()), "epoll");
    for (int k = 0; k < 3; k++) {
        int c = -1;
        int fd = accept_one(MP_LWSOCKET, &c);
        ASSERT_GE(fd, 0);
        EXPECT_LT(fd, MP_LWSOCKET_BASE);
        EXPECT_TRUE(mpt::fd_valid(fd));
        EXPECT_EQ(mpt::peer_port(fd), mpt::local_port(c));
        mp_handle *h = mp_register(ch_.get(), fd, nullptr, nullptr);
        ASSERT_NE(h, nullptr);
        round_trip(h, c, "epoll fallback");
        EXPECT_EQ(mp_unregister(h), 0);
        close(fd);
    }
}

// mp_export_fd on a regular fd is a dup() of it (both engines; the brief's epoll case).
TEST_F(LwSocket, ExportOfRegularFdIsWorkingDup) {
    OPEN(0); // regular fds on both engines
    int c = -1;
    int fd = accept_one(MP_LWSOCKET, &c);
    ASSERT_GE(fd, 0);
    ASSERT_LT(fd, MP_LWSOCKET_BASE);
    mp_handle *h = mp_register(ch_.get(), fd, nullptr, nullptr);
    ASSERT_NE(h, nullptr);
    int d = mp_export_fd(h);
    ASSERT_GE(d, 0) << strerror(-d);
    EXPECT_NE(d, fd);
    struct stat s1, s2;
    ASSERT_EQ(fstat(fd, &s1), 0);
    ASSERT_EQ(fstat(d, &s2), 0);
    EXPECT_EQ(s1.st_ino, s2.st_ino) << "not the same socket";
    EXPECT_EQ(s1.st_dev, s2.st_dev);
    ASSERT_TRUE(mpt::write_all(d, "dup", 3));
    char b[4];
    ASSERT_EQ(mpt::recv_exact(c, b, 3), 3u);
    EXPECT_EQ(std::string(b, 3), "dup");
    close(d);
    round_trip(h, c, "handle works after the dup is closed");
    EXPECT_EQ(mp_unregister(h), 0);
    close(fd);
}

TEST_F(LwSocket, RegisterUnknownIdIsEbadf) {
    OPEN();
    for (int id : {MP_LWSOCKET_BASE, MP_LWSOCKET_BASE + 1, MP_LWSOCKET_BASE + 100000,
                   MP_LWSOCKET_BASE + (1 << 29)}) {
        errno = 0;
        EXPECT_EQ(mp_register(ch_.get(), id, nullptr, nullptr), nullptr) << "id " << id;
        EXPECT_EQ(errno, EBADF) << "id " << id;
    }
    if (!uring()) return;
    // Accepted on this channel: a neighbouring slot that was never accepted is still bad,
    // and another channel does not own the id.
    int c = -1;
    int id = accept_one(MP_LWSOCKET, &c);
    ASSERT_TRUE(mp_is_lwsocket(id));
    errno = 0;
    EXPECT_EQ(mp_register(ch_.get(), id + 1, nullptr, nullptr), nullptr);
    EXPECT_EQ(errno, EBADF);
    mpt::ChanPtr other(mp_create(nullptr));
    ASSERT_NE(other, nullptr);
    errno = 0;
    EXPECT_EQ(mp_register(other.get(), id, nullptr, nullptr), nullptr)
        << "an lwsocket id of another channel";
    EXPECT_EQ(errno, EBADF);
    mp_handle *h = mp_register(ch_.get(), id, nullptr, nullptr);
    ASSERT_NE(h, nullptr) << "the failed attempts must not spoil the real registration";
    round_trip(h, c, "owner still works");
    EXPECT_EQ(mp_unregister(h), 0);
}

TEST_F(LwSocket, RegisterTwiceIsEexist) {
    OPEN();
    int c = -1;
    int id = accept_one(MP_LWSOCKET, &c);
    ASSERT_GE(id, 0);
    EXPECT_EQ(mp_is_lwsocket(id), uring() ? 1 : 0);
    mp_handle *h = mp_register(ch_.get(), id, nullptr, nullptr);
    ASSERT_NE(h, nullptr);
    errno = 0;
    EXPECT_EQ(mp_register(ch_.get(), id, nullptr, nullptr), nullptr);
    EXPECT_EQ(errno, EEXIST);
    round_trip(h, c, "first registration unaffected");
    EXPECT_EQ(mp_unregister(h), 0);
    EXPECT_EQ(mp_unregister(h), -EBADF);
    if (!mp_is_lwsocket(id)) close(id);
}
