// Partitioned listening sockets: one SO_REUSEPORT socket per channel, steered by the CPU that
// handles the SYN.  On loopback the SYN is processed on the CPU of the connecting thread, so a
// client pinned to CPU k must be accepted by the channel whose cpu_mask holds k.
#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>

#include "megapipe.h"
#include "test_util.h"

namespace {

constexpr int kConns = 100;     // connections per client CPU and phase
constexpr int kAcceptWaitMs = 20000;

struct Phase {
    std::map<uint16_t, int> owner;                 // client source port -> worker index
    std::vector<std::pair<int, uint16_t>> clients; // (client cpu, source port)
    int connect_failures = 0;
    int first_errno = 0;
    bool clients_pinned = true;
    size_t expected = 0, accepted = 0;
};

// Clients pinned to each of cpus open n connections each (concurrently); wait until the
// workers have accepted them all; record who accepted what; close the clients.
Phase run_phase(const std::vector<mpt::ChannelThread *> &workers, uint16_t port,
                const std::vector<int> &cpus, int n = kConns) {
    Phase ph;
    for (auto *w : workers) w->take_ports(); // nothing should be left; start clean
    std::vector<std::unique_ptr<mpt::ClientBatch>> batches = mpt::connect_from_cpus(cpus, port, n);
    for (auto &b : batches) {
        ph.connect_failures += b->failures;
        if (!ph.first_errno) ph.first_errno = b->first_errno;
        ph.clients_pinned = ph.clients_pinned && b->pinned;
        for (uint16_t p : b->ports) ph.clients.push_back({b->cpu, p});
    }
    ph.expected = ph.clients.size();
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kAcceptWaitMs);
    for (;;) {
        size_t total = 0;
        for (auto *w : workers) total += w->accepted();
        ph.accepted = total;
        if (total >= ph.expected || std::chrono::steady_clock::now() > deadline) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    for (size_t i = 0; i < workers.size(); i++)
        for (uint16_t p : workers[i]->take_ports()) ph.owner[p] = (int)i;
    batches.clear(); // closes the client sockets (RST)
    return ph;
}

// allowed(cpu) = the worker indexes that may accept a connection whose SYN ran on cpu.
void expect_steered(const Phase &ph, const std::function<std::set<int>(int)> &allowed,
                    const char *what) {
    SCOPED_TRACE(what);
    ASSERT_TRUE(ph.clients_pinned) << "could not pin a client thread";
    EXPECT_EQ(ph.connect_failures, 0) << "connections refused/failed, first errno "
                                      << ph.first_errno << " (" << strerror(ph.first_errno) << ")";
    EXPECT_GT(ph.expected, 0u) << "no client connection was made";
    EXPECT_EQ(ph.accepted, ph.expected) << "connections never accepted (lost)";
    std::map<int, std::map<int, int>> hist; // cpu -> worker -> count
    int wrong = 0, missing = 0;
    for (auto &c : ph.clients) {
        auto it = ph.owner.find(c.second);
        if (it == ph.owner.end()) {
            missing++;
            continue;
        }
        hist[c.first][it->second]++;
        if (!allowed(c.first).count(it->second)) wrong++;
    }
    std::ostringstream os;
    for (auto &kv : hist) {
        os << " cpu" << kv.first << "->{";
        for (auto &w : kv.second) os << " ch" << w.first << ":" << w.second;
        os << " }";
    }
    EXPECT_EQ(missing, 0) << "accepted connections not matched to a client port;" << os.str();
    EXPECT_EQ(wrong, 0) << "connections accepted by a channel whose mask lacks the SYN's CPU;"
                        << os.str();
}

class Partition : public ::testing::Test {
  protected:
    void SetUp() override {
        cpus_ = mpt::usable_cpus();
        if (cpus_.size() >= 2) {
            a_ = cpus_[0];
            b_ = cpus_[1];
        }
        lfd_ = mpt::mp_listen_loopback(&port_);
        ASSERT_GE(lfd_, 0) << strerror(-lfd_);
    }
    void TearDown() override {
        workers_.clear(); // stops the threads, destroys the channels
        if (lfd_ >= 0) close(lfd_);
    }

