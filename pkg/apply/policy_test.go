package apply

import (
	"bytes"
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

func TestMarshalChangesRoundTrip(t *testing.T) {
	r := rel("public", "t", decode.IdentityFull, "id", "v", "b")
	other := rel("s", "u", decode.IdentityDefault, "k*", "w")
	bin := []decode.Value{{Kind: decode.ValueText, Data: []byte("1")}, {Kind: decode.ValueBinary, Data: []byte{0, 1, 0xff}}, {Kind: decode.ValueNull}}
	changes := []decode.Change{
		ins(r, "1", `a "quoted" ü`, `\N`),
		upd(r, vals("1", "a", `\N`), "1", `\U`, "x"),
		del(other, "7", `\N`),
		{Op: decode.OpInsert, Rel: r, New: bin},
		{Op: decode.OpTruncate, Rel: r, Truncated: []*decode.Relation{r, other}, TruncateFlags: decode.TruncateCascade},
	}
	data, err := MarshalChanges(changes)
	if err != nil {
		t.Fatalf("MarshalChanges = %v", err)
	}
	if !bytes.Contains(data, []byte(`"table":"public.t"`)) || !bytes.Contains(data, []byte(`"op":"UPDATE"`)) {
		t.Errorf("MarshalChanges = %s, want readable op and table", data)
	}
	got, err := UnmarshalChanges(data)
	if err != nil {
		t.Fatalf("UnmarshalChanges(%s) = %v", data, err)
	}
	if len(got) != len(changes) {
		t.Fatalf("UnmarshalChanges: %d changes, want %d", len(got), len(changes))
	}
	for i := range changes {
		w, g := changes[i], got[i]
		if g.Op != w.Op || !reflect.DeepEqual(g.Old, w.Old) || !reflect.DeepEqual(g.New, w.New) || g.TruncateFlags != w.TruncateFlags {
			t.Errorf("change %d = %+v, want %+v", i, g, w)
		}
		if w.Rel != nil && (g.Rel == nil || g.Rel.Schema != w.Rel.Schema || g.Rel.Table != w.Rel.Table ||
			g.Rel.ReplicaIdentity != w.Rel.ReplicaIdentity || !reflect.DeepEqual(g.Rel.Columns, w.Rel.Columns)) {
			t.Errorf("change %d relation = %+v, want %+v", i, g.Rel, w.Rel)
		}
		if len(g.Truncated) != len(w.Truncated) {
			t.Errorf("change %d truncated %d tables, want %d", i, len(g.Truncated), len(w.Truncated))
		}
	}
	if _, err := UnmarshalChanges([]byte(`[{"op":"MERGE"}]`)); err == nil {
		t.Errorf("UnmarshalChanges(MERGE) = nil, want an error")
	}
}

func TestParkRetryAndSkip(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "park"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL);
		CREATE UNIQUE INDEX users_email ON users (email);
		INSERT INTO users VALUES (1, 'dup@example.com');`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	users := rel("public", "users", decode.IdentityDefault, "id*", "email")

	bad := txn("na", 0x1000, 1, ins(users, "2", "dup@example.com"))
	bad.Xid = 777
	err := a.Apply(ctx, bad)
	var ae *Error
	if !errors.As(err, &ae) || ae.Retryable || ae.SQLState != "23505" || ae.Table != "public.users" {
		t.Fatalf("Apply(duplicate) = %v, want a permanent 23505 on public.users", err)
	}
	parked, err := a.Park(ctx, bad, err, StatusParked)
	if err != nil || !parked {
		t.Fatalf("Park = %v, %v; want true, nil", parked, err)
	}
	if p, _ := a.Progress(ctx, "na"); p != bad.EndLSN {
		t.Fatalf("progress after Park = %s, want %s", p, bad.EndLSN)
	}
	// A redelivery is skipped; parking it again does nothing.
	if err := a.Apply(ctx, bad); err != nil {
		t.Fatalf("Apply(parked again) = %v, want nil (already past)", err)
	}
	if parked, err := a.Park(ctx, bad, errors.New("again"), StatusParked); err != nil || parked {
		t.Fatalf("Park(again) = %v, %v; want false, nil", parked, err)
	}
	dls, err := a.DeadLetters(ctx, "", StatusParked)
	if err != nil || len(dls) != 1 {
		t.Fatalf("DeadLetters = %v, %v; want one", dls, err)
	}
	d := dls[0]
	if d.SourceRegion != "na" || d.EndLSN != bad.EndLSN || d.Xid != 777 || d.SQLState != "23505" || d.Table != "public.users" ||
		!strings.Contains(d.Message, "Key (email)=(dup@example.com) already exists") || !strings.Contains(string(d.Changes), `"email": "dup@example.com"`) {
		t.Fatalf("dead letter = %+v changes %s", d, d.Changes)
	}

	// Retry before the fix fails again and stays parked.
	if err := a.Retry(ctx, d.ID); err == nil {
		t.Fatalf("Retry before the fix = nil, want the unique violation")
	}
	dls, _ = a.DeadLetters(ctx, "na")
	if len(dls) != 1 || dls[0].Status != StatusParked || dls[0].Attempts != 2 || dls[0].RetriedAt == nil {
		t.Fatalf("after a failed retry: %+v, want parked with 2 attempts", dls[0])
	}
	mustExec(t, ctx, c, "postgres", "DROP INDEX users_email")
	if err := a.Retry(ctx, d.ID); err != nil {
		t.Fatalf("Retry after the fix = %v", err)
	}
	pool := a.pool
	if got := tableRows(t, ctx, pool, "users"); got != `{"id":1,"email":"dup@example.com"}`+"\n"+`{"id":2,"email":"dup@example.com"}` {
		t.Fatalf("users after retry = %s", got)
	}
	// The retried row carries the source's origin and commit time, so it
	// is not shipped again and conflicts compare the right version.
	if got := queryString(t, ctx, pool, `SELECT o.roname || ' ' || (c.timestamp = $1) FROM users u,
		pg_xact_commit_timestamp_origin(u.xmin) c JOIN pg_replication_origin o ON o.roident = c.roident WHERE u.id = 2`, bad.CommitTime); got != "prism_na true" {
		t.Fatalf("retried row origin and commit time = %s, want prism_na true", got)
	}
	if err := a.Retry(ctx, d.ID); err == nil {
		t.Fatalf("Retry(already retried) = nil, want an error")
	}
	if p, _ := a.Progress(ctx, "na"); p != bad.EndLSN {
		t.Fatalf("progress after Retry = %s, want %s", p, bad.EndLSN)
	}

	// Halt, then skip.
	mustExec(t, ctx, c, "postgres", "CREATE UNIQUE INDEX users_email ON users (id, email); ALTER TABLE users ADD CHECK (email <> 'bad')")
	next := txn("na", 0x2000, 2, ins(users, "3", "bad"))
	later := txn("na", 0x3000, 3, ins(users, "4", "good"))
	err = a.Apply(ctx, next)
	if err == nil {
		t.Fatalf("Apply(check violation) = nil")
	}
	if err := a.RecordHalt(ctx, next, err); err != nil {
		t.Fatalf("RecordHalt = %v", err)
	}
	if err := a.RecordHalt(ctx, next, err); err != nil {
		t.Fatalf("RecordHalt(again) = %v", err)
	}
	if err := a.Skip(ctx, "na", later.EndLSN, ""); !errors.Is(err, ErrNotHalted) {
		t.Fatalf("Skip(not the halted txn) = %v, want ErrNotHalted", err)
	}
	if err := a.Skip(ctx, "na", next.EndLSN, "operator"); err != nil {
		t.Fatalf("Skip = %v", err)
	}
	if p, _ := a.Progress(ctx, "na"); p != next.EndLSN {
		t.Fatalf("progress after Skip = %s, want %s", p, next.EndLSN)
	}
	if err := a.Skip(ctx, "na", next.EndLSN, ""); !errors.Is(err, ErrNotHalted) {
		t.Fatalf("Skip(twice) = %v, want ErrNotHalted", err)
	}
	if err := a.Apply(ctx, later); err != nil {
		t.Fatalf("Apply(after skip) = %v", err)
	}
	dls, _ = a.DeadLetters(ctx, "na", StatusSkipped)
	if len(dls) != 1 || dls[0].EndLSN != next.EndLSN || dls[0].Attempts != 2 || dls[0].Note != "operator" {
		t.Fatalf("skipped dead letters = %+v", dls)
	}
	if got := queryString(t, ctx, pool, "SELECT count(*)::text FROM users WHERE id = 3"); got != "0" {
		t.Fatalf("skipped row present: count %s", got)
	}
}

func TestUndo(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "undo"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE items (id int PRIMARY KEY, v text, n numeric);
		ALTER TABLE items REPLICA IDENTITY FULL;
		INSERT INTO items VALUES (1, 'one-new', 1.50), (3, 'three', NULL), (10, 'ten', 10);`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("na"))
	pool := a.pool
	items := rel("public", "items", decode.IdentityFull, "id", "v", "n")

	// The transaction (as decoded): inserted 3, updated 1, deleted 2.
	orig := txn("na", 0x5000, 1,
		ins(items, "3", "three", `\N`),
		upd(items, vals("1", "one", "1.5"), "1", "one-new", "1.50"),
		del(items, "2", "two", "2"),
	)
	res, err := a.Undo(ctx, orig, UndoRequest{Target: "eu", SQLState: "23505", Message: "duplicate"})
	if err != nil {
		t.Fatalf("Undo = %v", err)
	}
	if res.Status != UndoDone || len(res.Changes) != 3 {
		t.Fatalf("Undo = %+v, want undone with 3 changes", res)
	}
	want := `{"id":1,"v":"one","n":1.5}` + "\n" + `{"id":10,"v":"ten","n":10}` + "\n" + `{"id":2,"v":"two","n":2}`
	if got := tableRows(t, ctx, pool, "items"); got != want {
		t.Fatalf("items after undo =\n%s\nwant\n%s", got, want)
	}
	if got := queryString(t, ctx, pool, "SELECT status || ' ' || requested_by || ' ' || message FROM prism.undo_log WHERE end_lsn = '0/5000'"); got != "undone eu duplicate" {
		t.Fatalf("undo_log = %q", got)
	}
	// Idempotent: the second request returns the record and changes nothing.
	mustExec(t, ctx, c, "postgres", "INSERT INTO items VALUES (3, 'three', NULL)")
	res2, err := a.Undo(ctx, orig, UndoRequest{Target: "eu"})
	if err != nil || res2.Status != UndoDone {
		t.Fatalf("Undo(again) = %+v, %v", res2, err)
	}
	if got := queryString(t, ctx, pool, "SELECT count(*)::text FROM items WHERE id = 3"); got != "1" {
		t.Fatalf("second undo deleted row 3 again")
	}

	// Rows changed since: conflicts, newer data kept; the rest reverted.
	mustExec(t, ctx, c, "postgres", "UPDATE items SET v = 'three-newer' WHERE id = 3; UPDATE items SET v = 'two-again' WHERE id = 2")
	changed := txn("na", 0x6000, 2,
		ins(items, "3", "three", `\N`),
		del(items, "2", "two", "2"),
		ins(items, "10", "ten", "10"),
	)
	res, err = a.Undo(ctx, changed, UndoRequest{Target: "eu"})
	if err != nil {
		t.Fatalf("Undo(changed rows) = %v", err)
	}
	if res.Status != UndoConflict {
		t.Fatalf("Undo(changed rows) = %+v, want conflict", res)
	}
	want = `{"id":1,"v":"one","n":1.5}` + "\n" + `{"id":2,"v":"two-again","n":2}` + "\n" + `{"id":3,"v":"three-newer","n":null}`
	if got := tableRows(t, ctx, pool, "items"); got != want {
		t.Fatalf("items after conflicting undo =\n%s\nwant\n%s", got, want)
	}
	if got := queryString(t, ctx, pool, "SELECT status || ': ' || detail FROM prism.undo_log WHERE end_lsn = '0/6000'"); got != "conflict: 1 of 3 changes reverted, 2 conflicts, 0 failures" {
		t.Fatalf("undo_log = %q", got)
	}

	// Without a full before-image an update cannot be undone.
	keyOnly := rel("public", "items", decode.IdentityDefault, "id*", "v", "n")
	res, err = a.Undo(ctx, txn("na", 0x7000, 3, upd(keyOnly, nil, "1", "x", "1")), UndoRequest{Target: "eu"})
	if err != nil || res.Status != UndoConflict || !strings.Contains(res.Changes[0].Result, "REPLICA IDENTITY FULL") {
		t.Fatalf("Undo(no before-image) = %+v, %v", res, err)
	}
}

