package chaos

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/e2e"
)

// TestTableWithoutKey publishes tables without a key. Inserts into a
// table without a key anywhere replicate; Postgres refuses updates to it at
// the source. A table with a key on the source but none on the target
// cannot be applied there: replication to that region halts with an error
// naming the table, nothing panics, and once the key is added it resumes
// where it stopped.
func TestTableWithoutKey(t *testing.T) {
	d := e2e.New(t, e2e.Topology{"na": {"na1"}, "eu": {"eu1"}}, "CREATE TABLE nokey (a int, b text);")
	ctx := context.Background()
	if err := d.Clusters["na"].Exec(ctx, "app", "CREATE TABLE drift (id int PRIMARY KEY, v text NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	if err := d.Clusters["eu"].Exec(ctx, "app", "CREATE TABLE drift (id int, v text NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	d.StartAll()
	waitReaders(d)
	na := d.Clusters["na"]
	if err := na.Exec(ctx, "app", "INSERT INTO nokey VALUES (1, 'x')"); err != nil {
		t.Fatal(err)
	}
	d.Eventually(60*time.Second, "an insert into a table without a key on eu", func() bool {
		n, err := count(ctx, d, "eu", "SELECT count(*) FROM nokey")
		return err == nil && n == 1
	})
	// Postgres itself refuses to update a published table without a
	// replica identity, with its own clear error, at the source.
	err := na.Exec(ctx, "app", "UPDATE nokey SET b = 'y'")
	if err == nil || !strings.Contains(err.Error(), "replica identity") {
		t.Fatalf("UPDATE of a published table without a key on the source = %v, want Postgres's replica identity error", err)
	}
	// drift has a key on na only: eu cannot apply na's rows by key.
	if err := na.Exec(ctx, "app", "INSERT INTO drift VALUES (1, 'one'), (2, 'two')"); err != nil {
		t.Fatal(err)
	}
	d.Eventually(60*time.Second, "na1 reports why eu cannot apply", func() bool {
		return strings.Contains(d.Target("na1", "eu").LastError, "public.drift")
	})
	t.Logf("na1's error for eu: %s", d.Target("na1", "eu").LastError)
	if !d.Running("na1") || !d.Running("eu1") {
		t.Fatalf("a node stopped on a table without a key\n%s", d.Logs())
	}
	if n, err := count(ctx, d, "eu", "SELECT count(*) FROM drift"); err != nil || n != 0 {
		t.Fatalf("eu holds %d drift rows (%v) while replication is halted on them, want 0", n, err)
	}
	if err := d.Clusters["eu"].Exec(ctx, "app", "ALTER TABLE drift ADD PRIMARY KEY (id)"); err != nil {
		t.Fatal(err)
	}
	if err := na.Exec(ctx, "app", "UPDATE drift SET v = 'uno' WHERE id = 1"); err != nil {
		t.Fatal(err)
	}
	d.Eventually(90*time.Second, "replication resumed once eu's table has the key", func() bool {
		n, err := count(ctx, d, "eu", "SELECT count(*) FROM drift WHERE (id, v) IN ((1, 'uno'), (2, 'two'))")
		return err == nil && n == 2
	})
	if strings.Contains(d.Logs(), "panic") {
		t.Fatalf("a node log mentions a panic\n%s", d.Logs())
	}
}
