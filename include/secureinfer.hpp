// C++ conveniences over the C API (secureinfer.h): RAII handles and exceptions. Header-only.
#pragma once
#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "secureinfer.h"

namespace secureinfer {

class Error : public std::runtime_error {
public:
    Error(int status, const std::string& msg) : std::runtime_error(msg), status_(status) {}
    int status() const noexcept { return status_; }

private:
    int status_;
};

inline void check(int status) {
    if (status != SI_OK) throw Error(status, si_last_error());
}

class Model {
public:
    explicit Model(const std::string& path, si_model_params params = si_model_default_params()) {
        check(si_model_load(path.c_str(), &params, &m_));
    }
    ~Model() { si_model_free(m_); }
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    si_model* get() const { return m_; }
    int n_vocab() const { return si_model_n_vocab(m_); }
    si_token bos() const { return si_model_bos(m_); }

    std::vector<si_token> tokenize(std::string_view text, bool add_bos) const {
        std::vector<si_token> ids(text.size() + 2);
        size_t n = 0;
        int rc = si_tokenize(m_, text.data(), text.size(), add_bos, ids.data(), ids.size(), &n);
        if (rc == SI_ERR_BUFFER_TOO_SMALL) {
            ids.resize(n);
            rc = si_tokenize(m_, text.data(), text.size(), add_bos, ids.data(), ids.size(), &n);
        }
        check(rc);
        ids.resize(n);
        return ids;
    }

private:
    si_model* m_ = nullptr;
};

class Context {
public:
    explicit Context(const Model& model, si_context_params params = si_context_default_params()) {
        check(si_context_init(model.get(), &params, &c_));
    }
    ~Context() { si_context_free(c_); }
    Context(const Context&) = delete;
    Context& operator=(const Context&) = delete;

    si_context* get() const { return c_; }
    int n_ctx() const { return si_context_n_ctx(c_); }
    void reset() { si_context_reset(c_); }

    // Generates up to n_predict tokens after `prompt`, calling on_piece(token, text) for each; return false to stop.
    int generate(const std::vector<si_token>& prompt, int n_predict, const si_sampler_params& sampler,
                 const std::function<bool(si_token, std::string_view)>& on_piece) {
        struct Thunk {
            static int call(si_token t, const char* p, size_t n, void* u) {
                auto* f = static_cast<const std::function<bool(si_token, std::string_view)>*>(u);
                return (*f)(t, std::string_view(p, n)) ? 0 : 1;
            }
        };
        int n = 0;
        check(si_generate(c_, prompt.data(), prompt.size(), n_predict, &sampler, &Thunk::call,
                          const_cast<void*>(static_cast<const void*>(&on_piece)), &n));
        return n;
    }

private:
    si_context* c_ = nullptr;
};

}  // namespace secureinfer
