// test_hardening.cc — issue 10: what a hostile peer and a careless caller found, kept fixed.
//   a) accept failing with EMFILE while the descriptor limit stays low: no spin, bounded
//      events and memory, every connection served once the limit is back (both engines);
//   b) a full lwsocket table pauses accepting instead of losing queued connections (uring);
//   c) one stalled buffered-read connection cannot empty the buffer pool (uring);
//   d) calls from a thread that does not own the channel fail with -EPERM (both engines);
//   e) a forked child cannot use (or steal from) its parent's channel (both engines);
//   f) checksummed echo stress: thousands of short connections of 1 B..256 KiB, plain fds,
//      lwsockets and buffered reads (the last two where the engine has them).
// Every test is bounded in time; servers listen on 127.0.0.1 only.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include <atomic>
#include <cmath>
#include <random>
#include <thread>

#include "test_util.h"

using namespace mpt;

namespace {

// ---- the wire format: 4-byte big-endian payload length, then the payload ------------------

std::string make_request(size_t payload, std::mt19937 &rng) {
    std::string s(4 + payload, '\0');
    s[0] = (char)(payload >> 24);
    s[1] = (char)(payload >> 16);
    s[2] = (char)(payload >> 8);
    s[3] = (char)payload;
    size_t i = 4;
    for (; i + 4 <= s.size(); i += 4) {
        uint32_t v = rng();
        std::memcpy(&s[i], &v, 4);
    }
    for (; i < s.size(); i++) s[i] = (char)rng();
    return s;
}

// 1 B .. 256 KiB, log-uniform (many small requests, some big ones), edges included.
size_t random_size(std::mt19937 &rng, int i) {
    if (i % 97 == 0) return 1;
    if (i % 97 == 1) return 256 * 1024;
    std::uniform_real_distribution<double> d(0.0, std::log(256.0 * 1024.0));
    size_t n = (size_t)std::exp(d(rng));
    return std::min<size_t>(std::max<size_t>(n, 1), 256 * 1024);
}

// ---- clients: non-blocking sockets driven by poll() -----------------------------------------

struct ClientPlan {
    std::vector<uint16_t> ports; // connection i goes to ports[i % ports.size()]
    int count = 0;
    int concurrency = 16;
    int timeout_ms = 10000;
    uint32_t seed = 1;
    std::function<size_t(std::mt19937 &, int)> size_fn = [](std::mt19937 &, int) { return 16; };
    bool expect_eof = true; // the server closes after its reply: wait for EOF
    int hold_ms = -1; // >= 0: send no request until every connection is established, then
                      // hold_ms longer (concurrency must be >= count)
    int slow_every = 0; // every n-th connection has a small receive buffer and reads at most
                        // 2 KiB per wake-up: the server's writes go into the socket in parts
};

struct ClientResult {
    std::mutex mu;
    int ok = 0, failed = 0;
    uint64_t bytes = 0;
    std::vector<std::string> errors; // the first few
    void fail(const std::string &e) {
        std::lock_guard<std::mutex> lk(mu);
        failed++;
        if (errors.size() < 10) errors.push_back(e);
    }
    void success(size_t n) {
        std::lock_guard<std::mutex> lk(mu);
        ok++;
        bytes += n;
    }
    std::string summary() {
        std::lock_guard<std::mutex> lk(mu);
        std::string s = "ok=" + std::to_string(ok) + " failed=" + std::to_string(failed);
        for (auto &e : errors) s += "\n  " + e;
        return s;
    }
};

enum CPhase { C_CONNECTING, C_IO, C_EOF };

struct CConn {
    int fd = -1;
    int idx = 0;
    uint16_t port = 0;
    std::string req;
    size_t sent = 0, rcvd = 0;
    CPhase phase = C_CONNECTING;
    bool slow = false;
};

// Runs plan.count connections (at most plan.concurrency at a time): each sends one request,
// checks that the echo is byte-identical and (expect_eof) that the server then closes.
void run_clients(const ClientPlan &plan, ClientResult *res) {
    std::mt19937 rng(plan.seed);
    std::vector<CConn> live;
    std::vector<pollfd> pfds;
    std::vector<char> rbuf(65536);
    int started = 0;
    auto deadline = deadline_in(plan.timeout_ms);
    int64_t gate_at = plan.hold_ms < 0 ? 0 : INT64_MAX; // requests go out from then on
    auto what = [](const CConn &c, const std::string &msg) {
        return "conn " + std::to_string(c.idx) + " (port " + std::to_string(c.port) + ", " +
               std::to_string(c.req.size()) + " B, sent " + std::to_string(c.sent) + ", echoed " +
               std::to_string(c.rcvd) + "): " + msg;
    };
    while (started < plan.count || !live.empty()) {
        while (started < plan.count && (int)live.size() < plan.concurrency) {
            CConn c;
            c.idx = started++;
            c.port = plan.ports[(size_t)c.idx % plan.ports.size()];
            c.req = make_request(plan.size_fn(rng, c.idx), rng);
            c.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (c.fd < 0) {
                res->fail(what(c, std::string("socket: ") + std::strerror(errno)));
                continue;
            }
            set_nodelay(c.fd);
            c.slow = plan.slow_every && c.idx % plan.slow_every == 0;
            if (c.slow) set_bufs(c.fd, 0, 4096);
            sockaddr_in a = loopback_addr(c.port);
            if (connect(c.fd, (sockaddr *)&a, sizeof a) == 0) {
                c.phase = C_IO;
            } else if (errno != EINPROGRESS) {
                res->fail(what(c, std::string("connect: ") + std::strerror(errno)));
                close_rst(c.fd);
                continue;
            }
            live.push_back(std::move(c));
        }
        int left = ms_until(deadline);
        if (left <= 0) {
            for (auto &c : live) {
                res->fail(what(c, c.phase == C_CONNECTING ? "timeout while connecting"
                                  : c.phase == C_IO     ? "timeout waiting for the echo"
                                                        : "timeout waiting for EOF"));
                close_rst(c.fd);
            }
            live.clear();
            break;
        }
        if (gate_at == INT64_MAX && started == plan.count &&
            std::none_of(live.begin(), live.end(),
                         [](const CConn &c) { return c.phase == C_CONNECTING; }))
            gate_at = now_ms() + plan.hold_ms;
        bool gate = now_ms() >= gate_at;
        pfds.resize(live.size());
        for (size_t i = 0; i < live.size(); i++) {
            CConn &c = live[i];
            short ev = 0;
            if (c.phase == C_CONNECTING) ev = POLLOUT;
            else if (c.phase == C_IO)
                ev = (short)(POLLIN | (gate && c.sent < c.req.size() ? POLLOUT : 0));
            else ev = POLLIN;
            pfds[i] = {c.fd, ev, 0};
        }
        int n = poll(pfds.data(), pfds.size(), std::min(left, gate ? 50 : 10));
        if (n < 0 && errno != EINTR) {
            res->fail(std::string("poll: ") + std::strerror(errno));
            break;
        }
        if (n <= 0) continue;
        for (size_t i = live.size(); i-- > 0;) {
            CConn &c = live[i];
            short rev = pfds[i].revents;
            if (!rev) continue;
            bool done = false, failed = false;
            if (c.phase == C_CONNECTING) {
                int err = sockopt(c.fd, SOL_SOCKET, SO_ERROR);
                if (err != 0) {
                    res->fail(what(c, std::string("connect: ") + std::strerror(err)));
                    failed = true;
                } else {
                    c.phase = C_IO;
                }
            } else {
                if (c.phase == C_IO && gate && (rev & POLLOUT) && c.sent < c.req.size()) {
                    while (c.sent < c.req.size()) {
                        ssize_t w = send(c.fd, c.req.data() + c.sent, c.req.size() - c.sent,
                                         MSG_NOSIGNAL | MSG_DONTWAIT);
                        if (w > 0) {
                            c.sent += (size_t)w;
                            continue;
                        }
                        if (w < 0 && (errno == EAGAIN || errno == EINTR)) break;
                        res->fail(what(c, std::string("send: ") + std::strerror(errno)));
                        failed = true;
                        break;
                    }
                }
                if (!failed && (rev & (POLLIN | POLLHUP | POLLERR))) {
                    for (;;) {
                        ssize_t r = recv(c.fd, rbuf.data(), c.slow ? 2048 : rbuf.size(), MSG_DONTWAIT);
                        if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
                        if (c.phase == C_EOF) {
                            if (r == 0) done = true;
                            else if (r > 0)
                                res->fail(what(c, "more bytes than were sent")), failed = true;
                            else
                                res->fail(what(c, std::string("after the echo: ") +
                                                      std::strerror(errno))),
                                    failed = true;
                            break;
                        }
                        if (r == 0) {
                            res->fail(what(c, "EOF before the whole echo"));
                            failed = true;
                            break;
                        }
                        if (r < 0) {
                            res->fail(what(c, std::string("recv: ") + std::strerror(errno)));
                            failed = true;
                            break;
                        }
                        if (c.rcvd + (size_t)r > c.sent ||
                            std::memcmp(rbuf.data(), c.req.data() + c.rcvd, (size_t)r) != 0) {
                            res->fail(what(c, "echo differs from the request at byte " +
                                                  std::to_string(c.rcvd)));
                            failed = true;
                            break;
                        }
                        c.rcvd += (size_t)r;
                        if (c.rcvd == c.req.size()) {
                            if (!plan.expect_eof) {
                                done = true;
                                break;
                            }
                            c.phase = C_EOF;
                        } else if (c.slow) {
                            break;
                        }
                    }
                }
            }
            if (done) {
                res->success(c.req.size());
                ::close(c.fd);
            } else if (failed) {
                close_rst(c.fd);
            }
            if (done || failed) {
                live[i] = std::move(live.back());
                live.pop_back();
                pfds[i] = pfds[live.size()];
            }
        }
    }
}

// ---- the server: one channel on the calling thread, echoing every byte back ------------------

enum Mode { M_PLAIN = 0, M_LW = 1, M_BUF = 2 };
const char *mode_name(int m) { return m == M_PLAIN ? "plain" : m == M_LW ? "lwsocket" : "buffered"; }

enum Kind { K_LISTENER = 0x4c49, K_CONN = 0x434f };

struct Tagged {
    int kind;
};

struct SListener : Tagged {
    mp_handle *h = nullptr;
    int fd = -1;
    Mode mode = M_PLAIN;
    bool ended = false;
};

struct SConn : Tagged {
    mp_handle *h = nullptr;
    int fd = -1;
    Mode mode = M_PLAIN;
    unsigned char hdr[4] = {};
    int hdr_n = 0;
    uint64_t want = UINT64_MAX; // 4 + payload, once the header is in
    uint64_t rd = 0, wr = 0;
    std::vector<char> buf;      // plain reads (one read or one write in flight)
    std::deque<unsigned> held;  // buffered: channel buffers being echoed, in write order
    bool ended = false;
};

// Plain reads use 4 KiB, 64 KiB or 256 KiB buffers (in turn per connection): many small
// read/write rounds, and writes big enough for the socket to take them in parts.
constexpr size_t kPlainBufs[3] = {4 * 1024, 64 * 1024, 256 * 1024};

class EchoServer {
  public:
    explicit EchoServer(mp_channel *ch) : ch_(ch) {}
    ~EchoServer() {
        // Only reached with live handles after a failed ASSERT: the channel is destroyed
        // after us by the test, which closes lwsockets; close our regular fds afterwards is
        // not possible, so leave them to the process (they are few and the test failed).
        for (SConn *c : conns_) delete c;
        for (SListener *l : listeners_) delete l;
    }

