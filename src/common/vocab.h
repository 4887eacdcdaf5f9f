// A vocabulary as stored in llama2.c tokenizer.bin files and GGUF tokenizer.ggml.* metadata: SentencePiece-style
// (model "llama", LLaMA 1/2) or byte-level BPE (model "gpt2", Llama 3).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace si {

// Token types, numbered as in GGUF's tokenizer.ggml.token_type.
enum class TokenType : int32_t { undefined = 0, normal = 1, unknown = 2, control = 3, user_defined = 4, unused = 5, byte = 6 };

struct Vocab {
    std::vector<std::string> pieces;  // UTF-8 text of each token; spaces are stored as U+2581 ("▁")
    std::vector<float> scores;        // merge priority: higher merges first
    std::vector<TokenType> types;
    int32_t bos_id = 1;
    int32_t eos_id = 2;
    int32_t unk_id = 0;
    bool add_space_prefix = true;  // SentencePiece's add_dummy_prefix

    // Byte-level BPE (tokenizer.ggml.model "gpt2"): pieces are stored byte-encoded (GPT-2's mapping, "Ġ" for a space),
    // `merges` holds "left right" pairs by rank (first merges first) and `pre` names the pre-tokenizer.
    std::string model = "llama";  // "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    std::string pre;              // tokenizer.ggml.pre, e.g. "llama-bpe"
    std::vector<std::string> merges;
    int32_t eot_id = -1;          // tokenizer.ggml.eot_token_id, -1 when absent
    std::string chat_template;    // tokenizer.chat_template (Jinja), empty when absent

    bool is_bpe() const { return model == "gpt2"; }

    size_t size() const { return pieces.size(); }
};

}  // namespace si
