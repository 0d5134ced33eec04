package e2e

import (
	"context"
	"testing"
	"time"
)

// TestFullIdentityConcurrentWrites: two regions write the same rows of a
// table with a primary key and REPLICA IDENTITY FULL while neither can
// ship, na first, then eu. Each region's old rows then differ from the
// other's current rows in a non-key column. Rows are found by their key,
// so na takes eu's newer update and delete, eu keeps its own versions and
// records the conflict, and both regions end equal: no duplicate key
// (23505) halting na's applier, no delete missed.
func TestFullIdentityConcurrentWrites(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	d := New(t, Topology{"na": {"na1"}, "eu": {"eu1"}}, `
		CREATE TABLE acct (id int PRIMARY KEY, owner text, balance int);
		ALTER TABLE acct REPLICA IDENTITY FULL;`)
	d.StartAll()
	waitReaders(d)

	sql := func(region, sql string) {
		t.Helper()
		if err := d.Clusters[region].Exec(ctx, "app", sql); err != nil {
			t.Fatalf("%s: %s: %v", region, sql, err)
		}
	}
	query := func(region, sql string) string {
		c, err := d.Clusters[region].Connect(ctx, "app")
		if err != nil {
			return "error: " + err.Error()
		}
		defer c.Close(ctx)
		var s string
		if err := c.QueryRow(ctx, sql).Scan(&s); err != nil {
			return "error: " + err.Error()
		}
		return s
	}
	const rows = `SELECT coalesce(string_agg(format('%s %s %s', id, owner, balance), ', ' ORDER BY id), '') FROM acct`
	sql("na", "INSERT INTO acct VALUES (1, 'ann', 100), (2, 'bob', 100)")
	d.Eventually(60*time.Second, "both rows in eu", func() bool {
		return query("eu", rows) == "1 ann 100, 2 bob 100"
	})

	d.Kill("na1")
	d.Kill("eu1")
	sql("na", "UPDATE acct SET balance = 150 WHERE id = 1; UPDATE acct SET owner = 'bob-na' WHERE id = 2")
	sql("eu", "UPDATE acct SET owner = 'ann-eu' WHERE id = 1; DELETE FROM acct WHERE id = 2")
	d.StartAll()
	want := "1 ann-eu 100"
	d.Eventually(60*time.Second, "eu's newer versions in both regions", func() bool {
		return query("na", rows) == want && query("eu", rows) == want
	})
	if rep := d.Verify(ctx); !rep.Equal() {
		t.Fatalf("regions differ: %+v", rep.Tables)
	}
	if got := query("eu", "SELECT string_agg(kind || ' ' || winner, ', ' ORDER BY id) FROM prism.conflicts WHERE table_name = 'public.acct'"); got != "update local, update_missing local" {
		t.Fatalf("eu conflicts on acct = %q, want na's older update kept out of row 1 and deleted row 2", got)
	}
	for _, n := range []string{"na1", "eu1"} {
		if !d.Running(n) {
			t.Fatalf("%s exited\n%s", n, d.Logs())
		}
	}
}
