// The C API: a thin shell over the C++ library that turns exceptions into status codes and thread-local messages.
#include "secureinfer.h"

#include <algorithm>
#include <cstring>
#include <ctime>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "chat/chat_template.h"
#include "common/error.h"
#include "common/sampler.h"
#include "common/staged_forward.h"
#include "common/tokenizer.h"
#include "engine/engine.h"
#include "formats/gguf.h"
#include "formats/model_file.h"
#include "host/package.h"
#include "host/secure_session.h"
#include "host/worker_host.h"
#include "train/lora.h"

struct si_model {
    // The base model, never merged with the adapter: its config and vocabulary, its tensors read one at a time
    // from file.source (bounded memory: a context turns them into its own form; no f32 copy is kept here).
    si::ModelFile file;
    std::unique_ptr<si::Tokenizer> tokenizer;
    // The LoRA adapter: merged into a copy of the weights for the plaintext engine, kept apart (and sent to the
    // trusted core only) in the secure modes.
    std::unique_ptr<si::train::LoraAdapter> lora;
    float lora_scale = 1.0f;
    // Tensors the model file declares secret (GGUF key secureinfer.secret_tensors).
    std::vector<std::string> secret_tensors;
    // A protected package: `file` is its public model; the secret tensors stay encrypted in here.
    std::shared_ptr<const si::Package> package;
    std::unique_ptr<si::chat::ChatTemplate> chat;  // the vocabulary's chat template or its fallback
};

struct si_context {
    si_model* model = nullptr;
    si_mode mode = SI_MODE_PLAIN;
    std::unique_ptr<si::Engine> engine;          // SI_MODE_PLAIN
    std::unique_ptr<si::SecureSession> session;  // the other modes
    std::string isolation, warnings;
    std::vector<si::TokenLogprob> logprobs;  // released with the last sampled token
    std::vector<std::vector<si::TokenLogprob>> slot_logprobs;  // per slot: released with its last sampled token
};

