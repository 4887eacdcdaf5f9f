#include "enclave/freivalds.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <algorithm>
#include <string>

#include "common/error.h"
#include "common/threadpool.h"

namespace si {

namespace {

constexpr uint64_t P = FreivaldsKey::kPrime;
constexpr int64_t kMaxDim = int64_t(1) << 24;

// Field elements v < 2^61 are stored as three limbs, v = l0 + 2^21 l1 + 2^42 l2 (l0, l1 < 2^21, l2 < 2^19), so
// that a dot product with an int32 vector is three sums of 32x32->64-bit products, which vectorise: each product
// is below 2^52 in magnitude, so blocks of 2048 terms cannot overflow int64. The blocks are combined exactly in
// 128 bits and reduced mod p once per dot product (lazy reduction): |result| < 2^61 * 2^31 * 2^24 = 2^116.
constexpr int kLimbBits = 21;
constexpr int64_t kDotBlock = 2048;

void split_limbs(const uint64_t* v, size_t n, SecretVector<int32_t> (&l)[3]) {
    for (auto& x : l) x.resize(n);
    for (size_t i = 0; i < n; ++i) {
        l[0][i] = int32_t(v[i] & ((1u << kLimbBits) - 1));
        l[1][i] = int32_t((v[i] >> kLimbBits) & ((1u << kLimbBits) - 1));
        l[2][i] = int32_t(v[i] >> (2 * kLimbBits));
    }
}

__int128 dot_limbs(const int32_t* l0, const int32_t* l1, const int32_t* l2, const int32_t* b, int64_t n) {
    __int128 total = 0;
    for (int64_t i0 = 0; i0 < n; i0 += kDotBlock) {
        const int64_t i1 = std::min(n, i0 + kDotBlock);
        int64_t a0 = 0, a1 = 0, a2 = 0;
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t y = b[i];
            a0 += int64_t(l0[i]) * y;
            a1 += int64_t(l1[i]) * y;
            a2 += int64_t(l2[i]) * y;
        }
        total += __int128(a0) + __int128(a1) * (int64_t(1) << kLimbBits) +
                 __int128(a2) * (int64_t(1) << (2 * kLimbBits));
    }
    return total;
}

__int128 dot_limbs(const SecretVector<int32_t> (&l)[3], const int32_t* b, int64_t n) {
    return dot_limbs(l[0].data(), l[1].data(), l[2].data(), b, n);
}

}  // namespace

uint64_t mulmod_p61(uint64_t a, uint64_t b) {
    const unsigned __int128 m = static_cast<unsigned __int128>(a) * b;  // < 2^122
    // 2^61 == 1 (mod p): fold the high part onto the low part.
    uint64_t r = uint64_t(m & P) + uint64_t(m >> 61);  // < 2^62
    r = (r & P) + (r >> 61);
    return r >= P ? r - P : r;
}

uint64_t reduce_p61(__int128 v) {
    const bool neg = v < 0;
    unsigned __int128 a = neg ? -static_cast<unsigned __int128>(v) : static_cast<unsigned __int128>(v);
    while (a >> 61) a = (a & P) + (a >> 61);  // at most three rounds for a < 2^127
    uint64_t r = uint64_t(a);
    if (r == P) r = 0;
    return (neg && r != 0) ? P - r : r;
}

