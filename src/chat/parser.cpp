// The template parser: Jinja's grammar (jinja2/parser.py) for expressions and the statements chat templates use.
#include <set>

#include "chat/internal.h"

namespace si::chat {

namespace {

using TT = Token::Type;

const std::set<std::string> kFilters = {
    "abs",    "attr",   "capitalize", "count",      "d",         "default", "dictsort", "e",
    "escape", "first",  "float",  "indent",     "int",    "items",      "join",      "last",    "length",   "list",
    "lower",  "map",    "max",    "min",        "reject", "rejectattr", "replace",   "reverse", "round",    "safe",
    "select", "selectattr", "sort", "string",   "sum",    "title",      "tojson",    "trim",    "unique",   "upper",
    "wordcount"};
const std::set<std::string> kTests = {
    "boolean", "callable", "defined", "undefined", "divisibleby", "eq",      "equalto", "==",     "ne",   "!=",
    "lt",      "<",        "lessthan", "le",       "<=",          "gt",      ">",       "greaterthan", "ge", ">=",
    "even",    "odd",      "false",   "true",      "float",       "integer", "in",      "iterable", "mapping",
    "none",    "number",   "sameas",  "sequence",  "string",      "lower",   "upper",   "filter", "test"};

[[noreturn]] void syntax(int line, const std::string& msg) { throw TemplateError(TemplateError::Kind::syntax, line, msg); }
[[noreturn]] void unsupported(int line, const std::string& msg) {
    throw TemplateError(TemplateError::Kind::unsupported, line, msg);
}

ExprP make(Expr::Kind k, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->line = line;
    return e;
}

std::string describe(const Token& t) {
    switch (t.type) {
        case TT::end: return "end of tag";
        case TT::string: return "string literal";
        case TT::integer:
        case TT::number: return "number '" + t.text + "'";
        default: return "'" + t.text + "'";
    }
}

// Expressions over one tag's tokens.
class ExprParser {
public:
    ExprParser(const std::vector<Token>& toks, int max_depth) : t_(toks), max_depth_(max_depth) {}

    const Token& peek(size_t ahead = 0) const { return t_[std::min(p_ + ahead, t_.size() - 1)]; }
    const Token& next() {
        const Token& t = peek();
        if (p_ < t_.size() - 1) ++p_;
        return t;
    }
    bool at_op(const char* op, size_t ahead = 0) const { return peek(ahead).type == TT::op && peek(ahead).text == op; }
    bool at_name(const char* n, size_t ahead = 0) const { return peek(ahead).type == TT::name && peek(ahead).text == n; }
    bool at_end() const { return peek().type == TT::end; }
    void expect_op(const char* op) {
        if (!at_op(op)) syntax(peek().line, std::string("expected '") + op + "', got " + describe(peek()));
        next();
    }
    std::string expect_name() {
        if (peek().type != TT::name) syntax(peek().line, "expected a name, got " + describe(peek()));
        return next().text;
    }
    void expect_end(const std::string& tag) {
        if (!at_end()) syntax(peek().line, "unexpected " + describe(peek()) + " in '" + tag + "'");
    }

    ExprP expression(bool with_cond = true) {
        Depth d(*this);
        ExprP e = or_expr();
        if (with_cond && at_name("if")) {
            const int line = next().line;
            auto c = make(Expr::Kind::cond, line);
            ExprP cond = or_expr();
            ExprP other;
            if (at_name("else")) {
                next();
                other = expression();
            }
            c->args.push_back(std::move(e));
            c->args.push_back(std::move(cond));
            c->args.push_back(std::move(other));
            return c;
        }
        return e;
    }

    // A comma-separated list as a tuple when there is a comma (for "set a, b = ..." values and "for" iterables).
    ExprP tuple_or_expression(bool with_cond = true) {
        const int line = peek().line;
        ExprP first = expression(with_cond);
        if (!at_op(",")) return first;
        auto t = make(Expr::Kind::tuple, line);
        t->args.push_back(std::move(first));
        while (at_op(",")) {
            next();
            if (at_end() || at_op(")") || at_op("=") || at_name("in")) break;
            t->args.push_back(expression(with_cond));
        }
        return t;
    }

