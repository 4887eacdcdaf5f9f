// Shared pieces of the secureinfer command-line tool. Each command lives in its own cmd_*.cpp and registers itself
// with CLI11 in main.cpp; commands return the process exit code.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace si::cli {

// Exit codes: 0 success, 1 runtime failure (bad file, integrity error...), 2 usage error.
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

using Runner = std::function<int()>;

// Each command adds its subcommand and options and returns the function that runs it.
Runner add_run(CLI::App& app);
Runner add_perplexity(CLI::App& app);
Runner add_tokenize(CLI::App& app);
Runner add_info(CLI::App& app);
Runner add_convert(CLI::App& app);
Runner add_bench(CLI::App& app);
Runner add_plan(CLI::App& app);
Runner add_finetune(CLI::App& app);

Runner add_precompute(CLI::App& app);
// protected packages (cmd_package.cpp)
Runner add_keygen(CLI::App& app);
Runner add_pack(CLI::App& app);
Runner add_inspect(CLI::App& app);
Runner add_measure(CLI::App& app);
Runner add_device_key(CLI::App& app);
Runner add_keyserver(CLI::App& app);
// security evaluation (cmd_attack.cpp)
Runner add_attack(CLI::App& app);
Runner add_security_report(CLI::App& app);
Runner add_serve(CLI::App& app);

// --pin-cpu: "auto" (the default) pins with the CUDA backend, where the host's thread and the worker's serving thread
// otherwise wake each other across CPUs at every crossing (measured: 1.84x -> 1.53x gpu-only's decode latency on an
// H200), to the CPU this process runs on; "off" or -1: never; N: CPU N. Returns the CPU, or -1 for none.
// "auto" pins nothing when the doorbells spin (spin_us > 0): two spinning threads need a CPU each.
int resolve_pin_cpu(const std::string& value, const std::string& backend, int spin_us);
// CLI11 validator of the same values.
CLI::Validator pin_cpu_validator();

// Throws CLI::ValidationError-style usage errors from inside a runner.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace si::cli
