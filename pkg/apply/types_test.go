package apply

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// typesDDL has about 40 column types; the target has them in another
// order to check matching by name.
var typeCols = []struct{ name, typ, value string }{
	{"c_bool", "boolean", "true"},
	{"c_int2", "smallint", "-32768"},
	{"c_int4", "integer", "2147483647"},
	{"c_int8", "bigint", "-9223372036854775808"},
	{"c_num", "numeric(30,10)", "12345678901234567890.0123456789"},
	{"c_num_nan", "numeric", "'NaN'"},
	{"c_float4", "real", "3.4028235e+38"},
	{"c_float8", "double precision", "'-Infinity'"},
	{"c_float8b", "double precision", "0.1"},
	{"c_money", "money", "1234.56"},
	{"c_text", "text", "E'tab\\there \"quoted\" back\\\\slash ünïcødé 𝄞'"},
	{"c_varchar", "varchar(10)", "'abc'"},
	{"c_char", "char(5)", "'ab'"},
	{"c_name", "name", "'a_name'"},
	{"c_bytea", "bytea", "'\\x00ff10'::bytea"},
	{"c_date", "date", "'2024-02-29'"},
	{"c_time", "time", "'23:59:59.999999'"},
	{"c_timetz", "timetz", "'12:00:00+05:30'"},
	{"c_ts", "timestamp", "'2024-01-01 00:00:00.123456'"},
	{"c_tstz", "timestamptz", "'2024-06-01 12:34:56.789+02'"},
	{"c_tstz_inf", "timestamptz", "'infinity'"},
	{"c_interval", "interval", "'1 year 2 mons 3 days 04:05:06.789'"},
	{"c_uuid", "uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"},
	{"c_json", "json", `'{"b": 1,  "a": [1, 2]}'`},
	{"c_jsonb", "jsonb", `'{"k": "v", "n": null, "u": "\u00e9"}'`},
	{"c_xml", "xml", "'<a b=\"c\">text</a>'"},
	{"c_inet", "inet", "'192.168.0.1/24'"},
	{"c_cidr", "cidr", "'10.0.0.0/8'"},
	{"c_macaddr", "macaddr", "'08:00:2b:01:02:03'"},
	{"c_bit", "bit(5)", "B'10101'"},
	{"c_varbit", "bit varying(8)", "B'101'"},
	{"c_point", "point", "'(1.5,2.5)'"},
	{"c_box", "box", "'((0,0),(1,1))'"},
	{"c_int_arr", "integer[]", "'{1,NULL,3}'"},
	{"c_text_arr", "text[]", `'{"a b","c,d",NULL,"\""}'`},
	{"c_2d_arr", "integer[]", "'{{1,2},{3,4}}'"},
	{"c_int4range", "int4range", "'[1,10)'"},
	{"c_tstzrange", "tstzrange", "'[2024-01-01,2024-02-01)'"},
	{"c_enum", "mood", "'happy'"},
	{"c_domain", "posint", "42"},
	{"c_enum_arr", "mood[]", "'{sad,happy}'"},
	{"c_composite", "pair", "'(1,\"x y\")'"},
	{"c_tsvector", "tsvector", "'a fat cat'"},
	{"c_null", "text", "NULL"},
	{"c_empty", "text", "''"},
}

const typesPrelude = `
	CREATE TYPE mood AS ENUM ('sad', 'happy');
	CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
	CREATE TYPE pair AS (a int, b text);`