    // Names for "for" and "set" targets: "a" or "a, b" or "(a, b)".
    std::vector<std::string> targets() {
        std::vector<std::string> names;
        const bool paren = at_op("(");
        if (paren) next();
        names.push_back(expect_name());
        while (at_op(",")) {
            next();
            if (peek().type != TT::name) break;
            names.push_back(expect_name());
        }
        if (paren) expect_op(")");
        return names;
    }

    // Keyword and positional arguments of a call, after '('.
    void call_args(Expr& e) {
        for (int n = 0; !at_op(")"); ++n) {
            if (n > 0) {
                expect_op(",");
                if (at_op(")")) break;
            }
            if (at_op("*") || at_op("**")) unsupported(peek().line, "argument unpacking (*args, **kwargs) is not supported");
            if (peek().type == TT::name && at_op("=", 1)) {
                const std::string key = next().text;
                next();
                e.kwargs.emplace_back(key, expression());
            } else {
                if (!e.kwargs.empty()) syntax(peek().line, "positional argument after a keyword argument");
                e.args.push_back(expression());
            }
        }
        next();
    }

    size_t pos() const { return p_; }

private:
    struct Depth {
        explicit Depth(ExprParser& p) : p_(p) {
            if (++p_.depth_ > p_.max_depth_) syntax(p_.peek().line, "expression nested too deeply");
        }
        ~Depth() { --p_.depth_; }
        ExprParser& p_;
    };

