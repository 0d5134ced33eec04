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
	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// The active-active contenders: every region writes, every region
// replicates to the two others.
const (
	prismMesh     = "prism-cdc (3-region mesh)"
	pglogicalMesh = "pglogical (3-region mesh)"
)

// activeSQL creates contender prefix's active-active tables: the hot
// rows, an insert-only lag table whose rows carry their region (rid),
// and, unreplicated, when each lag row arrived in this cluster (a
// deferred trigger, fired under apply too, stamps it right before the
// applying transaction commits).
func activeSQL(prefix string) string {
	return strings.ReplaceAll(`CREATE TABLE aa_X_hot (id bigint PRIMARY KEY, v bigint NOT NULL, rid int NOT NULL);
CREATE SEQUENCE aa_X_seq;
CREATE TABLE aa_X_lag (rid int, id bigint, PRIMARY KEY (rid, id));
CREATE SEQUENCE aa_X_lagseq;
CREATE TABLE aa_X_seen (rid int, id bigint, dst_ts timestamptz NOT NULL, PRIMARY KEY (rid, id));
CREATE FUNCTION aa_X_seen() RETURNS trigger LANGUAGE plpgsql SET search_path = public, pg_catalog AS $$
BEGIN
	INSERT INTO aa_X_seen VALUES (NEW.rid, NEW.id, clock_timestamp()) ON CONFLICT DO NOTHING;
	RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER aa_X_seen AFTER INSERT ON aa_X_lag DEFERRABLE INITIALLY DEFERRED
	FOR EACH ROW EXECUTE FUNCTION aa_X_seen();
ALTER TABLE aa_X_lag ENABLE ALWAYS TRIGGER aa_X_seen;
`, "aa_X_", "aa_"+prefix+"_")
}

// activeScript is the workload of one region in phase base: one lag row
// and one operation on the hot rows base+1 .. base+keys per transaction:
// 50% absolute updates, 20% deletes, 20% re-inserts of a hot key (a no-op
// while the row exists), 10% inserts of a key of this region's own. With
// pairs, every transaction then also updates a second hot row (absolute),
// so two hot rows in random order: transactions of two regions that take
// the same two rows in opposite orders deadlock in a region where both
// are applied (or one applied and one local).
func activeScript(prefix string, base, keys int, pairs bool) string {
	second := ""
	if pairs {
		second = fmt.Sprintf("\\set k2 %d + random(1, %d)\nUPDATE aa_X_hot SET v = :v, rid = :rid WHERE id = :k2;\n", base, keys)
	}
	return strings.ReplaceAll(fmt.Sprintf(`\set k %[1]d + random(1, %[2]d)
\set v random(1, 1000000000)
\set op random(1, 10)
BEGIN;
INSERT INTO aa_X_lag VALUES (:rid, nextval('aa_X_lagseq'));
\if :op <= 5
UPDATE aa_X_hot SET v = :v, rid = :rid WHERE id = :k;
\elif :op <= 7
DELETE FROM aa_X_hot WHERE id = :k;
\elif :op <= 9
INSERT INTO aa_X_hot VALUES (:k, :v, :rid) ON CONFLICT (id) DO NOTHING;
\else
INSERT INTO aa_X_hot VALUES (%[1]d + 500000 + :rid * 100000 + nextval('aa_X_seq') %% 100000, :v, :rid) ON CONFLICT (id) DO NOTHING;
\endif
%[3]sEND;
`, base, keys, second), "aa_X_", "aa_"+prefix+"_")
}

// activeResult is one contender's active-active phase at one rate.
type activeResult struct {
	contender string
	rate      int // transactions per second in each region
	txns      int // lag rows written, all regions
	// quiesce is the time from the end of the writes until every
	// region had every region's lag rows and every slot had confirmed
	// its cluster's WAL; 0 when that did not happen within the timeout.
	quiesce        time.Duration
	rows, differ   int // hot rows (keys in any region), keys whose rows differ
	p50, p99, pmax time.Duration
	peakKB         map[string]int64
	note           string
}