namespace {

// A model package lists the tensors its owner keeps secret under this GGUF key (an array of tensor names, "*" for
// all of them).
constexpr const char* kSecretTensorsKey = "secureinfer.secret_tensors";

thread_local std::string g_last_error;
// si_set_load_progress: the calling thread's load progress callback.
thread_local si_progress_callback g_load_progress = nullptr;
thread_local void* g_load_progress_user = nullptr;

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
        if (si::is_package_file(path)) {
            if (p.lora_path)
                si::fail(si::Status::invalid_argument, "a protected package carries its own adapters; lora_path "
                                                       "cannot be added to it");
            m->package = si::Package::open(path);
            // The package's public model, read in place (the package stays open as long as the source).
            const si::ModelFile& pm = m->package->model();
            m->file.weights.cfg = pm.weights.cfg;
            m->file.vocab = pm.vocab;
            m->file.format = pm.format;
            m->file.path = pm.path;
            m->file.vocab_path = pm.vocab_path;
            m->file.source = std::shared_ptr<const si::TensorSource>(m->package, pm.source.get());
            m->file.lazy = true;
        } else {
            m->file = si::load_model_file(path, p.tokenizer_path ? p.tokenizer_path : "", si::LoadWeights::lazy);
        }
        if (m->file.format == si::ModelFileFormat::gguf && !m->package) {
            const si::gguf::Reader r = si::gguf::Reader::open(path);
            if (r.has(kSecretTensorsKey)) m->secret_tensors = r.get_str_array(kSecretTensorsKey);
        }
        if (p.lora_path) {
            m->lora = std::make_unique<si::train::LoraAdapter>(
                si::train::read_lora_adapter(p.lora_path, m->file.weights.cfg));
            m->lora_scale = p.lora_scale;
        }
        m->tokenizer = std::make_unique<si::Tokenizer>(m->file.vocab, m->file.vocab_path);
        m->chat = std::make_unique<si::chat::ChatTemplate>(si::chat::ChatTemplate::for_vocab(m->file.vocab));
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

/* ---- chat templates ---- */

int si_chat_apply_template(const si_model* model, const char* messages_json, const char* tools_json,
                           int add_generation_prompt, char* buf, size_t capacity, size_t* n_out) {
    std::string text;
    const int g = guarded([&] {
        require(model && messages_json && n_out, "si_chat_apply_template: model, messages_json and n_out must not be NULL");
        si::chat::ChatOptions opts;
        opts.add_generation_prompt = add_generation_prompt != 0;
        opts.now = std::time(nullptr);
        si::chat::Value messages;
        try {
            messages = si::chat::from_json(messages_json);
            if (tools_json) opts.tools = si::chat::from_json(tools_json);
        } catch (const std::runtime_error& e) {
            si::fail(si::Status::invalid_argument, std::string("si_chat_apply_template: ") + e.what());
        }
        if (messages.kind != si::chat::Value::Kind::list)
            si::fail(si::Status::invalid_argument, "si_chat_apply_template: messages_json must be a JSON array");
        try {
            text = model->chat->apply(messages, opts);
        } catch (const si::chat::TemplateError& e) {
            si::fail(e.kind() == si::chat::TemplateError::Kind::unsupported ? si::Status::unsupported
                                                                             : si::Status::invalid_argument,
                     std::string("chat template: ") + e.what());
        }
    });
    if (g != SI_OK) {
        if (n_out) *n_out = 0;
        return g;
    }
    return copy_out(text, buf, capacity, n_out);
}

int si_chat_tokenize(const si_model* model, const char* text, size_t text_len, si_token* out, size_t capacity,
                     size_t* n_out) {
    int rc = SI_OK;
    int g = guarded([&] {
        require(model && (text || text_len == 0) && n_out, "si_chat_tokenize: model, text and n_out must not be NULL");
        const std::string_view t(text ? text : "", text_len);
        const si::chat::ChatTemplate& c = *model->chat;
        const si::Tokenizer& tok = *model->tokenizer;
        // Templates write BOS themselves ({{ bos_token }}); add it only when the text does not start with it.
        const std::string& bos = tok.token_text(tok.bos());
        const bool add_bos = !c.parse_special() || !(t.substr(0, bos.size()) == bos);
        const auto ids = tok.encode(t, add_bos, c.parse_special());
        *n_out = ids.size();
        if (ids.size() > capacity) {
            rc = SI_ERR_BUFFER_TOO_SMALL;
            return;
        }
        require(out || ids.empty(), "si_chat_tokenize: out must not be NULL");
        std::copy(ids.begin(), ids.end(), out);
    });
    if (g == SI_OK && rc != SI_OK) g_last_error = "buffer too small: need " + std::to_string(*n_out) + " tokens";
    return g != SI_OK ? g : rc;
}

const char* si_chat_template_warning(const si_model* model) { return model ? model->chat->warning().c_str() : ""; }

const char* si_chat_stop_text(const si_model* model) {
    if (!model) return "";
    return model->chat->format() == si::chat::ChatTemplate::Format::plain ? "\nUser:" : "";
}

int si_token_is_end_of_turn(const si_model* model, si_token token) {
    return model && token >= 0 && token < model->tokenizer->n_vocab() && model->tokenizer->is_end_of_turn(token) ? 1 : 0;
}

si_context_params si_context_default_params(void) {
    si_context_params p{};
    p.n_threads = 0;
    p.n_ctx = 0;
    p.n_batch = 512;
    p.weight_format = SI_WEIGHTS_F32;
    p.mode = SI_MODE_SECUREINFER;
    p.enclave_host = SI_HOST_AUTO;
    p.insecure = 0;
    p.secret_tensors = nullptr;
    p.trace_dir = nullptr;
    p.logprobs = 0;
    p.logprob_noise = 0.0f;
    p.sealed_key_path = nullptr;
    p.keyserver_url = nullptr;
    p.owner_key_file = nullptr;
    p.accelerator = nullptr;
    p.worker_spin_us = 0;
    p.pin_cpu = -1;
    p.precompute_inside_mib = 256;
    p.insecure_memory = 0;
    return p;
}

namespace {
int context_init(si_model* model, const si_context_params* params, int n_slots, si_context** out) {
    return guarded([&] {
        require(model && out, "si_context_init: model and out must not be NULL");
        *out = nullptr;
        const si_context_params p = params ? *params : si_context_default_params();
        require(p.n_threads >= 0 && p.n_threads <= 1024, "si_context_init: n_threads out of range");
        require(p.n_ctx >= 0, "si_context_init: n_ctx must not be negative");
        require(p.n_batch > 0, "si_context_init: n_batch must be positive");
        require(p.weight_format == SI_WEIGHTS_F32 || p.weight_format == SI_WEIGHTS_INT8 ||
                    p.weight_format == SI_WEIGHTS_NATIVE,
                "si_context_init: unknown weight format");
        require(p.mode >= SI_MODE_SECUREINFER && p.mode <= SI_MODE_PLAIN, "si_context_init: unknown mode");
        require(p.enclave_host >= SI_HOST_AUTO && p.enclave_host <= SI_HOST_WORKER, "si_context_init: unknown enclave host");
        require(p.logprobs >= 0, "si_context_init: logprobs must not be negative");
        auto c = std::make_unique<si_context>();
        c->model = model;
        c->mode = p.mode;
        if (model->package && (p.mode == SI_MODE_PLAIN || p.mode == SI_MODE_GPU_ONLY))
            si::fail(si::Status::security, "a protected package runs only in the secureinfer and enclave-only modes: "
                                           "its secret tensors open only inside the enclave");
        if (p.mode == SI_MODE_PLAIN) {
            si::EngineParams ep;
            ep.n_threads = p.n_threads;
            ep.n_ctx = p.n_ctx;
            ep.n_batch = p.n_batch;
            ep.weights = p.weight_format == SI_WEIGHTS_INT8     ? si::WeightFormat::int8
                         : p.weight_format == SI_WEIGHTS_NATIVE ? si::WeightFormat::native
                                                                : si::WeightFormat::f32;
            if (model->lora && ep.weights == si::WeightFormat::native)
                si::fail(si::Status::invalid_argument, "native weights are read from the model file as stored and "
                                                       "cannot have a LoRA adapter merged in; use f32 or int8 weights");
            if (model->lora) {
                // Merged into a copy of the f32 weights, so every engine format (int8 included) quantises the
                // adapted weights.
                si::ModelWeights merged = si::materialize(*si::source_for(model->file));
                si::train::merge_lora(merged, *model->lora, model->lora_scale);
                c->engine = std::make_unique<si::Engine>(merged, ep);
            } else {
                c->engine = std::make_unique<si::Engine>(si::source_for(model->file), ep, model->file.gguf.get());
            }
            c->isolation = "none (plaintext engine)";
        } else {
            si::SecureSessionParams sp;
            sp.mode = p.mode == SI_MODE_GPU_ONLY      ? si::SecureMode::gpu_only
                      : p.mode == SI_MODE_ENCLAVE_ONLY ? si::SecureMode::enclave_only
                                                       : si::SecureMode::secureinfer;
            sp.n_ctx = p.n_ctx;
            sp.n_batch = p.n_batch;
            sp.n_threads = p.n_threads;
            sp.insecure = p.insecure != 0;
            sp.insecure_memory = p.insecure_memory != 0;
            sp.host = p.enclave_host == SI_HOST_INPROCESS ? si::EnclaveHostKind::inprocess
                      : p.enclave_host == SI_HOST_WORKER  ? si::EnclaveHostKind::worker
                                                          : si::EnclaveHostKind::automatic;
            if (p.trace_dir) sp.trace_dir = p.trace_dir;
            if (p.accelerator) sp.accelerator_backend = p.accelerator;
            require(p.worker_spin_us >= 0 && p.worker_spin_us <= 1000000,
                    "si_context_init: worker_spin_us must be in [0, 1000000]");
            sp.worker_spin_us = p.worker_spin_us;
            require(p.pin_cpu >= -1 && p.pin_cpu < 1024, "si_context_init: pin_cpu must be -1 or a CPU number below 1024");
            sp.pin_cpu = p.pin_cpu;
            require(p.precompute_inside_mib >= 0 && p.precompute_inside_mib <= 1024,
                    "si_context_init: precompute_inside_mib must be in [0, 1024]");
            sp.precompute_inside_bytes = int64_t(p.precompute_inside_mib) << 20;
            sp.secret_tensors = model->secret_tensors;
            if (p.secret_tensors) {
                const std::string list = p.secret_tensors;
                size_t b = 0;
                while (b <= list.size()) {
                    const size_t e = std::min(list.find(',', b), list.size());
                    if (e > b) sp.secret_tensors.push_back(list.substr(b, e - b));
                    b = e + 1;
                }
            }
            sp.lora = model->lora.get();
            sp.package = model->package;
            if (p.sealed_key_path) sp.key.sealed_key_path = p.sealed_key_path;
            if (p.keyserver_url) sp.key.keyserver_url = p.keyserver_url;
            if (p.owner_key_file) sp.key.owner_key_file = p.owner_key_file;
            sp.lora_scale = model->lora_scale;
            sp.logprobs = p.logprobs;
            sp.logprob_noise = p.logprob_noise;
            if (g_load_progress)
                sp.load_progress = [cb = g_load_progress, user = g_load_progress_user](int done, int total) {
                    cb(done, total, user);
                };
            sp.slots = n_slots;
            c->session = std::make_unique<si::SecureSession>(si::source_for(model->file), std::move(sp));
            c->isolation = c->session->isolation();
            for (const auto& w : c->session->warnings()) c->warnings += (c->warnings.empty() ? "" : "\n") + w;
        }
        *out = c.release();
    });
}
}  // namespace

int si_context_init(si_model* model, const si_context_params* params, si_context** out) {
    return context_init(model, params, 1, out);
}

void si_context_free(si_context* ctx) { delete ctx; }
void si_context_reset(si_context* ctx) {
    if (!ctx) return;
    if (ctx->engine) {
        ctx->engine->reset();
    } else {
        // A failure here (a stopped session) surfaces on the next call that needs the enclave.
        guarded([&] { ctx->session->reset(); });
    }
}
int si_context_pos(const si_context* ctx) {
    return !ctx ? 0 : ctx->engine ? ctx->engine->pos() : ctx->session->pos();
}
int si_context_n_ctx(const si_context* ctx) {
    return !ctx ? 0 : ctx->engine ? ctx->engine->n_ctx() : ctx->session->n_ctx();
}

int si_eval(si_context* ctx, const si_token* tokens, size_t n_tokens, int all_logits, float* logits_out) {
    return guarded([&] {
        require(ctx && tokens && n_tokens > 0, "si_eval: context and a non-empty token array are required");
        const std::span<const int32_t> toks(tokens, n_tokens);
        if (ctx->session) {
            if (!logits_out) {
                ctx->session->eval(toks);
                return;
            }
            const float* logits = ctx->session->eval_logits(toks, all_logits != 0);  // gpu-only, else security
            const size_t n = size_t(all_logits ? n_tokens : 1) * size_t(ctx->session->config().vocab_size);
            std::memcpy(logits_out, logits, n * sizeof(float));
            return;
        }
        const float* logits = ctx->engine->eval(toks, all_logits != 0);
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
        const si::SamplerParams params{sp.temperature, sp.top_k, sp.top_p, sp.seed};
        ctx->logprobs.clear();
        if (ctx->session) {
            // The secure modes sample inside the enclave (gpu-only on the host): only tokens come back.
            si::SecureSession& s = *ctx->session;
            const si::Tokenizer& tok = *ctx->model->tokenizer;
            if (s.pos() + int64_t(n_prompt) > s.n_ctx())
                si::fail(si::Status::invalid_argument, "prompt of " + std::to_string(n_prompt) +
                                                           " tokens does not fit the context of " +
                                                           std::to_string(s.n_ctx() - s.pos()) + " free positions");
            s.set_sampler(params);
            if (n_predict == 0) {
                s.eval(std::span<const int32_t>(prompt, n_prompt));
                return;
            }
            si_token next = s.eval_sample(std::span<const int32_t>(prompt, n_prompt), &ctx->logprobs);
            si_token prev = prompt[n_prompt - 1];
            for (int i = 0; i < n_predict; ++i) {
                if (tok.is_end_of_turn(next)) break;
                const std::string piece = tok.piece(prev, next);
                if (n_generated) ++*n_generated;
                if (callback && callback(next, piece.data(), piece.size(), user_data) != 0) break;
                prev = next;
                if (i + 1 == n_predict || s.pos() >= s.n_ctx()) break;
                next = s.eval_sample(std::span<const int32_t>(&prev, 1), &ctx->logprobs);
            }
            return;
        }
        si::Sampler s(params);
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
            if (tok.is_end_of_turn(next)) break;
            const std::string piece = tok.piece(prev, next);
            if (n_generated) ++*n_generated;
            if (callback && callback(next, piece.data(), piece.size(), user_data) != 0) break;
            prev = next;
            if (i + 1 == n_predict || e.pos() >= e.n_ctx()) break;
            logits = e.eval(std::span<const int32_t>(&next, 1));
        }
    });
}

