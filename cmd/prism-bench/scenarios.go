package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// drainTimeout bounds one contender's catch-up.
const drainTimeout = 30 * time.Minute

// checkpointAll writes every cluster's dirty pages before a measurement,
// so no contender pays for the previous one's checkpoint.
func (e *env) checkpointAll(ctx context.Context) error {
	return parallel(e.all(), func(c *pgtest.Cluster) error { return c.Exec(ctx, db, "CHECKPOINT") })
}

// backlog runs the backlog scenario and returns every drain by run.
func (e *env) backlog(ctx context.Context) ([][]drain, error) {
	var order []string
	if e.cfg.contenders["recv"] {
		order = append(order, recvText, recvBinary)
	}
	if e.cfg.contenders["native"] {
		order = append(order, native)
	}
	if e.cfg.contenders["prism"] {
		order = append(order, prism)
	}
	if e.cfg.contenders["pglogical"] {
		order = append(order, pglogical)
	}
	var runs [][]drain
	for run := 1; run <= e.cfg.runs; run++ {
		e.logf("backlog run %d/%d: %d pgbench transactions with every contender stopped", run, e.cfg.runs, e.cfg.txns)
		perClient := max(1, e.cfg.txns/e.cfg.clients)
		if err := e.pgbench(ctx, e.src, "-n", "-c", fmt.Sprint(e.cfg.clients), "-j", fmt.Sprint(min(e.cfg.clients, 2)),
			"-t", fmt.Sprint(perClient)); err != nil {
			return runs, err
		}
		end, err := e.mark(ctx, run)
		if err != nil {
			return runs, err
		}
		var ds []drain
		for _, c := range order {
			if err := e.checkpointAll(ctx); err != nil {
				return runs, err
			}
			e.logf("run %d: draining %s up to %s", run, c, end)
			var d drain
			switch c {
			case recvText:
				d, err = e.drainRecv(ctx, "bench_text", false, end)
			case recvBinary:
				d, err = e.drainRecv(ctx, "bench_binary", true, end)
			case native:
				d, err = e.drainNative(ctx, end, run, drainTimeout)
				if err == nil {
					err = e.verify(ctx, e.native[:]...)
				}
			case prism:
				d, err = e.drainPrism(ctx, fmt.Sprintf("backlog run %d", run), end, run, drainTimeout, 0)
				if err == nil {
					err = e.verify(ctx, e.prismc[:]...)
				}
			case pglogical:
				d, err = e.drainPglogical(ctx, end, run, drainTimeout)
				if err == nil {
					err = e.verify(ctx, e.pgl[:]...)
				}
			}
			if err != nil {
				return runs, fmt.Errorf("run %d, %s: %w", run, c, err)
			}
			e.logf("run %d: %s confirmed in %.2fs (applied in %.2fs), client CPU %.1fs, server CPU %.1fs, peak RSS %v kB; server CPU by cluster %v",
				run, c, d.confirmed.Seconds(), d.applied.Seconds(), d.clientCPU, d.serverCPU, d.peakKB, d.perServer)
			ds = append(ds, d)
		}
		runs = append(runs, ds)
		// Alternate the order between runs.
		for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
			order[i], order[j] = order[j], order[i]
		}
	}
	return runs, nil
}

// lagResult is one contender's steady-state lag.
type lagResult struct {
	contender      string
	rows           int
	p50, p99, pmax time.Duration
	peakKB         map[string]int64
}

// lagScript is a pgbench TPC-B-like transaction that also inserts one
// bench_lag row stamped with the source clock.
func lagScript(scale int) string {
	return fmt.Sprintf(`\set aid random(1, %d)
\set bid random(1, %d)
\set tid random(1, %d)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO bench_lag VALUES (nextval('bench_lag_id'), clock_timestamp());
END;
`, 100000*scale, scale, 10*scale)
}

// lagContender is one contender of the lag scenario.
type lagContender struct {
	name    string
	regions []*pgtest.Cluster
	slots   []string // its slots in the source
	// enable turns its subscriptions to the source on or off; nil for
	// prism-cdc, whose nodes run only while they are measured or catch up.
	enable func(context.Context, bool) error
}

// lagContenders returns the lag scenario's contenders in the order they
// run: native subscriptions, prism-cdc, and pglogical when it is a
// contender.
func (e *env) lagContenders() []lagContender {
	cs := []lagContender{
		{name: native, regions: e.native[:], slots: nativeSlots, enable: e.setSubscriptions},
		{name: prism, regions: e.prismc[:], slots: []string{"prism_na"}},
	}
	if e.cfg.contenders["pglogical"] {
		cs = append(cs, lagContender{name: pglogical, regions: e.pgl[:], slots: e.pglSrcSlots, enable: e.pglSourceSubs})
	}
	return cs
}

