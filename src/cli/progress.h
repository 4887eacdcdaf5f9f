// Progress of long CLI jobs on stderr: a bar redrawn in place when stderr is a terminal, a line at every tenth of
// the work otherwise (logs stay readable), nothing with --no-progress or SI_PROGRESS=0.
//
//   SI_PROGRESS   unset, "auto" or "1": the bar on a terminal, lines otherwise; "bar": the bar even when stderr is
//                 not a terminal; "lines": lines; "0", "off", "none" or "quiet": nothing.
//   --no-progress (any command): nothing, whatever SI_PROGRESS says.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>

namespace si::cli {

enum class ProgressStyle { quiet, lines, bar };

// The style for these inputs: --no-progress given, $SI_PROGRESS (nullptr when unset), whether stderr is a terminal
// (and TERM is not "dumb"). Throws std::invalid_argument naming an unknown SI_PROGRESS value.
ProgressStyle progress_style(bool no_progress, const char* env, bool tty);
// The style of this process: set once by main from --no-progress, the environment and stderr.
ProgressStyle progress_style();
void set_progress_style(ProgressStyle style);

class Progress {
public:
    using Clock = std::function<double()>;  // seconds; tests pass their own
    // A job of `total` steps (0: unknown; the bar then shows the count and the time). `unit` names a step in the
    // output ("steps", "layers", "windows").
    Progress(std::string label, int64_t total, std::string unit = "", ProgressStyle style = progress_style(),
             std::FILE* out = stderr, Clock clock = nullptr);
    ~Progress();  // ends an unfinished bar's line, so an error message starts on a line of its own
    Progress(const Progress&) = delete;
    Progress& operator=(const Progress&) = delete;

    // Done `done` steps; `note` (e.g. "loss 2.31") is shown after the count. The bar is redrawn at most every 0.1 s
    // (and always at the end); lines are written when `done` crosses a tenth of the total.
    void update(int64_t done, const std::string& note = "");
    // The job is done: the bar is completed and ended with a newline; lines mode writes "label: done N unit in T s".
    void finish(const std::string& note = "");

    // Draw nothing until the job has run this long (and then only if it is not done): quick jobs stay silent.
    void set_delay(double seconds) { delay_ = seconds; }
    void set_total(int64_t total) { total_ = total > 0 ? total : 0; }

    // The bar's text for `done` steps at `seconds` elapsed (no carriage return), as update draws it.
    std::string bar_text(int64_t done, double seconds, const std::string& note) const;

private:
    double now() const;
    std::string label_, unit_;
    int64_t total_;
    ProgressStyle style_;
    std::FILE* out_;
    Clock clock_;
    double start_ = 0, last_draw_ = -1, delay_ = 0;
    int last_tenth_ = 0;
    int64_t done_ = 0;
    bool drawn_ = false, finished_ = false;
};

// While it lives, si_context_init on this thread shows the loading of the model into the enclave as a progress
// job "label" in layers (after half a second: small models load silently).
class LoadProgress {
public:
    explicit LoadProgress(const std::string& label = "loading");
    ~LoadProgress();
    LoadProgress(const LoadProgress&) = delete;
    LoadProgress& operator=(const LoadProgress&) = delete;

private:
    Progress progress_;
};

}  // namespace si::cli