int si_eval_nll(si_context* ctx, const si_token* tokens, size_t n_tokens, const si_token* targets, double* nll_sum,
                size_t* n_scored) {
    return guarded([&] {
        require(ctx && tokens && targets && nll_sum && n_tokens > 0,
                "si_eval_nll: context, tokens, targets and nll_sum are required");
        const std::span<const int32_t> toks(tokens, n_tokens), tg(targets, n_tokens);
        if (ctx->session) {
            const auto [sum, count] = ctx->session->eval_nll(toks, tg);
            *nll_sum = sum;
            if (n_scored) *n_scored = size_t(count);
            return;
        }
        const int V = ctx->engine->config().vocab_size;
        for (int32_t t : tg)
            require(t >= -1 && t < V, "si_eval_nll: target out of range");
        const float* logits = ctx->engine->eval(toks, true);
        double sum = 0.0;
        size_t count = 0;
        for (size_t i = 0; i < n_tokens; ++i)
            if (tg[i] >= 0) {
                sum += si::token_nll(logits + i * size_t(V), V, tg[i]);
                ++count;
            }
        *nll_sum = sum;
        if (n_scored) *n_scored = count;
    });
}

int si_context_stats(const si_context* ctx, si_stats* out) {
    return guarded([&] {
        require(ctx && out, "si_context_stats: context and out are required");
        require(ctx->session != nullptr, "si_context_stats: the plaintext engine (SI_MODE_PLAIN) keeps no statistics");
        const si::SessionStats& s = ctx->session->stats();
        const si::SessionStats& l = ctx->session->load_stats();
        *out = si_stats{};
        out->enclave_calls = s.enclave_calls;
        out->crossings = s.crossings;
        out->accelerator_calls = s.accelerator_calls;
        out->bytes_to_enclave = s.bytes_to_enclave;
        out->bytes_from_enclave = s.bytes_from_enclave;
        out->bytes_to_accelerator = s.bytes_to_accelerator;
        out->bytes_from_accelerator = s.bytes_from_accelerator;
        out->seconds_enclave = s.enclave.seconds;
        out->seconds_accelerator = s.accelerator.seconds;
        out->seconds_host = s.host.seconds;
        out->flops_enclave = s.enclave.flops;
        out->flops_accelerator = s.accelerator.flops;
        out->flops_host = s.host.flops;
        out->load_bytes_to_enclave = l.bytes_to_enclave;
        out->load_bytes_to_accelerator = l.bytes_to_accelerator;
        out->load_seconds = l.enclave.seconds + l.accelerator.seconds + l.host.seconds;
    });
}

