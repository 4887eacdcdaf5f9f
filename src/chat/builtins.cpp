// Built-in filters, tests and the str / dict / list methods templates call, with Python's semantics.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <set>

#include "chat/internal.h"

namespace si::chat {

void runtime_error(int line, const std::string& msg) { throw TemplateError(TemplateError::Kind::runtime, line, msg); }
void unsupported_error(int line, const std::string& msg) {
    throw TemplateError(TemplateError::Kind::unsupported, line, msg);
}

std::vector<std::pair<size_t, size_t>> code_points(const std::string& s) {
    std::vector<std::pair<size_t, size_t>> cps;
    for (size_t off = 0; off < s.size();) {
        const size_t len = decode_char(s, off).second;
        cps.emplace_back(off, len);
        off += len;
    }
    return cps;
}

namespace {

using K = Value::Kind;

std::string object_name(const Value& v) {
    // appended piecewise: "'" + std::string trips GCC 12's -Wrestrict false positive (GCC bug 105329)
    std::string s = "'";
    s += v.type_name();
    s += " object'";
    return s;
}

[[noreturn]] void fail_undefined(const Value& v, int line) {
    runtime_error(line, v.s.empty() ? "value is undefined" : v.s);
}

bool is_int_like(const Value& v) { return v.kind == K::integer || v.kind == K::boolean; }
int64_t as_int(const Value& v) { return v.kind == K::boolean ? int64_t(v.b) : v.i; }
double as_double(const Value& v) {
    return v.kind == K::number ? v.f : double(as_int(v));
}

// Python's str.isspace set.
bool py_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

std::string py_strip(const std::string& s, const Value* chars, bool left, bool right) {
    std::vector<uint32_t> set;
    const bool custom = chars && chars->kind == K::string;
    if (custom)
        for (const auto& [o, l] : code_points(chars->s)) set.push_back(decode_char(chars->s, o).first);
    const auto strip_it = [&](uint32_t c) { return custom ? std::find(set.begin(), set.end(), c) != set.end() : py_space(c); };
    const auto cps = code_points(s);
    size_t b = 0, e = cps.size();
    if (left)
        while (b < e && strip_it(decode_char(s, cps[b].first).first)) ++b;
    if (right)
        while (e > b && strip_it(decode_char(s, cps[e - 1].first).first)) --e;
    if (b == e) return "";
    return s.substr(cps[b].first, cps[e - 1].first + cps[e - 1].second - cps[b].first);
}

// Simple case mapping for ASCII, Latin-1, Latin Extended-A, Greek and Cyrillic (other scripts are left as they
// are; docs/CHAT.md). Python's full mapping also expands a few characters (ß -> SS), done here for ß.
uint32_t upper_cp(uint32_t c) {
    if (c >= 'a' && c <= 'z') return c - 32;
    if ((c >= 0xE0 && c <= 0xFE && c != 0xF7)) return c - 32;
    if (c == 0xFF) return 0x178;
    if (c == 0xB5) return 0x39C;
    if (c >= 0x100 && c <= 0x17F && c != 0x130 && c != 0x131 && c != 0x138 && c != 0x149 && c != 0x17F) {
        const bool odd_lower = (c >= 0x100 && c <= 0x137) || (c >= 0x14A && c <= 0x177);
        if (odd_lower) return c % 2 == 1 ? c - 1 : c;
        return c % 2 == 0 && c != 0x178 ? c - 1 : c;  // 0x139..0x148 and 0x179..0x17E: lower case is even
    }
    if (c == 0x131) return 'I';
    if (c == 0x17F) return 'S';
    if (c >= 0x3B1 && c <= 0x3C9 && c != 0x3C2) return c - 32;
    if (c == 0x3C2) return 0x3A3;
    if (c >= 0x3AC && c <= 0x3AF) return c == 0x3AC ? 0x386 : c - 37;
    if (c >= 0x430 && c <= 0x44F) return c - 32;
    if (c >= 0x450 && c <= 0x45F) return c - 80;
    return c;
}
uint32_t lower_cp(uint32_t c) {
    if (c >= 'A' && c <= 'Z') return c + 32;
    if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 32;
    if (c == 0x178) return 0xFF;
    if (c >= 0x100 && c <= 0x17F && c != 0x130 && c != 0x131 && c != 0x138 && c != 0x149 && c != 0x17F) {
        const bool even_upper = (c >= 0x100 && c <= 0x137) || (c >= 0x14A && c <= 0x177);
        if (even_upper) return c % 2 == 0 ? c + 1 : c;
        return c % 2 == 1 ? c + 1 : c;
    }
    if (c == 0x130) return 'i';  // Python gives "i̇"; close enough for templates
    if (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) return c + 32;
    if (c == 0x386) return 0x3AC;
    if (c >= 0x388 && c <= 0x38A) return c + 37;
    if (c >= 0x410 && c <= 0x42F) return c + 32;
    if (c >= 0x400 && c <= 0x40F) return c + 80;
    return c;
}
bool cased(uint32_t c) { return upper_cp(c) != c || lower_cp(c) != c || c == 0xDF; }

std::string map_case(const std::string& s, bool upper) {
    std::string r;
    r.reserve(s.size());
    for (size_t off = 0; off < s.size();) {
        const auto [cp, len] = decode_char(s, off);
        if (upper && cp == 0xDF) r += "SS";
        else if (cp < 0x80 || upper_cp(cp) != cp || lower_cp(cp) != cp) unicode::append_utf8(r, upper ? upper_cp(cp) : lower_cp(cp));
        else r.append(s, off, len);
        off += len;
    }
    return r;
}
std::string ascii_lower(const std::string& s) { return map_case(s, false); }
std::string ascii_upper(const std::string& s) { return map_case(s, true); }
bool ascii_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// Per code point: upper-case when `start`, else lower-case.
std::string case_words(const std::string& s, const std::function<bool(uint32_t cp, bool& state)>& starts) {
    std::string r;
    bool state = false;
    for (size_t off = 0; off < s.size();) {
        const auto [cp, len] = decode_char(s, off);
        const bool up = starts(cp, state);
        r += up ? map_case(s.substr(off, len), true) : map_case(s.substr(off, len), false);
        off += len;
    }
    return r;
}
std::string py_capitalize(const std::string& s) {
    bool first = true;
    return case_words(s, [&](uint32_t, bool&) {
        const bool f = first;
        first = false;
        return f;
    });
}
// str.title(): a cased letter after an uncased character starts a word.
std::string py_title(const std::string& s) {
    return case_words(s, [](uint32_t cp, bool& prev_cased) {
        const bool c = cased(cp);
        const bool up = c && !prev_cased;
        prev_cased = c;
        return up;
    });
}
// Jinja's title filter: words start after '-', whitespace, '(', '{', '[' or '<'.
std::string jinja_title(const std::string& s) {
    return case_words(s, [](uint32_t c, bool& after_sep) {
        const bool sep = c == '-' || c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v' ||
                         c == '(' || c == '{' || c == '[' || c == '<';
        const bool first = !after_sep;
        after_sep = !sep;  // state: "inside a word"
        return !sep && first;
    });
}

std::vector<std::string> py_split(const std::string& s, const Value* sep, int64_t maxsplit, int line) {
    std::vector<std::string> out;
    if (!sep || sep->kind == K::none || sep->is_undefined()) {
        const auto cps = code_points(s);
        size_t i = 0;
        while (true) {
            while (i < cps.size() && py_space(decode_char(s, cps[i].first).first)) ++i;
            if (i >= cps.size()) break;
            if (maxsplit >= 0 && int64_t(out.size()) == maxsplit) {
                std::string rest = s.substr(cps[i].first);
                // Python keeps the remainder as is, trailing whitespace stripped.
                out.push_back(py_strip(rest, nullptr, false, true));
                break;
            }
            const size_t b = i;
            while (i < cps.size() && !py_space(decode_char(s, cps[i].first).first)) ++i;
            const size_t end = i < cps.size() ? cps[i].first : s.size();
            out.push_back(s.substr(cps[b].first, end - cps[b].first));
        }
        return out;
    }
    if (sep->kind != K::string) runtime_error(line, "must be str or None, not " + sep->type_name());
    if (sep->s.empty()) runtime_error(line, "empty separator");
    size_t pos = 0;
    for (size_t hit; (maxsplit < 0 || int64_t(out.size()) < maxsplit) && (hit = s.find(sep->s, pos)) != std::string::npos;
         pos = hit + sep->s.size())
        out.push_back(s.substr(pos, hit - pos));
    out.push_back(s.substr(pos));
    return out;
}

std::string py_replace(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
    std::string r;
    if (from.empty()) {
        // Python inserts `to` between characters (and at both ends).
        const auto cps = code_points(s);
        int64_t n = 0;
        for (size_t k = 0; k <= cps.size(); ++k) {
            if (count < 0 || n < count) {
                r += to;
                ++n;
            }
            if (k < cps.size()) r.append(s, cps[k].first, cps[k].second);
        }
        return r;
    }
    size_t pos = 0;
    int64_t n = 0;
    for (size_t hit; (count < 0 || n < count) && (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size(), ++n) {
        r.append(s, pos, hit - pos);
        r += to;
    }
    r.append(s, pos);
    return r;
}

const Value* arg(std::vector<Value>& args, Kwargs& kwargs, size_t index, const char* name) {
    if (index < args.size()) return &args[index];
    for (auto& [k, v] : kwargs)
        if (k == name) return &v;
    return nullptr;
}

void check_args(const std::string& what, std::vector<Value>& args, Kwargs& kwargs, size_t max_pos,
                std::initializer_list<const char*> names, int line) {
    if (args.size() > max_pos)
        runtime_error(line, what + " takes at most " + std::to_string(max_pos) + " positional arguments (" +
                                std::to_string(args.size()) + " given)");
    for (const auto& [k, v] : kwargs) {
        bool known = false;
        for (const char* n : names) known = known || k == n;
        if (!known) unsupported_error(line, what + " got an unsupported keyword argument '" + k + "'");
    }
}

std::string need_str(const Value* v, const std::string& what, int line) {
    if (!v || v->kind != K::string) runtime_error(line, what + " must be a string");
    return v->s;
}
int64_t need_int(const Value* v, const std::string& what, int line) {
    if (!v || !is_int_like(*v)) runtime_error(line, what + " must be an integer");
    return as_int(*v);
}

Value bind_method(const Value& self, const std::string& name,
           std::function<Value(const Value&, std::vector<Value>&, Kwargs&)> fn) {
    Value v;
    v.kind = K::callable;
    v.fn = std::make_shared<Callable>();
    v.fn->name = name;
    v.fn->call = [self, fn = std::move(fn)](std::vector<Value>& a, Kwargs& k) { return fn(self, a, k); };
    return v;
}

Value string_method(const Value& obj, const std::string& name, int line) {
    static const std::set<std::string> kNames = {"strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "replace",
                                                  "startswith", "endswith", "upper", "lower", "title", "capitalize",
                                                  "find", "rfind", "count", "join", "isdigit", "isalpha", "isalnum",
                                                  "isspace", "islower", "isupper", "format"};
    if (!kNames.count(name)) return Value::undefined("'str object' has no attribute '" + name + "'");
    return bind_method(obj, name, [name, line](const Value& self, std::vector<Value>& a, Kwargs& k) -> Value {
        const std::string& s = self.s;
        const std::string what = "str." + name + "()";
        if (name == "strip" || name == "lstrip" || name == "rstrip") {
            check_args(what, a, k, 1, {}, line);
            const Value* chars = arg(a, k, 0, "chars");
            if (chars && chars->kind != K::string && chars->kind != K::none) runtime_error(line, what + ": chars must be str or None");
            return Value::string(py_strip(s, chars, name != "rstrip", name != "lstrip"));
        }
        if (name == "split" || name == "rsplit") {
            check_args(what, a, k, 2, {"sep", "maxsplit"}, line);
            const Value* ms = arg(a, k, 1, "maxsplit");
            const int64_t maxsplit = ms ? need_int(ms, "maxsplit", line) : -1;
            if (name == "rsplit" && maxsplit >= 0) unsupported_error(line, "str.rsplit() with maxsplit is not supported");
            List l;
            for (auto& part : py_split(s, arg(a, k, 0, "sep"), maxsplit, line)) l.push_back(Value::string(std::move(part)));
            return Value::array(std::move(l));
        }
        if (name == "splitlines") {
            check_args(what, a, k, 0, {}, line);
            List l;
            size_t pos = 0;
            while (pos < s.size()) {
                size_t e = s.find_first_of("\n\r", pos);
                if (e == std::string::npos) {
                    l.push_back(Value::string(s.substr(pos)));
                    break;
                }
                l.push_back(Value::string(s.substr(pos, e - pos)));
                pos = e + (s[e] == '\r' && e + 1 < s.size() && s[e + 1] == '\n' ? 2 : 1);
            }
            return Value::array(std::move(l));
        }
        if (name == "replace") {
            check_args(what, a, k, 3, {"count"}, line);
            const Value* c = arg(a, k, 2, "count");
            return Value::string(py_replace(s, need_str(arg(a, k, 0, ""), what + " old", line),
                                            need_str(arg(a, k, 1, ""), what + " new", line),
                                            c ? need_int(c, "count", line) : -1));
        }
        if (name == "startswith" || name == "endswith") {
            check_args(what, a, k, 1, {}, line);
            const Value* p = arg(a, k, 0, "");
            if (!p) runtime_error(line, what + " takes a prefix");
            std::vector<std::string> options;
            if (p->kind == K::string) options.push_back(p->s);
            else if (p->kind == K::list)
                for (const Value& x : *p->list) options.push_back(need_str(&x, what + " prefix", line));
            else runtime_error(line, what + " first arg must be str or a tuple of str, not " + p->type_name());
            for (const std::string& o : options) {
                if (name == "startswith" ? s.compare(0, o.size(), o) == 0
                                         : (s.size() >= o.size() && s.compare(s.size() - o.size(), o.size(), o) == 0))
                    return Value::boolean(true);
            }
            return Value::boolean(false);
        }
        if (name == "upper") return Value::string(ascii_upper(s));
        if (name == "lower") return Value::string(ascii_lower(s));
        if (name == "title") return Value::string(py_title(s));
        if (name == "capitalize") return Value::string(py_capitalize(s));
        if (name == "find" || name == "rfind" || name == "count") {
            check_args(what, a, k, 1, {}, line);
            const std::string sub = need_str(arg(a, k, 0, ""), what + " argument", line);
            if (name == "count") {
                if (sub.empty()) return Value::integer(int64_t(code_points(s).size()) + 1);
                int64_t n = 0;
                for (size_t p = 0; (p = s.find(sub, p)) != std::string::npos; p += sub.size()) ++n;
                return Value::integer(n);
            }
            const size_t hit = name == "find" ? s.find(sub) : s.rfind(sub);
            if (hit == std::string::npos) return Value::integer(-1);
            return Value::integer(int64_t(code_points(s.substr(0, hit)).size()));
        }
        if (name == "join") {
            check_args(what, a, k, 1, {}, line);
            const Value* it = arg(a, k, 0, "");
            if (!it) runtime_error(line, "str.join() takes one argument");
            std::string r;
            bool first = true;
            for (const Value& x : iterate(*it, line)) {
                if (x.kind != K::string) runtime_error(line, "sequence item: expected str instance, " + x.type_name() + " found");
                if (!first) r += s;
                first = false;
                r += x.s;
            }
            return Value::string(std::move(r));
        }
        if (name == "format") unsupported_error(line, "str.format() is not supported");
        bool all = !s.empty(), any_cased = false;
        for (const char c : s) {
            const uint8_t u = uint8_t(c);
            if (name == "isdigit") all = all && std::isdigit(u);
            else if (name == "isalpha") all = all && ascii_alpha(c);
            else if (name == "isalnum") all = all && (ascii_alpha(c) || std::isdigit(u));
            else if (name == "isspace") all = all && py_space(u);
            else if (name == "islower") {
                all = all && !(c >= 'A' && c <= 'Z');
                any_cased = any_cased || (c >= 'a' && c <= 'z');
            } else if (name == "isupper") {
                all = all && !(c >= 'a' && c <= 'z');
                any_cased = any_cased || (c >= 'A' && c <= 'Z');
            }
        }
        if (name == "islower" || name == "isupper") return Value::boolean(all && any_cased);
        return Value::boolean(all);
    });
}

Value dict_method(const Value& obj, const std::string& name, int line) {
    if (name == "items" || name == "keys" || name == "values")
        return bind_method(obj, name, [name, line](const Value& self, std::vector<Value>& a, Kwargs& k) {
            check_args("dict." + name + "()", a, k, 0, {}, line);
            List l;
            for (const auto& [key, val] : self.dict->items) {
                if (name == "items") l.push_back(Value::pair(Value::string(key), val));
                else if (name == "keys") l.push_back(Value::string(key));
                else l.push_back(val);
            }
            return Value::array(std::move(l));
        });
    if (name == "get")
        return bind_method(obj, name, [line](const Value& self, std::vector<Value>& a, Kwargs& k) {
            check_args("dict.get()", a, k, 2, {}, line);
            if (a.empty()) runtime_error(line, "dict.get() takes a key");
            if (a[0].kind == K::string)
                if (const Value* v = self.dict->find(a[0].s)) return *v;
            return a.size() > 1 ? a[1] : Value::none();
        });
    static const std::set<std::string> kMutating = {"pop", "popitem", "update", "clear", "setdefault", "copy", "fromkeys"};
    if (kMutating.count(name)) unsupported_error(line, "dict." + name + "() is not supported (templates cannot modify data)");
    return Value();
}

Value list_method(const Value& obj, const std::string& name, int line) {
    if (name == "index" || name == "count")
        return bind_method(obj, name, [name, line](const Value& self, std::vector<Value>& a, Kwargs& k) {
            check_args("list." + name + "()", a, k, 1, {}, line);
            if (a.empty()) runtime_error(line, "list." + name + "() takes one argument");
            int64_t n = 0;
            for (size_t i = 0; i < self.list->size(); ++i) {
                if (!py_eq((*self.list)[i], a[0])) continue;
                if (name == "index") return Value::integer(int64_t(i));
                ++n;
            }
            if (name == "index") runtime_error(line, to_repr(a[0]) + " is not in list");
            return Value::integer(n);
        });
    static const std::set<std::string> kMutating = {"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "copy"};
    if (kMutating.count(name)) unsupported_error(line, "list." + name + "() is not supported (templates cannot modify data)");
    return Value::undefined("'list object' has no attribute '" + name + "'");
}

// attribute="a.b.0" lookups of selectattr, map, join, sort ...
Value attr_path(const Value& v, const std::string& path, int line) {
    Value cur = v;
    size_t pos = 0;
    while (true) {
        const size_t dot = path.find('.', pos);
        const std::string part = path.substr(pos, dot == std::string::npos ? std::string::npos : dot - pos);
        bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return std::isdigit(uint8_t(c)); });
        cur = numeric ? get_item(cur, Value::integer(std::stoll(part)), line) : get_item(cur, Value::string(part), line);
        if (dot == std::string::npos) return cur;
        if (cur.is_undefined()) return cur;
        pos = dot + 1;
    }
}

Value round_value(double x, int64_t precision, const std::string& method) {
    const double scale = std::pow(10.0, double(precision));
    double y = x * scale;
    if (method == "common") {
        // Python's round(): half to even on the scaled value.
        const double r = std::nearbyint(y);
        y = r;
    } else if (method == "ceil") {
        y = std::ceil(y);
    } else {
        y = std::floor(y);
    }
    return Value::number(y / scale);
}

std::string html_escape(const std::string& s) {
    std::string r;
    for (const char c : s) {
        switch (c) {
            case '&': r += "&amp;"; break;
            case '<': r += "&lt;"; break;
            case '>': r += "&gt;"; break;
            case '"': r += "&#34;"; break;
            case '\'': r += "&#39;"; break;
            default: r += c;
        }
    }
    return r;
}

}  // namespace

size_t py_len(const Value& v, int line) {
    switch (v.kind) {
        case K::undefined: return 0;
        case K::string: return code_points(v.s).size();
        case K::list: return v.list->size();
        case K::dict: return v.dict->items.size();
        default: runtime_error(line, "object of type '" + v.type_name() + "' has no len()");
    }
}

bool py_eq(const Value& a, const Value& b) {
    if (a.is_numeric() && b.is_numeric()) {
        if (is_int_like(a) && is_int_like(b)) return as_int(a) == as_int(b);
        return as_double(a) == as_double(b);
    }
    if (a.kind != b.kind) return false;
    switch (a.kind) {
        case K::undefined:
        case K::none: return true;
        case K::string: return a.s == b.s;
        case K::list:
            if (a.list->size() != b.list->size()) return false;
            for (size_t i = 0; i < a.list->size(); ++i)
                if (!py_eq((*a.list)[i], (*b.list)[i])) return false;
            return true;
        case K::dict: {
            if (a.dict->items.size() != b.dict->items.size()) return false;
            for (const auto& [k, v] : a.dict->items) {
                const Value* o = b.dict->find(k);
                if (!o || !py_eq(v, *o)) return false;
            }
            return true;
        }
        case K::ns: return a.dict == b.dict;
        case K::callable: return a.fn == b.fn;
        default: return false;
    }
}

int py_cmp(const Value& a, const Value& b, int line) {
    if (a.is_numeric() && b.is_numeric()) {
        if (is_int_like(a) && is_int_like(b)) return as_int(a) < as_int(b) ? -1 : as_int(a) > as_int(b);
        const double x = as_double(a), y = as_double(b);
        return x < y ? -1 : x > y;
    }
    if (a.kind == K::string && b.kind == K::string) {
        const int c = a.s.compare(b.s);  // UTF-8 byte order is code point order
        return c < 0 ? -1 : c > 0;
    }
    if (a.kind == K::list && b.kind == K::list) {
        for (size_t i = 0; i < a.list->size() && i < b.list->size(); ++i) {
            if (py_eq((*a.list)[i], (*b.list)[i])) continue;
            return py_cmp((*a.list)[i], (*b.list)[i], line);
        }
        return a.list->size() < b.list->size() ? -1 : a.list->size() > b.list->size();
    }
    if (a.is_undefined()) fail_undefined(a, line);
    if (b.is_undefined()) fail_undefined(b, line);
    runtime_error(line, "'<' not supported between instances of '" + a.type_name() + "' and '" + b.type_name() + "'");
}

List iterate(const Value& v, int line) {
    switch (v.kind) {
        case K::undefined: return {};
        case K::list: return *v.list;
        case K::dict: {
            List l;
            for (const auto& kv : v.dict->items) l.push_back(Value::string(kv.first));
            return l;
        }
        case K::string: {
            List l;
            for (const auto& [o, n] : code_points(v.s)) l.push_back(Value::string(v.s.substr(o, n)));
            return l;
        }
        default: runtime_error(line, "'" + v.type_name() + "' object is not iterable");
    }
}

Value py_slice(const Value& v, const Value& start, const Value& stop, const Value& step, int line) {
    if (v.is_undefined()) fail_undefined(v, line);
    if (v.kind != K::list && v.kind != K::string) runtime_error(line, "'" + v.type_name() + "' object is not subscriptable");
    const auto bound = [&](const Value& b) -> std::optional<int64_t> {
        if (b.kind == K::none || b.is_undefined()) return std::nullopt;
        if (!is_int_like(b)) runtime_error(line, "slice indices must be integers or None");
        return as_int(b);
    };
    const auto cps = v.kind == K::string ? code_points(v.s) : std::vector<std::pair<size_t, size_t>>{};
    const int64_t n = v.kind == K::string ? int64_t(cps.size()) : int64_t(v.list->size());
    const int64_t st = bound(step).value_or(1);
    if (st == 0) runtime_error(line, "slice step cannot be zero");
    const auto adjust = [&](std::optional<int64_t> x, int64_t def) {
        if (!x) return def;
        int64_t i = *x;
        if (i < 0) i += n;
        if (st > 0) return std::clamp<int64_t>(i, 0, n);
        return std::clamp<int64_t>(i, -1, n - 1);
    };
    const int64_t b = adjust(bound(start), st > 0 ? 0 : n - 1);
    const int64_t e = adjust(bound(stop), st > 0 ? n : -1);
    std::vector<int64_t> idx;
    for (int64_t i = b; st > 0 ? i < e : i > e; i += st) idx.push_back(i);
    if (v.kind == K::string) {
        std::string r;
        for (const int64_t i : idx) r.append(v.s, cps[size_t(i)].first, cps[size_t(i)].second);
        return Value::string(std::move(r));
    }
    List l;
    for (const int64_t i : idx) l.push_back((*v.list)[size_t(i)]);
    return Value::array(std::move(l));
}

Value get_attr(const Value& obj, const std::string& name, int line) {
    switch (obj.kind) {
        case K::undefined: fail_undefined(obj, line);
        case K::dict: {
            if (Value m = dict_method(obj, name, line); m.kind == K::callable) return m;
            if (const Value* v = obj.dict->find(name)) return *v;
            return Value::undefined("'dict object' has no attribute '" + name + "'");
        }
        case K::ns: {
            if (const Value* v = obj.dict->find(name)) return *v;
            return Value::undefined("'Namespace object' has no attribute '" + name + "'");
        }
        case K::string: return string_method(obj, name, line);
        case K::list: return list_method(obj, name, line);
        default: return Value::undefined(object_name(obj) + " has no attribute '" + name + "'");
    }
}

Value get_item(const Value& obj, const Value& key, int line) {
    switch (obj.kind) {
        case K::undefined: fail_undefined(obj, line);
        case K::dict:
            if (key.kind == K::string) {
                if (const Value* v = obj.dict->find(key.s)) return *v;
                if (Value m = dict_method(obj, key.s, line); m.kind == K::callable) return m;
            }
            return Value::undefined(object_name(obj) + " has no attribute " + to_repr(key));
        case K::ns:
            if (key.kind == K::string)
                if (const Value* v = obj.dict->find(key.s)) return *v;
            return Value::undefined("'Namespace object' has no attribute " + to_repr(key));
        case K::list:
        case K::string: {
            if (key.kind == K::string) return get_attr(obj, key.s, line);
            if (!is_int_like(key)) return Value::undefined(object_name(obj) + " has no element " + to_repr(key));
            const int64_t n = obj.kind == K::list ? int64_t(obj.list->size()) : int64_t(code_points(obj.s).size());
            int64_t i = as_int(key);
            if (i < 0) i += n;
            if (i < 0 || i >= n) return Value::undefined(object_name(obj) + " has no element " + to_repr(key));
            if (obj.kind == K::list) return (*obj.list)[size_t(i)];
            const auto cps = code_points(obj.s);
            return Value::string(obj.s.substr(cps[size_t(i)].first, cps[size_t(i)].second));
        }
        default: return Value::undefined(object_name(obj) + " has no element " + to_repr(key));
    }
}

bool apply_test(Runtime& rt, const std::string& name, const Value& v, std::vector<Value>& args, int line) {
    rt.step(line);
    const auto need = [&](size_t n) {
        if (args.size() != n)
            runtime_error(line, "test '" + name + "' takes " + std::to_string(n) + " argument" + (n == 1 ? "" : "s"));
    };
    if (name == "defined") return !v.is_undefined();
    if (name == "undefined") return v.is_undefined();
    if (name == "none") return v.kind == K::none;
    if (name == "boolean") return v.kind == K::boolean;
    if (name == "true") return v.kind == K::boolean && v.b;
    if (name == "false") return v.kind == K::boolean && !v.b;
    if (name == "integer") return v.kind == K::integer;
    if (name == "float") return v.kind == K::number;
    if (name == "number") return v.is_numeric();
    if (name == "string") return v.kind == K::string;
    if (name == "mapping") return v.kind == K::dict;
    if (name == "iterable") return v.kind == K::list || v.kind == K::dict || v.kind == K::string || v.is_undefined();
    if (name == "sequence") return v.kind == K::list || v.kind == K::dict || v.kind == K::string || v.is_undefined();
    if (name == "callable") return v.kind == K::callable;
    if (name == "lower" || name == "upper") {
        if (v.kind != K::string) runtime_error(line, "test '" + name + "' needs a string");
        std::vector<Value> none;
        Kwargs nk;
        Value m = string_method(v, name == "lower" ? "islower" : "isupper", line);
        return m.fn->call(none, nk).b;
    }
    if (name == "odd" || name == "even") {
        if (!is_int_like(v)) runtime_error(line, "test '" + name + "' needs an integer, got " + v.type_name());
        const int64_t r = ((as_int(v) % 2) + 2) % 2;
        return name == "odd" ? r == 1 : r == 0;
    }
    if (name == "divisibleby") {
        need(1);
        if (!is_int_like(v) || !is_int_like(args[0])) runtime_error(line, "test 'divisibleby' needs integers");
        if (as_int(args[0]) == 0) runtime_error(line, "integer division or modulo by zero");
        return as_int(v) % as_int(args[0]) == 0;
    }
    if (name == "eq" || name == "equalto" || name == "==") return need(1), py_eq(v, args[0]);
    if (name == "ne" || name == "!=") return need(1), !py_eq(v, args[0]);
    if (name == "lt" || name == "lessthan" || name == "<") return need(1), py_cmp(v, args[0], line) < 0;
    if (name == "le" || name == "<=") return need(1), py_cmp(v, args[0], line) <= 0;
    if (name == "gt" || name == "greaterthan" || name == ">") return need(1), py_cmp(v, args[0], line) > 0;
    if (name == "ge" || name == ">=") return need(1), py_cmp(v, args[0], line) >= 0;
    if (name == "in") {
        need(1);
        const Value& c = args[0];
        if (c.kind == K::string) {
            if (v.kind != K::string) runtime_error(line, "'in <string>' requires string as left operand, not " + v.type_name());
            return c.s.find(v.s) != std::string::npos;
        }
        if (c.kind == K::dict) return v.kind == K::string && c.dict->find(v.s);
        for (const Value& x : iterate(c, line))
            if (py_eq(x, v)) return true;
        return false;
    }
    if (name == "sameas") {
        need(1);
        const Value& o = args[0];
        if (v.kind != o.kind) return false;
        switch (v.kind) {
            case K::none:
            case K::undefined: return true;
            case K::boolean: return v.b == o.b;
            case K::integer: return v.i == o.i && v.i >= -5 && v.i <= 256;  // CPython's small-int cache
            case K::list: return v.list == o.list;
            case K::dict:
            case K::ns: return v.dict == o.dict;
            default: return false;
        }
    }
    unsupported_error(line, "unknown test '" + name + "'");
}

Value apply_filter(Runtime& rt, const std::string& name, const Value& v, std::vector<Value>& args, Kwargs& kw, int line) {
    rt.step(line);
    const std::string what = "filter '" + name + "'";
    const auto str_of = [&](const Value& x) { return to_str(x); };
    if (name == "safe") return v;
    if (name == "string") return Value::string(str_of(v));
    if (name == "trim") {
        check_args(what, args, kw, 1, {"chars"}, line);
        const Value* chars = arg(args, kw, 0, "chars");
        return Value::string(py_strip(str_of(v), chars && chars->kind == K::string ? chars : nullptr, true, true));
    }
    if (name == "length" || name == "count") return Value::integer(int64_t(py_len(v, line)));
    if (name == "tojson") {
        check_args(what, args, kw, 1, {"indent", "ensure_ascii", "sort_keys", "separators"}, line);
        for (const auto& [k, x] : kw)
            if (k != "indent" && x.truthy()) unsupported_error(line, "tojson(" + k + "=...) is not supported");
        const Value* ind = arg(args, kw, 0, "indent");
        int indent = -1;
        if (ind && ind->kind != K::none) indent = int(std::clamp<int64_t>(need_int(ind, "tojson indent", line), 0, 64));
        if (v.is_undefined()) runtime_error(line, "Object of type Undefined is not JSON serializable");
        try {
            return Value::string(to_json(v, indent));
        } catch (const std::runtime_error& e) {
            runtime_error(line, e.what());
        }
    }
    if (name == "items") {
        if (v.is_undefined()) return Value::array();
        if (v.kind != K::dict) runtime_error(line, "Can only get item pairs from a mapping.");
        List l;
        for (const auto& [k, x] : v.dict->items) l.push_back(Value::pair(Value::string(k), x));
        return Value::array(std::move(l));
    }
    if (name == "list") return Value::array(iterate(v, line));
    if (name == "join") {
        check_args(what, args, kw, 2, {"d", "attribute"}, line);
        const Value* sep = arg(args, kw, 0, "d");
        const Value* attribute = arg(args, kw, 1, "attribute");
        std::string r;
        bool first = true;
        for (const Value& x : iterate(v, line)) {
            if (!first) r += sep ? str_of(*sep) : "";
            first = false;
            r += str_of(attribute ? attr_path(x, str_of(*attribute), line) : x);
        }
        return Value::string(std::move(r));
    }
    if (name == "first" || name == "last") {
        const List l = iterate(v, line);
        if (l.empty()) return Value::undefined("No " + name + " item, sequence was empty.");
        return name == "first" ? l.front() : l.back();
    }
    if (name == "lower") return Value::string(ascii_lower(str_of(v)));
    if (name == "upper") return Value::string(ascii_upper(str_of(v)));
    if (name == "capitalize") return Value::string(py_capitalize(str_of(v)));
    if (name == "title") return Value::string(jinja_title(str_of(v)));
    if (name == "default" || name == "d") {
        check_args(what, args, kw, 2, {"default_value", "boolean"}, line);
        const Value* def = arg(args, kw, 0, "default_value");
        const Value* boolean = arg(args, kw, 1, "boolean");
        const bool use = v.is_undefined() || (boolean && boolean->truthy() && !v.truthy());
        return use ? (def ? *def : Value::string("")) : v;
    }
    if (name == "replace") {
        check_args(what, args, kw, 3, {"old", "new", "count"}, line);
        const Value* c = arg(args, kw, 2, "count");
        return Value::string(py_replace(str_of(v), need_str(arg(args, kw, 0, "old"), "replace old", line),
                                        need_str(arg(args, kw, 1, "new"), "replace new", line),
                                        c && c->kind != K::none ? need_int(c, "count", line) : -1));
    }
    if (name == "int") {
        check_args(what, args, kw, 2, {"default", "base"}, line);
        const Value* def = arg(args, kw, 0, "default");
        const Value fallback = def ? *def : Value::integer(0);
        if (is_int_like(v)) return Value::integer(as_int(v));
        if (v.kind == K::number) return std::isfinite(v.f) ? Value::integer(int64_t(v.f)) : fallback;
        if (v.kind == K::string) {
            const std::string t = py_strip(v.s, nullptr, true, true);
            char* end = nullptr;
            errno = 0;
            const long long x = std::strtoll(t.c_str(), &end, 10);
            if (!t.empty() && end && *end == 0 && errno == 0) return Value::integer(x);
            const double d = std::strtod(t.c_str(), &end);
            if (!t.empty() && end && *end == 0 && std::isfinite(d)) return Value::integer(int64_t(d));
        }
        return fallback;
    }
    if (name == "float") {
        check_args(what, args, kw, 1, {"default"}, line);
        const Value* def = arg(args, kw, 0, "default");
        if (v.is_numeric()) return Value::number(as_double(v));
        if (v.kind == K::string) {
            const std::string t = py_strip(v.s, nullptr, true, true);
            char* end = nullptr;
            const double d = std::strtod(t.c_str(), &end);
            if (!t.empty() && end && *end == 0) return Value::number(d);
        }
        return def ? *def : Value::number(0.0);
    }
    if (name == "abs") {
        if (is_int_like(v)) return Value::integer(std::llabs(as_int(v)));
        if (v.kind == K::number) return Value::number(std::fabs(v.f));
        runtime_error(line, "bad operand type for abs(): '" + v.type_name() + "'");
    }
    if (name == "round") {
        check_args(what, args, kw, 2, {"precision", "method"}, line);
        const Value* p = arg(args, kw, 0, "precision");
        const Value* m = arg(args, kw, 1, "method");
        if (!v.is_numeric()) runtime_error(line, "round needs a number");
        return round_value(as_double(v), p ? need_int(p, "precision", line) : 0, m ? str_of(*m) : "common");
    }
    if (name == "reverse") {
        if (v.kind == K::string) {
            const auto cps = code_points(v.s);
            std::string r;
            for (size_t i = cps.size(); i-- > 0;) r.append(v.s, cps[i].first, cps[i].second);
            return Value::string(std::move(r));
        }
        List l = iterate(v, line);
        std::reverse(l.begin(), l.end());
        return Value::array(std::move(l));
    }
    if (name == "escape" || name == "e") return Value::string(html_escape(str_of(v)));
    if (name == "attr") {
        check_args(what, args, kw, 1, {}, line);
        return get_attr(v, need_str(arg(args, kw, 0, ""), "attr name", line), line);
    }
    if (name == "wordcount") return Value::integer(int64_t(py_split(str_of(v), nullptr, -1, line).size()));
    if (name == "indent") {
        check_args(what, args, kw, 3, {"width", "first", "blank"}, line);
        const Value* w = arg(args, kw, 0, "width");
        const Value* f = arg(args, kw, 1, "first");
        const Value* b = arg(args, kw, 2, "blank");
        const std::string pad = w && w->kind == K::string ? w->s : std::string(size_t(std::clamp<int64_t>(w ? need_int(w, "width", line) : 4, 0, 1000)), ' ');
        std::string s = str_of(v), r;
        // Jinja: "\n".join(pad + line for the lines after the first, blank lines only when blank=True).
        std::vector<std::string> lines;
        size_t pos = 0;
        for (size_t e; (e = s.find('\n', pos)) != std::string::npos; pos = e + 1) lines.push_back(s.substr(pos, e - pos));
        lines.push_back(s.substr(pos));
        for (size_t i = 0; i < lines.size(); ++i) {
            if (i) r += '\n';
            const bool indent_it = (i > 0 || (f && f->truthy())) && (!lines[i].empty() || (b && b->truthy()));
            if (indent_it) r += pad;
            r += lines[i];
        }
        return Value::string(std::move(r));
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
        const bool by_attr = name == "selectattr" || name == "rejectattr";
        const bool keep_if = name == "select" || name == "selectattr";
        if (!kw.empty()) unsupported_error(line, what + " takes no keyword arguments");
        size_t k = 0;
        std::string attribute;
        if (by_attr) {
            if (args.empty()) runtime_error(line, what + " needs an attribute name");
            attribute = str_of(args[k++]);
        }
        std::string test;
        if (k < args.size()) test = str_of(args[k++]);
        std::vector<Value> targs(args.begin() + long(k), args.end());
        List out;
        for (const Value& x : iterate(v, line)) {
            const Value subject = by_attr ? attr_path(x, attribute, line) : x;
            const bool hit = test.empty() ? subject.truthy() : apply_test(rt, test, subject, targs, line);
            if (hit == keep_if) out.push_back(x);
        }
        return Value::array(std::move(out));
    }
    if (name == "map") {
        List out;
        const Value* attribute = nullptr;
        const Value* def = nullptr;
        for (const auto& [k, x] : kw) {
            if (k == "attribute") attribute = &x;
            else if (k == "default") def = &x;
        }
        if (attribute) {
            for (const Value& x : iterate(v, line)) {
                Value y = attr_path(x, str_of(*attribute), line);
                out.push_back(y.is_undefined() && def ? *def : y);
            }
            return Value::array(std::move(out));
        }
        if (args.empty()) runtime_error(line, "map needs a filter name or attribute=");
        const std::string f = str_of(args[0]);
        std::vector<Value> fargs(args.begin() + 1, args.end());
        Kwargs fkw = kw;
        for (const Value& x : iterate(v, line)) {
            std::vector<Value> a = fargs;
            Kwargs k = fkw;
            out.push_back(apply_filter(rt, f, x, a, k, line));
        }
        return Value::array(std::move(out));
    }
    if (name == "sort" || name == "unique" || name == "min" || name == "max" || name == "dictsort") {
        check_args(what, args, kw, 3, {"reverse", "case_sensitive", "attribute", "by"}, line);
        const bool is_sort = name == "sort";
        const Value* rev = is_sort ? arg(args, kw, 0, "reverse") : nullptr;
        const Value* cs = arg(args, kw, is_sort ? 1 : 0, "case_sensitive");
        const Value* attribute = arg(args, kw, is_sort ? 2 : 1, "attribute");
        const bool case_sensitive = cs && cs->truthy();
        List l;
        if (name != "dictsort") l = iterate(v, line);
        if (name == "dictsort") {
            if (v.kind != K::dict) runtime_error(line, "dictsort needs a mapping");
            for (const auto& [k, x] : v.dict->items) l.push_back(Value::pair(Value::string(k), x));
        }
        const auto key = [&](const Value& x) {
            Value y = name == "dictsort" ? (*x.list)[0] : attribute ? attr_path(x, str_of(*attribute), line) : x;
            if (!case_sensitive && y.kind == K::string) y.s = ascii_lower(y.s);
            return y;
        };
        if (name == "unique") {
            List out;
            std::vector<Value> seen;
            for (const Value& x : l) {
                const Value kx = key(x);
                bool dup = false;
                for (const Value& s : seen) dup = dup || py_eq(s, kx);
                if (!dup) {
                    seen.push_back(kx);
                    out.push_back(x);
                }
            }
            return Value::array(std::move(out));
        }
        if (name == "min" || name == "max") {
            if (l.empty()) return Value::undefined("No aggregated item, sequence was empty.");
            size_t best = 0;
            for (size_t i = 1; i < l.size(); ++i) {
                const int c = py_cmp(key(l[i]), key(l[best]), line);
                if (name == "min" ? c < 0 : c > 0) best = i;
            }
            return l[best];
        }
        std::stable_sort(l.begin(), l.end(), [&](const Value& a, const Value& b) { return py_cmp(key(a), key(b), line) < 0; });
        if (rev && rev->truthy()) {
            // Python's sort(reverse=True) keeps equal elements in their original order.
            std::stable_sort(l.begin(), l.end(), [&](const Value& a, const Value& b) { return py_cmp(key(a), key(b), line) > 0; });
        }
        return Value::array(std::move(l));
    }
    if (name == "sum") {
        check_args(what, args, kw, 2, {"attribute", "start"}, line);
        const Value* attribute = arg(args, kw, 0, "attribute");
        const Value* start = arg(args, kw, 1, "start");
        Value acc = start ? *start : Value::integer(0);
        for (const Value& x : iterate(v, line)) {
            const Value y = attribute ? attr_path(x, str_of(*attribute), line) : x;
            if (!acc.is_numeric() || !y.is_numeric()) runtime_error(line, "sum needs numbers");
            if (is_int_like(acc) && is_int_like(y)) {
                int64_t r;
                if (__builtin_add_overflow(as_int(acc), as_int(y), &r)) runtime_error(line, "integer overflow");
                acc = Value::integer(r);
            } else {
                acc = Value::number(as_double(acc) + as_double(y));
            }
        }
        return acc;
    }
    unsupported_error(line, "unknown filter '" + name + "'");
}

}  // namespace si::chat
