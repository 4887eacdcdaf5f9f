// Tokenizer: llama.cpp's conformance cases for the Llama-2 vocabulary (from tokenizer.bin and from GGUF), lossless
// round trips with tok512 on real text, arbitrary UTF-8 and random bytes, merge order and vocabulary validation on
// hand-built vocabularies, and one crafted corrupt tokenizer.bin per failure mode.
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/tokenizer.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"
#include "formats/tokenizer_bin.h"
#include "testutil.h"

using namespace si;

namespace {

const std::string kMark = "\xE2\x96\x81";  // U+2581

const Tokenizer& llama2_bin() {
    static const Tokenizer t(load_tokenizer_bin(test::shared("models/llama2_tokenizer.bin"), 32000));
    return t;
}
const Tokenizer& tok512() {
    static const Tokenizer t(load_tokenizer_bin(test::shared("models/tok512.bin"), 512));
    return t;
}

using Case = test::VocabCase;

void expect_conformance(const Tokenizer& tok) {
    const std::vector<Case> cases = test::vocab_conformance_cases("models/ggml-vocab-llama-spm.gguf");
    ASSERT_EQ(cases.size(), 46u);
    int matched = 0;
    for (const Case& c : cases) {
        const std::vector<int32_t> got = tok.encode(c.text, false);
        EXPECT_EQ(test::show_ids(got), test::show_ids(c.ids)) << "input: '" << c.text << "'";
        matched += got == c.ids;
        EXPECT_EQ(tok.decode(got), c.text);
        // With BOS: the same ids after it, and decode still gives the text back.
        std::vector<int32_t> with_bos = tok.encode(c.text, true);
        ASSERT_FALSE(with_bos.empty());
        EXPECT_EQ(with_bos[0], 1);
        EXPECT_EQ(std::vector<int32_t>(with_bos.begin() + 1, with_bos.end()), got);
        EXPECT_EQ(tok.decode(with_bos), c.text);
    }
    EXPECT_EQ(matched, int(cases.size()));
}

// decode() and the concatenation of piece() over the same ids.
void expect_streaming_equals_decode(const Tokenizer& tok, const std::vector<int32_t>& ids) {
    std::string streamed;
    int32_t prev = -1;
    for (int32_t id : ids) {
        streamed += tok.piece(prev, id);
        prev = id;
    }
    EXPECT_EQ(streamed, tok.decode(ids));
}

std::vector<std::string> lines_of(const std::string& text) {
    std::vector<std::string> lines;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    return lines;
}


// The merge loop written the slow, obvious way (llama.cpp's rule without a queue): repeatedly merge the adjacent pair
// whose concatenation is a piece with the highest score, leftmost on ties. Symbols are UTF-8 characters, a lead byte
// taking only the continuation bytes that follow it.
std::vector<int32_t> reference_encode(const Tokenizer& tok, std::string_view text) {
    if (text.empty()) return {};
    std::string buf = kMark;
    for (char c : text) buf += c == ' ' ? kMark : std::string(1, c);
    std::vector<std::string> sym;
    static const int kLen[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    for (size_t off = 0; off < buf.size();) {
        size_t n = 1;
        while (n < size_t(kLen[uint8_t(buf[off]) >> 4]) && off + n < buf.size() && (uint8_t(buf[off + n]) & 0xC0) == 0x80) ++n;
        sym.push_back(buf.substr(off, n));
        off += n;
    }
    for (;;) {
        int best = -1;
        float best_score = 0;
        for (size_t i = 0; i + 1 < sym.size(); ++i) {
            const int32_t id = tok.find(sym[i] + sym[i + 1]);
            if (id >= 0 && (best < 0 || tok.score(id) > best_score)) {
                best = int(i);
                best_score = tok.score(id);
            }
        }
        if (best < 0) break;
        sym[size_t(best)] += sym[size_t(best) + 1];
        sym.erase(sym.begin() + best + 1);
    }
    std::vector<int32_t> ids;
    for (const auto& s : sym) {
        if (tok.find(s) >= 0) {
            ids.push_back(tok.find(s));
        } else {
            for (char c : s) ids.push_back(tok.byte_token(uint8_t(c)));
        }
    }
    return ids;
}

// ---- hand-built vocabularies -----------------------------------------------------------------------------------

struct VocabBuilder {
    Vocab v;
    VocabBuilder() {
        add("<unk>", 0, TokenType::unknown);
        add("<s>", 0, TokenType::control);
        add("</s>", 0, TokenType::control);
    }
    VocabBuilder& add(std::string piece, float score, TokenType type = TokenType::normal) {
        v.pieces.push_back(std::move(piece));
        v.scores.push_back(score);
        v.types.push_back(type);
        return *this;
    }
    VocabBuilder& bytes() {
        static const char* hex = "0123456789ABCDEF";
        for (int b = 0; b < 256; ++b) add(std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">", 0, TokenType::byte);
        return *this;
    }
    int32_t id(const std::string& piece) const {
        for (size_t i = 0; i < v.pieces.size(); ++i)
            if (v.pieces[i] == piece) return int32_t(i);
        return -1;
    }
};


void expect_error(const std::function<void()>& f, Status status, const std::string& substring) {
    try {
        f();
        ADD_FAILURE() << "no si::Error thrown; expected one containing '" << substring << "'";
    } catch (const Error& e) {
        EXPECT_EQ(int(e.status()), int(status)) << e.what();
        EXPECT_NE(std::string(e.what()).find(substring), std::string::npos)
            << "message '" << e.what() << "' lacks '" << substring << "'";
    }
}

// ---- tokenizer.bin images --------------------------------------------------------------------------------------

struct Bin {
    std::string s;
    Bin& i32(int32_t v) {
        s.append(reinterpret_cast<const char*>(&v), 4);
        return *this;
    }
    Bin& f32(float v) {
        s.append(reinterpret_cast<const char*>(&v), 4);
        return *this;
    }
    Bin& token(float score, std::string_view text) {
        f32(score).i32(int32_t(text.size()));
        s.append(text);
        return *this;
    }
};

// A valid 5-token file: unk, BOS, EOS as llama2.c writes them, then two pieces.
Bin small_bin() {
    Bin b;
    b.i32(8).token(0, "<unk>").token(0, "\n<s>\n").token(0, "\n</s>\n").token(-1, " a").token(-2, "b");
    return b;
}

std::string write_scratch(const std::string& name, const std::string& bytes) {
    const std::string path = test::scratch_dir() + "/" + name;
    test::write_file(path, bytes);
    return path;
}

}  // namespace

// ---- conformance with llama.cpp ----------------------------------------------------------------------------------

TEST(TokenizerConformance, Llama2VocabFromTokenizerBin) { expect_conformance(llama2_bin()); }

TEST(TokenizerConformance, Llama2VocabFromGguf) {
    const auto reader = gguf::Reader::open(test::shared("models/ggml-vocab-llama-spm.gguf"));
    const Vocab gv = load_gguf_vocab(reader);
    // The two files hold the same vocabulary: same pieces, scores and types once tokenizer.bin's conventions are
    // undone by its loader.
    const Vocab& bv = llama2_bin().vocab();
    ASSERT_EQ(gv.size(), bv.size());
    int differing = 0;
    for (size_t i = 0; i < gv.size(); ++i)
        differing += gv.pieces[i] != bv.pieces[i] || gv.types[i] != bv.types[i] || gv.scores[i] != bv.scores[i];
    EXPECT_EQ(differing, 0);
    EXPECT_EQ(gv.bos_id, 1);
    EXPECT_EQ(gv.eos_id, 2);
    EXPECT_TRUE(gv.add_space_prefix);
    expect_conformance(Tokenizer(gv, reader.name()));
}

TEST(TokenizerConformance, SpecialTokenTextIsPlainText) {
    const Tokenizer& tok = llama2_bin();
    for (const std::string text : {"<s>", "</s>", "<unk>", "<0x41>", "a<s>b</s>"}) {
        const auto ids = tok.encode(text, false);
        for (int32_t id : ids) {
            EXPECT_NE(tok.type(id), TokenType::control) << text;
            EXPECT_NE(tok.type(id), TokenType::unknown) << text;
        }
        EXPECT_EQ(tok.decode(ids), text);
    }
    // Byte fallback for a character outside the vocabulary: U+1F999 is four byte tokens (ids 3 + byte).
    EXPECT_EQ(test::show_ids(tok.encode("\xF0\x9F\xA6\x99", false)), "29871 243 162 169 156");
}

// ---- tok512 (stories260K) -----------------------------------------------------------------------------------------

TEST(Tokenizer512, Basics) {
    const Tokenizer& tok = tok512();
    EXPECT_EQ(tok.n_vocab(), 512);
    EXPECT_EQ(tok.bos(), 1);
    EXPECT_EQ(tok.eos(), 2);
    EXPECT_EQ(tok.unk(), 0);
    EXPECT_EQ(tok.token_text(1), "<s>");
    EXPECT_EQ(tok.token_text(2), "</s>");
    EXPECT_EQ(tok.token_text(0), "<unk>");
    for (int b = 0; b < 256; ++b) {
        EXPECT_EQ(tok.byte_token(uint8_t(b)), b + 3);
        EXPECT_EQ(tok.type(b + 3), TokenType::byte);
    }
    EXPECT_EQ(tok.token_text(259), kMark + "t");  // stored as " t" in the file
    EXPECT_EQ(tok.find(kMark + "t"), 259);
    EXPECT_EQ(tok.find("<s>"), -1);  // control pieces are not reachable from text
    expect_error([&] { tok.token_text(512); }, Status::invalid_argument, "token id 512 is outside the vocabulary");
    expect_error([&] { tok.token_text(-1); }, Status::invalid_argument, "token id -1");
}

TEST(Tokenizer512, KnownStory) {
    // stories260K's greedy continuation of BOS (../shared/MANIFEST.md).
    const std::vector<int32_t> ids = {1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338};
    const std::string text = tok512().decode(ids);
    EXPECT_EQ(text.rfind("Once upon a time, there was a little girl named Lily.", 0), 0u) << text;
    expect_streaming_equals_decode(tok512(), ids);
    // Those ids are also what encoding the text gives.
    EXPECT_EQ(test::show_ids(tok512().encode(text, true)), test::show_ids(ids));
}

TEST(Tokenizer512, BosHandling) {
    const Tokenizer& tok = tok512();
    EXPECT_TRUE(tok.encode("", false).empty());
    EXPECT_EQ(tok.encode("", true), std::vector<int32_t>{1});
    EXPECT_EQ(tok.decode(std::vector<int32_t>{1}), "");
    EXPECT_EQ(tok.decode(std::vector<int32_t>{1, 2}), "");  // control tokens decode to nothing
    const auto plain = tok.encode("Hello world", false);
    const auto bos = tok.encode("Hello world", true);
    ASSERT_EQ(bos.size(), plain.size() + 1);
    EXPECT_EQ(bos[0], 1);
    EXPECT_EQ(std::vector<int32_t>(bos.begin() + 1, bos.end()), plain);
    EXPECT_EQ(tok.decode(plain), "Hello world");
    EXPECT_EQ(tok.decode(bos), "Hello world");
    // The prefix space is dropped only at the start or after BOS, and kept inside the text.
    const int32_t the = tok.encode(" the", false).back();
    EXPECT_EQ(tok.piece(-1, the), tok.token_text(the).substr(3));
    EXPECT_EQ(tok.piece(1, the), tok.token_text(the).substr(3));
    EXPECT_EQ(tok.piece(the, the), " " + tok.token_text(the).substr(3));
    expect_error([&] { tok.piece(512, the); }, Status::invalid_argument, "previous token id 512");
    expect_error([&] { tok.decode(std::vector<int32_t>{5, 99999}); }, Status::invalid_argument, "token id 99999");
}

TEST(Tokenizer512, RoundTripsStoryLines) {
    const Tokenizer& tok = tok512();
    const auto lines = lines_of(test::read_file(test::shared("data/tinystories_val.txt")));
    ASSERT_GT(lines.size(), 1000u);
    size_t bad = 0, n_tokens = 0;
    for (size_t i = 0; i < lines.size(); ++i) {
        const auto ids = tok.encode(lines[i], i % 2 == 0);
        n_tokens += ids.size();
        if (tok.decode(ids) != lines[i] && ++bad < 5) ADD_FAILURE() << "line " << i << ": '" << lines[i] << "'";
        if (i % 97 == 0) expect_streaming_equals_decode(tok, ids);
    }
    EXPECT_EQ(bad, 0u);
    EXPECT_GT(n_tokens, 100000u);
}

TEST(Tokenizer512, RoundTripsUtf8AndBinary) {
    const Tokenizer& tok = tok512();
    const std::vector<std::string> samples = {
        " ", "  ", "\t\n", " leading and trailing ", "Ünïcödé ½ 日本語 🦙 ✅", "\xC3 x",  // lead byte before a space
        "\xE2\x82", "\xF0\x9F\xA6", "\x80\x81\xBF", "\xFF\xFE\x00\x01", "tab\there", std::string("nul\0byte", 8),
        "\xC3\xA9\xC3", "\xF8\x88\x80\x80\x80", "<s></s><unk>"};
    for (const auto& s : samples) {
        const auto ids = tok.encode(s, true);
        EXPECT_EQ(tok.decode(ids), s) << test::show_ids(ids);
        expect_streaming_equals_decode(tok, ids);
    }

    // Random code points (ASCII-heavy), then random bytes: byte fallback makes every string come back, except those
    // holding U+2581 itself, which SentencePiece reads as a space.
    std::mt19937 rng(12345);
    auto utf8 = [](uint32_t cp) {
        std::string s;
        if (cp < 0x80) {
            s += char(cp);
        } else if (cp < 0x800) {
            s += char(0xC0 | (cp >> 6));
            s += char(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            s += char(0xE0 | (cp >> 12));
            s += char(0x80 | ((cp >> 6) & 0x3F));
            s += char(0x80 | (cp & 0x3F));
        } else {
            s += char(0xF0 | (cp >> 18));
            s += char(0x80 | ((cp >> 12) & 0x3F));
            s += char(0x80 | ((cp >> 6) & 0x3F));
            s += char(0x80 | (cp & 0x3F));
        }
        return s;
    };
    int checked = 0;
    for (int iter = 0; iter < 2000; ++iter) {
        std::string s;
        const int len = int(rng() % 120);
        if (iter < 1000) {
            for (int i = 0; i < len; ++i) {
                const uint32_t r = rng() % 100;
                uint32_t cp = r < 60 ? 0x20 + rng() % 0x5F : r < 80 ? rng() % 0x800 : r < 95 ? rng() % 0x10000
                                                                                           : 0x10000 + rng() % 0x100000;
                if (cp >= 0xD800 && cp < 0xE000) cp = 'x';  // surrogates are not characters
                s += utf8(cp);
            }
        } else {
            for (int i = 0; i < len; ++i) s += char(rng() % 4 == 0 ? ' ' : rng() & 0xFF);
        }
        if (s.find(kMark) != std::string::npos) continue;
        const auto ids = tok.encode(s, iter % 3 == 0);
        ASSERT_EQ(tok.decode(ids), s) << "iteration " << iter << ": " << test::show_ids(ids);
        if (iter % 10 == 0) expect_streaming_equals_decode(tok, ids);
        ++checked;
    }
    EXPECT_GT(checked, 1900);
}

TEST(TokenizerConformance, MatchesReferenceMergeLoop) {
    // Story paragraphs and random strings over a small alphabet (many merges, many ties), with both vocabularies.
    const auto lines = lines_of(test::read_file(test::shared("data/tinystories_val.txt")));
    std::mt19937 rng(7);
    const std::vector<std::string> alphabet = {"a", "b", "e", "t", "h", " ", " ", "\n", ".", "\xC3\xA9", "1", "\xC3"};
    for (const Tokenizer* tok : {&tok512(), &llama2_bin()}) {
        int n = 0;
        for (size_t i = 0; i < lines.size() && n < 150; i += 37) {
            if (lines[i].size() > 400) continue;
            EXPECT_EQ(test::show_ids(tok->encode(lines[i], false)), test::show_ids(reference_encode(*tok, lines[i]))) << lines[i];
            ++n;
        }
        for (int iter = 0; iter < 300; ++iter) {
            std::string s;
            for (int k = int(rng() % 60); k > 0; --k) s += alphabet[rng() % alphabet.size()];
            EXPECT_EQ(test::show_ids(tok->encode(s, false)), test::show_ids(reference_encode(*tok, s))) << "'" << s << "'";
        }
    }
}

TEST(Tokenizer512, WholeFileRoundTrip) {
    // Speed is measured by the bench tool, not here; this checks the whole-file path end to end.
    const std::string text = test::read_file(test::shared("data/tinystories_val.txt"));
    for (const Tokenizer* tok : {&tok512(), &llama2_bin()}) {
        const auto ids = tok->encode(text, true);
        ASSERT_FALSE(ids.empty());
        EXPECT_EQ(ids.front(), tok->bos());
        EXPECT_EQ(tok->decode(ids), text);
    }
}

// ---- hand-built vocabularies: merge order, fallbacks, validation ---------------------------------------------------

TEST(TokenizerVocab, MergeOrderAndTies) {
    VocabBuilder b;
    b.bytes().add(kMark, -1).add("a", -1).add("b", -1).add("c", -1).add("ab", -5).add("bc", -5).add("abc", -9);
    // Equal scores: the leftmost pair merges first; "ab" + "c" then makes "abc".
    Tokenizer tok(b.v);
    EXPECT_EQ(test::show_ids(tok.encode("abc", false)), test::show_ids({b.id(kMark), b.id("abc")}));
    EXPECT_EQ(test::show_ids(tok.encode("bcb", false)), test::show_ids({b.id(kMark), b.id("bc"), b.id("b")}));

    VocabBuilder h;
    h.bytes().add(kMark, -1).add("a", -1).add("b", -1).add("c", -1).add("ab", -6).add("bc", -5);
    Tokenizer tok2(h.v);  // "bc" scores higher and wins although "ab" is further left; no "abc"
    EXPECT_EQ(test::show_ids(tok2.encode("abc", false)), test::show_ids({h.id(kMark), h.id("a"), h.id("bc")}));

    // A NaN score never wins.
    VocabBuilder n;
    n.bytes().add(kMark, -1).add("a", -1).add("b", -1).add("c", -1).add("ab", std::nanf("")).add("bc", -50);
    Tokenizer tok3(n.v);
    EXPECT_EQ(test::show_ids(tok3.encode("abc", false)), test::show_ids({n.id(kMark), n.id("a"), n.id("bc")}));
}

TEST(TokenizerVocab, NoSpacePrefix) {
    VocabBuilder b;
    b.bytes().add(kMark, -1).add("a", -1).add(kMark + "a", -2);
    b.v.add_space_prefix = false;
    Tokenizer tok(b.v);
    EXPECT_EQ(test::show_ids(tok.encode("a a", false)), test::show_ids({b.id("a"), b.id(kMark + "a")}));
    EXPECT_EQ(tok.decode(tok.encode(" a", true)), " a");  // nothing to drop
}

TEST(TokenizerVocab, FallbackWithoutByteTokens) {
    // No <0xXX> tokens: one-byte pieces are used where they exist, unk elsewhere (and decodes to nothing).
    VocabBuilder b;
    b.add(kMark, -1).add("a", -1).add("\n", -1);
    Tokenizer tok(b.v);
    EXPECT_EQ(test::show_ids(tok.encode("a\n\xC3\xA9", false)), test::show_ids({b.id(kMark), b.id("a"), b.id("\n"), 0, 0}));
    EXPECT_EQ(tok.byte_token('a'), b.id("a"));
    EXPECT_EQ(tok.byte_token(0xC3), 0);
    EXPECT_EQ(tok.decode(tok.encode("a\n\xC3\xA9", false)), "a\n");

    // Without unk as well, a byte with no representation is a vocabulary error.
    b.v.unk_id = -1;
    expect_error([&] { Tokenizer t(b.v, "crafted"); }, Status::format,
                 "crafted: byte 0x00 has no byte token <0xXX>, no one-byte piece, and there is no unknown token");
}

TEST(TokenizerVocab, UserDefinedTokensAreSplitOut) {
    VocabBuilder b;
    b.bytes().add(kMark, -1).add("a", -1).add("b", -1).add(kMark + "a", -2).add("<tool>", 0, TokenType::user_defined)
        .add("<tool>x", 0, TokenType::user_defined);
    Tokenizer tok(b.v);
    // Longest first, and the space prefix reappears after each user-defined token as in llama.cpp.
    EXPECT_EQ(test::show_ids(tok.encode("a<tool>xa<tool>b", false)),
              test::show_ids({b.id(kMark + "a"), b.id("<tool>x"), b.id(kMark + "a"), b.id("<tool>"), b.id(kMark), b.id("b")}));
    EXPECT_EQ(test::show_ids(tok.encode("<tool>", true)), test::show_ids({1, b.id("<tool>")}));
    EXPECT_EQ(tok.decode(tok.encode("a<tool>xa", false)), "a<tool>x a");
}

TEST(TokenizerVocab, Validation) {
    auto base = [] {
        VocabBuilder b;
        b.bytes().add(kMark, -1).add("a", -1);
        return b.v;
    };
    {
        Vocab v = base();
        v.scores.pop_back();
        expect_error([&] { Tokenizer t(v, "v.bin"); }, Status::format, "v.bin: 261 pieces but 260 scores and 261 token types");
    }
    {
        Vocab v;
        expect_error([&] { Tokenizer t(v, "v.bin"); }, Status::format, "v.bin: the vocabulary is empty");
    }
    {
        Vocab v = base();
        v.bos_id = 261;
        expect_error([&] { Tokenizer t(v, "v.bin"); }, Status::format, "BOS id 261 is outside the vocabulary (261 tokens)");
        v.bos_id = 1;
        v.eos_id = -1;
        expect_error([&] { Tokenizer t(v, "v.bin"); }, Status::format, "EOS id -1 is outside");
        v.eos_id = 2;
        v.unk_id = 300;
        expect_error([&] { Tokenizer t(v, "v.bin"); }, Status::format, "unknown-token id 300 is outside");
    }
    {
        Vocab v = base();
        v.pieces.push_back("a");
        v.scores.push_back(0);
        v.types.push_back(TokenType::normal);
        expect_error([&] { Tokenizer t(v, "v.bin"); }, Status::format, "tokens 260 and 261 have the same text 'a'");
    }
    {
        Vocab v = base();
        v.types[260] = TokenType::byte;
        expect_error([&] { Tokenizer t(v, "v.bin"); }, Status::format,
                     "token 260 is a byte token but its text 'a' is not of the form <0xXX>");
        v.pieces[260] = "<0x4a>";
        expect_error([&] { Tokenizer t(v, "v.bin"); }, Status::format, "tokens 77 and 260 are both byte tokens for '<0x4a>'");
    }
    {
        Vocab v = base();
        v.types[259] = TokenType(9);
        expect_error([&] { Tokenizer t(v, "v.bin"); }, Status::format, "token 259 has unknown token type 9");
    }
}

// ---- tokenizer.bin loading and corrupt files ----------------------------------------------------------------------

TEST(TokenizerBin, CountsAndConventions) {
    EXPECT_EQ(count_tokenizer_bin(test::shared("models/tok512.bin")), 512);
    EXPECT_EQ(count_tokenizer_bin(test::shared("models/llama2_tokenizer.bin")), 32000);

    const Vocab v = parse_tokenizer_bin(small_bin().s, 5, "small");
    ASSERT_EQ(v.size(), 5u);
    EXPECT_EQ(v.pieces[0], "<unk>");
    EXPECT_EQ(v.pieces[1], "<s>");
    EXPECT_EQ(v.pieces[2], "</s>");
    EXPECT_EQ(v.pieces[3], kMark + "a");
    EXPECT_EQ(v.types[0], TokenType::unknown);
    EXPECT_EQ(v.types[1], TokenType::control);
    EXPECT_EQ(v.types[2], TokenType::control);
    EXPECT_EQ(v.types[3], TokenType::normal);
    EXPECT_EQ(v.scores[4], -2.0f);
    EXPECT_EQ(count_tokenizer_bin_entries(small_bin().s, "small"), 5);

    // NaN and infinite scores are accepted.
    Bin b = small_bin();
    b.token(std::numeric_limits<float>::quiet_NaN(), "c").token(-std::numeric_limits<float>::infinity(), "d");
    const Vocab nan = parse_tokenizer_bin(b.s, 7, "nan");
    EXPECT_TRUE(std::isnan(nan.scores[5]));
    EXPECT_NO_THROW(Tokenizer(nan, "nan").encode("abcd", true));
}

TEST(TokenizerBin, CorruptFiles) {
    const std::string real = test::read_file(test::shared("models/tok512.bin"));
    const auto bin_error = [](const std::string& name, const std::string& bytes, int expected, Status status,
                              const std::string& substring) {
        const std::string path = write_scratch(name, bytes);
        expect_error([&] { load_tokenizer_bin(path, expected); }, status, path + ": " + substring);
    };

    bin_error("short.bin", std::string("\x08\x00", 2), 5, Status::format,
              "truncated: 2 bytes, too short for the 4-byte max_token_length header");
    bin_error("huge_max.bin", Bin().i32(std::numeric_limits<int32_t>::max()).s + small_bin().s.substr(4), 5,
              Status::format, "max_token_length 2147483647 is out of range (1..65536)");
    bin_error("neg_max.bin", Bin().i32(-1).s + small_bin().s.substr(4), 5, Status::format,
              "max_token_length -1 is out of range");
    bin_error("zero_max.bin", Bin().i32(0).s, 5, Status::format, "max_token_length 0 is out of range");
    // tok512 ends with '~' (9 bytes) and U+200A (11 bytes): cutting 15 leaves 5 bytes of the former's fields.
    bin_error("cut_header.bin", real.substr(0, real.size() - 15), 512, Status::format,
              "truncated in token 510 at offset " + std::to_string(real.size() - 20) + ": 5 bytes left");
    {
        // Cut inside the score/length fields of the last token.
        std::string s = small_bin().s;
        s.resize(s.size() - 1 - 5);  // drop "b" and 5 of the 8 header bytes
        bin_error("cut_fields.bin", s, 5, Status::format,
                  "truncated in token 4 at offset 54: 3 bytes left, its score and length need 8");
    }
    bin_error("negative.bin", Bin().i32(8).token(0, "<unk>").f32(0).i32(-5).s + "xxxxxxxx", 3, Status::format,
              "token 1 at offset 17 has negative length -5");
    bin_error("too_long.bin", Bin().i32(4).token(0, "<unk>").s, 1, Status::format,
              "token 0 at offset 4 has length 5, more than max_token_length 4");
    bin_error("past_eof.bin", Bin().i32(8).token(0, "<unk>").f32(0).i32(7).s + "abc", 3, Status::format,
              "truncated in token 1 at offset 17: its length 7 runs past the end of the file (3 bytes left)");
    bin_error("cut_text.bin", real.substr(0, real.size() - 1), 512, Status::format,
              "truncated in token 511 at offset " + std::to_string(real.size() - 11) +
                  ": its length 3 runs past the end of the file (2 bytes left)");
    bin_error("too_few.bin", real, 513, Status::format, "holds 512 tokens but 513 were expected (the model's vocab_size)");
    bin_error("too_many.bin", real, 511, Status::format, "holds 512 tokens but 511 were expected (the model's vocab_size)");
    bin_error("garbage.bin", small_bin().s + "\x01\x02\x03", 5, Status::format,
              "3 bytes of garbage follow the 5 tokens that were expected");
    bin_error("empty_vocab.bin", small_bin().s, 0, Status::invalid_argument, "expected vocabulary size 0 must be at least 1");

    const std::string missing = test::scratch_dir() + "/no_such.bin";
    expect_error([&] { load_tokenizer_bin(missing, 512); }, Status::io, missing + ": cannot open file");
    expect_error([&] { count_tokenizer_bin(missing); }, Status::io, missing + ": cannot open file");

    // A file that parses but whose vocabulary is inconsistent is caught by the tokenizer, naming the file.
    const std::string dup = write_scratch("dup.bin", Bin().i32(8).token(0, "<unk>").token(0, "<s>").token(0, "</s>")
                                                         .token(0, " a").token(0, " a").s);
    expect_error([&] { Tokenizer(load_tokenizer_bin(dup, 5), dup); }, Status::format,
                 dup + ": tokens 3 and 4 have the same text");
}