    // Registers lfd (a listening socket) and starts accepting (count 0) in mode m.
    SListener *listen(int lfd, Mode m) {
        SListener *l = new SListener();
        l->kind = K_LISTENER;
        l->fd = lfd;
        l->mode = m;
        l->h = mp_register(ch_, lfd, l, nullptr);
        if (!l->h) {
            delete l;
            return nullptr;
        }
        listeners_.push_back(l);
        return l;
    }
    int start(SListener *l) { return mp_accept(l->h, 0, l->mode == M_LW ? MP_LWSOCKET : 0); }

    // Handles one event; events that are not ours go to other (if set).
    void on_event(const mp_event &ev) {
        if (ev.cmd == MP_EV_WAKE) return;
        Tagged *t = static_cast<Tagged *>(ev.cookie);
        if (!t || (t->kind != K_LISTENER && t->kind != K_CONN)) {
            if (other) other(ev);
            else note("event of an unknown handle: " + describe(ev));
            return;
        }
        if (t->kind == K_LISTENER) {
            SListener *l = static_cast<SListener *>(t);
            if (ev.cmd == MP_EV_CLOSED) {
                listeners_closed++;
                return;
            }
            if (ev.cmd != MP_EV_ACCEPT) {
                note("listener event " + describe(ev));
                return;
            }
            if (ev.result < 0) {
                accept_error_events++;
                last_accept_error = (int)ev.result;
                return;
            }
            accepted++;
            on_accept(l, (int)ev.result);
            return;
        }
        SConn *c = static_cast<SConn *>(t);
        switch (ev.cmd) {
        case MP_EV_READ: on_read(c, ev); break;
        case MP_EV_WRITE: on_write(c, ev); break;
        case MP_EV_DISCONNECT:
            if (c->wr != c->want) early_disconnects++;
            end(c);
            break;
        case MP_EV_CLOSED: on_closed(c); break;
        default: note("connection event " + describe(ev));
        }
    }

    // Dispatches (batches of 64, slices of 20 ms) until done() or timeout_ms; true if done().
    bool serve(const std::function<bool()> &done, int timeout_ms) {
        auto deadline = deadline_in(timeout_ms);
        mp_event evs[64];
        for (;;) {
            if (done()) return true;
            int left = ms_until(deadline);
            if (left <= 0) return false;
            int n = mp_dispatch_batch(ch_, evs, 64, std::min(left, 20));
            if (n < 0 && n != -EINTR) {
                note("mp_dispatch_batch: " + std::to_string(n));
                return false;
            }
            for (int i = 0; i < n; i++) on_event(evs[i]);
        }
    }

    // Unregisters every listener and connection and waits for all their CLOSED events.
    bool stop(int timeout_ms = 5000) {
        for (SListener *l : listeners_)
            if (!l->ended) {
                l->ended = true;
                if (mp_unregister(l->h) != 0) note("mp_unregister(listener) failed");
            }
        for (SConn *c : std::vector<SConn *>(conns_.begin(), conns_.end())) end(c);
        return serve([&] { return conns_.empty() && listeners_closed == (int)listeners_.size(); },
                     timeout_ms);
    }

    size_t live_conns() const { return conns_.size(); }
    std::string problems() const {
        std::string s;
        for (auto &e : errors_) s += "\n  " + e;
        return s;
    }

