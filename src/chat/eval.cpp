// The template evaluator: statements and expressions over a scope chain, with Jinja's scoping (a for loop's body is
// a fresh scope each iteration; macros see the template's top-level variables), within the render limits.
#include <cmath>
#include <unordered_map>

#include "chat/internal.h"

namespace si::chat {

TemplateError::TemplateError(Kind kind, int line, const std::string& message)
    : std::runtime_error(kind == Kind::raised ? message : "line " + std::to_string(line) + ": " + message),
      kind_(kind),
      line_(line),
      detail_(message) {}

namespace {

using K = Value::Kind;
using Frame = std::unordered_map<std::string, Value>;

enum class Flow { normal, break_, continue_ };

bool is_int_like(const Value& v) { return v.kind == K::integer || v.kind == K::boolean; }
int64_t as_int(const Value& v) { return v.kind == K::boolean ? int64_t(v.b) : v.i; }
double as_double(const Value& v) { return v.kind == K::number ? v.f : double(as_int(v)); }

class Renderer final : public Runtime {
public:
    Renderer(const Limits& limits, std::optional<std::time_t> now) : limits_(limits), now_(now) {}

    void step(int line) override {
        if (++steps_ > limits_.max_steps)
            runtime_error(line, "the template exceeded its evaluation budget (" + std::to_string(limits_.max_steps) + " steps)");
    }
    const Limits& limits() const override { return limits_; }

    std::string run(const Body& body, const Dict& vars) {
        auto root = std::make_shared<Frame>();
        install_globals(*root);
        for (const auto& [k, v] : vars.items) (*root)[k] = v;
        frames_.push_back(root);
        exec(body);
        return std::move(out_);
    }

private:
    // ---- output and scopes --------------------------------------------------------------------------------------

    void write(const std::string& s, int line) {
        if (out_.size() + s.size() > limits_.max_output)
            runtime_error(line, "the rendered text exceeds " + std::to_string(limits_.max_output) + " bytes");
        out_ += s;
    }
    Value lookup(const std::string& name) const {
        for (auto it = frames_.rbegin(); it != frames_.rend(); ++it)
            if (auto f = (*it)->find(name); f != (*it)->end()) return f->second;
        return Value::undefined("'" + name + "' is undefined");
    }
    void assign(const std::string& name, Value v) { (*frames_.back())[name] = std::move(v); }

    struct Scope {
        Scope(Renderer& r, std::shared_ptr<Frame> f = std::make_shared<Frame>()) : r_(r) { r_.frames_.push_back(std::move(f)); }
        ~Scope() { r_.frames_.pop_back(); }
        Renderer& r_;
    };
    struct DepthGuard {
        DepthGuard(Renderer& r, int line) : r_(r) {
            if (++r_.depth_ > r_.limits_.max_depth) runtime_error(line, "nesting too deep (macro recursion?)");
        }
        ~DepthGuard() { --r_.depth_; }
        Renderer& r_;
    };

    static Value function(std::string name, std::function<Value(std::vector<Value>&, Kwargs&)> fn) {
        Value v;
        v.kind = K::callable;
        v.fn = std::make_shared<Callable>(Callable{std::move(name), std::move(fn)});
        return v;
    }

