package scope

import (
	"reflect"
	"strings"
	"testing"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

func txt(s string) decode.Value { return decode.Value{Kind: decode.ValueText, Data: []byte(s)} }

var (
	null      = decode.Value{Kind: decode.ValueNull}
	unchanged = decode.Value{Kind: decode.ValueUnchanged}
)

// customers is keyed by (id, home); ssn is excluded, note may be TOASTed.
func customers(identity byte) *decode.Relation {
	full := identity == decode.IdentityFull
	return &decode.Relation{ID: 1, Schema: "public", Table: "customers", ReplicaIdentity: identity, Columns: []decode.Column{
		{Name: "id", TypeOID: oidInt8, Key: true},
		{Name: "home", TypeOID: oidText, Key: true},
		{Name: "ssn", TypeOID: oidText, Key: full},
		{Name: "note", TypeOID: oidText, Key: full},
	}}
}

func euScope(t *testing.T) *Scope {
	t.Helper()
	s, err := New(Rules{
		ExcludeTables:  []string{"public.card_tokens"},
		Rows:           map[string]string{"public.customers": "home IN ('eu', 'global')"},
		ExcludeColumns: map[string][]string{"public.customers": {"ssn"}},
	})
	if err != nil {
		t.Fatalf("New = %v", err)
	}
	return s
}

func TestTransitions(t *testing.T) {
	rel := customers(decode.IdentityDefault)
	relF := customers(decode.IdentityFull)
	row := func(home string) []decode.Value {
		return []decode.Value{txt("1"), txt(home), txt("SSN-1"), txt("note")}
	}
	key := func(home string) []decode.Value { return []decode.Value{txt("1"), txt(home), null, null} }
	shipped := func(vs ...decode.Value) []decode.Value { return vs } // id, home, note
	for _, tc := range []struct {
		name    string
		c       decode.Change
		wantOp  decode.Op // 0: nothing shipped
		wantOld []decode.Value
		wantNew []decode.Value
	}{
		{"insert in", decode.Change{Op: decode.OpInsert, Rel: rel, New: row("eu")}, decode.OpInsert, nil, shipped(txt("1"), txt("eu"), txt("note"))},
		{"insert out", decode.Change{Op: decode.OpInsert, Rel: rel, New: row("na")}, 0, nil, nil},
		{"delete in", decode.Change{Op: decode.OpDelete, Rel: rel, Old: key("global")}, decode.OpDelete, shipped(txt("1"), txt("global"), null), nil},
		{"delete out", decode.Change{Op: decode.OpDelete, Rel: rel, Old: key("as")}, 0, nil, nil},
		{"update in, no old tuple", decode.Change{Op: decode.OpUpdate, Rel: rel, New: row("eu")}, decode.OpUpdate, nil, shipped(txt("1"), txt("eu"), txt("note"))},
		{"update out, no old tuple", decode.Change{Op: decode.OpUpdate, Rel: rel, New: row("na")}, 0, nil, nil},
		{"update in to in", decode.Change{Op: decode.OpUpdate, Rel: rel, Old: key("eu"), New: row("global")}, decode.OpUpdate, shipped(txt("1"), txt("eu"), null), shipped(txt("1"), txt("global"), txt("note"))},
		{"update out to in: insert", decode.Change{Op: decode.OpUpdate, Rel: rel, Old: key("na"), New: row("eu")}, decode.OpInsert, nil, shipped(txt("1"), txt("eu"), txt("note"))},
		{"update in to out: delete", decode.Change{Op: decode.OpUpdate, Rel: rel, Old: key("eu"), New: row("na")}, decode.OpDelete, shipped(txt("1"), txt("eu"), null), nil},
		{"update out to out", decode.Change{Op: decode.OpUpdate, Rel: rel, Old: key("na"), New: row("as")}, 0, nil, nil},
		{"full: out to in fills unchanged values from the old row",
			decode.Change{Op: decode.OpUpdate, Rel: relF,
				Old: []decode.Value{txt("1"), txt("na"), txt("SSN-1"), txt("big note")},
				New: []decode.Value{txt("1"), txt("eu"), unchanged, unchanged}},
			decode.OpInsert, nil, shipped(txt("1"), txt("eu"), txt("big note"))},
		{"full: in to in keeps unchanged values unchanged",
			decode.Change{Op: decode.OpUpdate, Rel: relF,
				Old: []decode.Value{txt("1"), txt("eu"), txt("SSN-1"), txt("big note")},
				New: []decode.Value{txt("1"), txt("eu"), txt("SSN-2"), unchanged}},
			decode.OpUpdate, shipped(txt("1"), txt("eu"), txt("big note")), shipped(txt("1"), txt("eu"), unchanged)},
		{"full: in to out deletes the complete old row",
			decode.Change{Op: decode.OpUpdate, Rel: relF,
				Old: []decode.Value{txt("1"), txt("eu"), txt("SSN-1"), txt("n")},
				New: []decode.Value{txt("1"), txt("as"), txt("SSN-1"), unchanged}},
			decode.OpDelete, shipped(txt("1"), txt("eu"), txt("n")), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := euScope(t)
			in := tc.c
			inCopy := decode.Change{Op: in.Op, Rel: in.Rel, Old: append([]decode.Value(nil), in.Old...), New: append([]decode.Value(nil), in.New...)}
			got, err := s.Changes([]decode.Change{in})
			if err != nil {
				t.Fatalf("Changes = %v", err)
			}
			if tc.wantOp == 0 {
				if len(got) != 0 {
					t.Fatalf("Changes = %d changes (%s), want none", len(got), got[0].Op)
				}
				return
			}
			if len(got) != 1 {
				t.Fatalf("Changes = %d changes, want 1", len(got))
			}
			g := got[0]
			if g.Op != tc.wantOp || !reflect.DeepEqual(g.Old, tc.wantOld) || !reflect.DeepEqual(g.New, tc.wantNew) {
				t.Fatalf("Changes = %s old %v new %v, want %s old %v new %v", g.Op, g.Old, g.New, tc.wantOp, tc.wantOld, tc.wantNew)
			}
			for _, c := range g.Rel.Columns {
				if c.Name == "ssn" {
					t.Fatalf("shipped relation still names column ssn")
				}
			}
			if g.Rel == in.Rel || len(in.Rel.Columns) != 4 {
				t.Fatalf("the source relation was modified or shared")
			}
			if !reflect.DeepEqual(in.Old, inCopy.Old) || !reflect.DeepEqual(in.New, inCopy.New) {
				t.Fatalf("the source change was modified")
			}
		})
	}
}

