// Llama 3 end to end: a GGUF with the 128256-token llama-bpe vocabulary and a chat template in its metadata, through
// the C API (template, tokenization with special tokens, end-of-turn tokens) and `secureinfer run --chat` in every
// preset (the 128k-row classifier is offloaded like any public projection in the secure ones).
#include <algorithm>
#include <filesystem>

#include <gtest/gtest.h>

#include "chat/chat_template.h"
#include "secureinfer.h"
#include "testutil.h"

using namespace si;

namespace {

const std::string kLlama31 = "templates/meta-llama-Llama-3.1-8B-Instruct.jinja";

// One model file per (template, favoured token), written once per test program.
std::string model_file(const std::string& tmpl_file, int32_t favoured) {
    static const std::string dir = test::scratch_dir();
    const std::string path = dir + "/llama3-" + std::to_string(favoured) + "-" +
                             std::to_string(std::hash<std::string>{}(tmpl_file)) + ".gguf";
    if (!std::filesystem::exists(path))
        test::write_llama3_chat_model(path, tmpl_file.empty() ? "" : test::read_file(test::shared(tmpl_file)), favoured);
    return path;
}

}  // namespace

TEST(Llama3, ChatThroughTheCApi) {
    si_model* m = nullptr;
    ASSERT_EQ(si_model_load(model_file(kLlama31, 9906).c_str(), nullptr, &m), SI_OK) << si_last_error();
    EXPECT_EQ(si_model_n_vocab(m), 128256);
    EXPECT_STREQ(si_chat_template_warning(m), "");
    EXPECT_STREQ(si_chat_stop_text(m), "");
    const std::string messages = R"([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])";
    char buf[4096];
    size_t n = 0;
    ASSERT_EQ(si_chat_apply_template(m, messages.c_str(), nullptr, 1, buf, sizeof buf, &n), SI_OK) << si_last_error();
    const std::string text(buf, n);
    EXPECT_EQ(text, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                    "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n");
    // Buffer protocol: too small gives the size.
    size_t need = 0;
    EXPECT_EQ(si_chat_apply_template(m, messages.c_str(), nullptr, 1, buf, 10, &need), SI_ERR_BUFFER_TOO_SMALL);
    EXPECT_EQ(need, n);
    // Special tokens are parsed in the rendered prompt, BOS only once.
    si_token ids[256];
    size_t k = 0;
    ASSERT_EQ(si_chat_tokenize(m, text.data(), text.size(), ids, 256, &k), SI_OK) << si_last_error();
    ASSERT_GT(k, 10u);
    EXPECT_EQ(ids[0], 128000);
    EXPECT_EQ(ids[1], 128006);  // <|start_header_id|>
    EXPECT_EQ(std::count(ids, ids + k, 128000), 1);
    EXPECT_EQ(std::count(ids, ids + k, 128009), 2);  // two <|eot_id|>
    EXPECT_EQ(ids[k - 1], 271);                      // "\n\n" after the assistant header
    EXPECT_EQ(si_token_is_end_of_turn(m, 128009), 1);
    EXPECT_EQ(si_token_is_end_of_turn(m, 128001), 1);
    EXPECT_EQ(si_token_is_end_of_turn(m, 9906), 0);
    EXPECT_EQ(si_token_is_end_of_turn(m, -1), 0);
    // Bad input: not JSON, not an array, the template's raise_exception.
    EXPECT_EQ(si_chat_apply_template(m, "[{", nullptr, 1, buf, sizeof buf, &n), SI_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(si_last_error()).find("malformed JSON"), std::string::npos) << si_last_error();
    EXPECT_EQ(si_chat_apply_template(m, "{}", nullptr, 1, buf, sizeof buf, &n), SI_ERR_INVALID_ARGUMENT);
    const std::string two_calls = R"([{"role": "user", "content": "x"}, {"role": "assistant", "content": null, "tool_calls": [
        {"function": {"name": "a", "arguments": {}}}, {"function": {"name": "b", "arguments": {}}}]}])";
    EXPECT_EQ(si_chat_apply_template(m, two_calls.c_str(), nullptr, 1, buf, sizeof buf, &n), SI_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(si_last_error()).find("This model only supports single tool-calls at once!"), std::string::npos)
        << si_last_error();
    si_model_free(m);
}

