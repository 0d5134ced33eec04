package scope

import (
	"errors"
	"strings"
	"testing"
)

// cols is the table the evaluator tests bind to.
var testCols = []Column{
	{Name: "home", TypeOID: oidText},
	{Name: "n", TypeOID: oidInt8},
	{Name: "amount", TypeOID: oidNumeric},
	{Name: "vip", TypeOID: oidBool},
	{Name: "code", TypeOID: oidBPChar},
	{Name: "f", TypeOID: oidFloat8},
	{Name: "id", TypeOID: 2950}, // uuid: compared by text form
	{Name: "Mixed", TypeOID: oidVarchar},
}

// row builds a Row from values by column name; "<null>" is NULL and a
// missing name is an unsent (unchanged TOASTed) value.
func row(vals map[string]string) Row {
	return func(i int) ([]byte, bool, bool) {
		v, ok := vals[testCols[i].Name]
		if !ok {
			return nil, false, false
		}
		if v == "<null>" {
			return nil, true, true
		}
		return []byte(v), false, true
	}
}

func TestEval(t *testing.T) {
	base := map[string]string{"home": "eu", "n": "10", "amount": "12.50", "vip": "t", "code": "ab  ", "f": "1.5e+20", "id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "Mixed": "X"}
	with := func(k, v string) map[string]string {
		m := map[string]string{}
		for a, b := range base {
			m[a] = b
		}
		m[k] = v
		return m
	}
	for _, tc := range []struct {
		expr string
		row  map[string]string
		want bool
	}{
		{"home = 'eu'", base, true},
		{"home IN ('eu', 'global')", base, true},
		{"home IN ('na', 'global')", base, false},
		{"home NOT IN ('na')", base, true},
		{"home <> 'eu'", base, false},
		{"home != 'eu'", base, false},
		{"home < 'f'", base, true},
		{"home < 'E'", base, false}, // byte order: 'E' < 'e'
		{"n = 10", base, true},
		{"n < 9", base, false},
		{"n > 9.5", base, true},
		{"n >= 1e1", base, true},
		{"n < 100", base, true}, // numeric, not text order ("10" > "100" as text is false anyway)
		{"n > 9", base, true},   // as text "10" < "9"
		{"amount = 12.5", base, true},
		{"amount <= -1", base, false},
		{"amount > 12.49", with("amount", "NaN"), true}, // NaN sorts above every number
		{"f > 1e20", base, true},
		{"f < 2e20", base, true},
		{"vip = true", base, true},
		{"vip = FALSE", base, false},
		{"code = 'ab'", base, true}, // bpchar: trailing spaces do not count
		{"id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", base, true},
		{`"Mixed" = 'X'`, base, true},
		{"home IS NULL", base, false},
		{"home IS NOT NULL", base, true},
		{"home IS NULL", with("home", "<null>"), true},
		{"home = 'eu'", with("home", "<null>"), false},
		{"NOT home = 'eu'", with("home", "<null>"), false}, // NOT unknown is unknown
		{"home = 'eu' OR n = 10", with("home", "<null>"), true},
		{"home = 'eu' AND n = 10", with("home", "<null>"), false},
		{"NOT (home = 'eu' AND n = 10)", with("home", "<null>"), false},
		{"NOT (home = 'x' AND n = 11)", with("home", "<null>"), true}, // unknown AND false is false
		{"home NOT IN ('x')", with("home", "<null>"), false},
		{"home = 'na' OR home = 'eu' AND n = 11", base, false}, // AND binds tighter
		{"(home = 'na' OR home = 'eu') AND n = 10", base, true},
		{"home = 'it''s'", with("home", "it's"), true},
		{"HOME in ('EU')", base, false}, // values are case-sensitive, names are not
	} {
		t.Run(tc.expr, func(t *testing.T) {
			e, err := Parse(tc.expr)
			if err != nil {
				t.Fatalf("Parse(%q) = %v", tc.expr, err)
			}
			p, err := e.Bind(testCols)
			if err != nil {
				t.Fatalf("Bind(%q) = %v", tc.expr, err)
			}
			got, err := p.Eval(row(tc.row))
			if err != nil || got != tc.want {
				t.Fatalf("Eval(%q) = %v, %v, want %v", tc.expr, got, err, tc.want)
			}
		})
	}
}

func TestEvalUnavailable(t *testing.T) {
	e, _ := Parse("home = 'eu'")
	p, _ := e.Bind(testCols)
	if _, err := p.Eval(row(map[string]string{"n": "1"})); !errors.Is(err, errUnavailable) {
		t.Fatalf("Eval(row without home) = %v, want errUnavailable", err)
	}
	e, _ = Parse("n = 1")
	p, _ = e.Bind(testCols)
	if _, err := p.Eval(row(map[string]string{"n": "x1"})); err == nil {
		t.Fatal("Eval(n = 'x1') succeeded; a non-numeric value must be an error")
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		expr string
		pos  int // 1-based
		msg  string
	}{
		{"", 1, "empty"},
		{"home = ", 8, "expected a value"},
		{"home = 'eu", 8, "unterminated string"},
		{"home == 'eu'", 7, "expected a value"},
		{"home IN 'eu'", 9, "( to open the IN list"},
		{"home IN ('eu' 'na')", 15, ", or )"},
		{"(home = 'eu'", 13, "AND, OR or )"},
		{"home = 'eu' AND", 16, "a column name"},
		{"home = NULL", 8, "IS NULL"},
		{"home IS 'x'", 9, "NULL"},
		{"home ~ 'x'", 6, "unexpected character"},
		{"home ! 'x'", 6, "'!' alone"},
		{"n = 1e12345", 5, "exponent"},
		{"n = 12abc", 5, "malformed number"},
		{"home", 5, "a comparison"},
		{"in = 'x'", 1, "a column name"},
		{"home = 'eu' x", 13, "AND, OR or the end"},
		{`"" = 'x'`, 1, "empty quoted"},
		{strings.Repeat("(", 100) + "a = 1" + strings.Repeat(")", 100), 65, "nested deeper"},
	} {
		t.Run(tc.expr, func(t *testing.T) {
			_, err := Parse(tc.expr)
			var se *SyntaxError
			if !errors.As(err, &se) {
				t.Fatalf("Parse(%q) = %v, want a *SyntaxError", tc.expr, err)
			}
			if se.Pos+1 != tc.pos || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Parse(%q) = %v (position %d), want position %d and %q", tc.expr, err, se.Pos+1, tc.pos, tc.msg)
			}
		})
	}
}

