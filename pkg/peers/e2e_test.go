package peers

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/faultproxy"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// countingApplier wraps the real applier and counts, per EndLSN, how
// often a transaction reached it; afterApply runs after a successful
// Apply, before the server acks.
type countingApplier struct {
	*apply.Applier
	mu         sync.Mutex
	calls      map[pglogrepl.LSN]int
	invoked    int // Apply and ApplyBatch calls
	afterApply func(*decode.Txn)
	progress   []time.Time // when each Progress call started
}

// Progress records the call and reads the real applier's progress.
func (c *countingApplier) Progress(ctx context.Context, region string) (pglogrepl.LSN, error) {
	c.mu.Lock()
	c.progress = append(c.progress, time.Now())
	c.mu.Unlock()
	return c.Applier.Progress(ctx, region)
}

func (c *countingApplier) count(txns []*decode.Txn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.invoked++
	for _, t := range txns {
		c.calls[t.EndLSN]++
	}
}

func (c *countingApplier) invocations() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.invoked
}

func (c *countingApplier) Apply(ctx context.Context, txn *decode.Txn) error {
	c.count([]*decode.Txn{txn})
	err := c.Applier.Apply(ctx, txn)
	if err == nil && c.afterApply != nil {
		c.afterApply(txn)
	}
	return err
}

func (c *countingApplier) ApplyBatch(ctx context.Context, txns []*decode.Txn) (int, error) {
	c.count(txns)
	n, err := c.Applier.ApplyBatch(ctx, txns)
	if n > 0 && c.afterApply != nil {
		c.afterApply(txns[n-1])
	}
	return n, err
}

func (c *countingApplier) callsFor(lsn pglogrepl.LSN) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls[lsn]
}

func (c *countingApplier) total() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, v := range c.calls {
		n += v
	}
	return n
}

// region is one target region on a real cluster database: two nodes
// (servers with the real applier) behind fault proxies, and the
// direct-SQL fallback to the same database.
type region struct {
	name    string
	cluster *pgtest.Cluster
	db      string
	pool    *pgxpool.Pool
	apps    []*countingApplier
	proxies []*faultproxy.Proxy
	nodes   []NodeAddr
	opened  atomic.Int32 // fallback opens

	mu        sync.Mutex
	fallbacks []*countingApplier // every applier the fallback opened
}

