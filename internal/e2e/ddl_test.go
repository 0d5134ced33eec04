package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

const ddlSchema = `CREATE TABLE items (id text PRIMARY KEY, region text NOT NULL, n int, note text);`

// ddlWriter inserts rows into items (and into events once that table
// exists) in one region until stopped, one transaction per row, the way
// an application that follows a schema change would: when a column it
// names is gone (42703) it looks at the table again and writes what is
// there (qty once n was renamed, no note once it was dropped).
type ddlWriter struct {
	region string
	rows   int
	events int
	err    error
}

func (w *ddlWriter) run(ctx context.Context, d *Deployment, stop <-chan struct{}) {
	conn, err := d.Clusters[w.region].Connect(ctx, "app")
	if err != nil {
		w.err = err
		return
	}
	defer conn.Close(ctx)
	cols := func() (num string, note bool) {
		var names []string
		rows, err := conn.Query(ctx, "SELECT attname::text FROM pg_attribute WHERE attrelid = 'items'::regclass AND attnum > 0 AND NOT attisdropped")
		if err == nil {
			names, _ = pgx.CollectRows(rows, pgx.RowTo[string])
		}
		num = "n"
		for _, n := range names {
			if n == "qty" {
				num = "qty"
			}
			if n == "note" {
				note = true
			}
		}
		return num, note
	}
	num, note := cols()
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		id := fmt.Sprintf("%s-%d", w.region, i)
		var err error
		if note {
			_, err = conn.Exec(ctx, "INSERT INTO items (id, region, "+num+", note) VALUES ($1, $2, $3, 'w')", id, w.region, i)
		} else {
			_, err = conn.Exec(ctx, "INSERT INTO items (id, region, "+num+") VALUES ($1, $2, $3)", id, w.region, i)
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && (pgErr.Code == "42703" || pgErr.Code == "0A000") {
			// A column changed under the statement: look again.
			num, note = cols()
			continue
		}
		if err != nil {
			w.err = fmt.Errorf("insert %s: %w", id, err)
			return
		}
		w.rows++
		if _, err := conn.Exec(ctx, "INSERT INTO events (id, region) VALUES ($1, $2)", id, w.region); err == nil {
			w.events++
		} else if !errors.As(err, &pgErr) || pgErr.Code != "42P01" {
			w.err = fmt.Errorf("insert event %s: %w", id, err)
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestDDLReplicates runs schema changes in three regions (ddl: replicate)
// while every region writes: an added column, a new table and an index,
// a renamed and a dropped column - each region also commits a row with
// the old shape after another region changed it, which the others match
// by the new name or whose dropped column they discard with a log line.
// Then a schema change that fails in its target regions under each
// on_apply_error (na halts, eu parks it, as asks for an undo), and a
// reader killed with SIGKILL between a schema change and the rows after
// it, which are applied once after it restarts. Every region ends with the
// same schema and the same rows, and verify says so.
func TestDDLReplicates(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	// An undo needs the source's consent (its on_apply_error is undo too);
	// eu halts later.
	policy := map[string]string{"na": "undo", "eu": "dead_letter", "as": "undo"}
	d := New(t, Topology{"na": {"na1"}, "eu": {"eu1"}, "as": {"as1"}}, ddlSchema)
	d.Extra = func(name string) string {
		return "ddl: replicate\non_apply_error: " + policy[d.regionOf(name)] + "\n"
	}
	d.StartAll()
	waitReaders(d)

	sql := func(region, sql string) {
		t.Helper()
		if err := d.Clusters[region].Exec(ctx, "app", sql); err != nil {
			t.Fatalf("%s: %s: %v", region, sql, err)
		}
	}
	query := func(region, sql string) string {
		c, err := d.Clusters[region].Connect(ctx, "app")
		if err != nil {
			return "error: " + err.Error()
		}
		defer c.Close(ctx)
		var s *string
		if err := c.QueryRow(ctx, sql).Scan(&s); err != nil {
			return "error: " + err.Error()
		}
		if s == nil {
			return "<null>"
		}
		return *s
	}
	everywhere := func(what, sql, want string) {
		t.Helper()
		got := map[string]string{}
		for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			ok := true
			for _, r := range d.Regions {
				got[r] = query(r, sql)
				ok = ok && got[r] == want
			}
			if ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s: %s = %v, want %q everywhere\nitems only in some regions: %s\n%s", what, sql, got, want, partialItems(ctx, d), d.Logs())
			}
		}
	}
	hasColumn := func(table, col string) string {
		return fmt.Sprintf("SELECT count(*)::text FROM pg_attribute WHERE attrelid = to_regclass('%s') AND attname = '%s' AND NOT attisdropped", table, col)
	}
	// open starts a transaction in region that writes a row of the old
	// shape; the caller commits it after another region changed the
	// table, so the row travels with the old shape.
	open := func(region, insert string) pgx.Tx {
		t.Helper()
		c, err := d.Clusters[region].Connect(ctx, "app")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(context.Background()) })
		tx, err := c.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, insert); err != nil {
			t.Fatalf("%s: %s: %v", region, insert, err)
		}
		return tx
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	writers := map[string]*ddlWriter{}
	for _, r := range d.Regions {
		w := &ddlWriter{region: r}
		writers[r] = w
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.run(ctx, d, stop)
		}()
	}
	stopWriters := func() {
		close(stop)
		wg.Wait()
		for r, w := range writers {
			if w.err != nil {
				t.Fatalf("writer %s: %v", r, w.err)
			}
		}
	}

	// Added column, with a row from eu that lacks it committed after na
	// added it.
	late := open("eu", "INSERT INTO items (id, region, n) VALUES ('eu-before-extra', 'eu', 1)")
	sql("na", "ALTER TABLE items ADD COLUMN extra text DEFAULT 'x'")
	if err := late.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	everywhere("column extra everywhere", hasColumn("items", "extra"), "1")

	// New table and index.
	sql("eu", "CREATE TABLE events (id text PRIMARY KEY, region text NOT NULL, at timestamptz NOT NULL DEFAULT now())")
	sql("eu", "CREATE INDEX items_region ON items (region)")
	everywhere("table events with its conflict triggers everywhere",
		"SELECT string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger WHERE tgrelid = to_regclass('events')", "prism_clock,prism_tombstone")
	everywhere("index items_region everywhere", "SELECT count(*)::text FROM pg_indexes WHERE indexname = 'items_region'", "1")
	d.Eventually(30*time.Second, "events written in every region", func() bool {
		for _, r := range d.Regions {
			if query(r, "SELECT count(DISTINCT region)::text FROM events") != "3" {
				return false
			}
		}
		return true
	})

	// Renamed column: na writes n after as renamed it, once eu has the
	// new name too.
	late = open("na", "INSERT INTO items (id, region, n) VALUES ('na-old-name', 'na', 42)")
	sql("as", "ALTER TABLE items RENAME COLUMN n TO qty")
	d.Eventually(60*time.Second, "the rename in eu", func() bool { return query("eu", hasColumn("items", "qty")) == "1" })
	if err := late.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	everywhere("row with the old column name matched by the new one", "SELECT qty::text FROM items WHERE id = 'na-old-name'", "42")

	// Dropped column: eu writes note after na dropped it, once as dropped
	// it too.
	late = open("eu", "INSERT INTO items (id, region, qty, note) VALUES ('eu-dropped', 'eu', 7, 'gone')")
	sql("na", "ALTER TABLE items DROP COLUMN note")
	d.Eventually(60*time.Second, "the drop in as", func() bool { return query("as", hasColumn("items", "note")) == "0" })
	if err := late.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	everywhere("column note gone everywhere", hasColumn("items", "note"), "0")
	everywhere("row with a dropped column", "SELECT qty::text FROM items WHERE id = 'eu-dropped'", "7")
	for _, n := range []string{"na1", "as1"} {
		d.Eventually(30*time.Second, n+" logs the discarded column", func() bool {
			b, _ := os.ReadFile(d.LogPath(n))
			return strings.Contains(string(b), `"discarded_columns":["note"]`)
		})
	}
	time.Sleep(200 * time.Millisecond) // let the writers write rows of the final shape
	stopWriters()
	total := 3 // the three rows written with an old shape
	for _, w := range writers {
		total += w.rows
	}
	everywhere("every row everywhere", "SELECT count(*)::text FROM items", fmt.Sprint(total))

	// A schema change that fails in the other regions: clash1 exists in
	// eu and as already.
	sql("eu", "SET prism.ddl = 'local'; CREATE TABLE clash1 (id int PRIMARY KEY)")
	sql("as", "SET prism.ddl = 'local'; CREATE TABLE clash1 (id int PRIMARY KEY)")
	sql("na", "CREATE TABLE clash1 (id int PRIMARY KEY, v text)")
	sql("na", "INSERT INTO items (id, region) VALUES ('na-after-clash1', 'na')")
	// eu parks it and goes on; as parks it, asks na for an undo, goes on.
	everywhere("the row after the failed schema change", "SELECT count(*)::text FROM items WHERE id = 'na-after-clash1'", "1")
	for r, status := range map[string]string{"eu": "parked", "as": "undo_"} {
		got := query(r, "SELECT status || ': ' || message FROM prism.dead_letters WHERE source_region = 'na'")
		if !strings.HasPrefix(got, status) || !strings.Contains(got, `relation "clash1" already exists: CREATE TABLE clash1 (id int PRIMARY KEY, v text)`) {
			t.Fatalf("dead letter in %s = %q, want %s... naming the statement and the error", r, got, status)
		}
	}
	d.Eventually(30*time.Second, "na's undo log to say the schema change cannot be undone", func() bool {
		got := query("na", "SELECT string_agg(u::text, ';') FROM prism.undo_log u")
		return strings.Contains(got, "a schema change cannot be undone") && strings.Contains(got, "CREATE TABLE clash1")
	})
	// Halted: eu, now with on_apply_error: halt, stops as's stream at it
	// until the cause is gone, whether eu1 applies it or, while eu1 is
	// starting, as1's direct-SQL fallback does (it follows the policy eu1
	// recorded in eu's database when it started).
	policy["eu"] = "halt"
	d.Kill("eu1")
	d.Start("eu1")
	d.Eventually(30*time.Second, "eu1 to record on_apply_error: halt", func() bool {
		return query("eu", "SELECT prism.apply_policy()->>'policy'") == "halt"
	})
	sql("eu", "SET prism.ddl = 'local'; CREATE TABLE clash2 (id int PRIMARY KEY)")
	sql("as", "CREATE TABLE clash2 (id int PRIMARY KEY, v text)")
	sql("as", "INSERT INTO items (id, region) VALUES ('as-after-clash2', 'as')")
	d.Eventually(30*time.Second, "eu to halt on clash2", func() bool {
		got := query("eu", "SELECT status || ': ' || message FROM prism.dead_letters WHERE source_region = 'as'")
		return strings.HasPrefix(got, "halted: ") && strings.Contains(got, `relation "clash2" already exists: CREATE TABLE clash2 (id int PRIMARY KEY, v text)`)
	})
	d.Eventually(30*time.Second, "na to apply as's row", func() bool {
		return query("na", "SELECT count(*)::text FROM items WHERE id = 'as-after-clash2'") == "1"
	})
	if got := query("eu", "SELECT count(*)::text FROM items WHERE id = 'as-after-clash2'"); got != "0" {
		t.Fatalf("eu has as's row after the halted schema change: %s", got)
	}
	sql("eu", "SET prism.ddl = 'local'; DROP TABLE clash2")
	everywhere("as's row once the cause is gone", "SELECT count(*)::text FROM items WHERE id = 'as-after-clash2'", "1")
	everywhere("clash2 as as made it", hasColumn("clash2", "v"), "1")
	for _, r := range []string{"eu", "as"} {
		sql(r, "SET prism.ddl = 'local'; DROP TABLE clash1")
	}
	sql("na", "SET prism.ddl = 'local'; DROP TABLE clash1")
	sql("na", "DROP TABLE clash2")
	everywhere("clash2 dropped everywhere", "SELECT to_regclass('clash2')::text", "<null>")

	// SIGKILL between a schema change and the rows after it.
	sql("as", "ALTER TABLE items ADD COLUMN late int")
	d.Kill("as1")
	sql("as", "INSERT INTO items (id, region, late) VALUES ('as-late-1', 'as', 1), ('as-late-2', 'as', 2)")
	d.Kill("eu1")
	d.Start("as1")
	d.Start("eu1")
	everywhere("rows after the schema change, once", "SELECT string_agg(id || '=' || late, ',' ORDER BY id) FROM items WHERE late IS NOT NULL", "as-late-1=1,as-late-2=2")
	everywhere("column late once", hasColumn("items", "late"), "1")
	for _, r := range d.Regions {
		if got := query(r, "SELECT count(*)::text FROM prism.dead_letters WHERE message LIKE '%late%'"); got != "0" {
			t.Fatalf("%s has %s dead letters about the killed schema change, want 0", r, got)
		}
	}

	rep := d.Verify(ctx)
	if !rep.OK() {
		t.Fatalf("regions differ: %+v, schema %v", rep.Tables, rep.Schema)
	}
	if code, out := verifyCLI(t, d, "na1"); code != 0 || strings.Contains(out, "schema of") {
		t.Fatalf("verify = %d, want 0 and no schema difference\n%s", code, out)
	}

	// A change made in one region only (prism.ddl = 'local') is a
	// difference verify and doctor report.
	sql("eu", "SET prism.ddl = 'local'; ALTER TABLE items ADD COLUMN eu_only int NOT NULL DEFAULT 0")
	sql("as", "SET prism.ddl = 'local'; CREATE INDEX items_as ON items (late)")
	code, out := verifyCLI(t, d, "na1")
	for _, want := range []string{
		"schema of public.items: columns differ",
		"region eu: eu_only integer NOT NULL DEFAULT 0, extra text DEFAULT 'x'::text, id text NOT NULL, late integer, qty integer, region text NOT NULL",
		"region na: extra text DEFAULT 'x'::text, id text NOT NULL, late integer, qty integer, region text NOT NULL",
		"schema of public.items: indexes differ",
		"CREATE INDEX items_as ON public.items USING btree (late)",
	} {
		if !strings.Contains(out, want) {
			t.Fatalf("verify lacks %q (exit %d):\n%s", want, code, out)
		}
	}
	if code != 1 {
		t.Fatalf("verify with a schema difference = %d, want 1\n%s", code, out)
	}
	doc, _ := osExec(d, "doctor", "--config", d.ConfigPath("na1")).CombinedOutput()
	for _, want := range []string{"ddl replicate", "event trigger prism_ddl captures this region's schema changes", "schemas: public.items", "columns differ", "region eu: eu_only integer"} {
		if !strings.Contains(string(doc), want) {
			t.Fatalf("doctor lacks %q:\n%s", want, doc)
		}
	}
}

