// The template lexer: Jinja's tokenisation with trim_blocks and lstrip_blocks (jinja2/lexer.py), then the tokens of
// each tag.
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "chat/internal.h"

namespace si::chat {

namespace {

[[noreturn]] void syntax(int line, const std::string& msg) { throw TemplateError(TemplateError::Kind::syntax, line, msg); }

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

int count_lines(std::string_view s) { return int(std::count(s.begin(), s.end(), '\n')); }

std::string rstrip(std::string s) {
    while (!s.empty() && is_space(s.back())) s.pop_back();
    return s;
}

// Python's "unicode-escape" decoding of a string literal's body (as Jinja's lexer applies).
std::string unescape(std::string_view s, int line) {
    std::string out;
    for (size_t k = 0; k < s.size(); ++k) {
        if (s[k] != '\\' || k + 1 == s.size()) {
            out += s[k];
            continue;
        }
        const char c = s[++k];
        const auto hex = [&](int n) {
            uint32_t v = 0;
            for (int d = 0; d < n; ++d) {
                const char h = k + 1 + size_t(d) < s.size() ? s[k + 1 + size_t(d)] : 0;
                if (!std::isxdigit(uint8_t(h))) syntax(line, "truncated \\x, \\u or \\U escape in a string literal");
                v = v * 16 + uint32_t(std::isdigit(uint8_t(h)) ? h - '0' : (std::tolower(h) - 'a' + 10));
            }
            k += size_t(n);
            return v;
        };
        switch (c) {
            case '\n': break;
            case '\\': out += '\\'; break;
            case '\'': out += '\''; break;
            case '"': out += '"'; break;
            case 'a': out += '\a'; break;
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'v': out += '\v'; break;
            case 'x': unicode::append_utf8(out, hex(2)); break;
            case 'u': unicode::append_utf8(out, hex(4)); break;
            case 'U': {
                const uint32_t v = hex(8);
                if (v > 0x10FFFF) syntax(line, "\\U escape beyond U+10FFFF in a string literal");
                unicode::append_utf8(out, v);
                break;
            }
            case 'N': syntax(line, "\\N{...} escapes are not supported");
            default:
                if (c >= '0' && c <= '7') {
                    uint32_t v = uint32_t(c - '0');
                    for (int d = 0; d < 2 && k + 1 < s.size() && s[k + 1] >= '0' && s[k + 1] <= '7'; ++d)
                        v = v * 8 + uint32_t(s[++k] - '0');
                    unicode::append_utf8(out, v);
                } else {
                    out += '\\';
                    out += c;
                }
        }
    }
    return out;
}

// Tokens of a tag from pos up to its closing delimiter ("}}" or "%}"); returns the position after the delimiter
// (and sets strip to the whitespace-control sign before it: '-', '+' or 0).
size_t lex_tag(const std::string& src, size_t pos, bool block, int& line, std::vector<Token>& out, char& strip) {
    std::vector<char> balance;
    const char* close = block ? "%}" : "}}";
    while (true) {
        while (pos < src.size() && is_space(src[pos])) {
            if (src[pos] == '\n') ++line;
            ++pos;
        }
        if (pos >= src.size()) syntax(line, std::string("unexpected end of template, expected '") + close + "'");
        if (balance.empty()) {
            if ((src[pos] == '-' || (block && src[pos] == '+')) && src.compare(pos + 1, 2, close) == 0) {
                strip = src[pos];
                out.push_back(Token{Token::Type::end, "", 0, 0, line});
                return pos + 3;
            }
            if (src.compare(pos, 2, close) == 0) {
                strip = 0;
                out.push_back(Token{Token::Type::end, "", 0, 0, line});
                return pos + 2;
            }
        }
        const char c = src[pos];
        Token t;
        t.line = line;
        if (std::isalpha(uint8_t(c)) || c == '_') {
            size_t e = pos;
            while (e < src.size() && (std::isalnum(uint8_t(src[e])) || src[e] == '_')) ++e;
            t.type = Token::Type::name;
            t.text = src.substr(pos, e - pos);
            pos = e;
        } else if (std::isdigit(uint8_t(c))) {
            size_t e = pos;
            const auto digits = [&] {
                while (e < src.size() && (std::isdigit(uint8_t(src[e])) || (src[e] == '_' && e + 1 < src.size() && std::isdigit(uint8_t(src[e + 1]))))) ++e;
            };
            digits();
            bool is_float = false;
            if (e + 1 < src.size() && src[e] == '.' && std::isdigit(uint8_t(src[e + 1]))) {
                ++e;
                digits();
                is_float = true;
            }
            if (e < src.size() && (src[e] == 'e' || src[e] == 'E')) {
                size_t x = e + 1;
                if (x < src.size() && (src[x] == '+' || src[x] == '-')) ++x;
                if (x < src.size() && std::isdigit(uint8_t(src[x]))) {
                    e = x;
                    digits();
                    is_float = true;
                }
            }
            std::string num;
            for (size_t k = pos; k < e; ++k)
                if (src[k] != '_') num += src[k];
            if (is_float) {
                t.type = Token::Type::number;
                t.f = std::strtod(num.c_str(), nullptr);
            } else {
                t.type = Token::Type::integer;
                errno = 0;
                t.i = std::strtoll(num.c_str(), nullptr, 10);
                if (errno == ERANGE) syntax(line, "integer literal " + num + " is too large");
            }
            t.text = num;
            pos = e;
        } else if (c == '\'' || c == '"') {
            size_t e = pos + 1;
            while (e < src.size() && src[e] != c) e += src[e] == '\\' ? 2 : 1;
            if (e >= src.size()) syntax(line, "unterminated string literal");
            t.type = Token::Type::string;
            t.text = unescape(std::string_view(src).substr(pos + 1, e - pos - 1), line);
            line += count_lines(std::string_view(src).substr(pos, e - pos));
            pos = e + 1;
        } else {
            static const char* const kOps[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%", "~", "[", "]",
                                               "(", ")", "{", "}", ">", "<", "=", ".", ":", "|", ",", ";"};
            const char* hit = nullptr;
            for (const char* op : kOps)
                if (src.compare(pos, std::strlen(op), op) == 0) {
                    hit = op;
                    break;
                }
            if (!hit) syntax(line, std::string("unexpected character '") + c + "'");
            t.type = Token::Type::op;
            t.text = hit;
            pos += t.text.size();
            if (t.text == "(" || t.text == "[" || t.text == "{") {
                balance.push_back(t.text == "(" ? ')' : t.text == "[" ? ']' : '}');
            } else if (t.text == ")" || t.text == "]" || t.text == "}") {
                if (balance.empty()) syntax(line, "unexpected '" + t.text + "'");
                if (balance.back() != t.text[0])
                    syntax(line, "unexpected '" + t.text + "', expected '" + std::string(1, balance.back()) + "'");
                balance.pop_back();
            }
        }
        out.push_back(std::move(t));
    }
}

// After a tag's closing delimiter: '-' strips all following whitespace, plain (for blocks and comments) one newline.
size_t after_close(const std::string& src, size_t pos, char strip, bool trims, int& line) {
    if (strip == '-') {
        while (pos < src.size() && is_space(src[pos])) {
            if (src[pos] == '\n') ++line;
            ++pos;
        }
    } else if (strip == 0 && trims && pos < src.size() && src[pos] == '\n') {
        ++line;
        ++pos;
    }
    return pos;
}

// "raw" or "endraw" as the whole content of a block tag at pos ("{%"); returns the end of the tag or npos.
size_t match_word_tag(const std::string& src, size_t pos, const char* word, char& open_sign, char& close_sign) {
    size_t p = pos + 2;
    open_sign = p < src.size() && (src[p] == '-' || src[p] == '+') ? src[p++] : 0;
    while (p < src.size() && is_space(src[p])) ++p;
    const size_t n = std::strlen(word);
    if (src.compare(p, n, word) != 0) return std::string::npos;
    p += n;
    if (p < src.size() && (std::isalnum(uint8_t(src[p])) || src[p] == '_')) return std::string::npos;
    while (p < src.size() && is_space(src[p])) ++p;
    close_sign = 0;
    if (p < src.size() && (src[p] == '-' || src[p] == '+')) close_sign = src[p++];
    if (src.compare(p, 2, "%}") != 0) return std::string::npos;
    return p + 2;
}

}  // namespace

std::vector<Segment> lex(const std::string& input) {
    // Newlines normalised to \n, one trailing newline dropped (keep_trailing_newline = False).
    std::string src;
    src.reserve(input.size());
    for (size_t k = 0; k < input.size(); ++k) {
        if (input[k] == '\r') {
            src += '\n';
            if (k + 1 < input.size() && input[k + 1] == '\n') ++k;
        } else {
            src += input[k];
        }
    }
    if (!src.empty() && src.back() == '\n') src.pop_back();

    std::vector<Segment> segs;
    size_t pos = 0;
    int line = 1;
    bool line_starting = true;
    const auto add_text = [&](std::string text, int at) {
        if (!text.empty()) segs.push_back(Segment{Segment::Type::text, std::move(text), {}, at});
    };
    while (pos < src.size()) {
        size_t start = pos;
        char kind = 0;
        for (; (start = src.find('{', start)) != std::string::npos; ++start) {
            if (start + 1 < src.size() && (src[start + 1] == '{' || src[start + 1] == '%' || src[start + 1] == '#')) {
                kind = src[start + 1];
                break;
            }
        }
        if (start == std::string::npos) {
            add_text(src.substr(pos), line);
            break;
        }
        std::string text = src.substr(pos, start - pos);
        const int text_line = line;
        line += count_lines(text);
        const char sign = start + 2 < src.size() && (src[start + 2] == '-' || src[start + 2] == '+') ? src[start + 2] : 0;
        if (sign == '-') {
            text = rstrip(std::move(text));
        } else if (sign != '+' && kind != '{') {
            // lstrip_blocks: spaces and tabs between the line start and a block or comment tag go.
            const size_t l_pos = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
            if (l_pos > 0 || line_starting) {
                bool only_space = l_pos < text.size();
                for (size_t k = l_pos; k < text.size(); ++k) only_space = only_space && is_space(text[k]);
                if (only_space) text.resize(l_pos);
            }
        }
        add_text(std::move(text), text_line);
        const size_t body = start + 2 + (sign ? 1 : 0);
        if (kind == '#') {
            const size_t end = src.find("#}", body);
            if (end == std::string::npos) syntax(line, "missing end of comment tag");
            char close = 0;
            if (end > body && (src[end - 1] == '-' || src[end - 1] == '+')) close = src[end - 1];
            line += count_lines(std::string_view(src).substr(body, end - body));
            pos = after_close(src, end + 2, close, true, line);
            line_starting = pos > 0 && src[pos - 1] == '\n';
            continue;
        }
        char raw_open = 0, raw_close = 0;
        if (kind == '%') {
            const size_t raw_end = match_word_tag(src, start, "raw", raw_open, raw_close);
            if (raw_end != std::string::npos) {
                size_t p = raw_close == '-' ? after_close(src, raw_end, '-', false, line) : raw_end;
                // The raw text runs to the first {% endraw %}.
                size_t e = p;
                size_t tag_end = std::string::npos;
                char eo = 0, ec = 0;
                for (; (e = src.find("{%", e)) != std::string::npos; ++e)
                    if ((tag_end = match_word_tag(src, e, "endraw", eo, ec)) != std::string::npos) break;
                if (e == std::string::npos) syntax(line, "missing end of raw directive");
                std::string raw = src.substr(p, e - p);
                const int raw_line = line;
                line += count_lines(raw);
                if (eo == '-') raw = rstrip(std::move(raw));
                add_text(std::move(raw), raw_line);
                pos = after_close(src, tag_end, ec, true, line);
                line_starting = pos > 0 && src[pos - 1] == '\n';
                continue;
            }
        }
        Segment seg;
        seg.type = kind == '{' ? Segment::Type::output : Segment::Type::block;
        seg.line = line;
        char close = 0;
        const size_t end = lex_tag(src, body, kind == '%', line, seg.tokens, close);
        segs.push_back(std::move(seg));
        pos = after_close(src, end, close, kind == '%', line);
        line_starting = pos > 0 && src[pos - 1] == '\n';
    }
    return segs;
}

}  // namespace si::chat
