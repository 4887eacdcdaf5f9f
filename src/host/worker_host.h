// The hardened worker process: the default enclave host without SGX hardware (DESIGN.md section 3).
//
// The trusted core runs in a separate process (secureinfer-worker) that keeps its secrets in memfd_secret memory,
// is non-dumpable, has core dumps off, runs under its own unprivileged uid when started as root, and serves
// requests under a seccomp allow-list. Host and worker exchange messages through a sealed memfd shared-memory ring
// with futex doorbells (host/shm_ring.h).
#pragma once
#include <sys/types.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "boundary/enclave_abi.h"
#include "host/enclave_host.h"

namespace si {

struct WorkerOptions {
    // The worker executable. Empty: $SI_WORKER when set, else `secureinfer-worker` next to the running executable.
    std::string worker_path;
    // Capacity of the request area and of the response area: the largest message either way.
    // 1 .. SI_ENCLAVE_MAX_MESSAGE; pages are committed only as messages use them.
    size_t ring_bytes = SI_ENCLAVE_MAX_MESSAGE;
    // Busy-wait this long on a doorbell before sleeping on the futex, on both sides; trades a CPU core for a few
    // microseconds per call. Zero (the default): never spin.
    std::chrono::microseconds spin{0};
    // Address space reserved for the trusted core's secret memory; committed only as the core uses it, but charged
    // whole to the locked-memory limit (RLIMIT_MEMLOCK) by memfd_secret: size it to the model's secret working set
    // (secret_working_set in host/secure_session.h). At most kMaxSecretArenaBytes.
    size_t secret_arena_bytes = size_t(256) << 20;
    // A worker started as root switches to this uid and gid (nobody) before it touches a secret.
    uint32_t run_as_uid = 65534;
    uint32_t run_as_gid = 65534;
    // How long start-up (including the trusted core's si_ecall_create) may take.
    std::chrono::milliseconds start_timeout{30000};
    // Testing only: skip memfd_secret so the fallback path runs on kernels that have it.
    bool force_secret_fallback = false;
    // Without memfd_secret or mlock the worker refuses to start; with this it runs on ordinary memory, and its
    // measured configuration says memory=unlocked.
    bool insecure_memory = false;
    // Set up the software TEE platform (attestation, sealing); a non-empty device_dir implies it. A worker installed
    // setuid to the software TEE's user (worker_is_setuid) uses that user's device files and device_dir is not
    // passed to it; any other worker uses those in device_dir, which must then be set.
    bool attest = false;
    std::string device_dir;
    // Threads of the trusted core's parallel loops, started before the worker's seccomp filter (0: all CPUs).
    int enclave_threads = 1;
    // >= 0: the worker's serving thread runs on this CPU only (its loop threads keep every CPU). Put the thread
    // that calls the worker on the same CPU and a doorbell becomes a switch between two threads of one CPU
    // instead of a wake-up of a sleeping one (an inter-processor interrupt, costly in a virtual machine).
    int serve_cpu = -1;
};

class WorkerHost : public EnclaveHost {
public:
    // The worker's process id (for diagnostics and tests).
    virtual pid_t pid() const = 0;
    // The secret memory in use: "memfd_secret", "mlock + MADV_DONTDUMP" or "MADV_DONTDUMP only (not locked)".
    virtual std::string secret_memory() const = 0;
};

// Starts a worker and waits until it is serving. Throws si::Error when the executable cannot be found or started,
// or when the worker reports a start-up failure (its message included).
std::unique_ptr<WorkerHost> make_worker_host(const WorkerOptions& options = {});

// Where make_worker_host looks for the worker when WorkerOptions::worker_path is empty.
std::string default_worker_path();

inline constexpr size_t kMaxSecretArenaBytes = size_t(64) << 30;

// system: the worker executable is installed setuid to another user (the software TEE's own device files);
// development: it runs as the caller and uses the caller's device files.
bool worker_is_setuid(const WorkerOptions& options = {});

// The measurement a worker started with these options reports (the code it runs and its security
// configuration, including the secret memory it obtains): the worker computes it itself (--measure).
struct WorkerIdentity {
    std::array<uint8_t, 32> measurement{};
    // "secureinfer-worker abi=N memory=memfd_secret|mlock|unlocked credentials=system|development uid=U gid=G"
    std::string config;
};
WorkerIdentity worker_identity(const WorkerOptions& options = {});
inline std::array<uint8_t, 32> worker_measurement(const WorkerOptions& options = {}) {
    return worker_identity(options).measurement;
}

}  // namespace si
