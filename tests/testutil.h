// Helpers shared by the tests: paths to ../shared data, a scratch directory, and running the CLI.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "common/model.h"
#include "train/lora.h"

namespace si::test {

// Absolute path of a file under the shared data directory (e.g. "models/stories260K.bin").
std::string shared(const std::string& rel);
// A fresh, empty scratch directory for the calling test (created under the build tree).
std::string scratch_dir();
std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& bytes);

struct CliResult {
    int exit_code = -1;  // -1 when killed by a signal
    int signal = 0;
    std::string out, err;
};
// Runs the secureinfer CLI with the given arguments (no shell), capturing stdout and stderr.
CliResult run_cli(const std::vector<std::string>& args, const std::string& stdin_data = "");

// The shared stories260K model, loaded once.
const ModelWeights& stories();

// A LoRA adapter of rank `rank` on every projection of every layer. Projection after projection (layer, then
// si::kAllProj order), A [rank][cols] is filled with draw_a(its shape), then B [rows][rank] with draw_b(its shape).
using LoraDraw = std::function<float(const ProjShape&)>;
train::LoraAdapter lora_on_every_projection(const ModelConfig& cfg, int rank, float alpha, const LoraDraw& draw_a,
                                            const LoraDraw& draw_b);

}  // namespace si::test