func TestBindErrors(t *testing.T) {
	for _, tc := range []struct {
		expr string
		pos  int
		msg  string
	}{
		{"nope = 'x'", 1, `column "nope" does not exist`},
		{"n = 'x'", 5, "numeric: compare it with a number"},
		{"home = 1", 8, "single quotes"},
		{"vip = 't'", 7, "TRUE or FALSE"},
		{"vip < true", 1, "not of a text or numeric type"},
		{"id > 'a'", 1, "not of a text or numeric type"},
		{"mixed = 'x'", 1, `column "mixed" does not exist`},
		{"home IN ('a', 2)", 15, "single quotes"},
	} {
		t.Run(tc.expr, func(t *testing.T) {
			e, err := Parse(tc.expr)
			if err != nil {
				t.Fatalf("Parse(%q) = %v", tc.expr, err)
			}
			_, err = e.Bind(testCols)
			var be *BindError
			if !errors.As(err, &be) || be.Pos+1 != tc.pos || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Bind(%q) = %v, want a *BindError at %d with %q", tc.expr, err, tc.pos, tc.msg)
			}
		})
	}
}

func TestSQL(t *testing.T) {
	for _, tc := range []struct{ expr, want string }{
		{"home IN ('eu', 'it''s') AND n >= 5", `(("home" COLLATE "C" IN ('eu', 'it''s')) AND ("n" >= 5))`},
		{"NOT vip = true OR home IS NOT NULL", `((NOT ("vip" = true)) OR "home" IS NOT NULL)`},
		{"id <> 'x'", `("id"::text COLLATE "C" <> 'x')`},
		{`"Mixed" < 'b'`, `("Mixed" COLLATE "C" < 'b')`},
	} {
		e, err := Parse(tc.expr)
		if err != nil {
			t.Fatal(err)
		}
		p, err := e.Bind(testCols)
		if err != nil {
			t.Fatal(err)
		}
		if got := p.SQL(); got != tc.want {
			t.Errorf("SQL(%q) = %s, want %s", tc.expr, got, tc.want)
		}
		if got, want := p.SQLOn("t"), strings.ReplaceAll(tc.want, `("`, `(t."`); !strings.Contains(got, `t."`) || strings.Count(got, `t."`) != strings.Count(tc.want, `"`)/2-strings.Count(tc.want, `"C"`) {
			t.Errorf("SQLOn(t, %q) = %s, want every column qualified (like %s)", tc.expr, got, want)
		}
	}
}
