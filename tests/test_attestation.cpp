// Key release only to registered devices (docs/PACKAGES.md): a software-tee quote is a signature by the key it
// carries, so anyone can make one for the published measurement; the keyserver must accept only quotes signed by a
// quoting key its owner registered. The exploit, the registry (library and CLI), and device-key.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "attack/active.h"
#include "common/error.h"
#include "enclave/package_crypto.h"
#include "host/keyserver.h"
#include "host/package.h"
#include "host/software_tee.h"
#include "testutil.h"

using namespace si;
using si::test::expect_error;

namespace {


bool contains(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

// The attacker: no device, only the published measurement and a nonce from the keyserver (src/attack/active.h).
using Forger = si::attack::QuoteForger;

struct Lab {
    std::string dir = test::scratch_dir();
    pkg::Hash good = test::measurement_of("good");
    test::SoftwareCore core{dir + "/dev", good};
    pkg::Key owner = generate_owner_key();
    pkg::ModelId id{};
    Lab() { pkg::random_bytes(id); }
    AttestationPolicy policy() const {
        AttestationPolicy p;
        p.allowed_measurements = {good};
        p.accept_software_tee = true;
        p.devices = {{"lab-1", core.platform->quoting_public_key()}};
        return p;
    }
    std::vector<uint8_t> model_key() const {
        std::vector<uint8_t> k(pkg::kKeyBytes);
        pkg::derive_model_key(owner, id, k.data());
        return k;
    }
};

}  // namespace

// The exploit: with the key a quote carries trusted, a forged quote gets the model key, which the forger opens.
// With the device registry the same quote is refused; the registered device still gets the key.
TEST(DeviceRegistry, ForgedQuoteOfAnUnregisteredKeyIsRefusedTheRegisteredDeviceGetsTheKey) {
    Lab s;
    Forger attacker;
    {
        // What trusting the carried key amounts to: the attacker's own key "registered". The forgery is complete.
        AttestationPolicy trusting = s.policy();
        trusting.devices = {{"anyone", attacker.quoting_pub()}};
        KeyService ks(s.owner, trusting);
        ks.set_warn([](const std::string&) {});
        const auto wrapped = ks.release(attacker.quote(s.good, ks.new_nonce()), s.id);
        EXPECT_EQ(attacker.open(wrapped, s.id), s.model_key());
    }
    KeyService ks(s.owner, s.policy());
    std::vector<std::string> log;
    ks.set_warn([&](const std::string& w) { log.push_back(w); });
    expect_error([&] { ks.release(attacker.quote(s.good, ks.new_nonce()), s.id); }, Status::security,
                 "quote refused: signed by quoting key " + pkg::to_hex(attacker.quoting_pub()) +
                     ", which is no registered device's");
    // claiming the registered device's key does not help: the signature is checked under the registered key
    const pkg::PubKey registered = s.core.platform->quoting_public_key();
    expect_error([&] { ks.release(attacker.quote(s.good, ks.new_nonce(), &registered), s.id); }, Status::security,
                 "signature does not verify");
    // nor does taking the device's genuine quote and re-signing it with another key
    {
        auto q = s.core.quote(ks.new_nonce());
        const pkg::Quote parsed = pkg::decode_quote(q);
        attacker.report = parsed.report;
        std::vector<uint8_t> body = pkg::encode_quote_body(tee::kSoftwareTee, pkg::encode_report(parsed.report),
                                                           attacker.quoting_pub());
        const auto sig = pkg::ed25519_sign(attacker.seed.data(), body);
        body.insert(body.end(), sig.begin(), sig.end());
        expect_error([&] { ks.release(body, s.id); }, Status::security, "which is no registered device's");
    }
    EXPECT_TRUE(log.empty()) << (log.empty() ? "" : log[0]);
    // the registered device: released, and logged with its name
    const auto wrapped = ks.release(s.core.quote(ks.new_nonce()), s.id);
    ASSERT_EQ(log.size(), 2u);
    EXPECT_TRUE(contains(log[0], "accepting a software-tee quote of device lab-1")) << log[0];
    EXPECT_EQ(log[1], "released model key for " + pkg::to_hex(s.id) + " to device lab-1");
    EXPECT_EQ(s.core.release(wrapped, s.id).size(), pkg::kSealedBytes);
}

TEST(DeviceRegistry, ForgedQuoteIsRefusedOverHttp) {
    Lab s;
    KeyService ks(s.owner, s.policy());
    ks.set_warn([](const std::string&) {});
    KeyServer server(ks);
    const std::string url = "http://127.0.0.1:" + std::to_string(server.start("127.0.0.1", 0));
    Forger attacker;
    expect_error([&] { keyserver_release(url, attacker.quote(s.good, keyserver_nonce(url)), s.id); },
                 Status::security,
                 "keyserver refused to release the model key: quote refused: signed by quoting key " +
                     pkg::to_hex(attacker.quoting_pub()) + ", which is no registered device's");
    const auto wrapped = keyserver_release(url, s.core.quote(keyserver_nonce(url)), s.id);
    EXPECT_EQ(s.core.release(wrapped, s.id).size(), pkg::kSealedBytes);
}

// Registration names the device; it does not widen what runs there: another measurement is still refused.
TEST(DeviceRegistry, RegisteredDeviceWithAMeasurementNotAllowedIsRefused) {
    Lab s;
    test::SoftwareCore other(s.dir + "/dev", test::measurement_of("patched worker"));
    KeyService ks(s.owner, s.policy());
    ks.set_warn([](const std::string&) {});
    expect_error([&] { ks.release(other.quote(ks.new_nonce()), s.id); }, Status::security,
                 "quote refused: measurement " + pkg::to_hex(test::measurement_of("patched worker")) +
                     " is not in the allow list");
    // and software-tee stays refused when not accepted, registered or not
    AttestationPolicy strict = s.policy();
    strict.accept_software_tee = false;
    KeyService ks2(s.owner, strict);
    expect_error([&] { ks2.release(s.core.quote(ks2.new_nonce()), s.id); }, Status::security,
                 "type software-tee (no hardware TEE");
}

TEST(DeviceRegistry, PolicyAndRegistrationsAreChecked) {
    Lab s;
    AttestationPolicy none = s.policy();
    none.devices.clear();
    expect_error([&] { KeyService ks(s.owner, none); }, Status::invalid_argument,
                 "software-tee quotes are accepted but no device is registered");
    AttestationPolicy twice = s.policy();
    twice.devices.push_back({"lab-2", twice.devices[0].quoting_key});
    expect_error([&] { check_policy(twice); }, Status::invalid_argument,
                 "device 'lab-2': its quoting key " + pkg::to_hex(twice.devices[0].quoting_key) +
                     " is registered under another name too");
    twice.devices[1] = {"lab-1", Forger().quoting_pub()};
    expect_error([&] { check_policy(twice); }, Status::invalid_argument, "device 'lab-1' is registered twice");

    const std::string hex = pkg::to_hex(s.core.platform->quoting_public_key());
    EXPECT_EQ(parse_device("a.b-c@d:1=" + hex).name, "a.b-c@d:1");
    EXPECT_EQ(parse_device("host " + hex + "\r").quoting_key, s.core.platform->quoting_public_key());
    expect_error([&] { parse_device("host"); }, Status::invalid_argument, "is not NAME=HEX or NAME HEX");
    expect_error([&] { parse_device("host=" + hex.substr(2)); }, Status::invalid_argument,
                 "device 'host': its quoting key must be 64 hex digits");
    expect_error([&] { parse_device("ho\x1bst=" + hex); }, Status::invalid_argument, "is not 1 to 64 of");
    expect_error([&] { parse_device("=" + hex); }, Status::invalid_argument, "is not 1 to 64 of");

    const std::string f = s.dir + "/devices";
    test::write_file(f, "# the lab\n\n  lab-1 " + hex + "\nlab-2=" + std::string(64, 'a') + "\n");
    const auto devs = read_devices_file(f);
    ASSERT_EQ(devs.size(), 2u);
    EXPECT_EQ(devs[0].name, "lab-1");
    EXPECT_EQ(devs[0].quoting_key, s.core.platform->quoting_public_key());
    EXPECT_EQ(devs[1].name, "lab-2");
    test::write_file(f, "# the lab\nlab-1 " + hex + "\nlab-2 " + hex + "ff\n");
    expect_error([&] { read_devices_file(f); }, Status::format, f + ":3: device 'lab-2': its quoting key must be");
    expect_error([&] { read_devices_file(s.dir + "/absent"); }, Status::io, "cannot open the devices file");
}

// ---- the CLI ----------------------------------------------------------------------------------------------------

namespace {

// `secureinfer keyserver ...` in the background: its first stdout line is its URL; stderr goes to a file.
struct KeyserverProcess {
    pid_t pid = -1;
    std::string url, err_path;
    KeyserverProcess(const std::vector<std::string>& args, const std::string& err) : err_path(err) {
        int fds[2];
        if (pipe(fds) != 0) return;
        pid = fork();
        if (pid == 0) {
            dup2(fds[1], 1);
            const int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
            dup2(e, 2);
            close(fds[0]);
            std::vector<char*> argv = {const_cast<char*>(SI_CLI)};
            for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
            argv.push_back(nullptr);
            execv(SI_CLI, argv.data());
            _exit(127);
        }
        close(fds[1]);
        pollfd p{fds[0], POLLIN, 0};
        char c = 0;
        while (poll(&p, 1, 20000) == 1 && read(fds[0], &c, 1) == 1 && c != '\n') url += c;
        close(fds[0]);
    }
    // SIGTERM; returns the exit code.
    int stop() {
        if (pid <= 0) return -1;
        kill(pid, SIGTERM);
        int st = 0;
        waitpid(pid, &st, 0);
        pid = -1;
        return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    }
    ~KeyserverProcess() { stop(); }
};

}  // namespace

TEST(DeviceRegistryCli, KeyserverRefusesToStartWithoutADeviceOrWithAMalformedRegistry) {
    Lab s;
    const std::string key = s.dir + "/owner.key";
    write_owner_key(key, s.owner);
    const std::string allow = pkg::to_hex(s.good);
    auto r = test::run_cli({"keyserver", "--key-file", key, "--allow", allow, "--accept-software-tee", "--port", "0"});
    EXPECT_EQ(r.exit_code, 2);
    EXPECT_TRUE(contains(r.err, "software-tee quotes are accepted but no device is registered")) << r.err;
    EXPECT_EQ(r.out, "");

    const std::string devices = s.dir + "/devices";
    test::write_file(devices, "lab-1 " + pkg::to_hex(s.core.platform->quoting_public_key()) + "\n# spare\nlab-2\n");
    r = test::run_cli({"keyserver", "--key-file", key, "--allow", allow, "--accept-software-tee", "--devices", devices});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_TRUE(contains(r.err, devices + ":3: device 'lab-2' is not NAME=HEX or NAME HEX")) << r.err;
    EXPECT_EQ(r.out, "");

    r = test::run_cli({"keyserver", "--key-file", key, "--allow", allow, "--accept-software-tee", "--device",
                       "lab-1=1234"});
    EXPECT_EQ(r.exit_code, 2);
    EXPECT_TRUE(contains(r.err, "--device: device 'lab-1': its quoting key must be 64 hex digits")) << r.err;

    // registered devices without --accept-software-tee: it starts, says their quotes will be refused, and does
    {
        KeyserverProcess ks({"keyserver", "--key-file", key, "--allow", allow, "--device",
                             "lab-1=" + pkg::to_hex(s.core.platform->quoting_public_key()), "--port", "0"},
                            s.dir + "/strict.err");
        ASSERT_TRUE(contains(ks.url, "http://127.0.0.1:")) << test::read_file(ks.err_path);
        expect_error([&] { keyserver_release(ks.url, s.core.quote(keyserver_nonce(ks.url)), s.id); },
                     Status::security, "quote refused: type software-tee");
        EXPECT_EQ(ks.stop(), 0);
        const std::string err = test::read_file(ks.err_path);
        EXPECT_TRUE(contains(err, "devices are registered but --accept-software-tee is not given")) << err;
    }
    r = test::run_cli({"keyserver", "--key-file", key, "--allow", allow, "--quoting-key", std::string(64, 'a')});
    EXPECT_EQ(r.exit_code, 2) << r.err;  // the old pinning option is gone, not silently ignored
}

// The keyserver as the README starts it, the device registered from a file and with --device: the device gets
// the key (logged with its name), a forged quote does not.
TEST(DeviceRegistryCli, KeyserverReleasesOnlyToRegisteredDevices) {
    Lab s;
    const std::string key = s.dir + "/owner.key";
    write_owner_key(key, s.owner);
    const std::string devices = s.dir + "/devices";
    test::write_file(devices, "# lab machines\nlab-1 " + pkg::to_hex(s.core.platform->quoting_public_key()) + "\n");
    KeyserverProcess ks({"keyserver", "--key-file", key, "--allow", pkg::to_hex(s.good), "--accept-software-tee",
                         "--devices", devices, "--device", "spare=" + std::string(64, 'b'), "--port", "0"},
                        s.dir + "/ks.err");
    ASSERT_TRUE(contains(ks.url, "http://127.0.0.1:")) << test::read_file(ks.err_path);
    Forger attacker;
    expect_error([&] { keyserver_release(ks.url, attacker.quote(s.good, keyserver_nonce(ks.url)), s.id); },
                 Status::security, "which is no registered device's");
    const auto wrapped = keyserver_release(ks.url, s.core.quote(keyserver_nonce(ks.url)), s.id);
    EXPECT_EQ(s.core.release(wrapped, s.id).size(), pkg::kSealedBytes);
    EXPECT_EQ(ks.stop(), 0);
    const std::string err = test::read_file(ks.err_path);
    EXPECT_TRUE(contains(err, "registered device lab-1 (quoting key " +
                                  pkg::to_hex(s.core.platform->quoting_public_key()) + ")")) << err;
    EXPECT_TRUE(contains(err, "registered device spare")) << err;
    EXPECT_TRUE(contains(err, "refused: quote refused: signed by quoting key " + pkg::to_hex(attacker.quoting_pub())))
        << err;
    EXPECT_TRUE(contains(err, "secureinfer keyserver: released model key for " + pkg::to_hex(s.id) +
                                  " to device lab-1\n")) << err;
}

TEST(DeviceRegistryCli, DeviceKeyPrintsTheQuotingKeyTheDeviceSignsWith) {
    Lab s;
    const std::string dev = s.dir + "/dev";
    const std::string want = pkg::to_hex(s.core.platform->quoting_public_key());
    auto r = test::run_cli({"device-key", "--device-dir", dev, "--name", "lab-1"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, "lab-1 " + want + "\n");
    // the default name is the host name; the line registers as printed
    r = test::run_cli({"device-key", "--device-dir", dev});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const RegisteredDevice d = parse_device(r.out.substr(0, r.out.size() - 1));
    EXPECT_EQ(d.quoting_key, s.core.platform->quoting_public_key());
    char host[256] = {};
    ASSERT_EQ(gethostname(host, sizeof host - 1), 0);
    std::string want_name = std::string(host).substr(0, 64);
    for (char& ch : want_name)
        if (!std::isalnum(static_cast<unsigned char>(ch)) && !std::strchr("._:@-", ch)) ch = '-';
    EXPECT_EQ(d.name, want_name);
    // $SI_DEVICE_DIR is the default
    setenv("SI_DEVICE_DIR", dev.c_str(), 1);
    r = test::run_cli({"device-key", "--name", "x"});
    unsetenv("SI_DEVICE_DIR");
    EXPECT_EQ(r.out, "x " + want + "\n") << r.err;

    // quoting.pub (the public half, readable where the private files are not) is read when present
    test::write_file(dev + "/quoting.pub", want + "\n");
    r = test::run_cli({"device-key", "--device-dir", dev, "--name", "lab-1"});
    EXPECT_EQ(r.out, "lab-1 " + want + "\n") << r.err;
    const std::string seed = test::read_file(dev + "/quoting-key");
    std::filesystem::remove(dev + "/quoting-key");
    r = test::run_cli({"device-key", "--device-dir", dev, "--name", "lab-1"});
    EXPECT_EQ(r.out, "lab-1 " + want + "\n") << r.err;
    EXPECT_EQ(tee::read_quoting_public_key(dev), s.core.platform->quoting_public_key());
    // a quoting.pub that is not the key the device signs with is refused, not printed
    test::write_file(dev + "/quoting-key", seed);
    test::write_file(dev + "/quoting.pub", std::string(64, 'c'));
    r = test::run_cli({"device-key", "--device-dir", dev});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_TRUE(contains(r.err, dev + "/quoting.pub does not match " + dev + "/quoting-key")) << r.err;
    EXPECT_EQ(r.out, "");
    test::write_file(dev + "/quoting.pub", "not a key");
    r = test::run_cli({"device-key", "--device-dir", dev});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_TRUE(contains(r.err, "quoting.pub: not a quoting public key")) << r.err;
    // a device directory without its keys is an error, not a new device
    std::filesystem::remove(dev + "/quoting.pub");
    std::filesystem::remove(dev + "/quoting-key");
    r = test::run_cli({"device-key", "--device-dir", dev});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_TRUE(contains(r.err, dev + "/quoting-key: cannot open")) << r.err;
    // a device that never ran is provisioned, and then signs with the key printed
    const std::string fresh = s.dir + "/fresh";
    r = test::run_cli({"device-key", "--device-dir", fresh, "--name", "new"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(contains(r.err, "provisioned a new device in " + fresh)) << r.err;
    test::SoftwareCore fresh_core(fresh, s.good);
    EXPECT_EQ(r.out, "new " + pkg::to_hex(fresh_core.platform->quoting_public_key()) + "\n");
    r = test::run_cli({"device-key", "--device-dir", fresh, "--name", "bad name"});
    EXPECT_EQ(r.exit_code, 2);
    EXPECT_TRUE(contains(r.err, "--name: device name 'bad name' is not 1 to 64 of")) << r.err;
}
