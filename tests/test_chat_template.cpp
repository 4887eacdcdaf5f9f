// Chat templates: the Jinja-subset engine (src/chat) against python3-jinja2 rendering the same template on the same
// variables (tests/chat_template_reference.py, run at test time): every template in ../shared/templates on fixed and
// random conversations, feature snippets, and randomly generated templates. Outputs must be byte-identical, or both
// sides must raise the same raise_exception message. Also: errors naming the construct and line, the fallback
// formats, and the render limits.
#include <filesystem>
#include <random>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "chat/chat_template.h"
#include "chat/jinja.h"
#include "testutil.h"

using namespace si;
using namespace si::chat;
using ojson = nlohmann::ordered_json;

namespace {

struct Case {
    std::string label;
    std::string tmpl;
    ojson vars;
    std::optional<int64_t> now;
};

struct Outcome {
    enum Kind { ok, raised, error } kind;
    std::string text;
};

// Renders every case with python3-jinja2; the script lives beside this file.
std::vector<Outcome> reference(const std::vector<Case>& cases) {
    const std::string dir = test::scratch_dir();
    ojson in = ojson::array();
    for (const Case& c : cases) in.push_back({{"template", c.tmpl}, {"vars", c.vars}, {"now", c.now ? ojson(*c.now) : ojson(nullptr)}});
    test::write_file(dir + "/cases.json", in.dump());
    const std::string script = std::string(SI_SOURCE_DIR) + "/tests/chat_template_reference.py";
    const test::CliResult r = test::run_program({"/usr/bin/env", "python3", script, dir + "/cases.json", dir + "/results.json"});
    EXPECT_EQ(r.exit_code, 0) << "the reference renderer failed (python3-jinja2 is needed: scripts/install-deps.sh)\n" << r.err;
    std::vector<Outcome> out;
    if (r.exit_code != 0) return out;
    const ojson res = ojson::parse(test::read_file(dir + "/results.json"));
    for (const ojson& x : res) {
        if (x.contains("ok")) out.push_back({Outcome::ok, x["ok"].get<std::string>()});
        else if (x.contains("raise")) out.push_back({Outcome::raised, x["raise"].get<std::string>()});
        else out.push_back({Outcome::error, x["error"].get<std::string>()});
    }
    EXPECT_EQ(out.size(), cases.size());
    return out;
}

Outcome ours(const Case& c) {
    try {
        const Template t(c.tmpl);
        const Value v = from_json(c.vars.dump());
        return {Outcome::ok, t.render(*v.dict, c.now ? std::optional<std::time_t>(std::time_t(*c.now)) : std::nullopt)};
    } catch (const TemplateError& e) {
        if (e.kind() == TemplateError::Kind::raised) return {Outcome::raised, e.detail()};
        return {Outcome::error, e.what()};
    }
}

struct Tally {
    int identical = 0, same_raise = 0, both_error = 0, mismatched = 0;
};

std::string show(const Outcome& o) {
    const char* k[] = {"output", "raise_exception", "error"};
    return std::string(k[o.kind]) + ": [" + o.text + "]";
}

// Compares every case; returns the tally (mismatches are test failures).
Tally compare(const std::vector<Case>& cases, bool allow_errors) {
    Tally t;
    const std::vector<Outcome> ref = reference(cases);
    if (ref.size() != cases.size()) {
        ADD_FAILURE() << "no reference results";
        return t;
    }
    for (size_t i = 0; i < cases.size(); ++i) {
        const Outcome got = ours(cases[i]);
        const Outcome& want = ref[i];
        if (got.kind == want.kind && got.kind != Outcome::error && got.text == want.text) {
            (got.kind == Outcome::ok ? t.identical : t.same_raise)++;
        } else if (got.kind == Outcome::error && want.kind == Outcome::error) {
            t.both_error++;
            if (allow_errors) std::printf("  both failed: %s: %s\n", cases[i].label.c_str(), want.text.substr(0, 120).c_str());
            if (!allow_errors) ADD_FAILURE() << cases[i].label << ": both failed: ours " << got.text << " / jinja2 " << want.text;
        } else {
            t.mismatched++;
            ADD_FAILURE() << cases[i].label << "\n  template: " << cases[i].tmpl.substr(0, 2000) << "\n  vars: " << cases[i].vars.dump()
                          << "\n  jinja2: " << show(want) << "\n  ours:   " << show(got);
        }
    }
    return t;
}

std::vector<std::pair<std::string, std::string>> shared_templates() {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& e : std::filesystem::directory_iterator(test::shared("templates")))
        if (e.path().extension() == ".jinja") out.emplace_back(e.path().filename().string(), test::read_file(e.path().string()));
    std::sort(out.begin(), out.end());
    return out;
}

