package scope

import (
	"fmt"
	"strings"
	"unicode/utf8"
)

// maxDepth bounds the nesting of NOT and parentheses, so that a hostile
// filter cannot exhaust the stack.
const maxDepth = 64

// maxNumber bounds the length of a number literal.
const maxNumber = 64

// SyntaxError is a row filter that does not parse. Pos is the byte offset
// of the offending token in the filter text; Error reports it 1-based.
type SyntaxError struct {
	Pos int
	Msg string
}

func (e *SyntaxError) Error() string {
	return fmt.Sprintf("at character %d: %s", e.Pos+1, e.Msg)
}

// Expr is a parsed row filter. It is immutable and safe for concurrent
// use; Bind types it against a table's columns.
type Expr struct {
	src  string
	root node
	cols []string // referenced columns, in order of first use
}

// String returns the filter text as written.
func (e *Expr) String() string { return e.src }

// Columns lists the columns the filter reads, each once.
func (e *Expr) Columns() []string { return append([]string(nil), e.cols...) }

type node interface{ isNode() }

type boolNode struct {
	and  bool // AND when set, else OR
	l, r node
}

type notNode struct{ x node }

// cmpNode is column op literal.
type cmpNode struct {
	col colRef
	op  string // = <> < <= > >=
	lit literal
}

// inNode is column [NOT] IN (literal, ...).
type inNode struct {
	col  colRef
	not  bool
	lits []literal
}

// nullNode is column IS [NOT] NULL.
type nullNode struct {
	col colRef
	not bool
}

func (boolNode) isNode() {}
func (notNode) isNode()  {}
func (cmpNode) isNode()  {}
func (inNode) isNode()   {}
func (nullNode) isNode() {}

type colRef struct {
	name string
	pos  int
}

type litKind uint8

const (
	litString litKind = iota
	litNumber
	litBool
)

func (k litKind) String() string {
	switch k {
	case litString:
		return "a string"
	case litNumber:
		return "a number"
	}
	return "a boolean"
}

type literal struct {
	kind litKind
	text string // string contents, number text, or "true"/"false"
	pos  int
}

// Parse parses a row filter:
//
//	expr    = term { OR term }
//	term    = factor { AND factor }
//	factor  = NOT factor | "(" expr ")" | column pred
//	pred    = op literal | [NOT] IN "(" literal { "," literal } ")" | IS [NOT] NULL
//	op      = "=" | "<>" | "!=" | "<" | "<=" | ">" | ">="
//	literal = 'string' | number | TRUE | FALSE
//
// Keywords are case-insensitive; a bare column name is folded to lower
// case like SQL does, a "quoted" one is taken as written.
func Parse(src string) (*Expr, error) {
	if !utf8.ValidString(src) {
		return nil, &SyntaxError{Pos: 0, Msg: "the filter is not valid UTF-8"}
	}
	toks, err := lex(src)
	if err != nil {
		return nil, err
	}
	p := &parser{toks: toks, src: src}
	if p.peek().kind == tokEOF {
		return nil, &SyntaxError{Pos: 0, Msg: "the filter is empty; write a condition such as home IN ('eu', 'global')"}
	}
	root, err := p.expr(0)
	if err != nil {
		return nil, err
	}
	if t := p.peek(); t.kind != tokEOF {
		return nil, p.unexpected(t, "AND, OR or the end of the filter")
	}
	e := &Expr{src: src, root: root}
	seen := map[string]bool{}
	walkCols(root, func(c colRef) {
		if !seen[c.name] {
			seen[c.name] = true
			e.cols = append(e.cols, c.name)
		}
	})
	return e, nil
}

func walkCols(n node, fn func(colRef)) {
	switch n := n.(type) {
	case *boolNode:
		walkCols(n.l, fn)
		walkCols(n.r, fn)
	case *notNode:
		walkCols(n.x, fn)
	case *cmpNode:
		fn(n.col)
	case *inNode:
		fn(n.col)
	case *nullNode:
		fn(n.col)
	}
}

type tokKind uint8

const (
	tokEOF tokKind = iota
	tokIdent
	tokQuoted // "identifier"
	tokString
	tokNumber
	tokOp
	tokLParen
	tokRParen
	tokComma
)

type token struct {
	kind tokKind
	text string
	pos  int
}

func (t token) describe() string {
	switch t.kind {
	case tokEOF:
		return "the end of the filter"
	case tokString:
		return "the string '" + clip(t.text) + "'"
	case tokQuoted:
		return `"` + clip(t.text) + `"`
	}
	return strings.ToUpper(clip(t.text))
}

func clip(s string) string {
	if len(s) > 32 {
		return s[:32] + "..."
	}
	return s
}

