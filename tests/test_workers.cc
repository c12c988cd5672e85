// Partitions across workers: forked processes and threads that each register their own CPU on
// one listening address each get the connections whose SYN their CPU handled, with no table
// shared between them (SO_INCOMING_CPU, Linux >= 6.1; cBPF steering, one process only, before).
// Also: workers leaving and coming back, adopted listening sockets (nginx's per-worker
// `listen ... reuseport` sockets, made before fork), a mask of several CPUs, more channels than
// CPUs, an unregistered listener that stops at once, and what happens to connections queued on
// a partition that closes.  On loopback the SYN is handled on the connecting thread's CPU, so a
// client pinned to CPU k must land on the worker of CPU k.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/utsname.h>
#include <sys/wait.h>

#include <sstream>

#include "test_util.h"

namespace {

constexpr int kConns = 50; // connections per client CPU and phase

// The kernel honours SO_INCOMING_CPU in reuseport selection (and the library uses it).
bool steers_by_incoming_cpu() {
    const char *e = getenv("MP_PARTITION_STEER");
    if (e && strcmp(e, "cbpf") == 0) return false;
    struct utsname u;
    unsigned major = 0, minor = 0;
    if (uname(&u) != 0 || sscanf(u.release, "%u.%u", &major, &minor) != 2) return false;
    return major > 6 || (major == 6 && minor >= 1);
}

int tcp_migrate_req() {
    FILE *f = fopen("/proc/sys/net/ipv4/tcp_migrate_req", "r");
    if (!f) return 0;
    int v = 0;
    if (fscanf(f, "%d", &v) != 1) v = 0;
    fclose(f);
    return v;
}

// A listening SO_REUSEPORT socket on 127.0.0.1:port (0: any), as nginx makes one per worker.
int reuseport_listener(uint16_t port, int backlog = 128) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int one = 1;
    sockaddr_in a = mpt::loopback_addr(port);
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
        bind(fd, (sockaddr *)&a, sizeof a) != 0 || listen(fd, backlog) != 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    return fd;
}

// Accept everything queued on a listening socket without blocking (the socket itself may be
// blocking); returns the peer ports.
std::vector<uint16_t> drain_accept(int lfd) {
    std::vector<uint16_t> out;
    for (;;) {
        pollfd p = {lfd, POLLIN, 0};
        if (poll(&p, 1, 0) != 1) break;
        int c = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) break;
        out.push_back(mpt::peer_port(c));
        mpt::close_rst(c);
    }
    return out;
}

// Listening TCP sockets on 127.0.0.1:port in this network namespace (/proc/net/tcp), whoever
// owns them: what the kernel's reuseport group for the address holds.
int listeners_on(uint16_t port) {
    FILE *f = fopen("/proc/net/tcp", "r");
    if (!f) return -1;
    char line[512];
    int n = 0;
    char want[32];
    snprintf(want, sizeof want, "0100007F:%04X", port);
    while (fgets(line, sizeof line, f)) {
        char local[64], remote[64];
        unsigned st = 0;
        if (sscanf(line, " %*d: %63s %63s %x", local, remote, &st) == 3 && st == 0x0A &&
            strcmp(local, want) == 0)
            n++;
    }
    fclose(f);
    return n;
}

// Wait until n sockets listen on port; the time it took (ms), or -1.
int wait_listeners(uint16_t port, int n, int timeout_ms = 3000) {
    int64_t t0 = mpt::now_ms();
    while (listeners_on(port) != n) {
        if (mpt::now_ms() - t0 > timeout_ms) return -1;
        mpt::sleep_ms(1);
    }
    return (int)(mpt::now_ms() - t0);
}

// ---- forked workers ---------------------------------------------------------------------

// What a worker reports to the parent over its pipe (8 bytes: atomic).
enum MsgKind : int32_t { MSG_READY = 1, MSG_ACCEPT, MSG_ACCEPT_ERR, MSG_FAIL, MSG_NO_CHANNEL };
struct Msg {
    int32_t kind, val;
};

struct WorkerSpec {
    int cpu;            // the worker's thread is pinned here and registers mask {cpu}
    int fd;             // mp_listen_socket() template, or a listening socket to adopt
    bool accept = true; // false: register only (connections stay queued on the partition)
};

// The child's whole life: one channel, one partition, accept until told to stop.  Never
// returns (no gtest in here; _exit only).
[[noreturn]] void worker_main(const WorkerSpec &s, int ctrl, int rep) {
    auto say = [rep](int32_t kind, int32_t val) {
        Msg m = {kind, val};
        ssize_t w = write(rep, &m, sizeof m);
        (void)w;
    };
    mpt::pin_self(s.cpu);
    mp_options o = mpt::opts();
    mp_channel *ch = mp_create(&o);
    if (!ch) {
        say(MSG_NO_CHANNEL, errno);
        _exit(0);
    }
    cpu_set_t m = mpt::cpuset_of({s.cpu});
    mp_handle *h = mp_register(ch, s.fd, nullptr, &m);
    if (!h) {
        say(MSG_FAIL, errno);
        mp_destroy(ch);
        _exit(1);
    }
    if (s.accept) {
        int r = mp_accept(h, 0, 0);
        if (r != 0) {
            say(MSG_FAIL, -r);
            mp_destroy(ch);
            _exit(1);
        }
    }
    int pfd = mp_handle_fd(h);
    say(MSG_READY, pfd >= 0 ? mpt::sockopt(pfd, SOL_SOCKET, SO_INCOMING_CPU) : -100);
    int64_t deadline = mpt::now_ms() + 30000; // never outlive a lost parent for long
    while (mpt::now_ms() < deadline) {
        pollfd p = {ctrl, POLLIN, 0};
        if (poll(&p, 1, 0) != 0) break; // a stop byte, or the parent is gone
        mp_event ev;
        int r = mp_dispatch(ch, &ev, 10);
        if (r != 1 || ev.cmd != MP_EV_ACCEPT) continue;
        if (ev.result < 0) {
            say(MSG_ACCEPT_ERR, (int32_t)-ev.result);
            continue;
        }
        int fd = (int)ev.result;
        say(MSG_ACCEPT, mpt::peer_port(fd));
        close(fd);
    }
    mp_destroy(ch);
    _exit(0);
}

