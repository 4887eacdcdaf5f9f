// secureinfer serve end to end on loopback: the server runs as a child process (the CLI), clients are curl, the
// load-test tool and, when npm can install it, the `openai` Node.js package. Also the C API example program.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "secureinfer.h"

#include "enclave/package_crypto.h"
#include "host/keyserver.h"
#include "host/package.h"
#include "testutil.h"

using json = nlohmann::json;
using si::test::read_file;
using si::test::run_cli;
using si::test::shared;
using si::test::write_file;

namespace {

const std::string kModel = shared("models/stories260K.bin");
const std::string kTok = shared("models/tok512.bin");

bool contains(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

// A file a child process may not have created yet.
std::string read_if_exists(const std::string& path) {
    return std::filesystem::exists(path) ? read_file(path) : std::string();
}

// Starts argv with stdout and stderr sent to files (no shell).
pid_t spawn(const std::vector<std::string>& argv, const std::string& out, const std::string& err,
            const std::vector<std::string>& env = {}) {
    const pid_t pid = fork();
    if (pid == 0) {
        const int o = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        const int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        const int in = open("/dev/null", O_RDONLY);
        dup2(in, 0);
        dup2(o, 1);
        dup2(e, 2);
        for (const auto& kv : env) putenv(const_cast<char*>(kv.c_str()));
        std::vector<char*> args;
        for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        execvp(args[0], args.data());
        _exit(127);
    }
    return pid;
}

struct Proc {
    int exit_code = -1;
    std::string out, err;
};

Proc wait_proc(pid_t pid, const std::string& out, const std::string& err) {
    int status = 0;
    waitpid(pid, &status, 0);
    Proc p;
    p.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    p.out = read_file(out);
    p.err = read_file(err);
    return p;
}

Proc run(const std::vector<std::string>& argv, const std::string& dir, const std::vector<std::string>& env = {}) {
    static int n = 0;
    const std::string base = dir + "/proc" + std::to_string(n++);
    return wait_proc(spawn(argv, base + ".out", base + ".err", env), base + ".out", base + ".err");
}

// `secureinfer serve` on a free loopback port; SIGTERM when it goes out of scope.
class Server {
public:
    Server(const std::string& dir, const std::vector<std::string>& extra)
        : log_(dir + "/server" + std::to_string(count_++) + ".log") {
        std::vector<std::string> argv = {SI_CLI, "serve", "--port", "0", "-t", "1"};
        if (std::find(extra.begin(), extra.end(), "--package") == extra.end() &&
            std::find(extra.begin(), extra.end(), "-m") == extra.end())
            argv.insert(argv.end(), {"-m", kModel, "--tokenizer", kTok});
        argv.insert(argv.end(), extra.begin(), extra.end());
        pid_ = spawn(argv, log_ + ".out", log_);
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
        while (std::chrono::steady_clock::now() < deadline) {
            const std::string log = read_if_exists(log_);
            const size_t at = log.find("listening on http://127.0.0.1:");
            if (at != std::string::npos && log.find('\n', at) != std::string::npos) {
                port_ = std::stoi(log.substr(at + 30));
                return;
            }
            int status = 0;
            if (waitpid(pid_, &status, WNOHANG) == pid_) {
                pid_ = -1;
                break;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        ADD_FAILURE() << "the server did not start: " << read_if_exists(log_);
    }
    ~Server() { stop(); }

    std::string url(const std::string& path) const { return "http://127.0.0.1:" + std::to_string(port_) + path; }
    std::string log() const { return read_if_exists(log_); }
    pid_t pid() const { return pid_; }
    // SIGTERM and wait: the exit code (negative: killed by that signal).
    int stop() {
        if (pid_ <= 0) return -1;
        kill(pid_, SIGTERM);
        int status = 0;
        waitpid(pid_, &status, 0);
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    }

private:
    static inline int count_ = 0;
    std::string log_;
    pid_t pid_ = -1;
    int port_ = 0;
};

struct Http {
    int status = 0;
    std::string body;
    json j;  // the body parsed, when it is JSON
};

// curl -sS with the body in a file; returns the status and the body.
Http curl(const std::string& dir, const std::vector<std::string>& args) {
    static int n = 0;
    const std::string body = dir + "/curl" + std::to_string(n++) + ".body";
    std::vector<std::string> argv = {"curl", "-sS", "-N", "-o", body, "-w", "%{http_code}"};
    argv.insert(argv.end(), args.begin(), args.end());
    const Proc p = run(argv, dir);
    Http h;
    EXPECT_EQ(p.exit_code, 0) << "curl failed: " << p.err;
    h.status = std::atoi(p.out.c_str());
    h.body = read_if_exists(body);
    h.j = json::parse(h.body, nullptr, false);
    return h;
}

Http post(const std::string& dir, const Server& s, const std::string& path, const std::string& body) {
    static int n = 0;
    const std::string file = dir + "/req" + std::to_string(n++) + ".json";
    write_file(file, body);
    return curl(dir, {"-H", "Content-Type: application/json", "--data-binary", "@" + file, s.url(path)});
}

// The text of an event stream; fails the test unless it ends with a finish reason and [DONE].
std::string sse_text(const std::string& body, bool chat, std::string* finish = nullptr) {
    std::string text;
    bool done = false;
    size_t b = 0;
    while (b < body.size()) {
        const size_t e = std::min(body.find("\n\n", b), body.size());
        const std::string ev = body.substr(b, e - b);
        b = e + 2;
        if (ev.empty()) continue;
        EXPECT_EQ(ev.rfind("data: ", 0), 0u) << ev;
        EXPECT_FALSE(done) << "event after [DONE]: " << ev;
        if (ev == "data: [DONE]") {
            done = true;
            continue;
        }
        const json j = json::parse(ev.substr(6));
        EXPECT_EQ(j["object"], chat ? "chat.completion.chunk" : "text_completion");
        if (j["choices"].empty()) continue;  // the usage chunk
        const json& c = j["choices"][0];
        if (chat) text += c["delta"].value("content", "");
        else text += c["text"].get<std::string>();
        if (!c["finish_reason"].is_null() && finish) *finish = c["finish_reason"];
    }
    EXPECT_TRUE(done) << body;
    return text;
}

// What `secureinfer run` prints for these sampling options, without its final newline.
std::string cli_text(const std::string& prompt, int n, const std::string& temp, const std::string& seed,
                     const std::string& top_k = "40", const std::string& top_p = "0.95") {
    const auto r = run_cli({"run", "-m", kModel, "--tokenizer", kTok, "-p", prompt, "-n", std::to_string(n), "--temp",
                            temp, "--seed", seed, "--top-k", top_k, "--top-p", top_p, "-t", "1"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_FALSE(r.out.empty());
    return r.out.substr(0, r.out.size() - 1);
}

void expect_error(const Http& h, int status, const std::string& type, const std::string& code = "",
                  const std::string& param = "") {
    EXPECT_EQ(h.status, status) << h.body;
    ASSERT_TRUE(h.j.is_object() && h.j.contains("error")) << h.body;
    const json& e = h.j["error"];
    EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty()) << h.body;
    EXPECT_EQ(e["type"], type) << h.body;
    if (!code.empty()) {
        EXPECT_EQ(e["code"], code) << h.body;
    }
    if (!param.empty()) {
        EXPECT_EQ(e["param"], param) << h.body;
    }
}

}  // namespace

// Non-streamed and streamed completions give exactly the CLI's text for the same prompt, seed and sampler, greedy
// and sampled, in the default secureinfer preset.
TEST(Server, CompletionsEqualCliTokens) {
    const std::string dir = si::test::scratch_dir();
    Server s(dir, {});
    struct Case {
        std::string prompt, temp, seed, top_k, top_p;
        int n;
    };
    for (const Case& c : {Case{"Once upon a time", "0", "1", "40", "0.95", 48}, Case{"", "0.9", "42", "40", "0.9", 40},
                          Case{"The cat", "1", "7", "0", "1", 32}}) {
        const std::string expected = cli_text(c.prompt, c.n, c.temp, c.seed, c.top_k, c.top_p);
        const json req = {{"model", "stories260K"}, {"prompt", c.prompt}, {"max_tokens", c.n},
                          {"temperature", std::stod(c.temp)}, {"seed", std::stoll(c.seed)},
                          {"top_k", std::stoi(c.top_k)}, {"top_p", std::stod(c.top_p)}};
        const Http h = post(dir, s, "/v1/completions", req.dump());
        ASSERT_EQ(h.status, 200) << h.body;
        EXPECT_EQ(h.j["object"], "text_completion");
        EXPECT_EQ(h.j["model"], "stories260K");
        EXPECT_EQ(h.j["choices"][0]["text"], expected) << "temp " << c.temp;
        EXPECT_LE(h.j["usage"]["completion_tokens"].get<int>(), c.n);
        json sreq = req;
        sreq["stream"] = true;
        const Http st = post(dir, s, "/v1/completions", sreq.dump());
        ASSERT_EQ(st.status, 200) << st.body;
        std::string finish;
        EXPECT_EQ(sse_text(st.body, false, &finish), expected) << "streamed, temp " << c.temp;
        EXPECT_EQ(finish, h.j["choices"][0]["finish_reason"]);
    }
    // "length" when max_tokens ends it; the same answer twice (no state carried between requests)
    const json req = {{"prompt", "Once upon a time"}, {"max_tokens", 5}, {"temperature", 0}};
    const Http a = post(dir, s, "/v1/completions", req.dump()), b = post(dir, s, "/v1/completions", req.dump());
    EXPECT_EQ(a.j["choices"][0]["finish_reason"], "length");
    EXPECT_EQ(a.j["choices"][0]["text"], b.j["choices"][0]["text"]);
    EXPECT_EQ(a.j["usage"]["prompt_tokens"], 5);
    EXPECT_EQ(s.stop(), 0);
}

// With --precompute the contexts decode with precomputed unblinding factors, topped up after every request: the
// same text as the CLI's, and /health shows the idle contexts full again.
TEST(Server, PrecomputedFactorsServeTheCliTokens) {
    const std::string dir = si::test::scratch_dir();
    Server s(dir, {"--precompute", "40", "--parallel", "2"});
    EXPECT_NE(s.log().find("40 decode steps precomputed per slot"), std::string::npos) << s.log();
    Http health = curl(dir, {s.url("/health")});
    ASSERT_EQ(health.status, 200) << health.body;
    EXPECT_EQ(health.j["precomputed_steps"], 40) << health.body;
    const std::string expected = cli_text("Once upon a time", 32, "0", "1");
    for (int i = 0; i < 3; ++i) {
        const json req = {{"prompt", "Once upon a time"}, {"max_tokens", 32}, {"temperature", 0}, {"seed", 1}};
        const Http h = post(dir, s, "/v1/completions", req.dump());
        ASSERT_EQ(h.status, 200) << h.body;
        EXPECT_EQ(h.j["choices"][0]["text"], expected) << "request " << i;
    }
    // each request used up to 32 steps of its context's 40; the background thread tops the context up again
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    do {
        health = curl(dir, {s.url("/health")});
        if (health.j.value("precomputed_steps", -1) == 40) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    } while (std::chrono::steady_clock::now() < deadline);
    EXPECT_EQ(health.j["precomputed_steps"], 40) << health.body;
    EXPECT_EQ(s.stop(), 0);
    const auto bad = run_cli({"serve", "-m", kModel, "--tokenizer", kTok, "--mode", "gpu-only", "--precompute", "8"});
    EXPECT_EQ(bad.exit_code, 2) << bad.err;
    EXPECT_NE(bad.err.find("--precompute needs --mode secureinfer"), std::string::npos) << bad.err;
}

// Chat: the simple template, the same text streamed and not, stop strings honoured and never leaked in a stream.
TEST(Server, ChatCompletionsAndStopStrings) {
    const std::string dir = si::test::scratch_dir();
    Server s(dir, {"--alias", "tiny"});
    const json chat = {{"model", "tiny"},
                       {"messages", {{{"role", "system"}, {"content", "You tell stories."}},
                                     {{"role", "user"}, {"content", {{{"type", "text"}, {"text", "A story, please."}}}}}}},
                       {"max_tokens", 40},
                       {"temperature", 0}};
    const Http h = post(dir, s, "/v1/chat/completions", chat.dump());
    ASSERT_EQ(h.status, 200) << h.body;
    EXPECT_EQ(h.j["object"], "chat.completion");
    EXPECT_EQ(h.j["choices"][0]["message"]["role"], "assistant");
    const std::string text = h.j["choices"][0]["message"]["content"];
    // the same as a completion of the templated prompt
    const json comp = {{"model", "tiny"},
                       {"prompt", "System: You tell stories.\nUser: A story, please.\nAssistant:"},
                       {"max_tokens", 40},
                       {"temperature", 0},
                       {"stop", "\nUser:"}};
    EXPECT_EQ(post(dir, s, "/v1/completions", comp.dump()).j["choices"][0]["text"], text);
    json sc = chat;
    sc["stream"] = true;
    sc["stream_options"] = {{"include_usage", true}};
    const Http st = post(dir, s, "/v1/chat/completions", sc.dump());
    ASSERT_EQ(st.status, 200);
    EXPECT_EQ(sse_text(st.body, true), text);
    EXPECT_TRUE(contains(st.body, "\"usage\"")) << st.body;

    // a stop string cuts the text before it, streamed or not
    const std::string greedy = cli_text("Once upon a time", 40, "0", "1");
    const size_t at = greedy.find("Lily");
    ASSERT_NE(at, std::string::npos) << greedy;
    json stop = {{"prompt", "Once upon a time"}, {"max_tokens", 40}, {"temperature", 0}, {"stop", {"Lily", "zzz"}}};
    const Http a = post(dir, s, "/v1/completions", stop.dump());
    EXPECT_EQ(a.j["choices"][0]["text"], greedy.substr(0, at));
    EXPECT_EQ(a.j["choices"][0]["finish_reason"], "stop");
    stop["stream"] = true;
    const Http b = post(dir, s, "/v1/completions", stop.dump());
    EXPECT_EQ(sse_text(b.body, false), greedy.substr(0, at));

    const Http models = curl(dir, {s.url("/v1/models")});
    EXPECT_EQ(models.j["data"][0]["id"], "tiny");
    EXPECT_EQ(models.j["data"][0]["meta"]["mode"], "secureinfer");
    EXPECT_EQ(curl(dir, {s.url("/v1/models/tiny")}).status, 200);
    expect_error(curl(dir, {s.url("/v1/models/other")}), 404, "invalid_request_error", "model_not_found");
    const Http health = curl(dir, {s.url("/health")});
    EXPECT_EQ(health.status, 200);
    EXPECT_EQ(health.j["status"], "ok");
}

// Malformed JSON, wrong types, oversized bodies, unknown models, too-long prompts and requests beyond the limits
// get the HTTP status and the error object the OpenAI API uses.
TEST(Server, BadRequestsGetOpenAIErrors) {
    const std::string dir = si::test::scratch_dir();
    Server s(dir, {"--ctx-size", "64", "--max-body", "4096", "--max-tokens", "32"});
    const std::string inv = "invalid_request_error";
    expect_error(post(dir, s, "/v1/completions", "{\"prompt\": \"Once\""), 400, inv);
    expect_error(post(dir, s, "/v1/completions", "not json at all"), 400, inv);
    expect_error(post(dir, s, "/v1/completions", "[1, 2]"), 400, inv);
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "max_tokens": "5"})"), 400, inv, "", "max_tokens");
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "max_tokens": 2.5})"), 400, inv, "", "max_tokens");
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "temperature": "hot"})"), 400, inv, "", "temperature");
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "temperature": 7})"), 400, inv, "", "temperature");
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": 5})"), 400, inv, "", "prompt");
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": [100000]})"), 400, inv, "", "prompt");
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "stream": "yes"})"), 400, inv, "", "stream");
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "seed": "x"})"), 400, inv, "", "seed");
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "stop": [1]})"), 400, inv, "", "stop");
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "n": 2})"), 400, inv, "", "n");
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "logprobs": 1})"), 400, inv, "", "logprobs");
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "model": 3})"), 400, inv, "", "model");
    expect_error(post(dir, s, "/v1/chat/completions", R"({"messages": "hi"})"), 400, inv, "", "messages");
    expect_error(post(dir, s, "/v1/chat/completions", R"({"messages": []})"), 400, inv, "", "messages");
    expect_error(post(dir, s, "/v1/chat/completions", R"({"messages": [{"role": "robot", "content": "x"}]})"), 400, inv,
                 "", "messages[0].role");
    expect_error(post(dir, s, "/v1/chat/completions", R"({"messages": [{"role": "user", "content": 1}]})"), 400, inv,
                 "", "messages[0].content");
    // unknown model
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "model": "gpt-4"})"), 404, inv, "model_not_found",
                 "model");
    expect_error(post(dir, s, "/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}], "model": "x"})"),
                 404, inv, "model_not_found");
    // limits: a prompt longer than the context, a completion that does not fit, max_tokens above the server's cap
    const std::string story = read_file(shared("data/tinystories_val.txt")).substr(0, 1500);
    expect_error(post(dir, s, "/v1/completions", json{{"prompt", story}}.dump()), 400, inv, "context_length_exceeded",
                 "prompt");
    expect_error(post(dir, s, "/v1/completions", json{{"prompt", std::vector<int>(40, 403)}, {"max_tokens", 30}}.dump()),
                 400, inv, "context_length_exceeded", "max_tokens");
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "max_tokens": 33})"), 400, inv, "", "max_tokens");
    // a body over --max-body: 413, with a Content-Length and chunked
    const std::string big = json{{"prompt", std::string(8000, 'a')}}.dump();
    expect_error(post(dir, s, "/v1/completions", big), 413, inv, "request_too_large");
    write_file(dir + "/big.json", big);
    expect_error(curl(dir, {"-H", "Transfer-Encoding: chunked", "--data-binary", "@" + dir + "/big.json",
                            s.url("/v1/completions")}),
                 413, inv, "request_too_large");
    // unknown paths and methods
    expect_error(curl(dir, {s.url("/v1/nothing")}), 404, inv);
    expect_error(curl(dir, {s.url("/v1/completions")}), 405, inv);
    // after all that, the server still answers, and a prompt that fits works
    const Http ok = post(dir, s, "/v1/completions", json{{"prompt", story.substr(0, 100)}, {"max_tokens", 8}}.dump());
    EXPECT_EQ(ok.status, 200) << ok.body;
    EXPECT_EQ(s.stop(), 0);
}

