// The web chat at GET / in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven through
// the W3C WebDriver protocol loads the page from a running server, types a prompt and sends it; the streamed answer
// equals the API's greedy completion, the response's panel shows non-zero enclave and accelerator times, Stop ends
// a stream early, and an over-long prompt shows the server's own error message. Screenshots go to the test's
// scratch directory, and to $SI_SCREENSHOTS_DIR when set (docs/img holds the ones the docs show).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <httplib.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "secureinfer.h"
#include "server/server.h"
#include "server_testutil.h"
#include "testutil.h"

using json = nlohmann::json;
using si::test::LocalServer;
using si::test::shared;

namespace {

constexpr const char* kChromium = "/usr/bin/chromium";
constexpr const char* kDriver = "/usr/bin/chromedriver";

int free_port() {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t len = sizeof a;
    getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    close(fd);
    return ntohs(a.sin_port);
}

std::string base64_decode(const std::string& in) {
    auto val = [](char c) -> int {
        if (c >= 'A' && c <= 'Z') return c - 'A';
        if (c >= 'a' && c <= 'z') return c - 'a' + 26;
        if (c >= '0' && c <= '9') return c - '0' + 52;
        return c == '+' ? 62 : c == '/' ? 63 : -1;
    };
    std::string out;
    int bits = 0, acc = 0;
    for (char c : in) {
        const int v = val(c);
        if (v < 0) continue;
        acc = (acc << 6) | v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out.push_back(char((acc >> bits) & 0xFF));
        }
    }
    return out;
}

