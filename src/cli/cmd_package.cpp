// Protected model packages (docs/PACKAGES.md): keygen, pack, inspect, measure, device-key, keyserver.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "cli/cli.h"
#include "cli/progress.h"
#include "common/error.h"
#include "host/enclave_host.h"
#include "host/keyserver.h"
#include "host/package.h"
#include "host/software_tee.h"
#include "host/worker_host.h"

namespace si::cli {

Runner add_keygen(CLI::App& app) {
    auto* sub = app.add_subcommand("keygen", "make a model owner key (32 random bytes, written with mode 0600)");
    auto out = std::make_shared<std::string>();
    sub->add_option("-o,--output", *out, "key file to create (never overwritten)")->required();
    return [=]() -> int {
        pkg::Key k = generate_owner_key();
        write_owner_key(*out, k);
        secure_zero(k.data(), k.size());
        std::fprintf(stderr, "keygen: wrote owner key %s; keep it secret: it opens every package made with it\n",
                     out->c_str());
        return 0;
    };
}

Runner add_pack(CLI::App& app) {
    auto* sub = app.add_subcommand("pack", "write a protected package: public tensors in the clear, secret tensors "
                                           "(adapters, and --secret) encrypted under keys derived from the owner key");
    auto o = std::make_shared<PackOptions>();
    auto key_file = std::make_shared<std::string>();
    auto out = std::make_shared<std::string>();
    sub->add_option("--base", o->base, "base model (GGUF or llama2.c checkpoint)")->required();
    sub->add_option("--tokenizer", o->tokenizer, "tokenizer.bin for a llama2.c checkpoint");
    sub->add_option("--lora", o->loras, "LoRA adapter (llama.cpp GGUF); repeatable: adapters stack");
    sub->add_option("--lora-scale", o->lora_scale, "adapter scale, folded into the package")->check(CLI::Range(-1e6, 1e6));
    sub->add_option("--secret", o->secret, "what is secret besides the adapters: lora (nothing else), all (every "
                                           "tensor: a fully proprietary model), or comma-separated tensor names")
        ->default_val("lora");
    sub->add_option("--name", o->name, "model name in the manifest");
    sub->add_option("--release-logprobs", o->release_logprobs, "let the enclave release up to this many top "
                                                               "log-probabilities per token (default 0: none)")
        ->check(CLI::Range(0, 65535));
    sub->add_flag("--release-nll", o->release_nll, "let the enclave evaluate log-likelihoods of given text "
                                                   "(perplexity; default: refused)");
    pkg::SamplingPolicy& sp = o->sampling;
    sub->add_option("--max-temperature", sp.max_temperature, "highest sampling temperature a request may use")
        ->check(CLI::Range(0.0, 1000.0))->capture_default_str();
    sub->add_option("--min-top-k", sp.min_top_k, "smallest top-k a request may use (0: any; a request's 0, no "
                                                 "cut, is always allowed)")
        ->check(CLI::Range(0, 1 << 30))->capture_default_str();
    sub->add_option("--min-top-p", sp.min_top_p, "smallest top-p a request may use")
        ->check(CLI::Range(0.0, 1.0))->capture_default_str();
    sub->add_option("--min-logprob-noise", sp.min_logprob_noise, "least Gaussian noise (standard deviation) the "
                                                                 "enclave adds to released log-probabilities")
        ->check(CLI::Range(0.0, 1e6))->capture_default_str();
    sub->add_option("--key-file", *key_file, "owner key (secureinfer keygen)")->required();
    sub->add_option("-o,--output", *out, "package file to write")->required();
    return [=]() -> int {
        pkg::Key k = read_owner_key(*key_file);
        const auto t0 = std::chrono::steady_clock::now();
        Progress bar("pack: encrypting", 0, "secret tensors");
        PackOptions po = *o;
        po.progress = [&](int done, int total) {
            bar.set_total(total);
            if (done < total) bar.update(done);
        };
        const PackResult r = write_package(*out, po, k);
        bar.finish();
        secure_zero(k.data(), k.size());
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::fprintf(stderr,
                     "pack: %s: %llu bytes (public %llu, secret %llu encrypted); %zu public and %zu secret tensors; "
                     "model id %s; %.3f s\n",
                     out->c_str(), (unsigned long long)r.file_bytes, (unsigned long long)r.public_bytes,
                     (unsigned long long)r.secret_bytes, r.n_public, r.n_secret, pkg::to_hex(r.model_id).c_str(), secs);
        return 0;
    };
}

Runner add_inspect(CLI::App& app) {
    auto* sub = app.add_subcommand("inspect", "show a package's manifest and check its structure and hashes (nothing "
                                              "is decrypted)");
    auto path = std::make_shared<std::string>();
    sub->add_option("package", *path, "package file")->required();
    return [=]() -> int {
        const std::string text = describe_package(*path);
        std::fwrite(text.data(), 1, text.size(), stdout);
        return 0;
    };
}

Runner add_measure(CLI::App& app) {
    auto* sub = app.add_subcommand("measure", "print the measurement (enclave identity) of the worker that runs "
                                              "packages, for the keyserver's --allow");
    auto worker = std::make_shared<std::string>();
    auto no_memfd = std::make_shared<bool>(false);
    auto inprocess = std::make_shared<bool>(false);
    auto insecure_memory = std::make_shared<bool>(false);
    sub->add_option("--worker", *worker, "worker executable (default: secureinfer-worker next to this program)");
    sub->add_flag("--no-memfd-secret", *no_memfd, "the worker configuration without memfd_secret");
    sub->add_flag("--insecure-memory", *insecure_memory,
                  "the worker configuration that runs without secret memory (memory=unlocked) where it has none");
    sub->add_flag("--inprocess", *inprocess, "the in-process core of this executable (tests only; no isolation)");
    return [=]() -> int {
        WorkerOptions wo;
        wo.worker_path = *worker;
        wo.force_secret_fallback = *no_memfd;
        wo.insecure_memory = *insecure_memory;
        if (*inprocess) {
            std::printf("%s\n", pkg::to_hex(inprocess_measurement()).c_str());
            return 0;
        }
        const WorkerIdentity id = worker_identity(wo);
        std::printf("%s\n", pkg::to_hex(id.measurement).c_str());
        std::fprintf(stderr, "configuration: %s\n", id.config.c_str());
        return 0;
    };
}

namespace {

// The host name as a device name: characters outside [A-Za-z0-9._:@-] become '-'.
std::string default_device_name() {
    char buf[256] = {};
    std::string n = gethostname(buf, sizeof buf - 1) == 0 && buf[0] ? buf : "device";
    for (char& c : n)
        if (!std::isalnum(static_cast<unsigned char>(c)) && !std::strchr("._:@-", c)) c = '-';
    return n.substr(0, 64);
}

}  // namespace

Runner add_device_key(CLI::App& app) {
    auto* sub = app.add_subcommand("device-key", "print this device's quoting public key as the line 'NAME HEX' that "
                                                 "registers it with a keyserver (keyserver --device or --devices)");
    auto dir = std::make_shared<std::string>();
    auto name = std::make_shared<std::string>();
    sub->add_option("--device-dir", *dir, "the device's files (default: $SI_DEVICE_DIR, else "
                                          "~/.local/share/secureinfer/device)");
    sub->add_option("--name", *name, "the device's name in the line (default: the host name)");
    return [=]() -> int {
        const std::string d = dir->empty() ? tee::default_device_dir() : *dir;
        const std::string n = name->empty() ? default_device_name() : *name;
        if (!valid_device_name(n)) throw UsageError("--name: device name '" + n + "' is not 1 to 64 of [A-Za-z0-9._:@-]");
        struct stat st{};
        if (stat(d.c_str(), &st) != 0) {
            // A device that never ran a package yet: provision it as its first run would.
            tee::provision_device(d);
            std::fprintf(stderr, "device-key: provisioned a new device in %s\n", d.c_str());
        }
        const pkg::PubKey pub = tee::read_quoting_public_key(d);
        std::printf("%s %s\n", n.c_str(), pkg::to_hex(pub).c_str());
        return 0;
    };
}

Runner add_keyserver(CLI::App& app) {
    auto* sub = app.add_subcommand("keyserver", "release model keys to attested enclaves (HTTP; put TLS in front "
                                                "of it beyond loopback)");
    auto key_file = std::make_shared<std::string>();
    auto allow = std::make_shared<std::vector<std::string>>();
    auto accept_sw = std::make_shared<bool>(false);
    auto devices = std::make_shared<std::vector<std::string>>();
    auto devices_file = std::make_shared<std::string>();
    auto host = std::make_shared<std::string>("127.0.0.1");
    auto port = std::make_shared<int>(8377);
    auto ttl = std::make_shared<int>(60);
    sub->add_option("--key-file", *key_file, "owner key (secureinfer keygen)")->required();
    sub->add_option("--allow", *allow, "measurement (64 hex digits, secureinfer measure) allowed to receive keys; "
                                       "repeatable")
        ->required();
    sub->add_flag("--accept-software-tee", *accept_sw, "accept software-tee quotes (no hardware root of trust: the "
                                                       "device's owner can forge them)");
    sub->add_option("--device", *devices, "register a device: NAME=HEX or the line 'NAME HEX' that secureinfer "
                                          "device-key prints; software-tee quotes are accepted only when signed by a "
                                          "registered device's quoting key; repeatable");
    sub->add_option("--devices", *devices_file, "file of registered devices: one 'NAME HEX' per line, '#' comments");
    sub->add_option("--host", *host, "address to listen on");
    sub->add_option("--port", *port, "port to listen on (0: any free port)")->check(CLI::Range(0, 65535));
    sub->add_option("--nonce-ttl", *ttl, "seconds a nonce stays valid")->check(CLI::Range(1, 3600));
    return [=]() -> int {
        AttestationPolicy policy;
        for (const auto& a : *allow) {
            pkg::Hash h{};
            if (!pkg::from_hex(a, h)) throw UsageError("--allow takes a measurement of 64 hex digits: " + a);
            policy.allowed_measurements.push_back(h);
        }
        policy.accept_software_tee = *accept_sw;
        for (const auto& d : *devices) {
            try {
                policy.devices.push_back(parse_device(d));
            } catch (const Error& e) {
                throw UsageError(std::string("--device: ") + e.what());
            }
        }
        if (!devices_file->empty()) {
            auto more = read_devices_file(*devices_file);  // Status::format naming file:line
            policy.devices.insert(policy.devices.end(), more.begin(), more.end());
        }
        try {
            check_policy(policy);
        } catch (const Error& e) {
            throw UsageError(e.what());
        }
        if (*accept_sw)
            std::fprintf(stderr, "secureinfer keyserver: WARNING: --accept-software-tee: quotes of type software-tee "
                                 "are accepted; they come from no hardware root of trust, and anyone with control "
                                 "of the device could forge them. Use for development and testing only.\n");
        for (const auto& d : policy.devices)
            std::fprintf(stderr, "secureinfer keyserver: registered device %s (quoting key %s)\n", d.name.c_str(),
                         pkg::to_hex(d.quoting_key).c_str());
        if (!*accept_sw && !policy.devices.empty())
            std::fprintf(stderr, "secureinfer keyserver: note: devices are registered but --accept-software-tee is "
                                 "not given: their software-tee quotes will be refused\n");
        pkg::Key k = read_owner_key(*key_file);
        KeyService service(k, policy, std::chrono::seconds(*ttl));
        secure_zero(k.data(), k.size());
        // SIGINT / SIGTERM end the server: blocked here (and in the server's threads), taken by sigwait.
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGINT);
        sigaddset(&set, SIGTERM);
        pthread_sigmask(SIG_BLOCK, &set, nullptr);
        KeyServer server(service);
        const int bound = server.start(*host, *port);
        std::printf("http://%s:%d\n", host->c_str(), bound);
        std::fflush(stdout);
        std::fprintf(stderr, "secureinfer keyserver: listening on http://%s:%d\n", host->c_str(), bound);
        int sig = 0;
        sigwait(&set, &sig);
        server.stop();
        std::fprintf(stderr, "secureinfer keyserver: stopped\n");
        return 0;
    };
}

}  // namespace si::cli
