// Enclave hosts: the untrusted side's handle on one trusted-core instance. Interchangeable: in-process (tests only,
// no isolation), hardened worker process (the default without SGX hardware), SGX enclave (documented build path).
// A host only transports opaque request/response messages (src/boundary/enclave_abi.h); it never interprets them.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace si {

class EnclaveHost {
public:
    virtual ~EnclaveHost() = default;
    // A short, honest description of the isolation this host provides, e.g. "no isolation (in-process)".
    virtual std::string isolation() const = 0;
    // Warnings about weakened protection (e.g. "memfd_secret unavailable: using mlock + MADV_DONTDUMP").
    virtual std::vector<std::string> warnings() const { return {}; }
    // Sends one request and returns the response. Throws si::Error carrying the enclave's status and message,
    // or Status::internal naming the cause when the enclave side died (e.g. "enclave worker killed by signal 31").
    virtual void call(std::span<const uint8_t> request, std::vector<uint8_t>& response) = 0;

    // A call in two halves, for a request whose answer is needed only later: start_call sends it, finish_call
    // waits for the response (errors as call). One call at a time, split or not. When concurrent() the trusted
    // core works on the request while the caller goes on (the worker process with spinning doorbells: a core of
    // its own serves it); otherwise start_call runs the whole call, as this default does.
    virtual bool concurrent() const { return false; }
    virtual void start_call(std::span<const uint8_t> request) { call(request, started_response_); }
    virtual void finish_call(std::vector<uint8_t>& response) {
        response = std::move(started_response_);
        started_response_.clear();
    }

private:
    std::vector<uint8_t> started_response_;
};

std::unique_ptr<EnclaveHost> make_inprocess_host();
// With a software TEE platform from the device files in device_dir (host/software_tee.h), measured as this
// executable with the in-process configuration: for tests of attestation and sealing.
// enclave_threads: threads of the core's parallel loops (0: all CPUs).
std::unique_ptr<EnclaveHost> make_inprocess_host(const std::string& device_dir, int enclave_threads = 1);
// That measurement.
std::array<uint8_t, 32> inprocess_measurement();

}  // namespace si
