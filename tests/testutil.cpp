#include "testutil.h"

#include <dirent.h>
#include <grp.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <gtest/gtest.h>

#include "boundary/enclave_messages.h"
#include "common/error.h"
#include "common/matmul.h"
#include "common/qgemm.h"
#include "engine/random_model.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"
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


CliResult run_program(const std::vector<std::string>& argv, const std::string& stdin_data,
                      const std::vector<std::string>* env) {
    const std::string dir = std::filesystem::temp_directory_path() / ("si-cli-" + std::to_string(getpid()));
    std::filesystem::create_directories(dir);
    static std::atomic<int> counter{0};
    const std::string base = dir + "/" + std::to_string(counter++);
    const std::string in_path = base + ".in", out_path = base + ".out", err_path = base + ".err";
    write_file(in_path, stdin_data);
    std::vector<std::string> args = argv, vars = env ? *env : std::vector<std::string>{};
    std::vector<char*> a, e;
    for (auto& x : args) a.push_back(x.data());
    a.push_back(nullptr);
    for (auto& x : vars) e.push_back(x.data());
    e.push_back(nullptr);
    pid_t pid = fork();
    if (pid == 0) {
        int in = open(in_path.c_str(), O_RDONLY);
        int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int err = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        dup2(in, 0);
        dup2(out, 1);
        dup2(err, 2);
        if (env)
            execve(a[0], a.data(), e.data());
        else
            execv(a[0], a.data());
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

CliResult run_cli(const std::vector<std::string>& args, const std::string& stdin_data) {
    std::vector<std::string> argv = {SI_CLI};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_program(argv, stdin_data);
}

std::vector<pid_t> children_named(const std::string& comm) {
    std::vector<pid_t> out;
    DIR* d = opendir("/proc");
    if (!d) return out;
    while (const dirent* e = readdir(d)) {
        const pid_t pid = pid_t(std::atoi(e->d_name));
        if (pid <= 0) continue;
        std::ifstream st("/proc/" + std::to_string(pid) + "/stat");
        std::string line;
        if (!std::getline(st, line)) continue;
        const size_t open = line.find('('), close = line.rfind(')');  // the name may hold spaces
        if (open == std::string::npos || close == std::string::npos || close < open) continue;
        std::istringstream rest(line.substr(close + 2));
        char state = 0;
        pid_t ppid = 0;
        rest >> state >> ppid;
        if (ppid == getpid() && line.substr(open + 1, close - open - 1) == comm) out.push_back(pid);
    }
    closedir(d);
    return out;
}

Scraped scrape_memory(pid_t pid, const std::function<void(const char*, size_t)>& visit) {
    Scraped out;
    std::ifstream maps("/proc/" + std::to_string(pid) + "/maps");
    const int fd = open(("/proc/" + std::to_string(pid) + "/mem").c_str(), O_RDONLY);
    if (fd < 0) return out;
    constexpr size_t kPiece = size_t(1) << 20, kOverlap = 63;
    std::vector<char> buf(kPiece + kOverlap);
    std::string line;
    while (std::getline(maps, line)) {
        unsigned long lo = 0, hi = 0;
        char perms[5] = {};
        if (std::sscanf(line.c_str(), "%lx-%lx %4s", &lo, &hi, perms) != 3 || perms[0] != 'r') continue;
        if (line.find("[vvar") != std::string::npos || line.find("[vsyscall]") != std::string::npos) continue;
        if (hi - lo > (16ul << 30)) {
            out.skipped += hi - lo;
            continue;
        }
        size_t carried = 0;  // the previous piece's last bytes, at the front of buf
        for (unsigned long at = lo; at < hi;) {
            const size_t n = std::min<size_t>(kPiece, hi - at);
            const ssize_t r = pread(fd, buf.data() + carried, n, off_t(at));
            if (r <= 0) {
                out.refused += hi - at;
                break;
            }
            visit(buf.data(), carried + size_t(r));
            out.read += size_t(r);
            at += size_t(r);
            const size_t keep = std::min(kOverlap, carried + size_t(r));
            std::memmove(buf.data(), buf.data() + carried + size_t(r) - keep, keep);
            carried = keep;
        }
    }
    close(fd);
    return out;
}

std::vector<ThreadStack> thread_stacks(pid_t pid) {
    std::vector<ThreadStack> out;
    const std::string proc = "/proc/" + std::to_string(pid);
    const int fd = open((proc + "/mem").c_str(), O_RDONLY);
    if (fd < 0) return out;
    for (const auto& e : std::filesystem::directory_iterator(proc + "/task")) {
        std::ifstream f(e.path() / "syscall");
        std::string line;
        if (!std::getline(f, line) || line == "running") continue;
        // "nr arg0 .. arg5 sp pc"
        std::istringstream in(line);
        std::vector<std::string> fields;
        for (std::string w; in >> w;) fields.push_back(w);
        if (fields.size() < 3) continue;
        const unsigned long sp = std::stoul(fields[fields.size() - 2], nullptr, 16);
        uint64_t word = 0;
        out.push_back({pid_t(std::stol(e.path().filename().string())), pread(fd, &word, 8, off_t(sp)) == 8});
    }
    close(fd);
    return out;
}

namespace {
size_t head_hash(uint64_t v) { return size_t((v * 0x9E3779B97F4A7C15ull) >> 40); }  // 24 bits
}  // namespace

void SecretScanner::add(const std::string& name, const std::vector<std::string>& tensors) {
    names_.push_back(name);
    found_.push_back(false);
    for (const auto& s : tensors)
        for (size_t at = 0; at + 64 <= s.size(); at += 64) {
            needles_.push_back({s.substr(at, 64), names_.size() - 1});
            uint64_t head;
            std::memcpy(&head, s.data() + at, 8);
            filter_[head_hash(head)] = true;
            by_head_.emplace(head, needles_.size() - 1);
        }
}

void SecretScanner::scan(const char* hay, size_t n) {
    // Most of a process's readable memory is untouched zero pages: when no window starts with 8 zero bytes, a window
    // starting in the first 57 bytes of an all-zero 64-byte block cannot match, so the scan skips them.
    const bool skip_zeros = !filter_[head_hash(0)];
    static const char kZeros[64] = {};
    for (size_t i = 0; i + 64 <= n; ++i) {
        if (skip_zeros && (i & 63) == 0 && std::memcmp(hay + i, kZeros, 64) == 0) {
            i += 56;  // and the loop's ++i
            continue;
        }
        uint64_t head;
        std::memcpy(&head, hay + i, 8);
        if (!filter_[head_hash(head)]) continue;
        const auto [b, e] = by_head_.equal_range(head);
        for (auto it = b; it != e; ++it) {
            const Needle& nd = needles_[it->second];
            if (std::memcmp(hay + i, nd.bytes.data(), 64) == 0) found_[nd.target] = true;
        }
    }
}

std::vector<std::string> projection_forms(const std::vector<float>& f32, int64_t rows, int64_t cols) {
    std::vector<int8_t> q(static_cast<size_t>(rows * cols));
    std::vector<float> scale(static_cast<size_t>(rows));
    quantize_rows_i8(f32.data(), rows, cols, q.data(), scale.data(), nullptr);
    const PackedI8 packed = PackedI8::pack(q.data(), rows, cols);
    return {std::string(reinterpret_cast<const char*>(f32.data()), f32.size() * 4),
            std::string(reinterpret_cast<const char*>(q.data()), q.size()),
            std::string(reinterpret_cast<const char*>(packed.data.data()), packed.data.size())};
}

std::vector<std::string> gguf_tensor_bytes(const std::string& path) {
    const gguf::Reader r = gguf::Reader::open(path);
    std::vector<std::string> out;
    for (const auto& t : r.tensors()) {
        const auto b = r.tensor_data(t);
        out.emplace_back(reinterpret_cast<const char*>(b.data()), b.size());
    }
    return out;
}

SecretScanner scraped_secrets_scanner(const ModelWeights& w, const std::vector<std::string>& adapter_tensors) {
    const int64_t d = w.cfg.dim, hidden = w.cfg.hidden_dim;
    const auto secret_q = projection_forms(w.layers[0].wq, d, d);
    const auto secret_down = projection_forms(w.layers[3].w2, d, hidden);
    SecretScanner scanner;
    scanner.add("public blk.1.attn_q.weight, packed int8", {projection_forms(w.layers[1].wq, d, d)[2]});
    const char* form_name[] = {"f32", "int8 rows", "packed int8"};
    for (int f = 0; f < 3; ++f) {
        scanner.add(std::string("blk.0.attn_q.weight, ") + form_name[f], {secret_q[size_t(f)]});
        scanner.add(std::string("blk.3.ffn_down.weight, ") + form_name[f], {secret_down[size_t(f)]});
    }
    scanner.add("the LoRA adapter", adapter_tensors);
    return scanner;
}

SoftwareCore::SoftwareCore(const std::string& device, const pkg::Hash& measurement) {
    tee::provision_device(device);
    platform = std::make_unique<tee::SoftwarePlatform>(device, measurement);
    EXPECT_EQ(si_ecall_create_ex(nullptr, platform->get(), &e), 0);
}

SoftwareCore::~SoftwareCore() { si_ecall_destroy(e); }

std::vector<uint8_t> SoftwareCore::call(const std::vector<uint8_t>& req) {
    std::vector<uint8_t> resp(1 << 16);
    size_t n = 0;
    const int rc = si_ecall_process(e, req.data(), req.size(), resp.data(), resp.size(), &n);
    if (rc != 0) fail(Status(rc), reinterpret_cast<const char*>(resp.data()));
    resp.resize(n);
    return resp;
}

std::vector<uint8_t> SoftwareCore::quote(const pkg::Nonce& nonce) {
    wire::Encoder a(wire::MsgType::attest);
    a.add(wire::Tag::nonce, std::span<const uint8_t>(nonce));
    const auto r = call(a.finish());
    const wire::Message m = wire::decode(r);
    const wire::Field& f = m.field(wire::Tag::quote, wire::WireType::u8);
    return std::vector<uint8_t>(f.data, f.data + f.count);
}

std::vector<uint8_t> SoftwareCore::release(const std::array<uint8_t, pkg::kWrappedBytes>& w, const pkg::ModelId& id) {
    wire::Encoder r(wire::MsgType::release);
    r.add(wire::Tag::wrapped_key, std::span<const uint8_t>(w));
    r.add(wire::Tag::model_id, std::span<const uint8_t>(id));
    const auto resp = call(r.finish());
    const wire::Message m = wire::decode(resp);
    const wire::Field& f = m.field(wire::Tag::sealed_key, wire::WireType::u8);
    return std::vector<uint8_t>(f.data, f.data + f.count);
}

void SoftwareCore::unseal(const std::vector<uint8_t>& blob) {
    wire::Encoder u(wire::MsgType::unseal);
    u.add(wire::Tag::sealed_key, blob);
    call(u.finish());
}

pkg::Hash measurement_of(const char* label) {
    return tee::measurement(
        pkg::sha256(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(label), std::strlen(label))), "test");
}

std::string adapter_path() {
    return (std::filesystem::path(__FILE__).parent_path().parent_path() / "adapters" / "austen-r8.gguf").string();
}

std::string in_child_as(uint32_t uid, uint32_t gid, const std::function<std::string()>& f,
                        const std::function<std::string()>& prepare) {
    int fds[2];
    if (pipe(fds) != 0) return "pipe failed";
    const pid_t child = fork();
    if (child == 0) {
        close(fds[0]);
        std::string out = prepare ? prepare() : std::string();
        if (!out.empty()) {
        } else if (uid != 0 && (setgroups(0, nullptr) != 0 || setresgid(gid, gid, gid) != 0 ||
                                setresuid(uid, uid, uid) != 0)) {
            out = "cannot switch to uid " + std::to_string(uid);
        } else {
            out = f();
        }
        [[maybe_unused]] ssize_t n = write(fds[1], out.data(), out.size());
        _exit(0);
    }
    close(fds[1]);
    std::string got;
    char buf[4096];
    for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) got.append(buf, size_t(n));
    close(fds[0]);
    waitpid(child, nullptr, 0);
    return got;
}