// TestTypesRoundTrip inserts a row on a source cluster, builds the Txn
// from the source's text representations, applies it to the target and
// compares the rows byte for byte (row_to_json of both).
func TestTypesRoundTrip(t *testing.T) {
	ctx := testCtx(t)
	src := pgtest.Start(t, pgtest.Options{Name: "tsrc"})
	dst := pgtest.Start(t, pgtest.Options{Name: "tdst"})
	var defs, revDefs, cols, values []string
	for _, c := range typeCols {
		defs = append(defs, c.name+" "+c.typ)
		cols = append(cols, c.name)
		values = append(values, c.value)
	}
	for i := len(typeCols) - 1; i >= 0; i-- {
		revDefs = append(revDefs, typeCols[i].name+" "+typeCols[i].typ)
	}
	mustExec(t, ctx, src, "postgres", typesPrelude+fmt.Sprintf(
		"CREATE TABLE types (id int PRIMARY KEY, %s); INSERT INTO types VALUES (1, %s)",
		strings.Join(defs, ", "), strings.Join(values, ", ")))
	mustExec(t, ctx, dst, "postgres", typesPrelude+fmt.Sprintf(
		"CREATE TABLE types (%s, id int PRIMARY KEY)", strings.Join(revDefs, ", ")))

	srcPool := newPool(t, ctx, src, "postgres")
	texts := make([]*string, len(cols))
	dest := make([]any, len(cols))
	for i := range texts {
		dest[i] = &texts[i]
	}
	sel := make([]string, len(cols))
	for i, c := range cols {
		sel[i] = c + "::text"
	}
	if err := srcPool.QueryRow(ctx, "SELECT "+strings.Join(sel, ", ")+" FROM types WHERE id = 1").Scan(dest...); err != nil {
		t.Fatalf("read source row: %v", err)
	}
	r := rel("public", "types", decode.IdentityDefault, append([]string{"id*"}, cols...)...)
	row := []decode.Value{{Kind: decode.ValueText, Data: []byte("1")}}
	for _, s := range texts {
		if s == nil {
			row = append(row, decode.Value{Kind: decode.ValueNull})
		} else {
			row = append(row, decode.Value{Kind: decode.ValueText, Data: []byte(*s)})
		}
	}
	a := newApplier(t, ctx, dst, "postgres")
	if err := a.Apply(ctx, txn("ts", 1000, 1, decode.Change{Op: decode.OpInsert, Rel: r, New: row})); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	// Compare column by column (the target's column order differs).
	for _, c := range append([]string{"id"}, cols...) {
		q := fmt.Sprintf("SELECT coalesce(to_json(%s)::text, 'NULL') FROM types", c)
		want := queryString(t, ctx, srcPool, q)
		got := queryString(t, ctx, a.pool, q)
		if got != want {
			t.Errorf("column %s: target %s, source %s", c, got, want)
		}
	}
	// Updating by a key of every type works too: replica identity full
	// on a table without a key matches all old columns, including types
	// without equality (json, xml, point).
	mustExec(t, ctx, dst, "postgres", "ALTER TABLE types DROP CONSTRAINT types_pkey, REPLICA IDENTITY FULL")
	full := rel("public", "types", decode.IdentityFull, append([]string{"id"}, cols...)...)
	newRow := append([]decode.Value{{Kind: decode.ValueText, Data: []byte("2")}}, row[1:]...)
	if err := a.Apply(ctx, txn("ts", 1100, 2, decode.Change{Op: decode.OpUpdate, Rel: full, Old: row, New: newRow})); err != nil {
		t.Fatalf("Apply full update: %v", err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(id::text, ',') FROM types"); got != "2" {
		t.Fatalf("ids after full update = %s, want 2", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM prism.conflicts"); got != "0" {
		t.Fatalf("%s conflicts recorded, want 0", got)
	}
}

func TestErrorPolicy(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "epol"})
	mustExec(t, ctx, c, "postgres", "CREATE TABLE strict_t (id int PRIMARY KEY, v text); INSERT INTO strict_t VALUES (1, 'local')")
	a := newApplier(t, ctx, c, "postgres", WithConflicts(LastWriteWins, map[string]Policy{"public.strict_t": ErrorOnConflict}))
	r := rel("public", "strict_t", decode.IdentityDefault, "id*", "v")
	for _, ch := range []decode.Change{ins(r, "1", "remote"), del(r, "2", `\N`), upd(r, nil, "3", "x")} {
		err := a.Apply(ctx, txn("ep", 1000, 1, ch))
		var ae *Error
		if !errors.As(err, &ae) || ae.Retryable || ae.SQLState != "PR001" {
			t.Fatalf("Apply %s under error policy = %v; want permanent PR001", ch.Op, err)
		}
	}
	if got := tableRows(t, ctx, a.pool, "strict_t"); got != `{"id":1,"v":"local"}` {
		t.Fatalf("strict_t = %s", got)
	}
}

