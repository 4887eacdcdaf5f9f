// The accelerator backend interface: the untrusted side that runs the heavy matrix products (DESIGN.md section 2).
//
// A backend only ever receives public weights and masked or public activations; it holds no secret. Weights are
// uploaded once and referred to by handle; every product is Y[t][n] = sum_k W[n][k] X[t][k] with W row-major
// [N][K] ("out x in"), X row-major [T][K] and Y row-major [T][N]. Inputs and outputs are host memory and every
// call is synchronous (Y is complete on return), so a device backend (e.g. a CUDA one in src/backends/cuda.cu,
// providing its own make_*_accelerator factory) copies in and out inside its calls and plugs in without changes
// elsewhere. Callers check supports() before relying on an op; an op the backend does not support throws
// si::Error(Status::unsupported).
//
// A backend object is used by one thread at a time (it owns the parallelism inside its calls).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/error.h"

namespace si {

class ThreadPool;

enum class DType : uint8_t { i8, i32, u32, f32 };

enum class AccelOp : uint8_t {
    // Masked exact product: W i8, X u32 -> Y u32 with Y = W X mod 2^32 exactly (X is masked: x + r mod 2^32).
    mul_mat_masked,
    // Plaintext int8 product: W i8, X i8 -> Y i32, exact (K * 127 * 128 < 2^31).
    mul_mat_i8,
    // Plaintext float product: W f32, X f32 -> Y f32 (float accumulation; summation order is the backend's).
    mul_mat_f32,
    // Plaintext integer product: W i8, X i32 holding values in [-32768, 32767] -> Y i32, exact when |W x| < 2^31
    // (the gpu-only preset's fixed-point products, bit-identical to the masked ones).
    mul_mat_int,
};

inline const char* dtype_name(DType t) {
    switch (t) {
        case DType::i8: return "i8";
        case DType::i32: return "i32";
        case DType::u32: return "u32";
        case DType::f32: return "f32";
    }
    return "?";
}

inline const char* op_name(AccelOp op) {
    switch (op) {
        case AccelOp::mul_mat_masked: return "mul_mat_masked";
        case AccelOp::mul_mat_i8: return "mul_mat_i8";
        case AccelOp::mul_mat_f32: return "mul_mat_f32";
        case AccelOp::mul_mat_int: return "mul_mat_int";
    }
    return "?";
}

// A weight matrix held by a backend. Only the backend that issued a handle accepts it.
struct WeightHandle {
    uint64_t id = 0;  // 0: no weight
    DType type = DType::i8;
    int64_t rows = 0;  // N
    int64_t cols = 0;  // K
    explicit operator bool() const { return id != 0; }
};

class Accelerator {
public:
    virtual ~Accelerator() = default;

    virtual const char* name() const = 0;
    // Whether `op` runs on weights of element type `weight_type` (the activation and result types follow the op).
    virtual bool supports(AccelOp op, DType weight_type) const = 0;

    // Copies W [N][K] into the backend; the caller may free its buffer afterwards.
    virtual WeightHandle upload_i8(const int8_t* W, int64_t N, int64_t K) = 0;
    virtual WeightHandle upload_f32(const float* W, int64_t N, int64_t K) = 0;
    // Frees the backend's copy and clears the handle.
    virtual void release(WeightHandle& w) = 0;

    // Y [T][N] = W X mod 2^32 for X [T][K] (u32, masked).
    virtual void mul_mat_masked(const WeightHandle& W, const uint32_t* X, int64_t T, uint32_t* Y) = 0;
    // Y [T][N] = W X exactly for X [T][K] (i8).
    virtual void mul_mat_i8(const WeightHandle& W, const int8_t* X, int64_t T, int32_t* Y) = 0;
    // Y [T][N] = W X for X [T][K] (f32).
    virtual void mul_mat_f32(const WeightHandle& W, const float* X, int64_t T, float* Y) = 0;
    // Y [T][N] = W X exactly for X [T][K] (i32, each value in [-32768, 32767]; the caller keeps |W x| < 2^31).
    // Backends without it keep this default, which throws Status::unsupported.
    virtual void mul_mat_int(const WeightHandle& W, const int32_t* X, int64_t T, int32_t* Y);
};

inline void Accelerator::mul_mat_int(const WeightHandle&, const int32_t*, int64_t, int32_t*) {
    fail(Status::unsupported, std::string(name()) + " backend: mul_mat_int is not supported");
}

// The CPU backend (src/backends/cpu.cpp). pool: the threads its products use (nullptr: the calling thread only);
// it must outlive the backend.
std::unique_ptr<Accelerator> make_cpu_accelerator(ThreadPool* pool);

// The CUDA backend (src/backends/cuda.cu), built when CMake finds the CUDA toolkit. Throws Status::unsupported when
// this build has no CUDA support or the machine no CUDA device.
std::unique_ptr<Accelerator> make_cuda_accelerator(ThreadPool* pool);
bool cuda_backend_built();
std::string cuda_device_name();  // the first CUDA device's name; empty when there is none (or no CUDA support)

// The backends by name: "cpu", "cuda", and any registered with register_accelerator. Throws
// Status::invalid_argument for an unknown name.
std::unique_ptr<Accelerator> make_accelerator(const std::string& name, ThreadPool* pool);
// Makes a further backend available by name to make_accelerator (and so to si_context_params.accelerator), e.g. a
// misbehaving one in the tests of the server's integrity-failure handling. Not "cpu" or "cuda"; thread-safe.
using AcceleratorFactory = std::function<std::unique_ptr<Accelerator>(ThreadPool* pool)>;
void register_accelerator(const std::string& name, AcceleratorFactory factory);

}  // namespace si
