package apply

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

const batchSchema = `
	CREATE TABLE kv (id int PRIMARY KEY, v text, n numeric, g int GENERATED ALWAYS AS (id * 2) STORED);
	CREATE TABLE hist (id int, note text);
	INSERT INTO kv (id, v) SELECT i, 'base' FROM generate_series(1, 9) i;`

// stamps lists every key of kv (rows and tombstones) with the stamp and
// region of its version, as the conflict check reads them.
func stamps(t *testing.T, ctx context.Context, pool *pgxpool.Pool) string {
	t.Helper()
	return queryString(t, ctx, pool, `SELECT string_agg(s, E'\n' ORDER BY s) FROM (
		SELECT format('row %s %s %s', x.id, prism.row_stamp('public.kv', jsonb_object(ARRAY['id'], ARRAY[x.id::text]), x.xmin), prism.region_of(o.roident)) AS s
		FROM kv x, pg_xact_commit_timestamp_origin(x.xmin) o WHERE o.roident <> 0
		UNION ALL
		SELECT format('tombstone %s %s %s', t.key, prism.row_stamp(t.table_name, t.key, t.xmin), prism.region_of(o.roident))
		FROM prism.tombstones t, pg_xact_commit_timestamp_origin(t.xmin) o WHERE t.table_name = 'public.kv') s`)
}

// targets counts the target transactions that wrote the given keys of kv.
func targets(t *testing.T, ctx context.Context, pool *pgxpool.Pool, ids string) string {
	t.Helper()
	return queryString(t, ctx, pool, "SELECT count(DISTINCT xmin::text)::text FROM kv WHERE id IN ("+ids+")")
}

// TestBatchStampsExact applies the same source transactions as one batch
// to one region and one by one to another (whose stamps are those of the
// source region): both end with the same rows and the same stamp on every
// version and tombstone, although the batch wrote them all in one target
// transaction with one commit timestamp. Writes from a third region whose
// commit times fall between the batch's transactions are then decided the
// same way in both.
func TestBatchStampsExact(t *testing.T) {
	ctx := testCtx(t)
	bat := pgtest.Start(t, pgtest.Options{Name: "bstamps"})
	ref := pgtest.Start(t, pgtest.Options{Name: "bref"})
	mustExec(t, ctx, bat, "postgres", batchSchema)
	mustExec(t, ctx, ref, "postgres", batchSchema)
	aB := newApplier(t, ctx, bat, "postgres", WithLocalRegion("eu"))
	aR := newApplier(t, ctx, ref, "postgres", WithLocalRegion("eu"))
	defer aB.Close()
	defer aR.Close()
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v", "n")
	hist := rel("public", "hist", decode.IdentityDefault, "id", "note")
	// Local rows are older than every shipped change.
	t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()
	txns := []*decode.Txn{
		txn("na", 1100, t0+1, upd(kv, nil, "1", "x1", "1.10"), upd(kv, nil, "2", "y1", `\N`), ins(kv, "10", "new", "10"), ins(hist, "1", "a")),
		// Row 1 again, a delete, an update then a delete of one key.
		txn("na", 1200, t0+2, upd(kv, nil, "1", "x2", "1.20"), del(kv, "3", `\N`, `\N`), upd(kv, nil, "5", "gone", `\N`), ins(hist, "2", `b "quoted" \ back`)),
		txn("na", 1300, t0+3, upd(kv, nil, "4", "z3", `\N`), ins(kv, "11", "i", "0"), upd(kv, nil, "11", "iu", "11"), del(kv, "5", `\N`, `\N`), ins(hist, "3", `\N`)),
	}
	if n, err := aB.ApplyBatch(ctx, txns); n != len(txns) || err != nil {
		t.Fatalf("ApplyBatch = %d, %v", n, err)
	}
	for _, tx := range txns {
		if err := aR.Apply(ctx, tx); err != nil {
			t.Fatalf("Apply: %v", err)
		}
	}
	if got := targets(t, ctx, aB.pool, "1, 2, 4, 10, 11"); got != "1" {
		t.Fatalf("the batch wrote kv in %s target transactions, want 1", got)
	}
	if got := targets(t, ctx, aR.pool, "1, 2, 4, 10, 11"); got != "3" {
		t.Fatalf("the row path wrote kv in %s target transactions, want 3", got)
	}
	if p, err := aB.Progress(ctx, "na"); err != nil || p != txns[2].EndLSN {
		t.Fatalf("Progress = %s, %v; want %s", p, err, txns[2].EndLSN)
	}
	compare := func(what string) {
		t.Helper()
		for _, table := range []string{"kv", "hist"} {
			if b, r := tableRows(t, ctx, aB.pool, table), tableRows(t, ctx, aR.pool, table); b != r {
				t.Fatalf("%s: %s batched:\n%s\none by one:\n%s", what, table, b, r)
			}
		}
		if b, r := stamps(t, ctx, aB.pool), stamps(t, ctx, aR.pool); b != r {
			t.Fatalf("%s: stamps batched:\n%s\none by one:\n%s", what, b, r)
		}
		cf := `SELECT coalesce(string_agg(format('%s %s %s %s %s %s', key, kind, resolution, winner, local_commit_time, remote_commit_time), E'\n' ORDER BY id), '') FROM prism.conflicts`
		if b, r := queryString(t, ctx, aB.pool, cf), queryString(t, ctx, aR.pool, cf); b != r {
			t.Fatalf("%s: conflicts batched:\n%s\none by one:\n%s", what, b, r)
		}
	}
	compare("after the batch")
	want := queryString(t, ctx, aR.pool, "SELECT $1::timestamptz::text", txns[0].CommitTime)
	if got := queryString(t, ctx, aB.pool, "SELECT prism.row_stamp('public.kv', '{\"id\": \"2\"}', xmin)::text FROM kv WHERE id = 2"); got != want {
		t.Fatalf("row 2 stamped %s, want its source transaction's %s", got, want)
	}

	// Region as wrote rows 1, 2, 3 and 10 at t0+1.5: after the batch's
	// first transaction, before its second and last. Its update of row 2
	// (last written at t0+1) wins, its update of row 1 (t0+2) and its
	// insert of key 3 (deleted at t0+2) lose, and its delete of row 10
	// (t0+1) wins - in both regions.
	as := []*decode.Txn{
		txn("as", 2100, t0+1.5, upd(kv, nil, "2", "as", `\N`)),
		txn("as", 2200, t0+1.5, upd(kv, nil, "1", "as", `\N`)),
		txn("as", 2300, t0+1.5, ins(kv, "3", "as", `\N`)),
		txn("as", 2400, t0+1.5, del(kv, "10", `\N`, `\N`)),
	}
	for _, tx := range as {
		for _, a := range []*Applier{aB, aR} {
			if err := a.Apply(ctx, tx); err != nil {
				t.Fatalf("Apply as: %v", err)
			}
		}
	}
	compare("after region as")
	if got := tableRows(t, ctx, aB.pool, "(SELECT * FROM kv WHERE id IN (1, 2, 3, 10))"); got != `{"id":1,"v":"x2","n":1.20,"g":2}`+"\n"+`{"id":2,"v":"as","n":null,"g":4}` {
		t.Fatalf("rows 1, 2, 3, 10 = %s", got)
	}
}

