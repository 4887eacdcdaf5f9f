// The enclave hosts' transport: the hardened worker process (with the echo core of tests/worker_echo_core.cpp, in
// the test-echo-worker executable), the in-process host, and the worker's secret arena.
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/secret_memory.h"
#include "host/secure_session.h"
#include "host/worker_host.h"
#include "testutil.h"
#include "worker/secret_arena.h"

namespace {

using namespace std::chrono_literals;

std::string here() {
    char buf[4096];
    const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
    std::string p(buf, n > 0 ? size_t(n) : 0);
    return p.substr(0, p.rfind('/'));
}

si::WorkerOptions echo_options(size_t ring = 1 << 20) {
    si::WorkerOptions o;
    o.worker_path = here() + "/test-echo-worker";
    o.ring_bytes = ring;
    o.secret_arena_bytes = 64 << 20;
    return o;
}

std::vector<uint8_t> bytes(const std::string& s) { return {s.begin(), s.end()}; }
std::string text(const std::vector<uint8_t>& v) { return {v.begin(), v.end()}; }

std::vector<uint8_t> call(si::EnclaveHost& h, const std::vector<uint8_t>& req) {
    std::vector<uint8_t> resp;
    h.call(req, resp);
    return resp;
}

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
    std::vector<uint8_t> v(n);
    std::mt19937_64 rng(seed);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const uint64_t r = rng();
        std::memcpy(v.data() + i, &r, 8);
    }
    for (; i < n; ++i) v[i] = uint8_t(rng());
    return v;
}

std::vector<uint8_t> reversed(std::vector<uint8_t> v) {
    std::reverse(v.begin(), v.end());
    return v;
}

// The error a call throws (Status::ok when none).
si::Error call_error(si::EnclaveHost& h, const std::vector<uint8_t>& req) {
    try {
        call(h, req);
    } catch (const si::Error& e) {
        return e;
    }
    return si::Error(si::Status::ok, "");
}

std::string proc_status_field(pid_t pid, const std::string& key) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/status");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind(key + ":", 0) == 0) {
            std::string v = line.substr(key.size() + 1);
            v.erase(0, v.find_first_not_of(" \t"));
            return v;
        }
    return "";
}

// CPU time the process has used, in nanoseconds (schedstat when the kernel has it, else clock ticks).
uint64_t cpu_ns(pid_t pid) {
    std::ifstream ss("/proc/" + std::to_string(pid) + "/schedstat");
    uint64_t ns = 0;
    if (ss >> ns) return ns;
    std::ifstream st("/proc/" + std::to_string(pid) + "/stat");
    std::string s((std::istreambuf_iterator<char>(st)), {});
    std::istringstream rest(s.substr(s.rfind(')') + 2));
    std::string field;
    uint64_t utime = 0, stime = 0;
    for (int i = 3; i <= 15 && rest >> field; ++i) {
        if (i == 14) utime = std::stoull(field);
        if (i == 15) stime = std::stoull(field);
    }
    return (utime + stime) * (1000000000ull / uint64_t(sysconf(_SC_CLK_TCK)));
}

bool process_gone(pid_t pid) { return kill(pid, 0) != 0 && errno == ESRCH; }

}  // namespace