    void install_globals(Frame& g) {
        g["raise_exception"] = function("raise_exception", [](std::vector<Value>& a, Kwargs&) -> Value {
            throw TemplateError(TemplateError::Kind::raised, 0, a.empty() ? std::string() : to_str(a[0]));
        });
        g["namespace"] = function("namespace", [](std::vector<Value>& a, Kwargs& k) {
            Value ns;
            ns.kind = K::ns;
            ns.dict = std::make_shared<Dict>();
            for (const Value& x : a) {
                if (x.kind != K::dict) throw TemplateError(TemplateError::Kind::runtime, 0, "namespace() takes a mapping or keywords");
                for (const auto& [key, val] : x.dict->items) ns.dict->set(key, val);
            }
            for (auto& [key, val] : k) ns.dict->set(key, val);
            return ns;
        });
        g["dict"] = function("dict", [](std::vector<Value>& a, Kwargs& k) {
            Dict d;
            for (const Value& x : a)
                if (x.kind == K::dict)
                    for (const auto& [key, val] : x.dict->items) d.set(key, val);
            for (auto& [key, val] : k) d.set(key, val);
            return Value::object(std::move(d));
        });
        g["range"] = function("range", [this](std::vector<Value>& a, Kwargs& k) {
            if (!k.empty() || a.empty() || a.size() > 3) throw TemplateError(TemplateError::Kind::runtime, 0, "range() takes 1 to 3 integers");
            for (const Value& x : a)
                if (!is_int_like(x)) throw TemplateError(TemplateError::Kind::runtime, 0, "range() takes integers");
            int64_t start = 0, stop, st = 1;
            if (a.size() == 1) stop = as_int(a[0]);
            else start = as_int(a[0]), stop = as_int(a[1]);
            if (a.size() == 3) st = as_int(a[2]);
            if (st == 0) throw TemplateError(TemplateError::Kind::runtime, 0, "range() arg 3 must not be zero");
            List l;
            for (int64_t i = start; st > 0 ? i < stop : i > stop; i += st) {
                if (l.size() >= 1000000) throw TemplateError(TemplateError::Kind::runtime, 0, "range() is too long");
                step(0);
                l.push_back(Value::integer(i));
            }
            return Value::array(std::move(l));
        });
        if (now_) {
            const std::time_t t = *now_;
            g["strftime_now"] = function("strftime_now", [t](std::vector<Value>& a, Kwargs&) {
                if (a.size() != 1 || a[0].kind != K::string)
                    throw TemplateError(TemplateError::Kind::runtime, 0, "strftime_now() takes a format string");
                std::tm tm{};
                gmtime_r(&t, &tm);
                char buf[256];
                const size_t n = std::strftime(buf, sizeof buf, a[0].s.c_str(), &tm);
                return Value::string(std::string(buf, n));
            });
        }
    }

    // ---- statements ---------------------------------------------------------------------------------------------

    Flow exec(const Body& body) {
        for (const NodeP& n : body) {
            const Flow f = exec(*n);
            if (f != Flow::normal) return f;
        }
        return Flow::normal;
    }

    Flow exec(const Node& n) {
        step(n.line);
        switch (n.kind) {
            case Node::Kind::text: write(n.text, n.line); return Flow::normal;
            case Node::Kind::output: write(to_str(eval(*n.expr)), n.line); return Flow::normal;
            case Node::Kind::if_:
                for (const auto& [cond, body] : n.branches)
                    if (eval(*cond).truthy()) return exec(body);
                return exec(n.else_body);
            case Node::Kind::for_: return exec_for(n);
            case Node::Kind::set: {
                Value v = eval(*n.expr);
                if (n.attr_target) {
                    Value ns = lookup(n.targets[0]);
                    if (ns.kind != K::ns) runtime_error(n.line, "cannot assign attribute on non-namespace object '" + n.targets[0] + "'");
                    ns.dict->set(n.targets[1], std::move(v));
                } else if (n.targets.size() == 1) {
                    assign(n.targets[0], std::move(v));
                } else {
                    const List items = iterate(v, n.line);
                    if (items.size() != n.targets.size())
                        runtime_error(n.line, "cannot unpack " + std::to_string(items.size()) + " values into " +
                                                  std::to_string(n.targets.size()) + " names");
                    for (size_t i = 0; i < items.size(); ++i) assign(n.targets[i], items[i]);
                }
                return Flow::normal;
            }
            case Node::Kind::set_block: assign(n.targets[0], Value::string(capture(n.body, n.line))); return Flow::normal;
            case Node::Kind::macro: assign(n.text, make_macro(n)); return Flow::normal;
            case Node::Kind::break_: return Flow::break_;
            case Node::Kind::continue_: return Flow::continue_;
            case Node::Kind::filter_block: {
                const Expr& f = *n.filter;
                std::vector<Value> args;
                Kwargs kw;
                eval_args(f, 1, args, kw);
                write(to_str(apply_filter(*this, f.name, Value::string(capture(n.body, n.line)), args, kw, f.line)), n.line);
                return Flow::normal;
            }
            case Node::Kind::with: {
                std::vector<std::pair<std::string, Value>> vals;
                for (const auto& [name, e] : n.params) vals.emplace_back(name, eval(*e));
                Scope s(*this);
                for (auto& [name, v] : vals) assign(name, std::move(v));
                return exec(n.body);
            }
            case Node::Kind::scope: return exec(n.body);
        }
        return Flow::normal;
    }

