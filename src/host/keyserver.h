// Attestation-gated key release (docs/PACKAGES.md): the model owner's keyserver and its client.
//
// Protocol (HTTP on loopback or behind the owner's TLS front end; JSON bodies, binary fields as hex):
//   POST /v1/nonce                              -> {"nonce": 32 bytes}
//   POST /v1/key {"quote": ..., "model_id": ...} -> {"wrapped_key": 80 bytes}  or  403 {"error": "..."}
// The keyserver checks the quote's type, that its quoting key is one of the registered devices' and its Ed25519
// signature under that key, the measurement against its allow list and the nonce (issued by it, unused, fresh), then
// derives the package's model key from the owner key and wraps it to the ephemeral X25519 key in the report
// (enclave/package_crypto.h): only that enclave instance can open it.
#pragma once
#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "enclave/package_crypto.h"

namespace si {

// A device whose software-tee quotes the owner accepts: its name (for logs) and its Ed25519 quoting public key
// (secureinfer device-key prints both).
struct RegisteredDevice {
    std::string name;
    pkg::PubKey quoting_key{};
};

struct AttestationPolicy {
    std::vector<pkg::Hash> allowed_measurements;
    // software-tee quotes come from no hardware root of trust: refused unless this is set, and then accepted only
    // when signed by a registered device's quoting key (the key a quote carries proves nothing by itself: anyone can
    // make an Ed25519 key and sign a report with the published measurement).
    bool accept_software_tee = false;
    std::vector<RegisteredDevice> devices;
};

// Device names are 1 to 64 of [A-Za-z0-9._:@-]: they go into logs.
bool valid_device_name(const std::string& name);

// Throws si::Error(Status::invalid_argument) for a policy a keyserver must not run with: software-tee accepted but
// no device registered, a device name that is not [A-Za-z0-9._:@-]{1,64}, a name or key registered twice.
void check_policy(const AttestationPolicy& policy);

// One device registration: "NAME=HEX" or "NAME HEX" (64 hex digits). Throws Status::invalid_argument naming the
// problem.
RegisteredDevice parse_device(const std::string& spec);
// A devices file: one "NAME HEX" per line; blank lines and lines starting with '#' are skipped. Throws Status::io
// when it cannot be read, Status::format naming "path:line" for a malformed line.
std::vector<RegisteredDevice> read_devices_file(const std::string& path);

struct VerifiedQuote {
    pkg::Report report;
    std::string device;  // the registered device that signed it
};

// Checks a quote's type, quoting key, signature and measurement (not its nonce). Throws si::Error(Status::security)
// naming the reason. `warn` (may be empty) is told when a software-tee quote is accepted.
VerifiedQuote verify_quote(std::span<const uint8_t> quote, const AttestationPolicy& policy,
                           const std::function<void(const std::string&)>& warn = nullptr);

// The keyserver's logic, without HTTP.
class KeyService {
public:
    using Clock = std::chrono::steady_clock;
    // Throws what check_policy throws.
    KeyService(const pkg::Key& owner_key, AttestationPolicy policy, std::chrono::seconds nonce_ttl = std::chrono::seconds(60));
    ~KeyService();

    pkg::Nonce new_nonce();
    // Verifies the quote and its nonce (consumed: a nonce serves one release) and returns the wrapped model key,
    // logging "released model key for <model id> to device <name>". Throws si::Error(Status::security) with the
    // reason.
    std::array<uint8_t, pkg::kWrappedBytes> release(std::span<const uint8_t> quote, const pkg::ModelId& model_id);

    // Where warnings and release logs go (default: stderr), and the clock (tests).
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
