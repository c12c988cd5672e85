// ext_util.h — helpers for the extension suites (Poll, BufRead, Balance, Stats): loopback TCP
// sockets, RAII guards, dispatch loops, RSS and RLIMIT_NOFILE handling, stderr capture.
// Header-only; everything lives in namespace mpx so it cannot clash with the other helpers.
#ifndef MP_EXT_UTIL_H
#define MP_EXT_UTIL_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "megapipe.h"

namespace mpx {

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

// Closes an fd at scope exit.
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
};

// Destroys a channel at scope exit.
struct Chan {
    mp_channel *ch = nullptr;
    Chan() = default;
    explicit Chan(mp_channel *c) : ch(c) {}
    Chan(const Chan &) = delete;
    Chan &operator=(const Chan &) = delete;
    ~Chan() { reset(); }
    void reset(mp_channel *c = nullptr) {
        if (ch) mp_destroy(ch);
        ch = c;
    }
    operator mp_channel *() const { return ch; }
    mp_channel *get() const { return ch; }
};

inline bool is_uring(const mp_channel *ch) { return std::strcmp(mp_engine_name(ch), "uring") == 0; }

// The engine the environment asks for (ctest sets MP_ENGINE=uring or epoll).
inline std::string env_engine() {
    const char *e = getenv("MP_ENGINE");
    return e ? e : "";
}

// Options with everything at MP_OPT_DEFAULT, logging off.
inline mp_options opts() {
    mp_options o;
    mp_options_init(&o);
    o.log = 0;
    return o;
}

inline sockaddr_in loopback(uint16_t port) {
    sockaddr_in a;
    std::memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

inline uint16_t port_of(int fd) {
    sockaddr_in a;
    socklen_t l = sizeof a;
    if (getsockname(fd, (sockaddr *)&a, &l) < 0) return 0;
    return ntohs(a.sin_port);
}

// A plain TCP listener on 127.0.0.1:0.
inline int listener(int backlog = 1024) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a = loopback(0);
    if (bind(fd, (sockaddr *)&a, sizeof a) < 0 || listen(fd, backlog) < 0) {
        ::close(fd);
        return -1;
    }
    return fd;
}

// Blocking connect to 127.0.0.1:port; returns the fd or -errno.
inline int connect_to(uint16_t port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    sockaddr_in a = loopback(port);
    for (;;) {
        if (connect(fd, (sockaddr *)&a, sizeof a) == 0) return fd;
        if (errno != EINTR) break;
    }
    int e = -errno;
    ::close(fd);
    return e;
}

inline int accept_wait(int lfd, int timeout_ms = 5000) {
    pollfd p = {lfd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return -1;
    return accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
}

// A connected loopback TCP pair; "a" is the side the library drives, "b" the peer.
struct Pair {
    Fd a, b;
};

inline bool tcp_pair(Pair &p) {
    Fd l(listener(16));
    if (l.get() < 0) return false;
    int c = connect_to(port_of(l.get()));
    if (c < 0) return false;
    p.b.reset(c);
    int s = accept_wait(l.get());
    if (s < 0) return false;
    p.a.reset(s);
    int one = 1;
    setsockopt(p.a.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(p.b.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return true;
}

inline bool write_all(int fd, const void *buf, size_t n) {
    const char *p = (const char *)buf;
    while (n) {
        ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

// Reads whatever is available without blocking; returns the bytes drained.
inline size_t drain(int fd) {
    char buf[4096];
    size_t total = 0;
    for (;;) {
        ssize_t r = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r <= 0) break;
        total += (size_t)r;
    }
    return total;
}

// Reset on close (SO_LINGER 0).
inline void close_rst(Fd &f) {
    struct linger lg = {1, 0};
    setsockopt(f.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    f.reset();
}

// Dispatch until fn(ev) returns true or timeout_ms passes; returns whether fn said done.
// fn sees every event.
inline bool pump(mp_channel *ch, int timeout_ms, const std::function<bool(const mp_event &)> &fn) {
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0) return false;
        mp_event ev;
        int r = mp_dispatch(ch, &ev, (int)std::min<int64_t>(left, 50));
        if (r < 0 && r != -EINTR) {
            ADD_FAILURE() << "mp_dispatch: " << r;
            return false;
        }
        if (r == 1 && fn(ev)) return true;
    }
}

// Collect every event that arrives within ms (dispatching with short timeouts).
inline std::vector<mp_event> collect(mp_channel *ch, int ms) {
    std::vector<mp_event> out;
    pump(ch, ms, [&](const mp_event &ev) {
        out.push_back(ev);
        return false;
    });
    return out;
}

// Resident set size in bytes, from /proc/self/statm.
inline long rss_bytes() {
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return -1;
    long size = 0, res = 0;
    int n = fscanf(f, "%ld %ld", &size, &res);
    fclose(f);
    if (n != 2) return -1;
    return res * sysconf(_SC_PAGESIZE);
}

// Raises RLIMIT_NOFILE's soft limit to the hard limit; restores it at scope exit.
struct NofileRaise {
    struct rlimit old {};
    bool ok = false;
    NofileRaise() {
        if (getrlimit(RLIMIT_NOFILE, &old) == 0) {
            struct rlimit n = old;
            n.rlim_cur = n.rlim_max;
            ok = setrlimit(RLIMIT_NOFILE, &n) == 0;
        }
    }
    ~NofileRaise() {
        if (ok) setrlimit(RLIMIT_NOFILE, &old);
    }
    rlim_t soft() const {
        struct rlimit r;
        getrlimit(RLIMIT_NOFILE, &r);
        return r.rlim_cur;
    }
};

// Redirects fd 2 into a pipe until stop(); text() returns what was written.
struct StderrCapture {
    int saved = -1, rd = -1;
    std::string out;
    bool start() {
        int p[2];
        if (pipe2(p, O_CLOEXEC) < 0) return false;
        fflush(stderr);
        saved = dup(2);
        if (saved < 0 || dup2(p[1], 2) < 0) {
            ::close(p[0]);
            ::close(p[1]);
            return false;
        }
        ::close(p[1]);
        rd = p[0];
        return true;
    }
    void stop() {
        if (saved < 0) return;
        fflush(stderr);
        dup2(saved, 2); // closes the pipe's write end held by fd 2
        ::close(saved);
        saved = -1;
        char buf[4096];
        for (;;) {
            ssize_t r = ::read(rd, buf, sizeof buf);
            if (r <= 0) break;
            out.append(buf, (size_t)r);
        }
        ::close(rd);
        rd = -1;
    }
    ~StderrCapture() { stop(); }
};

inline uint64_t hist_sum(const mp_stats &st) {
    uint64_t s = 0;
    for (int i = 0; i < MP_STATS_HIST; i++) s += st.batch_hist[i];
    return s;
}

} // namespace mpx

#endif
