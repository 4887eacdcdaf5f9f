#include "host/keyserver.h"

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <cctype>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>

#include "common/error.h"
#include "common/secret_memory.h"
#include "host/software_tee.h"

namespace si {

namespace {

using json = nlohmann::json;

[[noreturn]] void refuse(const std::string& why) { fail(Status::security, why); }

std::string hex(std::span<const uint8_t> b) { return pkg::to_hex(b); }

std::vector<uint8_t> unhex(const std::string& s, const char* what) {
    std::vector<uint8_t> b(s.size() / 2);
    if (s.size() % 2 != 0 || s.size() > 16384 || !pkg::from_hex(s, b))
        fail(Status::invalid_argument, std::string(what) + " is not hex");
    return b;
}

constexpr size_t kMaxNonces = 4096;  // outstanding and remembered-as-used nonces, each

}  // namespace

bool valid_device_name(const std::string& n) {
    if (n.empty() || n.size() > 64) return false;
    for (const char c : n)
        if (!std::isalnum(static_cast<unsigned char>(c)) && !std::strchr("._:@-", c)) return false;
    return true;
}

void check_policy(const AttestationPolicy& policy) {
    if (policy.accept_software_tee && policy.devices.empty())
        fail(Status::invalid_argument, "software-tee quotes are accepted but no device is registered: every quote "
                                       "would be refused (register one with --device NAME=HEX or --devices FILE; "
                                       "secureinfer device-key prints a device's line)");
    std::set<std::string> names;
    std::set<pkg::PubKey> keys;
    for (const auto& d : policy.devices) {
        if (!valid_device_name(d.name))
            fail(Status::invalid_argument, "device name '" + d.name + "' is not 1 to 64 of [A-Za-z0-9._:@-]");
        if (!names.insert(d.name).second) fail(Status::invalid_argument, "device '" + d.name + "' is registered twice");
        if (!keys.insert(d.quoting_key).second)
            fail(Status::invalid_argument, "device '" + d.name + "': its quoting key " + hex(d.quoting_key) +
                                               " is registered under another name too");
    }
}

RegisteredDevice parse_device(const std::string& spec) {
    size_t sep = spec.find('=');
    if (sep == std::string::npos) sep = spec.find_first_of(" \t");
    if (sep == std::string::npos)
        fail(Status::invalid_argument, "device '" + spec + "' is not NAME=HEX or NAME HEX");
    RegisteredDevice d;
    d.name = spec.substr(0, sep);
    std::string key = spec.substr(sep + 1);
    const size_t b = key.find_first_not_of(" \t"), e = key.find_last_not_of(" \t\r");
    key = b == std::string::npos ? std::string() : key.substr(b, e - b + 1);
    if (!valid_device_name(d.name))
        fail(Status::invalid_argument, "device name '" + d.name + "' is not 1 to 64 of [A-Za-z0-9._:@-]");
    if (key.size() != 2 * pkg::kPubBytes || !pkg::from_hex(key, d.quoting_key))
        fail(Status::invalid_argument, "device '" + d.name + "': its quoting key must be 64 hex digits (an Ed25519 "
                                       "public key, secureinfer device-key), not '" + key + "'");
    return d;
}

std::vector<RegisteredDevice> read_devices_file(const std::string& path) {
    std::ifstream f(path);
    if (!f) fail(Status::io, path + ": cannot open the devices file");
    std::vector<RegisteredDevice> out;
    std::string line;
    for (int n = 1; std::getline(f, line); ++n) {
        if (n > 100000) fail(Status::format, path + ": more than 100000 lines");
        const size_t b = line.find_first_not_of(" \t\r");
        if (b == std::string::npos || line[b] == '#') continue;
        try {
            out.push_back(parse_device(line.substr(b)));
        } catch (const Error& e) {
            fail(Status::format, path + ":" + std::to_string(n) + ": " + e.what());
        }
    }
    if (f.bad()) fail(Status::io, path + ": read error");
    return out;
}

VerifiedQuote verify_quote(std::span<const uint8_t> quote, const AttestationPolicy& policy,
                           const std::function<void(const std::string&)>& warn) {
    pkg::Quote q;
    try {
        q = pkg::decode_quote(quote);
    } catch (const Error& e) {
        refuse(std::string("quote refused: ") + e.what());
    }
    if (q.type != tee::kSoftwareTee) refuse("quote refused: unsupported quote type '" + q.type + "'");
    if (!policy.accept_software_tee)
        refuse("quote refused: type software-tee (no hardware TEE; its signature proves nothing against the "
               "device's owner); the verifier must be told to accept it (--accept-software-tee)");
    // The key a quote carries is only a claim: it must be a registered device's, and the signature is checked
    // under the registered key.
    const RegisteredDevice* device = nullptr;
    for (const auto& d : policy.devices)
        if (pkg::equal(d.quoting_key, q.quoting_pub)) device = &d;
    if (!device)
        refuse("quote refused: signed by quoting key " + hex(q.quoting_pub) +
               ", which is no registered device's (register devices with --device or --devices)");
    if (!pkg::ed25519_verify(device->quoting_key, q.signed_bytes, q.signature))
        refuse("quote refused: its signature does not verify (altered or forged quote)");
    bool allowed = false;
    for (const auto& m : policy.allowed_measurements) allowed = allowed || pkg::equal(m, q.report.measurement);
    if (!allowed) refuse("quote refused: measurement " + hex(q.report.measurement) + " is not in the allow list");
    if (warn)
        warn("WARNING: accepting a software-tee quote of device " + device->name + " (measurement " +
             hex(q.report.measurement) + "): no hardware root of trust; the device's owner could have forged it");
    return {q.report, device->name};
}

KeyService::KeyService(const pkg::Key& owner_key, AttestationPolicy policy, std::chrono::seconds nonce_ttl)
    // The policy is checked before the owner key is copied: a refused policy leaves no copy to wipe.
    : owner_((check_policy(policy), owner_key)), policy_(std::move(policy)), ttl_(nonce_ttl) {
    warn_ = [](const std::string& s) { std::fprintf(stderr, "secureinfer keyserver: %s\n", s.c_str()); };
    now_ = [] { return Clock::now(); };
}

KeyService::~KeyService() { secure_zero(owner_.data(), owner_.size()); }

pkg::Nonce KeyService::new_nonce() {
    pkg::Nonce n{};
    pkg::random_bytes(n);
    std::lock_guard<std::mutex> lock(mu_);
    issued_[n] = now_();
    issued_order_.push_back(n);
    while (issued_order_.size() > kMaxNonces) {
        issued_.erase(issued_order_.front());
        issued_order_.pop_front();
    }
    return n;
}

std::array<uint8_t, pkg::kWrappedBytes> KeyService::release(std::span<const uint8_t> quote, const pkg::ModelId& id) {
    const VerifiedQuote v = verify_quote(quote, policy_, warn_);
    const pkg::Report& r = v.report;
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (used_.count(r.nonce)) refuse("quote refused: its nonce was already used (a replayed quote)");
        const auto it = issued_.find(r.nonce);
        if (it == issued_.end()) refuse("quote refused: its nonce was not issued by this keyserver");
        const auto age = std::chrono::duration_cast<std::chrono::seconds>(now_() - it->second);
        issued_.erase(it);
        used_.insert(r.nonce);
        used_order_.push_back(r.nonce);
        while (used_order_.size() > kMaxNonces) {
            used_.erase(used_order_.front());
            used_order_.pop_front();
        }
        if (age > ttl_)
            refuse("quote refused: its nonce is stale (issued " + std::to_string(age.count()) +
                   " s ago; the limit is " + std::to_string(ttl_.count()) + " s)");
    }
    SecretVector<uint8_t> model_key(pkg::kKeyBytes);
    pkg::derive_model_key(owner_, id, model_key.data());
    const auto wrapped = pkg::wrap_model_key(model_key.data(), r, id);
    if (warn_) warn_("released model key for " + hex(id) + " to device " + v.device);
    return wrapped;
}

