package doctor

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/peers"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func mustExec(t *testing.T, c *pgtest.Cluster, sql string) {
	t.Helper()
	if err := c.Exec(context.Background(), "postgres", sql); err != nil {
		t.Fatal(err)
	}
}

// euConfig loads the configuration of node eu1 of region eu on database
// db, with token right-token, one peer region na (node na1 at naAddr,
// fallback naDB) and the YAML lines extra.
func euConfig(t *testing.T, db, naAddr, naDB, extra string) *config.Config {
	t.Helper()
	return loadConfig(t, fmt.Sprintf(`node: eu1
region: eu
database: %q
listen: "127.0.0.1:1"
auth: {token: right-token}
peers:
  - region: na
    nodes: [{name: na1, addr: %q}]
    database: %q
%s`, db, naAddr, naDB, extra))
}

// loadConfig writes yaml to a file and loads it as the command would.
func loadConfig(t *testing.T, yaml string) *config.Config {
	t.Helper()
	p := filepath.Join(t.TempDir(), "node.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(p)
	if err != nil {
		t.Fatalf("config.Load:\n%s\n%v", yaml, err)
	}
	return cfg
}

// serve runs a real peers.Server for region with token, applying into c,
// and returns its address. It stops at the end of the test.
func serve(t *testing.T, c *pgtest.Cluster, region, node, token string, accept ...string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pool, err := pgxpool.New(ctx, c.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	app := apply.NewApplier(pool, zerolog.Nop(), apply.WithLocalRegion(region))
	sc := peers.NewServerConfig(config.DefaultAckTimeout)
	sc.Region, sc.Node, sc.Token, sc.Insecure, sc.AcceptRegions = region, node, token, true, accept
	srv := peers.NewServer(sc, app, zerolog.Nop())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		srv.Serve(ctx, ln)
	}()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		pool.Close()
	})
	return ln.Addr().String()
}

// closedAddr returns an address nothing listens on: one below the
// kernel's ephemeral range (pgtest.FreeAddr), which no other listener of
// this process is given and no outgoing connection takes.
func closedAddr(t *testing.T) string {
	return pgtest.FreeAddr(t)
}