// lag runs the steady-state scenario: each contender in turn replicates
// the same fixed-rate workload while it is measured; then all of them
// catch up to one point.
func (e *env) lag(ctx context.Context) ([]lagResult, error) {
	script := filepath.Join(e.dir, "lag.sql")
	if err := os.WriteFile(script, []byte(lagScript(e.cfg.scale)), 0o644); err != nil {
		return nil, fmt.Errorf("write lag script: %w", err)
	}
	cs := e.lagContenders()
	order := slices.Clone(cs)
	var out []lagResult
	marker := 1000
	for run := 1; run <= e.cfg.lagRuns; run++ {
		for _, c := range order {
			res, err := e.lagRun(ctx, c, script, marker)
			if err != nil {
				return out, fmt.Errorf("lag %s: %w", c.name, err)
			}
			marker++
			e.logf("lag %s (run %d/%d): %d rows, p50 %s, p99 %s, max %s", c.name, run, e.cfg.lagRuns, res.rows, res.p50, res.p99, res.pmax)
			out = append(out, res)
		}
		// The next run in the other order, so that a noisy stretch of
		// the host is shared out.
		slices.Reverse(order)
	}
	return out, e.lagCatchUp(ctx, cs, marker)
}

// medianLag folds the phases of each contender into one result, in the
// order they first ran: the median of the rows and of each percentile,
// and each node's highest peak RSS.
func medianLag(rs []lagResult) []lagResult {
	var order []string
	by := map[string][]lagResult{}
	for _, r := range rs {
		if _, ok := by[r.contender]; !ok {
			order = append(order, r.contender)
		}
		by[r.contender] = append(by[r.contender], r)
	}
	var out []lagResult
	for _, c := range order {
		m := lagResult{contender: c}
		var rows []float64
		var p50, p99, pmax []time.Duration
		for _, p := range by[c] {
			rows = append(rows, float64(p.rows))
			p50, p99, pmax = append(p50, p.p50), append(p99, p.p99), append(pmax, p.pmax)
			for n, kb := range p.peakKB {
				if m.peakKB == nil {
					m.peakKB = map[string]int64{}
				}
				m.peakKB[n] = max(m.peakKB[n], kb)
			}
		}
		m.rows = int(medianF(rows))
		m.p50, m.p99, m.pmax = medianDur(p50), medianDur(p99), medianDur(pmax)
		out = append(out, m)
	}
	return out
}

// lagRun runs contender c's phase with marker row marker: it starts c's
// replication, lets it catch up with what the other contenders' phases
// wrote (untimed), measures the lag of its own phase's rows and stops it.
func (e *env) lagRun(ctx context.Context, c lagContender, script string, marker int) (lagResult, error) {
	lo, err := e.maxLagID(ctx)
	if err != nil {
		return lagResult{}, err
	}
	start, err := queryLSN(ctx, e.src, "SELECT pg_current_wal_insert_lsn()::text")
	if err != nil {
		return lagResult{}, err
	}
	var m *mesh
	if c.enable == nil {
		m, err = e.startMesh(ctx, "lag", e.cfg.nodeEnv)
	} else {
		err = c.enable(ctx, true)
	}
	if err != nil {
		return lagResult{}, err
	}
	res, err := e.lagPhase(ctx, c, m, script, lo, start, marker)
	if m != nil {
		m.stop()
		res.peakKB = m.peaks()
	} else if serr := c.enable(ctx, false); serr != nil && err == nil {
		err = serr
	}
	return res, err
}

// lagCatchUp brings every contender's regions to the source's position
// after marker row marker, untimed (the earlier contenders have not seen
// the later phases), so that all of them can be compared with the source,
// and moves the unused pg_recvlogical slots there too.
func (e *env) lagCatchUp(ctx context.Context, cs []lagContender, marker int) error {
	end, err := e.mark(ctx, marker)
	if err != nil {
		return err
	}
	var regions []*pgtest.Cluster
	for _, c := range cs {
		e.logf("lag: letting %s catch up (untimed)", c.name)
		if c.enable == nil {
			_, err = e.drainPrism(ctx, "lag catch-up", end, marker, drainTimeout, 0)
		} else {
			_, err = e.drainSubscriptions(ctx, c.name, c.regions, c.enable, c.slots, end, marker, drainTimeout)
		}
		if err != nil {
			return fmt.Errorf("lag catch-up of %s: %w", c.name, err)
		}
		regions = append(regions, c.regions...)
	}
	if err := e.verify(ctx, regions...); err != nil {
		return err
	}
	return e.advanceSlots(ctx, "bench_text", "bench_binary")
}