int si_context_precompute(si_context* ctx, int n_tokens, si_progress_callback progress, void* user_data,
                          double* seconds_out) {
    return guarded([&] {
        require(ctx != nullptr, "si_context_precompute: context is required");
        require(ctx->session != nullptr && ctx->mode == SI_MODE_SECUREINFER,
                "si_context_precompute: precomputed unblinding factors need SI_MODE_SECUREINFER");
        require(n_tokens > 0, "si_context_precompute: n_tokens must be positive");
        const double before = ctx->session->stats().offline.seconds;
        ctx->session->precompute(n_tokens, [&](int done, int total) {
            if (progress) progress(done, total, user_data);
        });
        if (seconds_out) *seconds_out = ctx->session->stats().offline.seconds - before;
    });
}

int si_context_precomputed(const si_context* ctx) {
    if (!ctx || !ctx->session || ctx->mode != SI_MODE_SECUREINFER) return 0;
    return ctx->session->precomputed_available();
}

const char* si_context_isolation(const si_context* ctx) { return ctx ? ctx->isolation.c_str() : ""; }
const char* si_context_warnings(const si_context* ctx) { return ctx ? ctx->warnings.c_str() : ""; }

int si_last_logprobs(const si_context* ctx, si_token* tokens, float* logprobs, size_t capacity, size_t* n_out) {
    return guarded([&] {
        require(ctx && n_out, "si_last_logprobs: context and n_out are required");
        const size_t n = std::min(capacity, ctx->logprobs.size());
        require(n == 0 || (tokens && logprobs), "si_last_logprobs: output arrays are required");
        for (size_t i = 0; i < n; ++i) {
            tokens[i] = ctx->logprobs[i].token;
            logprobs[i] = ctx->logprobs[i].logprob;
        }
        *n_out = n;
    });
}

