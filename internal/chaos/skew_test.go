package chaos

import (
	"context"
	"math"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/e2e"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// libfaketimeGlob finds Debian's libfaketime (package libfaketime, pulled
// in by faketime) under any architecture's library directory.
const libfaketimeGlob = "/usr/lib/*/faketime/libfaketimeMT.so.1"

// needFaketime returns the path of libfaketime, or fails the test with
// the command that installs it. A test that skews a clock calls it first,
// before it spends time starting clusters. Under -short, where the
// cluster harness skips such tests, a missing library is left to that.
func needFaketime(t *testing.T) string {
	t.Helper()
	if libs, _ := filepath.Glob(libfaketimeGlob); len(libs) > 0 {
		return libs[0]
	}
	if !testing.Short() {
		t.Fatalf("this test skews a database's clock and needs libfaketime (%s), which is not installed; install it with: apt-get install -y faketime", libfaketimeGlob)
	}
	return ""
}

// skewClock restarts cluster c with its clock offset (e.g. "+20s")
// through libfaketime: Postgres takes commit timestamps from the OS
// clock, and this is the one way to skew one cluster on one machine.
// Every later restart of c (crash faults) keeps the offset.
//
// Keep the offset small (tens of seconds). libfaketime hands a signal
// handler the real time while the process waits in a call it wraps
// (epoll_wait), so a server whose clock runs ahead fires its timeouts
// (deadlock_timeout, lock_timeout, statement_timeout) up to the offset
// late: at +3m a deadlock between two apply sessions stayed undetected
// for minutes and the region stopped applying (a plain two-session
// deadlock: not within 20 s with libfaketimeMT, 181 s with libfaketime;
// 1.05 s without). A clock behind would keep them on time, but then a
// region's first writes are stamped before the rows every region loaded
// at the start with its own real clock, and lose to them there.
func skewClock(t *testing.T, c *pgtest.Cluster, offset string) {
	t.Helper()
	c.Env = []string{"LD_PRELOAD=" + needFaketime(t), "FAKETIME=" + offset, "DONT_FAKE_MONOTONIC=1"}
	if err := c.Restart("fast"); err != nil {
		t.Fatalf("restart %s with a skewed clock: %v", c.Name, err)
	}
	conn, err := c.Connect(context.Background(), "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var ahead float64
	if err := conn.QueryRow(context.Background(), "SELECT extract(epoch FROM now() - $1::timestamptz)", time.Now()).Scan(&ahead); err != nil {
		t.Fatal(err)
	}
	want, err := time.ParseDuration(strings.TrimPrefix(offset, "+"))
	if err != nil || math.Abs(ahead-want.Seconds()) > max(want.Seconds()/4, 2) {
		t.Fatalf("%s's clock is %.0fs ahead, want %s: libfaketime did not take (%v)", c.Name, ahead, offset, err)
	}
}

// TestClockSkewLastWriteWins runs region eu's database 30 seconds ahead.
// last_write_wins compares stamps (commit timestamps), so eu's writes win
// every concurrent conflict, even against writes made later in real time:
// concurrent conflicting writes converge on eu's. A write made on na after
// eu's version had arrived there must still win everywhere although na's
// clock stamps it earlier: the clock floor (trigger prism_clock) raises
// its stamp past the version it replaced. Same for a key eu deleted and na
// re-inserts afterwards (the floor comes from the tombstone).
func TestClockSkewLastWriteWins(t *testing.T) {
	needFaketime(t)
	d := e2e.New(t, e2e.Topology{"na": {"na1"}, "eu": {"eu1"}},
		"CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL); INSERT INTO kv SELECT g, 'seed' FROM generate_series(1, 20) g;")
	skewClock(t, d.Clusters["eu"], "+30s")
	ctx := context.Background()
	d.StartAll()
	waitReaders(d)
	exec := func(region, sql string) {
		t.Helper()
		if err := d.Clusters[region].Exec(ctx, "app", sql); err != nil {
			t.Fatalf("%s: %v", region, err)
		}
	}
	value := func(region string, k int) string {
		conn, err := d.Clusters[region].Connect(ctx, "app")
		if err != nil {
			return ""
		}
		defer conn.Close(ctx)
		var v string
		conn.QueryRow(ctx, "SELECT v FROM kv WHERE k = $1", k).Scan(&v)
		return v
	}

	// Concurrent: both regions write keys 1-10 while replication is
	// stopped, then it resumes. eu's timestamps are later: eu wins.
	d.Kill("na1")
	d.Kill("eu1")
	exec("eu", "UPDATE kv SET v = 'eu' WHERE k <= 10")
	exec("na", "UPDATE kv SET v = 'na' WHERE k <= 10")
	d.StartAll()
	d.Eventually(60*time.Second, "concurrent conflicts resolved: eu's writes everywhere", func() bool {
		for k := 1; k <= 10; k++ {
			if value("na", k) != "eu" || value("eu", k) != "eu" {
				return false
			}
		}
		return true
	})

	// Sequential: eu writes, the write reaches na, then na writes the
	// same rows, later in real time but earlier by the clocks. na's writes
	// must win on both regions.
	exec("eu", "UPDATE kv SET v = 'eu-first' WHERE k > 10; DELETE FROM kv WHERE k = 5")
	d.Eventually(60*time.Second, "eu's writes on na", func() bool { return value("na", 20) == "eu-first" && value("na", 5) == "" })
	exec("na", "UPDATE kv SET v = 'na-later' WHERE k > 10; INSERT INTO kv VALUES (5, 'na-again')")
	d.Eventually(60*time.Second, "na's later writes everywhere", func() bool {
		for k := 11; k <= 20; k++ {
			if value("na", k) != "na-later" || value("eu", k) != "na-later" {
				return false
			}
		}
		return value("eu", 5) == "na-again" && value("na", 5) == "na-again"
	})
	floors, err := count(ctx, d, "na", "SELECT count(*) FROM prism.clock_floors")
	if err != nil || floors != 11 {
		t.Errorf("na recorded %d clock floors (%v), want 11 (10 updated rows, 1 re-inserted key)", floors, err)
	}
	rep := d.Verify(ctx)
	for _, tr := range rep.Tables {
		if !tr.Equal {
			t.Errorf("verify: %s differs between the regions: %v", tr.Table, tr.Diffs)
		}
	}
}