    mpt::ChannelThread *add_worker(int cpu, const mp_options *opt = nullptr) {
        workers_.emplace_back(new mpt::ChannelThread(cpu, opt));
        return workers_.back().get();
    }

    std::vector<mpt::ChannelThread *> workers() {
        std::vector<mpt::ChannelThread *> w;
        for (auto &p : workers_) w.push_back(p.get());
        return w;
    }

    // Register the listening address on w with mask and accept forever (regular fds).
    mp_handle *listen_on(mpt::ChannelThread *w, const cpu_set_t &mask) {
        return mpt::listen_on(w, lfd_, mask, &last_err_);
    }

    // Three workers pinned to pin[i], each listening with masks[i].
    void start_three(const std::vector<cpu_set_t> &masks, const std::vector<int> &pin,
                     mpt::ChannelThread **w, mp_handle **h) {
        for (int i = 0; i < 3; i++) {
            w[i] = add_worker(pin[i]);
            ASSERT_TRUE(w[i]->ok());
            h[i] = listen_on(w[i], masks[i]);
            ASSERT_NE(h[i], nullptr) << "partition " << i << ": " << strerror(last_err_);
        }
    }

    std::vector<int> cpus_;
    int a_ = -1, b_ = -1;
    int lfd_ = -1;
    uint16_t port_ = 0;
    int last_err_ = 0; // errno of the last failed listen_on()
    std::vector<std::unique_ptr<mpt::ChannelThread>> workers_;
};

} // namespace

#define NEED_TWO_CPUS()                                                                        \
    do {                                                                                       \
        if (cpus_.size() < 2) GTEST_SKIP() << "needs 2 CPUs, have " << cpus_.size();           \
    } while (0)

// Needs no second CPU.
TEST_F(Partition, ListenSocketIsBoundReusePortNotListening) {
    int fd = lfd_;
    uint16_t port = port_;
    EXPECT_NE(port, 0) << "port 0 not resolved at bind";
    sockaddr_in a;
    socklen_t l = sizeof a;
    ASSERT_EQ(getsockname(fd, (sockaddr *)&a, &l), 0);
    EXPECT_EQ(a.sin_family, AF_INET);
    EXPECT_EQ(ntohl(a.sin_addr.s_addr), INADDR_LOOPBACK);
    EXPECT_EQ(mpt::sockopt(fd, SOL_SOCKET, SO_TYPE), SOCK_STREAM);
    EXPECT_EQ(mpt::sockopt(fd, SOL_SOCKET, SO_REUSEPORT), 1);
    EXPECT_EQ(mpt::sockopt(fd, SOL_SOCKET, SO_ACCEPTCONN), 0) << "must not be listening yet";
    EXPECT_TRUE(fcntl(fd, F_GETFD) & FD_CLOEXEC);
    // Not listening: a connection is refused.
    int c = mpt::connect_loopback(port);
    EXPECT_EQ(c, -ECONNREFUSED);
    if (c >= 0) close(c);
}

