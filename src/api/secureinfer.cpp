// The C API: a thin shell over the C++ library that turns exceptions into status codes and thread-local messages.
#include "secureinfer.h"

#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "common/error.h"
#include "common/sampler.h"
#include "common/tokenizer.h"
#include "engine/engine.h"
#include "formats/model_file.h"

struct si_model {
    si::ModelFile file;
    std::unique_ptr<si::Tokenizer> tokenizer;
};

struct si_context {
    si_model* model = nullptr;
    std::unique_ptr<si::Engine> engine;
};

namespace {

thread_local std::string g_last_error;

template <class F>
int guarded(F&& f) {
    try {
        g_last_error.clear();
        f();
        return SI_OK;
    } catch (const si::Error& e) {
        g_last_error = e.what();
        return int(e.status());
    } catch (const std::bad_alloc&) {
        g_last_error = "out of memory";
        return SI_ERR_OUT_OF_MEMORY;
    } catch (const std::exception& e) {
        g_last_error = std::string("internal error: ") + e.what();
        return SI_ERR_INTERNAL;
    }
}

void require(bool ok, const char* what) {
    if (!ok) si::fail(si::Status::invalid_argument, what);
}

int copy_out(const std::string& s, char* buf, size_t capacity, size_t* n_out) {
    if (n_out) *n_out = s.size();
    if (s.size() > capacity) {
        g_last_error = "buffer too small: need " + std::to_string(s.size()) + " bytes";
        return SI_ERR_BUFFER_TOO_SMALL;
    }
    if (!s.empty()) std::memcpy(buf, s.data(), s.size());
    return SI_OK;
}

}  // namespace