func newPool(t *testing.T, ctx context.Context, c *pgtest.Cluster, db string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(ctx, c.DSN(db))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// newRegion prepares database db on c as region name with nodes
// <name>1 and <name>2, whose server configurations opts may change.
// Replication origins are cluster-wide: two regions must not share a
// cluster.
func newRegion(t *testing.T, ctx context.Context, c *pgtest.Cluster, name, db string, opts ...func(*ServerConfig)) *region {
	t.Helper()
	if err := c.Exec(ctx, db, "CREATE TABLE public.items (id int PRIMARY KEY, v text)"); err != nil {
		t.Fatal(err)
	}
	r := &region{name: name, cluster: c, db: db, pool: newPool(t, ctx, c, db)}
	for i := 1; i <= 2; i++ {
		logs := newLogBuf(t)
		app := &countingApplier{Applier: apply.NewApplier(newPool(t, ctx, c, db), logs.logger()), calls: map[pglogrepl.LSN]int{}}
		node := fmt.Sprintf("%s%d", name, i)
		cfg := serverConfig(name, node)
		for _, o := range opts {
			o(&cfg)
		}
		addr := serve(t, NewServer(cfg, app, logs.logger()))
		p, err := faultproxy.New(addr)
		if err != nil {
			t.Fatal(err)
		}
		p.Seed(int64(i))
		t.Cleanup(func() { p.Close() })
		r.apps = append(r.apps, app)
		r.proxies = append(r.proxies, p)
		r.nodes = append(r.nodes, NodeAddr{Name: node, Addr: p.Addr()})
	}
	return r
}

// fallback opens the real applier on the region's database.
func (r *region) fallback() Fallback {
	return func(ctx context.Context) (Applier, func(), error) {
		r.opened.Add(1)
		pool, err := pgxpool.New(ctx, r.cluster.DSN(r.db))
		if err != nil {
			return nil, nil, err
		}
		app := &countingApplier{Applier: apply.NewApplier(pool, zerolog.Nop()), calls: map[pglogrepl.LSN]int{}}
		r.mu.Lock()
		r.fallbacks = append(r.fallbacks, app)
		r.mu.Unlock()
		return app, func() { app.Close(); pool.Close() }, nil
	}
}

// fallbackCalls returns how many transactions reached the fallback's
// appliers and in how many calls.
func (r *region) fallbackCalls() (txns, calls int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.fallbacks {
		txns += a.total()
		calls += a.invocations()
	}
	return txns, calls
}

func (r *region) shipper(t *testing.T, mutate func(*ShipperConfig), logs *logBuf) *Shipper {
	cfg := shipperConfig(r.nodes...)
	cfg.TargetRegion = r.name
	if mutate != nil {
		mutate(&cfg)
	}
	if logs == nil {
		logs = newLogBuf(t)
	}
	sh := NewShipper(cfg, r.fallback(), logs.logger())
	runShipper(t, sh)
	return sh
}

// progress reads the durable progress of origin prism_na.
func (r *region) progress(ctx context.Context) (pglogrepl.LSN, error) {
	var s *string
	err := r.pool.QueryRow(ctx, "SELECT pg_replication_origin_progress('prism_na', true)::text FROM pg_replication_origin WHERE roname = 'prism_na'").Scan(&s)
	if errors.Is(err, pgx.ErrNoRows) || err == nil && s == nil {
		return 0, nil // no origin yet: nothing durable
	}
	if err != nil {
		return 0, err
	}
	return pglogrepl.ParseLSN(*s)
}

// checkRows fails unless items holds exactly rows 1..n with their values.
func (r *region) checkRows(t *testing.T, ctx context.Context, n int) {
	t.Helper()
	var count, good int
	var sum int64
	err := r.pool.QueryRow(ctx, "SELECT count(*), count(*) FILTER (WHERE v LIKE 'v' || id || '%'), coalesce(sum(id), 0) FROM items").Scan(&count, &good, &sum)
	if err != nil {
		t.Fatal(err)
	}
	if count != n || good != n || sum != int64(n*(n+1)/2) {
		t.Fatalf("%s items: %d rows (%d good, id sum %d), want rows 1..%d", r.name, count, good, sum, n)
	}
}

// sendRange sends transactions from..to (inclusive) and waits for the
// shipper to ack the last one.
func sendRange(t *testing.T, ctx context.Context, sh *Shipper, from, to int) {
	t.Helper()
	for i := from; i <= to; i++ {
		if err := sh.Send(ctx, mkTxn(i, 0)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, fmt.Sprintf("ack of txn %d", to), 30*time.Second, func() bool { return sh.Acked() == lsnOf(to) })
}

// sampler checks invariant 2 while faults run: MinAcked over the shippers
// never exceeds the slowest region's durable progress.
type sampler struct {
	cancel     context.CancelFunc
	done       chan struct{}
	samples    atomic.Int64
	violations atomic.Int64
	first      atomic.Value
}

func startSampler(ctx context.Context, regions []*region, shippers []*Shipper) *sampler {
	ctx, cancel := context.WithCancel(ctx)
	s := &sampler{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for ctx.Err() == nil {
			m := MinAcked(shippers...) // first: progress only grows afterwards
			low := pglogrepl.LSN(1<<64 - 1)
			var err error
			for _, r := range regions {
				var p pglogrepl.LSN
				if p, err = r.progress(ctx); err != nil {
					break
				}
				low = min(low, p)
			}
			if err != nil {
				continue // the sample is incomplete
			}
			s.samples.Add(1)
			if m > low {
				s.violations.Add(1)
				s.first.CompareAndSwap(nil, fmt.Sprintf("MinAcked %s > slowest progress %s", m, low))
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return s
}

// stop ends the sampler and fails the test on a violation.
func (s *sampler) stop(t *testing.T) {
	t.Helper()
	s.cancel()
	<-s.done
	if s.samples.Load() == 0 {
		t.Fatalf("checkpoint sampler took no samples")
	}
	if v := s.violations.Load(); v > 0 {
		t.Fatalf("%d of %d samples broke the checkpoint invariant; first: %v", v, s.samples.Load(), s.first.Load())
	}
}

// TestLostMessageRetry: eu1 swallows a message; the shipper retries the
// same node and gets the ACK there, without failing over.
func TestLostMessageRetry(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "eu"})
	eu := newRegion(t, ctx, c, "eu", "postgres")
	sh := eu.shipper(t, func(c *ShipperConfig) { c.Retries = 50 }, nil)
	smp := startSampler(ctx, []*region{eu}, []*Shipper{sh})

	sendRange(t, ctx, sh, 1, 5)
	eu.proxies[0].Blackhole(true)
	for i := 6; i <= 10; i++ {
		if err := sh.Send(ctx, mkTxn(i, 0)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "a retry", 30*time.Second, func() bool { return sh.Status().Retries >= 1 })
	if a := sh.Acked(); a != lsnOf(5) {
		t.Fatalf("Acked = %s while eu1 swallows everything, want %s", a, lsnOf(5))
	}
	eu.proxies[0].Blackhole(false)
	eu.proxies[0].Reset()
	waitFor(t, "ack after the retry", 30*time.Second, func() bool { return sh.Acked() == lsnOf(10) })
	smp.stop(t)

	st := sh.Status()
	if st.Path != "eu1" || st.Failovers != 0 || st.Fallbacks != 0 || st.Retries < 1 {
		t.Fatalf("Status = %+v, want path eu1 after retries, no failover", st)
	}
	if eu.apps[1].total() != 0 || eu.opened.Load() != 0 {
		t.Fatalf("eu2 or the fallback carried traffic")
	}
	eu.checkRows(t, ctx, 10)
}

// TestDuplicateDeliveryAppliesOnce: the connection breaks after eu1
// committed but before its ACK arrives; the shipper reconnects, learns the
// progress from Welcome and does not send the transaction again.
func TestDuplicateDeliveryAppliesOnce(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "eu"})
	eu := newRegion(t, ctx, c, "eu", "postgres")
	var once sync.Once
	eu.apps[0].afterApply = func(txn *decode.Txn) {
		if txn.EndLSN >= lsnOf(3) {
			once.Do(eu.proxies[0].Reset) // the ACK of txn 3 is lost
		}
	}
	sh := eu.shipper(t, func(c *ShipperConfig) { c.Retries = 50 }, nil)
	sendRange(t, ctx, sh, 1, 6)
	st := sh.Status()
	if st.Retries < 1 || st.Path != "eu1" {
		t.Fatalf("Status = %+v, want a retry on eu1", st)
	}
	// A resend may reach the applier again (the new stream can read the
	// origin's progress while the cut-off stream still applies); the
	// origin makes it a no-op. What must hold: each row once, progress
	// exact, no halt.
	for i := 1; i <= 6; i++ {
		if n := eu.apps[0].callsFor(lsnOf(i)); n < 1 {
			t.Errorf("txn %d never reached the applier", i)
		}
	}
	if st := sh.Status(); st.Halts != 0 {
		t.Fatalf("Status = %+v, want no halt (a second apply would violate the primary key)", st)
	}
	eu.checkRows(t, ctx, 6)
	if p, _ := eu.progress(ctx); p != lsnOf(6) {
		t.Fatalf("origin progress %s, want %s", p, lsnOf(6))
	}
}

// TestFailoverToSecondNode: eu1 is silent through every retry; the
// shipper fails over to eu2, which reports its progress and gets the rest.
func TestFailoverToSecondNode(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "eu", Settings: map[string]string{"logical_decoding_work_mem": "64kB"}})
	eu := newRegion(t, ctx, c, "eu", "postgres")
	// Replication origins are cluster-wide, so each region needs its own
	// cluster, as in production.
	as := newRegion(t, ctx, pgtest.Start(t, pgtest.Options{Name: "as"}), "as", "postgres")
	logs := newLogBuf(t)
	sh := eu.shipper(t, nil, logs)
	shAS := as.shipper(t, nil, nil)
	smp := startSampler(ctx, []*region{eu, as}, []*Shipper{sh, shAS})

	sendRange(t, ctx, sh, 1, 5)
	sendRange(t, ctx, shAS, 1, 5)
	eu.proxies[0].Blackhole(true)
	for i := 6; i <= 20; i++ {
		if err := sh.Send(ctx, mkTxn(i, 0)); err != nil {
			t.Fatal(err)
		}
		if err := shAS.Send(ctx, mkTxn(i, 0)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "ack from eu2", 30*time.Second, func() bool { return sh.Acked() == lsnOf(20) })
	waitFor(t, "ack from as", 30*time.Second, func() bool { return shAS.Acked() == lsnOf(20) })
	if m := MinAcked(sh, shAS); m != lsnOf(20) {
		t.Fatalf("MinAcked = %s, want %s", m, lsnOf(20))
	}
	smp.stop(t)

	st := sh.Status()
	if st.Path != "eu2" || st.Retries != 5 || st.Failovers != 1 || st.Fallbacks != 0 {
		t.Fatalf("Status = %+v, want path eu2 after 5 retries and 1 failover", st)
	}
	if eu.apps[1].total() == 0 {
		t.Fatalf("eu2 applied nothing; eu1 %d calls; log:\n%s", eu.apps[0].total(), logs.String())
	}
	eu.checkRows(t, ctx, 20)
	as.checkRows(t, ctx, 20)
	if got := countLines(logs.String(), `failing over"`); got != 1 {
		t.Fatalf("failover logged %d times, want 1:\n%s", got, logs.String())
	}
}

// TestFallbackAndRecovery: eu1 and eu2 are both down; the shipper writes
// to the EU database directly, then goes back to eu1 when it returns.
func TestFallbackAndRecovery(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "eu"})
	eu := newRegion(t, ctx, c, "eu", "postgres")
	sh := eu.shipper(t, nil, nil)
	smp := startSampler(ctx, []*region{eu}, []*Shipper{sh})

	sendRange(t, ctx, sh, 1, 5)
	for _, p := range eu.proxies {
		p.Refuse(true)
		p.Reset()
	}
	sendRange(t, ctx, sh, 6, 15)
	st := sh.Status()
	if st.Path != PathFallback || st.Fallbacks != 1 || st.Failovers != 1 || st.Retries != 10 {
		t.Fatalf("Status = %+v, want sql fallback after 5+5 retries and 1 failover", st)
	}
	eu.checkRows(t, ctx, 15)
	// The ten transactions queued while the nodes were retried go through
	// the fallback in batches, not one round trip each.
	txns, calls := eu.fallbackCalls()
	if txns < 10 || calls >= txns {
		t.Fatalf("fallback applied %d transactions in %d calls, want them batched", txns, calls)
	}
	t.Logf("fallback applied %d transactions in %d calls", txns, calls)
	before := eu.apps[0].total()

	eu.proxies[0].Refuse(false)
	waitFor(t, "return to eu1", 30*time.Second, func() bool { return sh.Status().Path == "eu1" })
	sendRange(t, ctx, sh, 16, 25)
	smp.stop(t)
	st = sh.Status()
	if st.Path != "eu1" || st.Recoveries != 1 || st.Fallbacks != 1 {
		t.Fatalf("Status = %+v, want path eu1 after 1 recovery", st)
	}
	if got := eu.apps[0].total() - before; got < 10 {
		t.Fatalf("eu1 received %d transactions after the recovery, want the 10 new ones", got)
	}
	eu.checkRows(t, ctx, 25)
}