FreivaldsKey::FreivaldsKey(const int8_t* W, int64_t N, int64_t K, ThreadPool* pool) : n_(N), k_(K) {
    if (!W || N < 1 || K < 1 || N > kMaxDim || K > kMaxDim)
        fail(Status::invalid_argument,
             "freivalds: bad weight matrix shape " + std::to_string(N) + "x" + std::to_string(K));
    // The plain copies of s and u (and the halves of s below) are secret too: secret memory, zeroed when freed,
    // also on the error paths.
    SecretVector<uint64_t> s(static_cast<size_t>(N)), u(static_cast<size_t>(K));
    // Entries uniform in [1, p - 1]: 61 random bits, rejecting 0 and p (both are 0 mod p).
    if (RAND_priv_bytes(reinterpret_cast<unsigned char*>(s.data()), int(s.size() * sizeof(uint64_t))) != 1)
        fail(Status::security, "freivalds: the OS random generator failed");
    for (auto& v : s) {
        v &= P;
        while (v == 0 || v == P) {
            if (RAND_priv_bytes(reinterpret_cast<unsigned char*>(&v), sizeof(v)) != 1)
                fail(Status::security, "freivalds: the OS random generator failed");
            v &= P;
        }
    }

    // u[k] = sum_n s[n] W[n][k] mod p. With s = hi * 2^31 + lo (hi < 2^30, lo < 2^31), each of
    // sum_n lo[n] W[n][k] and sum_n hi[n] W[n][k] fits int64 (N * 2^31 * 128 <= 2^62), so the inner loop is
    // plain 32x32->64-bit multiply-adds that vectorise; the field reduction happens once per column.
    SecretVector<int32_t> lo(static_cast<size_t>(N)), hi(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) {
        lo[n] = int32_t(s[n] & 0x7fffffffu);
        hi[n] = int32_t(s[n] >> 31);
    }
    auto columns = [&](int64_t k0, int64_t k1) {
        constexpr int64_t kBlock = 256;  // two int64 accumulator rows of this length stay in L1
        int64_t acc_lo[kBlock], acc_hi[kBlock];
        for (int64_t kb = k0; kb < k1; kb += kBlock) {
            const int64_t len = std::min(kBlock, k1 - kb);
            std::fill(acc_lo, acc_lo + len, 0);
            std::fill(acc_hi, acc_hi + len, 0);
            for (int64_t n = 0; n < N; ++n) {
                const int8_t* w = W + n * K + kb;
                const int64_t l = lo[n], h = hi[n];
                for (int64_t k = 0; k < len; ++k) {
                    acc_lo[k] += l * int64_t(w[k]);
                    acc_hi[k] += h * int64_t(w[k]);
                }
            }
            for (int64_t k = 0; k < len; ++k)
                u[kb + k] = (mulmod_p61(reduce_p61(acc_hi[k]), uint64_t(1) << 31) + reduce_p61(acc_lo[k])) % P;
            OPENSSL_cleanse(acc_lo, sizeof(acc_lo));
            OPENSSL_cleanse(acc_hi, sizeof(acc_hi));
        }
    };
    if (pool)
        pool->parallel_for(K, 64, columns);
    else
        columns(0, K);
    split_limbs(s.data(), s.size(), s_);
    split_limbs(u.data(), u.size(), u_);
}

FreivaldsKey::FreivaldsKey(FreivaldsKey&& other) noexcept : n_(other.n_), k_(other.k_) {
    for (int i = 0; i < 3; ++i) {
        s_[i] = std::move(other.s_[i]);
        u_[i] = std::move(other.u_[i]);
    }
    other.n_ = other.k_ = 0;
}

FreivaldsKey::~FreivaldsKey() = default;  // the limbs are zeroed as their secret memory is freed

bool FreivaldsKey::check(const int32_t* y, const int32_t* x) const {
    if (n_ == 0) fail(Status::internal, "freivalds: check against an empty key");
    return reduce_p61(dot_limbs(s_, y, n_) - dot_limbs(u_, x, k_)) == 0;
}

bool FreivaldsKey::check_batch(const int32_t* Y, const int32_t* X, int64_t T) const {
    if (n_ == 0) fail(Status::internal, "freivalds: check against an empty key");
    bool ok = true;
    for (int64_t t = 0; t < T; ++t) ok &= check(Y + t * n_, X + t * k_);
    return ok;
}

uint64_t dot_mod_p61(const uint64_t* a, const int32_t* b, int64_t n) {
    SecretVector<int32_t> l[3];
    split_limbs(a, size_t(n), l);
    return reduce_p61(dot_limbs(l, b, n));
}

}  // namespace si
