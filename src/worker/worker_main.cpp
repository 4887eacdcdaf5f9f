// secureinfer-worker: the hardened process that hosts the trusted core when there is no SGX (DESIGN.md section 3).
//
// Started by the host library (host/worker_host.cpp) with the shared-memory ring at descriptor 3 and an empty
// environment. Start-up, in this order: make the process non-dumpable and disable core dumps; map and check the
// ring; refuse to run under a tracer; reserve the secret arena (memfd_secret, else mlock + MADV_DONTDUMP; refuse
// when neither can be had, unless --insecure-memory) and route the trusted core's secret allocations to it; measure
// the code that runs here and the configuration; read the software TEE's device files; when root, switch to an
// unprivileged uid/gid; create the trusted core; install the seccomp allow-list. Then serve requests until the host
// says exit or goes away.
//
// Installed setuid/setgid to the software TEE's own user (scripts/provision-software-tee.sh), the worker reads that
// user's device files, which the host's user cannot (docs/SECURITY.md, "software-tee").
//
// The host is the adversary here: everything read from the ring is read once and bounds-checked before use, and
// requests are copied into private memory before the trusted core sees them (as SGX's [in] buffers are).
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <grp.h>
#include <sched.h>
#include <linux/capability.h>
#include <seccomp.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "boundary/enclave_abi.h"
#include "common/error.h"
#include "common/secret_memory.h"
#include "common/threadpool.h"
#include "enclave/package_crypto.h"
#include "host/shm_ring.h"
#include "host/software_tee.h"
#include "worker/secret_arena.h"

namespace {

using namespace std::chrono_literals;
namespace ring = si::ring;

// How often an idle worker checks that its host still exists (it exits once the host is gone).
constexpr auto kHostCheck = 1000ms;

// The largest secret arena a host may ask for (address space; memfd_secret charges it to RLIMIT_MEMLOCK).
constexpr uint64_t kMaxSecretBytes = uint64_t(64) << 30;

struct Args {
    int ring_fd = -1;
    size_t secret_bytes = size_t(256) << 20;
    uint64_t spin_ns = 0;
    uid_t uid = 65534;
    gid_t gid = 65534;
    bool try_memfd_secret = true;
    bool insecure_memory = false;  // run even when the secrets would sit in ordinary, swappable memory
    bool attest = false;           // set up the software TEE platform (attestation, sealing)
    bool measure = false;          // print the measurement this start-up gives, then exit (no ring)
    std::string device_dir;        // development credentials: the host user's device files
    std::string provision_dir;     // create a device's files there, then exit
    int threads = 1;         // the trusted core's loop threads (0: all CPUs)
    int cpu = -1;            // >= 0: the serving thread's only CPU
};

void say(const std::string& line) {
    const std::string s = "secureinfer-worker: " + line + "\n";
    [[maybe_unused]] ssize_t n = write(2, s.data(), s.size());
}

[[noreturn]] void usage(const std::string& why) {
    say(why);
    say("this program is started by the secureinfer library (with its shared-memory ring at descriptor 3), "
        "not by hand; see SI_WORKER");
    _exit(2);
}

bool parse_u64(const char* s, uint64_t& out) {
    if (!*s) return false;
    errno = 0;
    char* end = nullptr;
    const unsigned long long v = std::strtoull(s, &end, 10);
    if (errno || *end || s[0] == '-') return false;
    out = v;
    return true;
}

Args parse_args(int argc, char** argv) {
    Args a;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        const auto eq = arg.find('=');
        const std::string key = arg.substr(0, eq);
        const char* val = eq == std::string::npos ? "" : argv[i] + eq + 1;
        uint64_t v = 0;
        if (key == "--no-memfd-secret" && eq == std::string::npos) a.try_memfd_secret = false;
        else if (key == "--insecure-memory" && eq == std::string::npos) a.insecure_memory = true;
        else if (key == "--attest" && eq == std::string::npos) a.attest = true;
        else if (key == "--measure" && eq == std::string::npos) a.measure = true;
        else if (key == "--device-dir" && eq != std::string::npos && *val) a.device_dir = val;
        else if (key == "--provision-device" && eq != std::string::npos && *val) a.provision_dir = val;
        else if (!parse_u64(val, v)) usage("bad argument: " + arg);
        else if (key == "--ring-fd" && v <= 1024) a.ring_fd = int(v);
        else if (key == "--secret-bytes" && v > 0 && v <= kMaxSecretBytes) a.secret_bytes = size_t(v);
        else if (key == "--spin-ns" && v <= 1000000000ull) a.spin_ns = v;
        else if (key == "--cpu" && v < CPU_SETSIZE) a.cpu = int(v);
        else if (key == "--uid" && v < 0xffffffffull) a.uid = uid_t(v);
        else if (key == "--gid" && v < 0xffffffffull) a.gid = gid_t(v);
        else if (key == "--threads" && v <= 1024) a.threads = int(v);
        else usage("bad argument: " + arg);
    }
    if (a.ring_fd < 0 && !a.measure && a.provision_dir.empty()) usage("missing --ring-fd");
    if (!a.device_dir.empty()) a.attest = true;
    return a;
}