    std::string capture(const Body& body, int line) {
        DepthGuard d(*this, line);
        std::string saved = std::move(out_);
        out_.clear();
        try {
            Scope s(*this);
            exec(body);
        } catch (...) {
            out_ = std::move(saved);
            throw;
        }
        std::string got = std::move(out_);
        out_ = std::move(saved);
        return got;
    }

    Flow exec_for(const Node& n) {
        DepthGuard d(*this, n.line);
        const Value seq = eval(*n.expr);
        if (seq.kind == K::none || seq.kind == K::boolean || seq.kind == K::integer || seq.kind == K::number || seq.kind == K::callable || seq.kind == K::ns)
            runtime_error(n.line, "'" + seq.type_name() + "' object is not iterable");
        List items = iterate(seq, n.line);
        const auto bind_targets = [&](const Value& item) {
            if (n.targets.size() == 1) {
                assign(n.targets[0], item);
                return;
            }
            const List parts = iterate(item, n.line);
            if (parts.size() != n.targets.size())
                runtime_error(n.line, "cannot unpack " + std::to_string(parts.size()) + " values into " +
                                          std::to_string(n.targets.size()) + " loop variables");
            for (size_t i = 0; i < parts.size(); ++i) assign(n.targets[i], parts[i]);
        };
        if (n.filter) {
            List kept;
            for (const Value& item : items) {
                step(n.line);
                Scope s(*this);
                bind_targets(item);
                if (eval(*n.filter).truthy()) kept.push_back(item);
            }
            items.swap(kept);
        }
        if (items.empty()) return exec(n.else_body);  // a break there belongs to an enclosing loop
        const int64_t len = int64_t(items.size());
        for (int64_t i = 0; i < len; ++i) {
            step(n.line);
            Scope s(*this);
            Dict loop;
            loop.set("index", Value::integer(i + 1));
            loop.set("index0", Value::integer(i));
            loop.set("revindex", Value::integer(len - i));
            loop.set("revindex0", Value::integer(len - i - 1));
            loop.set("first", Value::boolean(i == 0));
            loop.set("last", Value::boolean(i == len - 1));
            loop.set("length", Value::integer(len));
            loop.set("depth", Value::integer(1));
            loop.set("depth0", Value::integer(0));
            loop.set("previtem", i > 0 ? items[size_t(i - 1)] : Value::undefined("there is no previous item"));
            loop.set("nextitem", i + 1 < len ? items[size_t(i + 1)] : Value::undefined("there is no next item"));
            loop.set("cycle", function("cycle", [i](std::vector<Value>& a, Kwargs&) {
                if (a.empty()) throw TemplateError(TemplateError::Kind::runtime, 0, "no items for cycling given");
                return a[size_t(i) % a.size()];
            }));
            Value lv = Value::object(std::move(loop));
            assign("loop", lv);
            bind_targets(items[size_t(i)]);
            if (exec(n.body) == Flow::break_) break;
        }
        return Flow::normal;
    }