// chromedriver and one headless Chromium session, spoken to over WebDriver's HTTP API.
class Browser {
public:
    explicit Browser(const std::string& dir) : port_(free_port()), http_("127.0.0.1", port_) {
        http_.set_read_timeout(60, 0);
        const std::string log = dir + "/chromedriver.log";
        pid_ = fork();
        if (pid_ == 0) {
            const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
            dup2(fd, 1);
            dup2(fd, 2);
            const std::string p = "--port=" + std::to_string(port_);
            execl(kDriver, kDriver, p.c_str(), static_cast<char*>(nullptr));
            _exit(127);
        }
        for (int i = 0; i < 200; ++i) {
            if (auto r = http_.Get("/status"); r && r->status == 200) break;
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        const json caps = {{"capabilities",
                            {{"alwaysMatch",
                              {{"browserName", "chrome"},
                               {"goog:chromeOptions",
                                {{"binary", kChromium},
                                 {"args", {"--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                           "--window-size=1280,860", "--user-data-dir=" + dir + "/profile"}}}}}}}}};
        const json r = call("POST", "/session", caps);
        session_ = r["value"].value("sessionId", "");
        if (session_.empty()) ADD_FAILURE() << "no WebDriver session: " << r.dump() << "\n" << si::test::read_file(log);
    }
    ~Browser() {
        if (!session_.empty()) call("DELETE", "/session/" + session_, nullptr);
        if (pid_ > 0) {
            kill(pid_, SIGTERM);
            waitpid(pid_, nullptr, 0);
        }
    }
    bool ok() const { return !session_.empty(); }

    json call(const std::string& method, const std::string& path, const json& body) {
        httplib::Result r = method == "GET"      ? http_.Get(path.c_str())
                            : method == "DELETE" ? http_.Delete(path.c_str())
                                                 : http_.Post(path.c_str(), body.dump(), "application/json");
        if (!r) return json{{"value", {{"error", "no answer from chromedriver"}}}};
        return json::parse(r->body, nullptr, false);
    }
    json s(const std::string& method, const std::string& path, const json& body = json::object()) {
        const json r = call(method, "/session/" + session_ + path, body);
        if (r.is_object() && r["value"].is_object() && r["value"].contains("error"))
            ADD_FAILURE() << method << " " << path << ": " << r["value"].dump();
        return r.is_object() ? r["value"] : json();
    }
    void go(const std::string& url) { s("POST", "/url", {{"url", url}}); }
    json js(const std::string& script, const json& args = json::array()) {
        return s("POST", "/execute/sync", {{"script", script}, {"args", args}});
    }
    std::string element(const std::string& css) {
        const json e = s("POST", "/element", {{"using", "css selector"}, {"value", css}});
        return e.is_object() && !e.empty() ? e.begin().value().get<std::string>() : std::string();
    }
    void type(const std::string& css, const std::string& text) {
        const std::string e = element(css);
        s("POST", "/element/" + e + "/clear");
        s("POST", "/element/" + e + "/value", {{"text", text}});
    }
    void click(const std::string& css) { s("POST", "/element/" + element(css) + "/click"); }
    // Waits until the script returns true (at most `seconds`).
    bool wait_for(const std::string& script, double seconds = 60) {
        const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
        while (std::chrono::steady_clock::now() < end) {
            if (js(script) == true) return true;
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        return false;
    }
    void screenshot(const std::string& path) {
        const json v = s("GET", "/screenshot");
        if (v.is_string()) si::test::write_file(path, base64_decode(v.get<std::string>()));
    }

private:
    int port_;
    httplib::Client http_;
    pid_t pid_ = -1;
    std::string session_;
};

// The API's answer to a non-streamed chat request (status and parsed body).
std::pair<int, json> api_chat(const LocalServer& s, const json& body) {
    httplib::Client c("127.0.0.1", s.port());
    c.set_read_timeout(120, 0);
    auto r = c.Post("/v1/chat/completions", body.dump(), "application/json");
    if (!r) return {0, json()};
    return {r->status, json::parse(r->body, nullptr, false)};
}

void save_screenshot(Browser& b, const std::string& dir, const std::string& name) {
    b.screenshot(dir + "/" + name);
    if (const char* d = std::getenv("SI_SCREENSHOTS_DIR"); d && *d) {
        std::filesystem::create_directories(d);
        b.screenshot(std::string(d) + "/" + name);
    }
}

const char* kIdle = "return document.body.dataset.state === 'idle'";
const char* kLastAnswer = "const m = [...document.querySelectorAll('.msg.assistant')].pop(); "
                          "return m ? m.querySelector('.content').textContent : null";

}  // namespace

TEST(WebChat, StreamsTheGreedyCompletionShowsCostsAndErrors) {
    ASSERT_TRUE(std::filesystem::exists(kChromium) && std::filesystem::exists(kDriver))
        << "install Debian's chromium and chromium-driver (scripts/install-deps.sh)";
    const std::string dir = si::test::scratch_dir();
    LocalServer server;
    Browser b(dir);
    ASSERT_TRUE(b.ok());
    b.go(server.url());
    ASSERT_TRUE(b.wait_for(kIdle)) << "the page did not load";
    EXPECT_EQ(b.js("return document.title"), "secureinfer chat");
    // The protection panel comes from /v1/secureinfer/status: the worker, its measurement, the release.
    const std::string protection = b.js("return document.getElementById('protection').textContent");
    EXPECT_NE(protection.find("worker process"), std::string::npos) << protection;
    EXPECT_NE(protection.find("sampled tokens only"), std::string::npos) << protection;
    httplib::Client c("127.0.0.1", server.port());
    const json status = json::parse(c.Get("/v1/secureinfer/status")->body);
    EXPECT_NE(protection.find(status["enclave"]["measurement"].get<std::string>()), std::string::npos) << protection;

    // A greedy chat turn, typed and sent as a user would.
    const std::string prompt = "Tell me a story about a dog";
    const int n = 40;
    b.type("#temperature", "0");
    b.type("#max_tokens", std::to_string(n));
    b.type("#prompt", prompt);
    b.click("#send");
    ASSERT_TRUE(b.wait_for("return document.body.dataset.state === 'busy'", 10) || b.wait_for(kIdle, 1));
    ASSERT_TRUE(b.wait_for(kIdle)) << "no answer";
    const json shown = b.js(kLastAnswer);
    const auto [st, api] = api_chat(server, {{"messages", {{{"role", "user"}, {"content", prompt}}}},
                                             {"temperature", 0}, {"max_tokens", n}});
    ASSERT_EQ(st, 200) << api.dump();
    const std::string expected = api["choices"][0]["message"]["content"];
    ASSERT_FALSE(expected.empty());
    EXPECT_EQ(shown, expected);
    const json panel = b.js("const p = [...document.querySelectorAll('.msg.assistant .panel')].pop(); "
                            "return {enclave: +p.dataset.enclaveSeconds, accelerator: +p.dataset.acceleratorSeconds, "
                            "crossings: +p.dataset.crossings, tokens: +p.dataset.tokens, text: p.textContent}");
    EXPECT_GT(panel["enclave"].get<double>(), 0.0) << panel.dump();
    EXPECT_GT(panel["accelerator"].get<double>(), 0.0) << panel.dump();
    EXPECT_GT(panel["crossings"].get<double>(), 0.0) << panel.dump();
    EXPECT_EQ(panel["tokens"], api["usage"]["completion_tokens"]) << panel.dump();
    EXPECT_NE(panel["text"].get<std::string>().find("tok/s"), std::string::npos) << panel.dump();
    EXPECT_EQ(b.js("return document.getElementById('error').hidden"), true);
    save_screenshot(b, dir, "web-chat.png");

    // Stop: a long greedy stream ends early; what was shown is a prefix of the full answer.
    b.click("#clear");
    b.type("#max_tokens", "400");
    b.type("#prompt", "Once upon a time");
    // Stop is pressed as soon as the first text shows (from the page itself: a round trip through the driver
    // could come after a 400-token stream of this small model has ended). The page's fetch is wrapped so that the
    // stream reaches it one server-sent event every 30 ms (this model can finish its whole answer inside one network
    // read), and so that Stop's abort ends that paced stream as it ends a real one.
    b.js("const real = window.fetch;"
         "window.fetch = async (url, init) => {"
         "  const r = await real(url, init);"
         "  if (!String(url).includes('chat/completions') || !r.body) return r;"
         "  const src = r.body.getReader(), dec = new TextDecoder(), enc = new TextEncoder();"
         "  let buf = '', ended = false;"
         "  const body = new ReadableStream({ start(c) {"
         "    init.signal.addEventListener('abort', () => { ended = true; c.error(new DOMException('stopped', 'AbortError')); });"
         "    (async () => {"
         "      for (;;) {"
         "        const { value, done } = await src.read().catch(() => ({ done: true }));"
         "        if (!done) buf += dec.decode(value, { stream: true });"
         "        let i;"
         "        while ((i = buf.indexOf('\\n\\n')) >= 0 && !ended) {"
         "          c.enqueue(enc.encode(buf.slice(0, i + 2))); buf = buf.slice(i + 2);"
         "          await new Promise(res => setTimeout(res, 30));"
         "        }"
         "        if (done || ended) break;"
         "      }"
         "      if (!ended) { if (buf) c.enqueue(enc.encode(buf)); c.close(); }"
         "    })();"
         "  } });"
         "  return new Response(body, { status: r.status, headers: r.headers });"
         "};");
    b.js("const box = document.getElementById('messages');"
         "new MutationObserver((_, obs) => {"
         "  const m = [...box.querySelectorAll('.msg.assistant .content')].pop();"
         "  if (m && m.textContent.length > 0) { obs.disconnect(); document.getElementById('stop').click(); }"
         "}).observe(box, {childList: true, subtree: true, characterData: true});");
    b.click("#send");
    ASSERT_TRUE(b.wait_for("return !!document.querySelector('.msg.assistant[data-finish]')", 60));
    ASSERT_TRUE(b.wait_for(kIdle));
    const std::string partial = b.js(kLastAnswer);
    EXPECT_EQ(b.js("return [...document.querySelectorAll('.msg.assistant')].pop().dataset.finish"), "stopped");
    const auto [st2, full] = api_chat(server, {{"messages", {{{"role", "user"}, {"content", "Once upon a time"}}}},
                                               {"temperature", 0}, {"max_tokens", 400}});
    ASSERT_EQ(st2, 200);
    const std::string all = full["choices"][0]["message"]["content"];
    EXPECT_EQ(all.rfind(partial, 0), 0u) << "shown: " << partial;
    EXPECT_LT(partial.size(), all.size()) << "the stream was not stopped early";

    // An over-long prompt: the page shows the server's own message.
    b.click("#clear");
    b.type("#max_tokens", "16");
    std::string long_prompt;
    for (int i = 0; i < 700; ++i) long_prompt += "word ";
    b.js("document.getElementById('prompt').value = arguments[0]", {long_prompt});
    b.click("#send");
    ASSERT_TRUE(b.wait_for("return !document.getElementById('error').hidden", 30));
    ASSERT_TRUE(b.wait_for(kIdle));
    const auto [st3, err] = api_chat(server, {{"messages", {{{"role", "user"}, {"content", long_prompt}}}},
                                              {"temperature", 0}, {"max_tokens", 16}});
    EXPECT_EQ(st3, 400);
    const std::string message = err["error"]["message"];
    EXPECT_NE(message.find("maximum context length"), std::string::npos) << message;
    EXPECT_EQ(b.js("return document.getElementById('error').textContent"), message);
    EXPECT_EQ(b.js("return document.querySelectorAll('.msg.assistant').length"), 0);
    b.js("window.scrollTo(0, 0)");
    save_screenshot(b, dir, "web-chat-error.png");
}