// Maps the ring and checks it. Before this succeeds there is no channel to the host, so errors go to stderr.
uint8_t* map_ring(int fd, ring::Layout& layout) {
    struct stat st {};
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) usage("no shared-memory ring at descriptor " + std::to_string(fd));
    // The seals guarantee the host cannot shrink the region under our mapping (a SIGBUS at its chosen moment).
    const int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW))
        usage("the ring at descriptor " + std::to_string(fd) + " is not a sealed memfd");
    const size_t bytes = size_t(st.st_size);
    if (bytes < ring::kPage) usage("the ring is too small");
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) usage(std::string("cannot map the ring: ") + std::strerror(errno));
    auto* base = static_cast<uint8_t*>(p);
    if (!ring::read_layout(*reinterpret_cast<ring::Header*>(base), bytes, SI_ENCLAVE_MAX_MESSAGE, layout))
        usage("the ring's header is inconsistent with its size");
    return base;
}

void put_note(ring::Header& h, const std::string& text) {
    const size_t n = std::min(text.size(), sizeof h.note - 1);
    std::memcpy(h.note, text.data(), n);
    h.note[n] = '\0';
}

// The ring once mapped; null in --measure mode, where failures go to stderr only.
ring::Header* g_header = nullptr;

// Reports a start-up failure to the host and exits.
[[noreturn]] void fail_start(si::Status status, const std::string& why) {
    say(why);
    if (ring::Header* h = g_header) {
        put_note(*h, why);
        ring::store_i32(h->start_status, int32_t(status));
        ring::store(h->worker_state, ring::state_failed);
        ring::wake(h->worker_state);
    }
    _exit(1);
}
[[noreturn]] void fail_start(ring::Header&, si::Status status, const std::string& why) { fail_start(status, why); }

// A tracer attached before exec (strace -f on the host) survives PR_SET_DUMPABLE and the seccomp filter: refuse.
void refuse_if_traced() {
    const int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail_start(si::Status::security, "cannot read /proc/self/status to check for a tracer");
    char buf[8192];
    ssize_t n = 0, r;
    while (n < ssize_t(sizeof buf) - 1 && (r = read(fd, buf + n, sizeof buf - 1 - size_t(n))) > 0) n += r;
    close(fd);
    buf[n] = '\0';
    const char* t = std::strstr(buf, "\nTracerPid:");
    if (!t) fail_start(si::Status::security, "/proc/self/status has no TracerPid line");
    const long tracer = std::strtol(t + 11, nullptr, 10);
    if (tracer != 0)
        fail_start(si::Status::security, "refusing to run under a tracer (TracerPid " + std::to_string(tracer) +
                                             "): a traced worker's memory and system calls are the tracer's");
}

// Drops every capability (a setuid worker may have CAP_IPC_LOCK from a file capability, for its secret arena).
void drop_capabilities() {
    __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[2] = {};
    if (syscall(SYS_capset, &hdr, data) != 0)
        fail_start(si::Status::security, std::string("cannot drop capabilities: ") + std::strerror(errno));
}

