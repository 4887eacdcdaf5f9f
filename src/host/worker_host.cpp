#include "host/worker_host.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "common/error.h"
#include "host/shm_ring.h"
#include "host/software_tee.h"

namespace si {

namespace {

using namespace std::chrono_literals;

// How often a waiting host looks whether the worker is still alive; the futex wait itself wakes at once on a reply.
constexpr auto kLivenessSlice = 10ms;
// Grace period for a worker told to exit before it is killed.
constexpr auto kExitGrace = 2000ms;
// Longest error message taken from the worker.
constexpr size_t kMaxErrorMessage = 4096;

Status status_from_code(int64_t rc) {
    return rc <= int(Status::invalid_argument) && rc >= int(Status::internal) ? Status(int(rc)) : Status::internal;
}

std::string errno_text(int err) { return std::strerror(err); }

// Text from the other side: bounded, cut at the first NUL, printable ASCII only.
std::string clean_text(const char* p, size_t n) {
    std::string s;
    for (size_t i = 0; i < n && p[i] != '\0'; ++i) {
        const unsigned char c = static_cast<unsigned char>(p[i]);
        s += (c >= 0x20 && c < 0x7f) ? char(c) : '?';
    }
    return s;
}

std::string describe_exit(int status) {
    if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
    if (WIFSIGNALED(status)) {
        const int sig = WTERMSIG(status);
        std::string s = "killed by signal " + std::to_string(sig);
        if (sig == SIGSYS) return s + " (SIGSYS: forbidden system call)";
        if (const char* abbrev = sigabbrev_np(sig)) return s + " (SIG" + abbrev + ")";
        return s;
    }
    return "stopped (wait status " + std::to_string(status) + ")";
}

// What both a serving worker and a --measure run are told: everything that enters the measurement.
std::vector<std::string> worker_arguments(const std::string& path, const WorkerOptions& o) {
    std::vector<std::string> args = {
        path,
        "--secret-bytes=" + std::to_string(o.secret_arena_bytes),
        "--uid=" + std::to_string(o.run_as_uid),
        "--gid=" + std::to_string(o.run_as_gid),
    };
    if (o.force_secret_fallback) args.push_back("--no-memfd-secret");
    if (o.insecure_memory) args.push_back("--insecure-memory");
    return args;
}

std::string dirname_of(const std::string& path) {
    const auto slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
}

class WorkerHostImpl final : public WorkerHost {
public:
    explicit WorkerHostImpl(const WorkerOptions& o) : opts_(o), spin_(o.spin) {}
    ~WorkerHostImpl() override {
        if (started_.owns_lock()) started_.unlock();  // a split call abandoned by an exception
        shutdown();
    }

    void start();

    std::string isolation() const override {
        switch (kind_) {
            case ring::secret_memfd_secret: return "worker process (memfd_secret, seccomp, non-dumpable)";
            case ring::secret_mlock: return "worker process (mlock + MADV_DONTDUMP fallback, seccomp, non-dumpable)";
            default:
                return "worker process (MADV_DONTDUMP-only fallback, secret memory not locked, seccomp, "
                       "non-dumpable)";
        }
    }
    std::vector<std::string> warnings() const override { return warnings_; }
    pid_t pid() const override { return pid_; }
    std::string secret_memory() const override {
        switch (kind_) {
            case ring::secret_memfd_secret: return "memfd_secret";
            case ring::secret_mlock: return "mlock + MADV_DONTDUMP";
            default: return "MADV_DONTDUMP only (not locked)";
        }
    }

