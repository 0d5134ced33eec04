package apply

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// localWrite runs sql on a region and returns the commit time of the row
// id of table it wrote (read from the row's xmin).
func localWrite(t *testing.T, ctx context.Context, pool *pgxpool.Pool, sql, table string, id int) time.Time {
	t.Helper()
	if _, err := pool.Exec(ctx, sql); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	var ts time.Time
	if err := pool.QueryRow(ctx, fmt.Sprintf("SELECT pg_xact_commit_timestamp(xmin) FROM %s WHERE id = $1", table), id).Scan(&ts); err != nil {
		t.Fatalf("commit time: %v", err)
	}
	return ts
}

// TestConflictsTwoRegions writes the same rows on two real regions and
// delivers each region's transaction to the other.
func TestConflictsTwoRegions(t *testing.T) {
	ctx := testCtx(t)
	na := pgtest.Start(t, pgtest.Options{Name: "cna"})
	eu := pgtest.Start(t, pgtest.Options{Name: "ceu"})
	schema := `
		CREATE TABLE lww (id int PRIMARY KEY, v text);
		CREATE TABLE sw (id int PRIMARY KEY, v text);
		CREATE TABLE kl (id int PRIMARY KEY, v text);
		INSERT INTO lww VALUES (1, 'base'); INSERT INTO sw VALUES (1, 'base'); INSERT INTO kl VALUES (1, 'base');`
	mustExec(t, ctx, na, "postgres", schema)
	mustExec(t, ctx, eu, "postgres", schema)
	policies := map[string]Policy{"public.sw": SourceWins, "public.kl": KeepLocal}
	aNA := newApplier(t, ctx, na, "postgres", WithLocalRegion("na"), WithConflicts(LastWriteWins, policies))
	aEU := newApplier(t, ctx, eu, "postgres", WithLocalRegion("eu"), WithConflicts(LastWriteWins, policies))
	lsn := map[string]uint64{}
	deliver := func(a *Applier, origin string, ts time.Time, c decode.Change) {
		t.Helper()
		lsn[origin] += 100
		tx := txn(origin, 1000+lsn[origin], 0, c)
		tx.CommitTime = ts
		if err := a.Apply(ctx, tx); err != nil {
			t.Fatalf("Apply %s: %v", origin, err)
		}
	}

	for _, table := range []string{"lww", "sw", "kl"} {
		r := rel("public", table, decode.IdentityDefault, "id*", "v")
		// Concurrent update of row 1 and insert of row 2 on both regions;
		// eu writes second, so eu's versions are the later ones.
		tNA1 := localWrite(t, ctx, aNA.pool, "UPDATE "+table+" SET v = 'na' WHERE id = 1", table, 1)
		tNA2 := localWrite(t, ctx, aNA.pool, "INSERT INTO "+table+" VALUES (2, 'na')", table, 2)
		tEU1 := localWrite(t, ctx, aEU.pool, "UPDATE "+table+" SET v = 'eu' WHERE id = 1", table, 1)
		tEU2 := localWrite(t, ctx, aEU.pool, "INSERT INTO "+table+" VALUES (2, 'eu')", table, 2)
		if !tEU1.After(tNA1) || !tEU2.After(tNA2) {
			t.Fatalf("clock did not advance between writes: %v %v %v %v", tNA1, tEU1, tNA2, tEU2)
		}
		deliver(aEU, "na", tNA1, upd(r, nil, "1", "na"))
		deliver(aEU, "na", tNA2, ins(r, "2", "na"))
		deliver(aNA, "eu", tEU1, upd(r, nil, "1", "eu"))
		deliver(aNA, "eu", tEU2, ins(r, "2", "eu"))

		gotNA, gotEU := tableRows(t, ctx, aNA.pool, table), tableRows(t, ctx, aEU.pool, table)
		later := `{"id":1,"v":"eu"}` + "\n" + `{"id":2,"v":"eu"}`
		switch table {
		case "lww":
			if gotNA != later || gotEU != later {
				t.Fatalf("last_write_wins: na has\n%s\neu has\n%s\nwant both\n%s", gotNA, gotEU, later)
			}
		case "sw": // each region takes the other's version: not convergent
			if gotNA != later || gotEU != `{"id":1,"v":"na"}`+"\n"+`{"id":2,"v":"na"}` {
				t.Fatalf("source_wins: na has\n%s\neu has\n%s", gotNA, gotEU)
			}
		case "kl": // an existing key is kept on both sides: not convergent
			if gotNA != `{"id":1,"v":"eu"}`+"\n"+`{"id":2,"v":"na"}` || gotEU != later {
				t.Fatalf("keep_local: na has\n%s\neu has\n%s", gotNA, gotEU)
			}
		}
	}

	conflicts := func(a *Applier) string {
		return queryString(t, ctx, a.pool, `SELECT string_agg(format('%s %s %s %s %s/%s', table_name, kind, policy, winner, local_origin, remote_origin), E'\n' ORDER BY id) FROM prism.conflicts`)
	}
	wantNA := "public.lww insert_exists last_write_wins remote na/eu\n" +
		"public.sw insert_exists source_wins remote na/eu\n" +
		"public.kl insert_exists keep_local local na/eu"
	wantEU := "public.lww update last_write_wins local eu/na\n" +
		"public.lww insert_exists last_write_wins local eu/na\n" +
		"public.sw update source_wins remote eu/na\n" +
		"public.sw insert_exists source_wins remote eu/na\n" +
		"public.kl update keep_local local eu/na\n" +
		"public.kl insert_exists keep_local local eu/na"
	if got := conflicts(aNA); got != wantNA {
		t.Errorf("na conflicts:\n%s\nwant:\n%s", got, wantNA)
	}
	if got := conflicts(aEU); got != wantEU {
		t.Errorf("eu conflicts:\n%s\nwant:\n%s", got, wantEU)
	}
	// The recorded times are the two writes' commit times.
	got := queryString(t, ctx, aEU.pool, `SELECT (local_commit_time > remote_commit_time)::text FROM prism.conflicts WHERE table_name = 'public.lww' AND kind = 'update'`)
	if got != "true" {
		t.Errorf("eu lww update conflict: local newer than remote = %s, want true", got)
	}
}