func TestDoctor(t *testing.T) {
	ctx := testCtx(t)
	// eu is healthy; na has wal_level=replica, a table without a key and a
	// role without REPLICATION or privileges on one table.
	eu := pgtest.Start(t, pgtest.Options{Name: "doctor-eu"})
	na := pgtest.Start(t, pgtest.Options{Name: "doctor-na", Settings: map[string]string{"wal_level": "replica", "track_commit_timestamp": "off"}})
	mustExec(t, eu, `CREATE TABLE accounts (id int PRIMARY KEY, balance int);
		CREATE TABLE orders (id bigserial PRIMARY KEY, note text)`)
	mustExec(t, na, `CREATE TABLE accounts (id int PRIMARY KEY, balance int);
		CREATE TABLE orders (id bigserial PRIMARY KEY, note text);
		CREATE TABLE events (at timestamptz, what text);
		CREATE SCHEMA prism;
		CREATE TABLE prism.clock_floors (xact xid NOT NULL, top xid NOT NULL, floor timestamptz NOT NULL, at timestamptz NOT NULL DEFAULT now());
		CREATE ROLE app_ro LOGIN; GRANT pg_monitor TO app_ro;
		GRANT SELECT, INSERT, UPDATE, DELETE ON accounts, events TO app_ro;
		GRANT SELECT ON orders TO app_ro;
		CREATE ROLE ledger_owner; CREATE TABLE ledger (id int PRIMARY KEY); ALTER TABLE ledger OWNER TO ledger_owner;
		ALTER TABLE ledger REPLICA IDENTITY FULL;
		GRANT SELECT, INSERT, UPDATE, DELETE ON ledger TO app_ro`)

	naNode := serve(t, na, "na", "na1", "right-token", "eu")
	euNode := serve(t, eu, "eu", "eu2", "other-token", "na")
	deadNode := closedAddr(t)

	t.Run("healthy", func(t *testing.T) {
		cfg := euConfig(t, eu.DSN("postgres"), naNode, na.DSN("postgres"), "")
		rep := Run(ctx, cfg, Options{})
		var out strings.Builder
		rep.Write(&out)
		if rep.Blocking() {
			t.Fatalf("Run(healthy) has problems:\n%s", &out)
		}
		for _, want := range []string{
			"[ok]      database eu: wal_level: logical",
			"[ok]      peer na/na1",
			"answers as na/na1",
			"[ok]      fallback database na: reachable",
			"publication prism: does not exist yet",
			// Two regions and bigserial keys: the sequence collides.
			"[warn]    database eu: sequence public.orders_id_seq: feeds public.orders.id with INCREMENT BY 1",
			"fix: ALTER SEQUENCE public.orders_id_seq INCREMENT BY 2 START WITH 2 RESTART WITH 2;", // eu is 0 of 2
			"[ok]      database eu: sync off",
			"[ok]      database eu: conflict triggers: not installed yet",
			"[ok]      database eu: on_apply_error recorded for fallbacks: not recorded yet",
		} {
			if !strings.Contains(out.String(), want) {
				t.Errorf("Run(healthy) output lacks %q:\n%s", want, &out)
			}
		}

		// A pgoutput slot before PostgreSQL 16 is fine; the output plugin
		// check, not the slot's finding, says what prism_pgoutput would
		// spare.
		if err := eu.Exec(ctx, "postgres", "SELECT pg_create_logical_replication_slot('prism_eu', 'pgoutput')"); err != nil {
			t.Fatal(err)
		}
		defer eu.Exec(ctx, "postgres", "SELECT pg_drop_replication_slot('prism_eu')")
		rep = Run(ctx, cfg, Options{})
		fs := rep.Find("database eu: slot prism_eu")
		if len(fs) != 1 || fs[0].Severity != OK || !strings.Contains(fs[0].Message, "plugin pgoutput, ") || !strings.Contains(fs[0].Message, "not streaming") || strings.Contains(fs[0].Message, "prism_pgoutput") {
			t.Errorf("slot finding = %+v, want one OK finding that names the plugin and leaves prism_pgoutput to the output plugin check", fs)
		}
		fs = rep.Find("database eu: output plugin")
		if len(fs) != 1 || fs[0].Severity != OK || !strings.Contains(fs[0].Message, "not installed, and slot prism_eu uses pgoutput") || !strings.Contains(fs[0].Message, "it skips them") {
			t.Errorf("output plugin finding = %+v, want one OK finding on what prism_pgoutput would spare this slot", fs)
		}
	})

	// Another node of the region recorded another on_apply_error: other
	// regions' fallbacks follow it, not this node's.
	t.Run("apply policy recorded by another node", func(t *testing.T) {
		cfg := euConfig(t, eu.DSN("postgres"), naNode, na.DSN("postgres"), "")
		mustExec(t, eu, `CREATE SCHEMA prism; CREATE FUNCTION prism.apply_policy() RETURNS jsonb LANGUAGE sql
			AS $$ SELECT '{"region": "eu", "policy": "dead_letter", "tables": {}, "node": "eu9"}'::jsonb $$`)
		defer mustExec(t, eu, "DROP SCHEMA prism CASCADE")
		fs := Run(ctx, cfg, Options{}).Find("database eu: on_apply_error recorded for fallbacks")
		if len(fs) != 1 || fs[0].Severity != Warn || !strings.Contains(fs[0].Message, "node eu9 of region eu recorded on_apply_error dead_letter") ||
			!strings.Contains(fs[0].Message, "this node's is halt") || !strings.Contains(fs[0].Fix, "same on_apply_error") {
			t.Fatalf("findings = %+v, want one warning naming eu9's dead_letter against this node's halt", fs)
		}
		mustExec(t, eu, `CREATE OR REPLACE FUNCTION prism.apply_policy() RETURNS jsonb LANGUAGE sql
			AS $$ SELECT '{"region": "eu", "policy": "halt", "tables": {}, "node": "eu9"}'::jsonb $$`)
		fs = Run(ctx, cfg, Options{}).Find("database eu: on_apply_error recorded for fallbacks")
		if len(fs) != 1 || fs[0].Severity != OK || fs[0].Message != "halt (recorded by eu9), as this node's" {
			t.Fatalf("findings = %+v, want halt as this node's", fs)
		}
		// Region na resolves conflicts otherwise than this node.
		mustExec(t, na, `CREATE FUNCTION prism.apply_policy() RETURNS jsonb LANGUAGE sql
			AS $$ SELECT '{"region": "na", "policy": "halt", "tables": {}, "node": "na3", "conflicts": "keep_local"}'::jsonb $$`)
		defer mustExec(t, na, "DROP FUNCTION prism.apply_policy()")
		var warned []Finding
		for _, f := range Run(ctx, cfg, Options{}).Find("fallback database na") {
			if f.Severity == Warn {
				warned = append(warned, f)
			}
		}
		if len(warned) != 1 || !strings.Contains(warned[0].Message, "region na resolves conflicts by keep_local, tables map[] (recorded by node na3); this node by last_write_wins") {
			t.Fatalf("fallback database na warnings = %+v, want one about na's keep_local", warned)
		}
		// And replicates schema changes where this node does not.
		mustExec(t, na, `CREATE OR REPLACE FUNCTION prism.apply_policy() RETURNS jsonb LANGUAGE sql
			AS $$ SELECT '{"region": "na", "policy": "halt", "tables": {}, "node": "na3", "conflicts": "last_write_wins", "ddl": "replicate"}'::jsonb $$`)
		warned = warned[:0]
		for _, f := range Run(ctx, cfg, Options{}).Find("fallback database na") {
			if f.Severity == Warn {
				warned = append(warned, f)
			}
		}
		if len(warned) != 1 || !strings.Contains(warned[0].Message, "region na's nodes run with ddl: replicate (recorded by node na3); this node with ddl: off") {
			t.Fatalf("fallback database na warnings = %+v, want one about na's ddl: replicate", warned)
		}
	})

	// A refused token and a host name that does not resolve are problems
	// of the configuration: doctor says so, and does not also ask to start
	// a node of the region.
	t.Run("misconfigured peers", func(t *testing.T) {
		cfg := loadConfig(t, fmt.Sprintf(`node: eu1
region: eu
database: %q
listen: "127.0.0.1:1"
auth: {token: not-the-right-token}
peers:
  - region: na
    nodes: [{name: na1, addr: %q}]
    database: %q
  - region: as
    nodes: [{name: as1, addr: "no-such-host.invalid:7301"}]
    database: %q
`, eu.DSN("postgres"), naNode, na.DSN("postgres"), na.DSN("postgres")))
		rep := Run(ctx, cfg, Options{Timeout: 2 * time.Second})
		var out strings.Builder
		rep.Write(&out)
		for _, tc := range []struct{ check, message, fix string }{
			{"peer na/na1", "refuses this node's credentials: wrong token", "same auth.token"},
			{"peer as/as1", "host no-such-host.invalid cannot be resolved", "fix the addr of node as1"},
		} {
			fs := rep.Find(tc.check)
			if len(fs) != 1 || fs[0].Severity != Problem || !strings.Contains(fs[0].Message, tc.message) || !strings.Contains(fs[0].Fix, tc.fix) {
				t.Errorf("Find(%q) = %+v, want one problem with %q and fix %q:\n%s", tc.check, fs, tc.message, tc.fix, &out)
			}
		}
		if strings.Contains(out.String(), "start a prism-cdc node") || strings.Contains(out.String(), "no node answers") {
			t.Errorf("doctor asks to start a node next to a configuration problem:\n%s", &out)
		}
	})

	t.Run("broken", func(t *testing.T) {
		cfg := loadConfig(t, fmt.Sprintf(`node: na1
region: na
database: %q
listen: "127.0.0.1:1"
auth: {token: right-token}
sync: all
peers:
  - region: eu
    nodes: [{name: eu1, addr: %q}, {name: eu2, addr: %q}]
    database: %q
`, strings.Replace(na.DSN("postgres"), "user=postgres", "user=app_ro", 1), deadNode, euNode, na.DSN("postgres")))
		rep := Run(ctx, cfg, Options{Timeout: 2 * time.Second})
		var out strings.Builder
		rep.Write(&out)
		if !rep.Blocking() {
			t.Fatalf("Run(broken) reports nothing blocking:\n%s", &out)
		}
		tests := []struct {
			check    string
			severity Severity
			message  string
			fix      string
		}{
			{"database na: wal_level", Problem, `wal_level is "replica"`, "ALTER SYSTEM SET wal_level = logical;"},
			{"database na: track_commit_timestamp", Warn, "off", "ALTER SYSTEM SET track_commit_timestamp = on;"},
			{"database na: role app_ro", Problem, "no REPLICATION", "ALTER ROLE app_ro WITH REPLICATION;"},
			{"database na: publication prism", Problem, "not a superuser", "CREATE PUBLICATION prism FOR ALL TABLES;"},
			{"database na: apply privileges", Problem, "lacks EXECUTE on pg_replication_origin_create(text)", "GRANT SET ON PARAMETER session_replication_role TO app_ro;"},
			{"database na: table prism.clock_floors", Problem, "no primary key and no replica identity", "ALTER TABLE prism.clock_floors ADD COLUMN id bigserial PRIMARY KEY;"},
			{"database na: table public.events", Problem, "no primary key", "ALTER TABLE public.events REPLICA IDENTITY FULL;"},
			// One finding for both tables owned by the superuser: the new
			// owner's membership also gives the privileges orders lacks.
			{"database na: privileges on public.accounts, public.orders", Problem, "lacks INSERT, UPDATE, DELETE on public.orders", "ALTER TABLE public.accounts OWNER TO app_owner; ALTER TABLE public.orders OWNER TO app_owner; GRANT app_owner TO app_ro;"},
			{"database na: privileges on public.ledger", Problem, "not the owner ledger_owner", "GRANT ledger_owner TO app_ro;"},
			{"database na: sync all", Warn, "synchronous_standby_names = 'ANY 1 (prism_na1)'", "ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (prism_na1)';"},
			{"database na: conflict triggers", Warn, "missing on public.accounts, public.ledger, public.orders", "SELECT prism.install_all();"},
			{"peer eu/eu1", Warn, "unreachable", "start prism-cdc run on node eu1"},
			{"peer eu/eu2", Problem, "refuses this node's credentials: wrong token", "same auth.token"},
			{"fallback database eu", Problem, "same PostgreSQL cluster", "its own PostgreSQL cluster"},
		}
		for _, tc := range tests {
			fs := rep.Find(tc.check)
			if len(fs) != 1 {
				t.Errorf("Find(%q) = %d findings, want 1:\n%s", tc.check, len(fs), &out)
				continue
			}
			f := fs[0]
			if f.Severity != tc.severity || !strings.Contains(f.Message, tc.message) || !strings.Contains(f.Fix, tc.fix) {
				t.Errorf("finding %q = %s %q fix %q, want %s with %q and fix %q", tc.check, f.Severity, f.Message, f.Fix, tc.severity, tc.message, tc.fix)
			}
		}
		if fs := rep.Find("table public.accounts"); len(fs) != 0 {
			t.Errorf("a table with a primary key is reported: %+v", fs)
		}
		if strings.Contains(out.String(), "right-token") || strings.Contains(out.String(), "other-token") {
			t.Errorf("the report shows a token:\n%s", &out)
		}
		// The fix given for a key of schema prism works as printed.
		if fs := rep.Find("database na: table prism.clock_floors"); len(fs) == 1 {
			_, sql, _ := strings.Cut(fs[0].Fix, "as the table's owner: ")
			mustExec(t, na, sql)
			rep := Run(ctx, cfg, Options{Timeout: 2 * time.Second})
			if fs := rep.Find("table prism.clock_floors"); len(fs) != 0 {
				t.Errorf("prism.clock_floors after the printed fix = %+v, want no finding", fs)
			}
			if fs := rep.Find("database na: keys of schema prism"); len(fs) != 1 || fs[0].Severity != OK {
				t.Errorf("keys of schema prism after the printed fix = %+v, want OK", fs)
			}
		}
		// The fix given for the apply privileges works as printed.
		if fs := rep.Find("database na: apply privileges"); len(fs) == 1 {
			mustExec(t, na, strings.TrimSuffix(fs[0].Fix, "  -- as a superuser"))
			rep = Run(ctx, cfg, Options{Timeout: 2 * time.Second})
			if fs := rep.Find("database na: apply privileges"); len(fs) != 1 || fs[0].Severity != OK {
				t.Errorf("apply privileges after the printed fix = %+v, want OK", fs)
			}
		}
	})
}