struct KeyServer::Impl {
    KeyService& service;
    httplib::Server server;
    std::thread thread;
    explicit Impl(KeyService& s) : service(s) {}
};

KeyServer::KeyServer(KeyService& service) : impl_(std::make_unique<Impl>(service)) {
    auto& svc = impl_->service;
    impl_->server.Post("/v1/nonce", [&svc](const httplib::Request&, httplib::Response& res) {
        res.set_content(json{{"nonce", hex(svc.new_nonce())}}.dump(), "application/json");
    });
    impl_->server.Post("/v1/key", [&svc](const httplib::Request& req, httplib::Response& res) {
        try {
            const json body = json::parse(req.body);
            const std::vector<uint8_t> quote = unhex(body.at("quote").get<std::string>(), "quote");
            pkg::ModelId id{};
            if (!pkg::from_hex(body.at("model_id").get<std::string>(), id))
                fail(Status::invalid_argument, "model_id is not 16 bytes of hex");
            const auto wrapped = svc.release(quote, id);
            res.set_content(json{{"wrapped_key", hex(wrapped)}}.dump(), "application/json");
        } catch (const Error& e) {
            res.status = e.status() == Status::security ? 403 : 400;
            res.set_content(json{{"error", e.what()}}.dump(), "application/json");
            std::fprintf(stderr, "secureinfer keyserver: refused: %s\n", e.what());
        } catch (const std::exception& e) {
            res.status = 400;
            res.set_content(json{{"error", std::string("bad request: ") + e.what()}}.dump(), "application/json");
        }
    });
}

