// The OpenAI-compatible HTTP server (see server.h). Request handling reads top to bottom: the sequence slots
// (server/batcher.h), request parsing, generation with stop strings and streaming, the routes. Errors are in
// server/api_error.h, the counters of GET /metrics in server/metrics.h.
#include "server/server.h"

#include "server/api_error.h"
#include "server/batcher.h"
#include "server/metrics.h"
#include "server/status.h"
#include "server/web_ui.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <cstdio>
#include <ctime>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

namespace si::server {

namespace {

// ---- the slots ----------------------------------------------------------------------------------------------------

// A sequence slot held for one request (server/batcher.h); given back (reset) by give_back() or when the last owner
// lets go. A stream gives it back once generation ends, before its last events: a client that has read the whole
// response never finds its slot still counted as active.
struct Lease {
    Batcher& batcher;
    std::shared_ptr<Batcher::Job> job;
    bool given_back = false;
    explicit Lease(Batcher& b) : batcher(b), job(acquire(b)) {}
    ~Lease() { give_back(); }
    void give_back() {
        if (given_back) return;
        given_back = true;
        batcher.release(job);
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;

    static std::shared_ptr<Batcher::Job> acquire(Batcher& b) {
        try {
            return b.acquire();
        } catch (const BatcherRefusal& e) {
            throw ApiError(503, e.what(), "",
                           e.kind == BatcherRefusal::busy     ? "server_busy"
                           : e.kind == BatcherRefusal::closed ? "server_shutting_down"
                                                              : "server_error");
        }
    }
};

// ---- requests -----------------------------------------------------------------------------------------------------

struct Request {
    bool chat = false;
    std::vector<si_token> prompt;
    int max_tokens = 16;
    si_sampler_params sampler{};
    bool stream = false, include_usage = false;
    std::vector<std::string> stop;
    int top_logprobs = -1;  // -1: no log-probabilities
    std::chrono::steady_clock::time_point arrived = std::chrono::steady_clock::now();
};

// Typed access to optional fields; a present field of the wrong type is a 400 naming it (null counts as absent).
const json* field(const json& body, const char* name) {
    const auto it = body.find(name);
    return it == body.end() || it->is_null() ? nullptr : &*it;
}

std::optional<double> get_number(const json& body, const char* name, double lo, double hi) {
    const json* f = field(body, name);
    if (!f) return std::nullopt;
    if (!f->is_number()) throw bad_request(std::string("'") + name + "' must be a number", name);
    const double v = f->get<double>();
    if (!(v >= lo && v <= hi))
        throw bad_request(std::string("'") + name + "' must be between " + json(lo).dump() + " and " + json(hi).dump(),
                          name);
    return v;
}

std::optional<int64_t> get_int(const json& body, const char* name, int64_t lo, int64_t hi) {
    const json* f = field(body, name);
    if (!f) return std::nullopt;
    if (!f->is_number_integer()) throw bad_request(std::string("'") + name + "' must be an integer", name);
    if (f->is_number_unsigned() && f->get<uint64_t>() > uint64_t(INT64_MAX))
        throw bad_request(std::string("'") + name + "' is out of range", name);
    const int64_t v = f->get<int64_t>();
    if (v < lo || v > hi)
        throw bad_request(std::string("'") + name + "' must be between " + std::to_string(lo) + " and " +
                              std::to_string(hi),
                          name);
    return v;
}

std::optional<bool> get_bool(const json& body, const char* name) {
    const json* f = field(body, name);
    if (!f) return std::nullopt;
    if (!f->is_boolean()) throw bad_request(std::string("'") + name + "' must be a boolean", name);
    return f->get<bool>();
}

// Message content: a string, or an array of {"type": "text", "text": ...} parts.
std::string message_text(const json& content, size_t i) {
    const std::string param = "messages[" + std::to_string(i) + "].content";
    if (content.is_string()) return content.get<std::string>();
    if (!content.is_array()) throw bad_request("'" + param + "' must be a string or an array of text parts", param);
    std::string text;
    for (const json& part : content) {
        if (!part.is_object() || part.value("type", json()) != "text" || !part.contains("text") ||
            !part["text"].is_string())
            throw bad_request("'" + param + "': only parts of type \"text\" with a string \"text\" are supported", param);
        text += part["text"].get<std::string>();
    }
    return text;
}

// The conversation as the chat template sees it: each message checked (an object with a string role; content a
// string, text parts joined, or null beside tool_calls), fields a template may use (tool_calls, tool_call_id,
// name) kept. With the plain fallback format (no template) only the roles it can show are accepted.
json chat_messages(const json& messages, bool plain) {
    if (!messages.is_array() || messages.empty()) throw bad_request("'messages' must be a non-empty array", "messages");
    json out = json::array();
    for (size_t i = 0; i < messages.size(); ++i) {
        const json& m = messages[i];
        const std::string param = "messages[" + std::to_string(i) + "]";
        if (!m.is_object()) throw bad_request("'" + param + "' must be an object", param);
        const auto role = m.find("role");
        if (role == m.end() || !role->is_string()) throw bad_request("'" + param + ".role' must be a string", param + ".role");
        const std::string r = role->get<std::string>();
        if (plain && r != "system" && r != "developer" && r != "user" && r != "assistant")
            throw bad_request("'" + param + ".role' must be one of system, developer, user, assistant", param + ".role");
        json msg = {{"role", r == "developer" && plain ? "system" : r}};
        const auto content = m.find("content");
        const bool tool_calls = m.contains("tool_calls") && !m["tool_calls"].is_null();
        if (content == m.end() || content->is_null()) {
            if (!tool_calls || plain) throw bad_request("'" + param + ".content' is required", param + ".content");
            msg["content"] = nullptr;
        } else {
            msg["content"] = message_text(*content, i);
        }
        for (const char* k : {"tool_calls", "tool_call_id", "name"})
            if (m.contains(k) && !m[k].is_null()) msg[k] = m[k];
        out.push_back(std::move(msg));
    }
    return out;
}

// The prompt text of a conversation in the model's chat format (si_chat_apply_template; docs/CHAT.md).
std::string chat_prompt(const si_model* model, const json& messages, const json* tools) {
    const std::string m = messages.dump();
    const std::string t = tools ? tools->dump() : std::string();
    std::string text(4096, '\0');
    size_t n = 0;
    int rc = si_chat_apply_template(model, m.c_str(), tools ? t.c_str() : nullptr, 1, text.data(), text.size(), &n);
    if (rc == SI_ERR_BUFFER_TOO_SMALL) {
        text.resize(n);
        rc = si_chat_apply_template(model, m.c_str(), tools ? t.c_str() : nullptr, 1, text.data(), text.size(), &n);
    }
    if (rc == SI_ERR_INVALID_ARGUMENT) throw bad_request(si_last_error(), "messages");
    if (rc != SI_OK) throw ApiError(500, si_last_error());
    text.resize(n);
    return text;
}

std::vector<si_token> chat_tokenize(const si_model* model, const std::string& text) {
    std::vector<si_token> ids(text.size() + 2);
    size_t n = 0;
    int rc = si_chat_tokenize(model, text.data(), text.size(), ids.data(), ids.size(), &n);
    if (rc == SI_ERR_BUFFER_TOO_SMALL) {
        ids.resize(n);
        rc = si_chat_tokenize(model, text.data(), text.size(), ids.data(), ids.size(), &n);
    }
    if (rc != SI_OK) throw ApiError(500, std::string("tokenizer: ") + si_last_error());
    ids.resize(n);
    return ids;
}

std::vector<si_token> tokenize(const si_model* model, const std::string& text) {
    std::vector<si_token> ids(text.size() + 2);
    size_t n = 0;
    int rc = si_tokenize(model, text.data(), text.size(), 1, ids.data(), ids.size(), &n);
    if (rc == SI_ERR_BUFFER_TOO_SMALL) {
        ids.resize(n);
        rc = si_tokenize(model, text.data(), text.size(), 1, ids.data(), ids.size(), &n);
    }
    if (rc != SI_OK) throw ApiError(500, std::string("tokenizer: ") + si_last_error());
    ids.resize(n);
    return ids;
}

std::string piece(const si_model* model, si_token prev, si_token tok) {
    char buf[256];
    size_t n = 0;
    if (si_token_to_piece(model, prev, tok, buf, sizeof buf, &n) != SI_OK) return std::string();
    return std::string(buf, n);
}

uint64_t random_seed() {
    static std::mutex m;
    static std::random_device rd;
    std::lock_guard<std::mutex> lk(m);
    return (uint64_t(rd()) << 32) ^ rd();
}

}  // namespace

// ---- the server ---------------------------------------------------------------------------------------------------

struct Server::Impl {
    si_model* model;
    Options opts;
    Metrics metrics;
    std::unique_ptr<Batcher> pool;
    int n_ctx = 0, n_vocab = 0;
    std::string warnings;
    std::string status;  // GET /v1/secureinfer/status
    httplib::Server http;
    std::atomic<bool> stopping{false};
    socket_t listen_fd = INVALID_SOCKET;
    std::atomic<uint64_t> next_id{0};
    uint64_t id_base = random_seed();
    std::time_t started = std::time(nullptr);

