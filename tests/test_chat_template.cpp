// Chat templates: the Jinja-subset engine (src/chat) against python3-jinja2 rendering the same template on the same
// variables (tests/chat_template_reference.py, run at test time): every template in ../shared/templates on fixed and
// random conversations, feature snippets, and randomly generated templates. Outputs must be byte-identical, or both
// sides must raise the same raise_exception message. Also: errors naming the construct and line, the fallback
// formats, and the render limits.
#include <cstdlib>
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

ChatOptions no_generation_prompt() {
    ChatOptions o;
    o.add_generation_prompt = false;
    return o;
}

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

namespace {

// Random conversations: roles mostly alternating (sometimes not), contents from fragments with whitespace, quotes,
// Unicode and template-like text.
ojson random_conversation(std::mt19937& rng) {
    static const char* const frags[] = {"hello", " world", "  ", "\n", "\n\n", "\t", "What's up?", "\"quoted\"", "{{ x }}",
                                        "{% if %}", "\\", "naïve café", "日本語", "🦙", "x", "</think>", "<think>", "/no_think",
                                        "[INST]", "1234", " trailing ", "-", "'", "<|eot_id|>"};
    const auto text = [&] {
        std::string s;
        for (int k = int(rng() % 5); k >= 0; --k) s += frags[rng() % std::size(frags)];
        return s;
    };
    ojson m = ojson::array();
    if (rng() % 3 == 0) m.push_back(msg("system", text()));
    const int turns = 1 + int(rng() % 6);
    bool user = rng() % 8 != 0;
    for (int t = 0; t < turns; ++t) {
        m.push_back(msg(user ? "user" : "assistant", text()));
        user = rng() % 10 == 0 ? user : !user;  // now and then two turns of one role
    }
    return m;
}

// ---- random templates ---------------------------------------------------------------------------------------------

class TemplateGen {
public:
    explicit TemplateGen(uint32_t seed) : rng_(seed) {}

    std::string make() {
        std::string t;
        if (pick(2)) t += "{% set ns = namespace(count=0, text='') %}";
        if (pick(2)) t += "{% macro wrap(x, y='>') %}{{ y }}{{ x }}{{ y }}{% endmacro %}";
        has_ns_ = t.find("namespace") != std::string::npos;
        has_macro_ = t.find("macro") != std::string::npos;
        t += block(3);
        if (has_ns_) t += "[{{ ns.count }}|{{ ns.text }}]";
        return t;
    }

private:
    bool pick(int n) { return rng_() % uint32_t(n) == 0; }
    template <size_t N>
    const char* one(const char* const (&a)[N]) { return a[rng_() % N]; }

    std::string open(const char* k) {  // "{%", "{%-", "{%+"
        static const char* const m[] = {"", "", "", "-", "+"};
        return std::string("{") + k + one(m) + " ";
    }
    std::string close(const char* k) {
        static const char* const m[] = {"", "", "", "-", "+"};
        std::string s = one(m);
        if (std::string(k) == "}" && s == "+") s = "";
        return " " + s + k + "}";
    }
    std::string text() {
        static const char* const t[] = {"Hello", " ", "\n", "  ", "\n  ", "\t", "x\n", "  \n\n", ", ", "é€🦙", "<|im_start|>", "'\"", "a b"};
        return t[rng_() % std::size(t)];
    }
    std::string indent() {
        static const char* const t[] = {"", "", "\n", "\n    ", "  ", "\n\t"};
        return t[rng_() % std::size(t)];
    }

