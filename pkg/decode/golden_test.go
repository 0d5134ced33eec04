package decode

import (
	"context"
	"crypto/sha256"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

var update = flag.Bool("update", false, "rewrite golden files and the fuzz seed corpus")

// captured is one pgoutput message as the server sent it.
type captured struct {
	lsn  pglogrepl.LSN
	data []byte
}

// goldenSlot is a logical slot read through the SQL interface, so a test
// sees exactly the messages a walsender would send.
type goldenSlot struct {
	name string
	opts string // plugin options for pg_logical_slot_get_binary_changes
	asm  *Assembler
}

// capture consumes everything the slot has decoded so far.
func capture(ctx context.Context, t *testing.T, c *pgtest.Cluster, s *goldenSlot) []captured {
	t.Helper()
	conn, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, "SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, "+s.opts+")", s.name)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []captured
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
		out = append(out, captured{lsn: lsn, data: data})
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("get changes from %s: %v", s.name, err)
	}
	return out
}

// feedAll feeds captured messages and checks what every Txn must satisfy.
func feedAll(t *testing.T, a *Assembler, msgs []captured) []*Txn {
	t.Helper()
	var txns []*Txn
	for _, m := range msgs {
		txn, err := a.Feed(m.lsn, m.data)
		if err != nil {
			t.Fatalf("Feed(%s, %q) = %v, want no error", m.lsn, m.data, err)
		}
		if txn == nil {
			continue
		}
		if txn.Origin != "na" || txn.Xid == 0 || txn.CommitLSN == 0 || txn.EndLSN <= txn.CommitLSN || txn.CommitTime.IsZero() {
			t.Fatalf("Feed returned txn origin=%q xid=%d commit=%s end=%s time=%s", txn.Origin, txn.Xid, txn.CommitLSN, txn.EndLSN, txn.CommitTime)
		}
		if d := time.Since(txn.CommitTime); d < -time.Hour || d > time.Hour {
			t.Fatalf("commit time %s is not now", txn.CommitTime)
		}
		if n := len(txns); n > 0 && txn.EndLSN <= txns[n-1].EndLSN {
			t.Fatalf("txn end %s not after previous %s", txn.EndLSN, txns[n-1].EndLSN)
		}
		txns = append(txns, txn)
	}
	if a.inFlight() {
		t.Fatalf("assembler still has a transaction in flight after a quiet capture")
	}
	return txns
}

