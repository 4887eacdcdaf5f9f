// The CUDA accelerator backend (NVIDIA GPUs). It accepts exactly these ops and types; everything else throws
// si::Error(Status::unsupported):
//
//   op               weights      activations              result       path
//   mul_mat_masked   i8 [N][K]    u32 [T][K]               u32 [T][N]   exact mod 2^32
//   mul_mat_int      i8 [N][K]    i32 [T][K] in +-32767    i32 [T][N]   exact when |W x| < 2^31
//   mul_mat_i8       i8 [N][K]    i8  [T][K]               i32 [T][N]   exact (K * 128 * 128 < 2^31)
//   mul_mat_f32      f32 [N][K]   f32 [T][K]               f32 [T][N]   cublasSgemm, FP32 math (no TF32)
//
// Integer products take one of two exact paths:
//   - gemv_exact (T <= 8 per launch, and any T when the tensor-core path does not apply): one warp per weight row
//     reads the row once for up to 8 tokens and accumulates w * x in uint32 (wrapping is the arithmetic mod 2^32
//     we want). Decoding is memory-bound, so reading each weight byte once per token is what counts.
//   - byte planes on int8 tensor cores (T > 8, K < 2^17): the activations are split into P byte planes (masked:
//     4 unsigned; int: 1 unsigned + 1 signed; i8: 1 signed), an unsigned byte b enters as b - 128 (int8), all planes
//     go through ONE cuBLAS int8 GEMM with int32 accumulation (|sum| <= K * 128 * 128 < 2^31, no overflow), and
//     y = sum_p 2^(8p) (z_p + 128 rowsum(W) [unsigned planes]) mod 2^32 restores W x exactly.
// Weights live on the device, rows zero-padded to a multiple of 16 bytes. Activations and results cross through
// pinned host buffers on one stream; every call is synchronous (accelerator.h).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backends/accelerator.h"
#include "backends/weight_table.h"
#include "common/error.h"

namespace si {

namespace {

#define SI_CUDA_CHECK(expr)                                                                                      \
    do {                                                                                                         \
        const cudaError_t si_err_ = (expr);                                                                      \
        if (si_err_ != cudaSuccess)                                                                              \
            fail(si_err_ == cudaErrorMemoryAllocation ? Status::out_of_memory : Status::internal,                \
                 std::string("cuda backend: ") + #expr + ": " + cudaGetErrorString(si_err_));                    \
    } while (0)

#define SI_CUBLAS_CHECK(expr)                                                                                    \
    do {                                                                                                         \
        const cublasStatus_t si_st_ = (expr);                                                                    \
        if (si_st_ != CUBLAS_STATUS_SUCCESS)                                                                     \
            fail(Status::internal, std::string("cuda backend: ") + #expr + ": " + cublasGetStatusString(si_st_)); \
    } while (0)

constexpr SupportedOp kSupported[] = {
    {AccelOp::mul_mat_masked, DType::i8},
    {AccelOp::mul_mat_int, DType::i8},
    {AccelOp::mul_mat_i8, DType::i8},
    {AccelOp::mul_mat_f32, DType::f32},
};

constexpr int64_t kMaxDim = int64_t(1) << 30;   // cuBLAS takes int dimensions; products of two stay in int64
constexpr int kGemvTokens = 8;                  // tokens per gemv_exact launch
constexpr int kGemvWarps = 8;                   // rows per gemv_exact block (one per warp)
constexpr int64_t kPlaneMaxK = int64_t(1) << 17;  // int32 accumulation of int8 x int8 is exact below this

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---- kernels -----------------------------------------------------------------------------------------------------

// Y[t][n] = sum_k W[n][k] X[t][k] mod 2^32 for t < nt <= TT. W [N][Kp] and X [nt][Kp] rows are 16-byte aligned;
// the weight padding is zero, so whatever X holds past K adds nothing.
template <int TT>
__global__ void gemv_exact(const int8_t* __restrict__ W, const uint32_t* __restrict__ X, uint32_t* __restrict__ Y,
                           int N, int64_t Kp, int nt) {
    const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
    const int row = int(blockIdx.x) * kGemvWarps + warp;
    if (row >= N) return;
    const int4* w = reinterpret_cast<const int4*>(W + int64_t(row) * Kp);
    uint32_t acc[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) acc[t] = 0;
    const int64_t chunks = Kp / 16;
    for (int64_t c = lane; c < chunks; c += 32) {
        const int4 wv = __ldg(w + c);
        const int8_t* wb = reinterpret_cast<const int8_t*>(&wv);
        uint32_t wu[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) wu[i] = uint32_t(int32_t(wb[i]));
#pragma unroll
        for (int t = 0; t < TT; ++t) {
            if (t >= nt) break;
            const uint4* x = reinterpret_cast<const uint4*>(X + int64_t(t) * Kp + c * 16);
            uint32_t s = 0;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const uint4 xv = __ldg(x + q);
                s += wu[4 * q + 0] * xv.x + wu[4 * q + 1] * xv.y + wu[4 * q + 2] * xv.z + wu[4 * q + 3] * xv.w;
            }
            acc[t] += s;
        }
    }
#pragma unroll
    for (int t = 0; t < TT; ++t) {
        if (t >= nt) break;
        uint32_t v = acc[t];
#pragma unroll
        for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) Y[int64_t(t) * N + row] = v;
    }
}

// P[(p T + t)][k] for k < Kp: byte p of X[t][k] (zero past K); unsigned planes enter as b - 128, the top plane is
// signed when `signed_top` (the plain int8 and int16 activations).
__global__ void make_planes(const uint32_t* __restrict__ X, int8_t* __restrict__ P, int T, int64_t K, int64_t Kp,
                            int planes, int signed_top) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= int64_t(T) * Kp) return;
    const int64_t t = i / Kp, k = i % Kp;
    const uint32_t x = k < K ? X[t * Kp + k] : 0u;
    for (int p = 0; p < planes; ++p) {
        const uint32_t b = (x >> (8 * p)) & 0xFFu;
        const bool is_signed = signed_top && p == planes - 1;
        int8_t v = 0;
        if (k < K) v = is_signed ? int8_t(b) : int8_t(int32_t(b) - 128);
        P[(int64_t(p) * T + t) * Kp + k] = v;
    }
}

