package config

import (
	"reflect"
	"strings"
	"testing"
)

const scopedPeer = `    scope:
      exclude_tables: ["public.card_tokens"]
      rows:
        "public.customers": "home IN ('as', 'global')"
      exclude_columns:
        "public.customers": [ssn]
`

func TestScopeLoaded(t *testing.T) {
	c, err := parse("eu1.yaml", []byte(base+scopedPeer), testEnv)
	if err != nil {
		t.Fatalf("parse(scope) = %v", err)
	}
	want := Scope{
		ExcludeTables:  []string{"public.card_tokens"},
		Rows:           map[string]string{"public.customers": "home IN ('as', 'global')"},
		ExcludeColumns: map[string][]string{"public.customers": {"ssn"}},
	}
	if !reflect.DeepEqual(c.Peers[1].Scope, want) || !c.Peers[0].Scope.IsZero() {
		t.Fatalf("scopes = %+v, %+v; want none for na and %+v for as", c.Peers[0].Scope, c.Peers[1].Scope, want)
	}
}

func TestScopeErrors(t *testing.T) {
	for _, tc := range []struct {
		name, scope, extra string
		want               []string
	}{
		{"filter syntax", `    scope: {rows: {"public.customers": "home IN ('as' 'x')"}}` + "\n", "",
			[]string{`eu1.yaml:17: peers[1].scope.rows["public.customers"]: row filter "home IN ('as' 'x')" does not parse at character 15: expected , or ), found the string 'x'`}},
		{"bad table", `    scope: {exclude_tables: [customers]}` + "\n", "", []string{`peers[1].scope.exclude_tables[0]: "customers" is not a table name`}},
		{"excluded and filtered", `    scope: {exclude_tables: [public.a], rows: {public.a: "x = 1"}}` + "\n", "", []string{"public.a is also in exclude_tables"}},
		{"no columns", `    scope: {exclude_columns: {public.a: []}}` + "\n", "", []string{"no columns"}},
		{"unknown key", `    scope: {exclude_rows: {}}` + "\n", "", []string{`unknown key "exclude_rows"`}},
		{"undo", scopedPeer, "on_apply_error: undo\n", []string{"undo cannot be combined with peers[].scope"}},
		{"filter reads an excluded column", `    scope: {rows: {public.a: "home = 'x'"}, exclude_columns: {public.a: [home]}}` + "\n", "", []string{"column home is excluded but the row filter of public.a reads it"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parse("eu1.yaml", []byte(base+tc.scope+tc.extra), testEnv)
			if err == nil {
				t.Fatalf("parse = nil, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("parse = %v\nwant it to contain %q", err, w)
				}
			}
		})
	}
}