func TestTxnTablesAndTruncate(t *testing.T) {
	s := euScope(t)
	tokens := &decode.Relation{ID: 2, Schema: "public", Table: "card_tokens", ReplicaIdentity: decode.IdentityDefault, Columns: []decode.Column{{Name: "id", TypeOID: oidInt8, Key: true}, {Name: "token", TypeOID: oidText}}}
	other := &decode.Relation{ID: 3, Schema: "public", Table: "orders", ReplicaIdentity: decode.IdentityDefault, Columns: []decode.Column{{Name: "id", TypeOID: oidInt8, Key: true}}}
	txn := &decode.Txn{Origin: "na", EndLSN: 100, Changes: []decode.Change{
		{Op: decode.OpInsert, Rel: tokens, New: []decode.Value{txt("1"), txt("tok_secret")}},
		{Op: decode.OpTruncate, Rel: tokens, Truncated: []*decode.Relation{tokens}},
		{Op: decode.OpTruncate, Rel: tokens, Truncated: []*decode.Relation{tokens, other}, TruncateFlags: decode.TruncateCascade},
		{Op: decode.OpInsert, Rel: other, New: []decode.Value{txt("7")}},
	}}
	got, err := s.Txn(txn)
	if err != nil {
		t.Fatalf("Txn = %v", err)
	}
	if got.EndLSN != 100 || len(got.Changes) != 2 {
		t.Fatalf("Txn = %d changes at %s, want 2 at 0/64", len(got.Changes), got.EndLSN)
	}
	if tr := got.Changes[0]; tr.Op != decode.OpTruncate || len(tr.Truncated) != 1 || tr.Truncated[0].Table != "orders" || tr.Rel.Table != "orders" || tr.TruncateFlags != decode.TruncateCascade {
		t.Fatalf("truncate of two tables = %+v, want orders alone", tr)
	}
	if len(txn.Changes) != 4 {
		t.Fatal("the source transaction was modified")
	}
	// A transaction with nothing in scope still ships, empty, for its LSN.
	empty, err := s.Txn(&decode.Txn{Origin: "na", EndLSN: 200, Changes: txn.Changes[:2]})
	if err != nil || empty.EndLSN != 200 || len(empty.Changes) != 0 {
		t.Fatalf("Txn(out of scope) = %v, %v; want an empty transaction at 0/C8", empty, err)
	}
	// Untouched transactions pass as they are.
	plain := []decode.Change{txn.Changes[3]}
	if out, _ := s.Changes(plain); &out[0] != &plain[0] {
		t.Fatal("Changes copied a transaction the scope does not touch")
	}
	var nilScope *Scope
	if out, _ := nilScope.Txn(txn); out != txn {
		t.Fatal("a nil scope changed the transaction")
	}
}

