// Writes the dequantisation fixtures of tests/test_quants.cpp with llama.cpp's own ggml (linked from the build that
// scripts/llamacpp.sh makes): for each block format, ggml quantises known data (ggml_quantize_chunk, the function
// llama-quantize calls) and dequantises it with the type's to_float; it also dequantises blocks of pseudo-random
// bytes (finite scales), which reach bit patterns the quantiser rarely writes.
//
// File format (little-endian), one file per type, <dir>/<TYPE>.qf:
//   "SIQF", u32 ggml type, u32 number of sections, then per section:
//   u32 n_elements, u32 n_bytes, the block bytes, n_elements f32 (ggml's dequantised values)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ggml.h"

namespace {

uint64_t g_state = 0x9e3779b97f4a7c15ull;
uint64_t next() {  // splitmix64: a fixed, documented sequence so fixtures are reproducible
    uint64_t z = (g_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
float uniform() { return float(next() >> 40) / float(1 << 24); }  // [0, 1)
float gaussian() {
    const float u = uniform() + 1e-7f, v = uniform();
    return std::sqrt(-2.0f * std::log(u)) * std::cos(6.2831853f * v);
}

// Weights-like data with variety per 256-element super-block: gaussian, outliers, all-zero, all-positive,
// tiny magnitudes (subnormal fp16 scales), large magnitudes, constant.
std::vector<float> known_data(size_t n) {
    std::vector<float> x(n);
    for (size_t i = 0; i < n; ++i) {
        const size_t blk = (i / 256) % 8;
        float g = gaussian();
        switch (blk) {
            case 0: x[i] = 0.02f * g; break;
            case 1: x[i] = 0.02f * g + ((i % 37) == 0 ? 0.5f : 0.0f); break;
            case 2: x[i] = (i % 256) < 128 ? 0.0f : 0.01f * g; break;
            case 3: x[i] = std::fabs(0.05f * g) + 0.01f; break;
            case 4: x[i] = 1e-6f * g; break;
            case 5: x[i] = 30.0f * g; break;
            case 6: x[i] = (i % 64) < 32 ? -0.25f : 0.125f; break;
            default: x[i] = uniform() * 2.0f - 1.0f; break;
        }
    }
    return x;
}

// Byte offsets of the f16 scale fields in one block of each type.
std::vector<int> f16_fields(ggml_type t) {
    switch (t) {
        case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_1: case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: return {0, 2};
        case GGML_TYPE_Q2_K: return {80, 82};
        case GGML_TYPE_Q3_K: return {108};
        case GGML_TYPE_Q6_K: return {208};
        default: return {0};
    }
}

void put32(FILE* f, uint32_t v) { std::fwrite(&v, 4, 1, f); }

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s OUTPUT_DIR\n", argv[0]);
        return 2;
    }
    const ggml_type types[] = {GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q8_0,
                               GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K,
                               GGML_TYPE_IQ4_NL, GGML_TYPE_IQ4_XS, GGML_TYPE_F16, GGML_TYPE_BF16};
    const size_t n = 2048;  // 8 super-blocks: one of each kind of known data
    for (const ggml_type t : types) {
        const ggml_type_traits* tr = ggml_get_type_traits(t);
        const std::string path = std::string(argv[1]) + "/" + tr->type_name + ".qf";
        FILE* f = std::fopen(path.c_str(), "wb");
        if (!f) {
            std::perror(path.c_str());
            return 1;
        }
        std::fwrite("SIQF", 1, 4, f);
        put32(f, uint32_t(t));
        put32(f, 2);
        const size_t bytes = n / size_t(tr->blck_size) * tr->type_size;
        std::vector<uint8_t> q(bytes);
        std::vector<float> y(n);
        for (int section = 0; section < 2; ++section) {
            if (section == 0) {
                const std::vector<float> x = known_data(n);
                // Rows of 256 elements, as llama-quantize calls it per row (no importance matrix).
                const size_t written = ggml_quantize_chunk(t, x.data(), q.data(), 0, int64_t(n / 256), 256, nullptr);
                if (written != bytes) {
                    std::fprintf(stderr, "%s: ggml wrote %zu bytes, expected %zu\n", tr->type_name, written, bytes);
                    return 1;
                }
            } else {
                for (auto& b : q) b = uint8_t(next());
                if (tr->is_quantized) {
                    // Keep every fp16 scale finite (exponent below 0x1f).
                    for (size_t blk = 0; blk < n / size_t(tr->blck_size); ++blk)
                        for (int off : f16_fields(t)) q[blk * tr->type_size + off + 1] &= 0xBF;
                } else {
                    for (size_t i = 0; i < n; ++i) q[2 * i + 1] &= 0xBF;
                }
            }
            tr->to_float(q.data(), y.data(), int64_t(n));
            put32(f, uint32_t(n));
            put32(f, uint32_t(bytes));
            std::fwrite(q.data(), 1, bytes, f);
            std::fwrite(y.data(), 4, n, f);
        }
        std::fclose(f);
        std::printf("%s\n", path.c_str());
    }
    return 0;
}
