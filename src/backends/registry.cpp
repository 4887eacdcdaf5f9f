// Backend selection by name, and the CUDA entry points of builds without the CUDA toolkit.
#include "backends/accelerator.h"

#include <map>
#include <mutex>

namespace si {

#ifndef SI_HAVE_CUDA
bool cuda_backend_built() { return false; }
std::string cuda_device_name() { return ""; }
std::unique_ptr<Accelerator> make_cuda_accelerator(ThreadPool*) {
    fail(Status::unsupported, "cuda backend: this build has no CUDA support (configure with the CUDA toolkit installed)");
}
#endif

namespace {
std::mutex g_registered_mu;
std::map<std::string, AcceleratorFactory>& registered() {
    static std::map<std::string, AcceleratorFactory> m;
    return m;
}
}  // namespace

void register_accelerator(const std::string& name, AcceleratorFactory factory) {
    if (name == "cpu" || name == "cuda" || !factory)
        fail(Status::invalid_argument, "register_accelerator: '" + name + "' is built in, or no factory was given");
    std::lock_guard<std::mutex> lk(g_registered_mu);
    registered()[name] = std::move(factory);
}

std::unique_ptr<Accelerator> make_accelerator(const std::string& name, ThreadPool* pool) {
    if (name == "cpu") return make_cpu_accelerator(pool);
    if (name == "cuda") return make_cuda_accelerator(pool);
    {
        std::lock_guard<std::mutex> lk(g_registered_mu);
        if (const auto it = registered().find(name); it != registered().end()) return it->second(pool);
    }
    fail(Status::invalid_argument, "unknown accelerator backend '" + name + "' (valid: cpu, cuda)");
}

}  // namespace si