// A forked worker process, seen from the parent.  Stopped (and reaped) at destruction: no
// stray processes even when a test fails early.
class Worker {
  public:
    Worker() = default;
    Worker(const Worker &) = delete;
    Worker &operator=(const Worker &) = delete;
    ~Worker() { stop(); }

    // Forks and waits (up to 5 s) for the child's READY.  False if it failed or no channel.
    bool start(const WorkerSpec &s) {
        spec_ = s;
        int c[2], r[2];
        if (pipe2(c, O_CLOEXEC) != 0) return false;
        if (pipe2(r, O_CLOEXEC) != 0) {
            close(c[0]);
            close(c[1]);
            return false;
        }
        fflush(stdout);
        fflush(stderr);
        pid_t parent = getpid();
        pid_ = fork();
        if (pid_ == 0) {
            // Never outlive the test process (a crashed or killed test leaves no worker).
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent) _exit(2);
            close(c[1]);
            close(r[0]);
            worker_main(s, c[0], r[1]);
        }
        close(c[0]);
        close(r[1]);
        if (pid_ < 0) {
            close(c[1]);
            close(r[0]);
            return false;
        }
        ctrl_ = c[1];
        rep_ = r[0];
        int64_t deadline = mpt::now_ms() + 5000;
        while (!ready_ && !fail_ && !no_channel_ && mpt::now_ms() < deadline) collect(50);
        return ready_;
    }

    // Read every report that arrives within wait_ms (0: what is there now).
    void collect(int wait_ms = 0) {
        if (rep_ < 0) return;
        pollfd p = {rep_, POLLIN, 0};
        if (poll(&p, 1, wait_ms) <= 0) return;
        Msg buf[256];
        ssize_t n = read(rep_, buf, sizeof buf);
        if (n <= 0) return;
        for (ssize_t i = 0; i < n / (ssize_t)sizeof(Msg); i++) {
            const Msg &m = buf[i];
            switch (m.kind) {
            case MSG_READY: ready_ = true, incoming_cpu_ = m.val; break;
            case MSG_ACCEPT: ports_.push_back((uint16_t)m.val); break;
            case MSG_ACCEPT_ERR: accept_errors_++; break;
            case MSG_FAIL: fail_ = m.val; break;
            case MSG_NO_CHANNEL: no_channel_ = m.val; break;
            }
        }
    }

    // Ask the child to finish (mp_destroy, _exit), or kill it (SIGKILL: no clean-up at all),
    // and reap it.  True when it exited with status 0 (or was killed as asked).
    bool stop(bool kill_it = false) {
        if (pid_ <= 0) return true;
        if (kill_it) {
            kill(pid_, SIGKILL);
        } else {
            char b = 'q';
            ssize_t w = write(ctrl_, &b, 1);
            (void)w;
        }
        int status = 0;
        pid_t r = 0;
        int64_t deadline = mpt::now_ms() + 5000;
        while ((r = waitpid(pid_, &status, WNOHANG)) == 0 && mpt::now_ms() < deadline) {
            collect(0);
            mpt::sleep_ms(2);
        }
        bool ok;
        if (r == pid_) {
            ok = kill_it ? WIFSIGNALED(status) : (WIFEXITED(status) && WEXITSTATUS(status) == 0);
        } else { // hung: never leave it behind
            kill(pid_, SIGKILL);
            waitpid(pid_, &status, 0);
            ok = false;
        }
        collect(0);
        close(ctrl_);
        close(rep_);
        ctrl_ = rep_ = -1;
        pid_ = -1;
        return ok;
    }

    bool running() const { return pid_ > 0; }
    bool ready() const { return ready_; }
    int fail_errno() const { return fail_; }
    int no_channel() const { return no_channel_; }
    int incoming_cpu() const { return incoming_cpu_; }
    int accept_errors() const { return accept_errors_; }
    size_t accepted() const { return ports_.size(); }
    std::vector<uint16_t> take_ports() {
        std::vector<uint16_t> p;
        p.swap(ports_);
        return p;
    }

  private:
    WorkerSpec spec_{};
    pid_t pid_ = -1;
    int ctrl_ = -1, rep_ = -1;
    bool ready_ = false;
    int fail_ = 0, no_channel_ = 0, incoming_cpu_ = -100, accept_errors_ = 0;
    std::vector<uint16_t> ports_;
};

// ---- phases: clients pinned to CPUs, who accepted what ----------------------------------

// Something that accepts and reports peer ports: a forked Worker or a ChannelThread.
struct Acceptor {
    std::function<void()> poll;            // collect reports (forked workers)
    std::function<size_t()> accepted;      // how many so far
    std::function<std::vector<uint16_t>()> take;
};

Acceptor of(Worker *w) {
    return {[w] { w->collect(5); }, [w] { return w->accepted(); }, [w] { return w->take_ports(); }};
}
Acceptor of(mpt::ChannelThread *t) {
    return {[] { mpt::sleep_ms(5); }, [t] { return t->accepted(); }, [t] { return t->take_ports(); }};
}