TEST(SecretArena, AllocatesZeroedAlignedMemoryAndZeroesOnFree) {
    auto arena = si::SecretArena::create(1 << 20);
    std::printf("secret memory on this kernel: %s%s%s\n", si::secret_memory_kind_name(arena->kind()),
                arena->note().empty() ? "" : " - ", arena->note().c_str());
    auto* a = static_cast<uint8_t*>(arena->allocate(100));
    auto* b = static_cast<uint8_t*>(arena->allocate(1000));
    ASSERT_TRUE(a && b);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 64, 0u);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b) % 64, 0u);
    for (int i = 0; i < 100; ++i) EXPECT_EQ(a[i], 0);
    std::memset(a, 0xab, 100);
    arena->free(a, 100);
    for (int i = 0; i < 100; ++i) ASSERT_EQ(a[i], 0) << "freed secret memory must be zeroed";
    EXPECT_EQ(arena->in_use(), 1024u);
    arena->free(b, 1000);
    EXPECT_EQ(arena->in_use(), 0u);
    // After coalescing the whole arena is one block again.
    void* all = arena->allocate(1 << 20);
    EXPECT_NE(all, nullptr);
    EXPECT_EQ(arena->allocate(1), nullptr) << "an exhausted arena returns nullptr";
    arena->free(all, 1 << 20);
    // Churn: interleaved frees coalesce with both neighbours.
    std::vector<void*> blocks;
    for (int i = 0; i < 64; ++i) blocks.push_back(arena->allocate(16384));
    for (int i = 0; i < 64; i += 2) arena->free(blocks[i], 16384);
    for (int i = 1; i < 64; i += 2) arena->free(blocks[i], 16384);
    EXPECT_NE(all = arena->allocate(1 << 20), nullptr);
    arena->free(all, 1 << 20);
}

TEST(SecretArena, RoutesSecretAllocatorHooks) {
    auto arena = si::SecretArena::create(1 << 20);
    arena->install();
    {
        si::SecretVector<float> v(1000, 1.5f);
        const auto* p = reinterpret_cast<const uint8_t*>(v.data());
        EXPECT_GE(p, static_cast<const uint8_t*>(arena->base()));
        EXPECT_LT(p, static_cast<const uint8_t*>(arena->base()) + arena->capacity());
        EXPECT_GT(arena->in_use(), 0u);
    }
    EXPECT_EQ(arena->in_use(), 0u);
    si::set_secret_allocator(nullptr);
    void* p = si_secret_alloc(10);  // the default heap allocator again
    ASSERT_NE(p, nullptr);
    si_secret_free(p, 10);
}

TEST(SecretArena, FallbackWithoutMemfdSecret) {
    auto arena = si::SecretArena::create(1 << 20, /*try_memfd_secret=*/false);
    EXPECT_NE(arena->kind(), si::SecretMemoryKind::memfd_secret);
    EXPECT_FALSE(arena->note().empty());
    void* p = arena->allocate(4096);
    ASSERT_NE(p, nullptr);
    arena->free(p, 4096);
}

TEST(InProcessHost, CallsTheCoreDirectly) {
    auto host = si::make_inprocess_host();
    EXPECT_EQ(host->isolation(), "no isolation (in-process; for tests only)");
    EXPECT_EQ(text(call(*host, bytes("abc"))), "cba");
    const auto big = random_bytes(SI_ENCLAVE_MAX_MESSAGE, 1);
    EXPECT_EQ(call(*host, big), reversed(big));
    const si::Error e = call_error(*host, bytes("fail:no such tensor"));
    EXPECT_EQ(e.status(), si::Status::invalid_argument);
    EXPECT_STREQ(e.what(), "no such tensor");
    EXPECT_EQ(text(call(*host, bytes("x"))), "x");
}

TEST(WorkerHost, ReportsItsIsolation) {
    auto o = echo_options();
    o.secret_arena_bytes = si::WorkerOptions().secret_arena_bytes;  // the default reservation (256 MiB)
    auto host = si::make_worker_host(o);
    std::printf("isolation: %s\n", host->isolation().c_str());
    for (const auto& w : host->warnings()) std::printf("warning: %s\n", w.c_str());
    if (host->secret_memory() == "memfd_secret") {
        EXPECT_EQ(host->isolation(), "worker process (memfd_secret, seccomp, non-dumpable)");
        EXPECT_TRUE(host->warnings().empty());
    } else {
        EXPECT_NE(host->isolation().find("fallback"), std::string::npos);
        ASSERT_FALSE(host->warnings().empty());
    }
}

