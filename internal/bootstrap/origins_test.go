package bootstrap

import (
	"context"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestSnapshotOriginsWithBatches: while the source applies another
// region's transactions in batches (one target transaction carrying the
// origin LSN of its last member), the progress recorded with each snapshot
// is exactly the last of that region's transactions the snapshot holds.
// Resolving it from the WAL after the snapshot (the first batch after the
// consistent point, minus one) named a batch's last member and lost the
// others.
func TestSnapshotOriginsWithBatches(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	na := pgtest.Start(t, pgtest.Options{Name: "origins-na"})
	if err := na.CreateDatabase(ctx, "app"); err != nil {
		t.Fatal(err)
	}
	if err := na.Exec(ctx, "app", "CREATE TABLE kv (id int PRIMARY KEY, v text NOT NULL); CREATE PUBLICATION prism FOR ALL TABLES"); err != nil {
		t.Fatal(err)
	}
	kv := &decode.Relation{ID: 1, Schema: "public", Table: "kv", ReplicaIdentity: decode.IdentityDefault, Columns: []decode.Column{
		{Name: "id", TypeOID: 23, TypeName: "int4", TypeMod: -1, Key: true},
		{Name: "v", TypeOID: 25, TypeName: "text", TypeMod: -1},
	}}
	// Transaction i of region eu inserts row i and ends at endOf(i).
	endOf := func(i int) pglogrepl.LSN { return pglogrepl.LSN(0x1000000 + i*0x100) }
	txn := func(i int) *decode.Txn {
		id := strconv.Itoa(i)
		return &decode.Txn{Origin: "eu", CommitLSN: endOf(i) - 8, EndLSN: endOf(i), CommitTime: time.Now(), Changes: []decode.Change{{
			Op: decode.OpInsert, Rel: kv,
			New: []decode.Value{{Kind: decode.ValueText, Data: []byte(id)}, {Kind: decode.ValueText, Data: []byte("eu-" + id)}},
		}}}
	}
	pool, err := pgxpool.New(ctx, na.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	a := apply.NewApplier(pool, zerolog.Nop(), apply.WithLocalRegion("na"))
	defer a.Close()
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}

	// Batches of 4 until stopped; a batch the snapshot's origin hold
	// interrupts is applied again (the applier skips what it covers).
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var applyErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		next := 1
		for {
			select {
			case <-stop:
				return
			default:
			}
			batch := []*decode.Txn{txn(next), txn(next + 1), txn(next + 2), txn(next + 3)}
			n, err := a.ApplyBatch(ctx, batch)
			next += n
			if err != nil && !apply.IsRetryable(err) {
				applyErr = err
				return
			}
			if err != nil {
				time.Sleep(10 * time.Millisecond)
			}
		}
	}()
	defer func() {
		close(stop)
		wg.Wait()
		if applyErr != nil {
			t.Errorf("apply: %v", applyErr)
		}
	}()

	batches := func() int64 {
		var n int64
		if err := pool.QueryRow(ctx, "SELECT count(DISTINCT xmin::text) FROM kv").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	for round := 1; round <= 6; round++ {
		time.Sleep(100 * time.Millisecond)
		snap, srcs, err := snapshotSource(ctx, Config{Region: "as", Publication: "prism"}, Peer{Region: "na", DSN: na.DSN("app")}, []string{"eu"}, 1)
		if err != nil {
			t.Fatal(err)
		}
		var rows, top int64
		res := srcs[0].ExecParams(ctx, "SELECT count(*)::text, coalesce(max(id), 0)::text FROM kv", nil, nil, nil, nil).Read()
		if err = res.Err; err == nil {
			rows, _ = strconv.ParseInt(string(res.Rows[0][0]), 10, 64)
			top, _ = strconv.ParseInt(string(res.Rows[0][1]), 10, 64)
		}
		for _, c := range srcs {
			c.Close(context.Background())
		}
		if err != nil {
			t.Fatal(err)
		}
		if rows != top {
			t.Fatalf("round %d: the snapshot holds %d rows up to id %d: a gap", round, rows, top)
		}
		want := endOf(int(top))
		if top == 0 {
			// No batch committed yet (a slow machine): the origin has no
			// progress, and the snapshot no transaction of eu.
			want = 0
		}
		if got := snap.progress["eu"]; got != want {
			t.Fatalf("round %d: origin eu as of the snapshot = %s, but the snapshot holds eu's transactions 1-%d (up to %s)", round, got, top, want)
		}
		t.Logf("round %d: snapshot holds eu 1-%d, progress %s", round, top, snap.progress["eu"])
	}
	if n := batches(); n < 10 {
		t.Fatalf("only %d target transactions were applied; the test needs batches", n)
	}
}