// Y[t][n] = sum_p 2^(8p) (Z[p T + t][n] + 128 rowsum[n] for unsigned planes) mod 2^32.
__global__ void combine_planes(const int32_t* __restrict__ Z, const int32_t* __restrict__ rowsum,
                               uint32_t* __restrict__ Y, int T, int N, int64_t Np, int planes, int signed_top) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= int64_t(T) * N) return;
    const int64_t t = i / N, n = i % N;
    uint32_t y = 0;
    for (int p = 0; p < planes; ++p) {
        uint32_t z = uint32_t(Z[(int64_t(p) * T + t) * Np + n]);
        if (!(signed_top && p == planes - 1)) z += 128u * uint32_t(rowsum[n]);
        y += z << (8 * p);
    }
    Y[i] = y;
}

__global__ void row_sums(const int8_t* __restrict__ W, int32_t* __restrict__ out, int N, int64_t Kp) {
    const int n = int(blockIdx.x) * blockDim.x + threadIdx.x;
    if (n >= N) return;
    int32_t s = 0;
    for (int64_t k = 0; k < Kp; ++k) s += W[int64_t(n) * Kp + k];
    out[n] = s;
}

// ---- device memory -----------------------------------------------------------------------------------------------

template <typename T>
struct DeviceBuffer {
    T* ptr = nullptr;
    size_t count = 0;
    DeviceBuffer() = default;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() { reset(); }
    void reset() {
        if (ptr) cudaFree(ptr);
        ptr = nullptr;
        count = 0;
    }
    void alloc(size_t n) {
        reset();
        SI_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<size_t>(n, 1) * sizeof(T)));
        count = n;
    }
    T* reserve(size_t n) {  // grows, never shrinks; contents are not kept
        if (n > count) alloc(n + n / 4);
        return ptr;
    }
};

struct PinnedBuffer {
    void* ptr = nullptr;
    size_t bytes = 0;
    PinnedBuffer() = default;
    PinnedBuffer(const PinnedBuffer&) = delete;
    PinnedBuffer& operator=(const PinnedBuffer&) = delete;
    ~PinnedBuffer() {
        if (ptr) cudaFreeHost(ptr);
    }
    template <typename T>
    T* reserve(size_t n) {
        const size_t need = n * sizeof(T);
        if (need > bytes) {
            if (ptr) cudaFreeHost(ptr);
            ptr = nullptr;
            bytes = 0;
            const size_t grow = need + need / 4;
            SI_CUDA_CHECK(cudaMallocHost(&ptr, grow));
            bytes = grow;
        }
        return static_cast<T*>(ptr);
    }
};

