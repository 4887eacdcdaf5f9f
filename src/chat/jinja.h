// A Jinja2 subset for the chat templates instruct models ship in tokenizer.chat_template (docs/CHAT.md lists what is
// supported). Rendering follows Hugging Face's apply_chat_template environment: trim_blocks and lstrip_blocks on,
// the loop-controls extension (break/continue), autoescape off, tojson as json.dumps(ensure_ascii=False), and the
// globals raise_exception, namespace, range and (optionally) strftime_now.
//
// Values behave as Python's: strings are code-point sequences (length, slicing), ints and floats print as Python
// prints them, lists and dicts print as their repr, dicts keep insertion order.
//
// Anything outside the subset (an {% include %}, an unknown filter, test or method) is an error naming the construct
// and its line, raised when the template is parsed where possible (as Jinja does for filters and tests). Rendering is
// bounded: nesting depth, output size and evaluation steps are limited, so no template can hang or exhaust memory.
#pragma once
#include <cstdint>
#include <ctime>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace si::chat {

struct Value;
using List = std::vector<Value>;
struct Dict {
    std::vector<std::pair<std::string, Value>> items;  // insertion order
    const Value* find(const std::string& key) const;
    Value* find(const std::string& key);
    void set(const std::string& key, Value v);
};
struct Callable;

struct Value {
    enum class Kind { undefined, none, boolean, integer, number, string, list, dict, ns, callable };
    Kind kind = Kind::undefined;
    bool b = false;
    int64_t i = 0;
    double f = 0;
    std::string s;  // the string; for undefined, what was undefined (for error messages)
    std::shared_ptr<List> list;
    std::shared_ptr<Dict> dict;  // dict and namespace (ns: attributes are assignable)
    std::shared_ptr<Callable> fn;
    bool tuple = false;  // a list that prints as a Python tuple: (a, b)

    Value() = default;
    static Value undefined(std::string what = "");
    static Value none();
    static Value boolean(bool v);
    static Value integer(int64_t v);
    static Value number(double v);
    static Value string(std::string v);
    static Value array(List v = {});
    static Value pair(Value a, Value b);  // a 2-tuple, as dict.items() yields
    static Value object(Dict v = {});

    bool is_undefined() const { return kind == Kind::undefined; }
    bool is_string() const { return kind == Kind::string; }
    bool is_numeric() const { return kind == Kind::integer || kind == Kind::number || kind == Kind::boolean; }
    bool truthy() const;
    std::string type_name() const;  // Python's: "str", "int", "list", "dict", ...
};

// Keyword arguments keep their order (as Python's **kwargs).
using Kwargs = std::vector<std::pair<std::string, Value>>;
struct Callable {
    std::string name;
    std::function<Value(std::vector<Value>&, Kwargs&)> call;
};

// str(v) as Python prints it (None, True, 1.5, "['a', 1]", ...); undefined prints as "".
std::string to_str(const Value& v);
// repr(v) as Python writes it.
std::string to_repr(const Value& v);
// json.dumps(v, ensure_ascii=False, indent=indent) (indent < 0: none). Throws for undefined or callables.
std::string to_json(const Value& v, int indent = -1);
// A JSON document as a value (objects keep their key order). Throws std::runtime_error on malformed JSON.
Value from_json(const std::string& json);

// A template error: kind says whether parsing or rendering failed, or the template called raise_exception.
class TemplateError : public std::runtime_error {
public:
    enum class Kind { syntax, unsupported, runtime, raised };
    TemplateError(Kind kind, int line, const std::string& message);
    Kind kind() const { return kind_; }
    int line() const { return line_; }
    // The text given to raise_exception (kind raised), else the message without the line prefix.
    const std::string& detail() const { return detail_; }

private:
    Kind kind_;
    int line_;
    std::string detail_;
};

struct Limits {
    size_t max_output = 16u << 20;   // bytes of rendered text
    uint64_t max_steps = 2000000;    // evaluation steps (expressions, loop iterations): a second or two
    int max_depth = 200;             // nested blocks / expressions / macro calls
};

class Template {
public:
    // Parses; throws TemplateError (syntax or unsupported) naming the construct and line.
    explicit Template(const std::string& source, Limits limits = {});
    ~Template();
    Template(Template&&) noexcept;
    Template& operator=(Template&&) noexcept;

    // Renders with these top-level variables (messages, add_generation_prompt, bos_token, ...). Throws TemplateError.
    std::string render(const Dict& variables) const;
    // strftime_now(format) is defined when a time is given (Llama 3.2 prints today's date with it).
    std::string render(const Dict& variables, std::optional<std::time_t> now) const;

    struct Program;

private:
    std::unique_ptr<Program> program_;
    Limits limits_;
};

}  // namespace si::chat
