/*
 * The enclave boundary as a C ABI: the only way into the trusted core (src/enclave).
 *
 * The interface is deliberately coarse: one ECALL processes one request message (one layer stage of one batch of
 * tokens, whose rows may belong to several sequence slots; one tensor upload, one sampling step ...) and writes one response message. Messages are flat byte
 * buffers whose layout is defined in enclave_messages.h; the trusted core copies every request into its own memory
 * and validates every size, offset, count and index before use, and never keeps a pointer into host memory after
 * a call returns.
 *
 * Everything the trusted core needs from the operating system comes through the OCALL table given at creation.
 *
 * secureinfer_enclave.edl declares the same boundary for the SGX SDK with nothing but data crossing it: the core is
 * named by a handle, the function pointers below become OCALL contracts (parallel_for: ocall_parallel_for +
 * ecall_parallel_worker; quote: ocall_quote), and the platform comes from the hardware inside the enclave. The
 * trusted bridge between the two is src/boundary/enclave_bridge.h.
 */
#ifndef SECUREINFER_ENCLAVE_ABI_H
#define SECUREINFER_ENCLAVE_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SI_ENCLAVE_ABI_VERSION 1u
/* No request or response is larger than this; bigger transfers (weight uploads) are split by the host. */
#define SI_ENCLAVE_MAX_MESSAGE (64u << 20)

typedef struct si_ocall_table {
    /* Diagnostics only (never secrets): level 0 info, 1 warning, 2 error. May be NULL. */
    void (*log)(void* ctx, int level, const char* message);
    void* ctx;
    /* Parallel loops of the core's matrix products (enclave-only, online unblinding, precompute): calls
       fn(arg, begin, end) on disjoint chunks covering [0, n), each a multiple of grain long except the last, on the
       enclave's threads, and returns when all are done. Without SGX the worker process provides it with threads it
       starts before its seccomp filter. Under SGX fn and arg cannot leave the enclave: the bridge's
       bridge::ParallelJobs implements this entry inside it, and the host only lends threads (the EDL's
       ocall_parallel_for / ecall_parallel_worker; untested without SGX). NULL: the core runs everything on the
       calling thread. */
    void (*parallel_for)(void* ctx, int64_t n, int64_t grain, void (*fn)(void* arg, int64_t begin, int64_t end),
                         void* arg);
} si_ocall_table;

typedef struct si_enclave si_enclave;

/* What the platform (under SGX: the CPU and the quoting enclave; without SGX: the hardened worker process) tells
   the trusted core about itself, for attestation and sealing (docs/PACKAGES.md). */
typedef struct si_platform {
    const char* quote_type;   /* "software-tee" without SGX */
    uint8_t measurement[32];  /* the enclave's identity (MRENCLAVE; without SGX: worker binary + configuration) */
    uint8_t sealing_key[32];  /* derived from a device secret and the measurement (EGETKEY, MRENCLAVE policy) */
    /* The quoting component, outside the trusted core: signs a report. Returns 0 and the quote's length, or
       non-zero. The core chooses quote_cap and refuses a quote_len above it (under SGX: ocall_quote). */
    int (*quote)(void* ctx, const uint8_t* report, size_t report_len, uint8_t* quote, size_t quote_cap,
                 size_t* quote_len);
    void* ctx;
} si_platform;

/* Creates a trusted core instance. Returns 0 or a negative si_retcode code (secureinfer.h). */
int si_ecall_create(const si_ocall_table* ocalls, si_enclave** out);
/* The same, with a platform (may be NULL: then attest, release with sealing, and unseal are refused). The core
   copies what it needs; the caller may wipe *platform afterwards. */
int si_ecall_create_ex(const si_ocall_table* ocalls, const si_platform* platform, si_enclave** out);

/* Processes one request. On success returns 0 and writes the response (at most resp_cap bytes) and its length.
   On failure returns a negative si_retcode code and writes a NUL-terminated, secret-free error message into resp
   (truncated to resp_cap). After an integrity failure (SI_ERR_INTEGRITY) every later call fails: the session is
   over and no further output is released. */
int si_ecall_process(si_enclave* enclave, const uint8_t* request, size_t request_len, uint8_t* response,
                     size_t response_cap, size_t* response_len);

/* Destroys the instance; every secret it held is zeroed first. */
void si_ecall_destroy(si_enclave* enclave);

#ifdef __cplusplus
}
#endif

#endif /* SECUREINFER_ENCLAVE_ABI_H */
