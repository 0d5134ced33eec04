package node

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
	"github.com/prism-cdc/prism-cdc/pkg/peers"
)

// MaxSwitches is how many recent path switches the status keeps.
const MaxSwitches = 20

// Switch is one observed change of the path carrying a region's traffic.
type Switch struct {
	At     time.Time `json:"at"`
	Region string    `json:"region"`
	From   string    `json:"from"`
	To     string    `json:"to"`
}

// monitor turns snapshots of the shippers and the reader into counters
// that survive reader terms (a new term starts new shippers whose counters
// start at zero), per-minute buckets for "in the last hour", and the list
// of recent path switches. It observes whenever the status is read (the
// status page, /status and /metrics poll it).
type monitor struct {
	n *Node

	mu       sync.Mutex
	targets  map[string]*targetTrack
	switches []Switch // oldest first, at most MaxSwitches
	reader   *decode.Reader
	received uint64 // the current reader's Received at the last observation
	decoded  uint64 // decoded transactions over every reader

	db dbFacts // cached database facts for /metrics

	history map[string]*ring // per target region: the samples the page charts
	order   []string         // target regions in the order first sampled
	window  delayWindow      // the stage delays' snapshots of the last DelayWindow
}

// targetTrack accumulates one target region's counters.
type targetTrack struct {
	shipper *peers.Shipper // whose counters last were seen
	last    peers.Status
	path    string
	totals  counters           // since the node started
	minutes [60]minuteCounters // ring by minute of the hour
}

type counters struct {
	Retries, Failovers, Fallbacks, Recoveries, Halts int
}

func (c *counters) add(d counters) {
	c.Retries += d.Retries
	c.Failovers += d.Failovers
	c.Fallbacks += d.Fallbacks
	c.Recoveries += d.Recoveries
	c.Halts += d.Halts
}

type minuteCounters struct {
	minute int64 // unix minute the bucket holds; others are stale
	counters
}

func newMonitor(n *Node) *monitor {
	return &monitor{n: n, targets: map[string]*targetTrack{}, history: map[string]*ring{}}
}

// delta returns how much each counter of s grew since prev; a counter
// below its previous value belongs to a new shipper and counts whole.
func delta(prev, s peers.Status) counters {
	d := func(a, b int) int {
		if b < a {
			return b
		}
		return b - a
	}
	return counters{
		Retries:    d(prev.Retries, s.Retries),
		Failovers:  d(prev.Failovers, s.Failovers),
		Fallbacks:  d(prev.Fallbacks, s.Fallbacks),
		Recoveries: d(prev.Recoveries, s.Recoveries),
		Halts:      d(prev.Halts, s.Halts),
	}
}

// shipperView is what one observation keeps of a shipper.
type shipperView struct {
	status     peers.Status
	oldest     time.Time
	hasUnacked bool
}

// observe samples the node and returns, per target region, the shipper
// snapshot (absent when not shipping), and the accumulated counters.
func (m *monitor) observe(now time.Time) map[string]shipperView {
	n := m.n
	n.mu.Lock()
	var shippers []*peers.Shipper
	if n.term != nil {
		shippers = n.term.shippers
	}
	r := n.reader
	n.mu.Unlock()

	views := map[string]shipperView{}
	m.mu.Lock()
	defer m.mu.Unlock()
	if r != nil {
		st := r.Stats()
		if r != m.reader {
			m.reader, m.received = r, 0
		}
		if st.Received >= m.received {
			m.decoded += st.Received - m.received
		}
		m.received = st.Received
	}
	minute := now.Unix() / 60
	for _, s := range shippers {
		st := s.Status()
		oldest, unacked := s.OldestUnacked()
		views[st.Target] = shipperView{status: st, oldest: oldest, hasUnacked: unacked}
		tt := m.targets[st.Target]
		if tt == nil {
			tt = &targetTrack{path: peers.PathConnecting}
			m.targets[st.Target] = tt
		}
		prev := tt.last
		if tt.shipper != s {
			prev = peers.Status{}
			tt.shipper = s
		}
		d := delta(prev, st)
		tt.last = st
		tt.totals.add(d)
		b := &tt.minutes[minute%60]
		if b.minute != minute {
			*b = minuteCounters{minute: minute}
		}
		b.add(d)
		if st.Path != tt.path {
			m.switches = append(m.switches, Switch{At: now.UTC(), Region: st.Target, From: tt.path, To: st.Path})
			if len(m.switches) > MaxSwitches {
				m.switches = append(m.switches[:0], m.switches[len(m.switches)-MaxSwitches:]...)
			}
			tt.path = st.Path
		}
	}
	return views
}

