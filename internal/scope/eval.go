package scope

import (
	"bytes"
	"fmt"
	"math/big"
	"strings"
)

// Built-in type OIDs the evaluator compares by value; every cluster has the
// same ones.
const (
	oidBool    = 16
	oidName    = 19
	oidInt8    = 20
	oidInt2    = 21
	oidInt4    = 23
	oidText    = 25
	oidOID     = 26
	oidFloat4  = 700
	oidFloat8  = 701
	oidBPChar  = 1042
	oidVarchar = 1043
	oidNumeric = 1700
)

// class is how a column's values compare.
type class uint8

const (
	classOther  class = iota // by text form, equality only
	classText                // byte-wise (collation "C")
	classBPChar              // byte-wise, trailing spaces insignificant
	classNumber              // numerically
	classBool                // true/false
)

func classOf(oid uint32) class {
	switch oid {
	case oidText, oidVarchar, oidName:
		return classText
	case oidBPChar:
		return classBPChar
	case oidInt2, oidInt4, oidInt8, oidOID, oidFloat4, oidFloat8, oidNumeric:
		return classNumber
	case oidBool:
		return classBool
	}
	return classOther
}

// Column is one column of the table a filter is bound to.
type Column struct {
	Name    string
	TypeOID uint32
}

// BindError is a filter that does not fit its table: an unknown column or
// a literal of the wrong type. Pos is the byte offset in the filter text.
type BindError struct {
	Pos int
	Msg string
}

func (e *BindError) Error() string { return fmt.Sprintf("at character %d: %s", e.Pos+1, e.Msg) }

// Pred is a filter bound to a table's columns: it evaluates rows. It is
// immutable and safe for concurrent use.
type Pred struct {
	e    *Expr
	cols []Column
	root pnode
	// Uses lists the indexes (into the bound columns) the filter reads.
	uses []int
}

// Uses returns the indexes of the columns the predicate reads.
func (p *Pred) Uses() []int { return append([]int(nil), p.uses...) }

type pnode interface{ eval(Row) (tri, error) }

// Row gives a predicate the values of one row by column index: the text
// form, or null, or ok false when the value is not available (an
// unchanged TOASTed value).
type Row func(i int) (text []byte, null, ok bool)

// tri is SQL's three-valued logic.
type tri uint8

const (
	triFalse tri = iota
	triTrue
	triUnknown
)

// Bind types e against cols. Each literal must suit its column's type:
// numbers for numeric columns, TRUE or FALSE for boolean ones, 'strings'
// otherwise; ordering comparisons (< <= > >=) need a text or numeric
// column.
func (e *Expr) Bind(cols []Column) (*Pred, error) {
	b := &binder{cols: cols, idx: make(map[string]int, len(cols)), seen: map[int]bool{}, p: &Pred{e: e, cols: cols}}
	for i, c := range cols {
		b.idx[c.Name] = i
	}
	root, err := b.bind(e.root)
	if err != nil {
		return nil, err
	}
	b.p.root = root
	return b.p, nil
}

// binder binds the nodes of one expression to the columns of a table and
// records, in order of first use, the columns the predicate reads.
type binder struct {
	cols []Column
	idx  map[string]int // column index by name
	seen map[int]bool   // columns already in p.uses
	p    *Pred
}

// bind binds node n and the nodes under it.
func (b *binder) bind(n node) (pnode, error) {
	switch n := n.(type) {
	case *boolNode:
		l, err := b.bind(n.l)
		if err != nil {
			return nil, err
		}
		r, err := b.bind(n.r)
		if err != nil {
			return nil, err
		}
		return &pbool{and: n.and, l: l, r: r}, nil
	case *notNode:
		x, err := b.bind(n.x)
		if err != nil {
			return nil, err
		}
		return &pnot{x: x}, nil
	case *nullNode:
		i, err := b.col(n.col)
		if err != nil {
			return nil, err
		}
		return &pnull{col: i, not: n.not}, nil
	case *cmpNode:
		return b.cmp(n)
	case *inNode:
		return b.in(n)
	}
	return nil, fmt.Errorf("scope: unknown node %T", n)
}

// col returns the index of the column c names.
func (b *binder) col(c colRef) (int, error) {
	i, ok := b.idx[c.name]
	if !ok {
		return 0, &BindError{Pos: c.pos, Msg: fmt.Sprintf("column %q does not exist in the table", c.name)}
	}
	if !b.seen[i] {
		b.seen[i] = true
		b.p.uses = append(b.p.uses, i)
	}
	return i, nil
}

