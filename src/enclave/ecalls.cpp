// The three ECALLs of enclave_abi.h around one TrustedCore. This file defines nothing else, so a program that
// brings its own si_ecall_* (the transport tests' stand-in core) links without pulling in the real one.
#include <algorithm>
#include <cstring>
#include <new>
#include <string>

#include "boundary/enclave_abi.h"
#include "common/error.h"
#include "common/secret_memory.h"
#include "enclave/trusted_core.h"

struct si_enclave {
    si::TrustedCore core;
    // The core's copy of the last request up to kKeptRequestBytes (secret memory, zeroed when freed): decoding makes
    // one ECALL per crossing, and a fresh copy would be zero-filled, written and zeroed again each time.
    si::SecretVector<uint8_t> request;
    static constexpr size_t kKeptRequestBytes = size_t(1) << 20;
    si_enclave(const si_ocall_table* ocalls, const si_platform* platform) : core(ocalls, platform) {}
};

namespace {

// Under AddressSanitizer every request gets a copy of its own size, so that a read past its end is caught (in the
// kept buffer it would read an earlier, longer request's bytes).
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kExactRequestCopies = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kExactRequestCopies = true;
#else
constexpr bool kExactRequestCopies = false;
#endif
#else
constexpr bool kExactRequestCopies = false;
#endif

int error_out(uint8_t* resp, size_t cap, size_t* resp_len, int code, const char* msg) {
    if (resp_len) *resp_len = 0;
    if (resp && cap) {
        const size_t n = std::min(std::strlen(msg), cap - 1);
        std::memcpy(resp, msg, n);
        resp[n] = 0;
    }
    return code;
}

}  // namespace

extern "C" int si_ecall_create(const si_ocall_table* ocalls, si_enclave** out) {
    return si_ecall_create_ex(ocalls, nullptr, out);
}

extern "C" int si_ecall_create_ex(const si_ocall_table* ocalls, const si_platform* platform, si_enclave** out) {
    if (!out) return int(si::Status::invalid_argument);
    *out = nullptr;
    try {
        *out = new si_enclave(ocalls, platform);
        return 0;
    } catch (const si::Error& e) {
        return int(e.status());
    } catch (const std::bad_alloc&) {
        return int(si::Status::out_of_memory);
    } catch (...) {
        return int(si::Status::internal);
    }
}

extern "C" int si_ecall_process(si_enclave* enclave, const uint8_t* request, size_t request_len, uint8_t* response,
                                size_t response_cap, size_t* response_len) {
    if (!enclave || !response_len || (!request && request_len) || (!response && response_cap))
        return error_out(response, response_cap, response_len, int(si::Status::invalid_argument),
                         "si_ecall_process: null argument");
    *response_len = 0;
    if (enclave->core.failed())
        return error_out(response, response_cap, response_len, int(si::Status::integrity),
                         "the session was stopped after an integrity failure; no further output is released");
    if (request_len > SI_ENCLAVE_MAX_MESSAGE)
        return error_out(response, response_cap, response_len, int(si::Status::invalid_argument),
                         "request larger than SI_ENCLAVE_MAX_MESSAGE");
    try {
        // The core works on its own copy: the host cannot change a request while it is being read. Requests may
        // carry secret tensors, so the copy is secret memory.
        si::SecretVector<uint8_t> large;
        si::SecretVector<uint8_t>& copy =
            request_len <= si_enclave::kKeptRequestBytes && !kExactRequestCopies ? enclave->request : large;
        copy.assign(request, request + request_len);
        const std::vector<uint8_t> out = enclave->core.process(std::span<const uint8_t>(copy.data(), copy.size()));
        if (out.size() > response_cap) {
            const std::string msg = "response of " + std::to_string(out.size()) + " bytes exceeds the buffer of " +
                                    std::to_string(response_cap) + " bytes";
            return error_out(response, response_cap, response_len, int(si::Status::invalid_argument), msg.c_str());
        }
        std::memcpy(response, out.data(), out.size());
        *response_len = out.size();
        return 0;
    } catch (const si::Error& e) {
        return error_out(response, response_cap, response_len, int(e.status()), e.what());
    } catch (const std::bad_alloc&) {
        return error_out(response, response_cap, response_len, int(si::Status::out_of_memory),
                         "out of memory inside the trusted core");
    } catch (const std::exception& e) {
        return error_out(response, response_cap, response_len, int(si::Status::internal), e.what());
    } catch (...) {
        return error_out(response, response_cap, response_len, int(si::Status::internal), "unknown failure");
    }
}

extern "C" void si_ecall_destroy(si_enclave* enclave) { delete enclave; }