func lex(src string) ([]token, error) {
	var toks []token
	i := 0
	for i < len(src) {
		c := src[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '(':
			toks = append(toks, token{tokLParen, "(", i})
			i++
		case c == ')':
			toks = append(toks, token{tokRParen, ")", i})
			i++
		case c == ',':
			toks = append(toks, token{tokComma, ",", i})
			i++
		case c == '=':
			toks = append(toks, token{tokOp, "=", i})
			i++
		case c == '<' || c == '>' || c == '!':
			op := string(c)
			if i+1 < len(src) && (src[i+1] == '=' || (c == '<' && src[i+1] == '>')) {
				op += string(src[i+1])
			}
			if op == "!" {
				return nil, &SyntaxError{Pos: i, Msg: "'!' alone is not an operator; write != or <>, or NOT"}
			}
			if op == "!=" {
				toks = append(toks, token{tokOp, "<>", i})
			} else {
				toks = append(toks, token{tokOp, op, i})
			}
			i += len(op)
		case c == '\'':
			s, n, err := quoted(src, i, '\'')
			if err != nil {
				return nil, err
			}
			toks = append(toks, token{tokString, s, i})
			i = n
		case c == '"':
			s, n, err := quoted(src, i, '"')
			if err != nil {
				return nil, err
			}
			if s == "" {
				return nil, &SyntaxError{Pos: i, Msg: "empty quoted column name"}
			}
			toks = append(toks, token{tokQuoted, s, i})
			i = n
		case c == '-' || c == '+' || c == '.' || isDigit(c):
			n, err := lexNumber(src, i)
			if err != nil {
				return nil, err
			}
			toks = append(toks, token{tokNumber, src[i:n], i})
			i = n
		case isIdentStart(c):
			n := i + 1
			for n < len(src) && isIdentPart(src[n]) {
				n++
			}
			toks = append(toks, token{tokIdent, strings.ToLower(src[i:n]), i})
			i = n
		default:
			r, _ := utf8.DecodeRuneInString(src[i:])
			return nil, &SyntaxError{Pos: i, Msg: fmt.Sprintf("unexpected character %q", r)}
		}
	}
	return append(toks, token{tokEOF, "", len(src)}), nil
}

// quoted reads a string quoted by q starting at src[i] == q; a doubled
// quote stands for itself. It returns the contents and the index after the
// closing quote.
func quoted(src string, i int, q byte) (string, int, error) {
	var b strings.Builder
	j := i + 1
	for {
		k := strings.IndexByte(src[j:], q)
		if k < 0 {
			what := "string"
			if q == '"' {
				what = "quoted column name"
			}
			return "", 0, &SyntaxError{Pos: i, Msg: "unterminated " + what + "; close it with " + string(q)}
		}
		b.WriteString(src[j : j+k])
		j += k + 1
		if j < len(src) && src[j] == q {
			b.WriteByte(q)
			j++
			continue
		}
		return b.String(), j, nil
	}
}

// lexNumber reads a decimal number at src[i]: an optional sign, digits with
// an optional fraction, and an optional exponent of at most three digits.
func lexNumber(src string, i int) (int, error) {
	j := i
	if src[j] == '-' || src[j] == '+' {
		j++
	}
	digits := 0
	for j < len(src) && isDigit(src[j]) {
		j++
		digits++
	}
	if j < len(src) && src[j] == '.' {
		j++
		for j < len(src) && isDigit(src[j]) {
			j++
			digits++
		}
	}
	if digits == 0 {
		return 0, &SyntaxError{Pos: i, Msg: "a number needs digits"}
	}
	if j < len(src) && (src[j] == 'e' || src[j] == 'E') {
		j++
		if j < len(src) && (src[j] == '-' || src[j] == '+') {
			j++
		}
		exp := 0
		for j < len(src) && isDigit(src[j]) {
			j++
			exp++
		}
		if exp == 0 || exp > 3 {
			return 0, &SyntaxError{Pos: i, Msg: "a number's exponent needs one to three digits"}
		}
	}
	if j < len(src) && (isIdentPart(src[j]) || src[j] == '.') {
		return 0, &SyntaxError{Pos: i, Msg: "malformed number"}
	}
	if j-i > maxNumber {
		return 0, &SyntaxError{Pos: i, Msg: fmt.Sprintf("number longer than %d characters", maxNumber)}
	}
	return j, nil
}

func isDigit(c byte) bool      { return c >= '0' && c <= '9' }
func isIdentStart(c byte) bool { return c == '_' || (c|0x20 >= 'a' && c|0x20 <= 'z') }
func isIdentPart(c byte) bool  { return isIdentStart(c) || isDigit(c) || c == '$' }