    std::string str_lit() {
        static const char* const l[] = {"'a'", "\"b c\"", "'\\n'", "'it\\'s'", "\"tab\\there\"", "'é'", "''", "'  pad  '",
                                        "'A-b_c'", "'\\u00e9\\x41'", "'Hello World'", "'x,y,z'"};
        return one(l);
    }
    std::string int_e(int d) {
        if (d <= 0 || pick(3)) {
            static const char* const l[] = {"0", "1", "2", "7", "-3", "n", "items|length", "s|length", "messages|length", "42"};
            return in_loop_ && pick(4) ? "loop.index" : one(l);
        }
        switch (rng_() % 9) {
            case 0: return "(" + int_e(d - 1) + " + " + int_e(d - 1) + ")";
            case 1: return "(" + int_e(d - 1) + " * " + int_e(d - 1) + ")";
            case 2: return "(" + int_e(d - 1) + " - " + int_e(d - 1) + ")";
            case 3: return "(" + int_e(d - 1) + " // 3)";
            case 4: return "(" + int_e(d - 1) + " % 4)";
            case 5: return "items|sum";
            case 6: return "(" + str_e(d - 1) + ")|length";
            case 7: return "items[" + std::to_string(int(rng_() % 7) - 3) + "]";
            default: return "-" + int_e(d - 1);
        }
    }
    std::string num_e(int d) {
        static const char* const l[] = {"f", "(n / 4)", "(f * 2)", "(f|round(1))", "0.1", "1e20", "(1 / 3)", "(2 ** 10)", "(n / 2)", "1.5e-7"};
        return d > 0 && pick(3) ? "(" + num_e(d - 1) + " + " + int_e(d - 1) + ")" : one(l);
    }
    std::string bool_e(int d) {
        if (d <= 0 || pick(3)) {
            static const char* const l[] = {"flag", "true", "false", "s is string", "n is number", "nope is defined",
                                            "nope is undefined", "n is odd", "'a' in s", "d is mapping", "items is iterable",
                                            "s.startswith('H')", "none is none", "messages"};
            if (in_loop_ && pick(3)) return pick(2) ? "m.role == 'user'" : "loop.first";
            return one(l);
        }
        switch (rng_() % 6) {
            case 0: return "not " + bool_e(d - 1);
            case 1: return "(" + bool_e(d - 1) + " and " + bool_e(d - 1) + ")";
            case 2: return "(" + bool_e(d - 1) + " or " + bool_e(d - 1) + ")";
            case 3: return int_e(d - 1) + " > " + int_e(d - 1);
            case 4: return str_e(d - 1) + " == " + str_e(d - 1);
            default: return int_e(d - 1) + " is divisibleby 3";
        }
    }
    std::string str_e(int d) {
        if (d <= 0 || pick(4)) {
            if (in_loop_ && pick(3)) return pick(2) ? "m.content" : "m['role']";
            if (pick(2)) return str_lit();
            static const char* const l[] = {"s", "(messages|last).content", "messages[0]['role']", "v1"};
            const std::string x = one(l);
            return x == "v1" && !has_v1_ ? "s" : x;
        }
        switch (rng_() % 22) {
            case 0: return str_e(d - 1) + " + " + str_e(d - 1);
            case 1: return str_e(d - 1) + " ~ " + int_e(d - 1);
            case 2: return "(" + str_e(d - 1) + ")|trim";
            case 3: return "(" + str_e(d - 1) + ")|upper";
            case 4: return "(" + str_e(d - 1) + ")|title";
            case 5: return "(" + str_e(d - 1) + ")|replace('a', 'AA')";
            case 6: return "(" + str_e(d - 1) + ").strip()";
            case 7: return "(" + str_e(d - 1) + ").rstrip(' x')";
            case 8: return "(" + str_e(d - 1) + ")[" + std::to_string(int(rng_() % 5) - 2) + ":" + std::to_string(int(rng_() % 7) - 2) + "]";
            case 9: return "items|join(', ')";
            case 10: return "messages|map(attribute='role')|join('|')";
            case 11: return "(messages|selectattr('role', 'equalto', 'user')|list|length)|string";
            case 12: {
                static const char* const j[] = {"d", "items", "messages", "s", "f", "[1, 'a', none, true]", "{'k': [1, 2.5]}"};
                return std::string(one(j)) + "|tojson" + (pick(3) ? "(indent=2)" : "");
            }
            case 13: return "('yes' if " + bool_e(d - 1) + " else 'no')";
            case 14: return "(" + str_e(d - 1) + ") * " + std::to_string(rng_() % 3);
            case 15: return "s.split(' ')|join('_')";
            case 16: return num_e(d - 1) + "|string";
            case 17: return "(" + str_e(d - 1) + ")|capitalize";
            case 18: return has_macro_ ? "wrap(" + str_e(d - 1) + (pick(2) ? ", y='*')" : ")") : "s";
            case 19: return "d|items|list|string";
            case 20: return "(" + str_e(d - 1) + ").split(',')|first";
            default: return "(" + str_e(d - 1) + ")|default('dflt')";
        }
    }
    std::string any_e(int d) {
        switch (rng_() % 7) {
            case 0: return int_e(d);
            case 1: return num_e(d);
            case 2: return bool_e(d);
            case 3: return pick(2) ? "items" : "d";
            case 4: return "messages[0]";
            default: return str_e(d);
        }
    }

