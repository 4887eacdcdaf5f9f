// Byte-level BPE (Llama 3): llama.cpp's conformance cases for the llama-bpe vocabulary, the pre-tokenizer on
// hand-checked splits, decoding, special tokens with and without parse_special, end-of-turn tokens, lossless round
// trips of arbitrary bytes, and the vocabulary errors (missing merges, malformed merges, unknown pre-tokenizer).
#include <functional>
#include <random>
#include <sstream>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/tokenizer.h"
#include "common/unicode.h"
#include "formats/gguf.h"
#include "formats/gguf_model.h"
#include "testutil.h"

using namespace si;

namespace {

const std::string kVocabFile = "models/ggml-vocab-llama-bpe.gguf";

const Vocab& llama3_vocab() {
    static const Vocab v = load_gguf_vocab(gguf::Reader::open(test::shared(kVocabFile)));
    return v;
}
const Tokenizer& llama3() {
    static const Tokenizer t(llama3_vocab(), "llama3");
    return t;
}

using Case = test::VocabCase;

std::vector<std::string> split(std::string_view text) {
    std::vector<std::string> words;
    size_t off = 0;
    for (size_t len : unicode::split_llama3(text)) {
        words.emplace_back(text.substr(off, len));
        off += len;
    }
    EXPECT_EQ(off, text.size());
    return words;
}

// A copy of the llama-bpe vocabulary file with some keys replaced (or removed when the value is empty).
std::string edited_vocab_file(const std::string& name, const std::string& drop,
                              const std::function<void(gguf::Writer&)>& edit) {
    const auto r = gguf::Reader::open(test::shared(kVocabFile));
    gguf::Writer w;
    for (const gguf::KeyValue& kv : r.metadata())
        if (kv.key != drop && kv.key != "general.alignment") w.set(kv.key, kv.value);
    edit(w);
    static const std::string dir = test::scratch_dir();  // scratch_dir() empties the directory on each call
    const std::string path = dir + "/" + name;
    w.write(path);
    return path;
}

}  // namespace

TEST(TokenizerBpe, LlamaBpeConformance) {
    const Tokenizer& tok = llama3();
    EXPECT_TRUE(tok.is_bpe());
    EXPECT_EQ(tok.n_vocab(), 128256);
    EXPECT_EQ(tok.bos(), 128000);
    const std::vector<Case> cases = test::vocab_conformance_cases(kVocabFile);
    ASSERT_EQ(cases.size(), 46u);
    int matched = 0;
    for (const Case& c : cases) {
        const std::vector<int32_t> got = tok.encode(c.text, false);
        EXPECT_EQ(test::show_ids(got), test::show_ids(c.ids)) << "input: '" << c.text << "'";
        matched += got == c.ids;
        EXPECT_EQ(tok.decode(got), c.text);
        // With BOS: <|begin_of_text|>, then the same ids; BOS decodes to nothing.
        const std::vector<int32_t> with_bos = tok.encode(c.text, true);
        ASSERT_FALSE(with_bos.empty());
        EXPECT_EQ(with_bos[0], 128000);
        EXPECT_EQ(std::vector<int32_t>(with_bos.begin() + 1, with_bos.end()), got);
        EXPECT_EQ(tok.decode(with_bos), c.text);
    }
    EXPECT_EQ(matched, int(cases.size()));
}

