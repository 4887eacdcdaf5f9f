#include "common/tokenizer.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/error.h"

namespace si {

namespace {

constexpr std::string_view kSpaceMark = "\xE2\x96\x81";  // U+2581, SentencePiece's visible space

// FNV-1a, folded to 32 bits: pieces are short, so a simple byte-wise hash is as fast as anything fancier.
uint32_t hash_bytes(std::string_view s) {
    uint64_t h = 14695981039346656037ull;
    for (unsigned char c : s) {
        h ^= c;
        h *= 1099511628211ull;
    }
    return uint32_t(h ^ (h >> 32));
}

// Types whose text the merge step may produce. Control, unknown and byte tokens are excluded so that "<s>" or
// "<0x41>" in user text stays text (SentencePiece behaves the same; for LLaMA vocabularies no merge chain can reach
// those pieces anyway, so the ids equal llama.cpp's).
bool text_type(TokenType t) {
    return t == TokenType::normal || t == TokenType::user_defined || t == TokenType::unused ||
           t == TokenType::undefined;
}

int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

// 0..255 for "<0xXX>", -1 otherwise.
int parse_byte_piece(std::string_view s) {
    if (s.size() != 6 || s.substr(0, 3) != "<0x" || s[5] != '>') return -1;
    const int hi = hex_digit(s[3]), lo = hex_digit(s[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

// A piece as it can be shown in an error message: printable ASCII kept, everything else escaped, long text cut.
std::string quoted(std::string_view s) {
    static constexpr char hex[] = "0123456789abcdef";
    std::string r = "'";
    for (size_t i = 0; i < s.size() && i < 40; ++i) {
        const unsigned char c = s[i];
        if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
            r += char(c);
        } else {
            r += "\\x";
            r += hex[c >> 4];
            r += hex[c & 15];
        }
    }
    if (s.size() > 40) r += "...";
    return r + "'";
}

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
    std::string r;
    r.reserve(s.size());
    size_t pos = 0;
    for (size_t hit; (hit = s.find(from, pos)) != std::string_view::npos; pos = hit + from.size()) {
        r.append(s.substr(pos, hit - pos));
        r.append(to);
    }
    r.append(s.substr(pos));
    return r;
}

}  // namespace

Tokenizer::Tokenizer(Vocab vocab, const std::string& what) : vocab_(std::move(vocab)) { validate_and_index(what); }

void Tokenizer::validate_and_index(const std::string& what) {
    const size_t n = vocab_.pieces.size();
    if (n == 0) fail(Status::format, what + ": the vocabulary is empty");
    if (n > size_t(std::numeric_limits<int32_t>::max()))
        fail(Status::format, what + ": " + std::to_string(n) + " tokens do not fit 32-bit ids");
    if (vocab_.scores.size() != n || vocab_.types.size() != n)
        fail(Status::format, what + ": " + std::to_string(n) + " pieces but " + std::to_string(vocab_.scores.size()) +
                                 " scores and " + std::to_string(vocab_.types.size()) + " token types");
    const auto in_range = [&](int32_t id) { return id >= 0 && size_t(id) < n; };
    const auto bad_id = [&](const char* name, int32_t id) {
        fail(Status::format, what + ": " + name + " id " + std::to_string(id) + " is outside the vocabulary (" +
                                 std::to_string(n) + " tokens)");
    };
    if (!in_range(vocab_.bos_id)) bad_id("BOS", vocab_.bos_id);
    if (!in_range(vocab_.eos_id)) bad_id("EOS", vocab_.eos_id);
    if (vocab_.unk_id != -1 && !in_range(vocab_.unk_id)) bad_id("unknown-token", vocab_.unk_id);
    if (vocab_.eot_id != -1 && !in_range(vocab_.eot_id)) bad_id("end-of-turn", vocab_.eot_id);
    if (vocab_.model != "llama" && vocab_.model != "gpt2")
        fail(Status::unsupported, what + ": tokenizer model " + quoted(vocab_.model) +
                                      " is not supported (llama: SentencePiece, gpt2: byte-level BPE)");
    bpe_ = vocab_.is_bpe();

    // Hash table over every non-empty piece (so duplicates of any type are caught), at most half full.
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    slots_.assign(cap, Slot{});
    slot_mask_ = uint32_t(cap - 1);
    merge_scores_.resize(n);
    for (int32_t b = 0; b < 256; ++b) byte_tokens_[b] = -1;

    for (size_t i = 0; i < n; ++i) {
        const int32_t id = int32_t(i);
        const std::string& p = vocab_.pieces[i];
        const int32_t t = int32_t(vocab_.types[i]);
        if (t < int32_t(TokenType::undefined) || t > int32_t(TokenType::byte))
            fail(Status::format, what + ": token " + std::to_string(i) + " has unknown token type " + std::to_string(t));
        // NaN would break the strict weak order of the merge queue; such a piece simply never wins a merge.
        const float s = vocab_.scores[i];
        merge_scores_[i] = std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
        if (vocab_.types[i] == TokenType::byte && !bpe_) {
            const int b = parse_byte_piece(p);
            if (b < 0)
                fail(Status::format, what + ": token " + std::to_string(i) + " is a byte token but its text " +
                                         quoted(p) + " is not of the form <0xXX>");
            if (byte_tokens_[b] >= 0)
                fail(Status::format, what + ": tokens " + std::to_string(byte_tokens_[b]) + " and " +
                                         std::to_string(i) + " are both byte tokens for " + quoted(p));
            byte_tokens_[b] = id;
        }
        if (p.empty()) continue;  // text never produces an empty piece; such padding entries only decode
        if (text_type(vocab_.types[i])) max_piece_len_ = std::max(max_piece_len_, p.size());
        const uint32_t h = hash_bytes(p);
        uint32_t k = h & slot_mask_;
        for (; slots_[k].id >= 0; k = (k + 1) & slot_mask_) {
            if (slots_[k].hash == h && vocab_.pieces[size_t(slots_[k].id)] == p)
                fail(Status::format, what + ": tokens " + std::to_string(slots_[k].id) + " and " + std::to_string(i) +
                                         " have the same text " + quoted(p));
        }
        slots_[k] = Slot{h, id};
    }

    for (size_t i = 0; i < n; ++i) {
        const TokenType t = vocab_.types[i];
        if (vocab_.pieces[i].empty()) continue;
        if (t == TokenType::user_defined) user_defined_.push_back(int32_t(i));
        if (t == TokenType::user_defined || t == TokenType::control || t == TokenType::unknown)
            specials_.push_back(int32_t(i));
    }
    for (auto* list : {&user_defined_, &specials_})
        std::stable_sort(list->begin(), list->end(), [&](int32_t a, int32_t b) {
            return vocab_.pieces[size_t(a)].size() > vocab_.pieces[size_t(b)].size();
        });
    static constexpr std::string_view kEndOfTurn[] = {"<|eot_id|>",     "<|eom_id|>",      "<|im_end|>",
                                                      "<end_of_turn>",  "<|end|>",         "<|endoftext|>",
                                                      "<|end_of_text|>", "</s>"};
    for (size_t i = 0; i < n; ++i) {
        const int32_t id = int32_t(i);
        bool eot = id == vocab_.eos_id || id == vocab_.eot_id;
        if (vocab_.types[i] == TokenType::control)
            for (const std::string_view t : kEndOfTurn) eot = eot || vocab_.pieces[i] == t;
        if (eot) end_of_turn_.push_back(id);
    }
    if (bpe_) {
        index_bpe(what);
        return;
    }

    // ASCII bytes that occur in no piece text can produce (see encode_fragment).
    for (int c = 0; c < 0x80; ++c) barrier_[c] = true;
    for (size_t i = 0; i < n; ++i)
        if (text_type(vocab_.types[i]))
            for (const char c : vocab_.pieces[i]) barrier_[uint8_t(c)] = false;

    // Byte fallback: the <0xXX> token, else a one-byte piece (as llama.cpp's byte_to_token), else unk.
    for (int b = 0; b < 256; ++b) {
        if (byte_tokens_[b] >= 0) continue;
        const char c = char(b);
        byte_tokens_[b] = find(std::string_view(&c, 1));
        if (byte_tokens_[b] >= 0) continue;
        if (vocab_.unk_id < 0) {
            static constexpr char hex[] = "0123456789ABCDEF";
            fail(Status::format, what + ": byte 0x" + hex[b >> 4] + hex[b & 15] +
                                     " has no byte token <0xXX>, no one-byte piece, and there is no unknown token");
        }
        byte_tokens_[b] = vocab_.unk_id;
    }

    decoded_.resize(n);
    droppable_.assign(n, 0);
    for (size_t i = 0; i < n; ++i) {
        const std::string& p = vocab_.pieces[i];
        switch (vocab_.types[i]) {
            case TokenType::normal:
            case TokenType::unused:
            case TokenType::undefined:
                decoded_[i] = replace_all(p, kSpaceMark, " ");
                droppable_[i] = !decoded_[i].empty() && decoded_[i][0] == ' ';
                break;
            case TokenType::user_defined: decoded_[i] = p; break;
            case TokenType::byte: decoded_[i] = std::string(1, char(parse_byte_piece(p))); break;
            case TokenType::control:
            case TokenType::unknown: break;  // decode to nothing, like llama.cpp without `special`
        }
    }
}

int32_t Tokenizer::find(std::string_view piece) const {
    if (piece.empty()) return -1;
    const uint32_t h = hash_bytes(piece);
    for (uint32_t k = h & slot_mask_; slots_[k].id >= 0; k = (k + 1) & slot_mask_) {
        const Slot& s = slots_[k];
        if (s.hash == h && vocab_.pieces[size_t(s.id)] == piece)
            return text_type(vocab_.types[size_t(s.id)]) ? s.id : -1;
    }
    return -1;
}

void Tokenizer::check_id(int32_t id, const char* what) const {
    if (id < 0 || id >= n_vocab())
        fail(Status::invalid_argument, std::string("tokenizer: ") + what + " " + std::to_string(id) +
                                           " is outside the vocabulary (" + std::to_string(n_vocab()) + " tokens)");
}

const std::string& Tokenizer::token_text(int32_t id) const {
    check_id(id, "token id");
    return vocab_.pieces[size_t(id)];
}

float Tokenizer::score(int32_t id) const {
    check_id(id, "token id");
    return vocab_.scores[size_t(id)];
}

TokenType Tokenizer::type(int32_t id) const {
    check_id(id, "token id");
    return vocab_.types[size_t(id)];
}

bool Tokenizer::is_end_of_turn(int32_t id) const {
    return std::find(end_of_turn_.begin(), end_of_turn_.end(), id) != end_of_turn_.end();
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos, bool parse_special) const {
    std::vector<int32_t> out;
    if (add_bos) out.push_back(vocab_.bos_id);
    if (text.empty()) return out;
    out.reserve(out.size() + text.size() / 3 + 8);
    const std::vector<int32_t>& specials = parse_special ? specials_ : user_defined_;
    if (specials.empty()) {
        if (bpe_) encode_bpe_fragment(text, out);
        else encode_fragment(text, vocab_.add_space_prefix, out);
        return out;
    }

    // Split around user-defined tokens as llama.cpp's tokenizer_st_partition: longest token first, every occurrence
    // inside the fragments that are still raw text.
    struct Fragment {
        int32_t token;  // -1 for raw text
        size_t off, len;
    };
    std::vector<Fragment> frags{{-1, 0, text.size()}}, next;
    for (const int32_t id : specials) {
        const std::string_view p = vocab_.pieces[size_t(id)];
        next.clear();
        for (const Fragment& f : frags) {
            if (f.token >= 0) {
                next.push_back(f);
                continue;
            }
            const std::string_view raw = text.substr(f.off, f.len);
            size_t pos = 0;
            for (size_t hit; (hit = raw.find(p, pos)) != std::string_view::npos; pos = hit + p.size()) {
                if (hit > pos) next.push_back({-1, f.off + pos, hit - pos});
                next.push_back({id, 0, 0});
            }
            if (pos < raw.size()) next.push_back({-1, f.off + pos, raw.size() - pos});
        }
        frags.swap(next);
    }
    // The space prefix goes on raw text at the start or right after a user-defined token.
    bool after_special = true;
    for (const Fragment& f : frags) {
        if (f.token >= 0) {
            out.push_back(f.token);
            after_special = true;
        } else if (bpe_) {
            encode_bpe_fragment(text.substr(f.off, f.len), out);
        } else {
            encode_fragment(text.substr(f.off, f.len), vocab_.add_space_prefix && after_special, out);
            after_special = false;
        }
    }
    return out;
}

void Tokenizer::encode_fragment(std::string_view text, bool space_prefix, std::vector<int32_t>& out) const {
    std::string buf;
    buf.reserve(text.size() + text.size() / 2 + kSpaceMark.size());
    if (space_prefix) buf.append(kSpaceMark);
    for (const char c : text) {
        if (c == ' ')
            buf.append(kSpaceMark);
        else
            buf.push_back(c);
    }
    if (buf.size() >= size_t(std::numeric_limits<int32_t>::max()))
        fail(Status::invalid_argument, "tokenizer: text of " + std::to_string(text.size()) + " bytes is too long");

    // Bytes that no piece contains can never be merged with anything, so the text between them merges
    // independently: the global order restricted to one stretch is that stretch's own order (score, then position).
    // Working stretch by stretch (typically line by line) keeps the queue small and in cache.
    std::vector<symbol_merge::Symbol> sym;
    std::vector<symbol_merge::Pair<float>> heap;
    size_t begin = 0;
    for (size_t i = 0; i < buf.size(); ++i) {
        if (!barrier_[uint8_t(buf[i])]) continue;
        merge_run(std::string_view(buf).substr(begin, i - begin), sym, heap, out);
        out.push_back(byte_tokens_[uint8_t(buf[i])]);
        begin = i + 1;
    }
    merge_run(std::string_view(buf).substr(begin), sym, heap, out);
}

void Tokenizer::merge_run(std::string_view text, std::vector<symbol_merge::Symbol>& sym,
                          std::vector<symbol_merge::Pair<float>>& heap,
                          std::vector<int32_t>& out) const {
    if (text.empty()) return;
    // One symbol per UTF-8 character; see the header for how malformed sequences are cut.
    static constexpr uint8_t kLen[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    sym.clear();
    for (size_t off = 0; off < text.size();) {
        const size_t len = kLen[uint8_t(text[off]) >> 4];
        size_t n = 1;
        while (n < len && off + n < text.size() && (uint8_t(text[off + n]) & 0xC0) == 0x80) ++n;
        const int32_t idx = int32_t(sym.size());
        sym.push_back(symbol_merge::Symbol{idx - 1, off + n == text.size() ? -1 : idx + 1, uint32_t(off), uint32_t(n)});
        off += n;
    }

    // Max-heap order of llama.cpp's llm_bigram_spm: highest score first, ties to the leftmost pair.
    const auto worse = [](const symbol_merge::Pair<float>& x, const symbol_merge::Pair<float>& y) {
        return x.priority < y.priority || (x.priority == y.priority && x.left > y.left);
    };
    const auto lookup = [&](const symbol_merge::Symbol& l, const symbol_merge::Symbol& r, float& score) {
        const uint32_t size = l.n + r.n;
        if (size > max_piece_len_) return false;
        const int32_t id = find(text.substr(l.off, size));
        if (id < 0) return false;
        score = merge_scores_[size_t(id)];
        return true;
    };
    symbol_merge::merge_pairs<float>(sym, heap, lookup, worse);

    // Every merge result is a piece, so a symbol that is not one is a single character: emit its bytes.
    for (int32_t i = 0; i != -1; i = sym[size_t(i)].next) {
        const std::string_view s = text.substr(sym[size_t(i)].off, sym[size_t(i)].n);
        const int32_t id = find(s);
        if (id >= 0) {
            out.push_back(id);
        } else {
            for (const char c : s) out.push_back(byte_tokens_[uint8_t(c)]);
        }
    }
}

std::string_view Tokenizer::text_of(int32_t prev, int32_t id) const {
    check_id(id, "token id");
    if (prev != -1) check_id(prev, "previous token id");
    const std::string_view d = decoded_[size_t(id)];
    // Drop the space encode() put in front of the text (llama.cpp's detokenizer, llama2.c's decode after BOS).
    if (droppable_[size_t(id)] && vocab_.add_space_prefix && (prev == -1 || prev == vocab_.bos_id))
        return d.substr(1);
    return d;
}

std::string Tokenizer::piece(int32_t prev, int32_t id) const { return std::string(text_of(prev, id)); }

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
    std::string out;
    int32_t prev = -1;
    for (const int32_t id : ids) {
        out.append(text_of(prev, id));
        prev = id;
    }
    return out;
}

}  // namespace si
