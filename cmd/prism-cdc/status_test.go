package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/node"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/peers"
)

// TestStatusNodeDown: with the node down, status still reports the
// databases' facts (slot, retained WAL, applied position in the peer
// region), says so, and exits 1.
func TestStatusNodeDown(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	na := pgtest.Start(t, pgtest.Options{Name: "status-na"})
	eu := pgtest.Start(t, pgtest.Options{Name: "status-eu"})
	if err := na.Exec(ctx, "postgres", `SELECT pg_create_logical_replication_slot('prism_na', 'pgoutput');
		CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1000)`); err != nil {
		t.Fatal(err)
	}
	if err := eu.Exec(ctx, "postgres", `SELECT pg_replication_origin_create('prism_na');
		SELECT pg_replication_origin_advance('prism_na', '0/100')`); err != nil {
		t.Fatal(err)
	}
	httpAddr := pgtest.FreeAddr(t)
	cfg := writeFile(t, "na1.yaml", fmt.Sprintf(`node: na1
region: na
database: %q
listen: "127.0.0.1:7101"
http: %q
auth: {insecure: true}
peers:
  - {region: eu, nodes: [{name: eu1, addr: "127.0.0.1:7201"}], database: %q}
`, na.DSN("postgres"), httpAddr, eu.DSN("postgres")))

	var stdout, stderr bytes.Buffer
	code := run(ctx, []string{"status", "--config", cfg}, &stdout, &stderr)
	out := stdout.String()
	if code != exitFail || !strings.Contains(out, "NOTE: node na1 does not answer on "+httpAddr) ||
		!strings.Contains(out, "slot prism_na (pgoutput) not streaming") || !strings.Contains(out, "node down") {
		t.Fatalf("status(node down) = %d, want %d with a note and database facts\n%s%s", code, exitFail, out, &stderr)
	}
	stdout.Reset()
	code = run(ctx, []string{"status", "--config", cfg, "--json"}, &stdout, &stderr)
	var rep statusReport
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
		t.Fatalf("status --json: %v\n%s", err, &stdout)
	}
	if code != exitFail || rep.Node != nil || rep.NodeError == "" || !rep.Slot.Exists || rep.Slot.Plugin != "pgoutput" || rep.Slot.RetainedBytes <= 0 ||
		len(rep.Targets) != 1 || rep.Targets[0].AppliedLSN != "0/100" || rep.Targets[0].WALSinceApplied <= 0 {
		t.Fatalf("status --json = %d %+v", code, rep)
	}
	// The node's lag is unknown, not zero, while the slot retains WAL.
	if tr := rep.Targets[0]; tr.LagBytes != nil || tr.LagSeconds != nil || strings.Contains(stdout.String(), `"lag_bytes"`) {
		t.Fatalf("status --json with the node down reports a lag: %s", &stdout)
	}
	var row string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "eu ") {
			row = l
		}
	}
	if f := strings.Fields(row); len(f) < 6 || f[1] != "node" || f[5] != "unknown" || f[6] != "unknown" {
		t.Fatalf("eu row %q, want state 'node down' and lag unknown\n%s", row, out)
	}
}

// TestErrorCell: a last error takes one line of the table, whatever it
// contains, with its age.
func TestErrorCell(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	at := now.Add(-90 * time.Second)
	long := strings.Repeat("x", 300)
	tests := []struct {
		name, msg string
		at        *time.Time
		want      string
	}{
		{"none", "", nil, "-"},
		{"aged", "connect eu1: connection refused", &at, "1m30s ago: connect eu1: connection refused"},
		{"multi-line", "apply:\n\tline two\r\nline three", nil, "apply: line two line three"},
		{"long", long, nil, strings.Repeat("x", maxErrorCell-1) + "…"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := errorCell(tc.msg, tc.at, now); got != tc.want {
				t.Fatalf("errorCell(%q) = %q, want %q", tc.msg, got, tc.want)
			}
		})
	}
}

