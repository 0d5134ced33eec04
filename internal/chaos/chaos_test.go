package chaos

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/e2e"
	"github.com/prism-cdc/prism-cdc/internal/faultproxy"
	"github.com/prism-cdc/prism-cdc/internal/node"
	"github.com/prism-cdc/prism-cdc/internal/verify"
)

var topology = e2e.Topology{"na": {"na1"}, "eu": {"eu1", "eu2"}, "as": {"as1"}}

// delivery makes every retry path short, so a partition of some seconds
// exhausts a region's nodes and reaches the direct-SQL fallback. The ACK
// timeout stays at the default 2s: the server's heartbeat (1s) must stay
// well below it, or an apply that takes longer than the timeout is
// abandoned and restarted forever.
const delivery = "{ack_timeout: 2s, retries: 1, backoff: 50ms, max_backoff: 300ms, max_in_flight: 16MiB}"

// ciSeeds are the fixed seeds `go test` runs; PRISM_SEED replaces them.
var ciSeeds = []int64{20240611}

// ciCycles is the number of fault cycles per seed under `go test`;
// PRISM_CHAOS_CYCLES replaces it.
const ciCycles = 14

func TestChaos(t *testing.T) {
	needFaketime(t) // one region's clock runs ahead
	seeds := ciSeeds
	if v := os.Getenv("PRISM_SEED"); v != "" {
		s, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			t.Fatalf("PRISM_SEED=%q: %v", v, err)
		}
		seeds = []int64{s}
	}
	cycles := ciCycles
	if v := os.Getenv("PRISM_CHAOS_CYCLES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("PRISM_CHAOS_CYCLES=%q: want a positive number", v)
		}
		cycles = n
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { runChaos(t, seed, cycles) })
	}
}

// chaos is one run: the deployment, its workload and what was injected.
type chaos struct {
	t    *testing.T
	d    *e2e.Deployment
	nw   *network
	rng  *rand.Rand
	seed int64

	writers []*ledgerWriter
	miscOps atomic.Int64

	faults     map[string]int
	deck       []string        // fault kinds still to deal in this round
	killed     map[string]bool // nodes this run killed and has not restarted yet
	unexpected []string        // node exits nobody asked for
	bulkRows   map[string]int  // rows inserted into bulk per region (acknowledged)
	bulkBase   int64

	inv invariant
	bg  sync.WaitGroup // transactions run alongside a fault
}

func runChaos(t *testing.T, seed int64, cycles int) {
	t.Logf("chaos seed %d, %d fault cycles (replay with PRISM_SEED=%d PRISM_CHAOS_CYCLES=%d)", seed, cycles, seed, cycles)
	d := e2e.New(t, topology, schema)
	d.Delivery = delivery
	// One region's database runs seconds ahead for the whole run (also
	// across its crash faults): last_write_wins must converge anyway.
	skewClock(t, d.Clusters[skewRegion], skewOffset)
	c := &chaos{
		t: t, d: d, rng: rand.New(rand.NewSource(seed)), seed: seed,
		faults: map[string]int{}, killed: map[string]bool{}, bulkRows: map[string]int{}, bulkBase: 1_000_000,
	}
	c.nw = newNetwork(t, d, seed)
	clients.reset()
	d.StartAll()
	d.Eventually(90*time.Second, "one reader per region", c.readersUp)

	// Workload: two ledger writers and one misc client per region, each
	// with its own seeded generator.
	wctx, stopWork := context.WithCancel(context.Background())
	defer stopWork()
	var work sync.WaitGroup
	for i, r := range d.Regions {
		for w := 1; w <= 2; w++ {
			lw := &ledgerWriter{region: r, id: w}
			c.writers = append(c.writers, lw)
			rng := rand.New(rand.NewSource(seed + int64(10*i+w)))
			work.Add(1)
			go func() { defer work.Done(); lw.run(wctx, d, rng, 15*time.Millisecond) }()
		}
		rng := rand.New(rand.NewSource(seed + int64(10*i+9)))
		work.Add(1)
		go func(r string) { defer work.Done(); misc(wctx, d, r, rng, &c.miscOps) }(r)
		crng := rand.New(rand.NewSource(seed + int64(10*i+8)))
		work.Add(1)
		go func(r string) { defer work.Done(); contested(wctx, d, r, crng, &c.miscOps) }(r)
	}

	// The invariant sampler runs from the first write to the final check.
	sctx, stopSampler := context.WithCancel(context.Background())
	defer stopSampler()
	var samplerDone sync.WaitGroup
	samplerDone.Add(1)
	go func() { defer samplerDone.Done(); c.inv.sample(sctx, d, c.writers) }()

	start := time.Now()
	bigAt := cycles / 3
	for i := 0; i < cycles; i++ {
		if i == bigAt {
			c.bigTransaction()
		} else {
			c.fault()
		}
		pause(context.Background(), ms(300, 1200, c.rng.Intn))
		c.keepNodesUp()
	}
	faultTime := time.Since(start)

	// Stop faults, let the workload run a moment on a healthy network,
	// stop it and drain.
	c.nw.heal(true)
	for _, r := range d.Regions {
		if !d.Clusters[r].Running() {
			if err := d.Clusters[r].Start(); err != nil {
				t.Fatalf("restart postgres %s: %v", r, err)
			}
		}
	}
	c.keepNodesUp()
	pause(context.Background(), time.Second)
	stopWork()
	work.Wait()
	c.bg.Wait()
	drainStart := time.Now()
	expected := c.converge()
	drainTime := time.Since(drainStart)
	stopSampler()
	samplerDone.Wait()
	c.checkLedger(expected)
	c.gracefulStop()
	c.summary(faultTime, drainTime, expected)
}

