package peers

import (
	"context"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestHaltOnPermanentNack: a permanent apply error halts the region at
// that transaction, logged once; nothing after it is applied; once the
// cause is fixed the shipper resumes by itself. A retryable error is just
// retried.
func TestHaltOnPermanentNack(t *testing.T) {
	ctx := testCtx(t)
	app := newMemApplier()
	var broken atomic.Bool
	broken.Store(true)
	var flaky atomic.Int32
	app.fail = func(txn *decode.Txn) error {
		switch {
		case txn.EndLSN == lsnOf(2) && flaky.Add(1) <= 2:
			return &testErr{code: "40001", temp: true}
		case txn.EndLSN == lsnOf(3) && broken.Load():
			return &testErr{code: "23505", temp: false}
		}
		return nil
	}
	addr := serve(t, NewServer(serverConfig("eu", "eu1"), app, (newLogBuf(t)).logger()))
	logs := newLogBuf(t)
	cfg := shipperConfig(NodeAddr{Name: "eu1", Addr: addr})
	cfg.Retries = 50
	sh := NewShipper(cfg, nil, logs.logger())
	runShipper(t, sh)
	for i := 1; i <= 5; i++ {
		if err := sh.Send(ctx, mkTxn(i, 0)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "halt", 10*time.Second, func() bool { return strings.HasPrefix(sh.Status().Path, "halted: 23505") })
	// Let it retry the halted transaction a few times.
	calls := func() int { app.mu.Lock(); defer app.mu.Unlock(); return app.calls }
	c0 := calls()
	waitFor(t, "retries of the halted transaction", 10*time.Second, func() bool { return calls() >= c0+3 })
	st := sh.Status()
	if st.Acked != lsnOf(2) || st.Halts != 1 || !strings.Contains(st.Path, "at "+lsnOf(3).String()) {
		t.Fatalf("Status = %+v, want halted at txn 3 with txn 2 acked", st)
	}
	if got := app.appliedLSNs(); len(got) != 2 {
		t.Fatalf("applied %v while halted, want txns 1 and 2 only", got)
	}
	if n := countLines(logs.String(), `"level":"error"`); n != 1 {
		t.Fatalf("%d error lines, want the halt logged once:\n%s", n, logs.String())
	}
	// The error names no table: the log gives the transaction's first
	// table, and does not call it the failing one.
	if !strings.Contains(logs.String(), `"first_table":"public.items"`) || strings.Contains(logs.String(), `"table":`) {
		t.Fatalf("halt log lacks the first table, or names it the failing table:\n%s", logs.String())
	}

	broken.Store(false) // the operator fixed the cause
	waitFor(t, "resume", 10*time.Second, func() bool { return sh.Acked() == lsnOf(5) })
	st = sh.Status()
	if st.Path != "eu1" || st.Halts != 1 {
		t.Fatalf("Status = %+v, want eu1 after resuming", st)
	}
	got := app.appliedLSNs()
	for i, lsn := range got {
		if lsn != lsnOf(i+1) {
			t.Fatalf("applied %v, want txns 1..5 in order", got)
		}
	}
	if len(got) != 5 {
		t.Fatalf("applied %v, want txns 1..5", got)
	}
}

// TestSendIgnoresRedelivery: the reader may hand over a transaction again
// after reconnecting to its slot; it is not queued twice.
func TestSendIgnoresRedelivery(t *testing.T) {
	sh := NewShipper(shipperConfig(), nil, (newLogBuf(t)).logger())
	ctx := context.Background()
	for _, i := range []int{1, 2, 2, 1, 3} {
		if err := sh.Send(ctx, mkTxn(i, 0)); err != nil {
			t.Fatal(err)
		}
	}
	if st := sh.Status(); st.WindowTxns != 3 || st.Sent != lsnOf(3) {
		t.Fatalf("Status = %+v, want 3 transactions up to %s", st, lsnOf(3))
	}
	// A cancelled Send on a full window returns the context error.
	small := NewShipper(ShipperConfig{MaxInFlight: 10}, nil, (newLogBuf(t)).logger())
	if err := small.Send(ctx, mkTxn(1, 0)); err != nil {
		t.Fatalf("first Send into an empty window = %v, want it admitted alone", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := small.Send(cctx, mkTxn(2, 0)); err != context.Canceled {
		t.Fatalf("Send on a full window with a cancelled context = %v", err)
	}
	if m := MinAcked(sh, small); m != 0 {
		t.Fatalf("MinAcked = %s, want 0/0", m)
	}
}

// countingListener accepts connections on loopback, counts them and
// closes each at once: a node that fails every attempt.
type countingListener struct {
	ln       net.Listener
	accepted atomic.Int32
}

func newCountingListener(t *testing.T) *countingListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &countingListener{ln: ln}
	done := make(chan struct{})
	go func() { // owned by the test: stopped and waited for by Cleanup
		defer close(done)
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			c.accepted.Add(1)
			nc.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return c
}

// TestRetriesTakenAsGiven: Retries is used as given, so a node that fails
// is tried exactly 1+Retries times before the shipper moves on, to the
// region's next node or to the fallback; 0 means it moves on after the
// first failed attempt. Attempts are counted as connections the failing
// node accepted.
func TestRetriesTakenAsGiven(t *testing.T) {
	for _, tc := range []struct {
		name     string
		retries  int
		fallback bool
	}{
		{"retries 0, next node", 0, false},
		{"retries 0, fallback", 0, true},
		{"retries 2, next node", 2, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testCtx(t)
			bad := newCountingListener(t)
			nodes := []NodeAddr{{Name: "eu1", Addr: bad.ln.Addr().String()}}
			app := newMemApplier()
			var fallback Fallback
			if tc.fallback {
				fallback = func(ctx context.Context) (Applier, func(), error) { return app, func() {}, nil }
			} else {
				addr := serve(t, NewServer(serverConfig("eu", "eu2"), app, newLogBuf(t).logger()))
				nodes = append(nodes, NodeAddr{Name: "eu2", Addr: addr})
			}
			cfg := shipperConfig(nodes...)
			cfg.Retries = tc.retries
			cfg.ProbeInterval = time.Hour // no probe of eu1 may count as an attempt
			sh := NewShipper(cfg, fallback, newLogBuf(t).logger())
			runShipper(t, sh)
			if err := sh.Send(ctx, mkTxn(1, 0)); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "ack", 30*time.Second, func() bool { return sh.Acked() == lsnOf(1) })

			if got, want := int(bad.accepted.Load()), 1+tc.retries; got != want {
				t.Fatalf("eu1 saw %d connection attempts with Retries %d, want %d", got, tc.retries, want)
			}
			st := sh.Status()
			wantPath, wantFailovers, wantFallbacks := "eu2", 1, 0
			if tc.fallback {
				wantPath, wantFailovers, wantFallbacks = PathFallback, 0, 1
			}
			if st.Path != wantPath || st.Retries != tc.retries || st.Failovers != wantFailovers || st.Fallbacks != wantFallbacks {
				t.Fatalf("Status = %+v, want path %s after %d retries, %d failovers, %d fallbacks",
					st, wantPath, tc.retries, wantFailovers, wantFallbacks)
			}
			if got := app.appliedLSNs(); len(got) != 1 || got[0] != lsnOf(1) {
				t.Fatalf("applied %v, want txn 1", got)
			}
		})
	}
}

// TestRunRefusesBadDelivery: delivery settings arrive resolved; one out of
// range is an error from Run, never replaced by a default.
func TestRunRefusesBadDelivery(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*ShipperConfig)
		want   string
	}{
		{"zero ack timeout", func(c *ShipperConfig) { c.AckTimeout = 0 }, "ack timeout 0s is not positive"},
		{"negative retries", func(c *ShipperConfig) { c.Retries = -1 }, "retries -1 is negative"},
		{"zero backoff", func(c *ShipperConfig) { c.Backoff = 0 }, "backoff 0s is not positive"},
		{"max backoff below backoff", func(c *ShipperConfig) { c.MaxBackoff = c.Backoff / 2 }, "max backoff 10ms is below backoff 20ms"},
		{"zero max in flight", func(c *ShipperConfig) { c.MaxInFlight = 0 }, "max in flight 0 is not positive"},
		{"zero dial timeout", func(c *ShipperConfig) { c.DialTimeout = 0 }, "dial timeout 0s is not positive"},
		{"zero handshake timeout", func(c *ShipperConfig) { c.HandshakeTimeout = 0 }, "handshake timeout 0s is not positive"},
		{"zero read timeout", func(c *ShipperConfig) { c.ReadTimeout = 0 }, "read timeout 0s is not positive"},
		{"zero write timeout", func(c *ShipperConfig) { c.WriteTimeout = 0 }, "write timeout 0s is not positive"},
		{"zero heartbeat", func(c *ShipperConfig) { c.Heartbeat = 0 }, "heartbeat 0s is not positive"},
		{"zero probe interval", func(c *ShipperConfig) { c.ProbeInterval = 0 }, "probe interval 0s is not positive"},
		{"zero fence timeout", func(c *ShipperConfig) { c.FenceTimeout = 0 }, "fence timeout 0s is not positive"},
		{"zero max frame", func(c *ShipperConfig) { c.MaxFrame = 0 }, "max frame 0 is not positive"},
		{"zero chunk bytes", func(c *ShipperConfig) { c.ChunkBytes = 0 }, "chunk bytes 0 is not positive"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := shipperConfig(NodeAddr{Name: "eu1", Addr: "127.0.0.1:1"})
			tc.mutate(&cfg)
			// Run returns at once on bad settings; the deadline only ends a
			// Run that accepted them.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			err := NewShipper(cfg, nil, newLogBuf(t).logger()).Run(ctx)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Run = %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// TestShipperSendQuiet checks that Send, with nobody waiting for the
// window to change, neither allocates nor replaces the change channel,
// and that a waiter that takes the channel afterwards is still woken by
// the next Send.
func TestShipperSendQuiet(t *testing.T) {
	sh := NewShipper(shipperConfig(NodeAddr{Name: "eu1", Addr: "127.0.0.1:1"}), nil, zerolog.Nop())
	ctx := context.Background()
	txns := make([]*decode.Txn, 2000)
	for i := range txns {
		txns[i] = &decode.Txn{Origin: "na", EndLSN: pglogrepl.LSN(i + 1)}
	}
	sh.window = make([]entry, 0, len(txns)+1)
	i := 0
	allocs := testing.AllocsPerRun(1000, func() {
		if err := sh.Send(ctx, txns[i]); err != nil {
			t.Fatal(err)
		}
		i++
	})
	if allocs > 0 {
		t.Fatalf("Send: %.2f allocations each, want 0", allocs)
	}
	_, changed := sh.unsent(0, 1)
	if err := sh.Send(ctx, &decode.Txn{Origin: "na", EndLSN: pglogrepl.LSN(len(txns) + 1)}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	default:
		t.Fatal("a waiter's channel was not closed by the next Send")
	}
}

// readCounter counts the reads that returned data on the connections it
// accepts.
type readCounter struct {
	net.Listener
	reads atomic.Int64
}

func (l *readCounter) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &countedConn{Conn: nc, reads: &l.reads}, nil
}

type countedConn struct {
	net.Conn
	reads *atomic.Int64
}

func (c *countedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.reads.Add(1)
	}
	return n, err
}

// TestShipperLinger: with a linger, transactions sent while the writer
// lingers after a write of several go out together, and the receiver
// reads them in one read; without one, or after a write of one (a quiet
// source), each Send 20 ms apart is written (and read) on its own.
func TestShipperLinger(t *testing.T) {
	for _, tc := range []struct {
		name              string
		linger            time.Duration
		first             int // transactions in the window before the shipper connects
		minReads, maxRead int64
	}{
		{"linger", 2 * time.Second, 2, 1, 2},
		{"quiet", 2 * time.Second, 1, 4, 5},
		{"none", 0, 2, 4, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			rc := &readCounter{Listener: ln}
			addr := serveOn(t, NewServer(serverConfig("eu", "eu1"), newMemApplier(), zerolog.Nop()), rc)
			cfg := shipperConfig(NodeAddr{Name: "eu1", Addr: addr})
			cfg.Heartbeat, cfg.Linger = time.Hour, tc.linger
			sh := NewShipper(cfg, nil, zerolog.Nop())
			ctx := testCtx(t)
			for i := 1; i <= tc.first; i++ {
				if err := sh.Send(ctx, mkTxn(i, 0)); err != nil {
					t.Fatal(err)
				}
			}
			runShipper(t, sh)
			waitFor(t, "ack of the first transactions", 5*time.Second, func() bool { return sh.Acked() == lsnOf(tc.first) })
			before := rc.reads.Load()
			for i := tc.first + 1; i <= tc.first+5; i++ {
				if err := sh.Send(ctx, mkTxn(i, 0)); err != nil {
					t.Fatal(err)
				}
				time.Sleep(20 * time.Millisecond)
			}
			waitFor(t, "ack of every transaction", 10*time.Second, func() bool { return sh.Acked() == lsnOf(tc.first+5) })
			if got := rc.reads.Load() - before; got < tc.minReads || got > tc.maxRead {
				t.Errorf("receiver reads for 5 transactions = %d, want %d to %d", got, tc.minReads, tc.maxRead)
			}
		})
	}
}
