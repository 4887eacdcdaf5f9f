// Progress of long CLI jobs (src/cli/progress.h): the style chosen from --no-progress, SI_PROGRESS and the terminal;
// the bar's exact text and its redraw rate on a simulated clock; a line per tenth when stderr is not a terminal;
// quick jobs with a delay stay silent; the loading callback of the C API reports every layer; and the CLI end to end.
#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cli/progress.h"
#include "secureinfer.h"
#include "testutil.h"

using si::cli::Progress;
using si::cli::ProgressStyle;
using si::test::shared;

namespace {

// A memory FILE whose contents can be read back.
struct Capture {
    char* buf = nullptr;
    size_t len = 0;
    std::FILE* f = open_memstream(&buf, &len);
    ~Capture() {
        if (f) std::fclose(f);
        std::free(buf);
    }
    std::string text() {
        std::fflush(f);
        return std::string(buf, len);
    }
};

size_t count(const std::string& s, const std::string& needle) {
    size_t n = 0;
    for (size_t at = s.find(needle); at != std::string::npos; at = s.find(needle, at + needle.size())) ++n;
    return n;
}

}  // namespace

TEST(Progress, StyleFromFlagEnvironmentAndTerminal) {
    using si::cli::progress_style;
    EXPECT_EQ(progress_style(false, nullptr, true), ProgressStyle::bar);
    EXPECT_EQ(progress_style(false, nullptr, false), ProgressStyle::lines);
    EXPECT_EQ(progress_style(false, "auto", true), ProgressStyle::bar);
    EXPECT_EQ(progress_style(false, "1", false), ProgressStyle::lines);
    EXPECT_EQ(progress_style(false, "bar", false), ProgressStyle::bar);
    EXPECT_EQ(progress_style(false, "lines", true), ProgressStyle::lines);
    for (const char* off : {"0", "off", "none", "quiet"}) EXPECT_EQ(progress_style(false, off, true), ProgressStyle::quiet);
    // --no-progress wins over everything
    EXPECT_EQ(progress_style(true, "bar", true), ProgressStyle::quiet);
    try {
        progress_style(false, "fancy", true);
        ADD_FAILURE() << "no error for SI_PROGRESS=fancy";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("SI_PROGRESS='fancy'"), std::string::npos) << e.what();
    }
}

TEST(Progress, BarTextAndRedrawRate) {
    double now = 100.0;
    Capture c;
    Progress p("job", 4, "steps", ProgressStyle::bar, c.f, [&] { return now; });
    EXPECT_EQ(p.bar_text(1, 2.0, "loss 1.5"), "job [#######.......................]  25% 1/4 steps 2.0s ETA 6.0s  loss 1.5");
    EXPECT_EQ(p.bar_text(4, 75.0, ""), "job [##############################] 100% 4/4 steps 1m15s");

    // 100 updates 0.01 s apart: drawn at most every 0.1 s, plus the first
    Capture d;
    Progress q("job", 1000, "", ProgressStyle::bar, d.f, [&] { return now; });
    for (int i = 1; i <= 100; ++i) {
        now += 0.01;
        q.update(i);
    }
    const std::string drawn = d.text();
    EXPECT_GE(count(drawn, "\r"), 9u);
    EXPECT_LE(count(drawn, "\r"), 11u);
    EXPECT_EQ(drawn.find('\n'), std::string::npos);
    q.finish("ok");
    const std::string all = d.text();
    EXPECT_EQ(all.back(), '\n');
    EXPECT_NE(all.rfind("\r\033[Kjob [##############################] 100% 1000/1000"), std::string::npos) << all;
    EXPECT_NE(all.find("  ok\n"), std::string::npos) << all;
}

TEST(Progress, LinesAtEveryTenthThenDone) {
    double now = 0;
    Capture c;
    {
        Progress p("precompute", 200, "tokens", ProgressStyle::lines, c.f, [&] { return now; });
        for (int i = 1; i < 200; ++i) {
            now += 0.05;
            p.update(i);
        }
        p.finish();
    }
    const std::string t = c.text();
    EXPECT_EQ(count(t, "\n"), 10u) << t;  // 10% .. 90%, then done
    EXPECT_EQ(t.find('\r'), std::string::npos);
    EXPECT_NE(t.find("precompute: 10% (20/200 tokens) 1.0s\n"), std::string::npos) << t;
    EXPECT_NE(t.find("precompute: 90% (180/200 tokens)"), std::string::npos) << t;
    EXPECT_NE(t.find("precompute: done 200 tokens in 10.0s\n"), std::string::npos) << t;
}

TEST(Progress, QuietDelayedAndInterrupted) {
    double now = 0;
    Capture quiet;
    {
        Progress p("x", 10, "", ProgressStyle::quiet, quiet.f, [&] { return now; });
        for (int i = 0; i < 10; ++i) p.update(i);
        p.finish();
    }
    EXPECT_EQ(quiet.text(), "");

    // With a delay, a job that ends before it shows nothing, in either style.
    for (ProgressStyle st : {ProgressStyle::bar, ProgressStyle::lines}) {
        Capture c;
        Progress p("loading", 6, "layers", st, c.f, [&] { return now; });
        p.set_delay(0.5);
        for (int i = 1; i <= 6; ++i) {
            now += 0.05;
            p.update(i);
        }
        p.finish();
        EXPECT_EQ(c.text(), "");
    }
    // ... and one that runs longer shows up once the delay has passed.
    Capture slow;
    {
        Progress p("loading", 6, "layers", ProgressStyle::bar, slow.f, [&] { return now; });
        p.set_delay(0.5);
        now += 0.2;
        p.update(1);
        EXPECT_EQ(slow.text(), "");
        now += 0.5;
        p.update(2);
        EXPECT_NE(slow.text().find("2/6 layers"), std::string::npos);
        // destroyed unfinished (an error): the line is ended so the message starts on its own
    }
    EXPECT_EQ(slow.text().back(), '\n');
}