    void call(std::span<const uint8_t> request, std::vector<uint8_t>& response) override {
        std::lock_guard<std::mutex> lock(mu_);
        send(request);
        receive(response);
    }
    // With both sides spinning and the serving thread on a CPU of its own, the worker takes a request within
    // microseconds and serves it while this thread goes on.
    bool concurrent() const override { return spin_.count() > 0 && opts_.serve_cpu < 0; }
    void start_call(std::span<const uint8_t> request) override {
        std::unique_lock<std::mutex> lock(mu_);
        send(request);
        started_ = std::move(lock);
    }
    void finish_call(std::vector<uint8_t>& response) override {
        if (!started_.owns_lock()) fail(Status::internal, "enclave worker: finish_call without start_call");
        std::unique_lock<std::mutex> lock(std::move(started_));
        receive(response);
    }

private:
    void send(std::span<const uint8_t> request);          // under mu_
    void receive(std::vector<uint8_t>& response);         // under mu_: waits for the answer to the last send
    ring::Header& header() { return *reinterpret_cast<ring::Header*>(map_); }
    bool alive();
    [[noreturn]] void fail_dead();
    [[noreturn]] void fail_broken(const std::string& what);
    bool wait_exit(std::chrono::milliseconds timeout);
    void kill_and_reap();
    void shutdown();

    WorkerOptions opts_;
    std::chrono::nanoseconds spin_;
    std::string path_;
    ring::Layout layout_;  // the host's own copy; never re-read from shared memory
    int memfd_ = -1;
    int pidfd_ = -1;
    uint8_t* map_ = nullptr;
    pid_t pid_ = -1;
    bool reaped_ = false;
    std::string dead_;  // why the worker is gone; calls fail from then on
    uint32_t seq_ = 0;
    uint32_t kind_ = ring::secret_unlocked;
    std::vector<std::string> warnings_;
    std::mutex mu_;  // one message in flight at a time
    std::unique_lock<std::mutex> started_;  // held from start_call to finish_call
};

void WorkerHostImpl::start() {
    path_ = opts_.worker_path.empty() ? default_worker_path() : opts_.worker_path;
    if (access(path_.c_str(), X_OK) != 0)
        fail(Status::io, "enclave worker executable " + path_ + " cannot be run: " + errno_text(errno) +
                             " (build the secureinfer-worker target, or point SI_WORKER at it)");
    if (opts_.ring_bytes == 0 || opts_.ring_bytes > SI_ENCLAVE_MAX_MESSAGE)
        fail(Status::invalid_argument, "worker ring size must be between 1 and " +
                                           std::to_string(SI_ENCLAVE_MAX_MESSAGE) + " bytes, not " +
                                           std::to_string(opts_.ring_bytes));
    if (opts_.secret_arena_bytes == 0 || opts_.secret_arena_bytes > kMaxSecretArenaBytes)
        fail(Status::invalid_argument, "worker secret arena size must be between 1 and " +
                                           std::to_string(kMaxSecretArenaBytes) + " bytes, not " +
                                           std::to_string(opts_.secret_arena_bytes));

    // The ring: a memfd sealed against resizing before the worker ever sees it, so neither side can truncate it
    // under the other's mapping (which would crash the other with SIGBUS).
    layout_ = ring::make_layout(opts_.ring_bytes);
    memfd_ = memfd_create("secureinfer-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (memfd_ < 0) fail(Status::io, "cannot create the worker ring (memfd_create): " + errno_text(errno));
    if (ftruncate(memfd_, off_t(layout_.total_bytes)) != 0)
        fail(Status::out_of_memory, "cannot size the worker ring to " + std::to_string(layout_.total_bytes) +
                                        " bytes: " + errno_text(errno));
    if (fcntl(memfd_, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) != 0)
        fail(Status::io, "cannot seal the worker ring: " + errno_text(errno));
    void* p = mmap(nullptr, layout_.total_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd_, 0);
    if (p == MAP_FAILED) fail(Status::out_of_memory, "cannot map the worker ring: " + errno_text(errno));
    map_ = static_cast<uint8_t*>(p);
    ring::init_header(header(), layout_);

    // The worker finds the ring at a fixed descriptor; every other inherited descriptor is closed.
    int child_fd = memfd_;
    if (child_fd == ring::kWorkerFd) {
        child_fd = fcntl(memfd_, F_DUPFD_CLOEXEC, ring::kWorkerFd + 1);
        if (child_fd < 0) fail(Status::io, "cannot duplicate the worker ring descriptor: " + errno_text(errno));
        close(memfd_);
        memfd_ = child_fd;
    }
    std::vector<std::string> args = worker_arguments(path_, opts_);
    args.insert(args.begin() + 1, "--ring-fd=" + std::to_string(ring::kWorkerFd));
    args.push_back("--spin-ns=" + std::to_string(std::chrono::nanoseconds(opts_.spin).count()));
    if (opts_.attest || !opts_.device_dir.empty()) {
        args.push_back("--attest");
        if (!worker_is_setuid(opts_)) {
            if (opts_.device_dir.empty())
                fail(Status::invalid_argument, "a development worker (not installed setuid) attests with the device "
                                               "files of a device directory: none given");
            args.push_back("--device-dir=" + opts_.device_dir);
        }
    }
    if (opts_.enclave_threads != 1) args.push_back("--threads=" + std::to_string(std::max(0, opts_.enclave_threads)));
    if (opts_.serve_cpu >= 0) args.push_back("--cpu=" + std::to_string(opts_.serve_cpu));
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    // An empty environment: nothing of the host's (LD_PRELOAD, LD_LIBRARY_PATH, OpenSSL's configuration and
    // modules, malloc tunables) reaches the process holding the secrets.
    char* envp[] = {nullptr};

    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    posix_spawn_file_actions_init(&fa);
    posix_spawnattr_init(&attr);
    posix_spawn_file_actions_adddup2(&fa, child_fd, ring::kWorkerFd);
    posix_spawn_file_actions_addclosefrom_np(&fa, ring::kWorkerFd + 1);
    // Default signal dispositions and an empty mask whatever the host set up; its own process group so a
    // terminal's Ctrl-C reaches the host, which then shuts the worker down in order.
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &all);
    posix_spawnattr_setpgroup(&attr, 0);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, path_.c_str(), &fa, &attr, argv.data(), envp);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    if (rc != 0) fail(Status::io, "cannot start the enclave worker " + path_ + ": " + errno_text(rc));
    pid_ = pid;
    pidfd_ = int(syscall(SYS_pidfd_open, pid_, 0));  // optional: only speeds up the exit wait

