package apply

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestClockFloor runs a region whose clock is behind another's: na's
// writes arrive stamped five minutes ahead, and eu's application then
// writes the same rows. eu's write must stamp later than na's on every
// region (in eu's own database through prism.stamp, and in the commit
// time the decoder ships), so a third region converges on it whichever
// order the two arrive in.
func TestClockFloor(t *testing.T) {
	ctx := testCtx(t)
	eu := pgtest.Start(t, pgtest.Options{Name: "floor-eu"})
	as := pgtest.Start(t, pgtest.Options{Name: "floor-as"})
	schema := "CREATE TABLE kv (id int PRIMARY KEY, v text); INSERT INTO kv VALUES (1, 'base'), (2, 'base');"
	mustExec(t, ctx, eu, "postgres", schema)
	mustExec(t, ctx, as, "postgres", schema)
	aEU := newApplier(t, ctx, eu, "postgres", WithLocalRegion("eu"))
	aAS := newApplier(t, ctx, as, "postgres", WithLocalRegion("as"))
	for _, a := range []*Applier{aEU, aAS} {
		if err := a.Setup(ctx); err != nil {
			t.Fatalf("Setup: %v", err)
		}
	}
	mustExec(t, ctx, eu, "postgres", "CREATE PUBLICATION p FOR TABLE kv")
	mustExec(t, ctx, eu, "postgres", "SELECT pg_create_logical_replication_slot('s', 'pgoutput')")

	future := time.Now().Add(5 * time.Minute).Truncate(time.Microsecond)
	r := rel("public", "kv", decode.IdentityDefault, "id*", "v")
	naUpdate := &decode.Txn{Origin: "na", CommitLSN: 992, EndLSN: 1000, CommitTime: future, Changes: []decode.Change{upd(r, nil, "1", "na")}}
	naDelete := &decode.Txn{Origin: "na", CommitLSN: 1992, EndLSN: 2000, CommitTime: future, Changes: []decode.Change{del(r, "2", `\N`)}}
	for _, tx := range []*decode.Txn{naUpdate, naDelete} {
		if err := aEU.Apply(ctx, tx); err != nil {
			t.Fatalf("apply na on eu: %v", err)
		}
	}
	// eu's application overwrites row 1 (twice: the second time replaces
	// its own version, no new floor) and re-inserts key 2 inside a
	// savepoint (the row's xmin is then a subtransaction's), after na's
	// writes but earlier by the clocks.
	mustExec(t, ctx, eu, "postgres", `BEGIN; UPDATE kv SET v = 'e' WHERE id = 1; UPDATE kv SET v = v || 'u' WHERE id = 1;
		SAVEPOINT s; INSERT INTO kv VALUES (2, 'eu'); RELEASE s; COMMIT`)

	if got := queryString(t, ctx, aEU.pool, "SELECT count(*) || ' floor rows in ' || count(DISTINCT top::text) || ' transaction' FROM prism.clock_floors"); got != "3 floor rows in 1 transaction" {
		t.Fatalf("prism.clock_floors: %s, want 3 rows (row 1's version; key 2's tombstone, recorded for the transaction and its subtransaction) in eu's one local transaction", got)
	}
	for _, id := range []int{1, 2} {
		got := queryString(t, ctx, aEU.pool, "SELECT (prism.stamp(xmin) - $1::timestamptz)::text FROM kv WHERE id = $2", future, id)
		if got != "00:00:00.000001" {
			t.Fatalf("row %d: eu's version stamps %s after na's, want 00:00:00.000001", id, got)
		}
	}

	// A write from a third region whose clock is four minutes ahead is
	// older than eu's version (although later than eu's commit timestamp):
	// it is dropped, which only the floor tells.
	ap := &decode.Txn{Origin: "ap", CommitLSN: 992, EndLSN: 1000, CommitTime: future.Add(-time.Minute), Changes: []decode.Change{upd(r, nil, "1", "ap")}}
	if err := aEU.Apply(ctx, ap); err != nil {
		t.Fatalf("apply ap on eu: %v", err)
	}
	if got := queryString(t, ctx, aEU.pool, "SELECT v FROM kv WHERE id = 1"); got != "eu" {
		t.Fatalf("row 1 on eu after ap's older write: %q, want eu's", got)
	}

	// Decode eu's WAL: na's applied transactions are filtered out, eu's is
	// shipped with the raised commit time.
	rows, err := aEU.pool.Query(ctx, "SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes('s', NULL, NULL, 'proto_version', '1', 'publication_names', 'p', 'messages', 'true')")
	if err != nil {
		t.Fatal(err)
	}
	asm := decode.NewAssembler("eu")
	var local []*decode.Txn
	for rows.Next() {
		var lsnText string
		var data []byte
		if err := rows.Scan(&lsnText, &data); err != nil {
			t.Fatal(err)
		}
		lsn, err := pglogrepl.ParseLSN(lsnText)
		if err != nil {
			t.Fatal(err)
		}
		tx, err := asm.Feed(lsn, data)
		if err != nil {
			t.Fatalf("decode: %v", err)
		}
		if tx != nil {
			local = append(local, tx)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if len(local) != 1 || asm.Filtered() != 2 {
		t.Fatalf("decoded %d local transactions and filtered %d, want 1 and na's 2 (ap's changed nothing)", len(local), asm.Filtered())
	}
	if want := future.Add(time.Microsecond); !local[0].CommitTime.Equal(want) {
		t.Fatalf("eu's transaction ships with commit time %s, want %s (na's plus 1µs)", local[0].CommitTime, want)
	}

	// as receives eu's transaction first, then na's: na's are older now.
	for _, tx := range []*decode.Txn{local[0], naUpdate, naDelete} {
		if err := aAS.Apply(ctx, tx); err != nil {
			t.Fatalf("apply on as: %v", err)
		}
	}
	want := `{"id":1,"v":"eu"}` + "\n" + `{"id":2,"v":"eu"}`
	if gotEU, gotAS := tableRows(t, ctx, aEU.pool, "kv"), tableRows(t, ctx, aAS.pool, "kv"); gotEU != want || gotAS != want {
		t.Fatalf("eu has\n%s\nas has\n%s\nwant both\n%s", gotEU, gotAS, want)
	}
}

// TestTriggersFollowTheKey checks prism.install: triggers on keyed tables
// (also ones created after Setup, through the event trigger), none on a
// table without a key, and their removal when the key goes.
func TestTriggersFollowTheKey(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "install"})
	mustExec(t, ctx, c, "postgres", "CREATE TABLE before_setup (id int PRIMARY KEY); CREATE TABLE nokey (v text)")
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("na"))
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, c, "postgres", `CREATE TABLE after_setup (a int, b text, PRIMARY KEY (a, b));
		CREATE TABLE ri (id int NOT NULL, v text); CREATE UNIQUE INDEX ri_id ON ri (id); ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_id`)
	triggers := func() string {
		return queryString(t, ctx, a.pool, `SELECT string_agg(tgrelid::regclass || '.' || tgname || ':' || tgenabled::text, ' ' ORDER BY tgrelid::regclass::text, tgname)
			FROM pg_trigger WHERE tgname LIKE 'prism\_%'`)
	}
	want := "after_setup.prism_clock:O after_setup.prism_tombstone:A before_setup.prism_clock:O before_setup.prism_tombstone:A " +
		"ri.prism_clock:O ri.prism_tombstone:A"
	if got := triggers(); got != want {
		t.Fatalf("triggers:\n%s\nwant:\n%s", got, want)
	}
	// A delete of a two-column key leaves a tombstone in the applier's key format.
	mustExec(t, ctx, c, "postgres", "INSERT INTO after_setup VALUES (7, 'x'); DELETE FROM after_setup; INSERT INTO ri VALUES (3, 'v'); DELETE FROM ri")
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(table_name || ' ' || key::text, '; ' ORDER BY table_name) FROM prism.tombstones"); got != `public.after_setup {"a": "7", "b": "x"}; public.ri {"id": "3"}` {
		t.Fatalf("tombstones: %s", got)
	}
	mustExec(t, ctx, c, "postgres", "ALTER TABLE ri REPLICA IDENTITY FULL")
	want = "after_setup.prism_clock:O after_setup.prism_tombstone:A before_setup.prism_clock:O before_setup.prism_tombstone:A"
	if got := triggers(); got != want {
		t.Fatalf("after REPLICA IDENTITY FULL, triggers:\n%s\nwant:\n%s", got, want)
	}
}

