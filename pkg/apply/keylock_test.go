package apply

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestKeyLocksSerialiseSources: while another session holds the key lock
// of a key (as another source region's apply does while it writes the
// key), an applied insert of that key waits before its snapshot, so it
// sees what that session committed: here a newer delete of the key,
// whose tombstone buries the older insert. Without the lock the insert
// would run on a snapshot without the tombstone and bring the row back
// in this region only (the divergence the active-active benchmark
// found: eu's newer delete found no row, na's older insert found no
// tombstone, both committed).
func TestKeyLocksSerialiseSources(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "keylock"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE kv (id int PRIMARY KEY, v text CHECK (v <> 'bad'))`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("as"))
	defer a.Close()
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v")
	older := time.Now().Add(-time.Minute).Sub(baseTime).Seconds()
	insert := txn("na", 1100, older, ins(kv, "5", "na"))
	bucket := keyBucket(kv, insert.Changes[0].New)

	other, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close(context.Background())
	if _, err := other.Exec(ctx, "SELECT pg_advisory_lock($1, $2)", keyLockClass, bucket); err != nil {
		t.Fatal(err)
	}
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() { // waited for below
		n, err := a.ApplyBatch(ctx, []*decode.Txn{insert})
		done <- result{n, err}
	}()
	waitUntil(t, "the applied insert waits for the key lock", func() bool {
		var waiting bool
		err := other.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' AND pid <> pg_backend_pid())`).Scan(&waiting)
		return err == nil && waiting
	}, done)
	// The other session writes and deletes the key, newer than the
	// insert, and commits before it lets go of the lock.
	if _, err := other.Exec(ctx, "INSERT INTO kv VALUES (5, 'local'); DELETE FROM kv WHERE id = 5"); err != nil {
		t.Fatal(err)
	}
	if _, err := other.Exec(ctx, "SELECT pg_advisory_unlock($1, $2)", keyLockClass, bucket); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.n != 1 || r.err != nil {
		t.Fatalf("ApplyBatch = %d, %v", r.n, r.err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM kv WHERE id = 5"); got != "0" {
		t.Fatalf("%s rows of key 5: the older insert came back over the newer delete", got)
	}

	// Every path lets go of its key locks: a run that commits, a batch, a
	// run that fails, a streamed transaction.
	heldLocks := func() string {
		return queryString(t, ctx, a.pool, "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::oid", strconv.Itoa(keyLockClass))
	}
	if got := heldLocks(); got != "0" {
		t.Fatalf("%s key locks held after a run", got)
	}
	t0 := time.Now().Sub(baseTime).Seconds()
	batch := []*decode.Txn{txn("na", 1200, t0, ins(kv, "6", "a")), txn("na", 1300, t0+1, ins(kv, "7", "b")), txn("na", 1400, t0+2, ins(kv, "8", "c"))}
	if n, err := a.ApplyBatch(ctx, batch); n != len(batch) || err != nil {
		t.Fatalf("ApplyBatch of a batch = %d, %v", n, err)
	}
	if got := heldLocks(); got != "0" {
		t.Fatalf("%s key locks held after a batch", got)
	}
	if n, err := a.ApplyBatch(ctx, []*decode.Txn{txn("na", 1500, t0+3, ins(kv, "9", "bad"))}); n != 0 || err == nil {
		t.Fatalf("ApplyBatch of a failing transaction = %d, %v; want an error", n, err)
	}
	if got := heldLocks(); got != "0" {
		t.Fatalf("%s key locks held after a failed run", got)
	}
	streamed := txn("na", 1600, t0+4)
	if err := a.ApplyStream(ctx, streamed, chunked([]decode.Change{ins(kv, "10", "s")}, 1, -1, new(int))); err != nil {
		t.Fatalf("ApplyStream: %v", err)
	}
	if got := heldLocks(); got != "0" {
		t.Fatalf("%s key locks held after a streamed transaction", got)
	}
}

// waitUntil polls cond for up to 30 s; it fails at once when done
// delivers first (the call it waits on ended without waiting).
func waitUntil[T any](t *testing.T, what string, cond func() bool, done chan T) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		select {
		case r := <-done:
			t.Fatalf("%s: the call ended instead (%+v)", what, r)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