// TestBatchFallback: a batch that meets a conflict, or a failing
// transaction, is rolled back and its transactions are applied one by
// one: the conflict is decided and recorded as without batching, and a
// failure is pinned on exactly one transaction (invariant 9); those
// before it are durable and those after it apply in the next call.
func TestBatchFallback(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "bfall"})
	mustExec(t, ctx, c, "postgres", batchSchema+`
		ALTER TABLE hist ADD CONSTRAINT target_only CHECK (note IS DISTINCT FROM 'bad');`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	clock := testClock(a)
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v", "n")
	hist := rel("public", "hist", decode.IdentityDefault, "id", "note")
	t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()

	// A local row newer than the batch's first transaction, older than
	// its last; and a key the batch inserts that exists locally.
	mustExec(t, ctx, c, "postgres", "UPDATE kv SET v = 'local' WHERE id = 1; INSERT INTO kv (id, v) VALUES (20, 'local')")
	old := time.Now().Add(-time.Hour).Sub(baseTime).Seconds()
	txns := []*decode.Txn{
		txn("na", 1100, old, upd(kv, nil, "1", "older", `\N`)),
		txn("na", 1200, t0, ins(kv, "20", "na", `\N`), upd(kv, nil, "2", "a", `\N`), upd(kv, nil, "3", "b", `\N`)),
		txn("na", 1300, t0+1, upd(kv, nil, "4", "c", `\N`)),
	}
	if n, err := a.ApplyBatch(ctx, txns); n != len(txns) || err != nil {
		t.Fatalf("ApplyBatch = %d, %v", n, err)
	}
	if got := tableRows(t, ctx, a.pool, "(SELECT * FROM kv WHERE id IN (1, 2, 3, 4, 20))"); got != `{"id":1,"v":"local","n":null,"g":2}`+"\n"+
		`{"id":2,"v":"a","n":null,"g":4}`+"\n"+`{"id":20,"v":"na","n":null,"g":40}`+"\n"+
		`{"id":3,"v":"b","n":null,"g":6}`+"\n"+`{"id":4,"v":"c","n":null,"g":8}` {
		t.Fatalf("rows = %s", got)
	}
	if got := targets(t, ctx, a.pool, "2, 4"); got != "2" {
		t.Fatalf("rows written in %s target transactions, want 2 (one per source transaction)", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(key::text || ' ' || kind || ' ' || winner, ', ' ORDER BY id) FROM prism.conflicts"); got != `{"id": "1"} update local, {"id": "20"} insert_exists remote` {
		t.Fatalf("conflicts = %s", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM prism.batch_stamps"); got != "0" {
		t.Fatalf("%s row stamps left by a rolled back batch", got)
	}

	// A minute later the conflict above no longer keeps pairs from
	// batching (batchMemo).
	clock.Add(int64(time.Minute))

	// The second of four transactions fails in the target only.
	bad := []*decode.Txn{
		txn("na", 2100, t0+2, upd(kv, nil, "5", "d", `\N`), ins(hist, "1", "ok")),
		txn("na", 2200, t0+3, upd(kv, nil, "6", "e", `\N`), ins(hist, "2", "bad")),
		txn("na", 2300, t0+4, upd(kv, nil, "7", "f", `\N`), ins(hist, "3", "ok")),
		txn("na", 2400, t0+5, upd(kv, nil, "8", "g", `\N`), ins(hist, "4", "ok")),
	}
	n, err := a.ApplyBatch(ctx, bad)
	var e *Error
	if n != 1 || !errors.As(err, &e) || e.EndLSN != bad[1].EndLSN || e.SQLState != "23514" || e.Table != "public.hist" {
		t.Fatalf("ApplyBatch = %d, %v; want 1 and a check violation of the second transaction's hist row", n, err)
	}
	if p, err := a.Progress(ctx, "na"); err != nil || p != bad[0].EndLSN {
		t.Fatalf("Progress = %s, %v; want %s", p, err, bad[0].EndLSN)
	}
	// The policy parks the failing transaction; the others apply.
	if n, err := a.ApplyBatch(ctx, bad[2:]); n != 2 || err != nil {
		t.Fatalf("ApplyBatch after the failing one = %d, %v", n, err)
	}
	if got := tableRows(t, ctx, a.pool, "(SELECT * FROM kv WHERE id BETWEEN 5 AND 8)"); got != `{"id":5,"v":"d","n":null,"g":10}`+"\n"+
		`{"id":6,"v":"base","n":null,"g":12}`+"\n"+`{"id":7,"v":"f","n":null,"g":14}`+"\n"+`{"id":8,"v":"g","n":null,"g":16}` {
		t.Fatalf("rows = %s", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(id::text, ',' ORDER BY id) FROM hist"); got != "1,3,4" {
		t.Fatalf("hist = %s, want 1,3,4", got)
	}
	// The last two went as a batch again.
	if got := targets(t, ctx, a.pool, "7, 8"); got != "1" {
		t.Fatalf("the last two were written in %s target transactions, want 1", got)
	}

	// Array columns go by rows.
	mustExec(t, ctx, c, "postgres", "CREATE TABLE arr (id int PRIMARY KEY, a int[], t text[])")
	arr := rel("public", "arr", decode.IdentityDefault, "id*", "a", "t")
	if n, err := a.ApplyBatch(ctx, []*decode.Txn{
		txn("na", 3100, t0+6, ins(arr, "1", "{1,2}", `{"a,b",c}`)),
		txn("na", 3200, t0+7, upd(arr, nil, "1", "{3,4}", `{"x\"y",NULL}`), ins(arr, "2", `\N`, "{}")),
	}); n != 2 || err != nil {
		t.Fatalf("ApplyBatch arrays = %d, %v", n, err)
	}
	if got := tableRows(t, ctx, a.pool, "arr"); got != `{"id":1,"a":[3,4],"t":["x\"y",null]}`+"\n"+`{"id":2,"a":null,"t":[]}` {
		t.Fatalf("arr = %s", got)
	}
}

// TestBatchLocalConverges: local writes of region eu against batches from
// region na, in both delivery orders, converge with a region that applies
// the same transactions one by one.
func TestBatchLocalConverges(t *testing.T) {
	ctx := testCtx(t)
	eu := pgtest.Start(t, pgtest.Options{Name: "bleu"})
	as := pgtest.Start(t, pgtest.Options{Name: "blas"})
	mustExec(t, ctx, eu, "postgres", batchSchema)
	mustExec(t, ctx, as, "postgres", batchSchema)
	aEU := newApplier(t, ctx, eu, "postgres", WithLocalRegion("eu"))
	clock := testClock(aEU)
	aAS := newApplier(t, ctx, as, "postgres", WithLocalRegion("as"))
	defer aEU.Close()
	defer aAS.Close()
	for _, a := range []*Applier{aEU, aAS} {
		if err := a.Setup(ctx); err != nil {
			t.Fatal(err)
		}
	}
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v", "n")
	// eu writes rows 1-4 locally now; na's batch has transactions just
	// before and after, on the same rows.
	now := time.Now()
	var local []*decode.Txn
	for i, sql := range []string{
		"UPDATE kv SET v = 'eu' WHERE id = 1", "UPDATE kv SET v = 'eu' WHERE id = 2",
		"DELETE FROM kv WHERE id = 3", "UPDATE kv SET v = 'eu' WHERE id = 4",
	} {
		id := i + 1
		var ts time.Time
		if id == 3 {
			if _, err := aEU.pool.Exec(ctx, sql); err != nil {
				t.Fatal(err)
			}
			ts = time.Now()
			if err := aEU.pool.QueryRow(ctx, "SELECT pg_xact_commit_timestamp(xmin) FROM prism.tombstones WHERE key = '{\"id\": \"3\"}'").Scan(&ts); err != nil {
				t.Fatal(err)
			}
			local = append(local, &decode.Txn{Origin: "eu", EndLSN: decodeLSN(uint64(5000 + 100*i)), CommitTime: ts,
				Changes: []decode.Change{del(kv, "3", `\N`, `\N`)}})
			continue
		}
		ts = localWrite(t, ctx, aEU.pool, sql, "kv", id)
		local = append(local, &decode.Txn{Origin: "eu", EndLSN: decodeLSN(uint64(5000 + 100*i)), CommitTime: ts,
			Changes: []decode.Change{upd(kv, nil, fmt.Sprint(id), "eu", `\N`)}})
	}
	at := func(d time.Duration) float64 { return now.Add(d).Sub(baseTime).Seconds() }
	batch := []*decode.Txn{
		txn("na", 1100, at(-time.Minute), upd(kv, nil, "1", "na-old", `\N`), upd(kv, nil, "5", "na", `\N`)),
		txn("na", 1200, at(time.Minute), upd(kv, nil, "2", "na-new", `\N`), upd(kv, nil, "3", "na-new", `\N`)),
		txn("na", 1300, at(2*time.Minute), upd(kv, nil, "4", "na-new", `\N`), upd(kv, nil, "6", "na", `\N`)),
	}
	// eu gets na's batch after its own writes; as gets na's transactions
	// one by one, then eu's.
	if n, err := aEU.ApplyBatch(ctx, batch); n != len(batch) || err != nil {
		t.Fatalf("eu ApplyBatch = %d, %v", n, err)
	}
	for _, tx := range batch {
		if err := aAS.Apply(ctx, tx); err != nil {
			t.Fatalf("as Apply na: %v", err)
		}
	}
	for _, tx := range local {
		if err := aAS.Apply(ctx, tx); err != nil {
			t.Fatalf("as Apply eu: %v", err)
		}
	}
	b, r := tableRows(t, ctx, aEU.pool, "kv"), tableRows(t, ctx, aAS.pool, "kv")
	if b != r {
		t.Fatalf("eu:\n%s\nas:\n%s", b, r)
	}
	want := `{"id":1,"v":"eu","n":null,"g":2}` + "\n" + `{"id":2,"v":"na-new","n":null,"g":4}` + "\n" +
		`{"id":3,"v":"na-new","n":null,"g":6}` + "\n" + `{"id":4,"v":"na-new","n":null,"g":8}` + "\n" + `{"id":5,"v":"base","n":null,"g":10}` + "\n" +
		`{"id":6,"v":"na","n":null,"g":12}` + "\n" + `{"id":7,"v":"base","n":null,"g":14}` + "\n" +
		`{"id":8,"v":"base","n":null,"g":16}` + "\n" + `{"id":9,"v":"base","n":null,"g":18}`
	if b != want {
		t.Fatalf("rows:\n%s\nwant:\n%s", b, want)
	}
	// A batch that needs no conflict check goes in one target
	// transaction over the local versions, with the stamps it has where
	// it is applied one by one. A minute later, so that the conflicts of
	// the first batch no longer keep a pair from batching (batchMemo).
	clock.Add(int64(time.Minute))
	batch2 := []*decode.Txn{
		txn("na", 1400, at(3*time.Minute), upd(kv, nil, "1", "na2", `\N`), upd(kv, nil, "7", "na2", `\N`)),
		txn("na", 1500, at(4*time.Minute), upd(kv, nil, "1", "na3", `\N`)),
	}
	if n, err := aEU.ApplyBatch(ctx, batch2); n != len(batch2) || err != nil {
		t.Fatalf("eu ApplyBatch = %d, %v", n, err)
	}
	for _, tx := range batch2 {
		if err := aAS.Apply(ctx, tx); err != nil {
			t.Fatalf("as Apply na: %v", err)
		}
	}
	if got := targets(t, ctx, aEU.pool, "1, 7"); got != "1" {
		t.Fatalf("eu wrote rows 1 and 7 in %s target transactions, want 1", got)
	}
	stamp := `SELECT string_agg(prism.row_stamp('public.kv', jsonb_object(ARRAY['id'], ARRAY[id::text]), xmin)::text, ' ' ORDER BY id) FROM kv WHERE id IN (1, 7)`
	if b, r := queryString(t, ctx, aEU.pool, stamp), queryString(t, ctx, aAS.pool, stamp); b != r {
		t.Fatalf("stamps of rows 1 and 7: eu %s, as %s", b, r)
	}
	if b, r := tableRows(t, ctx, aEU.pool, "kv"), tableRows(t, ctx, aAS.pool, "kv"); b != r {
		t.Fatalf("eu:\n%s\nas:\n%s", b, r)
	}
	// A later local write over a batched row stamps later than it.
	mustExec(t, ctx, eu, "postgres", "UPDATE kv SET v = 'eu2' WHERE id = 7")
	if got := queryString(t, ctx, aEU.pool, "SELECT (prism.row_stamp('public.kv', '{\"id\": \"7\"}', xmin) > $1::timestamptz)::text FROM kv WHERE id = 7", batch2[1].CommitTime); got != "true" {
		t.Fatalf("local write over a batched row stamps later: %s", got)
	}
}

// TestRowStampsUpgrade starts from prism.row_stamps as an earlier version
// made it (one row per key, keyed by jsonb) holding the stamp of a
// version: Setup folds it into prism.batch_stamps and drops it, the stamp
// is still found, and a batch records its stamps next to it.
func TestRowStampsUpgrade(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "stampsup"})
	mustExec(t, ctx, c, "postgres", batchSchema+`
	CREATE SCHEMA prism;
	CREATE TABLE prism.row_stamps (table_name text NOT NULL, key jsonb NOT NULL, xact xid NOT NULL, ts timestamptz NOT NULL, PRIMARY KEY (table_name, key));
	BEGIN;
	UPDATE kv SET v = 'old batch' WHERE id IN (1, 3);
	INSERT INTO prism.row_stamps VALUES ('public.kv', jsonb_object(ARRAY['id'], ARRAY['1']), xid(pg_current_xact_id()), '2001-02-03 04:05:06.789+00'),
		('public.kv', jsonb_object(ARRAY['id'], ARRAY['3']), xid(pg_current_xact_id()), '2001-02-03 04:05:07+00');
	COMMIT;`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	if err := a.ensureSetup(ctx); err != nil {
		t.Fatalf("setup: %v", err)
	}
	if got := queryString(t, ctx, a.pool, `SELECT coalesce(to_regclass('prism.row_stamps')::text, 'gone') || ' ' || count(*) FROM prism.batch_stamps`); got != "gone 1" {
		t.Fatalf("row_stamps after setup, batch_stamps rows = %s, want gone 1", got)
	}
	const stampOf = `SELECT prism.row_stamp('public.kv', jsonb_object(ARRAY['id'], ARRAY[x.id::text]), x.xmin) FROM kv x WHERE x.id = $1::int`
	if got := queryString(t, ctx, a.pool, "SELECT ("+stampOf+")::text", 1); got != "2001-02-03 04:05:06.789+00" {
		t.Fatalf("stamp of the version before the upgrade = %s", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT ("+stampOf+")::text", 3); got != "2001-02-03 04:05:07+00" {
		t.Fatalf("stamp of the other version before the upgrade = %s", got)
	}
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v", "n")
	t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()
	txns := []*decode.Txn{
		txn("na", 1100, t0+1, upd(kv, nil, "1", "a", `\N`)),
		txn("na", 1200, t0+2, upd(kv, nil, "2", "b", `\N`)),
	}
	if n, err := a.ApplyBatch(ctx, txns); n != len(txns) || err != nil {
		t.Fatalf("ApplyBatch = %d, %v", n, err)
	}
	if got := targets(t, ctx, a.pool, "1, 2"); got != "1" {
		t.Fatalf("rows written in %s target transactions, want 1 (a batch)", got)
	}
	for id, want := range map[int]time.Time{1: txns[0].CommitTime, 2: txns[1].CommitTime} {
		var got time.Time
		if err := a.pool.QueryRow(ctx, stampOf, id).Scan(&got); err != nil {
			t.Fatalf("stamp of %d: %v", id, err)
		}
		if want = want.Truncate(time.Microsecond); !got.Equal(want) {
			t.Fatalf("stamp of %d = %s, want %s (its source transaction's)", id, got, want)
		}
	}
}

// TestBatchFailuresRemembered: a source whose batches keep failing (every
// row's local version is newer; two in a row) has its next batch applied
// by rows without trying it; the first batch that commits makes the
// following ones go as batches at once. The rows and the conflicts are those of the
// row path either way, and Stats counts every path and outcome.
func TestBatchFailuresRemembered(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "bmemo"})
	mustExec(t, ctx, c, "postgres", batchSchema)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	// Each step comes a minute after the last: the failures it counts
	// are those in a row, not the recent ones (TestBatchFailuresRecent).
	clock := testClock(a)
	mustExec(t, ctx, c, "postgres", "UPDATE kv SET v = 'local' WHERE id <= 4")
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v", "n")
	old := time.Now().Add(-time.Hour).Sub(baseTime).Seconds()
	t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()
	steps := []struct {
		name    string
		txns    []*decode.Txn
		batches int64  // batches sent so far
		targets string // target transactions that wrote the pair ("": the local version stays)
		stats   Stats  // na's counters so far
	}{
		{"first conflicting pair: tried, rolled back", []*decode.Txn{
			txn("na", 1100, old, upd(kv, nil, "1", "na", `\N`)), txn("na", 1200, old+1, upd(kv, nil, "2", "na", `\N`))}, 1, "", Stats{ByRow: 2, RolledBack: 1}},
		{"second conflicting pair: tried again, rolled back", []*decode.Txn{
			txn("na", 1300, old+2, upd(kv, nil, "3", "na", `\N`)), txn("na", 1400, old+3, upd(kv, nil, "4", "na", `\N`))}, 2, "", Stats{ByRow: 4, RolledBack: 2}},
		{"a pair without conflicts: by rows at once", []*decode.Txn{
			txn("na", 1500, t0, upd(kv, nil, "5", "na", `\N`)), txn("na", 1600, t0+1, upd(kv, nil, "6", "na", `\N`))}, 2, "2", Stats{ByRow: 6, RolledBack: 2, Skipped: 1}},
		{"the next pair: tried, committed", []*decode.Txn{
			txn("na", 1700, t0+2, upd(kv, nil, "7", "na", `\N`)), txn("na", 1800, t0+3, upd(kv, nil, "8", "na", `\N`))}, 3, "1", Stats{ByRow: 6, RolledBack: 2, Skipped: 1, Batches: 1, Batched: 2}},
		{"the next pair: tried at once", []*decode.Txn{
			txn("na", 1900, t0+4, upd(kv, nil, "9", "na", `\N`)), txn("na", 2000, t0+5, ins(kv, "10", "na", `\N`))}, 4, "1", Stats{ByRow: 6, RolledBack: 2, Skipped: 1, Batches: 2, Batched: 4}},
	}
	for _, st := range steps {
		clock.Add(int64(time.Minute))
		applyCounted(t, ctx, a, st.name, st.txns, st.batches, st.stats)
		if st.targets == "" {
			continue
		}
		ids := string(st.txns[0].Changes[0].New[0].Data) + ", " + string(st.txns[1].Changes[0].New[0].Data)
		if got := targets(t, ctx, a.pool, ids); got != st.targets {
			t.Fatalf("%s: written in %s target transactions, want %s", st.name, got, st.targets)
		}
	}
	if got := tableRows(t, ctx, a.pool, "(SELECT id, v FROM kv)"); got != `{"id":1,"v":"local"}`+"\n"+`{"id":10,"v":"na"}`+"\n"+`{"id":2,"v":"local"}`+"\n"+
		`{"id":3,"v":"local"}`+"\n"+`{"id":4,"v":"local"}`+"\n"+`{"id":5,"v":"na"}`+"\n"+`{"id":6,"v":"na"}`+"\n"+`{"id":7,"v":"na"}`+"\n"+
		`{"id":8,"v":"na"}`+"\n"+`{"id":9,"v":"na"}` {
		t.Fatalf("kv = %s", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(key::text || ' ' || kind || ' ' || winner, ', ' ORDER BY id) FROM prism.conflicts"); got !=
		`{"id": "1"} update local, {"id": "2"} update local, {"id": "3"} update local, {"id": "4"} update local` {
		t.Fatalf("conflicts = %s", got)
	}
}

// TestBatchInsertProbesKeys applies batches of inserts into a keyed table
// that then grows to 100,000 rows without new statistics (a backlog of
// inserts into a new table): each batch checks the keys it inserts by
// probes of the key's index, never by a scan of the table for every
// batch, which the plan made while the table was small did and which
// made applying such a backlog quadratic.
func TestBatchInsertProbesKeys(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "bprobe"})
	mustExec(t, ctx, c, "postgres", "CREATE TABLE big (id bigint PRIMARY KEY, customer int, amount numeric, note text, at timestamptz) WITH (autovacuum_enabled = off)")
	// Every session of the applier logs the plan of every statement it
	// runs, also those inside functions and triggers. The log is written
	// before a statement returns; the statistics' seq_scan counter, which
	// a backend flushes at most once a second, would count a scan late or
	// early.
	for _, set := range []string{"session_preload_libraries = 'auto_explain'", "auto_explain.log_min_duration = 0", "auto_explain.log_nested_statements = on"} {
		mustExec(t, ctx, c, "postgres", "ALTER DATABASE postgres SET "+set)
	}
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	big := rel("public", "big", decode.IdentityDefault, "id*", "customer", "amount", "note", "at")
	t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()
	id := 100000
	apply := func(batches int) {
		for b := 0; b < batches; b++ {
			txns := make([]*decode.Txn, 100)
			for i := range txns {
				var cs []decode.Change
				for j := 0; j < 4; j++ {
					id++
					cs = append(cs, ins(big, fmt.Sprint(id), fmt.Sprint(id%1000), fmt.Sprint(id)+".25", "order", "2026-12-03 12:00:00+00"))
				}
				txns[i] = txn("na", uint64(1000+100*id), t0+float64(id)/1e6, cs...)
			}
			if n, err := a.ApplyBatch(ctx, txns); n != len(txns) || err != nil {
				t.Fatalf("ApplyBatch = %d, %v", n, err)
			}
		}
	}
	apply(10)
	mustExec(t, ctx, c, "postgres", "INSERT INTO big SELECT i, i % 1000, i, 'local', now() FROM generate_series(1, 100000) i")
	apply(10)
	log, err := os.ReadFile(c.LogFile())
	if err != nil {
		t.Fatalf("read the server log: %v", err)
	}
	// The plans are logged at all (the check below is not vacuous), and
	// none of them reads big sequentially.
	if n := strings.Count(string(log), "Insert on big"); n < 20 {
		t.Fatalf("the server log shows %d plans that insert into big, want one per batch at least (is auto_explain loaded?)", n)
	}
	for _, plan := range strings.Split(string(log), "plan:") {
		if strings.Contains(plan, "Seq Scan on big") {
			t.Fatalf("a plan reads big sequentially:%s", plan)
		}
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(DISTINCT xmin::text)::text FROM big WHERE id > 100000"); got != "20" {
		t.Fatalf("the inserts were written by %s target transactions, want 20 batches", got)
	}
}

// TestBatchInsertConcurrentInsert: a local transaction inserts a key
// after the batch's snapshot, before the batch inserts it. The batch,
// which no longer uses ON CONFLICT, fails on the unique violation, and
// the row path decides the key: the local row, newer, stays and the
// conflict is recorded; the batch's other changes are applied.
func TestBatchInsertConcurrentInsert(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "binsins"})
	mustExec(t, ctx, c, "postgres", batchSchema)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v", "n")
	// Newer than the rows' versions, older than the local insert below.
	now := time.Now().Sub(baseTime).Seconds()
	txns := []*decode.Txn{txn("na", 1100, now, upd(kv, nil, "2", "na", `\N`)), txn("na", 1200, now, ins(kv, "17", "na", `\N`), ins(kv, "18", "na", `\N`))}
	tx := localTxn(t, ctx, c, "SELECT 1 FROM kv WHERE id = 2 FOR UPDATE")
	done := applyUntilLocked(t, ctx, a, txns)
	if _, err := a.pool.Exec(ctx, "INSERT INTO kv (id, v) VALUES (17, 'local')"); err != nil {
		t.Fatalf("local insert: %v", err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatalf("local rollback: %v", err)
	}
	if r := <-done; r.err != nil {
		t.Fatalf("ApplyBatch: %v", r.err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(id || ' ' || v, ', ' ORDER BY id) FROM kv WHERE id IN (2, 17, 18)"); got != "2 na, 17 local, 18 na" {
		t.Fatalf("rows = %s, want 2 na, 17 local, 18 na", got)
	}
	if got := targets(t, ctx, a.pool, "2, 18"); got != "2" {
		t.Fatalf("rows 2 and 18 written by %s target transactions, want 2 (the row path)", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(key::text || ' ' || kind || ' ' || resolution, ', ' ORDER BY id) FROM prism.conflicts"); got != `{"id": "17"} insert_exists keep_local` {
		t.Fatalf("conflicts = %s, want {\"id\": \"17\"} insert_exists keep_local", got)
	}
}

// TestCompactStamps: the row stamps of a batch stay exact after
// compaction for every version and tombstone still live; the stamp of a
// version replaced since (a local write) is dropped, so is every stamp of
// a table that is gone; a row is checked once, also when the rows are
// compacted one chunk at a time.
func TestCompactStamps(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "compact"})
	// As in a region: schema prism is in the publication, so every table
	// compaction changes needs a replica identity.
	mustExec(t, ctx, c, "postgres", batchSchema+"; CREATE TABLE gone (id int PRIMARY KEY, v text); INSERT INTO gone VALUES (1, 'a'); CREATE PUBLICATION prism FOR ALL TABLES")
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	// A row per chunk: the batch's three rows of stamps (kv's updates,
	// its delete, gone's update) take three.
	a.upkeep = upkeep{marks: 1, stampRows: 1}
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v", "n")
	gone := rel("public", "gone", decode.IdentityDefault, "id*", "v")
	t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()
	txns := []*decode.Txn{
		txn("na", 1100, t0+1, upd(kv, nil, "1", "a", `\N`), upd(kv, nil, "2", "a", `\N`), upd(gone, nil, "1", "b")),
		txn("na", 1200, t0+2, upd(kv, nil, "3", "b", `\N`), del(kv, "4")),
		txn("na", 1300, t0+3, upd(kv, nil, "5", "c", `\N`)),
	}
	if n, err := a.ApplyBatch(ctx, txns); n != len(txns) || err != nil {
		t.Fatalf("ApplyBatch = %d, %v", n, err)
	}
	if got := targets(t, ctx, a.pool, "1, 2, 3, 5"); got != "1" {
		t.Fatalf("rows written in %s target transactions, want 1 (a batch)", got)
	}
	before := stamps(t, ctx, a.pool)
	mustExec(t, ctx, c, "postgres", "UPDATE kv SET v = 'local' WHERE id = 2; DROP TABLE gone")
	if n, err := a.CompactStamps(ctx, time.Hour); n != 0 || err != nil {
		t.Fatalf("CompactStamps(1h) of fresh stamps = %d, %v; want 0", n, err)
	}
	if n, err := a.CompactStamps(ctx, 0); n != 2 || err != nil {
		t.Fatalf("CompactStamps = %d, %v; want 2 (row 2 replaced, table gone)", n, err)
	}
	// Row 2's version is local now; every other stamp is as it was.
	after := stamps(t, ctx, a.pool)
	var kept []string
	for _, l := range strings.Split(before, "\n") {
		if !strings.HasPrefix(l, "row 2 ") {
			kept = append(kept, l)
		}
	}
	if after != strings.Join(kept, "\n") {
		t.Fatalf("stamps after compaction:\n%s\nwant:\n%s", after, strings.Join(kept, "\n"))
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(array_to_string(keys, ' '), ' | ' ORDER BY table_name) FROM prism.batch_stamps WHERE compacted"); got != `{"id": "4"} | {"id": "1"} {"id": "3"} {"id": "5"}` {
		t.Fatalf("stamps kept = %s", got)
	}
	mustExec(t, ctx, c, "postgres", "UPDATE kv SET v = 'local' WHERE id = 1")
	if n, err := a.CompactStamps(ctx, 0); n != 0 || err != nil {
		t.Fatalf("second CompactStamps = %d, %v; want 0 (each row is checked once)", n, err)
	}
}