func (c *chaos) readersUp() bool {
	for _, r := range c.d.Regions {
		if c.reader(r) == "" {
			return false
		}
	}
	return true
}

// reader returns the node of region that holds its slot, or "".
func (c *chaos) reader(region string) string {
	for _, n := range c.d.Nodes(region) {
		if c.d.Role(n) == node.RoleReader {
			return n
		}
	}
	return ""
}

func (c *chaos) allNodes() []string {
	var out []string
	for _, r := range c.d.Regions {
		out = append(out, c.d.Nodes(r)...)
	}
	return out
}

// keepNodesUp restarts every node that is not running. A node this run
// did not kill counts as an unexpected exit.
func (c *chaos) keepNodesUp() {
	for _, n := range c.allNodes() {
		if c.d.Running(n) {
			continue
		}
		if !c.killed[n] {
			p := c.d.Proc(n)
			msg := fmt.Sprintf("%s exited on its own (%v)", n, p.Err)
			c.unexpected = append(c.unexpected, msg)
			logf(c.t, "UNEXPECTED: %s\n%s", msg, c.d.Logs())
		}
		c.d.Start(n)
		delete(c.killed, n)
	}
}

func (c *chaos) kill(n string) {
	c.killed[n] = true
	c.d.Kill(n)
}

// fault injects one fault chosen by the seed and undoes it.
func (c *chaos) fault() {
	d, rng := c.d, c.rng
	region := d.Regions[rng.Intn(len(d.Regions))]
	// Kinds come from a shuffled deck, so every run of at least a deck's
	// length injects each kind.
	if len(c.deck) == 0 {
		kinds := []string{"kill-node", "kill-reader-midtxn", "kill-applier", "pg-crash-source", "pg-crash-target",
			"latency", "bandwidth", "reset", "blackhole", "partition-peers", "partition-full"}
		for _, i := range rng.Perm(len(kinds)) {
			c.deck = append(c.deck, kinds[i])
		}
	}
	kind := c.deck[0]
	c.deck = c.deck[1:]
	c.faults[kind]++
	switch kind {
	case "kill-node":
		nodes := c.allNodes()
		victim := nodes[rng.Intn(len(nodes))]
		logf(c.t, "fault %s: kill -9 %s", kind, victim)
		c.kill(victim)
		pause(context.Background(), ms(200, 1500, rng.Intn))
		c.keepNodesUp()
	case "kill-reader-midtxn":
		// A 20k-row transaction takes the reader a while to decode and
		// ship: kill it while that is under way.
		r := c.reader(region)
		base := c.nextBulk(20_000)
		err := bulkInsert(context.Background(), d, region, base, 20_000)
		c.noteBulk(region, 20_000, err)
		pause(context.Background(), ms(0, 400, rng.Intn))
		if r == "" {
			r = d.Nodes(region)[0]
		}
		logf(c.t, "fault %s: kill -9 %s after a 20k-row transaction (commit err %v)", kind, r, err)
		c.kill(r)
		pause(context.Background(), ms(200, 800, rng.Intn))
		c.keepNodesUp()
	case "kill-applier":
		// Every node applies the other regions' steady stream: a kill at
		// a random moment lands between a commit and its ACK often enough.
		nodes := c.d.Nodes(region)
		victim := nodes[rng.Intn(len(nodes))]
		pause(context.Background(), ms(0, 300, rng.Intn))
		logf(c.t, "fault %s: kill -9 %s", kind, victim)
		c.kill(victim)
		pause(context.Background(), ms(100, 1000, rng.Intn))
		c.keepNodesUp()
	case "pg-crash-source", "pg-crash-target":
		// Every region is both; the label records which role the test
		// meant to stress (source: during a burst of local writes).
		if kind == "pg-crash-source" {
			// Its outcome is ambiguous; verify compares what committed.
			base := c.nextBulk(5_000)
			c.bg.Add(1)
			go func() { defer c.bg.Done(); bulkInsert(context.Background(), d, region, base, 5_000) }()
			pause(context.Background(), ms(0, 300, rng.Intn))
		}
		logf(c.t, "fault %s: pg_ctl stop -m immediate %s", kind, region)
		if err := d.Clusters[region].Stop("immediate"); err != nil {
			c.t.Fatalf("stop postgres %s: %v", region, err)
		}
		pause(context.Background(), ms(300, 3000, rng.Intn))
		if err := d.Clusters[region].Start(); err != nil {
			c.t.Fatalf("start postgres %s: %v", region, err)
		}
	case "latency":
		ps := c.nw.touching(d, region, true)
		delay, jitter := ms(20, 200, rng.Intn), ms(1, 150, rng.Intn)
		logf(c.t, "fault %s: %s +%s jitter %s", kind, region, delay, jitter)
		each(ps, func(p *faultproxy.Proxy) { p.Delay(delay, jitter) })
		pause(context.Background(), ms(1000, 4000, rng.Intn))
		c.nw.heal(false)
	case "bandwidth":
		ps := c.nw.touching(d, region, true)
		bps := int64(32<<10 + rng.Intn(256<<10))
		logf(c.t, "fault %s: %s limited to %d B/s", kind, region, bps)
		each(ps, func(p *faultproxy.Proxy) { p.Bandwidth(bps) })
		pause(context.Background(), ms(1000, 4000, rng.Intn))
		c.nw.heal(false)
	case "reset":
		ps := c.nw.touching(d, region, true)
		n := 1 + rng.Intn(4)
		logf(c.t, "fault %s: %s, %d times", kind, region, n)
		for i := 0; i < n; i++ {
			each(ps, (*faultproxy.Proxy).Reset)
			pause(context.Background(), ms(50, 500, rng.Intn))
		}
	case "blackhole":
		ps := c.nw.touching(d, region, false)
		dur := ms(300, 2500, rng.Intn)
		logf(c.t, "fault %s: peer traffic of %s for %s", kind, region, dur)
		each(ps, func(p *faultproxy.Proxy) { p.Blackhole(true) })
		pause(context.Background(), dur)
		c.nw.heal(true)
	case "partition-peers", "partition-full":
		// Longer than every retry of every node of the region: the
		// shippers fall back to direct SQL (peers) or hold the slot back
		// (full, SQL cut too).
		full := kind == "partition-full"
		ps := c.nw.touching(d, region, full)
		dur := ms(12000, 15000, rng.Intn)
		logf(c.t, "fault %s: %s for %s", kind, region, dur)
		each(ps, func(p *faultproxy.Proxy) { p.Blackhole(true); p.Refuse(true); p.Reset() })
		pause(context.Background(), dur)
		c.nw.heal(true)
		logf(c.t, "healed %s", region)
	}
}