    std::string block(int d) {
        std::string out;
        const int n = 1 + int(rng_() % 4);
        for (int k = 0; k < n; ++k) out += statement(d);
        return out;
    }
    std::string statement(int d) {
        const int choice = d <= 0 ? int(rng_() % 3) : int(rng_() % 11);
        switch (choice) {
            case 0: return text();
            case 1:
            case 2: return indent() + open("{") + any_e(2) + close("}");
            case 3: {
                std::string s = indent() + open("%") + "if " + bool_e(2) + close("%") + block(d - 1);
                if (pick(2)) s += indent() + open("%") + "elif " + bool_e(2) + close("%") + block(d - 1);
                if (pick(2)) s += indent() + open("%") + "else" + close("%") + block(d - 1);
                return s + indent() + open("%") + "endif" + close("%");
            }
            case 4:
            case 5: {
                if (in_loop_) return text();
                std::string s = indent() + open("%") + "for m in messages" + (pick(3) ? " if m.role != 'system'" : "") + close("%");
                in_loop_ = true;
                s += block(d - 1);
                if (pick(4)) s += open("%") + "if loop.index > 2" + close("%") + open("%") + (pick(2) ? "break" : "continue") + close("%") + open("%") + "endif" + close("%");
                if (has_ns_) s += "{% set ns.count = ns.count + 1 %}{% set ns.text = ns.text + m.role[:1] %}";
                s += "{{ loop.index0 }}{{ '/' if not loop.last }}";
                in_loop_ = false;
                if (pick(4)) s += open("%") + "else" + close("%") + "empty";
                return s + indent() + open("%") + "endfor" + close("%");
            }
            case 6: {
                if (in_loop_) return text();
                return open("%") + (pick(2) ? "for k, v in d.items()" : "for k, v in d|items") + close("%") + "{{ k }}={{ v }};" + open("%") + "endfor" + close("%");
            }
            case 7: {
                has_v1_ = true;
                return indent() + open("%") + "set v1 = " + str_e(2) + close("%");
            }
            case 8: return open("#") + "comment {{ not evaluated }}" + close("#");
            case 9: return "{% set blk %}" + block(d - 1) + "{% endset %}{{ blk|trim|length }}";
            default: return "{% raw %}{{ raw }}{% endraw %}" + text();
        }
    }

    std::mt19937 rng_;
    bool in_loop_ = false, has_ns_ = false, has_macro_ = false, has_v1_ = false;
};

ojson random_vars(std::mt19937& rng) {
    ojson v = {{"s", rng() % 2 ? "Hello World" : "  alpha, beta ,gamma  "},
               {"n", int(rng() % 50) - 10},
               {"f", rng() % 2 ? 2.5 : 0.1},
               {"flag", rng() % 2 == 0},
               {"items", ojson::array({3, 1, 4, 1, 5})},
               {"d", {{"name", "x"}, {"vals", ojson::array({1, 2})}, {"nested", {{"k", nullptr}}}}}};
    v["messages"] = random_conversation(rng);
    return v;
}

}  // namespace

