package scope

import "testing"

// FuzzFilter parses, binds and evaluates arbitrary filters over arbitrary
// values: it must never panic, and an error must carry a position inside
// the filter.
func FuzzFilter(f *testing.F) {
	for _, s := range []string{
		"home IN ('eu', 'global')",
		"NOT (n > 5 AND amount <= -1.5e3) OR home IS NULL",
		`"Mixed" <> 'it''s' AND vip = true`,
		"code NOT IN ('a', 'b') OR f >= 1e20",
		"((((n = 1))))",
	} {
		f.Add(s, "eu", "12")
	}
	f.Fuzz(func(t *testing.T, src, text, num string) {
		e, err := Parse(src)
		if err != nil {
			se, ok := err.(*SyntaxError)
			if !ok || se.Pos < 0 || se.Pos > len(src) {
				t.Fatalf("Parse(%q) = %v, want a *SyntaxError inside the filter", src, err)
			}
			return
		}
		p, err := e.Bind(testCols)
		if err != nil {
			be, ok := err.(*BindError)
			if !ok || be.Pos < 0 || be.Pos >= len(src) {
				t.Fatalf("Bind(%q) = %v, want a *BindError inside the filter", src, err)
			}
			return
		}
		_ = p.SQL()
		p.Eval(func(i int) ([]byte, bool, bool) {
			switch testCols[i].TypeOID {
			case oidInt8, oidNumeric, oidFloat8:
				return []byte(num), false, true
			}
			return []byte(text), len(text) == 0, true
		})
	})
}
