#include "attack/package_path.h"

#include <filesystem>

#include "common/error.h"
#include "common/secret_memory.h"
#include "formats/model_file.h"
#include "host/enclave_host.h"
#include "host/keyserver.h"
#include "host/package.h"
#include "host/software_tee.h"
#include "host/worker_host.h"
#include "train/lora.h"

namespace si::attack {

namespace fs = std::filesystem;

const char* unblinding_name(Unblinding u) {
    switch (u) {
        case Unblinding::online: return "online";
        case Unblinding::precomputed_inside: return "precomputed (kept inside)";
        case Unblinding::precomputed_sealed: return "precomputed (sealed outside)";
    }
    return "?";
}

const char* release_policy_name(ReleasePolicy p) {
    switch (p) {
        case ReleasePolicy::owner_default: return "owner's default (tokens only)";
        case ReleasePolicy::permissive: return "permissive (log-probabilities of the whole vocabulary, NLL)";
    }
    return "?";
}

PackagePath::PackagePath(std::string model, std::string tokenizer, std::string dir, EnclaveHostKind host, int threads)
    : model_(std::move(model)), tokenizer_(std::move(tokenizer)), dir_(std::move(dir)), host_(host), threads_(threads) {
    fs::create_directories(dir_);
    device_ = dir_ + "/device";
    tee::provision_device(device_);
    owner_file_ = dir_ + "/owner.key";
    pkg::Key owner = generate_owner_key();
    write_owner_key(owner_file_, owner);
    // The owner allows the measurement of the core that serves here and registers this device's quoting key.
    AttestationPolicy policy;
    policy.accept_software_tee = true;
    quoting_ = tee::read_quoting_public_key(device_);
    policy.devices = {{"eval-device", quoting_}};
    if (host_ == EnclaveHostKind::inprocess) {
        measurement_ = inprocess_measurement();
    } else {
        WorkerOptions wo;
        wo.attest = true;
        wo.device_dir = device_;
        measurement_ = worker_measurement(wo);
    }
    policy.allowed_measurements = {measurement_};
    service_ = std::make_unique<KeyService>(owner, std::move(policy));
    secure_zero(owner.data(), owner.size());
    service_->set_warn([this](const std::string& s) {
        if (s.find("released model key") != std::string::npos) ++releases_;
    });
    server_ = std::make_unique<KeyServer>(*service_);
    const int port = server_->start("127.0.0.1", 0);
    url_ = "http://127.0.0.1:" + std::to_string(port);
}

PackagePath::~PackagePath() {
    if (server_) server_->stop();
}

std::shared_ptr<const Package> PackagePath::package(const train::LoraAdapter& adapter, ReleasePolicy policy) {
    const Key key{&adapter, policy};
    auto it = packages_.find(key);
    if (it != packages_.end()) return it->second;
    const std::string tag = std::to_string(packages_.size());
    const std::string lora = dir_ + "/adapter-" + tag + ".gguf", out = dir_ + "/model-" + tag + ".sipkg";
    const ModelWeights probe = load_model_file(model_, tokenizer_).weights;
    train::write_lora_adapter(lora, adapter, probe.cfg);
    PackOptions o;  // the owner's default policy unless permissive
    o.base = model_;
    o.tokenizer = tokenizer_;
    o.loras = {lora};
    if (policy == ReleasePolicy::permissive) {
        o.release_logprobs = probe.cfg.vocab_size;
        o.release_nll = true;
    }
    pkg::Key owner = read_owner_key(owner_file_);
    write_package(out, o, owner);
    secure_zero(owner.data(), owner.size());
    fs::remove(lora);
    sealed_[key] = dir_ + "/model-" + tag + ".sealed";
    return packages_[key] = Package::open(out);
}

const ModelWeights& PackagePath::public_weights(const train::LoraAdapter& adapter, ReleasePolicy policy) {
    const Key key{&adapter, policy};
    auto it = public_.find(key);
    if (it == public_.end()) it = public_.emplace(key, materialize(*package(adapter, policy)->model().source)).first;
    return it->second;
}

SecureSessionParams PackagePath::params(const train::LoraAdapter& adapter, Unblinding u, ReleasePolicy policy) const {
    const Key key{&adapter, policy};
    const auto it = packages_.find(key);
    if (it == packages_.end()) fail(Status::invalid_argument, "PackagePath::params: the adapter was not packed");
    SecureSessionParams p;
    p.mode = SecureMode::secureinfer;
    p.host = host_;
    p.n_threads = threads_;
    p.package = it->second;
    p.key.keyserver_url = url_;
    p.key.device_dir = device_;
    p.key.sealed_key_path = sealed_.at(key);
    // kept inside: the default budget (256 MiB) holds every factor of this model; sealed outside: none kept
    p.precompute_inside_bytes = u == Unblinding::precomputed_sealed ? 0 : int64_t(256) << 20;
    return p;
}

std::string PackagePath::sealed_key_path(const train::LoraAdapter& adapter, ReleasePolicy policy) const {
    const auto it = sealed_.find(Key{&adapter, policy});
    if (it == sealed_.end()) fail(Status::invalid_argument, "PackagePath: the adapter was not packed");
    return it->second;
}

std::shared_ptr<EnclaveHost> PackagePath::make_host() const {
    if (host_ == EnclaveHostKind::inprocess) return make_inprocess_host(device_, std::max(1, threads_));
    WorkerOptions wo;
    wo.attest = true;
    wo.device_dir = device_;
    wo.enclave_threads = std::max(1, threads_);
    return make_worker_host(wo);
}

pkg::Key PackagePath::owner_key() const { return read_owner_key(owner_file_); }

std::vector<uint8_t> PackagePath::model_key(const train::LoraAdapter& adapter) const {
    const auto it = packages_.find(Key{&adapter, ReleasePolicy::owner_default});
    if (it == packages_.end()) fail(Status::invalid_argument, "PackagePath: the adapter was not packed");
    pkg::Key owner = owner_key();
    std::vector<uint8_t> k(pkg::kKeyBytes);
    pkg::derive_model_key(owner, it->second->model_id(), k.data());
    secure_zero(owner.data(), owner.size());
    return k;
}

}  // namespace si::attack