type parser struct {
	toks []token
	i    int
	src  string
}

func (p *parser) peek() token { return p.toks[p.i] }
func (p *parser) next() token {
	t := p.toks[p.i]
	if t.kind != tokEOF {
		p.i++
	}
	return t
}

func (p *parser) keyword(t token, kw string) bool { return t.kind == tokIdent && t.text == kw }

func (p *parser) unexpected(t token, want string) error {
	return &SyntaxError{Pos: t.pos, Msg: fmt.Sprintf("expected %s, found %s", want, t.describe())}
}

func (p *parser) expr(depth int) (node, error) {
	l, err := p.term(depth)
	if err != nil {
		return nil, err
	}
	for p.keyword(p.peek(), "or") {
		p.next()
		r, err := p.term(depth)
		if err != nil {
			return nil, err
		}
		l = &boolNode{and: false, l: l, r: r}
	}
	return l, nil
}

func (p *parser) term(depth int) (node, error) {
	l, err := p.factor(depth)
	if err != nil {
		return nil, err
	}
	for p.keyword(p.peek(), "and") {
		p.next()
		r, err := p.factor(depth)
		if err != nil {
			return nil, err
		}
		l = &boolNode{and: true, l: l, r: r}
	}
	return l, nil
}

func (p *parser) factor(depth int) (node, error) {
	t := p.peek()
	if depth >= maxDepth {
		return nil, &SyntaxError{Pos: t.pos, Msg: fmt.Sprintf("nested deeper than %d levels", maxDepth)}
	}
	switch {
	case p.keyword(t, "not"):
		p.next()
		x, err := p.factor(depth + 1)
		if err != nil {
			return nil, err
		}
		return &notNode{x: x}, nil
	case t.kind == tokLParen:
		p.next()
		x, err := p.expr(depth + 1)
		if err != nil {
			return nil, err
		}
		if c := p.next(); c.kind != tokRParen {
			return nil, p.unexpected(c, "AND, OR or )")
		}
		return x, nil
	case t.kind == tokQuoted || (t.kind == tokIdent && !reserved[t.text]):
		p.next()
		return p.pred(colRef{name: t.text, pos: t.pos})
	}
	return nil, p.unexpected(t, "a column name, NOT or (")
}

// reserved are the keywords that cannot be bare column names; quote such a
// column ("in").
var reserved = map[string]bool{"and": true, "or": true, "not": true, "in": true, "is": true, "null": true, "true": true, "false": true}

func (p *parser) pred(col colRef) (node, error) {
	t := p.next()
	switch {
	case t.kind == tokOp:
		lit, err := p.literal()
		if err != nil {
			return nil, err
		}
		return &cmpNode{col: col, op: t.text, lit: lit}, nil
	case p.keyword(t, "is"):
		not := false
		if p.keyword(p.peek(), "not") {
			p.next()
			not = true
		}
		if n := p.next(); !p.keyword(n, "null") {
			return nil, p.unexpected(n, "NULL (IS [NOT] NULL)")
		}
		return &nullNode{col: col, not: not}, nil
	case p.keyword(t, "not") || p.keyword(t, "in"):
		not := p.keyword(t, "not")
		if not {
			if n := p.next(); !p.keyword(n, "in") {
				return nil, p.unexpected(n, "IN after NOT")
			}
		}
		if n := p.next(); n.kind != tokLParen {
			return nil, p.unexpected(n, "( to open the IN list")
		}
		in := &inNode{col: col, not: not}
		for {
			lit, err := p.literal()
			if err != nil {
				return nil, err
			}
			in.lits = append(in.lits, lit)
			n := p.next()
			if n.kind == tokRParen {
				return in, nil
			}
			if n.kind != tokComma {
				return nil, p.unexpected(n, ", or )")
			}
		}
	}
	return nil, p.unexpected(t, "a comparison (= <> != < <= > >=), IN, NOT IN or IS [NOT] NULL after column "+col.name)
}

func (p *parser) literal() (literal, error) {
	t := p.next()
	switch {
	case t.kind == tokString:
		return literal{kind: litString, text: t.text, pos: t.pos}, nil
	case t.kind == tokNumber:
		return literal{kind: litNumber, text: t.text, pos: t.pos}, nil
	case p.keyword(t, "true"), p.keyword(t, "false"):
		return literal{kind: litBool, text: t.text, pos: t.pos}, nil
	case p.keyword(t, "null"):
		return literal{}, &SyntaxError{Pos: t.pos, Msg: "NULL is not a value to compare with; write IS NULL or IS NOT NULL"}
	}
	return literal{}, p.unexpected(t, "a value ('text', a number, TRUE or FALSE)")
}