TEST_F(Partition, ConnectionsFollowTheSynCpu) {
    NEED_TWO_CPUS();
    mpt::ChannelThread *w0 = add_worker(a_), *w1 = add_worker(b_);
    ASSERT_TRUE(w0->ok() && w1->ok()) << "mp_create: " << strerror(w0->create_errno());
    RecordProperty("engine", w0->engine());
    mp_handle *h0 = listen_on(w0, mpt::cpuset_of({a_}));
    mp_handle *h1 = listen_on(w1, mpt::cpuset_of({b_}));
    ASSERT_NE(h0, nullptr) << strerror(last_err_);
    ASSERT_NE(h1, nullptr) << strerror(last_err_);

    // Each channel has its own listening partition socket; the template stays unlistened.
    int f0 = w0->run([h0](mp_channel *) { return mp_handle_fd(h0); });
    int f1 = w1->run([h1](mp_channel *) { return mp_handle_fd(h1); });
    EXPECT_GE(f0, 0);
    EXPECT_GE(f1, 0);
    EXPECT_NE(f0, lfd_);
    EXPECT_NE(f1, lfd_);
    EXPECT_NE(f0, f1);
    EXPECT_EQ(mpt::sockopt(f0, SOL_SOCKET, SO_ACCEPTCONN), 1);
    EXPECT_EQ(mpt::sockopt(f1, SOL_SOCKET, SO_ACCEPTCONN), 1);
    EXPECT_EQ(mpt::sockopt(f0, SOL_SOCKET, SO_REUSEPORT), 1);
    EXPECT_EQ(mpt::local_port(f0), port_);
    EXPECT_EQ(mpt::local_port(f1), port_);
    EXPECT_EQ(mpt::sockopt(lfd_, SOL_SOCKET, SO_ACCEPTCONN), 0);

    int a = a_, b = b_;
    Phase ph = run_phase(workers(), port_, {a_, b_});
    expect_steered(ph, [a, b](int cpu) { return cpu == a ? std::set<int>{0} : std::set<int>{1}; },
                   "masks {a} {b}");
    EXPECT_EQ(w0->accept_errors() + w1->accept_errors(), 0);
    EXPECT_EQ(w0->dispatch_errors() + w1->dispatch_errors(), 0);
}

TEST_F(Partition, ClosingAPartitionFallsBackWithoutLoss) {
    NEED_TWO_CPUS();
    mpt::ChannelThread *w0 = add_worker(a_), *w1 = add_worker(b_);
    ASSERT_TRUE(w0->ok() && w1->ok());
    mp_handle *h0 = listen_on(w0, mpt::cpuset_of({a_}));
    mp_handle *h1 = listen_on(w1, mpt::cpuset_of({b_}));
    ASSERT_NE(h0, nullptr) << strerror(last_err_);
    ASSERT_NE(h1, nullptr) << strerror(last_err_);
    int a = a_;
    Phase ph = run_phase(workers(), port_, {a_, b_});
    expect_steered(ph, [a](int cpu) { return cpu == a ? std::set<int>{0} : std::set<int>{1}; },
                   "before close");

    EXPECT_EQ(w1->run([h1](mp_channel *) { return mp_unregister(h1); }), 0);

    // CPU b is in nobody's mask now: the kernel's hash picks the one remaining member.
    Phase ph2 = run_phase(workers(), port_, {a_, b_});
    expect_steered(ph2, [](int) { return std::set<int>{0}; }, "after closing channel 1");
    EXPECT_EQ(w0->accept_errors() + w1->accept_errors(), 0);
    (void)h0;
}

// Three partitions with the given masks; close member close_idx; connections from every CPU
// must land on a live channel whose mask holds that CPU (any live channel if none does).
static void three_partitions(Partition *t, mpt::ChannelThread **w, mp_handle **h,
                             const std::vector<cpu_set_t> &masks, int close_idx, int port,
                             const std::vector<int> &cpus) {
    std::vector<mpt::ChannelThread *> ws(w, w + 3);
    auto allowed_fn = [&](std::vector<bool> alive) {
        return [masks, alive](int cpu) {
            std::set<int> s, any;
            for (int i = 0; i < 3; i++) {
                if (!alive[i]) continue;
                any.insert(i);
                if (CPU_ISSET(cpu, &masks[i])) s.insert(i);
            }
            return s.empty() ? any : s;
        };
    };
    Phase ph = run_phase(ws, (uint16_t)port, cpus);
    expect_steered(ph, allowed_fn({true, true, true}), "all three partitions");
    mp_handle *hc = h[close_idx];
    EXPECT_EQ(w[close_idx]->run([hc](mp_channel *) { return mp_unregister(hc); }), 0);
    std::vector<bool> alive = {true, true, true};
    alive[close_idx] = false;
    Phase ph2 = run_phase(ws, (uint16_t)port, cpus);
    expect_steered(ph2, allowed_fn(alive), "after closing one partition");
    for (auto *x : ws) EXPECT_EQ(x->accept_errors(), 0);
    (void)t;
}