// Reads a whole file; fails start-up when it cannot.
std::vector<uint8_t> read_all(const std::string& path) {
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail_start(si::Status::io, path + ": cannot open (" + std::strerror(errno) + ")");
    std::vector<uint8_t> data;
    uint8_t buf[1 << 16];
    for (ssize_t r; (r = read(fd, buf, sizeof buf)) != 0;) {
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) fail_start(si::Status::io, path + ": read error");
        data.insert(data.end(), buf, buf + r);
    }
    close(fd);
    return data;
}

// What runs in this process: the executable, and every other file mapped executable (none in the static release
// build; the loader, libc and the sanitizer runtimes in a sanitizer build). The environment is empty and the
// loader in secure-execution mode when setuid, so these come from the system's library paths only.
si::pkg::Hash measure_code() {
    std::vector<uint8_t> m = {'s', 'i', '-', 'c', 'o', 'd', 'e', '-', 'v', '1', 0};
    const si::pkg::Hash exe = si::pkg::sha256(read_all("/proc/self/exe"));
    m.insert(m.end(), exe.begin(), exe.end());
    char self[4096];
    const ssize_t sn = readlink("/proc/self/exe", self, sizeof self - 1);
    const std::string self_path(self, sn > 0 ? size_t(sn) : 0);
    const std::vector<uint8_t> maps = read_all("/proc/self/maps");
    std::vector<std::string> objects;
    size_t at = 0;
    while (at < maps.size()) {
        size_t end = at;
        while (end < maps.size() && maps[end] != '\n') ++end;
        const std::string line(maps.begin() + long(at), maps.begin() + long(end));
        at = end + 1;
        // start-end perms offset dev inode path
        char perms[8] = {};
        unsigned long inode = 0;
        int path_at = 0;
        if (std::sscanf(line.c_str(), "%*x-%*x %7s %*x %*x:%*x %lu %n", perms, &inode, &path_at) < 2) continue;
        if (perms[2] != 'x' || inode == 0 || path_at <= 0 || line[size_t(path_at)] != '/') continue;
        const std::string path = line.substr(size_t(path_at));
        if (path != self_path && std::find(objects.begin(), objects.end(), path) == objects.end())
            objects.push_back(path);
    }
    std::sort(objects.begin(), objects.end());
    for (const auto& path : objects) {
        const si::pkg::Hash h = si::pkg::sha256(read_all(path));
        m.insert(m.end(), path.begin(), path.end());
        m.push_back(0);
        m.insert(m.end(), h.begin(), h.end());
    }
    return si::pkg::sha256(m);
}

bool is_root() { return getuid() == 0 || geteuid() == 0; }

void drop_privileges(ring::Header& h, const Args& a) {
    if (!is_root()) return;
    if (setgroups(0, nullptr) != 0 || setresgid(a.gid, a.gid, a.gid) != 0 || setresuid(a.uid, a.uid, a.uid) != 0)
        fail_start(h, si::Status::security,
                   "cannot switch from root to uid " + std::to_string(a.uid) + " / gid " + std::to_string(a.gid) +
                       ": " + std::strerror(errno));
    uid_t r, e, s;
    gid_t gr, ge, gs;
    if (getresuid(&r, &e, &s) != 0 || getresgid(&gr, &ge, &gs) != 0 || r != a.uid || e != a.uid || s != a.uid ||
        gr != a.gid || ge != a.gid || gs != a.gid || setuid(0) == 0)
        fail_start(h, si::Status::security, "switching away from root did not take effect");
    // A credential change resets the dumpable flag to fs.suid_dumpable; set it again.
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}

// OpenSSL keeps expanded keys and its random generator's state in its own allocations: they go to the secret arena
// too. A header in front of each block records its size (OpenSSL's free does not pass it).
constexpr size_t kBlockHeader = 64;  // keeps the arena's 64-byte alignment

