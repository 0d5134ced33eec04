package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/internal/verify"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// db is the benchmark database in every cluster.
const db = "app"

// publishedTables are the tables in publication prism everywhere.
var publishedTables = []string{"pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history",
	"bench_marker", "bench_lag", "bench_big", "aa_prism_hot", "aa_prism_lag"}

// benchSchemaSQL is created in every cluster after pgbench -i.
// pgbench_history gets a uuid key (pglogical replicates only tables with
// one), filled in by each row's own cluster. Each active-active
// contender has its own tables (activeSQL), so that neither replicates
// the other's.
func benchSchemaSQL() string {
	return `ALTER TABLE pgbench_history ADD COLUMN hid uuid NOT NULL DEFAULT gen_random_uuid(), ADD PRIMARY KEY (hid);
CREATE TABLE bench_marker (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE bench_lag (id bigint PRIMARY KEY, src_ts timestamptz NOT NULL);
CREATE TABLE bench_big (id bigint PRIMARY KEY, payload text NOT NULL);
` + activeSQL("prism") + activeSQL("pgl") + `
CREATE PUBLICATION prism FOR TABLE ` + strings.Join(publishedTables, ", ") + ";"
}

// sourceSQL is created in the source only.
const sourceSQL = `CREATE SEQUENCE bench_lag_id;`

// regionSQL is created in the regions only: a deferred trigger records
// when each bench_lag row is applied, right before the applying
// transaction commits. ENABLE ALWAYS makes it fire under native apply
// (session_replication_role = replica) as well, and the function sets
// its search_path because native apply workers run with an empty one.
// bench_lag_seen is not published.
const regionSQL = `CREATE TABLE bench_lag_seen (id bigint PRIMARY KEY, dst_ts timestamptz NOT NULL);
CREATE FUNCTION bench_lag_seen() RETURNS trigger LANGUAGE plpgsql SET search_path = public, pg_catalog AS $$
BEGIN
	INSERT INTO bench_lag_seen VALUES (NEW.id, clock_timestamp()) ON CONFLICT (id) DO NOTHING;
	RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER bench_lag_seen AFTER INSERT ON bench_lag DEFERRABLE INITIALLY DEFERRED
	FOR EACH ROW EXECUTE FUNCTION bench_lag_seen();
ALTER TABLE bench_lag ENABLE ALWAYS TRIGGER bench_lag_seen;`

// env is the running benchmark environment.
type env struct {
	cfg    benchConfig
	dir    string
	pgBin  string
	prism  string // prism-cdc binary
	src    *pgtest.Cluster
	native [2]*pgtest.Cluster // eu, as for native subscriptions
	prismc [2]*pgtest.Cluster // eu, as for prism-cdc
	pgl    [2]*pgtest.Cluster // eu, as for pglogical (nil unless it is a contender)
	// pglSrcSlots are the source's slots of the pglogical subscriptions
	// of pgl[0] and pgl[1].
	pglSrcSlots []string
	// slotPlugin is the output plugin of prism-cdc's slots; pluginDir,
	// when set, holds the prism_pgoutput.so every cluster can load.
	slotPlugin, pluginDir string
	logf                  func(format string, args ...any)
}

var regionNames = [2]string{"eu", "as"}

// clusterSettings apply to every cluster. Durable clusters (fsync on)
// make commit costs real; the WAL limits keep checkpoints out of the
// measured drains as far as possible.
var clusterSettings = map[string]string{
	"shared_buffers":         "128MB",
	"max_wal_size":           "4GB",
	"checkpoint_timeout":     "30min",
	"wal_writer_delay":       "10ms",
	"autovacuum_naptime":     "10s",
	"max_slot_wal_keep_size": "-1",
}