TEST(WorkerHost, FallbackIsReported) {
    auto o = echo_options();
    o.force_secret_fallback = true;
    auto host = si::make_worker_host(o);
    EXPECT_NE(host->secret_memory(), "memfd_secret");
    EXPECT_NE(host->isolation().find("MADV_DONTDUMP"), std::string::npos) << host->isolation();
    ASSERT_EQ(host->warnings().size(), 1u);
    EXPECT_NE(host->warnings()[0].find("memfd_secret unavailable"), std::string::npos) << host->warnings()[0];
    EXPECT_EQ(text(call(*host, bytes("abc"))), "cba");
}

TEST(WorkerHost, RoundTripsOfManySizes) {
    const size_t cap = 1 << 20;
    auto host = si::make_worker_host(echo_options(cap));
    for (size_t n : {size_t(0), size_t(1), size_t(2), size_t(3), size_t(63), size_t(64), size_t(65), size_t(4095),
                     size_t(4096), size_t(4097), size_t(65536), cap - 1, cap}) {
        const auto req = random_bytes(n, uint32_t(n));
        EXPECT_EQ(call(*host, req), reversed(req)) << n << " bytes";
    }
    const si::Error e = call_error(*host, random_bytes(cap + 1, 7));
    EXPECT_EQ(e.status(), si::Status::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("exceeds the worker ring's request area of 1048576 bytes"),
              std::string::npos)
        << e.what();
    EXPECT_EQ(text(call(*host, bytes("still alive"))), "evila llits");
}

TEST(WorkerHost, LargestMessage) {
    auto host = si::make_worker_host(echo_options(SI_ENCLAVE_MAX_MESSAGE));
    const auto req = random_bytes(SI_ENCLAVE_MAX_MESSAGE, 3);
    EXPECT_EQ(call(*host, req), reversed(req));
    std::vector<uint8_t> over(SI_ENCLAVE_MAX_MESSAGE + 1, 1);
    const si::Error e = call_error(*host, over);
    EXPECT_EQ(e.status(), si::Status::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("67108865 bytes exceeds"), std::string::npos) << e.what();
}

TEST(WorkerHost, ManySequentialCalls) {
    auto host = si::make_worker_host(echo_options());
    const int n = 5000;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) {
        const std::string s = "request " + std::to_string(i);
        ASSERT_EQ(text(call(*host, bytes(s))), std::string(s.rbegin(), s.rend()));
    }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / n;
    std::printf("round trip (futex doorbells, no spinning): %.1f us per call\n", us);
}

TEST(WorkerHost, ConcurrentCallersAreSerialised) {
    auto host = si::make_worker_host(echo_options());
    std::vector<std::thread> threads;
    std::atomic<int> bad{0};
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([&, t] {
            for (int i = 0; i < 300; ++i) {
                const auto req = random_bytes(size_t(1 + (i * 37 + t) % 5000), uint32_t(t * 1000 + i));
                if (call(*host, req) != reversed(req)) ++bad;
            }
        });
    for (auto& th : threads) th.join();
    EXPECT_EQ(bad.load(), 0);
}

TEST(WorkerHost, CoreErrorsCarryStatusAndMessage) {
    auto host = si::make_worker_host(echo_options());
    const si::Error e = call_error(*host, bytes("fail:tensor 7 is not loaded"));
    EXPECT_EQ(e.status(), si::Status::invalid_argument);
    EXPECT_STREQ(e.what(), "tensor 7 is not loaded");
    EXPECT_EQ(text(call(*host, bytes("log:hello from the core"))), "eroc eht morf olleh:gol");
}