TEST(Llama3, RunChatRepliesInEveryPreset) {
    const std::string model = model_file(kLlama31, 9906);  // "Hello"
    for (const char* mode : {"plain", "gpu-only", "secureinfer", "enclave-only"}) {
        const test::CliResult r = test::run_cli({"run", "-m", model, "--chat", "-p", "Hi", "-n", "3", "--temp", "0", "--mode", mode});
        EXPECT_EQ(r.exit_code, 0) << mode << ": " << r.err;
        EXPECT_EQ(r.out, "HelloHelloHello\n") << mode;
        EXPECT_EQ(r.err.find("chat:"), std::string::npos) << r.err;  // no template warning
    }
    // Interactive: one user turn per line of stdin; the second turn reuses the context.
    const test::CliResult r = test::run_cli({"run", "-m", model, "--chat", "-n", "2", "--temp", "0", "--mode", "plain",
                                             "--system", "Be brief."},
                                            "Hi\n\nHow are you?\n");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, "HelloHello\nHelloHello\n");
}

TEST(Llama3, GenerationStopsAtEndOfTurn) {
    const std::string model = model_file(kLlama31, 128009);  // <|eot_id|> always wins
    for (const char* mode : {"plain", "secureinfer"}) {
        const test::CliResult chat = test::run_cli({"run", "-m", model, "--chat", "-p", "Hi", "-n", "16", "--temp", "0", "--mode", mode});
        EXPECT_EQ(chat.exit_code, 0) << chat.err;
        EXPECT_EQ(chat.out, "\n") << mode;
        // Plain generation stops there too.
        const test::CliResult run = test::run_cli({"run", "-m", model, "-p", "Hi", "-n", "16", "--temp", "0", "--mode", mode});
        EXPECT_EQ(run.exit_code, 0) << run.err;
        EXPECT_EQ(run.out, "\n") << mode;
    }
}

TEST(Llama3, TemplateErrorsAndFallback) {
    // Gemma's template refuses a system message: the template's own message, non-zero exit.
    const std::string gemma = model_file("templates/google-gemma-2-2b-it.jinja", 9906);
    test::CliResult r = test::run_cli({"run", "-m", gemma, "--chat", "--system", "S", "-p", "Hi", "-n", "2", "--mode", "plain"});
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("System role not supported"), std::string::npos) << r.err;
    // No template: the plain fallback with a warning (this vocabulary has no <|im_start|>).
    const std::string none = model_file("", 9906);
    r = test::run_cli({"run", "-m", none, "--chat", "-p", "Hi", "-n", "2", "--temp", "0", "--mode", "plain"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.err.find("WARNING: chat: the model has no chat template"), std::string::npos) << r.err;
    EXPECT_EQ(r.out, "HelloHello\n");
    // A template the engine cannot handle: the warning names the construct and its line, then the fallback.
    static const std::string dir = test::scratch_dir();
    const std::string unsupported = dir + "/include.gguf";
    test::write_llama3_chat_model(unsupported, "{% for m in messages %}\n{% include 'turn.jinja' %}{% endfor %}", 9906);
    r = test::run_cli({"run", "-m", unsupported, "--chat", "-p", "Hi", "-n", "1", "--temp", "0", "--mode", "plain"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.err.find("line 2: unsupported construct '{% include %}'"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("using the plain System:/User:/Assistant: format"), std::string::npos) << r.err;
    EXPECT_EQ(r.out, "Hello\n");
    r = test::run_cli({"run", "-m", none, "--system", "S", "-p", "Hi"});
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("--system needs --chat"), std::string::npos) << r.err;
}
