// The software TEE's credentials against the host's user (docs/SECURITY.md, "software-tee"): a device provisioned
// by scripts/provision-software-tee.sh (its own system user, the worker installed setuid to it) and a host run as
// another, unprivileged user. Runs as root (CI does): it creates both users and removes them afterwards.
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/error.h"
#include "enclave/package_crypto.h"
#include "host/keyserver.h"
#include "host/package.h"
#include "host/software_tee.h"
#include "host/worker_host.h"
#include "testutil.h"

namespace si {
namespace {

const std::string kSource = std::filesystem::path(__FILE__).parent_path().parent_path().string();
const std::string kModel = test::shared("models/stories260K.bin");
const std::string kTok = test::shared("models/tok512.bin");
const std::string kAdapter = kSource + "/adapters/austen-r8.gguf";

std::string build_dir() { return std::filesystem::path(SI_CLI).parent_path().string(); }

int sh(const std::string& cmd) {
    const int rc = std::system(cmd.c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

// useradd and userdel give up while another process (a parallel test) holds the password file's lock.
void sh_retried(const std::string& cmd) {
    for (int i = 0; i < 20 && sh(cmd) != 0; ++i) usleep(250000);
}

// The provisioned device and the host's user, set up once for the whole file.
struct Device {
    std::string tee_user, host_user, dir, home, device, worker;
    uid_t tee_uid = 0, host_uid = 0;
    gid_t tee_gid = 0, host_gid = 0;
    std::string host_home;
    std::string provision_output;
    int provision_rc = -1;
};
Device* g_device = nullptr;

class DeviceEnvironment : public ::testing::Environment {
public:
    void SetUp() override {
        auto* d = new Device;
        const std::string id = std::to_string(getpid());
        d->tee_user = "si-tee-" + id;
        d->host_user = "si-host-" + id;
        d->dir = std::string(SI_TEST_TMP) + "/software-tee." + id;
        std::filesystem::remove_all(d->dir);
        std::filesystem::create_directories(d->dir);
        chmod(d->dir.c_str(), 0755);
        d->home = d->dir + "/tee-home";
        d->device = d->home + "/device";
        d->worker = d->dir + "/libexec/secureinfer-worker";
        d->host_home = d->dir + "/host-home";
        g_device = d;
        if (geteuid() != 0) return;  // every test fails, saying why
        sh_retried("useradd --system --user-group --no-create-home --home-dir " + d->host_home +
                   " --shell /usr/sbin/nologin " + d->host_user);
        const std::string out = d->dir + "/provision.out";
        d->provision_rc = sh("bash " + kSource + "/scripts/provision-software-tee.sh --user " + d->tee_user + " --home " +
                             d->home + " --worker " + build_dir() + "/secureinfer-worker --install-dir " + d->dir +
                             "/libexec > " + out + " 2>&1");
        d->provision_output = test::read_file(out);
        if (const passwd* p = getpwnam(d->tee_user.c_str())) d->tee_uid = p->pw_uid, d->tee_gid = p->pw_gid;
        if (const passwd* p = getpwnam(d->host_user.c_str())) d->host_uid = p->pw_uid, d->host_gid = p->pw_gid;
        std::filesystem::create_directories(d->host_home);
        chown(d->host_home.c_str(), d->host_uid, d->host_gid);
    }
    void TearDown() override {
        if (!g_device) return;
        if (geteuid() == 0) {
            sh_retried("userdel " + g_device->tee_user + " 2>/dev/null");
            sh_retried("userdel " + g_device->host_user + " 2>/dev/null");
        }
        std::filesystem::remove_all(g_device->dir);
        delete g_device;
        g_device = nullptr;
    }
};
[[maybe_unused]] ::testing::Environment* const kEnv = ::testing::AddGlobalTestEnvironment(new DeviceEnvironment);

const Device& device() {
    EXPECT_EQ(geteuid(), 0u) << "these tests create users: run them as root";
    EXPECT_EQ(g_device->provision_rc, 0) << g_device->provision_output;
    EXPECT_NE(g_device->tee_uid, 0u);
    EXPECT_NE(g_device->host_uid, 0u);
    return *g_device;
}

// Runs the CLI as the host's user through setpriv, with exactly this environment.
test::CliResult cli_as_host(const std::vector<std::string>& args, std::vector<std::string> env) {
    const Device& d = *g_device;
    env.push_back("HOME=" + d.host_home);
    std::vector<std::string> argv = {"/usr/bin/setpriv", "--reuid=" + std::to_string(d.host_uid),
                                     "--regid=" + std::to_string(d.host_gid), "--clear-groups", "--", SI_CLI};
    argv.insert(argv.end(), args.begin(), args.end());
    return test::run_program(argv, "", &env);
}

// Runs f as the host's user in a forked child; returns what it returns.
template <class F>
std::string as_host(F&& f) {
    return test::in_child_as(g_device->host_uid, g_device->host_gid, std::forward<F>(f));
}

std::string open_error(const std::string& path) {
    const int fd = open(path.c_str(), O_RDONLY);
    if (fd >= 0) {
        close(fd);
        return "opened";
    }
    return std::strerror(errno);
}

}  // namespace

TEST(SoftwareTee, ProvisioningGivesTheCredentialsToTheirOwnUser) {
    const Device& d = device();
    struct stat st {};
    ASSERT_EQ(stat(d.device.c_str(), &st), 0);
    EXPECT_EQ(st.st_uid, d.tee_uid);
    EXPECT_EQ(st.st_mode & 07777, 0711u);
    for (const char* f : {"/device-secret", "/quoting-key"}) {
        ASSERT_EQ(stat((d.device + f).c_str(), &st), 0) << f;
        EXPECT_EQ(st.st_uid, d.tee_uid) << f;
        EXPECT_EQ(st.st_mode & 07777, 0600u) << f;
        EXPECT_EQ(st.st_size, 32) << f;
    }
    ASSERT_EQ(stat((d.device + "/quoting.pub").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0644u);
    ASSERT_EQ(stat(d.worker.c_str(), &st), 0);
    EXPECT_EQ(st.st_uid, d.tee_uid);
    EXPECT_EQ(st.st_gid, d.tee_gid);
    EXPECT_EQ(st.st_mode & 07777, 06755u);
    // quoting.pub holds the public half of the quoting key; the script printed it.
    const std::string seed = test::read_file(d.device + "/quoting-key");
    ASSERT_EQ(seed.size(), 32u);
    const std::string hex = pkg::to_hex(pkg::ed25519_public(reinterpret_cast<const uint8_t*>(seed.data())));
    EXPECT_EQ(test::read_file(d.device + "/quoting.pub"), hex + "\n");
    EXPECT_NE(d.provision_output.find("quoting key: " + hex), std::string::npos) << d.provision_output;
    EXPECT_EQ(tee::system_device_dir(d.tee_user), d.device);
    // Provisioning again keeps the device's keys.
    ASSERT_EQ(sh("bash " + kSource + "/scripts/provision-software-tee.sh --user " + d.tee_user + " --worker " +
                 build_dir() + "/secureinfer-worker --install-dir " + d.dir + "/libexec > /dev/null 2>&1"),
              0);
    EXPECT_EQ(test::read_file(d.device + "/quoting-key"), seed);
}

TEST(SoftwareTee, HostUserCannotReadTheDeviceCredentials) {
    // The attack on the old layout: the device files were the host user's own, so that user derived the sealing
    // key and signed quotes itself.
    const Device& d = device();
    const std::string r = as_host([&] {
        std::string s = open_error(d.device + "/device-secret") + "|" + open_error(d.device + "/quoting-key") + "|";
        DIR* dir = opendir(d.device.c_str());
        s += dir ? "listed" : std::strerror(errno);
        if (dir) closedir(dir);
        s.append("|").append(tee::quoting_public_hex(d.device));  // not "|" + ...: GCC 12's -Wrestrict, bug 105329
        return s;
    });
    EXPECT_EQ(r, "Permission denied|Permission denied|Permission denied|" +
                     test::read_file(d.device + "/quoting.pub").substr(0, 64));
}

TEST(SoftwareTee, HostUserCannotTraceOrReadTheSetuidWorker) {
    const Device& d = device();
    const std::string r = as_host([&] {
        try {
            WorkerOptions o;
            o.worker_path = d.worker;
            o.attest = true;
            o.secret_arena_bytes = 64 << 20;
            auto host = make_worker_host(o);
            const std::string proc = "/proc/" + std::to_string(host->pid());
            std::ifstream status(proc + "/status");
            std::string line, uids;
            while (std::getline(status, line))
                if (line.rfind("Uid:", 0) == 0) uids = line.substr(5);
            const long seize = ptrace(PTRACE_SEIZE, host->pid(), nullptr, nullptr);
            // EPERM or EACCES, depending on which check (credentials, Yama) refuses first.
            const bool denied = seize != 0 && (errno == EPERM || errno == EACCES);
            return uids + "|" + (denied ? "ptrace denied" : "ptrace attached") + "|" + open_error(proc + "/mem");
        } catch (const Error& e) {
            return std::string("error: ") + e.what();
        }
    });
    const std::string h = std::to_string(d.host_uid), t = std::to_string(d.tee_uid);
    EXPECT_EQ(r, h + "\t" + t + "\t" + t + "\t" + t + "|ptrace denied|Permission denied");
}

TEST(SoftwareTee, SealedKeyOpensOnlyInTheSetuidWorker) {
    const Device& d = device();
    const std::string work = d.dir + "/sealing";
    std::filesystem::create_directories(work);
    const std::string key = work + "/owner.key", pkgf = work + "/m.sipkg", sealed = work + "/m.sealed";
    ASSERT_EQ(test::run_cli({"keygen", "-o", key}).exit_code, 0);
    auto r = test::run_cli({"pack", "--base", kModel, "--tokenizer", kTok, "--lora", kAdapter, "--key-file", key, "-o",
                            pkgf});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    chmod(pkgf.c_str(), 0644);
    chown(work.c_str(), d.host_uid, d.host_gid);

    // What the host's user measures: the setuid worker, with the system credentials.
    const std::vector<std::string> system_env = {"SI_WORKER=" + d.worker};
    r = cli_as_host({"measure"}, system_env);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.err.find("credentials=system uid=" + std::to_string(d.tee_uid) + " gid=" + std::to_string(d.tee_gid)),
              std::string::npos)
        << r.err;
    pkg::Hash allowed{};
    ASSERT_TRUE(pkg::from_hex(r.out.substr(0, 64), allowed)) << r.out;

    // The owner's keyserver registers this device's quoting key, read from quoting.pub.
    AttestationPolicy policy;
    policy.allowed_measurements = {allowed};
    policy.accept_software_tee = true;
    pkg::PubKey pub{};
    ASSERT_TRUE(pkg::from_hex(test::read_file(d.device + "/quoting.pub").substr(0, 64), pub));
    policy.devices = {{"tee-device", pub}};
    KeyService ks(read_owner_key(key), policy);
    ks.set_warn([](const std::string&) {});
    KeyServer server(ks);
    const std::string url = "http://127.0.0.1:" + std::to_string(server.start("127.0.0.1", 0));

    const std::vector<std::string> gen = {"-p", "Once upon a time", "-n", "16", "--temp", "0", "-t", "2"};
    auto args = std::vector<std::string>{"run", "--package", pkgf, "--keyserver", url, "--sealed-key", sealed};
    args.insert(args.end(), gen.begin(), gen.end());
    const auto released = cli_as_host(args, system_env);
    ASSERT_EQ(released.exit_code, 0) << released.err;
    EXPECT_GT(released.out.size(), 20u);
    server.stop();

    // The host's user cannot open the sealed key itself: the in-process core cannot read the device secret...
    args = {"run", "--package", pkgf, "--sealed-key", sealed, "--host", "inprocess"};
    args.insert(args.end(), gen.begin(), gen.end());
    auto other = cli_as_host(args, {"SI_WORKER=" + d.worker, "SI_DEVICE_DIR=" + d.device});
    EXPECT_EQ(other.exit_code, 1);
    EXPECT_NE(other.err.find(d.device + "/device-secret: cannot open (Permission denied)"), std::string::npos)
        << other.err;
    EXPECT_EQ(other.out, "");
    // ... nor can a worker of its own, with the device files it can read (development credentials).
    // (Its locked-memory limit is an ordinary user's: without --insecure-memory it would not start at all.)
    args = {"run", "--package", pkgf, "--sealed-key", sealed, "--host", "worker"};
    args.insert(args.end(), gen.begin(), gen.end());
    auto own = args;
    own.push_back("--insecure-memory");
    other = cli_as_host(own, {"SI_WORKER=" + build_dir() + "/secureinfer-worker"});
    EXPECT_EQ(other.exit_code, 1);
    EXPECT_NE(other.err.find("sealed by an enclave with another measurement"), std::string::npos) << other.err;
    EXPECT_EQ(other.out, "");

    // The setuid worker opens it again without the keyserver.
    const auto restarted = cli_as_host(args, system_env);
    ASSERT_EQ(restarted.exit_code, 0) << restarted.err;
    EXPECT_EQ(restarted.out, released.out);
}

}  // namespace si

namespace si {

TEST(SoftwareTee, SetuidWorkerCreatesNoDeviceForItsStarter) {
    // Provisioning as the device's user wherever the starter names would leave that user's files in the starter's
    // hands (a directory of its choosing): the setuid worker refuses.
    const Device& d = device();
    const std::string target = d.host_home + "/device-of-mine";
    const std::string r = as_host([&] {
        std::string out;
        if (FILE* p = popen((d.worker + " --provision-device=" + target + " 2>&1; echo rc=$?").c_str(), "r")) {
            char buf[1024];
            for (size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
            pclose(p);
        }
        return out;
    });
    EXPECT_EQ(r, "secureinfer-worker: --provision-device runs as the device's user only "
                 "(scripts/provision-software-tee.sh)\nrc=1\n");
    EXPECT_FALSE(std::filesystem::exists(target));
}

}  // namespace si
