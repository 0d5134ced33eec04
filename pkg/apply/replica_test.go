package apply

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestApplyAsReplica: applied transactions run with session_replication_role
// = replica, like PostgreSQL's own apply worker. The source's triggers and
// cascades already ran there and their effects arrive as rows of the same
// transaction; firing them again in the target would write those rows twice
// (an audit trigger's audit table would differ between the regions) and
// make a shipped cascade look like a conflict.
func TestApplyAsReplica(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "replica"})
	mustExec(t, ctx, c, "postgres", `
		CREATE TABLE kv (id int PRIMARY KEY, v text);
		CREATE TABLE kv_audit (id int PRIMARY KEY, kv_id int, v text);
		CREATE SEQUENCE kv_audit_id START 1000;
		CREATE TABLE seen (kv_id int);
		CREATE FUNCTION kv_audit() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			INSERT INTO kv_audit VALUES (nextval('kv_audit_id'), NEW.id, NEW.v);
			RETURN NULL;
		END $$;
		CREATE TRIGGER kv_audit AFTER INSERT OR UPDATE ON kv FOR EACH ROW EXECUTE FUNCTION kv_audit();
		CREATE FUNCTION kv_seen() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			INSERT INTO seen VALUES (NEW.id);
			RETURN NULL;
		END $$;
		CREATE TRIGGER kv_seen AFTER INSERT ON kv FOR EACH ROW EXECUTE FUNCTION kv_seen();
		ALTER TABLE kv ENABLE ALWAYS TRIGGER kv_seen;
		CREATE TABLE parent (id int PRIMARY KEY);
		CREATE TABLE child (id int PRIMARY KEY, parent int REFERENCES parent ON DELETE CASCADE);
	`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	pool := a.pool
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v")
	audit := rel("public", "kv_audit", decode.IdentityDefault, "id*", "kv_id", "v")
	parent := rel("public", "parent", decode.IdentityDefault, "id*")
	child := rel("public", "child", decode.IdentityDefault, "id*", "parent")
	conflicts := func() string {
		return queryString(t, ctx, pool, "SELECT count(*)::text FROM prism.conflicts")
	}

	// The source's write and the audit row its trigger wrote.
	if err := a.Apply(ctx, txn("na", 1000, 1, ins(kv, "1", "a"), ins(audit, "1", "1", "a"))); err != nil {
		t.Fatalf("apply insert: %v", err)
	}
	if got, want := tableRows(t, ctx, pool, "kv_audit"), `{"id":1,"kv_id":1,"v":"a"}`; got != want {
		t.Errorf("kv_audit after the applied insert = %s, want only the shipped row %s", got, want)
	}
	// A trigger the operator enabled ALWAYS still fires on applied rows.
	if got := tableRows(t, ctx, pool, "seen"); got != `{"kv_id":1}` {
		t.Errorf("seen = %q, want the ENABLE ALWAYS trigger to have fired once", got)
	}

	if err := a.Apply(ctx, txn("na", 1500, 1.5, ins(parent, "1"), ins(child, "10", "1"))); err != nil {
		t.Fatalf("apply parent and child: %v", err)
	}
	// The source deleted a parent; its cascade deleted the child there, and
	// both deletes arrive. The target's cascade must not run first and turn
	// the child's delete into a missing row.
	if err := a.Apply(ctx, txn("na", 2000, 2, del(parent, "1"), del(child, "10", `\N`))); err != nil {
		t.Fatalf("apply cascade: %v", err)
	}
	if got := tableRows(t, ctx, pool, "child"); got != "" {
		t.Errorf("child = %s, want deleted", got)
	}
	if got := conflicts(); got != "0" {
		t.Errorf("%s conflicts recorded for a shipped cascade, want 0", got)
	}

	// Nothing leaks into the other sessions of the pool: once the applier
	// let go, a local write fires its triggers as before.
	a.Release("na")
	for _, conn := range pool.AcquireAllIdle(ctx) {
		var role string
		err := conn.QueryRow(ctx, "SELECT current_setting('session_replication_role')").Scan(&role)
		conn.Release()
		if err != nil || role != "origin" {
			t.Errorf("a pooled session has session_replication_role %q (%v), want origin", role, err)
		}
	}
	if _, err := pool.Exec(ctx, "INSERT INTO kv VALUES (2, 'local')"); err != nil {
		t.Fatalf("local insert: %v", err)
	}
	if got := queryString(t, ctx, pool, "SELECT count(*)::text FROM kv_audit WHERE kv_id = 2"); got != "1" {
		t.Errorf("local insert wrote %s audit rows, want 1", got)
	}
}

