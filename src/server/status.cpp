// The protection status of the server (see status.h).
#include "server/status.h"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

namespace si::server {

std::string status_json(const StatusInputs& in) {
    using json = nlohmann::json;
    const json p = json::parse(in.protection, nullptr, false);
    json s = {{"model", in.model_id}, {"mode", in.mode}, {"n_ctx", in.n_ctx}, {"parallel", in.parallel},
              {"max_tokens", in.max_tokens}};
    const bool ok = p.is_object();
    s["enclave"] = {{"host", ok ? p.value("enclave_host", "none") : "none"},
                    {"isolation", ok ? p.value("isolation", "") : ""},
                    {"measurement", ok ? p["measurement"] : json(nullptr)},
                    {"measurement_config", ok ? p["measurement_config"] : json(nullptr)}};
    s["package"] = ok ? p["package"] : json(nullptr);
    s["secret_tensors"] = ok ? p["secret_tensors"] : json::array();
    s["adapter"] = ok && p.value("adapter", false);

    // What leaves the trusted core with each response.
    std::string summary;
    const bool enclave = s["enclave"]["host"] != "none";
    if (!enclave) {
        summary = in.mode == "plain" ? "everything: the plaintext engine runs on the host (no enclave)"
                                     : "everything: the gpu-only preset runs in plaintext on the host and accelerator";
    } else if (in.logprobs > 0) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "sampled tokens and the top-%d log-probabilities of each", in.logprobs);
        summary = buf;
        if (in.logprob_noise > 0) {
            std::snprintf(buf, sizeof buf, " (with Gaussian noise, standard deviation %g)", double(in.logprob_noise));
            summary += buf;
        }
    } else {
        summary = "sampled tokens only";
    }
    s["released"] = {{"tokens", true},
                     {"logprobs_top_k", enclave ? in.logprobs : 0},
                     {"logprob_noise", in.logprob_noise},
                     {"summary", summary}};
    json w = json::array();
    for (size_t b = 0; b < in.warnings.size();) {
        const size_t e = std::min(in.warnings.find('\n', b), in.warnings.size());
        if (e > b) w.push_back(in.warnings.substr(b, e - b));
        b = e + 1;
    }
    s["warnings"] = w;
    return s.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace si::server
