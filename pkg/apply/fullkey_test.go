package apply

import (
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestFullIdentityWithKey applies changes to a table with a primary key
// and REPLICA IDENTITY FULL (pgoutput then flags every column as part of
// the identity) whose old rows no longer match the target's rows in a
// non-key column, as after a concurrent local write. The row is found by
// its primary key, like PostgreSQL's apply worker finds it, and the two
// versions are decided by last-write-wins and recorded: never a
// re-insert that collides with the key (23505).
func TestFullIdentityWithKey(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "fullkey"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE acct (id int PRIMARY KEY, v text, n int);
		ALTER TABLE acct REPLICA IDENTITY FULL;
		INSERT INTO acct VALUES (1, 'base', 0), (2, 'base', 0), (3, 'base', 0), (4, 'base', 0), (5, 'base', 0);`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	r := rel("public", "acct", decode.IdentityFull, "id", "v", "n")
	var lsn uint64 = 1000
	apply := func(origin string, at time.Time, ch decode.Change) {
		t.Helper()
		lsn += 100
		tx := txn(origin, lsn, 0, ch)
		tx.CommitTime = at
		if err := a.Apply(ctx, tx); err != nil {
			t.Fatalf("Apply %s: %v", ch.Op, err)
		}
	}
	// Concurrent local writes: eu changed v of every row after na read it.
	localWrite(t, ctx, a.pool, "UPDATE acct SET v = 'eu'", "acct", 1)
	older := time.Now().Add(-time.Hour)
	newer := time.Now().Add(time.Hour)

	apply("na", older, upd(r, vals("1", "base", "0"), "1", "na", "1"))  // older update: local kept
	apply("na", newer, upd(r, vals("2", "base", "0"), "2", "na", "2"))  // newer update: remote wins
	apply("na", newer, del(r, "3", "base", "0"))                        // newer delete: row deleted
	apply("na", older, del(r, "4", "base", "0"))                        // older delete: local kept
	apply("na", newer, upd(r, vals("5", "base", "0"), "50", "na", "5")) // newer key change: row moved
	apply("na", newer, ins(r, "1", "dup", "9"))                         // insert of an existing key: updated

	want := `{"id":1,"v":"dup","n":9}` + "\n" + `{"id":2,"v":"na","n":2}` + "\n" +
		`{"id":4,"v":"eu","n":0}` + "\n" + `{"id":50,"v":"na","n":5}`
	if got := tableRows(t, ctx, a.pool, "acct"); got != want {
		t.Fatalf("acct =\n%s\nwant\n%s", got, want)
	}
	got := queryString(t, ctx, a.pool, `SELECT string_agg(format('%s %s %s', key, kind, winner), E'\n' ORDER BY id) FROM prism.conflicts`)
	wantConflicts := `{"id": "1"} update local` + "\n" + `{"id": "4"} delete local` + "\n" + `{"id": "1"} insert_exists remote`
	if got != wantConflicts {
		t.Fatalf("conflicts =\n%s\nwant\n%s", got, wantConflicts)
	}
	// The newer delete left a tombstone: a third region's older update
	// of the deleted key does not bring it back.
	apply("as", older.Add(time.Minute), upd(r, vals("3", "base", "0"), "3", "late", "3"))
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM acct WHERE id = 3"); got != "0" {
		t.Fatalf("older update of a deleted key: %s rows with id 3, want 0", got)
	}
}