struct Phase {
    std::vector<std::pair<int, uint16_t>> clients; // (client cpu, source port)
    std::map<uint16_t, int> owner;                 // source port -> acceptor index
    std::map<int, std::map<int, int>> hist;        // cpu -> acceptor -> count
    int failures = 0, first_errno = 0, lost = 0;
    bool pinned = true;
    std::string text() const {
        std::ostringstream os;
        for (auto &kv : hist) {
            os << " cpu" << kv.first << "->{";
            for (auto &w : kv.second) os << " w" << w.first << ":" << w.second;
            os << " }";
        }
        if (lost) os << " lost:" << lost;
        return os.str();
    }
    int count(int cpu, int w) const {
        auto i = hist.find(cpu);
        if (i == hist.end()) return 0;
        auto j = i->second.find(w);
        return j == i->second.end() ? 0 : j->second;
    }
};

// Clients pinned to each of cpus open n connections each; wait (up to wait_ms) until the
// acceptors have them all; record who took what.  Clients are closed (RST) at the end unless
// keep is given, which then receives the client batches.
Phase run_phase(std::vector<Acceptor> acc, uint16_t port, const std::vector<int> &cpus,
                int n = kConns, int wait_ms = 5000,
                std::vector<std::unique_ptr<mpt::ClientBatch>> *keep = nullptr) {
    Phase ph;
    for (auto &a : acc) {
        a.poll();
        a.take();
    }
    std::vector<std::unique_ptr<mpt::ClientBatch>> batches = mpt::connect_from_cpus(cpus, port, n);
    for (auto &b : batches) {
        ph.failures += b->failures;
        if (!ph.first_errno) ph.first_errno = b->first_errno;
        ph.pinned = ph.pinned && b->pinned;
        for (uint16_t p : b->ports) ph.clients.push_back({b->cpu, p});
    }
    int64_t deadline = mpt::now_ms() + wait_ms;
    for (;;) {
        size_t total = 0;
        for (auto &a : acc) {
            a.poll();
            total += a.accepted();
        }
        if (total >= ph.clients.size() || mpt::now_ms() > deadline) break;
    }
    for (size_t i = 0; i < acc.size(); i++)
        for (uint16_t p : acc[i].take()) ph.owner[p] = (int)i;
    for (auto &c : ph.clients) {
        auto it = ph.owner.find(c.second);
        if (it == ph.owner.end())
            ph.lost++;
        else
            ph.hist[c.first][it->second]++;
    }
    if (keep) keep->swap(batches);
    return ph;
}

// Every connection made from cpus[i] was accepted by acceptor want(cpu), none lost.
void expect_exact(const Phase &ph, const std::vector<int> &cpus,
                  const std::function<int(int)> &want, const char *what) {
    SCOPED_TRACE(std::string(what) + ":" + ph.text());
    ASSERT_TRUE(ph.pinned) << "could not pin a client thread";
    EXPECT_EQ(ph.failures, 0) << "connect failed: " << strerror(ph.first_errno);
    EXPECT_EQ(ph.lost, 0) << "connections never accepted";
    for (int cpu : cpus) EXPECT_EQ(ph.count(cpu, want(cpu)), kConns) << "cpu " << cpu;
}

class Workers : public ::testing::Test {
  protected:
    void SetUp() override {
        cpus_ = mpt::usable_cpus();
        if (cpus_.size() < 2) GTEST_SKIP() << "needs 2 CPUs, have " << cpus_.size();
        a_ = cpus_[0];
        b_ = cpus_[1];
    }
    // Start w, skipping the test if the engine cannot make a channel here.
    void start(Worker &w, const WorkerSpec &s) {
        bool ok = w.start(s);
        if (w.no_channel()) GTEST_SKIP() << "mp_create: " << strerror(w.no_channel());
        ASSERT_TRUE(ok) << "worker on CPU " << s.cpu << " not ready: "
                        << strerror(w.fail_errno());
        if (steers_by_incoming_cpu()) {
            EXPECT_EQ(w.incoming_cpu(), s.cpu) << "SO_INCOMING_CPU of the worker's socket";
        }
    }
    std::vector<int> cpus_;
    int a_ = -1, b_ = -1;
};


int incoming_cpu_of(mpt::ChannelThread *t, mp_handle *h) {
    int fd = t->run([h](mp_channel *) { return mp_handle_fd(h); });
    return fd < 0 ? -100 : mpt::sockopt(fd, SOL_SOCKET, SO_INCOMING_CPU);
}

// Sets an environment variable for the scope (tests run one at a time in the process).
struct EnvGuard {
    std::string name, old;
    bool had;
    EnvGuard(const char *n, const char *v) : name(n) {
        const char *o = getenv(n);
        had = o != nullptr;
        if (had) old = o;
        setenv(n, v, 1);
    }
    ~EnvGuard() {
        if (had)
            setenv(name.c_str(), old.c_str(), 1);
        else
            unsetenv(name.c_str());
    }
};

} // namespace

// nginx's model: two forked workers, each with its own channel, each registering its own CPU
// on one address (the template socket made by the parent before fork).  Nothing is shared
// between them but the kernel's reuseport group.
TEST_F(Workers, ForkedWorkersEachGetTheirCpu) {
    if (!steers_by_incoming_cpu())
        GTEST_SKIP() << "cBPF steering (kernel < 6.1) steers within one process only";
    uint16_t port = 0;
    mpt::Fd lfd(mpt::mp_listen_loopback(&port));
    ASSERT_GE(lfd.get(), 0) << strerror(-lfd.get());
    Worker w0, w1;
    ASSERT_NO_FATAL_FAILURE(start(w0, {a_, lfd.get()}));
    ASSERT_NO_FATAL_FAILURE(start(w1, {b_, lfd.get()}));
    int a = a_;
    Phase ph = run_phase({of(&w0), of(&w1)}, port, {a_, b_});
    expect_exact(ph, {a_, b_}, [a](int c) { return c == a ? 0 : 1; }, "two forked workers");
    EXPECT_EQ(w0.accept_errors() + w1.accept_errors(), 0);
    EXPECT_TRUE(w0.stop());
    EXPECT_TRUE(w1.stop());
}

