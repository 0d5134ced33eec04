package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/node"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// outputSettings gives every region servers whose output settings differ
// from each other's and from the text form prism-cdc pins.
var outputSettings = map[string]map[string]string{
	"na": {"datestyle": "'SQL, DMY'", "intervalstyle": "'sql_standard'", "extra_float_digits": "0",
		"bytea_output": "'escape'", "timezone": "'Asia/Kolkata'"},
	"eu": {"datestyle": "'German, MDY'", "intervalstyle": "'iso_8601'", "extra_float_digits": "1",
		"bytea_output": "'hex'", "timezone": "'America/New_York'"},
	"as": {"datestyle": "'Postgres, YMD'", "intervalstyle": "'postgres_verbose'", "extra_float_digits": "-5",
		"bytea_output": "'escape'", "timezone": "'Pacific/Chatham'"},
}

const valuesSchema = `
CREATE TABLE vals (id int PRIMARY KEY, d date, d2 date, i interval, f8 float8, f8b float8, f8c float8, f4 real,
	tz timestamptz, b bytea, a date[]);
CREATE TABLE dated (d date PRIMARY KEY, i interval, v text);
`

// valuesRow selects vals as one text row; run on a session with the
// pinned text form it is the canonical form every region must hold.
const valuesRow = `SELECT string_agg(concat_ws('|', id, d, coalesce(d2::text, 'NULL'), i, f8, f8b, f8c, f4, tz, b, a), E'\n' ORDER BY id) || E'\n' ||
	(SELECT string_agg(concat_ws('|', d, i, v), E'\n' ORDER BY d) FROM dated) FROM vals`