    std::function<void(const mp_event &)> other;
    int accepted = 0, accept_error_events = 0, last_accept_error = 0, served = 0, closed = 0;
    int early_disconnects = 0, wrong_kind = 0, errors = 0;
    int accepted_by_mode[3] = {0, 0, 0};
    int served_by_mode[3] = {0, 0, 0};
    int listeners_closed = 0;
    bool expect_lw = false; // M_LW accepts must yield lwsockets

  private:
    void note(const std::string &e) {
        errors++;
        if (errors_.size() < 10) errors_.push_back(e);
    }

    void on_accept(SListener *l, int fd) {
        accepted_by_mode[l->mode]++;
        bool lw = mp_is_lwsocket(fd);
        if (lw != (l->mode == M_LW && expect_lw)) wrong_kind++;
        SConn *c = new SConn();
        c->kind = K_CONN;
        c->fd = fd;
        c->mode = l->mode;
        c->h = mp_register(ch_, fd, c, nullptr);
        if (!c->h) {
            note(std::string("mp_register(accepted): ") + std::strerror(errno));
            mp_close_accepted(ch_, fd);
            delete c;
            return;
        }
        conns_.insert(c);
        if (c->mode == M_BUF) {
            int r = mp_read_buffered(c->h);
            if (r != 0) {
                note("mp_read_buffered: " + std::to_string(r));
                end(c);
            }
        } else {
            c->buf.resize(kPlainBufs[(size_t)accepted % 3]);
            next_read(c);
        }
    }

    void next_read(SConn *c) {
        uint64_t room = c->want - c->rd;
        int r = mp_read(c->h, c->buf.data(), (size_t)std::min<uint64_t>(room, c->buf.size()));
        if (r != 0) {
            note("mp_read: " + std::to_string(r));
            end(c);
        }
    }

    void on_read(SConn *c, const mp_event &ev) {
        if (ev.result <= 0) {
            note("READ " + describe(ev));
            end(c);
            return;
        }
        const unsigned char *p = static_cast<const unsigned char *>(ev.u.read.buf);
        size_t n = (size_t)ev.result;
        bool is_buf = (ev.flags & MP_EVF_BUFFER) != 0;
        if (is_buf != (c->mode == M_BUF)) note("READ with unexpected MP_EVF_BUFFER " + describe(ev));
        if (is_buf) c->held.push_back(ev.u.read.buf_id);
        for (size_t i = 0; i < n && c->hdr_n < 4; i++) c->hdr[c->hdr_n++] = p[i];
        if (c->hdr_n == 4 && c->want == UINT64_MAX)
            c->want = 4 + ((uint64_t)c->hdr[0] << 24 | (uint64_t)c->hdr[1] << 16 |
                           (uint64_t)c->hdr[2] << 8 | c->hdr[3]);
        c->rd += n;
        if (c->rd > c->want) {
            note("read past the request: " + std::to_string(c->rd) + " > " + std::to_string(c->want));
            end(c);
            return;
        }
        // Echo straight from where the data is: our buffer (plain: the next read waits for
        // this write) or the channel buffer (released at this write's WRITE event).
        int r = mp_write(c->h, p, n);
        if (r != 0) {
            note("mp_write: " + std::to_string(r));
            end(c);
            return;
        }
        if (c->mode == M_BUF && c->rd < c->want) {
            r = mp_read_buffered(c->h);
            if (r != 0) {
                note("mp_read_buffered (again): " + std::to_string(r));
                end(c);
            }
        }
    }

    void on_write(SConn *c, const mp_event &ev) {
        if (ev.result < 0) {
            note("WRITE " + describe(ev));
            end(c);
            return;
        }
        c->wr += (uint64_t)ev.result;
        if (c->mode == M_BUF) {
            if (c->held.empty()) {
                note("WRITE without a held buffer");
            } else {
                int r = mp_buffer_release(ch_, c->held.front());
                if (r != 0) note("mp_buffer_release: " + std::to_string(r));
                c->held.pop_front();
            }
        }
        if (c->wr == c->want) {
            served++;
            served_by_mode[c->mode]++;
            end(c);
        } else if (c->mode != M_BUF && c->wr == c->rd) {
            next_read(c);
        }
    }

    void end(SConn *c) {
        if (c->ended) return;
        c->ended = true;
        int r = mp_unregister(c->h);
        if (r != 0) note("mp_unregister: " + std::to_string(r));
    }

    void on_closed(SConn *c) {
        if (!c->ended) note("CLOSED of a connection that was not unregistered");
        // Buffers of writes cut short by mp_unregister are ours again now.
        for (unsigned id : c->held) mp_buffer_release(ch_, id);
        c->held.clear();
        if (!mp_is_lwsocket(c->fd)) ::close(c->fd);
        conns_.erase(c);
        delete c;
        closed++;
    }