// activeRegion is one region of an active-active mesh.
type activeRegion struct {
	rid     int
	cluster *pgtest.Cluster
	// slots selects, in pg_replication_slots, the slots of cluster that
	// the other regions read; there are nslots of them.
	slots  string
	nslots int
}

// active runs the active-active scenario for prism-cdc and pglogical, at
// every rate in turn, -active-runs times with the contenders' order
// alternating from one run to the next (so a noisy stretch of the host
// is shared out); each phase writes its own range of hot keys. It
// returns every phase.
func (e *env) active(ctx context.Context) ([]activeResult, error) {
	var cs []string
	for _, c := range []string{prismMesh, pglogicalMesh} {
		if c == prismMesh && e.cfg.contenders["prism"] || c == pglogicalMesh && e.cfg.contenders["pglogical"] {
			cs = append(cs, c)
		}
	}
	var out []activeResult
	phase := 0
	for run := 1; run <= e.cfg.activeRuns; run++ {
		for _, c := range cs {
			for _, rate := range e.cfg.activeRates {
				phase++
				res, err := e.activePhase(ctx, c, rate, phase*1000000)
				if err != nil {
					return out, fmt.Errorf("active %s at %d tps: %w", c, rate, err)
				}
				e.logf("active %s at %d tps per region (run %d/%d): %d transactions, quiesced in %s, %d of %d hot rows differ, lag p50 %s p99 %s max %s %s",
					c, rate, run, e.cfg.activeRuns, res.txns, res.quiesce, res.differ, res.rows, res.p50, res.p99, res.pmax, res.note)
				out = append(out, res)
			}
		}
		slices.Reverse(cs)
	}
	return out, nil
}

// medianActive folds the phases of each contender and rate into one
// result, in the order they first ran (prism-cdc first): the median of
// the transactions, hot rows, quiesce time and lags, the most rows
// differing in any phase, "did not quiesce" if any phase did not, the
// highest peak RSS of each node, and every phase's note.
func medianActive(rs []activeResult) []activeResult {
	type key struct {
		c    string
		rate int
	}
	var order []key
	by := map[key][]activeResult{}
	for _, r := range rs {
		k := key{r.contender, r.rate}
		if _, ok := by[k]; !ok {
			order = append(order, k)
		}
		by[k] = append(by[k], r)
	}
	sort.SliceStable(order, func(i, j int) bool { return order[i].c == prismMesh && order[j].c != prismMesh })
	var out []activeResult
	for _, k := range order {
		ps := by[k]
		m := activeResult{contender: k.c, rate: k.rate, peakKB: map[string]int64{}}
		var txns, rows []float64
		var quiesce, p50, p99, pmax []time.Duration
		var notes []string
		stuck := false
		for _, p := range ps {
			txns, rows = append(txns, float64(p.txns)), append(rows, float64(p.rows))
			quiesce = append(quiesce, p.quiesce)
			stuck = stuck || p.quiesce <= 0
			p50, p99, pmax = append(p50, p.p50), append(p99, p.p99), append(pmax, p.pmax)
			m.differ = max(m.differ, p.differ)
			for n, kb := range p.peakKB {
				m.peakKB[n] = max(m.peakKB[n], kb)
			}
			if p.note != "" {
				notes = append(notes, p.note)
			}
		}
		m.txns, m.rows = int(medianF(txns)), int(medianF(rows))
		m.quiesce, m.p50, m.p99, m.pmax = medianDur(quiesce), medianDur(p50), medianDur(p99), medianDur(pmax)
		if stuck {
			m.quiesce = 0
		}
		m.note = strings.Join(notes, "; ")
		out = append(out, m)
	}
	return out
}