TEST(TokenizerBpe, PreTokenizerSplits) {
    using V = std::vector<std::string>;
    EXPECT_EQ(split("Hello world"), (V{"Hello", " world"}));
    EXPECT_EQ(split("I'm you'RE they'll"), (V{"I", "'m", " you", "'RE", " they", "'ll"}));
    EXPECT_EQ(split("1234567"), (V{"123", "456", "7"}));
    EXPECT_EQ(split("x   y"), (V{"x", "  ", " y"}));
    EXPECT_EQ(split("a  \n\n b"), (V{"a", "  \n\n", " b"}));
    EXPECT_EQ(split("end   "), (V{"end", "   "}));
    EXPECT_EQ(split(" !!?\n\nok"), (V{" !!?\n\n", "ok"}));
    EXPECT_EQ(split("$x"), (V{"$x"}));
    EXPECT_EQ(split("\xC3\x84pfel 42\xC2\xB2"), (V{"\xC3\x84pfel", " ", "42\xC2\xB2"}));  // Äpfel 42²: ² is \p{N}
    EXPECT_EQ(split("\xE6\x88\x91\xE6\x83\xB3"), (V{"\xE6\x88\x91\xE6\x83\xB3"}));     // CJK letters: one word
    // Malformed UTF-8 stays in the words byte for byte.
    EXPECT_EQ(split("a\xFF\xFE b"), (V{"a", "\xFF\xFE", " b"}));
}

TEST(TokenizerBpe, UnicodeClasses) {
    EXPECT_TRUE(unicode::is_letter('a'));
    EXPECT_TRUE(unicode::is_letter(0x4E2D));   // 中
    EXPECT_TRUE(unicode::is_letter(0x0436));   // ж
    EXPECT_FALSE(unicode::is_letter('1'));
    EXPECT_FALSE(unicode::is_letter(0x1F999));  // 🦙
    EXPECT_TRUE(unicode::is_number(0x0663));   // Arabic-Indic three
    EXPECT_TRUE(unicode::is_number(0x2167));   // Roman numeral eight (Nl)
    EXPECT_FALSE(unicode::is_number('x'));
    EXPECT_TRUE(unicode::is_whitespace(0x3000));
    EXPECT_FALSE(unicode::is_whitespace(0x200B));  // zero width space is not White_Space
    // GPT-2's byte mapping: printable bytes are themselves, space is U+0120, and it is a bijection.
    EXPECT_EQ(unicode::byte_to_text(' '), "\xC4\xA0");
    EXPECT_EQ(unicode::byte_to_text('A'), "A");
    for (int b = 0; b < 256; ++b) {
        const std::string& t = unicode::byte_to_text(uint8_t(b));
        EXPECT_EQ(unicode::text_to_byte(unicode::decode_utf8(t, 0).first), b);
    }
}

TEST(TokenizerBpe, SpecialTokensOnlyWhenAllowed) {
    const Tokenizer& tok = llama3();
    const std::string text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>";
    const auto plain = tok.encode(text, false);
    for (int32_t id : plain) EXPECT_FALSE(tok.is_control(id)) << id;
    EXPECT_EQ(tok.decode(plain), text);
    const auto special = tok.encode(text, false, true);
    EXPECT_EQ(test::show_ids(special), "128006 882 128007 271 13347 128009");
    // Control tokens decode to nothing.
    EXPECT_EQ(tok.decode(special), "user\n\nHi");
}

TEST(TokenizerBpe, EndOfTurnTokens) {
    const Tokenizer& tok = llama3();
    EXPECT_TRUE(tok.is_end_of_turn(128009));   // <|eot_id|>
    EXPECT_FALSE(tok.is_end_of_turn(128008));  // <|reserved_special_token_4|> in this (Llama 3.0) vocabulary
    EXPECT_TRUE(tok.is_end_of_turn(128001));   // <|end_of_text|> (EOS)
    EXPECT_FALSE(tok.is_end_of_turn(128000));  // <|begin_of_text|>
    EXPECT_FALSE(tok.is_end_of_turn(128006));
    EXPECT_FALSE(tok.is_end_of_turn(13347));
}