// TestCollect checks that Collect removes old tombstones and floors only.
func TestCollect(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "collect"})
	mustExec(t, ctx, c, "postgres", "CREATE TABLE kv (id int PRIMARY KEY)")
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("na"))
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, c, "postgres", "INSERT INTO kv VALUES (1), (2); DELETE FROM kv")
	mustExec(t, ctx, c, "postgres", "INSERT INTO prism.clock_floors (xact, top, floor, at) VALUES ('5', '5', now(), now() - interval '8 days'), ('6', '6', now(), now())")
	if tomb, floors, err := a.Collect(ctx, 7*24*time.Hour); err != nil || tomb != 0 || floors != 1 {
		t.Fatalf("Collect(7 days) = %d tombstones, %d floors, %v; want 0, 1", tomb, floors, err)
	}
	time.Sleep(10 * time.Millisecond)
	if tomb, floors, err := a.Collect(ctx, time.Millisecond); err != nil || tomb != 2 || floors != 1 {
		t.Fatalf("Collect(1ms) = %d tombstones, %d floors, %v; want 2, 1", tomb, floors, err)
	}
}

// TestCollectMarks: CollectMarks keeps the key marks that a transaction
// in progress may meet (committed after its snapshot) and deletes those
// committed before every transaction in progress took its snapshot, and
// all once none runs. An applied mark carries the source's commit time,
// here ten minutes behind this server's clock (a region whose clock runs
// ahead): it is kept all the same while a transaction may meet it.
func TestCollectMarks(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "marks"})
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("na"))
	defer a.Close()
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	marks := func() string {
		return queryString(t, ctx, a.pool, "SELECT coalesce(string_agg(h::text, ',' ORDER BY h), '') FROM prism.key_marks")
	}
	mustExec(t, ctx, c, "postgres", "INSERT INTO prism.key_marks (h) VALUES (1)")
	// An apply session of another source, its snapshot taken.
	u, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close(ctx)
	if _, err := u.Exec(ctx, "BEGIN ISOLATION LEVEL REPEATABLE READ"); err != nil {
		t.Fatal(err)
	}
	if _, err := u.Exec(ctx, "SELECT count(*) FROM prism.key_marks"); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, c, "postgres", "INSERT INTO prism.key_marks (h) VALUES (2)")
	// Mark 3, applied from a source whose clock is ten minutes behind.
	mustExec(t, ctx, c, "postgres", `SELECT pg_replication_origin_create('prism_marks');
		SELECT pg_replication_origin_session_setup('prism_marks');
		BEGIN;
		SELECT pg_replication_origin_xact_setup('0/10', now() - interval '10 minutes');
		INSERT INTO prism.key_marks (h) VALUES (3);
		COMMIT;
		SELECT pg_replication_origin_session_reset()`)
	if got := queryString(t, ctx, a.pool, "SELECT (pg_xact_commit_timestamp(xmin) < now() - interval '9 minutes')::text FROM prism.key_marks WHERE h = 3"); got != "true" {
		t.Fatalf("mark 3's commit timestamp is recent (%s): the test does not stand for a source behind this clock", got)
	}
	if n, err := a.CollectMarks(ctx); err != nil || n != 1 || marks() != "2,3" {
		t.Fatalf("CollectMarks while a transaction runs = %d, %v, marks %q; want 1 deleted, marks 2 and 3 (committed after its snapshot) kept", n, err, marks())
	}
	// The running transaction meets marks 2 and 3: its upserts fail.
	for _, h := range []string{"2", "3"} {
		if _, err := u.Exec(ctx, "SAVEPOINT s"); err != nil {
			t.Fatal(err)
		}
		if _, err := u.Exec(ctx, "INSERT INTO prism.key_marks (h) VALUES ("+h+") ON CONFLICT (h) DO UPDATE SET at = EXCLUDED.at"); err == nil || !concurrent(err) {
			t.Fatalf("upsert of mark %s from the older snapshot = %v, want a serialization failure", h, err)
		}
		if _, err := u.Exec(ctx, "ROLLBACK TO SAVEPOINT s"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := u.Exec(ctx, "ROLLBACK"); err != nil {
		t.Fatal(err)
	}
	if n, err := a.CollectMarks(ctx); err != nil || n != 2 || marks() != "" {
		t.Fatalf("CollectMarks with nothing running = %d, %v, marks %q; want marks 2 and 3 deleted", n, err, marks())
	}
}

// TestCollectMarksChunks: CollectMarks deletes a backlog's marks in
// chunks of upkeep.marks, every one of them, pausing between chunks, and
// each chunk is one statement that finds its marks by their tuple ids.
func TestCollectMarksChunks(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "markchunks"})
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("na"))
	defer a.Close()
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	a.upkeep = upkeep{marks: 10, stampRows: 1, pace: 1}
	mustExec(t, ctx, c, "postgres", "INSERT INTO prism.key_marks (h) SELECT g FROM generate_series(1, 25) g")
	n, err := a.CollectMarks(ctx)
	if err != nil || n != 25 {
		t.Fatalf("CollectMarks = %d, %v; want 25", n, err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM prism.key_marks"); got != "0" {
		t.Fatalf("%s marks left, want 0", got)
	}
	rows, err := a.pool.Query(ctx, "EXPLAIN (COSTS OFF) "+strings.NewReplacer("$1", "10").Replace(collectMarksSQL))
	if err != nil {
		t.Fatal(err)
	}
	lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	plan := strings.Join(lines, "\n")
	if !strings.Contains(plan, "Tid Scan on key_marks") {
		t.Fatalf("a chunk does not find its marks by tuple id:\n%s", plan)
	}
}

