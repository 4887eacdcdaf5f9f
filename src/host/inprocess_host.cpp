// The in-process enclave host: the trusted core linked into the calling process. No isolation at all; for unit
// tests and debugging only.
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>

#include "boundary/enclave_abi.h"
#include "common/error.h"
#include "common/threadpool.h"
#include "host/enclave_host.h"
#include "host/software_tee.h"

namespace si {

namespace {

Status status_from_code(int rc) {
    return rc <= int(Status::invalid_argument) && rc >= int(Status::internal) ? Status(rc) : Status::internal;
}

void log_to_stderr(void*, int level, const char* message) {
    static const char* const kLevel[] = {"info", "warning", "error"};
    std::fprintf(stderr, "secureinfer enclave %s: %s\n", kLevel[level < 0 ? 0 : level > 2 ? 2 : level],
                 message ? message : "");
}

class InProcessHost final : public EnclaveHost {
public:
    explicit InProcessHost(const std::string& device_dir = "", int enclave_threads = 1) {
        if (enclave_threads != 1) {
            pool_ = std::make_unique<ThreadPool>(enclave_threads, kEnclaveSpin);
            ocalls_.ctx = pool_.get();
            ocalls_.parallel_for = pool_parallel_for;
        }
        if (!device_dir.empty())
            platform_ = std::make_unique<tee::SoftwarePlatform>(device_dir, inprocess_measurement());
        const int rc = si_ecall_create_ex(&ocalls_, platform_ ? platform_->get() : nullptr, &enclave_);
        if (rc != 0) fail(status_from_code(rc), "trusted core failed to start (si_ecall_create returned " +
                                                    std::to_string(rc) + ")");
    }
    ~InProcessHost() override {
        if (enclave_) si_ecall_destroy(enclave_);
    }

    std::string isolation() const override { return "no isolation (in-process; for tests only)"; }
    std::vector<std::string> warnings() const override {
        return {"the trusted core runs inside the host process: secrets are not isolated"};
    }

    void call(std::span<const uint8_t> request, std::vector<uint8_t>& response) override {
        std::lock_guard<std::mutex> lock(mu_);
        // One buffer of the largest response size, kept for the host's lifetime. new[] without value
        // initialisation only reserves address space; pages are committed as responses touch them.
        if (!buffer_) buffer_.reset(new uint8_t[SI_ENCLAVE_MAX_MESSAGE]);
        buffer_[0] = 0;  // an error without a message reads as empty
        size_t len = 0;
        static const uint8_t kEmpty = 0;  // never hand the core a NULL request pointer
        const int rc = si_ecall_process(enclave_, request.empty() ? &kEmpty : request.data(), request.size(),
                                        buffer_.get(),
                                        SI_ENCLAVE_MAX_MESSAGE, &len);
        if (rc == 0) {
            if (len > SI_ENCLAVE_MAX_MESSAGE)
                fail(Status::internal, "trusted core reported a response of " + std::to_string(len) +
                                           " bytes, larger than its buffer");
            response.assign(buffer_.get(), buffer_.get() + len);
            return;
        }
        const char* msg = reinterpret_cast<const char*>(buffer_.get());
        const size_t n = strnlen(msg, 4096);
        fail(status_from_code(rc), n ? std::string(msg, n) : "trusted core returned error " + std::to_string(rc));
    }

private:
    // The core's loops are rare and long (matrix products): its threads sleep soon after each.
    static constexpr int kEnclaveSpin = 2000;
    static void pool_parallel_for(void* ctx, int64_t n, int64_t grain, void (*fn)(void*, int64_t, int64_t), void* arg) {
        static_cast<ThreadPool*>(ctx)->parallel_for(n, grain, [&](int64_t b, int64_t e) { fn(arg, b, e); });
    }

    std::unique_ptr<ThreadPool> pool_;  // declared before the core's handle: outlives it
    si_ocall_table ocalls_{log_to_stderr, nullptr, nullptr};
    std::unique_ptr<tee::SoftwarePlatform> platform_;  // outlives the core, which calls its quoting component
    si_enclave* enclave_ = nullptr;
    std::unique_ptr<uint8_t[]> buffer_;
    std::mutex mu_;
};

}  // namespace

std::unique_ptr<EnclaveHost> make_inprocess_host() { return std::make_unique<InProcessHost>(); }

std::unique_ptr<EnclaveHost> make_inprocess_host(const std::string& device_dir, int enclave_threads) {
    return std::make_unique<InProcessHost>(device_dir, enclave_threads);
}

std::array<uint8_t, 32> inprocess_measurement() {
    static const pkg::Hash binary = tee::file_sha256("/proc/self/exe");  // hashed once per process
    return tee::measurement(binary, tee::inprocess_config());
}

}  // namespace si