// Masks {a} {a} {b}; closing the first makes the kernel move member 2 ({b}) into slot 0.
// A program not rebuilt would send CPU a to slot 0 (now the {b} channel) and CPU b to a slot
// that no longer exists; a rebuilt program with a wrongly mirrored order sends both wrong.
TEST_F(Partition, ClosingFirstMemberReordersGroupAndSteeringFollows) {
    NEED_TWO_CPUS();
    mpt::ChannelThread *w[3];
    mp_handle *h[3];
    std::vector<cpu_set_t> masks = {mpt::cpuset_of({a_}), mpt::cpuset_of({a_}), mpt::cpuset_of({b_})};
    ASSERT_NO_FATAL_FAILURE(start_three(masks, {a_, a_, b_}, w, h));
    three_partitions(this, w, h, masks, 0, port_, {a_, b_});
}

// The brief's shape: {a} {b} {a,b}.  Closing the first moves {a,b} into slot 0: CPU a must
// then reach the {a,b} channel, not the {b} one.
TEST_F(Partition, ClosingFirstOfOverlappingPartitions) {
    NEED_TWO_CPUS();
    mpt::ChannelThread *w[3];
    mp_handle *h[3];
    std::vector<cpu_set_t> masks = {mpt::cpuset_of({a_}), mpt::cpuset_of({b_}),
                                    mpt::cpuset_of({a_, b_})};
    ASSERT_NO_FATAL_FAILURE(start_three(masks, {a_, b_, a_}, w, h));
    three_partitions(this, w, h, masks, 0, port_, {a_, b_});
}

// {a} {b} {a,b}, closing the middle one: CPU b must go to the {a,b} channel.
TEST_F(Partition, ClosingMiddleOfOverlappingPartitions) {
    NEED_TWO_CPUS();
    mpt::ChannelThread *w[3];
    mp_handle *h[3];
    std::vector<cpu_set_t> masks = {mpt::cpuset_of({a_}), mpt::cpuset_of({b_}),
                                    mpt::cpuset_of({a_, b_})};
    ASSERT_NO_FATAL_FAILURE(start_three(masks, {a_, b_, b_}, w, h));
    three_partitions(this, w, h, masks, 1, port_, {a_, b_});
}

TEST_F(Partition, SetCpuMaskSwapsAtRunTime) {
    NEED_TWO_CPUS();
    mpt::ChannelThread *w0 = add_worker(a_), *w1 = add_worker(b_);
    ASSERT_TRUE(w0->ok() && w1->ok());
    mp_handle *h0 = listen_on(w0, mpt::cpuset_of({a_}));
    mp_handle *h1 = listen_on(w1, mpt::cpuset_of({b_}));
    ASSERT_NE(h0, nullptr) << strerror(last_err_);
    ASSERT_NE(h1, nullptr) << strerror(last_err_);
    int a = a_;
    Phase ph = run_phase(workers(), port_, {a_, b_});
    expect_steered(ph, [a](int cpu) { return cpu == a ? std::set<int>{0} : std::set<int>{1}; },
                   "initial masks {a} {b}");

    // Bad masks are refused and change nothing.
    cpu_set_t empty;
    CPU_ZERO(&empty);
    EXPECT_EQ(w0->run([h0, empty](mp_channel *) { return mp_set_cpu_mask(h0, &empty); }), -EINVAL);
    EXPECT_EQ(w0->run([h0](mp_channel *) { return mp_set_cpu_mask(h0, nullptr); }), -EINVAL);

    cpu_set_t ma = mpt::cpuset_of({a_}), mb = mpt::cpuset_of({b_});
    EXPECT_EQ(w0->run([h0, mb](mp_channel *) { return mp_set_cpu_mask(h0, &mb); }), 0);
    EXPECT_EQ(w1->run([h1, ma](mp_channel *) { return mp_set_cpu_mask(h1, &ma); }), 0);
    Phase ph2 = run_phase(workers(), port_, {a_, b_});
    expect_steered(ph2, [a](int cpu) { return cpu == a ? std::set<int>{1} : std::set<int>{0}; },
                   "swapped masks {b} {a}");

    // And back again.
    EXPECT_EQ(w0->run([h0, ma](mp_channel *) { return mp_set_cpu_mask(h0, &ma); }), 0);
    EXPECT_EQ(w1->run([h1, mb](mp_channel *) { return mp_set_cpu_mask(h1, &mb); }), 0);
    Phase ph3 = run_phase(workers(), port_, {a_, b_});
    expect_steered(ph3, [a](int cpu) { return cpu == a ? std::set<int>{0} : std::set<int>{1}; },
                   "masks swapped back");
}