// TestClockHorizon checks the gate of trigger prism_clock and that the
// application's roles need no rights in schema prism: an apply
// transaction stamped ahead of the local clock raises prism.horizon, and
// a non-superuser's write over that version then records a clock floor;
// one stamped in the past leaves the horizon alone; with the horizon
// below the clock the trigger does not run at all.
func TestClockHorizon(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "horizon"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE kv (id int PRIMARY KEY, v text); INSERT INTO kv VALUES (1, 'base'), (2, 'base'), (3, 'base');
		CREATE ROLE app LOGIN; GRANT ALL ON kv TO app;`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	horizon := func() string {
		return queryString(t, ctx, a.pool, "SELECT (timestamptz 'epoch' + pg_sequence_last_value('prism.horizon') * interval '1 microsecond')::text")
	}
	floors := func() string { return queryString(t, ctx, a.pool, "SELECT count(*)::text FROM prism.clock_floors") }
	asApp := func(sql string) {
		t.Helper()
		if err := c.Exec(ctx, "postgres", "SET ROLE app; "+sql); err != nil {
			t.Fatalf("as role app: %s: %v", sql, err)
		}
	}
	r := rel("public", "kv", decode.IdentityDefault, "id*", "v")

	// A local write with nothing stamped ahead: the trigger is skipped.
	asApp("UPDATE kv SET v = 'app' WHERE id = 3")
	before := horizon()
	past := &decode.Txn{Origin: "na", CommitLSN: 992, EndLSN: 1000, CommitTime: time.Now().Add(-time.Minute), Changes: []decode.Change{upd(r, nil, "2", "na-past")}}
	if err := a.Apply(ctx, past); err != nil {
		t.Fatalf("apply: %v", err)
	}
	if got := horizon(); got != before {
		t.Fatalf("horizon moved from %s to %s for a transaction stamped a minute ago", before, got)
	}

	future := time.Now().Add(5 * time.Minute).Truncate(time.Microsecond)
	ahead := &decode.Txn{Origin: "na", CommitLSN: 1992, EndLSN: 2000, CommitTime: future, Changes: []decode.Change{upd(r, nil, "1", "na")}}
	if err := a.Apply(ctx, ahead); err != nil {
		t.Fatalf("apply: %v", err)
	}
	if got, want := queryString(t, ctx, a.pool, "SELECT (pg_sequence_last_value('prism.horizon') >= (extract(epoch FROM $1::timestamptz) * 1000000)::bigint)::text", future), "true"; got != want {
		t.Fatalf("horizon %s after applying a transaction stamped %s: want at least that", horizon(), future)
	}
	if got := floors(); got != "0" {
		t.Fatalf("%s clock floors before any local write over a version stamped ahead", got)
	}
	// The application's role writes over na's version and deletes a row:
	// the floor and the tombstone are recorded with the trigger owner's
	// rights.
	asApp("UPDATE kv SET v = 'app' WHERE id = 1")
	asApp("DELETE FROM kv WHERE id = 2")
	if got := floors(); got != "1" {
		t.Fatalf("%s clock floors after the application overwrote a version stamped 5 minutes ahead, want 1", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT (prism.stamp(xmin) - $1::timestamptz)::text FROM kv WHERE id = 1", future); got != "00:00:00.000001" {
		t.Fatalf("the application's version stamps %s after na's, want 00:00:00.000001", got)
	}
	if got := queryString(t, ctx, a.pool, `SELECT count(*)::text FROM prism.tombstones WHERE table_name = 'public.kv' AND key = '{"id": "2"}'`); got != "1" {
		t.Fatalf("tombstones of key 2: %s, want 1", got)
	}
	// raise_floor raised the horizon to the floored version's stamp.
	if got := queryString(t, ctx, a.pool, "SELECT (pg_sequence_last_value('prism.horizon') > (extract(epoch FROM $1::timestamptz) * 1000000)::bigint)::text", future); got != "true" {
		t.Fatalf("horizon %s after a floor over %s: want later", horizon(), future)
	}

	// With the horizon below the clock the trigger does not run: the same
	// overwrite records no floor.
	mustExec(t, ctx, c, "postgres", "SELECT setval('prism.horizon', 1)")
	asApp("UPDATE kv SET v = 'app2' WHERE id = 1")
	if got := floors(); got != "1" {
		t.Fatalf("%s clock floors after a write with the horizon below the clock, want still 1 (trigger skipped)", got)
	}
}

// TestBatchStampsCompression: Setup has prism.batch_stamps compress its
// arrays with lz4 on a server that has it (and keeps the default on one
// that does not), and a second Setup leaves that as it is.
func TestBatchStampsCompression(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "stamps-lz4"})
	pool := newPool(t, ctx, c, "postgres")
	want := "l"
	if _, err := pool.Exec(ctx, "CREATE TEMP TABLE probe (v text COMPRESSION lz4)"); err != nil {
		t.Logf("this server has no lz4 (%v): the default stays", err)
		want = ""
	}
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	for i := 0; i < 2; i++ {
		if err := a.Setup(ctx); err != nil {
			t.Fatalf("Setup %d: %v", i+1, err)
		}
		got := queryString(t, ctx, pool, `SELECT string_agg(attname || '=' || attcompression::text, ',' ORDER BY attname)
			FROM pg_attribute WHERE attrelid = 'prism.batch_stamps'::regclass AND attname IN ('keys', 'ts')`)
		if w := "keys=" + want + ",ts=" + want; got != w {
			t.Fatalf("after Setup %d: compression %q, want %q", i+1, got, w)
		}
	}
}

// TestClockTriggerUpgraded: Setup replaces a prism_clock trigger whose
// WHEN test is written out (as versions before prism.clock_due made it)
// with the call of prism.clock_due, and a prism_tombstone that calls
// prism_clock's function with one calling a function of its own, unless
// a transaction holds the table (then at a later Setup); it leaves
// current ones as they are and creates a missing one.
func TestClockTriggerUpgraded(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "clock-upgrade"})
	mustExec(t, ctx, c, "postgres", "CREATE TABLE kv (id int PRIMARY KEY, v text)")
	var logs bytes.Buffer
	a := NewApplier(newPool(t, ctx, c, "postgres"), zerolog.New(&logs), WithLocalRegion("eu"))
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	def := func() (string, string) {
		return queryString(t, ctx, a.pool, "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'kv'::regclass AND tgname = 'prism_clock'"),
			queryString(t, ctx, a.pool, "SELECT oid::text FROM pg_trigger WHERE tgrelid = 'kv'::regclass AND tgname = 'prism_clock'")
	}
	current, oid := def()
	if !strings.Contains(current, "WHEN (prism.clock_due())") {
		t.Fatalf("prism_clock after Setup: %s; want WHEN (prism.clock_due())", current)
	}
	fn := queryString(t, ctx, a.pool, "SELECT tgfoid::regproc::text FROM pg_trigger WHERE tgrelid = 'kv'::regclass AND tgname = 'prism_clock'")
	// Event trigger prism_install would install the current triggers at
	// once (ALTER TABLE): it does not fire in replica mode.
	mustExec(t, ctx, c, "postgres", `SET session_replication_role = replica; DROP TRIGGER prism_clock ON kv;
		CREATE TRIGGER prism_clock BEFORE INSERT OR UPDATE OR DELETE ON kv FOR EACH ROW
			WHEN (pg_catalog.current_setting('prism.applying', true) IS DISTINCT FROM 'on'
				AND pg_catalog.pg_sequence_last_value('prism.horizon'::regclass) >= (extract(epoch FROM pg_catalog.clock_timestamp()) * 1000000)::bigint)
			EXECUTE FUNCTION `+fn+`();
		CREATE OR REPLACE TRIGGER prism_tombstone AFTER DELETE ON kv FOR EACH ROW EXECUTE FUNCTION `+fn+`();
		ALTER TABLE kv ENABLE ALWAYS TRIGGER prism_tombstone;`)
	tomb := func() string {
		return queryString(t, ctx, a.pool, "SELECT tgfoid::regproc::text || ' ' || tgenabled::text FROM pg_trigger WHERE tgrelid = 'kv'::regclass AND tgname = 'prism_tombstone'")
	}
	// A transaction that wrote the table holds it: Setup waits a second
	// for its lock, keeps the earlier trigger, and finishes.
	busy, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close(context.Background())
	tx, err := busy.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "INSERT INTO kv VALUES (1, 'busy')"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("Setup while a transaction holds kv: %v", err)
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Fatalf("Setup took %s while a transaction held kv", took)
	}
	if got, _ := def(); strings.Contains(got, "clock_due") {
		t.Fatalf("prism_clock replaced while a transaction held kv: %s", got)
	}
	if got := tomb(); got != fn+" A" {
		t.Fatalf("prism_tombstone replaced while a transaction held kv: %s", got)
	}
	if !strings.Contains(logs.String(), `"tables":1,"message":"conflict triggers kept as an earlier version made them`) {
		t.Fatalf("Setup did not warn of the triggers it kept; logs:\n%s", logs.String())
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("second Setup: %v", err)
	}
	if got, _ := def(); got != current {
		t.Fatalf("prism_clock with the written-out test after Setup:\n%s\nwant\n%s", got, current)
	}
	// prism_tombstone calls a function of its own now, still on applied
	// deletes too (ENABLE ALWAYS), and writes the tombstone.
	if got, want := tomb(), "prism.tombstone_"+queryString(t, ctx, a.pool, "SELECT 'kv'::regclass::oid::text")+" A"; got != want {
		t.Fatalf("prism_tombstone after Setup: %s, want %s", got, want)
	}
	mustExec(t, ctx, c, "postgres", "DELETE FROM kv WHERE id = 1")
	if got := queryString(t, ctx, a.pool, `SELECT string_agg(key::text, ',') FROM prism.tombstones WHERE table_name = 'public.kv'`); got != `{"id": "1"}` {
		t.Fatalf("tombstones of kv after a delete: %s", got)
	}
	_, upgraded := def()
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("third Setup: %v", err)
	}
	if _, again := def(); again != upgraded || upgraded == oid {
		t.Fatalf("trigger oids: first %s, upgraded %s, after another Setup %s; want the upgraded one kept", oid, upgraded, again)
	}
	// A missing trigger is created.
	mustExec(t, ctx, c, "postgres", "DROP TRIGGER prism_clock ON kv")
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("Setup without the trigger: %v", err)
	}
	if got, _ := def(); got != current {
		t.Fatalf("prism_clock after Setup created it: %s; want %s", got, current)
	}
}

