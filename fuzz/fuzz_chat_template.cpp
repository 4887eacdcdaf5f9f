// libFuzzer target for the chat-template engine (src/chat): any template source must either parse and render or
// fail with si::chat::TemplateError; never crash, hang (the render limits bound the work) or grow without bound.
// The input is rendered on a fixed conversation with tools, as a model's template would be; the ChatTemplate
// wrapper must also fall back cleanly.
#include <cstdint>
#include <string>

#include "chat/chat_template.h"
#include "chat/jinja.h"

using namespace si::chat;

namespace {

const Value& conversation() {
    static const Value v = from_json(R"({"messages": [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi \u00e9 🦙"}, {"role": "assistant", "content": "<think>x</think>Hello."},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "abcdefghi", "type": "function",
          "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "42"}, {"role": "user", "content": "Bye"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "add_generation_prompt": true, "bos_token": "<s>", "eos_token": "</s>", "n": 3, "items": [1, 2.5, "x", null]})");
    return v;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size > 64 * 1024) return 0;
    const std::string src(reinterpret_cast<const char*>(data), size);
    Limits limits;
    limits.max_output = 1 << 20;
    limits.max_steps = 200000;
    try {
        const Template t(src, limits);
        (void)t.render(*conversation().dict, std::time_t(1700000000));
    } catch (const TemplateError&) {
    }
    const ChatTemplate ct(src, "<s>", "</s>", true);
    try {
        (void)ct.apply(conversation().dict->find("messages") ? *conversation().dict->find("messages") : Value());
    } catch (const TemplateError&) {
    }
    return 0;
}
