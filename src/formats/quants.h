// Dequantisation of the block formats llama.cpp writes for LLaMA models, bit-identical to ggml's reference
// dequantisation (dequantize_row_* in ggml-quants.c): the same block layouts, the same integer decoding and the same
// float operations in the same order. Where a sum follows a product (d * q + m, d * q - m) the product is exact in
// f32 (an fp16 scale, or an fp16 times a 6-bit scale, times an integer of at most 6 bits), so contraction into a
// fused multiply-add cannot change a result; the file is still compiled with -ffp-contract=off, as ggml's reference
// build rounds each operation.
//
// Types and their blocks (elements per block, bytes per block):
//   Q4_0 (32, 18)  Q4_1 (32, 20)  Q5_0 (32, 22)  Q5_1 (32, 24)  Q8_0 (32, 34)
//   Q2_K (256, 84) Q3_K (256, 110) Q4_K (256, 144) Q5_K (256, 176) Q6_K (256, 210)
//   IQ4_NL (32, 18) IQ4_XS (256, 136)
// plus the plain F32, F16 and BF16.
#pragma once
#include <cstddef>
#include <cstdint>

#include "formats/gguf.h"

namespace si::quants {

inline constexpr size_t kQK = 256;  // elements per k-quant super-block

// True for every type dequantize() handles: F32, F16, BF16 and the twelve block formats above.
bool supported(gguf::TensorType t);

// Dequantises n elements stored as `t`. n must be a multiple of the type's block size and `data` must hold
// n / block_size * type_size bytes (the GGUF reader checks both before any tensor is read); throws
// si::Error(Status::unsupported) for a type outside supported() and Status::invalid_argument for a partial block.
void dequantize(gguf::TensorType t, const uint8_t* data, size_t n, float* out);

// The 16 signed levels of the non-linear 4-bit types (IQ4_NL, IQ4_XS), as in ggml.
extern const int8_t kIQ4NLValues[16];

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block's 12 packed scale bytes.
inline void k4_scale_min(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = uint8_t((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

}  // namespace si::quants
