// test_unregister_close.cc — mp_unregister_close(): the channel takes a connection's fd and
// closes it once the kernel let go of the handle (before MP_EV_CLOSED), queued with the rest;
// mp_destroy() closes what it still holds.  Both engines.
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "test_util.h"

using namespace mpt;

namespace {

bool fd_open(int fd) { return fcntl(fd, F_GETFD) != -1 || errno != EBADF; }

struct UnregClose : ::testing::Test {
    Channel ch;
    void SetUp() override {
        mp_options o = opts();
        ch.reset(mp_create(&o));
        ASSERT_NE(ch.get(), nullptr) << strerror(errno);
    }
    // Dispatch until h's MP_EV_CLOSED; false on timeout.
    bool until_closed(mp_handle *h, int timeout_ms = 3000) {
        mp_event ev;
        for (auto dl = deadline_in(timeout_ms); std::chrono::steady_clock::now() < dl;)
            if (mp_dispatch(ch, &ev, 50) == 0 && ev.cmd == MP_EV_CLOSED && ev.handle == h)
                return true;
        return false;
    }
};

} // namespace

TEST_F(UnregClose, ClosesWhenTheKernelLetGo) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    int fd = p.a.release();
    mp_handle *h = mp_register(ch, fd, nullptr, nullptr);
    ASSERT_NE(h, nullptr) << strerror(errno);
    char buf[64];
    ASSERT_EQ(mp_read(h, buf, sizeof buf), 0); // in the kernel when the handle ends
    ASSERT_GE(mp_flush(ch), 0);
    ASSERT_EQ(mp_unregister_close(h), 0);
    EXPECT_EQ(mp_unregister_close(h), -EBADF); // ended: a stale pointer gets -EBADF
    EXPECT_EQ(mp_unregister(h), -EBADF);
    ASSERT_TRUE(until_closed(h));
    ASSERT_GE(mp_flush(ch), 0); // the close is queued when the handle settles
    EXPECT_FALSE(fd_open(fd)) << "the fd is still open after MP_EV_CLOSED and a flush";
    pollfd pf = {p.b.get(), POLLIN, 0};
    ASSERT_EQ(::poll(&pf, 1, 2000), 1) << "the peer must see the close";
    char c;
    EXPECT_EQ(::recv(p.b.get(), &c, 1, MSG_DONTWAIT), 0);
}

TEST_F(UnregClose, ManyConnectionsReturnTheFdCount) {
    int before = count_fds();
    for (int round = 0; round < 3; round++) {
        std::vector<Pair> ps(50);
        std::vector<mp_handle *> hs;
        for (auto &p : ps) {
            ASSERT_TRUE(tcp_pair(p));
            mp_handle *h = mp_register(ch, p.a.release(), nullptr, nullptr);
            ASSERT_NE(h, nullptr);
            hs.push_back(h);
        }
        for (auto *h : hs) ASSERT_EQ(mp_unregister_close(h), 0);
        mp_event evs[64];
        int closed = 0;
        for (auto dl = deadline_in(3000); closed < 50 && std::chrono::steady_clock::now() < dl;) {
            int n = mp_dispatch_batch(ch, evs, 64, 50);
            for (int i = 0; i < n; i++) closed += evs[i].cmd == MP_EV_CLOSED;
        }
        EXPECT_EQ(closed, 50);
        ASSERT_GE(mp_flush(ch), 0);
    }
    EXPECT_EQ(count_fds(), before);
}

TEST_F(UnregClose, DestroyClosesWhatItHolds) {
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    int fd = p.a.release();
    mp_handle *h = mp_register(ch, fd, nullptr, nullptr);
    ASSERT_NE(h, nullptr);
    char buf[16];
    ASSERT_EQ(mp_read(h, buf, sizeof buf), 0);
    ASSERT_GE(mp_flush(ch), 0);
    ASSERT_EQ(mp_unregister_close(h), 0);
    ch.reset(); // before the CLOSED event
    EXPECT_FALSE(fd_open(fd));
}

TEST_F(UnregClose, BadInput) {
    EXPECT_EQ(mp_unregister_close(nullptr), -EBADF);
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    mp_handle *w = mp_poll_add(ch, p.a.get(), EPOLLIN, 0, nullptr);
    ASSERT_NE(w, nullptr);
    EXPECT_EQ(mp_unregister_close(w), -EINVAL); // a watch's fd is never the channel's
    EXPECT_TRUE(fd_open(p.a.get()));
    EXPECT_EQ(mp_poll_del(w), 0);
}