// Log-probabilities leave the enclave only when the server was started with --logprobs K, and at most K of them.
TEST(Server, LogprobsOnlyAsStarted) {
    const std::string dir = si::test::scratch_dir();
    Server s(dir, {"--logprobs", "3"});
    const std::string greedy = cli_text("Once upon a time", 12, "0", "1");
    const Http h =
        post(dir, s, "/v1/completions", R"({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "logprobs": 2})");
    ASSERT_EQ(h.status, 200) << h.body;
    EXPECT_EQ(h.j["choices"][0]["text"], greedy);
    const json& lp = h.j["choices"][0]["logprobs"];
    ASSERT_EQ(lp["tokens"].size(), 12u) << h.body;
    std::string joined;
    for (size_t i = 0; i < 12; ++i) {
        joined += lp["tokens"][i].get<std::string>();
        ASSERT_TRUE(lp["token_logprobs"][i].is_number()) << h.body;  // greedy: the best token is released
        EXPECT_LE(lp["token_logprobs"][i].get<double>(), 0.0);
        EXPECT_EQ(lp["top_logprobs"][i].size(), 2u);
    }
    EXPECT_EQ(joined, greedy);
    const Http c = post(dir, s, "/v1/chat/completions",
                        R"({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
                            "logprobs": true, "top_logprobs": 3})");
    ASSERT_EQ(c.status, 200) << c.body;
    ASSERT_EQ(c.j["choices"][0]["logprobs"]["content"].size(), 4u) << c.body;
    EXPECT_EQ(c.j["choices"][0]["logprobs"]["content"][0]["top_logprobs"].size(), 3u);
    expect_error(post(dir, s, "/v1/completions", R"({"prompt": "a", "logprobs": 4})"), 400, "invalid_request_error", "",
                 "logprobs");
    // streamed: the log-probabilities travel with the chunks
    const Http st = post(dir, s, "/v1/completions",
                         R"({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "logprobs": 1, "stream": true})");
    EXPECT_EQ(sse_text(st.body, false), greedy.substr(0, sse_text(st.body, false).size()));
    EXPECT_TRUE(contains(st.body, "\"token_logprobs\"")) << st.body;
}