// TestUndoIdentity reverts changes of a table with a GENERATED ALWAYS
// identity key and a stored generated column: the deleted row comes back
// with its own identity value, an update of the other columns is
// reverted, and an update that changed the identity value is a conflict.
func TestUndoIdentity(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "undo-identity"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE items (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text,
			g int GENERATED ALWAYS AS (length(v)) STORED);
		ALTER TABLE items REPLICA IDENTITY FULL;
		INSERT INTO items (id, v) OVERRIDING SYSTEM VALUE VALUES (1, 'one-new'), (3, 'three'), (20, 'twenty');`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("na"))
	items := rel("public", "items", decode.IdentityFull, "id", "v")
	orig := txn("na", 0x5000, 1,
		ins(items, "3", "three"),
		upd(items, vals("1", "one"), "1", "one-new"),
		del(items, "2", "two"),
		upd(items, vals("4", "four"), "20", "twenty"), // SET id = DEFAULT
	)
	res, err := a.Undo(ctx, orig, UndoRequest{Target: "eu"})
	if err != nil {
		t.Fatalf("Undo = %v", err)
	}
	if res.Status != UndoConflict || len(res.Changes) != 4 || !strings.Contains(res.Changes[0].Result, "identity") {
		t.Fatalf("Undo = %+v, want a conflict on the identity update and the rest reverted", res)
	}
	for _, ch := range res.Changes[1:] {
		if !strings.HasPrefix(ch.Result, "reverted") {
			t.Errorf("change %s: %s", ch.Op, ch.Result)
		}
	}
	want := `{"id":1,"v":"one","g":3}` + "\n" + `{"id":2,"v":"two","g":3}` + "\n" + `{"id":20,"v":"twenty","g":6}`
	if got := tableRows(t, ctx, a.pool, "items"); got != want {
		t.Fatalf("items after undo =\n%s\nwant\n%s", got, want)
	}
}

// TestRetryAppliesAgainAfterConcurrentWrite: a dead-letter retry whose
// snapshot predates a concurrent write to one of its rows fails with a
// serialization failure, and Retry applies it again on a fresh snapshot,
// as the live apply path does, instead of failing the operator's command.
func TestRetryAppliesAgainAfterConcurrentWrite(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "retry40001"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE kv (id int PRIMARY KEY, v text); CREATE TABLE gate (id int PRIMARY KEY, v text)`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v")
	gate := rel("public", "gate", decode.IdentityDefault, "id*", "v")
	// The retry first inserts the gate row, which waits for the test's
	// uncommitted insert of the same key; the test then commits, so the
	// retry's snapshot (taken before) misses a row it has to touch.
	parked := txn("na", 0x1000, 1, ins(gate, "1", "na"), ins(kv, "7", "na"))
	if ok, err := a.Park(ctx, parked, errors.New("parked by the test"), StatusParked); err != nil || !ok {
		t.Fatalf("Park = %v, %v", ok, err)
	}
	dls, err := a.DeadLetters(ctx, "na", StatusParked)
	if err != nil || len(dls) != 1 {
		t.Fatalf("DeadLetters = %v, %v; want one", dls, err)
	}
	test, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer test.Close(context.Background())
	if _, err := test.Exec(ctx, "BEGIN; INSERT INTO gate VALUES (1, 'local')"); err != nil {
		t.Fatal(err)
	}
	done := runUntilLocked(t, ctx, a, "na", func() (int, error) { return 0, a.Retry(ctx, dls[0].ID) })
	if _, err := test.Exec(ctx, "COMMIT"); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.err != nil {
		t.Fatalf("Retry after a concurrent write = %v, want it applied again", r.err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT v FROM kv WHERE id = 7"); got != "na" {
		t.Fatalf("kv 7 = %q after the retry, want na", got)
	}
	// The local row is newer than the source's (commit time 1 s after the
	// test's base time) and stays.
	if got := queryString(t, ctx, a.pool, "SELECT v FROM gate WHERE id = 1"); got != "local" {
		t.Fatalf("gate 1 = %q after the retry, want local", got)
	}
	if dls, _ := a.DeadLetters(ctx, "na", StatusRetried); len(dls) != 1 {
		t.Fatalf("retried dead letters = %d, want 1", len(dls))
	}
}
