// pt_util.h — helpers for the Partition, Batching and LwSocket suites: loopback sockets,
// CPU pinning, fd counting, event waiting, and a channel that lives on its own (optionally
// pinned) thread and records every connection it accepts.
#ifndef MP_TESTS_PT_UTIL_H
#define MP_TESTS_PT_UTIL_H

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
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
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

#include "megapipe.h"

namespace pt {

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

inline sockaddr_in loopback(uint16_t port) {
    sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

inline uint16_t local_port(int fd) {
    sockaddr_in a;
    socklen_t l = sizeof a;
    if (getsockname(fd, (sockaddr *)&a, &l) != 0) return 0;
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
    sockaddr_in a = loopback(0);
    int fd = mp_listen_socket((sockaddr *)&a, sizeof a, backlog);
    if (fd >= 0 && port) *port = local_port(fd);
    return fd;
}

// A plain listening socket on 127.0.0.1:0 (no library involved).
inline int plain_listener(uint16_t *port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    sockaddr_in a = loopback(0);
    if (bind(fd, (sockaddr *)&a, sizeof a) != 0 || listen(fd, SOMAXCONN) != 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    if (port) *port = local_port(fd);
    return fd;
}

// Blocking connect to 127.0.0.1:port.  Returns fd or -errno.
inline int connect_loopback(uint16_t port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    sockaddr_in a = loopback(port);
    int r;
    do r = connect(fd, (sockaddr *)&a, sizeof a);
    while (r != 0 && errno == EINTR);
    if (r != 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

// Close with an RST (SO_LINGER 0): no TIME_WAIT left behind by the many short connections.
inline void close_rst(int fd) {
    if (fd < 0) return;
    linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

inline void close_all_rst(std::vector<int> &fds) {
    for (int fd : fds) close_rst(fd);
    fds.clear();
}

// Wait up to timeout_ms for fd to become readable (POLLIN/POLLHUP/POLLERR).
inline bool wait_readable(int fd, int timeout_ms) {
    pollfd p = {fd, POLLIN, 0};
    int r;
    do r = poll(&p, 1, timeout_ms);
    while (r < 0 && errno == EINTR);
    return r > 0;
}

// Read exactly n bytes (blocking fd or not), giving up after timeout_ms in total.
// Returns bytes read (n on success; fewer on EOF/error/timeout).
inline size_t recv_exact(int fd, void *buf, size_t n, int timeout_ms = 5000) {
    size_t got = 0;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (got < n) {
        int left = (int)std::chrono::duration_cast<std::chrono::milliseconds>(
                       deadline - std::chrono::steady_clock::now())
                       .count();
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

inline bool send_all(int fd, const void *buf, size_t n) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = send(fd, (const char *)buf + done, n - done, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return false;
        done += (size_t)r;
    }
    return true;
}

// True when the peer closed fd's connection (recv returns 0) within timeout_ms.
inline bool sees_eof(int fd, int timeout_ms = 5000) {
    char c;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
        int left = (int)std::chrono::duration_cast<std::chrono::milliseconds>(
                       deadline - std::chrono::steady_clock::now())
                       .count();
        if (left <= 0 || !wait_readable(fd, left)) return false;
        ssize_t r = recv(fd, &c, 1, MSG_DONTWAIT);
        if (r == 0) return true;
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        return r < 0 && (errno == ECONNRESET || errno == EPIPE); // closed, abruptly
    }
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

// ---- process ---------------------------------------------------------------------------

inline int count_open_fds() {
    DIR *d = opendir("/proc/self/fd");
    if (!d) return -1;
    int n = 0;
    while (dirent *e = readdir(d))
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

inline bool fd_valid(int fd) { return fd >= 0 && fcntl(fd, F_GETFD) >= 0; }

inline bool is_uring(const mp_channel *ch) { return std::string(mp_engine_name(ch)) == "uring"; }

struct ChannelDeleter {
    void operator()(mp_channel *ch) const { mp_destroy(ch); }
};
using ChanPtr = std::unique_ptr<mp_channel, ChannelDeleter>;

inline mp_channel *create_channel(int batch = MP_OPT_DEFAULT, int lwsocket = MP_OPT_DEFAULT,
                                  int partition = MP_OPT_DEFAULT) {
    mp_options o;
    mp_options_init(&o);
    o.batch = batch;
    o.lwsocket = lwsocket;
    o.partition = partition;
    return mp_create(&o);
}

// Dispatch (on the calling thread, which owns ch) until an event satisfying pred arrives.
// Other events are passed to other (if given) and otherwise dropped (WAKE) or kept in *skipped.
inline bool wait_event(mp_channel *ch, mp_event *out, const std::function<bool(const mp_event &)> &pred,
                       int timeout_ms = 5000, std::vector<mp_event> *skipped = nullptr) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
        int left = (int)std::chrono::duration_cast<std::chrono::milliseconds>(
                       deadline - std::chrono::steady_clock::now())
                       .count();
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
        if (ev.cmd == MP_EV_WAKE) return;
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

} // namespace pt

#endif
