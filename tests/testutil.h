// Helpers shared by the tests: paths to ../shared data, a scratch directory, and running the CLI.
#pragma once
#include <string>
#include <vector>

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

}  // namespace si::test
