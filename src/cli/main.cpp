// secureinfer: command-line entry point. Parses arguments, dispatches to a command, maps errors to exit codes:
// usage errors print one line and exit 2; runtime errors print "secureinfer: error: ..." and exit 1.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <stdexcept>

#include "cli/cli.h"
#include "cli/progress.h"
#include "secureinfer.hpp"
#include "common/error.h"

int main(int argc, char** argv) {
    using namespace si::cli;
    CLI::App app{"secureinfer: LLaMA inference that keeps a model's secrets inside a trusted execution environment"};
    app.require_subcommand(1);
    app.set_version_flag("--version", "secureinfer 0.1.0");
    bool no_progress = false;
    app.add_flag("--no-progress", no_progress, "no progress bars or progress lines on stderr (also: SI_PROGRESS=0)");
    std::map<CLI::App*, Runner> runners;
    for (auto add : {add_run, add_perplexity, add_tokenize, add_info, add_convert, add_bench, add_plan, add_finetune, add_precompute, add_serve,
                      add_keygen, add_pack, add_inspect, add_measure, add_device_key, add_keyserver,
                      add_attack, add_security_report}) {
        Runner r = add(app);
        runners[app.get_subcommands({}).back()] = r;
    }
    // --no-progress may follow the command too
    for (auto* sub : app.get_subcommands({})) sub->fallthrough();
    auto is_command = [&](const std::string& name) {
        for (const auto* sub : app.get_subcommands({}))
            if (sub->get_name() == name) return true;
        return false;
    };
    if (argc > 1 && argv[1][0] != '-' && !is_command(argv[1])) {
        std::fprintf(stderr, "secureinfer: unknown command '%s' (see 'secureinfer --help')\n", argv[1]);
        return kExitUsage;
    }
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        const auto subs = app.get_subcommands();
        const std::string cmd = subs.empty() ? "secureinfer" : "secureinfer " + subs.front()->get_name();
        std::fprintf(stderr, "%s: %s (see '%s --help')\n", cmd.c_str(), e.what(), cmd.c_str());
        return kExitUsage;
    }
    const auto subs = app.get_subcommands();
    const std::string cmd = "secureinfer " + subs.front()->get_name();
    try {
        const char* term = std::getenv("TERM");
        set_progress_style(progress_style(no_progress, std::getenv("SI_PROGRESS"),
                                          isatty(STDERR_FILENO) && !(term && std::strcmp(term, "dumb") == 0)));
    } catch (const std::invalid_argument& e) {
        std::fprintf(stderr, "secureinfer: %s\n", e.what());
        return kExitUsage;
    }
    try {
        return runners.at(subs.front())();
    } catch (const UsageError& e) {
        std::fprintf(stderr, "%s: %s (see '%s --help')\n", cmd.c_str(), e.what(), cmd.c_str());
        return kExitUsage;
    } catch (const secureinfer::Error& e) {
        std::fprintf(stderr, "secureinfer: error: %s\n", e.what());
        return kExitFailure;
    } catch (const si::Error& e) {
        std::fprintf(stderr, "secureinfer: error: %s\n", e.what());
        return kExitFailure;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "secureinfer: error: %s\n", e.what());
        return kExitFailure;
    }
}
