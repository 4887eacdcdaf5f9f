// Helpers shared by the tests: paths to ../shared data, a scratch directory, and running the CLI.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include <array>
#include <memory>

#include <gtest/gtest.h>

#include "boundary/enclave_abi.h"
#include "common/error.h"
#include "common/model.h"
#include "enclave/package_crypto.h"
#include "host/software_tee.h"
#include "train/lora.h"

namespace si::test {

// Absolute path of a file under the shared data directory (e.g. "models/stories260K.bin").
std::string shared(const std::string& rel);
// A fresh, empty scratch directory for the calling test (created under the build tree).
std::string scratch_dir();
std::string read_file(const std::string& path);

// One tokenizer conformance case of llama.cpp's vocabulary tests: an input and its expected ids (no BOS).
struct VocabCase {
    std::string text;
    std::vector<int32_t> ids;
};
// Reads <vocab>.inp / <vocab>.out below the shared directory as llama.cpp's tests/test-tokenizer-0.cpp does: inputs
// separated by "\n__ggml_vocab_test__\n" (the file also ends with one), one line of space-separated ids per input.
std::vector<VocabCase> vocab_conformance_cases(const std::string& vocab);
// Token ids as space-separated decimals, for failure messages.
std::string show_ids(const std::vector<int32_t>& ids);
void write_file(const std::string& path, const std::string& bytes);

struct CliResult {
    int exit_code = -1;  // -1 when killed by a signal
    int signal = 0;
    std::string out, err;
};
// Runs the secureinfer CLI with the given arguments (no shell), capturing stdout and stderr.
CliResult run_cli(const std::vector<std::string>& args, const std::string& stdin_data = "");
// Runs argv[0] (a path) the same way; env: exactly this environment when given, else this process's.
CliResult run_program(const std::vector<std::string>& argv, const std::string& stdin_data = "",
                      const std::vector<std::string>* env = nullptr);

// The shared stories260K model, loaded once.
const ModelWeights& stories();

// A LoRA adapter of rank `rank` on every projection of every layer. Projection after projection (layer, then
// si::kAllProj order), A [rank][cols] is filled with draw_a(its shape), then B [rows][rank] with draw_b(its shape).
using LoraDraw = std::function<float(const ProjShape&)>;
train::LoraAdapter lora_on_every_projection(const ModelConfig& cfg, int rank, float alpha, const LoraDraw& draw_a,
                                            const LoraDraw& draw_b);

// Memory scraping, as a root user on the device would do it.
//
// The processes this process started that run `comm` (the kernel's 15-character command name).
std::vector<pid_t> children_named(const std::string& comm);
// Visits everything of a process's memory that /proc/PID/mem gives out, region by region, in pieces that overlap by
// 63 bytes (no 64-byte window is split). memfd_secret regions give nothing: the kernel refuses to read them.
// Reservations above 16 GiB (a sanitizer's shadow memory) are not read.
struct Scraped {
    size_t read = 0, refused = 0, skipped = 0;  // bytes
};
Scraped scrape_memory(pid_t pid, const std::function<void(const char*, size_t)>& visit);
// For each thread of a process blocked in a system call: its id and whether /proc/PID/mem gives out the word at its
// stack pointer (from /proc/PID/task/TID/syscall).
struct ThreadStack {
    pid_t tid = 0;
    bool readable = false;
};
std::vector<ThreadStack> thread_stacks(pid_t pid);

// Finds 64-byte windows of secrets (taken at every 64th byte) anywhere in a stream of memory, in one pass: the
// windows are looked up by their first 8 bytes. Target i is found once any window of any of its tensors occurs.
class SecretScanner {
public:
    void add(const std::string& name, const std::vector<std::string>& tensors);
    void scan(const char* hay, size_t n);
    size_t targets() const { return names_.size(); }
    const std::string& name(size_t i) const { return names_[i]; }
    bool found(size_t i) const { return found_[i]; }

private:
    struct Needle {
        std::string bytes;
        size_t target;
    };
    std::vector<std::string> names_;
    std::vector<bool> found_;
    std::vector<Needle> needles_;
    std::vector<bool> filter_ = std::vector<bool>(size_t(1) << 24);
    std::unordered_multimap<uint64_t, size_t> by_head_;
};

// The forms a projection's weights [rows][cols] take inside the trusted core, as bytes: the f32 values, the int8
// rows (quantize_rows_i8) and the int8 blocks packed for the kernels (PackedI8).
std::vector<std::string> projection_forms(const std::vector<float>& f32, int64_t rows, int64_t cols);

// The bytes of every tensor of a GGUF file (e.g. a LoRA adapter), for searching files or memory for them.
std::vector<std::string> gguf_tensor_bytes(const std::string& path);

// The memory-scraping tests declare these base tensors of stories260K secret (pack --secret, serve --secret).
inline constexpr const char* kScrapedSecrets = "blk.0.attn_q.weight,blk.3.ffn_down.weight";
// Their scanner: target 0 is the positive control (the public blk.1.attn_q.weight packed, as the trusted core and
// the accelerator backend hold it), targets 1 .. 6 each secret in each projection_forms form (1: blk.0.attn_q.weight
// as f32), the last target the adapter's tensors.
SecretScanner scraped_secrets_scanner(const ModelWeights& w, const std::vector<std::string>& adapter_tensors);

// Attestation.
//
// A trusted core on a software TEE platform of a chosen measurement (its device files provisioned in `device`),
// driven message by message. call() returns the response or throws si::Error with the core's message.
struct SoftwareCore {
    std::unique_ptr<tee::SoftwarePlatform> platform;
    si_enclave* e = nullptr;
    SoftwareCore(const std::string& device, const pkg::Hash& measurement);
    ~SoftwareCore();
    SoftwareCore(const SoftwareCore&) = delete;
    SoftwareCore& operator=(const SoftwareCore&) = delete;
    std::vector<uint8_t> call(const std::vector<uint8_t>& req);
    std::vector<uint8_t> quote(const pkg::Nonce& nonce);
    // Returns the sealed key.
    std::vector<uint8_t> release(const std::array<uint8_t, pkg::kWrappedBytes>& w, const pkg::ModelId& id);
    void unseal(const std::vector<uint8_t>& blob);
};
// A measurement of a made-up enclave binary named `label`.
pkg::Hash measurement_of(const char* label);

// Runs `f` and expects si::Error with this status and a message containing every one of `parts`.
template <class F>
void expect_error_with(F&& f, Status status, const std::vector<std::string>& parts) {
    try {
        f();
        ADD_FAILURE() << "no error; expected: " << parts.front();
    } catch (const Error& e) {
        EXPECT_EQ(int(e.status()), int(status)) << e.what();
        for (const auto& w : parts) EXPECT_NE(std::string(e.what()).find(w), std::string::npos) << e.what();
    }
}
template <class F>
void expect_error(F&& f, Status status, const std::string& what) {
    expect_error_with(std::forward<F>(f), status, std::vector<std::string>{what});
}

// The Austen adapter shipped in adapters/.
std::string adapter_path();

// Runs f in a forked child, after `prepare` (may be null; a non-empty answer is returned instead of running f) and,
// when uid != 0, a switch to (uid, gid) without supplementary groups; returns what f returned.
std::string in_child_as(uint32_t uid, uint32_t gid, const std::function<std::string()>& f,
                        const std::function<std::string()>& prepare = nullptr);

// A small Llama 3 shaped GGUF (dim 64, 2 layers, GQA, the 128256-token llama-bpe vocabulary, an untied classifier)
// with `chat_template` in its metadata, written to `path`. Its weights make greedy decoding always pick `favoured`
// (the final norm keeps one dimension, which every embedding sets to 1, and only that token's classifier row
// reads it).
void write_llama3_chat_model(const std::string& path, const std::string& chat_template, int32_t favoured);

}  // namespace si::test