// cmp binds a comparison: ordering needs a text or numeric column, and
// the literal is typed for the column.
func (b *binder) cmp(n *cmpNode) (pnode, error) {
	i, err := b.col(n.col)
	if err != nil {
		return nil, err
	}
	cl := classOf(b.cols[i].TypeOID)
	if n.op != "=" && n.op != "<>" && cl != classText && cl != classBPChar && cl != classNumber {
		return nil, &BindError{Pos: n.col.pos, Msg: fmt.Sprintf("column %q is not of a text or numeric type: it can only be compared with =, <>, IN and IS NULL", n.col.name)}
	}
	v, err := typed(cl, n.col.name, n.lit)
	if err != nil {
		return nil, err
	}
	return &pcmp{col: i, cl: cl, op: n.op, lit: v}, nil
}

// in binds an IN list, each literal typed for the column.
func (b *binder) in(n *inNode) (pnode, error) {
	i, err := b.col(n.col)
	if err != nil {
		return nil, err
	}
	cl := classOf(b.cols[i].TypeOID)
	in := &pin{col: i, cl: cl, not: n.not}
	for _, l := range n.lits {
		v, err := typed(cl, n.col.name, l)
		if err != nil {
			return nil, err
		}
		in.lits = append(in.lits, v)
	}
	return in, nil
}

// value is a literal typed for its column.
type value struct {
	text []byte
	num  number
	b    bool
	lit  literal
}

func typed(cl class, col string, l literal) (value, error) {
	v := value{lit: l}
	switch cl {
	case classNumber:
		if l.kind != litNumber {
			return v, &BindError{Pos: l.pos, Msg: fmt.Sprintf("column %q is numeric: compare it with a number, not %s", col, l.kind)}
		}
		n, err := parseNumber([]byte(l.text))
		if err != nil {
			return v, &BindError{Pos: l.pos, Msg: err.Error()}
		}
		v.num = n
	case classBool:
		if l.kind != litBool {
			return v, &BindError{Pos: l.pos, Msg: fmt.Sprintf("column %q is boolean: compare it with TRUE or FALSE, not %s", col, l.kind)}
		}
		v.b = l.text == "true"
	default:
		if l.kind != litString {
			return v, &BindError{Pos: l.pos, Msg: fmt.Sprintf("column %q holds text: write the value in single quotes, not %s", col, l.kind)}
		}
		v.text = []byte(l.text)
		if cl == classBPChar {
			v.text = bytes.TrimRight(v.text, " ")
		}
	}
	return v, nil
}

// Eval reports whether row satisfies the filter: true only when the
// condition is true, as in a SQL WHERE (unknown, from NULLs, is false).
// A value the filter needs that the row lacks is an error.
func (p *Pred) Eval(row Row) (bool, error) {
	t, err := p.root.eval(row)
	return t == triTrue, err
}

type pbool struct {
	and  bool
	l, r pnode
}

func (n *pbool) eval(row Row) (tri, error) {
	l, err := n.l.eval(row)
	if err != nil {
		return 0, err
	}
	r, err := n.r.eval(row)
	if err != nil {
		return 0, err
	}
	if n.and {
		switch {
		case l == triFalse || r == triFalse:
			return triFalse, nil
		case l == triTrue && r == triTrue:
			return triTrue, nil
		}
		return triUnknown, nil
	}
	switch {
	case l == triTrue || r == triTrue:
		return triTrue, nil
	case l == triFalse && r == triFalse:
		return triFalse, nil
	}
	return triUnknown, nil
}

type pnot struct{ x pnode }

func (n *pnot) eval(row Row) (tri, error) {
	t, err := n.x.eval(row)
	switch t {
	case triTrue:
		return triFalse, err
	case triFalse:
		return triTrue, err
	}
	return t, err
}

type pnull struct {
	col int
	not bool
}

func (n *pnull) eval(row Row) (tri, error) {
	_, null, ok := row(n.col)
	if !ok {
		return 0, errUnavailable
	}
	if null != n.not {
		return triTrue, nil
	}
	return triFalse, nil
}

// errUnavailable is a filter column without a value in the row (an
// unchanged TOASTed value): the row cannot be placed in or out of scope.
var errUnavailable = fmt.Errorf("a column the row filter reads was not sent (an unchanged TOASTed value); set REPLICA IDENTITY FULL on the table")