// 8 concurrent clients, a few hundred requests (half streamed) against 2 contexts: no errors, and every request
// with the same prompt and seed gets the same text (no state shared between requests).
TEST(Server, BoundedLoadTestHasNoErrors) {
    const std::string dir = si::test::scratch_dir();
    Server s(dir, {"--parallel", "2", "--ctx-size", "128"});
    const Proc p = run({SI_LOAD_TEST, "--url", s.url(""), "--clients", "8", "--requests", "240", "--max-tokens", "8"},
                       dir);
    EXPECT_EQ(p.exit_code, 0) << p.out << p.err;
    EXPECT_TRUE(contains(p.out, "240 ok, 0 failed")) << p.out;
    std::printf("%s", p.out.c_str());
    const Http health = curl(dir, {s.url("/health")});
    EXPECT_EQ(health.status, 200);
    EXPECT_EQ(s.stop(), 0);
    EXPECT_TRUE(contains(s.log(), "serve: stopped")) << s.log();
}

// SIGTERM: running requests finish their streams, queued ones get 503, the server exits 0.
TEST(Server, SigtermFinishesInFlightAndExitsZero) {
    const std::string dir = si::test::scratch_dir();
    Server s(dir, {"--parallel", "1"});
    const std::string body = R"({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 1, "seed": 3, "stream": true})";
    write_file(dir + "/long.json", body);
    struct Client {
        pid_t pid;
        std::string out, err, body;
    };
    std::vector<Client> clients;
    for (int i = 0; i < 6; ++i) {
        const std::string b = dir + "/c" + std::to_string(i);
        clients.push_back({spawn({"curl", "-sS", "-N", "-o", b + ".body", "-w", "%{http_code}", "-H",
                                  "Content-Type: application/json", "--data-binary", "@" + dir + "/long.json",
                                  s.url("/v1/completions")},
                                 b + ".out", b + ".err"),
                           b + ".out", b + ".err", b + ".body"});
    }
    // wait until one stream has started, then ask the server to stop
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    bool started = false;
    while (!started && std::chrono::steady_clock::now() < deadline) {
        for (const Client& c : clients)
            started |= contains(read_if_exists(c.body), "data: ");
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    ASSERT_TRUE(started);
    EXPECT_EQ(s.stop(), 0);
    EXPECT_TRUE(contains(s.log(), "finishing the running requests")) << s.log();
    int complete = 0, refused = 0;
    for (const Client& c : clients) {
        const Proc p = wait_proc(c.pid, c.out, c.err);
        const std::string b = read_if_exists(c.body);
        // Never served: refused (7: the server had stopped listening), or (52) accepted by the kernel's backlog but
        // not yet read when the listener closed, then closed unanswered; neither got a partial response.
        if (p.exit_code == 7 || (p.exit_code == 52 && read_if_exists(c.body).empty())) continue;
        EXPECT_EQ(p.exit_code, 0) << p.err;
        if (p.out == "200") {
            // a stream that started is never cut short
            sse_text(b, false);
            ++complete;
        } else {
            EXPECT_EQ(p.out, "503") << b;
            EXPECT_TRUE(contains(b, "server_shutting_down")) << b;
            ++refused;
        }
    }
    EXPECT_GE(complete, 1);
    std::printf("SIGTERM with 6 clients: %d streams completed, %d refused with 503\n", complete, refused);
}

// A client that goes away mid-stream stops its generation; the context is reset and the next request is unaffected.
TEST(Server, ClientGoingAwayStopsGeneration) {
    const std::string dir = si::test::scratch_dir();
    Server s(dir, {"-v"});
    const std::string body = R"({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": true})";
    const Proc cut = run({"sh", "-c", "curl -sN -H 'Content-Type: application/json' -d '" + body + "' " +
                                          s.url("/v1/completions") + " | head -c 200 >/dev/null"},
                         dir);
    EXPECT_EQ(cut.exit_code, 0) << cut.err;
    const std::string greedy = cli_text("Once upon a time", 24, "0", "1");
    const Http h = post(dir, s, "/v1/completions", R"({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0})");
    EXPECT_EQ(h.j["choices"][0]["text"], greedy);
    EXPECT_TRUE(contains(s.log(), "the client went away after")) << s.log();
    EXPECT_EQ(s.stop(), 0);
}

