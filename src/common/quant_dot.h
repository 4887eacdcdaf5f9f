// Dot products of weight rows stored in ggml's block formats with int8-quantised activations, the way llama.cpp's
// CPU backend multiplies quantised matrices: the weights are read in their file format (never expanded), the
// activations are quantised once per token to 8 bits with one scale per block (Q8_0-style blocks of 32 for Q4_0 and
// Q8_0 rows, Q8_K-style blocks of 256 with sums of 16 for the k-quants), and each block's integer dot product is
// exact before it is scaled.
//
// Every kernel has a portable scalar reference (namespace ref) computing the same integers; the vector kernels
// (AVX2 where the compiler targets it, VNNI's vpdpbusd for the signed 8-bit products where present) sum the scaled
// block products in a different order, so they agree with the reference to float rounding, not bit for bit.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

namespace si::qdot {

// Weight formats with native kernels (values are ggml's type numbers).
enum class WType : uint32_t { q4_0 = 2, q8_0 = 8, q4_k = 12, q6_k = 14 };
bool is_native(uint32_t ggml_type);
// Elements per block and bytes per block of a weight format.
int64_t block_elems(WType t);
size_t block_bytes(WType t);
// True when the format's rows use Q8_K activations (k-quants), false for Q8_0 activations.
inline bool uses_q8k(WType t) { return t == WType::q4_k || t == WType::q6_k; }

// Activations of one token, quantised for both block sizes (n must be a multiple of 32; the Q8_K form is only
// filled, and only usable, when n is a multiple of 256).
//   q0 [n] int8, d0 [n/32], s0 [n/32]: blocks of 32, d = max|x| / 127, q = round(x / d), s = sum of the block's q
//   qk [n] int8, dk [n/256], bsums [n/16]: blocks of 256 and the sum of each run of 16 quants
void quantize_q8_0(const float* x, int64_t n, int8_t* q0, float* d0, int16_t* s0);
void quantize_q8_k(const float* x, int64_t n, int8_t* qk, float* dk, int16_t* bsums);

// One row of n elements in format t (its n / block_elems blocks) times one token's activations: the Q8_0 form
// (q0, d0, s0) for q4_0 / q8_0, the Q8_K form (qk, dk, bsums) for q4_k / q6_k.
float dot_row(WType t, const uint8_t* row, int64_t n, const int8_t* q, const float* d, const int16_t* bsums);

// Q8_0 weights written by this process (for matrices whose file format has no native kernel): ggml's reference
// quantiser, d = max|x| / 127 stored as fp16.
void quantize_row_q8_0_weights(const float* x, int64_t n, uint8_t* out);

// ---- rows interleaved in groups of 16 (AVX-512 VNNI) ------------------------------------------------------------
// A matrix repacked once at load so that one 512-bit register holds the same four elements of 16 rows: vpdpbusd
// then multiplies one block of 16 rows by a broadcast of the activations, and the float work of a block (scale
// conversion, int-to-float, scaling) is shared by the 16 rows instead of done per row. The packed bytes are as many
// as the file's (only reordered); per group of 16 rows, the quants of all blocks come first (64-byte aligned), then
// the scales:
//   q4_0: per block, 4 x 64 bytes: vector j holds bytes 4j..4j+3 of each row's 16 nibble bytes (elements 4j..4j+3
//         in the low nibbles, 16+4j..16+4j+3 in the high ones), unsigned (the -8 is taken out with the
//         activations' block sum); then 16 fp16 scales per block.
//   q8_0: per block, 8 x 64 bytes: vector j holds quants 4j..4j+3 of each row, xor 0x80 (unsigned; the +128 is
//         taken out with the block sum); then 16 fp16 scales per block.
//   q4_k: per super-block, 4 x 8 x 64 bytes: vector 8j + k holds bytes 32j + 4k .. 32j + 4k + 3 of each row's 128
//         nibble bytes (elements 64j + 4k + i of sub-block 2j in the low nibbles, 64j + 32 + 4k + i of sub-block
//         2j + 1 in the high ones); then 16 fp16 scales, 16 fp16 mins' scales and the 12 bytes of 6-bit scales and
//         mins of each row ([byte][row]).
//   q6_k: per super-block, 16 sub-blocks of 3 x 64 bytes: for lane r (row r), byte i, vector 0 holds the low
//         nibbles of elements i (low) and 4+i (high) of the sub-block, vector 1 those of 8+i and 12+i, vector 2
//         their top two bits (bits 0-1: i, 2-3: 4+i, 4-5: 8+i, 6-7: 12+i); then 16 fp16 scales and the 16 x 16
//         int8 sub-block scales ([sub-block][row]).
// Each row's result is the scalar reference's (ref::dot_row on the row as stored), bit for bit: the same integer per
// block and the same float operations in the same order (this file is compiled with -ffp-contract=off).
constexpr int kGroupRows = 16;
// Whether this build has the interleaved kernels (AVX-512 BW and VNNI) for the format (all four when it has any).
bool has_packed(WType t);

class Packed {
public:
    Packed() = default;
    // rows x cols of format t, row r at src + r * row_bytes (cols a multiple of the format's block). Rows past the
    // last group of 16 are padded with zero blocks.
    Packed(WType t, const uint8_t* src, int64_t rows, int64_t cols, size_t row_bytes);
    WType type() const { return type_; }
    int64_t rows() const { return rows_; }
    int64_t cols() const { return cols_; }
    int64_t groups() const { return (rows_ + kGroupRows - 1) / kGroupRows; }
    size_t bytes() const { return size_t(groups()) * group_bytes_; }
    const uint8_t* group(int64_t g) const { return data_.get() + size_t(g) * group_bytes_; }

private:
    struct Free {
        void operator()(uint8_t* p) const;
    };
    WType type_ = WType::q8_0;
    int64_t rows_ = 0, cols_ = 0;
    size_t group_bytes_ = 0;
    std::unique_ptr<uint8_t[], Free> data_;
};

// Y[t * ldy + r] = row r of W times token t's activations, for the rows of groups [g0, g1) and T tokens: the Q8_0
// form (q, d, sums = q0, d0, s0 of quantize_q8_0, token t at q + t * cols, d + t * cols / 32, sums + t * cols / 32)
// for q4_0 / q8_0, the Q8_K form (qk, dk, bsums; token strides cols, cols / 256, cols / 16) for q4_k / q6_k. Tokens are
// taken four at a time per weight block read (prefill).
void gemm_packed(const Packed& W, int64_t g0, int64_t g1, const int8_t* q, const float* d, const int16_t* sums,
                 int64_t T, float* Y, int64_t ldy);

namespace ref {
void quantize_q8_0(const float* x, int64_t n, int8_t* q0, float* d0, int16_t* s0);
void quantize_q8_k(const float* x, int64_t n, int8_t* qk, float* dk, int16_t* bsums);
float dot_row(WType t, const uint8_t* row, int64_t n, const int8_t* q, const float* d, const int16_t* bsums);
}

}  // namespace si::qdot