func (e *env) maxLagID(ctx context.Context) (int64, error) {
	conn, err := e.src.Connect(ctx, db)
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var id int64
	err = conn.QueryRow(ctx, "SELECT coalesce(max(id), 0) FROM bench_lag").Scan(&id)
	return id, err
}

// lagPhase measures contender c, whose replication runs (prism-cdc's
// mesh m, nil for the others): once c has confirmed start, pgbench runs
// the lag script at the fixed rate, and when c has applied marker row
// marker, the lag of every bench_lag row above lo in c's regions is read.
func (e *env) lagPhase(ctx context.Context, c lagContender, m *mesh, script string, lo int64, start pglogrepl.LSN, marker int) (lagResult, error) {
	res := lagResult{contender: c.name}
	tick := meshTick(m)
	w, err := e.newWatcher(ctx, c.regions)
	if err != nil {
		return res, err
	}
	defer w.close(ctx)
	err = pollUntil(ctx, drainTimeout, pollInterval, c.name+" to catch up before the lag phase", func() (bool, error) {
		if err := tick(); err != nil {
			return false, err
		}
		return w.confirmed(ctx, start, c.slots...)
	})
	if err != nil {
		return res, err
	}
	if err := m.waitReady(ctx, time.Minute); err != nil {
		return res, err
	}
	e.logf("lag %s: pgbench at %d tps for %ds", c.name, e.cfg.lagRate, e.cfg.lagSeconds)
	if c.name == prism {
		if err := e.resetStatements(ctx); err != nil {
			return res, err
		}
	}
	stages, err := m.stageDelays(ctx)
	if err != nil {
		return res, err
	}
	applied, err := m.applyCounts(ctx)
	if err != nil {
		return res, err
	}
	stop := sampleEvery(500*time.Millisecond, tick)
	roles := e.cpuByRole(ctx, []side{{"source", []*pgtest.Cluster{e.src}}, {"regions", c.regions}}, m, e.cfg.lagSeconds)
	err = e.pgbench(ctx, e.src, "-n", "-c", fmt.Sprint(e.cfg.clients), "-j", fmt.Sprint(min(e.cfg.clients, 2)),
		"-R", fmt.Sprint(e.cfg.lagRate), "-T", fmt.Sprint(e.cfg.lagSeconds), "-f", script)
	if serr := stop(); err == nil {
		err = serr
	}
	if err == nil {
		err = roles("lag " + c.name)
	}
	if err != nil {
		return res, err
	}
	if c.name == prism {
		e.logStatements(ctx, fmt.Sprintf("lag %s at %d tps", c.name, e.cfg.lagRate))
	}
	end, err := e.mark(ctx, marker)
	if err != nil {
		return res, err
	}
	d := drain{contender: c.name}
	if err := w.waitDrain(ctx, &d, time.Now(), drainTimeout, end, marker, c.slots, tick); err != nil {
		return res, err
	}
	if m != nil {
		after, err := m.stageDelays(ctx)
		if err != nil {
			return res, err
		}
		e.logf("lag %s: where the time went, source commit to (the nodes' histograms): %s", c.name, stageSummary(stages, after))
		ac, err := m.applyCounts(ctx)
		if err != nil {
			return res, err
		}
		e.logf("lag %s: the regions applied %s", c.name, applySummary(applied, ac))
	}
	lags, err := e.lagSamples(ctx, c.name, c.regions, lo)
	if err != nil {
		return res, err
	}
	res.rows = len(lags)
	res.p50, res.p99, res.pmax = quantiles(lags)
	return res, nil
}