// A LoRA adapter (kept in the enclave) and a protected package of the same model serve the CLI's tokens.
TEST(Server, LoraAndPackageServeTheCliTokens) {
    const std::string dir = si::test::scratch_dir();
    const std::string adapter = std::string(SI_SOURCE_DIR) + "/adapters/austen-r8.gguf";
    const std::vector<std::string> gen = {"-p", "It was", "-n", "24", "--temp", "0", "-t", "1"};
    auto args = std::vector<std::string>{"run", "-m", kModel, "--tokenizer", kTok, "--lora", adapter};
    args.insert(args.end(), gen.begin(), gen.end());
    const auto cli = run_cli(args);
    ASSERT_EQ(cli.exit_code, 0) << cli.err;
    const std::string expected = cli.out.substr(0, cli.out.size() - 1);
    const json req = {{"prompt", "It was"}, {"max_tokens", 24}, {"temperature", 0}};
    {
        Server s(dir, {"--lora", adapter});
        EXPECT_EQ(post(dir, s, "/v1/completions", req.dump()).j["choices"][0]["text"], expected);
    }
    const std::string key = dir + "/owner.key", pkg = dir + "/m.sipkg";
    ASSERT_EQ(run_cli({"keygen", "-o", key}).exit_code, 0);
    const auto packed = run_cli({"pack", "--base", kModel, "--tokenizer", kTok, "--lora", adapter, "--key-file", key,
                                 "--max-temperature", "1.2", "-o", pkg});
    ASSERT_EQ(packed.exit_code, 0) << packed.err;
    Server s(dir, {"--package", pkg, "--key-file", key});
    const Http h = post(dir, s, "/v1/completions", req.dump());
    EXPECT_EQ(h.j["choices"][0]["text"], expected) << h.body;
    EXPECT_EQ(curl(dir, {s.url("/v1/models")}).j["data"][0]["id"], "m");
    // the owner's sampling policy (here: temperature at most 1.2), enforced in the enclave
    const Http hot = post(dir, s, "/v1/completions", json{{"prompt", "It was"}, {"max_tokens", 4}, {"temperature", 1.5}}.dump());
    EXPECT_EQ(hot.status, 400) << hot.body;
    EXPECT_NE(hot.body.find("the package's owner does not allow a temperature above 1.2"), std::string::npos) << hot.body;
    EXPECT_EQ(post(dir, s, "/v1/completions", req.dump()).j["choices"][0]["text"], expected);
}