TEST(WorkerHost, TheCoresWorkRunsUnderTheFilter) {
    // What a real trusted core does while serving: OpenSSL randomness and ciphers, large allocations, exceptions.
    auto host = si::make_worker_host(echo_options());
    EXPECT_EQ(text(call(*host, bytes("crypto"))), "crypto ok");
    EXPECT_EQ(text(call(*host, bytes("alloc:100000000"))), "alloc ok");
    EXPECT_EQ(text(call(*host, bytes("throw"))), "caught");
    for (int i = 0; i < 100; ++i) ASSERT_EQ(text(call(*host, bytes("secret:" + std::string(size_t(i) * 1000, 'k')))).empty(), false);
}

TEST(WorkerHost, SpinningOptionWorks) {
    auto o = echo_options();
    o.spin = 50us;
    auto host = si::make_worker_host(o);
    for (int i = 0; i < 1000; ++i) ASSERT_EQ(text(call(*host, bytes("ab"))), "ba");
}

// Tries to read `n` bytes at `addr` in another process, through /proc/PID/mem and process_vm_readv.
// Returns the bytes obtained by either route.
std::string read_remote(pid_t pid, uint64_t addr, size_t n) {
    std::string got;
    std::vector<char> buf(n, 0);
    const std::string mem = "/proc/" + std::to_string(pid) + "/mem";
    const int fd = open(mem.c_str(), O_RDONLY);
    if (fd >= 0) {
        const ssize_t r = pread(fd, buf.data(), n, off_t(addr));
        const int err = errno;
        close(fd);
        if (r > 0) got.append(buf.data(), size_t(r));
        else std::printf("pread(%s) failed: %s\n", mem.c_str(), std::strerror(err));
    } else {
        std::printf("open(%s) failed: %s\n", mem.c_str(), std::strerror(errno));
    }
    std::fill(buf.begin(), buf.end(), 0);
    iovec local{buf.data(), n}, remote{reinterpret_cast<void*>(addr), n};
    const ssize_t r = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (r > 0) got.append(buf.data(), size_t(r));
    else std::printf("process_vm_readv failed: %s\n", std::strerror(errno));
    return got;
}

TEST(WorkerHost, SecretMemoryIsUnreadableFromOutside) {
    auto host = si::make_worker_host(echo_options());
    const std::string secret = "TOP-SECRET-LORA-WEIGHTS-0123456789abcdef";
    const uint64_t addr = std::stoull(text(call(*host, bytes("secret:" + secret))));
    ASSERT_NE(addr, 0u);
    // OpenSSL's own allocations (expanded keys, generator state) live in the secret arena as well.
    const uint64_t ctx = std::stoull(text(call(*host, bytes("openssl-key"))));
    ASSERT_NE(ctx, 0u);
    if (host->secret_memory() != "memfd_secret" && geteuid() == 0)
        GTEST_SKIP() << "the fallback secret memory is readable by root (reported in warnings())";
    EXPECT_EQ(read_remote(host->pid(), addr, secret.size()), "") << "read the worker's secret memory";
    EXPECT_EQ(read_remote(host->pid(), ctx, 64), "") << "read an OpenSSL context in the worker";
    // The worker itself is unharmed.
    EXPECT_EQ(text(call(*host, bytes("ok"))), "ko");
}

TEST(WorkerHost, ForbiddenSystemCallKillsTheWorker) {
    auto host = si::make_worker_host(echo_options());
    const si::Error e = call_error(*host, bytes("syscall"));
    EXPECT_EQ(e.status(), si::Status::internal);
    EXPECT_STREQ(e.what(), "enclave worker died: killed by signal 31 (SIGSYS: forbidden system call)");
    // Every later call fails the same way; the worker is not silently restarted.
    const si::Error again = call_error(*host, bytes("abc"));
    EXPECT_STREQ(again.what(), e.what());
}

TEST(WorkerHost, CrashIsReported) {
    auto host = si::make_worker_host(echo_options());
    const si::Error e = call_error(*host, bytes("crash"));
    EXPECT_EQ(e.status(), si::Status::internal);
    EXPECT_STREQ(e.what(), "enclave worker died: killed by signal 6 (SIGABRT)");
}

