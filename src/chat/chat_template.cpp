#include "chat/chat_template.h"

namespace si::chat {

namespace {

bool has_piece(const Vocab& v, const std::string& text) {
    for (size_t i = 0; i < v.pieces.size(); ++i)
        if (v.pieces[i] == text && (v.types[i] == TokenType::control || v.types[i] == TokenType::user_defined)) return true;
    return false;
}

const Value* field(const Value& m, const char* key) {
    return m.kind == Value::Kind::dict ? m.dict->find(key) : nullptr;
}

}  // namespace

ChatTemplate::ChatTemplate(const std::string& source, std::string bos_token, std::string eos_token, bool has_chatml)
    : bos_(std::move(bos_token)), eos_(std::move(eos_token)) {
    const Format fallback = has_chatml ? Format::chatml : Format::plain;
    const std::string fallback_name = has_chatml ? "ChatML" : "the plain System:/User:/Assistant: format";
    if (source.empty()) {
        format_ = fallback;
        warning_ = "the model has no chat template (tokenizer.chat_template); using " + fallback_name;
        return;
    }
    try {
        tmpl_.emplace(source);
        format_ = Format::jinja;
    } catch (const TemplateError& e) {
        format_ = fallback;
        warning_ = std::string("the model's chat template cannot be used (") + e.what() + "); using " + fallback_name;
    }
}

ChatTemplate ChatTemplate::for_vocab(const Vocab& v) {
    const auto text = [&](int32_t id) { return id >= 0 && size_t(id) < v.pieces.size() ? v.pieces[size_t(id)] : std::string(); };
    return ChatTemplate(v.chat_template, text(v.bos_id), text(v.eos_id),
                        has_piece(v, "<|im_start|>") && has_piece(v, "<|im_end|>"));
}

const char* ChatTemplate::format_name() const {
    switch (format_) {
        case Format::jinja: return "model template";
        case Format::chatml: return "ChatML (fallback)";
        case Format::plain: return "plain (fallback)";
    }
    return "?";
}

std::string ChatTemplate::apply(const Value& messages, const ChatOptions& opts) const {
    if (messages.kind != Value::Kind::list) throw TemplateError(TemplateError::Kind::runtime, 0, "messages must be a list");
    if (format_ == Format::jinja) {
        Dict vars = opts.extra;
        vars.set("messages", messages);
        vars.set("add_generation_prompt", Value::boolean(opts.add_generation_prompt));
        vars.set("bos_token", Value::string(bos_));
        vars.set("eos_token", Value::string(eos_));
        if (!opts.tools.is_undefined()) vars.set("tools", opts.tools);
        return tmpl_->render(vars, opts.now);
    }
    std::string out;
    for (const Value& m : *messages.list) {
        const Value* role = field(m, "role");
        const Value* content = field(m, "content");
        if (!role || role->kind != Value::Kind::string)
            throw TemplateError(TemplateError::Kind::runtime, 0, "every message needs a string 'role'");
        const std::string text = content ? to_str(*content) : "";
        if (format_ == Format::chatml) {
            out += "<|im_start|>" + role->s + "\n" + text + "<|im_end|>\n";
        } else {
            const std::string& r = role->s;
            const char* name = r == "system" || r == "developer" ? "System"
                               : r == "user"                     ? "User"
                               : r == "assistant"                ? "Assistant"
                                                                 : nullptr;
            if (!name)
                throw TemplateError(TemplateError::Kind::runtime, 0,
                                    "role '" + r + "' is not supported by the plain chat format (system, developer, user, assistant)");
            out += std::string(name) + ": " + text + "\n";
        }
    }
    if (opts.add_generation_prompt) out += format_ == Format::chatml ? "<|im_start|>assistant\n" : "Assistant:";
    return out;
}

}  // namespace si::chat
