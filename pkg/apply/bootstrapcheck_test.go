package apply

import (
	"errors"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestUnfinishedBootstrapRefused: while the region's last bootstrap run
// has not finished (it was killed and left half-copied tables, and its
// lock with it), an applier that holds the origin afresh refuses every
// transaction with a retryable PR003 and moves neither the rows nor the
// origin, so the next run's snapshot decides what comes after it. Once a
// run is done, the same transaction applies.
func TestUnfinishedBootstrapRefused(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "bootcheck"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE bc (id int PRIMARY KEY, v text); INSERT INTO bc VALUES (1, '1');`)
	mustExec(t, ctx, c, "postgres", BootstrapStateSQL)
	mustExec(t, ctx, c, "postgres", `INSERT INTO prism.bootstrap (source, state) VALUES ('na', 'done')`)
	bc := rel("public", "bc", decode.IdentityDefault, "id*", "v")
	t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()

	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("as"))
	if n, err := a.ApplyBatch(ctx, []*decode.Txn{txn("eu", 1100, t0, upd(bc, nil, "1", "2"))}); n != 1 || err != nil {
		t.Fatalf("ApplyBatch after a finished run = %d, %v", n, err)
	}
	a.Close()

	// A new run starts and is killed: its row stays 'copying'.
	mustExec(t, ctx, c, "postgres", `INSERT INTO prism.bootstrap (source, state) VALUES ('na', 'copying')`)
	a = newApplier(t, ctx, c, "postgres", WithLocalRegion("as"))
	defer a.Close()
	next := []*decode.Txn{txn("eu", 1200, t0+1, upd(bc, nil, "1", "3"))}
	for try := 0; try < 2; try++ {
		n, err := a.ApplyBatch(ctx, next)
		var ae *Error
		if n != 0 || !errors.As(err, &ae) || ae.SQLState != "PR003" || !IsRetryable(err) {
			t.Fatalf("ApplyBatch during an unfinished bootstrap = %d, %v; want a retryable PR003", n, err)
		}
	}
	if err := a.Apply(ctx, next[0]); !IsRetryable(err) {
		t.Fatalf("Apply during an unfinished bootstrap = %v; want a retryable error", err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT v FROM bc WHERE id = 1"); got != "2" {
		t.Fatalf("v = %s during the unfinished bootstrap, want 2 (nothing applied)", got)
	}
	if p, err := a.Progress(ctx, "eu"); err != nil || p != decodeLSN(1100) {
		t.Fatalf("origin progress during the unfinished bootstrap = %s, %v; want 0/44C (unmoved)", p, err)
	}

	mustExec(t, ctx, c, "postgres", `UPDATE prism.bootstrap SET state = 'done' WHERE state = 'copying'`)
	if n, err := a.ApplyBatch(ctx, next); n != 1 || err != nil {
		t.Fatalf("ApplyBatch after the run finished = %d, %v", n, err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT v FROM bc WHERE id = 1"); got != "3" {
		t.Fatalf("v = %s, want 3", got)
	}
}