// lastHour sums a target's buckets of the last 60 minutes.
func (m *monitor) lastHour(region string, now time.Time) counters {
	m.mu.Lock()
	defer m.mu.Unlock()
	var c counters
	tt := m.targets[region]
	if tt == nil {
		return c
	}
	minute := now.Unix() / 60
	for _, b := range tt.minutes {
		if b.minute > minute-60 && b.minute <= minute {
			c.add(b.counters)
		}
	}
	return c
}

func (m *monitor) totals(region string) counters {
	m.mu.Lock()
	defer m.mu.Unlock()
	if tt := m.targets[region]; tt != nil {
		return tt.totals
	}
	return counters{}
}

func (m *monitor) recentSwitches() []Switch {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Switch(nil), m.switches...)
}

func (m *monitor) decodedTotal() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.decoded
}

// dbFacts are read from this region's database at most every dbFactsTTL:
// the conflict count and the applied position of every source region.
type dbFacts struct {
	at        time.Time
	conflicts int64
	applied   map[string]uint64 // source region -> origin progress LSN
	err       string
}

const dbFactsTTL = 10 * time.Second

// facts returns the cached database facts, refreshing them when stale.
// They are read on the node's watch connection (withWatchConn).
func (m *monitor) facts(ctx context.Context) dbFacts {
	m.mu.Lock()
	f := m.db
	m.mu.Unlock()
	if time.Since(f.at) < dbFactsTTL {
		return f
	}
	f = dbFacts{at: time.Now(), applied: map[string]uint64{}}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	err := m.n.withWatchConn(ctx, func(q querier) error {
		_ = q.QueryRow(ctx, "SELECT count(*) FROM prism.conflicts").Scan(&f.conflicts)
		rows, err := q.Query(ctx, `SELECT `+decode.OriginRegionSQL+`, pg_wal_lsn_diff(coalesce(pg_replication_origin_progress(roname, true), '0/0'), '0/0')::bigint
			FROM pg_replication_origin WHERE starts_with(roname, '`+decode.NamePrefix+`')`)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var src string
			var lsn int64
			if rows.Scan(&src, &lsn) == nil {
				f.applied[src] = uint64(lsn)
			}
		}
		return rows.Err()
	})
	if err != nil {
		f.err = config.RedactDSN(err.Error())
	}
	m.mu.Lock()
	m.db = f
	m.mu.Unlock()
	return f
}

// collector exposes the node's state to Prometheus. Every scrape observes
// the node once.
type collector struct {
	m *monitor

	reader, lag, lagSeconds, acked, inflightBytes, inflightTxns *prometheus.Desc
	retries, failovers, fallbacks, recoveries, halts, halted    *prometheus.Desc
	decoded, conflicts, applied, up                             *prometheus.Desc
	authRefused                                                 *prometheus.Desc
	applyTxns, applyBatches, applyRetries                       *prometheus.Desc
}

