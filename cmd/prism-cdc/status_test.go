package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
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
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	httpAddr := l.Addr().String()
	l.Close()
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
		!strings.Contains(out, "slot prism_na not streaming") || !strings.Contains(out, "(node down)") {
		t.Fatalf("status(node down) = %d, want %d with a note and database facts\n%s%s", code, exitFail, out, &stderr)
	}
	stdout.Reset()
	code = run(ctx, []string{"status", "--config", cfg, "--json"}, &stdout, &stderr)
	var rep statusReport
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
		t.Fatalf("status --json: %v\n%s", err, &stdout)
	}
	if code != exitFail || rep.Node != nil || rep.NodeError == "" || !rep.Slot.Exists || rep.Slot.RetainedBytes <= 0 ||
		len(rep.Targets) != 1 || rep.Targets[0].AppliedLSN != "0/100" || rep.Targets[0].WALSinceApplied <= 0 {
		t.Fatalf("status --json = %d %+v", code, rep)
	}
}