    ExprP or_expr() {
        ExprP l = and_expr();
        while (at_name("or")) {
            auto e = make(Expr::Kind::or_, next().line);
            e->args.push_back(std::move(l));
            e->args.push_back(and_expr());
            l = std::move(e);
        }
        return l;
    }
    ExprP and_expr() {
        ExprP l = not_expr();
        while (at_name("and")) {
            auto e = make(Expr::Kind::and_, next().line);
            e->args.push_back(std::move(l));
            e->args.push_back(not_expr());
            l = std::move(e);
        }
        return l;
    }
    ExprP not_expr() {
        if (at_name("not")) {
            Depth d(*this);
            auto e = make(Expr::Kind::not_, next().line);
            e->args.push_back(not_expr());
            return e;
        }
        return compare();
    }
    ExprP compare() {
        const int line = peek().line;
        ExprP first = math1();
        std::unique_ptr<Expr> c;
        while (true) {
            std::string op;
            if (peek().type == TT::op && (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                                          peek().text == ">" || peek().text == "<=" || peek().text == ">=")) {
                op = next().text;
            } else if (at_name("in")) {
                next();
                op = "in";
            } else if (at_name("not") && at_name("in", 1)) {
                next();
                next();
                op = "not in";
            } else {
                break;
            }
            if (!c) {
                c = make(Expr::Kind::compare, line);
                c->args.push_back(std::move(first));
            }
            c->ops.push_back(op);
            c->args.push_back(math1());
        }
        return c ? std::move(c) : std::move(first);
    }
    ExprP binary(const std::string& op, ExprP l, ExprP r, int line) {
        auto e = make(Expr::Kind::binary, line);
        e->name = op;
        e->args.push_back(std::move(l));
        e->args.push_back(std::move(r));
        return e;
    }
    ExprP math1() {
        ExprP l = concat();
        while (at_op("+") || at_op("-")) {
            const Token& t = next();
            l = binary(t.text, std::move(l), concat(), t.line);
        }
        return l;
    }
    ExprP concat() {
        ExprP l = math2();
        while (at_op("~")) {
            const Token& t = next();
            l = binary("~", std::move(l), math2(), t.line);
        }
        return l;
    }
    ExprP math2() {
        ExprP l = pow();
        while (at_op("*") || at_op("/") || at_op("//") || at_op("%")) {
            const Token& t = next();
            l = binary(t.text, std::move(l), pow(), t.line);
        }
        return l;
    }
    ExprP pow() {
        ExprP l = unary(true);
        while (at_op("**")) {
            const Token& t = next();
            l = binary("**", std::move(l), unary(true), t.line);
        }
        return l;
    }
    ExprP unary(bool with_filter) {
        Depth d(*this);
        ExprP e;
        if (at_op("-") || at_op("+")) {
            const Token& t = next();
            e = make(t.text == "-" ? Expr::Kind::neg : Expr::Kind::pos, t.line);
            e->args.push_back(unary(false));
        } else {
            e = postfix(primary());
        }
        return with_filter ? filters(std::move(e)) : std::move(e);
    }
    ExprP primary() {
        const Token& t = peek();
        switch (t.type) {
            case TT::name: {
                next();
                auto e = make(Expr::Kind::literal, t.line);
                if (t.text == "true" || t.text == "True") e->value = Value::boolean(true);
                else if (t.text == "false" || t.text == "False") e->value = Value::boolean(false);
                else if (t.text == "none" || t.text == "None") e->value = Value::none();
                else {
                    e->kind = Expr::Kind::name;
                    e->name = t.text;
                }
                return e;
            }
            case TT::string: {
                std::string s;
                const int line = t.line;
                while (peek().type == TT::string) s += next().text;  // adjacent literals concatenate
                auto e = make(Expr::Kind::literal, line);
                e->value = Value::string(std::move(s));
                return e;
            }
            case TT::integer: {
                next();
                auto e = make(Expr::Kind::literal, t.line);
                e->value = Value::integer(t.i);
                return e;
            }
            case TT::number: {
                next();
                auto e = make(Expr::Kind::literal, t.line);
                e->value = Value::number(t.f);
                return e;
            }
            case TT::op:
                if (t.text == "(") {
                    next();
                    if (at_op(")")) {
                        next();
                        return make(Expr::Kind::tuple, t.line);
                    }
                    ExprP e = tuple_or_expression();
                    expect_op(")");
                    return e;
                }
                if (t.text == "[") {
                    next();
                    auto e = make(Expr::Kind::list, t.line);
                    while (!at_op("]")) {
                        if (!e->args.empty()) {
                            expect_op(",");
                            if (at_op("]")) break;
                        }
                        e->args.push_back(expression());
                    }
                    next();
                    return e;
                }
                if (t.text == "{") {
                    next();
                    auto e = make(Expr::Kind::dict, t.line);
                    while (!at_op("}")) {
                        if (!e->args.empty()) {
                            expect_op(",");
                            if (at_op("}")) break;
                        }
                        e->args.push_back(expression());
                        expect_op(":");
                        e->args.push_back(expression());
                    }
                    next();
                    return e;
                }
                break;
            default: break;
        }
        syntax(t.line, "unexpected " + describe(t));
    }
    ExprP postfix(ExprP e) {
        while (true) {
            if (at_op(".")) {
                const int line = next().line;
                auto a = make(Expr::Kind::attr, line);
                if (peek().type == TT::integer) {
                    a->kind = Expr::Kind::item;
                    auto idx = make(Expr::Kind::literal, line);
                    idx->value = Value::integer(next().i);
                    a->args.push_back(std::move(e));
                    a->args.push_back(std::move(idx));
                } else {
                    a->name = expect_name();
                    a->args.push_back(std::move(e));
                }
                e = std::move(a);
            } else if (at_op("[")) {
                const int line = next().line;
                ExprP parts[3];
                bool slice = false;
                int part = 0;
                while (!at_op("]")) {
                    if (at_op(":")) {
                        next();
                        slice = true;
                        if (++part > 2) syntax(line, "too many ':' in a subscript");
                        continue;
                    }
                    if (parts[part]) syntax(peek().line, "unexpected " + describe(peek()) + " in a subscript");
                    parts[part] = expression();
                }
                next();
                if (!slice && !parts[0]) syntax(line, "empty subscript");
                auto s = make(slice ? Expr::Kind::slice : Expr::Kind::item, line);
                s->args.push_back(std::move(e));
                s->args.push_back(std::move(parts[0]));
                if (slice) {
                    s->args.push_back(std::move(parts[1]));
                    s->args.push_back(std::move(parts[2]));
                }
                e = std::move(s);
            } else if (at_op("(")) {
                const int line = next().line;
                auto c = make(Expr::Kind::call, line);
                c->args.push_back(std::move(e));
                call_args(*c);
                e = std::move(c);
            } else {
                return e;
            }
        }
    }
    ExprP filters(ExprP e) {
        while (true) {
            if (at_op("|")) {
                const int line = next().line;
                auto f = make(Expr::Kind::filter, line);
                f->name = expect_name();
                while (at_op(".")) {
                    next();
                    f->name += '.';
                    f->name += expect_name();
                }
                if (!kFilters.count(f->name)) unsupported(line, "unknown filter '" + f->name + "'");
                f->args.push_back(std::move(e));
                if (at_op("(")) {
                    next();
                    call_args(*f);
                }
                e = std::move(f);
            } else if (at_name("is")) {
                const int line = next().line;
                auto t = make(Expr::Kind::test, line);
                if (at_name("not")) {
                    next();
                    t->negated = true;
                }
                if (peek().type == TT::op && (at_op("==") || at_op("!=") || at_op("<") || at_op(">") || at_op("<=") || at_op(">=")))
                    t->name = next().text;
                else
                    t->name = expect_name();
                if (!kTests.count(t->name)) unsupported(line, "unknown test '" + t->name + "'");
                t->args.push_back(std::move(e));
                if (at_op("(")) {
                    next();
                    call_args(*t);
                } else if ((peek().type == TT::name || peek().type == TT::string || peek().type == TT::integer ||
                            peek().type == TT::number || at_op("[") || at_op("{")) &&
                           !at_name("else") && !at_name("or") && !at_name("and") && !at_name("if") && !at_name("in") &&
                           !at_name("not") && !at_name("is")) {
                    t->args.push_back(postfix(primary()));
                }
                e = std::move(t);
            } else if (at_op("(")) {
                e = postfix(std::move(e));
            } else {
                return e;
            }
        }
    }

