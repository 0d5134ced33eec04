package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/node"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// peakRSS reads a process's peak resident set size (VmHWM) in bytes.
func peakRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmHWM in /proc/%d/status", pid)
}

// spillFDs counts a process's open descriptors of spill files (-1 when
// they cannot be read).
func spillFDs(pid int) int {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return -1
	}
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil && strings.Contains(target, "prism-spill") {
			n++
		}
	}
	return n
}

// TestLargeTransaction replicates one transaction of about 100 MB of
// change data (PRISM_BIGTXN_MB overrides the size) from na to eu and as
// with real node processes, and checks that every region ends up equal
// while no node's peak RSS grows with the transaction: it must stay below
// five times the spill threshold plus 100 MB (DESIGN invariant 7). The
// peak RSS of every node is logged.
func TestLargeTransaction(t *testing.T) {
	mb := 100
	if v := os.Getenv("PRISM_BIGTXN_MB"); v != "" {
		var err error
		if mb, err = strconv.Atoi(v); err != nil || mb <= 0 {
			t.Fatalf("PRISM_BIGTXN_MB=%q: want a positive number of megabytes", v)
		}
	}
	largeTransaction(t, mb, "")
}

// TestLargeTransactionSpooled replicates a 50 MB transaction through
// na1's spool: the spool keeps a copy of the spill file, the shippers
// stream it from there, and the copy is deleted once both regions
// acknowledged it.
func TestLargeTransactionSpooled(t *testing.T) {
	spoolDir := t.TempDir()
	largeTransaction(t, 50, spoolDir)
	names, err := filepath.Glob(filepath.Join(spoolDir, "txn-*.spill"))
	if err != nil || len(names) != 0 {
		t.Fatalf("spooled copies left after every region acknowledged: %v, %v", names, err)
	}
}

// largeTransaction runs the large transaction check with mb megabytes,
// and na1 spooling to spoolDir unless it is empty.
func largeTransaction(t *testing.T, mb int, spoolDir string) {
	// Rows of about 1 KB of text each.
	rows := mb << 10
	d := New(t, Topology{"na": {"na1"}, "eu": {"eu1"}, "as": {"as1"}},
		"CREATE TABLE wide (id bigint PRIMARY KEY, a text NOT NULL, b text NOT NULL);")
	d.Delivery = "{ack_timeout: 2s, retries: 3, backoff: 50ms, max_backoff: 500ms, max_in_flight: 16MiB}"
	if spoolDir != "" {
		d.Extra = func(name string) string {
			if name != "na1" {
				return ""
			}
			return fmt.Sprintf("spool: {dir: %q}\n", spoolDir)
		}
	}
	d.StartAll()
	d.Eventually(time.Minute, "na1 holds the slot", func() bool { return d.Role("na1") == node.RoleReader })

	// Sample every node's peak RSS until the end, so a node that exits
	// early is still measured.
	peaks := map[string]int64{}
	var mu sync.Mutex
	sample := func() {
		for _, n := range []string{"na1", "eu1", "as1"} {
			if p := d.Proc(n); p != nil {
				if v, err := peakRSS(p.Cmd.Process.Pid); err == nil {
					mu.Lock()
					peaks[n] = max(peaks[n], v)
					mu.Unlock()
				}
			}
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tk := time.NewTicker(200 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tk.C:
				sample()
			}
		}
	}()
	defer func() { close(stop); wg.Wait() }()

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	start := time.Now()
	if err := d.Clusters["na"].Exec(ctx, "app", fmt.Sprintf(
		"INSERT INTO wide SELECT g, repeat(md5(g::text), 30), md5((g+1)::text) FROM generate_series(1, %d) g", rows)); err != nil {
		t.Fatal(err)
	}
	t.Logf("committed %d rows (about %d MB) on na in %s", rows, mb, time.Since(start).Round(time.Millisecond))
	count := func(region string) int {
		conn, err := d.Clusters[region].Connect(ctx, "app")
		if err != nil {
			return -1
		}
		defer conn.Close(ctx)
		var n int
		if err := conn.QueryRow(ctx, "SELECT count(*) FROM wide").Scan(&n); err != nil {
			return -1
		}
		return n
	}
	// Rows arrive in one commit: the count jumps from 0 to all of them.
	d.Eventually(15*time.Minute, "the transaction in eu and as", func() bool {
		return count("eu") == rows && count("as") == rows
	})
	t.Logf("replicated to eu and as %s after the commit", time.Since(start).Round(time.Millisecond))
	if rep := d.Verify(ctx); !rep.Equal() {
		t.Fatalf("regions differ after the large transaction: %+v", rep)
	}
	sample()
	logs, _ := os.ReadFile(d.LogPath("na1"))
	if !strings.Contains(string(logs), "large transaction spilled to disk") {
		t.Fatalf("na1 did not spill the transaction:\n%s", d.Logs())
	}
	// Once every region acknowledged it, the spill file is released:
	// na1 holds no descriptor of it any more, so its disk space is free.
	pid := d.Proc("na1").Cmd.Process.Pid
	d.Eventually(time.Minute, "na1 to release the spill file", func() bool { return spillFDs(pid) == 0 })
	if spoolDir != "" {
		d.Eventually(time.Minute, "na1 to delete the spooled copy", func() bool {
			names, err := filepath.Glob(filepath.Join(spoolDir, "txn-*.spill"))
			return err == nil && len(names) == 0
		})
	}
	limit := int64(5*decode.DefaultSpillBytes + 100<<20)
	mu.Lock()
	defer mu.Unlock()
	for _, n := range []string{"na1", "eu1", "as1"} {
		t.Logf("%s peak RSS %d MB", n, peaks[n]>>20)
		if peaks[n] == 0 || peaks[n] > limit {
			t.Errorf("%s peak RSS %d MB for a %d MB transaction, want below %d MB", n, peaks[n]>>20, mb, limit>>20)
		}
	}
}
