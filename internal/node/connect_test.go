package node

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/logtest"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// TestBoundConnect: a DSN without connect_timeout gets one, in either
// form; one that sets its own keeps it.
func TestBoundConnect(t *testing.T) {
	defer func(d time.Duration) { ConnectTimeout = d }(ConnectTimeout)
	ConnectTimeout = 15 * time.Second
	for _, c := range []struct{ in, want string }{
		{"host=127.0.0.1 dbname=app", "host=127.0.0.1 dbname=app connect_timeout=15"},
		{"postgres://u@127.0.0.1/app", "postgres://u@127.0.0.1/app?connect_timeout=15"},
		{"postgresql://u@127.0.0.1/app?sslmode=disable", "postgresql://u@127.0.0.1/app?sslmode=disable&connect_timeout=15"},
		{"host=127.0.0.1 dbname=app connect_timeout=3", "host=127.0.0.1 dbname=app connect_timeout=3"},
		{"postgres://u@127.0.0.1/app?connect_timeout=3", "postgres://u@127.0.0.1/app?connect_timeout=3"},
		{"", ""},
	} {
		if got := boundConnect(c.in); got != c.want {
			t.Errorf("boundConnect(%q) = %q, want %q", c.in, got, c.want)
		}
	}
	ConnectTimeout = 300 * time.Millisecond
	if got := boundConnect("host=127.0.0.1"); got != "host=127.0.0.1 connect_timeout=1" {
		t.Errorf("boundConnect with a timeout under a second = %q, want connect_timeout=1 (0 would mean none)", got)
	}
}

// TestSilentDatabaseIsReported: a region's database that accepts
// connections and never answers (a hung server) is reported and retried
// like one that is down, instead of holding the node's first connection
// for ever without a word.
func TestSilentDatabaseIsReported(t *testing.T) {
	defer func(d time.Duration) { ConnectTimeout = d }(ConnectTimeout)
	ConnectTimeout = time.Second
	port := pgtest.SilentListener(t)
	yaml := fmt.Sprintf(`node: na1
region: na
database: "host=127.0.0.1 port=%d user=postgres dbname=app sslmode=disable"
listen: %q
http: %q
auth: {token: silent-test-token, insecure: true}
delivery: {ack_timeout: 1s, retries: 1, backoff: 50ms, max_backoff: 300ms}
peers:
  - region: eu
    database: "host=127.0.0.1 port=1 user=postgres dbname=app connect_timeout=1"
    nodes: [{name: eu1, addr: %q}]
`, port, pgtest.FreeAddr(t), pgtest.FreeAddr(t), pgtest.FreeAddr(t))
	path := filepath.Join(t.TempDir(), "na1.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuf{}
	n := New(cfg, zerolog.New(logtest.New(t, logs)).With().Timestamp().Logger())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	deadline := time.Now().Add(30 * time.Second)
	for strings.Count(logs.String(), "database unavailable; waiting for it") < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("no second report of the silent database in 30 s; logs:\n%s", logs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "timeout") {
		t.Fatalf("the report does not say the connection timed out; logs:\n%s", logs)
	}
	if role, reason := n.currentRole(); role != RoleStarting || reason == "" {
		t.Fatalf("role %s (%q), want starting with the reason", role, reason)
	}
}
