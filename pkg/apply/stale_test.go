package apply

import (
	"errors"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestStaleSchemaRetried: a column's type changed by a local schema change
// after the applier cached the table (ddl: off, the operator altered every
// region by hand) fails the next transaction with 42804 from the cached
// description. That error is retryable, so no policy parks or halts the
// transaction, and the next try, built from the catalog as it is now,
// applies it.
func TestStaleSchemaRetried(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "stale"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE sv (id int PRIMARY KEY, v text); INSERT INTO sv VALUES (1, '1');`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	sv := rel("public", "sv", decode.IdentityDefault, "id*", "v")
	t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()
	if n, err := a.ApplyBatch(ctx, []*decode.Txn{txn("na", 1100, t0, upd(sv, nil, "1", "2"))}); n != 1 || err != nil {
		t.Fatalf("ApplyBatch before the type change = %d, %v", n, err)
	}
	mustExec(t, ctx, c, "postgres", "ALTER TABLE sv ALTER v TYPE int USING v::int")
	next := []*decode.Txn{txn("na", 1200, t0+1, upd(sv, nil, "1", "3"))}
	n, err := a.ApplyBatch(ctx, next)
	var ae *Error
	if n != 0 || !errors.As(err, &ae) || ae.SQLState != "42804" || !IsRetryable(err) {
		t.Fatalf("first try after the type change = %d, %v; want a retryable 42804", n, err)
	}
	if n, err := a.ApplyBatch(ctx, next); n != 1 || err != nil {
		t.Fatalf("second try = %d, %v; want it applied", n, err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT v::text FROM sv WHERE id = 1"); got != "3" {
		t.Fatalf("v = %s, want 3", got)
	}
}

// TestStaleSchemaRetriedOncePerSource: each source's transaction gets one
// more try after a stale-schema error, also when two sources fail in
// turn; the second failure of each goes to its policy.
func TestStaleSchemaRetriedOncePerSource(t *testing.T) {
	a := &Applier{}
	na, eu := txn("na", 100, 1), txn("eu", 200, 2)
	try := func(tx *decode.Txn) bool {
		e := &Error{SQLState: "42804", Err: errors.New("column is of type integer but expression is of type text")}
		a.staleSchema(e, tx)
		return e.Retryable
	}
	for i, want := range []struct {
		tx    *decode.Txn
		retry bool
	}{{na, true}, {eu, true}, {na, false}, {eu, false}} {
		if got := try(want.tx); got != want.retry {
			t.Fatalf("failure %d (%s): retryable = %v, want %v", i+1, want.tx.Origin, got, want.retry)
		}
	}
}
