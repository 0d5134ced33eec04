package peers

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"
)

// lazyApplier commits like memApplier but, like an apply.Applier with
// WithLazyFlush, makes its commits durable only in Progress, which waits
// while gate is closed.
type lazyApplier struct {
	*memApplier
	mu      sync.Mutex
	durable map[string]pglogrepl.LSN
	gate    chan struct{} // nil: Progress does not wait
	// ahead, when set, is what Progress reports: an origin that moved
	// past the transactions whose commit returned.
	ahead pglogrepl.LSN
	calls []time.Time // when each Progress call started
}

func (l *lazyApplier) LazyFlush() bool { return true }

func (l *lazyApplier) Progress(ctx context.Context, region string) (pglogrepl.LSN, error) {
	l.mu.Lock()
	gate := l.gate
	l.calls = append(l.calls, time.Now())
	l.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	committed, _ := l.memApplier.Progress(ctx, region)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.durable[region] = committed
	return max(committed, l.ahead), nil
}

// TestLazyFlushAcksDurableOnly: with an applier that flushes lazily, the
// server acknowledges what Progress reports durable, never a transaction
// that is only committed; once Progress flushes, one ACK covers every
// transaction committed meanwhile.
func TestLazyFlushAcksDurableOnly(t *testing.T) {
	app := &lazyApplier{memApplier: newMemApplier(), durable: map[string]pglogrepl.LSN{}}
	addr := serve(t, NewServer(serverConfig("eu", "eu1"), app, zerolog.Nop()))
	sh := NewShipper(shipperConfig(NodeAddr{Name: "eu1", Addr: addr}), nil, zerolog.Nop())
	runShipper(t, sh)
	ctx := testCtx(t)
	if err := sh.Send(ctx, mkTxn(1, 0)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the first transaction acknowledged", 10*time.Second, func() bool { return sh.Acked() == lsnOf(1) })

	gate := make(chan struct{})
	app.mu.Lock()
	app.gate = gate
	app.mu.Unlock()
	for i := 2; i <= 6; i++ {
		if err := sh.Send(ctx, mkTxn(i, 0)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "transactions 2-6 committed", 10*time.Second, func() bool { return len(app.appliedLSNs()) == 6 })
	// Committed, not durable: no ACK may cover them, however long we wait.
	time.Sleep(300 * time.Millisecond)
	if got := sh.Acked(); got != lsnOf(1) {
		t.Fatalf("acked %s while Progress had not flushed; want %s", got, lsnOf(1))
	}
	close(gate)
	waitFor(t, "one ACK covering transactions 2-6", 10*time.Second, func() bool { return sh.Acked() == lsnOf(6) })
	app.mu.Lock()
	defer app.mu.Unlock()
	if app.durable["na"] != lsnOf(6) {
		t.Fatalf("durable progress %s, want %s", app.durable["na"], lsnOf(6))
	}
}

// TestLazyAckNotPastCommitted: the origin's progress moves when a commit
// record is written, a moment before the transaction is visible; an ACK
// never goes past the last transaction whose apply returned, whatever
// Progress reports.
func TestLazyAckNotPastCommitted(t *testing.T) {
	app := &lazyApplier{memApplier: newMemApplier(), durable: map[string]pglogrepl.LSN{}}
	addr := serve(t, NewServer(serverConfig("eu", "eu1"), app, zerolog.Nop()))
	_, fc := authDial(t, addr, hello{Region: "na", Node: "na1"}, testToken)
	if f, err := fc.read(5 * time.Second); err != nil {
		t.Fatalf("first reply: %v", err)
	} else if _, ok := f.(*welcome); !ok {
		t.Fatalf("first reply %T, want welcome", f)
	}
	app.mu.Lock()
	app.ahead = lsnOf(9)
	app.mu.Unlock()
	if err := fc.write(time.Second, &txnFrame{Txn: mkTxn(1, 0)}); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := fc.read(5 * time.Second)
		if err != nil {
			t.Fatalf("read = %v, want ack", err)
		}
		if a, ok := f.(*ack); ok {
			if a.LSN != lsnOf(1) {
				t.Fatalf("ack %s with transaction 1 (%s) the last one applied; Progress said %s", a.LSN, lsnOf(1), lsnOf(9))
			}
			return
		}
	}
}

// gatheringServer serves a lazyApplier with the longest AckGather.
func gatheringServer(t *testing.T) (*lazyApplier, string) {
	app := &lazyApplier{memApplier: newMemApplier(), durable: map[string]pglogrepl.LSN{}}
	cfg := serverConfig("eu", "eu1")
	cfg.AckGather = MaxAckGather
	return app, serve(t, NewServer(cfg, app, zerolog.Nop()))
}

// flushes returns how many Progress calls app had since the first skip
// ones and the shortest time between two of them.
func (l *lazyApplier) flushes(skip int) (int, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	calls := l.calls[min(skip, len(l.calls)):]
	shortest := time.Duration(1 << 62)
	for i := 1; i < len(calls); i++ {
		shortest = min(shortest, calls[i].Sub(calls[i-1]))
	}
	return len(calls), shortest
}

// TestGatheredAcks: for a source that lets it (helloGatherAcks: its
// commits do not wait for the ACKs), a server whose applier flushes lazily
// flushes (Progress) at most once per AckGather and acknowledges every
// transaction committed meanwhile with it; for any other source it
// flushes after every applied round trip, as before.
func TestGatheredAcks(t *testing.T) {
	const n = 12
	for _, tc := range []struct {
		name   string
		flags  uint8
		gather bool
	}{{"gathering allowed", helloGatherAcks, true}, {"prompt", 0, false}} {
		t.Run(tc.name, func(t *testing.T) {
			app, addr := gatheringServer(t)
			_, fc := authDial(t, addr, hello{Region: "na", Node: "na1", Flags: tc.flags}, testToken)
			if f, err := fc.read(5 * time.Second); err != nil {
				t.Fatalf("first reply: %v", err)
			} else if _, ok := f.(*welcome); !ok {
				t.Fatalf("first reply %T, want welcome", f)
			}
			acks := make(chan pglogrepl.LSN, 2*n)
			go func() { // ends with the connection
				for {
					f, err := fc.read(10 * time.Second)
					if err != nil {
						close(acks)
						return
					}
					if a, ok := f.(*ack); ok {
						acks <- a.LSN
					}
				}
			}()
			// One transaction every 10 ms, each committed on its own.
			for i := 1; i <= n; i++ {
				if err := fc.write(time.Second, &txnFrame{Txn: mkTxn(i, 0)}); err != nil {
					t.Fatal(err)
				}
				waitFor(t, fmt.Sprintf("transaction %d committed", i), 10*time.Second, func() bool { return len(app.appliedLSNs()) == i })
				time.Sleep(10 * time.Millisecond)
			}
			count := 0
			for lsn := range acks {
				count++
				if lsn == lsnOf(n) {
					break
				}
			}
			flushes, shortest := app.flushes(1) // after the Welcome's
			t.Logf("%d transactions: %d ACKs, %d flushes, shortest gap between flushes %s", n, count, flushes, shortest)
			if tc.gather {
				if shortest < MaxAckGather {
					t.Fatalf("flushes %s apart, want at least the gather of %s", shortest, MaxAckGather)
				}
				if count >= n {
					t.Fatalf("%d ACKs for %d transactions committed 10 ms apart, want them gathered", count, n)
				}
			} else if flushes < 2 || shortest >= MaxAckGather {
				t.Fatalf("%d flushes, shortest gap %s: want one per transaction, 10 ms apart", flushes, shortest)
			}
		})
	}
}

// TestShipperAsksToGather: a shipper with GatherAcks says so in its Hello,
// and the server then gathers: its transactions sent 10 ms apart are made
// durable by flushes at least AckGather apart, and all are acknowledged.
func TestShipperAsksToGather(t *testing.T) {
	app, addr := gatheringServer(t)
	sc := shipperConfig(NodeAddr{Name: "eu1", Addr: addr})
	sc.AckTimeout, sc.GatherAcks = MinGatherAckTimeout, true
	sh := NewShipper(sc, nil, zerolog.Nop())
	runShipper(t, sh)
	ctx := testCtx(t)
	const n = 12
	for i := 1; i <= n; i++ {
		if err := sh.Send(ctx, mkTxn(i, 0)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	waitFor(t, "every transaction acknowledged", 10*time.Second, func() bool { return sh.Acked() == lsnOf(n) })
	if flushes, shortest := app.flushes(1); shortest < MaxAckGather { // after the Welcome's
		t.Fatalf("%d flushes, %s apart at the least, want at least the gather of %s", flushes, shortest, MaxAckGather)
	}
}
