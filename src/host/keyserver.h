// Attestation-gated key release (docs/PACKAGES.md): the model owner's keyserver and its client.
//
// Protocol (HTTP on loopback or behind the owner's TLS front end; JSON bodies, binary fields as hex):
//   POST /v1/nonce                              -> {"nonce": 32 bytes}
//   POST /v1/key {"quote": ..., "model_id": ...} -> {"wrapped_key": 80 bytes}  or  403 {"error": "..."}
// The keyserver verifies the quote's Ed25519 signature, its type, the measurement against its allow list and the
// nonce (issued by it, unused, fresh), then derives the package's model key from the owner key and wraps it to the
// ephemeral X25519 key in the report (enclave/package_crypto.h): only that enclave instance can open it.
#pragma once
#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "enclave/package_crypto.h"

namespace si {

struct AttestationPolicy {
    std::vector<pkg::Hash> allowed_measurements;
    // software-tee quotes come from no hardware root of trust: refused unless this is set.
    bool accept_software_tee = false;
    // When set, quotes must be signed by this quoting key (pinning a device's software-tee quoting key).
    std::optional<pkg::PubKey> quoting_key;
};

// Checks a quote's signature, type and measurement (not its nonce). Returns the report; throws
// si::Error(Status::security) naming the reason. `warn` (may be empty) is told when a software-tee quote is accepted.
pkg::Report verify_quote(std::span<const uint8_t> quote, const AttestationPolicy& policy,
                         const std::function<void(const std::string&)>& warn = nullptr);

// The keyserver's logic, without HTTP.
class KeyService {
public:
    using Clock = std::chrono::steady_clock;
    KeyService(const pkg::Key& owner_key, AttestationPolicy policy, std::chrono::seconds nonce_ttl = std::chrono::seconds(60));
    ~KeyService();

    pkg::Nonce new_nonce();
    // Verifies the quote and its nonce (consumed: a nonce serves one release) and returns the wrapped model key.
    // Throws si::Error(Status::security) with the reason.
    std::array<uint8_t, pkg::kWrappedBytes> release(std::span<const uint8_t> quote, const pkg::ModelId& model_id);

    // Where warnings go (default: stderr), and the clock (tests).
    void set_warn(std::function<void(const std::string&)> w) { warn_ = std::move(w); }
    void set_clock(std::function<Clock::time_point()> now) { now_ = std::move(now); }

private:
    pkg::Key owner_;
    AttestationPolicy policy_;
    std::chrono::seconds ttl_;
    std::function<void(const std::string&)> warn_;
    std::function<Clock::time_point()> now_;
    std::mutex mu_;
    std::map<pkg::Nonce, Clock::time_point> issued_;
    std::deque<pkg::Nonce> issued_order_;
    std::set<pkg::Nonce> used_;
    std::deque<pkg::Nonce> used_order_;
};

// The HTTP front end (cpp-httplib). start() binds (port 0: any free port) and serves on a thread until stop().
class KeyServer {
public:
    explicit KeyServer(KeyService& service);
    ~KeyServer();
    int start(const std::string& host, int port);  // returns the bound port; Status::io when it cannot bind
    void stop();
    void wait();  // until stop() (from another thread or a signal handler)

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Client side, used by the host while the enclave attests. Status::io when the keyserver cannot be reached,
// Status::security carrying the keyserver's reason when it refuses.
pkg::Nonce keyserver_nonce(const std::string& url);
std::array<uint8_t, pkg::kWrappedBytes> keyserver_release(const std::string& url, std::span<const uint8_t> quote,
                                                          const pkg::ModelId& model_id);

}  // namespace si
