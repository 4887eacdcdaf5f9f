// The trusted bridge of secureinfer_enclave.edl (src/boundary/enclave_bridge.h), without SGX: handles instead of
// pointers, bounded [user_check] buffers, and parallel loops whose host only lends threads. The host here
// misbehaves in every way the EDL lets it: it lends no thread, lends more than asked, calls the worker entry twice,
// late, or with a job it guessed; no chunk may run twice or be skipped, and nothing may run after the loop returned.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "boundary/enclave_bridge.h"

using namespace si;

namespace {

struct Counts {
    std::vector<std::atomic<int>> hits;
    std::atomic<int> calls{0}, lent_calls{0};
    std::thread::id caller = std::this_thread::get_id();
    explicit Counts(int64_t n) : hits(size_t(n)) {}
    static void fn(void* arg, int64_t b, int64_t e) {
        auto* c = static_cast<Counts*>(arg);
        c->calls.fetch_add(1);
        if (std::this_thread::get_id() != c->caller) c->lent_calls.fetch_add(1);
        for (int64_t i = b; i < e; ++i) c->hits[size_t(i)].fetch_add(1);
        std::this_thread::sleep_for(std::chrono::microseconds(50));  // let lent threads take chunks too
    }
    void expect_each_once() const {
        for (size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i].load(), 1) << "index " << i;
    }
};

}  // namespace

TEST(EnclaveBridge, HandlesNameOnlyLiveCores) {
    bridge::Handles h;
    si_enclave* a = reinterpret_cast<si_enclave*>(uintptr_t(0x1000));
    si_enclave* b = reinterpret_cast<si_enclave*>(uintptr_t(0x2000));
    const uint64_t ha = h.add(a), hb = h.add(b);
    EXPECT_NE(ha, 0u);
    EXPECT_NE(ha, hb);
    EXPECT_EQ(h.find(ha), a);
    EXPECT_EQ(h.find(hb), b);
    EXPECT_EQ(h.find(0), nullptr);
    EXPECT_EQ(h.find(hb + 1), nullptr);
    EXPECT_EQ(h.find(uint64_t(uintptr_t(a))), nullptr);  // a pointer is no handle
    EXPECT_EQ(h.remove(ha), a);
    EXPECT_EQ(h.find(ha), nullptr);
    EXPECT_EQ(h.remove(ha), nullptr);  // destroyed once
}

TEST(EnclaveBridge, ProcessBuffersAreBoundedAndOutsideTheEnclave) {
    // The "enclave" is this array; everything else is outside.
    static uint8_t enclave[4096];
    const bridge::OutsideFn outside = [](const void* p, size_t n) {
        const auto a = reinterpret_cast<uintptr_t>(p), lo = reinterpret_cast<uintptr_t>(enclave);
        return a + n <= lo || a >= lo + sizeof enclave;
    };
    std::vector<uint8_t> req(64), resp(64);
    EXPECT_EQ(bridge::check_process_buffers(req.data(), req.size(), resp.data(), resp.size(), outside), nullptr);
    EXPECT_STREQ(bridge::check_process_buffers(req.data(), size_t(SI_ENCLAVE_MAX_MESSAGE) + 1, resp.data(),
                                               resp.size(), outside),
                 "request larger than SI_ENCLAVE_MAX_MESSAGE");
    EXPECT_STREQ(bridge::check_process_buffers(req.data(), req.size(), resp.data(), SIZE_MAX, outside),
                 "response buffer larger than SI_ENCLAVE_MAX_MESSAGE");
    EXPECT_STREQ(bridge::check_process_buffers(nullptr, 8, resp.data(), resp.size(), outside),
                 "null buffer with a non-zero size");
    // the host points a buffer at enclave memory, wholly or in part
    EXPECT_STREQ(bridge::check_process_buffers(enclave + 100, 64, resp.data(), resp.size(), outside),
                 "request buffer is not outside the enclave");
    EXPECT_STREQ(bridge::check_process_buffers(req.data(), req.size(), enclave - 10, 64, outside),
                 "response buffer is not outside the enclave");
    EXPECT_EQ(bridge::check_process_buffers(nullptr, 0, nullptr, 0, outside), nullptr);
}