// The same with two threads of one process, each owning a channel.
TEST_F(Workers, ThreadsEachGetTheirCpu) {
    uint16_t port = 0;
    mpt::Fd lfd(mpt::mp_listen_loopback(&port));
    ASSERT_GE(lfd.get(), 0);
    mpt::ChannelThread t0(a_), t1(b_);
    if (!t0.ok() || !t1.ok()) GTEST_SKIP() << "mp_create: " << strerror(t0.create_errno());
    int err = 0;
    mp_handle *h0 = mpt::listen_on(&t0, lfd.get(), mpt::cpuset_of({a_}), &err);
    ASSERT_NE(h0, nullptr) << strerror(err);
    mp_handle *h1 = mpt::listen_on(&t1, lfd.get(), mpt::cpuset_of({b_}), &err);
    ASSERT_NE(h1, nullptr) << strerror(err);
    if (steers_by_incoming_cpu()) {
        EXPECT_EQ(incoming_cpu_of(&t0, h0), a_);
        EXPECT_EQ(incoming_cpu_of(&t1, h1), b_);
    }
    int a = a_;
    Phase ph = run_phase({of(&t0), of(&t1)}, port, {a_, b_});
    expect_exact(ph, {a_, b_}, [a](int c) { return c == a ? 0 : 1; }, "two threads");
    EXPECT_EQ(t0.accept_errors() + t1.accept_errors(), 0);
}

// The older kernels' mechanism, forced on this one: a cBPF program steers the channels of one
// process, and no SO_INCOMING_CPU is set.
TEST_F(Workers, ThreadsWithCbpfSteering) {
    EnvGuard env("MP_PARTITION_STEER", "cbpf");
    uint16_t port = 0;
    mpt::Fd lfd(mpt::mp_listen_loopback(&port));
    ASSERT_GE(lfd.get(), 0);
    mpt::ChannelThread t0(a_), t1(b_);
    if (!t0.ok() || !t1.ok()) GTEST_SKIP() << "mp_create: " << strerror(t0.create_errno());
    int err = 0;
    mp_handle *h0 = mpt::listen_on(&t0, lfd.get(), mpt::cpuset_of({a_}), &err);
    ASSERT_NE(h0, nullptr) << strerror(err);
    mp_handle *h1 = mpt::listen_on(&t1, lfd.get(), mpt::cpuset_of({b_}), &err);
    ASSERT_NE(h1, nullptr) << strerror(err);
    EXPECT_EQ(incoming_cpu_of(&t0, h0), -1);
    EXPECT_EQ(incoming_cpu_of(&t1, h1), -1);
    int a = a_;
    Phase ph = run_phase({of(&t0), of(&t1)}, port, {a_, b_});
    expect_exact(ph, {a_, b_}, [a](int c) { return c == a ? 0 : 1; }, "cBPF, two threads");
}

// A worker that dies (SIGKILL: no clean-up, nothing to tell anyone) takes its partition with
// it: its CPU's connections go to the remaining worker (no listener prefers that CPU, the
// kernel's hash picks among the members left).  A new worker for that CPU takes them back.
// With io_uring the dead worker's socket outlives the process briefly (the ring's deferred
// teardown still holds the multishot accept's file; about 10 ms here): connections that reach
// it meanwhile are reset with it, as queued ones are.  So the test waits until the kernel has
// closed it.
TEST_F(Workers, WorkerLeavesAndComesBack) {
    if (!steers_by_incoming_cpu())
        GTEST_SKIP() << "cBPF steering (kernel < 6.1) steers within one process only";
    uint16_t port = 0;
    mpt::Fd lfd(mpt::mp_listen_loopback(&port));
    ASSERT_GE(lfd.get(), 0);
    Worker w0, w1, w1b;
    ASSERT_NO_FATAL_FAILURE(start(w0, {a_, lfd.get()}));
    ASSERT_NO_FATAL_FAILURE(start(w1, {b_, lfd.get()}));
    int a = a_;
    Phase ph = run_phase({of(&w0), of(&w1)}, port, {a_, b_});
    expect_exact(ph, {a_, b_}, [a](int c) { return c == a ? 0 : 1; }, "both workers");

    EXPECT_EQ(listeners_on(port), 2);
    EXPECT_TRUE(w1.stop(true));
    int ms = wait_listeners(port, 1);
    ASSERT_GE(ms, 0) << "the dead worker's partition never left the group";
    RecordProperty("dead_partition_gone_ms", ms);
    Phase gone = run_phase({of(&w0)}, port, {a_, b_});
    expect_exact(gone, {a_, b_}, [](int) { return 0; }, "worker 1 gone: all to worker 0");

    ASSERT_NO_FATAL_FAILURE(start(w1b, {b_, lfd.get()}));
    Phase back = run_phase({of(&w0), of(&w1b)}, port, {a_, b_});
    expect_exact(back, {a_, b_}, [a](int c) { return c == a ? 0 : 1; }, "worker 1 back");
    EXPECT_EQ(w0.accept_errors() + w1b.accept_errors(), 0);
}