// ---- protection status (the server's GET /v1/secureinfer/status and web chat) ------------------------------------

const char* si_context_protection(const si_context* ctx) {
    thread_local std::string out;
    const int rc = guarded([&] {
        require(ctx, "si_context_protection: context is required");
        using nlohmann::json;
        const char* modes[] = {"secureinfer", "gpu-only", "enclave-only", "plain"};
        json j;
        j["mode"] = modes[ctx->mode];
        j["isolation"] = ctx->isolation;
        const bool worker = ctx->isolation.rfind("worker process", 0) == 0;
        const bool inprocess = ctx->isolation.rfind("no isolation (in-process", 0) == 0;
        j["enclave_host"] = worker ? "worker" : inprocess ? "inprocess" : "none";
        j["measurement"] = nullptr;
        j["measurement_config"] = nullptr;
        if (worker) {
            si::WorkerOptions wo;
            // the fallback without locked memory runs only when it was allowed (its configuration says so)
            wo.insecure_memory = ctx->isolation.find("not locked") != std::string::npos;
            const si::WorkerIdentity id = si::worker_identity(wo);
            j["measurement"] = si::pkg::to_hex(id.measurement);
            j["measurement_config"] = id.config;
        } else if (inprocess) {
            j["measurement"] = si::pkg::to_hex(si::inprocess_measurement());
            j["measurement_config"] = "in-process core (tests only)";
        }
        j["package"] = nullptr;
        if (const auto& pk = ctx->model->package) {
            const json manifest = json::parse(pk->manifest_json(), nullptr, false);
            const auto& sp = pk->sampling();
            j["package"] = {{"model_id", si::pkg::to_hex(pk->model_id())},
                            {"name", manifest.is_object() ? manifest.value("name", "") : ""},
                            {"release",
                             {{"logprobs_top_k", pk->release() & si::pkg::kReleaseLogprobsMask},
                              {"nll", (pk->release() & si::pkg::kReleaseNll) != 0}}},
                            {"sampling",
                             {{"max_temperature", sp.max_temperature},
                              {"min_top_k", sp.min_top_k},
                              {"min_top_p", sp.min_top_p},
                              {"min_logprob_noise", sp.min_logprob_noise}}}};
        }
        json secrets = json::array();
        if (ctx->model->package)
            for (const auto& n : ctx->model->package->secret_base_tensors()) secrets.push_back(n);
        for (const auto& n : ctx->model->secret_tensors) secrets.push_back(n);
        j["secret_tensors"] = secrets;
        j["adapter"] = ctx->model->lora != nullptr || (ctx->model->package && ctx->model->package->has_adapter());
        out = j.dump();
    });
    return rc == SI_OK ? out.c_str() : nullptr;
}

