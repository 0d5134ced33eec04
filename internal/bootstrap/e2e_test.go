package bootstrap_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/bootstrap"
	"github.com/prism-cdc/prism-cdc/internal/e2e"
	"github.com/prism-cdc/prism-cdc/internal/node"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

const schema = `
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, updated_by text NOT NULL);
CREATE TABLE ledger (id text PRIMARY KEY, region text NOT NULL, account int NOT NULL, amount bigint NOT NULL);
INSERT INTO accounts SELECT g, 0, 'seed' FROM generate_series(1, 20) g;
`

// seedRows are written identically into na and eu before any node runs:
// half as plain rows (copied with their commit time), half under an origin
// with an unknown-age commit time (bulk-copied).
const seedRows = 60000

func seedSQL() []string {
	return []string{fmt.Sprintf(`INSERT INTO ledger SELECT 'seed-'||g, 'seed', 1 + g %% 20, g %% 7 FROM generate_series(1, %d) g`, seedRows/2),
		fmt.Sprintf(`SELECT pg_replication_origin_create('prism_seed');
SELECT pg_replication_origin_session_setup('prism_seed');
BEGIN;
SELECT pg_replication_origin_xact_setup('0/0', '1970-01-01 00:00:00+00');
INSERT INTO ledger SELECT 'old-'||g, 'seed', 1 + g %% 20, g %% 5 FROM generate_series(1, %[1]d) g;
COMMIT;
SELECT pg_replication_origin_session_reset();
`, seedRows/2)}
}

// writers run one client per region: each write inserts a ledger row of
// its own and updates an account every region updates.
type writers struct {
	written map[string]*atomic.Int64
	errs    chan error
	wg      sync.WaitGroup
	stop    chan struct{}
}

func startWriters(t *testing.T, d *e2e.Deployment, regions ...string) *writers {
	t.Helper()
	// Statements run to completion (never cancelled), so a write is
	// counted exactly when it committed.
	ctx := context.Background()
	w := &writers{written: map[string]*atomic.Int64{}, errs: make(chan error, len(regions)), stop: make(chan struct{})}
	for _, r := range regions {
		w.written[r] = new(atomic.Int64)
		conn, err := d.Clusters[r].Connect(ctx, "app")
		if err != nil {
			t.Fatal(err)
		}
		w.wg.Add(1)
		go func(r string, conn *pgx.Conn) { // owned by w; Stop waits
			defer w.wg.Done()
			defer conn.Close(context.Background())
			for seq := 1; ; seq++ {
				select {
				case <-w.stop:
					return
				case <-time.After(3 * time.Millisecond):
				}
				account := 1 + (seq*7+len(r))%20
				_, err := conn.Exec(ctx, `WITH l AS (INSERT INTO ledger VALUES ($1, $2, $3, $4))
					UPDATE accounts SET balance = balance + $4, updated_by = $2 WHERE id = $3`,
					fmt.Sprintf("%s-%06d", r, seq), r, account, int64(seq%13+1))
				if err != nil {
					w.errs <- fmt.Errorf("writer %s: %w", r, err)
					return
				}
				w.written[r].Add(1)
			}
		}(r, conn)
	}
	return w
}

// Stop stops the writers and returns the writes per region.
func (w *writers) Stop(t *testing.T) map[string]int64 {
	t.Helper()
	close(w.stop)
	w.wg.Wait()
	select {
	case err := <-w.errs:
		t.Fatal(err)
	default:
	}
	out := map[string]int64{}
	for r, n := range w.written {
		out[r] = n.Load()
	}
	return out
}

func query[T any](t *testing.T, c *pgtest.Cluster, sql string, args ...any) T {
	t.Helper()
	ctx := context.Background()
	conn, err := c.Connect(ctx, "app")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var v T
	if err := conn.QueryRow(ctx, sql, args...).Scan(&v); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return v
}

// tryQuery is query for polling: errors count as "not yet".
func tryQuery(c *pgtest.Cluster, sql string) (int64, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := c.Connect(ctx, "app")
	if err != nil {
		return 0, false
	}
	defer conn.Close(ctx)
	var v int64
	if err := conn.QueryRow(ctx, sql).Scan(&v); err != nil {
		return 0, false
	}
	return v, true
}

