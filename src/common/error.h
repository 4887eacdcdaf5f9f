// Error type used inside the library. Every failure carries a status (mapped 1:1 onto the C API's SI_ERR_* codes)
// and a message that names the file or object and the problem. The C API converts these into return codes.
#pragma once
#include <stdexcept>
#include <string>

namespace si {

enum class Status : int {
    ok = 0,
    invalid_argument = -1,  // bad parameter or request
    io = -2,                // file cannot be opened, read or written
    format = -3,            // file is not what it claims: bad magic, truncated, inconsistent, out of range
    unsupported = -4,       // well-formed but not supported (version, tensor type, architecture)
    out_of_memory = -5,
    integrity = -6,         // an integrity check failed (tampering); the session must stop
    security = -7,          // refused by policy (secret tensor on the accelerator, bad attestation, ...)
    internal = -8,
};

class Error : public std::runtime_error {
public:
    Error(Status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    Status status() const noexcept { return status_; }

private:
    Status status_;
};

[[noreturn]] inline void fail(Status status, const std::string& message) { throw Error(status, message); }

}  // namespace si
