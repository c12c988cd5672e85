// test_util.h — the one helper header shared by all googletest suites: loopback TCP sockets,
// timing, byte patterns, RAII guards, dispatch loops, CPU pinning, fd counting, RSS and
// RLIMIT_NOFILE handling, stderr capture, and a channel that lives on its own (optionally
// pinned) thread and records every connection it accepts.  Header-only (everything is inline).
#ifndef MP_TEST_UTIL_H
#define MP_TEST_UTIL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include "megapipe.h"

namespace mpt {

// ---- time ------------------------------------------------------------------------------

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

// Milliseconds left until deadline (steady clock), negative once it has passed.
inline int ms_until(std::chrono::steady_clock::time_point deadline) {
    return (int)std::chrono::duration_cast<std::chrono::milliseconds>(
               deadline - std::chrono::steady_clock::now())
        .count();
}

inline std::chrono::steady_clock::time_point deadline_in(int timeout_ms) {
    return std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
}

// ---- RAII guards -----------------------------------------------------------------------

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

struct ChannelDeleter {
    void operator()(mp_channel *ch) const { mp_destroy(ch); }
};
using ChanPtr = std::unique_ptr<mp_channel, ChannelDeleter>;

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

// ---- channels and options ---------------------------------------------------------------

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

inline mp_channel *create_channel(int batch = MP_OPT_DEFAULT, int lwsocket = MP_OPT_DEFAULT,
                                  int partition = MP_OPT_DEFAULT) {
    mp_options o;
    mp_options_init(&o);
    o.batch = batch;
    o.lwsocket = lwsocket;
    o.partition = partition;
    return mp_create(&o);
}

// ---- CPUs ------------------------------------------------------------------------------

// CPUs this process may run on, in ascending order.
inline std::vector<int> usable_cpus() {
    cpu_set_t set;
    CPU_ZERO(&set);
    std::vector<int> out;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return out;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &set)) out.push_back(c);
    return out;
}

inline cpu_set_t cpuset_of(std::initializer_list<int> cpus) {
    cpu_set_t s;
    CPU_ZERO(&s);
    for (int c : cpus) CPU_SET(c, &s);
    return s;
}

inline bool pin_self(int cpu) {
    cpu_set_t s = cpuset_of({cpu});
    return pthread_setaffinity_np(pthread_self(), sizeof s, &s) == 0;
}

// ---- sockets ---------------------------------------------------------------------------

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

inline uint16_t peer_port(int fd) {
    sockaddr_in a;
    socklen_t l = sizeof a;
    if (getpeername(fd, (sockaddr *)&a, &l) != 0) return 0;
    return ntohs(a.sin_port);
}

inline int sockopt(int fd, int level, int opt) {
    int v = -1;
    socklen_t l = sizeof v;
    if (getsockopt(fd, level, opt, &v, &l) != 0) return -1;
    return v;
}