// TestApplyNonSuperuser: a role that is not a superuser applies once it may
// execute the replication origin functions, set session_replication_role
// and create the conflict triggers (it is a member of the tables' owner);
// without the parameter grant the error says which GRANT is missing, and
// nothing is applied.
func TestApplyNonSuperuser(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "nonsuper"})
	mustExec(t, ctx, c, "postgres", `CREATE TABLE kv (id int PRIMARY KEY, v text);
		CREATE ROLE app; ALTER TABLE kv OWNER TO app;
		CREATE ROLE prism LOGIN; GRANT app TO prism; GRANT CREATE ON DATABASE postgres TO prism;
		GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_session_setup(text),
			pg_replication_origin_session_reset(), pg_replication_origin_session_progress(boolean),
			pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone),
			pg_replication_origin_progress(text, boolean) TO prism;`)
	pool, err := pgxpool.New(ctx, strings.Replace(c.DSN("postgres"), "user=postgres", "user=prism", 1))
	if err != nil {
		t.Fatalf("pool: %v", err)
	}
	defer pool.Close()
	a := NewApplier(pool, zerolog.Nop(), WithLocalRegion("eu"))
	defer a.Close()
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v")

	err = a.Apply(ctx, txn("na", 1000, 1, ins(kv, "1", "a")))
	if err == nil || !strings.Contains(err.Error(), `GRANT SET ON PARAMETER session_replication_role TO "prism"`) {
		t.Fatalf("apply without the parameter grant = %v, want an error naming the GRANT", err)
	}
	if got := tableRows(t, ctx, newPool(t, ctx, c, "postgres"), "kv"); got != "" {
		t.Errorf("kv after the refused apply = %s, want empty", got)
	}
	mustExec(t, ctx, c, "postgres", "GRANT SET ON PARAMETER session_replication_role TO prism")
	if err := a.Apply(ctx, txn("na", 1000, 1, ins(kv, "1", "a"))); err != nil {
		t.Fatalf("apply with the grants: %v", err)
	}
	if got, want := tableRows(t, ctx, pool, "kv"), `{"id":1,"v":"a"}`; got != want {
		t.Errorf("kv = %s, want %s", got, want)
	}
	// A batch applies too: its set-up (batchSetupSQL) leaves
	// log_min_messages alone without the privilege to set it.
	var txns []*decode.Txn
	for i := 2; i <= 7; i++ {
		txns = append(txns, txn("na", uint64(1000+100*i), float64(i), ins(kv, strconv.Itoa(i), "b")))
	}
	if n, err := a.ApplyBatch(ctx, txns); n != len(txns) || err != nil {
		t.Fatalf("ApplyBatch = %d, %v", n, err)
	}
	if st := a.Stats()["na"]; st.Batches != 1 || st.Batched != 6 || st.RolledBack != 0 {
		t.Errorf("stats %+v, want one batch of 6 committed", st)
	}
	if got := queryString(t, ctx, pool, "SELECT count(*)::text FROM kv"); got != "7" {
		t.Errorf("kv has %s rows, want 7", got)
	}
}