func (e *env) activeRegions(c string) []activeRegion {
	if c == prismMesh {
		return []activeRegion{{1, e.src, "slot_name = 'prism_na'", 1}, {2, e.prismc[0], "slot_name = 'prism_eu'", 1}, {3, e.prismc[1], "slot_name = 'prism_as'", 1}}
	}
	// A pglogical node's slots are those of its two subscribers.
	const pgl = "plugin = 'pglogical_output'"
	return []activeRegion{{1, e.src, pgl, 2}, {2, e.pgl[0], pgl, 2}, {3, e.pgl[1], pgl, 2}}
}

// activePrefix names contender c's tables: aa_<prefix>_*.
func activePrefix(c string) string {
	if c == pglogicalMesh {
		return "pgl"
	}
	return "prism"
}

// activePhase runs contender c at rate transactions per second in every
// region on the hot keys above base: replication on, the hot rows seeded
// and quiet, the writes, then the measurements.
func (e *env) activePhase(ctx context.Context, c string, rate, base int) (res activeResult, err error) {
	res = activeResult{contender: c, rate: rate}
	prefix := activePrefix(c)
	regions := e.activeRegions(c)
	m, err := e.activeReplicate(ctx, c, rate)
	if err != nil {
		return res, err
	}
	defer func() {
		if m != nil {
			m.stop()
			res.peakKB = m.peaks()
		}
	}()
	tick := meshTick(m)
	if err := e.activeSeed(ctx, c, regions, prefix, base, tick); err != nil {
		return res, err
	}
	if e.cfg.activeWarmup > 0 {
		// The same writes, not measured: a contender whose replication
		// just started (prism-cdc's mesh starts for each phase, while
		// pglogical's subscriptions between the regions keep running)
		// would otherwise pay its start-up - statements prepared and
		// planned, catalogs read, functions compiled, on every apply
		// session at once - in the phase's lag.
		if err := e.activeWrite(ctx, c, regions, rate, prefix, base, e.cfg.activeWarmup, tick); err != nil {
			return res, fmt.Errorf("warm-up: %w", err)
		}
		if _, err := e.activeQuiesce(ctx, c, regions, prefix, 5*time.Minute, tick); err != nil {
			return res, fmt.Errorf("after the warm-up: %w", err)
		}
	}
	lo, err := lastLagIDs(ctx, regions, prefix)
	if err != nil {
		return res, err
	}
	if c == prismMesh {
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
	clusters := make([]*pgtest.Cluster, len(regions))
	for i, r := range regions {
		clusters[i] = r.cluster
	}
	roles := e.cpuByRole(ctx, []side{{"regions", clusters}}, m, e.cfg.activeSeconds)
	if err := e.activeWrite(ctx, c, regions, rate, prefix, base, e.cfg.activeSeconds, tick); err != nil {
		return res, err
	}
	if err := roles(fmt.Sprintf("active %s at %d tps", c, rate)); err != nil {
		return res, err
	}
	if c == prismMesh {
		e.logStatements(ctx, fmt.Sprintf("active %s at %d tps", c, rate))
	}
	if err := e.activeMeasure(ctx, &res, regions, prefix, base, lo, tick); err != nil {
		return res, err
	}
	if m != nil {
		after, err := m.stageDelays(ctx)
		if err != nil {
			return res, err
		}
		e.logf("active %s at %d tps: where the time went, source commit to (the nodes' histograms): %s", c, rate, stageSummary(stages, after))
		ac, err := m.applyCounts(ctx)
		if err != nil {
			return res, err
		}
		e.logf("active %s at %d tps: the regions applied %s", c, rate, applySummary(applied, ac))
	}
	if c == pglogicalMesh {
		err = e.pglSourceSubs(ctx, false)
	}
	return res, err
}

// activeReplicate turns contender c's replication on: it starts
// prism-cdc's mesh and returns it, or enables pglogical's subscriptions
// to the source (the mesh's other subscriptions always run).
func (e *env) activeReplicate(ctx context.Context, c string, rate int) (*mesh, error) {
	if c == prismMesh {
		return e.startMesh(ctx, fmt.Sprintf("active %d tps", rate), e.cfg.nodeEnv)
	}
	return nil, e.pglSourceSubs(ctx, true)
}

// activeSeed writes the phase's hot rows in one region and waits until
// they are replicated and everything is quiet, before the clock starts.
func (e *env) activeSeed(ctx context.Context, c string, regions []activeRegion, prefix string, base int, tick func() error) error {
	if err := e.src.Exec(ctx, db, fmt.Sprintf("INSERT INTO aa_%s_hot SELECT %d + g, 0, 1 FROM generate_series(1, %d) g", prefix, base, e.cfg.activeKeys)); err != nil {
		return err
	}
	if _, err := e.activeQuiesce(ctx, c, regions, prefix, 5*time.Minute, tick); err != nil {
		return fmt.Errorf("before the writes: %w", err)
	}
	return nil
}

// activeWrite runs pgbench with the phase's script in every region at
// once, at rate for seconds, and samples the nodes meanwhile.
func (e *env) activeWrite(ctx context.Context, c string, regions []activeRegion, rate int, prefix string, base, seconds int, tick func() error) error {
	script := filepath.Join(e.dir, fmt.Sprintf("active-%s-%d.sql", prefix, base))
	if err := os.WriteFile(script, []byte(activeScript(prefix, base, e.cfg.activeKeys, e.cfg.activePairs)), 0o644); err != nil {
		return fmt.Errorf("write active script: %w", err)
	}
	e.logf("active %s: every region at %d tps for %ds", c, rate, seconds)
	stop := sampleEvery(500*time.Millisecond, tick)
	args := []string{"-n", "-c", "2", "-j", "1", "-R", fmt.Sprint(rate), "-T", fmt.Sprint(seconds)}
	if e.cfg.activePairs {
		// The region's two clients can deadlock with each other too:
		// pgbench tries such a transaction again.
		args = append(args, "--max-tries", "10")
	}
	err := parallel(regions, func(r activeRegion) error {
		return e.pgbench(ctx, r.cluster, append(slices.Clip(args), "-D", fmt.Sprintf("rid=%d", r.rid), "-f", script)...)
	})
	// A node that exited here fails the quiesce that follows, in the
	// phase's note.
	_ = stop()
	return err
}

// activeMeasure waits for the regions to quiesce after the writes and
// records in res the time that took (or why it did not happen), the hot
// rows that differ and the lag of the lag rows above lo.
func (e *env) activeMeasure(ctx context.Context, res *activeResult, regions []activeRegion, prefix string, base int, lo map[int]int64, tick func() error) error {
	var err error
	res.quiesce, err = e.activeQuiesce(ctx, res.contender, regions, prefix, 5*time.Minute+10*time.Duration(e.cfg.activeSeconds)*time.Second, tick)
	if err != nil {
		res.note = err.Error()
		e.logf("active %s: %v", res.contender, err)
	}
	var diffs []string
	if res.rows, res.differ, diffs, err = compareHot(ctx, regions, prefix, base); err != nil {
		return err
	}
	for _, d := range diffs {
		e.logf("active %s: differs: %s", res.contender, d)
	}
	lags, n, csv, err := activeLags(ctx, regions, prefix, lo)
	if err != nil {
		return err
	}
	if err := e.dumpLags(fmt.Sprintf("%s-%dtps-%s", res.contender, res.rate, time.Now().UTC().Format("150405")), "region,source_region,id,source_commit,lag_ms", csv); err != nil {
		return err
	}
	res.txns = n
	res.p50, res.p99, res.pmax = quantiles(lags)
	return nil
}

// lastLagIDs returns the highest lag row id each region wrote so far, by
// region id.
func lastLagIDs(ctx context.Context, regions []activeRegion, prefix string) (map[int]int64, error) {
	lo := map[int]int64{}
	for _, r := range regions {
		id, err := lastLagID(ctx, r, prefix)
		if err != nil {
			return nil, err
		}
		lo[r.rid] = id
	}
	return lo, nil
}

// lastLagID returns the highest lag row id region r wrote so far.
func lastLagID(ctx context.Context, r activeRegion, prefix string) (int64, error) {
	conn, err := r.cluster.Connect(ctx, db)
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var n int64
	err = conn.QueryRow(ctx, fmt.Sprintf("SELECT coalesce(max(id), 0) FROM aa_%s_lag WHERE rid = $1", prefix), r.rid).Scan(&n)
	return n, err
}

// activeQuiesce waits until every region has the same number of lag
// rows as every other and every region's slots have confirmed the WAL
// its cluster had written when the wait began, and returns how long
// that took.
func (e *env) activeQuiesce(ctx context.Context, c string, regions []activeRegion, prefix string, timeout time.Duration, tick func() error) (time.Duration, error) {
	t0 := time.Now()
	conns := make([]*pgx.Conn, len(regions))
	defer func() {
		for _, conn := range conns {
			if conn != nil {
				conn.Close(context.WithoutCancel(ctx))
			}
		}
	}()
	ends := make([]pglogrepl.LSN, len(regions))
	for i, r := range regions {
		var err error
		if conns[i], err = r.cluster.Connect(ctx, db); err != nil {
			return 0, err
		}
		if ends[i], err = scanLSN(ctx, conns[i], "SELECT pg_current_wal_insert_lsn()::text"); err != nil {
			return 0, err
		}
	}
	var done time.Duration
	err := pollUntil(ctx, timeout, pollInterval, c+" to quiesce", func() (bool, error) {
		if err := tick(); err != nil {
			return false, err
		}
		counts := map[int]bool{}
		for i, r := range regions {
			var n int
			if err := conns[i].QueryRow(ctx, fmt.Sprintf("SELECT count(*) FROM aa_%s_lag", prefix)).Scan(&n); err != nil {
				return false, err
			}
			counts[n] = true
			var slots int
			var least *string
			if err := conns[i].QueryRow(ctx, "SELECT count(*), min(confirmed_flush_lsn)::text FROM pg_replication_slots WHERE "+r.slots).Scan(&slots, &least); err != nil {
				return false, err
			}
			if slots != r.nslots || least == nil {
				return false, nil // not all created yet
			}
			lsn, err := pglogrepl.ParseLSN(*least)
			if err != nil || lsn < ends[i] {
				return false, err
			}
		}
		if len(counts) != 1 {
			return false, nil
		}
		done = time.Since(t0)
		return true, nil
	})
	return done, err
}

// compareHot compares the phase's hot rows (keys base .. base+999999)
// across the regions: how many keys any region has, and how many of them
// differ (missing somewhere, or different values). For up to five that
// differ it describes each region's version: the values, and the commit
// time and origin of the version, or of the key's tombstone for
// prism-cdc where the row is missing.
func compareHot(ctx context.Context, regions []activeRegion, prefix string, base int) (rows, differ int, diffs []string, err error) {
	all := map[int64][]string{}
	for i, r := range regions {
		var id, v int64
		var rid int
		if err := queryEach(ctx, r.cluster, []any{&id, &v, &rid}, func() error {
			if all[id] == nil {
				all[id] = make([]string, len(regions))
			}
			all[id][i] = fmt.Sprintf("%d/%d", v, rid)
			return nil
		}, fmt.Sprintf("SELECT id, v, rid FROM aa_%s_hot WHERE id > $1 AND id <= $2", prefix), base, base+999999); err != nil {
			return 0, 0, nil, fmt.Errorf("read hot rows of %s: %w", r.cluster.Name, err)
		}
	}
	for id, vs := range all {
		for _, v := range vs[1:] {
			if v != vs[0] {
				differ++
				if len(diffs) < 5 {
					diffs = append(diffs, describeHot(ctx, regions, prefix, id))
				}
				break
			}
		}
	}
	return len(all), differ, diffs, nil
}

// describeHot describes hot key id's version in every region.
func describeHot(ctx context.Context, regions []activeRegion, prefix string, id int64) string {
	q := fmt.Sprintf(`SELECT format('%%s/%%s at %%s from origin %%s', h.v, h.rid, pg_xact_commit_timestamp(h.xmin), o.roident) FROM aa_%s_hot h
		LEFT JOIN LATERAL pg_xact_commit_timestamp_origin(h.xmin) o ON true WHERE h.id = $1`, prefix)
	if prefix == "prism" {
		q = `SELECT coalesce((SELECT format('%s/%s stamped %s from %s', h.v, h.rid,
			prism.row_stamp('public.aa_prism_hot', jsonb_object(ARRAY['id'], ARRAY[h.id::text]), h.xmin), prism.region_of(o.roident))
			FROM aa_prism_hot h, pg_xact_commit_timestamp_origin(h.xmin) o WHERE h.id = $1),
			(SELECT format('deleted, tombstone stamped %s from %s', prism.row_stamp(t.table_name, t.key, t.xmin), prism.region_of(o.roident))
			FROM prism.tombstones t, pg_xact_commit_timestamp_origin(t.xmin) o
			WHERE t.table_name = 'public.aa_prism_hot' AND t.key = jsonb_object(ARRAY['id'], ARRAY[$1::text])))`
	}
	parts := []string{fmt.Sprintf("key %d", id)}
	for _, r := range regions {
		desc := "missing"
		var got *string
		if err := queryEach(ctx, r.cluster, []any{&got}, func() error {
			if got != nil {
				desc = *got
			}
			return nil
		}, q, id); err != nil {
			desc = "unreadable: " + err.Error()
		}
		parts = append(parts, r.cluster.Name+": "+desc)
	}
	return strings.Join(parts, "; ")
}

// activeLags returns, for every lag row numbered above lo[its region]
// and every other region it reached, the time from its commit in its own
// region to its apply in the other; how many lag rows there were; and
// the samples as CSV lines (see -lag-dump).
func activeLags(ctx context.Context, regions []activeRegion, prefix string, lo map[int]int64) ([]time.Duration, int, string, error) {
	type key struct {
		rid int
		id  int64
	}
	commits := map[key]time.Time{}
	var k key
	var ts time.Time
	for _, r := range regions {
		if err := queryEach(ctx, r.cluster, []any{&k.id, &ts}, func() error {
			commits[key{r.rid, k.id}] = ts
			return nil
		}, fmt.Sprintf("SELECT id, pg_xact_commit_timestamp(xmin) FROM aa_%s_lag WHERE rid = $1 AND id > $2", prefix), r.rid, lo[r.rid]); err != nil {
			return nil, 0, "", fmt.Errorf("read commit times of %s: %w", r.cluster.Name, err)
		}
	}
	var lags []time.Duration
	var csv strings.Builder
	for _, r := range regions {
		if err := queryEach(ctx, r.cluster, []any{&k.rid, &k.id, &ts}, func() error {
			if src, ok := commits[k]; ok {
				lags = append(lags, ts.Sub(src))
				fmt.Fprintf(&csv, "%d,%d,%d,%s,%.3f\n", r.rid, k.rid, k.id, src.UTC().Format("15:04:05.000000"), float64(ts.Sub(src).Microseconds())/1000)
			}
			return nil
		}, fmt.Sprintf("SELECT rid, id, dst_ts FROM aa_%s_seen WHERE rid <> $1", prefix), r.rid); err != nil {
			return nil, 0, "", fmt.Errorf("read apply times of %s: %w", r.cluster.Name, err)
		}
	}
	return lags, len(commits), csv.String(), nil
}