    mp_channel *ch_;
    std::set<SConn *> conns_;
    std::vector<SListener *> listeners_;
    std::vector<std::string> errors_;
};

// Can this kernel/engine do buffered reads?  (A throwaway channel and pair.)
bool buffered_supported() {
    mp_options o = opts();
    Pair p;
    if (!tcp_pair(p)) return false;
    Channel ch(mp_create(&o));
    if (!ch.get()) return false;
    mp_handle *h = mp_register(ch, p.a.get(), nullptr, nullptr);
    if (!h) return false;
    int r = mp_read_buffered(h);
    mp_unregister(h);
    collect(ch, 20);
    return r == 0;
}

uint32_t channel_features(mp_channel *ch) {
    mp_stats st;
    return mp_get_stats(ch, &st) == 0 ? st.features : 0;
}

double cpu_seconds() {
    rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

// RSS in bytes through an fd opened in advance (no new fd is needed while the limit is low).
long rss_from(int statm_fd) {
    char buf[128];
    ssize_t n = pread(statm_fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return -1;
    buf[n] = 0;
    long size = 0, res = 0;
    if (sscanf(buf, "%ld %ld", &size, &res) != 2) return -1;
    return res * sysconf(_SC_PAGESIZE);
}

// Holds RLIMIT_NOFILE's soft limit at (highest open fd + 1) with every lower free slot filled,
// so no new descriptor can be made; restore() or the destructor gives everything back.
struct NofileHeldLow {
    rlimit old{};
    bool lowered = false;
    std::vector<int> fillers;
    bool lower(int dup_from) {
        if (getrlimit(RLIMIT_NOFILE, &old) < 0) return false;
        int maxfd = dup_from;
        if (DIR *d = opendir("/proc/self/fd")) {
            int self = dirfd(d);
            while (dirent *e = readdir(d))
                if (e->d_name[0] != '.' && atoi(e->d_name) != self)
                    maxfd = std::max(maxfd, atoi(e->d_name));
            closedir(d);
        } else {
            return false;
        }
        rlimit low = old;
        low.rlim_cur = (rlim_t)maxfd + 1;
        if (setrlimit(RLIMIT_NOFILE, &low) < 0) return false;
        lowered = true;
        for (;;) { // fill the holes below the limit
            int f = fcntl(dup_from, F_DUPFD_CLOEXEC, 0);
            if (f < 0) return errno == EMFILE;
            fillers.push_back(f);
        }
    }
    void restore() {
        if (lowered) setrlimit(RLIMIT_NOFILE, &old);
        lowered = false;
        for (int f : fillers) ::close(f);
        fillers.clear();
    }
    ~NofileHeldLow() { restore(); }
};

} // namespace

// ---------------------------------------------------------------------------------------------
// a) accept keeps failing with EMFILE while the limit stays low
// ---------------------------------------------------------------------------------------------

// 200 clients are connected (and have sent their request) before the descriptor limit drops to
// the highest open fd + 1.  For 400 ms every accept fails with EMFILE: mp_dispatch must wait
// between retries (10 ms back-off) instead of spinning, deliver a bounded number of ACCEPT
// errors and not grow memory.  Once the limit is back, every one of the 200 is accepted and
// served.  (The old epoll engine re-queued the listener on the list it was draining: 100% CPU
// inside one mp_dispatch, one error event per pass, unbounded memory.)
TEST(Hardening, AcceptFailureWithLimitHeldLow) {
#if defined(__SANITIZE_ADDRESS__)
    // The sanitizers' runtime needs descriptors of its own (it checks memory through a pipe):
    // with none left it reports false errors.  This test runs in the normal build.
    GTEST_SKIP() << "not under the sanitizers: they need file descriptors this test takes away";
#endif
    constexpr int N = 200;
    constexpr int kHoldMs = 400;
    constexpr int kWatchdogMs = 1500;
    Fd lfd(make_listener(1024)); // sockets outlive the channel, even after a failed ASSERT
    ASSERT_TRUE(lfd.ok());
    uint16_t port = local_port(lfd.get());
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr) << std::strerror(errno);
    EchoServer srv(ch);
    SListener *l = srv.listen(lfd.get(), M_PLAIN);
    ASSERT_NE(l, nullptr) << std::strerror(errno);

    // The clients and their requests exist before the limit drops (connect needs no accept).
    std::vector<Fd> clients;
    std::mt19937 rng(7);
    std::vector<std::string> reqs;
    for (int i = 0; i < N; i++) {
        clients.emplace_back(connect_loopback(port));
        ASSERT_TRUE(clients.back().ok()) << "connect " << i;
        reqs.push_back(make_request(1 + i % 7, rng));
        ASSERT_TRUE(write_all(clients.back().get(), reqs.back().data(), reqs.back().size()));
    }
    Fd statm(open("/proc/self/statm", O_RDONLY | O_CLOEXEC));
    ASSERT_TRUE(statm.ok());
    long rss0 = rss_from(statm.get());

    NofileHeldLow low;
    // A watchdog, started before the limit drops: if mp_dispatch does not come back (the old
    // spin), it lifts the limit so the spin ends (accepts succeed) and the test fails on its
    // measurements instead of hanging.
    std::mutex wmu;
    std::condition_variable wcv;
    bool wdone = false;
    std::atomic<bool> wfired{false};
    Joiner watchdog([&] {
        std::unique_lock<std::mutex> lk(wmu);
        if (!wcv.wait_for(lk, std::chrono::milliseconds(kWatchdogMs), [&] { return wdone; })) {
            wfired = true;
            setrlimit(RLIMIT_NOFILE, &low.old);
        }
    });
    auto stop_watchdog = [&] {
        {
            std::lock_guard<std::mutex> lk(wmu);
            wdone = true;
        }
        wcv.notify_all();
        watchdog.join();
    };
    if (!low.lower(statm.get())) {
        stop_watchdog();
        FAIL() << "lowering RLIMIT_NOFILE: " << std::strerror(errno);
    }

    ASSERT_EQ(mp_accept(l->h, 0, 0), 0);
    double cpu0 = cpu_seconds();
    int64_t t0 = now_ms();
    int64_t max_call_ms = 0;
    mp_event evs[64];
    while (now_ms() - t0 < kHoldMs) {
        int64_t c0 = now_ms();
        int n = mp_dispatch_batch(ch, evs, 64, (int)std::max<int64_t>(1, kHoldMs - (now_ms() - t0)));
        max_call_ms = std::max(max_call_ms, now_ms() - c0);
        if (n < 0 && n != -EINTR) {
            ADD_FAILURE() << "mp_dispatch_batch: " << n;
            break;
        }
        for (int i = 0; i < n; i++) srv.on_event(evs[i]);
        if (wfired) break;
    }
    int64_t wall = now_ms() - t0;
    double cpu = cpu_seconds() - cpu0;
    long rss1 = rss_from(statm.get());
    int errs = srv.accept_error_events;
    int accepted_low = srv.accepted;
    stop_watchdog();
    low.restore();
    std::printf("[ emfile   ] %s: %lld ms, CPU %.1f ms, %d ACCEPT errors, RSS %+ld KiB\n",
                mp_engine_name(ch), (long long)wall, cpu * 1000, errs, (rss1 - rss0) / 1024);

    EXPECT_FALSE(wfired) << "mp_dispatch did not return for " << kWatchdogMs
                         << " ms while accept failed (spinning?)";
    EXPECT_LE(max_call_ms, kHoldMs + 100) << "one mp_dispatch took too long";
    EXPECT_LT(cpu, 0.25 * (double)wall / 1000.0)
        << "CPU " << cpu * 1000 << " ms in " << wall << " ms of dispatching with the limit low";
    EXPECT_GE(errs, 2) << "the accepts did not fail (and retry) while the limit was low";
    EXPECT_LE(errs, wall / 5 + 5) << "too many ACCEPT errors: retries are not backed off";
    EXPECT_EQ(srv.last_accept_error, -EMFILE);
    EXPECT_EQ(accepted_low, 0) << "accepted while no descriptor could be made?";
    if (rss0 > 0 && rss1 > 0) {
        EXPECT_LT(rss1 - rss0, 8L << 20) << "RSS grew from " << rss0 << " to " << rss1;
    }

    // The limit is back: every client is accepted and served (echo, then the server closes).
    bool all = srv.serve([&] { return srv.closed == N; }, 10000);
    EXPECT_TRUE(all) << "accepted " << srv.accepted << ", served " << srv.served << " of " << N
                     << srv.problems();
    int got = 0;
    for (int i = 0; i < N; i++) {
        std::string r = read_n(clients[i].get(), reqs[i].size(), all ? 2000 : 10);
        if (r == reqs[i] && sees_eof(clients[i].get(), all ? 2000 : 10)) got++;
    }
    EXPECT_EQ(got, N) << "clients that got their echo and the close";
    EXPECT_EQ(srv.errors, 0) << srv.problems();
    EXPECT_TRUE(srv.stop());
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.handles, 0u);
}

// ---------------------------------------------------------------------------------------------
// b) a full lwsocket table pauses accepting; no queued connection is lost
// ---------------------------------------------------------------------------------------------

