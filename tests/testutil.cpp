#include "testutil.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <gtest/gtest.h>

#include "formats/llama2c.h"

namespace si::test {

std::string shared(const std::string& rel) { return std::string(SI_SHARED_DIR) + "/" + rel; }

const ModelWeights& stories() {
    static const ModelWeights w = load_llama2c(shared("models/stories260K.bin"));
    return w;
}

train::LoraAdapter lora_on_every_projection(const ModelConfig& cfg, int rank, float alpha, const LoraDraw& draw_a,
                                            const LoraDraw& draw_b) {
    train::LoraAdapter ad;
    ad.alpha = alpha;
    for (int l = 0; l < cfg.n_layers; ++l)
        for (Proj p : kAllProj) {
            const ProjShape s = proj_shape(cfg, p);
            train::LoraTensor t;
            t.layer = l;
            t.proj = p;
            t.rank = rank;
            t.a.resize(size_t(rank * s.cols));
            t.b.resize(size_t(s.rows * rank));
            for (auto& v : t.a) v = draw_a(s);
            for (auto& v : t.b) v = draw_b(s);
            ad.tensors.push_back(std::move(t));
        }
    return ad;
}

std::string scratch_dir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "misc";
    for (auto& c : name)
        if (c == '/') c = '_';
    const std::filesystem::path dir = std::filesystem::path(SI_TEST_TMP) / (name + "." + std::to_string(getpid()));
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    return dir.string();
}

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot open " + path);
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

void write_file(const std::string& path, const std::string& bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), std::streamsize(bytes.size()));
    if (!f) throw std::runtime_error("cannot write " + path);
}


CliResult run_cli(const std::vector<std::string>& args, const std::string& stdin_data) {
    const std::string dir = std::filesystem::temp_directory_path() / ("si-cli-" + std::to_string(getpid()));
    std::filesystem::create_directories(dir);
    static std::atomic<int> counter{0};
    const std::string base = dir + "/" + std::to_string(counter++);
    const std::string in_path = base + ".in", out_path = base + ".out", err_path = base + ".err";
    write_file(in_path, stdin_data);
    pid_t pid = fork();
    if (pid == 0) {
        int in = open(in_path.c_str(), O_RDONLY);
        int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int err = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        dup2(in, 0);
        dup2(out, 1);
        dup2(err, 2);
        std::vector<char*> argv;
        std::string exe = SI_CLI;
        argv.push_back(exe.data());
        std::vector<std::string> copy = args;
        for (auto& a : copy) argv.push_back(a.data());
        argv.push_back(nullptr);
        execv(exe.c_str(), argv.data());
        _exit(127);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CliResult r;
    if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
    if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
    r.out = read_file(out_path);
    r.err = read_file(err_path);
    std::filesystem::remove(in_path);
    std::filesystem::remove(out_path);
    std::filesystem::remove(err_path);
    return r;
}

}  // namespace si::test
