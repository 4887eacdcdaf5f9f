// The OpenAI-compatible HTTP server behind `secureinfer serve`, built on the public C API only.
//
//   POST /v1/completions, /v1/chat/completions   (JSON, or server-sent events with "stream": true)
//   GET  /v1/models, /v1/models/{id}, /health
//
// Each request runs on a context of its own from a fixed pool (Options::parallel), fresh or reset when the previous
// request on it ended: the reset clears the KV cache and position and abandons any pass in progress, the sampler is
// seeded anew by every request, and the one-time pads come from the enclave's stream, never reused, so nothing
// carries from one request to the next. With Options::precompute, a context that comes back is topped up with
// precomputed unblinding factors by a background thread before (or, when a request is waiting, while) it is handed
// out again. Requests beyond the pool wait in a bounded queue, first come first served. In the secure modes only sampled tokens (and, if the server was started
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
    int parallel = 1;        // contexts, i.e. requests generated at the same time
    int max_queue = 64;      // requests allowed to wait for a context; more get 503
    size_t max_body = 1 << 20;  // request body limit in bytes; larger bodies get 413
    int max_tokens = 2048;   // the largest max_tokens a request may ask for
    int logprobs = 0;        // top-K log-probabilities the contexts release (0: requests for them get 400)
    // secureinfer: unblinding factors each context keeps precomputed for this many decode steps (0: none; decoding
    // then unblinds online, about half as fast). Filled before the server listens, topped up in the background
    // after every request.
    int precompute = 0;
    int http_threads = 0;    // connection threads (0: parallel + max_queue, at least 8)
    bool verbose = false;    // a line per request on stderr
};

class Server {
public:
    // Creates Options::parallel contexts of `model` with `cp` (cp.logprobs is set from Options::logprobs). The model
    // must outlive the server. Throws std::runtime_error with si_last_error()'s message when a context fails.
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