    // Wait for the worker's start-up report.
    const auto deadline = std::chrono::steady_clock::now() + opts_.start_timeout;
    uint32_t state = ring::load(header().worker_state);
    while (state == ring::state_starting) {
        state = ring::wait_change(header().worker_state, state, kLivenessSlice);
        if (state != ring::state_starting) break;
        if (!alive())
            fail(Status::internal, "enclave worker " + path_ + " died during start-up: " + dead_);
        if (std::chrono::steady_clock::now() > deadline) {
            kill_and_reap();
            fail(Status::internal, "enclave worker " + path_ + " did not start within " +
                                       std::to_string(opts_.start_timeout.count()) + " ms");
        }
    }
    ring::Header& h = header();
    const std::string note = clean_text(h.note, sizeof h.note);
    if (state != ring::state_ready) {
        const int32_t st = ring::load_i32(h.start_status);
        kill_and_reap();
        fail(status_from_code(st), "enclave worker failed to start: " + (note.empty() ? "no reason given" : note));
    }
    kind_ = std::atomic_ref<uint32_t>(h.secret_kind).load(std::memory_order_relaxed);
    if (kind_ != ring::secret_memfd_secret && kind_ != ring::secret_mlock)
        kind_ = ring::secret_unlocked;  // anything unknown is reported as the weakest
    const std::string why = note.empty() ? "" : " (" + note + ")";
    if (kind_ == ring::secret_mlock)
        warnings_.push_back("memfd_secret unavailable" + why +
                            ": the enclave worker's secret memory uses mlock + MADV_DONTDUMP; a privileged process "
                            "(root or CAP_SYS_PTRACE) can read it through /proc/PID/mem");
    if (kind_ == ring::secret_unlocked)
        warnings_.push_back("memfd_secret unavailable and mlock refused" + why +
                            ": the enclave worker's secret memory is neither hidden from privileged processes nor "
                            "locked (it may be written to swap); it runs only because insecure memory was allowed, and its "
                            "measured configuration says memory=unlocked; raise RLIMIT_MEMLOCK (ulimit -l)");
}

bool WorkerHostImpl::alive() {
    if (reaped_) return false;
    int status = 0;
    pid_t r;
    do r = waitpid(pid_, &status, WNOHANG);
    while (r < 0 && errno == EINTR);
    if (r == 0) return true;
    reaped_ = true;
    dead_ = r == pid_ ? describe_exit(status) : "exited (its exit status was collected elsewhere)";
    return false;
}

void WorkerHostImpl::fail_dead() { fail(Status::internal, "enclave worker died: " + dead_); }

void WorkerHostImpl::fail_broken(const std::string& what) {
    kill_and_reap();
    dead_ = "stopped after a protocol violation (" + what + ")";
    fail(Status::internal, "enclave worker " + what + "; the worker was stopped");
}

void WorkerHostImpl::send(std::span<const uint8_t> request) {
    if (!dead_.empty()) fail_dead();
    if (request.size() > layout_.request_capacity)
        fail(Status::invalid_argument, "enclave request of " + std::to_string(request.size()) +
                                           " bytes exceeds the worker ring's request area of " +
                                           std::to_string(layout_.request_capacity) + " bytes");
    ring::Header& h = header();
    if (!request.empty()) std::memcpy(map_ + layout_.request_offset, request.data(), request.size());
    ring::store64(h.request_len, request.size());
    ring::store(h.request_op, ring::op_process, std::memory_order_relaxed);
    const uint32_t seq = ++seq_;
    ring::store(h.request_seq, seq);  // release: the worker sees the bytes before the doorbell
    ring::wake_sleepers(h.request_seq, h.request_sleepers);
}

void WorkerHostImpl::receive(std::vector<uint8_t>& response) {
    ring::Header& h = header();
    const uint32_t seq = seq_;
    uint32_t v = ring::load(h.response_seq);
    while (v != seq) {
        v = ring::wait_change(h.response_seq, v, kLivenessSlice, spin_, &h.response_sleepers);
        if (v == seq) break;
        if (!alive()) fail_dead();
    }

    // Read once, check, then use only the checked copies.
    const int32_t status = ring::load_i32(h.response_status);
    const uint64_t len = ring::load64(h.response_len);
    if (len > layout_.response_capacity)
        fail_broken("reported a response of " + std::to_string(len) + " bytes, larger than the response area of " +
                    std::to_string(layout_.response_capacity) + " bytes");
    const uint8_t* out = map_ + layout_.response_offset;
    if (status == 0) {
        response.assign(out, out + len);
        return;
    }
    std::string msg = clean_text(reinterpret_cast<const char*>(out), std::min<uint64_t>(len, kMaxErrorMessage));
    if (msg.empty()) msg = "trusted core returned error " + std::to_string(status);
    fail(status_from_code(status), msg);
}

bool WorkerHostImpl::wait_exit(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (alive()) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline -
                                                                                std::chrono::steady_clock::now());
        if (left.count() <= 0) return false;
        if (pidfd_ >= 0) {
            pollfd pfd{pidfd_, POLLIN, 0};
            poll(&pfd, 1, int(std::min<int64_t>(left.count(), 100)));
        } else {
            usleep(1000);
        }
    }
    return true;
}

