// The plaintext LLaMA engine: one forward pass you can read top to bottom (engine.cpp), batched over tokens for
// prefill and one token at a time for decoding, with a KV cache and f32, int8 or native (ggml block format) weights.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/model.h"
#include "common/matmul.h"
#include "common/quant_dot.h"
#include "common/qgemm.h"
#include "common/threadpool.h"

namespace si::gguf {
class Reader;
}

namespace si {

class TensorSource;

// native: the matrices stay in the GGUF file's block format (Q4_0, Q8_0, Q4_K, Q6_K) and are read as stored, with
// int8 activations per block (common/quant_dot.h); matrices in other formats are re-quantised to Q8_0 once, and a
// product whose rows are not a whole number of 32-element blocks (hidden 172) uses the int8 format instead.
enum class WeightFormat { f32, int8, native };
const char* weight_format_name(WeightFormat f);

struct EngineParams {
    int n_threads = 0;                     // 0: all online CPUs
    WeightFormat weights = WeightFormat::f32;
    int n_ctx = 0;                         // KV cache length; 0: the model's context length
    int n_batch = 512;                     // prefill processes at most this many tokens per pass
};

// A projection matrix [rows][cols] in the engine's format. int8: per-row symmetric scales; activations are quantised
// per token to int8 and the product is exact in int32 before scaling.
struct Linear {
    int64_t rows = 0, cols = 0;
    WeightFormat format = WeightFormat::f32;
    PackedF32 f32;             // f32 weights packed for the float kernel
    PackedI8 q;                // int8 weights packed for the integer kernels
    std::vector<float> scale;  // per-row dequantisation scale
    // native: consecutive row ranges, each in one block format, read in place from the model file (or from `owned`
    // for re-quantised matrices), or, where the build has the interleaved kernels (AVX-512 VNNI), repacked once
    // into groups of 16 rows (`packed`, as many bytes as the file's blocks).
    struct Part {
        uint32_t type = 0;  // qdot::WType
        int64_t rows = 0;
        const uint8_t* data = nullptr;
        size_t row_bytes = 0;
        std::vector<uint8_t> owned;
        qdot::Packed packed;  // rows() > 0: used instead of data
    };
    std::vector<Part> parts;
    bool q8k = false, q80 = false;  // which activation forms the parts need

    static Linear make(const std::vector<float>& w, int64_t rows, int64_t cols, WeightFormat format);
    size_t bytes() const;
};

// Y[T][rows] = X[T][cols] * W^T with the matrix's own arithmetic; `q8` is scratch of T * cols bytes (int8 only),
// `acc` scratch of T * rows int32 (int8 only). Native matrices quantise X into per-thread scratch of their own.
void linear_forward(ThreadPool* pool, const Linear& W, const float* X, int64_t T, float* Y, std::vector<int8_t>& q8,
                    std::vector<float>& xs, std::vector<int32_t>& acc);

class Engine {
public:
    // `file`: the GGUF the weights came from, read in place by WeightFormat::native (it must outlive the engine);
    // without it, native re-quantises every matrix to Q8_0.
    Engine(const ModelWeights& weights, const EngineParams& params, const gguf::Reader* file = nullptr);
    // Bounded memory: the tensors are read one at a time from `source` (only during construction) and turned into
    // the engine's format, no f32 copy of the model kept beyond what that format is (f32 weights, the embeddings);
    // native reads `file`'s blocks in place and reads f32 only for matrices it re-quantises.
    Engine(const TensorSource& source, const EngineParams& params, const gguf::Reader* file = nullptr);
    // The same, and no embedding table either: each token's row is read from the source (a memory-mapped file's
    // pages, generated weights), which the engine holds.
    Engine(std::shared_ptr<const TensorSource> source, const EngineParams& params, const gguf::Reader* file = nullptr);
    ~Engine();

    const ModelConfig& config() const { return cfg_; }
    int n_ctx() const { return n_ctx_; }
    int pos() const { return pos_; }
    size_t weight_bytes() const;

    // Feeds tokens at positions pos() .. pos() + size - 1 and advances pos(). Returns the logits of the last token
    // ([vocab]) or, with all_logits, of every token ([size][vocab]); valid until the next call. Throws
    // si::Error(invalid_argument) when the context would overflow or a token id is out of range.
    const float* eval(std::span<const int32_t> tokens, bool all_logits = false);
    // Forgets the KV cache (pos() = 0).
    void reset() { pos_ = 0; }

private:
    struct Layer {
        std::vector<float> attn_norm, ffn_norm;
        Linear wqkv;  // [dim + 2 kv_dim][dim]: q, k, v stacked, one product per step
        Linear wo;
        Linear w13;   // [2 hidden][dim]: gate (w1) and up (w3) stacked
        Linear w2;
    };
    void init(const TensorSource& src, const gguf::Reader* file, bool embedding_table);
    void eval_batch(const int32_t* tokens, int T, bool all_logits, float* logits);
    void ensure_scratch(int T);

    ModelConfig cfg_;
    EngineParams params_;
    int n_ctx_ = 0;
    int pos_ = 0;
    std::unique_ptr<ThreadPool> pool_;
    std::vector<float> tok_embeddings_, final_norm_;
    std::shared_ptr<const TensorSource> embedding_rows_;  // instead of tok_embeddings_ when set
    std::vector<Layer> layers_;
    Linear classifier_;
    std::vector<float> key_cache_, value_cache_;  // [layer][n_ctx][kv_dim]
    // scratch, sized for the largest batch seen
    int scratch_T_ = 0;
    std::vector<float> x_, xb_, xb2_, qkv_, hb_, hb13_, logits_;
    std::vector<int8_t> q8_;
    std::vector<float> xs_;
    std::vector<int32_t> acc_;
};

}  // namespace si