// TestApplySessionSettings: apply sessions plan their prepared statements
// generically at once, never JIT-compile them and find deadlocks after
// DeadlockTimeout. Their connections keep these settings between runs,
// so their cached plans survive an idle time (see sessions), while the
// Applier's pool, which the dead letters, undo and Progress use, keeps
// the server's.
func TestApplySessionSettings(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "settings"})
	mustExec(t, ctx, c, "postgres", `
		CREATE TABLE kv (id int PRIMARY KEY, v text);
		CREATE TABLE seen (id int, pid int, settings text);
		CREATE FUNCTION kv_seen() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			INSERT INTO seen VALUES (NEW.id, pg_backend_pid(), concat_ws(' ', current_setting('plan_cache_mode'), current_setting('jit'),
				current_setting('deadlock_timeout'), current_setting('session_replication_role')));
			RETURN NULL;
		END $$;
		CREATE TRIGGER kv_seen AFTER INSERT OR UPDATE ON kv FOR EACH ROW EXECUTE FUNCTION kv_seen();
		ALTER TABLE kv ENABLE ALWAYS TRIGGER kv_seen;
	`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	defer a.Close()
	appName := queryString(t, ctx, a.pool, "SELECT current_setting('application_name')")
	kv := rel("public", "kv", decode.IdentityDefault, "id*", "v")
	var txns []*decode.Txn
	for i := 1; i <= 8; i++ {
		txns = append(txns, txn("na", uint64(1000*i), float64(i), upd(kv, nil, "1", strings.Repeat("x", i))))
	}
	txns[0].Changes[0] = ins(kv, "1", "x")
	if n, err := a.ApplyBatch(ctx, txns); err != nil || n != len(txns) {
		t.Fatalf("ApplyBatch = %d, %v", n, err)
	}
	const held = "force_generic_plan off 100ms replica"
	if got := queryString(t, ctx, a.pool, "SELECT string_agg(DISTINCT settings, ', ') || ' ' || count(*) FROM seen"); got != held+" 8" {
		t.Errorf("applied rows saw settings %q, want %s 8", got, held)
	}
	pid := queryString(t, ctx, a.pool, "SELECT min(pid)::text FROM seen")
	a.Release("na")

	settings := "SELECT concat_ws(' ', current_setting('plan_cache_mode'), current_setting('jit'), current_setting('deadlock_timeout'), " +
		"current_setting('session_replication_role'), current_setting('application_name'), pg_replication_origin_session_is_setup())"
	check := func(pool *pgxpool.Pool, what, want string) {
		t.Helper()
		conns := pool.AcquireAllIdle(ctx)
		if len(conns) == 0 {
			t.Fatalf("%s: no idle connection", what)
		}
		for _, conn := range conns {
			var got string
			err := conn.QueryRow(ctx, settings).Scan(&got)
			conn.Release()
			if err != nil || got != want {
				t.Errorf("%s has %q (%v), want %q", what, got, err, want)
			}
		}
	}
	check(a.sessPool, "an idle apply session", held+" "+appName+" f")
	// The first run creates the origin before it asks for it, and
	// letting go of the origin rolls back only what is open: an origin
	// that does not exist is an ERROR in the server log, a ROLLBACK
	// outside a transaction a WARNING (once a run).
	log, err := os.ReadFile(c.LogFile())
	if err != nil {
		t.Fatal(err)
	}
	for _, noise := range []string{`replication origin "prism_na" does not exist`, "there is no transaction in progress"} {
		if strings.Contains(string(log), noise) {
			t.Errorf("server log has %q:\n%s", noise, log)
		}
	}
	check(a.pool, "a connection of the Applier's pool", "auto on 1s origin "+appName+" f")

	// The next run takes the same connection, as it was.
	if err := a.Apply(ctx, txn("na", 9000, 9, upd(kv, nil, "1", "y"))); err != nil {
		t.Fatalf("apply after the release: %v", err)
	}
	if got := queryString(t, ctx, a.pool, "SELECT pid || ' ' || settings FROM seen ORDER BY ctid DESC LIMIT 1"); got != pid+" "+held {
		t.Errorf("the run after the release saw %q, want %s %s", got, pid, held)
	}

	// A node opens its apply sessions before the first run.
	b := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	b.OpenSessions(ctx, 2)
	if got := b.sessPool.Stat().IdleConns(); got != 2 {
		t.Errorf("OpenSessions(2) left %d idle apply sessions, want 2", got)
	}
	check(b.sessPool, "an apply session opened ahead", held+" "+appName+" f")
	checkSessionDeadlockTimeout(t, ctx, c)
}

// checkSessionDeadlockTimeout checks that sessionSettingsSQL lowers
// deadlock_timeout (the server's: 1s) for a role that may set it and
// leaves it for one that may not.
func checkSessionDeadlockTimeout(t *testing.T, ctx context.Context, c *pgtest.Cluster) {
	t.Helper()
	mustExec(t, ctx, c, "postgres", `CREATE ROLE plain LOGIN; GRANT SET ON PARAMETER session_replication_role TO plain`)
	for _, role := range []struct{ user, held string }{{"postgres", "100ms"}, {"plain", "1s"}} {
		conn, err := pgx.Connect(ctx, strings.Replace(c.DSN("postgres"), "user=postgres", "user="+role.user, 1))
		if err != nil {
			t.Fatalf("connect as %s: %v", role.user, err)
		}
		show := func() string {
			var v string
			if err := conn.QueryRow(ctx, "SHOW deadlock_timeout").Scan(&v); err != nil {
				t.Fatalf("%s: SHOW deadlock_timeout: %v", role.user, err)
			}
			return v
		}
		if _, err := conn.PgConn().Exec(ctx, sessionSettingsSQL).ReadAll(); err != nil {
			t.Fatalf("%s: session settings: %v", role.user, err)
		}
		if got := show(); got != role.held {
			t.Errorf("%s: deadlock_timeout of an apply session = %s, want %s", role.user, got, role.held)
		}
		conn.Close(ctx)
	}
}
