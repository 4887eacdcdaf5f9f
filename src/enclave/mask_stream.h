// One-time pads over Z_2^32 for masking activations before they leave the trusted core (DESIGN.md section 5).
//
// MaskStream is AES-256 in counter mode: mask number i is word (i mod 4) of AES_k(i / 4), the counter block being
// the 128-bit big-endian block index. The key comes from the OS CSPRNG and never leaves the object; the stream only
// moves forward, so every position is handed out once (fill / reserve) and no mask can be drawn twice by accident.
//
// Offline unblinding: the enclave reserves a range of future masks, regenerates them with fill_at to compute the
// unblinding factors W r ahead of time, and seals W r together with the range. When a crossing consumes the range,
// fill_at regenerates the same r (cheaper than storing it) and the sealed W r is opened. Binding each range to
// exactly one crossing is the job of the caller that owns the sealed store; this class guarantees that no range is
// ever handed out twice.
#pragma once
#include <cstddef>
#include <cstdint>

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;

namespace si {

// Positions [offset, offset + count) of a mask stream.
struct MaskRange {
    uint64_t offset = 0;
    uint64_t count = 0;
};

class MaskStream {
public:
    static constexpr size_t kKeyBytes = 32;
    // Tag for the constructor that takes an explicit key. Only tests use it (known-answer and reproducibility
    // checks); production code always uses the default constructor.
    struct TestOnlyKey {};

    // A fresh stream keyed from the OS CSPRNG (RAND_priv_bytes). Throws si::Error if no randomness is available.
    MaskStream();
    MaskStream(const uint8_t (&key)[kKeyBytes], TestOnlyKey);
    ~MaskStream();  // the expanded key is cleansed

    MaskStream(const MaskStream&) = delete;
    MaskStream& operator=(const MaskStream&) = delete;
    MaskStream(MaskStream&&) = delete;
    MaskStream& operator=(MaskStream&&) = delete;

    // Number of masks handed out so far (by fill and reserve); never decreases.
    uint64_t position() const { return position_; }

    // Writes the next n masks (uniform uint32) and advances the position by n.
    void fill(uint32_t* out, size_t n);

    // Hands out the next n positions without generating them (for offline precomputation); advances by n.
    MaskRange reserve(uint64_t n);

    // Regenerates the masks at positions [offset, offset + n). Only positions already handed out are allowed:
    // fill_at can never be used to peek at masks that fill would return later.
    void fill_at(uint64_t offset, uint32_t* out, size_t n);

    // Throws si::Error instead of letting the position pass 2^64 masks (the AES counter then stays below 2^62
    // blocks, far from wrapping its 128 bits).
    static constexpr uint64_t kMaxPosition = ~uint64_t(0);

private:
    void init(const uint8_t* key);
    void generate(uint64_t offset, uint32_t* out, size_t n);
    uint64_t advance(uint64_t n);

    EVP_CIPHER_CTX* ctx_ = nullptr;
    uint64_t position_ = 0;
};

// x' = x + r (mod 2^32): masks n signed activations with n masks.
inline void mask_add(const int32_t* x, const uint32_t* r, uint32_t* out, size_t n) {
    for (size_t i = 0; i < n; ++i) out[i] = uint32_t(x[i]) + r[i];
}

// y = y' - W r (mod 2^32), read as signed int32: exact whenever the true |W x| < 2^31.
inline void mask_remove(const uint32_t* y_masked, const uint32_t* w_r, int32_t* y, size_t n) {
    for (size_t i = 0; i < n; ++i) y[i] = int32_t(y_masked[i] - w_r[i]);
}

}  // namespace si