void* openssl_malloc(size_t n, const char*, int) {
    if (n > SIZE_MAX - kBlockHeader) return nullptr;
    auto* p = static_cast<uint8_t*>(si_secret_alloc(n + kBlockHeader));
    if (!p) return nullptr;
    std::memcpy(p, &n, sizeof n);
    return p + kBlockHeader;
}

void openssl_free(void* q, const char*, int) {
    if (!q) return;
    uint8_t* p = static_cast<uint8_t*>(q) - kBlockHeader;
    size_t n;
    std::memcpy(&n, p, sizeof n);
    si_secret_free(p, n + kBlockHeader);
}

void* openssl_realloc(void* q, size_t n, const char* file, int line) {
    if (!q) return openssl_malloc(n, file, line);
    if (n == 0) {
        openssl_free(q, file, line);
        return nullptr;
    }
    size_t old;
    std::memcpy(&old, static_cast<uint8_t*>(q) - kBlockHeader, sizeof old);
    void* r = openssl_malloc(n, file, line);
    if (!r) return nullptr;
    std::memcpy(r, q, std::min(old, n));
    openssl_free(q, file, line);  // zeroes the old copy
    return r;
}

// Loads OpenSSL's providers and random generator now, while files may still be opened: under the seccomp filter
// only getrandom remains. The configuration file is never read: it is the host's to write.
// The first exception a process throws sets up the unwinder lazily (in the sanitizer builds through system calls
// the seccomp filter refuses): one is thrown and caught before the filter, as the core's errors are exceptions.
void warm_up_exceptions() {
    try {
        throw si::Error(si::Status::internal, "warm-up");
    } catch (const si::Error&) {
    }
}

void warm_up_openssl() {
    OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG | OPENSSL_INIT_ADD_ALL_CIPHERS | OPENSSL_INIT_ADD_ALL_DIGESTS,
                        nullptr);
    for (const char* name : {"AES-256-CTR", "AES-256-GCM", "AES-128-ECB"})
        EVP_CIPHER_free(EVP_CIPHER_fetch(nullptr, name, nullptr));
    EVP_MD_free(EVP_MD_fetch(nullptr, "SHA256", nullptr));
    si::pkg::warm_up();  // HKDF, HMAC, X25519, Ed25519: attestation and packages
    unsigned char b[32];
    RAND_bytes(b, sizeof b);
    RAND_priv_bytes(b, sizeof b);
    OPENSSL_cleanse(b, sizeof b);
}

// A call outside the allow-list traps here: the handler names the call on stderr (async-signal-safe: write, getpid,
// gettid and tgkill are allowed) and the process then dies of SIGSYS, which the host reports.
void on_forbidden_syscall(int, siginfo_t* info, void*) {
    char msg[] = "secureinfer-worker: forbidden system call 0000000000, stopping\n";
    char* digits = msg + sizeof("secureinfer-worker: forbidden system call ") - 1;
    unsigned v = unsigned(info->si_syscall);
    for (int i = 9; i >= 0; --i, v /= 10) digits[i] = char('0' + v % 10);
    [[maybe_unused]] ssize_t n = write(2, msg, sizeof msg - 1);
    // SA_RESETHAND restored the default action and SA_NODEFER left SIGSYS unblocked: this kills the process.
    syscall(SYS_tgkill, getpid(), syscall(SYS_gettid), SIGSYS);
    _exit(128 + SIGSYS);
}