TEST(ChatTemplate, SharedTemplatesOnRandomConversations) {
    std::mt19937 rng(20250101);
    std::vector<Case> cases;
    for (const auto& [name, src] : shared_templates()) {
        for (int k = 0; k < 25; ++k) {
            ojson vars = {{"bos_token", "<|begin_of_text|>"}, {"eos_token", "<|eot_id|>"}};
            vars["messages"] = random_conversation(rng);
            vars["add_generation_prompt"] = rng() % 2 == 0;
            if (rng() % 4 == 0) vars["tools"] = tools();
            cases.push_back({name + " / random " + std::to_string(k), src, vars, std::nullopt});
        }
    }
    const Tally t = compare(cases, false);
    std::printf("random conversations: %zu renders: %d byte-identical, %d identical raise_exception, %d mismatched\n",
                cases.size(), t.identical, t.same_raise, t.mismatched);
    EXPECT_EQ(t.mismatched, 0);
    EXPECT_GE(t.identical, 150);
}

TEST(ChatTemplate, RandomTemplatesMatchJinja2) {
    // SI_CHAT_RANDOM_TEMPLATES=N (and SI_CHAT_RANDOM_SEED) run more of them, for a longer search.
    const char* n_env = std::getenv("SI_CHAT_RANDOM_TEMPLATES");
    const char* seed_env = std::getenv("SI_CHAT_RANDOM_SEED");
    const uint32_t n = n_env ? uint32_t(std::atoi(n_env)) : 400u, first = seed_env ? uint32_t(std::atoi(seed_env)) : 1000u;
    std::mt19937 rng(4242 + first - 1000);
    std::vector<Case> cases;
    for (uint32_t k = 0; k < n; ++k) {
        TemplateGen gen(first + k);
        cases.push_back({"random template " + std::to_string(k), gen.make(), random_vars(rng), std::nullopt});
    }
    const Tally t = compare(cases, true);
    std::printf("random templates: %zu: %d byte-identical, %d both failed, %d mismatched\n", cases.size(), t.identical,
                t.both_error, t.mismatched);
    EXPECT_EQ(t.mismatched, 0);
    EXPECT_GE(t.identical, int(n) * 9 / 10);  // most generated templates render
}