TEST(WorkerHost, WorkerIsHardened) {
    auto host = si::make_worker_host(echo_options());
    const pid_t pid = host->pid();
    EXPECT_EQ(proc_status_field(pid, "Seccomp"), "2") << "seccomp filter mode";
    EXPECT_EQ(proc_status_field(pid, "NoNewPrivs"), "1");
    const std::string uid = proc_status_field(pid, "Uid");
    if (geteuid() == 0) {
        EXPECT_EQ(uid, "65534\t65534\t65534\t65534") << "a worker started by root runs as nobody";
        EXPECT_EQ(proc_status_field(pid, "Gid"), "65534\t65534\t65534\t65534");
        EXPECT_EQ(proc_status_field(pid, "Groups"), "");
        EXPECT_EQ(proc_status_field(pid, "CapEff"), "0000000000000000");
    }
    // A non-dumpable process's /proc files belong to root whatever its uid.
    struct stat st {};
    ASSERT_EQ(stat(("/proc/" + std::to_string(pid) + "/status").c_str(), &st), 0);
    EXPECT_EQ(st.st_uid, 0u) << "worker is dumpable";
    if (geteuid() != 0) {
        EXPECT_NE(ptrace(PTRACE_SEIZE, pid, nullptr, nullptr), 0) << "ptrace attach succeeded";
    }
    // No core dumps.
    std::ifstream limits("/proc/" + std::to_string(pid) + "/limits");
    std::string line;
    bool seen = false;
    while (std::getline(limits, line))
        if (line.rfind("Max core file size", 0) == 0) {
            std::istringstream f(line.substr(18));
            std::string soft, hard;
            f >> soft >> hard;
            EXPECT_EQ(soft, "0");
            seen = true;
        }
    EXPECT_TRUE(seen);
}

TEST(WorkerHost, NoSpinningWhenIdle) {
    auto host = si::make_worker_host(echo_options());
    EXPECT_EQ(text(call(*host, bytes("ab"))), "ba");
    const uint64_t before = cpu_ns(host->pid());
    std::this_thread::sleep_for(200ms);
    const uint64_t used = cpu_ns(host->pid()) - before;
    std::printf("idle worker used %.3f ms of CPU in 200 ms\n", double(used) / 1e6);
    EXPECT_LT(used, 10'000'000u);
}

TEST(WorkerHost, DestructorStopsTheWorker) {
    auto host = si::make_worker_host(echo_options());
    const pid_t pid = host->pid();
    EXPECT_FALSE(process_gone(pid));
    const auto t0 = std::chrono::steady_clock::now();
    host.reset();
    EXPECT_TRUE(process_gone(pid)) << "worker not reaped";
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 1s) << "worker did not exit when asked";
}