// The device owner reads the untrusted host's memory (the serving process: theirs to read) while it serves a
// protected package whose key the owner's keyserver released to the enclave only. It finds the public weights the
// host uses, but no byte of a secret tensor in any form: the host only ever holds their ciphertext.
TEST(Server, RootReadingTheHostMemoryFindsNoSecretTensor) {
    if (geteuid() != 0) GTEST_SKIP() << "reading the memory of a process that handed itself to a worker needs root";
    const std::string dir = si::test::scratch_dir();
    setenv("SI_DEVICE_DIR", (dir + "/device").c_str(), 1);
    const std::string adapter = std::string(SI_SOURCE_DIR) + "/adapters/austen-r8.gguf";
    const std::string key = dir + "/owner.key", pkg = dir + "/m.sipkg";
    ASSERT_EQ(run_cli({"keygen", "-o", key}).exit_code, 0);
    const auto packed = run_cli({"pack", "--base", kModel, "--tokenizer", kTok, "--lora", adapter, "--secret",
                                 si::test::kScrapedSecrets, "--key-file", key, "-o", pkg});
    ASSERT_EQ(packed.exit_code, 0) << packed.err;
    const auto measured = run_cli({"measure"});
    ASSERT_EQ(measured.exit_code, 0) << measured.err;
    si::pkg::Hash allowed{};
    ASSERT_TRUE(si::pkg::from_hex(measured.out.substr(0, 64), allowed)) << measured.out;
    const auto device = run_cli({"device-key"});
    ASSERT_EQ(device.exit_code, 0) << device.err;
    si::AttestationPolicy policy;
    policy.allowed_measurements = {allowed};
    policy.accept_software_tee = true;
    policy.devices = {si::parse_device(device.out.substr(0, device.out.find('\n')))};
    si::KeyService ks(si::read_owner_key(key), policy);
    ks.set_warn([](const std::string&) {});
    si::KeyServer keyserver(ks);
    const std::string url = "http://127.0.0.1:" + std::to_string(keyserver.start("127.0.0.1", 0));

    Server s(dir, {"--package", pkg, "--keyserver", url});
    const json req = {{"prompt", "It was"}, {"max_tokens", 16}, {"temperature", 0}};
    const Http h = post(dir, s, "/v1/completions", req.dump());
    ASSERT_EQ(h.status, 200) << h.body;

    const std::vector<std::string> adapter_tensors = si::test::gguf_tensor_bytes(adapter);
    auto scan = [&](pid_t pid) {
        // the positive control is the accelerator backend's packed copy of a public projection
        si::test::SecretScanner scanner = si::test::scraped_secrets_scanner(si::test::stories(), adapter_tensors);
        const si::test::Scraped m =
            si::test::scrape_memory(pid, [&](const char* data, size_t n) { scanner.scan(data, n); });
        std::printf("read %zu MiB of the serving process's memory\n", m.read >> 20);
        EXPECT_GT(m.read, size_t(1) << 20) << "could not read the serving process's memory";
        return scanner;
    };
    const si::test::SecretScanner found = scan(s.pid());
    EXPECT_TRUE(found.found(0)) << "the scan missed the " << found.name(0);
    for (size_t i = 1; i < found.targets(); ++i) EXPECT_FALSE(found.found(i)) << "found " << found.name(i);

    // The contrast: served from the plain model file and adapter (the host reads them), the same scan finds them.
    Server plain(dir, {"--lora", adapter, "--secret", si::test::kScrapedSecrets});
    ASSERT_EQ(post(dir, plain, "/v1/completions", req.dump()).status, 200);
    const si::test::SecretScanner leaked = scan(plain.pid());
    EXPECT_TRUE(leaked.found(1)) << leaked.name(1);  // blk.0.attn_q.weight, f32
    EXPECT_TRUE(leaked.found(leaked.targets() - 1)) << "the LoRA adapter";
    EXPECT_EQ(s.stop(), 0);
    unsetenv("SI_DEVICE_DIR");
}

