package node

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
)

// TestCollectAllTablesPublication runs the node's collection of old
// tombstones and clock floors in a database whose publication is FOR ALL
// TABLES, as the node creates it, and whose prism.clock_floors was made by
// an earlier version without a key: the DELETEs must succeed (a table
// without a key or replica identity in such a publication rejects them,
// 55000) and remove exactly the old rows.
func TestCollectAllTablesPublication(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "collect-pub"})
	if err := c.Exec(ctx, "postgres", `CREATE SCHEMA prism;
		CREATE TABLE prism.clock_floors (xact xid NOT NULL, top xid NOT NULL, floor timestamptz NOT NULL, at timestamptz NOT NULL DEFAULT now());
		INSERT INTO prism.clock_floors (xact, top, floor, at) VALUES ('5', '5', now(), now() - interval '8 days'), ('6', '6', now(), now());
		CREATE TABLE kv (id int PRIMARY KEY);
		CREATE PUBLICATION prism FOR ALL TABLES`); err != nil {
		t.Fatal(err)
	}
	pool, a, log, logs := collectApplier(t, ctx, c)
	for range 2 { // the migration is idempotent
		if err := a.Setup(ctx); err != nil {
			t.Fatalf("Setup: %v", err)
		}
	}
	query := func(sql string) string {
		t.Helper()
		var s string
		if err := pool.QueryRow(ctx, sql).Scan(&s); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		return s
	}
	if got := query(`SELECT count(*)::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'prism' AND c.relkind = 'r' AND c.relreplident IN ('d', 'i')
		AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident))`); got != "0" {
		t.Fatalf("%s tables of schema prism have no key after Setup", got)
	}
	if err := c.Exec(ctx, "postgres", "INSERT INTO kv VALUES (1), (2); DELETE FROM kv"); err != nil {
		t.Fatal(err)
	}
	counts := func() string {
		return query("SELECT (SELECT count(*) FROM prism.tombstones) || ' tombstones, ' || (SELECT count(*) FROM prism.clock_floors) || ' floors'")
	}
	if got := counts(); got != "2 tombstones, 2 floors" {
		t.Fatalf("before collecting: %s", got)
	}

	// Conflict records: one of 31 days ago, one of now.
	if err := c.Exec(ctx, "postgres", `INSERT INTO prism.conflicts (at, source_region, table_name, kind, policy, resolution, winner)
		VALUES (now() - interval '31 days', 'eu', 'public.kv', 'update', 'last_write_wins', 'apply_remote', 'remote'),
		(now(), 'eu', 'public.kv', 'update', 'last_write_wins', 'apply_remote', 'remote')`); err != nil {
		t.Fatal(err)
	}
	n := &Node{log: log, applier: a, cfg: &config.Config{Conflicts: config.Conflicts{Keep: config.DefaultConflictKeep}}}
	if err := n.collect(ctx, tombstoneRetention); err != nil {
		t.Fatalf("collect(%s): %v", tombstoneRetention, err)
	}
	if got := query("SELECT count(*)::text || ' ' || (min(at) > now() - interval '1 day')::text FROM prism.conflicts"); got != "1 true" {
		t.Fatalf("conflict records after collect with conflicts.keep = 30d: %s, want only the recent one", got)
	}
	if got, want := counts(), "2 tombstones, 1 floors"; got != want {
		t.Fatalf("after collect(%s): %s, want %s (only the 8 days old floor removed)", tombstoneRetention, got, want)
	}
	// With no retention everything committed before is old.
	if err := n.collect(ctx, 0); err != nil {
		t.Fatalf("collect(0): %v", err)
	}
	if got, want := counts(), "0 tombstones, 0 floors"; got != want {
		t.Fatalf("after collect(0): %s, want %s", got, want)
	}
	if got := strings.Count(logs.String(), "removed old tombstones and clock floors"); got != 2 {
		t.Fatalf("%d collection log lines, want 2:\n%s", got, logs.String())
	}
}

// TestCollectLoopInstallsMissing: without event trigger prism_install, the
// collect loop's round installs the conflict triggers on a table created
// since the start and says so once.
func TestCollectLoopInstallsMissing(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "collect-install"})
	pool, a, log, logs := collectApplier(t, ctx, c)
	if err := a.Setup(ctx); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	if err := c.Exec(ctx, "postgres", "DROP EVENT TRIGGER prism_install; CREATE TABLE later (id int PRIMARY KEY)"); err != nil {
		t.Fatal(err)
	}
	n := &Node{log: log, applier: a}
	for range 2 {
		n.installMissing(ctx)
	}
	var triggers int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'later'::regclass AND tgname IN ('prism_clock', 'prism_tombstone')").Scan(&triggers); err != nil || triggers != 2 {
		t.Fatalf("triggers on later = %d, %v; want 2", triggers, err)
	}
	if got := strings.Count(logs.String(), `"tables":1,"message":"installed the conflict triggers on tables that had none`); got != 1 {
		t.Fatalf("%d log lines about installing, want 1:\n%s", got, logs.String())
	}
}

// collectApplier opens database postgres of c for a node's collect loop:
// a pool, an applier of region na on it logging to logs, and log.
func collectApplier(t *testing.T, ctx context.Context, c *pgtest.Cluster) (*pgxpool.Pool, *apply.Applier, zerolog.Logger, *syncBuf) {
	t.Helper()
	pool, err := pgxpool.New(ctx, c.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	logs := &syncBuf{}
	log := zerolog.New(logs)
	a := apply.NewApplier(pool, log, apply.WithLocalRegion("na"))
	t.Cleanup(a.Close)
	return pool, a, log, logs
}