    Value make_macro(const Node& n) {
        const Node* node = &n;
        // Weak: the macro is stored in the frame it refers to (a strong reference would be a cycle).
        std::weak_ptr<Frame> weak_root = frames_.front();
        return function(n.text, [this, node, weak_root](std::vector<Value>& a, Kwargs& k) {
            DepthGuard d(*this, node->line);
            std::shared_ptr<Frame> root = weak_root.lock();
            if (!root) runtime_error(node->line, "macro '" + node->text + "' called after its template finished");
            if (a.size() > node->params.size())
                runtime_error(node->line, "macro '" + node->text + "' takes " + std::to_string(node->params.size()) +
                                              " arguments (" + std::to_string(a.size()) + " given)");
            auto frame = std::make_shared<Frame>();
            std::vector<std::shared_ptr<Frame>> saved;
            saved.swap(frames_);
            frames_.push_back(root);
            frames_.push_back(frame);
            std::string saved_out = std::move(out_);
            out_.clear();
            try {
                for (size_t i = 0; i < node->params.size(); ++i) {
                    const auto& [pname, def] = node->params[i];
                    Value v = Value::undefined("'" + pname + "' is undefined");
                    bool given = false;
                    if (i < a.size()) v = a[i], given = true;
                    for (auto& [key, val] : k)
                        if (key == pname) v = val, given = true;
                    if (!given && def) v = eval(*def);
                    (*frame)[pname] = v;
                }
                for (auto& [key, val] : k) {
                    bool known = false;
                    for (const auto& p : node->params) known = known || p.first == key;
                    if (!known) runtime_error(node->line, "macro '" + node->text + "' takes no keyword argument '" + key + "'");
                }
                exec(node->body);
            } catch (...) {
                frames_.swap(saved);
                out_ = std::move(saved_out);
                throw;
            }
            frames_.swap(saved);
            std::string got = std::move(out_);
            out_ = std::move(saved_out);
            return Value::string(std::move(got));
        });
    }

    // ---- expressions --------------------------------------------------------------------------------------------

    void eval_args(const Expr& e, size_t first, std::vector<Value>& args, Kwargs& kw) {
        for (size_t i = first; i < e.args.size(); ++i) args.push_back(eval(*e.args[i]));
        for (const auto& [k, x] : e.kwargs) kw.emplace_back(k, eval(*x));
    }

    static void need_defined(const Value& v, int line) {
        if (v.is_undefined()) runtime_error(line, v.s.empty() ? "value is undefined" : v.s);
    }

    Value eval(const Expr& e) {
        step(e.line);
        DepthGuard d(*this, e.line);
        switch (e.kind) {
            case Expr::Kind::literal: return e.value;
            case Expr::Kind::name: return lookup(e.name);
            case Expr::Kind::list:
            case Expr::Kind::tuple: {
                List l;
                for (const ExprP& x : e.args) l.push_back(eval(*x));
                Value v = Value::array(std::move(l));
                v.tuple = e.kind == Expr::Kind::tuple;
                return v;
            }
            case Expr::Kind::dict: {
                Dict dct;
                for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
                    Value k = eval(*e.args[i]);
                    if (k.kind != K::string) unsupported_error(e.line, "dict keys must be strings, not " + k.type_name());
                    dct.set(k.s, eval(*e.args[i + 1]));
                }
                return Value::object(std::move(dct));
            }
            case Expr::Kind::attr: return get_attr(eval(*e.args[0]), e.name, e.line);
            case Expr::Kind::item: {
                const Value obj = eval(*e.args[0]);
                return get_item(obj, eval(*e.args[1]), e.line);
            }
            case Expr::Kind::slice: {
                const Value obj = eval(*e.args[0]);
                const auto opt = [&](const ExprP& x) { return x ? eval(*x) : Value::none(); };
                return py_slice(obj, opt(e.args[1]), opt(e.args[2]), opt(e.args[3]), e.line);
            }
            case Expr::Kind::call: {
                const Value fn = eval(*e.args[0]);
                if (fn.is_undefined()) runtime_error(e.line, fn.s.empty() ? "call of an undefined value" : fn.s);
                if (fn.kind != K::callable) runtime_error(e.line, "'" + fn.type_name() + "' object is not callable");
                std::vector<Value> args;
                Kwargs kw;
                eval_args(e, 1, args, kw);
                try {
                    return fn.fn->call(args, kw);
                } catch (const TemplateError& err) {
                    if (err.line() != 0 || err.kind() == TemplateError::Kind::raised) throw;
                    throw TemplateError(err.kind(), e.line, err.detail());
                }
            }
            case Expr::Kind::filter: {
                const Value v = eval(*e.args[0]);
                std::vector<Value> args;
                Kwargs kw;
                eval_args(e, 1, args, kw);
                return apply_filter(*this, e.name, v, args, kw, e.line);
            }
            case Expr::Kind::test: {
                const Value v = eval(*e.args[0]);
                std::vector<Value> args;
                Kwargs kw;
                eval_args(e, 1, args, kw);
                if (!kw.empty()) unsupported_error(e.line, "keyword arguments to tests are not supported");
                return Value::boolean(apply_test(*this, e.name, v, args, e.line) != e.negated);
            }
            case Expr::Kind::not_: return Value::boolean(!eval(*e.args[0]).truthy());
            case Expr::Kind::and_: {
                Value l = eval(*e.args[0]);
                return l.truthy() ? eval(*e.args[1]) : l;
            }
            case Expr::Kind::or_: {
                Value l = eval(*e.args[0]);
                return l.truthy() ? l : eval(*e.args[1]);
            }
            case Expr::Kind::cond:
                if (eval(*e.args[1]).truthy()) return eval(*e.args[0]);
                return e.args[2] ? eval(*e.args[2]) : Value::undefined("the inline if expression on line " + std::to_string(e.line) + " evaluated to false and no else section was defined");
            case Expr::Kind::neg:
            case Expr::Kind::pos: {
                const Value v = eval(*e.args[0]);
                need_defined(v, e.line);
                if (is_int_like(v)) {
                    if (e.kind == Expr::Kind::pos) return Value::integer(as_int(v));
                    if (as_int(v) == INT64_MIN) runtime_error(e.line, "integer overflow");
                    return Value::integer(-as_int(v));
                }
                if (v.kind == K::number) return Value::number(e.kind == Expr::Kind::neg ? -v.f : v.f);
                runtime_error(e.line, "bad operand type for unary " + std::string(e.kind == Expr::Kind::neg ? "-" : "+") + ": '" + v.type_name() + "'");
            }
            case Expr::Kind::binary: return binary(e.name, eval(*e.args[0]), eval(*e.args[1]), e.line);
            case Expr::Kind::compare: {
                Value left = eval(*e.args[0]);
                for (size_t i = 0; i < e.ops.size(); ++i) {
                    Value right = eval(*e.args[i + 1]);
                    if (!compare(e.ops[i], left, right, e.line)) return Value::boolean(false);
                    left = std::move(right);
                }
                return Value::boolean(true);
            }
        }
        runtime_error(e.line, "unknown expression");
    }