ojson msg(const std::string& role, const ojson& content) { return {{"role", role}, {"content", content}}; }

ojson tools() {
    return ojson::parse(R"([{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}])");
}

ojson tool_call_turns() {
    return ojson::parse(R"([{"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call12345", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "tool_call_id": "call12345", "content": "{\"temperature\": 21.5, \"sky\": \"clear\"}"},
        {"role": "assistant", "content": "It is 21.5 °C and clear in Paris."},
        {"role": "user", "content": "Thanks!"}])");
}

// The fixed conversations every template is rendered on (20).
std::vector<std::pair<std::string, ojson>> conversations() {
    const ojson base = {{"bos_token", "<s>"}, {"eos_token", "</s>"}};
    std::vector<std::pair<std::string, ojson>> v;
    const auto add = [&](const std::string& name, ojson messages, bool gen, ojson extra = ojson::object()) {
        ojson vars = base;
        vars["messages"] = std::move(messages);
        vars["add_generation_prompt"] = gen;
        for (auto& [k, x] : extra.items()) vars[k] = x;
        v.emplace_back(name, std::move(vars));
    };
    const ojson sys = msg("system", "You are a concise assistant.");
    const ojson u1 = msg("user", "What is the capital of France?"), a1 = msg("assistant", "Paris."),
                u2 = msg("user", "And of Italy?"), a2 = msg("assistant", "Rome."), u3 = msg("user", "Spain?");
    add("user", {u1}, true);
    add("user, no generation prompt", {u1}, false);
    add("system+user", {sys, u1}, true);
    add("system+user+assistant", {sys, u1, a1}, false);
    add("system, two user turns", {sys, u1, a1, u2}, true);
    add("multi-turn", {u1, a1, u2, a2, u3}, true);
    add("user+assistant", {u1, a1}, false);
    add("system only", {sys}, true);
    add("no messages", ojson::array(), true);
    add("whitespace to trim", {msg("system", "  \n spaced system \t"), msg("user", "\n\n  padded question  \n")}, true);
    add("unicode", {msg("user", "Grüße, 你好, llama 🦙, emoji 😶‍🌫️ and \u00a0nbsp")}, true);
    add("reasoning in the answer", {u1, msg("assistant", "<think>\nrecall geography\n</think>\n\nParis."), u2}, true);
    add("thinking switched off in the system prompt", {msg("system", "Be brief. /no_think"), u1}, true);
    add("tools offered", {sys, u1}, true, {{"tools", tools()}});
    add("tool call and result", tool_call_turns(), true, {{"tools", tools()}});
    add("roles not alternating", {u1, u2}, true);
    add("assistant first", {a1, u1}, true);
    add("template variables", {sys, u1}, true, {{"enable_thinking", false}, {"date_string", "01 Jan 2025"}});
    add("quotes, braces, backslashes", {msg("user", "Say \"hi\" {{ not a tag }} {% neither %} \\n and 'quotes'")}, true);
    ojson longconv = ojson::array({sys});
    for (int i = 0; i < 8; ++i) {
        longconv.push_back(msg("user", "question " + std::to_string(i)));
        longconv.push_back(msg("assistant", "answer " + std::to_string(i)));
    }
    longconv.push_back(msg("user", "last question"));
    add("long conversation", longconv, true);
    return v;
}

}  // namespace

TEST(ChatTemplate, SharedTemplatesMatchJinja2) {
    const auto templates = shared_templates();
    ASSERT_EQ(templates.size(), 8u);
    std::vector<Case> cases;
    for (const auto& [name, src] : templates)
        for (const auto& [conv, vars] : conversations()) cases.push_back({name + " / " + conv, src, vars, std::nullopt});
    // Llama 3.2 prints today's date through strftime_now when the host defines it.
    for (const auto& [name, src] : templates)
        if (name.find("Llama-3.2") != std::string::npos)
            cases.push_back({name + " / strftime_now", src, conversations()[2].second, int64_t(1767225600)});
    const Tally t = compare(cases, true);
    std::printf("shared templates: %zu renders: %d byte-identical, %d identical raise_exception, %d both failed, %d mismatched\n",
                cases.size(), t.identical, t.same_raise, t.both_error, t.mismatched);
    EXPECT_EQ(t.mismatched, 0);
    EXPECT_GE(t.identical, 139);
    EXPECT_GE(t.same_raise, 10);
}