func TestRelationErrors(t *testing.T) {
	rel := customers(decode.IdentityDefault)
	for _, tc := range []struct {
		name  string
		rules Rules
		want  string
	}{
		{"filter on a non-key column", Rules{Rows: map[string]string{"public.customers": "note = 'x'"}}, "not in the replica identity"},
		{"unknown column", Rules{Rows: map[string]string{"public.customers": "region = 'x'"}}, `column "region" does not exist`},
		{"excluded key column", Rules{ExcludeColumns: map[string][]string{"public.customers": {"home"}}}, "in the replica identity"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(tc.rules)
			if err != nil {
				t.Fatal(err)
			}
			_, err = s.Changes([]decode.Change{{Op: decode.OpInsert, Rel: rel, New: []decode.Value{txt("1"), txt("eu"), null, null}}})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Changes = %v, want %q", err, tc.want)
			}
			_, err = s.Changes([]decode.Change{{Op: decode.OpTruncate, Rel: rel, Truncated: []*decode.Relation{rel}}})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Changes(TRUNCATE) = %v, want %q", err, tc.want)
			}
		})
	}
	// With REPLICA IDENTITY FULL any column may be filtered on.
	s, _ := New(Rules{Rows: map[string]string{"public.customers": "note = 'x'"}})
	full := customers(decode.IdentityFull)
	if _, err := s.Changes([]decode.Change{{Op: decode.OpInsert, Rel: full, New: []decode.Value{txt("1"), txt("eu"), null, txt("x")}}}); err != nil {
		t.Fatalf("filter on a non-key column with REPLICA IDENTITY FULL = %v", err)
	}
	if _, err := New(Rules{Rows: map[string]string{"public.customers": "home ="}}); err == nil || !strings.Contains(err.Error(), "row filter of public.customers: at character 7") {
		t.Fatalf("New(bad filter) = %v", err)
	}
}

// TestRenamedTableKeepsScope: a relation whose OID a rule's table had
// when Resolve ran keeps that rule under its new name; a rule for the
// new name as well is an error, not a guess.
func TestRenamedTableKeepsScope(t *testing.T) {
	s := euScope(t)
	// What Resolve records: card_tokens is OID 2, customers OID 1.
	var renames []string
	s.oids = map[uint32]string{1: "public.customers", 2: "public.card_tokens"}
	s.onRename = func(configured, now string) { renames = append(renames, configured+" -> "+now) }
	tokens := &decode.Relation{ID: 2, Schema: "vault", Table: "tokens", ReplicaIdentity: decode.IdentityDefault, Columns: []decode.Column{{Name: "id", TypeOID: oidInt8, Key: true}, {Name: "token", TypeOID: oidText}}}
	clients := customers(decode.IdentityDefault)
	clients.Table = "clients"
	// A new table under an old name is not the renamed one: its own rules.
	fresh := &decode.Relation{ID: 9, Schema: "public", Table: "card_tokens", ReplicaIdentity: decode.IdentityDefault, Columns: []decode.Column{{Name: "id", TypeOID: oidInt8, Key: true}}}
	got, err := s.Txn(&decode.Txn{Origin: "na", EndLSN: 100, Changes: []decode.Change{
		{Op: decode.OpInsert, Rel: tokens, New: []decode.Value{txt("1"), txt("tok_secret")}},
		{Op: decode.OpTruncate, Rel: tokens, Truncated: []*decode.Relation{tokens}},
		{Op: decode.OpInsert, Rel: clients, New: []decode.Value{txt("1"), txt("na"), txt("SSN"), txt("n")}},
		{Op: decode.OpInsert, Rel: clients, New: []decode.Value{txt("2"), txt("eu"), txt("SSN"), txt("n")}},
		{Op: decode.OpInsert, Rel: fresh, New: []decode.Value{txt("3")}},
	}})
	if err != nil {
		t.Fatalf("Txn = %v", err)
	}
	if len(got.Changes) != 1 {
		t.Fatalf("Txn kept %d changes, want 1 (clients' eu row)", len(got.Changes))
	}
	if c := got.Changes[0]; c.Rel.Table != "clients" || len(c.New) != 3 || string(c.New[0].Data) != "2" {
		t.Fatalf("kept %s %+v, want clients' row 2 without its ssn", c.Rel.Table, c.New)
	}
	if want := []string{"public.card_tokens -> vault.tokens", "public.customers -> public.clients"}; !reflect.DeepEqual(renames, want) {
		t.Fatalf("renames reported = %q, want %q", renames, want)
	}
	// Renamed onto a name the scope has rules for too.
	onto := customers(decode.IdentityDefault)
	onto.ID, onto.Table = 2, "customers"
	s.oids = map[uint32]string{2: "public.card_tokens"}
	clear(s.rels)
	if _, err := s.Txn(&decode.Txn{Changes: []decode.Change{{Op: decode.OpInsert, Rel: onto, New: []decode.Value{txt("1"), txt("eu"), txt("s"), txt("n")}}}}); err == nil || !strings.Contains(err.Error(), "rules for both names") {
		t.Fatalf("Txn of a table renamed onto a ruled name = %v, want an error", err)
	}
}
