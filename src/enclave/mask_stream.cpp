#include "enclave/mask_stream.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <algorithm>
#include <climits>
#include <cstring>

#include "common/error.h"

namespace si {

namespace {

constexpr size_t kWordsPerBlock = 16 / sizeof(uint32_t);

// 128-bit big-endian counter block for AES block number `block` (OpenSSL's CTR mode increments it big-endian).
void counter_block(uint64_t block, unsigned char iv[16]) {
    std::memset(iv, 0, 8);
    for (int i = 0; i < 8; ++i) iv[15 - i] = static_cast<unsigned char>(block >> (8 * i));
}

}  // namespace

MaskStream::MaskStream() {
    uint8_t key[kKeyBytes];
    if (RAND_priv_bytes(key, sizeof(key)) != 1) {
        OPENSSL_cleanse(key, sizeof(key));
        fail(Status::security, "mask stream: the OS random generator failed to provide a key");
    }
    try {
        init(key);
    } catch (...) {
        OPENSSL_cleanse(key, sizeof(key));
        throw;
    }
    OPENSSL_cleanse(key, sizeof(key));
}

MaskStream::MaskStream(const uint8_t (&key)[kKeyBytes], TestOnlyKey) { init(key); }

MaskStream::~MaskStream() {
    // EVP_CIPHER_CTX_free cleanses the expanded key schedule before releasing it.
    EVP_CIPHER_CTX_free(ctx_);
}

void MaskStream::init(const uint8_t* key) {
    ctx_ = EVP_CIPHER_CTX_new();
    if (!ctx_) fail(Status::out_of_memory, "mask stream: cannot allocate a cipher context");
    unsigned char iv[16];
    counter_block(0, iv);
    if (EVP_EncryptInit_ex(ctx_, EVP_aes_256_ctr(), nullptr, key, iv) != 1) {
        EVP_CIPHER_CTX_free(ctx_);
        ctx_ = nullptr;
        fail(Status::internal, "mask stream: AES-256-CTR initialisation failed");
    }
}

uint64_t MaskStream::advance(uint64_t n) {
    if (n > kMaxPosition - position_)
        fail(Status::security, "mask stream: exhausted (the position would wrap); start a new stream");
    const uint64_t start = position_;
    position_ += n;
    return start;
}

void MaskStream::fill(uint32_t* out, size_t n) {
    if (n == 0) return;
    const uint64_t start = advance(n);
    generate(start, out, n);
}

MaskRange MaskStream::reserve(uint64_t n) { return MaskRange{advance(n), n}; }

void MaskStream::fill_at(uint64_t offset, uint32_t* out, size_t n) {
    if (offset > position_ || n > position_ - offset)
        fail(Status::invalid_argument, "mask stream: fill_at outside the positions handed out so far");
    if (n == 0) return;
    generate(offset, out, n);
}

void MaskStream::generate(uint64_t offset, uint32_t* out, size_t n) {
    unsigned char iv[16];
    int len = 0;
    uint64_t block = offset / kWordsPerBlock;
    const size_t skip = offset % kWordsPerBlock;
    if (skip != 0) {  // first block is partial: encrypt it on its own and keep the words needed
        uint32_t tmp[kWordsPerBlock] = {};
        counter_block(block, iv);
        if (EVP_EncryptInit_ex(ctx_, nullptr, nullptr, nullptr, iv) != 1 ||
            EVP_EncryptUpdate(ctx_, reinterpret_cast<unsigned char*>(tmp), &len,
                              reinterpret_cast<const unsigned char*>(tmp), sizeof(tmp)) != 1)
            fail(Status::internal, "mask stream: AES-256-CTR failed");
        const size_t take = std::min(n, kWordsPerBlock - skip);
        std::memcpy(out, tmp + skip, take * sizeof(uint32_t));
        OPENSSL_cleanse(tmp, sizeof(tmp));
        out += take;
        n -= take;
        ++block;
    }
    if (n == 0) return;
    // The keystream is the encryption of zeros: clear the output and encrypt it in place; OpenSSL's CTR code
    // runs whole batches of counter blocks through AES-NI/VAES.
    counter_block(block, iv);
    if (EVP_EncryptInit_ex(ctx_, nullptr, nullptr, nullptr, iv) != 1)
        fail(Status::internal, "mask stream: AES-256-CTR failed");
    constexpr size_t kChunkWords = size_t(1) << 28;  // keeps each call's byte count within int
    while (n > 0) {
        const size_t words = std::min(n, kChunkWords);
        auto* bytes = reinterpret_cast<unsigned char*>(out);
        std::memset(bytes, 0, words * sizeof(uint32_t));
        if (EVP_EncryptUpdate(ctx_, bytes, &len, bytes, int(words * sizeof(uint32_t))) != 1)
            fail(Status::internal, "mask stream: AES-256-CTR failed");
        out += words;
        n -= words;
    }
}

}  // namespace si
