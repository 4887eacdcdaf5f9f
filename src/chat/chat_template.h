// Chat prompts from a model's chat template (tokenizer.chat_template), with the documented fallback (docs/CHAT.md):
//   - no template, or one the engine cannot handle (syntax error, unsupported construct): a warning naming the
//     problem and its line, and the fallback format: ChatML when the vocabulary has <|im_start|> and <|im_end|>,
//     otherwise the plain "System: / User: / Assistant:" lines secureinfer has always used;
//   - a template that calls raise_exception (e.g. "Conversation roles must alternate user/assistant/...") is an
//     error with that message: the conversation does not fit the model's format.
#pragma once
#include <ctime>
#include <optional>
#include <string>

#include "chat/jinja.h"
#include "common/vocab.h"

namespace si::chat {

struct ChatOptions {
    bool add_generation_prompt = true;
    Value tools;                        // undefined: no tools; else a list passed as `tools`
    std::optional<std::time_t> now;     // defines strftime_now (today's date for Llama 3.2) when set
    Dict extra;                         // further template variables (enable_thinking, date_string, ...)
};

class ChatTemplate {
public:
    enum class Format { jinja, chatml, plain };

    // Never throws for problems of the template itself: they select the fallback and set warning().
    ChatTemplate(const std::string& source, std::string bos_token, std::string eos_token, bool has_chatml_tokens);
    // The template of a vocabulary: tokenizer.chat_template, its BOS / EOS texts, ChatML tokens present or not.
    static ChatTemplate for_vocab(const Vocab& v);

    // The prompt for `messages` (a list of {"role": ..., "content": ...} dicts; tool calls as OpenAI's shape).
    // Throws TemplateError: kind raised for the template's raise_exception, runtime for other failures.
    std::string apply(const Value& messages, const ChatOptions& opts = {}) const;

    Format format() const { return format_; }
    const char* format_name() const;
    const std::string& warning() const { return warning_; }
    // Text after which the model is writing a new turn (the plain format's "\nUser:"), empty when tokens mark it.
    std::string stop_text() const { return format_ == Format::plain ? "\nUser:" : ""; }
    // Whether the prompt's special-token text must be parsed into control tokens (template formats).
    bool parse_special() const { return format_ != Format::plain; }
    const std::string& bos_token() const { return bos_; }

private:
    Format format_ = Format::plain;
    std::optional<Template> tmpl_;
    std::string bos_, eos_, warning_;
};

}  // namespace si::chat
