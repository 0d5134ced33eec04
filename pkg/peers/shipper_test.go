package peers

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

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
	if !strings.Contains(logs.String(), `"table":"public.items"`) {
		t.Fatalf("halt log lacks the table:\n%s", logs.String())
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
