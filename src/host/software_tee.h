// The software TEE: what the hardened worker process (and, for tests, the in-process host) provides the trusted
// core in place of SGX hardware (docs/PACKAGES.md):
//   measurement  SHA-256 over the enclave binary's SHA-256 and its security configuration (MRENCLAVE's role);
//   sealing key  HKDF of a device-local secret and the measurement (EGETKEY with the MRENCLAVE policy);
//   quoting      a separate component holding a device Ed25519 key that signs the core's reports, quote type
//                "software-tee".
// The device secret and the quoting key are files readable by the device's owner: a software-tee quote proves
// nothing against someone with root (or the owner's uid) on the device, which is why verifiers refuse the type
// unless told otherwise. Only OpenSSL and the C++ library are used: the worker links this file too.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "boundary/enclave_abi.h"
#include "enclave/package_crypto.h"

namespace si::tee {

inline constexpr const char* kSoftwareTee = "software-tee";

// $SI_DEVICE_DIR, else $XDG_DATA_HOME/secureinfer/device, else $HOME/.local/share/secureinfer/device.
std::string default_device_dir();
// Creates the directory (0700), the device secret and the quoting key (0600, from the OS CSPRNG) where missing.
void provision_device(const std::string& dir);

// The device's Ed25519 quoting public key, for registering the device with a keyserver: from quoting.pub (32 raw
// bytes or 64 hex digits; readable where the private files are not) when present, else derived from quoting-key.
// Status::io when neither can be read, Status::format when malformed or when the two disagree.
pkg::PubKey read_quoting_public_key(const std::string& dir);

pkg::Hash file_sha256(const std::string& path);
// The security configuration that enters the worker's measurement.
std::string worker_config(bool memfd_secret, uint32_t uid, uint32_t gid);
inline const char* inprocess_config() { return "secureinfer in-process core (no isolation)"; }
pkg::Hash measurement(const pkg::Hash& binary_sha256, const std::string& config);

// The platform for one trusted core. Reads the device files (Status::io / Status::format when they are missing
// or malformed); keeps the quoting key in secret memory and zeroes it when destroyed.
class SoftwarePlatform {
public:
    SoftwarePlatform(const std::string& device_dir, const pkg::Hash& measurement);
    ~SoftwarePlatform();
    SoftwarePlatform(const SoftwarePlatform&) = delete;
    SoftwarePlatform& operator=(const SoftwarePlatform&) = delete;
    // Valid for the platform's lifetime.
    const si_platform* get() const { return &p_; }
    const pkg::PubKey& quoting_public_key() const { return pub_; }

private:
    static int quote(void* ctx, const uint8_t* report, size_t report_len, uint8_t* out, size_t cap, size_t* len);
    si_platform p_{};
    SecretVector<uint8_t> seed_;
    pkg::PubKey pub_{};
};

}  // namespace si::tee