// TestPrintDelays: status prints the stage delays of the last minute on a
// line for this region's transactions and one per source region, in ms
// below a second, and nothing without any.
func TestPrintDelays(t *testing.T) {
	var b bytes.Buffer
	printDelays(&b, []node.StageDelay{
		{Stage: node.StageSent, Count: 9, P50: .0007, P99: .0048},
		{Stage: node.StageRead, Count: 9, P50: .0008, P99: .0049},
		{Stage: node.StageReceived, Source: "as", Count: 4, P50: .001, P99: .0063},
		{Stage: node.StageApplied, Source: "as", Count: 4, P50: .0023, P99: 1.5},
		{Stage: node.StageApplied, Source: "na", Count: 2, P50: .003, P99: .004},
	})
	want := "\nDELAYS over the last 1m0s, from the source commit, p50 / p99 (transactions):\n" +
		"  this region's transactions: walsender sent 0.7 ms / 4.8 ms (9), node read 0.8 ms / 4.9 ms (9)\n" +
		"  from as, applied here: received here 1.0 ms / 6.3 ms (4), applied 2.3 ms / 1.5 s (4)\n" +
		"  from na, applied here: applied 3.0 ms / 4.0 ms (2)\n"
	if b.String() != want {
		t.Errorf("printDelays =\n%s\nwant\n%s", b.String(), want)
	}
	b.Reset()
	printDelays(&b, nil)
	if b.Len() != 0 {
		t.Errorf("printDelays(nil) = %q, want nothing", b.String())
	}
}

// TestStatusAuthRefused: a running node whose peer refuses its token shows
// the target as "auth refused" with the fix, and status exits 1, while
// the direct-SQL fallback carries the data.
func TestStatusAuthRefused(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	na := pgtest.Start(t, pgtest.Options{Name: "status-auth-na"})
	eu := pgtest.Start(t, pgtest.Options{Name: "status-auth-eu"})
	for _, c := range []*pgtest.Cluster{na, eu} {
		if err := c.Exec(ctx, "postgres", "CREATE TABLE t (id int PRIMARY KEY)"); err != nil {
			t.Fatal(err)
		}
	}
	pool, err := pgxpool.New(ctx, eu.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer stop()
	sc := peers.NewServerConfig(config.DefaultAckTimeout)
	sc.Region, sc.Node, sc.Token, sc.Insecure, sc.AcceptRegions = "eu", "eu1", "eu-token", true, []string{"na"}
	srv := peers.NewServer(sc,
		apply.NewApplier(pool, zerolog.Nop(), apply.WithLocalRegion("eu")), zerolog.Nop())
	wg.Add(1)
	go func() { defer wg.Done(); srv.Serve(sctx, ln) }()

	httpAddr := pgtest.FreeAddr(t)
	cfg := writeFile(t, "na1.yaml", fmt.Sprintf(`node: na1
region: na
database: %q
listen: %q
http: %q
auth: {token: na-token, insecure: true}
delivery: {ack_timeout: 500ms, retries: 1, backoff: 50ms, max_backoff: 200ms}
peers:
  - {region: eu, nodes: [{name: eu1, addr: %q}], database: %q}
`, na.DSN("postgres"), pgtest.FreeAddr(t), httpAddr, ln.Addr().String(), eu.DSN("postgres")))
	var nodeOut, nodeErr lockedBuf
	rctx, rcancel := context.WithCancel(ctx)
	wg.Add(1)
	go func() { defer wg.Done(); run(rctx, []string{"run", "--config", cfg}, &nodeOut, &nodeErr) }()
	defer rcancel()

	if err := na.Exec(ctx, "postgres", "INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	var out string
	var code int
	deadline := time.Now().Add(90 * time.Second)
	for {
		var stdout, stderr bytes.Buffer
		code = run(ctx, []string{"status", "--config", cfg}, &stdout, &stderr)
		out = stdout.String()
		if strings.Contains(out, "AUTH REFUSED") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status never showed the refused token (exit %d):\n%s%s", code, out, &stderr)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if code != exitFail || !strings.Contains(out, "auth refused") || !strings.Contains(out, "node eu1 of region eu refuses this node's credentials") ||
		!strings.Contains(out, "same auth.token") || !strings.Contains(out, "wrong token") {
		t.Fatalf("status = %d, want %d with state 'auth refused' and the fix:\n%s", code, exitFail, out)
	}
	t.Logf("status:\n%s\nnode log:\n%s", out, nodeErr.String())
}

// lockedBuf is a bytes.Buffer that a running node and the test may use at
// once.
type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