// Usage errors exit 2 with one line; a port in use is a runtime error (exit 1).
TEST(Server, UsageAndBindErrors) {
    const std::string dir = si::test::scratch_dir();
    auto usage = [](const std::vector<std::string>& args, const std::string& needle) {
        const auto r = run_cli(args);
        EXPECT_EQ(r.exit_code, 2) << r.err;
        EXPECT_TRUE(contains(r.err, needle)) << r.err;
    };
    usage({"serve"}, "--model");
    usage({"serve", "-m", kModel, "--port", "70000"}, "--port");
    usage({"serve", "-m", kModel, "--logprobs", "2", "--mode", "plain"}, "--logprobs");
    usage({"serve", "-m", kModel, "--key-file", "k"}, "--package only");
    const auto help = run_cli({"serve", "--help"});
    EXPECT_EQ(help.exit_code, 0);
    EXPECT_TRUE(contains(help.out, "--parallel")) << help.out;
    Server s(dir, {});
    const std::string port = s.url("").substr(s.url("").rfind(':') + 1);
    const auto r = run_cli({"serve", "-m", kModel, "--tokenizer", kTok, "--port", port, "-t", "1"});
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_TRUE(contains(r.err, "cannot bind to 127.0.0.1:" + port)) << r.err;
}

// The npm `openai` client: completions and chat, streamed and not, models, and its error classes. Skipped when
// node is missing or npm cannot install the package (no network).
TEST(Server, OpenAINodeClient) {
    const std::string dir = si::test::scratch_dir();
    if (run({"node", "--version"}, dir).exit_code != 0) GTEST_SKIP() << "node is not installed";
    const std::string prefix = std::filesystem::path(SI_TEST_TMP).parent_path() / "node-openai";
    if (!std::filesystem::exists(prefix + "/node_modules/openai/package.json")) {
        std::filesystem::create_directories(prefix);
        const Proc npm = run({"timeout", "180", "npm", "install", "--no-audit", "--no-fund", "--no-save",
                              "--prefix", prefix, "openai@5.7.0"},
                             dir);
        if (npm.exit_code != 0) GTEST_SKIP() << "npm cannot install the openai package (no network?): " << npm.err;
    }
    Server s(dir, {});
    const std::string greedy = cli_text("Once upon a time", 20, "0", "1");
    const Proc p = run({"node", SI_NODE_CLIENT, s.url("/v1"), "stories260K", "Once upon a time", "20"}, dir,
                       {"NODE_PATH=" + prefix + "/node_modules"});
    ASSERT_EQ(p.exit_code, 0) << p.out << p.err;
    const json r = json::parse(p.out);
    EXPECT_EQ(r["completion"], greedy);
    EXPECT_EQ(r["completion_stream"], greedy);
    EXPECT_EQ(r["finish_reason"], "length");
    EXPECT_EQ(r["completion_tokens"], 20);
    EXPECT_EQ(r["chat_role"], "assistant");
    EXPECT_EQ(r["chat"], r["chat_stream"]);
    EXPECT_EQ(r["models"], json::array({"stories260K"}));
    EXPECT_EQ(r["not_found"], "NotFoundError 404 model_not_found");
    EXPECT_EQ(r["bad_request"], "BadRequestError 400 max_tokens");
}

