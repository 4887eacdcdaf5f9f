// Block decoders of llama.cpp's quantisation types. Each follows the arithmetic of ggml's reference dequantisation
// exactly: integers are decoded first, converted to float, then scaled with the same sequence of float roundings
// (see quants.h).
#include "formats/quants.h"

#include <cstring>
#include <string>

#include "common/error.h"
#include "common/fp16.h"

namespace si::quants {

using gguf::TensorType;

const int8_t kIQ4NLValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

namespace {

float half(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return fp16_to_fp32(h);
}

// --- 32-element blocks ----------------------------------------------------------------------------------------

// Q4_0: d (f16), qs[16]; element j is low nibble of qs[j], element j + 16 the high nibble; value (q - 8) * d.
void q4_0(const uint8_t* b, float* y) {
    const float d = half(b);
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 16; ++j) {
        y[j] = float((qs[j] & 0x0F) - 8) * d;
        y[j + 16] = float((qs[j] >> 4) - 8) * d;
    }
}

// Q4_1: d, m (f16), qs[16]; value q * d + m.
void q4_1(const uint8_t* b, float* y) {
    const float d = half(b), m = half(b + 2);
    const uint8_t* qs = b + 4;
    for (int j = 0; j < 16; ++j) {
        y[j] = float(qs[j] & 0x0F) * d + m;
        y[j + 16] = float(qs[j] >> 4) * d + m;
    }
}

// Q5_0: d (f16), qh (32 fifth bits, little-endian u32), qs[16]; value (q - 16) * d.
void q5_0(const uint8_t* b, float* y) {
    const float d = half(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const uint8_t* qs = b + 6;
    for (int j = 0; j < 16; ++j) {
        const int h0 = int((qh >> j) << 4) & 0x10;
        const int h1 = int(qh >> (j + 12)) & 0x10;
        y[j] = float(((qs[j] & 0x0F) | h0) - 16) * d;
        y[j + 16] = float(((qs[j] >> 4) | h1) - 16) * d;
    }
}

// Q5_1: d, m (f16), qh, qs[16]; value q * d + m.
void q5_1(const uint8_t* b, float* y) {
    const float d = half(b), m = half(b + 2);
    uint32_t qh;
    std::memcpy(&qh, b + 4, 4);
    const uint8_t* qs = b + 8;
    for (int j = 0; j < 16; ++j) {
        const int h0 = int((qh >> j) << 4) & 0x10;
        const int h1 = int(qh >> (j + 12)) & 0x10;
        y[j] = float((qs[j] & 0x0F) | h0) * d + m;
        y[j + 16] = float((qs[j] >> 4) | h1) * d + m;
    }
}

// Q8_0: d (f16), qs[32] int8; value q * d.
void q8_0(const uint8_t* b, float* y) {
    const float d = half(b);
    for (int j = 0; j < 32; ++j) y[j] = float(int8_t(b[2 + j])) * d;
}

// IQ4_NL: d (f16), qs[16]; value d * kIQ4NLValues[nibble].
void iq4_nl(const uint8_t* b, float* y) {
    const float d = half(b);
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 16; ++j) {
        y[j] = d * float(kIQ4NLValues[qs[j] & 0xF]);
        y[j + 16] = d * float(kIQ4NLValues[qs[j] >> 4]);
    }
}

// --- 256-element super-blocks ---------------------------------------------------------------------------------

// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64] (2-bit), d, dmin (f16).
void q2_k(const uint8_t* b, float* y) {
    const uint8_t* scales = b;
    const uint8_t* q = b + 16;
    const float d = half(b + 80), dmin = half(b + 82);
    int is = 0;
    for (int n = 0; n < 256; n += 128) {
        int shift = 0;
        for (int j = 0; j < 4; ++j) {
            for (int part = 0; part < 2; ++part) {
                const uint8_t sc = scales[is++];
                const float dl = d * float(sc & 0xF), ml = dmin * float(sc >> 4);
                const uint8_t* qq = q + 16 * part;
                for (int l = 0; l < 16; ++l) *y++ = dl * float(int8_t((qq[l] >> shift) & 3)) - ml;
            }
            shift += 2;
        }
        q += 32;
    }
}

// Q3_K: hmask[32] (high bits), qs[64] (low 2 bits), scales[12] (sixteen 6-bit scales), d (f16).
void q3_k(const uint8_t* b, float* y) {
    const uint8_t* hm = b;
    const uint8_t* q = b + 32;
    const uint8_t* packed = b + 96;
    const float d_all = half(b + 108);
    // Sixteen 6-bit scales: the low 4 bits from bytes 0..7 (low then high nibbles), the top 2 bits from bytes 8..11.
    int8_t scales[16];
    for (int i = 0; i < 16; ++i) {
        const int low = i < 8 ? (packed[i] & 0xF) : (packed[i - 8] >> 4);
        const int high = (packed[8 + (i % 4)] >> (2 * (i / 4))) & 3;
        scales[i] = int8_t(low | (high << 4));
    }
    int is = 0;
    uint8_t m = 1;
    for (int n = 0; n < 256; n += 128) {
        int shift = 0;
        for (int j = 0; j < 4; ++j) {
            for (int part = 0; part < 2; ++part) {
                const float dl = d_all * float(scales[is++] - 32);
                const int o = 16 * part;
                for (int l = 0; l < 16; ++l)
                    *y++ = dl * float(int8_t((q[o + l] >> shift) & 3) - ((hm[o + l] & m) ? 0 : 4));
            }
            shift += 2;
            m = uint8_t(m << 1);
        }
        q += 32;
    }
}

// Q4_K: d, dmin (f16), scales[12] (eight 6-bit scales and mins), qs[128]; value d*sc * q - dmin*m.
void q4_k(const uint8_t* b, float* y) {
    const float d = half(b), dmin = half(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* q = b + 16;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2) {
        uint8_t sc, m;
        k4_scale_min(is, scales, &sc, &m);
        const float d1 = d * float(sc), m1 = dmin * float(m);
        k4_scale_min(is + 1, scales, &sc, &m);
        const float d2 = d * float(sc), m2 = dmin * float(m);
        for (int l = 0; l < 32; ++l) *y++ = d1 * float(q[l] & 0xF) - m1;
        for (int l = 0; l < 32; ++l) *y++ = d2 * float(q[l] >> 4) - m2;
        q += 32;
    }
}

// Q5_K: d, dmin (f16), scales[12], qh[32] (fifth bits), qs[128].
void q5_k(const uint8_t* b, float* y) {
    const float d = half(b), dmin = half(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qh = b + 16;
    const uint8_t* ql = b + 48;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2) {
        uint8_t sc, m;
        k4_scale_min(is, scales, &sc, &m);
        const float d1 = d * float(sc), m1 = dmin * float(m);
        k4_scale_min(is + 1, scales, &sc, &m);
        const float d2 = d * float(sc), m2 = dmin * float(m);
        for (int l = 0; l < 32; ++l) *y++ = d1 * float((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
        for (int l = 0; l < 32; ++l) *y++ = d2 * float((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
        ql += 32;
        u1 = uint8_t(u1 << 2);
        u2 = uint8_t(u2 << 2);
    }
}

// Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d (f16); value d * sc * (q - 32).
void q6_k(const uint8_t* b, float* y) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half(b + 208);
    for (int n = 0; n < 256; n += 128) {
        for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = int((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = int((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * float(sc[is]) * float(q1);
            y[l + 32] = d * float(sc[is + 2]) * float(q2);
            y[l + 64] = d * float(sc[is + 4]) * float(q3);
            y[l + 96] = d * float(sc[is + 6]) * float(q4);
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

// IQ4_XS: d (f16), scales_h (u16: 2 high bits per sub-block), scales_l[4] (4 low bits), qs[128].
void iq4_xs(const uint8_t* b, float* y) {
    const float d = half(b);
    uint16_t scales_h;
    std::memcpy(&scales_h, b + 2, 2);
    const uint8_t* scales_l = b + 4;
    const uint8_t* qs = b + 8;
    for (int ib = 0; ib < 8; ++ib) {
        const int ls = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4);
        const float dl = d * float(ls - 32);
        for (int j = 0; j < 16; ++j) {
            y[j] = dl * float(kIQ4NLValues[qs[j] & 0xF]);
            y[j + 16] = dl * float(kIQ4NLValues[qs[j] >> 4]);
        }
        y += 32;
        qs += 16;
    }
}

using BlockFn = void (*)(const uint8_t*, float*);

BlockFn block_fn(TensorType t) {
    switch (t) {
        case TensorType::Q4_0: return q4_0;
        case TensorType::Q4_1: return q4_1;
        case TensorType::Q5_0: return q5_0;
        case TensorType::Q5_1: return q5_1;
        case TensorType::Q8_0: return q8_0;
        case TensorType::Q2_K: return q2_k;
        case TensorType::Q3_K: return q3_k;
        case TensorType::Q4_K: return q4_k;
        case TensorType::Q5_K: return q5_k;
        case TensorType::Q6_K: return q6_k;
        case TensorType::IQ4_NL: return iq4_nl;
        case TensorType::IQ4_XS: return iq4_xs;
        default: return nullptr;
    }
}

}  // namespace

bool supported(TensorType t) {
    return t == TensorType::F32 || t == TensorType::F16 || t == TensorType::BF16 || block_fn(t) != nullptr;
}

void dequantize(TensorType t, const uint8_t* data, size_t n, float* out) {
    if (t == TensorType::F32 || t == TensorType::F16 || t == TensorType::BF16) {
        gguf::decode(t, data, n, out);
        return;
    }
    const BlockFn fn = block_fn(t);
    if (!fn)
        fail(Status::unsupported, std::string("cannot dequantise ") + gguf::type_name(t) +
                                      " (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, "
                                      "Q5_K, Q6_K, IQ4_NL, IQ4_XS)");
    const gguf::TypeTraits* tr = gguf::type_traits(uint32_t(t));
    if (n % tr->block_size != 0)
        fail(Status::invalid_argument, std::to_string(n) + " elements are not a whole number of " + tr->name +
                                           " blocks of " + std::to_string(tr->block_size));
    for (size_t b = 0; b < n / tr->block_size; ++b) fn(data + b * tr->type_size, out + b * tr->block_size);
}

}  // namespace si::quants
