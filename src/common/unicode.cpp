#include "common/unicode.h"

#include <algorithm>
#include <array>

namespace si::unicode {

namespace {

struct CodepointRange {
    uint32_t lo, hi;
};

#include "common/unicode_tables.inc"

template <size_t N>
bool in_ranges(const CodepointRange (&r)[N], uint32_t cp) {
    const auto it = std::upper_bound(std::begin(r), std::end(r), cp,
                                     [](uint32_t c, const CodepointRange& x) { return c < x.lo; });
    return it != std::begin(r) && cp <= std::prev(it)->hi;
}

struct ByteMap {
    std::array<std::string, 256> text;
    std::array<int32_t, 324> byte;  // code points 0..323 cover the whole mapping
    ByteMap() {
        byte.fill(-1);
        uint32_t next = 256;
        for (int b = 0; b < 256; ++b) {
            const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            const uint32_t cp = printable ? uint32_t(b) : next++;
            append_utf8(text[size_t(b)], cp);
            byte[cp] = b;
        }
    }
};

const ByteMap& byte_map() {
    static const ByteMap m;
    return m;
}

}  // namespace

bool is_letter(uint32_t cp) { return in_ranges(kLetterRanges, cp); }
bool is_number(uint32_t cp) { return in_ranges(kNumberRanges, cp); }

bool is_whitespace(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
           cp == 0x3000;
}

std::pair<uint32_t, size_t> decode_utf8(std::string_view s, size_t off) {
    constexpr std::pair<uint32_t, size_t> bad{0xFFFD, 1};
    const uint8_t c = uint8_t(s[off]);
    if (c < 0x80) return {c, 1};
    size_t len;
    uint32_t cp, min;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
    else return bad;
    if (off + len > s.size()) return bad;
    for (size_t i = 1; i < len; ++i) {
        const uint8_t d = uint8_t(s[off + i]);
        if ((d & 0xC0) != 0x80) return bad;
        cp = (cp << 6) | (d & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return bad;
    return {cp, len};
}

void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out += char(cp);
    } else if (cp < 0x800) {
        out += char(0xC0 | (cp >> 6));
        out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += char(0xE0 | (cp >> 12));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    } else {
        out += char(0xF0 | (cp >> 18));
        out += char(0x80 | ((cp >> 12) & 0x3F));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    }
}

std::vector<size_t> split_llama3(std::string_view text) {
    // Code points with their byte offsets; positions past the end read as "none" (no class at all).
    std::vector<uint32_t> cps;
    std::vector<size_t> at;
    for (size_t off = 0; off < text.size();) {
        const auto [cp, len] = decode_utf8(text, off);
        cps.push_back(cp);
        at.push_back(off);
        off += len;
    }
    at.push_back(text.size());
    const size_t n = cps.size();
    constexpr uint32_t kNone = 0xFFFFFFFF;
    const auto cpt = [&](size_t i) { return i < n ? cps[i] : kNone; };
    const auto letter = [&](size_t i) { return i < n && is_letter(cps[i]); };
    const auto number = [&](size_t i) { return i < n && is_number(cps[i]); };
    const auto space = [&](size_t i) { return i < n && is_whitespace(cps[i]); };
    const auto lower = [](uint32_t c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; };

    std::vector<size_t> words;
    size_t prev = 0;
    const auto emit = [&](size_t end) {
        if (end > prev) words.push_back(at[end] - at[prev]);
        prev = end;
    };
    for (size_t pos = 0; pos < n;) {
        const uint32_t c = cps[pos];
        // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if (c == '\'' && pos + 1 < n) {
            const uint32_t c1 = lower(cpt(pos + 1));
            if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
                emit(pos += 2);
                continue;
            }
            if (pos + 2 < n) {
                const uint32_t c2 = lower(cpt(pos + 2));
                if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
                    emit(pos += 3);
                    continue;
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if (c != '\r' && c != '\n' && !number(pos) && (letter(pos) || letter(pos + 1))) {
            ++pos;
            while (letter(pos)) ++pos;
            emit(pos);
            continue;
        }
        // \p{N}{1,3}
        if (number(pos)) {
            size_t start = pos;
            while (number(pos)) {
                if (++pos - start >= 3) {
                    emit(pos);
                    start = pos;
                }
            }
            emit(pos);
            continue;
        }
        //  ?[^\s\p{L}\p{N}]+[\r\n]*
        const size_t p2 = c == ' ' ? pos + 1 : pos;
        const auto other = [&](size_t i) { return i < n && !space(i) && !letter(i) && !number(i); };
        if (other(p2)) {
            pos = p2;
            while (other(pos)) ++pos;
            while (cpt(pos) == '\r' || cpt(pos) == '\n') ++pos;
            emit(pos);
            continue;
        }
        size_t n_space = 0, last_newline_end = 0;
        while (space(pos + n_space)) {
            const uint32_t s = cps[pos + n_space];
            if (s == '\r' || s == '\n') last_newline_end = pos + n_space + 1;
            ++n_space;
        }
        // \s*[\r\n]+
        if (last_newline_end > 0) {
            emit(pos = last_newline_end);
            continue;
        }
        // \s+(?!\S): all but the last space when something follows
        if (n_space > 1 && pos + n_space < n) {
            emit(pos += n_space - 1);
            continue;
        }
        // \s+
        if (n_space > 0) {
            emit(pos += n_space);
            continue;
        }
        emit(++pos);  // nothing matched: the character alone
    }
    return words;
}

const std::string& byte_to_text(uint8_t b) { return byte_map().text[b]; }

int text_to_byte(uint32_t cp) { return cp < 324 ? byte_map().byte[cp] : -1; }

}  // namespace si::unicode