// bigTransaction commits one 200k-row transaction and kills the reader of
// its region while the transaction is being shipped.
func (c *chaos) bigTransaction() {
	region := c.d.Regions[c.rng.Intn(len(c.d.Regions))]
	c.faults["big-200k-txn"]++
	base := c.nextBulk(200_000)
	start := time.Now()
	err := bulkInsert(context.Background(), c.d, region, base, 200_000)
	c.noteBulk(region, 200_000, err)
	logf(c.t, "200k-row transaction on %s committed in %s (err %v)", region, time.Since(start).Round(time.Millisecond), err)
	pause(context.Background(), ms(0, 2000, c.rng.Intn))
	if r := c.reader(region); r != "" {
		c.faults["kill-reader-midtxn"]++
		logf(c.t, "fault kill-reader-midtxn: kill -9 %s while the 200k-row transaction ships", r)
		c.kill(r)
		pause(context.Background(), ms(200, 800, c.rng.Intn))
		c.keepNodesUp()
	}
}

func (c *chaos) nextBulk(rows int) int64 {
	base := c.bulkBase
	c.bulkBase += int64(rows) + 1
	return base
}

func (c *chaos) noteBulk(region string, rows int, err error) {
	if err == nil {
		c.bulkRows[region] += rows
	}
}

