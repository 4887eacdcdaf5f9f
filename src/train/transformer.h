// Forward and backward passes of the LLaMA block for training, templated on the scalar type: float for training,
// double for the finite-difference gradient test. The arithmetic follows engine.cpp step by step (same RMSNorm,
// RoPE, softmax and SwiGLU formulas), so in float the logits agree with Engine::eval.
//
// One pass works on B independent sequences of S tokens, each starting at position 0 (a "window"). Activations of
// the last forward pass are kept for the backward pass; attention probabilities are stored packed (causal triangle
// per sequence and head).
//
// Threading: every parallel loop writes each output element from exactly one work item, summing in a fixed order,
// and reductions across work items (losses, norm gains, embedding rows) run sequentially. The results are therefore
// bit-identical for any thread count and any scheduling of the pool.
#pragma once
#include <cstdint>
#include <vector>

#include "common/model.h"
#include "common/threadpool.h"
#include "train/params.h"

namespace si::train {

template <class T>
class Transformer {
public:
    Transformer(const ModelConfig& cfg, ThreadPool& pool);

    // Runs B sequences of S tokens (tokens and targets are [B * S], row-major by sequence). targets may be null
    // (logits only); a negative target is not scored. LoRA factors present in `p` add lora_scale * B A to their
    // projection. Returns the summed cross-entropy (nats) over the scored positions.
    double forward(const ModelRef<const T>& p, T lora_scale, const int32_t* tokens, const int32_t* targets, int B, int S);

    // Logits of the last forward pass, [B * S][vocab].
    const std::vector<T>& logits() const { return logits_; }
    int64_t n_scored() const { return n_scored_; }

    // Adds d(loss_scale * summed loss)/d(parameter) of the last forward pass into `g`, for every non-null tensor of
    // `g` (frozen tensors are null). `p` and lora_scale must be those of the forward pass.
    void backward(const ModelRef<const T>& p, const ModelRef<T>& g, T lora_scale, T loss_scale);

private:
    struct LayerAct {
        std::vector<T> x;          // [N][dim] block input
        std::vector<T> r1, r2;     // [N] 1 / rms of x and x2
        std::vector<T> xn1, xn2;   // [N][dim] normalised inputs of attention and FFN
        std::vector<T> q, k, v;    // [N][dim], [N][kv_dim] x2, q and k after RoPE
        std::vector<T> att;        // packed attention probabilities
        std::vector<T> ao;         // [N][dim] attention output (input of wo)
        std::vector<T> x2;         // [N][dim] residual after attention
        std::vector<T> h1, h3, hg; // [N][hidden] gate, up, silu(gate) * up (input of w2)
        std::vector<T> u[kNumProj];  // [N][rank] A x for each LoRA projection
    };

    void linear_fwd(const T* x, int64_t in, const T* W, int64_t out, const T* A, const T* Bm, T s, std::vector<T>& u, T* y);
    void linear_bwd(const T* x, int64_t in, const T* W, int64_t out, const T* A, const T* Bm, T s, const std::vector<T>& u,
                    const T* dy, T* dx, T* gW, T* gA, T* gB);
    void rmsnorm_bwd(const T* x, const T* r, const T* w, const T* dy, T* dx, T* gw);
    void attention_fwd(LayerAct& a);
    void attention_bwd(const LayerAct& a, const T* dao, T* dq, T* dk, T* dv);
    void rope(T* v, int n_heads, bool inverse);
    size_t tri() const { return size_t(S_) * size_t(S_ + 1) / 2; }

    ModelConfig cfg_;
    ThreadPool& pool_;
    int B_ = 0, S_ = 0;
    int64_t N_ = 0;
    int rank_ = 0;
    std::vector<int32_t> tokens_, targets_;
    std::vector<T> rope_cos_, rope_sin_;  // [pos][head_dim / 2]
    int rope_len_ = 0;
    std::vector<LayerAct> layers_;
    std::vector<T> xf_, rf_, xnf_;       // final residual, its 1 / rms, normalised
    std::vector<T> logits_, probs_;      // [N][vocab]
    std::vector<double> tok_loss_;
    int64_t n_scored_ = 0;
    // scratch
    std::vector<T> tmp_, dyT_, wT_, du_, duT_, aT_, bT_;
    std::vector<T> dx_, dx2_, dxn_, dao_, dq_, dk_, dv_, dh1_, dh3_, dhg_, dlogits_;
};

extern template class Transformer<float>;
extern template class Transformer<double>;

}  // namespace si::train