// ---- load progress -------------------------------------------------------------------------------------------------

void si_set_load_progress(si_progress_callback progress, void* user_data) {
    g_load_progress = progress;
    g_load_progress_user = user_data;
}

// ---- sequence slots (continuous batching) --------------------------------------------------------------------

int si_slots_context_init(si_model* model, const si_context_params* params, int n_slots, si_context** out) {
    if (params && params->mode == SI_MODE_PLAIN)
        return guarded([&] {
            si::fail(si::Status::invalid_argument, "si_slots_context_init: sequence slots need a session mode, not "
                                                   "SI_MODE_PLAIN");
        });
    if (n_slots < 1 || n_slots > 1024)
        return guarded([&] {
            si::fail(si::Status::invalid_argument,
                     "si_slots_context_init: slot count " + std::to_string(n_slots) + " out of range [1, 1024]");
        });
    return context_init(model, params, n_slots, out);
}

int si_slots_count(const si_context* ctx) { return ctx && ctx->session ? ctx->session->slot_count() : 0; }

int si_slots_pos(const si_context* ctx, int slot) {
    if (!ctx || !ctx->session || slot < 0 || slot >= ctx->session->slot_count()) return -1;
    return ctx->session->slot_pos(slot);
}

int si_slots_reset(si_context* ctx, int slot) {
    return guarded([&] {
        require(ctx && ctx->session, "si_slots_reset: a context with sequence slots is required");
        ctx->session->reset_slot(slot);
        if (size_t(slot) < ctx->slot_logprobs.size()) ctx->slot_logprobs[size_t(slot)].clear();
    });
}