extern "C" {

const char* si_last_error(void) { return g_last_error.c_str(); }

const char* si_status_name(int status) {
    switch (status) {
        case SI_OK: return "SI_OK";
        case SI_ERR_INVALID_ARGUMENT: return "SI_ERR_INVALID_ARGUMENT";
        case SI_ERR_IO: return "SI_ERR_IO";
        case SI_ERR_FORMAT: return "SI_ERR_FORMAT";
        case SI_ERR_UNSUPPORTED: return "SI_ERR_UNSUPPORTED";
        case SI_ERR_OUT_OF_MEMORY: return "SI_ERR_OUT_OF_MEMORY";
        case SI_ERR_INTEGRITY: return "SI_ERR_INTEGRITY";
        case SI_ERR_SECURITY: return "SI_ERR_SECURITY";
        case SI_ERR_INTERNAL: return "SI_ERR_INTERNAL";
        case SI_ERR_BUFFER_TOO_SMALL: return "SI_ERR_BUFFER_TOO_SMALL";
        default: return "SI_ERR_UNKNOWN";
    }
}

si_model_params si_model_default_params(void) {
    si_model_params p{};
    p.tokenizer_path = nullptr;
    p.lora_path = nullptr;
    p.lora_scale = 1.0f;
    return p;
}

int si_model_load(const char* path, const si_model_params* params, si_model** out) {
    return guarded([&] {
        require(path && out, "si_model_load: path and out must not be NULL");
        *out = nullptr;
        const si_model_params p = params ? *params : si_model_default_params();
        auto m = std::make_unique<si_model>();
        m->file = si::load_model_file(path, p.tokenizer_path ? p.tokenizer_path : "");
        if (p.lora_path) si::fail(si::Status::unsupported, "LoRA adapters are not supported by this build");
        m->tokenizer = std::make_unique<si::Tokenizer>(m->file.vocab, m->file.vocab_path);
        *out = m.release();
    });
}

void si_model_free(si_model* model) { delete model; }

int si_model_n_vocab(const si_model* model) { return model ? model->file.weights.cfg.vocab_size : 0; }
int si_model_n_ctx_train(const si_model* model) { return model ? model->file.weights.cfg.seq_len : 0; }
si_token si_model_bos(const si_model* model) { return model ? model->tokenizer->bos() : -1; }
si_token si_model_eos(const si_model* model) { return model ? model->tokenizer->eos() : -1; }

int si_tokenize(const si_model* model, const char* text, size_t text_len, int add_bos, si_token* out, size_t capacity,
                size_t* n_out) {
    int rc = SI_OK;
    int g = guarded([&] {
        require(model && (text || text_len == 0) && n_out, "si_tokenize: model, text and n_out must not be NULL");
        const auto ids = model->tokenizer->encode(std::string_view(text ? text : "", text_len), add_bos != 0);
        *n_out = ids.size();
        if (ids.size() > capacity) {
            rc = SI_ERR_BUFFER_TOO_SMALL;
            return;
        }
        require(out || ids.empty(), "si_tokenize: out must not be NULL");
        std::copy(ids.begin(), ids.end(), out);
    });
    if (g == SI_OK && rc != SI_OK) g_last_error = "buffer too small: need " + std::to_string(*n_out) + " tokens";
    return g != SI_OK ? g : rc;
}

int si_token_to_piece(const si_model* model, si_token prev, si_token token, char* buf, size_t capacity, size_t* n_out) {
    std::string piece;
    const int g = guarded([&] {
        require(model, "si_token_to_piece: model must not be NULL");
        require(token >= 0 && token < si_model_n_vocab(model), "si_token_to_piece: token id out of range");
        piece = model->tokenizer->piece(prev, token);
    });
    return g != SI_OK ? g : copy_out(piece, buf, capacity, n_out);
}

si_context_params si_context_default_params(void) {
    si_context_params p{};
    p.n_threads = 0;
    p.n_ctx = 0;
    p.n_batch = 512;
    p.weight_format = SI_WEIGHTS_F32;
    return p;
}

int si_context_init(si_model* model, const si_context_params* params, si_context** out) {
    return guarded([&] {
        require(model && out, "si_context_init: model and out must not be NULL");
        *out = nullptr;
        const si_context_params p = params ? *params : si_context_default_params();
        require(p.n_threads >= 0 && p.n_threads <= 1024, "si_context_init: n_threads out of range");
        require(p.n_ctx >= 0, "si_context_init: n_ctx must not be negative");
        require(p.n_batch > 0, "si_context_init: n_batch must be positive");
        require(p.weight_format == SI_WEIGHTS_F32 || p.weight_format == SI_WEIGHTS_INT8, "si_context_init: unknown weight format");
        si::EngineParams ep;
        ep.n_threads = p.n_threads;
        ep.n_ctx = p.n_ctx;
        ep.n_batch = p.n_batch;
        ep.weights = p.weight_format == SI_WEIGHTS_INT8 ? si::WeightFormat::int8 : si::WeightFormat::f32;
        auto c = std::make_unique<si_context>();
        c->model = model;
        c->engine = std::make_unique<si::Engine>(model->file.weights, ep);
        *out = c.release();
    });
}

void si_context_free(si_context* ctx) { delete ctx; }
void si_context_reset(si_context* ctx) {
    if (ctx) ctx->engine->reset();
}
int si_context_pos(const si_context* ctx) { return ctx ? ctx->engine->pos() : 0; }
int si_context_n_ctx(const si_context* ctx) { return ctx ? ctx->engine->n_ctx() : 0; }

int si_eval(si_context* ctx, const si_token* tokens, size_t n_tokens, int all_logits, float* logits_out) {
    return guarded([&] {
        require(ctx && tokens && n_tokens > 0, "si_eval: context and a non-empty token array are required");
        const float* logits = ctx->engine->eval(std::span<const int32_t>(tokens, n_tokens), all_logits != 0);
        if (logits_out) {
            const size_t n = size_t(all_logits ? n_tokens : 1) * size_t(ctx->engine->config().vocab_size);
            std::memcpy(logits_out, logits, n * sizeof(float));
        }
    });
}

si_sampler_params si_sampler_default_params(void) {
    si_sampler_params p{};
    const si::SamplerParams d;
    p.temperature = d.temperature;
    p.top_k = d.top_k;
    p.top_p = d.top_p;
    p.seed = d.seed;
    return p;
}

int si_generate(si_context* ctx, const si_token* prompt, size_t n_prompt, int n_predict, const si_sampler_params* sampler,
                si_token_callback callback, void* user_data, int* n_generated) {
    if (n_generated) *n_generated = 0;
    return guarded([&] {
        require(ctx && prompt && n_prompt > 0, "si_generate: context and a non-empty prompt are required");
        require(n_predict >= 0, "si_generate: n_predict must not be negative");
        const si_sampler_params sp = sampler ? *sampler : si_sampler_default_params();
        si::Sampler s(si::SamplerParams{sp.temperature, sp.top_k, sp.top_p, sp.seed});
        si::Engine& e = *ctx->engine;
        const si::Tokenizer& tok = *ctx->model->tokenizer;
        const int n_vocab = e.config().vocab_size;
        if (e.pos() + int64_t(n_prompt) > e.n_ctx())
            si::fail(si::Status::invalid_argument, "prompt of " + std::to_string(n_prompt) + " tokens does not fit the context of " +
                                                       std::to_string(e.n_ctx() - e.pos()) + " free positions");
        const float* logits = e.eval(std::span<const int32_t>(prompt, n_prompt));
        si_token prev = prompt[n_prompt - 1];
        for (int i = 0; i < n_predict; ++i) {
            const si_token next = s.sample(logits, n_vocab);
            if (next == tok.eos()) break;
            const std::string piece = tok.piece(prev, next);
            if (n_generated) ++*n_generated;
            if (callback && callback(next, piece.data(), piece.size(), user_data) != 0) break;
            prev = next;
            if (i + 1 == n_predict || e.pos() >= e.n_ctx()) break;
            logits = e.eval(std::span<const int32_t>(&next, 1));
        }
    });
}

}  // extern "C"