// nginx's `listen ... reuseport`: the parent makes one listening socket per worker (bound and
// listening before fork); each forked worker adopts its own: steered in place, no socket made.
// Workers leave the sockets open and listening in the parent, with the CPU preference they
// set (the application owns the sockets: a respawned worker sets it again).
TEST_F(Workers, ForkedWorkersAdoptInheritedSockets) {
    if (!steers_by_incoming_cpu())
        GTEST_SKIP() << "adopted sockets are steered on kernels >= 6.1 only";
    mpt::Fd s0(reuseport_listener(0));
    ASSERT_GE(s0.get(), 0) << strerror(-s0.get());
    uint16_t port = mpt::local_port(s0.get());
    mpt::Fd s1(reuseport_listener(port));
    ASSERT_GE(s1.get(), 0) << strerror(-s1.get());
    Worker w0, w1;
    ASSERT_NO_FATAL_FAILURE(start(w0, {a_, s0.get()}));
    ASSERT_NO_FATAL_FAILURE(start(w1, {b_, s1.get()}));
    // The preference is on the shared socket itself: the parent sees it.
    EXPECT_EQ(mpt::sockopt(s0.get(), SOL_SOCKET, SO_INCOMING_CPU), a_);
    EXPECT_EQ(mpt::sockopt(s1.get(), SOL_SOCKET, SO_INCOMING_CPU), b_);
    int a = a_;
    Phase ph = run_phase({of(&w0), of(&w1)}, port, {a_, b_});
    expect_exact(ph, {a_, b_}, [a](int c) { return c == a ? 0 : 1; }, "adopted sockets");
    EXPECT_TRUE(w0.stop());
    EXPECT_TRUE(w1.stop());

    for (int fd : {s0.get(), s1.get()}) {
        SCOPED_TRACE(fd);
        EXPECT_TRUE(mpt::fd_valid(fd));
        EXPECT_EQ(mpt::sockopt(fd, SOL_SOCKET, SO_ACCEPTCONN), 1) << "adopted socket shut down";
    }
    EXPECT_EQ(mpt::sockopt(s0.get(), SOL_SOCKET, SO_INCOMING_CPU), a_);
    EXPECT_EQ(mpt::sockopt(s1.get(), SOL_SOCKET, SO_INCOMING_CPU), b_);
    // Still working for its owner: a connection lands on one of them.
    mpt::Fd c(mpt::connect_loopback(port));
    ASSERT_GE(c.get(), 0);
    mpt::sleep_ms(20);
    EXPECT_EQ(drain_accept(s0.get()).size() + drain_accept(s1.get()).size(), 1u);
}