KeyServer::~KeyServer() { stop(); }

int KeyServer::start(const std::string& host, int port) {
    int bound = port;
    if (port == 0)
        bound = impl_->server.bind_to_any_port(host);
    else if (!impl_->server.bind_to_port(host, port))
        bound = -1;
    if (bound <= 0) fail(Status::io, "keyserver: cannot listen on " + host + ":" + std::to_string(port));
    impl_->thread = std::thread([this] { impl_->server.listen_after_bind(); });
    return bound;
}

void KeyServer::stop() {
    impl_->server.stop();
    if (impl_->thread.joinable()) impl_->thread.join();
}

void KeyServer::wait() {
    if (impl_->thread.joinable()) impl_->thread.join();
}

namespace {

json post(const std::string& url, const std::string& path, const json& body) {
    httplib::Client cli(url);
    cli.set_connection_timeout(10);
    cli.set_read_timeout(30);
    const auto res = cli.Post(path, body.dump(), "application/json");
    if (!res) fail(Status::io, "keyserver " + url + ": cannot connect (" + httplib::to_string(res.error()) + ")");
    json j;
    try {
        j = json::parse(res->body);
    } catch (const json::exception&) {
        fail(Status::io, "keyserver " + url + ": answered HTTP " + std::to_string(res->status) + " without JSON");
    }
    if (res->status != 200)
        fail(res->status == 403 ? Status::security : Status::invalid_argument,
             "keyserver refused to release the model key: " + j.value("error", "HTTP " + std::to_string(res->status)));
    return j;
}

}  // namespace

pkg::Nonce keyserver_nonce(const std::string& url) {
    const json j = post(url, "/v1/nonce", json::object());
    pkg::Nonce n{};
    if (!j.contains("nonce") || !pkg::from_hex(j["nonce"].get<std::string>(), n))
        fail(Status::io, "keyserver " + url + ": malformed nonce");
    return n;
}

std::array<uint8_t, pkg::kWrappedBytes> keyserver_release(const std::string& url, std::span<const uint8_t> quote,
                                                          const pkg::ModelId& model_id) {
    const json j = post(url, "/v1/key", json{{"quote", hex(quote)}, {"model_id", hex(model_id)}});
    std::array<uint8_t, pkg::kWrappedBytes> w{};
    if (!j.contains("wrapped_key") || !pkg::from_hex(j["wrapped_key"].get<std::string>(), w))
        fail(Status::io, "keyserver " + url + ": malformed wrapped key");
    return w;
}

}  // namespace si
