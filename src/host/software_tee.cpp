#include "host/software_tee.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "common/error.h"

namespace si::tee {

namespace {

constexpr const char* kSecretFile = "device-secret";  // 32 bytes, 0600
constexpr const char* kQuotingFile = "quoting-key";

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

// Creates path with these bytes unless it exists. Returns false when it existed.
bool write_new_file(const std::string& path, const void* data, size_t n, mode_t mode) {
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0) {
        if (errno == EEXIST) return false;  // another process provisioned it first
        fail(Status::io, path + ": cannot create (" + std::strerror(errno) + ")");
    }
    const bool ok = write(fd, data, n) == ssize_t(n) && fchmod(fd, mode) == 0 && fsync(fd) == 0;
    close(fd);
    if (!ok) fail(Status::io, path + ": cannot write");
    return true;
}

void write_new_key_file(const std::string& path) {
    uint8_t key[32];
    pkg::random_bytes(key);
    try {
        write_new_file(path, key, sizeof key, 0600);
    } catch (...) {
        secure_zero(key, sizeof key);
        throw;
    }
    secure_zero(key, sizeof key);
}

std::string read_small_file(const std::string& path) {
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return "";
    char buf[4096];
    std::string s;
    for (ssize_t r; (r = read(fd, buf, sizeof buf)) > 0 && s.size() < (1u << 20);) s.append(buf, size_t(r));
    close(fd);
    return s;
}

// The home field of the first /etc/passwd entry whose name (by_name) or uid matches.
std::string passwd_lookup(const std::string& key, bool by_name) {
    const std::string all = read_small_file("/etc/passwd");
    size_t at = 0;
    while (at < all.size()) {
        const size_t end = std::min(all.find('\n', at), all.size());
        const std::string line = all.substr(at, end - at);
        at = end + 1;
        std::vector<std::string> f;
        for (size_t b = 0;;) {
            const size_t c = line.find(':', b);
            f.push_back(line.substr(b, c == std::string::npos ? std::string::npos : c - b));
            if (c == std::string::npos) break;
            b = c + 1;
        }
        if (f.size() < 7) continue;
        if ((by_name ? f[0] : f[2]) == key) return f[5];
    }
    return "";
}

}  // namespace

std::string default_device_dir() {
    if (const char* d = std::getenv("SI_DEVICE_DIR"); d && *d) return d;
    if (const char* x = std::getenv("XDG_DATA_HOME"); x && *x) return std::string(x) + "/secureinfer/device";
    const char* home = std::getenv("HOME");
    return std::string(home && *home ? home : "/tmp") + "/.local/share/secureinfer/device";
}

const char* credentials_name(Credentials c) { return c == Credentials::system ? "system" : "development"; }

std::string passwd_home(uint32_t uid) { return passwd_lookup(std::to_string(uid), false); }
std::string passwd_home(const std::string& user) { return passwd_lookup(user, true); }

std::string system_device_dir(const std::string& user) {
    const std::string home = passwd_home(user);
    return home.empty() ? "" : home + "/device";
}

void provision_device(const std::string& dir, bool shared_pub) {
    // mkdir -p with 0700 for the last component
    for (size_t i = 1; i <= dir.size(); ++i)
        if (i == dir.size() || dir[i] == '/') {
            const std::string part = dir.substr(0, i);
            if (mkdir(part.c_str(), 0700) != 0 && errno != EEXIST)
                fail(Status::io, part + ": cannot create directory (" + std::strerror(errno) + ")");
        }
    if (shared_pub && chmod(dir.c_str(), 0711) != 0)
        fail(Status::io, dir + ": cannot set mode 0711 (" + std::strerror(errno) + ")");
    write_new_key_file(dir + "/" + kSecretFile);
    write_new_key_file(dir + "/" + kQuotingFile);
    const std::string pub = dir + "/" + kQuotingPubFile;
    if (access(pub.c_str(), F_OK) == 0) return;
    SecretVector<uint8_t> seed(32);
    read_key_file(dir + "/" + kQuotingFile, seed.data(), seed.size());
    const std::string hex = pkg::to_hex(pkg::ed25519_public(seed.data())) + "\n";
    write_new_file(pub, hex.data(), hex.size(), 0644);
}

std::string quoting_public_hex(const std::string& dir) { return pkg::to_hex(read_quoting_public_key(dir)); }

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

std::string worker_config(const std::string& memory, Credentials credentials, uint32_t uid, uint32_t gid) {
    return "secureinfer-worker abi=" + std::to_string(SI_ENCLAVE_ABI_VERSION) + " memory=" + memory +
           " credentials=" + credentials_name(credentials) + " uid=" + std::to_string(uid) +
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
