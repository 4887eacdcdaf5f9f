// Progress bars and progress lines on stderr (progress.h).
#include "cli/progress.h"

#include "secureinfer.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace si::cli {

namespace {

ProgressStyle g_style = ProgressStyle::lines;
bool g_style_set = false;

std::string duration(double s) {
    if (!std::isfinite(s) || s < 0) return "?";
    char buf[32];
    if (s < 60) std::snprintf(buf, sizeof buf, "%.1fs", s);
    else if (s < 3600) std::snprintf(buf, sizeof buf, "%dm%02ds", int(s) / 60, int(s) % 60);
    else std::snprintf(buf, sizeof buf, "%dh%02dm", int(s) / 3600, int(s) / 60 % 60);
    return buf;
}

}  // namespace

ProgressStyle progress_style(bool no_progress, const char* env, bool tty) {
    if (no_progress) return ProgressStyle::quiet;
    const std::string v = env ? env : "";
    if (v.empty() || v == "auto" || v == "1") return tty ? ProgressStyle::bar : ProgressStyle::lines;
    if (v == "bar") return ProgressStyle::bar;
    if (v == "lines") return ProgressStyle::lines;
    if (v == "0" || v == "off" || v == "none" || v == "quiet") return ProgressStyle::quiet;
    throw std::invalid_argument("SI_PROGRESS='" + v + "' is not one of auto, bar, lines, 0 (off)");
}

ProgressStyle progress_style() {
    if (!g_style_set) {
        const char* term = std::getenv("TERM");
        const bool tty = isatty(STDERR_FILENO) && !(term && std::strcmp(term, "dumb") == 0);
        try {
            g_style = progress_style(false, std::getenv("SI_PROGRESS"), tty);
        } catch (const std::invalid_argument&) {
            g_style = tty ? ProgressStyle::bar : ProgressStyle::lines;
        }
        g_style_set = true;
    }
    return g_style;
}

void set_progress_style(ProgressStyle style) {
    g_style = style;
    g_style_set = true;
}

Progress::Progress(std::string label, int64_t total, std::string unit, ProgressStyle style, std::FILE* out, Clock clock)
    : label_(std::move(label)), unit_(std::move(unit)), total_(std::max<int64_t>(0, total)), style_(style), out_(out),
      clock_(std::move(clock)) {
    start_ = now();
}

Progress::~Progress() {
    if (style_ == ProgressStyle::bar && drawn_ && !finished_) {
        std::fputc('\n', out_);
        std::fflush(out_);
    }
}

double Progress::now() const {
    if (clock_) return clock_();
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string Progress::bar_text(int64_t done, double seconds, const std::string& note) const {
    std::string s = label_;
    s += ' ';
    char buf[160];
    std::string unit;
    if (!unit_.empty()) unit.append(" ").append(unit_);
    if (total_ > 0) {
        constexpr int kWidth = 30;
        const double frac = std::clamp(double(done) / double(total_), 0.0, 1.0);
        const int fill = int(frac * kWidth);
        s += '[';
        s.append(size_t(fill), '#').append(size_t(kWidth - fill), '.');
        s += ']';
        std::snprintf(buf, sizeof buf, " %3d%% %lld/%lld%s", int(frac * 100), (long long)done, (long long)total_,
                      unit.c_str());
        s += buf;
        const double eta = done > 0 && done < total_ ? seconds / double(done) * double(total_ - done) : NAN;
        s.append(" ").append(duration(seconds));
        if (std::isfinite(eta)) s.append(" ETA ").append(duration(eta));
    } else {
        std::snprintf(buf, sizeof buf, "%lld%s", (long long)done, unit.c_str());
        s += buf;
        s.append(" ").append(duration(seconds));
    }
    if (!note.empty()) s.append("  ").append(note);
    return s;
}

void Progress::update(int64_t done, const std::string& note) {
    done_ = done;
    if (style_ == ProgressStyle::quiet || finished_) return;
    const double t = now() - start_;
    if (t < delay_ || (delay_ > 0 && total_ > 0 && done >= total_ && !drawn_)) return;
    if (style_ == ProgressStyle::bar) {
        const bool last = total_ > 0 && done >= total_;
        if (!last && drawn_ && t - last_draw_ < 0.1) return;
        last_draw_ = t;
        drawn_ = true;
        // \033[K clears what a longer previous line left
        std::fprintf(out_, "\r\033[K%s", bar_text(done, t, note).c_str());
        std::fflush(out_);
        return;
    }
    if (total_ <= 0) return;
    drawn_ = true;
    const int tenth = int(std::min<int64_t>(10, done * 10 / total_));
    if (tenth <= last_tenth_ || tenth >= 10) return;  // 100% is finish's line
    last_tenth_ = tenth;
    std::fprintf(out_, "%s: %d%% (%lld/%lld%s%s) %s%s%s\n", label_.c_str(), tenth * 10, (long long)done,
                 (long long)total_, unit_.empty() ? "" : " ", unit_.c_str(), duration(t).c_str(),
                 note.empty() ? "" : "  ", note.c_str());
    std::fflush(out_);
}

void Progress::finish(const std::string& note) {
    if (finished_) return;
    if (total_ > 0) done_ = total_;
    const double t = now() - start_;
    if (delay_ > 0 && !drawn_) {  // quick: nothing was shown, and nothing is
        finished_ = true;
        return;
    }
    if (style_ == ProgressStyle::bar) {
        std::fprintf(out_, "\r\033[K%s\n", bar_text(done_, t, note).c_str());
        std::fflush(out_);
    } else if (style_ == ProgressStyle::lines) {
        std::fprintf(out_, "%s: done %lld%s%s in %s%s%s\n", label_.c_str(), (long long)done_, unit_.empty() ? "" : " ",
                     unit_.c_str(), duration(t).c_str(), note.empty() ? "" : "  ", note.c_str());
        std::fflush(out_);
    }
    finished_ = true;
}

LoadProgress::LoadProgress(const std::string& label) : progress_(label, 0, "layers") {
    progress_.set_delay(0.5);
    si_set_load_progress(
        [](int done, int total, void* user) {
            auto* p = static_cast<Progress*>(user);
            p->set_total(total);
            if (done >= total) p->finish();
            else p->update(done);
        },
        &progress_);
}

LoadProgress::~LoadProgress() { si_set_load_progress(nullptr, nullptr); }

}  // namespace si::cli
