// The software TEE: what the hardened worker process (and, for tests, the in-process host) provides the trusted
// core in place of SGX hardware (docs/PACKAGES.md):
//   measurement  SHA-256 over the enclave binary's SHA-256 and its security configuration (MRENCLAVE's role);
//   sealing key  HKDF of a device-local secret and the measurement (EGETKEY with the MRENCLAVE policy);
//   quoting      a separate component holding a device Ed25519 key that signs the core's reports, quote type
//                "software-tee".
// Credentials (docs/SECURITY.md, "software-tee"):
//   system       the device files belong to a separate system user (kTeeUser) and the worker is installed setuid
//                and setgid to it (scripts/provision-software-tee.sh): the host's user can neither read the files
//                nor trace the worker. Nothing protects them from root.
//   development  the device files belong to the user running the host (as before): that user can unseal and
//                forge quotes. The measured configuration says which is in use.
// Only OpenSSL and the C++ library are used: the worker links this file too.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "boundary/enclave_abi.h"
#include "enclave/package_crypto.h"

namespace si::tee {

inline constexpr const char* kSoftwareTee = "software-tee";
// The system user that owns the device files of a provisioned device.
inline constexpr const char* kTeeUser = "secureinfer-tee";
// The device's public quoting key, hex, world-readable (`secureinfer device-key`).
inline constexpr const char* kQuotingPubFile = "quoting.pub";

enum class Credentials { system, development };
const char* credentials_name(Credentials c);  // "system", "development"

// The development device directory (files of the host's own user):
// $SI_DEVICE_DIR, else $XDG_DATA_HOME/secureinfer/device, else $HOME/.local/share/secureinfer/device.
std::string default_device_dir();
// A user's home directory from /etc/passwd (read directly: the worker is linked statically, without NSS).
// Empty when there is no such user.
std::string passwd_home(uint32_t uid);
std::string passwd_home(const std::string& user);
// A provisioned device's directory: the home of the user owning its files, plus "/device". Empty when the user
// does not exist.
std::string system_device_dir(const std::string& user = kTeeUser);
// Creates the directory (0700; `shared_pub`: 0711 so that others can read quoting.pub but list nothing), the
// device secret and the quoting key (0600, from the OS CSPRNG) where missing, and quoting.pub (0644).
void provision_device(const std::string& dir, bool shared_pub = false);
// The hex public quoting key of the device files in dir (from quoting.pub, else derived from the quoting key).
std::string quoting_public_hex(const std::string& dir);

// The device's Ed25519 quoting public key, for registering the device with a keyserver: from quoting.pub (32 raw
// bytes or 64 hex digits; readable where the private files are not) when present, else derived from quoting-key.
// Status::io when neither can be read, Status::format when malformed or when the two disagree.
pkg::PubKey read_quoting_public_key(const std::string& dir);

pkg::Hash file_sha256(const std::string& path);
// The security configuration that enters the worker's measurement: the memory kind actually obtained
// ("memfd_secret", "mlock", "unlocked"), whose device files it uses, and the uid/gid it serves under.
std::string worker_config(const std::string& memory, Credentials credentials, uint32_t uid, uint32_t gid);
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