// converge waits until every region holds every resolved ledger write and
// every published table is identical everywhere. It returns the ledger
// ids every region must hold.
func (c *chaos) converge() map[string]bool {
	t, d := c.t, c.d
	ctx := context.Background()
	expected := map[string]bool{}
	for _, w := range c.writers {
		acked, amb, _ := w.snapshot()
		for _, a := range acked {
			expected[ledgerID(w.region, w.id, a.seq)] = true
		}
		// An ambiguous write is resolved on its own region: committed
		// there means it must be everywhere.
		if len(amb) == 0 {
			continue
		}
		conn, err := d.Clusters[w.region].Connect(ctx, "app")
		if err != nil {
			t.Fatalf("resolve ambiguous writes: %v", err)
		}
		for _, s := range amb {
			var n int
			id := ledgerID(w.region, w.id, s)
			if err := conn.QueryRow(ctx, "SELECT count(*) FROM ledger WHERE id = $1", id).Scan(&n); err != nil {
				t.Fatalf("resolve ambiguous write %s: %v", id, err)
			}
			if n == 1 {
				expected[id] = true
			}
		}
		conn.Close(ctx)
	}
	var regions []verify.Region
	for _, r := range d.Regions {
		regions = append(regions, verify.Region{Name: r, DSN: d.Clusters[r].DSN("app")})
	}
	var last verify.Report
	var counts []string
	total, progressAt := 0, time.Now()
	settled := func() bool {
		counts = counts[:0]
		ok := true
		sum := 0
		for _, r := range d.Regions {
			n, err := count(ctx, d, r, "SELECT count(*) FROM ledger")
			counts = append(counts, fmt.Sprintf("%s=%d", r, n))
			ok = ok && err == nil && n == len(expected)
			sum += n
		}
		if sum > total {
			total, progressAt = sum, time.Now()
		}
		if !ok {
			return false
		}
		rep, err := verify.Compare(ctx, regions, "prism", time.Second)
		if err != nil {
			return false
		}
		last = rep
		return rep.Equal()
	}
	// Not d.Eventually: on a timeout the ledger and invariant checks
	// still run and say what went wrong. A long run may leave a backlog
	// that takes a while to drain; what must not happen is a drain that
	// stops making progress.
	const stuck = 2 * time.Minute
	for !settled() {
		if time.Since(progressAt) > stuck {
			t.Errorf("regions stopped converging (no ledger progress for %s): ledger rows %v, want %d each; verify: %+v\n%s\n%s", stuck, counts, len(expected), last, c.explain(last), d.Logs())
			return expected
		}
		pause(ctx, 200*time.Millisecond)
	}
	if len(last.Tables) < 9 {
		t.Fatalf("verify compared %d tables, want all 9 of the schema", len(last.Tables))
	}
	return expected
}