int si_slots_set_sampler(si_context* ctx, int slot, const si_sampler_params* sampler) {
    return guarded([&] {
        require(ctx && ctx->session, "si_slots_set_sampler: a context with sequence slots is required");
        const si_sampler_params sp = sampler ? *sampler : si_sampler_default_params();
        ctx->session->set_sampler(slot, si::SamplerParams{sp.temperature, sp.top_k, sp.top_p, sp.seed});
    });
}

int si_slots_step(si_context* ctx, const si_slot_step* steps, size_t n_steps, si_token* tokens_out) {
    return guarded([&] {
        require(ctx && ctx->session, "si_slots_step: a context with sequence slots is required");
        require(steps && n_steps > 0 && tokens_out, "si_slots_step: steps and tokens_out are required");
        std::vector<si::SlotStep> batch;
        for (size_t i = 0; i < n_steps; ++i) {
            require(steps[i].tokens || steps[i].n_tokens == 0, "si_slots_step: NULL tokens");
            batch.push_back(si::SlotStep{steps[i].slot, std::span<const int32_t>(steps[i].tokens, steps[i].n_tokens),
                                         steps[i].sample != 0});
        }
        std::vector<std::vector<si::TokenLogprob>> lps;
        const std::vector<int32_t> toks = ctx->session->step(batch, &lps);
        std::copy(toks.begin(), toks.end(), tokens_out);
        ctx->slot_logprobs.resize(size_t(ctx->session->slot_count()));
        for (size_t i = 0; i < n_steps; ++i)
            if (steps[i].sample) ctx->slot_logprobs[size_t(steps[i].slot)] = std::move(lps[i]);
    });
}

int si_slots_n_batch(const si_context* ctx) { return ctx && ctx->session ? ctx->session->n_batch() : 0; }

int si_slots_last_logprobs(const si_context* ctx, int slot, si_token* tokens, float* logprobs, size_t capacity,
                           size_t* n_out) {
    return guarded([&] {
        require(ctx && ctx->session && n_out, "si_slots_last_logprobs: a context with slots and n_out are required");
        require(slot >= 0 && slot < ctx->session->slot_count(), "si_slots_last_logprobs: slot out of range");
        static const std::vector<si::TokenLogprob> none;
        const auto& lp = size_t(slot) < ctx->slot_logprobs.size() ? ctx->slot_logprobs[size_t(slot)] : none;
        const size_t n = std::min(capacity, lp.size());
        require(n == 0 || (tokens && logprobs), "si_slots_last_logprobs: output arrays are required");
        for (size_t i = 0; i < n; ++i) {
            tokens[i] = lp[i].token;
            logprobs[i] = lp[i].logprob;
        }
        *n_out = n;
    });
}

}  // extern "C"
