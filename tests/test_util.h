// test_util.h — small helpers shared by the googletest suites: loopback TCP sockets, timing,
// byte patterns, RAII guards and dispatch loops.  Header-only (everything is inline).
#ifndef MP_TEST_UTIL_H
#define MP_TEST_UTIL_H

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "megapipe.h"

namespace mpt {

inline int64_t now_ms() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

inline void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

// Closes an fd when it goes out of scope (unless released).
struct Fd {
    int fd = -1;
    Fd() = default;
    explicit Fd(int f) : fd(f) {}
    Fd(const Fd &) = delete;
    Fd &operator=(const Fd &) = delete;
    Fd(Fd &&o) noexcept : fd(o.fd) { o.fd = -1; }
    Fd &operator=(Fd &&o) noexcept {
        if (this != &o) {
            reset();
            fd = o.fd;
            o.fd = -1;
        }
        return *this;
    }
    ~Fd() { reset(); }
    void reset(int f = -1) {
        if (fd >= 0) ::close(fd);
        fd = f;
    }
    int release() {
        int f = fd;
        fd = -1;
        return f;
    }
    int get() const { return fd; }
    bool ok() const { return fd >= 0; }
};

// Destroys a channel when it goes out of scope.
struct Channel {
    mp_channel *ch = nullptr;
    Channel() = default;
    explicit Channel(mp_channel *c) : ch(c) {}
    Channel(const Channel &) = delete;
    Channel &operator=(const Channel &) = delete;
    ~Channel() { reset(); }
    void reset(mp_channel *c = nullptr) {
        if (ch) mp_destroy(ch);
        ch = c;
    }
    mp_channel *get() const { return ch; }
    operator mp_channel *() const { return ch; }
};

inline bool is_uring(const mp_channel *ch) { return std::strcmp(mp_engine_name(ch), "uring") == 0; }

inline sockaddr_in loopback_addr(uint16_t port) {
    sockaddr_in a;
    std::memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

inline uint16_t local_port(int fd) {
    sockaddr_in a;
    socklen_t l = sizeof a;
    if (getsockname(fd, (sockaddr *)&a, &l) < 0) return 0;
    return ntohs(a.sin_port);
}

// A plain (no SO_REUSEPORT) TCP socket bound to 127.0.0.1:0; listening when listen_now.
inline int make_listener(int backlog = 1024, bool listen_now = true) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a = loopback_addr(0);
    if (bind(fd, (sockaddr *)&a, sizeof a) < 0 || (listen_now && listen(fd, backlog) < 0)) {
        ::close(fd);
        return -1;
    }
    return fd;
}

// A blocking client socket connected to 127.0.0.1:port (the kernel completes the handshake
// through the listen backlog; no accept needed).  -1 on failure.
inline int connect_client(uint16_t port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    sockaddr_in a = loopback_addr(port);
    for (;;) {
        if (connect(fd, (sockaddr *)&a, sizeof a) == 0) return fd;
        if (errno != EINTR) break;
    }
    ::close(fd);
    return -1;
}

// Blocking accept with a timeout (ms).  -1 on failure or timeout.
inline int accept_timeout(int lfd, int timeout_ms = 5000) {
    pollfd p = {lfd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return -1;
    return accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
}

// A connected TCP pair over loopback (both blocking): server side and client side.
struct TcpPair {
    Fd server, client;
};

inline bool make_pair(TcpPair &p) {
    Fd l(make_listener(16));
    if (!l.ok()) return false;
    p.client.reset(connect_client(local_port(l.get())));
    if (!p.client.ok()) return false;
    p.server.reset(accept_timeout(l.get()));
    return p.server.ok();
}

inline void set_bufs(int fd, int sndbuf, int rcvbuf) {
    if (sndbuf > 0) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    if (rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
}

// SO_LINGER {1,0} then close: the peer gets a RST.
inline void close_with_reset(Fd &f) {
    linger lg = {1, 0};
    setsockopt(f.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    f.reset();
}

// Wait until fd is readable (data or EOF), up to timeout_ms.
inline bool wait_readable(int fd, int timeout_ms = 5000) {
    pollfd p = {fd, POLLIN, 0};
    return poll(&p, 1, timeout_ms) == 1;
}

inline bool write_all(int fd, const void *buf, size_t n) {
    const char *p = static_cast<const char *>(buf);
    while (n) {
        ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

// Read exactly n bytes (blocking fd); fewer if EOF/error/timeout comes first.
inline std::string read_n(int fd, size_t n, int timeout_ms = 10000) {
    std::string out;
    out.reserve(n);
    std::vector<char> buf(65536);
    int64_t deadline = now_ms() + timeout_ms;
    while (out.size() < n) {
        int left = (int)(deadline - now_ms());
        if (left <= 0 || !wait_readable(fd, left)) break;
        ssize_t r = ::recv(fd, buf.data(), std::min(buf.size(), n - out.size()), 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        out.append(buf.data(), (size_t)r);
    }
    return out;
}

// recv() result after waiting for readability: > 0 bytes, 0 EOF, -errno, or -ETIMEDOUT.
inline ssize_t recv_some(int fd, void *buf, size_t n, int timeout_ms = 5000) {
    if (!wait_readable(fd, timeout_ms)) return -ETIMEDOUT;
    ssize_t r = ::recv(fd, buf, n, 0);
    return r < 0 ? -errno : r;
}

// Deterministic byte pattern; seed distinguishes buffers.
inline std::string pattern(size_t n, uint32_t seed) {
    std::string s(n, '\0');
    uint32_t x = seed * 2654435761u + 12345u;
    for (size_t i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        s[i] = (char)(x >> 16);
    }
    return s;
}

// Open fds of this process.
inline int count_fds() {
    DIR *d = opendir("/proc/self/fd");
    if (!d) return -1;
    int n = 0;
    while (dirent *e = readdir(d))
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1; /* the directory's own fd */
}

// Dispatch until on_event returns true (then true) or timeout_ms passes (then false).
// Returns false as well if mp_dispatch fails.
inline bool dispatch_until(mp_channel *ch, const std::function<bool(const mp_event &)> &on_event,
                           int timeout_ms) {
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        int left = (int)(deadline - now_ms());
        if (left <= 0) return false;
        mp_event ev;
        int r = mp_dispatch(ch, &ev, left);
        if (r < 0 && r != -EINTR) return false;
        if (r == 1 && on_event(ev)) return true;
    }
}

// Dispatch for timeout_ms and return every event seen.
inline std::vector<mp_event> collect_events(mp_channel *ch, int timeout_ms) {
    std::vector<mp_event> out;
    dispatch_until(
        ch,
        [&](const mp_event &ev) {
            out.push_back(ev);
            return false;
        },
        timeout_ms);
    return out;
}

// Dispatch until one event matching (cmd, handle) arrives; returns it in *out.
inline bool wait_event(mp_channel *ch, mp_cmd cmd, const mp_handle *h, mp_event *out,
                       int timeout_ms = 5000) {
    return dispatch_until(
        ch,
        [&](const mp_event &ev) {
            if (ev.cmd != cmd || (h && ev.handle != h)) return false;
            *out = ev;
            return true;
        },
        timeout_ms);
}

inline const char *cmd_name(int c) {
    switch (c) {
    case MP_EV_NONE: return "NONE";
    case MP_EV_ACCEPT: return "ACCEPT";
    case MP_EV_READ: return "READ";
    case MP_EV_WRITE: return "WRITE";
    case MP_EV_CONNECT: return "CONNECT";
    case MP_EV_DISCONNECT: return "DISCONNECT";
    case MP_EV_POLL: return "POLL";
    case MP_EV_WAKE: return "WAKE";
    default: return "?";
    }
}

inline std::string describe(const mp_event &ev) {
    return std::string(cmd_name(ev.cmd)) + " result=" + std::to_string((long long)ev.result) +
           " flags=" + std::to_string(ev.flags);
}

// A thread joined when it goes out of scope (so a failed ASSERT cannot leave it running).
struct Joiner {
    std::thread t;
    Joiner() = default;
    template <class F>
    explicit Joiner(F &&f) : t(std::forward<F>(f)) {}
    Joiner(const Joiner &) = delete;
    Joiner &operator=(const Joiner &) = delete;
    ~Joiner() { join(); }
    void join() {
        if (t.joinable()) t.join();
    }
};

// Base fixture: a channel from mp_create(NULL) (MP_ENGINE picks the engine), plus storage
// for sockets and buffers that outlives the channel: members are destroyed after TearDown()
// has destroyed the channel, so the kernel never sees a closed fd or a freed buffer of an
// operation still in flight, even when a test stops early on a failed ASSERT.
class ChannelTest : public ::testing::Test {
protected:
    std::deque<TcpPair> pairs_;
    std::deque<Fd> fds_;
    std::vector<std::unique_ptr<char[]>> bufs_;
    std::deque<std::string> strs_;
    Channel ch;

    void SetUp() override {
        ch.reset(mp_create(nullptr));
        ASSERT_NE(ch.get(), nullptr) << "mp_create: " << std::strerror(errno);
    }
    void TearDown() override { ch.reset(); }

    // A connected loopback pair kept until the end of the test.
    TcpPair &pair() {
        pairs_.emplace_back();
        TcpPair &p = pairs_.back();
        EXPECT_TRUE(make_pair(p)) << "make_pair: " << std::strerror(errno);
        return p;
    }
    // Keep an fd open until the end of the test (after the channel is gone).
    int keep(int fd) {
        fds_.emplace_back(fd);
        return fd;
    }
    char *buffer(size_t n) {
        bufs_.emplace_back(new char[n]());
        return bufs_.back().get();
    }
    const std::string &keep_str(std::string s) {
        strs_.push_back(std::move(s));
        return strs_.back();
    }
    mp_handle *reg(int fd, void *cookie = nullptr) {
        mp_handle *h = mp_register(ch, fd, cookie, nullptr);
        EXPECT_NE(h, nullptr) << "mp_register(" << fd << "): " << std::strerror(errno);
        return h;
    }
};

}  // namespace mpt

#endif
