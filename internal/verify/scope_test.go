package verify

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/internal/scope"
)

// TestCompareScoped compares region a (everything) with b, which holds
// only rows homed in b or global, without ssn, and no card_tokens.
func TestCompareScoped(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	a := pgtest.Start(t, pgtest.Options{Name: "verify-scope-a"})
	b := pgtest.Start(t, pgtest.Options{Name: "verify-scope-b"})
	const schema = `CREATE TABLE customers (id int PRIMARY KEY, home text NOT NULL, ssn text, name text);
		CREATE TABLE card_tokens (id int PRIMARY KEY, token text);`
	mustExec(t, a, schema+`CREATE PUBLICATION prism FOR ALL TABLES;
		INSERT INTO customers VALUES (1, 'a', 'SSN-1', 'ann'), (2, 'b', 'SSN-2', 'bob'), (3, 'global', 'SSN-3', 'cy');
		INSERT INTO card_tokens VALUES (1, 'tok')`)
	mustExec(t, b, schema+`INSERT INTO customers VALUES (2, 'b', NULL, 'bob'), (3, 'global', 'local', 'cy')`)
	bScope, err := scope.New(scope.Rules{
		ExcludeTables:  []string{"public.card_tokens"},
		Rows:           map[string]string{"public.customers": "home IN ('b', 'global')"},
		ExcludeColumns: map[string][]string{"public.customers": {"ssn"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	regions := []Region{{Name: "a", DSN: a.DSN("postgres")}, {Name: "b", DSN: b.DSN("postgres"), Scope: bScope}}

	rep, err := Compare(ctx, regions, "prism", 0)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Equal() || len(rep.Tables) != 1 || rep.Tables[0].Table != "public.customers" || strings.Join(rep.Tables[0].Regions, ",") != "a,b" || rep.Tables[0].Rows["a"] != 2 {
		t.Fatalf("Compare(scoped, equal within scope) = %+v, want customers equal between a and b on 2 rows, card_tokens skipped", rep.Tables)
	}

	// Divergence inside the shared scope is found; b's own ssn values are not
	// compared; a row b holds outside its scope is reported.
	mustExec(t, b, `UPDATE customers SET name = 'robert' WHERE id = 2; DELETE FROM customers WHERE id = 3;
		INSERT INTO customers VALUES (4, 'a', NULL, 'stray')`)
	mustExec(t, a, `INSERT INTO customers VALUES (5, 'global', 'SSN-5', 'eve')`)
	rep, err = Compare(ctx, regions, "prism", 0)
	if err != nil {
		t.Fatal(err)
	}
	var pair, stray *TableResult
	for i := range rep.Tables {
		switch len(rep.Tables[i].Regions) {
		case 2:
			pair = &rep.Tables[i]
		case 1:
			stray = &rep.Tables[i]
		}
	}
	if pair == nil || pair.Equal || len(pair.Keys) != 3 {
		t.Fatalf("pair result = %+v, want keys 2, 3 and 5 differing", pair)
	}
	if stray == nil || stray.Regions[0] != "b" || stray.Rows["b"] != 1 || !strings.Contains(stray.Diffs[0], "outside its scope") {
		t.Fatalf("out-of-scope result = %+v, want 1 row in b", stray)
	}

	// Repair from a writes only the shared scope: never ssn, never row 1.
	if _, err := Repair(ctx, regions, "a", rep, zerolog.Nop()); err != nil {
		t.Fatalf("Repair = %v", err)
	}
	conn, err := b.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var got string
	if err := conn.QueryRow(ctx, `SELECT string_agg(format('%s:%s:%s:%s', id, home, coalesce(ssn, '-'), name), ' ' ORDER BY id) FROM customers`).Scan(&got); err != nil {
		t.Fatal(err)
	}
	if want := "2:b:-:bob 3:global:-:cy 4:a:-:stray 5:global:-:eve"; got != want {
		t.Fatalf("b after the repair = %q, want %q (no ssn copied, row 1 not copied)", got, want)
	}
	rep, err = Compare(ctx, regions, "prism", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, tr := range rep.Tables {
		if len(tr.Regions) == 2 && !tr.Equal {
			t.Fatalf("after the repair the shared scope differs: %v", tr.Diffs)
		}
	}
}