// clientBinDir finds the directory holding pgbench and pg_recvlogical:
// the newest /usr/lib/postgresql/*/bin, else next to pgbench on PATH.
func clientBinDir() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return pgMajor(dirs[i]) > pgMajor(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "pg_recvlogical")); err == nil {
			return d, nil
		}
	}
	if p, err := exec.LookPath("pg_recvlogical"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", errors.New("pgbench and pg_recvlogical not found under /usr/lib/postgresql/*/bin or on PATH; install them with: apt-get install -y postgresql-15 postgresql-contrib")
}

func pgMajor(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

func (e *env) all() []*pgtest.Cluster {
	var cs []*pgtest.Cluster
	for _, c := range []*pgtest.Cluster{e.src, e.native[0], e.native[1], e.prismc[0], e.prismc[1], e.pgl[0], e.pgl[1]} {
		if c != nil {
			cs = append(cs, c)
		}
	}
	return cs
}

// setup starts the clusters, loads and checks the data, creates every
// contender's slot and builds prism-cdc.
func (e *env) setup(ctx context.Context) error {
	var err error
	if e.pgBin, err = clientBinDir(); err != nil {
		return err
	}
	usePgl := e.cfg.contenders["pglogical"]
	if usePgl {
		if err := checkPglogical(e.pgBin); err != nil {
			return err
		}
	}
	if err := e.buildPrism(ctx); err != nil {
		return err
	}
	if err := e.choosePlugin(); err != nil {
		return err
	}
	cs, err := e.startClusters(usePgl)
	if err != nil {
		return err
	}
	if err := e.loadData(ctx, cs); err != nil {
		return err
	}
	e.logf("checking that every region starts equal to the source")
	if err := e.verify(ctx, cs[1:]...); err != nil {
		return err
	}
	if err := e.createSlots(ctx); err != nil {
		return err
	}
	if usePgl {
		return e.setupPglogical(ctx)
	}
	return nil
}

// buildPrism builds the prism-cdc binary into the work directory.
func (e *env) buildPrism(ctx context.Context) error {
	e.prism = filepath.Join(e.dir, "prism-cdc")
	e.logf("building prism-cdc")
	build := exec.CommandContext(ctx, "go", "build", "-o", e.prism, "github.com/prism-cdc/prism-cdc/cmd/prism-cdc")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build prism-cdc: %w\n%s", err, out)
	}
	return nil
}

// startClusters starts the source and the regions (pgl-eu and pgl-as
// too with usePgl), sets e's clusters and returns them all, the source
// first.
func (e *env) startClusters(usePgl bool) ([]*pgtest.Cluster, error) {
	names := []string{"src", "native-eu", "native-as", "prism-eu", "prism-as"}
	if usePgl {
		names = append(names, "pgl-eu", "pgl-as")
	}
	cs := make([]*pgtest.Cluster, len(names))
	e.logf("starting %d clusters (durable: fsync on)", len(names))
	for i, n := range names {
		c, err := pgtest.New(pgtest.Options{Name: "bench-" + n, Durable: true, Settings: e.settingsFor(n, usePgl), Bin: e.cfg.serverBin})
		if err != nil {
			e.close(cs[:i])
			return nil, fmt.Errorf("start cluster %s: %w", n, err)
		}
		cs[i] = c
	}
	e.src, e.native, e.prismc = cs[0], [2]*pgtest.Cluster{cs[1], cs[2]}, [2]*pgtest.Cluster{cs[3], cs[4]}
	if usePgl {
		e.pgl = [2]*pgtest.Cluster{cs[5], cs[6]}
	}
	return cs, nil
}

// choosePlugin sets e.slotPlugin and e.pluginDir from -output-plugin:
// auto is prism_pgoutput before PostgreSQL 16 where make plugin built it
// for the servers' major version, pgoutput otherwise.
func (e *env) choosePlugin() error {
	bin := e.cfg.serverBin
	if bin == "" {
		var err error
		if bin, err = pgtest.BinDir(); err != nil {
			return err
		}
	}
	major, err := pgtest.MajorOf(bin)
	if err != nil {
		return err
	}
	e.slotPlugin = e.cfg.outputPlugin
	if e.slotPlugin == decode.PluginAuto {
		e.slotPlugin = decode.PluginPgoutput
		if major < 16 {
			e.slotPlugin = decode.PluginPrism
		}
	}
	if e.slotPlugin == decode.PluginPrism {
		dir, err := pgtest.PrismPgoutputDir(bin)
		switch {
		case err == nil:
			e.pluginDir = dir
		case e.cfg.outputPlugin == decode.PluginAuto:
			e.logf("prism_pgoutput is not built for PostgreSQL %d (%v); prism-cdc's slots use pgoutput", major, err)
			e.slotPlugin = decode.PluginPgoutput
		default:
			return fmt.Errorf("output-plugin prism_pgoutput: %w", err)
		}
	}
	e.logf("prism-cdc's slots use output plugin %s (PostgreSQL %d)", e.slotPlugin, major)
	return nil
}

// settingsFor returns the settings of cluster name: clusterSettings,
// pg_stat_statements with -pgss, pglogical's in the pglogical mesh, and
// the library path of prism_pgoutput when it is used.
func (e *env) settingsFor(name string, usePgl bool) map[string]string {
	settings := maps.Clone(clusterSettings)
	if e.pluginDir != "" {
		maps.Copy(settings, pgtest.LibraryPath(e.pluginDir))
	}
	var preload []string
	if e.cfg.pgss {
		preload = append(preload, "pg_stat_statements")
		settings["pg_stat_statements.track"] = "all"
	}
	if usePgl && (name == "src" || strings.HasPrefix(name, "pgl-")) {
		preload = append(preload, "pglogical")
		maps.Copy(settings, pglogicalSettings)
	}
	if len(preload) > 0 {
		settings["shared_preload_libraries"] = "'" + strings.Join(preload, ",") + "'"
	}
	return settings
}

// loadData loads pgbench data and the benchmark's schema into every
// cluster at once.
func (e *env) loadData(ctx context.Context, cs []*pgtest.Cluster) error {
	e.logf("loading pgbench -i -s %d into every cluster", e.cfg.scale)
	return parallel(cs, func(c *pgtest.Cluster) error {
		if err := c.CreateDatabase(ctx, db); err != nil {
			return err
		}
		if err := e.pgbench(ctx, c, "-i", "-q", "-s", fmt.Sprint(e.cfg.scale)); err != nil {
			return err
		}
		extra := regionSQL
		if c == e.src {
			extra = sourceSQL
		}
		if e.cfg.pgss {
			extra += "\nCREATE EXTENSION pg_stat_statements;"
		}
		return c.Exec(ctx, db, benchSchemaSQL()+extra+"\nCHECKPOINT;")
	})
}

// createSlots creates the source slots of pg_recvlogical and prism-cdc,
// and the native subscriptions (disabled) with theirs: every contender's
// slot exists before any load, so all of them see the same changes.
func (e *env) createSlots(ctx context.Context) error {
	for s, plugin := range map[string]string{"bench_text": "pgoutput", "bench_binary": "pgoutput", "prism_na": e.slotPlugin} {
		if err := e.src.Exec(ctx, db, fmt.Sprintf("SELECT pg_create_logical_replication_slot('%s', '%s')", s, plugin)); err != nil {
			return err
		}
	}
	for i, c := range e.native {
		sql := fmt.Sprintf("CREATE SUBSCRIPTION bench_sub CONNECTION '%s' PUBLICATION prism WITH (enabled = false, copy_data = false, create_slot = true, slot_name = 'bench_sub_%s')",
			e.src.DSN(db), regionNames[i])
		if err := c.Exec(ctx, db, sql); err != nil {
			return err
		}
	}
	return nil
}

func (e *env) close(cs []*pgtest.Cluster) {
	for _, c := range cs {
		if c != nil {
			if err := c.Close(); err != nil {
				e.logf("close %s: %v", c.Name, err)
			}
		}
	}
}

// Close stops and removes every cluster.
func (e *env) Close() {
	e.close(e.all())
}

// parallel calls fn for every element of xs at once and joins the errors.
func parallel[T any](xs []T, fn func(T) error) error {
	errs := make([]error, len(xs))
	var wg sync.WaitGroup
	for i, x := range xs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fn(x)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// pgbench runs pgbench against c's database.
func (e *env) pgbench(ctx context.Context, c *pgtest.Cluster, args ...string) error {
	args = append([]string{"-h", c.Host, "-p", fmt.Sprint(c.Port), "-U", "postgres"}, args...)
	args = append(args, db)
	cmd := exec.CommandContext(ctx, filepath.Join(e.pgBin, "pgbench"), args...)
	cmd.Env = append(os.Environ(), "PGSSLMODE=disable")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("pgbench %s on %s: %w\n%s", strings.Join(args, " "), c.Name, err, tail(string(out), 20))
	}
	return nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// verify compares the source with the given regions.
func (e *env) verify(ctx context.Context, regions ...*pgtest.Cluster) error {
	rs := []verify.Region{{Name: "source", DSN: e.src.DSN(db)}}
	for _, c := range regions {
		rs = append(rs, verify.Region{Name: c.Name, DSN: c.DSN(db)})
	}
	rep, err := verify.CompareWith(ctx, rs, "prism", verify.Options{Settle: 0})
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	if !rep.Equal() {
		var b strings.Builder
		for _, t := range rep.Tables {
			if !t.Equal {
				fmt.Fprintf(&b, "\n  %s: rows %v; %s", t.Table, t.Rows, strings.Join(t.Diffs, "; "))
			}
		}
		return fmt.Errorf("verify: regions differ from the source:%s", b.String())
	}
	return nil
}

// queryLSN runs a query returning one pg_lsn (as text) in c.
func queryLSN(ctx context.Context, c *pgtest.Cluster, sql string, args ...any) (pglogrepl.LSN, error) {
	conn, err := c.Connect(ctx, db)
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return scanLSN(ctx, conn, sql, args...)
}

// queryEach runs sql in c's database and, for every row, scans it into
// scans and calls fn.
func queryEach(ctx context.Context, c *pgtest.Cluster, scans []any, fn func() error, sql string, args ...any) error {
	conn, err := c.Connect(ctx, db)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	rows, err := conn.Query(ctx, sql, args...)
	if err != nil {
		return err
	}
	_, err = pgx.ForEachRow(rows, scans, fn)
	return err
}

// serverVersion is the source server's version, or why it is unknown.
func (e *env) serverVersion(ctx context.Context) string {
	conn, err := e.src.Connect(ctx, db)
	if err != nil {
		return "(version unknown: " + err.Error() + ")"
	}
	defer conn.Close(ctx)
	var v string
	if err := conn.QueryRow(ctx, "SHOW server_version").Scan(&v); err != nil {
		return "(version unknown: " + err.Error() + ")"
	}
	return v
}

func scanLSN(ctx context.Context, conn *pgx.Conn, sql string, args ...any) (pglogrepl.LSN, error) {
	var s *string
	if err := conn.QueryRow(ctx, sql, args...).Scan(&s); err != nil {
		return 0, fmt.Errorf("query lsn: %w", err)
	}
	if s == nil {
		return 0, nil
	}
	return pglogrepl.ParseLSN(*s)
}

// mark commits marker row id in the source and returns the WAL insert
// position right after it: every change before the marker lies below it.
func (e *env) mark(ctx context.Context, id int) (pglogrepl.LSN, error) {
	conn, err := e.src.Connect(ctx, db)
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "INSERT INTO bench_marker (id) VALUES ($1)", id); err != nil {
		return 0, fmt.Errorf("insert marker: %w", err)
	}
	return scanLSN(ctx, conn, "SELECT pg_current_wal_insert_lsn()::text")
}

// slotConfirmed returns a source slot's confirmed_flush_lsn.
func slotConfirmed(ctx context.Context, conn *pgx.Conn, slot string) (pglogrepl.LSN, error) {
	return scanLSN(ctx, conn, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot)
}

// hasMarker reports whether marker row id is visible in conn's database.
func hasMarker(ctx context.Context, conn *pgx.Conn, id int) (bool, error) {
	var ok bool
	err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM bench_marker WHERE id = $1)", id).Scan(&ok)
	return ok, err
}

// clusterCPU returns the CPU seconds used so far by c's server processes.
func clusterCPU(c *pgtest.Cluster) (float64, error) {
	pid, err := postmasterPID(filepath.Join(c.Dir, "data"))
	if err != nil {
		return 0, err
	}
	return treeCPU(pid)
}

// cpuSnap is the CPU seconds of every cluster, by name.
type cpuSnap map[string]float64

func (e *env) cpuSnapshot() (cpuSnap, error) {
	s := cpuSnap{}
	for _, c := range e.all() {
		v, err := clusterCPU(c)
		if err != nil {
			return nil, err
		}
		s[c.Name] = v
	}
	return s, nil
}

// since returns the total and per-cluster CPU seconds from s0 to s.
func (s cpuSnap) since(s0 cpuSnap) (float64, map[string]float64) {
	var total float64
	per := map[string]float64{}
	for n, v := range s {
		per[n] = v - s0[n]
		total += per[n]
	}
	return total, per
}

// cpuOf sums clusterCPU over cs.
func cpuOf(cs ...*pgtest.Cluster) (float64, error) {
	var total float64
	for _, c := range cs {
		v, err := clusterCPU(c)
		if err != nil {
			return 0, err
		}
		total += v
	}
	return total, nil
}

// advanceSlots moves the source slots that are not in use up to the
// current position, untimed, so a later measurement does not decode
// WAL that belongs to another scenario.
func (e *env) advanceSlots(ctx context.Context, slots ...string) error {
	for _, s := range slots {
		if err := e.src.Exec(ctx, db, fmt.Sprintf("SELECT pg_replication_slot_advance('%s', pg_current_wal_insert_lsn())", s)); err != nil {
			return err
		}
	}
	return nil
}

// pollUntil calls cond every interval until it returns true, an error,
// or timeout passes.
func pollUntil(ctx context.Context, timeout, interval time.Duration, what string, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if err != nil {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("wait for %s: timed out after %s", what, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// resetStatements clears pg_stat_statements in the source and the prism
// regions (with -pgss).
func (e *env) resetStatements(ctx context.Context) error {
	if !e.cfg.pgss {
		return nil
	}
	for _, c := range []*pgtest.Cluster{e.src, e.prismc[0], e.prismc[1]} {
		if err := c.Exec(ctx, db, "SELECT pg_stat_statements_reset()"); err != nil {
			return err
		}
	}
	return nil
}

// logStatements logs the statements that took the most time in the
// source and the prism regions since resetStatements (with -pgss).
func (e *env) logStatements(ctx context.Context, tag string) {
	if !e.cfg.pgss {
		return
	}
	for _, c := range []*pgtest.Cluster{e.src, e.prismc[0], e.prismc[1]} {
		conn, err := c.Connect(ctx, db)
		if err != nil {
			e.logf("pg_stat_statements %s: %v", c.Name, err)
			continue
		}
		rows, err := conn.Query(ctx, `SELECT calls, total_exec_time, rows, toplevel, left(regexp_replace(query, '\s+', ' ', 'g'), 160)
			FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 15`)
		if err != nil {
			e.logf("pg_stat_statements %s: %v", c.Name, err)
			conn.Close(context.WithoutCancel(ctx))
			continue
		}
		var b strings.Builder
		for rows.Next() {
			var calls, n int64
			var ms float64
			var top bool
			var q string
			if err := rows.Scan(&calls, &ms, &n, &top, &q); err != nil {
				break
			}
			fmt.Fprintf(&b, "\n  %9d calls %9.0f ms %9d rows top=%-5v %s", calls, ms, n, top, q)
		}
		rows.Close()
		conn.Close(context.WithoutCancel(ctx))
		e.logf("%s: top statements in %s:%s", tag, c.Name, b.String())
	}
}

// logProcesses logs the CPU seconds of every live server process of the
// source and the prism regions that used at least 0.1 s, by process title
// (with -pgss). Processes started for the drain (backends, walsenders)
// show the drain's share; long-lived ones show their whole life.
func (e *env) logProcesses(tag string) {
	if !e.cfg.pgss {
		return
	}
	for _, c := range []*pgtest.Cluster{e.src, e.prismc[0], e.prismc[1]} {
		root, err := postmasterPID(filepath.Join(c.Dir, "data"))
		if err != nil {
			continue
		}
		ents, _ := os.ReadDir("/proc")
		var b strings.Builder
		for _, ent := range ents {
			pid, err := strconv.Atoi(ent.Name())
			if err != nil {
				continue
			}
			t, err := readProcTimes(pid)
			if err != nil || t.ppid != root || t.self < 0.1 {
				continue
			}
			title, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			fmt.Fprintf(&b, "\n  %6.2f s  %s", t.self, strings.TrimRight(strings.ReplaceAll(string(title), "\x00", " "), " "))
		}
		e.logf("%s: server processes of %s:%s", tag, c.Name, b.String())
	}
}
