package verify

import (
	"context"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// TestForeignKeyViolations: two regions hold equal rows that violate
// foreign keys (written as an applier writes, with
// session_replication_role = replica). Compare reports each violated
// constraint in each region with an exact count and the first FKKeys keys:
// a composite key referencing a table in another schema through a
// cross-type operator, MATCH SIMPLE (any NULL is no violation) and MATCH
// FULL (only all NULL is none), and a key referencing a partitioned table
// (whose per-partition constraint clones must not count a row of another
// partition as missing). A table outside the publication is not checked.
// Once the orphans are deleted the report is OK.
func TestForeignKeyViolations(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	schema := `CREATE SCHEMA ref;
		CREATE TABLE ref.customers (tenant int, id int, PRIMARY KEY (tenant, id));
		CREATE TABLE orders (id int PRIMARY KEY, tenant bigint, customer_id int,
			CONSTRAINT orders_customer_fk FOREIGN KEY (tenant, customer_id) REFERENCES ref.customers (tenant, id));
		CREATE TABLE shipments (id int PRIMARY KEY, tenant int, customer_id int,
			CONSTRAINT shipments_customer_fk FOREIGN KEY (tenant, customer_id) REFERENCES ref.customers MATCH FULL);
		CREATE TABLE scratch (id int PRIMARY KEY, tenant int, customer_id int,
			FOREIGN KEY (tenant, customer_id) REFERENCES ref.customers);
		CREATE TABLE ref.sites (id int PRIMARY KEY) PARTITION BY RANGE (id);
		CREATE TABLE ref.sites_low PARTITION OF ref.sites FOR VALUES FROM (0) TO (100);
		CREATE TABLE ref.sites_high PARTITION OF ref.sites FOR VALUES FROM (100) TO (1000);
		CREATE TABLE visits (id int PRIMARY KEY, site int CONSTRAINT visits_site_fk REFERENCES ref.sites);
		INSERT INTO ref.customers VALUES (1, 1), (1, 2), (2, 1);
		INSERT INTO ref.sites VALUES (5), (150);
		SET session_replication_role = replica;
		INSERT INTO orders VALUES (10, 1, 2), (11, 1, 9), (12, 3, 1), (13, 99, NULL), (14, NULL, NULL);
		INSERT INTO shipments VALUES (20, 1, 1), (21, NULL, NULL), (22, 1, NULL), (23, 2, 2);
		INSERT INTO scratch VALUES (30, 7, 7);
		INSERT INTO visits VALUES (40, 5), (41, 150), (42, 500);
		RESET session_replication_role;`
	a := pgtest.Start(t, pgtest.Options{Name: "verify-fk-a"})
	b := pgtest.Start(t, pgtest.Options{Name: "verify-fk-b"})
	mustExec(t, a, schema+"CREATE PUBLICATION prism FOR TABLE ref.customers, orders, shipments, ref.sites_low, ref.sites_high, visits;")
	mustExec(t, b, schema)
	regions := []Region{{Name: "a", DSN: a.DSN("postgres")}, {Name: "b", DSN: b.DSN("postgres")}}

	rep, err := CompareWith(ctx, regions, "prism", Options{FKKeys: 1})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Equal() || rep.OK() {
		t.Fatalf("CompareWith: Equal() = %v, OK() = %v; want equal regions that are not OK", rep.Equal(), rep.OK())
	}
	type got struct {
		region, table, constraint, ref string
		count                          int64
		keys                           string
	}
	var gots []got
	for _, v := range rep.Violations {
		var keys []string
		for i := range v.Keys {
			keys = append(keys, v.KeyString(i))
		}
		gots = append(gots, got{v.Region, v.Table, v.Constraint, v.Referenced, v.Count, strings.Join(keys, " ")})
	}
	want := []got{
		{"a", "public.orders", "orders_customer_fk", "ref.customers", 2, "(tenant, customer_id)=(1, 9)"},
		{"a", "public.shipments", "shipments_customer_fk", "ref.customers", 2, "(tenant, customer_id)=(1, NULL)"},
		{"a", "public.visits", "visits_site_fk", "ref.sites", 1, "(site)=(500)"},
		{"b", "public.orders", "orders_customer_fk", "ref.customers", 2, "(tenant, customer_id)=(1, 9)"},
		{"b", "public.shipments", "shipments_customer_fk", "ref.customers", 2, "(tenant, customer_id)=(1, NULL)"},
		{"b", "public.visits", "visits_site_fk", "ref.sites", 1, "(site)=(500)"},
	}
	if !reflect.DeepEqual(gots, want) {
		t.Fatalf("Violations = %+v,\nwant %+v", gots, want)
	}

	// The SQL handed to the operator finds exactly the offending rows, and
	// deletes them.
	conn, err := a.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, v := range rep.Violations[:3] {
		rows, err := conn.Query(ctx, v.FindSQL)
		if err != nil {
			t.Fatalf("FindSQL %q: %v", v.FindSQL, err)
		}
		var n int64
		for rows.Next() {
			n++
		}
		rows.Close()
		if rows.Err() != nil || n != v.Count {
			t.Fatalf("FindSQL %q found %d rows (%v), want %d", v.FindSQL, n, rows.Err(), v.Count)
		}
	}
	for _, v := range rep.Violations {
		c := a
		if v.Region == "b" {
			c = b
		}
		mustExec(t, c, v.DeleteSQL)
	}
	rep, err = CompareWith(ctx, regions, "prism", Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Fatalf("CompareWith after deleting the orphans: Equal() = %v, Violations = %+v", rep.Equal(), rep.Violations)
	}
	var left int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM orders WHERE id IN (10, 13, 14)").Scan(&left); err != nil || left != 3 {
		t.Fatalf("rows that violate nothing: %d left (%v), want 3", left, err)
	}
}