    const std::vector<Token>& t_;
    size_t p_ = 0;
    int depth_ = 0;
    int max_depth_;
};

// Statements over the segment list.
class Parser {
public:
    Parser(const std::vector<Segment>& segs, int max_depth) : s_(segs), max_depth_(max_depth) {}

    Body parse_all() {
        std::string stop;
        Body b = body({}, stop);
        return b;
    }

private:
    // Parses nodes until a block tag whose name is in `ends` (returned in `stop`, its parser positioned after it).
    Body body(const std::set<std::string>& ends, std::string& stop) {
        if (++depth_ > max_depth_) syntax(s_[std::min(i_, s_.size() - 1)].line, "blocks nested too deeply");
        Body out;
        while (i_ < s_.size()) {
            const Segment& seg = s_[i_];
            if (seg.type == Segment::Type::text) {
                auto n = std::make_unique<Node>();
                n->kind = Node::Kind::text;
                n->line = seg.line;
                n->text = seg.text;
                out.push_back(std::move(n));
                ++i_;
                continue;
            }
            ExprParser p(seg.tokens, max_depth_);
            if (seg.type == Segment::Type::output) {
                auto n = std::make_unique<Node>();
                n->kind = Node::Kind::output;
                n->line = seg.line;
                n->expr = p.tuple_or_expression();
                p.expect_end("{{ }}");
                out.push_back(std::move(n));
                ++i_;
                continue;
            }
            if (p.peek().type != TT::name) syntax(seg.line, "expected a statement name after '{%'");
            const std::string tag = p.peek().text;
            if (ends.count(tag)) {
                stop = tag;
                cur_ = std::make_unique<ExprParser>(seg.tokens, max_depth_);
                cur_->next();
                ++i_;
                --depth_;
                return out;
            }
            p.next();
            ++i_;
            out.push_back(statement(tag, p, seg.line));
        }
        if (!ends.empty()) {
            std::string want;
            for (const auto& e : ends) want += (want.empty() ? "" : " or ") + std::string("'") + e + "'";
            syntax(s_.empty() ? 1 : s_.back().line, "unexpected end of template, expected " + want);
        }
        --depth_;
        return out;
    }