    Impl(si_model* m, si_context_params cp, Options o)
        : model(m), opts(std::move(o)), metrics(opts.model_id, opts.mode_name) {
        cp.logprobs = opts.logprobs;
        pool = std::make_unique<Batcher>(m, cp, std::max(1, opts.parallel), std::max(0, opts.max_queue),
                                         std::max(0, opts.precompute), &metrics);
        n_ctx = pool->n_ctx();
        n_vocab = si_model_n_vocab(m);
        warnings = pool->warnings();
        if (const std::string chat = si_chat_template_warning(m); !chat.empty())
            warnings += (warnings.empty() ? "" : "\n") + ("chat: " + chat);
        StatusInputs si{};
        // built once from the batcher's context as it was created (a replacement has the same configuration)
        const std::string& protection = pool->protection();
        if (protection.empty())
            std::fprintf(stderr, "serve: the protection status is incomplete: %s\n", pool->protection_error().c_str());
        si.protection = protection.empty() ? "{}" : protection;
        si.model_id = opts.model_id;
        si.mode = opts.mode_name;
        si.n_ctx = n_ctx;
        si.parallel = std::max(1, opts.parallel);
        si.max_tokens = opts.max_tokens;
        si.logprobs = opts.logprobs;
        si.logprob_noise = cp.logprob_noise;
        si.warnings = warnings;
        status = status_json(si);
        routes();
    }