struct CudaWeight {
    DType type = DType::i8;
    int64_t N = 0, K = 0;
    int64_t Kp = 0, Np = 0;  // i8: rows padded to 16 bytes, row count to 16 (the GEMM's m)
    DeviceBuffer<int8_t> i8;
    DeviceBuffer<int32_t> rowsum;
    DeviceBuffer<float> f32;
};

class CudaAccelerator final : public Accelerator {
public:
    CudaAccelerator() {
        int count = 0;
        const cudaError_t e = cudaGetDeviceCount(&count);
        if (e != cudaSuccess || count < 1)
            fail(Status::unsupported, std::string("cuda backend: no CUDA device (") +
                                          (e != cudaSuccess ? cudaGetErrorString(e) : "none found") + ")");
        SI_CUDA_CHECK(cudaSetDevice(0));
        SI_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        if (cublasCreate(&blas_) != CUBLAS_STATUS_SUCCESS) {
            cudaStreamDestroy(stream_);
            fail(Status::internal, "cuda backend: cublasCreate failed");
        }
        cublasSetStream(blas_, stream_);
        // The default math mode keeps FP32 products in FP32 (TF32 only on request), which the f32 op's error bound
        // assumes, and lets the int8 GEMM use the tensor cores.
        cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH);
    }

    ~CudaAccelerator() override {
        weights_.clear();
        if (blas_) cublasDestroy(blas_);
        if (stream_) cudaStreamDestroy(stream_);
    }

    const char* name() const override { return "cuda"; }

    bool supports(AccelOp op, DType weight_type) const override { return table_supports(kSupported, op, weight_type); }

    WeightHandle upload_i8(const int8_t* W, int64_t N, int64_t K) override {
        weights_.check_shape(W, N, K);
        auto w = std::make_unique<CudaWeight>();
        w->type = DType::i8;
        w->N = N;
        w->K = K;
        w->Kp = round_up(K, 16);
        w->Np = round_up(N, 16);
        w->i8.alloc(size_t(w->Np * w->Kp));
        SI_CUDA_CHECK(cudaMemsetAsync(w->i8.ptr, 0, size_t(w->Np * w->Kp), stream_));
        SI_CUDA_CHECK(cudaMemcpy2DAsync(w->i8.ptr, size_t(w->Kp), W, size_t(K), size_t(K), size_t(N),
                                        cudaMemcpyHostToDevice, stream_));
        w->rowsum.alloc(size_t(N));
        row_sums<<<unsigned((N + 127) / 128), 128, 0, stream_>>>(w->i8.ptr, w->rowsum.ptr, int(N), w->Kp);
        SI_CUDA_CHECK(cudaGetLastError());
        SI_CUDA_CHECK(cudaStreamSynchronize(stream_));  // W may be freed by the caller on return
        return weights_.add(std::move(w));
    }

    WeightHandle upload_f32(const float* W, int64_t N, int64_t K) override {
        weights_.check_shape(W, N, K);
        auto w = std::make_unique<CudaWeight>();
        w->type = DType::f32;
        w->N = N;
        w->K = K;
        w->f32.alloc(size_t(N * K));
        SI_CUDA_CHECK(cudaMemcpyAsync(w->f32.ptr, W, size_t(N * K) * sizeof(float), cudaMemcpyHostToDevice, stream_));
        SI_CUDA_CHECK(cudaStreamSynchronize(stream_));
        return weights_.add(std::move(w));
    }

    void release(WeightHandle& h) override { weights_.release(h); }

    void mul_mat_masked(const WeightHandle& h, const uint32_t* X, int64_t T, uint32_t* Y) override {
        const CudaWeight& w = lookup(h, AccelOp::mul_mat_masked, T, X, Y);
        if (T == 0) return;
        uint32_t* hx = pinned_in_.reserve<uint32_t>(size_t(T * w.K));
        std::memcpy(hx, X, size_t(T * w.K) * sizeof(uint32_t));
        int_product(w, hx, T, 4, false, Y);
    }

    void mul_mat_int(const WeightHandle& h, const int32_t* X, int64_t T, int32_t* Y) override {
        const CudaWeight& w = lookup(h, AccelOp::mul_mat_int, T, X, Y);
        if (T == 0) return;
        uint32_t* hx = pinned_in_.reserve<uint32_t>(size_t(T * w.K));
        for (int64_t i = 0; i < T * w.K; ++i) {
            if (X[i] < -32768 || X[i] > 32767)
                fail(Status::invalid_argument, "cuda backend: mul_mat_int activation " + std::to_string(X[i]) +
                                                   " outside [-32768, 32767]");
            hx[i] = uint32_t(X[i]);
        }
        int_product(w, hx, T, 2, true, reinterpret_cast<uint32_t*>(Y));
    }

    void mul_mat_i8(const WeightHandle& h, const int8_t* X, int64_t T, int32_t* Y) override {
        const CudaWeight& w = lookup(h, AccelOp::mul_mat_i8, T, X, Y);
        if (w.K * 128 * 128 >= (int64_t(1) << 31))
            fail(Status::unsupported, "cuda backend: mul_mat_i8 with K = " + std::to_string(w.K) +
                                          " could overflow int32 (K * 128 * 128 must be < 2^31)");
        if (T == 0) return;
        uint32_t* hx = pinned_in_.reserve<uint32_t>(size_t(T * w.K));
        for (int64_t i = 0; i < T * w.K; ++i) hx[i] = uint32_t(int32_t(X[i]));
        int_product(w, hx, T, 1, true, reinterpret_cast<uint32_t*>(Y));
    }

    void mul_mat_f32(const WeightHandle& h, const float* X, int64_t T, float* Y) override {
        const CudaWeight& w = lookup(h, AccelOp::mul_mat_f32, T, X, Y);
        if (T == 0) return;
        float* dx = dx_f32_.reserve(size_t(T * w.K));
        float* dy = dy_f32_.reserve(size_t(T * w.N));
        float* hx = pinned_in_.reserve<float>(size_t(T * w.K));
        std::memcpy(hx, X, size_t(T * w.K) * sizeof(float));
        SI_CUDA_CHECK(cudaMemcpyAsync(dx, hx, size_t(T * w.K) * sizeof(float), cudaMemcpyHostToDevice, stream_));
        const float one = 1.0f, zero = 0.0f;
        // Column-major view: Y^T [N x T] = (W^T)^T [N x K] * X^T [K x T], W^T stored K x N with ld K.
        SI_CUBLAS_CHECK(cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, int(w.N), int(T), int(w.K), &one, w.f32.ptr,
                                    int(w.K), dx, int(w.K), &zero, dy, int(w.N)));
        float* hy = pinned_out_.reserve<float>(size_t(T * w.N));
        SI_CUDA_CHECK(cudaMemcpyAsync(hy, dy, size_t(T * w.N) * sizeof(float), cudaMemcpyDeviceToHost, stream_));
        SI_CUDA_CHECK(cudaStreamSynchronize(stream_));
        std::memcpy(Y, hy, size_t(T * w.N) * sizeof(float));
    }

