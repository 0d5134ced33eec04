package apply

import (
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// chunked returns a next function that hands out changes in chunks of n,
// failing with failAt's error instead of the chunk at index failAt (-1:
// never), and counts the calls.
func chunked(changes []decode.Change, n, failAt int, calls *int) func() ([]decode.Change, error) {
	i := 0
	return func() ([]decode.Change, error) {
		*calls++
		if i >= len(changes) {
			return nil, io.EOF
		}
		if failAt >= 0 && i/n == failAt {
			return nil, errors.New("stream cut off")
		}
		end := min(i+n, len(changes))
		c := changes[i:end]
		i = end
		return c, nil
	}
}

func TestApplyStream(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "stream"})
	mustExec(t, ctx, c, "postgres", "CREATE TABLE big (id int PRIMARY KEY, v text); CREATE TABLE other (id int PRIMARY KEY CHECK (id < 100))")
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	r := rel("public", "big", decode.IdentityDefault, "id*", "v")
	o := rel("public", "other", decode.IdentityDefault, "id*")

	// 20,000 inserts, then updates and deletes of some of them, spread
	// over many chunks and pipelines.
	var changes []decode.Change
	for i := range 20000 {
		changes = append(changes, ins(r, fmt.Sprint(i), fmt.Sprintf("row %d %0200d", i, i)))
	}
	for i := 0; i < 20000; i += 10 {
		changes = append(changes, upd(r, nil, fmt.Sprint(i), "updated"))
	}
	for i := 5; i < 20000; i += 10 {
		changes = append(changes, del(r, fmt.Sprint(i), `\N`))
	}
	changes = append(changes, ins(o, "1"))
	hdr := txn("na", 5000, 1)

	t.Run("cut off mid-way commits nothing", func(t *testing.T) {
		calls := 0
		err := a.ApplyStream(ctx, hdr, chunked(changes, 1000, 7, &calls))
		var ae *Error
		if !errors.As(err, &ae) || !ae.Retryable || ae.EndLSN != hdr.EndLSN {
			t.Fatalf("ApplyStream(cut off) = %v, want a retryable *Error", err)
		}
		if n := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM big"); n != "0" {
			t.Fatalf("big has %s rows after a cut-off stream, want 0", n)
		}
		if p, _ := a.Progress(ctx, "na"); p != 0 {
			t.Fatalf("Progress = %s after a cut-off stream, want 0", p)
		}
	})

	t.Run("applies in one transaction", func(t *testing.T) {
		calls := 0
		if err := a.ApplyStream(ctx, hdr, chunked(changes, 1000, -1, &calls)); err != nil {
			t.Fatalf("ApplyStream = %v", err)
		}
		got := queryString(t, ctx, a.pool, "SELECT count(*) || '/' || count(*) FILTER (WHERE v = 'updated') || '/' || count(DISTINCT xmin::text) FROM big")
		if got != "18000/2000/1" {
			t.Fatalf("big rows/updated/transactions = %s, want 18000/2000/1", got)
		}
		if p, _ := a.Progress(ctx, "na"); p != hdr.EndLSN {
			t.Fatalf("Progress = %s, want %s", p, hdr.EndLSN)
		}
		// The source's commit time is kept.
		ts := queryString(t, ctx, a.pool, "SELECT max(pg_xact_commit_timestamp(xmin))::text FROM big")
		if want := queryString(t, ctx, a.pool, "SELECT $1::timestamptz::text", hdr.CommitTime); ts != want {
			t.Fatalf("commit time = %s, want %s", ts, want)
		}
	})

	t.Run("replay is skipped and drained", func(t *testing.T) {
		calls := 0
		if err := a.ApplyStream(ctx, hdr, chunked(changes, 1000, -1, &calls)); err != nil {
			t.Fatalf("ApplyStream(replay) = %v", err)
		}
		if want := (len(changes)+999)/1000 + 1; calls != want {
			t.Fatalf("replay read %d chunks, want all %d", calls, want)
		}
		if n := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM big"); n != "18000" {
			t.Fatalf("big has %s rows after replay, want 18000", n)
		}
	})

	t.Run("failing change names its table", func(t *testing.T) {
		bad := txn("na", 6000, 2, ins(o, "2"), ins(r, "7", "x"), ins(o, "200"))
		calls := 0
		// The third change violates the check constraint.
		err := a.ApplyStream(ctx, bad, chunked(bad.Changes, 1, -1, &calls))
		var ae *Error
		if !errors.As(err, &ae) || ae.Retryable || ae.SQLState != "23514" || ae.Table != "public.other" || ae.Op != decode.OpInsert {
			t.Fatalf("ApplyStream(duplicate) = %#v, want a permanent 23514 on public.other INSERT", err)
		}
		if n := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM other"); n != "1" {
			t.Fatalf("other has %s rows after a failed stream, want 1", n)
		}
		if p, _ := a.Progress(ctx, "na"); p != hdr.EndLSN {
			t.Fatalf("Progress = %s after a failed stream, want %s", p, hdr.EndLSN)
		}
		// The applier is usable afterwards.
		if err := a.Apply(ctx, txn("na", 7000, 3, ins(o, "3"))); err != nil {
			t.Fatalf("Apply after a failed stream = %v", err)
		}
		// One stream committed (not its replay, not the failed one), one
		// transaction by rows.
		if got, want := a.Stats()["na"], (Stats{Streamed: 1, ByRow: 1}); got != want {
			t.Fatalf("stats %+v, want %+v", got, want)
		}
	})
}

// TestSpilledNeverSilentlyEmpty: a spilled transaction whose file cannot be
// read fails; in a batch it is refused. The origin never passes it with
// nothing applied.
func TestSpilledNeverSilentlyEmpty(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "spilled"})
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	bad := txn("na", 5000, 1)
	bad.Spill = &decode.Spill{} // no file behind it
	var ae *Error
	if err := a.Apply(ctx, bad); !errors.As(err, &ae) || ae.Retryable {
		t.Fatalf("Apply(unreadable spill) = %v, want a permanent *Error", err)
	}
	if n, err := a.ApplyBatch(ctx, []*decode.Txn{txn("na", 4000, 0), bad}); n != 0 || !errors.As(err, &ae) {
		t.Fatalf("ApplyBatch(with a spilled txn) = %d, %v; want 0 and an *Error", n, err)
	}
	if p, _ := a.Progress(ctx, "na"); p != 0 {
		t.Fatalf("Progress = %s, want 0", p)
	}
}