    std::string new_id(const char* prefix) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%s%016llx%08llx", prefix, (unsigned long long)id_base,
                      (unsigned long long)next_id.fetch_add(1));
        return buf;
    }

    // ---- request parsing ----

    Request parse(const httplib::Request& req, bool chat) const {
        // The HTTP layer enforces the limit for bodies with a Content-Length, not quite for chunked ones.
        if (req.body.size() > opts.max_body)
            throw ApiError(413, "the request body exceeds the limit of " + std::to_string(opts.max_body) + " bytes", "",
                           "request_too_large");
        json body;
        try {
            body = json::parse(req.body);
        } catch (const json::parse_error& e) {
            // e.what() starts with "[json.exception.parse_error.101] "
            const std::string what = e.what();
            const size_t b = what.find("] ");
            throw bad_request("the request body is not valid JSON: " + (b == std::string::npos ? what : what.substr(b + 2)));
        }
        if (!body.is_object()) throw bad_request("the request body must be a JSON object");
        Request r;
        r.chat = chat;
        if (const json* m = field(body, "model")) {
            if (!m->is_string()) throw bad_request("'model' must be a string", "model");
            if (m->get<std::string>() != opts.model_id)
                throw ApiError(404, "The model '" + m->get<std::string>() + "' does not exist (this server serves '" +
                                        opts.model_id + "')",
                               "model", "model_not_found");
        }
        if (const auto n = get_int(body, "n", 1, 1 << 30); n && *n != 1)
            throw bad_request("only 'n' = 1 is supported", "n");
        if (const auto b = get_int(body, "best_of", 1, 1 << 30); b && *b != 1)
            throw bad_request("only 'best_of' = 1 is supported", "best_of");
        if (get_bool(body, "echo").value_or(false)) throw bad_request("'echo' is not supported", "echo");
        for (const char* p : {"presence_penalty", "frequency_penalty"})
            if (get_number(body, p, -2.0, 2.0).value_or(0.0) != 0.0)
                throw bad_request(std::string("'") + p + "' is not supported (only 0)", p);
        if (const json* lb = field(body, "logit_bias"); lb && !(lb->is_object() && lb->empty()))
            throw bad_request("'logit_bias' is not supported: logits never leave the trusted core", "logit_bias");
        if (const json* s = field(body, "suffix"); s && !(s->is_string() && s->get<std::string>().empty()))
            throw bad_request("'suffix' is not supported", "suffix");
        const bool plain_chat = *si_chat_stop_text(model) != '\0';  // the fallback format without a template
        const json* tools = field(body, "tools");
        if (tools && tools->is_array() && tools->empty()) tools = nullptr;
        if (tools && (!chat || plain_chat || !tools->is_array()))
            throw bad_request(!tools->is_array() ? "'tools' must be an array"
                                                 : "'tools' need a model whose chat template supports them",
                              "tools");

        // the prompt
        if (chat) {
            const json* messages = field(body, "messages");
            if (!messages) throw bad_request("'messages' is required", "messages");
            r.prompt = chat_tokenize(model, chat_prompt(model, chat_messages(*messages, plain_chat), tools));
            if (plain_chat) r.stop.push_back(si_chat_stop_text(model));
        } else {
            const json* p = field(body, "prompt");
            if (!p || p->is_string()) {
                r.prompt = tokenize(model, p ? p->get<std::string>() : std::string());
            } else if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) {
                r.prompt = tokenize(model, (*p)[0].get<std::string>());
            } else if (p->is_array() && !p->empty() && std::all_of(p->begin(), p->end(), [](const json& t) {
                           return t.is_number_integer();
                       })) {
                for (const json& t : *p) {
                    const int64_t id = t.get<int64_t>();
                    if (id < 0 || id >= n_vocab)
                        throw bad_request("'prompt' token " + std::to_string(id) + " is out of the vocabulary", "prompt");
                    r.prompt.push_back(si_token(id));
                }
            } else if (p->is_array() && p->size() > 1 && std::all_of(p->begin(), p->end(), [](const json& t) {
                           return t.is_string();
                       })) {
                throw bad_request("only one prompt per request is supported", "prompt");
            } else {
                throw bad_request("'prompt' must be a string, an array of one string or an array of token ids", "prompt");
            }
        }

