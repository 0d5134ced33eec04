package apply

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// ddlMessages returns the prism_ddl messages decoded from slot since the
// last call, each as its DDL.
func ddlMessages(t *testing.T, ctx context.Context, conn *pgx.Conn, slot string) []decode.DDL {
	t.Helper()
	rows, err := conn.Query(ctx, "SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL)", slot)
	if err != nil {
		t.Fatalf("read slot: %v", err)
	}
	datas, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatalf("read slot: %v", err)
	}
	var out []decode.DDL
	for _, d := range datas {
		const head = "message: transactional: 1 prefix: prism_ddl, sz: "
		if !strings.HasPrefix(d, head) {
			if strings.Contains(d, "prism_ddl") {
				t.Fatalf("unexpected prism_ddl message %q", d)
			}
			continue
		}
		_, content, _ := strings.Cut(d, " content:")
		var m struct {
			Command    string `json:"command"`
			SearchPath string `json:"search_path"`
			Role       string `json:"role"`
		}
		if err := json.Unmarshal([]byte(content), &m); err != nil {
			t.Fatalf("message %q: %v", d, err)
		}
		out = append(out, decode.DDL{Command: m.Command, SearchPath: m.SearchPath, Role: m.Role})
	}
	return out
}

// TestDDLCapture checks event trigger prism_ddl: a replicable schema
// change emits one transactional prism_ddl message with its statement,
// search_path and role; what another region could not reproduce is
// refused with SQLSTATE 0A000 and a message that says why; temporary
// objects, SET prism.ddl = 'local' and the applier's own schema changes
// emit nothing.
func TestDDLCapture(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "ddlcap"})
	mustExec(t, ctx, c, "postgres", "CREATE ROLE app; CREATE SCHEMA s AUTHORIZATION app; GRANT app TO postgres")
	a := newApplier(t, ctx, c, "postgres", WithDDL(true), WithLocalRegion("eu"))
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	conn, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "SELECT pg_create_logical_replication_slot('ddlcap', 'test_decoding')"); err != nil {
		t.Fatal(err)
	}
	app, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(ctx)
	exec := func(sql string) error {
		_, err := app.PgConn().Exec(ctx, sql).ReadAll()
		return err
	}
	if err := exec("SET search_path = s, public; SET ROLE app"); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name, sql string
		want      string // the captured command; "" for none
	}{
		{"create table", "CREATE TABLE t (id int PRIMARY KEY, v text)", "CREATE TABLE t (id int PRIMARY KEY, v text)"},
		{"semicolons in constants and comments", "ALTER TABLE t ADD COLUMN d text DEFAULT 'a;b' /* ; */ -- ;\n, ADD COLUMN e text DEFAULT $x$;$x$;",
			"ALTER TABLE t ADD COLUMN d text DEFAULT 'a;b' /* ; */ -- ;\n, ADD COLUMN e text DEFAULT $x$;$x$;"},
		{"index", "CREATE INDEX t_v ON t (v)", "CREATE INDEX t_v ON t (v)"},
		{"rename", `ALTER TABLE t RENAME COLUMN v TO "V2"`, `ALTER TABLE t RENAME COLUMN v TO "V2"`},
		{"enum", "CREATE TYPE mood AS ENUM ('ok')", "CREATE TYPE mood AS ENUM ('ok')"},
		{"enum value", "ALTER TYPE mood ADD VALUE 'sad'", "ALTER TYPE mood ADD VALUE 'sad'"},
		{"sequence", "CREATE SEQUENCE q", "CREATE SEQUENCE q"},
		{"temporary table", "CREATE TEMP TABLE tmp (a int)", ""},
		{"temporary index", "CREATE INDEX ON tmp (a)", ""},
		{"temporary drop", "DROP TABLE tmp", ""},
		{"publication", "RESET ROLE; CREATE PUBLICATION p FOR ALL TABLES; SET ROLE app", ""},
		{"local", "SET prism.ddl = 'local'; CREATE FUNCTION s.f() RETURNS int LANGUAGE sql AS 'SELECT 1'; RESET prism.ddl", ""},
	} {
		if err := exec(tc.sql); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		got := ddlMessages(t, ctx, conn, "ddlcap")
		if tc.want == "" {
			if len(got) != 0 {
				t.Fatalf("%s: messages %+v, want none", tc.name, got)
			}
			continue
		}
		if len(got) != 1 || got[0] != (decode.DDL{Command: tc.want, SearchPath: "s, public", Role: "app"}) {
			t.Fatalf("%s: messages %+v, want one with %q as app in s, public", tc.name, got, tc.want)
		}
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(old_name || '>' || new_name, ',') FROM prism.ddl_renames"); got != "v>V2" {
		t.Fatalf("renames = %s, want v>V2", got)
	}

	// A superuser's table gets its conflict triggers (prism_install's own
	// schema changes are not refused) and is captured once.
	for _, sql := range []string{"RESET ROLE", "CREATE TABLE s.su (id int PRIMARY KEY)", "SET ROLE app"} {
		if err := exec(sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	if got := ddlMessages(t, ctx, conn, "ddlcap"); len(got) != 1 || got[0].Role != "postgres" {
		t.Fatalf("superuser's CREATE TABLE: messages %+v, want one as postgres", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger WHERE tgrelid = 's.su'::regclass"); got != "prism_clock,prism_tombstone" {
		t.Fatalf("triggers on s.su = %s, want prism_clock,prism_tombstone", got)
	}
	if err := exec("CREATE TEMP TABLE tmp2 (a int)"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, sql, msg string }{
		{"several statements", "CREATE TABLE u1 (a int); CREATE TABLE u2 (a int)", "the query string holds 2 statements"},
		{"ddl and dml", "ALTER TABLE t ADD COLUMN z int; UPDATE t SET z = 1", "the query string holds 2 statements"},
		{"create table as", "CREATE TABLE u3 AS SELECT 1 AS a", "cannot replicate CREATE TABLE AS"},
		{"select into", "SELECT 1 AS a INTO u4", "cannot replicate SELECT INTO"},
		{"view", "CREATE VIEW v AS SELECT 1 AS a", "cannot replicate CREATE VIEW"},
		{"function", "CREATE FUNCTION g() RETURNS int LANGUAGE sql AS 'SELECT 1'", "cannot replicate CREATE FUNCTION"},
		{"do block", "DO $$BEGIN ALTER TABLE t ADD COLUMN y int; END$$", "inside a function, procedure or DO block"},
		{"concurrently", "CREATE INDEX CONCURRENTLY t_d ON t (d)", "CONCURRENTLY"},
		{"temporary table named", "CREATE TABLE u5 (LIKE tmp2)", "temporary table tmp2"},
	} {
		err := exec(tc.sql)
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "0A000" || !strings.Contains(pgErr.Message, tc.msg) {
			t.Fatalf("%s: %v, want 0A000 saying %q", tc.name, err, tc.msg)
		}
		_ = exec("ROLLBACK")
		if got := ddlMessages(t, ctx, conn, "ddlcap"); len(got) != 0 {
			t.Fatalf("%s: messages %+v, want none", tc.name, got)
		}
	}

	// The applier's own schema changes (from another region) emit nothing.
	tx := txn("na", 1000, 1, decode.Change{Op: decode.OpDDL, DDL: &decode.DDL{Command: "ALTER TABLE t ADD COLUMN f int", SearchPath: "s", Role: "app"}})
	if err := a.Apply(ctx, tx); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if got := ddlMessages(t, ctx, conn, "ddlcap"); len(got) != 0 {
		t.Fatalf("applied DDL emitted %+v, want nothing", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT pg_get_userbyid(relowner)::text || ':' || count(*)::text FROM pg_class k JOIN pg_attribute a ON a.attrelid = k.oid WHERE k.oid = 's.t'::regclass AND a.attname = 'f' GROUP BY relowner"); got != "app:1" {
		t.Fatalf("column f = %s, want added to s.t (owner app)", got)
	}
}

// TestDDLApply checks that the applier runs a schema change at its place
// among the rows of one transaction, with the source's search_path and
// role, rebuilds its statements for the new shape, discards values of
// columns dropped here and maps renamed ones, gives new tables their
// conflict triggers, and fails a schema change that cannot run here with
// the statement and its SQLSTATE, applying nothing of its transaction.
func TestDDLApply(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "ddlapply"})
	a := newApplier(t, ctx, c, "postgres", WithDDL(true), WithLocalRegion("eu"))
	mustExec(t, ctx, c, "postgres", "CREATE ROLE app; CREATE SCHEMA s AUTHORIZATION app; CREATE TABLE s.t (id int PRIMARY KEY, a text); ALTER TABLE s.t OWNER TO app")
	ddl := func(cmd string) decode.Change {
		return decode.Change{Op: decode.OpDDL, DDL: &decode.DDL{Command: cmd, SearchPath: "s", Role: "app"}}
	}
	old := rel("s", "t", decode.IdentityDefault, "id*", "a")
	wide := rel("s", "t", decode.IdentityDefault, "id*", "a", "b")
	renamed := rel("s", "t", decode.IdentityDefault, "id*", "b")
	txns := []*decode.Txn{
		// Rows before and after an added column, in one transaction.
		txn("na", 100, 1, ins(old, "1", "x"), ddl("ALTER TABLE t ADD COLUMN b int"), ins(wide, "2", "y", "5")),
		// A region that has not added it yet.
		txn("as", 100, 2, ins(old, "3", "z")),
		// Dropped here; a region that still has it sends it.
		txn("na", 200, 3, ddl("ALTER TABLE t DROP COLUMN a"), ins(wide, "4", "w", "6")),
		// Renamed here; a region that still has the old name sends it.
		txn("na", 300, 4, ddl("ALTER TABLE t RENAME COLUMN b TO c"), ins(renamed, "5", "7"), upd(renamed, nil, "2", "8")),
		// A new table, in the source's search_path.
		txn("na", 400, 5, ddl("CREATE TABLE n (id int PRIMARY KEY)"), ins(rel("s", "n", decode.IdentityDefault, "id*"), "1")),
	}
	for _, tx := range txns {
		if err := a.Apply(ctx, tx); err != nil {
			t.Fatalf("Apply %s/%s: %v", tx.Origin, tx.EndLSN, err)
		}
	}
	got := tableRows(t, ctx, a.pool, "s.t")
	want := `{"id":1,"c":null}
{"id":2,"c":8}
{"id":3,"c":null}
{"id":4,"c":6}
{"id":5,"c":7}`
	if got != want {
		t.Logf("renames: %s", queryString(t, ctx, a.pool, "SELECT json_agg(r)::text FROM prism.ddl_renames r"))
		t.Fatalf("s.t =\n%s\nwant\n%s", got, want)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger WHERE tgrelid = 's.n'::regclass"); got != "prism_clock,prism_tombstone" {
		t.Fatalf("triggers on new table s.n = %s, want prism_clock,prism_tombstone", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE oid = 's.n'::regclass"); got != "app" {
		t.Fatalf("owner of s.n = %s, want app", got)
	}

	for _, tc := range []struct {
		name  string
		tx    *decode.Txn
		state string
		msg   string
	}{
		{"failing statement", txn("na", 500, 6, ins(rel("s", "n", decode.IdentityDefault, "id*"), "2"), ddl("CREATE TABLE n (x int)")),
			"42P07", "schema change from another region failed here: relation \"n\" already exists: CREATE TABLE n (x int)"},
		{"missing role", txn("na", 500, 6, ins(rel("s", "n", decode.IdentityDefault, "id*"), "2"),
			decode.Change{Op: decode.OpDDL, DDL: &decode.DDL{Command: "CREATE TABLE m (id int)", SearchPath: "s", Role: "ghost"}}),
			"42704", "role ghost ran it there and does not exist here"},
	} {
		err := a.Apply(ctx, tc.tx)
		var e *Error
		if !errors.As(err, &e) || e.SQLState != tc.state || e.Op != decode.OpDDL || !strings.Contains(e.Error(), tc.msg) || e.Retryable {
			t.Fatalf("%s: Apply = %v, want a permanent Error of the DDL with %s saying %q", tc.name, err, tc.state, tc.msg)
		}
		if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM s.n"); got != "1" {
			t.Fatalf("%s: s.n has %s rows, want the failed transaction's row rolled back", tc.name, got)
		}
	}

	// A table or column this region has not heard of (nor dropped or
	// renamed) may come with another region's schema change that has not
	// arrived yet: retryable, and applied once it has.
	for _, tc := range []struct {
		name, state string
		tx          *decode.Txn
		ddl         string
	}{
		{"column not added yet", "42703", txn("eu", 100, 7, ins(rel("s", "t", decode.IdentityDefault, "id*", "c", "later"), "9", "1", "L")), "ALTER TABLE s.t ADD COLUMN later text"},
		{"table not created yet", "42P01", txn("eu", 200, 8, ins(rel("s", "soon", decode.IdentityDefault, "id*"), "1")), "CREATE TABLE s.soon (id int PRIMARY KEY)"},
	} {
		err := a.Apply(ctx, tc.tx)
		var e *Error
		if !errors.As(err, &e) || e.SQLState != tc.state || !e.Retryable || !strings.Contains(e.Error(), "waiting for the schema change") {
			t.Fatalf("%s: Apply = %v, want a retryable %s Error", tc.name, err, tc.state)
		}
		mustExec(t, ctx, c, "postgres", "SET prism.ddl = 'local'; "+tc.ddl)
		if err := a.Apply(ctx, tc.tx); err != nil {
			t.Fatalf("%s: Apply after the schema change = %v", tc.name, err)
		}
	}
	if got := tableRows(t, ctx, a.pool, "s.soon") + "/" + queryString(t, ctx, a.pool, "SELECT later FROM s.t WHERE id = 9"); got != `{"id":1}/L` {
		t.Fatalf("rows applied after their schema change = %s", got)
	}
}

// TestDDLDeadLetterJSON: a schema change keeps its statement, search_path
// and role through prism.dead_letters' JSON form.
func TestDDLDeadLetterJSON(t *testing.T) {
	r := rel("public", "t", decode.IdentityDefault, "id*")
	in := []decode.Change{ins(r, "1"), {Op: decode.OpDDL, DDL: &decode.DDL{Command: "ALTER TABLE t ADD c int", SearchPath: "public", Role: "app"}}}
	b, err := MarshalChanges(in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := UnmarshalChanges(b)
	if err != nil {
		t.Fatalf("UnmarshalChanges(%s) = %v", b, err)
	}
	if len(out) != 2 || out[1].Op != decode.OpDDL || out[1].DDL == nil || *out[1].DDL != *in[1].DDL {
		t.Fatalf("UnmarshalChanges(%s) = %+v, want the DDL back", b, out)
	}
	if _, err := UnmarshalChanges([]byte(`[{"op": "DDL"}]`)); err == nil {
		t.Fatal("UnmarshalChanges(DDL without statement) = nil error, want one")
	}
}

// TestDDLApplyStream: a schema change inside a transaction applied in
// chunks (a spilled one: a migration that adds a column and fills it)
// runs at its place, and the rows after it, in later chunks, use the new
// column.
func TestDDLApplyStream(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "ddlstream"})
	a := newApplier(t, ctx, c, "postgres", WithDDL(true), WithLocalRegion("eu"))
	mustExec(t, ctx, c, "postgres", "CREATE TABLE big (id int PRIMARY KEY)")
	narrow := rel("public", "big", decode.IdentityDefault, "id*")
	wide := rel("public", "big", decode.IdentityDefault, "id*", "tag")
	var changes []decode.Change
	for i := 0; i < 3000; i++ {
		changes = append(changes, ins(narrow, fmt.Sprint(i)))
	}
	changes = append(changes, decode.Change{Op: decode.OpDDL, DDL: &decode.DDL{Command: "ALTER TABLE big ADD COLUMN tag text", SearchPath: "public"}})
	for i := 3000; i < 6000; i++ {
		changes = append(changes, ins(wide, fmt.Sprint(i), "t"+fmt.Sprint(i%7)))
	}
	var calls int
	if err := a.ApplyStream(ctx, txn("na", 100, 1), chunked(changes, 1000, -1, &calls)); err != nil {
		t.Fatalf("ApplyStream: %v", err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(*) || '/' || count(tag) || '/' || min(id) FILTER (WHERE tag IS NOT NULL) FROM big"); got != "6000/3000/3000" {
		t.Fatalf("rows/tagged/first tagged = %s, want 6000/3000/3000", got)
	}
}

// TestRetryDDL: a dead-letter retry runs a parked schema change under the
// rule of the live apply path: refused (55000, still parked, nothing
// applied) while ddl is off, run once it is on; a schema change without
// its statement is refused (22023) on every path instead of run or
// dereferenced.
func TestRetryDDL(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "retryddl"})
	mustExec(t, ctx, c, "postgres", "CREATE TABLE t (id int PRIMARY KEY)")
	on := newApplier(t, ctx, c, "postgres", WithDDL(true), WithLocalRegion("eu"))
	off := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	if err := on.Setup(ctx); err != nil { // installs prism.ddl_run
		t.Fatal(err)
	}
	column := func() string {
		return queryString(t, ctx, on.pool, "SELECT count(*)::text FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'b'")
	}
	tx := txn("na", 0x100, 1, decode.Change{Op: decode.OpDDL, DDL: &decode.DDL{Command: "ALTER TABLE t ADD COLUMN b int", SearchPath: "public", Role: "postgres"}})
	if parked, err := on.Park(ctx, tx, permanent("42P07", "parked for the test"), StatusParked); err != nil || !parked {
		t.Fatalf("Park = %v, %v; want true, nil", parked, err)
	}
	dls, err := on.DeadLetters(ctx, "na", StatusParked)
	if err != nil || len(dls) != 1 {
		t.Fatalf("DeadLetters = %v, %v; want one", dls, err)
	}
	id := dls[0].ID

	err = off.Retry(ctx, id)
	var e *Error
	if !errors.As(err, &e) || e.SQLState != "55000" || e.Op != decode.OpDDL || e.Retryable || !strings.Contains(e.Error(), "ddl is off") {
		t.Fatalf("Retry with ddl off = %v, want a permanent 55000 Error of the DDL saying ddl is off", err)
	}
	if got := column(); got != "0" {
		t.Fatalf("column b exists after a retry with ddl off (count %s): the schema change ran", got)
	}
	dls, _ = off.DeadLetters(ctx, "na")
	if len(dls) != 1 || dls[0].Status != StatusParked || dls[0].SQLState != "55000" || dls[0].Attempts != 2 {
		t.Fatalf("after the refused retry: %+v, want parked with 55000 and 2 attempts", dls)
	}
	if err := on.Retry(ctx, id); err != nil {
		t.Fatalf("Retry with ddl on = %v", err)
	}
	if got := column(); got != "1" {
		t.Fatalf("column b count after a retry with ddl on = %s, want 1", got)
	}

	// No statement: the live path refuses it, and so does a retry's
	// replay (the JSON form cannot hold one, see TestDDLDeadLetterJSON).
	for _, d := range []*decode.DDL{nil, {SearchPath: "public", Role: "postgres"}} {
		bad := decode.Change{Op: decode.OpDDL, DDL: d}
		err := on.Apply(ctx, txn("na", 0x200, 2, bad))
		if !errors.As(err, &e) || e.SQLState != "22023" || e.Retryable || !strings.Contains(e.Error(), "without its statement") {
			t.Fatalf("Apply(DDL %+v) = %v, want a permanent 22023 Error", d, err)
		}
		err = on.withOrigin(ctx, "na", func(conn *pgxpool.Conn, _ pglogrepl.LSN) error {
			_, _, err := on.replayParked(ctx, conn, id, txn("na", 0x200, 2, bad))
			return err
		})
		if state, retry := classify(err); state != "22023" || retry {
			t.Fatalf("replayParked(DDL %+v) = %v, want 22023", d, err)
		}
	}
}
