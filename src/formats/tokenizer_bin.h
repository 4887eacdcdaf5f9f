// llama2.c tokenizer.bin files: int32 max_token_length, then for each token float32 score, int32 length and `length`
// bytes of text (little-endian). The number of tokens is not stored: the model's vocab_size gives it.
//
// Token types are implied by position and text: id 0 unknown, ids 1 and 2 control (stored as "\n<s>\n" and
// "\n</s>\n", returned as "<s>" and "</s>"), pieces "<0xXX>" byte tokens, everything else normal. Spaces, which
// llama2.c's exporter stores as ' ', are returned as U+2581 like every other vocabulary source.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

#include "common/vocab.h"

namespace si {

// Longest token text accepted in max_token_length (real files use 7..27; more means a corrupt header).
inline constexpr int32_t kTokenizerBinMaxTokenLength = 65536;

// Reads exactly expected_vocab_size tokens. Throws si::Error naming the path: io when unreadable; format when the
// header is absurd, a length is negative, above max_token_length or runs past the end of the file, or the file holds
// more or fewer tokens than expected_vocab_size (the message names both numbers); invalid_argument when
// expected_vocab_size < 1. NaN or infinite scores are accepted (a NaN piece then never wins a merge).
Vocab load_tokenizer_bin(const std::string& path, int expected_vocab_size);
// Number of tokens in the file, for when no model says how many there should be; validates the file like
// load_tokenizer_bin. Use load_tokenizer_bin(path, count_tokenizer_bin(path)) to read all of them.
int count_tokenizer_bin(const std::string& path);

// The same on bytes already in memory; `what` names their origin in error messages.
Vocab parse_tokenizer_bin(std::string_view bytes, int expected_vocab_size, const std::string& what);
int count_tokenizer_bin_entries(std::string_view bytes, const std::string& what);

}  // namespace si