// TestSecurityDefinerSearchPath: prism-cdc's SECURITY DEFINER functions
// (prism.clock_due, the conflict triggers' functions, the schema change
// capture) run as their owner whatever role writes, so none may call a
// function or operator that the writing role put in a schema before
// pg_catalog: the role would run it with the owner's rights.
func TestSecurityDefinerSearchPath(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "definer-path"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE kv (id int PRIMARY KEY, v text); INSERT INTO kv VALUES (1, 'base'), (2, 'base'), (3, 'base');
		CREATE ROLE app LOGIN; GRANT ALL ON kv TO app; CREATE SCHEMA evil AUTHORIZATION app;`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"), WithDDL(true))
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	// The operators these functions use, for the types they use them on,
	// taken over in schema evil: called, each says who it runs as.
	var evil strings.Builder
	evil.WriteString("SET ROLE app; SET prism.ddl = 'local';")
	for i, op := range []struct{ name, typ, ret string }{
		{"=", "text", "boolean"}, {"<>", "text", "boolean"}, {"=", "xid", "boolean"}, {">=", "bigint", "boolean"},
		{">=", "timestamptz", "boolean"}, {"<", "timestamptz", "boolean"}, {"*", "numeric", "numeric"}, {"~", "text", "boolean"},
		{"~~", "text", "boolean"}, {">", "integer", "boolean"}, {"<>", "integer", "boolean"},
	} {
		fmt.Fprintf(&evil, `CREATE FUNCTION evil.f%d(a %s, b %s) RETURNS %s LANGUAGE plpgsql AS $$
			BEGIN RAISE EXCEPTION 'operator %s of schema evil called as %%', current_user; END $$;
			CREATE OPERATOR evil.%s (FUNCTION = evil.f%d, LEFTARG = %s, RIGHTARG = %s);`, i, op.typ, op.typ, op.ret, op.name, op.name, i, op.typ, op.typ)
	}
	// And a function the tombstones' key is built with.
	evil.WriteString(`CREATE FUNCTION evil.jsonb_object(a text[], b text[]) RETURNS jsonb LANGUAGE plpgsql AS $$
		BEGIN RAISE EXCEPTION 'function jsonb_object of schema evil called as %', current_user; END $$;`)
	mustExec(t, ctx, c, "postgres", evil.String())
	app, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(context.Background())
	// One statement a query: the capture refuses a schema change sent with
	// others.
	asApp := func(sql string) {
		t.Helper()
		if _, err := app.Exec(ctx, sql); err != nil {
			t.Fatalf("as role app with schema evil first: %s: %v", sql, err)
		}
	}
	asApp("SET ROLE app")
	asApp("SET search_path = evil, pg_catalog, public")
	asApp("UPDATE kv SET v = 'app' WHERE id = 1")
	asApp("INSERT INTO kv VALUES (10, 'app')")
	asApp("DELETE FROM kv WHERE id = 10")
	// With the horizon ahead the triggers' functions run in full.
	mustExec(t, ctx, c, "postgres", "SELECT setval('prism.horizon', (extract(epoch FROM now() + interval '1 hour') * 1000000)::bigint)")
	asApp("UPDATE kv SET v = 'app' WHERE id = 2")
	asApp("INSERT INTO kv VALUES (11, 'app')")
	asApp("DELETE FROM kv WHERE id = 3")
	// Schema changes of the role's own schema go through the capture.
	asApp("CREATE TABLE evil.t (id int PRIMARY KEY, v text)")
	asApp("ALTER TABLE evil.t RENAME COLUMN v TO w")
	asApp("ALTER TABLE evil.t DROP COLUMN w")
	asApp("DROP TABLE evil.t")
	// The capture gives the session its search_path back.
	var path string
	if err := app.QueryRow(ctx, "SHOW search_path").Scan(&path); err != nil || path != "evil, pg_catalog, public" {
		t.Fatalf("search_path after the schema changes: %q, %v; want the session's", path, err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM prism.tombstones WHERE table_name = 'public.kv'"); got != "2" {
		t.Fatalf("%s tombstones of kv, want 2 (keys 10 and 3)", got)
	}
	// Every one of them has a search_path of its own: one that ran with
	// the caller's would also be planned again whenever a session wrote
	// under another search_path than before (an application's trigger
	// function with a SET clause), and the triggers' run at every write.
	// (prism.ddl_capture reads the caller's, which the change travels
	// with, and sets pg_catalog's itself before anything else.)
	if got := queryString(t, ctx, a.pool, `SELECT coalesce(string_agg(p.oid::regprocedure::text, ', ' ORDER BY p.proname), '')
		FROM pg_proc p WHERE p.pronamespace = 'prism'::regnamespace AND p.prosecdef AND p.proname <> 'ddl_capture'
		AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)`); got != "" {
		t.Fatalf("SECURITY DEFINER functions of schema prism without search_path pg_catalog, pg_temp: %s", got)
	}
}

// TestTriggerFunctionsOfDroppedTables: Setup drops the trigger functions
// of a dropped table and keeps those of the tables that are there.
func TestTriggerFunctionsOfDroppedTables(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "dropped-fns"})
	mustExec(t, ctx, c, "postgres", "CREATE TABLE kept (id int PRIMARY KEY); CREATE TABLE gone (id int PRIMARY KEY)")
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	fns := func() string {
		return queryString(t, ctx, a.pool, `SELECT string_agg(f, ',' ORDER BY f) FROM (
			SELECT regexp_replace(p.proname, '[0-9]+$', '') || coalesce(c.relname, '?') AS f
			FROM pg_proc p LEFT JOIN pg_class c ON c.oid = substring(p.proname FROM '[0-9]+$')::oid
			WHERE p.pronamespace = 'prism'::regnamespace AND p.proname ~ '^(clock|tombstone)_[0-9]+$') x`)
	}
	if got, want := fns(), "clock_gone,clock_kept,tombstone_gone,tombstone_kept"; got != want {
		t.Fatalf("trigger functions after Setup: %s, want %s", got, want)
	}
	mustExec(t, ctx, c, "postgres", "DROP TABLE gone")
	if got, want := fns(), "clock_?,clock_kept,tombstone_?,tombstone_kept"; got != want {
		t.Fatalf("trigger functions after DROP TABLE: %s, want %s", got, want)
	}
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("second Setup: %v", err)
	}
	if got, want := fns(), "clock_kept,tombstone_kept"; got != want {
		t.Fatalf("trigger functions after the next Setup: %s, want %s", got, want)
	}
}

// TestInstallForApplicationRoles: a table that an application role
// creates while a node runs gets its conflict triggers at once from
// event trigger prism_install, although the role has no rights on
// schema prism and prism-cdc's own role is no superuser either (a
// superuser created the event trigger, as doctor says): they are
// installed with the rights of prism-cdc's role, which owns their
// functions as it owns every other table's, and they work for the
// application's writes.
func TestInstallForApplicationRoles(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "install-roles"})
	mustExec(t, ctx, c, "postgres", `CREATE ROLE app LOGIN; CREATE SCHEMA s AUTHORIZATION app;
		CREATE ROLE prism LOGIN; GRANT app TO prism; GRANT CREATE ON DATABASE postgres TO prism;
		GRANT SET ON PARAMETER session_replication_role TO prism;
		GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_session_setup(text),
			pg_replication_origin_session_reset(), pg_replication_origin_session_progress(boolean),
			pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone),
			pg_replication_origin_progress(text, boolean) TO prism;`)
	pool, err := NewPool(ctx, strings.Replace(c.DSN("postgres"), "user=postgres", "user=prism", 1))
	if err != nil {
		t.Fatalf("pool: %v", err)
	}
	defer pool.Close()
	a := NewApplier(pool, zerolog.Nop(), WithLocalRegion("eu"))
	defer a.Close()
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("Setup as a role that is no superuser: %v", err)
	}
	mustExec(t, ctx, c, "postgres", eventTriggerSQL)

	cfg, err := pgx.ParseConfig(strings.Replace(c.DSN("postgres"), "user=postgres", "user=app", 1))
	if err != nil {
		t.Fatal(err)
	}
	var notices []string
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { notices = append(notices, n.Severity+": "+n.Message) }
	app, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(context.Background())
	for _, sql := range []string{
		"CREATE TABLE s.t (id int PRIMARY KEY, v text)",
		"INSERT INTO s.t VALUES (1, 'a'), (2, 'b')",
		"DELETE FROM s.t WHERE id = 1",
	} {
		if _, err := app.Exec(ctx, sql); err != nil {
			t.Fatalf("as role app: %s: %v", sql, err)
		}
	}
	if len(notices) != 0 {
		t.Fatalf("notices to role app: %q, want none", notices)
	}
	su := newPool(t, ctx, c, "postgres")
	if got := queryString(t, ctx, su, `SELECT string_agg(t.tgname || ':' || pg_get_userbyid(p.proowner), ',' ORDER BY t.tgname)
		FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid WHERE t.tgrelid = 's.t'::regclass`); got != "prism_clock:prism,prism_tombstone:prism" {
		t.Fatalf("triggers on s.t (name:function owner) = %s, want prism_clock:prism,prism_tombstone:prism", got)
	}
	if got := queryString(t, ctx, su, "SELECT string_agg(key::text, ',') FROM prism.tombstones WHERE table_name = 's.t'"); got != `{"id": "1"}` {
		t.Fatalf("tombstones of s.t = %s, want the deleted key 1", got)
	}

	// A table of a role prism-cdc's role is not a member of gets no
	// triggers (a WARNING to whoever created it), and the next start
	// fails at once saying why and what to do.
	mustExec(t, ctx, c, "postgres", "CREATE TABLE su (id int PRIMARY KEY)")
	if got := queryString(t, ctx, su, "SELECT count(*)::text FROM pg_trigger WHERE tgrelid = 'su'::regclass"); got != "0" {
		t.Fatalf("%s triggers on the superuser's table, want none", got)
	}
	// A running node cannot install them either, and says so.
	if installed, denied, err := a.InstallMissing(ctx); err != nil || installed != 0 || denied != 1 {
		t.Fatalf("InstallMissing with the superuser's table = %d, %d, %v; want 0 installed, 1 denied", installed, denied, err)
	}
	start := time.Now()
	err = NewApplier(pool, zerolog.Nop(), WithLocalRegion("eu")).Setup(ctx)
	if err == nil || !strings.Contains(err.Error(), "table su (SQLSTATE 42501)") || !strings.Contains(err.Error(), "OWNER TO") || time.Since(start) > 10*time.Second {
		t.Fatalf("Setup with a table prism-cdc's role cannot alter = %v after %s, want the privilege error with its fix, at once", err, time.Since(start))
	}
}

// TestInstallMissing: without event trigger prism_install (prism-cdc's
// role is no superuser and nobody created it), a running node installs
// the conflict triggers on a table created since its start
// (InstallMissing) instead of at its next start; it leaves a table
// without a key alone, and a table whose lock a transaction holds for the
// next call, without making the application's writes queue behind it.
// It installs them again on a table whose key column was renamed.
func TestInstallMissing(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "install-missing"})
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"), WithDDL(true))
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	// One statement a query: the capture refuses a schema change sent
	// with others.
	for _, sql := range []string{"DROP EVENT TRIGGER prism_install", "CREATE TABLE later (id int PRIMARY KEY, v text)",
		"CREATE TABLE busy (id int PRIMARY KEY)", "CREATE TABLE nokey (v text)"} {
		mustExec(t, ctx, c, "postgres", sql)
	}
	pool := newPool(t, ctx, c, "postgres")
	triggers := func(table string) string {
		return queryString(t, ctx, pool, "SELECT coalesce(string_agg(tgname, ',' ORDER BY tgname), '') FROM pg_trigger WHERE tgrelid = $1::regclass", table)
	}
	if got := triggers("later"); got != "" {
		t.Fatalf("triggers on a table created without the event trigger = %q, want none yet", got)
	}

	// A transaction that wrote busy keeps its lock.
	writer, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Rollback(ctx)
	if _, err := writer.Exec(ctx, "INSERT INTO busy VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	installed, denied, err := a.InstallMissing(ctx)
	if err != nil || installed != 1 || denied != 0 {
		t.Fatalf("InstallMissing = %d, %d, %v; want 1 table installed (busy's lock is held)", installed, denied, err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("InstallMissing took %s with busy locked, want about the 1 s lock timeout", d)
	}
	if got := triggers("later"); got != "prism_clock,prism_tombstone" {
		t.Fatalf("triggers on later = %q, want prism_clock,prism_tombstone", got)
	}
	if got := triggers("busy") + triggers("nokey"); got != "" {
		t.Fatalf("triggers on busy and nokey = %q, want none", got)
	}
	// Its own schema changes are not the application's (the capture,
	// event trigger prism_ddl, would refuse its CREATE FUNCTION), and the
	// table works: a delete leaves a tombstone.
	mustExec(t, ctx, c, "postgres", "INSERT INTO later VALUES (1, 'a')")
	mustExec(t, ctx, c, "postgres", "DELETE FROM later")
	if got := queryString(t, ctx, pool, "SELECT count(*)::text FROM prism.tombstones WHERE table_name = 'public.later'"); got != "1" {
		t.Fatalf("%s tombstones of later, want 1", got)
	}

	if err := writer.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if installed, denied, err := a.InstallMissing(ctx); err != nil || installed != 1 || denied != 0 {
		t.Fatalf("InstallMissing once busy is free = %d, %d, %v; want 1", installed, denied, err)
	}
	if got := triggers("busy"); got != "prism_clock,prism_tombstone" {
		t.Fatalf("triggers on busy = %q, want prism_clock,prism_tombstone", got)
	}
	if installed, denied, err := a.InstallMissing(ctx); err != nil || installed != 0 || denied != 0 {
		t.Fatalf("InstallMissing with nothing missing = %d, %d, %v; want 0, 0", installed, denied, err)
	}

	// A key column renamed: the triggers' functions name the old column,
	// so every delete fails until they are installed again.
	mustExec(t, ctx, c, "postgres", "ALTER TABLE later RENAME COLUMN id TO key")
	mustExec(t, ctx, c, "postgres", "INSERT INTO later VALUES (2, 'b')")
	if err := c.Exec(ctx, "postgres", "DELETE FROM later WHERE key = 2"); err == nil || !strings.Contains(err.Error(), "42703") {
		t.Fatalf("DELETE after the key column's rename = %v, want 42703 from the stale trigger function", err)
	}
	if installed, denied, err := a.InstallMissing(ctx); err != nil || installed != 1 || denied != 0 {
		t.Fatalf("InstallMissing after the key column's rename = %d, %d, %v; want 1", installed, denied, err)
	}
	mustExec(t, ctx, c, "postgres", "DELETE FROM later WHERE key = 2")
	if got := queryString(t, ctx, pool, "SELECT key::text FROM prism.tombstones WHERE table_name = 'public.later' AND key ? 'key'"); got != `{"key": "2"}` {
		t.Fatalf("tombstone of the delete after the rename = %s, want {\"key\": \"2\"}", got)
	}
	if installed, _, err := a.InstallMissing(ctx); err != nil || installed != 0 {
		t.Fatalf("InstallMissing once more = %d, %v; want 0", installed, err)
	}
}