// lagSamples returns, for every bench_lag row above lo and every region,
// the time from the source commit to the region's apply. With -lag-dump
// it writes them to <contender>.csv in that directory as well.
func (e *env) lagSamples(ctx context.Context, contender string, regions []*pgtest.Cluster, lo int64) ([]time.Duration, error) {
	var csv strings.Builder
	commits := map[int64]time.Time{}
	var id int64
	var ts time.Time
	if err := queryEach(ctx, e.src, []any{&id, &ts}, func() error {
		commits[id] = ts
		return nil
	}, "SELECT id, pg_xact_commit_timestamp(xmin) FROM bench_lag WHERE id > $1", lo); err != nil {
		return nil, fmt.Errorf("read source commit times: %w", err)
	}
	var lags []time.Duration
	for _, c := range regions {
		seen := 0
		if err := queryEach(ctx, c, []any{&id, &ts}, func() error {
			if src, ok := commits[id]; ok {
				lags = append(lags, ts.Sub(src))
				seen++
				fmt.Fprintf(&csv, "%s,%d,%s,%.3f\n", c.Name, id, src.UTC().Format("15:04:05.000000"), float64(ts.Sub(src).Microseconds())/1000)
			}
			return nil
		}, "SELECT id, dst_ts FROM bench_lag_seen WHERE id > $1", lo); err != nil {
			return nil, fmt.Errorf("read apply times in %s: %w", c.Name, err)
		}
		if seen != len(commits) {
			return nil, fmt.Errorf("%s recorded %d of %d lag rows", c.Name, seen, len(commits))
		}
	}
	if len(lags) == 0 {
		return nil, fmt.Errorf("no lag rows were written")
	}
	if err := e.dumpLags(contender+"-"+time.Now().UTC().Format("150405"), "region,id,source_commit,lag_ms", csv.String()); err != nil {
		return nil, err
	}
	return lags, nil
}

// dumpLags writes a phase's lag samples (CSV lines under header) to
// <name>.csv in the -lag-dump directory, if one was given.
func (e *env) dumpLags(name, header, lines string) error {
	if e.cfg.lagDump == "" {
		return nil
	}
	path := filepath.Join(e.cfg.lagDump, strings.NewReplacer(" ", "-", "(", "", ")", "").Replace(name)+".csv")
	if err := os.WriteFile(path, []byte(header+"\n"+lines), 0o644); err != nil {
		return fmt.Errorf("-lag-dump: %w", err)
	}
	e.logf("lag samples written to %s", path)
	return nil
}

// quantiles returns the median, the 99th percentile and the maximum of
// ds; it sorts ds.
func quantiles(ds []time.Duration) (p50, p99, pmax time.Duration) {
	return percentile(ds, 0.50), percentile(ds, 0.99), percentile(ds, 1)
}

// percentile returns the p-quantile (nearest rank) of ds; it sorts ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	i := int(p*float64(len(ds))+0.999999) - 1
	return ds[min(max(i, 0), len(ds)-1)]
}

// largeResult is the large-transaction scenario's outcome.
type largeResult struct {
	rows       int64
	walBytes   int64
	native     drain
	nativeErr  error
	prism      drain
	prismErr   error
	replicated bool
}

// large writes one large transaction and drains it with native
// subscriptions and with prism-cdc.
func (e *env) large(ctx context.Context) (largeResult, error) {
	var res largeResult
	res.rows = int64(e.cfg.largeMB) << 20 / 1000
	before, err := queryLSN(ctx, e.src, "SELECT pg_current_wal_insert_lsn()::text")
	if err != nil {
		return res, err
	}
	e.logf("large: one transaction inserting %d rows of ~1000 bytes", res.rows)
	// 31 md5 strings: 992 characters per row, not compressible enough to
	// be toasted away.
	if err := e.src.Exec(ctx, db, fmt.Sprintf(`INSERT INTO bench_big SELECT g, (SELECT string_agg(md5((g * 31 + k)::text), '') FROM generate_series(1, 31) k)
		FROM generate_series((SELECT coalesce(max(id), 0) + 1 FROM bench_big), (SELECT coalesce(max(id), 0) FROM bench_big) + %d) g`, res.rows)); err != nil {
		return res, err
	}
	end, err := e.mark(ctx, 2000)
	if err != nil {
		return res, err
	}
	res.walBytes = int64(end - before)
	if err := e.checkpointAll(ctx); err != nil {
		return res, err
	}
	e.logf("large: draining %d MB of WAL with native subscriptions", res.walBytes>>20)
	res.native, res.nativeErr = e.drainNative(ctx, end, 2000, drainTimeout)
	if res.nativeErr != nil {
		e.logf("large: native: %v", res.nativeErr)
	}
	e.logf("large: draining with prism-cdc (nodes killed above %d MB)", e.cfg.largeCapMB)
	res.prism, res.prismErr = e.drainPrism(ctx, "large", end, 2000, drainTimeout, int64(e.cfg.largeCapMB)<<10)
	if res.prismErr != nil {
		e.logf("large: prism-cdc: %v", res.prismErr)
		return res, nil
	}
	if err := e.verify(ctx, e.prismc[:]...); err != nil {
		e.logf("large: prism-cdc regions differ: %v", err)
		return res, nil
	}
	res.replicated = true
	return res, nil
}