// mp_listen_socket() on 127.0.0.1:0; *port gets the bound port.  Returns fd or -errno.
inline int mp_listen_loopback(uint16_t *port, int backlog = 0) {
    sockaddr_in a = loopback_addr(0);
    int fd = mp_listen_socket((sockaddr *)&a, sizeof a, backlog);
    if (fd >= 0 && port) *port = local_port(fd);
    return fd;
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

// A plain listening socket on 127.0.0.1:0 (no library involved).
inline int plain_listener(uint16_t *port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    sockaddr_in a = loopback_addr(0);
    if (bind(fd, (sockaddr *)&a, sizeof a) != 0 || listen(fd, SOMAXCONN) != 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    if (port) *port = local_port(fd);
    return fd;
}

// Blocking connect to 127.0.0.1:port; returns the fd or -errno.
inline int connect_to(uint16_t port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    sockaddr_in a = loopback_addr(port);
    for (;;) {
        if (connect(fd, (sockaddr *)&a, sizeof a) == 0) return fd;
        if (errno != EINTR) break;
    }
    int e = -errno;
    ::close(fd);
    return e;
}

// A blocking client socket connected to 127.0.0.1:port (the kernel completes the handshake
// through the listen backlog; no accept needed).  -1 (errno set) on failure.
inline int connect_client(uint16_t port) {
    int fd = connect_to(port);
    return fd < 0 ? -1 : fd;
}

inline void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// connect_to() with TCP_NODELAY set on success.  Returns fd or -errno.
inline int connect_loopback(uint16_t port) {
    int fd = connect_to(port);
    if (fd >= 0) set_nodelay(fd);
    return fd;
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

inline bool connect_pair(Fd &server, Fd &client) {
    Fd l(make_listener(16));
    if (!l.ok()) return false;
    client.reset(connect_client(local_port(l.get())));
    if (!client.ok()) return false;
    server.reset(accept_timeout(l.get()));
    return server.ok();
}

inline bool make_pair(TcpPair &p) { return connect_pair(p.server, p.client); }

// The same with TCP_NODELAY on both ends; "a" is the side the library drives, "b" the peer.
struct Pair {
    Fd a, b;
};

inline bool tcp_pair(Pair &p) {
    if (!connect_pair(p.a, p.b)) return false;
    set_nodelay(p.a.get());
    set_nodelay(p.b.get());
    return true;
}

inline void set_bufs(int fd, int sndbuf, int rcvbuf) {
    if (sndbuf > 0) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    if (rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
}

// Close with an RST (SO_LINGER {1,0}): the peer gets a RST, no TIME_WAIT is left behind.
inline void close_rst(int fd) {
    if (fd < 0) return;
    linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    ::close(fd);
}

inline void close_rst(Fd &f) { close_rst(f.release()); }

inline void close_all_rst(std::vector<int> &fds) {
    for (int fd : fds) close_rst(fd);
    fds.clear();
}

// Wait up to timeout_ms for fd to become readable (data, EOF, POLLHUP/POLLERR).
inline bool wait_readable(int fd, int timeout_ms = 5000) {
    pollfd p = {fd, POLLIN, 0};
    int r;
    do r = poll(&p, 1, timeout_ms);
    while (r < 0 && errno == EINTR);
    return r > 0;
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

// Read exactly n bytes (blocking fd or not), giving up after timeout_ms in total.
// Returns bytes read (n on success; fewer on EOF/error/timeout).
inline size_t recv_exact(int fd, void *buf, size_t n, int timeout_ms = 5000) {
    size_t got = 0;
    auto deadline = deadline_in(timeout_ms);
    while (got < n) {
        int left = ms_until(deadline);
        if (left <= 0 || !wait_readable(fd, left)) break;
        ssize_t r = recv(fd, (char *)buf + got, n - got, MSG_DONTWAIT);
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        break; // EOF or error
    }
    return got;
}

// True when the peer closed fd's connection (recv returns 0) within timeout_ms.
inline bool sees_eof(int fd, int timeout_ms = 5000) {
    char c;
    auto deadline = deadline_in(timeout_ms);
    for (;;) {
        int left = ms_until(deadline);
        if (left <= 0 || !wait_readable(fd, left)) return false;
        ssize_t r = recv(fd, &c, 1, MSG_DONTWAIT);
        if (r == 0) return true;
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        return r < 0 && (errno == ECONNRESET || errno == EPIPE); // closed, abruptly
    }
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

// n connected pairs over loopback, made without the library: clients[i] <-> servers[i].
struct Pairs {
    std::vector<int> clients, servers;
    ~Pairs() {
        close_all_rst(clients);
        for (int fd : servers) close(fd);
    }
};

inline bool make_pairs(size_t n, Pairs *p) {
    uint16_t port = 0;
    int lfd = plain_listener(&port);
    if (lfd < 0) return false;
    std::map<uint16_t, int> by_port;
    bool ok = true;
    for (size_t i = 0; i < n && ok; i++) {
        int c = connect_loopback(port);
        if (c < 0) {
            ok = false;
            break;
        }
        p->clients.push_back(c);
        int s = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
        if (s < 0) {
            ok = false;
            break;
        }
        by_port[peer_port(s)] = s;
    }
    close(lfd);
    for (int c : p->clients) {
        auto it = by_port.find(local_port(c));
        if (it == by_port.end()) {
            ok = false;
            p->servers.push_back(-1);
        } else {
            p->servers.push_back(it->second);
            by_port.erase(it);
        }
    }
    for (auto &kv : by_port) close(kv.second);
    return ok;
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

// ---- process ---------------------------------------------------------------------------

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

// Open fds of this process, counting the one opendir() holds while it counts.
inline int count_open_fds() {
    int n = count_fds();
    return n < 0 ? n : n + 1;
}

inline bool fd_valid(int fd) { return fd >= 0 && fcntl(fd, F_GETFD) >= 0; }

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

// ---- dispatch loops --------------------------------------------------------------------

// Dispatch until on_event returns true (then true) or timeout_ms passes (then false), waiting
// at most slice_ms in one mp_dispatch.  False as well if mp_dispatch fails (a test failure too
// when report_errors).
inline bool dispatch_loop(mp_channel *ch, const std::function<bool(const mp_event &)> &on_event,
                          int timeout_ms, int slice_ms, bool report_errors) {
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0) return false;
        mp_event ev;
        int r = mp_dispatch(ch, &ev, (int)std::min<int64_t>(left, slice_ms));
        if (r < 0 && r != -EINTR) {
            if (report_errors) ADD_FAILURE() << "mp_dispatch: " << r;
            return false;
        }
        if (r == 1 && on_event(ev)) return true;
    }
}

// Dispatch until on_event returns true (then true) or timeout_ms passes (then false).
// Returns false as well if mp_dispatch fails.
inline bool dispatch_until(mp_channel *ch, const std::function<bool(const mp_event &)> &on_event,
                           int timeout_ms) {
    return dispatch_loop(ch, on_event, timeout_ms, INT_MAX, false);
}

// Dispatch (in slices of at most 50 ms) until fn(ev) returns true or timeout_ms passes;
// returns whether fn said done.  fn sees every event; a failing mp_dispatch is a test failure.
inline bool pump(mp_channel *ch, int timeout_ms, const std::function<bool(const mp_event &)> &fn) {
    return dispatch_loop(ch, fn, timeout_ms, 50, true);
}

// Every event that arrives within timeout_ms (see dispatch_loop for slice_ms/report_errors).
inline std::vector<mp_event> collect_loop(mp_channel *ch, int timeout_ms, int slice_ms,
                                          bool report_errors) {
    std::vector<mp_event> out;
    dispatch_loop(
        ch,
        [&](const mp_event &ev) {
            out.push_back(ev);
            return false;
        },
        timeout_ms, slice_ms, report_errors);
    return out;
}

// Dispatch for timeout_ms and return every event seen.
inline std::vector<mp_event> collect_events(mp_channel *ch, int timeout_ms) {
    return collect_loop(ch, timeout_ms, INT_MAX, false);
}

// The same in short (50 ms) dispatches, a failing mp_dispatch being a test failure.
inline std::vector<mp_event> collect(mp_channel *ch, int ms) { return collect_loop(ch, ms, 50, true); }

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

// Dispatch (on the calling thread, which owns ch) until an event satisfying pred arrives.
// Other events are passed to other (if given) and otherwise dropped (WAKE) or kept in *skipped.
inline bool wait_event(mp_channel *ch, mp_event *out, const std::function<bool(const mp_event &)> &pred,
                       int timeout_ms = 5000, std::vector<mp_event> *skipped = nullptr) {
    auto deadline = deadline_in(timeout_ms);
    for (;;) {
        int left = ms_until(deadline);
        if (left <= 0) return false;
        mp_event ev;
        int r = mp_dispatch(ch, &ev, left);
        if (r == -EINTR) continue;
        if (r <= 0) return false;
        if (pred(ev)) {
            *out = ev;
            return true;
        }
        if (skipped && ev.cmd != MP_EV_WAKE) skipped->push_back(ev);
    }
}

inline bool wait_cmd(mp_channel *ch, mp_event *out, mp_cmd cmd, mp_handle *h = nullptr,
                     int timeout_ms = 5000) {
    return wait_event(
        ch, out, [&](const mp_event &e) { return e.cmd == cmd && (!h || e.handle == h); },
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
    case MP_EV_CLOSED: return "CLOSED";
    default: return "?";
    }
}

inline std::string describe(const mp_event &ev) {
    return std::string(cmd_name(ev.cmd)) + " result=" + std::to_string((long long)ev.result) +
           " flags=" + std::to_string(ev.flags);
}

// ---- a channel on its own thread -------------------------------------------------------

// Owns one channel on one thread (pinned to cpu when cpu >= 0), dispatching all the time.
// Every ACCEPT of a regular fd is recorded by the client's source port (getpeername) and the
// fd closed.  run(f) executes f(ch) on the channel's thread (the thread rule) and returns
// its result.
class ChannelThread {
  public:
    explicit ChannelThread(int cpu = -1, const mp_options *opt = nullptr) : cpu_(cpu) {
        if (opt) {
            opt_ = *opt;
            have_opt_ = true;
        }
        th_ = std::thread([this] { main(); });
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [this] { return started_; });
    }
    ~ChannelThread() { stop(); }
    ChannelThread(const ChannelThread &) = delete;
    ChannelThread &operator=(const ChannelThread &) = delete;

    bool ok() const { return ch_ != nullptr && pinned_; }
    int create_errno() const { return create_errno_; }
    std::string engine() const { return engine_; }

    template <class F> auto run(F f) -> std::invoke_result_t<F, mp_channel *> {
        using R = std::invoke_result_t<F, mp_channel *>;
        if (!ch_) return f(nullptr); // no channel, no thread loop: tests ASSERT ok() first
        auto task = std::make_shared<std::packaged_task<R()>>([this, f]() mutable { return f(ch_); });
        auto fut = task->get_future();
        {
            std::lock_guard<std::mutex> lk(mu_);
            tasks_.push_back([task] { (*task)(); });
        }
        mp_wake(ch_);
        return fut.get();
    }

    void stop() {
        if (!th_.joinable()) return;
        stop_ = true;
        if (ch_) mp_wake(ch_);
        th_.join();
    }

    size_t accepted() {
        std::lock_guard<std::mutex> lk(mu_);
        return ports_.size();
    }
    std::vector<uint16_t> take_ports() {
        std::lock_guard<std::mutex> lk(mu_);
        std::vector<uint16_t> p;
        p.swap(ports_);
        return p;
    }
    int accept_errors() const { return accept_errors_; }
    int odd_events() const { return odd_events_; }
    int dispatch_errors() const { return dispatch_errors_; }

  private:
    void main() {
        bool pinned = cpu_ < 0 || pin_self(cpu_);
        mp_channel *ch = mp_create(have_opt_ ? &opt_ : nullptr);
        int err = ch ? 0 : errno;
        {
            std::lock_guard<std::mutex> lk(mu_);
            ch_ = ch;
            create_errno_ = err;
            pinned_ = pinned;
            if (ch) engine_ = mp_engine_name(ch);
            started_ = true;
        }
        cv_.notify_all();
        if (!ch) return;
        for (;;) {
            std::deque<std::function<void()>> todo;
            {
                std::lock_guard<std::mutex> lk(mu_);
                todo.swap(tasks_);
            }
            for (auto &t : todo) t();
            if (stop_) {
                std::lock_guard<std::mutex> lk(mu_);
                if (tasks_.empty()) break;
                continue;
            }
            mp_event ev;
            int r = mp_dispatch(ch, &ev, 50);
            if (r == 1) {
                on_event(ev);
            } else if (r < 0 && r != -EINTR) {
                dispatch_errors_++;
                std::this_thread::sleep_for(std::chrono::milliseconds(1));
            }
        }
        mp_destroy(ch);
    }

    void on_event(const mp_event &ev) {
        if (ev.cmd == MP_EV_WAKE || ev.cmd == MP_EV_CLOSED) return;
        if (ev.cmd != MP_EV_ACCEPT) {
            odd_events_++;
            return;
        }
        if (ev.result < 0) {
            accept_errors_++;
            return;
        }
        int fd = (int)ev.result;
        if (mp_is_lwsocket(fd)) { // not expected here: drop it through the channel
            odd_events_++;
            mp_handle *h = mp_register(ch_, fd, nullptr, nullptr);
            if (h) mp_unregister(h);
            return;
        }
        uint16_t p = peer_port(fd);
        close(fd);
        std::lock_guard<std::mutex> lk(mu_);
        ports_.push_back(p);
    }

    int cpu_;
    mp_options opt_{};
    bool have_opt_ = false;
    std::thread th_;
    std::mutex mu_;
    std::condition_variable cv_;
    bool started_ = false, pinned_ = false;
    mp_channel *ch_ = nullptr;
    int create_errno_ = 0;
    std::string engine_;
    std::deque<std::function<void()>> tasks_;
    std::atomic<bool> stop_{false};
    std::vector<uint16_t> ports_;
    std::atomic<int> accept_errors_{0}, odd_events_{0}, dispatch_errors_{0};
};

// On t's channel: register the listening fd with mask and accept forever (regular fds).  The
// handle, or NULL with *err set.
inline mp_handle *listen_on(ChannelThread *t, int fd, const cpu_set_t &mask, int *err) {
    return t->run([fd, mask, err](mp_channel *ch) -> mp_handle * {
        mp_handle *h = mp_register(ch, fd, nullptr, &mask);
        if (!h) {
            *err = errno;
            return nullptr;
        }
        int r = mp_accept(h, 0, 0);
        if (r != 0) {
            *err = -r;
            mp_unregister(h);
            return nullptr;
        }
        return h;
    });
}

// n blocking connections to 127.0.0.1:port from a thread pinned to cpu.
struct ClientBatch {
    int cpu = -1;
    std::vector<int> fds;
    std::vector<uint16_t> ports; // local (source) ports
    int failures = 0;
    int first_errno = 0;
    bool pinned = false;
    ~ClientBatch() { close_all_rst(fds); }
};

inline void connect_from_cpu(ClientBatch *b, int cpu, uint16_t port, int n) {
    b->cpu = cpu;
    b->pinned = pin_self(cpu);
    for (int i = 0; i < n; i++) {
        int fd = connect_loopback(port);
        if (fd < 0) {
            if (!b->failures++) b->first_errno = -fd;
            continue;
        }
        b->fds.push_back(fd);
        b->ports.push_back(local_port(fd));
    }
}

// Clients pinned to each of cpus open n connections each to 127.0.0.1:port, concurrently; the
// batches come back in the order of cpus (SYNs handled on those CPUs: partition steering).
inline std::vector<std::unique_ptr<ClientBatch>> connect_from_cpus(const std::vector<int> &cpus,
                                                                   uint16_t port, int n) {
    std::vector<std::unique_ptr<ClientBatch>> batches;
    std::vector<std::thread> threads;
    for (int cpu : cpus) {
        batches.emplace_back(new ClientBatch);
        ClientBatch *b = batches.back().get();
        threads.emplace_back([b, cpu, port, n] { connect_from_cpu(b, cpu, port, n); });
    }
    for (auto &t : threads) t.join();
    return batches;
}

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