// TestValuesExactAcrossOutputSettings writes dates, intervals, floats,
// timestamptz and bytea in region na, whose server prints them as
// 05/01/2024, sql_standard intervals and rounded floats, and checks that
// eu (applied through the direct-SQL fallback: its node never runs) and
// as (applied by its node) hold exactly the same values, that verify finds
// the regions equal, and that it does find a real difference.
func TestValuesExactAcrossOutputSettings(t *testing.T) {
	d := New(t, Topology{"na": {"na1"}, "eu": {"eu1"}, "as": {"as1"}}, valuesSchema)
	for r, settings := range outputSettings {
		c := d.Clusters[r]
		for k, v := range settings {
			if err := c.SetConf(k, v); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.Reload(); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	na := connect(t, d, "na")
	d.Eventually(30*time.Second, "na's server settings in effect", func() bool {
		var ds string
		return na.QueryRow(ctx, "SELECT current_setting('datestyle') FROM pg_stat_activity LIMIT 1").Scan(&ds) == nil && ds == "SQL, DMY"
	})
	d.Start("na1")
	d.Start("as1")
	d.Eventually(60*time.Second, "na1 and as1 read their regions", func() bool {
		return d.Role("na1") == node.RoleReader && d.Role("as1") == node.RoleReader
	})
	for _, sql := range []string{
		`INSERT INTO vals VALUES (1, '2024-01-05', '2024-01-31', '-1 days -02:03:04', 0.1, 1e-310, 1/3::float8, 3.4028235e38,
			'2024-06-01 12:34:56.789+02', '\x00ff27'::bytea, '{2024-01-05,2024-12-31}')`,
		`INSERT INTO vals VALUES (2, '0099-03-01 BC', NULL, '1 year -2 mons +3 days -04:05:06.5', 'NaN', '-0', 2/3::float8, 1.17549435e-38,
			'infinity', '', '{}')`,
		`INSERT INTO dated VALUES ('2024-01-05', '-1 days -02:03:04', 'a'), ('2024-01-31', '1 day', 'b')`,
		`UPDATE vals SET f8 = f8 + 0.2, d = '2024-02-05', i = i - '1 second' WHERE id = 1`,
		`UPDATE dated SET v = 'a2', i = '-2 days -00:00:01' WHERE d = '2024-01-05'`,
		`UPDATE dated SET d = '2024-03-31' WHERE d = '2024-01-31'`,
	} {
		if _, err := na.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	want := strings.Join([]string{
		`1|2024-02-05|2024-01-31|-1 days -02:03:05|0.30000000000000004|1e-310|0.3333333333333333|3.4028235e+38|2024-06-01 10:34:56.789+00|\x00ff27|{2024-01-05,2024-12-31}`,
		`2|0099-03-01 BC|NULL|10 mons 3 days -04:05:06.5|NaN|-0|0.6666666666666666|1.1754944e-38|infinity|\x|{}`,
		`2024-01-05|-2 days -00:00:01|a2`,
		`2024-03-31|1 day|b`,
	}, "\n")
	canonical := func(r string) string {
		c, err := decode.Connect(ctx, d.Clusters[r].DSN("app"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		var s *string
		if err := c.QueryRow(ctx, valuesRow).Scan(&s); err != nil {
			t.Fatalf("region %s: %v", r, err)
		}
		if s == nil {
			return ""
		}
		return *s
	}
	if got := canonical("na"); got != want {
		t.Fatalf("source rows:\n%s\nwant:\n%s", got, want)
	}
	for _, r := range []string{"eu", "as"} {
		d.Eventually(60*time.Second, "region "+r+" holds the source's values", func() bool { return canonical(r) == want })
	}
	if ts := d.Target("na1", "eu"); ts.Fallbacks == 0 {
		t.Fatalf("na1 reached eu without the direct-SQL fallback: %+v", ts)
	}
	if rep := d.Verify(ctx); !rep.Equal() {
		t.Fatalf("verify finds the regions different: %+v", rep)
	}

	// A difference below what extra_float_digits = 0 prints is found.
	eu := connect(t, d, "eu")
	if _, err := eu.Exec(ctx, "UPDATE vals SET f8c = 0.33333333333333337 WHERE id = 1"); err != nil {
		t.Fatal(err)
	}
	rep := d.Verify(ctx)
	if rep.Equal() {
		t.Fatalf("verify misses a changed float8 in eu: %+v", rep)
	}
	for _, tr := range rep.Tables {
		if tr.Equal != (tr.Table != "public.vals") {
			t.Errorf("verify: table %s equal = %v", tr.Table, tr.Equal)
		}
	}
}

const identitySchema = `
CREATE TABLE id_always (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text, g int GENERATED ALWAYS AS (length(v)) STORED);
CREATE TABLE id_default (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text, g int GENERATED ALWAYS AS (length(v)) STORED);
CREATE TABLE id_nonkey (k text PRIMARY KEY, n bigint GENERATED ALWAYS AS IDENTITY (START 1000), v text);
`

// TestIdentityColumnsReplicate writes tables with identity ALWAYS,
// identity BY DEFAULT and stored generated columns in na (inserts,
// updates, SET id = DEFAULT, a key update, deletes); eu (direct-SQL
// fallback) and as (its node) must hold the same rows.
func TestIdentityColumnsReplicate(t *testing.T) {
	d := New(t, Topology{"na": {"na1"}, "eu": {"eu1"}, "as": {"as1"}}, identitySchema)
	d.Start("na1")
	d.Start("as1")
	d.Eventually(60*time.Second, "na1 and as1 read their regions", func() bool {
		return d.Role("na1") == node.RoleReader && d.Role("as1") == node.RoleReader
	})
	ctx := context.Background()
	na := connect(t, d, "na")
	for _, sql := range []string{
		`INSERT INTO id_always (v) SELECT 'v' || g FROM generate_series(1, 5) g`,
		`INSERT INTO id_default (v) SELECT 'v' || g FROM generate_series(1, 5) g`,
		`INSERT INTO id_default (id, v) VALUES (50, 'explicit')`,
		`INSERT INTO id_nonkey (k, v) SELECT 'k' || g, 'v' || g FROM generate_series(1, 4) g`,
		`UPDATE id_always SET v = 'updated' WHERE id = 1`,
		`UPDATE id_always SET id = DEFAULT WHERE id = 2`,
		`UPDATE id_always SET id = DEFAULT, v = 'moved' WHERE id = 3`,
		`DELETE FROM id_always WHERE id = 4`,
		`UPDATE id_default SET v = 'updated' WHERE id = 1`,
		`UPDATE id_default SET id = 60 WHERE id = 2`,
		`UPDATE id_default SET id = DEFAULT WHERE id = 3`,
		`DELETE FROM id_default WHERE id = 4`,
		`UPDATE id_nonkey SET n = DEFAULT WHERE k = 'k1'`,
		`UPDATE id_nonkey SET v = 'updated' WHERE k = 'k2'`,
		`UPDATE id_nonkey SET k = 'k30', n = DEFAULT WHERE k = 'k3'`,
		`DELETE FROM id_nonkey WHERE k = 'k4'`,
	} {
		if _, err := na.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	conns := map[string]*pgx.Conn{"na": na, "eu": connect(t, d, "eu"), "as": connect(t, d, "as")}
	rows := func(r string) string {
		c := conns[r]
		var s string
		err := c.QueryRow(ctx, `SELECT concat_ws(E'\n',
			(SELECT string_agg(row_to_json(x)::text, ',' ORDER BY id) FROM id_always x),
			(SELECT string_agg(row_to_json(x)::text, ',' ORDER BY id) FROM id_default x),
			(SELECT string_agg(row_to_json(x)::text, ',' ORDER BY k) FROM id_nonkey x))`).Scan(&s)
		if err != nil {
			t.Fatalf("region %s: %v", r, err)
		}
		return s
	}
	want := strings.Join([]string{
		`{"id":1,"v":"updated","g":7},{"id":5,"v":"v5","g":2},{"id":6,"v":"v2","g":2},{"id":7,"v":"moved","g":5}`,
		`{"id":1,"v":"updated","g":7},{"id":5,"v":"v5","g":2},{"id":6,"v":"v3","g":2},{"id":50,"v":"explicit","g":8},{"id":60,"v":"v2","g":2}`,
		`{"k":"k1","n":1004,"v":"v1"},{"k":"k2","n":1001,"v":"updated"},{"k":"k30","n":1005,"v":"v3"}`,
	}, "\n")
	if got := rows("na"); got != want {
		t.Fatalf("source rows:\n%s\nwant:\n%s", got, want)
	}
	for _, r := range []string{"eu", "as"} {
		d.Eventually(60*time.Second, "region "+r+" holds the source's rows", func() bool { return rows(r) == want })
	}
	if ts := d.Target("na1", "eu"); ts.Fallbacks == 0 {
		t.Fatalf("na1 reached eu without the direct-SQL fallback: %+v", ts)
	}
	if rep := d.Verify(ctx); !rep.Equal() {
		t.Fatalf("verify finds the regions different: %+v", rep)
	}
}
