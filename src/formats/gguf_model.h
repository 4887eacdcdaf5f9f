// LLaMA models and SentencePiece vocabularies in GGUF, following llama.cpp's conventions for the "llama"
// architecture (key names, tensor names, types), so files written here load in llama.cpp and llama.cpp's files load
// here.
//
// Tensor layout: GGUF's ne[0] is the innermost dimension, so a row-major [out][in] matrix of ModelWeights is stored
// with ne = {in, out} and the bytes in the same order. No Q/K permutation is applied in either direction: llama.cpp's
// "llama" architecture uses RoPE type NORM (rotating adjacent pairs x[2i], x[2i+1]), which is the Meta / llama2.c
// layout of ModelWeights. (llama.cpp's HF converter permutes Q/K only to undo Hugging Face's half-split layout; its
// llama2.c converter copies the matrices unchanged.)
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/model.h"
#include "common/tensor_source.h"
#include "common/vocab.h"
#include "formats/gguf.h"

namespace si {

// Hyper-parameters from the llama.* keys. Throws Status::unsupported for another architecture or a llama variant
// this engine cannot run (mixture of experts, RoPE scaling, partial RoPE), Status::format for missing/invalid keys.
ModelConfig read_gguf_config(const gguf::Reader& r);

// The dense f32 weights. Every tensor's shape is checked against the config (the error names the tensor, the
// expected and the actual shape); tensors outside the supported llama layout are rejected (Status::unsupported).
// A missing output.weight means the classifier is tied to token_embd.weight (ModelWeights::classifier empty).
ModelWeights load_gguf_model(const gguf::Reader& r);

// The same model, one tensor at a time (bounded memory): the constructor checks the config, the layout, every
// tensor's shape and type (the errors load_gguf_model gives), and each read dequantises the requested rows from the
// memory-mapped file, bit-identical to load_gguf_model's values. The reader must outlive the source unless it is
// handed over as a shared_ptr.
class GgufSource final : public TensorSource {
public:
    explicit GgufSource(const gguf::Reader& r);
    explicit GgufSource(std::shared_ptr<const gguf::Reader> r);
    // Tensors of the model the file leaves out (a protected package's secret base tensors, which only the trusted
    // core holds), by name with their GGUF shape: checked against the config like the file's own (same errors)
    // and read as zeros, without storing them.
    using Absent = std::map<std::string, std::vector<uint64_t>>;
    GgufSource(std::shared_ptr<const gguf::Reader> r, Absent absent);
    const ModelConfig& config() const override { return cfg_; }
    bool tied() const override { return tied_; }
    const gguf::Reader& reader() const { return *r_; }
    void release(const std::string& name) const override;

protected:
    void do_read_rows(const std::string& name, int64_t row0, int64_t n, float* out) const override;

private:
    void init();
    std::shared_ptr<const gguf::Reader> keep_;
    const gguf::Reader* r_ = nullptr;
    ModelConfig cfg_;
    bool tied_ = true;
    Absent absent_;
};

// tokenizer.ggml.*: the model must be "llama" (SentencePiece). Missing scores default to 0, missing token types
// to normal; ids are checked against the vocabulary size.
Vocab load_gguf_vocab(const gguf::Reader& r);

enum class GgufWeightType { f32, f16, q8_0 };
const char* gguf_weight_type_name(GgufWeightType t);  // "f32", "f16", "q8_0"

// Writes a complete llama.cpp-loadable GGUF v3 file (atomically). Norm vectors stay F32; matrices take `type`,
// except that Q8_0 needs ne[0] % 32 == 0: tensors where that fails are stored as F16 instead. Returns one note per
// such fallback ("blk.0.ffn_down.weight: ne[0] = 172 is not a multiple of 32; stored as F16"), empty otherwise.
// Throws Status::invalid_argument when the weights or the vocabulary are inconsistent, Status::io on write errors.
std::vector<std::string> write_gguf_model(const std::string& path, const ModelWeights& w, const Vocab& vocab,
                                          GgufWeightType type, const std::string& name);
// The same from a tensor source, streaming: each tensor is read, encoded and written in turn, so that only one
// tensor is in memory at a time (a 7B random model never exists whole).
std::vector<std::string> write_gguf_model(const std::string& path, const TensorSource& src, const Vocab& vocab,
                                          GgufWeightType type, const std::string& name);

// What an `info` command shows about a GGUF file, as data (no printing in the library).
struct GgufTensorRow {
    std::string name;
    std::string type;  // "F32", "Q8_0", ...
    std::vector<uint64_t> shape;  // ne[0] first
    uint64_t n_elements = 0;
    uint64_t n_bytes = 0;
    uint64_t offset = 0;  // relative to the data section
};
struct GgufInfo {
    std::string file;
    uint32_t version = 0;
    uint32_t alignment = 0;
    uint64_t file_size = 0;
    uint64_t data_offset = 0;
    std::string architecture;  // general.architecture, empty if absent
    std::string model_name;    // general.name, empty if absent
    std::optional<ModelConfig> config;  // when read_gguf_config succeeds
    std::string config_error;           // otherwise, its message
    bool tied_classifier = false;       // no output.weight
    uint64_t n_params = 0;              // sum of tensor element counts
    uint64_t tensor_bytes = 0;          // sum of tensor byte sizes
    std::vector<std::pair<std::string, std::string>> metadata;  // key, rendered value (long arrays abbreviated)
    std::vector<GgufTensorRow> tensors;                         // in file order
};
GgufInfo describe_gguf(const gguf::Reader& r);

}  // namespace si