// TestTypesUnderOutputSettings applies an insert and an update whose row
// is missing (prism.update_missing inserts it from a text array) to a
// server whose output settings differ from the pinned text form: the
// values arrive exactly, not rounded (extra_float_digits = 0) nor read in
// another date order.
func TestTypesUnderOutputSettings(t *testing.T) {
	ctx := testCtx(t)
	dst := pgtest.Start(t, pgtest.Options{Name: "tsettings", Settings: map[string]string{
		"datestyle": "'SQL, DMY'", "intervalstyle": "'sql_standard'", "extra_float_digits": "0",
		"bytea_output": "'escape'", "timezone": "'Asia/Kolkata'",
	}})
	mustExec(t, ctx, dst, "postgres", `CREATE TABLE v (id int PRIMARY KEY, d date, i interval, f8 float8, f4 real,
		tz timestamptz, b bytea)`)
	a := newApplier(t, ctx, dst, "postgres")
	r := rel("public", "v", decode.IdentityDefault, "id*", "d", "i", "f8", "f4", "tz", "b")
	rows := [][]string{
		{"1", "2024-01-05", "-1 days -02:03:04", "0.3333333333333333", "3.4028235e+38", "2024-06-01 10:34:56.789+00", `\x00ff27`},
		{"2", "2024-01-31", "1 year -2 mons +3 days -04:05:06.5", "1e-310", "1.1754944e-38", "2024-01-05 00:00:00+00", `\x`},
	}
	if err := a.Apply(ctx, txn("ts", 1000, 1, ins(r, rows[0]...), upd(r, nil, rows[1]...))); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	conn, err := decode.Connect(ctx, dst.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, row := range rows {
		var got string
		if err := conn.QueryRow(ctx, "SELECT concat_ws('|', id, d, i, f8, f4, tz, b) FROM v WHERE id = $1", row[0]).Scan(&got); err != nil {
			t.Fatalf("row %s: %v", row[0], err)
		}
		want := strings.Join(row, "|")
		if row[0] == "2" {
			want = strings.Replace(want, "1 year -2 mons +3", "10 mons 3", 1)
		}
		if got != want {
			t.Errorf("row %s = %s, want %s", row[0], got, want)
		}
	}
}

// identityDDL has a table of each column kind: identity ALWAYS as key,
// identity BY DEFAULT as key (both with a stored generated column), an
// identity ALWAYS column outside the key, and one in a REPLICA IDENTITY
// FULL table.
const identityDDL = `
CREATE TABLE id_always (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text, g int GENERATED ALWAYS AS (length(v)) STORED);
CREATE TABLE id_default (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text, g int GENERATED ALWAYS AS (length(v)) STORED);
CREATE TABLE id_nonkey (k text PRIMARY KEY, n bigint GENERATED ALWAYS AS IDENTITY, v text);
CREATE TABLE id_full (n int GENERATED ALWAYS AS IDENTITY, v text);
CREATE TABLE id_only (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY);
ALTER TABLE id_full REPLICA IDENTITY FULL;`

// TestIdentityAndGeneratedColumns applies inserts, updates (also of the
// key, of a missing row and of an identity value the source set to
// DEFAULT) and deletes to tables with identity ALWAYS, identity BY
// DEFAULT and stored generated columns: identity values arrive as the
// source wrote them, generated columns are computed by the target.
func TestIdentityAndGeneratedColumns(t *testing.T) {
	ctx := testCtx(t)
	dst := pgtest.Start(t, pgtest.Options{Name: "identity"})
	mustExec(t, ctx, dst, "postgres", identityDDL)
	a := newApplier(t, ctx, dst, "postgres")
	always := rel("public", "id_always", decode.IdentityDefault, "id*", "v")
	byDefault := rel("public", "id_default", decode.IdentityDefault, "id*", "v")
	nonkey := rel("public", "id_nonkey", decode.IdentityDefault, "k*", "n", "v")
	full := rel("public", "id_full", decode.IdentityFull, "n", "v")
	var lsn uint64 = 1000
	only := rel("public", "id_only", decode.IdentityDefault, "id*")
	apply := func(changes ...decode.Change) time.Time {
		t.Helper()
		lsn += 100
		tx := txn("id", lsn, float64(lsn)/100, changes...)
		if err := a.Apply(ctx, tx); err != nil {
			t.Fatalf("Apply %v: %v", changes[0].Op, err)
		}
		return tx.CommitTime
	}
	for _, r := range []*decode.Relation{always, byDefault} {
		apply(ins(r, "1", "a"), ins(r, "2", "bb"), ins(r, "3", "ccc"))
		apply(upd(r, nil, "1", "aaaa"))         // key unchanged
		apply(upd(r, vals("2"), "100", "bb"))   // SET id = DEFAULT at the source
		apply(upd(r, vals("3"), "101", "cc"))   // key and value
		apply(del(r, "1", `\N`))                // delete
		apply(upd(r, nil, "7", "missing"))      // missing row: inserted
		apply(ins(r, "100", "bb"))              // insert of an existing row
		apply(upd(r, vals("100"), "100", "b2")) // old key sent, unchanged
	}
	apply(ins(nonkey, "a", "1", "x"), ins(nonkey, "b", "2", "y"))
	apply(upd(nonkey, nil, "a", "5", "x2"))                            // identity value changed outside the key
	apply(upd(nonkey, nil, "a", "5", "x3"))                            // unchanged
	apply(upd(nonkey, nil, "b", "9", `\U`))                            // changed, TOASTed value unchanged
	moved := apply(upd(nonkey, vals("b", `\N`, `\N`), "c", "9", "y2")) // key update
	apply(upd(nonkey, nil, "m", "11", "missing"))                      // missing row
	apply(ins(nonkey, "a", "77", "x9"))                                // insert of an existing row, identity differs
	// The same from another region, older than the row: skipped.
	if err := a.Apply(ctx, txn("older", 5000, 1, ins(nonkey, "m", "88", "older"))); err != nil {
		t.Fatalf("Apply older insert: %v", err)
	}
	apply(ins(only, "1"), ins(only, "2"))
	replaced := apply(ins(only, "1")) // an existing row: replaced, newer
	apply(upd(only, vals("2"), "3"))  // SET id = DEFAULT
	apply(ins(full, "1", "x"), ins(full, "2", "y"))
	apply(upd(full, vals("1", "x"), "1", "x2"))
	apply(upd(full, vals("1", "x2"), "3", "x2"))
	apply(upd(full, vals("9", "none"), "10", "missing"))
	apply(del(full, "2", "y"))

	want := map[string]string{
		"id_always":  `{"id":100,"v":"b2","g":2}` + "\n" + `{"id":101,"v":"cc","g":2}` + "\n" + `{"id":7,"v":"missing","g":7}`,
		"id_default": `{"id":100,"v":"b2","g":2}` + "\n" + `{"id":101,"v":"cc","g":2}` + "\n" + `{"id":7,"v":"missing","g":7}`,
		"id_only":    `{"id":1}` + "\n" + `{"id":3}`,
		"id_nonkey":  `{"k":"a","n":77,"v":"x9"}` + "\n" + `{"k":"c","n":9,"v":"y2"}` + "\n" + `{"k":"m","n":11,"v":"missing"}`,
		"id_full":    `{"n":10,"v":"missing"}` + "\n" + `{"n":3,"v":"x2"}`,
	}
	for table, w := range want {
		if got := tableRows(t, ctx, a.pool, table); got != w {
			t.Errorf("%s:\n%s\nwant:\n%s", table, got, w)
		}
	}
	// A moved row carries its transaction's stamp like an updated one.
	if got := queryString(t, ctx, a.pool, "SELECT (pg_xact_commit_timestamp(xmin) = $1)::text FROM id_nonkey WHERE k = 'c'", moved); got != "true" {
		t.Errorf("moved row's commit time is not its transaction's (%s)", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT (pg_xact_commit_timestamp(xmin) = $1)::text FROM id_only WHERE id = 1", replaced); got != "true" {
		t.Errorf("row replaced by a newer insert does not carry its stamp (%s)", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(key::text || ' ' || resolution, ', ' ORDER BY id) FROM prism.conflicts WHERE table_name = 'public.id_nonkey' AND kind = 'insert_exists'"); got != `{"k": "a"} apply_remote, {"k": "m"} keep_local` {
		t.Errorf("insert conflicts on id_nonkey: %s", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM prism.conflicts WHERE kind <> 'update_missing' AND kind <> 'insert_exists'"); got != "0" {
		t.Errorf("%s unexpected conflicts recorded", got)
	}
}

// TestTombstoneKeysPinned: a local delete, in a session with the
// server's own DateStyle, TimeZone and extra_float_digits (none of them
// prism-cdc's pinned text form), leaves the tombstone of a key of date,
// timestamptz and float8 columns under the key's pinned text, the text
// every applied change carries: an older insert of the key from another
// region then finds it and loses, as in every region that applied the
// delete. Under the session's own text it found none and the row came
// back in this region alone.
func TestTombstoneKeysPinned(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "tombpin", Settings: map[string]string{
		"datestyle": "'SQL, DMY'", "extra_float_digits": "0", "timezone": "'Asia/Kolkata'",
	}})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE ev (day date, at timestamptz, f float8, v text, PRIMARY KEY (day, at, f))`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	ev := rel("public", "ev", decode.IdentityDefault, "day*", "at*", "f*", "v")
	key := []string{"2024-01-05", "2024-06-01 10:34:56.789+00", "0.3333333333333333"}
	old := time.Now().Add(-2 * time.Hour).Sub(baseTime).Seconds()
	if err := a.Apply(ctx, txn("na", 1000, old, ins(ev, append(key, "na")...))); err != nil {
		t.Fatal(err)
	}
	local, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close(context.Background())
	if tag, err := local.Exec(ctx, "DELETE FROM ev"); err != nil || tag.RowsAffected() != 1 {
		t.Fatalf("local delete: %v, %v", tag, err)
	}
	if got, want := queryString(t, ctx, a.pool, "SELECT key::text FROM prism.tombstones WHERE table_name = 'public.ev'"),
		`{"f": "0.3333333333333333", "at": "2024-06-01 10:34:56.789+00", "day": "2024-01-05"}`; got != want {
		t.Errorf("tombstone key %s, want %s", got, want)
	}
	// Region as inserted the key an hour ago, before the local delete.
	if err := a.Apply(ctx, txn("as", 2000, old+3600, ins(ev, append(key, "as")...))); err != nil {
		t.Fatal(err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM ev"); got != "0" {
		t.Fatalf("%s rows of ev: an insert older than the local delete came back", got)
	}
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(kind || ' ' || resolution, ', ') FROM prism.conflicts"); got != "insert_deleted keep_deleted" {
		t.Errorf("conflicts = %s, want insert_deleted keep_deleted", got)
	}
}
