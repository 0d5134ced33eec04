package verify

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// TestCompareSchemas: tables whose columns differ only in order are
// alike; a missing table, another column type or default, another key
// and another index are each one difference that names every region's
// version.
func TestCompareSchemas(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "schemas"})
	for db, sql := range map[string]string{
		"a": `CREATE TABLE same (id int PRIMARY KEY, x text, y int);
			CREATE TABLE t (id int PRIMARY KEY, v text DEFAULT 'a', k int NOT NULL);
			CREATE INDEX t_v ON t (v);
			CREATE TABLE only_a (id int PRIMARY KEY);
			CREATE PUBLICATION prism FOR ALL TABLES`,
		"b": `CREATE TABLE same (id int PRIMARY KEY, y int, x text);
			CREATE TABLE t (id int, v varchar(5) DEFAULT 'a', k int NOT NULL, PRIMARY KEY (id, k))`,
	} {
		if err := c.CreateDatabase(ctx, db); err != nil {
			t.Fatal(err)
		}
		if err := c.Exec(ctx, db, sql); err != nil {
			t.Fatal(err)
		}
	}
	diffs, err := CompareSchemas(ctx, []Region{{Name: "a", DSN: c.DSN("a")}, {Name: "b", DSN: c.DSN("b")}}, "prism")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range diffs {
		got = append(got, d.String())
	}
	want := []string{
		"public.only_a: exists in some regions only\n    region a: present\n    region b: missing",
		"public.t: columns differ\n    region a: id integer NOT NULL, k integer NOT NULL, v text DEFAULT 'a'::text\n    region b: id integer NOT NULL, k integer NOT NULL, v character varying(5) DEFAULT 'a'::character varying",
		"public.t: key differs\n    region a: id\n    region b: id, k",
		"public.t: indexes differ\n    region a: CREATE INDEX t_v ON public.t USING btree (v); CREATE UNIQUE INDEX t_pkey ON public.t USING btree (id)\n    region b: CREATE UNIQUE INDEX t_pkey ON public.t USING btree (id, k)",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("CompareSchemas =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestDiffTable: a table some region lacks is one "table" difference;
// otherwise each aspect that differs is one difference, and an empty key
// or index list reads "none".
func TestDiffTable(t *testing.T) {
	regions := []Region{{Name: "na"}, {Name: "eu"}}
	shape := tableShape{columns: "id int", key: "(id)", indexes: ""}
	other := tableShape{columns: "id bigint", key: "", indexes: ""}
	for _, tc := range []struct {
		name   string
		shapes []map[string]tableShape
		want   string
	}{
		{"alike", []map[string]tableShape{{"t": shape}, {"t": shape}}, ""},
		{"missing", []map[string]tableShape{{"t": shape}, {}}, "table eu=missing na=present"},
		{"columns and key", []map[string]tableShape{{"t": shape}, {"t": other}},
			"columns eu=id bigint na=id int; key eu=none na=(id)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, d := range diffTable("t", regions, tc.shapes) {
				got = append(got, d.Aspect+" eu="+d.Regions["eu"]+" na="+d.Regions["na"])
			}
			if s := strings.Join(got, "; "); s != tc.want {
				t.Errorf("diffTable(%s) = %q, want %q", tc.name, s, tc.want)
			}
		})
	}
}
