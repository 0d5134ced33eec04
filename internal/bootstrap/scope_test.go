package bootstrap_test

import (
	"context"
	"testing"

	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/bootstrap"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/internal/scope"
)

// TestBootstrapScope copies only what the new region may hold: its own and
// global customers, without ssn, and no card tokens.
func TestBootstrapScope(t *testing.T) {
	ctx := context.Background()
	src := pgtest.Start(t, pgtest.Options{Name: "bs-scope-src"})
	tgt := pgtest.Start(t, pgtest.Options{Name: "bs-scope-tgt"})
	for _, c := range []*pgtest.Cluster{src, tgt} {
		if err := c.CreateDatabase(ctx, "app"); err != nil {
			t.Fatal(err)
		}
	}
	if err := src.Exec(ctx, "app", `CREATE TABLE customers (id int PRIMARY KEY, home text NOT NULL, ssn text, "timestamp" text);
		ALTER TABLE customers REPLICA IDENTITY FULL;
		CREATE TABLE card_tokens (id int PRIMARY KEY, token text);
		INSERT INTO customers SELECT g, (ARRAY['na', 'as', 'global'])[1 + g % 3], 'SSN-' || g, 't' || g FROM generate_series(1, 300) g;
		INSERT INTO card_tokens VALUES (1, 'tok');
		CREATE PUBLICATION prism FOR ALL TABLES`); err != nil {
		t.Fatal(err)
	}
	s, err := scope.New(scope.Rules{
		ExcludeTables:  []string{"public.card_tokens"},
		Rows:           map[string]string{"public.customers": "home IN ('as', 'global') AND \"timestamp\" IS NOT NULL"}, // a name the source query also joins
		ExcludeColumns: map[string][]string{"public.customers": {"ssn"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	res, err := bootstrap.Run(ctx, bootstrap.Config{
		Region: "as", DSN: tgt.DSN("app"), Source: "na", Scope: s,
		Peers: []bootstrap.Peer{{Region: "na", DSN: src.DSN("app")}},
	}, zerolog.Nop())
	if err != nil {
		t.Fatalf("Run = %v", err)
	}
	if len(res.Tables) != 1 || res.Tables[0].Table != "public.customers" || res.Tables[0].Rows != 200 {
		t.Fatalf("copied %+v, want customers alone, 200 rows", res.Tables)
	}
	conn, err := tgt.Connect(ctx, "app")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var rows, outside, ssn, tokens int
	if err := conn.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE home NOT IN ('as', 'global')), count(ssn),
		(SELECT count(*) FROM card_tokens) FROM customers`).Scan(&rows, &outside, &ssn, &tokens); err != nil {
		t.Fatal(err)
	}
	if rows != 200 || outside != 0 || ssn != 0 || tokens != 0 {
		t.Fatalf("target holds %d customers (%d outside the scope, %d with ssn) and %d card tokens; want 200, 0, 0, 0", rows, outside, ssn, tokens)
	}
}