    bool compare(const std::string& op, const Value& a, const Value& b, int line) {
        if (op == "==") return py_eq(a, b);
        if (op == "!=") return !py_eq(a, b);
        if (op == "in" || op == "not in") {
            std::vector<Value> args{b};
            if (b.kind != K::string && b.kind != K::dict && b.kind != K::list && !b.is_undefined())
                runtime_error(line, "argument of type '" + b.type_name() + "' is not iterable");
            if (b.kind == K::string && a.is_undefined()) need_defined(a, line);
            return apply_test(*this, "in", a, args, line) == (op == "in");
        }
        const int c = py_cmp(a, b, line);
        if (op == "<") return c < 0;
        if (op == ">") return c > 0;
        if (op == "<=") return c <= 0;
        return c >= 0;
    }

    Value binary(const std::string& op, const Value& a, const Value& b, int line) {
        if (op == "~") return Value::string(to_str(a) + to_str(b));
        need_defined(a, line);
        need_defined(b, line);
        const auto type_error = [&]() -> Value {
            runtime_error(line, "unsupported operand type(s) for " + op + ": '" + a.type_name() + "' and '" + b.type_name() + "'");
        };
        const bool ints = is_int_like(a) && is_int_like(b);
        const bool nums = a.is_numeric() && b.is_numeric();
        const auto overflow = [&]() -> Value { runtime_error(line, "integer overflow in '" + op + "'"); };
        if (op == "+") {
            if (a.kind == K::string && b.kind == K::string) {
                if (a.s.size() + b.s.size() > limits_.max_output) runtime_error(line, "string too long");
                return Value::string(a.s + b.s);
            }
            if (a.kind == K::list && b.kind == K::list) {
                List l = *a.list;
                l.insert(l.end(), b.list->begin(), b.list->end());
                return Value::array(std::move(l));
            }
            if (a.kind == K::string || b.kind == K::string)
                runtime_error(line, a.kind == K::string ? "can only concatenate str (not \"" + b.type_name() + "\") to str"
                                                        : "unsupported operand type(s) for +: '" + a.type_name() + "' and 'str'");
            if (ints) {
                int64_t r;
                return __builtin_add_overflow(as_int(a), as_int(b), &r) ? overflow() : Value::integer(r);
            }
            if (nums) return Value::number(as_double(a) + as_double(b));
            return type_error();
        }
        if (op == "-") {
            if (ints) {
                int64_t r;
                return __builtin_sub_overflow(as_int(a), as_int(b), &r) ? overflow() : Value::integer(r);
            }
            if (nums) return Value::number(as_double(a) - as_double(b));
            return type_error();
        }
        if (op == "*") {
            if (ints) {
                int64_t r;
                return __builtin_mul_overflow(as_int(a), as_int(b), &r) ? overflow() : Value::integer(r);
            }
            if (nums) return Value::number(as_double(a) * as_double(b));
            const Value* seq = a.kind == K::string || a.kind == K::list ? &a : b.kind == K::string || b.kind == K::list ? &b : nullptr;
            const Value* cnt = seq == &a ? &b : &a;
            if (!seq || !is_int_like(*cnt)) return type_error();
            const int64_t n = std::max<int64_t>(0, as_int(*cnt));
            const size_t unit = seq->kind == K::string ? seq->s.size() : seq->list->size();
            if (unit != 0 && uint64_t(n) > limits_.max_output / unit) runtime_error(line, "repetition result too long");
            if (seq->kind == K::string) {
                std::string r;
                for (int64_t i = 0; i < n; ++i) r += seq->s;
                return Value::string(std::move(r));
            }
            List l;
            for (int64_t i = 0; i < n; ++i) l.insert(l.end(), seq->list->begin(), seq->list->end());
            return Value::array(std::move(l));
        }
        if (op == "/") {
            if (!nums) return type_error();
            if (as_double(b) == 0) runtime_error(line, "division by zero");
            return Value::number(as_double(a) / as_double(b));
        }
        if (op == "//" || op == "%") {
            if (a.kind == K::string && op == "%") unsupported_error(line, "string formatting with '%' is not supported");
            if (!nums) return type_error();
            if (ints) {
                const int64_t x = as_int(a), y = as_int(b);
                if (y == 0) runtime_error(line, "integer division or modulo by zero");
                if (x == INT64_MIN && y == -1) return overflow();
                int64_t q = x / y, r = x % y;
                if (r != 0 && ((r < 0) != (y < 0))) --q, r += y;
                return Value::integer(op == "//" ? q : r);
            }
            const double x = as_double(a), y = as_double(b);
            if (y == 0) runtime_error(line, "float division by zero");
            if (op == "//") return Value::number(std::floor(x / y));
            double r = std::fmod(x, y);
            if (r != 0 && ((r < 0) != (y < 0))) r += y;
            return Value::number(r);
        }
        if (op == "**") {
            if (!nums) return type_error();
            if (ints && as_int(b) >= 0) {
                const int64_t base = as_int(a), k = as_int(b);
                if (base == 0) return Value::integer(k == 0 ? 1 : 0);
                if (base == 1) return Value::integer(1);
                if (base == -1) return Value::integer(k % 2 ? -1 : 1);
                int64_t r = 1;
                for (int64_t j = 0; j < k; ++j)  // |base| >= 2 overflows within 63 steps
                    if (__builtin_mul_overflow(r, base, &r)) return overflow();
                return Value::integer(r);
            }
            return Value::number(std::pow(as_double(a), as_double(b)));
        }
        return type_error();
    }

    const Limits& limits_;
    std::optional<std::time_t> now_;
    std::vector<std::shared_ptr<Frame>> frames_;
    std::string out_;
    uint64_t steps_ = 0;
    int depth_ = 0;
};

}  // namespace

Template::Template(const std::string& source, Limits limits) : program_(std::make_unique<Program>()), limits_(limits) {
    program_->body = parse(lex(source), limits_.max_depth);
}
Template::~Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;

std::string Template::render(const Dict& variables) const { return render(variables, std::nullopt); }

std::string Template::render(const Dict& variables, std::optional<std::time_t> now) const {
    Renderer r(limits_, now);
    return r.run(program_->body, variables);
}

}  // namespace si::chat
