// Values of the template language: Python-like printing (str, repr) and JSON in and out.
#include <charconv>
#include <cmath>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "chat/internal.h"
#include "chat/jinja.h"

namespace si::chat {

const Value* Dict::find(const std::string& key) const {
    for (const auto& [k, v] : items)
        if (k == key) return &v;
    return nullptr;
}
Value* Dict::find(const std::string& key) {
    for (auto& [k, v] : items)
        if (k == key) return &v;
    return nullptr;
}
void Dict::set(const std::string& key, Value v) {
    if (Value* old = find(key)) *old = std::move(v);
    else items.emplace_back(key, std::move(v));
}

Value Value::undefined(std::string what) {
    Value v;
    v.s = std::move(what);
    return v;
}
Value Value::none() {
    Value v;
    v.kind = Kind::none;
    return v;
}
Value Value::boolean(bool x) {
    Value v;
    v.kind = Kind::boolean;
    v.b = x;
    return v;
}
Value Value::integer(int64_t x) {
    Value v;
    v.kind = Kind::integer;
    v.i = x;
    return v;
}
Value Value::number(double x) {
    Value v;
    v.kind = Kind::number;
    v.f = x;
    return v;
}
Value Value::string(std::string x) {
    Value v;
    v.kind = Kind::string;
    v.s = std::move(x);
    return v;
}
Value Value::array(List x) {
    Value v;
    v.kind = Kind::list;
    v.list = std::make_shared<List>(std::move(x));
    return v;
}
Value Value::pair(Value a, Value b) {
    Value v = array({std::move(a), std::move(b)});
    v.tuple = true;
    return v;
}
Value Value::object(Dict x) {
    Value v;
    v.kind = Kind::dict;
    v.dict = std::make_shared<Dict>(std::move(x));
    return v;
}

bool Value::truthy() const {
    switch (kind) {
        case Kind::undefined:
        case Kind::none: return false;
        case Kind::boolean: return b;
        case Kind::integer: return i != 0;
        case Kind::number: return f != 0.0;
        case Kind::string: return !s.empty();
        case Kind::list: return !list->empty();
        case Kind::dict: return !dict->items.empty();
        case Kind::ns:
        case Kind::callable: return true;
    }
    return false;
}

std::string Value::type_name() const {
    switch (kind) {
        case Kind::undefined: return "Undefined";
        case Kind::none: return "NoneType";
        case Kind::boolean: return "bool";
        case Kind::integer: return "int";
        case Kind::number: return "float";
        case Kind::string: return "str";
        case Kind::list: return "list";
        case Kind::dict: return "dict";
        case Kind::ns: return "Namespace";
        case Kind::callable: return "function";
    }
    return "?";
}

std::string py_float(double d) {
    if (std::isnan(d)) return "nan";
    if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
    if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
    // Shortest round-trip digits, then Python's repr layout: fixed for 1e-4 <= |d| < 1e16, else d.ddde+XX.
    char buf[64];
    const auto res = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
    std::string sci(buf, res.ptr);
    const size_t e = sci.find('e');
    std::string mant = sci.substr(0, e);
    const int exp = std::stoi(sci.substr(e + 1));
    const bool neg = mant[0] == '-';
    if (neg) mant.erase(0, 1);
    std::string digits;
    for (char c : mant)
        if (c != '.') digits += c;
    std::string out = neg ? "-" : "";
    if (exp >= -4 && exp < 16) {
        if (exp < 0) {
            out += "0." + std::string(size_t(-exp - 1), '0') + digits;
        } else if (size_t(exp) + 1 >= digits.size()) {
            out += digits + std::string(size_t(exp) + 1 - digits.size(), '0') + ".0";
        } else {
            out += digits.substr(0, size_t(exp) + 1) + "." + digits.substr(size_t(exp) + 1);
        }
        return out;
    }
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    return out + eb;
}

namespace {

// Python's str.isprintable for the characters that occur in practice: control and format characters, and
// separators other than the space, are written as escapes by repr().
bool py_printable(uint32_t c) {
    if (c < 0x20 || (c >= 0x7F && c < 0xA1) || c == 0xAD) return false;
    if (c == 0x1680 || (c >= 0x2000 && c <= 0x200F) || (c >= 0x2028 && c <= 0x202F) || (c >= 0x205F && c <= 0x2064) ||
        (c >= 0x2066 && c <= 0x206F) || c == 0x3000 || c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFB) ||
        (c >= 0x600 && c <= 0x605) || c == 0x61C || c == 0x6DD || c == 0x70F || c == 0x180E || c == 0x8E2 ||
        (c >= 0xD800 && c <= 0xDFFF) || (c >= 0xE000 && c <= 0xF8FF) || c == 0xE0001 || (c >= 0xE0020 && c <= 0xE007F) ||
        c >= 0xF0000)
        return false;
    return true;
}

void repr_string(std::string& out, const std::string& s) {
    const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
    const char q = dq ? '"' : '\'';
    out += q;
    for (size_t off = 0; off < s.size();) {
        const auto [cp, len] = decode_char(s, off);
        if (cp == uint32_t(q) || cp == '\\') {
            out += '\\';
            out += char(cp);
        } else if (cp == '\n') {
            out += "\\n";
        } else if (cp == '\r') {
            out += "\\r";
        } else if (cp == '\t') {
            out += "\\t";
        } else if (!py_printable(cp)) {
            char b[16];
            if (cp < 0x100) std::snprintf(b, sizeof b, "\\x%02x", cp);
            else if (cp < 0x10000) std::snprintf(b, sizeof b, "\\u%04x", cp);
            else std::snprintf(b, sizeof b, "\\U%08x", cp);
            out += b;
        } else {
            out.append(s, off, len);
        }
        off += len;
    }
    out += q;
}

void repr(std::string& out, const Value& v) {
    switch (v.kind) {
        case Value::Kind::string: repr_string(out, v.s); return;
        case Value::Kind::list: {
            out += v.tuple ? '(' : '[';
            for (size_t k = 0; k < v.list->size(); ++k) {
                if (k) out += ", ";
                repr(out, (*v.list)[k]);
            }
            if (v.tuple && v.list->size() == 1) out += ',';
            out += v.tuple ? ')' : ']';
            return;
        }
        case Value::Kind::dict:
        case Value::Kind::ns: {
            const bool ns = v.kind == Value::Kind::ns;
            out += ns ? "<Namespace {" : "{";
            bool first = true;
            for (const auto& [key, val] : v.dict->items) {
                if (!first) out += ", ";
                first = false;
                repr_string(out, key);
                out += ": ";
                repr(out, val);
            }
            out += ns ? "}>" : "}";
            return;
        }
        default: out += to_str(v);
    }
}

void json_string(std::string& out, const std::string& s) {
    out += '"';
    for (const char ch : s) {
        const unsigned char c = uint8_t(ch);
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            default:
                if (c < 0x20) {
                    char b[8];
                    std::snprintf(b, sizeof b, "\\u%04x", c);
                    out += b;
                } else {
                    out += char(c);
                }
        }
    }
    out += '"';
}