// bootstrapCmd returns the command bootstrapping region as from na.
func bootstrapCmd(d *e2e.Deployment, extra ...string) (*exec.Cmd, *bytes.Buffer) {
	args := append([]string{"bootstrap", "--config", d.ConfigPath("as1"), "--from", "na"}, extra...)
	cmd := exec.Command(d.Bin, args...)
	cmd.Env = append(os.Environ(), "PRISM_TOKEN=e2e-secret-token")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	return cmd, &out
}

// TestBootstrapWhileWriting adds region as while na and eu take writes:
// as is copied from na, joins, takes writes of its own, and in the end
// every region holds every write exactly once. With kill, the first
// bootstrap is killed in the middle of the copy and simply run again.
func TestBootstrapWhileWriting(t *testing.T) {
	for _, kill := range []bool{false, true} {
		name := "clean"
		if kill {
			name = "killed_and_restarted"
		}
		t.Run(name, func(t *testing.T) { testBootstrap(t, kill) })
	}
}

func testBootstrap(t *testing.T, kill bool) {
	ctx := context.Background()
	d := e2e.New(t, e2e.Topology{"na": {"na1"}, "eu": {"eu1"}, "as": {"as1"}}, schema)
	as := d.Clusters["as"]
	if err := as.Exec(ctx, "app", "DROP TABLE accounts, ledger"); err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"na", "eu"} {
		for _, sql := range seedSQL() {
			if err := d.Clusters[r].Exec(ctx, "app", sql); err != nil {
				t.Fatal(err)
			}
		}
	}
	d.Start("na1")
	d.Start("eu1")
	d.Eventually(60*time.Second, "na1 and eu1 read their slots", func() bool {
		return d.Role("na1") == node.RoleReader && d.Role("eu1") == node.RoleReader
	})
	w := startWriters(t, d, "na", "eu")
	d.Eventually(30*time.Second, "writes replicate between na and eu", func() bool {
		n, ok := tryQuery(d.Clusters["eu"], "SELECT count(*) FROM ledger WHERE region = 'na'")
		return ok && n >= 50
	})
	// Region as has no tables yet: its shippers cannot deliver.
	t.Logf("na1 -> as before bootstrap: %+v", d.Target("na1", "as"))

	if kill {
		cmd, out := bootstrapCmd(d, "--jobs", "2", "--max-rate", "20000")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }() // owned here: waited for below
		d.Eventually(60*time.Second, "the first bootstrap copies rows", func() bool {
			n, ok := tryQuery(as, "SELECT count(*) FROM ledger")
			return ok && n > 0
		})
		cmd.Process.Signal(syscall.SIGKILL)
		err := <-done
		if err == nil {
			t.Fatalf("bootstrap finished before it was killed; make the copy slower\n%s", out)
		}
		state := query[string](t, as, "SELECT state FROM prism.bootstrap ORDER BY id DESC LIMIT 1")
		if state == "done" {
			t.Fatalf("bootstrap killed midway recorded state %q", state)
		}
		n := query[int64](t, as, "SELECT count(*) FROM ledger")
		t.Logf("killed the first bootstrap with %d ledger rows copied (state %s)", n, state)
	}

	cmd, out := bootstrapCmd(d)
	if err := cmd.Run(); err != nil {
		t.Fatalf("bootstrap: %v\n%s\n%s", err, out, d.Logs())
	}
	t.Logf("bootstrap output:\n%s", out)
	if kill && !strings.Contains(out.String(), "started over") {
		t.Fatalf("second bootstrap did not report the interrupted run:\n%s", out)
	}

	// A finished region is not overwritten by accident.
	again, againOut := bootstrapCmd(d)
	err := again.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(againOut.String(), "--force") || !strings.Contains(againOut.String(), "public.ledger") {
		t.Fatalf("bootstrap of a filled region without --force: %v, want exit 1 naming the tables and --force\n%s", err, againOut)
	}

	d.Start("as1")
	d.Eventually(60*time.Second, "as1 reads its slot", func() bool { return d.Role("as1") == node.RoleReader })
	wAs := startWriters(t, d, "as")
	d.Eventually(30*time.Second, "as writes replicate", func() bool {
		n, ok := tryQuery(d.Clusters["na"], "SELECT count(*) FROM ledger WHERE region = 'as'")
		return ok && n >= 50
	})
	written := w.Stop(t)
	for r, n := range wAs.Stop(t) {
		written[r] = n
	}
	var total int64
	for _, n := range written {
		total += n
	}
	t.Logf("writes: %v", written)
	want := int64(seedRows) + total
	counts := map[string]int64{}
	var logged time.Time
	d.Eventually(120*time.Second, fmt.Sprintf("every region holds %d ledger rows", want), func() bool {
		all := true
		for _, r := range d.Regions {
			n, ok := tryQuery(d.Clusters[r], "SELECT count(*) FROM ledger")
			counts[r] = n
			all = all && ok && n == want
		}
		if !all && time.Since(logged) > 5*time.Second {
			logged = time.Now()
			for _, r := range d.Regions {
				t.Logf("ledger rows: %s %d of %d; na1->%s %s", r, counts[r], want, r, d.Target("na1", r).Path)
			}
		}
		return all
	})
	for _, c := range d.Clusters {
		for r, n := range written {
			if got := query[int64](t, c, "SELECT count(*) FROM ledger WHERE region = $1", r); got != n {
				t.Fatalf("%s holds %d ledger rows of region %s, want %d", c.Name, got, r, n)
			}
		}
		// Every ledger id is written once by one writer: an insert that
		// met its own row would mean a transaction was applied twice.
		if dup := query[int64](t, c, "SELECT count(*) FROM prism.conflicts WHERE table_name LIKE '%ledger%'"); dup != 0 {
			t.Fatalf("%s recorded %d conflicts on ledger: a transaction was applied twice", c.Name, dup)
		}
	}
	rep := d.Verify(ctx)
	for _, tr := range rep.Tables {
		if !tr.Equal {
			t.Fatalf("table %s differs across regions: rows %v, diffs %v\n%s", tr.Table, tr.Rows, tr.Diffs, d.Logs())
		}
	}
	if len(rep.Tables) < 2 {
		t.Fatalf("verify compared %d tables, want accounts and ledger", len(rep.Tables))
	}
}