TEST_F(Partition, SetCpuMaskRefusesNonPartitionHandles) {
    NEED_TWO_CPUS();
    mpt::ChannelThread *w0 = add_worker(a_);
    ASSERT_TRUE(w0->ok());
    int sv[2];
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    cpu_set_t m = mpt::cpuset_of({a_});
    int r = w0->run([&](mp_channel *ch) {
        mp_handle *h = mp_register(ch, sv[0], nullptr, nullptr);
        if (!h) return -1000;
        int x = mp_set_cpu_mask(h, &m);
        mp_unregister(h);
        return x;
    });
    EXPECT_EQ(r, -EINVAL);
    EXPECT_EQ(mp_set_cpu_mask(nullptr, &m), -EBADF);
    close(sv[0]);
    close(sv[1]);
}

// MP_PARTITION=0: the cpu_mask is ignored; the template socket itself becomes the shared
// listening socket, and every channel that registers it accepts from that one queue.
TEST_F(Partition, PartitionOffSharesOneQueue) {
    NEED_TWO_CPUS();
    mp_options o;
    mp_options_init(&o);
    o.partition = 0;
    mpt::ChannelThread *w0 = add_worker(a_, &o), *w1 = add_worker(b_, &o);
    ASSERT_TRUE(w0->ok() && w1->ok());
    mp_handle *h0 = listen_on(w0, mpt::cpuset_of({a_}));
    ASSERT_NE(h0, nullptr) << strerror(last_err_);
    EXPECT_EQ(w0->run([h0](mp_channel *) { return mp_handle_fd(h0); }), lfd_)
        << "with partitioning off no partition socket may be created";
    EXPECT_EQ(mpt::sockopt(lfd_, SOL_SOCKET, SO_ACCEPTCONN), 1) << "shared fd must be listening";

    // One channel: it gets everything, whatever its mask says.
    Phase ph = run_phase(workers(), port_, {a_, b_});
    expect_steered(ph, [](int) { return std::set<int>{0}; }, "only channel 0 registered");

    mp_handle *h1 = listen_on(w1, mpt::cpuset_of({b_}));
    ASSERT_NE(h1, nullptr) << strerror(last_err_);
    EXPECT_EQ(w1->run([h1](mp_channel *) { return mp_handle_fd(h1); }), lfd_);

    // Both channels on the one queue: nothing lost (who accepts is up to the kernel).
    Phase ph2 = run_phase(workers(), port_, {a_, b_});
    expect_steered(ph2, [](int) { return std::set<int>{0, 1}; }, "both channels, shared queue");

    // Channel 0 leaves: the shared socket stays open (the application owns it) and channel
    // 1, mask {b}, accepts connections from CPU a too.
    EXPECT_EQ(w0->run([h0](mp_channel *) { return mp_unregister(h0); }), 0);
    EXPECT_TRUE(mpt::fd_valid(lfd_));
    Phase ph3 = run_phase(workers(), port_, {a_, b_});
    expect_steered(ph3, [](int) { return std::set<int>{1}; }, "only channel 1 left");
    EXPECT_EQ(w0->accept_errors() + w1->accept_errors(), 0);
}
