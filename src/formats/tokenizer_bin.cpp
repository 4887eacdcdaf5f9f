#include "formats/tokenizer_bin.h"

#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "common/error.h"

namespace si {

namespace {

static_assert(std::endian::native == std::endian::little, "tokenizer.bin is read by copying little-endian fields");

// A real tokenizer.bin is well under 1 MB; refuse to buffer anything that cannot be one.
constexpr uint64_t kMaxFileBytes = uint64_t(1) << 30;

struct Entry {
    float score;
    std::string_view text;
};

// Walks the entries, checking every length against max_token_length and the bytes that remain.
class EntryReader {
public:
    EntryReader(std::string_view bytes, const std::string& what) : b_(bytes), what_(what) {
        if (b_.size() < 4)
            fail(Status::format, what_ + ": truncated: " + std::to_string(b_.size()) +
                                     " bytes, too short for the 4-byte max_token_length header");
        std::memcpy(&max_len_, b_.data(), 4);
        if (max_len_ < 1 || max_len_ > kTokenizerBinMaxTokenLength)
            fail(Status::format, what_ + ": max_token_length " + std::to_string(max_len_) + " is out of range (1.." +
                                     std::to_string(kTokenizerBinMaxTokenLength) + "); not a tokenizer.bin file?");
        off_ = 4;
    }

    bool done() const { return off_ == b_.size(); }
    size_t offset() const { return off_; }
    size_t left() const { return b_.size() - off_; }

    Entry next(int index) {
        const std::string at = "token " + std::to_string(index) + " at offset " + std::to_string(off_);
        if (left() < 8)
            fail(Status::format, what_ + ": truncated in " + at + ": " + std::to_string(left()) +
                                     " bytes left, its score and length need 8");
        Entry e;
        int32_t len;
        std::memcpy(&e.score, b_.data() + off_, 4);
        std::memcpy(&len, b_.data() + off_ + 4, 4);
        if (len < 0) fail(Status::format, what_ + ": " + at + " has negative length " + std::to_string(len));
        if (len > max_len_)
            fail(Status::format, what_ + ": " + at + " has length " + std::to_string(len) +
                                     ", more than max_token_length " + std::to_string(max_len_));
        if (size_t(len) > left() - 8)
            fail(Status::format, what_ + ": truncated in " + at + ": its length " + std::to_string(len) +
                                     " runs past the end of the file (" + std::to_string(left() - 8) + " bytes left)");
        e.text = b_.substr(off_ + 8, size_t(len));
        off_ += 8 + size_t(len);
        return e;
    }

private:
    std::string_view b_;
    const std::string& what_;
    size_t off_ = 0;
    int32_t max_len_ = 0;
};

std::string read_whole_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f) fail(Status::io, path + ": cannot open file: " + std::strerror(errno));
    const std::streamoff size = f.tellg();
    if (size < 0) fail(Status::io, path + ": cannot determine the file size");
    if (uint64_t(size) > kMaxFileBytes)
        fail(Status::format, path + ": " + std::to_string(size) + " bytes is far too large for a tokenizer.bin");
    std::string bytes(size_t(size), '\0');
    f.seekg(0);
    if (!f.read(bytes.data(), size)) fail(Status::io, path + ": read error");
    return bytes;
}

bool is_byte_piece(std::string_view s) {
    const auto hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F') || (c >= 'a' && c <= 'f'); };
    return s.size() == 6 && s.substr(0, 3) == "<0x" && hex(s[3]) && hex(s[4]) && s[5] == '>';
}

std::string spaces_to_marks(std::string_view s) {
    std::string r;
    r.reserve(s.size() + 8);
    for (const char c : s) {
        if (c == ' ')
            r += "\xE2\x96\x81";
        else
            r += c;
    }
    return r;
}

}  // namespace

int count_tokenizer_bin_entries(std::string_view bytes, const std::string& what) {
    EntryReader r(bytes, what);
    int n = 0;
    while (!r.done()) r.next(n++);
    return n;
}

Vocab parse_tokenizer_bin(std::string_view bytes, int expected_vocab_size, const std::string& what) {
    if (expected_vocab_size < 1)
        fail(Status::invalid_argument,
             what + ": expected vocabulary size " + std::to_string(expected_vocab_size) + " must be at least 1");
    const std::string expected = std::to_string(expected_vocab_size);
    EntryReader r(bytes, what);
    Vocab v;
    v.pieces.reserve(size_t(expected_vocab_size));
    v.scores.reserve(size_t(expected_vocab_size));
    v.types.reserve(size_t(expected_vocab_size));
    for (int i = 0; i < expected_vocab_size; ++i) {
        if (r.done())
            fail(Status::format, what + ": holds " + std::to_string(i) + " tokens but " + expected +
                                     " were expected (the model's vocab_size)");
        const Entry e = r.next(i);
        TokenType t = TokenType::normal;
        std::string text;
        if (i == 0) {
            t = TokenType::unknown;
            text = e.text;
        } else if (i == 1 || i == 2) {
            t = TokenType::control;
            text = e.text;
            // llama2.c's exporter wraps <s> and </s> in newlines; every other source spells them bare.
            if (text.size() >= 2 && text.front() == '\n' && text.back() == '\n') text = text.substr(1, text.size() - 2);
        } else if (is_byte_piece(e.text)) {
            t = TokenType::byte;
            text = e.text;
        } else {
            text = spaces_to_marks(e.text);
        }
        v.pieces.push_back(std::move(text));
        v.scores.push_back(e.score);
        v.types.push_back(t);
    }
    if (!r.done()) {
        // Say how many tokens the file really holds when the rest parses as entries, else how many bytes follow.
        const size_t trailing = r.left();
        int extra = 0;
        try {
            while (!r.done()) r.next(expected_vocab_size + extra++);
        } catch (const Error&) {
            fail(Status::format, what + ": " + std::to_string(trailing) + " bytes of garbage follow the " + expected +
                                     " tokens that were expected (the model's vocab_size)");
        }
        fail(Status::format, what + ": holds " + std::to_string(expected_vocab_size + extra) + " tokens but " +
                                 expected + " were expected (the model's vocab_size)");
    }
    v.unk_id = 0;
    v.bos_id = 1;
    v.eos_id = 2;
    v.add_space_prefix = true;
    return v;
}

Vocab load_tokenizer_bin(const std::string& path, int expected_vocab_size) {
    return parse_tokenizer_bin(read_whole_file(path), expected_vocab_size, path);
}

int count_tokenizer_bin(const std::string& path) { return count_tokenizer_bin_entries(read_whole_file(path), path); }

}  // namespace si
