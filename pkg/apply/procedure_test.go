package apply

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestApplyProcedure applies the same transactions through procedure
// prism.apply_copy (contrib/prism_apply, which make plugin builds) and
// statement by statement, into two clusters, and
// compares them; then a run that fails part-way, and a procedure that
// went away.
func TestApplyProcedure(t *testing.T) {
	dir, err := pgtest.PrismPgoutputDir("")
	if err == nil {
		_, err = os.Stat(filepath.Join(dir, "prism_apply.so"))
	}
	if err != nil {
		t.Fatalf("contrib/prism_apply is not built (%v): run `make plugin`", err)
	}
	ctx := testCtx(t)
	// Two clusters: replication origins are a cluster's.
	c := pgtest.Start(t, pgtest.Options{Name: "proc"})
	cp := pgtest.Start(t, pgtest.Options{Name: "proc-plain"})
	const schema = `CREATE TABLE kv (id int PRIMARY KEY, v text, n numeric, b bytea, j jsonb, ts timestamptz,
		arr int[], f float8 CHECK (f IS NULL OR f < 1e300))`
	mustExec(t, ctx, c, "postgres", schema)
	mustExec(t, ctx, cp, "postgres", schema)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	plain := newApplier(t, ctx, cp, "postgres", WithLocalRegion("eu"), WithoutApplyProcedure())
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	if err := plain.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	if !a.ApplyProcedure() || plain.ApplyProcedure() {
		t.Fatalf("ApplyProcedure = %v and %v (WithoutApplyProcedure), want true and false", a.ApplyProcedure(), plain.ApplyProcedure())
	}
	r := rel("public", "kv", decode.IdentityDefault, "id*", "v", "n", "b", "j", "ts", "arr", "f")
	both := func(t *testing.T, txns ...*decode.Txn) (int, error) {
		t.Helper()
		np, perr := plain.ApplyBatch(ctx, txns)
		n, err := a.ApplyBatch(ctx, txns)
		if n != np || (err == nil) != (perr == nil) {
			t.Fatalf("through the procedure: %d, %v; statement by statement: %d, %v", n, err, np, perr)
		}
		if got, want := tableRows(t, ctx, a.pool, "kv"), tableRows(t, ctx, plain.pool, "kv"); got != want {
			t.Fatalf("through the procedure:\n%s\nstatement by statement:\n%s", got, want)
		}
		return n, err
	}

	lsn, sec := uint64(1000), 1.0
	next := func(changes ...decode.Change) *decode.Txn {
		lsn += 100
		sec++
		return txn("na", lsn, sec, changes...)
	}
	t.Run("lone transactions", func(t *testing.T) {
		rows := [][]string{
			{"1", "plain", "1.5", `\x00ff`, `{"a": [1, 2]}`, "2025-03-01 12:00:00.123456+00", "{1,2,3}", "0.1"},
			{"2", "ünïcødé ☃ 'quoted' \\ back", "-123456789012345678901234567890.000000001", `\x`, `"s"`, "infinity", "{}", "-0"},
			{"3", `\N`, `\N`, `\N`, `\N`, `\N`, `\N`, `\N`},
			{"4", "", "NaN", `\xdeadbeef`, `null`, "1999-12-31 23:59:59.999999-08", "{NULL,4}", "1e-300"},
		}
		for _, row := range rows {
			if _, err := both(t, next(ins(r, row...))); err != nil {
				t.Fatalf("insert %v: %v", row, err)
			}
		}
		if _, err := both(t, next(upd(r, nil, "1", "changed", "2", `\x01`, `[]`, "2025-03-02 00:00:00+00", "{5}", "2.5"),
			del(r, "3", `\N`, `\N`, `\N`, `\N`, `\N`, `\N`, `\N`))); err != nil {
			t.Fatal(err)
		}
		if st := a.Stats()["na"]; st.Procedure != 5 || st.ByRow != 5 {
			t.Fatalf("stats %+v, want 5 transactions by rows, all through the procedure", st)
		}
		if st := plain.Stats()["na"]; st.Procedure != 0 || st.ByRow != 5 {
			t.Fatalf("stats without the procedure %+v, want 5 by rows, none through it", st)
		}
	})

	t.Run("a run failing part-way", func(t *testing.T) {
		before := a.Stats()["na"]
		run := []*decode.Txn{
			next(ins(r, "10", "a", `\N`, `\N`, `\N`, `\N`, `\N`, `\N`)),
			next(upd(r, nil, "10", "b", `\N`, `\N`, `\N`, `\N`, `\N`, `\N`)),
			next(ins(r, "11", "c", `\N`, `\N`, `\N`, `\N`, `\N`, "1e301")),
			next(ins(r, "12", "d", `\N`, `\N`, `\N`, `\N`, `\N`, `\N`)),
		}
		n, err := both(t, run...)
		var ae *Error
		if n != 2 || !errors.As(err, &ae) || ae.EndLSN != run[2].EndLSN || ae.Table != "public.kv" || ae.Op != decode.OpInsert || ae.SQLState != "23514" {
			t.Fatalf("ApplyBatch = %d, %v; want 2 and a 23514 on public.kv INSERT of the third", n, err)
		}
		if p, _ := a.Progress(ctx, "na"); p != run[1].EndLSN {
			t.Fatalf("Progress = %s, want %s", p, run[1].EndLSN)
		}
		st := a.Stats()["na"]
		if st.Procedure-before.Procedure != 2 || st.ByRow-before.ByRow != 2 {
			t.Fatalf("stats %+v after %+v: want 2 more by rows, through the procedure", st, before)
		}
		if !a.ApplyProcedure() {
			t.Fatal("a transaction's failure turned the procedure off")
		}
		// The rest applies once the bad row is gone.
		run[2] = next(ins(r, "11", "c", `\N`, `\N`, `\N`, `\N`, `\N`, "1")) // a later LSN
		run[2], run[3] = run[3], run[2]
		if n, err := both(t, run[2:]...); err != nil || n != 2 {
			t.Fatalf("ApplyBatch = %d, %v", n, err)
		}
	})

	t.Run("a procedure that went away", func(t *testing.T) {
		before := a.Stats()["na"]
		mustExec(t, ctx, c, "postgres", "DROP PROCEDURE prism.apply_copy(boolean)")
		if _, err := both(t, next(ins(r, "20", "after", `\N`, `\N`, `\N`, `\N`, `\N`, `\N`))); err != nil {
			t.Fatal(err)
		}
		if a.ApplyProcedure() {
			t.Fatal("ApplyProcedure still true after its procedure was dropped")
		}
		st := a.Stats()["na"]
		if st.Procedure != before.Procedure || st.ByRow != before.ByRow+1 {
			t.Fatalf("stats %+v after %+v: want one more by rows, not through the procedure", st, before)
		}
		if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM kv WHERE id = 20"); got != "1" {
			t.Fatalf("row 20: %s, want 1", got)
		}
	})
}
