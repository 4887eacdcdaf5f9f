// The OpenAI-compatible HTTP server behind `secureinfer serve`, built on the public C API only.
//
//   POST /v1/completions, /v1/chat/completions   (JSON, or server-sent events with "stream": true)
//   GET  /v1/models, /v1/models/{id}, /health
//
// The requests share one context with Options::parallel sequence slots (one copy of the weights in the enclave and
// on the accelerator; server/batcher.h): a request waits for a free slot (first come, first served, in a bounded
// queue; more get 503), and every running request advances in the same batched step, one token each per step, long
// prompts fed in chunks between them. When a request ends its slot is reset: its KV cache is freed and zeroed and
// its context and sampler state forgotten, the sampler is seeded anew by every request, and the one-time pads come
// from the enclave's stream, never reused, so nothing carries from one request to the next. With
// Options::precompute, the context keeps precomputed unblinding factors for that many decode steps per slot, topped
// up while no request runs. In the secure modes only sampled tokens (and, if the server was started
// with Options::logprobs, the released top-K log-probabilities) leave the trusted core.
#pragma once
#include <cstddef>
#include <memory>
#include <string>

#include "secureinfer.h"

namespace si::server {

struct Options {
    std::string host = "127.0.0.1";
    int port = 8080;         // 0: any free port (see Server::bind)
    std::string model_id;    // the name clients pass as "model"
    std::string mode_name;   // shown in /v1/models and /health
    int parallel = 1;        // sequence slots of the one context, i.e. requests generated at the same time
    int max_queue = 64;      // requests allowed to wait for a context; more get 503
    size_t max_body = 1 << 20;  // request body limit in bytes; larger bodies get 413
    int max_tokens = 2048;   // the largest max_tokens a request may ask for
    int logprobs = 0;        // top-K log-probabilities the contexts release (0: requests for them get 400)
    // secureinfer: unblinding factors kept precomputed for this many decode steps per slot (0: none; decoding then
    // unblinds online, about half as fast). Filled before the server listens, topped up while no request runs.
    int precompute = 0;
    int http_threads = 0;    // connection threads (0: parallel + max_queue, at least 8)
    bool verbose = false;    // a line per request on stderr
};

class Server {
public:
    // Creates a context of `model` with Options::parallel slots and `cp` (cp.logprobs is set from
    // Options::logprobs). The model must outlive the server. Throws std::runtime_error with si_last_error()'s
    // message when the context fails.
    Server(si_model* model, const si_context_params& cp, Options opts);
    ~Server();
    Server(const Server&) = delete;
    Server& operator=(const Server&) = delete;

    // Binds the listening socket; returns the port (the chosen one for port 0). Throws on failure.
    int bind();
    // Serves until stop(); returns once in-flight requests have finished.
    void run();
    // Refuses new and queued requests (503), lets the running ones finish and makes run() return. Thread-safe.
    void stop();
    // Whether run() is listening.
    bool running() const;

    // The contexts' n_ctx (all equal).
    int n_ctx() const;
    // Warnings about weakened protection of the contexts, one per line ("" when none).
    std::string warnings() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace si::server
