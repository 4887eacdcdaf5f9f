// Backend selection by name, and the CUDA entry points of builds without the CUDA toolkit.
#include "backends/accelerator.h"

namespace si {

#ifndef SI_HAVE_CUDA
bool cuda_backend_built() { return false; }
std::string cuda_device_name() { return ""; }
std::unique_ptr<Accelerator> make_cuda_accelerator(ThreadPool*) {
    fail(Status::unsupported, "cuda backend: this build has no CUDA support (configure with the CUDA toolkit installed)");
}
#endif

std::unique_ptr<Accelerator> make_accelerator(const std::string& name, ThreadPool* pool) {
    if (name == "cpu") return make_cpu_accelerator(pool);
    if (name == "cuda") return make_cuda_accelerator(pool);
    fail(Status::invalid_argument, "unknown accelerator backend '" + name + "' (valid: cpu, cuda)");
}

}  // namespace si
