package apply

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestMissingKeyRaces: two sources write one key that has no row in this
// region, on two sessions, and the one whose snapshot is older commits
// second. Region eu's delete is newer than region na's insert, so every
// region must end without the row, whichever order they arrive in:
//
//   - the insert's snapshot predates the delete's tombstone: without the
//     key's mark it finds no tombstone and inserts;
//   - the same with the insert in a batch (one target transaction for
//     two of na's);
//   - the delete's snapshot predates the insert: without the mark it
//     finds no row, leaves a tombstone and the row stays.
//
// The older transaction is held between its snapshot and the key by an
// insert into another table (gate) that waits for the test's uncommitted
// insert of the same key.
func TestMissingKeyRaces(t *testing.T) {
	for _, late := range []string{"insert", "batched insert", "delete"} {
		t.Run(late+" has the older snapshot", func(t *testing.T) { testMissingKeyRace(t, late) })
	}
}

// gatedApplier starts cluster name with tables kv and gate (id, v) and
// sets up an applier of region as on it; a test holds an applied
// transaction between its snapshot and its next change by an uncommitted
// insert of the gate row that transaction inserts.
func gatedApplier(t *testing.T, ctx context.Context, name string) (*pgtest.Cluster, *Applier, *decode.Relation, *decode.Relation) {
	c := pgtest.Start(t, pgtest.Options{Name: name})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE kv (id int PRIMARY KEY, v text); CREATE TABLE gate (id int PRIMARY KEY, v text)`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("as"))
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	return c, a, rel("public", "kv", decode.IdentityDefault, "id*", "v"), rel("public", "gate", decode.IdentityDefault, "id*", "v")
}

// holdGate inserts gate row 1 in a transaction it leaves open on the
// connection it returns: an applied transaction that inserts that row
// waits for it to end.
func holdGate(t *testing.T, ctx context.Context, c *pgtest.Cluster) *pgx.Conn {
	test, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := test.Exec(ctx, "BEGIN; INSERT INTO gate VALUES (1, 'test')"); err != nil {
		test.Close(context.Background())
		t.Fatal(err)
	}
	return test
}

func testMissingKeyRace(t *testing.T, late string) {
	ctx := testCtx(t)
	c, a, kv, gate := gatedApplier(t, ctx, "marks")
	defer a.Close()
	now := time.Now().Sub(baseTime).Seconds()
	insert := []decode.Change{ins(kv, "5", "na")}
	remove := []decode.Change{del(kv, "5")}
	// The late transaction first inserts the gate row, which waits for the
	// test's uncommitted insert of the same key.
	var held []*decode.Txn
	var first *decode.Txn
	switch late {
	case "insert":
		held = []*decode.Txn{txn("na", 1100, now-60, append([]decode.Change{ins(gate, "1", "na")}, insert...)...)}
		first = txn("eu", 2100, now, remove...)
	case "batched insert":
		held = []*decode.Txn{txn("na", 1100, now-61, ins(gate, "1", "na")), txn("na", 1200, now-60, insert...)}
		first = txn("eu", 2100, now, remove...)
	default:
		held = []*decode.Txn{txn("eu", 2100, now, append([]decode.Change{ins(gate, "1", "eu")}, remove...)...)}
		first = txn("na", 1100, now-60, insert...)
	}

	test := holdGate(t, ctx, c)
	defer test.Close(context.Background())
	done := applyUntilLocked(t, ctx, a, held)
	if n, err := a.ApplyBatch(ctx, []*decode.Txn{first}); n != 1 || err != nil {
		t.Fatalf("ApplyBatch of the first transaction = %d, %v", n, err)
	}
	if _, err := test.Exec(ctx, "ROLLBACK"); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.n != len(held) || r.err != nil {
		t.Fatalf("ApplyBatch of the held transaction = %d, %v", r.n, r.err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM kv WHERE id = 5"); got != "0" {
		t.Fatalf("key 5 has a row: na's older insert won over eu's newer delete (the %s had the older snapshot)", late)
	}
	if late == "batched insert" && a.batches.Load() == 0 {
		t.Fatal("na's two transactions were not tried as a batch")
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM prism.tombstones WHERE table_name = 'public.kv'"); got != "1" {
		t.Fatalf("%s tombstones of kv, want 1 (eu's delete)", got)
	}
}

// TestLocalInsertMeetsAppliedDelete: a source whose clock runs a minute
// ahead of this region's deletes a key that has no row here, and a local
// insert of that key commits while the applied delete is in progress,
// after its snapshot (which showed no row). Every other region applies
// the delete first and then the insert, which it admits only if the
// insert is stamped after the delete's tombstone: so here the insert
// must stamp after it too. Without the local insert's key mark it
// committed with this region's clock, a minute older than the
// tombstone, and kept a row every other region had refused.
func TestLocalInsertMeetsAppliedDelete(t *testing.T) {
	ctx := testCtx(t)
	c, a, kv, gate := gatedApplier(t, ctx, "localmark")
	defer a.Close()
	ahead := time.Now().Add(time.Minute).Sub(baseTime).Seconds()

	test := holdGate(t, ctx, c)
	defer test.Close(context.Background())
	// The applied transaction deletes key 5 (no row: a tombstone and the
	// key's mark), then waits on the gate.
	done := applyUntilLocked(t, ctx, a, []*decode.Txn{txn("eu", 2100, ahead, del(kv, "5"), ins(gate, "1", "eu"))})
	local, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close(context.Background())
	inserted := make(chan error, 1)
	go func() {
		_, err := local.Exec(ctx, "INSERT INTO kv VALUES (5, 'local')")
		inserted <- err
	}()
	// The local insert either commits now or waits for the applied
	// delete; either way the delete commits after it started.
	pid := local.PgConn().PID()
	for waiting := false; !waiting; {
		select {
		case err := <-inserted:
			inserted <- err
			waiting = true
		case <-time.After(10 * time.Millisecond):
			waiting = queryString(t, ctx, a.pool, "SELECT (count(*) > 0)::text FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'", pid) == "true"
		}
	}
	if _, err := test.Exec(ctx, "ROLLBACK"); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.n != 1 || r.err != nil {
		t.Fatalf("ApplyBatch of the delete = %d, %v", r.n, r.err)
	}
	if err := <-inserted; err != nil {
		t.Fatalf("local insert: %v", err)
	}
	if got := queryString(t, ctx, a.pool, `SELECT (prism.row_stamp('public.kv', jsonb_object(ARRAY['id'], ARRAY[x.id::text]), x.xmin) >
		prism.row_stamp(t.table_name, t.key, t.xmin))::text FROM kv x, prism.tombstones t WHERE x.id = 5 AND t.table_name = 'public.kv'`); got != "true" {
		t.Fatalf("the local insert of key 5 stamps after the applied delete's tombstone: %q, want true", got)
	}
}