// The allow-list for the serving loop. Anything else traps (on_forbidden_syscall) and kills the process (SIGSYS),
// which the host reports.
std::string install_seccomp() {
    struct sigaction sa {};
    sa.sa_sigaction = on_forbidden_syscall;
    sa.sa_flags = SA_SIGINFO | SA_RESETHAND | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSYS, &sa, nullptr) != 0) return std::string("cannot install the SIGSYS handler: ") + std::strerror(errno);
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_TRAP);
    if (!ctx) return "seccomp_init failed";
    int rc = 0;
    auto allow = [&](int nr) {
        if (rc == 0) rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
    };
    allow(SCMP_SYS(futex));           // doorbells (and any lock inside the core or libc)
    allow(SCMP_SYS(getppid));         // is the host still there?
    allow(SCMP_SYS(brk));             // the heap
    allow(SCMP_SYS(munmap));
    allow(SCMP_SYS(mremap));
    allow(SCMP_SYS(madvise));
    allow(SCMP_SYS(getrandom));       // OpenSSL's random generator (mask keys)
    allow(SCMP_SYS(clock_gettime));   // when the vDSO falls back to the system call
    allow(SCMP_SYS(rt_sigreturn));
    allow(SCMP_SYS(rt_sigprocmask));  // abort() blocks signals before raising SIGABRT
    allow(SCMP_SYS(sigaltstack));     // queried by the sanitizer runtimes on throw, abort and exit
    allow(SCMP_SYS(getpid));
    allow(SCMP_SYS(gettid));
    allow(SCMP_SYS(exit));
    allow(SCMP_SYS(exit_group));
    // No new executable memory: memory may be mapped or protected only without PROT_EXEC.
    if (rc == 0)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(mmap), 1, SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0));
    if (rc == 0)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(mprotect), 1,
                              SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0));
    // Logs: stdout and stderr only.
    if (rc == 0) rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(write), 1, SCMP_A0(SCMP_CMP_EQ, 1));
    if (rc == 0) rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(write), 1, SCMP_A0(SCMP_CMP_EQ, 2));
    // Signals to itself only (abort() raises SIGABRT with tgkill).
    if (rc == 0)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(tgkill), 1, SCMP_A0(SCMP_CMP_EQ, uint64_t(getpid())));
    // Every thread gets the filter, including any the core or a library started during initialisation; threads
    // cannot be created afterwards (clone is not allowed). no_new_privs is set by seccomp_load (libseccomp's
    // default), so this works without CAP_SYS_ADMIN.
    if (rc == 0) rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1);
    if (rc == 0) rc = seccomp_load(ctx);
    seccomp_release(ctx);
    return rc == 0 ? "" : std::string("cannot install the seccomp filter: ") + std::strerror(-rc);
}

// What the core's loops may do on a pool thread, done once on each before the seccomp filter: the thread's malloc
// arena (glibc sizes arenas by counting CPUs, through files) and OpenSSL's per-thread state, as sealing
// precomputed unblinding factors in parallel uses AES-256-GCM from these threads.
void warm_up_thread() {
    void* p = std::malloc(size_t(1) << 20);
    if (p) std::memset(p, 0, size_t(1) << 20);
    std::free(p);
    uint8_t key[32], iv[12], plain[64] = {}, sealed[64 + 16];
    RAND_bytes(key, sizeof key);
    RAND_bytes(iv, sizeof iv);
    si::pkg::gcm_seal(key, iv, {}, plain, sizeof plain, sealed);
    (void)si::pkg::gcm_open(key, iv, {}, sealed, sizeof plain, plain);
    OPENSSL_cleanse(key, sizeof key);
}

// The trusted core's parallel loops run on a pool started before the seccomp filter (which admits no clone; the
// filter is synchronised onto these threads too).
constexpr int kEnclaveSpin = 2000;  // the core's loops are rare and long: its threads sleep soon after each

void parallel_for_ocall(void* ctx, int64_t n, int64_t grain, void (*fn)(void*, int64_t, int64_t), void* arg) {
    static_cast<si::ThreadPool*>(ctx)->parallel_for(n, grain, [&](int64_t b, int64_t e) { fn(arg, b, e); });
}

void log_ocall(void*, int level, const char* message) {
    static const char* const kLevel[] = {"info", "warning", "error"};
    const size_t n = message ? strnlen(message, 4096) : 0;
    say(std::string("enclave ") + kLevel[level < 0 ? 0 : level > 2 ? 2 : level] + ": " + std::string(message, n));
}

int process_ocall(void* enclave, const uint8_t* req, size_t n, uint8_t* resp, size_t cap, size_t* len) {
    return si_ecall_process(static_cast<si_enclave*>(enclave), req, n, resp, cap, len);
}

