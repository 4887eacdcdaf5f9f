// The secureinfer command line end to end: exact outputs, exit codes and error messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>

#include "testutil.h"

using si::test::run_cli;
using si::test::shared;

namespace {

const std::string kModel = shared("models/stories260K.bin");
const std::string kTok = shared("models/tok512.bin");
const std::string kGoldenText =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.";

bool contains(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

}  // namespace

TEST(Cli, RunGreedyReproducesReferenceText) {
    for (const char* weights : {"f32", "int8"}) {
        const auto r = run_cli({"run", "-m", kModel, "--tokenizer", kTok, "-n", "64", "--temp", "0", "--weights", weights, "--mode", "plain"});
        ASSERT_EQ(r.exit_code, 0) << r.err;
        EXPECT_EQ(r.out.rfind(kGoldenText, 0), 0u) << weights << ": " << r.out;
    }
}

TEST(Cli, RunContinuesPromptWithoutEchoingIt) {
    const auto r = run_cli({"run", "-m", kModel, "--tokenizer", kTok, "-p", "Once upon a time", "-n", "12", "--temp", "0", "--mode", "plain"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out.rfind(", there was a little girl named Lily.", 0), 0u) << r.out;
}

TEST(Cli, SeededSamplingIsReproducible) {
    const std::vector<std::string> args = {"run", "-m", kModel, "--tokenizer", kTok, "-n", "40", "--temp", "0.9", "--top-k", "40", "--top-p", "0.9", "--seed", "42", "--mode", "plain"};
    const auto a = run_cli(args), b = run_cli(args);
    ASSERT_EQ(a.exit_code, 0) << a.err;
    EXPECT_EQ(a.out, b.out);
    auto other = args;
    other[other.size() - 3] = "43";
    EXPECT_NE(run_cli(other).out, a.out);
}

TEST(Cli, TokenizeWithTokenizerOrModel) {
    const auto a = run_cli({"tokenize", "--tokenizer", kTok, "-p", "Hello world"});
    ASSERT_EQ(a.exit_code, 0) << a.err;
    EXPECT_EQ(a.out, "346 306 414 263 304 341\n");
    const auto b = run_cli({"tokenize", "-m", kModel, "-p", "Hello world"});
    EXPECT_EQ(b.out, a.out);
}

TEST(Cli, PerplexityPrintsFinalLine) {
    const std::string dir = si::test::scratch_dir();
    const std::string text = si::test::read_file(shared("data/tinystories_val.txt")).substr(0, 4000);
    si::test::write_file(dir + "/t.txt", text);
    const auto r = run_cli({"perplexity", "-m", kModel, "--tokenizer", kTok, "-f", dir + "/t.txt", "--ctx", "128", "--mode", "plain"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    unsigned long tokens = 0;
    double nll = 0, ppl = 0;
    ASSERT_EQ(std::sscanf(r.out.c_str(), "tokens=%lu nll=%lf ppl=%lf", &tokens, &nll, &ppl), 3) << r.out;
    const auto ids = run_cli({"tokenize", "--tokenizer", kTok, "-p", text});
    EXPECT_EQ(tokens, size_t(std::count(ids.out.begin(), ids.out.end(), ' ') + 1));  // every token is scored
    EXPECT_NEAR(ppl, std::exp(nll), 1e-3 * ppl);
    EXPECT_GT(ppl, 1.5);
    EXPECT_LT(ppl, 20.0);  // a model trained on this distribution
}

TEST(Cli, ConvertThenRunGgufGivesSameText) {
    const std::string dir = si::test::scratch_dir();
    for (const char* type : {"f32", "q8_0"}) {
        const std::string out = dir + "/m-" + type + ".gguf";
        const auto c = run_cli({"convert", "-m", kModel, "--tokenizer", kTok, "--outtype", type, "-o", out});
        ASSERT_EQ(c.exit_code, 0) << c.err;
        const auto r = run_cli({"run", "-m", out, "-n", "64", "--temp", "0", "--mode", "plain"});
        ASSERT_EQ(r.exit_code, 0) << r.err;
        EXPECT_EQ(r.out.rfind(kGoldenText, 0), 0u) << type << ": " << r.out;
        const auto info = run_cli({"info", out});
        ASSERT_EQ(info.exit_code, 0) << info.err;
        EXPECT_TRUE(contains(info.out, "dim 64, hidden 172, layers 5, heads 8, kv heads 4")) << info.out;
        EXPECT_TRUE(contains(info.out, "blk.0.attn_q.weight")) << info.out;
    }
}

TEST(Cli, HelpAndUsageErrors) {
    EXPECT_EQ(run_cli({"--help"}).exit_code, 0);
    for (const char* cmd : {"run", "perplexity", "tokenize", "info", "convert", "bench"}) {
        const auto r = run_cli({cmd, "--help"});
        EXPECT_EQ(r.exit_code, 0) << cmd;
        EXPECT_TRUE(contains(r.out, "Usage")) << cmd << ": " << r.out;
    }
    auto usage = [](const std::vector<std::string>& args, const std::string& needle) {
        const auto r = run_cli(args);
        EXPECT_EQ(r.exit_code, 2) << r.err;
        EXPECT_TRUE(contains(r.err, needle)) << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
        EXPECT_TRUE(r.out.empty());
    };
    usage({}, "subcommand");
    usage({"frobnicate"}, "unknown command 'frobnicate'");
    usage({"run"}, "--model");
    usage({"run", "-m", kModel, "--temp", "-1"}, "--temp");
    usage({"run", "-m", kModel, "-n", "abc"}, "-n");
    usage({"tokenize", "-p", "x"}, "exactly one of --model and --tokenizer");
    usage({"perplexity", "-m", kModel, "-f", "x", "--ctx", "100000"}, "exceeds the model's context");
    usage({"run", "-m", kModel, "--pin-cpu", "5000"}, "must be auto, off, -1 or a CPU number below 1024");
    usage({"bench", "--pin-cpu", "first"}, "--pin-cpu");
}

// The secure preset with its worker pinned to a CPU, or not: the same text.
TEST(Cli, PinnedWorkerRunsTheSameText) {
    std::string want;
    for (const char* pin : {"off", "0", "auto"}) {
        const auto r = run_cli({"run", "-m", kModel, "--tokenizer", kTok, "-n", "48", "--temp", "0", "--mode",
                                "secureinfer", "--host", "worker", "--pin-cpu", pin});
        ASSERT_EQ(r.exit_code, 0) << pin << ": " << r.err;
        if (want.empty()) want = r.out;
        EXPECT_EQ(r.out, want) << pin;
    }
    EXPECT_EQ(want.rfind("Once upon a time, there was a little girl named Lily.", 0), 0u) << want;
}

TEST(Cli, BadFilesFailWithNamedErrors) {
    const std::string dir = si::test::scratch_dir();
    auto failure = [](const std::vector<std::string>& args, const std::string& needle) {
        const auto r = run_cli(args);
        EXPECT_EQ(r.exit_code, 1) << r.err;
        EXPECT_EQ(r.signal, 0);
        EXPECT_TRUE(contains(r.err, "secureinfer: error: ")) << r.err;
        EXPECT_TRUE(contains(r.err, needle)) << r.err;
        EXPECT_TRUE(r.out.empty()) << r.out;
    };
    failure({"run", "-m", dir + "/missing.bin"}, "missing.bin: no such file");
    const std::string model = si::test::read_file(kModel);
    si::test::write_file(dir + "/trunc.bin", model.substr(0, model.size() / 2));
    failure({"run", "-m", dir + "/trunc.bin", "--tokenizer", kTok}, "trunc.bin: file size");
    si::test::write_file(dir + "/bad.gguf", std::string("GGUF\x07\x00\x00\x00", 8) + std::string(64, '\0'));
    failure({"info", dir + "/bad.gguf"}, "bad.gguf");
    failure({"run", "-m", kModel, "--tokenizer", shared("models/llama2_tokenizer.bin")}, "32000 tokens but 512");
    si::test::write_file(dir + "/empty.txt", "");
    failure({"perplexity", "-m", kModel, "--tokenizer", kTok, "-f", dir + "/empty.txt", "--mode", "plain"}, "no tokens");
}