func newCollector(m *monitor) *collector {
	n := m.n
	cl := prometheus.Labels{"node": n.cfg.Node, "region": n.cfg.Region}
	t := []string{"target"}
	d := func(name, help string, labels []string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, cl)
	}
	return &collector{
		m:             m,
		reader:        d("prism_reader", "1 when this node holds its region's slot and ships.", nil),
		lag:           d("prism_lag_bytes", "WAL bytes read from the slot and not yet acknowledged by the target region.", t),
		lagSeconds:    d("prism_lag_seconds", "Seconds since the source commit of the oldest transaction the target region has not acknowledged; 0 when caught up. A region gathers its acknowledgements of an asynchronous source over up to 50 ms.", t),
		acked:         d("prism_acked_lsn", "Highest LSN the target region acknowledged as durable (as a number).", t),
		inflightBytes: d("prism_inflight_bytes", "Bytes sent to the target region and not yet acknowledged.", t),
		inflightTxns:  d("prism_inflight_txns", "Transactions sent to the target region and not yet acknowledged.", t),
		retries:       d("prism_retries_total", "Retries of the same node or of the fallback database.", t),
		failovers:     d("prism_failovers_total", "Failovers to the region's next node.", t),
		fallbacks:     d("prism_fallbacks_total", "Switches to the direct-SQL fallback.", t),
		recoveries:    d("prism_recoveries_total", "Returns from a secondary path to a preferred node.", t),
		halts:         d("prism_halts_total", "Halts on a permanent apply error.", t),
		halted:        d("prism_halted", "1 while replication to the target region is halted.", t),
		decoded:       d("prism_decoded_txns_total", "Local transactions decoded from the slot (resent ones included).", nil),
		conflicts:     d("prism_conflicts", "Rows in prism.conflicts of this region's database (resolved conflicts).", nil),
		applied:       d("prism_applied_lsn", "Origin progress of a source region in this region's database: the end LSN of the last applied transaction; its rate is the apply rate in WAL bytes.", []string{"source"}),
		up:            d("prism_database_up", "1 when this region's database answered the last metrics query.", nil),
		applyTxns:     d("prism_apply_txns_total", "Transactions of a source region applied to this region's database since the node started, by path: batch (many in one target transaction), row (one by one), stream (a large one applied as its chunks came).", []string{"source", "path"}),
		applyBatches:  d("prism_apply_batches_total", "Batches of a source region's transactions by result: committed, rolled_back (a conflict, a missing row or a serialization failure; their transactions were applied by rows), skipped (sent straight to the row path after batches kept rolling back).", []string{"source", "result"}),
		applyRetries:  d("prism_apply_retries_total", "Re-applies of a source region's transactions after a serialization failure or a deadlock (with a local transaction or another source's).", []string{"source"}),
		authRefused:   d("prism_peer_auth_refused", "1 while the target region's node peer refuses this node's credentials (auth.token or TLS certificates): a configuration error, not an outage.", []string{"target", "peer"}),
	}
}

// Describe implements prometheus.Collector.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.reader, c.lag, c.lagSeconds, c.acked, c.inflightBytes, c.inflightTxns,
		c.retries, c.failovers, c.fallbacks, c.recoveries, c.halts, c.halted, c.decoded, c.conflicts, c.applied, c.up, c.authRefused,
		c.applyTxns, c.applyBatches, c.applyRetries} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	st := c.m.status(now)
	g := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	k := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	reader := 0.0
	if st.Role == RoleReader {
		reader = 1
	}
	g(c.reader, reader)
	for _, t := range st.Targets {
		g(c.lag, float64(t.LagBytes), t.Region)
		g(c.lagSeconds, t.LagSeconds, t.Region)
		if lsn, err := parseLSN(t.Acked); err == nil {
			g(c.acked, float64(lsn), t.Region)
		}
		g(c.inflightBytes, float64(t.WindowBytes), t.Region)
		g(c.inflightTxns, float64(t.WindowTxns), t.Region)
		tot := c.m.totals(t.Region)
		k(c.retries, float64(tot.Retries), t.Region)
		k(c.failovers, float64(tot.Failovers), t.Region)
		k(c.fallbacks, float64(tot.Fallbacks), t.Region)
		k(c.recoveries, float64(tot.Recoveries), t.Region)
		k(c.halts, float64(tot.Halts), t.Region)
		halted := 0.0
		if isHalted(t.Path) {
			halted = 1
		}
		g(c.halted, halted, t.Region)
		for _, p := range c.m.n.cfg.Peers {
			if p.Region != t.Region {
				continue
			}
			for _, pn := range p.Nodes {
				refused := 0.0
				if slices.Contains(t.AuthRefused, pn.Name) {
					refused = 1
				}
				g(c.authRefused, refused, t.Region, pn.Name)
			}
		}
	}
	k(c.decoded, float64(c.m.decodedTotal()))
	if a := c.m.n.applied.Load(); a != nil {
		for src, s := range a.Stats() {
			k(c.applyTxns, float64(s.Batched), src, "batch")
			k(c.applyTxns, float64(s.ByRow), src, "row")
			k(c.applyTxns, float64(s.Streamed), src, "stream")
			k(c.applyBatches, float64(s.Batches), src, "committed")
			k(c.applyBatches, float64(s.RolledBack), src, "rolled_back")
			k(c.applyBatches, float64(s.Skipped), src, "skipped")
			k(c.applyRetries, float64(s.Retries), src)
		}
	}
	f := c.m.facts(context.Background())
	if f.err != "" {
		g(c.up, 0)
		return
	}
	g(c.up, 1)
	g(c.conflicts, float64(f.conflicts))
	for src, lsn := range f.applied {
		g(c.applied, float64(lsn), src)
	}
}
