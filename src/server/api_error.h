// Errors of the HTTP server in the OpenAI shape: {"error": {"message", "type", "param", "code"}} with an HTTP status.
#pragma once
#include <httplib.h>

#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

namespace si::server {

using json = nlohmann::json;

// An error in the OpenAI shape: {"error": {"message", "type", "param", "code"}} with its HTTP status.
struct ApiError : std::runtime_error {
    int status;
    std::string type, param, code;
    ApiError(int status, const std::string& msg, std::string param = "", std::string code = "")
        : std::runtime_error(msg), status(status), param(std::move(param)), code(std::move(code)) {
        type = status >= 500 ? "server_error" : "invalid_request_error";
    }
};

inline ApiError bad_request(const std::string& msg, const std::string& param = "", const std::string& code = "") {
    return ApiError(400, msg, param, code);
}

// Responses may carry bytes of an unfinished UTF-8 sequence (byte-fallback tokens): replace them, never throw.
inline std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

inline json error_json(const ApiError& e) {
    json err = {{"message", e.what()}, {"type", e.type}, {"param", nullptr}, {"code", nullptr}};
    if (!e.param.empty()) err["param"] = e.param;
    if (!e.code.empty()) err["code"] = e.code;
    return json{{"error", err}};
}

inline void send_error(httplib::Response& res, const ApiError& e) {
    res.status = e.status;
    res.set_content(dump(error_json(e)), "application/json");
}

}  // namespace si::server