// An adopting worker leaves (cleanly) and a new one adopts the same inherited socket: the
// socket is never closed or shut down, so nothing queued on it is lost.  While its worker is
// away the socket keeps its CPU preference: CPU b's connections wait in its queue (none goes
// to worker 0) and the new worker accepts them all.  (nginx's model: a worker's socket outlives
// the worker, held by the master.)
TEST_F(Workers, AdoptingWorkerLeavesAndComesBack) {
    if (!steers_by_incoming_cpu())
        GTEST_SKIP() << "adopted sockets are steered on kernels >= 6.1 only";
    mpt::Fd s0(reuseport_listener(0, 1024));
    ASSERT_GE(s0.get(), 0);
    uint16_t port = mpt::local_port(s0.get());
    mpt::Fd s1(reuseport_listener(port, 1024));
    ASSERT_GE(s1.get(), 0);
    Worker w0, w1, w1b;
    ASSERT_NO_FATAL_FAILURE(start(w0, {a_, s0.get()}));
    ASSERT_NO_FATAL_FAILURE(start(w1, {b_, s1.get()}));
    int a = a_;
    Phase ph = run_phase({of(&w0), of(&w1)}, port, {a_, b_});
    expect_exact(ph, {a_, b_}, [a](int c) { return c == a ? 0 : 1; }, "both adopted");

    EXPECT_TRUE(w1.stop());
    EXPECT_EQ(mpt::sockopt(s1.get(), SOL_SOCKET, SO_INCOMING_CPU), b_);
    EXPECT_EQ(mpt::sockopt(s1.get(), SOL_SOCKET, SO_ACCEPTCONN), 1);
    // Worker 1 away: connect, let worker 0 take what reaches it, then bring worker 1 back.
    std::vector<std::unique_ptr<mpt::ClientBatch>> held;
    Phase away = run_phase({of(&w0)}, port, {a_, b_}, kConns, 300, &held);
    EXPECT_EQ(away.failures, 0);
    EXPECT_EQ(away.count(a_, 0), kConns) << "CPU a still belongs to worker 0;" << away.text();
    int queued = away.lost; // on the orphaned socket, nobody accepting
    EXPECT_EQ(away.count(b_, 0), 0) << "CPU b's socket still prefers b;" << away.text();
    EXPECT_EQ(queued, kConns) << away.text();

    // Those waiting were not reset when their worker left: open and quiet.
    std::set<uint16_t> waiting;
    for (auto &c : away.clients)
        if (!away.owner.count(c.second)) waiting.insert(c.second);
    int reset = 0;
    for (auto &b : held)
        for (int fd : b->fds) {
            if (!waiting.count(mpt::local_port(fd))) continue;
            char x;
            if (recv(fd, &x, 1, MSG_DONTWAIT) == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
                reset++;
        }
    EXPECT_EQ(reset, 0);

    ASSERT_NO_FATAL_FAILURE(start(w1b, {b_, s1.get()}));
    int64_t deadline = mpt::now_ms() + 5000;
    while ((int)w1b.accepted() < queued && mpt::now_ms() < deadline) w1b.collect(5);
    std::vector<uint16_t> late = w1b.take_ports();
    EXPECT_EQ((int)late.size(), queued) << "connections queued while the worker was away";
    for (uint16_t p : late) EXPECT_TRUE(waiting.count(p)) << "unexpected connection " << p;
    held.clear();

    Phase back = run_phase({of(&w0), of(&w1b)}, port, {a_, b_});
    expect_exact(back, {a_, b_}, [a](int c) { return c == a ? 0 : 1; }, "worker 1 back");
}

// Connections already queued on a partition that closes are reset (net.ipv4.tcp_migrate_req
// is 0 by default; with 1 the kernel moves them to another member of the group).  Worker 1
// registers without accepting; its CPU's connections wait in its queue; then it leaves.
TEST_F(Workers, QueuedConnectionsOfAClosingPartition) {
    if (!steers_by_incoming_cpu())
        GTEST_SKIP() << "cBPF steering (kernel < 6.1) steers within one process only";
    uint16_t port = 0;
    mpt::Fd lfd(mpt::mp_listen_loopback(&port));
    ASSERT_GE(lfd.get(), 0);
    Worker w0, w1;
    ASSERT_NO_FATAL_FAILURE(start(w0, {a_, lfd.get()}));
    WorkerSpec hold = {b_, lfd.get(), false};
    ASSERT_NO_FATAL_FAILURE(start(w1, hold));
    std::vector<std::unique_ptr<mpt::ClientBatch>> held;
    Phase ph = run_phase({of(&w0), of(&w1)}, port, {b_}, 10, 300, &held);
    ASSERT_TRUE(ph.pinned);
    ASSERT_EQ(ph.failures, 0);
    EXPECT_EQ(ph.lost, 10) << "worker 1 does not accept: its connections wait in its queue;"
                           << ph.text();
    EXPECT_TRUE(w1.stop()); // mp_destroy: the partition is shut down and closed

    int reset = 0, eof = 0, quiet = 0;
    for (auto &b : held)
        for (int fd : b->fds) {
            char x;
            ssize_t r = mpt::recv_some(fd, &x, 1, 1000);
            if (r == -ECONNRESET)
                reset++;
            else if (r == 0)
                eof++;
            else
                quiet++;
        }
    if (tcp_migrate_req() == 0) {
        EXPECT_EQ(reset, 10) << "eof " << eof << ", still open " << quiet;
    } else {
        // Migrated to worker 0's partition and accepted (then closed) there.
        w0.collect(100);
        EXPECT_EQ(w0.accepted(), 10u);
    }
}

// The same from mp_unregister() in one process, on a channel's own thread.
TEST_F(Workers, QueuedConnectionsOfAnUnregisteredPartition) {
    uint16_t port = 0;
    mpt::Fd lfd(mpt::mp_listen_loopback(&port));
    ASSERT_GE(lfd.get(), 0);
    mpt::ChannelThread t0(a_), t1(b_);
    if (!t0.ok() || !t1.ok()) GTEST_SKIP() << "mp_create: " << strerror(t0.create_errno());
    int err = 0;
    mp_handle *h0 = mpt::listen_on(&t0, lfd.get(), mpt::cpuset_of({a_}), &err);
    ASSERT_NE(h0, nullptr) << strerror(err);
    cpu_set_t mb = mpt::cpuset_of({b_});
    int fd = lfd.get();
    mp_handle *h1 = t1.run([fd, mb](mp_channel *ch) { return mp_register(ch, fd, nullptr, &mb); });
    ASSERT_NE(h1, nullptr);
    std::vector<std::unique_ptr<mpt::ClientBatch>> held;
    Phase ph = run_phase({of(&t0), of(&t1)}, port, {b_}, 10, 300, &held);
    ASSERT_TRUE(ph.pinned);
    EXPECT_EQ(ph.lost, 10) << ph.text();
    EXPECT_EQ(t1.run([h1](mp_channel *) { return mp_unregister(h1); }), 0);
    int reset = 0;
    for (auto &b : held)
        for (int c : b->fds) {
            char x;
            if (mpt::recv_some(c, &x, 1, 1000) == -ECONNRESET) reset++;
        }
    if (tcp_migrate_req() == 0) {
        EXPECT_EQ(reset, 10);
    }
    // New connections from CPU b now go to the one partition left.
    int a = a_;
    (void)a;
    Phase after = run_phase({of(&t0), of(&t1)}, port, {a_, b_});
    expect_exact(after, {a_, b_}, [](int) { return 0; }, "after unregistering worker 1");
}

// More channels than CPUs (memcached -t 4 on 2 CPUs): each CPU's connections go only to the
// channels of that CPU, and the kernel's hash shares them among those (with SO_INCOMING_CPU;
// cBPF sends each CPU to the first member holding it).
TEST_F(Workers, MoreChannelsThanCpus) {
    uint16_t port = 0;
    mpt::Fd lfd(mpt::mp_listen_loopback(&port));
    ASSERT_GE(lfd.get(), 0);
    std::vector<std::unique_ptr<mpt::ChannelThread>> ts;
    std::vector<int> cpu_of;
    for (int i = 0; i < 4; i++) {
        int cpu = i % 2 ? b_ : a_;
        ts.emplace_back(new mpt::ChannelThread(cpu));
        if (!ts.back()->ok()) GTEST_SKIP() << "mp_create: " << strerror(ts.back()->create_errno());
        int err = 0;
        ASSERT_NE(mpt::listen_on(ts.back().get(), lfd.get(), mpt::cpuset_of({cpu}), &err), nullptr)
            << strerror(err);
        cpu_of.push_back(cpu);
    }
    std::vector<Acceptor> acc;
    for (auto &t : ts) acc.push_back(of(t.get()));
    Phase ph = run_phase(acc, port, {a_, b_}, 2 * kConns);
    SCOPED_TRACE(ph.text());
    ASSERT_TRUE(ph.pinned);
    EXPECT_EQ(ph.failures, 0);
    EXPECT_EQ(ph.lost, 0);
    for (int cpu : {a_, b_}) {
        int own = 0;
        for (int i = 0; i < 4; i++) {
            if (cpu_of[i] == cpu) {
                own += ph.count(cpu, i);
                if (steers_by_incoming_cpu()) {
                    EXPECT_GT(ph.count(cpu, i), 0) << "channel " << i << " got none of its CPU";
                }
            }
        }
        EXPECT_EQ(own, 2 * kConns) << "cpu " << cpu << " reached another CPU's channel";
    }
}

// A mask of several CPUs: SO_INCOMING_CPU takes one, the lowest CPU of the mask the channel's
// thread may run on (its own CPU when pinned), else the mask's lowest.  {a} + {a,b} (thread on
// b): CPU a goes to the {a} channel, CPU b to the {a,b} one (with cBPF too: first member
// holding the CPU).
TEST_F(Workers, SeveralCpusInAMask) {
    uint16_t port = 0;
    mpt::Fd lfd(mpt::mp_listen_loopback(&port));
    ASSERT_GE(lfd.get(), 0);
    mpt::ChannelThread t0(a_), t1(b_), tu(-1);
    if (!t0.ok() || !t1.ok() || !tu.ok()) GTEST_SKIP() << "mp_create failed";
    int err = 0;
    mp_handle *h0 = mpt::listen_on(&t0, lfd.get(), mpt::cpuset_of({a_}), &err);
    ASSERT_NE(h0, nullptr) << strerror(err);
    mp_handle *h1 = mpt::listen_on(&t1, lfd.get(), mpt::cpuset_of({a_, b_}), &err);
    ASSERT_NE(h1, nullptr) << strerror(err);
    if (steers_by_incoming_cpu()) {
        EXPECT_EQ(incoming_cpu_of(&t1, h1), b_) << "pinned to b: prefers b";
        // An unpinned thread: the mask's lowest CPU.  Checked on a socket of another address.
        uint16_t p2 = 0;
        mpt::Fd l2(mpt::mp_listen_loopback(&p2));
        ASSERT_GE(l2.get(), 0);
        cpu_set_t m = mpt::cpuset_of({b_, a_});
        int lf = l2.get();
        int got = tu.run([lf, m](mp_channel *ch) {
            mp_handle *h = mp_register(ch, lf, nullptr, &m);
            if (!h) return -100;
            int v = mpt::sockopt(mp_handle_fd(h), SOL_SOCKET, SO_INCOMING_CPU);
            mp_unregister(h);
            return v;
        });
        EXPECT_EQ(got, std::min(a_, b_));
    }
    int a = a_;
    Phase ph = run_phase({of(&t0), of(&t1)}, port, {a_, b_});
    expect_exact(ph, {a_, b_}, [a](int c) { return c == a ? 0 : 1; }, "{a} and {a,b}@b");

    // Re-masked at run time: the preference follows (the {a,b} channel now asks for {a}).
    cpu_set_t ma = mpt::cpuset_of({a_}), mb = mpt::cpuset_of({b_});
    EXPECT_EQ(t0.run([h0, mb](mp_channel *) { return mp_set_cpu_mask(h0, &mb); }), 0);
    EXPECT_EQ(t1.run([h1, ma](mp_channel *) { return mp_set_cpu_mask(h1, &ma); }), 0);
    Phase sw = run_phase({of(&t0), of(&t1)}, port, {a_, b_});
    expect_exact(sw, {a_, b_}, [a](int c) { return c == a ? 1 : 0; }, "masks swapped");
}

// An unregistered listener takes no connection after mp_unregister() returns, though its
// thread never enters the kernel again: an adopted socket (not shut down: the application
// owns it) keeps its connections queued for its owner, and another channel accepting from the
// same socket is woken for every one of them (a cancelled accept left armed would take the
// wake-ups); a partition leaves the group at once, so connections go to the other member.
TEST_F(Workers, UnregisteredListenerStopsAtOnce) {
    mpt::Channel ch(mp_create(nullptr));
    if (!ch.get()) GTEST_SKIP() << "mp_create: " << strerror(errno);
    cpu_set_t ma = mpt::cpuset_of({a_});

    // An adopted socket.
    mpt::Fd s(reuseport_listener(0));
    ASSERT_GE(s.get(), 0);
    uint16_t port = mpt::local_port(s.get());
    mp_handle *h = mp_register(ch, s.get(), nullptr, &ma);
    ASSERT_NE(h, nullptr) << strerror(errno);
    EXPECT_EQ(mp_handle_fd(h), s.get()) << "adopted: no socket of its own";
    ASSERT_EQ(mp_accept(h, 0, 0), 0);
    mpt::Fd first(mpt::connect_loopback(port));
    ASSERT_GE(first.get(), 0);
    mp_event ev;
    ASSERT_TRUE(mpt::wait_cmd(ch, &ev, MP_EV_ACCEPT, h)) << "the accept is armed";
    ASSERT_GE(ev.result, 0);
    close((int)ev.result);
    ASSERT_EQ(mp_unregister(h), 0);
    std::vector<mpt::Fd> cl;
    for (int i = 0; i < 5; i++) {
        cl.emplace_back(mpt::connect_loopback(port));
        ASSERT_GE(cl.back().get(), 0);
    }
    mpt::sleep_ms(50);
    EXPECT_EQ(drain_accept(s.get()).size(), 5u)
        << "the unregistered channel took connections from the application's socket";
    EXPECT_EQ(mpt::sockopt(s.get(), SOL_SOCKET, SO_ACCEPTCONN), 1);

    // Another channel (a worker) shares the socket: it must be woken for each connection.
    {
        mpt::ChannelThread t(-1);
        ASSERT_TRUE(t.ok());
        int sfd = s.get();
        mp_handle *ht = t.run([sfd](mp_channel *c) {
            mp_handle *x = mp_register(c, sfd, nullptr, nullptr);
            if (x && mp_accept(x, 0, 0) != 0) x = nullptr;
            return x;
        });
        ASSERT_NE(ht, nullptr);
        // One at a time: a stolen wake-up is not covered by a later connection's.
        cl.clear();
        for (size_t i = 1; i <= 3; i++) {
            cl.emplace_back(mpt::connect_loopback(port));
            ASSERT_GE(cl.back().get(), 0);
            int64_t deadline = mpt::now_ms() + 1000;
            while (t.accepted() < i && mpt::now_ms() < deadline) mpt::sleep_ms(2);
            ASSERT_EQ(t.accepted(), i) << "the other channel was not woken for connection " << i;
        }
        EXPECT_EQ(drain_accept(s.get()).size(), 0u);
    }

    // A partition, next to an application's listener on the same address.
    uint16_t p2 = 0;
    mpt::Fd tmpl(mpt::mp_listen_loopback(&p2));
    ASSERT_GE(tmpl.get(), 0);
    mpt::Fd other(reuseport_listener(p2));
    ASSERT_GE(other.get(), 0);
    mp_handle *hp = mp_register(ch, tmpl.get(), nullptr, &ma);
    ASSERT_NE(hp, nullptr) << strerror(errno);
    ASSERT_EQ(mp_accept(hp, 0, 0), 0);
    while (mp_dispatch(ch, &ev, 0) == 1) { // the accept goes to the kernel
    }
    ASSERT_EQ(mp_unregister(hp), 0);
    cl.clear();
    for (int i = 0; i < 5; i++) {
        cl.emplace_back(mpt::connect_loopback(p2));
        ASSERT_GE(cl.back().get(), 0);
    }
    mpt::sleep_ms(50);
    EXPECT_EQ(drain_accept(other.get()).size(), 5u) << "the closed partition took connections";
    cl.clear();
    ch.reset();
}

// Adoption needs SO_REUSEPORT (a lone socket cannot be steered) and makes no socket; an
// adopted socket survives mp_unregister() and mp_destroy() as it is: the application owns it.
TEST_F(Workers, AdoptRules) {
    mpt::Channel ch(mp_create(nullptr));
    if (!ch.get()) GTEST_SKIP() << "mp_create: " << strerror(errno);
    cpu_set_t ma = mpt::cpuset_of({a_});
    mpt::Fd plain(mpt::make_listener()); // listening, no SO_REUSEPORT
    ASSERT_GE(plain.get(), 0);
    errno = 0;
    EXPECT_EQ(mp_register(ch, plain.get(), nullptr, &ma), nullptr);
    EXPECT_EQ(errno, EINVAL);

    mpt::Fd s(reuseport_listener(0));
    ASSERT_GE(s.get(), 0);
    int before = mpt::count_fds();
    mp_handle *h = mp_register(ch, s.get(), nullptr, &ma);
    ASSERT_NE(h, nullptr) << strerror(errno);
    EXPECT_EQ(mpt::count_fds(), before) << "adopting must not make a socket";
    if (steers_by_incoming_cpu()) {
        EXPECT_EQ(mpt::sockopt(s.get(), SOL_SOCKET, SO_INCOMING_CPU), a_);
    }
    cpu_set_t mb = mpt::cpuset_of({b_});
    EXPECT_EQ(mp_set_cpu_mask(h, &mb), 0);
    if (steers_by_incoming_cpu()) {
        EXPECT_EQ(mpt::sockopt(s.get(), SOL_SOCKET, SO_INCOMING_CPU), b_);
    }
    // Left as it is: open, listening, and its preference kept (the application's socket).
    bool steers = steers_by_incoming_cpu();
    EXPECT_EQ(mp_unregister(h), 0);
    EXPECT_TRUE(mpt::fd_valid(s.get()));
    EXPECT_EQ(mpt::sockopt(s.get(), SOL_SOCKET, SO_ACCEPTCONN), 1);
    EXPECT_EQ(mpt::sockopt(s.get(), SOL_SOCKET, SO_INCOMING_CPU), steers ? b_ : -1);

    // Adopted again, then the channel is destroyed with it registered.
    ASSERT_NE(mp_register(ch, s.get(), nullptr, &ma), nullptr);
    ch.reset();
    EXPECT_TRUE(mpt::fd_valid(s.get()));
    EXPECT_EQ(mpt::sockopt(s.get(), SOL_SOCKET, SO_ACCEPTCONN), 1);
    EXPECT_EQ(mpt::sockopt(s.get(), SOL_SOCKET, SO_INCOMING_CPU), steers ? a_ : -1);
    mpt::Fd c(mpt::connect_loopback(mpt::local_port(s.get())));
    ASSERT_GE(c.get(), 0);
    mpt::sleep_ms(20);
    EXPECT_EQ(drain_accept(s.get()).size(), 1u);
}

namespace {

// Channels sharing one unpartitioned accept queue (cpu_mask NULL, the paper's baseline and
// MP_PARTITION=0) share its connections, about as epoll's workers do, instead of the first
// channel taking them all (a multishot accept keeps its place at the head of the socket's
// exclusive wait queue).
TEST(SharedQueue, TwoChannelsShareOneQueue) {
    mpt::Fd lfd(mpt::make_listener(4096));
    ASSERT_TRUE(lfd.ok());
    const uint16_t port = mpt::local_port(lfd.get());
    mpt::ChannelThread t0, t1;
    ASSERT_TRUE(t0.ok() && t1.ok());
    auto listen = [&](mpt::ChannelThread &t) {
        return t.run([&](mp_channel *ch) -> int {
            mp_handle *h = mp_register(ch, lfd.get(), nullptr, nullptr);
            if (!h) return -errno;
            return mp_accept(h, 0, 0);
        });
    };
    ASSERT_EQ(listen(t0), 0);
    ASSERT_EQ(listen(t1), 0);
    const int N = 400;
    std::vector<mpt::Fd> clients;
    for (int i = 0; i < N; i++) {
        clients.emplace_back(mpt::connect_client(port));
        ASSERT_TRUE(clients.back().ok());
        if (i % 20 == 19) mpt::sleep_ms(2); // a stream, not one burst
    }
    int64_t until = mpt::now_ms() + 5000;
    while ((int)(t0.accepted() + t1.accepted()) < N && mpt::now_ms() < until) mpt::sleep_ms(5);
    size_t a = t0.accepted(), b = t1.accepted();
    std::printf("[ shared   ] %s: %zu / %zu of %d\n", t0.engine().c_str(), a, b, N);
    EXPECT_EQ((int)(a + b), N);
    EXPECT_GE(std::min(a, b), (size_t)N / 10) << "one channel took (almost) every connection";
}

} // namespace
