// A stand-in trusted core for testing the enclave hosts' transport (never part of a product build).
//   "secret:<bytes>"  stores <bytes> in secret memory (si_secret_alloc); responds with the address, in decimal
//   "crash"           abort()
//   "syscall"         calls socket(), which the worker's seccomp filter forbids
//   "fail:<message>"  fails with SI_ERR_INVALID_ARGUMENT (-1) and <message>
//   "openssl-key"     keys an AES-256-GCM context; responds with the context's address, in decimal
//   "crypto", "alloc:<n>", "throw"   what a real core does while serving: OpenSSL randomness and AES-GCM, a large
//                     heap allocation, a C++ exception thrown and caught
//   anything else     responds with the request reversed
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "boundary/enclave_abi.h"
#include "common/secret_memory.h"

struct si_enclave {
    si_ocall_table ocalls{};
    std::vector<std::pair<void*, size_t>> secrets;
    EVP_CIPHER_CTX* keyed = nullptr;  // an OpenSSL context holding a key schedule
};

namespace {

bool starts_with(const uint8_t* p, size_t n, const char* prefix) {
    const size_t k = std::strlen(prefix);
    return n >= k && std::memcmp(p, prefix, k) == 0;
}

bool aes_gcm_roundtrip() {
    unsigned char key[32], iv[12], tag[16];
    if (RAND_priv_bytes(key, sizeof key) != 1 || RAND_bytes(iv, sizeof iv) != 1) return false;
    std::vector<unsigned char> plain(4096, 'p'), sealed(plain.size());
    EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
    int n = 0, m = 0;
    bool ok = c && EVP_EncryptInit_ex2(c, EVP_aes_256_gcm(), key, iv, nullptr) == 1 &&
              EVP_EncryptUpdate(c, sealed.data(), &n, plain.data(), int(plain.size())) == 1 &&
              EVP_EncryptFinal_ex(c, sealed.data() + n, &m) == 1 &&
              EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, sizeof tag, tag) == 1 && sealed != plain;
    EVP_CIPHER_CTX_free(c);
    return ok;
}

int error(uint8_t* resp, size_t cap, int code, const std::string& msg) {
    if (cap) {
        const size_t n = std::min(msg.size(), cap - 1);
        std::memcpy(resp, msg.data(), n);
        resp[n] = 0;
    }
    return code;
}

}  // namespace

extern "C" int si_ecall_create(const si_ocall_table* ocalls, si_enclave** out) {
    auto* e = new si_enclave();
    if (ocalls) e->ocalls = *ocalls;
    *out = e;
    return 0;
}

extern "C" int si_ecall_create_ex(const si_ocall_table* ocalls, const si_platform*, si_enclave** out) {
    return si_ecall_create(ocalls, out);
}

extern "C" int si_ecall_process(si_enclave* e, const uint8_t* req, size_t n, uint8_t* resp, size_t cap,
                                size_t* resp_len) {
    *resp_len = 0;
    if (n == 5 && starts_with(req, n, "crash")) std::abort();
    if (n == 7 && starts_with(req, n, "syscall")) {
        const int fd = socket(AF_INET, SOCK_STREAM, 0);
        return error(resp, cap, -8, "socket() was allowed (fd " + std::to_string(fd) + ")");
    }
    auto reply = [&](const std::string& s) {
        if (s.size() > cap) return error(resp, cap, -1, "response buffer too small");
        std::memcpy(resp, s.data(), s.size());
        *resp_len = s.size();
        return 0;
    };
    const std::string word(req, req + std::min<size_t>(n, 64));
    if (word == "openssl-key") {
        unsigned char key[32], iv[12];
        RAND_priv_bytes(key, sizeof key);
        RAND_bytes(iv, sizeof iv);
        if (!e->keyed) e->keyed = EVP_CIPHER_CTX_new();
        if (!e->keyed || EVP_EncryptInit_ex2(e->keyed, EVP_aes_256_gcm(), key, iv, nullptr) != 1)
            return error(resp, cap, -8, "cannot key a cipher context");
        return reply(std::to_string(reinterpret_cast<uintptr_t>(e->keyed)));
    }
    if (word == "crypto") return aes_gcm_roundtrip() ? reply("crypto ok") : error(resp, cap, -8, "crypto failed");
    if (word.rfind("alloc:", 0) == 0) {
        const size_t len = std::stoull(word.substr(6));
        std::unique_ptr<uint8_t[]> p(new uint8_t[len]);
        std::memset(p.get(), 1, len);
        std::vector<uint8_t> grow(1);
        for (size_t k = 1; k < len; k *= 4) grow.resize(k);  // realloc-style growth
        return reply("alloc ok");
    }
    if (word == "throw") {
        try {
            throw std::runtime_error("inside the core");
        } catch (const std::exception&) {
            return reply("caught");
        }
    }
    if (starts_with(req, n, "fail:")) return error(resp, cap, -1, std::string(req + 5, req + n));
    if (starts_with(req, n, "log:")) {
        if (e->ocalls.log) e->ocalls.log(e->ocalls.ctx, 0, std::string(req + 4, req + n).c_str());
    }
    if (starts_with(req, n, "secret:")) {
        const size_t len = n - 7;
        void* p = si_secret_alloc(len);
        if (!p) return error(resp, cap, -5, "secret arena exhausted");
        std::memcpy(p, req + 7, len);
        e->secrets.emplace_back(p, len);
        const std::string addr = std::to_string(reinterpret_cast<uintptr_t>(p));
        if (addr.size() > cap) return error(resp, cap, -1, "response buffer too small");
        std::memcpy(resp, addr.data(), addr.size());
        *resp_len = addr.size();
        return 0;
    }
    if (n > cap) return error(resp, cap, -1, "response buffer too small");
    std::reverse_copy(req, req + n, resp);
    *resp_len = n;
    return 0;
}

extern "C" void si_ecall_destroy(si_enclave* e) {
    for (auto& [p, n] : e->secrets) si_secret_free(p, n);
    EVP_CIPHER_CTX_free(e->keyed);
    delete e;
}