// render prints transactions without LSNs, xids or times, so the output is
// the same on every run.
func render(txns []*Txn) string {
	var b strings.Builder
	for _, txn := range txns {
		fmt.Fprintf(&b, "BEGIN changes=%d\n", len(txn.Changes))
		lines := make([]string, len(txn.Changes))
		for i := range txn.Changes {
			lines[i] = renderChange(&txn.Changes[i])
		}
		if len(lines) > 12 {
			sum := sha256.Sum256([]byte(strings.Join(lines, "\n")))
			head, tail := lines[:4], lines[len(lines)-2:]
			lines = append(append(append([]string{}, head...), fmt.Sprintf("  ... %d changes, sha256 %x", len(lines)-6, sum[:8])), tail...)
		}
		for _, l := range lines {
			b.WriteString(l)
			b.WriteByte('\n')
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

func renderChange(c *Change) string {
	var b strings.Builder
	fmt.Fprintf(&b, "  %s %s", c.Op, renderRel(c.Rel))
	if c.Op == OpTruncate {
		names := make([]string, len(c.Truncated))
		for i, r := range c.Truncated {
			names[i] = r.Schema + "." + r.Table
		}
		fmt.Fprintf(&b, " tables=%s flags=%d", strings.Join(names, ","), c.TruncateFlags)
	}
	if c.DDL != nil {
		fmt.Fprintf(&b, " command=%q search_path=%q role=%q", c.DDL.Command, c.DDL.SearchPath, c.DDL.Role)
	}
	if c.Old != nil {
		b.WriteString("\n    old: " + renderRow(c.Rel, c.Old))
	}
	if c.New != nil {
		b.WriteString("\n    new: " + renderRow(c.Rel, c.New))
	}
	return b.String()
}

func renderRel(r *Relation) string {
	if r == nil {
		return "-"
	}
	cols := make([]string, len(r.Columns))
	for i, col := range r.Columns {
		typ := strconv.FormatUint(uint64(col.TypeOID), 10)
		if col.TypeOID >= 16384 {
			typ = col.TypeName // user type OIDs differ between clusters
		}
		cols[i] = col.Name + ":" + typ
		if col.TypeMod != -1 {
			cols[i] += "(" + strconv.Itoa(int(col.TypeMod)) + ")"
		}
		if col.Key {
			cols[i] += "*"
		}
	}
	return fmt.Sprintf("%s.%s identity=%c [%s]", r.Schema, r.Table, r.ReplicaIdentity, strings.Join(cols, " "))
}

func renderRow(rel *Relation, vals []Value) string {
	parts := make([]string, len(vals))
	for i, v := range vals {
		var s string
		switch v.Kind {
		case ValueNull:
			s = "NULL"
		case ValueUnchanged:
			s = "UNCHANGED"
		case ValueText:
			if len(v.Data) > 80 {
				sum := sha256.Sum256(v.Data)
				s = fmt.Sprintf("<%d bytes sha256 %x>", len(v.Data), sum[:8])
			} else {
				s = strconv.Quote(string(v.Data))
			}
		case ValueBinary:
			s = fmt.Sprintf("0x%x", v.Data)
		}
		parts[i] = rel.Columns[i].Name + "=" + s
	}
	return strings.Join(parts, " ")
}

// goldenCase is a workload: each statement string runs in its own
// implicit transaction (or holds its own BEGIN ... COMMIT).
type goldenCase struct {
	name  string
	stmts []string
	// run replaces stmts for workloads that need a session (COPY, origins).
	run func(ctx context.Context, t *testing.T, c *pgtest.Cluster)
	// check inspects the decoded transactions beyond the golden text.
	check func(t *testing.T, txns []*Txn, filtered uint64)
	// noSeed leaves the capture out of the fuzz corpus (too big).
	noSeed bool
}

const typesTable = `CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE pair AS (a int, b text);
CREATE TABLE alltypes (
	id int8 PRIMARY KEY, c_int2 int2, c_int4 int4, c_numeric numeric(12,3), c_numeric_any numeric,
	c_float4 float4, c_float8 float8, c_bool bool, c_text text, c_varchar varchar(10), c_char char(4),
	c_bytea bytea, c_json json, c_jsonb jsonb, c_uuid uuid, c_date date, c_time time, c_timetz timetz,
	c_timestamp timestamp, c_timestamptz timestamptz, c_interval interval, c_inet inet, c_cidr cidr,
	c_macaddr macaddr, c_money money, c_bit bit(4), c_varbit varbit(8), c_point point, c_box box,
	c_int4range int4range, c_tsvector tsvector, c_xml xml, c_oid oid, c_int_arr int[], c_text_arr text[],
	c_enum mood, c_domain posint, c_composite pair, c_unicode text, c_float_special float8
)`

const typesRow = `INSERT INTO alltypes VALUES (1, -32768, 2147483647, 123456789.125, 1e-20,
	1.5, 3.141592653589793, true, 'it''s a "text"' || E'\n' || 'second line\ttab\\', 'varchar', 'ab',
	'\x00ff10'::bytea, '{"a": [1, 2.5, null]}', '{"b": {"c": true}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
	'2024-02-29', '23:59:59.999999', '12:00:00+05:30', '1999-12-31 23:59:59.5', '2024-01-01 00:00:00+00',
	'1 year 2 mons 3 days 04:05:06.789', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', 12.34,
	B'1010', B'101', '(1.5,-2)', '((0,0),(1,1))', '[1,10)', 'a fat cat sat on a mat', '<a x="1">b</a>', 4294967295,
	'{1,NULL,3}', '{"x,y","z\"q",NULL}', 'happy', 42, ROW(7, 'seven'), 'żółć 日本語 🐘 ÆØÅ', 'NaN')`

func goldenCases() []goldenCase {
	return []goldenCase{
		{name: "identity_default", stmts: []string{
			"CREATE TABLE t_def (id int PRIMARY KEY, v text, n int)",
			"INSERT INTO t_def VALUES (1, 'one', 10), (2, 'two', NULL)",
			"UPDATE t_def SET v = 'uno' WHERE id = 1",
			"UPDATE t_def SET id = 3 WHERE id = 2",
			"DELETE FROM t_def WHERE id = 1",
		}},
		{name: "identity_full", stmts: []string{
			"CREATE TABLE t_full (id int, v text, n int); ALTER TABLE t_full REPLICA IDENTITY FULL",
			"INSERT INTO t_full VALUES (1, 'one', 10), (2, NULL, 20)",
			"UPDATE t_full SET v = 'uno' WHERE id = 1",
			"DELETE FROM t_full WHERE id = 2",
		}},
		{name: "identity_index", stmts: []string{
			"CREATE TABLE t_idx (id int, code text NOT NULL, v text); CREATE UNIQUE INDEX t_idx_code ON t_idx (code); ALTER TABLE t_idx REPLICA IDENTITY USING INDEX t_idx_code",
			"INSERT INTO t_idx VALUES (1, 'a', 'x'), (2, 'b', 'y')",
			"UPDATE t_idx SET v = 'xx' WHERE code = 'a'",
			"UPDATE t_idx SET code = 'c' WHERE code = 'b'",
			"DELETE FROM t_idx WHERE code = 'a'",
		}},
		{name: "identity_nothing", stmts: []string{
			// UPDATE and DELETE are refused by the server on such a table
			// when the publication publishes them; INSERT and TRUNCATE flow.
			"CREATE TABLE t_nothing (id int, v text); ALTER TABLE t_nothing REPLICA IDENTITY NOTHING",
			"INSERT INTO t_nothing VALUES (1, 'one')",
			"TRUNCATE t_nothing",
		}},
		{name: "types", stmts: []string{
			typesTable,
			typesRow,
			"INSERT INTO alltypes (id) VALUES (2)",
			"UPDATE alltypes SET c_text = NULL, c_enum = 'sad', c_float_special = '-Infinity' WHERE id = 1",
			"DELETE FROM alltypes WHERE id = 2",
		}},
		{name: "toast_unchanged", stmts: []string{
			"CREATE TABLE t_toast (id int PRIMARY KEY, big text, n int); ALTER TABLE t_toast ALTER big SET STORAGE EXTERNAL",
			"INSERT INTO t_toast SELECT 1, string_agg(md5(i::text), '') FROM generate_series(1, 400) i",
			"UPDATE t_toast SET n = 5 WHERE id = 1",
			"UPDATE t_toast SET big = 'small' WHERE id = 1",
		}, check: func(t *testing.T, txns []*Txn, _ uint64) {
			c := txns[1].Changes[0]
			if c.New[1].Kind != ValueUnchanged || c.New[1].Data != nil {
				t.Fatalf("update of another column: big = %v, want unchanged", c.New[1])
			}
		}},
		{name: "multi_statement", stmts: []string{
			"CREATE TABLE t_a (id int PRIMARY KEY, v text); CREATE TABLE t_b (id int PRIMARY KEY, a int)",
			"BEGIN; INSERT INTO t_a VALUES (1, 'x'); INSERT INTO t_b VALUES (1, 1); UPDATE t_a SET v = 'y'; INSERT INTO t_a VALUES (2, 'z'); DELETE FROM t_b; COMMIT",
		}},
		{name: "subtransaction_rollback", stmts: []string{
			"CREATE TABLE t_sub (id int PRIMARY KEY, pad text)",
			"BEGIN; INSERT INTO t_sub VALUES (1); SAVEPOINT a; INSERT INTO t_sub VALUES (2); SAVEPOINT b; INSERT INTO t_sub VALUES (3); ROLLBACK TO a; INSERT INTO t_sub VALUES (4); SAVEPOINT c; INSERT INTO t_sub VALUES (5); RELEASE c; COMMIT",
			// Big enough to be streamed (and spilled) at logical_decoding_work_mem=64kB.
			"BEGIN; INSERT INTO t_sub SELECT i, repeat('p', 100) FROM generate_series(100, 1099) i; SAVEPOINT s1; INSERT INTO t_sub SELECT i, repeat('q', 100) FROM generate_series(2000, 3999) i; SAVEPOINT s2; INSERT INTO t_sub SELECT i FROM generate_series(5000, 5999) i; ROLLBACK TO s1; INSERT INTO t_sub SELECT i, repeat('r', 100) FROM generate_series(4000, 4999) i; COMMIT",
		}, check: func(t *testing.T, txns []*Txn, _ uint64) {
			for _, txn := range txns {
				for _, c := range txn.Changes {
					id, _ := strconv.Atoi(string(c.New[0].Data))
					if id == 2 || id == 3 || id >= 2000 && id < 4000 || id >= 5000 {
						t.Fatalf("row %d of a rolled-back subtransaction was emitted", id)
					}
				}
			}
			if n := len(txns[len(txns)-1].Changes); n != 2000 {
				t.Fatalf("big transaction has %d changes, want 2000", n)
			}
		}, noSeed: true},
		{name: "truncate", stmts: []string{
			"CREATE TABLE t_p (id serial PRIMARY KEY); CREATE TABLE t_c (id int PRIMARY KEY, p int REFERENCES t_p); CREATE TABLE t_o (id int PRIMARY KEY)",
			"INSERT INTO t_p DEFAULT VALUES; INSERT INTO t_c VALUES (1, 1); INSERT INTO t_o VALUES (1)",
			"TRUNCATE t_p, t_o RESTART IDENTITY CASCADE",
			"TRUNCATE t_o",
			"TRUNCATE t_c CONTINUE IDENTITY",
		}},
		{name: "copy_10k", run: func(ctx context.Context, t *testing.T, c *pgtest.Cluster) {
			if err := c.Exec(ctx, "postgres", "CREATE TABLE t_copy (id int PRIMARY KEY, v text)"); err != nil {
				t.Fatal(err)
			}
			var data strings.Builder
			for i := 1; i <= 10000; i++ {
				fmt.Fprintf(&data, "%d\trow %d\n", i, i)
			}
			conn, err := c.Connect(ctx, "postgres")
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			if _, err := conn.PgConn().CopyFrom(ctx, strings.NewReader(data.String()), "COPY t_copy FROM STDIN"); err != nil {
				t.Fatal(err)
			}
		}, check: func(t *testing.T, txns []*Txn, _ uint64) {
			if len(txns) != 1 || len(txns[0].Changes) != 10000 {
				t.Fatalf("copy: got %d txns, want one with 10000 changes", len(txns))
			}
			for i, c := range txns[0].Changes {
				if want := strconv.Itoa(i + 1); string(c.New[0].Data) != want {
					t.Fatalf("copy change %d has id %s, want %s", i, c.New[0].Data, want)
				}
			}
		}, noSeed: true},
		{name: "rollback", stmts: []string{
			"CREATE TABLE t_rb (id int PRIMARY KEY)",
			"BEGIN; INSERT INTO t_rb VALUES (1); ROLLBACK",
			"BEGIN; INSERT INTO t_rb SELECT generate_series(10, 3000); ROLLBACK",
			"INSERT INTO t_rb VALUES (2)",
		}},
		{name: "origin_filtered", run: func(ctx context.Context, t *testing.T, c *pgtest.Cluster) {
			conn, err := c.Connect(ctx, "postgres")
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			for _, sql := range []string{
				"CREATE TABLE t_orig (id int PRIMARY KEY, v text)",
				"SELECT pg_replication_origin_create('prism_eu')",
				"SELECT pg_replication_origin_session_setup('prism_eu')",
				"INSERT INTO t_orig VALUES (1, 'from eu')",
				"BEGIN; INSERT INTO t_orig SELECT i, repeat('e', 100) FROM generate_series(100, 599) i; COMMIT",
				"SELECT pg_replication_origin_session_reset()",
				"INSERT INTO t_orig VALUES (2, 'local')",
			} {
				if _, err := conn.Exec(ctx, sql); err != nil {
					t.Fatalf("%s: %v", sql, err)
				}
			}
		}, check: func(t *testing.T, txns []*Txn, filtered uint64) {
			if filtered != 2 {
				t.Fatalf("Filtered() grew by %d, want 2", filtered)
			}
		}},
		{name: "schema_change", stmts: []string{
			"CREATE TABLE t_ddl (id int PRIMARY KEY, v text)",
			"BEGIN; INSERT INTO t_ddl VALUES (1, 'a'); ALTER TABLE t_ddl ADD COLUMN w int; INSERT INTO t_ddl VALUES (2, 'b', 3); COMMIT",
			"UPDATE t_ddl SET w = 4 WHERE id = 1",
		}, check: func(t *testing.T, txns []*Txn, _ uint64) {
			before, after := txns[0].Changes[0].Rel, txns[0].Changes[1].Rel
			if before == after || len(before.Columns) != 2 || len(after.Columns) != 3 {
				t.Fatalf("relation after ALTER: same pointer %v, columns %d then %d; want a new Relation with 3 columns and the old one untouched", before == after, len(before.Columns), len(after.Columns))
			}
		}},
		{name: "logical_messages", stmts: []string{
			"CREATE TABLE t_msg (id int PRIMARY KEY)",
			"SELECT pg_logical_emit_message(false, 'prism_heartbeat', '')",
			"BEGIN; INSERT INTO t_msg VALUES (1); SELECT pg_logical_emit_message(true, 'prism_heartbeat', 'x'); COMMIT",
		}},
	}
}

// TestGolden decodes every kind of change from a real server, once with
// protocol 1 and once with protocol 2 streaming at a 64kB decoding memory
// limit, and compares both with the golden files.
func TestGolden(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "golden", Settings: map[string]string{"logical_decoding_work_mem": "64kB"}})
	for _, sql := range []string{
		"CREATE PUBLICATION prism FOR ALL TABLES",
		"SELECT pg_create_logical_replication_slot('g1', 'pgoutput')",
		"SELECT pg_create_logical_replication_slot('g2', 'pgoutput')",
	} {
		if err := c.Exec(ctx, "postgres", sql); err != nil {
			t.Fatal(err)
		}
	}
	slots := []*goldenSlot{
		{name: "g1", opts: `'proto_version', '1', 'publication_names', 'prism', 'messages', 'true'`, asm: NewAssembler("na")},
		{name: "g2", opts: `'proto_version', '2', 'publication_names', 'prism', 'messages', 'true', 'streaming', 'on'`, asm: NewAssembler("na")},
	}
	streamed := false
	for _, tc := range goldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			if tc.run != nil {
				tc.run(ctx, t, c)
			}
			for _, sql := range tc.stmts {
				if err := c.Exec(ctx, "postgres", sql); err != nil {
					t.Fatalf("%s: %v", sql, err)
				}
			}
			var first string
			for _, s := range slots {
				before := s.asm.Filtered()
				msgs := capture(ctx, t, c, s)
				for _, m := range msgs {
					streamed = streamed || m.data[0] == 'S'
				}
				txns := feedAll(t, s.asm, msgs)
				got := render(txns)
				if tc.check != nil {
					tc.check(t, txns, s.asm.Filtered()-before)
				}
				if first == "" {
					first = got
					checkGolden(t, tc.name, got)
				} else if got != first {
					t.Fatalf("slot %s decoded differently from slot %s:\n%s\nvs\n%s", s.name, slots[0].name, got, first)
				}
				if *update && !tc.noSeed {
					writeSeed(t, tc.name+"_"+s.name, msgs)
				}
			}
		})
	}
	if !streamed {
		t.Fatalf("no Stream Start seen: the protocol 2 slot never streamed, so streaming assembly went untested")
	}
}

func checkGolden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", "golden", name+".golden")
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		t.Fatalf("decoded %s differs from %s:\n--- got\n%s\n--- want\n%s", name, path, got, want)
	}
}

// writeSeed stores a capture in the fuzz corpus, in FuzzAssembler's framing.
func writeSeed(t *testing.T, name string, msgs []captured) {
	t.Helper()
	data := frame(msgs)
	if len(data) > 100<<10 {
		return // too big to be a useful fuzz seed
	}
	path := filepath.Join("testdata", "fuzz", "FuzzAssembler", name)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	content := "go test fuzz v1\n[]byte(" + strconv.Quote(string(data)) + ")\n"
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