func count(ctx context.Context, d *e2e.Deployment, region, sql string, args ...any) (int, error) {
	conn, err := d.Clusters[region].Connect(ctx, "app")
	if err != nil {
		return 0, err
	}
	defer conn.Close(ctx)
	var n int
	err = conn.QueryRow(ctx, sql, args...).Scan(&n)
	return n, err
}

// checkLedger checks exactly once per region: every expected id present,
// nothing else, no write that failed before COMMIT anywhere, and no
// sampled slot position ahead of a region.
func (c *chaos) checkLedger(expected map[string]bool) {
	t, d := c.t, c.d
	ctx := context.Background()
	ids := make([]string, 0, len(expected))
	for id := range expected {
		ids = append(ids, id)
	}
	var failed []string
	for _, w := range c.writers {
		_, _, f := w.snapshot()
		for _, s := range f {
			failed = append(failed, ledgerID(w.region, w.id, s))
		}
	}
	for _, r := range d.Regions {
		present, err := count(ctx, d, r, "SELECT count(*) FROM ledger WHERE id = ANY($1)", ids)
		if err != nil {
			t.Fatalf("check ledger on %s: %v", r, err)
		}
		total, err := count(ctx, d, r, "SELECT count(*) FROM ledger")
		if err != nil {
			t.Fatalf("check ledger on %s: %v", r, err)
		}
		if present != len(ids) || total != len(ids) {
			t.Errorf("region %s holds %d of %d expected ledger rows and %d in all", r, present, len(ids), total)
		}
		ghosts, err := count(ctx, d, r, "SELECT count(*) FROM ledger WHERE id = ANY($1)", failed)
		if err != nil {
			t.Fatalf("check ledger on %s: %v", r, err)
		}
		if ghosts != 0 {
			t.Errorf("region %s holds %d ledger rows whose transactions failed before COMMIT", r, ghosts)
		}
	}
	for r, rows := range c.bulkRows {
		n, err := count(ctx, d, r, "SELECT count(*) FROM bulk WHERE region = $1", r)
		if err != nil {
			t.Fatalf("check bulk on %s: %v", r, err)
		}
		if n < rows {
			t.Errorf("region %s holds %d bulk rows of its own, want at least the %d acknowledged", r, n, rows)
		}
	}
	if v := c.inv.violationList(); len(v) > 0 {
		t.Errorf("slot confirmed past writes a region did not hold (%d samples), first ones:\n%s", len(v), strings.Join(v[:min(len(v), 10)], "\n"))
	}
	if c.inv.checked.Load() == 0 {
		t.Errorf("the slot invariant was never checked: no sample covered an acknowledged write")
	}
	if len(c.unexpected) > 0 {
		t.Errorf("nodes exited on their own: %s", strings.Join(c.unexpected, "; "))
	}
	if c.faults["partition-peers"] > 0 && c.logCount("applying through direct SQL") == 0 {
		t.Errorf("a peer partition ran but no shipper used the direct-SQL fallback")
	}
	if n := c.logCount("panic"); n > 0 {
		t.Errorf("%d node log lines mention a panic", n)
	}
}

// gracefulStop stops every node with SIGTERM and expects status 0.
func (c *chaos) gracefulStop() {
	for _, n := range c.allNodes() {
		c.d.Proc(n).Cmd.Process.Signal(syscall.SIGTERM)
	}
	for _, n := range c.allNodes() {
		p := c.d.Proc(n)
		select {
		case <-p.Done:
		case <-time.After(node.DrainTimeout + 30*time.Second):
			c.t.Errorf("%s still running after SIGTERM", n)
			continue
		}
		if p.Err != nil {
			c.t.Errorf("%s exit after SIGTERM: %v, want status 0", n, p.Err)
		}
	}
}

// logCount counts node log lines containing s, over every restart.
func (c *chaos) logCount(s string) int {
	n := 0
	for _, name := range c.allNodes() {
		b, _ := os.ReadFile(c.d.LogPath(name))
		n += strings.Count(string(b), s)
	}
	return n
}