void serve(ring::Header& h, uint8_t* base, const ring::Layout& l, si_enclave* enclave, std::chrono::nanoseconds spin,
           pid_t host) {
    // The ECALL works as SGX's marshalling does: si_ecall_process copies the request into the core's secret memory
    // before reading it (so the host cannot change it under the core) and writes the finished response at the end.
    // The shared areas are therefore handed to it directly, without private copies on this side.
    uint32_t last = 0;  // the host's first request is sequence 1
    for (;;) {
        uint32_t seq = ring::load(h.request_seq);
        while (seq == last) {
            seq = ring::wait_change(h.request_seq, last, kHostCheck, spin, &h.request_sleepers);
            if (seq == last && getppid() != host) return;  // orphaned: the host died without saying goodbye
        }
        last = seq;
        if (!ring::answer(h, base, l, seq, process_ocall, enclave)) return;
    }
}

}  // namespace

// The secured part of start-up and the serving loop run on a thread whose stack lies in the secret arena: the
// trusted core's frames hold plaintext (libcrypto's block buffers, spilled rows of secret tensors, the device keys
// while they are derived), and an ordinary stack is readable by root through /proc/PID/mem. The thread is detached
// and ends the process itself: joining it would wait on a futex in its stack, which the kernel cannot reach in
// memfd_secret memory. Its TLS lies there too (glibc keeps it at the top of a caller-provided stack).
constexpr size_t kPage = 4096;
constexpr size_t kSecretStackBytes = size_t(8) << 20;

struct Secured {
    const Args* args = nullptr;
    si::SecretArena* arena = nullptr;  // owned until the process ends
    si::tee::Credentials creds = si::tee::Credentials::development;
    uid_t euid = 0;
    pid_t host = 0;
    ring::Layout layout{};
    uint8_t* base = nullptr;
    void* stack = nullptr;  // the arena block holding the thread's stack
};
[[noreturn]] void serve_secured(const Secured& s);

[[noreturn]] void run_on_secret_stack(si::SecretArena& arena, void*& stack_block, void (*fn)()) {
    static void (*body)() = nullptr;
    body = fn;
    void* block = arena.allocate(kSecretStackBytes + kPage);
    if (!block) fail_start(si::Status::out_of_memory, "no room in the secret arena for the serving thread's stack");
    stack_block = block;
    auto* lo = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(block) + kPage - 1) & ~uintptr_t(kPage - 1));
    // A guard page below the stack: an overflow faults instead of running into other secret buffers.
    if (mprotect(lo, kPage, PROT_NONE) != 0) fail_start(si::Status::internal, "cannot protect the stack's guard page");
    pthread_attr_t attr;
    pthread_t thread;
    const size_t bytes = kSecretStackBytes - (size_t(lo - static_cast<uint8_t*>(block)));
    if (pthread_attr_init(&attr) != 0 || pthread_attr_setstack(&attr, lo + kPage, bytes) != 0 ||
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED) != 0 ||
        pthread_create(
            &thread, &attr,
            [](void*) -> void* {
                body();
                return nullptr;
            },
            nullptr) != 0)
        fail_start(si::Status::internal, "cannot start the serving thread on its secret stack");
    pthread_attr_destroy(&attr);
    // Wait for good on a private futex in ordinary memory: futex is on the seccomp allow-list (pause is not, and a
    // signal, such as glibc's when the serving thread changes credentials, restarts the wait).
    static uint32_t never = 0;
    for (;;) syscall(SYS_futex, &never, FUTEX_WAIT_PRIVATE, 0, nullptr, nullptr, 0);
}

