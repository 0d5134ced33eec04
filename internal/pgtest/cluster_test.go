package pgtest

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestTwoClustersCrashAndRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	a := Start(t, Options{Name: "a"})
	b := Start(t, Options{Name: "b"})
	if a.Port == b.Port {
		t.Fatalf("both clusters on port %d", a.Port)
	}
	if err := a.Exec(ctx, "postgres", "CREATE TABLE t (id int primary key, v text); INSERT INTO t VALUES (1, 'one')"); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*Cluster{a, b} {
		conn, err := c.Connect(ctx, "postgres")
		if err != nil {
			t.Fatal(err)
		}
		var level, ts string
		if err := conn.QueryRow(ctx, "SELECT current_setting('wal_level'), current_setting('track_commit_timestamp')").Scan(&level, &ts); err != nil {
			t.Fatal(err)
		}
		conn.Close(ctx)
		if level != "logical" || ts != "on" {
			t.Fatalf("%s: wal_level=%s track_commit_timestamp=%s, want logical/on", c.Name, level, ts)
		}
	}

	if err := a.Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Connect(ctx, "postgres"); err == nil {
		t.Fatalf("connect after immediate stop succeeded")
	}
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	conn, err := a.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var v string
	if err := conn.QueryRow(ctx, "SELECT v FROM t WHERE id = 1").Scan(&v); err != nil {
		t.Fatalf("row after crash restart: %v", err)
	}
	if v != "one" {
		t.Fatalf("v = %q, want %q", v, "one")
	}
}

func TestCloseRemovesEverything(t *testing.T) {
	c, err := New(Options{Name: "close"})
	if err != nil {
		t.Fatal(err)
	}
	dir := c.Dir
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close = %v, want nil", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("Stat(%s) = %v, want not exist", dir, err)
	}
	if _, err := c.Connect(context.Background(), "postgres"); err == nil {
		t.Fatalf("connect after Close succeeded")
	}
}

func TestBinDir(t *testing.T) {
	d, err := BinDir()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(d + "/pg_ctl"); err != nil {
		t.Fatalf("BinDir() = %s without pg_ctl: %v", d, err)
	}
}

// TestReapOrphans stops and removes a running cluster whose owner process
// died, and leaves a live owner's cluster alone.
func TestReapOrphans(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	orphan, err := New(Options{Name: "orphan"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { orphan.Close() })
	kept := Start(t, Options{Name: "kept"})
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(orphan.Dir, ownerFile), []byte(strconv.Itoa(dead.Process.Pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	// Other test processes' clusters may share the directory; only these
	// two are this test's business.
	reaped := strings.Join(reapOrphans(filepath.Dir(orphan.Dir)), " ")
	if !strings.Contains(reaped, orphan.Dir) || strings.Contains(reaped, kept.Dir) {
		t.Fatalf("reaped %s; want %s reaped and %s kept", reaped, orphan.Dir, kept.Dir)
	}
	if _, err := os.Stat(orphan.Dir); !os.IsNotExist(err) {
		t.Fatalf("orphan's directory still there: %v", err)
	}
	if conn, err := orphan.Connect(ctx, "postgres"); err == nil {
		conn.Close(ctx)
		t.Fatalf("the orphan's server still accepts connections")
	}
	if err := kept.Exec(ctx, "postgres", "SELECT 1"); err != nil {
		t.Fatalf("a live owner's cluster was touched: %v", err)
	}
}

// TestFreeAddr: FreeAddr never hands out a port twice in one process and
// stays below the kernel's ephemeral range, where no outgoing
// connection's source port can take it before the test binds it.
func TestFreeAddr(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 300; i++ {
		a := FreeAddr(t)
		if seen[a] {
			t.Fatalf("FreeAddr returned %s twice", a)
		}
		seen[a] = true
		_, port, err := net.SplitHostPort(a)
		if err != nil {
			t.Fatal(err)
		}
		if p, _ := strconv.Atoi(port); p < 20000 || p >= 32000 {
			t.Fatalf("FreeAddr returned port %d, want 20000-31999", p)
		}
	}
}
