// Freivalds' check of offloaded products over the prime field F_p, p = 2^61 - 1 (DESIGN.md section 5).
//
// For a weight matrix W (int8, [N][K]) the key holds a secret random s in F_p^N and u = s^T W mod p. A claimed
// product y = W x (y: N signed integers, x: K signed integers) is accepted iff s . y == u . x (mod p). Since
// |y|, |x| < 2^31 < p, a wrong y differs from W x by a vector d that is non-zero mod p, and s . d == 0 for at
// most a 1/(p - 1) fraction of keys: an accelerator that does not know s is caught with probability >= 1 - 2^-60
// per tampered product. s and u never leave the key; they live in secret memory (a forger who read them could
// pass the check) and are zeroed on destruction.
#pragma once
#include <cstdint>

#include "common/secret_memory.h"

namespace si {

class ThreadPool;

class FreivaldsKey {
public:
    static constexpr uint64_t kPrime = (uint64_t(1) << 61) - 1;

    // Draws s (entries uniform in [1, p - 1]) from the OS CSPRNG and precomputes u = s^T W mod p.
    // N and K must lie in [1, 2^24]. pool: optional, parallelises the precomputation (nullptr: inline).
    FreivaldsKey(const int8_t* W, int64_t N, int64_t K, ThreadPool* pool = nullptr);
    ~FreivaldsKey();

    FreivaldsKey(const FreivaldsKey&) = delete;
    FreivaldsKey& operator=(const FreivaldsKey&) = delete;
    FreivaldsKey(FreivaldsKey&& other) noexcept;  // leaves `other` empty; checks against it throw
    FreivaldsKey& operator=(FreivaldsKey&&) = delete;

    int64_t rows() const { return n_; }
    int64_t cols() const { return k_; }

    // True iff s . y == u . x (mod p) for y [N] and x [K]. Throws si::Error on a moved-from key.
    [[nodiscard]] bool check(const int32_t* y, const int32_t* x) const;
    // Checks T products at once: Y [T][N] against X [T][K]; true only if every row passes.
    [[nodiscard]] bool check_batch(const int32_t* Y, const int32_t* X, int64_t T) const;

private:
    int64_t n_ = 0, k_ = 0;
    // s [N] (entries in [1, p - 1]) and u [K] (in [0, p - 1]), each as three limbs v = l0 + 2^21 l1 + 2^42 l2.
    SecretVector<int32_t> s_[3];
    SecretVector<int32_t> u_[3];
};

// Field helpers (exposed for tests).
uint64_t mulmod_p61(uint64_t a, uint64_t b);  // a, b < p
uint64_t reduce_p61(__int128 v);              // v mod p in [0, p), for any |v| < 2^127
// sum_i a[i] b[i] mod p through the limb kernel check() uses (a[i] < 2^61, n <= 2^24); not a fast path.
uint64_t dot_mod_p61(const uint64_t* a, const int32_t* b, int64_t n);

}  // namespace si