// A table of 256 lwsockets and 1000 clients at once, each sending a small request and waiting
// for the echo.  The server unregisters each connection after its reply (freeing its slot).
// While the table is full accepting pauses and connections wait in the backlog: every client
// gets its reply, no accept fails.  (Before: each retry took a connection off the backlog and
// the kernel closed it for want of a slot: 596 of 1000 clients closed without a reply.)
TEST(Hardening, FullLwsocketTableLosesNoConnection) {
    if (env_engine() == "epoll") GTEST_SKIP() << "lwsockets need the io_uring engine";
    constexpr int N = 1000;
    mp_options o = opts();
    o.lwsocket = 1;
    o.max_lwsockets = 256;
    Fd lfd(make_listener(4096));
    ASSERT_TRUE(lfd.ok());
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr) << std::strerror(errno);
    if (!is_uring(ch)) GTEST_SKIP() << "lwsockets need the io_uring engine";
    if (!(channel_features(ch) & MP_FEAT_DIRECT_DESCRIPTORS))
        GTEST_SKIP() << "kernel without direct descriptors";
    EchoServer srv(ch);
    srv.expect_lw = true;
    SListener *l = srv.listen(lfd.get(), M_LW);
    ASSERT_NE(l, nullptr);
    ASSERT_EQ(srv.start(l), 0);

    ClientPlan plan;
    plan.ports = {local_port(lfd.get())};
    plan.count = N / 2;
    plan.concurrency = N / 2; // all at once: far more than the table holds
    plan.hold_ms = 100;       // the server fills the table before any request comes
    plan.timeout_ms = 15000;
    plan.size_fn = [](std::mt19937 &rng, int) { return (size_t)(1 + rng() % 200); };
    ClientResult res;
    std::atomic<int> finished{0};
    std::vector<std::unique_ptr<Joiner>> threads;
    for (int t = 0; t < 2; t++) {
        ClientPlan p = plan;
        p.seed = 100 + t;
        threads.emplace_back(new Joiner([p, &res, &finished] {
            run_clients(p, &res);
            finished++;
        }));
    }
    srv.serve([&] { return finished == 2; }, 20000);
    threads.clear();
    EXPECT_EQ(res.ok, N) << res.summary();
    EXPECT_EQ(srv.served, N) << srv.problems();
    EXPECT_EQ(srv.wrong_kind, 0) << "accepted connections that were not lwsockets";
    EXPECT_EQ(srv.accept_error_events, 0);
    EXPECT_EQ(srv.errors, 0) << srv.problems();
    EXPECT_TRUE(srv.stop());
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.accept_errors, 0u);
    EXPECT_GE(st.accept_paused, 1u) << "the table never filled: the test did not test anything";
    EXPECT_EQ(st.handles, 0u);
}

// ---------------------------------------------------------------------------------------------
// c) a stalled buffered-read connection cannot starve the others
// ---------------------------------------------------------------------------------------------

// A pool of 64 buffers of 4 KiB, at most 16 per connection.  One connection in buffered mode
// keeps asking but never gives a buffer back (the application holds what it got: it has
// writes pending to a peer that never reads) while its peer floods.  It may fill at most its
// 16 buffers; its receive then pauses (stats.buf_paused), and 10 new connections are all
// served.  (Before: its multishot receive emptied the whole pool, and no other connection got
// a byte.)
TEST(Hardening, StalledPeerDoesNotStarveBufferedReads) {
    if (env_engine() == "epoll") GTEST_SKIP() << "buffered reads need the io_uring engine";
    constexpr int kPerConn = 16, kCount = 64, kSlack = 4;
    mp_options o = opts();
    o.buf_count = kCount;
    o.buf_size = 4096;
    o.buf_per_conn = kPerConn;
    Pair stall; // outlives the channel
    Fd lfd(make_listener(256));
    ASSERT_TRUE(lfd.ok());
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr) << std::strerror(errno);
    ASSERT_TRUE(tcp_pair(stall));

    struct StallTag : Tagged {
    } stag;
    stag.kind = 0x5354;
    mp_handle *hs = mp_register(ch, stall.a.get(), &stag, nullptr);
    ASSERT_NE(hs, nullptr);
    int r = mp_read_buffered(hs);
    if (r == -ENOTSUP) GTEST_SKIP() << "no provided-buffer rings";
    ASSERT_EQ(r, 0);

    EchoServer srv(ch);
    int stall_reads = 0, stall_closed = 0, stall_other = 0;
    std::vector<unsigned> stall_bufs;
    srv.other = [&](const mp_event &ev) {
        if (ev.cookie != &stag) return;
        if (ev.cmd == MP_EV_READ) {
            stall_reads++;
            if (ev.flags & MP_EVF_BUFFER) stall_bufs.push_back(ev.u.read.buf_id);
            mp_read_buffered(ev.handle); // ask again, give nothing back
        } else if (ev.cmd == MP_EV_CLOSED) {
            stall_closed++;
        } else {
            stall_other++;
        }
    };

    // The flooder: writes as fast as the connection takes it until told to stop.
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> flooded{0};
    int fl = fcntl(stall.b.get(), F_GETFL);
    fcntl(stall.b.get(), F_SETFL, fl | O_NONBLOCK);
    Joiner flooder([&] {
        std::string chunk = pattern(65536, 3);
        while (!stop) {
            ssize_t w = send(stall.b.get(), chunk.data(), chunk.size(), MSG_NOSIGNAL);
            if (w > 0) {
                flooded += (uint64_t)w;
                continue;
            }
            if (w < 0 && errno != EAGAIN && errno != EINTR) break;
            pollfd p = {stall.b.get(), POLLOUT, 0};
            poll(&p, 1, 20);
        }
    });
    struct StopOnExit { // destroyed before flooder: a failed ASSERT cannot leave it running
        std::atomic<bool> &s;
        ~StopOnExit() { s = true; }
    } stop_on_exit{stop};

    // Wait until the stalled connection holds its share (and a little more time to overshoot).
    mp_stats st;
    bool full = srv.serve(
        [&] { return mp_get_stats(ch, &st) == 0 && st.bufs_in_use >= (uint64_t)kPerConn; }, 3000);
    ASSERT_TRUE(full) << "the stalled connection never held " << kPerConn << " buffers (holds "
                      << st.bufs_in_use << ", flooded " << flooded << " B)";
    srv.serve([] { return false; }, 200);
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_GE(stall_reads, kPerConn - kSlack) << "the stalled connection was not served at all";
    EXPECT_LE(stall_reads, kPerConn + kSlack) << "it got more than its share";
    EXPECT_GE(st.buf_paused, 1u) << "the stalled receive did not pause";
    EXPECT_LE(st.bufs_in_use, (uint64_t)(kPerConn + kSlack)) << "the stalled connection holds too many";
    uint64_t stalled_holds = st.bufs_in_use;
    std::printf("[ stalled  ] holds %llu buffers (cap %d, pool %d), buf_paused %llu, flooded %llu B\n",
                (unsigned long long)st.bufs_in_use, kPerConn, kCount,
                (unsigned long long)st.buf_paused, (unsigned long long)flooded.load());

    // Ten new connections, each with a request: all echoed within a few seconds.
    SListener *l = srv.listen(lfd.get(), M_BUF);
    ASSERT_NE(l, nullptr);
    ASSERT_EQ(srv.start(l), 0);
    ClientPlan plan;
    plan.ports = {local_port(lfd.get())};
    plan.count = 10;
    plan.concurrency = 10;
    plan.timeout_ms = 5000;
    plan.seed = 11;
    plan.size_fn = [](std::mt19937 &, int i) { return (size_t)(100 + i * 1000); };
    ClientResult res;
    std::atomic<bool> cdone{false};
    {
        Joiner clients([&] {
            run_clients(plan, &res);
            cdone = true;
        });
        srv.serve([&] { return cdone.load(); }, 8000);
    }
    EXPECT_EQ(res.ok, 10) << res.summary();
    EXPECT_EQ(srv.served, 10) << srv.problems();
    srv.serve([&] { return srv.closed == srv.accepted; }, 2000);
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, stalled_holds) << "the ten gave their buffers back; the stalled one "
                                                "still holds what it held";
    EXPECT_LE(st.bufs_peak, (uint64_t)(kPerConn + kSlack + 10 * 3));
    EXPECT_EQ(stall_other, 0);
    EXPECT_EQ(srv.errors, 0) << srv.problems();

    // The stalled connection gives up its buffer and ends: the pool is whole again.
    stop = true;
    flooder.join();
    for (unsigned id : stall_bufs) EXPECT_EQ(mp_buffer_release(ch, id), 0);
    EXPECT_EQ(mp_unregister(hs), 0);
    EXPECT_TRUE(srv.stop());
    srv.serve([&] { return stall_closed == 1; }, 2000);
    EXPECT_EQ(stall_closed, 1);
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.bufs_in_use, 0u);
    EXPECT_EQ(st.handles, 0u);
}