// TestWindowFullBlocksSend: a blackholed region fills the window; Send
// blocks (the reader is paused), the window stays bounded, and nothing is
// lost once the region heals.
func TestWindowFullBlocksSend(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "eu"})
	eu := newRegion(t, ctx, c, "eu", "postgres")
	const pad, maxInFlight, total = 1000, 4096, 40
	sh := eu.shipper(t, func(c *ShipperConfig) {
		c.Nodes = c.Nodes[:1]
		c.Retries = 1000
		c.MaxInFlight = maxInFlight
	}, nil)
	eu.proxies[0].Blackhole(true)

	sendCtx, cancelSend := context.WithCancel(ctx)
	defer cancelSend()
	sent := make(chan error, 1)
	go func() { // owned by the test: it waits on sent below
		for i := 1; i <= total; i++ {
			if err := sh.Send(sendCtx, mkTxn(i, pad)); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	oneTxn := int64(mkTxn(1, pad).Size())
	// Wait until the window is full and a few retries went by.
	waitFor(t, "window full and retries", 30*time.Second, func() bool {
		st := sh.Status()
		return st.WindowBytes+oneTxn > maxInFlight && st.Retries >= 3
	})
	st := sh.Status()
	select {
	case err := <-sent:
		t.Fatalf("Send returned %v with the region blackholed and the window full", err)
	default:
	}
	if st.WindowBytes > maxInFlight || st.Sent >= lsnOf(total) || st.Acked != 0 {
		t.Fatalf("Status = %+v, want a bounded window (<= %d bytes), Send blocked, nothing acked", st, maxInFlight)
	}
	eu.proxies[0].Blackhole(false)
	eu.proxies[0].Reset()
	deadline := time.Now().Add(60 * time.Second)
	for sh.Acked() != lsnOf(total) {
		if st := sh.Status(); st.WindowBytes > maxInFlight {
			t.Fatalf("window grew to %d bytes", st.WindowBytes)
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for every transaction; Status = %+v", sh.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	eu.checkRows(t, ctx, total)
}

func countLines(s, sub string) int {
	n := 0
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, sub) {
			n++
		}
	}
	return n
}

// TestFencesFrozenHolder: a frozen session still holds the origin (a hung
// previous path); the next path fences it instead of waiting behind it,
// both through a node and through the direct-SQL fallback.
func TestFencesFrozenHolder(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "eu"})
	eu := newRegion(t, ctx, c, "eu", "postgres")
	if err := c.Exec(ctx, "postgres", "SELECT pg_replication_origin_create('prism_na')"); err != nil {
		t.Fatal(err)
	}
	freeze := func() {
		conn, err := c.Connect(ctx, "postgres")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close(context.Background()) })
		// The node that applied the last range keeps the origin while it
		// waits for more (holdIdle); take it once the node let go.
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			_, err := conn.Exec(ctx, "SELECT pg_replication_origin_session_setup('prism_na')")
			var pgErr *pgconn.PgError
			if err == nil {
				break
			}
			if !errors.As(err, &pgErr) || pgErr.Code != "55006" || time.Now().After(deadline) {
				t.Fatal(err)
			}
		}
	}
	freeze()
	sh := eu.shipper(t, func(c *ShipperConfig) { c.Retries = 50 }, nil)
	sendRange(t, ctx, sh, 1, 3)
	if st := sh.Status(); st.Path != "eu1" {
		t.Fatalf("Status = %+v, want eu1", st)
	}

	for _, p := range eu.proxies {
		p.Refuse(true)
		p.Reset()
	}
	freeze()
	sh2 := eu.shipper(t, func(c *ShipperConfig) { c.Retries = 1; c.SourceNode = "na2" }, nil)
	sendRange(t, ctx, sh2, 4, 6)
	if st := sh2.Status(); st.Path != PathFallback {
		t.Fatalf("Status = %+v, want the sql fallback", st)
	}
	eu.checkRows(t, ctx, 6)
}