// The C API reports the loading of every layer into the enclave, in order, ending at the total.
TEST(Progress, LoadingReportsEveryLayer) {
    si_model_params mp = si_model_default_params();
    const std::string tok = shared("models/tok512.bin");
    mp.tokenizer_path = tok.c_str();
    si_model* m = nullptr;
    ASSERT_EQ(si_model_load(shared("models/stories260K.bin").c_str(), &mp, &m), SI_OK) << si_last_error();
    std::vector<std::pair<int, int>> calls;
    si_set_load_progress([](int done, int total, void* u) {
        static_cast<std::vector<std::pair<int, int>>*>(u)->emplace_back(done, total);
    }, &calls);
    si_context_params cp = si_context_default_params();
    cp.n_threads = 1;
    cp.enclave_host = SI_HOST_INPROCESS;
    si_context* c = nullptr;
    ASSERT_EQ(si_context_init(m, &cp, &c), SI_OK) << si_last_error();
    si_set_load_progress(nullptr, nullptr);
    ASSERT_EQ(calls.size(), 6u);  // stories260K: 5 layers, then the offloaded products
    for (size_t i = 0; i < calls.size(); ++i) {
        EXPECT_EQ(calls[i].first, int(i) + 1);
        EXPECT_EQ(calls[i].second, 6);
    }
    // off again: another context reports nothing
    calls.clear();
    si_context* c2 = nullptr;
    ASSERT_EQ(si_context_init(m, &cp, &c2), SI_OK);
    EXPECT_TRUE(calls.empty());
    si_context_free(c2);
    si_context_free(c);
    si_model_free(m);
}

// The CLI: SI_PROGRESS and --no-progress (before or after the command) decide what perplexity writes on stderr;
// a bad SI_PROGRESS is a usage error; a quick load shows no loading bar.
TEST(Progress, CliFollowsFlagAndEnvironment) {
    const std::string dir = si::test::scratch_dir();
    const std::string text = dir + "/text.txt";
    std::string words;
    for (int i = 0; i < 60; ++i) words += "Once upon a time there was a little girl. ";
    si::test::write_file(text, words);
    auto run = [&](const std::vector<std::string>& args, const std::string& env) {
        std::vector<std::string> argv = {SI_CLI};
        argv.insert(argv.end(), args.begin(), args.end());
        std::vector<std::string> e = {"PATH=/usr/bin:/bin", "HOME=" + dir};
        if (!env.empty()) e.push_back(env);
        return si::test::run_program(argv, "", &e);
    };
    const std::vector<std::string> ppl = {"perplexity", "-m", shared("models/stories260K.bin"), "--tokenizer",
                                          shared("models/tok512.bin"), "-f", text, "--ctx", "64", "-t", "1"};
    const auto lines = run(ppl, "SI_PROGRESS=lines");
    ASSERT_EQ(lines.exit_code, 0) << lines.err;
    EXPECT_NE(lines.err.find("perplexity: done "), std::string::npos) << lines.err;
    EXPECT_NE(lines.err.find("perplexity: 50% "), std::string::npos) << lines.err;
    EXPECT_EQ(lines.err.find('\r'), std::string::npos);
    const auto bar = run(ppl, "SI_PROGRESS=bar");
    ASSERT_EQ(bar.exit_code, 0) << bar.err;
    EXPECT_NE(bar.err.find("\r\033[Kperplexity ["), std::string::npos) << bar.err;
    EXPECT_EQ(bar.err.find("loading"), std::string::npos) << "a quick load drew a bar: " << bar.err;
    EXPECT_EQ(bar.out, lines.out);

    std::vector<std::string> after = ppl;
    after.push_back("--no-progress");
    std::vector<std::string> before = {"--no-progress"};
    before.insert(before.end(), ppl.begin(), ppl.end());
    for (const auto& args : {after, before}) {
        const auto q = run(args, "SI_PROGRESS=bar");
        ASSERT_EQ(q.exit_code, 0) << q.err;
        EXPECT_EQ(q.err.find("perplexity"), std::string::npos) << q.err;
        EXPECT_EQ(q.out, lines.out);
    }
    const auto q0 = run(ppl, "SI_PROGRESS=0");
    EXPECT_EQ(q0.err.find("perplexity"), std::string::npos) << q0.err;

    const auto bad = run(ppl, "SI_PROGRESS=fancy");
    EXPECT_EQ(bad.exit_code, 2);
    EXPECT_NE(bad.err.find("SI_PROGRESS='fancy' is not one of auto, bar, lines, 0 (off)"), std::string::npos) << bad.err;
}
