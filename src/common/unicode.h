// Unicode helpers for byte-level BPE vocabularies (GPT-2 style, used by Llama 3): code point classes, the Llama 3
// pre-tokenizer, and GPT-2's byte <-> code point mapping. Pure functions, no state.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace si::unicode {

bool is_letter(uint32_t cp);      // general category L*  (regex \p{L})
bool is_number(uint32_t cp);      // general category N*  (regex \p{N})
bool is_whitespace(uint32_t cp);  // the White_Space property (regex \s)

// One UTF-8 character at text[off]: its code point and byte length. A malformed sequence (bad lead byte, missing
// continuation bytes, overlong form, surrogate, beyond U+10FFFF) is one byte long and reads as U+FFFD.
std::pair<uint32_t, size_t> decode_utf8(std::string_view text, size_t off);
void append_utf8(std::string& out, uint32_t cp);

// The Llama 3 ("llama-bpe") pre-tokenizer: splits text into words as the regular expression
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// does (first alternative that matches at each position, greedy). Returns the byte length of each word, in order;
// they add up to text.size(). Malformed UTF-8 bytes stay in the words as they are (classed as U+FFFD).
std::vector<size_t> split_llama3(std::string_view text);

// GPT-2's reversible byte encoding: each byte becomes one printable code point (printable Latin-1 bytes map to
// themselves, the others to U+0100 upwards), so "Ġ" (U+0120) stands for a space.
const std::string& byte_to_text(uint8_t b);
// The byte a code point stands for, -1 for a code point outside the mapping.
int text_to_byte(uint32_t cp);

}  // namespace si::unicode