void WorkerHostImpl::kill_and_reap() {
    if (pid_ <= 0 || reaped_) return;
    kill(pid_, SIGKILL);
    int status = 0;
    pid_t r;
    do r = waitpid(pid_, &status, 0);
    while (r < 0 && errno == EINTR);
    reaped_ = true;
    if (dead_.empty()) dead_ = "stopped by the host";
}

void WorkerHostImpl::shutdown() {
    std::lock_guard<std::mutex> lock(mu_);
    if (pid_ > 0 && !reaped_) {
        if (map_) {
            ring::Header& h = header();
            ring::store(h.request_op, ring::op_exit, std::memory_order_relaxed);
            ring::store(h.request_seq, ++seq_);
            ring::wake(h.request_seq);
        }
        // The worker zeroes its secrets and exits; one that does not within the grace period is killed.
        if (!wait_exit(kExitGrace)) kill_and_reap();
    }
    if (pidfd_ >= 0) close(pidfd_);
    if (map_) munmap(map_, layout_.total_bytes);
    if (memfd_ >= 0) close(memfd_);
    pidfd_ = memfd_ = -1;
    map_ = nullptr;
}

}  // namespace

std::string default_worker_path() {
    if (const char* env = std::getenv("SI_WORKER"); env && *env) return env;
    char buf[PATH_MAX];
    const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n <= 0) fail(Status::io, "cannot locate the enclave worker: /proc/self/exe is unreadable; set SI_WORKER");
    return dirname_of(std::string(buf, size_t(n))) + "/secureinfer-worker";
}