        // limits: the prompt must leave room for at least one token, the completion must fit the context
        const int n_prompt = int(r.prompt.size());
        if (n_prompt >= n_ctx)
            throw bad_request("This model's maximum context length is " + std::to_string(n_ctx) +
                                  " tokens, but the prompt has " + std::to_string(n_prompt) + " tokens",
                              chat ? "messages" : "prompt", "context_length_exceeded");
        std::optional<int64_t> mt = get_int(body, "max_tokens", 0, INT32_MAX);
        if (chat && !mt) mt = get_int(body, "max_completion_tokens", 0, INT32_MAX);
        if (mt && *mt > opts.max_tokens)
            throw bad_request("'max_tokens' is " + std::to_string(*mt) + "; this server allows at most " +
                                  std::to_string(opts.max_tokens),
                              "max_tokens");
        if (mt && n_prompt + *mt > n_ctx)
            throw bad_request("This model's maximum context length is " + std::to_string(n_ctx) + " tokens, but " +
                                  std::to_string(n_prompt + *mt) + " were requested (" + std::to_string(n_prompt) +
                                  " in the prompt, " + std::to_string(*mt) + " for the completion)",
                              "max_tokens", "context_length_exceeded");
        const int room = std::min(n_ctx - n_prompt, opts.max_tokens);
        r.max_tokens = mt ? int(*mt) : chat ? room : std::min(16, room);

        // sampling (OpenAI's defaults: temperature 1, top_p 1; top_k is an extension, off unless given)
        r.sampler = si_sampler_default_params();
        r.sampler.temperature = float(get_number(body, "temperature", 0.0, 2.0).value_or(1.0));
        r.sampler.top_p = float(get_number(body, "top_p", 0.0, 1.0).value_or(1.0));
        r.sampler.top_k = int(get_int(body, "top_k", 0, 1 << 30).value_or(0));
        if (const json* s = field(body, "seed")) {
            if (!s->is_number_integer()) throw bad_request("'seed' must be an integer", "seed");
            r.sampler.seed = s->is_number_unsigned() ? s->get<uint64_t>() : uint64_t(s->get<int64_t>());
        } else {
            r.sampler.seed = random_seed();
        }

        if (const json* s = field(body, "stop")) {
            if (s->is_string()) {
                r.stop.push_back(s->get<std::string>());
            } else if (s->is_array() && s->size() <= 4 &&
                       std::all_of(s->begin(), s->end(), [](const json& x) { return x.is_string(); })) {
                for (const json& x : *s) r.stop.push_back(x.get<std::string>());
            } else {
                throw bad_request("'stop' must be a string or an array of at most 4 strings", "stop");
            }
            std::erase(r.stop, std::string());
        }

        r.stream = get_bool(body, "stream").value_or(false);
        if (const json* so = field(body, "stream_options")) {
            if (!so->is_object()) throw bad_request("'stream_options' must be an object", "stream_options");
            if (!r.stream) throw bad_request("'stream_options' needs 'stream': true", "stream_options");
            r.include_usage = get_bool(*so, "include_usage").value_or(false);
        }

