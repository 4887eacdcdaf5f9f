#include "host/software_tee.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "common/error.h"

namespace si::tee {

namespace {

constexpr const char* kSecretFile = "device-secret";
constexpr const char* kQuotingFile = "quoting-key";
constexpr const char* kQuotingPubFile = "quoting.pub";

// Reads exactly n bytes of a small key file into out. Plain POSIX calls: the worker runs this before its sandbox.
void read_key_file(const std::string& path, uint8_t* out, size_t n) {
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(Status::io, path + ": cannot open (" + std::strerror(errno) + ")");
    size_t got = 0;
    uint8_t extra = 0;
    while (got < n) {
        const ssize_t r = read(fd, out + got, n - got);
        if (r <= 0) break;
        got += size_t(r);
    }
    const bool longer = got == n && read(fd, &extra, 1) > 0;
    close(fd);
    if (got != n || longer) fail(Status::format, path + ": a device key file must hold exactly " + std::to_string(n) + " bytes");
}

void write_new_key_file(const std::string& path) {
    uint8_t key[32];
    pkg::random_bytes(key);
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        pkg::random_bytes(key);  // overwrite before leaving
        if (errno == EEXIST) return;  // another process provisioned it first
        fail(Status::io, path + ": cannot create (" + std::strerror(errno) + ")");
    }
    const bool ok = write(fd, key, sizeof key) == ssize_t(sizeof key) && fsync(fd) == 0;
    close(fd);
    secure_zero(key, sizeof key);
    if (!ok) fail(Status::io, path + ": cannot write");
}

}  // namespace

std::string default_device_dir() {
    if (const char* d = std::getenv("SI_DEVICE_DIR"); d && *d) return d;
    if (const char* x = std::getenv("XDG_DATA_HOME"); x && *x) return std::string(x) + "/secureinfer/device";
    const char* home = std::getenv("HOME");
    return std::string(home && *home ? home : "/tmp") + "/.local/share/secureinfer/device";
}

void provision_device(const std::string& dir) {
    // mkdir -p with 0700 for the last component
    for (size_t i = 1; i <= dir.size(); ++i)
        if (i == dir.size() || dir[i] == '/') {
            const std::string part = dir.substr(0, i);
            if (mkdir(part.c_str(), 0700) != 0 && errno != EEXIST)
                fail(Status::io, part + ": cannot create directory (" + std::strerror(errno) + ")");
        }
    write_new_key_file(dir + "/" + kSecretFile);
    write_new_key_file(dir + "/" + kQuotingFile);
}

pkg::PubKey read_quoting_public_key(const std::string& dir) {
    const std::string pub_path = dir + "/" + kQuotingPubFile, key_path = dir + "/" + kQuotingFile;
    std::optional<pkg::PubKey> from_seed;
    if (access(key_path.c_str(), R_OK) == 0 || access(pub_path.c_str(), F_OK) != 0) {
        SecretVector<uint8_t> seed(32);
        read_key_file(key_path, seed.data(), seed.size());
        from_seed = pkg::ed25519_public(seed.data());
    }
    if (access(pub_path.c_str(), F_OK) != 0) return *from_seed;
    const int fd = open(pub_path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(Status::io, pub_path + ": cannot open (" + std::strerror(errno) + ")");
    char buf[160];
    size_t got = 0;
    for (ssize_t r; got < sizeof buf && (r = read(fd, buf + got, sizeof buf - got)) > 0;) got += size_t(r);
    close(fd);
    pkg::PubKey pub{};
    std::string text(buf, got);
    while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
    if (got == pub.size())
        std::memcpy(pub.data(), buf, pub.size());
    else if (text.size() != 2 * pub.size() || !pkg::from_hex(text, pub))
        fail(Status::format, pub_path + ": not a quoting public key (32 bytes, or 64 hex digits)");
    if (from_seed && !pkg::equal(*from_seed, pub))
        fail(Status::format, pub_path + " does not match " + key_path + ": the device would sign with another key");
    return pub;
}

pkg::Hash file_sha256(const std::string& path) {
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(Status::io, path + ": cannot open (" + std::strerror(errno) + ")");
    std::vector<uint8_t> data;
    uint8_t buf[1 << 16];
    for (;;) {
        const ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            close(fd);
            fail(Status::io, path + ": read error");
        }
        if (r == 0) break;
        data.insert(data.end(), buf, buf + r);
    }
    close(fd);
    return pkg::sha256(data);
}

std::string worker_config(bool memfd_secret, uint32_t uid, uint32_t gid) {
    return "secureinfer-worker abi=" + std::to_string(SI_ENCLAVE_ABI_VERSION) +
           " memfd_secret=" + (memfd_secret ? "1" : "0") + " uid=" + std::to_string(uid) +
           " gid=" + std::to_string(gid);
}

pkg::Hash measurement(const pkg::Hash& binary_sha256, const std::string& config) {
    std::vector<uint8_t> m = {'s', 'i', '-', 'm', 'e', 'a', 's', 'u', 'r', 'e', '-', 'v', '1', 0};
    m.insert(m.end(), binary_sha256.begin(), binary_sha256.end());
    m.insert(m.end(), config.begin(), config.end());
    return pkg::sha256(m);
}

SoftwarePlatform::SoftwarePlatform(const std::string& dir, const pkg::Hash& meas) : seed_(32) {
    SecretVector<uint8_t> device(32);
    read_key_file(dir + "/" + kSecretFile, device.data(), device.size());
    read_key_file(dir + "/" + kQuotingFile, seed_.data(), seed_.size());
    pub_ = pkg::ed25519_public(seed_.data());
    p_.quote_type = kSoftwareTee;
    std::memcpy(p_.measurement, meas.data(), meas.size());
    pkg::hkdf(device, meas, "secureinfer sealing key v1", std::span<uint8_t>(p_.sealing_key, sizeof p_.sealing_key));
    p_.quote = &SoftwarePlatform::quote;
    p_.ctx = this;
}

SoftwarePlatform::~SoftwarePlatform() { secure_zero(p_.sealing_key, sizeof p_.sealing_key); }

int SoftwarePlatform::quote(void* ctx, const uint8_t* report, size_t report_len, uint8_t* out, size_t cap,
                            size_t* len) {
    try {
        auto* self = static_cast<SoftwarePlatform*>(ctx);
        // The quoting component signs only well-formed reports of this platform's enclave.
        const pkg::Report r = pkg::decode_report(std::span<const uint8_t>(report, report_len));
        if (!pkg::equal(r.measurement, std::span<const uint8_t>(self->p_.measurement, 32))) return 1;
        std::vector<uint8_t> q = pkg::encode_quote_body(kSoftwareTee, std::span<const uint8_t>(report, report_len),
                                                        self->pub_);
        const auto sig = pkg::ed25519_sign(self->seed_.data(), q);
        q.insert(q.end(), sig.begin(), sig.end());
        if (q.size() > cap) return 1;
        std::memcpy(out, q.data(), q.size());
        *len = q.size();
        return 0;
    } catch (...) {
        return 1;
    }
}

}  // namespace si::tee
