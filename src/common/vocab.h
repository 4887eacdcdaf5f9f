// A SentencePiece-style vocabulary as stored in llama2.c tokenizer.bin files and GGUF tokenizer.ggml.* metadata.
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

    size_t size() const { return pieces.size(); }
};

}  // namespace si