TEST(ChatTemplate, FeatureSnippetsMatchJinja2) {
    const ojson vars = {{"s", "Hello World"}, {"n", 7}, {"f", 2.5}, {"items", ojson::array({3, 1, 2})},
                        {"words", ojson::array({"b", "A", "c"})},
                        {"d", {{"b", 1}, {"a", ojson::array({1, "x", nullptr, true, 1.5})}}},
                        {"msgs", ojson::array({msg("user", "hi"), msg("assistant", "yo"), msg("user", "bye")})},
                        {"uni", "Grüße 🦙 \u200d\u00a0x"}};
    const char* const snippets[] = {
        "{{ 1 }}|{{ 1.0 }}|{{ 0.1 + 0.2 }}|{{ 1e16 }}|{{ 1.5e-5 }}|{{ 0.0001 }}|{{ -0.0 }}|{{ 10 / 4 }}|{{ 7 // 2 }}|{{ -7 // 2 }}|{{ -7 % 3 }}|{{ 2 ** 62 }}",
        "{{ none }}|{{ true }}|{{ False }}|{{ [1, 'a', none] }}|{{ {'k': 'v', 'n': [1.0]} }}|{{ d }}|{{ uni }}|{{ [uni] }}",
        "{{ \"it's\" }}|{{ ['it\\'s', \"q\\\"q\", 'back\\\\slash', 'tab\\t'] }}",
        "{{ d|tojson }}|{{ d|tojson(indent=2) }}|{{ msgs|tojson(indent=4) }}|{{ [] | tojson(indent=2) }}|{{ {}|tojson }}|{{ uni|tojson }}|{{ 'ctl\\x01\\x7f'|tojson }}",
        "{{ s[1:4] }}|{{ s[-3:] }}|{{ s[::-1] }}|{{ s[::2] }}|{{ items[1:] }}|{{ items[:-1] }}|{{ uni[2:8] }}|{{ uni|length }}|{{ s[100:] }}",
        "{{ s|upper }}|{{ s|lower }}|{{ 'hello wORLD-x(y'|title }}|{{ 'hELLO'|capitalize }}|{{ '  x  '|trim }}|{{ 'xxhixx'|trim('x') }}|{{ s|replace('o', '0') }}|{{ s|replace('o', '', 1) }}",
        "{{ s.split() }}|{{ 'a,b,,c'.split(',') }}|{{ 'a b c'.split(' ', 1) }}|{{ '  lead'.lstrip() }}|{{ 'trail  '.rstrip() }}|{{ s.startswith('Hell') }}|{{ s.endswith(('x', 'ld')) }}|{{ s.find('o') }}|{{ s.count('l') }}",
        "{{ '-'.join(words) }}|{{ words|join }}|{{ words|sort }}|{{ words|sort(case_sensitive=true) }}|{{ items|sort(reverse=true) }}|{{ items|sum }}|{{ items|min }}|{{ items|max }}|{{ words|first }}|{{ words|last }}|{{ [1, 1, 2]|unique|list }}",
        "{{ msgs|selectattr('role', 'equalto', 'user')|map(attribute='content')|join(',') }}|{{ msgs|rejectattr('role', 'eq', 'user')|list|length }}|{{ items|select('odd')|list }}|{{ items|reject('gt', 1)|list }}|{{ msgs|map(attribute='role')|list }}",
        "{{ d|items|list }}|{% for k, v in d.items() %}{{ k }}:{{ v }};{% endfor %}|{{ d.keys()|list }}|{{ d.get('b') }}|{{ d.get('zz', 'def') }}|{{ d['a'][1] }}|{{ d.a.1 }}",
        "{% for m in msgs %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.previtem.role if loop.previtem is defined }}{{ loop.cycle('o', 'e') }} {% endfor %}",
        "{% for x in items if x > 1 %}{{ x }}{{ loop.length }}{% else %}none{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}",
        "{% for x in items %}{% if x == 1 %}{% continue %}{% endif %}{{ x }}{% if x == 2 %}{% break %}{% endif %}{% endfor %}",
        "{% set a, b = 1, 2 %}{{ a }}{{ b }}|{% set t = (1, 2) %}{{ t|length }}|{% set x = 5 %}{% for i in [1] %}{% set x = 9 %}{{ x }}{% endfor %}{{ x }}",
        "{% set ns = namespace(total=0, names='') %}{% for m in msgs %}{% set ns.total = ns.total + 1 %}{% set ns.names = ns.names ~ m.role %}{% endfor %}{{ ns.total }} {{ ns.names }}",
        "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('a') }} {{ greet('b', '?') }} {{ greet(name='c', punct='.') }}",
        "{% set body %}  inner {{ n }}  {% endset %}[{{ body }}]|{% filter upper %}shout {{ s }}{% endfilter %}",
        "{{ 'a' if n > 5 else 'b' }}|{{ 'c' if n > 50 }}|{{ n > 5 and 'yes' or 'no' }}|{{ not n }}|{{ 1 < n < 10 }}|{{ 'W' in s }}|{{ 'z' not in s }}|{{ 3 in items }}|{{ 'a' in d }}",
        "{{ n is odd }}{{ n is even }}{{ n is divisibleby(7) }}{{ s is string }}{{ d is mapping }}{{ items is sequence }}{{ none is none }}{{ n is number }}{{ f is float }}{{ n is integer }}{{ true is boolean }}{{ nope is defined }}{{ s is not none }}{{ n is gt(3) }}{{ s is lower }}",
        "{{ nope }}|{{ nope|default('dflt') }}|{{ ''|default('empty', true) }}|{{ nope is undefined }}|{{ nope|length }}|{% for x in nope %}x{% endfor %}|{{ d.missing }}|{{ msgs[10] }}",
        "{{ '3'|int + 1 }}|{{ '2.5'|float }}|{{ 'x'|int }}|{{ 3.9|int }}|{{ n|string + '!' }}|{{ -3|abs }}|{{ 2.567|round(2) }}|{{ 2.5|round }}|{{ [1, 2]|list }}|{{ 'ab'|list }}|{{ 'abc'|reverse }}|{{ items|reverse|list }}",
        "{{ range(3)|list }}|{{ range(1, 10, 3)|list }}|{{ 'ab' * 3 }}|{{ [0] * 3 }}|{{ items + [9] }}|{{ 'x' ~ 1 ~ none }}|{{ (1, 2) }}",
        "{{ '<a href=\"x\">&</a>'|e }}|{{ 'line1\\nline2\\n\\nline4'|indent(2) }}|{{ 'a\\nb'|indent(2, true) }}|{{ 'one two  three'|wordcount }}|{{ d|dictsort }}",
        "  {% if true %}\n  kept\n  {% endif %}\n{%- if true %}  x  {%+ endif %}|{%- raw %} {{ raw }} {% endraw %}|{# c #}\n  {#- c2 -#}  after",
        "line1\n    {%- for x in items -%}\n    {{ x }}\n    {%- endfor -%}\n  end\n{{ n -}}\n   {{- n }}\n",
        "{{ raise_exception('custom failure ' ~ n) }}",
        "{% if msgs[0].role != 'system' %}{{ raise_exception('System role missing') }}{% endif %}",
        "{{ s.title() }}|{{ 'hello'.capitalize() }}|{{ 'a-b'.replace('-', '+') }}|{{ 'x'.isalpha() }}{{ '12'.isdigit() }}|{{ 'A1'.islower() }}|{{ 'ab\\ncd'.splitlines() }}",
        "{{ {'a': 1}.items()|list }}|{{ ({'z': 1, 'a': 2}|dictsort)[0] }}|{{ msgs|map('length')|list }}|{{ words|map('upper')|join }}",
        "{% with a = 3, b = 'x' %}{{ a }}{{ b }}{% endwith %}|{{ a is defined }}",
    };
    std::vector<Case> cases;
    for (const char* s : snippets) cases.push_back({std::string("snippet: ") + s, s, vars, std::nullopt});
    const Tally t = compare(cases, false);
    EXPECT_EQ(t.mismatched, 0);
    EXPECT_EQ(t.same_raise, 2);
    EXPECT_EQ(t.identical, int(std::size(snippets)) - 2);
}