TEST(EnclaveBridge, ParallelForRunsEveryChunkOnceWhateverTheHostLends) {
    for (const int64_t n : {int64_t(1), int64_t(7), int64_t(1000)})
        for (const int64_t grain : {int64_t(1), int64_t(3), int64_t(64)}) {
            // an honest host: the threads asked for, each entering once
            {
                std::vector<std::thread> lent;
                bridge::ParallelJobs honest(3, [&](uint64_t job, int workers) {
                    EXPECT_LE(workers, 3);
                    for (int i = 0; i < workers; ++i) lent.emplace_back([&honest, job] { honest.work(job); });
                });
                Counts c(n);
                honest.parallel_for(n, grain, Counts::fn, &c);
                c.expect_each_once();
                if (n / grain >= 100) {
                    EXPECT_GT(c.lent_calls.load(), 0) << "no lent thread ran a chunk";
                }
                for (auto& t : lent) t.join();
            }
            // a host that lends nothing: the calling thread does it all
            {
                bridge::ParallelJobs stingy(3, [](uint64_t, int) {});
                Counts c(n);
                stingy.parallel_for(n, grain, Counts::fn, &c);
                c.expect_each_once();
                EXPECT_EQ(c.lent_calls.load(), 0);
                EXPECT_EQ(c.calls.load(), int((n + grain - 1) / grain));
            }
        }
}

TEST(EnclaveBridge, ParallelForIgnoresExtraLateAndGuessedWorkers) {
    const int64_t n = 4000, grain = 10;
    std::vector<std::thread> lent;
    std::vector<uint64_t> jobs_seen;
    bridge::ParallelJobs* self = nullptr;
    bridge::ParallelJobs greedy(2, [&](uint64_t job, int) {
        jobs_seen.push_back(job);
        // more threads than asked, each entering twice, plus guesses at other jobs
        for (int i = 0; i < 8; ++i)
            lent.emplace_back([self, job] {
                self->work(job);
                self->work(job);
                self->work(job + 1);
                self->work(0);
                self->work(~uint64_t(0));
            });
    });
    self = &greedy;
    Counts c(n);
    greedy.parallel_for(n, grain, Counts::fn, &c);
    c.expect_each_once();
    EXPECT_EQ(c.calls.load(), int(n / grain));
    for (auto& t : lent) t.join();
    lent.clear();

    // a worker that arrives after the loop returned runs nothing (its arg may be gone)
    const int before = c.calls.load();
    greedy.work(jobs_seen.at(0));
    EXPECT_EQ(c.calls.load(), before);
    // the next loop gets another job number: the old one opens nothing
    Counts d(100);
    greedy.parallel_for(100, 1, Counts::fn, &d);
    d.expect_each_once();
    ASSERT_EQ(jobs_seen.size(), 2u);
    EXPECT_NE(jobs_seen[0], jobs_seen[1]);
    for (auto& t : lent) t.join();
}

TEST(EnclaveBridge, ConcurrentLoopsBothComplete) {
    std::vector<std::thread> lent;
    std::mutex mu;
    bridge::ParallelJobs* self = nullptr;
    bridge::ParallelJobs jobs(2, [&](uint64_t job, int workers) {
        std::lock_guard<std::mutex> lock(mu);
        for (int i = 0; i < workers; ++i) lent.emplace_back([self, job] { self->work(job); });
    });
    self = &jobs;
    Counts a(500), b(500);
    std::thread other([&] { jobs.parallel_for(500, 5, Counts::fn, &b); });
    jobs.parallel_for(500, 5, Counts::fn, &a);
    other.join();
    a.expect_each_once();
    b.expect_each_once();
    std::lock_guard<std::mutex> lock(mu);
    for (auto& t : lent) t.join();
}
