package apply

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// originFree reports whether another session can take origin now.
func originFree(t *testing.T, ctx context.Context, c *pgtest.Cluster, origin string) bool {
	t.Helper()
	conn, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, "SELECT pg_replication_origin_session_setup($1)", origin)
	var pgErr *pgconn.PgError
	switch {
	case err == nil:
		if _, err := conn.Exec(ctx, "SELECT pg_replication_origin_session_reset()"); err != nil {
			t.Fatal(err)
		}
		return true
	case errors.As(err, &pgErr) && pgErr.Code == "55006":
		return false
	default:
		t.Fatalf("take origin %s: %v", origin, err)
		return false
	}
}

// waitFree polls until origin is free, failing after a deadline.
func waitFree(t *testing.T, ctx context.Context, c *pgtest.Cluster, origin string) time.Duration {
	t.Helper()
	t0 := time.Now()
	for !originFree(t, ctx, c, origin) {
		if time.Since(t0) > 30*time.Second {
			t.Fatalf("origin %s still held after %s", origin, time.Since(t0))
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(t0)
}

func TestHeldSession(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "hold"})
	mustExec(t, ctx, c, "postgres", "CREATE TABLE log (n int, origin text); ALTER TABLE log REPLICA IDENTITY FULL")
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	t.Cleanup(a.Close)

	t.Run("consecutive batches share one session", func(t *testing.T) {
		txns := seqTxns("h1", 0, 6)
		var pids []uint32
		a.testAfterSend = func(pid uint32) { pids = append(pids, pid) }
		defer func() { a.testAfterSend, a.holdIdle = nil, holdIdle }()
		// Long enough for a loaded machine; the last batch parks its
		// session for a short while only.
		a.holdIdle = time.Minute
		for i := 0; i < 6; i += 2 {
			if i == 4 {
				a.holdIdle = 200 * time.Millisecond
			}
			if n, err := a.ApplyBatch(ctx, txns[i:i+2]); n != 2 || err != nil {
				t.Fatalf("ApplyBatch(%d..%d) = %d, %v", i, i+1, n, err)
			}
		}
		if len(pids) != 3 || pids[0] != pids[1] || pids[1] != pids[2] {
			t.Fatalf("backends of three consecutive batches = %v, want one", pids)
		}
		if rows, distinct := countLog(t, ctx, a, "h1"); rows != 6 || distinct != 6 {
			t.Fatalf("log has %d rows (%d distinct), want 6", rows, distinct)
		}
		// The idle session keeps the origin only for a while (the check
		// itself may come after that on a loaded machine).
		held := !originFree(t, ctx, c, "prism_h1")
		d := waitFree(t, ctx, c, "prism_h1")
		t.Logf("origin held right after the batch: %v; free after %s", held, d)
		// A fresh session picks up where the held one ended.
		if n, err := a.ApplyBatch(ctx, txns); n != 6 || err != nil {
			t.Fatalf("replay = %d, %v", n, err)
		}
		if rows, _ := countLog(t, ctx, a, "h1"); rows != 6 {
			t.Fatalf("replay applied again: %d rows", rows)
		}
	})

	t.Run("release and fence free the origin", func(t *testing.T) {
		a.holdIdle = time.Minute
		defer func() { a.holdIdle = holdIdle }()
		txns := seqTxns("h2", 0, 4)
		if n, err := a.ApplyBatch(ctx, txns[:2]); n != 2 || err != nil {
			t.Fatalf("ApplyBatch = %d, %v", n, err)
		}
		a.Release("h2")
		if !originFree(t, ctx, c, "prism_h2") {
			t.Fatalf("origin held after Release")
		}
		if n, err := a.ApplyBatch(ctx, txns[2:3]); n != 1 || err != nil {
			t.Fatalf("ApplyBatch = %d, %v", n, err)
		}
		// Fence by this Applier lets its own idle session go without
		// killing anything.
		if n, err := a.Fence(ctx, "h2"); n != 0 || err != nil {
			t.Fatalf("Fence of the own idle session = %d, %v; want 0, nil", n, err)
		}
		if n, err := a.ApplyBatch(ctx, txns[3:]); n != 1 || err != nil {
			t.Fatalf("ApplyBatch = %d, %v", n, err)
		}
		if rows, distinct := countLog(t, ctx, a, "h2"); rows != 4 || distinct != 4 {
			t.Fatalf("log has %d rows (%d distinct), want 4", rows, distinct)
		}
	})

	t.Run("fenced idle session is replaced", func(t *testing.T) {
		a.holdIdle = time.Minute
		defer func() { a.holdIdle = holdIdle }()
		txns := seqTxns("h3", 0, 4)
		if n, err := a.ApplyBatch(ctx, txns[:2]); n != 2 || err != nil {
			t.Fatalf("ApplyBatch = %d, %v", n, err)
		}
		// Another path takes the source region over: it fences the idle
		// holder, applies, and goes away.
		other := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
		if n, err := other.Fence(ctx, "h3"); n != 1 || err != nil {
			t.Fatalf("Fence of another Applier's idle session = %d, %v; want 1, nil", n, err)
		}
		if n, err := other.ApplyBatch(ctx, txns[:3]); n != 3 || err != nil {
			t.Fatalf("other ApplyBatch = %d, %v", n, err)
		}
		other.Close()
		// The first Applier's held session died: it starts over on a fresh
		// one, without an error and without applying twice.
		if n, err := a.ApplyBatch(ctx, txns); n != 4 || err != nil {
			t.Fatalf("ApplyBatch after the fence = %d, %v", n, err)
		}
		if rows, distinct := countLog(t, ctx, a, "h3"); rows != 4 || distinct != 4 {
			t.Fatalf("log has %d rows (%d distinct), want 4", rows, distinct)
		}
	})

	t.Run("stream and batch share the held session", func(t *testing.T) {
		a.holdIdle = time.Minute
		defer func() { a.holdIdle = holdIdle }()
		txns := seqTxns("h4", 0, 3)
		if n, err := a.ApplyBatch(ctx, txns[:1]); n != 1 || err != nil {
			t.Fatalf("ApplyBatch = %d, %v", n, err)
		}
		hdr := *txns[1]
		chunks := [][]decode.Change{txns[1].Changes}
		next := func() ([]decode.Change, error) {
			if len(chunks) == 0 {
				return nil, io.EOF
			}
			ch := chunks[0]
			chunks = chunks[1:]
			return ch, nil
		}
		hdr.Changes = nil
		if err := a.ApplyStream(ctx, &hdr, next); err != nil {
			t.Fatalf("ApplyStream = %v", err)
		}
		if n, err := a.ApplyBatch(ctx, txns); n != 3 || err != nil {
			t.Fatalf("ApplyBatch = %d, %v", n, err)
		}
		if rows, distinct := countLog(t, ctx, a, "h4"); rows != 3 || distinct != 3 {
			t.Fatalf("log has %d rows (%d distinct), want 3", rows, distinct)
		}
		a.Close()
		if !originFree(t, ctx, c, "prism_h4") {
			t.Fatalf("origin held after Close")
		}
	})
}