type pcmp struct {
	col int
	cl  class
	op  string
	lit value
}

func (n *pcmp) eval(row Row) (tri, error) {
	text, null, ok := row(n.col)
	if !ok {
		return 0, errUnavailable
	}
	if null {
		return triUnknown, nil
	}
	c, err := compare(n.cl, text, n.lit)
	if err != nil {
		return 0, err
	}
	var r bool
	switch n.op {
	case "=":
		r = c == 0
	case "<>":
		r = c != 0
	case "<":
		r = c < 0
	case "<=":
		r = c <= 0
	case ">":
		r = c > 0
	case ">=":
		r = c >= 0
	}
	if r {
		return triTrue, nil
	}
	return triFalse, nil
}

type pin struct {
	col  int
	cl   class
	not  bool
	lits []value
}

func (n *pin) eval(row Row) (tri, error) {
	text, null, ok := row(n.col)
	if !ok {
		return 0, errUnavailable
	}
	if null {
		return triUnknown, nil
	}
	found := false
	for _, l := range n.lits {
		c, err := compare(n.cl, text, l)
		if err != nil {
			return 0, err
		}
		if c == 0 {
			found = true
			break
		}
	}
	if found != n.not {
		return triTrue, nil
	}
	return triFalse, nil
}

// compare orders a column's text form against a typed literal: -1, 0, 1.
func compare(cl class, text []byte, lit value) (int, error) {
	switch cl {
	case classNumber:
		n, err := parseNumber(text)
		if err != nil {
			return 0, fmt.Errorf("compare %q with %s: %w", clip(string(text)), lit.lit.text, err)
		}
		return n.cmp(lit.num), nil
	case classBool:
		var b bool
		switch string(text) {
		case "t", "true":
			b = true
		case "f", "false":
		default:
			return 0, fmt.Errorf("boolean value %q", clip(string(text)))
		}
		if b == lit.b {
			return 0, nil
		}
		if !b {
			return -1, nil
		}
		return 1, nil
	case classBPChar:
		return bytes.Compare(bytes.TrimRight(text, " "), lit.text), nil
	}
	return bytes.Compare(text, lit.text), nil
}

// number is a numeric value as PostgreSQL orders it: -Infinity below
// every finite value, Infinity above, NaN above everything and equal to
// itself.
type number struct {
	rank int8 // -1 -Infinity, 0 finite, 1 Infinity, 2 NaN
	r    *big.Rat
}

func (a number) cmp(b number) int {
	if a.rank != b.rank {
		if a.rank < b.rank {
			return -1
		}
		return 1
	}
	if a.rank != 0 {
		return 0
	}
	return a.r.Cmp(b.r)
}

// parseNumber reads the text form of an integer, numeric or float value,
// or a number literal.
func parseNumber(text []byte) (number, error) {
	s := string(text)
	switch strings.ToLower(s) {
	case "nan":
		return number{rank: 2}, nil
	case "infinity", "+infinity", "inf":
		return number{rank: 1}, nil
	case "-infinity", "-inf":
		return number{rank: -1}, nil
	}
	if !decimal(s) {
		return number{}, fmt.Errorf("%q is not a number", clip(s))
	}
	r, ok := new(big.Rat).SetString(s)
	if !ok {
		return number{}, fmt.Errorf("%q is not a number", clip(s))
	}
	return number{r: r}, nil
}

// decimal reports whether s is a plain decimal number: optional sign,
// digits with an optional fraction, an optional exponent of at most four
// digits (float8 prints up to e+308; the bound keeps big.Rat cheap).
func decimal(s string) bool {
	i := 0
	if i < len(s) && (s[i] == '-' || s[i] == '+') {
		i++
	}
	digits := 0
	for i < len(s) && isDigit(s[i]) {
		i++
		digits++
	}
	if i < len(s) && s[i] == '.' {
		i++
		for i < len(s) && isDigit(s[i]) {
			i++
			digits++
		}
	}
	if digits == 0 {
		return false
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		if i < len(s) && (s[i] == '-' || s[i] == '+') {
			i++
		}
		exp := 0
		for i < len(s) && isDigit(s[i]) {
			i++
			exp++
		}
		if exp == 0 || exp > 4 {
			return false
		}
	}
	return i == len(s)
}
