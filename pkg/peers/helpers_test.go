package peers

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/logtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

const testToken = "tok-3f9a1c"

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// logBuf collects log output safely across goroutines. Its loggers check
// every line (logtest): a key written twice fails the test.
type logBuf struct {
	mu    sync.Mutex
	b     bytes.Buffer
	check *logtest.Writer
}

// newLogBuf returns a logBuf whose lines are checked when t ends.
func newLogBuf(t *testing.T) *logBuf {
	l := &logBuf{}
	l.check = logtest.New(t, l)
	return l
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// logger returns a logger with the keys prism-cdc run's root logger has
// (node, region), so a package logger that adds one of them again shows.
// A logBuf not made by newLogBuf is not checked.
func (l *logBuf) logger() zerolog.Logger {
	var w io.Writer = l
	if l.check != nil {
		w = l.check
	}
	return zerolog.New(w).With().Timestamp().Str("node", "na1").Str("region", "na").Logger()
}

// memApplier is an in-memory Applier with the real semantics: progress
// per origin, skip at or below it, all-or-nothing per transaction.
type memApplier struct {
	mu       sync.Mutex
	progress map[string]pglogrepl.LSN
	applied  []pglogrepl.LSN // EndLSNs in apply order, skips excluded
	calls    int
	// fail, when set, may fail a transaction before it is applied.
	fail func(*decode.Txn) error
}

func newMemApplier() *memApplier { return &memApplier{progress: map[string]pglogrepl.LSN{}} }

func (m *memApplier) Apply(ctx context.Context, txn *decode.Txn) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls++
	if err := ctx.Err(); err != nil {
		return err
	}
	if m.fail != nil {
		if err := m.fail(txn); err != nil {
			return err
		}
	}
	if txn.EndLSN <= m.progress[txn.Origin] {
		return nil
	}
	m.progress[txn.Origin] = txn.EndLSN
	m.applied = append(m.applied, txn.EndLSN)
	return nil
}

func (m *memApplier) Progress(ctx context.Context, region string) (pglogrepl.LSN, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.progress[region], nil
}

func (m *memApplier) appliedLSNs() []pglogrepl.LSN {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]pglogrepl.LSN(nil), m.applied...)
}

// testErr is an apply error with behaviour methods.
type testErr struct {
	code string
	temp bool
}

func (e *testErr) Error() string   { return "test error " + e.code }
func (e *testErr) Temporary() bool { return e.temp }
func (e *testErr) SQLCode() string { return e.code }

// itemsRel is public.items(id int primary key, v text).
var itemsCols = []decode.Column{{Name: "id", TypeOID: 23, TypeMod: -1, Key: true}, {Name: "v", TypeOID: 25, TypeMod: -1}}

// lsnOf is the EndLSN of test transaction i (1-based).
func lsnOf(i int) pglogrepl.LSN { return pglogrepl.LSN(0x1000000 + i*0x100) }

// mkTxn returns transaction i from origin "na": INSERT INTO items (i, v),
// padded to roughly pad bytes.
func mkTxn(i int, pad int) *decode.Txn {
	rel := &decode.Relation{ID: 16384, Schema: "public", Table: "items", ReplicaIdentity: decode.IdentityDefault, Columns: itemsCols}
	v := fmt.Sprintf("v%d", i)
	if pad > len(v) {
		v += string(bytes.Repeat([]byte("x"), pad-len(v)))
	}
	return &decode.Txn{
		Origin:     "na",
		Xid:        uint32(1000 + i),
		CommitLSN:  lsnOf(i) - 0x30,
		EndLSN:     lsnOf(i),
		CommitTime: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(i) * time.Millisecond),
		Changes: []decode.Change{{Op: decode.OpInsert, Rel: rel, New: []decode.Value{
			{Kind: decode.ValueText, Data: []byte(fmt.Sprint(i))},
			{Kind: decode.ValueText, Data: []byte(v)},
		}}},
	}
}

// serve runs srv on a fresh loopback listener until the test ends and
// returns its address. Serve's error fails the test.
func serve(t *testing.T, srv *Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serveOn(t, srv, ln)
}

// serveOn runs srv on ln until the test ends and returns its address.
func serveOn(t *testing.T, srv *Server, ln net.Listener) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve = %v", err)
		}
	})
	return ln.Addr().String()
}

// runShipper runs sh until the test ends.
func runShipper(t *testing.T, sh *Shipper) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sh.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
	})
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func serverConfig(region, node string) ServerConfig {
	c := NewServerConfig(200 * time.Millisecond)
	c.Region, c.Node, c.Token, c.Insecure = region, node, testToken, true
	c.AcceptRegions = []string{"na", "as"}
	c.HelloTimeout, c.Heartbeat, c.IdleTimeout = time.Second, 40*time.Millisecond, 5*time.Second
	return c
}

func shipperConfig(nodes ...NodeAddr) ShipperConfig {
	c := NewShipperConfig(200 * time.Millisecond)
	c.SourceRegion, c.SourceNode, c.TargetRegion, c.Nodes = "na", "na1", "eu", nodes
	c.Token, c.Insecure = testToken, true
	c.Retries, c.Backoff, c.MaxBackoff, c.MaxInFlight = 5, 20*time.Millisecond, 100*time.Millisecond, 16<<20
	c.ProbeInterval, c.Heartbeat, c.Seed = 50*time.Millisecond, 50*time.Millisecond, 7
	return c
}