        // log-probabilities: only as many as the trusted core was told to release at startup
        const char* lp_param = chat ? "top_logprobs" : "logprobs";
        std::optional<int64_t> top;
        if (chat) {
            const bool want = get_bool(body, "logprobs").value_or(false);
            top = get_int(body, "top_logprobs", 0, 20);
            if (top && !want) throw bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs");
            if (want && !top) top = 0;
        } else {
            top = get_int(body, "logprobs", 0, 20);
        }
        if (top) {
            if (opts.logprobs == 0)
                throw bad_request("log-probabilities are disabled on this server (start it with --logprobs K to let "
                                  "the trusted core release the top K)",
                                  chat ? "logprobs" : "logprobs");
            if (*top > opts.logprobs)
                throw bad_request(std::string("'") + lp_param + "' is " + std::to_string(*top) +
                                      "; this server releases at most " + std::to_string(opts.logprobs),
                                  lp_param);
            r.top_logprobs = int(*top);
        }
        return r;
    }

    // ---- generation ----

    struct TokenInfo {
        std::string text;
        std::optional<float> logprob;  // of the sampled token, when it is among the released ones
        std::vector<std::pair<std::string, float>> top;
    };

    struct Result {
        std::string text;
        int n_prompt = 0, n_generated = 0;
        std::string finish_reason = "stop";
        bool gone = false;  // the client went away; generation stopped
        double ttft = -1;   // seconds from arrival to the first token (-1: none)
        double seconds = 0; // from arrival to the last token
        si_stats stats{};   // this generation's share of the context's counters (Batcher::stats)
    };

    // Generates on the leased slot. emit(delta, tokens) receives text as it becomes final (not a possible start
    // of a stop string, not an unfinished UTF-8 sequence) and the tokens sampled since the last call; it returns
    // false to stop (the client went away).
    using Emit = std::function<bool(const std::string& delta, std::vector<TokenInfo>& tokens)>;

    Result generate(Lease& lease, const Request& r, const Emit& emit) {
        struct State {
            const Impl* self;
            const Request* r;
            const std::vector<std::pair<si_token, float>>* lps;  // released with the current token
            const Emit* emit;
            Result res;
            std::chrono::steady_clock::time_point arrived;
            std::string all;  // the text so far, cut at a stop string
            size_t sent = 0;  // bytes of `all` given to emit
            std::vector<TokenInfo> pending;
            si_token prev = 0;
            bool stopped = false, gone = false;
        } st{this, &r, nullptr, &emit, {}, r.arrived, {}, 0, {}, r.prompt.back(), false, false};
        st.res.n_prompt = int(r.prompt.size());

        auto on_token = [](si_token tok, const char* p, size_t n, void* user) -> int {
            State& s = *static_cast<State*>(user);
            if (s.res.n_generated++ == 0) s.res.ttft = seconds_since(s.arrived);
            const size_t before = s.all.size();
            s.all.append(p, n);
            if (s.r->top_logprobs >= 0) {
                TokenInfo info;
                info.text.assign(p, n);
                for (size_t i = 0; i < s.lps->size(); ++i) {
                    const auto& [id, lp] = (*s.lps)[i];
                    if (id == tok) info.logprob = lp;
                    if (int(i) < s.r->top_logprobs) info.top.emplace_back(piece(s.self->model, s.prev, id), lp);
                }
                s.pending.push_back(std::move(info));
            }
            s.prev = tok;
            // a stop string ends the text where it begins
            size_t cut = std::string::npos;
            for (const std::string& stop : s.r->stop) {
                const size_t from = before >= stop.size() ? before - stop.size() + 1 : 0;
                cut = std::min(cut, s.all.find(stop, from));
            }
            if (cut != std::string::npos) {
                s.all.resize(std::max(cut, s.sent));
                s.stopped = true;
                return 1;
            }
            // hold back what may still become a stop string or is an unfinished UTF-8 sequence
            size_t keep = s.all.size();
            for (const std::string& stop : s.r->stop)
                for (size_t k = std::min(stop.size() - 1, s.all.size() - s.sent); k > 0; --k)
                    if (s.all.compare(s.all.size() - k, k, stop, 0, k) == 0) {
                        keep = std::min(keep, s.all.size() - k);
                        break;
                    }
            keep = utf8_boundary(s.all, s.sent, keep);
            if (keep > s.sent || !s.pending.empty()) {
                if (!(*s.emit)(s.all.substr(s.sent, keep - s.sent), s.pending)) {
                    s.gone = true;
                    return 1;
                }
                s.sent = keep;
                s.pending.clear();
            }
            return 0;
        };

        std::string error;
        const int rc = pool->run(lease.job, r.prompt, r.sampler, r.max_tokens,
                                 [&](si_token tok, const std::vector<std::pair<si_token, float>>& lps) {
                                     st.lps = &lps;
                                     const std::string p = piece(model, st.prev, tok);
                                     return on_token(tok, p.data(), p.size(), &st) == 0;
                                 },
                                 &error);
        st.res.stats = pool->stats(lease.job);
        st.res.seconds = seconds_since(r.arrived);
        metrics.generation(rc == SI_ERR_INVALID_ARGUMENT ? 0 : st.res.n_prompt, st.res.n_generated, st.res.seconds,
                           st.res.ttft,
                           {st.res.stats.seconds_enclave, st.res.stats.seconds_accelerator, st.res.stats.seconds_host});
        if (rc == SI_ERR_INTEGRITY) metrics.integrity_failure();
        if (rc != SI_OK)  // a failed step ends the session; the batcher replaced the context
            throw ApiError(rc == SI_ERR_INVALID_ARGUMENT ? 400 : 500,
                           std::string("generation failed: ") + si_status_name(rc) + ": " + error);
        if (!st.gone && (st.sent < st.all.size() || !st.pending.empty()))
            emit(st.all.substr(st.sent), st.pending);
        st.res.text = std::move(st.all);
        st.res.gone = st.gone;
        const bool full = st.res.n_generated == r.max_tokens || st.res.n_prompt + st.res.n_generated >= n_ctx;
        st.res.finish_reason = !st.stopped && full ? "length" : "stop";
        return std::move(st.res);
    }

    // The end of the longest prefix of s[from, end) that does not end inside a UTF-8 sequence.
    static size_t utf8_boundary(const std::string& s, size_t from, size_t end) {
        for (size_t back = 1; back <= 3 && end >= from + back; ++back) {
            const unsigned char c = static_cast<unsigned char>(s[end - back]);
            if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back
            const size_t len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
            return len > back ? end - back : end;
        }
        return end;
    }

    // ---- responses ----

    json usage(const Result& res) const {
        return {{"prompt_tokens", res.n_prompt},
                {"completion_tokens", res.n_generated},
                {"total_tokens", res.n_prompt + res.n_generated}};
    }

    static json bytes_of(const std::string& s) {
        json b = json::array();
        for (unsigned char c : s) b.push_back(int(c));
        return b;
    }

    // Log-probabilities of tokens in the shape of the endpoint: chat {"content": [...]}, completions
    // {"tokens", "token_logprobs", "top_logprobs", "text_offset"}. A sampled token outside the released top K gets
    // -9999 (chat) or null (completions), as OpenAI does for unlikely tokens.
    json logprobs_json(bool chat, const std::vector<TokenInfo>& tokens, size_t offset) const {
        if (chat) {
            json content = json::array();
            for (const TokenInfo& t : tokens) {
                json top = json::array();
                for (const auto& [text, lp] : t.top)
                    top.push_back({{"token", text}, {"logprob", lp}, {"bytes", bytes_of(text)}});
                content.push_back({{"token", t.text},
                                   {"logprob", t.logprob ? double(*t.logprob) : -9999.0},
                                   {"bytes", bytes_of(t.text)},
                                   {"top_logprobs", top}});
            }
            return {{"content", content}};
        }
        json toks = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
        for (const TokenInfo& t : tokens) {
            toks.push_back(t.text);
            lps.push_back(t.logprob ? json(*t.logprob) : json(nullptr));
            json top = json::object();
            for (const auto& [text, lp] : t.top) top[text] = lp;
            tops.push_back(top);
            offs.push_back(offset);
            offset += t.text.size();
        }
        return {{"tokens", toks}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
    }

    // What this response cost, per domain (an extension field "secureinfer" of the last chunk and of the
    // non-streamed response; the web chat's panel shows it).
    json cost_json(const Result& out) const {
        const si_stats& st = out.stats;
        const double decode = out.ttft >= 0 ? out.seconds - out.ttft : 0;
        return {{"mode", opts.mode_name},
                {"prompt_tokens", out.n_prompt},
                {"generated_tokens", out.n_generated},
                {"seconds", out.seconds},
                {"ttft_seconds", out.ttft >= 0 ? json(out.ttft) : json(nullptr)},
                {"decode_tokens_per_second", out.n_generated > 1 && decode > 0 ? json((out.n_generated - 1) / decode)
                                                                               : json(nullptr)},
                {"enclave_seconds", st.seconds_enclave},
                {"accelerator_seconds", st.seconds_accelerator},
                {"host_seconds", st.seconds_host},
                {"enclave_calls", st.enclave_calls},
                {"crossings", st.crossings},
                {"bytes_to_enclave", st.bytes_to_enclave},
                {"bytes_from_enclave", st.bytes_from_enclave},
                {"bytes_to_accelerator", st.bytes_to_accelerator},
                {"bytes_from_accelerator", st.bytes_from_accelerator}};
    }

    json envelope(bool chat, bool chunk, const std::string& id, std::time_t created) const {
        return {{"id", id},
                {"object", chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion"},
                {"created", created},
                {"model", opts.model_id},
                {"system_fingerprint", "secureinfer-" + opts.mode_name}};
    }

    void complete(const httplib::Request& req, httplib::Response& res, bool chat) {
        if (stopping) throw ApiError(503, "the server is shutting down", "", "server_shutting_down");
        const Request r = parse(req, chat);
        auto lease = std::make_shared<Lease>(*pool);
        const std::string id = new_id(chat ? "chatcmpl-" : "cmpl-");
        const std::time_t created = std::time(nullptr);
        const auto t0 = std::chrono::steady_clock::now();
        if (!r.stream) {
            std::vector<TokenInfo> all_tokens;
            const Result out = generate(*lease, r, [&](const std::string&, std::vector<TokenInfo>& t) {
                for (auto& x : t) all_tokens.push_back(std::move(x));
                return true;
            });
            json body = envelope(chat, false, id, created);
            json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", out.finish_reason}};
            if (r.top_logprobs >= 0) choice["logprobs"] = logprobs_json(chat, all_tokens, 0);
            if (chat) choice["message"] = {{"role", "assistant"}, {"content", out.text}};
            else choice["text"] = out.text;
            body["choices"] = json::array({choice});
            body["usage"] = usage(out);
            body["secureinfer"] = cost_json(out);
            res.set_content(dump(body), "application/json");
            log(req, 200, out, t0);
            return;
        }
        // Server-sent events: one chunk per released piece of text, then the finish reason, usage if asked, [DONE].
        res.set_header("Cache-Control", "no-cache");
        res.set_chunked_content_provider(
            "text/event-stream", [this, lease, r, chat, id, created, t0, path = req.path](size_t, httplib::DataSink& sink) {
                auto send = [&](const json& j) {
                    const std::string ev = "data: " + dump(j) + "\n\n";
                    return sink.write(ev.data(), ev.size());
                };
                auto chunk = [&](const json& delta_or_text, const json& finish, const json& logprobs) {
                    json c = envelope(chat, true, id, created);
                    json choice = {{"index", 0}, {"logprobs", logprobs}, {"finish_reason", finish}};
                    if (chat) choice["delta"] = delta_or_text;
                    else choice["text"] = delta_or_text;
                    c["choices"] = json::array({choice});
                    return c;
                };
                if (chat && !send(chunk({{"role", "assistant"}, {"content", ""}}, nullptr, nullptr))) return false;
                size_t offset = 0;
                Result out;
                try {
                    out = generate(*lease, r, [&](const std::string& delta, std::vector<TokenInfo>& t) {
                        const json lp = r.top_logprobs >= 0 ? logprobs_json(chat, t, offset) : json(nullptr);
                        offset += delta.size();
                        return send(chunk(chat ? json{{"content", delta}} : json(delta), nullptr, lp));
                    });
                } catch (const ApiError& e) {
                    lease->give_back();
                    send(error_json(e));
                    sink.done();
                    return true;
                }
                lease->give_back();
                if (out.gone) {
                    if (opts.verbose)
                        std::fprintf(stderr, "serve: POST %s: the client went away after %d tokens\n", path.c_str(),
                                     out.n_generated);
                    return false;
                }
                json last = chunk(chat ? json::object() : json(""), out.finish_reason, nullptr);
                last["secureinfer"] = cost_json(out);
                if (!send(last)) return false;
                if (r.include_usage) {
                    json u = envelope(chat, true, id, created);
                    u["choices"] = json::array();
                    u["usage"] = usage(out);
                    if (!send(u)) return false;
                }
                static const char done[] = "data: [DONE]\n\n";
                if (!sink.write(done, sizeof done - 1)) return false;
                sink.done();
                if (opts.verbose) std::fprintf(stderr, "serve: POST %s 200 (stream) prompt %d, generated %d, %.3f s\n",
                                               path.c_str(), out.n_prompt, out.n_generated, seconds_since(t0));
                return true;
            });
    }

    static double seconds_since(std::chrono::steady_clock::time_point t0) {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }

    void log(const httplib::Request& req, int status, const Result& out, std::chrono::steady_clock::time_point t0) const {
        if (opts.verbose)
            std::fprintf(stderr, "serve: %s %s %d prompt %d, generated %d, %.3f s\n", req.method.c_str(),
                         req.path.c_str(), status, out.n_prompt, out.n_generated, seconds_since(t0));
    }

    json model_json() const {
        return {{"id", opts.model_id},
                {"object", "model"},
                {"created", started},
                {"owned_by", "secureinfer"},
                {"meta", {{"mode", opts.mode_name}, {"n_ctx", n_ctx}, {"n_vocab", n_vocab}, {"logprobs", opts.logprobs}}}};
    }

    // Runs a handler, turning ApiError (and anything unexpected) into an OpenAI error response.
    httplib::Server::Handler guard(std::function<void(const httplib::Request&, httplib::Response&)> f) {
        return [this, f](const httplib::Request& req, httplib::Response& res) {
            try {
                f(req, res);
            } catch (const ApiError& e) {
                send_error(res, e);
                if (opts.verbose)
                    std::fprintf(stderr, "serve: %s %s %d %s\n", req.method.c_str(), req.path.c_str(), e.status, e.what());
            } catch (const std::exception& e) {
                send_error(res, ApiError(500, std::string("internal error: ") + e.what()));
            }
        };
    }

    void routes() {
        // Generation requests count by endpoint and status before the response goes out (a stream once its
        // status is sent).
        http.Post("/v1/completions", [this, h = guard([this](const auto& req, auto& res) { complete(req, res, false); })](
                                         const auto& req, auto& res) {
            h(req, res);
            metrics.request("completions", res.status < 0 ? 200 : res.status);  // -1: the default, 200
        });
        http.Post("/v1/chat/completions", [this, h = guard([this](const auto& req, auto& res) { complete(req, res, true); })](
                                              const auto& req, auto& res) {
            h(req, res);
            metrics.request("chat", res.status < 0 ? 200 : res.status);
        });
        http.Get("/v1/models", guard([this](const auto&, auto& res) {
            res.set_content(dump({{"object", "list"}, {"data", json::array({model_json()})}}), "application/json");
        }));
        http.Get(R"(/v1/models/(.+))", guard([this](const auto& req, auto& res) {
            if (req.matches[1] != opts.model_id)
                throw ApiError(404, "The model '" + std::string(req.matches[1]) + "' does not exist", "model",
                               "model_not_found");
            res.set_content(dump(model_json()), "application/json");
        }));
        http.Get("/health", [this](const auto&, auto& res) {
            res.status = stopping ? 503 : 200;
            json h = {{"status", stopping ? "shutting down" : "ok"}};
            if (opts.precompute > 0) h["precomputed_steps"] = pool->precomputed_steps();  // per slot
            res.set_content(dump(h), "application/json");
        });
        for (const char* path : {"/v1/completions", "/v1/chat/completions"})
            http.Get(path, guard([](const auto& req, auto&) {
                throw ApiError(405, "use POST for " + req.path, "", "method_not_allowed");
            }));
        // Errors raised by the HTTP layer itself (no route, body too large, bad request line) get the same shape.
        http.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
            if (!res.body.empty()) return;
            if (req.method == "POST" && (req.path == "/v1/completions" || req.path == "/v1/chat/completions"))
                metrics.request(req.path == "/v1/completions" ? "completions" : "chat", res.status);
            if (res.status == 413)
                send_error(res, ApiError(413, "the request body exceeds the limit of " + std::to_string(opts.max_body) +
                                                  " bytes", "", "request_too_large"));
            else if (res.status == 404)
                send_error(res, ApiError(404, "Unknown request URL: " + req.method + " " + req.path, "", "unknown_url"));
            else
                send_error(res, ApiError(res.status, "HTTP error " + std::to_string(res.status)));
        });
        http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
            std::string msg = "internal error";
            try {
                if (ep) std::rethrow_exception(ep);
            } catch (const std::exception& e) {
                msg += std::string(": ") + e.what();
            } catch (...) {
            }
            send_error(res, ApiError(500, msg));
        });
        http.Get("/v1/secureinfer/status", [this](const auto&, auto& res) { res.set_content(status, "application/json"); });
        // The web chat, from files compiled into the binary.
        for (const WebAsset* a = kWebAssets; a->path; ++a) {
            auto serve = [a](const httplib::Request&, httplib::Response& res) {
                res.set_content(reinterpret_cast<const char*>(a->data), a->size, a->content_type);
                res.set_header("Cache-Control", "no-cache");
                res.set_header("Content-Security-Policy", "default-src 'self'");
            };
            http.Get(a->path, serve);
            if (std::string(a->path) == "/index.html") http.Get("/", serve);
        }
        http.Get("/metrics", [this](const auto&, auto& res) {
            res.set_content(metrics.render(pool->gauges()), "text/plain; version=0.0.4; charset=utf-8");
        });
        http.set_payload_max_length(opts.max_body);
        // Small responses and event-stream chunks go out at once, not after a delayed ACK.
        http.set_tcp_nodelay(true);
        // Keep the listening socket to widen its backlog after bind (the library listens with a backlog of 5,
        // which drops the connections of a burst of clients); SO_REUSEADDR as the library's default options set it.
        http.set_socket_options([this](socket_t sock) {
            listen_fd = sock;
            int yes = 1;
            setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
        });
        http.set_keep_alive_timeout(2);  // idle keep-alive connections delay shutdown by at most this much
        const size_t threads = size_t(opts.http_threads > 0 ? opts.http_threads
                                                            : std::max(8, opts.parallel + opts.max_queue));
        http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    }
};

Server::Server(si_model* model, const si_context_params& cp, Options opts)
    : impl_(std::make_unique<Impl>(model, cp, std::move(opts))) {}

Server::~Server() = default;

int Server::bind() {
    Impl& s = *impl_;
    int port = s.opts.port;
    if (port == 0) {
        port = s.http.bind_to_any_port(s.opts.host);
        if (port <= 0) throw std::runtime_error("cannot bind to " + s.opts.host + " on any port");
    } else if (!s.http.bind_to_port(s.opts.host, port)) {
        throw std::runtime_error("cannot bind to " + s.opts.host + ":" + std::to_string(port) +
                                 " (in use, or not a local address)");
    }
    if (s.listen_fd != INVALID_SOCKET) ::listen(s.listen_fd, SOMAXCONN);  // Linux: updates the backlog
    return port;
}

void Server::run() { impl_->http.listen_after_bind(); }

void Server::stop() {
    impl_->stopping = true;
    impl_->pool->close();
    impl_->http.stop();
}

bool Server::running() const { return impl_->http.is_running(); }
int Server::n_ctx() const { return impl_->n_ctx; }
std::string Server::warnings() const { return impl_->warnings; }

}  // namespace si::server
