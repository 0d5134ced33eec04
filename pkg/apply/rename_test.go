package apply

import (
	"errors"
	"strings"
	"testing"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestRenamedTableKeepsMetadata: after ALTER TABLE ... RENAME TO, the
// table's batch stamps and tombstones still decide conflicts exactly,
// compaction keeps the stamps of its rows, and a new table that takes the
// old name gets metadata of its own.
func TestRenamedTableKeepsMetadata(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "renamed"})
	mustExec(t, ctx, c, "postgres", "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION prism FOR ALL TABLES")
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	a.upkeep = upkeep{marks: 1, stampRows: 1}
	before := rel("public", "t", decode.IdentityDefault, "id*", "v")
	// One batch: rows 1-3 from na at +1, +2 and +3 s; the batch's
	// transaction commits at +3 s, each row keeps its own stamp.
	batch := []*decode.Txn{
		txn("na", 100, 1, ins(before, "1", "a")),
		txn("na", 200, 2, ins(before, "2", "b")),
		txn("na", 300, 3, ins(before, "3", "c")),
	}
	if n, err := a.ApplyBatch(ctx, batch); n != len(batch) || err != nil {
		t.Fatalf("ApplyBatch = %d, %v", n, err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(DISTINCT xmin::text)::text FROM t"); got != "1" {
		t.Fatalf("rows written in %s target transactions, want 1 (a batch)", got)
	}
	// Deleted here, now: a tombstone newer than anything from na or as.
	mustExec(t, ctx, c, "postgres", "DELETE FROM t WHERE id = 3")
	mustExec(t, ctx, c, "postgres", "ALTER TABLE t RENAME TO u")
	if got := queryString(t, ctx, a.pool, "SELECT name FROM prism.table_names WHERE relid = 'u'::regclass"); got != "public.t" {
		t.Fatalf("metadata name of u = %q, want public.t (its first name)", got)
	}
	// Row 3's stamp went with its version; rows 1 and 2 keep theirs.
	if n, err := a.CompactStamps(ctx, 0); n != 1 || err != nil {
		t.Fatalf("CompactStamps after the rename = %d, %v; want 1 (row 3's)", n, err)
	}

	after := rel("public", "u", decode.IdentityDefault, "id*", "v")
	// Row 1 was written at +1 s: an update from as at +2 s is newer. With
	// its stamp lost, the row would count as written at +3 s (the batch's
	// commit) and the update would lose.
	if err := a.Apply(ctx, txn("as", 100, 2, upd(after, nil, "1", "as"))); err != nil {
		t.Fatal(err)
	}
	// Row 3 was deleted here after everything: an update from as at +4 s
	// must not bring it back. With its tombstone lost, it would.
	if err := a.Apply(ctx, txn("as", 200, 4, upd(after, nil, "3", "as"))); err != nil {
		t.Fatal(err)
	}
	if got := tableRows(t, ctx, a.pool, "u"); got != `{"id":1,"v":"as"}
{"id":2,"v":"b"}` {
		t.Fatalf("u =\n%s\nwant row 1 updated by as and row 3 still deleted", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(kind || ' ' || resolution, ', ' ORDER BY at) FROM prism.conflicts WHERE table_name = 'public.t'"); !strings.Contains(got, "update_missing keep_deleted") {
		t.Fatalf("conflicts recorded = %q, want the update of row 3 kept deleted", got)
	}

	// A new table under the old name keeps its metadata apart.
	mustExec(t, ctx, c, "postgres", "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (3, 'new'); DELETE FROM t WHERE id = 3")
	newName := queryString(t, ctx, a.pool, "SELECT name FROM prism.table_names WHERE relid = 't'::regclass")
	if !strings.HasPrefix(newName, "public.t#") {
		t.Fatalf("metadata name of the new t = %q, want public.t#<oid>", newName)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(table_name, ', ' ORDER BY table_name) FROM prism.tombstones"); got != "public.t, "+newName {
		t.Fatalf("tombstones under %q, want one for u (public.t) and one for the new t", got)
	}
	// u's tombstone still decides: a later update from na is older than
	// the delete.
	if err := a.Apply(ctx, txn("na", 400, 5, upd(after, nil, "3", "na"))); err != nil {
		t.Fatal(err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM u WHERE id = 3"); got != "0" {
		t.Fatalf("u has %s rows with id 3 after an older update, want 0", got)
	}
}

// TestRowsUnderOldTableName: rows that a region sends under a table's
// name from before a rename made here (the rename has not reached it
// yet) go to the renamed table, also after a second rename; a table that
// was never here still waits for its schema change.
func TestRowsUnderOldTableName(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "oldname"})
	mustExec(t, ctx, c, "postgres", "CREATE TABLE t (id int PRIMARY KEY, a text)")
	a := newApplier(t, ctx, c, "postgres", WithDDL(true), WithLocalRegion("eu"))
	defer a.Close()
	ddl := func(cmd string) decode.Change {
		return decode.Change{Op: decode.OpDDL, DDL: &decode.DDL{Command: cmd, SearchPath: "public"}}
	}
	old := rel("public", "t", decode.IdentityDefault, "id*", "a")
	apply := func(tx *decode.Txn) {
		t.Helper()
		err := a.Apply(ctx, tx)
		var e *Error
		if errors.As(err, &e) && e.Retryable {
			// A cached statement of the table's previous name failed:
			// applied again with fresh descriptions, as the pipeline
			// does.
			err = a.Apply(ctx, tx)
		}
		if err != nil {
			t.Fatalf("Apply %s/%s: %v", tx.Origin, tx.EndLSN, err)
		}
	}
	apply(txn("na", 100, 1, ins(old, "1", "na"), ddl("ALTER TABLE t RENAME TO u")))
	// as has not renamed it yet.
	apply(txn("as", 100, 2, ins(old, "2", "as"), upd(old, nil, "1", "as")))
	if got := tableRows(t, ctx, a.pool, "u"); got != `{"id":1,"a":"as"}
{"id":2,"a":"as"}` {
		t.Fatalf("u =\n%s\nwant as's rows under the old name applied to it", got)
	}
	// Renamed again here (by hand): the old name still leads to it.
	mustExec(t, ctx, c, "postgres", "SET prism.ddl = 'local'; ALTER TABLE u RENAME TO w")
	apply(txn("as", 200, 3, ins(old, "3", "as"), del(old, "2")))
	if got := tableRows(t, ctx, a.pool, "w"); got != `{"id":1,"a":"as"}
{"id":3,"a":"as"}` {
		t.Fatalf("w =\n%s\nwant as's rows under the first name applied to it", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(old_name || ' -> ' || new_name, ', ' ORDER BY id) FROM prism.table_renames"); got != "public.t -> public.u, public.u -> public.w" {
		t.Fatalf("prism.table_renames = %s", got)
	}
	// So does a TRUNCATE under the first name.
	apply(txn("as", 250, 3.5, decode.Change{Op: decode.OpTruncate, Rel: old, Truncated: []*decode.Relation{old}}))
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM w"); got != "0" {
		t.Fatalf("w has %s rows after a TRUNCATE under its first name, want 0", got)
	}
	// A table that never existed here is still a schema change on its way.
	err := a.Apply(ctx, txn("as", 300, 4, ins(rel("public", "never", decode.IdentityDefault, "id*"), "1")))
	var e *Error
	if !errors.As(err, &e) || e.SQLState != "42P01" || !e.Retryable {
		t.Fatalf("Apply of a row of a table never here = %v, want a retryable 42P01", err)
	}
}