void write_llama3_chat_model(const std::string& path, const std::string& chat_template, int32_t favoured) {
    Vocab vocab = load_gguf_vocab(gguf::Reader::open(shared("models/ggml-vocab-llama-bpe.gguf")));
    vocab.chat_template = chat_template;
    vocab.eot_id = 128009;
    ModelConfig c;
    c.dim = 64;
    c.hidden_dim = 128;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.vocab_size = int(vocab.size());
    c.seq_len = 256;
    c.rope_theta = 500000.0f;
    ModelWeights w = random_model(c, 3, true);
    const size_t d = size_t(c.dim);
    for (size_t t = 0; t < size_t(c.vocab_size); ++t) {
        w.tok_embeddings[t * d] = 1.0f;
        w.classifier[t * d] = 0.0f;
    }
    w.classifier[size_t(favoured) * d] = 100.0f;
    std::fill(w.final_norm.begin(), w.final_norm.end(), 0.0f);
    w.final_norm[0] = 1.0f;
    write_gguf_model(path, w, vocab, GgufWeightType::f16, "llama3-chat-test");
}

std::string show_ids(const std::vector<int32_t>& ids) {
    std::string s;
    for (int32_t id : ids) {
        if (!s.empty()) s += ' ';
        s += std::to_string(id);
    }
    return s;
}

std::vector<VocabCase> vocab_conformance_cases(const std::string& vocab) {
    const std::string base = shared(vocab);
    const std::string inp = read_file(base + ".inp");
    const std::string sep = "\n__ggml_vocab_test__\n";
    std::vector<std::string> texts;
    for (size_t pos = 0; pos < inp.size();) {
        const size_t next = inp.find(sep, pos);
        if (next == std::string::npos) {
            texts.push_back(inp.substr(pos));
            break;
        }
        texts.push_back(inp.substr(pos, next - pos));
        pos = next + sep.size();
    }
    std::istringstream out(read_file(base + ".out"));
    std::vector<VocabCase> cases;
    std::string line;
    for (size_t i = 0; std::getline(out, line); ++i) {
        VocabCase c;
        c.text = i < texts.size() ? texts[i] : "";
        std::istringstream ids(line);
        for (int32_t id; ids >> id;) c.ids.push_back(id);
        cases.push_back(std::move(c));
    }
    EXPECT_EQ(cases.size(), texts.size()) << "the .inp and .out files disagree on the number of cases";
    return cases;
}

}  // namespace si::test