// examples/generate.c, a plain C program on the public API in the secureinfer preset, prints the CLI's tokens.
TEST(Example, GenerateMatchesCli) {
    const std::string dir = si::test::scratch_dir();
    const Proc greedy = run({SI_EXAMPLE_GENERATE, kModel, kTok, "Once upon a time", "48"}, dir);
    ASSERT_EQ(greedy.exit_code, 0) << greedy.err;
    EXPECT_EQ(greedy.out, cli_text("Once upon a time", 48, "0", "1") + "\n");
    EXPECT_TRUE(contains(greedy.err, "trusted core: ")) << greedy.err;
    // seeded sampling with the library's default top-k 40 and top-p 0.95, as the CLI's defaults
    const Proc sampled = run({SI_EXAMPLE_GENERATE, kModel, kTok, "", "40", "0.8", "11"}, dir);
    ASSERT_EQ(sampled.exit_code, 0) << sampled.err;
    EXPECT_EQ(sampled.out, cli_text("", 40, "0.8", "11") + "\n");
}

// Chat with the model's own template (a Llama 3 vocabulary and template in the GGUF; docs/CHAT.md): the prompt is the
// template's rendering, generation ends at <|eot_id|>, tools reach the template, and the template's
// raise_exception is a 400 with its message. The model without a template refuses tools.
TEST(Server, ChatUsesTheModelsTemplate) {
    const std::string dir = si::test::scratch_dir();
    const std::string model = dir + "/llama3.gguf";
    si::test::write_llama3_chat_model(model, read_file(shared("templates/meta-llama-Llama-3.1-8B-Instruct.jinja")), 9906);
    Server s(dir, {"-m", model, "--alias", "l3"});
    const json chat = {{"model", "l3"}, {"messages", {{{"role", "user"}, {"content", "Hi"}}}}, {"max_tokens", 3}, {"temperature", 0}};
    Http h = post(dir, s, "/v1/chat/completions", chat.dump());
    ASSERT_EQ(h.status, 200) << h.body;
    EXPECT_EQ(h.j["choices"][0]["message"]["content"], "HelloHelloHello");
    // The prompt is the rendered template, tokenized with its special tokens (as the C API does it).
    si_model* m = nullptr;
    ASSERT_EQ(si_model_load(model.c_str(), nullptr, &m), SI_OK);
    char text[4096];
    size_t n = 0, k = 0;
    ASSERT_EQ(si_chat_apply_template(m, chat["messages"].dump().c_str(), nullptr, 1, text, sizeof text, &n), SI_OK);
    si_token ids[512];
    ASSERT_EQ(si_chat_tokenize(m, text, n, ids, 512, &k), SI_OK);
    si_model_free(m);
    EXPECT_NE(std::string(text, n).find("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"), std::string::npos);
    EXPECT_EQ(h.j["usage"]["prompt_tokens"], int(k)) << h.body;
    EXPECT_LT(k, 40u);  // special tokens parsed, not spelled out
    json with_tools = chat;
    with_tools["tools"] = json::parse(R"([{"type": "function", "function": {"name": "f", "parameters": {}}}])");
    h = post(dir, s, "/v1/chat/completions", with_tools.dump());
    EXPECT_EQ(h.status, 200) << h.body;
    EXPECT_GT(h.j["usage"]["prompt_tokens"].get<int>(), int(k) + 50) << h.body;  // the tool's JSON is in it
    json bad = chat;
    bad["messages"] = json::parse(R"([{"role": "user", "content": "x"}, {"role": "assistant", "content": null, "tool_calls": [
        {"function": {"name": "a", "arguments": {}}}, {"function": {"name": "b", "arguments": {}}}]}])");
    h = post(dir, s, "/v1/chat/completions", bad.dump());
    EXPECT_EQ(h.status, 400) << h.body;
    EXPECT_NE(h.body.find("This model only supports single tool-calls at once!"), std::string::npos) << h.body;
    s.stop();

    // stories260K has no template: the plain format, and no tools.
    Server plain(dir, {});
    const json t = {{"messages", {{{"role", "user"}, {"content", "Hi"}}}}, {"tools", with_tools["tools"]}, {"max_tokens", 2}};
    h = post(dir, plain, "/v1/chat/completions", t.dump());
    EXPECT_EQ(h.status, 400) << h.body;
    EXPECT_NE(h.body.find("chat template"), std::string::npos) << h.body;
}
