// Byte-level BPE (GPT-2 style, Llama 3) half of si::Tokenizer; see tokenizer.h.
#include <algorithm>
#include <vector>

#include "common/error.h"
#include "common/tokenizer.h"
#include "common/unicode.h"

namespace si {

void Tokenizer::index_bpe(const std::string& what) {
    const std::string& pre = vocab_.pre;
    // llama.cpp's LLAMA3 pre-tokenizer type, which also sets ignore_merges.
    if (pre != "llama-bpe" && pre != "llama3" && pre != "llama-v3")
        fail(Status::unsupported, what + ": BPE pre-tokenizer '" + pre +
                                      "' (tokenizer.ggml.pre) is not supported (only llama-bpe, Llama 3)");
    ignore_merges_ = true;
    if (vocab_.merges.empty())
        fail(Status::format, what + ": the BPE vocabulary has no merges (tokenizer.ggml.merges is missing or empty)");
    merge_rank_.reserve(vocab_.merges.size());
    for (size_t i = 0; i < vocab_.merges.size(); ++i) {
        const std::string& m = vocab_.merges[i];
        const size_t sp = m.find(' ');
        if (sp == std::string::npos || sp == 0 || sp + 1 == m.size() || m.find(' ', sp + 1) != std::string::npos)
            fail(Status::format, what + ": tokenizer.ggml.merges[" + std::to_string(i) +
                                     "] is not two symbols separated by one space");
        merge_rank_.emplace(m, int32_t(i));  // a repeated merge keeps its first (best) rank
    }
    // Every byte must be representable: its byte-encoded character is a token, else unk.
    for (int b = 0; b < 256; ++b) {
        byte_tokens_[b] = find(unicode::byte_to_text(uint8_t(b)));
        if (byte_tokens_[b] >= 0) continue;
        if (vocab_.unk_id < 0) {
            static constexpr char hex[] = "0123456789ABCDEF";
            fail(Status::format, what + ": byte 0x" + hex[b >> 4] + hex[b & 15] +
                                     " has no byte-level token and there is no unknown token");
        }
        byte_tokens_[b] = vocab_.unk_id;
    }
    const size_t n = vocab_.pieces.size();
    decoded_.resize(n);
    droppable_.assign(n, 0);
    for (size_t i = 0; i < n; ++i) {
        const std::string& p = vocab_.pieces[i];
        switch (vocab_.types[i]) {
            case TokenType::normal:
            case TokenType::unused:
            case TokenType::undefined:
            case TokenType::byte:
                // Back from GPT-2's byte encoding; a character outside the mapping is kept as it is.
                for (size_t off = 0; off < p.size();) {
                    const auto [cp, len] = unicode::decode_utf8(p, off);
                    const int b = unicode::text_to_byte(cp);
                    if (b >= 0) decoded_[i] += char(b);
                    else decoded_[i].append(p, off, len);
                    off += len;
                }
                break;
            case TokenType::user_defined: decoded_[i] = p; break;
            case TokenType::control:
            case TokenType::unknown: break;
        }
    }
}

void Tokenizer::encode_bpe_fragment(std::string_view text, std::vector<int32_t>& out) const {
    std::string word;
    size_t off = 0;
    for (const size_t len : unicode::split_llama3(text)) {
        word.clear();
        for (size_t i = off; i < off + len; ++i) word += unicode::byte_to_text(uint8_t(text[i]));
        off += len;
        if (ignore_merges_) {
            if (const int32_t id = find(word); id >= 0) {
                out.push_back(id);
                continue;
            }
        }
        merge_bpe_word(word, out);
    }
}

void Tokenizer::merge_bpe_word(std::string_view word, std::vector<int32_t>& out) const {
    std::vector<symbol_merge::Symbol> sym;
    for (size_t off = 0; off < word.size();) {
        const size_t len = unicode::decode_utf8(word, off).second;
        const int32_t idx = int32_t(sym.size());
        sym.push_back(symbol_merge::Symbol{idx - 1, off + len == word.size() ? -1 : idx + 1, uint32_t(off), uint32_t(len)});
        off += len;
    }
    // Min-heap on rank, ties to the leftmost pair (llama.cpp's llm_bigram_bpe order).
    const auto worse = [](const symbol_merge::Pair<int32_t>& x, const symbol_merge::Pair<int32_t>& y) {
        return x.priority > y.priority || (x.priority == y.priority && x.left > y.left);
    };
    std::string key;
    const auto lookup = [&](const symbol_merge::Symbol& l, const symbol_merge::Symbol& r, int32_t& rank) {
        key.assign(word.substr(l.off, l.n));
        key += ' ';
        key.append(word.substr(r.off, r.n));
        const auto it = merge_rank_.find(key);
        if (it == merge_rank_.end()) return false;
        rank = it->second;
        return true;
    };
    std::vector<symbol_merge::Pair<int32_t>> heap;
    symbol_merge::merge_pairs<int32_t>(sym, heap, lookup, worse);
    for (int32_t i = sym.empty() ? -1 : 0; i != -1; i = sym[size_t(i)].next) {
        const std::string_view s = word.substr(sym[size_t(i)].off, sym[size_t(i)].n);
        if (const int32_t id = find(s); id >= 0) {
            out.push_back(id);
            continue;
        }
        // Not a token (a vocabulary whose merges produce pieces it lacks): one token per byte-level character.
        for (size_t off = 0; off < s.size();) {
            const auto [cp, len] = unicode::decode_utf8(s, off);
            const int b = unicode::text_to_byte(cp);
            out.push_back(b >= 0 ? byte_tokens_[b] : (vocab_.unk_id >= 0 ? vocab_.unk_id : byte_tokens_[0]));
            off += len;
        }
    }
}

}  // namespace si