private:
    // Y = W X mod 2^32 for X [T][K] in pinned memory; `planes` and `signed_top` describe X's value range for the
    // tensor-core path (see the header comment).
    void int_product(const CudaWeight& w, const uint32_t* hx, int64_t T, int planes, bool signed_top, uint32_t* Y) {
        uint32_t* dx = dx_u32_.reserve(size_t(T * w.Kp));
        uint32_t* dy = dy_u32_.reserve(size_t(T * w.N));
        SI_CUDA_CHECK(cudaMemcpy2DAsync(dx, size_t(w.Kp) * 4, hx, size_t(w.K) * 4, size_t(w.K) * 4, size_t(T),
                                        cudaMemcpyHostToDevice, stream_));
        if (T > kGemvTokens && w.Kp < kPlaneMaxK && planes_ok_) {
            if (!planes_product(w, dx, T, planes, signed_top, dy)) gemv_product(w, dx, T, dy);
        } else {
            gemv_product(w, dx, T, dy);
        }
        uint32_t* hy = pinned_out_.reserve<uint32_t>(size_t(T * w.N));
        SI_CUDA_CHECK(cudaMemcpyAsync(hy, dy, size_t(T * w.N) * 4, cudaMemcpyDeviceToHost, stream_));
        SI_CUDA_CHECK(cudaStreamSynchronize(stream_));
        std::memcpy(Y, hy, size_t(T * w.N) * 4);
    }

    void gemv_product(const CudaWeight& w, const uint32_t* dx, int64_t T, uint32_t* dy) {
        const unsigned blocks = unsigned((w.N + kGemvWarps - 1) / kGemvWarps);
        for (int64_t t0 = 0; t0 < T; t0 += kGemvTokens) {
            const int nt = int(std::min<int64_t>(kGemvTokens, T - t0));
            const uint32_t* x = dx + t0 * w.Kp;
            uint32_t* y = dy + t0 * w.N;
            if (nt == 1)
                gemv_exact<1><<<blocks, 32 * kGemvWarps, 0, stream_>>>(w.i8.ptr, x, y, int(w.N), w.Kp, 1);
            else
                gemv_exact<kGemvTokens><<<blocks, 32 * kGemvWarps, 0, stream_>>>(w.i8.ptr, x, y, int(w.N), w.Kp, nt);
            SI_CUDA_CHECK(cudaGetLastError());
        }
    }

    // The tensor-core path; false (after a one-time notice) when cuBLAS has no int8 GEMM for it.
    bool planes_product(const CudaWeight& w, const uint32_t* dx, int64_t T, int planes, bool signed_top, uint32_t* dy) {
        const int64_t cols = planes * T;  // the GEMM's n
        if (cols > kMaxDim) return false;
        int8_t* dp = dplanes_.reserve(size_t(cols * w.Kp));
        int32_t* dz = dz_.reserve(size_t(cols * w.Np));
        const int64_t n_elem = T * w.Kp;
        make_planes<<<unsigned((n_elem + 255) / 256), 256, 0, stream_>>>(dx, dp, int(T), w.K, w.Kp, planes,
                                                                          signed_top ? 1 : 0);
        SI_CUDA_CHECK(cudaGetLastError());
        const int32_t one = 1, zero = 0;
        // Column-major: Z^T [Np x cols] = (W^T)^T [Np x Kp] * P^T [Kp x cols]: the "TN" int8 layout.
        const cublasStatus_t st = cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, int(w.Np), int(cols), int(w.Kp), &one,
                                               w.i8.ptr, CUDA_R_8I, int(w.Kp), dp, CUDA_R_8I, int(w.Kp), &zero, dz,
                                               CUDA_R_32I, int(w.Np), CUBLAS_COMPUTE_32I, CUBLAS_GEMM_DEFAULT);
        if (st != CUBLAS_STATUS_SUCCESS) {
            std::fprintf(stderr, "cuda backend: cuBLAS int8 GEMM unavailable (%s); products with T > %d use the "
                                 "gemv kernel\n", cublasGetStatusString(st), kGemvTokens);
            planes_ok_ = false;
            return false;
        }
        const int64_t n_out = T * w.N;
        combine_planes<<<unsigned((n_out + 255) / 256), 256, 0, stream_>>>(dz, w.rowsum.ptr, dy, int(T), int(w.N),
                                                                           w.Np, planes, signed_top ? 1 : 0);
        SI_CUDA_CHECK(cudaGetLastError());
        return true;
    }

    const CudaWeight& lookup(const WeightHandle& h, AccelOp op, int64_t T, const void* X, const void* Y) const {
        return weights_.lookup(*this, h, op, T, X, Y);
    }

    cudaStream_t stream_ = nullptr;
    cublasHandle_t blas_ = nullptr;
    bool planes_ok_ = true;
    WeightTable<CudaWeight> weights_{"cuda", kMaxDim, 16};  // activation buffers carry K + 16 columns
    DeviceBuffer<uint32_t> dx_u32_, dy_u32_;
    DeviceBuffer<int8_t> dplanes_;
    DeviceBuffer<int32_t> dz_;
    DeviceBuffer<float> dx_f32_, dy_f32_;
    PinnedBuffer pinned_in_, pinned_out_;
};

}  // namespace

bool cuda_backend_built() { return true; }

std::string cuda_device_name() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count < 1) return "";
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return "";
    return prop.name;
}

std::unique_ptr<Accelerator> make_cuda_accelerator(ThreadPool*) { return std::make_unique<CudaAccelerator>(); }

}  // namespace si