// partialItems lists the items rows some region lacks, with the regions
// that have them.
func partialItems(ctx context.Context, d *Deployment) string {
	where := map[string][]string{}
	for _, r := range d.Regions {
		c, err := d.Clusters[r].Connect(ctx, "app")
		if err != nil {
			return err.Error()
		}
		rows, err := c.Query(ctx, "SELECT id FROM items")
		if err == nil {
			ids, _ := pgx.CollectRows(rows, pgx.RowTo[string])
			for _, id := range ids {
				where[id] = append(where[id], r)
			}
		}
		c.Close(ctx)
	}
	var out []string
	for id, rs := range where {
		if len(rs) < len(d.Regions) {
			out = append(out, id+" in "+strings.Join(rs, ","))
		}
	}
	for _, r := range d.Regions {
		c, err := d.Clusters[r].Connect(ctx, "app")
		if err != nil {
			continue
		}
		for _, q := range []string{"SELECT json_agg(x)::text FROM prism.dead_letters x", "SELECT json_agg(x)::text FROM prism.conflicts x", "SELECT json_agg(x)::text FROM prism.undo_log x"} {
			var s *string
			c.QueryRow(ctx, q).Scan(&s)
			if s != nil {
				out = append(out, "\n"+r+": "+*s)
			}
		}
		c.Close(ctx)
	}
	return strings.Join(out, "; ")
}