int main(int argc, char** argv) {
    // First, before anything secret exists: no ptrace or /proc/PID/mem access by same-uid processes, no core dumps.
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    const rlimit no_core{0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    // Nothing the starter chose steers this process: the host passes an empty environment; someone starting the
    // worker by hand may not (a setuid worker's loader already ignored LD_*, the static build loads nothing).
    clearenv();
    // Installed setuid to the software TEE's user: the effective uid differs from the starter's. The real uid stays
    // the starter's, so that the host can still stop the worker (signals); tracing and reading its memory need all
    // three uids to match.
    uid_t ruid = 0, euid = 0, suid = 0;
    getresuid(&ruid, &euid, &suid);
    const si::tee::Credentials creds =
        euid != ruid ? si::tee::Credentials::system : si::tee::Credentials::development;

    const Args args = parse_args(argc, argv);
    if (!args.provision_dir.empty()) {
        // Run by the provisioning script as the software TEE's user; prints the public quoting key. Not for a
        // starter who is someone else: it would create files as that user wherever the starter names.
        if (creds == si::tee::Credentials::system)
            fail_start(si::Status::security, "--provision-device runs as the device's user only "
                                             "(scripts/provision-software-tee.sh)");
        umask(022);
        try {
            si::tee::provision_device(args.provision_dir, true);
            std::printf("%s\n", si::tee::quoting_public_hex(args.provision_dir).c_str());
            std::fflush(stdout);
        } catch (const si::Error& e) {
            fail_start(e.status(), e.what());
        }
        _exit(0);
    }
    const pid_t host = getppid();
    ring::Layout layout;
    uint8_t* base = nullptr;
    if (!args.measure) {
        base = map_ring(args.ring_fd, layout);
        g_header = reinterpret_cast<ring::Header*>(base);
    }
    // The mapping is all the worker needs; no descriptor beyond stdin/stdout/stderr stays open.
    close_range(3, ~0u, 0);
    refuse_if_traced();

    // The secret arena is reserved while still root: memfd_secret and mlock charge the locked-memory limit, which
    // CAP_IPC_LOCK lifts (and CAP_SYS_RESOURCE can raise), while the unprivileged uid may have only a few MiB.
    std::unique_ptr<si::SecretArena> arena;
    try {
        if (is_root() && creds == si::tee::Credentials::development) {
            const rlimit unlimited{RLIM_INFINITY, RLIM_INFINITY};
            setrlimit(RLIMIT_MEMLOCK, &unlimited);  // best effort; CAP_IPC_LOCK covers the arena regardless
        }
        arena = si::SecretArena::create(args.secret_bytes + kSecretStackBytes + kPage, args.try_memfd_secret);
    } catch (const si::Error& e) {
        fail_start(e.status(), e.what());
    }
    // Fail closed: secrets in ordinary memory only when asked for, and then the measurement says so.
    if (arena->kind() == si::SecretMemoryKind::unlocked && !args.insecure_memory)
        fail_start(si::Status::security,
                   "no secret memory for " + std::to_string(arena->capacity()) + " bytes (" + arena->note() +
                       "): refusing to keep secrets in ordinary memory; raise the locked-memory limit (ulimit -l) "
                       "or pass --insecure-memory");
    if (creds == si::tee::Credentials::system) drop_capabilities();  // CAP_IPC_LOCK was for the arena only
    arena->install();
    // Must come before OpenSSL's first allocation; only fails if something allocated through OpenSSL already.
    if (CRYPTO_set_mem_functions(openssl_malloc, openssl_realloc, openssl_free) != 1)
        fail_start(si::Status::internal, "cannot route OpenSSL's allocations to the secret arena");

    // From here on every secret is on the stack of a thread in the arena (run_on_secret_stack).
    static Secured secured;
    secured = Secured{&args, arena.release(), creds, euid, host, layout, base};
    run_on_secret_stack(*secured.arena, secured.stack, [] { serve_secured(secured); });
}

[[noreturn]] void serve_secured(const Secured& s) {
    const Args& args = *s.args;
    si::SecretArena* const arena = s.arena;
    const si::tee::Credentials creds = s.creds;
    const uid_t euid = s.euid;
    const pid_t host = s.host;
    const ring::Layout layout = s.layout;
    uint8_t* const base = s.base;
    // The measurement: the code in this process and its security configuration, including what it actually got.
    uint32_t serve_uid = uint32_t(args.uid), serve_gid = uint32_t(args.gid);
    if (creds == si::tee::Credentials::system) {
        serve_uid = uint32_t(euid);
        serve_gid = uint32_t(getegid());
    } else if (!is_root()) {
        serve_uid = uint32_t(getuid());
        serve_gid = uint32_t(getgid());
    }
    const std::string config =
        si::tee::worker_config(si::secret_memory_kind_config(arena->kind()), creds, serve_uid, serve_gid);
    const si::pkg::Hash measurement = si::tee::measurement(measure_code(), config);
    if (args.measure) {
        std::printf("%s %s\n", si::pkg::to_hex(measurement).c_str(), config.c_str());
        std::fflush(stdout);
        _exit(0);
    }
    ring::Header& h = *g_header;

    // The software TEE's platform (sealing key, quoting), read while the device files are still reachable. A
    // setuid worker uses its own user's device and nothing else; a development worker the host user's.
    std::unique_ptr<si::tee::SoftwarePlatform> platform;
    if (args.attest) {
        std::string dir = args.device_dir;
        if (creds == si::tee::Credentials::system) {
            if (!dir.empty())
                fail_start(si::Status::invalid_argument,
                           "--device-dir is for development workers: this one runs as uid " + std::to_string(euid) +
                               " and uses that user's device");
            dir = si::tee::passwd_home(uint32_t(euid));
            if (dir.empty())
                fail_start(si::Status::io, "uid " + std::to_string(euid) + " has no home directory in /etc/passwd");
            dir += "/device";
        } else if (dir.empty()) {
            fail_start(si::Status::invalid_argument, "--attest needs --device-dir in a development worker");
        }
        try {
            platform = std::make_unique<si::tee::SoftwarePlatform>(dir, measurement);
        } catch (const si::Error& e) {
            fail_start(e.status(), std::string("software TEE platform: ") + e.what());
        }
    }

    if (creds == si::tee::Credentials::development) drop_privileges(h, args);

    warm_up_openssl();
    warm_up_exceptions();
    // Started, and running, before the seccomp filter (ThreadPool returns once every thread runs).
    std::unique_ptr<si::ThreadPool> pool;
    if (args.threads != 1) {
        pool = std::make_unique<si::ThreadPool>(args.threads, kEnclaveSpin);
        pool->run_on_each_thread(warm_up_thread);
    }
    const si_ocall_table ocalls{log_ocall, pool.get(), pool ? parallel_for_ocall : nullptr};
    si_enclave* enclave = nullptr;
    const int rc = si_ecall_create_ex(&ocalls, platform ? platform->get() : nullptr, &enclave);
    if (rc != 0 || !enclave)
        fail_start(h, si::Status(ring::checked_status(rc ? rc : int(si::Status::internal))),
                   "trusted core failed to start (si_ecall_create returned " + std::to_string(rc) + ")");

    // After the loop threads started (they keep every CPU), before the filter (which admits no affinity call).
    if (args.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(args.cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0)
            fail_start(h, si::Status::invalid_argument,
                       "cannot run on CPU " + std::to_string(args.cpu) + ": " + std::strerror(errno));
    }

    refuse_if_traced();  // again: the credential change above briefly reset the dumpable flag
    if (const std::string err = install_seccomp(); !err.empty()) fail_start(h, si::Status::security, err);

    // Serving: report which secret memory is in use (and why, for a fallback), then ring the start-up doorbell.
    put_note(h, arena->note());
    const ring::SecretKind kind = arena->kind() == si::SecretMemoryKind::memfd_secret ? ring::secret_memfd_secret
                                  : arena->kind() == si::SecretMemoryKind::mlock       ? ring::secret_mlock
                                                                                       : ring::secret_unlocked;
    std::atomic_ref<uint32_t>(h.secret_kind).store(kind, std::memory_order_relaxed);
    ring::store(h.worker_state, ring::state_ready);
    ring::wake(h.worker_state);

    serve(h, base, layout, enclave, std::chrono::nanoseconds(args.spin_ns), host);

    si_ecall_destroy(enclave);                 // zeroes the core's secrets
    arena->wipe_all_except(s.stack);           // and anything the core or OpenSSL left allocated
    _exit(0);  // ends the process (the main thread waits on a futex); no atexit handlers: they might need system
               // calls outside the allow-list
}