// ---------------------------------------------------------------------------------------------
// d) calls from another thread
// ---------------------------------------------------------------------------------------------

// Every call on a channel (and its handles) from a thread that does not own it fails with
// -EPERM (NULL/EPERM for pointers) and changes nothing; mp_wake works from anywhere.
TEST(Hardening, CrossThreadCallsFailWithEperm) {
    Pair p, p2;
    ASSERT_TRUE(tcp_pair(p));
    ASSERT_TRUE(tcp_pair(p2));
    int pr[2], pr2[2];
    ASSERT_EQ(pipe2(pr, O_CLOEXEC | O_NONBLOCK), 0);
    Fd pr0(pr[0]), pr1(pr[1]);
    ASSERT_EQ(pipe2(pr2, O_CLOEXEC | O_NONBLOCK), 0);
    Fd pr20(pr2[0]), pr21(pr2[1]);
    Fd lfd(make_listener(16));
    ASSERT_TRUE(lfd.ok());
    uint16_t port = local_port(lfd.get());
    Fd c1(connect_loopback(port)), c2;
    ASSERT_TRUE(c1.ok());
    Fd accepted_fd;
    char rbuf[64];

    {
        mp_options o = opts();
        Channel ch(mp_create(&o));
        ASSERT_NE(ch.get(), nullptr);
        int ck = 0;
        // The test thread becomes the owner with its first call.
        mp_handle *hl = mp_register(ch, lfd.get(), &ck, nullptr);
        ASSERT_NE(hl, nullptr);
        mp_handle *h = mp_register(ch, p.a.get(), &ck, nullptr);
        ASSERT_NE(h, nullptr);
        mp_handle *ph = mp_poll_add(ch, pr0.get(), EPOLLIN, 0, &ck);
        ASSERT_NE(ph, nullptr);
        ASSERT_EQ(mp_accept(hl, 1, 0), 0);
        mp_event ev;
        ASSERT_TRUE(wait_cmd(ch, &ev, MP_EV_ACCEPT, hl, 3000));
        ASSERT_GE(ev.result, 0) << describe(ev);
        accepted_fd.reset((int)ev.result); // not registered: for mp_close_accepted
        ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0);

        struct R {
            int dispatch = 1, dispatch_batch = 1, flush = 1, read = 1, read_buffered = 1,
                write = 1, writev = 1, disconnect = 1, unregister = 1, unregister_l = 1,
                accept = 1, close_accepted = 1, buffer_release = 1, export_fd = 1, connect = 1,
                poll_mod = 1, poll_del = 1, wake = 1, get_stats = 1, pending = -1;
            mp_handle *reg = nullptr, *poll = nullptr;
            int reg_errno = 0, poll_errno = 0;
        } r;
        static char wbuf[] = "xx";
        {
            Joiner t([&] {
                mp_event e2, evs[4];
                r.dispatch = mp_dispatch(ch, &e2, 0);
                r.dispatch_batch = mp_dispatch_batch(ch, evs, 4, 10);
                r.flush = mp_flush(ch);
                errno = 0;
                r.reg = mp_register(ch, p2.a.get(), nullptr, nullptr);
                r.reg_errno = errno;
                r.read = mp_read(h, rbuf, sizeof rbuf);
                r.read_buffered = mp_read_buffered(h);
                r.write = mp_write(h, wbuf, 2);
                iovec iov = {wbuf, 2};
                r.writev = mp_writev(h, &iov, 1);
                r.disconnect = mp_disconnect(h);
                r.export_fd = mp_export_fd(h);
                sockaddr_in a = loopback_addr(port);
                r.connect = mp_connect(h, (sockaddr *)&a, sizeof a);
                r.unregister = mp_unregister(h);
                r.unregister_l = mp_unregister(hl);
                errno = 0;
                r.poll = mp_poll_add(ch, pr20.get(), EPOLLIN, 0, nullptr);
                r.poll_errno = errno;
                r.poll_mod = mp_poll_mod(ph, EPOLLIN | EPOLLOUT, 0);
                r.poll_del = mp_poll_del(ph);
                r.accept = mp_accept(hl, 1, 0);
                r.close_accepted = mp_close_accepted(ch, accepted_fd.get());
                r.buffer_release = mp_buffer_release(ch, 0);
                mp_stats st;
                r.get_stats = mp_get_stats(ch, &st); // allowed: the owner is not inside a call
                r.pending = mp_pending(ch);
                r.wake = mp_wake(ch);
            });
        }
        EXPECT_EQ(r.dispatch, -EPERM);
        EXPECT_EQ(r.dispatch_batch, -EPERM);
        EXPECT_EQ(r.flush, -EPERM);
        EXPECT_EQ(r.reg, nullptr);
        EXPECT_EQ(r.reg_errno, EPERM);
        EXPECT_EQ(r.read, -EPERM);
        EXPECT_EQ(r.read_buffered, -EPERM);
        EXPECT_EQ(r.write, -EPERM);
        EXPECT_EQ(r.writev, -EPERM);
        EXPECT_EQ(r.disconnect, -EPERM);
        EXPECT_EQ(r.export_fd, -EPERM);
        if (r.export_fd >= 0) ::close(r.export_fd);
        EXPECT_EQ(r.connect, -EPERM);
        EXPECT_EQ(r.unregister, -EPERM);
        EXPECT_EQ(r.unregister_l, -EPERM);
        EXPECT_EQ(r.poll, nullptr);
        EXPECT_EQ(r.poll_errno, EPERM);
        EXPECT_EQ(r.poll_mod, -EPERM);
        EXPECT_EQ(r.poll_del, -EPERM);
        EXPECT_EQ(r.accept, -EPERM);
        EXPECT_EQ(r.close_accepted, -EPERM);
        EXPECT_EQ(r.buffer_release, -EPERM);
        EXPECT_EQ(r.get_stats, 0);
        EXPECT_GE(r.pending, 0);
        EXPECT_EQ(r.wake, 0);

        // The wake from the other thread arrives; nothing else does (no write, no accept, no
        // disconnect, no CONNECT, no READ were started by the rejected calls).
        c2.reset(connect_loopback(port)); // would be accepted if the rejected mp_accept counted
        ASSERT_TRUE(c2.ok());
        bool woke = false;
        std::vector<mp_event> evs = collect(ch, 300);
        for (auto &e : evs) {
            if (e.cmd == MP_EV_WAKE) woke = true;
            else ADD_FAILURE() << "unexpected event after rejected calls: " << describe(e);
        }
        EXPECT_TRUE(woke) << "mp_wake from another thread did not wake the owner";
        EXPECT_EQ(drain(p.b.get()), 0u) << "a rejected mp_write reached the peer";
        EXPECT_TRUE(fd_valid(accepted_fd.get())) << "a rejected mp_close_accepted closed the fd";

        // Everything still works on the owner thread.
        ASSERT_EQ(mp_write(h, "ok", 2), 0);
        ASSERT_TRUE(wait_cmd(ch, &ev, MP_EV_WRITE, h, 3000));
        EXPECT_EQ(ev.result, 2);
        EXPECT_EQ(read_n(p.b.get(), 2, 3000), "ok");
        ASSERT_EQ(mp_read(h, rbuf, sizeof rbuf), 0);
        ASSERT_TRUE(write_all(p.b.get(), "hi", 2));
        ASSERT_TRUE(wait_cmd(ch, &ev, MP_EV_READ, h, 3000));
        EXPECT_EQ(ev.result, 2);
        mp_handle *h2 = mp_register(ch, p2.a.get(), nullptr, nullptr);
        EXPECT_NE(h2, nullptr) << "the rejected mp_register left the fd registered: "
                               << std::strerror(errno);
        mp_handle *ph2 = mp_poll_add(ch, pr20.get(), EPOLLIN, 0, nullptr);
        EXPECT_NE(ph2, nullptr) << std::strerror(errno);
        ASSERT_EQ(write(pr1.get(), "p", 1), 1);
        ASSERT_TRUE(wait_cmd(ch, &ev, MP_EV_POLL, ph, 3000)) << "the poll watch was changed";
        EXPECT_EQ(ev.u.poll.revents & EPOLLOUT, 0u);
        EXPECT_EQ(mp_poll_del(ph), 0);
        ASSERT_EQ(mp_accept(hl, 1, 0), 0);
        ASSERT_TRUE(wait_cmd(ch, &ev, MP_EV_ACCEPT, hl, 3000));
        ASSERT_GE(ev.result, 0);
        ::close((int)ev.result);
        EXPECT_EQ(mp_close_accepted(ch, accepted_fd.release()), 0);
        EXPECT_EQ(mp_unregister(h), 0);
        EXPECT_EQ(mp_unregister(hl), 0);
        if (h2) {
            EXPECT_EQ(mp_unregister(h2), 0);
        }
        if (ph2) {
            EXPECT_EQ(mp_poll_del(ph2), 0);
        }
        collect(ch, 50);
    }
}

