package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
)

func syncStandby(t *testing.T, d *Deployment, region, appName string) {
	t.Helper()
	c := d.Clusters[region]
	if err := c.SetConf("synchronous_standby_names", "'"+appName+"'"); err != nil {
		t.Fatal(err)
	}
	if err := c.Reload(); err != nil {
		t.Fatal(err)
	}
}

// waitSync waits until appName is the source's synchronous standby (a
// configuration reload takes effect asynchronously).
func waitSync(t *testing.T, d *Deployment, c *pgx.Conn, appName string) {
	t.Helper()
	d.Eventually(30*time.Second, appName+" is a synchronous standby", func() bool {
		var state string
		err := c.QueryRow(context.Background(), "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1", appName).Scan(&state)
		return err == nil && (state == "sync" || state == "quorum")
	})
}

func connect(t *testing.T, d *Deployment, region string) *pgx.Conn {
	t.Helper()
	c, err := d.Clusters[region].Connect(context.Background(), "app")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// With sync: all, a commit on na returns only once eu and as applied it:
// the row is there the moment the commit returns.
func TestSyncAllCommitIsAppliedEverywhere(t *testing.T) {
	d := New(t, Topology{"na": {"na1"}, "eu": {"eu1"}, "as": {"as1"}}, schema)
	d.Extra = func(name string) string {
		if name == "na1" {
			return "sync: all\n"
		}
		return ""
	}
	d.StartAll()
	waitReaders(d)
	syncStandby(t, d, "na", "prism_na1")
	ctx := context.Background()
	na, eu, as := connect(t, d, "na"), connect(t, d, "eu"), connect(t, d, "as")
	if _, err := na.Exec(ctx, "SET statement_timeout = '30s'"); err != nil {
		t.Fatal(err)
	}
	waitSync(t, d, na, "prism_na1")
	for i := 0; i < 500; i++ {
		id := fmt.Sprintf("sync-%04d", i)
		wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		_, err := na.Exec(wctx, "INSERT INTO ledger VALUES ($1, 'na', 1, 1)", id)
		cancel()
		if err != nil {
			t.Fatalf("commit %d on na: %v\n%s", i, err, d.Logs())
		}
		for _, c := range []struct {
			name string
			conn *pgx.Conn
		}{{"eu", eu}, {"as", as}} {
			var n int
			if err := c.conn.QueryRow(ctx, "SELECT count(*) FROM ledger WHERE id = $1", id).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n != 1 {
				t.Fatalf("commit %d returned on na but %s has %d rows of it, want 1", i, c.name, n)
			}
		}
	}
}

func slotPositions(t *testing.T, c *pgx.Conn, slot string) (confirmed, current pglogrepl.LSN) {
	t.Helper()
	var conf, cur string
	err := c.QueryRow(context.Background(), `SELECT coalesce(confirmed_flush_lsn, '0/0')::text, pg_current_wal_lsn()::text
		FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&conf, &cur)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := pglogrepl.ParseLSN(conf)
	b, _ := pglogrepl.ParseLSN(cur)
	return a, b
}

// With a spool, a region that is down (node and database) no longer holds
// na's slot back; with sync: quorum:1, na's commits still complete; a
// kill -9 of na1 while spooling loses nothing; the backlog reaches the
// region when it returns.
func TestSpoolAndQuorumWhileRegionDown(t *testing.T) {
	d := New(t, Topology{"na": {"na1"}, "eu": {"eu1"}, "as": {"as1"}}, schema)
	spoolDir := filepath.Join(d.Dir, "spool-na")
	d.Extra = func(name string) string {
		if name == "na1" {
			return fmt.Sprintf("sync: quorum:1\nspool: {dir: %q, max_bytes: 1GiB}\n", spoolDir)
		}
		return ""
	}
	d.StartAll()
	waitReaders(d)
	syncStandby(t, d, "na", "prism_na1")
	ctx := context.Background()
	na := connect(t, d, "na")
	waitSync(t, d, na, "prism_na1")

	d.Kill("as1")
	if err := d.Clusters["as"].Stop("fast"); err != nil {
		t.Fatal(err)
	}
	// A commit waiting for synchronous replication ignores
	// statement_timeout: bound each one with a context instead.
	write := func(from, to int) {
		for i := from; i < to; i++ {
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			_, err := na.Exec(wctx, "INSERT INTO ledger VALUES ($1, 'na', 1, 1)", fmt.Sprintf("q-%04d", i))
			cancel()
			if err != nil {
				t.Fatalf("commit %d on na with region as down: %v\n%s", i, err, d.Logs())
			}
		}
	}
	write(0, 200)
	_, afterWrites := slotPositions(t, na, "prism_na")
	d.Eventually(30*time.Second, "na's slot confirmed past the writes while as is down", func() bool {
		conf, _ := slotPositions(t, na, "prism_na")
		return conf >= afterWrites
	})

	// kill -9 right after a burst (the spool may be mid-write), then
	// restart: nothing lost, nothing twice. In sync mode commits wait while
	// no reader is connected, so none are made while na1 is down.
	write(200, 300)
	d.Kill("na1")
	d.Start("na1")
	d.Eventually(30*time.Second, "na1 reads again", func() bool { return d.Role("na1") == "reader" })
	write(300, 400)

	if err := d.Clusters["as"].Start(); err != nil {
		t.Fatal(err)
	}
	d.Start("as1")
	converged(t, d, 400)
}