TEST(TokenizerBpe, RoundTripsArbitraryBytes) {
    const Tokenizer& tok = llama3();
    std::mt19937 rng(7);
    const std::string alphabet[] = {"a", "Z", " ", "  ", "\n", "\r\n", "'s", "'LL", "7", "\xC3\xA9", "\xE4\xB8\xAD",
                                    "\xF0\x9F\xA6\x99", "!", "\t", "\xE2\x80\x8D", "\xFF", "\xC3", "\x80", "0"};
    for (int trial = 0; trial < 300; ++trial) {
        std::string s;
        const int n = int(rng() % 40);
        for (int i = 0; i < n; ++i) s += trial % 3 == 0 ? std::string(1, char(rng())) : alphabet[rng() % std::size(alphabet)];
        const auto ids = tok.encode(s, false);
        ASSERT_EQ(tok.decode(ids), s) << "trial " << trial;
        std::string streamed;
        int32_t prev = -1;
        for (int32_t id : ids) streamed += tok.piece(prev, id), prev = id;
        EXPECT_EQ(streamed, s);
    }
    // A long run of spaces (one pre-tokenizer word) and a long word merge without trouble.
    const std::string spaces(5000, ' ');
    EXPECT_EQ(tok.decode(tok.encode(spaces + "x", false)), spaces + "x");
    std::string word;
    for (int i = 0; i < 3000; ++i) word += char('a' + i % 26);
    EXPECT_EQ(tok.decode(tok.encode(word, false)), word);
}

TEST(TokenizerBpe, GgufWithoutMergesNamesTheKey) {
    const std::string path = edited_vocab_file("no-merges.gguf", "tokenizer.ggml.merges", [](gguf::Writer&) {});
    test::expect_error([&] { load_gguf_vocab(gguf::Reader::open(path)); }, Status::format, "tokenizer.ggml.merges is missing");
    const std::string empty = edited_vocab_file("empty-merges.gguf", "", [](gguf::Writer& w) { w.set_strs("tokenizer.ggml.merges", {}); });
    test::expect_error([&] { load_gguf_vocab(gguf::Reader::open(empty)); }, Status::format, "tokenizer.ggml.merges is empty");
    // Through the CLI too: a clear message and a non-zero exit, no crash.
    const test::CliResult r = test::run_cli({"tokenize", "--tokenizer", path, "--prompt", "hi"});
    EXPECT_NE(r.exit_code, 0);
    EXPECT_EQ(r.signal, 0);
    EXPECT_NE(r.err.find("tokenizer.ggml.merges is missing"), std::string::npos) << r.err;
    const test::CliResult ok = test::run_cli({"tokenize", "--tokenizer", test::shared(kVocabFile), "--prompt", "Hello world"});
    EXPECT_EQ(ok.exit_code, 0) << ok.err;
    EXPECT_EQ(ok.out, "9906 1917\n");
}

TEST(TokenizerBpe, VocabularyErrors) {
    Vocab v = llama3_vocab();
    v.merges[5] = "nospace";
    test::expect_error([&] { Tokenizer t(v, "v"); }, Status::format, "tokenizer.ggml.merges[5] is not two symbols");
    v = llama3_vocab();
    v.merges[0] = "a  b";
    test::expect_error([&] { Tokenizer t(v, "v"); }, Status::format, "tokenizer.ggml.merges[0]");
    v = llama3_vocab();
    v.pre = "qwen2";
    test::expect_error([&] { Tokenizer t(v, "v"); }, Status::unsupported, "pre-tokenizer 'qwen2'");
    v = llama3_vocab();
    v.merges.clear();
    test::expect_error([&] { Tokenizer t(v, "v"); }, Status::format, "no merges");
    v = llama3_vocab();
    v.pieces[32] = "not-a-byte";  // 'A' (id 32) gone: byte 0x41 has no token and there is no unk
    test::expect_error([&] { Tokenizer t(v, "v"); }, Status::format, "byte 0x41");
    v = llama3_vocab();
    v.model = "bert";
    test::expect_error([&] { Tokenizer t(v, "v"); }, Status::unsupported, "tokenizer model 'bert'");
}

TEST(TokenizerBpe, GgufKeys) {
    const Vocab& v = llama3_vocab();
    EXPECT_EQ(v.merges.size(), 280147u);
    EXPECT_EQ(v.merges[0], "\xC4\xA0 \xC4\xA0");
    EXPECT_EQ(v.unk_id, -1);
    EXPECT_FALSE(v.add_space_prefix);
    EXPECT_EQ(v.pre, "llama-bpe");
}