TEST(WorkerHost, OrphanedWorkerExits) {
    // The test process adopts orphans so it can watch (and reap) the worker once its host is gone.
    ASSERT_EQ(prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
    int fds[2];
    ASSERT_EQ(pipe(fds), 0);
    const pid_t child = fork();
    if (child == 0) {
        pid_t wpid = -1;
        try {
            wpid = si::make_worker_host(echo_options()).release()->pid();  // never destroyed: the host "dies"
        } catch (...) {
        }
        [[maybe_unused]] ssize_t n = write(fds[1], &wpid, sizeof wpid);
        _exit(0);
    }
    close(fds[1]);
    pid_t wpid = -1;
    ASSERT_EQ(read(fds[0], &wpid, sizeof wpid), ssize_t(sizeof wpid));
    close(fds[0]);
    waitpid(child, nullptr, 0);
    ASSERT_GT(wpid, 0);
    int status = 0;
    pid_t r = 0;
    const auto deadline = std::chrono::steady_clock::now() + 3s;
    while ((r = waitpid(wpid, &status, WNOHANG)) == 0 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(10ms);
    prctl(PR_SET_CHILD_SUBREAPER, 0);
    if (r == 0) {
        kill(wpid, SIGKILL);
        waitpid(wpid, nullptr, 0);
    }
    ASSERT_EQ(r, wpid) << "the orphaned worker kept running";
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

TEST(WorkerHost, FindsTheWorker) {
    auto o = echo_options();
    o.worker_path = "/nonexistent/secureinfer-worker";
    try {
        si::make_worker_host(o);
        FAIL() << "started a missing worker";
    } catch (const si::Error& e) {
        EXPECT_EQ(e.status(), si::Status::io);
        EXPECT_NE(std::string(e.what()).find("/nonexistent/secureinfer-worker"), std::string::npos) << e.what();
    }
    const char* old = std::getenv("SI_WORKER");
    const std::string saved = old ? old : "";
    setenv("SI_WORKER", echo_options().worker_path.c_str(), 1);
    EXPECT_EQ(si::default_worker_path(), echo_options().worker_path);
    o.worker_path.clear();
    auto host = si::make_worker_host(o);
    EXPECT_EQ(text(call(*host, bytes("xy"))), "yx");
    if (old) setenv("SI_WORKER", saved.c_str(), 1);
    else unsetenv("SI_WORKER");
    EXPECT_EQ(si::default_worker_path(), here() + "/secureinfer-worker");
}

TEST(WorkerHost, BadOptionsAreRejected) {
    auto o = echo_options(SI_ENCLAVE_MAX_MESSAGE + 1);
    try {
        si::make_worker_host(o);
        FAIL();
    } catch (const si::Error& e) {
        EXPECT_EQ(e.status(), si::Status::invalid_argument);
    }
}

// ---- what the host cannot do to a worker it starts ---------------------------------------------------------------

namespace {

// The NUL-separated environment a process was started with (readable by root even when it is non-dumpable).
std::string start_environment(pid_t pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/environ", std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(f)), {});
}

// Runs `f` in a forked child (as the given uid/gid when uid != 0, with RLIMIT_MEMLOCK at memlock bytes) and
// returns what it wrote to the pipe it is given.
template <class F>
std::string in_child(uid_t uid, gid_t gid, rlim_t memlock, F&& f) {
    return si::test::in_child_as(uid, gid, std::forward<F>(f), [memlock] {
        const rlimit rl{memlock, memlock};
        return setrlimit(RLIMIT_MEMLOCK, &rl) == 0 ? std::string() : std::string("setrlimit failed");
    });
}

}  // namespace

TEST(WorkerHost, StartsTheWorkerWithAnEmptyEnvironment) {
    // The attack: a loader variable in the host's environment (LD_PRELOAD, LD_LIBRARY_PATH naming a directory with
    // the host's own libcrypto) reaching the worker that holds the secrets.
    setenv("LD_LIBRARY_PATH", "/nonexistent/si-host-libs", 1);
    setenv("OPENSSL_MODULES", "/nonexistent/si-host-modules", 1);
    setenv("SI_TEST_MARKER", "host-environment", 1);
    auto host = si::make_worker_host(echo_options());
    const std::string env = start_environment(host->pid());
    unsetenv("LD_LIBRARY_PATH");
    unsetenv("OPENSSL_MODULES");
    unsetenv("SI_TEST_MARKER");
    EXPECT_EQ(env, "") << "the worker was started with an environment";
    EXPECT_EQ(text(call(*host, bytes("abc"))), "cba");
}

#if !defined(__SANITIZE_ADDRESS__)
TEST(WorkerHost, NoSharedObjectRunsInTheWorker) {
    // Statically linked: the measurement of its executable covers all the code it runs (the sanitizer builds are
    // dynamic and measure every object mapped executable instead).
    for (const std::string exe : {"/test-echo-worker", "/secureinfer-worker"}) {
        auto o = echo_options();
        o.worker_path = here() + exe;
        auto host = si::make_worker_host(o);
        std::ifstream maps("/proc/" + std::to_string(host->pid()) + "/maps");
        std::string line;
        int exec_files = 0;
        while (std::getline(maps, line)) {
            std::istringstream f(line);
            std::string range, perms, off, dev, inode, path;
            f >> range >> perms >> off >> dev >> inode >> path;
            if (perms.size() > 2 && perms[2] == 'x' && inode != "0") {
                EXPECT_EQ(path, o.worker_path) << "a shared object runs in the worker: " << line;
                ++exec_files;
            }
        }
        EXPECT_GE(exec_files, 1) << exe;
    }
}
#endif

TEST(WorkerHost, RefusesToRunUnderATracer) {
    // The attack: a tracer attached before exec (strace -f on the host) stays attached past PR_SET_DUMPABLE(0)
    // and the seccomp filter. Here the worker is started with PTRACE_TRACEME, as a tracer's child is.
    int err[2];
    ASSERT_EQ(pipe(err), 0);
    const std::string worker = here() + "/test-echo-worker";
    const pid_t child = fork();
    if (child == 0) {
        close(err[0]);
        dup2(err[1], 2);
        ptrace(PTRACE_TRACEME, 0, nullptr, nullptr);
        execl(worker.c_str(), worker.c_str(), "--measure", "--secret-bytes=1048576", static_cast<char*>(nullptr));
        _exit(127);
    }
    close(err[1]);
    int status = 0;
    // Stopped at the exec (SIGTRAP); let it run, passing on any other signal, until it exits.
    while (waitpid(child, &status, 0) == child && WIFSTOPPED(status)) {
        const int sig = WSTOPSIG(status) == SIGTRAP ? 0 : WSTOPSIG(status);
        ptrace(PTRACE_CONT, child, nullptr, reinterpret_cast<void*>(intptr_t(sig)));
    }
    std::string msg;
    char buf[1024];
    for (ssize_t n; (n = read(err[0], buf, sizeof buf)) > 0;) msg.append(buf, size_t(n));
    close(err[0]);
    ASSERT_TRUE(WIFEXITED(status)) << "status " << status;
    EXPECT_EQ(WEXITSTATUS(status), 1);
    EXPECT_NE(msg.find("secureinfer-worker: refusing to run under a tracer (TracerPid " + std::to_string(getpid()) + ")"),
              std::string::npos)
        << msg;
    // Untraced, the same start-up succeeds.
    auto o = echo_options();
    o.secret_arena_bytes = 1 << 20;
    o.worker_path = worker;
    EXPECT_EQ(si::worker_identity(o).config.find("secureinfer-worker abi="), 0u);
}

TEST(WorkerHost, HostReportsATracedWorker) {
    // strace -f on a host: the host names the reason the worker would not start.
    ASSERT_EQ(access("/usr/bin/strace", X_OK), 0) << "strace is missing (scripts/install-deps.sh installs it)";
    const std::string dir = std::filesystem::temp_directory_path() / ("si-strace-" + std::to_string(getpid()));
    const std::string err = dir + ".err";
    // (LeakSanitizer cannot run under a tracer: off for the sanitizer builds' CLI)
    const std::string cmd = "ASAN_OPTIONS=detect_leaks=0 /usr/bin/strace -f -o /dev/null " + std::string(SI_CLI) + " run -m " +
                            SI_SHARED_DIR "/models/stories260K.bin --tokenizer " SI_SHARED_DIR
                            "/models/tok512.bin --host worker -n 2 -p x > /dev/null 2> " + err;
    const int rc = std::system(cmd.c_str());
    std::ifstream f(err);
    const std::string msg((std::istreambuf_iterator<char>(f)), {});
    std::remove(err.c_str());
    EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 1) << rc;
    EXPECT_NE(msg.find("enclave worker failed to start: refusing to run under a tracer (TracerPid "), std::string::npos)
        << msg;
}

TEST(WorkerHost, WithoutSecretMemoryTheWorkerRefusesUnlessAllowed) {
    // The attack: a user's locked-memory limit below the arena (and no memfd_secret) used to leave the secrets in
    // ordinary, swappable memory with a start-up that looked like any other.
    auto o = echo_options();
    o.force_secret_fallback = true;  // as on a kernel without memfd_secret
    const std::string refused = in_child(65534, 65534, 64 << 10, [&] {
        try {
            si::make_worker_host(o);
            return std::string("started");
        } catch (const si::Error& e) {
            return std::to_string(int(e.status())) + " " + e.what();
        }
    });
    EXPECT_NE(refused.find(std::to_string(int(si::Status::security)) +
                           " enclave worker failed to start: no secret memory for "),
              std::string::npos)
        << refused;
    EXPECT_NE(refused.find("refusing to keep secrets in ordinary memory"), std::string::npos) << refused;

    // Allowed explicitly: it runs, says so, and its measured configuration names the memory kind.
    o.insecure_memory = true;
    const std::string allowed = in_child(65534, 65534, 64 << 10, [&] {
        try {
            auto host = si::make_worker_host(o);
            return host->secret_memory() + "|" + text(call(*host, bytes("abc"))) + "|" + si::worker_identity(o).config;
        } catch (const si::Error& e) {
            return std::string("error: ") + e.what();
        }
    });
    EXPECT_EQ(allowed, "MADV_DONTDUMP only (not locked)|cba|secureinfer-worker abi=" +
                           std::to_string(SI_ENCLAVE_ABI_VERSION) +
                           " memory=unlocked credentials=development uid=65534 gid=65534");
    // The same worker with secret memory measures differently, so an allow-list can tell them apart.
    o.insecure_memory = false;
    o.force_secret_fallback = false;
    const auto secure = si::worker_identity(o);
    EXPECT_EQ(secure.config.find("memory=unlocked"), std::string::npos) << secure.config;
}

TEST(WorkerHost, SecretArenaSizeIsCapped) {
    auto o = echo_options();
    o.secret_arena_bytes = si::kMaxSecretArenaBytes + 1;
    try {
        si::make_worker_host(o);
        FAIL() << "started with an arena over the cap";
    } catch (const si::Error& e) {
        EXPECT_EQ(e.status(), si::Status::invalid_argument);
        EXPECT_NE(std::string(e.what()).find("worker secret arena size must be between 1 and 68719476736 bytes"),
                  std::string::npos)
            << e.what();
    }
}

TEST(WorkerHost, SecretArenaIsSizedToTheModel) {
    // stories260K's shape: a few hundred MiB (mostly the kept precomputed factors and a batch's activations), far
    // below the 4 GiB reserved before; the factors count only when kept; a huge model is capped.
    si::ModelConfig c;
    c.dim = 64, c.hidden_dim = 172, c.n_layers = 5, c.n_heads = 8, c.n_kv_heads = 4, c.vocab_size = 512, c.seq_len = 512;
    const size_t small = si::secret_working_set(c, 512, 512, int64_t(256) << 20, 0);
    EXPECT_GE(small, size_t(256 + 64) << 20);
    EXPECT_LT(small, size_t(1) << 30);
    EXPECT_EQ(si::secret_working_set(c, 512, 512, 0, 0), small - (size_t(256) << 20));
    EXPECT_EQ(si::secret_working_set(c, 512, 512, 0, 1 << 20), small - (size_t(255) << 20));
    c.dim = 8192, c.hidden_dim = 28672, c.n_layers = 80, c.n_heads = 64, c.n_kv_heads = 8, c.vocab_size = 128256;
    EXPECT_EQ(si::secret_working_set(c, 8192, 512, 0, 0), si::kMaxSecretArenaBytes);
}