    NodeP statement(const std::string& tag, ExprParser& p, int line) {
        auto n = std::make_unique<Node>();
        n->line = line;
        std::string stop;
        if (tag == "if") {
            n->kind = Node::Kind::if_;
            ExprP cond = p.expression();
            p.expect_end("if");
            while (true) {
                Body b = body({"elif", "else", "endif"}, stop);
                n->branches.emplace_back(std::move(cond), std::move(b));
                if (stop == "elif") {
                    cond = cur_->expression();
                    cur_->expect_end("elif");
                    continue;
                }
                if (stop == "else") {
                    cur_->expect_end("else");
                    n->else_body = body({"endif"}, stop);
                }
                cur_->expect_end("endif");
                break;
            }
        } else if (tag == "for") {
            n->kind = Node::Kind::for_;
            n->targets = p.targets();
            if (!p.at_name("in")) syntax(line, "expected 'in' in 'for', got " + describe(p.peek()));
            p.next();
            n->expr = p.tuple_or_expression(false);
            if (p.at_name("if")) {
                p.next();
                n->filter = p.expression();
            }
            if (p.at_name("recursive")) unsupported(line, "recursive for loops are not supported");
            p.expect_end("for");
            ++loops_;
            n->body = body({"else", "endfor"}, stop);
            --loops_;
            if (stop == "else") {
                cur_->expect_end("else");
                n->else_body = body({"endfor"}, stop);
            }
            cur_->expect_end("endfor");
        } else if (tag == "set") {
            n->targets.push_back(p.expect_name());
            if (p.at_op(".")) {
                p.next();
                n->targets.push_back(p.expect_name());
                n->attr_target = true;
            } else {
                while (p.at_op(",")) {
                    p.next();
                    n->targets.push_back(p.expect_name());
                }
            }
            if (p.at_op("=")) {
                p.next();
                n->kind = Node::Kind::set;
                n->expr = p.tuple_or_expression();
                p.expect_end("set");
            } else {
                if (n->attr_target || n->targets.size() != 1) syntax(line, "a block 'set' takes one plain name");
                n->kind = Node::Kind::set_block;
                if (p.at_op("|")) unsupported(line, "filters on a block 'set' are not supported");
                p.expect_end("set");
                n->body = body({"endset"}, stop);
                cur_->expect_end("endset");
            }
        } else if (tag == "macro") {
            n->kind = Node::Kind::macro;
            n->text = p.expect_name();
            p.expect_op("(");
            while (!p.at_op(")")) {
                if (!n->params.empty()) p.expect_op(",");
                if (p.at_op(")")) break;
                std::string name = p.expect_name();
                ExprP def;
                if (p.at_op("=")) {
                    p.next();
                    def = p.expression();
                }
                n->params.emplace_back(std::move(name), std::move(def));
            }
            p.next();
            p.expect_end("macro");
            n->body = body({"endmacro"}, stop);
        } else if (tag == "break" || tag == "continue") {
            if (loops_ == 0) syntax(line, "'" + tag + "' outside a for loop");
            n->kind = tag == "break" ? Node::Kind::break_ : Node::Kind::continue_;
            p.expect_end(tag);
        } else if (tag == "filter") {
            n->kind = Node::Kind::filter_block;
            auto f = make(Expr::Kind::filter, line);
            f->name = p.expect_name();
            if (!kFilters.count(f->name)) unsupported(line, "unknown filter '" + f->name + "'");
            f->args.push_back(nullptr);
            if (p.at_op("(")) {
                p.next();
                p.call_args(*f);
            }
            p.expect_end("filter");
            n->filter = std::move(f);
            n->body = body({"endfilter"}, stop);
        } else if (tag == "with") {
            n->kind = Node::Kind::with;
            while (!p.at_end()) {
                if (!n->params.empty()) p.expect_op(",");
                std::string name = p.expect_name();
                p.expect_op("=");
                n->params.emplace_back(std::move(name), p.expression());
            }
            n->body = body({"endwith"}, stop);
        } else if (tag == "generation") {
            // Hugging Face's marker around assistant text: renders its body unchanged.
            n->kind = Node::Kind::scope;
            p.expect_end("generation");
            n->body = body({"endgeneration"}, stop);
        } else {
            unsupported(line, "unsupported construct '{% " + tag + " %}'");
        }
        return n;
    }

    const std::vector<Segment>& s_;
    size_t i_ = 0;
    int depth_ = 0;
    int max_depth_;
    int loops_ = 0;
    std::unique_ptr<ExprParser> cur_;  // the tag that ended the last body
};

}  // namespace

Body parse(const std::vector<Segment>& segments, int max_depth) { return Parser(segments, max_depth).parse_all(); }

}  // namespace si::chat