// TestGatheredAcksOnPostgres: a node's applier (WithLazyFlush) on a real
// database, for a shipper that lets it gather acknowledgements: 30
// transactions sent 10 ms apart are all applied and acknowledged, with
// far fewer flushes (Progress calls, each flushing the WAL) than
// transactions, at least AckGather apart.
func TestGatheredAcksOnPostgres(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "eu"})
	if err := c.Exec(ctx, "postgres", "CREATE TABLE public.items (id int PRIMARY KEY, v text)"); err != nil {
		t.Fatal(err)
	}
	logs := newLogBuf(t)
	app := &countingApplier{Applier: apply.NewApplier(newPool(t, ctx, c, "postgres"), logs.logger(), apply.WithLazyFlush()), calls: map[pglogrepl.LSN]int{}}
	cfg := serverConfig("eu", "eu1")
	cfg.AckGather = MaxAckGather
	addr := serve(t, NewServer(cfg, app, logs.logger()))
	eu := &region{name: "eu", cluster: c, db: "postgres", pool: newPool(t, ctx, c, "postgres"), nodes: []NodeAddr{{Name: "eu1", Addr: addr}}}
	sh := eu.shipper(t, func(sc *ShipperConfig) { sc.AckTimeout, sc.GatherAcks = MinGatherAckTimeout, true }, logs)
	waitFor(t, "connected to eu1", 10*time.Second, func() bool { return sh.Status().Path == "eu1" })
	app.mu.Lock()
	skip := len(app.progress) // the Welcome's
	app.mu.Unlock()

	const n = 30
	for i := 1; i <= n; i++ {
		if err := sh.Send(ctx, mkTxn(i, 0)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	waitFor(t, fmt.Sprintf("ack of txn %d", n), 30*time.Second, func() bool { return sh.Acked() == lsnOf(n) })
	eu.checkRows(t, ctx, n)
	if p, err := eu.progress(ctx); err != nil || p != lsnOf(n) {
		t.Fatalf("durable progress %s (%v), want %s", p, err, lsnOf(n))
	}
	app.mu.Lock()
	calls := append([]time.Time(nil), app.progress[skip:]...)
	app.mu.Unlock()
	if len(calls) == 0 || len(calls) > n/3 {
		t.Fatalf("%d flushes for %d transactions sent 10 ms apart, want them gathered", len(calls), n)
	}
	for i := 1; i < len(calls); i++ {
		if d := calls[i].Sub(calls[i-1]); d < MaxAckGather {
			t.Fatalf("flushes %s apart, want at least the gather of %s", d, MaxAckGather)
		}
	}
	t.Logf("%d transactions, %d flushes", n, len(calls))
}
