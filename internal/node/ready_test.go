package node

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/logtest"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// probe returns the HTTP status and body of GET url; 0 when it fails.
func probe(url string) (int, string) {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// runRegionNode runs node name of region na against db until the test
// ends. Its peer region eu does not answer. It returns the node and its
// HTTP base URL.
func runRegionNode(t *testing.T, db *pgtest.Cluster, name string, logs io.Writer) (*Node, string) {
	t.Helper()
	httpAddr := pgtest.FreeAddr(t)
	yaml := fmt.Sprintf(`node: %s
region: na
database: %q
listen: %q
http: %q
auth: {token: ready-test-token, insecure: true}
delivery: {ack_timeout: 1s, retries: 1, backoff: 50ms, max_backoff: 300ms}
peers:
  - region: eu
    database: "host=127.0.0.1 port=1 user=postgres dbname=app connect_timeout=1"
    nodes: [{name: eu1, addr: %q}]
`, name, db.DSN("app"), pgtest.FreeAddr(t), httpAddr, pgtest.FreeAddr(t))
	path := filepath.Join(t.TempDir(), name+".yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	n := New(cfg, zerolog.New(logtest.New(t, logs)).With().Timestamp().Str("node", name).Str("region", "na").Logger())
	n.stallAfter = time.Second
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := n.Run(ctx); err != nil {
			fmt.Fprintf(logs, "node %s stopped: %v\n", name, err)
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return n, "http://" + httpAddr
}

// appCluster starts a cluster with an empty database app, and returns it
// with the buffer for its nodes' logs, printed when the test fails.
func appCluster(t *testing.T, name string) (*pgtest.Cluster, *syncBuf) {
	t.Helper()
	db := pgtest.Start(t, pgtest.Options{Name: name})
	if err := db.CreateDatabase(context.Background(), "app"); err != nil {
		t.Fatal(err)
	}
	logs := &syncBuf{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("node logs:\n%s", logs)
		}
	})
	return db, logs
}

// TestHealthAndReadiness checks /healthz (the process is alive) and
// /readyz (the node can serve its region) with the database up, down and
// back, for the node that reads the slot and for one that stands by.
func TestHealthAndReadiness(t *testing.T) {
	db, logs := appCluster(t, "node-ready")
	within := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	is := func(url string, code int, body string) func() bool {
		return func() bool {
			c, b := probe(url)
			return c == code && strings.Contains(b, body)
		}
	}

	n1, url1 := runRegionNode(t, db, "na1", logs)
	within("na1 reads the slot and is ready", func() bool {
		role, _ := n1.currentRole()
		return role == RoleReader && is(url1+"/readyz", 200, "ready\n")()
	})
	n2, url2 := runRegionNode(t, db, "na2", logs)
	within("na2 stands by and is ready", func() bool {
		role, reason := n2.currentRole()
		return role == RoleStandby && reason == "" && is(url2+"/readyz", 200, "ready\n")()
	})
	for _, u := range []string{url1, url2} {
		if c, b := probe(u + "/healthz"); c != 200 || b != "ok\n" {
			t.Errorf("%s/healthz = %d %q, want 200 ok", u, c, b)
		}
	}
	// Run samples the target regions for the page's charts from the start.
	var h History
	if c, b := probe(url1 + "/history"); c != 200 || json.Unmarshal([]byte(b), &h) != nil ||
		len(h.Targets) != 1 || h.Targets[0].Region != "eu" || len(h.Targets[0].Samples) == 0 || h.SpanSeconds != 900 {
		t.Errorf("/history = %d %s, want region eu's samples over 900 s", c, b)
	}

	// The database stops: both nodes are alive and not ready, and say why.
	if err := db.Stop("fast"); err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{url1, url2} {
		var c int
		var b string
		within(u+"/readyz 503 with a reason", func() bool {
			c, b = probe(u + "/readyz")
			return c == http.StatusServiceUnavailable && strings.HasPrefix(b, "database unreachable: ") && strings.Count(b, "\n") == 1
		})
		if c, b := probe(u + "/healthz"); c != 200 {
			t.Errorf("%s/healthz = %d %q with the database down, want 200: liveness does not depend on the database", u, c, b)
		}
	}

	if err := db.Start(); err != nil {
		t.Fatal(err)
	}
	within("both nodes ready again, one reading the slot", func() bool {
		r1, _ := n1.currentRole()
		r2, _ := n2.currentRole()
		return (r1 == RoleReader || r2 == RoleReader) && is(url1+"/readyz", 200, "ready")() && is(url2+"/readyz", 200, "ready")()
	})

	// A node whose loops stand still is not alive.
	n1.mu.Lock()
	within("na1 /healthz reports the stalled checkpoint loop", is(url1+"/healthz", http.StatusServiceUnavailable, "checkpoint loop stalled for "))
	n1.mu.Unlock()
	within("na1 /healthz ok again", is(url1+"/healthz", 200, "ok"))
}

// TestReadyzHalted: a halted target region makes the node not ready, and
// the body names that region alone (a region that is only retrying does
// not).
func TestReadyzHalted(t *testing.T) {
	_, srv := pageFixture(t)
	deadline := time.Now().Add(30 * time.Second)
	for {
		st := getStatus(t, srv.URL)
		if strings.HasPrefix(target(st, "ap").Path, "halted") && target(st, "as").LastHour.Retries > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("states not reached: %+v", st.Targets)
		}
		time.Sleep(100 * time.Millisecond)
	}
	c, b := probe(srv.URL + "/readyz")
	if c != http.StatusServiceUnavailable || !strings.HasPrefix(b, "region ap halted: 42P01 ") || strings.Count(b, "\n") != 1 {
		t.Errorf("/readyz = %d %q, want 503 and one line: region ap halted: 42P01 ...", c, b)
	}
}

// TestWatchConnKept checks that the node's periodic checks (the slot's
// WAL retention, the database facts of /metrics) reuse one kept
// connection instead of making the server start a backend for each.
func TestWatchConnKept(t *testing.T) {
	ctx := context.Background()
	db, logs := appCluster(t, "node-watch")
	n, url := runRegionNode(t, db, "na1", logs)
	deadline := time.Now().Add(60 * time.Second)
	for {
		role, _ := n.currentRole()
		if c, _ := probe(url + "/readyz"); role == RoleReader && c == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting for na1 to read the slot")
		}
		time.Sleep(50 * time.Millisecond)
	}
	pids := map[int32]bool{}
	for range 3 {
		h, err := n.readSlotHealth(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if h.walStatus != "reserved" {
			t.Fatalf("slot wal_status = %q, want reserved", h.walStatus)
		}
		if err := n.withWatchConn(ctx, func(q querier) error {
			var pid int32
			err := q.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid)
			pids[pid] = true
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	if len(pids) != 1 {
		t.Fatalf("the checks ran on %d backends, want one kept connection", len(pids))
	}
}