void json(std::string& out, const Value& v, int indent, int level) {
    const auto newline = [&](int lvl) {
        out += '\n';
        out.append(size_t(indent) * size_t(lvl), ' ');
    };
    switch (v.kind) {
        case Value::Kind::none: out += "null"; return;
        case Value::Kind::boolean: out += v.b ? "true" : "false"; return;
        case Value::Kind::integer: out += std::to_string(v.i); return;
        case Value::Kind::number:
            if (std::isnan(v.f)) out += "NaN";
            else if (std::isinf(v.f)) out += v.f > 0 ? "Infinity" : "-Infinity";
            else out += py_float(v.f);
            return;
        case Value::Kind::string: json_string(out, v.s); return;
        case Value::Kind::list: {
            if (v.list->empty()) {
                out += "[]";
                return;
            }
            out += '[';
            for (size_t k = 0; k < v.list->size(); ++k) {
                if (k) out += indent >= 0 ? "," : ", ";
                if (indent >= 0) newline(level + 1);
                json(out, (*v.list)[k], indent, level + 1);
            }
            if (indent >= 0) newline(level);
            out += ']';
            return;
        }
        case Value::Kind::dict: {
            if (v.dict->items.empty()) {
                out += "{}";
                return;
            }
            out += '{';
            bool first = true;
            for (const auto& [key, val] : v.dict->items) {
                if (!first) out += indent >= 0 ? "," : ", ";
                first = false;
                if (indent >= 0) newline(level + 1);
                json_string(out, key);
                out += ": ";
                json(out, val, indent, level + 1);
            }
            if (indent >= 0) newline(level);
            out += '}';
            return;
        }
        default:
            throw std::runtime_error("Object of type " + v.type_name() + " is not JSON serializable");
    }
}

Value from_nlohmann(const nlohmann::ordered_json& j) {
    switch (j.type()) {
        case nlohmann::json::value_t::null: return Value::none();
        case nlohmann::json::value_t::boolean: return Value::boolean(j.get<bool>());
        case nlohmann::json::value_t::number_integer: return Value::integer(j.get<int64_t>());
        case nlohmann::json::value_t::number_unsigned: {
            const uint64_t u = j.get<uint64_t>();
            if (u > uint64_t(INT64_MAX)) return Value::number(double(u));
            return Value::integer(int64_t(u));
        }
        case nlohmann::json::value_t::number_float: return Value::number(j.get<double>());
        case nlohmann::json::value_t::string: return Value::string(j.get<std::string>());
        case nlohmann::json::value_t::array: {
            List l;
            for (const auto& e : j) l.push_back(from_nlohmann(e));
            return Value::array(std::move(l));
        }
        case nlohmann::json::value_t::object: {
            Dict d;
            for (const auto& [k, e] : j.items()) d.set(k, from_nlohmann(e));
            return Value::object(std::move(d));
        }
        default: throw std::runtime_error("unsupported JSON value");
    }
}

}  // namespace

std::string to_str(const Value& v) {
    switch (v.kind) {
        case Value::Kind::undefined: return "";
        case Value::Kind::none: return "None";
        case Value::Kind::boolean: return v.b ? "True" : "False";
        case Value::Kind::integer: return std::to_string(v.i);
        case Value::Kind::number: return py_float(v.f);
        case Value::Kind::string: return v.s;
        case Value::Kind::callable: return "<function " + v.fn->name + ">";
        default: {
            std::string out;
            repr(out, v);
            return out;
        }
    }
}

std::string to_repr(const Value& v) {
    std::string out;
    repr(out, v);
    return out;
}

std::string to_json(const Value& v, int indent) {
    std::string out;
    json(out, v, indent, 0);
    return out;
}

Value from_json(const std::string& text) {
    nlohmann::ordered_json j;
    try {
        j = nlohmann::ordered_json::parse(text);
    } catch (const nlohmann::json::exception& e) {
        throw std::runtime_error(std::string("malformed JSON: ") + e.what());
    }
    return from_nlohmann(j);
}

}  // namespace si::chat