bool worker_is_setuid(const WorkerOptions& o) {
    const std::string path = o.worker_path.empty() ? default_worker_path() : o.worker_path;
    struct stat st {};
    return stat(path.c_str(), &st) == 0 && (st.st_mode & S_ISUID) && st.st_uid != geteuid();
}

WorkerIdentity worker_identity(const WorkerOptions& o) {
    const std::string path = o.worker_path.empty() ? default_worker_path() : o.worker_path;
    if (access(path.c_str(), X_OK) != 0)
        fail(Status::io, "enclave worker executable " + path + " cannot be run: " + errno_text(errno));
    std::vector<std::string> args = worker_arguments(path, o);
    args.push_back("--measure");
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    char* envp[] = {nullptr};
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) != 0) fail(Status::io, "pipe: " + errno_text(errno));
    if (pipe2(err, O_CLOEXEC) != 0) {
        close(out[0]);
        close(out[1]);
        fail(Status::io, "pipe: " + errno_text(errno));
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, err[1], 2);
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, path.c_str(), &fa, nullptr, argv.data(), envp);
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    close(err[1]);
    // Both pipes drained together: the worker writes a line to one of them.
    std::string text[2];
    pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
    int open_fds = rc == 0 ? 2 : 0;
    while (open_fds > 0) {
        if (poll(fds, 2, 30000) <= 0) break;
        for (int i = 0; i < 2; ++i) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            char buf[4096];
            const ssize_t n = read(fds[i].fd, buf, sizeof buf);
            if (n > 0 && text[i].size() < 65536) text[i].append(buf, size_t(n));
            if (n <= 0) {
                fds[i].fd = -1;
                --open_fds;
            }
        }
    }
    close(out[0]);
    close(err[0]);
    if (rc != 0) fail(Status::io, "cannot start the enclave worker " + path + ": " + errno_text(rc));
    if (open_fds > 0) kill(pid, SIGKILL);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    WorkerIdentity id;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || text[0].size() < 66 || text[0][64] != ' ' ||
        !pkg::from_hex(std::string_view(text[0]).substr(0, 64), id.measurement)) {
        std::string why = clean_text(text[1].data(), std::min<size_t>(text[1].size(), kMaxErrorMessage));
        while (!why.empty() && why.back() == '?') why.pop_back();  // the trailing newline
        fail(Status::security, "enclave worker " + path + " could not measure itself (" + describe_exit(status) +
                                   (why.empty() ? "" : ": " + why) + ")");
    }
    id.config = clean_text(text[0].data() + 65, std::min<size_t>(text[0].size() - 65, 1024));
    while (!id.config.empty() && id.config.back() == '?') id.config.pop_back();  // the newline
    return id;
}

std::unique_ptr<WorkerHost> make_worker_host(const WorkerOptions& options) {
    auto host = std::make_unique<WorkerHostImpl>(options);
    host->start();  // on failure the destructor stops whatever was started
    return host;
}

}  // namespace si