// ---------------------------------------------------------------------------------------------
// e) a forked child and its parent's channel
// ---------------------------------------------------------------------------------------------

// The parent accepts (count 0) and has a read in flight, then forks.  The child's calls on the
// inherited channel fail with -EPERM (for 300 ms it keeps trying to dispatch), mp_destroy only
// releases its copy, and a channel of its own works.  Meanwhile the parent serves 500 short
// connections: every one of them, none stolen by the child.  (Before: the child's dispatch
// reaped the parent's completions; the parent served 0 of 2000.)
TEST(Hardening, ForkedChildCannotUseParentChannel) {
    constexpr int N = 500;
    Pair p;
    ASSERT_TRUE(tcp_pair(p));
    Fd lfd(make_listener(1024));
    ASSERT_TRUE(lfd.ok());
    mp_options o = opts();
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    EchoServer srv(ch);
    SListener *l = srv.listen(lfd.get(), M_PLAIN);
    ASSERT_NE(l, nullptr);
    ASSERT_EQ(srv.start(l), 0);
    struct OtherTag : Tagged {
    } otag;
    otag.kind = 0x4f54;
    mp_handle *hp = mp_register(ch, p.a.get(), &otag, nullptr);
    ASSERT_NE(hp, nullptr);
    static char pbuf[16];
    ASSERT_EQ(mp_read(hp, pbuf, sizeof pbuf), 0);
    mp_event ev;
    ASSERT_EQ(mp_dispatch(ch, &ev, 0), 0); // everything submitted
    int other_events = 0;
    srv.other = [&](const mp_event &e) {
        if (e.cmd != MP_EV_CLOSED) other_events++;
    };

    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    ASSERT_GE(pid, 0) << std::strerror(errno);
    if (pid == 0) {
        // The child: no gtest here, only _exit with a bit per failed check.
        int bad = 0;
        int64_t t0 = now_ms();
        while (now_ms() - t0 < 300) {
            mp_event e;
            if (mp_dispatch(ch, &e, 0) != -EPERM) bad |= 1;
            if (mp_dispatch(ch, &e, 20) != -EPERM) bad |= 1;
            sleep_ms(5);
        }
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        errno = 0;
        mp_handle *x = mp_register(ch, s, nullptr, nullptr);
        if (x || errno != EPERM) bad |= 2;
        char b[8];
        if (mp_read(hp, b, sizeof b) != -EPERM) bad |= 4;
        if (mp_accept(l->h, 1, 0) != -EPERM) bad |= 8;
        if (mp_flush(ch) != -EPERM) bad |= 16;
        if (mp_unregister(hp) != -EPERM) bad |= 32;
        mp_destroy(ch.ch);
        ch.ch = nullptr;
        mp_options co = opts();
        mp_channel *own = mp_create(&co);
        if (!own) {
            bad |= 64;
        } else {
            mp_handle *hs = mp_register(own, s, nullptr, nullptr);
            if (!hs || mp_unregister(hs) != 0) bad |= 128;
            if (mp_wake(own) != 0) bad |= 128;
            mp_event e;
            bool woke = false, closed = false;
            for (int i = 0; i < 4 && !(woke && closed); i++) {
                if (mp_dispatch(own, &e, 1000) != 1) break;
                if (e.cmd == MP_EV_WAKE) woke = true;
                if (e.cmd == MP_EV_CLOSED) closed = true;
            }
            if (!woke || !closed) bad |= 128;
            mp_destroy(own);
        }
        ::close(s);
        _exit(bad);
    }

    // The parent: serve N connections from two client threads while the child runs.
    ClientPlan plan;
    plan.ports = {local_port(lfd.get())};
    plan.count = N / 2;
    plan.concurrency = 16;
    plan.timeout_ms = 10000;
    ClientResult res;
    std::atomic<int> finished{0};
    {
        std::vector<std::unique_ptr<Joiner>> threads;
        for (int t = 0; t < 2; t++) {
            ClientPlan pl = plan;
            pl.seed = 200 + t;
            threads.emplace_back(new Joiner([pl, &res, &finished] {
                run_clients(pl, &res);
                finished++;
            }));
        }
        srv.serve([&] { return finished == 2; }, 15000);
    }
    // The parent's own read still completes (the child did not take it).
    ASSERT_TRUE(write_all(p.b.get(), "r", 1));
    bool read_ok = false;
    srv.other = [&](const mp_event &e) {
        if (e.cmd == MP_EV_READ && e.handle == hp && e.result == 1) read_ok = true;
        else if (e.cmd != MP_EV_CLOSED) other_events++;
    };
    srv.serve([&] { return read_ok; }, 3000);

    int status = 0;
    pid_t w = 0;
    auto dl = deadline_in(5000);
    while ((w = waitpid(pid, &status, WNOHANG)) == 0 && ms_until(dl) > 0) sleep_ms(10);
    if (w == 0) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        ADD_FAILURE() << "the child did not finish";
    } else {
        ASSERT_EQ(w, pid);
        EXPECT_TRUE(WIFEXITED(status)) << "child status " << status;
        if (WIFEXITED(status)) {
            EXPECT_EQ(WEXITSTATUS(status), 0)
                << "child checks failed (bits: 1 dispatch, 2 register, 4 read, 8 accept, "
                   "16 flush, 32 unregister, 64 create, 128 own channel)";
        }
    }

    EXPECT_EQ(res.ok, N) << res.summary();
    EXPECT_EQ(srv.accepted, N);
    EXPECT_EQ(srv.served, N) << srv.problems();
    EXPECT_TRUE(read_ok) << "the parent's read in flight at fork() did not complete";
    EXPECT_EQ(other_events, 0);
    EXPECT_EQ(srv.errors, 0) << srv.problems();
    EXPECT_EQ(mp_unregister(hp), 0);
    EXPECT_TRUE(srv.stop());
    mp_stats st;
    ASSERT_EQ(mp_get_stats(ch, &st), 0);
    EXPECT_EQ(st.handles, 0u);
}

