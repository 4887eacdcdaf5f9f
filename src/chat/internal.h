// Internals of the template engine shared by its lexer, parser and evaluator.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chat/jinja.h"
#include "common/unicode.h"

namespace si::chat {

inline std::pair<uint32_t, size_t> decode_char(std::string_view s, size_t off) { return unicode::decode_utf8(s, off); }
std::string py_float(double d);

// ---- lexer -------------------------------------------------------------------------------------------------------

struct Token {
    enum class Type { name, string, integer, number, op, end };
    Type type = Type::end;
    std::string text;  // name, operator, or the decoded string literal
    int64_t i = 0;
    double f = 0;
    int line = 0;
};

// One piece of the template after whitespace control: literal text, or the tokens of a {{ }} or {% %} tag.
struct Segment {
    enum class Type { text, output, block };
    Type type = Type::text;
    std::string text;
    std::vector<Token> tokens;  // for output and block, ending with an end token
    int line = 0;
};

// Splits a template source as Jinja's lexer does with trim_blocks and lstrip_blocks (newlines normalised, one
// trailing newline dropped, comments removed, raw blocks turned into text). Throws TemplateError (syntax).
std::vector<Segment> lex(const std::string& source);

// ---- syntax tree ---------------------------------------------------------------------------------------------------

struct Expr;
using ExprP = std::unique_ptr<Expr>;
struct Expr {
    enum class Kind {
        literal, name, list, tuple, dict, attr, item, slice, call, filter, test, neg, pos, not_, binary, compare,
        and_, or_, cond
    };
    Kind kind;
    int line = 0;
    Value value;                 // literal
    std::string name;            // name, attr, filter, test, binary operator
    std::vector<ExprP> args;     // operands, in order (null for an absent slice bound or else branch)
    std::vector<std::pair<std::string, ExprP>> kwargs;
    std::vector<std::string> ops;  // compare: one operator per operand after the first
    bool negated = false;        // test: "is not"
};

struct Node;
using NodeP = std::unique_ptr<Node>;
using Body = std::vector<NodeP>;
struct Node {
    enum class Kind { text, output, if_, for_, set, set_block, macro, break_, continue_, filter_block, with, scope };
    Kind kind;
    int line = 0;
    std::string text;                     // text; macro name; filter_block filter name
    ExprP expr;                           // output value, for iterable, set value
    std::vector<std::string> targets;     // for / set names (set ns.attr: {"ns", "attr"} with attr_target)
    bool attr_target = false;
    std::vector<std::pair<ExprP, Body>> branches;  // if / elif: condition and body
    Body body, else_body;
    ExprP filter;                         // for ... if filter; filter_block: the filter call (subject = null)
    std::vector<std::pair<std::string, ExprP>> params;  // macro parameters with defaults; with assignments
};

struct Template::Program {
    Body body;
};

Body parse(const std::vector<Segment>& segments, int max_depth);

}  // namespace si::chat

namespace si::chat {

// ---- evaluation helpers shared by the evaluator and the built-in filters, tests and methods ------------------------

[[noreturn]] void runtime_error(int line, const std::string& msg);
[[noreturn]] void unsupported_error(int line, const std::string& msg);

// Code points of a string: byte offset and length of each.
std::vector<std::pair<size_t, size_t>> code_points(const std::string& s);
size_t py_len(const Value& v, int line);  // len(); throws for values without one
bool py_eq(const Value& a, const Value& b);
int py_cmp(const Value& a, const Value& b, int line);  // -1, 0, 1; throws when Python cannot order them
// Elements a for loop, list() or a filter iterates: list items, dict keys, string characters; undefined is empty.
List iterate(const Value& v, int line);
// Python's slice of a list or string.
Value py_slice(const Value& v, const Value& start, const Value& stop, const Value& step, int line);

// obj.name and obj[key] as Jinja resolves them (methods of str, dict and list are bound callables).
Value get_attr(const Value& obj, const std::string& name, int line);
Value get_item(const Value& obj, const Value& key, int line);

// What built-ins need from the renderer.
class Runtime {
public:
    virtual ~Runtime() = default;
    virtual void step(int line) = 0;  // counts one evaluation step (throws past the limit)
    virtual const Limits& limits() const = 0;
};
Value apply_filter(Runtime& rt, const std::string& name, const Value& v, std::vector<Value>& args, Kwargs& kwargs, int line);
bool apply_test(Runtime& rt, const std::string& name, const Value& v, std::vector<Value>& args, int line);

}  // namespace si::chat
