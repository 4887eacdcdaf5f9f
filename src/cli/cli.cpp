// Helpers shared by the commands (cli.h).
#include "cli/cli.h"

#include <sched.h>

#include <cstdint>
#include <cstdio>

namespace si::cli {

int resolve_pin_cpu(const std::string& value, const std::string& backend, int spin_us) {
    if (value == "off" || value == "-1") return -1;
    if (value == "auto") {
        if (backend != "cuda" || spin_us > 0) return -1;
        const int cpu = sched_getcpu();
        return cpu >= 0 ? cpu : -1;
    }
    return std::stoi(value);  // checked by pin_cpu_validator
}

CLI::Validator pin_cpu_validator() {
    return CLI::Validator(
        [](std::string& v) -> std::string {
            if (v == "auto" || v == "off" || v == "-1") return "";
            if (!v.empty() && v.size() <= 4 && v.find_first_not_of("0123456789") == std::string::npos && std::stoi(v) < 1024)
                return "";
            return "must be auto, off, -1 or a CPU number below 1024, not '" + v + "'";
        },
        "auto|off|CPU");
}

}  // namespace si::cli
