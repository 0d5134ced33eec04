package verify

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

func TestCompare(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	a := pgtest.Start(t, pgtest.Options{Name: "verify-a"})
	b := pgtest.Start(t, pgtest.Options{Name: "verify-b"})
	// Column order differs between the regions on purpose.
	mustExec(t, a, `CREATE TABLE acct (id int PRIMARY KEY, owner text, balance numeric);
		CREATE TABLE nokey (v text); CREATE PUBLICATION prism FOR ALL TABLES;
		INSERT INTO acct VALUES (1, 'ann', 10.50), (2, 'bob', 0); INSERT INTO nokey VALUES ('x')`)
	mustExec(t, b, `CREATE TABLE acct (balance numeric, owner text, id int PRIMARY KEY);
		CREATE TABLE nokey (v text);
		INSERT INTO acct VALUES (10.50, 'ann', 1), (0, 'bob', 2); INSERT INTO nokey VALUES ('x')`)
	regions := []Region{{Name: "a", DSN: a.DSN("postgres")}, {Name: "b", DSN: b.DSN("postgres")}}

	rep, err := Compare(ctx, regions, "prism", 0)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Equal() || len(rep.Tables) != 2 {
		t.Fatalf("Compare(equal data) = %+v, want 2 equal tables", rep)
	}

	mustExec(t, b, `UPDATE acct SET balance = 11 WHERE id = 1; DELETE FROM acct WHERE id = 2`)
	rep, err = Compare(ctx, regions, "prism", 0)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Equal() {
		t.Fatalf("Compare(diverged) reports equal")
	}
	var acct TableResult
	for _, tr := range rep.Tables {
		if tr.Table == "public.acct" {
			acct = tr
		}
	}
	got := strings.Join(acct.Diffs, "\n")
	if len(acct.Diffs) != 2 || !strings.Contains(got, "key [1]") || !strings.Contains(got, "key [2]: a=") || !strings.Contains(got, "b=missing") {
		t.Fatalf("Diffs = %q, want keys [1] and [2] (missing in b)", acct.Diffs)
	}
	if acct.Rows["a"] != 2 || acct.Rows["b"] != 1 {
		t.Fatalf("Rows = %v, want a=2 b=1", acct.Rows)
	}

	if _, err := Compare(ctx, regions, "nosuchpub", 0); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("Compare(missing publication) err = %v, want does not exist", err)
	}
}

func mustExec(t *testing.T, c *pgtest.Cluster, sql string) {
	t.Helper()
	if err := c.Exec(context.Background(), "postgres", sql); err != nil {
		t.Fatal(err)
	}
}