func (c *chaos) summary(faultTime, drainTime time.Duration, expected map[string]bool) {
	var kinds []string
	total := 0
	for k, n := range c.faults {
		kinds = append(kinds, fmt.Sprintf("%s=%d", k, n))
		total += n
	}
	sort.Strings(kinds)
	var acked, amb, failed int
	for _, w := range c.writers {
		a, b, f := w.snapshot()
		acked, amb, failed = acked+len(a), amb+len(b), failed+len(f)
	}
	bulk := 0
	for _, n := range c.bulkRows {
		bulk += n
	}
	verdict := "PASS"
	if c.t.Failed() {
		verdict = "FAIL"
	}
	c.t.Logf(`chaos summary
  seed                 %d (replay: PRISM_SEED=%d)
  faults               %d in %s: %s
  ledger writes        %d acknowledged, %d ambiguous (%d of them committed), %d failed before commit
  other transactions   %d misc, %d bulk rows
  fallbacks used       %d, failovers %d
  invariant samples    %d (%d covering acknowledged writes), %d violations
  clock skew           %s's database %s, %d clock floors raised there and elsewhere
  max replication lag  %s
  drain after healing  %s
  verdict              %s
  client writes and errors by region:
%s`,
		c.seed, c.seed, total, faultTime.Round(time.Second), strings.Join(kinds, " "),
		acked, amb, len(expected)-acked, failed,
		c.miscOps.Load(), bulk,
		c.logCount("applying through direct SQL"), c.logCount("failing over"),
		c.inv.samples.Load(), c.inv.checked.Load(), len(c.inv.violationList()),
		skewRegion, skewOffset, c.floors(),
		time.Duration(c.inv.maxLag.Load()).Round(time.Millisecond),
		drainTime.Round(time.Millisecond), verdict, clients.String())
}

// explain shows, for up to three differing rows, each region's version
// (row, writing transaction, stamp, region) and the conflicts recorded
// for the key: what a divergence needs to be understood.
func (c *chaos) explain(rep verify.Report) string {
	var b strings.Builder
	shown := 0
	for _, tr := range rep.Tables {
		for _, k := range tr.Keys {
			if shown == 3 || len(tr.KeyColumns) != len(k.Values) {
				continue
			}
			shown++
			var conds, keyConds []string
			for i, col := range tr.KeyColumns {
				conds = append(conds, fmt.Sprintf("x.%s::text = %s", pgx.Identifier{col}.Sanitize(), quoteLiteral(k.Values[i])))
				keyConds = append(keyConds, fmt.Sprintf("key->>%s = %s", quoteLiteral(col), quoteLiteral(k.Values[i])))
			}
			fmt.Fprintf(&b, "%s %v:\n", tr.Table, k.Values)
			for _, r := range c.d.Regions {
				rows := c.rowsText(r, fmt.Sprintf(`SELECT format('  %s: %%s xmin %%s stamp %%s region %%s', row_to_json(x), x.xmin, prism.stamp(x.xmin),
					prism.region_of((pg_xact_commit_timestamp_origin(x.xmin)).roident)) FROM %s x WHERE %s`, r, tr.Table, strings.Join(conds, " AND ")))
				if rows == "" {
					rows = "  " + r + ": no row\n"
				}
				b.WriteString(rows)
				b.WriteString(c.rowsText(r, fmt.Sprintf(`SELECT format('    %s conflict %%s %%s %%s winner %%s local %%s/%%s remote %%s/%%s', id, kind, resolution, winner,
					local_commit_time, local_origin, remote_commit_time, remote_origin) FROM prism.conflicts WHERE table_name = %s AND %s ORDER BY id`,
					r, quoteLiteral(tr.Table), strings.Join(keyConds, " AND "))))
			}
		}
	}
	return b.String()
}