func TestArrayLiteral(t *testing.T) {
	vs := [][]byte{[]byte("plain"), []byte(`a "quoted" \ back\slash`), nil, []byte(""), []byte(`\`), []byte(`""`), []byte("ünï {x,y}")}
	nulls := []bool{false, false, true, false, false, false, false}
	want := `{"plain","a \"quoted\" \\ back\\slash",NULL,"","\\","\"\"","ünï {x,y}"}`
	if got := string(appendArrayLiteral(nil, vs, nulls)); got != want {
		t.Fatalf("appendArrayLiteral = %s, want %s", got, want)
	}
	if got := string(times([][]byte{[]byte("2025-01-01 00:00:00+00")})); got != `{"2025-01-01 00:00:00+00"}` {
		t.Fatalf("times = %s", got)
	}
	if got := string(appendArrayLiteral(nil, nil, nil)); got != "{}" {
		t.Fatalf("empty array = %s, want {}", got)
	}
}

// TestPlanUndo: a transaction that cannot join a batch after some of its
// changes were folded in (a key inserted over a version, here) leaves
// the plan exactly as the transactions before it made it: keys, their
// order and net changes, rows of tables without a key, new tables.
func TestPlanUndo(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "planundo"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE kv (id int PRIMARY KEY, v text); CREATE TABLE logs (v text); CREATE TABLE other (id int PRIMARY KEY)`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v")
	logs := rel("public", "logs", decode.IdentityDefault, "v")
	other := rel("public", "other", decode.IdentityDefault, "id*")
	txns := []*decode.Txn{
		txn("na", 0x100, 1, ins(kv, "1", "a"), ins(logs, "x")),
		txn("na", 0x200, 2, upd(kv, nil, "1", "b"), ins(kv, "2", "c")),
		txn("na", 0x300, 3, upd(kv, nil, "2", "d"), ins(logs, "y"), ins(other, "7"), ins(kv, "3", "e"), upd(kv, nil, "3", "f"), ins(kv, "1", "g")),
	}
	conn, err := a.pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	fingerprint := func(bp *batchPlan) string {
		var b strings.Builder
		fmt.Fprintf(&b, "rows %d bytes %d tables %v\n", bp.rows, bp.bytes, bp.order)
		for _, name := range bp.order {
			bt := bp.tables[name]
			fmt.Fprintf(&b, "%s: %d appended, keys %v\n", name, len(bt.append), bt.order)
			for _, k := range bt.order {
				r := bt.rows[k]
				fmt.Fprintf(&b, "  %s %v->%v check %s ts %s vals %s\n", k, r.first, r.last, r.check, r.ts, r.vals[len(r.vals)-1].Data)
			}
		}
		if len(bp.tables) != len(bp.order) {
			fmt.Fprintf(&b, "%d tables in the map\n", len(bp.tables))
		}
		// A relation finds only tables the plan has.
		var byRel []string
		for r, bt := range bp.byRel {
			if bp.tables[r.Schema+"."+r.Table] != bt {
				byRel = append(byRel, "stale "+r.Table)
				continue
			}
			byRel = append(byRel, r.Table)
		}
		slices.Sort(byRel)
		fmt.Fprintf(&b, "by relation %v\n", byRel)
		return b.String()
	}
	bp, n := a.plan(ctx, conn.Conn(), txns)
	if n != 2 {
		t.Fatalf("plan took %d transactions, want 2 (the third inserts key 1 over its version)", n)
	}
	want, m := a.plan(ctx, conn.Conn(), txns[:2])
	if m != 2 {
		t.Fatalf("plan of the first two took %d", m)
	}
	if got, w := fingerprint(bp), fingerprint(want); got != w {
		t.Fatalf("plan after the undone third transaction:\n%s\nwant, as after the first two:\n%s", got, w)
	}
}

// TestBatchStatementsKept: a table's array statements are built once per
// relation and group kind and kept with its target, so the next batch
// of the stream takes them as they are; a relation with other columns
// gets statements of its own.
func TestBatchStatementsKept(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "batchkept"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE kv (id int PRIMARY KEY, v text)`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	conn, err := a.pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v")
	keyOnly := rel("public", "kv", decode.IdentityDefault, "id*")
	statements := func(txns ...*decode.Txn) []batchCall {
		t.Helper()
		bp, n := a.plan(ctx, conn.Conn(), txns)
		if n != len(txns) {
			t.Fatalf("plan took %d of %d transactions", n, len(txns))
		}
		calls, err := bp.statements()
		if err != nil {
			t.Fatal(err)
		}
		return calls
	}
	first := statements(txn("na", 0x100, 1, ins(kv, "1", "a")), txn("na", 0x200, 2, upd(kv, nil, "2", "b")))
	second := statements(txn("na", 0x300, 3, ins(kv, "3", "c")), txn("na", 0x400, 4, upd(kv, nil, "4", "d")))
	if len(first) != 2 || len(second) != 2 {
		t.Fatalf("statements: %d and %d, want 2 each (updates, inserts)", len(first), len(second))
	}
	tg, err := a.target(ctx, conn.Conn(), kv, false)
	if err != nil {
		t.Fatal(err)
	}
	for i := range first {
		if first[i].st != second[i].st {
			t.Fatalf("statement %d built again for the second batch", i)
		}
		bt := &batchTable{t: tg, rel: kv}
		built, err := bt.build([]int{groupUpdate, groupInsert}[i])
		if err != nil {
			t.Fatal(err)
		}
		if built.sql != first[i].st.sql || built.name != first[i].st.name {
			t.Fatalf("kept statement %d:\n%s\nwant, built anew:\n%s", i, first[i].st.sql, built.sql)
		}
	}
	other := statements(txn("na", 0x500, 5, upd(keyOnly, nil, "5")), txn("na", 0x600, 6, upd(keyOnly, nil, "6")))
	if len(other) != 1 {
		t.Fatalf("statements of the key-only relation: %d, want 1 (updates)", len(other))
	}
	if other[0].st == first[0].st || other[0].st.sql == first[0].st.sql {
		t.Fatalf("a relation without column v took kv's update statement: %s", other[0].st.sql)
	}
	if strings.Contains(other[0].st.sql, `"v" =`) {
		t.Fatalf("update statement of a relation without column v sets it: %s", other[0].st.sql)
	}
}

// TestBatchAfterRowTriggers: a table with AFTER row triggers that fire on
// applied rows takes part in batches with its inserts, and each source
// row fires them once, with its own values; its updates end a batch
// (they reach the triggers by the row path), and a table with a BEFORE
// or a statement trigger stays out of batches altogether.
func TestBatchAfterRowTriggers(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "batch-triggers"})
	mustExec(t, ctx, c, "postgres", `
		CREATE TABLE fired (tbl text, op text, v text);
		CREATE FUNCTION fire() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			INSERT INTO fired VALUES (TG_TABLE_NAME, TG_OP, CASE WHEN TG_LEVEL = 'ROW' THEN NEW.v END);
			RETURN NEW;
		END $$;
		CREATE TABLE logged (id int PRIMARY KEY, v text);
		CREATE TRIGGER logged_fire AFTER INSERT OR UPDATE ON logged FOR EACH ROW EXECUTE FUNCTION fire();
		ALTER TABLE logged ENABLE ALWAYS TRIGGER logged_fire;
		CREATE TABLE keyless (v text);
		CREATE CONSTRAINT TRIGGER keyless_fire AFTER INSERT ON keyless DEFERRABLE INITIALLY DEFERRED
			FOR EACH ROW EXECUTE FUNCTION fire();
		ALTER TABLE keyless ENABLE REPLICA TRIGGER keyless_fire;
		CREATE TABLE befored (id int PRIMARY KEY, v text);
		CREATE TRIGGER befored_fire BEFORE INSERT ON befored FOR EACH ROW EXECUTE FUNCTION fire();
		ALTER TABLE befored ENABLE ALWAYS TRIGGER befored_fire;
		CREATE TABLE stmt (id int PRIMARY KEY, v text);
		CREATE TRIGGER stmt_fire AFTER INSERT ON stmt FOR EACH STATEMENT EXECUTE FUNCTION fire();
		ALTER TABLE stmt ENABLE ALWAYS TRIGGER stmt_fire;
	`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	logged := rel("public", "logged", decode.IdentityDefault, "id*", "v")
	keyless := rel("public", "keyless", decode.IdentityDefault, "v")
	befored := rel("public", "befored", decode.IdentityDefault, "id*", "v")
	stmt := rel("public", "stmt", decode.IdentityDefault, "id*", "v")
	lsn := uint64(0)
	next := func(changes ...decode.Change) *decode.Txn {
		lsn += 1000
		return txn("na", lsn, float64(lsn)/1000, changes...)
	}
	apply := func(txns []*decode.Txn) Stats {
		t.Helper()
		before := a.Stats()["na"]
		if n, err := a.ApplyBatch(ctx, txns); err != nil || n != len(txns) {
			t.Fatalf("ApplyBatch = %d, %v", n, err)
		}
		after := a.Stats()["na"]
		return Stats{Batched: after.Batched - before.Batched, ByRow: after.ByRow - before.ByRow}
	}
	fired := func() string {
		return queryString(t, ctx, a.pool, "SELECT coalesce(string_agg(tbl || ' ' || op || ' ' || coalesce(v, '-'), ', ' ORDER BY tbl, op, v), '') FROM fired")
	}

	// Inserts of new keys, and of rows without a key: one batch, one
	// firing per source row.
	var txns []*decode.Txn
	var want []string
	for i := 1; i <= 6; i++ {
		v := fmt.Sprintf("v%d", i)
		txns = append(txns, next(ins(logged, strconv.Itoa(i), v), ins(keyless, v)))
		want = append(want, "keyless INSERT "+v, "logged INSERT "+v)
	}
	if st := apply(txns); st.Batched != 6 || st.ByRow != 0 {
		t.Errorf("inserts: %d batched, %d by rows; want 6 batched", st.Batched, st.ByRow)
	}
	sort.Strings(want)
	if got := fired(); got != strings.Join(want, ", ") {
		t.Fatalf("inserts fired\n%s\nwant\n%s", got, strings.Join(want, ", "))
	}

	// An update of the triggered table ends the batch before it: its
	// triggers see it, and the other updates of the same key, by rows.
	mustExec(t, ctx, c, "postgres", "TRUNCATE fired")
	txns = []*decode.Txn{next(ins(logged, "7", "w7")), next(ins(logged, "8", "w8")), next(upd(logged, nil, "7", "u1")),
		next(upd(logged, nil, "7", "u2")), next(ins(logged, "9", "w9"))}
	if st := apply(txns); st.Batched+st.ByRow != 5 || st.ByRow < 2 || st.Batched < 2 {
		t.Errorf("inserts and updates: %d batched, %d by rows; want the two updates by rows, the first inserts batched", st.Batched, st.ByRow)
	}
	if got, want := fired(), "logged INSERT w7, logged INSERT w8, logged INSERT w9, logged UPDATE u1, logged UPDATE u2"; got != want {
		t.Fatalf("inserts and updates fired\n%s\nwant\n%s", got, want)
	}
	if got := tableRows(t, ctx, a.pool, "logged"); !strings.Contains(got, `{"id":7,"v":"u2"}`) {
		t.Errorf("logged = %s, want key 7 at u2", got)
	}

	// BEFORE and statement triggers keep their tables out of batches.
	mustExec(t, ctx, c, "postgres", "TRUNCATE fired")
	txns = nil
	for i := 1; i <= 4; i++ {
		txns = append(txns, next(ins(befored, strconv.Itoa(i), "b"), ins(stmt, strconv.Itoa(i), "s")))
	}
	if st := apply(txns); st.Batched != 0 || st.ByRow != 4 {
		t.Errorf("BEFORE and statement triggers: %d batched, %d by rows; want 4 by rows", st.Batched, st.ByRow)
	}
	if got, want := fired(), "befored INSERT b, befored INSERT b, befored INSERT b, befored INSERT b, stmt INSERT -, stmt INSERT -, stmt INSERT -, stmt INSERT -"; got != want {
		t.Fatalf("BEFORE and statement triggers fired\n%s\nwant\n%s", got, want)
	}
}

// applyCounted applies txns (step name) and checks the batches a sent so
// far and source na's counters.
func applyCounted(t *testing.T, ctx context.Context, a *Applier, name string, txns []*decode.Txn, batches int64, stats Stats) {
	t.Helper()
	if n, err := a.ApplyBatch(ctx, txns); n != len(txns) || err != nil {
		t.Fatalf("%s: ApplyBatch = %d, %v", name, n, err)
	}
	if got := a.batches.Load(); got != batches {
		t.Fatalf("%s: %d batches sent, want %d", name, got, batches)
	}
	if got := a.Stats()["na"]; got != stats {
		t.Fatalf("%s: stats %+v, want %+v", name, got, stats)
	}
}

// testClock makes a's clock (batchMemo's) a value the test moves, in
// unix nanoseconds.
func testClock(a *Applier) *atomic.Int64 {
	var now atomic.Int64
	now.Store(time.Now().UnixNano())
	a.clock = func() time.Time { return time.Unix(0, now.Load()) }
	return &now
}

// TestBatchFailuresRecent: after a batch of a source failed, a run of its
// transactions is batched only when it holds at least 2<<r of them, r
// being its recent failures (halved every batchMemory since the last);
// a batch that commits does not forget them, time does. So in a mesh
// whose hot rows fail a batch now and then, small runs go by rows while
// long ones still batch.
func TestBatchFailuresRecent(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "brecent"})
	mustExec(t, ctx, c, "postgres", batchSchema)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	clock := testClock(a)
	mustExec(t, ctx, c, "postgres", "INSERT INTO kv (id, v) SELECT i, 'base' FROM generate_series(10, 20) i; UPDATE kv SET v = 'local' WHERE id <= 2")
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v", "n")
	old := time.Now().Add(-time.Hour).Sub(baseTime).Seconds()
	t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()
	lsn, key := uint64(1000), 2
	run := func(n int) []*decode.Txn {
		var txns []*decode.Txn
		for i := 0; i < n; i++ {
			lsn, key = lsn+100, key+1
			txns = append(txns, txn("na", lsn, t0+float64(key), upd(kv, nil, strconv.Itoa(key), "na", `\N`)))
		}
		return txns
	}
	steps := []struct {
		name    string
		txns    []*decode.Txn
		after   time.Duration // on the clock since the previous step
		batches int64         // batches sent so far
		stats   Stats         // na's counters so far
	}{
		{"a conflicting pair: tried, rolled back", []*decode.Txn{
			txn("na", 1010, old, upd(kv, nil, "1", "na", `\N`)), txn("na", 1020, old+1, upd(kv, nil, "2", "na", `\N`))},
			0, 1, Stats{ByRow: 2, RolledBack: 1}},
		{"a pair right after: by rows", run(2), 100 * time.Millisecond, 1, Stats{ByRow: 4, RolledBack: 1, Skipped: 1}},
		{"a run of three: by rows", run(3), 100 * time.Millisecond, 1, Stats{ByRow: 7, RolledBack: 1, Skipped: 2}},
		{"a run of four: batched", run(4), 100 * time.Millisecond, 2, Stats{ByRow: 7, RolledBack: 1, Skipped: 2, Batches: 1, Batched: 4}},
		{"a pair after it: still by rows", run(2), 100 * time.Millisecond, 2, Stats{ByRow: 9, RolledBack: 1, Skipped: 3, Batches: 1, Batched: 4}},
		{"a pair a second later: batched", run(2), batchMemory, 3, Stats{ByRow: 9, RolledBack: 1, Skipped: 3, Batches: 2, Batched: 6}},
	}
	for _, st := range steps {
		clock.Add(int64(st.after))
		applyCounted(t, ctx, a, st.name, st.txns, st.batches, st.stats)
	}
	if got, want := queryString(t, ctx, a.pool, "SELECT string_agg(id::text, ',' ORDER BY id) FROM kv WHERE v = 'na'"), "3,4,5,6,7,8,9,10,11,12,13,14,15"; got != want {
		t.Errorf("keys written by na: %s, want %s", got, want)
	}
}

// TestBatchNamedRows: a batch that fails because some of its rows need
// the row path names them, and only their transactions go by rows; the
// runs between them are applied as batches of their own, the second
// failing statement's rows (another table's) named by a batch of its own.
func TestBatchNamedRows(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "bnamed"})
	mustExec(t, ctx, c, "postgres", batchSchema+`
		CREATE TABLE acct (id int PRIMARY KEY, v text);
		INSERT INTO kv (id, v) SELECT i, 'base' FROM generate_series(10, 21) i;
		INSERT INTO acct (id, v) SELECT i, 'base' FROM generate_series(10, 21) i;`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	testClock(a) // the memo's recent failures do not fade during the test
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v", "n")
	acct := rel("public", "acct", decode.IdentityDefault, "id*", "v")
	t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()
	// Region as wrote kv 14 and acct 19 after every transaction below.
	if err := a.Apply(ctx, txn("as", 1000, t0+100, upd(kv, nil, "14", "as", `\N`), upd(acct, nil, "19", "as"))); err != nil {
		t.Fatal(err)
	}
	var txns []*decode.Txn
	for k := 0; k < 12; k++ {
		id := strconv.Itoa(10 + k)
		txns = append(txns, txn("na", uint64(2000+100*k), t0+float64(k), upd(kv, nil, id, "na", `\N`), upd(acct, nil, id, "na")))
	}
	// The first batch (all 12) fails on kv 14 (the 5th transaction's),
	// the first four commit as a batch, the 5th goes by rows; the next
	// batch (the 6th to the 12th) fails on acct 19 (the 10th's), the four
	// before it commit as a batch, the 10th goes by rows; the last two are
	// too few to batch right after two failures (minBatch).
	applyCounted(t, ctx, a, "12 transactions, 2 conflicts", txns, 4, Stats{Batches: 2, Batched: 8, ByRow: 4, RolledBack: 2, Skipped: 1})
	// The two failed batches are expected and applied again by rows: the
	// server logged no ERROR for them (batchSetupSQL).
	if log, err := os.ReadFile(c.LogFile()); err != nil {
		t.Fatalf("server log: %v", err)
	} else if i := strings.Index(string(log), "prism batch:"); i >= 0 {
		line := string(log[strings.LastIndexByte(string(log[:i]), '\n')+1:])
		t.Errorf("the server logged a failed batch: %s", strings.SplitN(line, "\n", 2)[0])
	}
	for _, w := range []struct{ ids, want string }{{"10, 11, 12, 13", "1"}, {"15, 16, 17, 18", "1"}, {"14, 19, 20, 21", "4"}} {
		if got := targets(t, ctx, a.pool, w.ids); got != w.want {
			t.Errorf("kv %s written in %s target transactions, want %s", w.ids, got, w.want)
		}
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(id::text || ' ' || v, ',' ORDER BY id) FROM kv WHERE id >= 10"); got !=
		"10 na,11 na,12 na,13 na,14 as,15 na,16 na,17 na,18 na,19 na,20 na,21 na" {
		t.Errorf("kv = %s", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(id::text || ' ' || v, ',' ORDER BY id) FROM acct"); got !=
		"10 na,11 na,12 na,13 na,14 na,15 na,16 na,17 na,18 na,19 as,20 na,21 na" {
		t.Errorf("acct = %s", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(table_name || ' ' || key::text || ' ' || kind, ', ' ORDER BY id) FROM prism.conflicts"); got !=
		`public.kv {"id": "14"} update, public.acct {"id": "19"} update` {
		t.Errorf("conflicts = %s", got)
	}
	if p, err := a.Progress(ctx, "na"); err != nil || p != txns[11].EndLSN {
		t.Errorf("Progress = %s, %v; want %s", p, err, txns[11].EndLSN)
	}
}

func TestNamedTxns(t *testing.T) {
	txns := []int{0, 0, 2, 5, 5}
	for _, c := range []struct {
		detail string
		want   []int
	}{
		{"rows 1", []int{10}},
		{"rows 4,1,5,2", []int{10, 15}},
		{"rows 3,5", []int{12, 15}},
		{"rows 6", nil},
		{"rows 0", nil},
		{"rows unknown", nil},
		{"rows ", nil},
		{"row 1", nil},
		{"", nil},
	} {
		if got := namedTxns(c.detail, txns, 10); !slices.Equal(got, c.want) {
			t.Errorf("namedTxns(%q) = %v, want %v", c.detail, got, c.want)
		}
	}
}

// TestBatchWorthIt: a run whose batch takes more array statements (one
// per table and operation) than it has transactions plus one goes by
// rows, which costs less there; a longer run of the same transactions is
// batched.
func TestBatchWorthIt(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "bworth"})
	mustExec(t, ctx, c, "postgres", batchSchema+`
		CREATE TABLE acct (id int PRIMARY KEY, v text);
		INSERT INTO acct (id, v) SELECT i, 'base' FROM generate_series(1, 9) i;`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v", "n")
	acct := rel("public", "acct", decode.IdentityDefault, "id*", "v")
	hist := rel("public", "hist", decode.IdentityDefault, "id", "note")
	t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()
	// Four statements a batch: kv's updates, kv's inserts, hist's rows,
	// acct's updates.
	four := func(k int) *decode.Txn {
		id := strconv.Itoa(k)
		return txn("na", uint64(1000+100*k), t0+float64(k), upd(kv, nil, id, "na", `\N`), ins(kv, strconv.Itoa(100+k), "na", `\N`),
			ins(hist, id, "na"), upd(acct, nil, id, "na"))
	}
	applyCounted(t, ctx, a, "a pair", []*decode.Txn{four(1), four(2)}, 0, Stats{ByRow: 2})
	if got := targets(t, ctx, a.pool, "1, 2"); got != "2" {
		t.Fatalf("the pair was written in %s target transactions, want 2", got)
	}
	applyCounted(t, ctx, a, "a run of three", []*decode.Txn{four(3), four(4), four(5)}, 1, Stats{ByRow: 2, Batches: 1, Batched: 3})
	if got := targets(t, ctx, a.pool, "3, 4, 5"); got != "1" {
		t.Fatalf("the run of three was written in %s target transactions, want 1", got)
	}
	// One statement a batch: a pair is batched.
	applyCounted(t, ctx, a, "a pair of one table", []*decode.Txn{
		txn("na", 2000, t0+10, upd(kv, nil, "6", "na", `\N`)), txn("na", 2100, t0+11, upd(kv, nil, "7", "na", `\N`))},
		2, Stats{ByRow: 2, Batches: 2, Batched: 5})
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(id::text || ' ' || v, ',' ORDER BY id) FROM acct WHERE id <= 5"); got != "1 na,2 na,3 na,4 na,5 na" {
		t.Errorf("acct = %s", got)
	}
}

// TestBatchInsertConcurrentInsertNamed: a batch whose insert meets a key
// that a local transaction inserted after the batch's snapshot fails
// with a unique violation, which names no row; the applier then asks
// which of the statement's keys have a row now, and only that key's
// transaction goes by rows: the runs before and after it are batches.
func TestBatchInsertConcurrentInsertNamed(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "binsnamed"})
	mustExec(t, ctx, c, "postgres", batchSchema)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v", "n")
	// Newer than the rows' versions, older than the local insert below.
	now := time.Now().Sub(baseTime).Seconds()
	txns := []*decode.Txn{txn("na", 1000, now, upd(kv, nil, "2", "na", `\N`))}
	for k := 11; k <= 19; k++ {
		txns = append(txns, txn("na", uint64(1000+100*k), now, ins(kv, strconv.Itoa(k), "na", `\N`)))
	}
	tx := localTxn(t, ctx, c, "SELECT 1 FROM kv WHERE id = 2 FOR UPDATE")
	done := applyUntilLocked(t, ctx, a, txns)
	if _, err := a.pool.Exec(ctx, "INSERT INTO kv (id, v) VALUES (15, 'local')"); err != nil {
		t.Fatalf("local insert: %v", err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatalf("local rollback: %v", err)
	}
	if r := <-done; r.n != len(txns) || r.err != nil {
		t.Fatalf("ApplyBatch = %d, %v", r.n, r.err)
	}
	if got, want := a.Stats()["na"], (Stats{Batches: 2, Batched: 9, ByRow: 1, RolledBack: 1}); got != want {
		t.Errorf("stats %+v, want %+v", got, want)
	}
	for _, w := range []struct{ ids, want string }{{"2, 11, 12, 13, 14", "1"}, {"16, 17, 18, 19", "1"}} {
		if got := targets(t, ctx, a.pool, w.ids); got != w.want {
			t.Errorf("kv %s written in %s target transactions, want %s", w.ids, got, w.want)
		}
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(id || ' ' || v, ', ' ORDER BY id) FROM kv WHERE id IN (2, 14, 15, 16)"); got != "2 na, 14 na, 15 local, 16 na" {
		t.Errorf("rows = %s", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(key::text || ' ' || kind || ' ' || resolution, ', ' ORDER BY id) FROM prism.conflicts"); got != `{"id": "15"} insert_exists keep_local` {
		t.Errorf("conflicts = %s", got)
	}
}