// TestBootstrapErrors checks the errors an operator meets first: an
// unreachable source (without its password) and a table without a key.
func TestBootstrapErrors(t *testing.T) {
	ctx := context.Background()
	src := pgtest.Start(t, pgtest.Options{Name: "bs-src"})
	tgt := pgtest.Start(t, pgtest.Options{Name: "bs-tgt"})
	for _, c := range []*pgtest.Cluster{src, tgt} {
		if err := c.CreateDatabase(ctx, "app"); err != nil {
			t.Fatal(err)
		}
	}
	cfg := bootstrap.Config{
		Region: "as", DSN: tgt.DSN("app"), Source: "na",
		Peers: []bootstrap.Peer{{Region: "na", DSN: "host=127.0.0.1 port=1 user=postgres password=hunter2 dbname=app connect_timeout=2"}},
	}
	_, err := bootstrap.Run(ctx, cfg, zerolog.Nop())
	if !errors.Is(err, bootstrap.ErrUnreachable) || !strings.Contains(err.Error(), "source region na") || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("Run with an unreachable source = %v, want ErrUnreachable naming source region na without the password", err)
	}

	if err := src.Exec(ctx, "app", "CREATE TABLE keyed (id int PRIMARY KEY); CREATE TABLE loose (a int, b text); CREATE PUBLICATION prism FOR ALL TABLES"); err != nil {
		t.Fatal(err)
	}
	cfg.Peers[0].DSN = src.DSN("app")
	_, err = bootstrap.Run(ctx, cfg, zerolog.Nop())
	if !errors.Is(err, bootstrap.ErrNoKey) || !strings.Contains(err.Error(), "public.loose") || strings.Contains(err.Error(), "public.keyed") {
		t.Fatalf("Run with a keyless table = %v, want ErrNoKey naming public.loose only", err)
	}
	var n int64
	conn, err := tgt.Connect(ctx, "app")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").Scan(&n); err != nil || n != 0 {
		t.Fatalf("target tables after a refused run: %d (%v), want 0", n, err)
	}
}