// rowsText runs sql (one text column) on region and returns the lines.
func (c *chaos) rowsText(region, sql string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := c.d.Clusters[region].Connect(ctx, "app")
	if err != nil {
		return fmt.Sprintf("  %s: %v\n", region, err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, sql)
	if err != nil {
		return fmt.Sprintf("  %s: %v\n", region, err)
	}
	var b strings.Builder
	for rows.Next() {
		var line string
		if rows.Scan(&line) == nil {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// floors counts the clock floors raised in all regions: local writes
// that replaced a version stamped ahead of their own clock.
func (c *chaos) floors() int {
	total := 0
	for _, r := range c.d.Regions {
		if n, err := count(context.Background(), c.d, r, "SELECT count(*) FROM prism.clock_floors"); err == nil {
			total += n
		}
	}
	return total
}

// invariant samples DESIGN invariant 2 every 100ms: for each source
// region it reads the slot's confirmed_flush_lsn, takes the acknowledged
// ledger writes whose commit is certainly at or below it (their
// post-commit insert position is), and checks that every other region
// already holds all of them. A slot confirmed past a transaction some
// region has not made durable fails the check, while idle advances past
// the last transaction (nothing to miss) do not.
type invariant struct {
	samples, checked atomic.Int64
	maxLag           atomic.Int64

	mu         sync.Mutex
	violations []string
}

func (inv *invariant) violationList() []string {
	inv.mu.Lock()
	defer inv.mu.Unlock()
	return append([]string(nil), inv.violations...)
}

func (inv *invariant) sample(ctx context.Context, d *e2e.Deployment, writers []*ledgerWriter) {
	conns := map[string]*pgx.Conn{}
	defer func() {
		for _, c := range conns {
			c.Close(context.Background())
		}
	}()
	conn := func(r string) *pgx.Conn {
		if c := conns[r]; c != nil && !c.IsClosed() {
			return c
		}
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		c, err := d.Clusters[r].Connect(cctx, "app")
		if err != nil {
			return nil
		}
		conns[r] = c
		return c
	}
	drop := func(r string) {
		if c := conns[r]; c != nil {
			c.Close(context.Background())
		}
		delete(conns, r)
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for _, src := range d.Regions {
			sc := conn(src)
			if sc == nil {
				continue
			}
			var confirmed *pglogrepl.LSN
			qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			err := sc.QueryRow(qctx, "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1", "prism_"+src).Scan(&confirmed)
			cancel()
			if err != nil {
				if err != pgx.ErrNoRows {
					drop(src)
				}
				continue
			}
			if confirmed == nil {
				continue
			}
			inv.samples.Add(1)
			var ws, ks []int
			excluded := []string{} // never nil: id <> ALL(NULL) is NULL, not true
			need := map[int]int{}
			for _, w := range writers {
				if w.region != src {
					continue
				}
				k, n, _ := w.upTo(*confirmed)
				_, amb, failed := w.snapshot()
				for _, s := range append(amb, failed...) {
					excluded = append(excluded, ledgerID(w.region, w.id, s))
				}
				ws, ks = append(ws, w.id), append(ks, k)
				need[w.id] = n
			}
			for _, dst := range d.Regions {
				if dst == src {
					continue
				}
				dc := conn(dst)
				if dc == nil {
					continue
				}
				qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				rows, err := dc.Query(qctx, `SELECT w.writer,
						(SELECT count(*) FROM ledger l WHERE l.region = $1 AND l.writer = w.writer AND l.seq <= w.k AND l.id <> ALL($4::text[])),
						(SELECT coalesce(max(seq), 0) FROM ledger l WHERE l.region = $1 AND l.writer = w.writer)
					FROM unnest($2::int[], $3::int[]) AS w(writer, k)`, src, ws, ks, excluded)
				if err != nil {
					cancel()
					drop(dst)
					continue
				}
				now := time.Now()
				for rows.Next() {
					var writer, present, top int
					if err := rows.Scan(&writer, &present, &top); err != nil {
						break
					}
					if n := need[writer]; n > 0 {
						inv.checked.Add(1)
						if present < n {
							inv.mu.Lock()
							inv.violations = append(inv.violations, fmt.Sprintf("%s slot at %s: region %s holds %d of the %d acknowledged writes of writer %d committed at or below it",
								src, *confirmed, dst, present, n, writer))
							inv.mu.Unlock()
						}
					}
					for _, w := range writers {
						if w.region == src && w.id == writer {
							if at, ok := w.firstAfter(top); ok {
								if lag := now.Sub(at); int64(lag) > inv.maxLag.Load() {
									inv.maxLag.Store(int64(lag))
								}
							}
						}
					}
				}
				rows.Close()
				cancel()
				if rows.Err() != nil {
					drop(dst)
				}
			}
		}
	}
}