// ---------------------------------------------------------------------------------------------
// f) checksummed stress
// ---------------------------------------------------------------------------------------------

// 3000 short connections of 1 B..256 KiB (log-uniform) from three client threads against one
// channel echoing every byte as it reads it: plain fds, lwsockets and buffered reads (the last
// two on io_uring only, where they exist).  Every echo is byte-identical, no connection is
// lost, and afterwards no handle, buffer or descriptor is left.
TEST(Hardening, ChecksummedStress) {
    constexpr int kTotal = 3000, kThreads = 3;
    int fds0 = count_fds();
    bool buffered = buffered_supported();
    {
        std::vector<Fd> lfds; // outlive the channel
        mp_options o = opts();
        o.lwsocket = 1;
        Channel ch(mp_create(&o));
        ASSERT_NE(ch.get(), nullptr);
        bool lw = is_uring(ch) && (channel_features(ch) & MP_FEAT_DIRECT_DESCRIPTORS);
        std::vector<Mode> modes = {M_PLAIN};
        if (lw) modes.push_back(M_LW);
        if (buffered) modes.push_back(M_BUF);
        EchoServer srv(ch);
        srv.expect_lw = lw;
        std::vector<uint16_t> ports;
        for (Mode m : modes) {
            lfds.emplace_back(make_listener(1024));
            ASSERT_TRUE(lfds.back().ok());
            // Accepted sockets inherit a small, fixed send buffer: most echo writes go into
            // the socket in parts (the library's short-send path).
            set_bufs(lfds.back().get(), 8192, 0);
            SListener *l = srv.listen(lfds.back().get(), m);
            ASSERT_NE(l, nullptr);
            ASSERT_EQ(srv.start(l), 0);
            ports.push_back(local_port(lfds.back().get()));
        }

        ClientResult res;
        std::atomic<int> finished{0};
        int64_t t0 = now_ms();
        {
            std::vector<std::unique_ptr<Joiner>> threads;
            for (int t = 0; t < kThreads; t++) {
                ClientPlan pl;
                pl.ports = ports;
                pl.count = kTotal / kThreads;
                pl.concurrency = 24;
                pl.timeout_ms = 30000;
                pl.seed = 1000 + t;
                pl.slow_every = 4;
                pl.size_fn = [t](std::mt19937 &rng, int i) { return random_size(rng, i + t); };
                threads.emplace_back(new Joiner([pl, &res, &finished] {
                    run_clients(pl, &res);
                    finished++;
                }));
            }
            srv.serve([&] { return finished == kThreads; }, 35000);
        }
        int64_t took = now_ms() - t0;
        EXPECT_EQ(res.ok, kTotal) << res.summary();
        EXPECT_EQ(res.failed, 0);
        EXPECT_EQ(srv.served, kTotal) << srv.problems();
        int want_by_mode[3] = {0, 0, 0};
        for (int t = 0; t < kThreads; t++)
            for (int i = 0; i < kTotal / kThreads; i++) want_by_mode[modes[(size_t)i % modes.size()]]++;
        for (Mode m : modes) EXPECT_EQ(srv.served_by_mode[m], want_by_mode[m]) << mode_name(m);
        EXPECT_EQ(srv.wrong_kind, 0);
        EXPECT_EQ(srv.early_disconnects, 0);
        EXPECT_EQ(srv.accept_error_events, 0);
        EXPECT_EQ(srv.errors, 0) << srv.problems();
        EXPECT_TRUE(srv.stop()) << srv.live_conns() << " connections did not close";
        mp_stats st;
        ASSERT_EQ(mp_get_stats(ch, &st), 0);
        EXPECT_EQ(st.handles, 0u);
        EXPECT_EQ(st.bufs_in_use, 0u);
        EXPECT_EQ(st.accept_errors, 0u);
        std::printf("[ stress   ] %s: %d connections, %.1f MB echoed, modes %zu, %lld ms\n",
                    mp_engine_name(ch), res.ok, (double)res.bytes / 1e6, modes.size(),
                    (long long)took);
    }
    EXPECT_EQ(count_fds(), fds0) << "descriptors left behind";
}

// mp_set_cpu_mask is a call on a channel's handle like the others: from another thread, or in
// a forked child on an inherited partitioned listener, it fails with -EPERM and changes nothing
// (in a child it would otherwise re-steer the parent's partition sockets, which it shares).
TEST(Hardening, SetCpuMaskFromOtherThreadOrChildFailsWithEperm) {
    std::vector<int> cpus = usable_cpus();
    ASSERT_FALSE(cpus.empty());
    uint16_t port = 0;
    Fd lfd(mp_listen_loopback(&port, 64));
    ASSERT_TRUE(lfd.ok());
    mp_options o = opts();
    o.partition = 1;
    Channel ch(mp_create(&o));
    ASSERT_NE(ch.get(), nullptr);
    cpu_set_t all;
    CPU_ZERO(&all);
    for (int c : cpus) CPU_SET(c, &all);
    mp_handle *h = mp_register(ch, lfd.get(), nullptr, &all);
    ASSERT_NE(h, nullptr) << std::strerror(errno);
    int pfd = mp_handle_fd(h);
    ASSERT_GE(pfd, 0);
    int cpu_before = sockopt(pfd, SOL_SOCKET, SO_INCOMING_CPU);
    cpu_set_t other = cpuset_of({cpus.back() == cpus.front() ? cpus.front() : cpus.back()});

    int r = 1;
    {
        Joiner t([&] { r = mp_set_cpu_mask(h, &other); });
    }
    EXPECT_EQ(r, -EPERM) << "mp_set_cpu_mask from a thread that does not own the channel";
    EXPECT_EQ(sockopt(pfd, SOL_SOCKET, SO_INCOMING_CPU), cpu_before)
        << "the partition socket was re-steered from another thread";
    cpu_before = sockopt(pfd, SOL_SOCKET, SO_INCOMING_CPU);
    // The child asks for a CPU other than the one the partition is steered to now.
    cpu_set_t child_mask = cpu_before == cpus.front() ? other : cpuset_of({cpus.front()});

    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        int bad = mp_set_cpu_mask(h, &child_mask) == -EPERM ? 0 : 1;
        _exit(bad);
    }
    int status = 0;
    auto dl = deadline_in(5000);
    pid_t w;
    while ((w = waitpid(pid, &status, WNOHANG)) == 0 && ms_until(dl) > 0) sleep_ms(5);
    if (w == 0) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
    }
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "mp_set_cpu_mask in a forked child did not fail with -EPERM (status " << status << ")";
    EXPECT_EQ(sockopt(pfd, SOL_SOCKET, SO_INCOMING_CPU), cpu_before)
        << "the parent's partition socket was re-steered by the forked child";
    EXPECT_EQ(mp_set_cpu_mask(h, &all), 0); // the owner still can
    EXPECT_EQ(mp_unregister(h), 0);
    collect(ch, 20);
}