// TestDoctorOnePass: a role that lacks table privileges and the owner's
// membership is given the smallest complete set of fixes at once: the
// owner's membership (which brings the table privileges and, the owner
// owning the database, schema prism), not per-table GRANTs and GRANT
// CREATE ON DATABASE first. After the printed fixes nothing is left. The
// missing event trigger is explained with the statement a superuser runs,
// which works as printed.
func TestDoctorOnePass(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "doctor-onepass"})
	mustExec(t, c, `CREATE ROLE app_owner; CREATE ROLE prism LOGIN REPLICATION;
		ALTER DATABASE postgres OWNER TO app_owner;
		GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_session_setup(text),
			pg_replication_origin_session_reset(), pg_replication_origin_session_progress(boolean),
			pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone), pg_replication_origin_progress(text, boolean),
			pg_replication_origin_advance(text, pg_lsn) TO prism;
		GRANT SET ON PARAMETER session_replication_role TO prism;
		CREATE PUBLICATION prism FOR ALL TABLES;
		CREATE TABLE accounts (id int PRIMARY KEY, balance int); ALTER TABLE accounts OWNER TO app_owner;
		CREATE TABLE orders (id int PRIMARY KEY, note text); ALTER TABLE orders OWNER TO app_owner;
		GRANT SELECT ON accounts TO prism`)
	dsn := strings.Replace(c.DSN("postgres"), "user=postgres", "user=prism", 1)
	cfg := loadConfig(t, fmt.Sprintf(`node: na1
region: na
database: %q
listen: "127.0.0.1:1"
auth: {insecure: true}
peers: []
`, dsn))
	report := func() (Report, string) {
		rep := Run(ctx, cfg, Options{Timeout: 2 * time.Second})
		var out strings.Builder
		rep.Write(&out)
		return rep, out.String()
	}
	rep, out := report()
	// Every apply privilege but deadlock_timeout: a warning, with the
	// GRANT, which works as printed.
	ap := rep.Find("database na: apply privileges")
	if len(ap) != 1 || ap[0].Severity != Warn || !strings.Contains(ap[0].Message, "cannot set deadlock_timeout") ||
		!strings.HasPrefix(ap[0].Fix, "GRANT SET ON PARAMETER deadlock_timeout TO prism;") {
		t.Fatalf("apply privileges = %+v, want a warning about deadlock_timeout with its GRANT:\n%s", ap, out)
	}
	// The deadlock_timeout GRANT alone leaves an ok finding that suggests
	// the optional log_min_messages GRANT, and that GRANT works too.
	mustExec(t, c, "GRANT SET ON PARAMETER deadlock_timeout TO prism")
	rep, out = report()
	ap = rep.Find("database na: apply privileges")
	if len(ap) != 1 || ap[0].Severity != OK || !strings.Contains(ap[0].Message, "log_min_messages") ||
		ap[0].Fix != "GRANT SET ON PARAMETER log_min_messages TO prism;  -- optional, as a superuser" {
		t.Fatalf("apply privileges with deadlock_timeout granted = %+v, want OK suggesting the log_min_messages GRANT:\n%s", ap, out)
	}
	mustExec(t, c, strings.TrimSuffix(ap[0].Fix, "  -- optional, as a superuser"))
	rep, out = report()
	if ap := rep.Find("database na: apply privileges"); len(ap) != 1 || ap[0].Severity != OK || ap[0].Fix != "" {
		t.Fatalf("apply privileges after the printed GRANT = %+v, want OK:\n%s", ap, out)
	}
	fs := rep.Find("privileges on public.accounts, public.orders")
	if len(fs) != 1 || fs[0].Severity != Problem || fs[0].Fix != "GRANT app_owner TO prism;" {
		t.Fatalf("privileges = %+v, want one problem fixed by GRANT app_owner TO prism alone:\n%s", fs, out)
	}
	for _, unwanted := range []string{"GRANT SELECT", "GRANT INSERT", "GRANT CREATE ON DATABASE"} {
		if strings.Contains(out, unwanted) {
			t.Errorf("doctor asks for %q, which GRANT app_owner TO prism makes unnecessary:\n%s", unwanted, out)
		}
	}
	if fs := rep.Find("schema prism"); len(fs) != 1 || fs[0].Severity != OK || !strings.Contains(fs[0].Message, "once role prism is granted app_owner") {
		t.Errorf("schema prism = %+v, want OK through the owner's membership:\n%s", fs, out)
	}
	mustExec(t, c, fs[0].Fix)

	// The node starts (as prism): everything but the event trigger is set
	// up, and every start warns that it cannot create it.
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	app := apply.NewApplier(pool, zerolog.Nop(), apply.WithLocalRegion("na"))
	defer app.Close()
	if err := app.Setup(ctx); err != nil {
		t.Fatalf("Setup as prism after the printed fixes: %v", err)
	}
	rep, out = report()
	if rep.Blocking() {
		t.Fatalf("problems left after the printed fixes:\n%s", out)
	}
	et := rep.Find("event trigger prism_install")
	if len(et) != 1 || et[0].Severity != Warn || !strings.Contains(et[0].Message, "only when a running node of the region next looks for such tables (once a minute)") ||
		!strings.Contains(et[0].Fix, "CREATE EVENT TRIGGER prism_install") {
		t.Fatalf("event trigger = %+v, want a warning that explains it, with the statement:\n%s", et, out)
	}
	var stmt []string
	for _, l := range strings.Split(et[0].Fix, "\n") {
		if !strings.HasPrefix(l, "--") {
			stmt = append(stmt, l)
		}
	}
	mustExec(t, c, strings.Join(stmt, "\n"))
	if et := (func() []Finding { r, _ := report(); return r.Find("event trigger prism_install") })(); len(et) != 1 || et[0].Severity != OK {
		t.Fatalf("event trigger after the printed statement = %+v, want OK", et)
	}
	// And it does its job: a table the application's owner role creates
	// now gets its conflict triggers, installed as prism (the role has no
	// rights on schema prism), and the node still starts afterwards.
	conn, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, sql := range []string{"SET ROLE app_owner", "CREATE TABLE later (id int PRIMARY KEY)", "RESET ROLE"} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
		WHERE t.tgrelid = 'later'::regclass AND t.tgname IN ('prism_clock', 'prism_tombstone') AND pg_get_userbyid(p.proowner) = 'prism'`).Scan(&n); err != nil || n != 2 {
		t.Fatalf("triggers on a table created after the fix, with functions owned by prism = %d, %v; want 2", n, err)
	}
	if err := apply.NewApplier(pool, zerolog.Nop(), apply.WithLocalRegion("na")).Setup(ctx); err != nil {
		t.Fatalf("the node's next start: %v", err)
	}
}

// TestDoctorOutputPlugin checks the output plugin finding on PostgreSQL
// 15 as the server's library path changes: prism_pgoutput not installed,
// installed, installed under a pgoutput slot, required by the
// configuration, and required by a slot while no longer loadable. Each
// step runs as a superuser (which LOADs the library) and as a role with
// only REPLICATION (which creates a temporary slot with it), and leaves no
// slot of its own behind; a role with neither cannot tell.
func TestDoctorOutputPlugin(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "doctor-plugin"})
	dir, err := pgtest.PrismPgoutputDir("")
	if err != nil {
		t.Fatal(err)
	}
	libraryPath := func(value string) {
		t.Helper()
		if err := c.SetConf("dynamic_library_path", value); err != nil {
			t.Fatal(err)
		}
		if err := c.Reload(); err != nil {
			t.Fatal(err)
		}
	}
	mustExec(t, c, "CREATE ROLE replicator LOGIN REPLICATION; CREATE ROLE plain LOGIN")
	finding := func(user, plugin string) Finding {
		t.Helper()
		dsn := strings.Replace(c.DSN("postgres"), "user=postgres", "user="+user, 1)
		cfg := euConfig(t, dsn, closedAddr(t), c.DSN("postgres"), "output_plugin: "+plugin+"\n")
		fs := Run(ctx, cfg, Options{Timeout: 2 * time.Second}).Find("database eu: output plugin")
		if len(fs) != 1 {
			t.Fatalf("output_plugin %s: %d output plugin findings, want 1: %+v", plugin, len(fs), fs)
		}
		return fs[0]
	}
	for _, step := range []struct {
		name, libraryPath, plugin, slot string // slot: plugin to create prism_eu with first ("" none)
		severity                        Severity
		message                         string
	}{
		{"not installed", "'$libdir'", "auto", "", OK, "prism_pgoutput is not installed"},
		{"installed", "'" + dir + ":$libdir'", "auto", "", OK, "the node creates its slot with it"},
		{"installed, pgoutput slot", "'" + dir + ":$libdir'", "auto", "pgoutput", OK, "but slot prism_eu uses pgoutput"},
		{"required, not installed", "'$libdir'", "prism_pgoutput", "", Problem, "output_plugin is prism_pgoutput, which the server cannot load"},
		{"required, installed", "'" + dir + ":$libdir'", "prism_pgoutput", "", OK, "the server loads prism_pgoutput"},
		{"slot's plugin gone", "'$libdir'", "auto", "prism_pgoutput", Problem, "slot prism_eu uses prism_pgoutput, which the server cannot load"},
	} {
		for _, user := range []string{"postgres", "replicator"} {
			t.Run(step.name+" as "+user, func(t *testing.T) {
				libraryPath("'" + dir + ":$libdir'") // to create a prism_pgoutput slot
				mustExec(t, c, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
				if step.slot != "" {
					mustExec(t, c, fmt.Sprintf("SELECT pg_create_logical_replication_slot('prism_eu', '%s')", step.slot))
				}
				libraryPath(step.libraryPath)
				f := finding(user, step.plugin)
				if f.Severity != step.severity || !strings.Contains(f.Message, step.message) {
					t.Fatalf("finding = %s %q, want %s with %q", f.Severity, f.Message, step.severity, step.message)
				}
				t.Logf("%s: %s", f.Severity, f.Message)
				conn, err := c.Connect(ctx, "postgres")
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close(context.Background())
				var left int
				if err := conn.QueryRow(ctx, "SELECT count(*)::int FROM pg_replication_slots WHERE slot_name <> 'prism_eu'").Scan(&left); err != nil || left != 0 {
					t.Fatalf("slots other than prism_eu after doctor = %d, %v; want 0", left, err)
				}
			})
		}
	}
	// A transaction running meanwhile keeps the temporary slot waiting
	// past its timeout, after the server loaded the plugin: installed.
	libraryPath("'" + dir + ":$libdir'")
	mustExec(t, c, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
	open, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close(context.Background())
	if _, err := open.Exec(ctx, "BEGIN; SELECT pg_current_xact_id()"); err != nil {
		t.Fatal(err)
	}
	if f := finding("replicator", "auto"); f.Severity != OK || !strings.Contains(f.Message, "the node creates its slot with it") {
		t.Fatalf("installed, a transaction running, as replicator: finding = %s %q, want the plugin found", f.Severity, f.Message)
	}
	if _, err := open.Exec(ctx, "ROLLBACK"); err != nil {
		t.Fatal(err)
	}
	// A role that can neither LOAD nor create a slot cannot tell; it says
	// so only where the plugin is required.
	if f := finding("plain", "prism_pgoutput"); f.Severity != Warn || !strings.Contains(f.Message, "can check that the server can load it") {
		t.Fatalf("required, as a role without REPLICATION: finding = %s %q, want a warning that it cannot check", f.Severity, f.Message)
	}
	cfg := euConfig(t, strings.Replace(c.DSN("postgres"), "user=postgres", "user=plain", 1), closedAddr(t), c.DSN("postgres"), "output_plugin: auto\n")
	if fs := Run(ctx, cfg, Options{Timeout: 2 * time.Second}).Find("database eu: output plugin"); len(fs) != 0 {
		t.Fatalf("useful only, as a role without REPLICATION: %+v, want no finding", fs)
	}
}