// ---- errors, fallback, limits --------------------------------------------------------------------------------------

namespace {

std::string error_of(const std::string& src, const ojson& vars = ojson::object()) {
    try {
        const Template t(src);
        t.render(*from_json(vars.dump()).dict);
    } catch (const TemplateError& e) {
        return e.what();
    }
    return "(no error)";
}

}  // namespace

TEST(ChatTemplate, ErrorsNameTheConstructAndLine) {
    const auto has = [](const std::string& msg, const std::string& part) { return msg.find(part) != std::string::npos; };
    std::string e = error_of("hello\n{% include 'other.jinja' %}");
    EXPECT_TRUE(has(e, "line 2") && has(e, "unsupported construct '{% include %}'")) << e;
    e = error_of("{% extends 'base' %}");
    EXPECT_TRUE(has(e, "line 1") && has(e, "'{% extends %}'")) << e;
    e = error_of("a\nb\n{{ x|frobnicate }}");
    EXPECT_TRUE(has(e, "line 3") && has(e, "unknown filter 'frobnicate'")) << e;
    e = error_of("{% if x is frob %}{% endif %}");
    EXPECT_TRUE(has(e, "unknown test 'frob'")) << e;
    e = error_of("{{ s.zfill(3) }}", {{"s", "x"}});
    EXPECT_TRUE(has(e, "line 1") && has(e, "'str object' has no attribute 'zfill'")) << e;
    e = error_of("{{ 'x' % 3 }}");
    EXPECT_TRUE(has(e, "string formatting with '%' is not supported")) << e;
    e = error_of("{% for x in y recursive %}{% endfor %}");
    EXPECT_TRUE(has(e, "recursive for loops are not supported")) << e;
    e = error_of("{% if true %}\nopen");
    EXPECT_TRUE(has(e, "expected 'elif' or 'else' or 'endif'")) << e;
    e = error_of("{{ 1 + }}");
    EXPECT_TRUE(has(e, "line 1: unexpected end of tag")) << e;
    e = error_of("{{ 'unterminated }}");
    EXPECT_TRUE(has(e, "unterminated string literal")) << e;
    e = error_of("{# never closed");
    EXPECT_TRUE(has(e, "missing end of comment tag")) << e;
    e = error_of("{% break %}");
    EXPECT_TRUE(has(e, "'break' outside a for loop")) << e;
    e = error_of("{{ x.y }}");
    EXPECT_TRUE(has(e, "'x' is undefined")) << e;
    e = error_of("{{ 'a' + 1 }}");
    EXPECT_TRUE(has(e, "can only concatenate str (not \"int\") to str")) << e;
    e = error_of("{{ [1].append(2) }}");
    EXPECT_TRUE(has(e, "list.append() is not supported")) << e;
    // raise_exception gives exactly the template's message.
    try {
        Template("{{ raise_exception('Conversation roles must alternate') }}").render(Dict{});
        ADD_FAILURE() << "no exception";
    } catch (const TemplateError& err) {
        EXPECT_EQ(err.kind(), TemplateError::Kind::raised);
        EXPECT_STREQ(err.what(), "Conversation roles must alternate");
    }
}

