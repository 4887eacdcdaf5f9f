// SentencePiece-style BPE tokenizer with byte fallback, producing the same ids as llama.cpp's SPM tokenizer
// (llm_tokenizer_spm) with parse_special = false:
//   1. the text is split around user-defined tokens (llama.cpp does this even when specials are not parsed);
//      control and unknown token texts such as "<s>" are ordinary characters, and merging never produces a control,
//      unknown or byte token (llama.cpp's merge lookup would, but no LLaMA vocabulary has a merge chain to one);
//   2. each remaining fragment gets a leading space when add_space_prefix (only at the start of the text and after a
//      user-defined token), and every ' ' becomes U+2581;
//   3. the fragment is split into UTF-8 characters, then adjacent symbols are merged greedily: always the pair whose
//      concatenation is a vocabulary piece with the highest score, ties to the leftmost pair;
//   4. symbols that are not pieces are emitted as byte tokens <0xXX> (else the one-byte piece, else unk).
// One deliberate difference: llama.cpp takes a lead byte's claimed length blindly, so in malformed UTF-8 it can swallow
// the next character (an escaped space, say) into a garbage symbol, and decoding then loses that character. Here a
// symbol stops at the first byte that is not a continuation byte, so with all 256 byte tokens and no user-defined
// tokens decode(encode(s)) == s for every byte string without U+2581 in it. Valid UTF-8 gives identical ids either way.
//
// Byte-level BPE vocabularies (model "gpt2", pre-tokenizer "llama-bpe": Llama 3) follow llama.cpp's llm_tokenizer_bpe:
// the text is split around special tokens, then into words by the Llama 3 pre-tokenizer (common/unicode.h), each
// word is byte-encoded (GPT-2's mapping) and, unless the whole word is a token (llama.cpp's ignore_merges), merged
// pair by pair, lowest merge rank first, ties to the leftmost pair. Malformed UTF-8 bytes are kept as bytes (llama.cpp
// turns them into U+FFFD), so decode(encode(s)) == s for every byte string without special-token text in it.
//
// Pure computation: no I/O and no mutable state; encode/decode may run concurrently on one instance.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/symbol_merge.h"
#include "common/vocab.h"

namespace si {

class Tokenizer {
public:
    // Validates the vocabulary; throws si::Error(Status::format) starting with `what` (the file it came from) and
    // naming the problem: inconsistent array sizes, an empty vocabulary, bos/eos/unk ids out of range (unk may be
    // -1: none), duplicate pieces, a byte token whose text is not <0xXX>, an unknown token type, or a byte that
    // neither a byte token, a one-byte piece nor unk can represent.
    explicit Tokenizer(Vocab vocab, const std::string& what = "vocabulary");

    // Token ids for `text` (any bytes; UTF-8 expected), preceded by BOS when add_bos. Empty text gives no tokens.
    // With parse_special, the text of control tokens ("<|eot_id|>", "<s>") becomes those tokens (for text a chat
    // template rendered); otherwise only user-defined tokens are (as llama.cpp's parse_special = false).
    std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special = false) const;

    // Text of a sequence: normal pieces with U+2581 as ' ', byte tokens as their raw byte, user-defined pieces
    // verbatim, control and unknown tokens as nothing. With add_space_prefix, a token's leading space is dropped when
    // it is the first token or follows BOS (the space encode() added). Equals the concatenation of piece(prev, id).
    // Throws si::Error(Status::invalid_argument) for an id outside [0, n_vocab).
    std::string decode(std::span<const int32_t> ids) const;
    // Text of one token for streaming output; prev is the token before it, or -1 at the start of the sequence.
    std::string piece(int32_t prev, int32_t id) const;

    int32_t bos() const { return vocab_.bos_id; }
    int32_t eos() const { return vocab_.eos_id; }
    int32_t unk() const { return vocab_.unk_id; }  // -1 when the vocabulary has none
    int32_t n_vocab() const { return int32_t(vocab_.size()); }
    bool add_space_prefix() const { return vocab_.add_space_prefix; }

    // The stored piece (spaces as U+2581, byte tokens as "<0xXX>"); the id must be in range (throws otherwise).
    const std::string& token_text(int32_t id) const;
    float score(int32_t id) const;
    TokenType type(int32_t id) const;
    bool is_control(int32_t id) const { return type(id) == TokenType::control; }
    bool is_bpe() const { return bpe_; }
    // Tokens that end an assistant turn: EOS, tokenizer.ggml.eot_token_id, and the control tokens "<|eot_id|>",
    // "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<|end_of_text|>", "</s>".
    bool is_end_of_turn(int32_t id) const;
    const std::vector<int32_t>& end_of_turn_tokens() const { return end_of_turn_; }

    // Id of a piece that text can produce (normal, user-defined, unused or undefined type), -1 when there is none.
    int32_t find(std::string_view piece) const;
    // Token that byte fallback emits for byte b: <0xXX>, else the one-byte piece, else unk.
    int32_t byte_token(uint8_t b) const { return byte_tokens_[b]; }
    const Vocab& vocab() const { return vocab_; }

private:
    struct Slot {
        uint32_t hash = 0;
        int32_t id = -1;
    };
    void validate_and_index(const std::string& what);
    void encode_fragment(std::string_view text, bool space_prefix, std::vector<int32_t>& out) const;
    void merge_run(std::string_view text, std::vector<symbol_merge::Symbol>& sym,
                   std::vector<symbol_merge::Pair<float>>& heap, std::vector<int32_t>& out) const;
    void check_id(int32_t id, const char* what) const;
    void index_bpe(const std::string& what);
    void encode_bpe_fragment(std::string_view text, std::vector<int32_t>& out) const;
    void merge_bpe_word(std::string_view word, std::vector<int32_t>& out) const;
    std::string_view text_of(int32_t prev, int32_t id) const;

    Vocab vocab_;
    std::vector<float> merge_scores_;     // scores with NaN replaced by -inf so the merge order is well defined
    std::vector<Slot> slots_;             // open-addressing hash table: every non-empty piece -> id
    uint32_t slot_mask_ = 0;
    size_t max_piece_len_ = 0;            // longer bigrams cannot be pieces: skip the lookup
    int32_t byte_tokens_[256] = {};
    bool barrier_[256] = {};              // ASCII bytes no mergeable piece contains: text splits there
    std::vector<int32_t> user_defined_;   // ids, longest text first (llama.cpp's partition order)
    std::vector<std::string> decoded_;    // what each token decodes to
    std::vector<uint8_t> droppable_;      // 1 where decoded_ starts with a space that came from U+2581
    std::vector<int32_t> specials_;       // user-defined, control and unknown ids, longest text first
    std::vector<int32_t> end_of_turn_;
    // Byte-level BPE only.
    bool bpe_ = false;
    bool ignore_merges_ = false;          // a word that is a token is emitted whole
    std::unordered_map<std::string, int32_t> merge_rank_;  // "left right" -> rank
};

}  // namespace si