// TestConflictOrders delivers the same pair of concurrent writes from two
// regions in both orders (to two tables of a third region) and checks
// that both orders end with the same rows.
func TestConflictOrders(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "corders"})
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("as"))
	lsn := map[string]uint64{}
	next := func(origin string) uint64 {
		lsn[origin] += 100
		return 1000 + lsn[origin]
	}
	// Times are in the future so the base rows, written locally now, are
	// older than both writes.
	t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()
	type write struct {
		origin string
		sec    float64
		change func(r *decode.Relation) decode.Change
	}
	update := func(v string) func(r *decode.Relation) decode.Change {
		return func(r *decode.Relation) decode.Change { return upd(r, nil, "1", v) }
	}
	insert := func(v string) func(r *decode.Relation) decode.Change {
		return func(r *decode.Relation) decode.Change { return ins(r, "2", v) }
	}
	remove := func(r *decode.Relation) decode.Change { return del(r, "1", `\N`) }
	for i, tc := range []struct {
		name  string
		first write // na's write
		other write // eu's write
		want  string
	}{
		{"update update", write{"na", t0, update("na")}, write{"eu", t0 + 1, update("eu")},
			`{"id":1,"v":"eu"}`},
		{"update update tie", write{"na", t0, update("na")}, write{"eu", t0, update("eu")},
			`{"id":1,"v":"na"}`},
		{"update update tie reversed names", write{"zz", t0, update("zz")}, write{"eu", t0, update("eu")},
			`{"id":1,"v":"zz"}`},
		{"insert insert", write{"na", t0 + 1, insert("na")}, write{"eu", t0, insert("eu")},
			`{"id":1,"v":"base"}` + "\n" + `{"id":2,"v":"na"}`},
		{"insert insert tie", write{"na", t0, insert("na")}, write{"eu", t0, insert("eu")},
			`{"id":1,"v":"base"}` + "\n" + `{"id":2,"v":"na"}`},
		{"older delete newer update", write{"na", t0, remove}, write{"eu", t0 + 1, update("eu")},
			`{"id":1,"v":"eu"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rows [2]string
			for order := 0; order < 2; order++ {
				table := fmt.Sprintf("o%d_%d", i, order)
				mustExec(t, ctx, c, "postgres", fmt.Sprintf("CREATE TABLE %s (id int PRIMARY KEY, v text); INSERT INTO %s VALUES (1, 'base')", table, table))
				r := rel("public", table, decode.IdentityDefault, "id*", "v")
				ws := []write{tc.first, tc.other}
				if order == 1 {
					ws[0], ws[1] = ws[1], ws[0]
				}
				for _, w := range ws {
					if err := a.Apply(ctx, txn(w.origin, next(w.origin), w.sec, w.change(r))); err != nil {
						t.Fatalf("Apply: %v", err)
					}
				}
				rows[order] = tableRows(t, ctx, a.pool, table)
			}
			if rows[0] != tc.want || rows[1] != tc.want {
				t.Fatalf("rows after na,eu:\n%s\nafter eu,na:\n%s\nwant:\n%s", rows[0], rows[1], tc.want)
			}
		})
	}
	// A newer delete and an older update of the same row: the delete's
	// tombstone keeps the row deleted in both orders. A delete and
	// re-insert in one region against a newer delete in another: the
	// tombstone keeps the older re-insert out too.
	for _, tc := range []struct {
		name string
		txs  func(r *decode.Relation) [2][]*decode.Txn
	}{
		{"newer delete older update", func(r *decode.Relation) [2][]*decode.Txn {
			return [2][]*decode.Txn{{txn("na", next("na"), t0+1, remove(r))}, {txn("eu", next("eu"), t0, upd(r, nil, "1", "eu"))}}
		}},
		{"newer delete older delete and insert", func(r *decode.Relation) [2][]*decode.Txn {
			return [2][]*decode.Txn{{txn("na", next("na"), t0+2, remove(r))},
				{txn("eu", next("eu"), t0, remove(r)), txn("eu", next("eu"), t0+1, ins(r, "1", "eu"))}}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for order := 0; order < 2; order++ {
				table := fmt.Sprintf("tomb_%d_%d", len(tc.name), order)
				mustExec(t, ctx, c, "postgres", fmt.Sprintf("CREATE TABLE %s (id int PRIMARY KEY, v text); INSERT INTO %s VALUES (1, 'base')", table, table))
				r := rel("public", table, decode.IdentityDefault, "id*", "v")
				groups := tc.txs(r)
				if order == 1 {
					groups[0], groups[1] = groups[1], groups[0]
				}
				for _, g := range groups {
					for _, tx := range g {
						if err := a.Apply(ctx, tx); err != nil {
							t.Fatalf("Apply: %v", err)
						}
					}
				}
				if got := tableRows(t, ctx, a.pool, table); got != "" {
					t.Fatalf("order %d: %s = %s, want the row deleted", order, table, got)
				}
			}
		})
	}
	got := queryString(t, ctx, a.pool, `SELECT string_agg(table_name || ' ' || kind || ' ' || resolution, E'\n' ORDER BY id) FROM prism.conflicts WHERE table_name LIKE 'public.tomb%' AND resolution = 'keep_deleted'`)
	want := "public.tomb_25_0 update_missing keep_deleted\npublic.tomb_36_0 insert_deleted keep_deleted"
	if got != want {
		t.Fatalf("tombstone decisions:\n%s\nwant:\n%s", got, want)
	}
	// Every order that dropped or replaced a version left a record.
	n := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM prism.conflicts")
	if n == "0" {
		t.Fatalf("no conflicts recorded")
	}
}