TEST(ChatTemplate, RenderLimits) {
    const auto has = [](const std::string& msg, const std::string& part) { return msg.find(part) != std::string::npos; };
    std::string e = error_of("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
    EXPECT_TRUE(has(e, "evaluation budget")) << e;
    e = error_of("{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}");
    EXPECT_TRUE(has(e, "nesting too deep")) << e;
    e = error_of("{{ 'x' * 100000000 }}");
    EXPECT_TRUE(has(e, "repetition result too long")) << e;
    e = error_of("{% set ns = namespace(s='x' * 16) %}{% for i in range(30) %}{% set ns.s = ns.s + ns.s %}{% endfor %}");
    EXPECT_TRUE(has(e, "string too long")) << e;
    e = error_of("{% for i in range(200) %}{{ 'x' * 100000 }}{% endfor %}");
    EXPECT_TRUE(has(e, "the rendered text exceeds")) << e;
    e = error_of("{{ " + std::string(500, '(') + "1" + std::string(500, ')') + " }}");
    EXPECT_TRUE(has(e, "nested too deeply")) << e;
    e = error_of("{{ 2 ** 64 }}");
    EXPECT_TRUE(has(e, "integer overflow")) << e;
}

TEST(ChatTemplate, FallbackFormats) {
    const Value conv = from_json(R"([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])");
    // No template: the plain format, with a warning.
    const ChatTemplate none("", "<s>", "</s>", false);
    EXPECT_EQ(none.format(), ChatTemplate::Format::plain);
    EXPECT_NE(none.warning().find("no chat template"), std::string::npos);
    EXPECT_EQ(none.apply(conv), "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:");
    EXPECT_EQ(none.stop_text(), "\nUser:");
    EXPECT_FALSE(none.parse_special());
    // A template the engine cannot handle, with ChatML tokens in the vocabulary: ChatML, and the warning names the
    // construct and its line.
    const ChatTemplate bad("{% for m in messages %}\n{% include 'turn.jinja' %}{% endfor %}", "<s>", "</s>", true);
    EXPECT_EQ(bad.format(), ChatTemplate::Format::chatml);
    EXPECT_NE(bad.warning().find("line 2: unsupported construct '{% include %}'"), std::string::npos) << bad.warning();
    EXPECT_EQ(bad.apply(conv, no_generation_prompt()),
              "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello."
              "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n");
    EXPECT_TRUE(bad.parse_special());
    // A working template: used as is, no warning; raise_exception is an error with the template's message.
    const ChatTemplate gemma(test::read_file(test::shared("templates/google-gemma-2-2b-it.jinja")), "<bos>", "<eos>", false);
    EXPECT_EQ(gemma.format(), ChatTemplate::Format::jinja);
    EXPECT_TRUE(gemma.warning().empty());
    try {
        gemma.apply(conv);
        ADD_FAILURE() << "no exception";
    } catch (const TemplateError& e) {
        EXPECT_EQ(e.kind(), TemplateError::Kind::raised);
        EXPECT_EQ(e.detail(), "System role not supported");
    }
    EXPECT_EQ(gemma.apply(from_json(R"([{"role": "user", "content": " Hi "}])")),
              "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n");
    // The plain format refuses roles it cannot show.
    EXPECT_THROW(none.apply(from_json(R"([{"role": "tool", "content": "x"}])")), TemplateError);
}
