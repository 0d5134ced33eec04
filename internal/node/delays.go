package node

import (
	"math"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// delayBuckets are the upper bounds of the delay histograms, in seconds:
// 0.25 ms to a minute, about six per decade up to 0.1 s, where a healthy
// region's p99 lies and quantiles are interpolated within a bucket (status,
// histogram_quantile), and about three per decade above.
var delayBuckets = []float64{.00025, .0005, .00075, .001, .0015, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .075, .1,
	.2, .5, 1, 2, 5, 10, 30, 60}

// delays are histograms of where a transaction's time goes between its
// source commit and its apply in another region, so that an operator
// sees which stage holds a region's lag:
//
//   - sent: source commit to the walsender sending it (both by the source
//     server's clock). This is PostgreSQL's part: the commit's WAL flush,
//     the walsender waking and decoding. A node on a busy machine waits
//     here too, for a CPU.
//   - read: source commit to the node reading it (the node's clock against
//     the server's: a skew between the two hosts adds to it).
//   - received: source commit to this node's peer server reading it from
//     the source node's connection, per source region (across hosts:
//     the regions' clock skew adds to it): the source node's shipping
//     and the network;
//   - began: source commit to the peer server handing it to the apply
//     session: waiting behind the transactions applied before it;
//   - applied: source commit to its apply in this region, by this node's
//     peer server, per source region (across hosts: the regions' clock
//     skew adds to it). Transactions applied by a source node's direct-SQL
//     fallback are not in these three.
type delays struct {
	sent, read           prometheus.Histogram
	peer, began, applied *prometheus.HistogramVec
}

func newDelays(node, region string) *delays {
	cl := prometheus.Labels{"node": node, "region": region}
	h := func(name, help string) prometheus.HistogramOpts {
		return prometheus.HistogramOpts{Name: name, Help: help, Buckets: delayBuckets, ConstLabels: cl}
	}
	return &delays{
		sent: prometheus.NewHistogram(h("prism_source_send_delay_seconds",
			"Seconds from a local transaction's commit to its walsender sending it to this node (the source server's clock)")),
		read: prometheus.NewHistogram(h("prism_source_read_delay_seconds",
			"Seconds from a local transaction's commit to this node reading it from the slot")),
		peer: prometheus.NewHistogramVec(h("prism_peer_receive_delay_seconds",
			"Seconds from a source region's commit to this node receiving the transaction from the source's node"), []string{"source"}),
		began: prometheus.NewHistogramVec(h("prism_apply_begin_delay_seconds",
			"Seconds from a source region's commit to this node beginning to apply the transaction"), []string{"source"}),
		applied: prometheus.NewHistogramVec(h("prism_apply_delay_seconds",
			"Seconds from a source region's commit to the transaction's apply in this region by this node"), []string{"source"}),
	}
}

// collectors are the histograms, to register. A nil *delays (a Node not
// made by New) observes nothing.
func (d *delays) collectors() []prometheus.Collector {
	if d == nil {
		return nil
	}
	return []prometheus.Collector{d.sent, d.read, d.peer, d.began, d.applied}
}

// received observes a local transaction the reader took from the slot
// (decode.ReaderConfig.Received).
func (d *delays) received(txn *decode.Txn, sent, arrived time.Time) {
	if d == nil || txn.CommitTime.IsZero() {
		return
	}
	if !sent.IsZero() {
		d.sent.Observe(nonNegative(sent.Sub(txn.CommitTime)))
	}
	d.read.Observe(nonNegative(arrived.Sub(txn.CommitTime)))
}

// peerReceived observes a transaction of source region that this node's
// peer server just read (peers.ServerConfig.Received).
func (d *delays) peerReceived(source string, txn *decode.Txn) {
	if d == nil || txn.CommitTime.IsZero() {
		return
	}
	d.peer.WithLabelValues(source).Observe(nonNegative(time.Since(txn.CommitTime)))
}

// applying observes transactions of source region that this node's peer
// server is about to apply (peers.ServerConfig.Applying).
func (d *delays) applying(source string, txns []*decode.Txn) {
	if d != nil {
		observe(d.began, source, txns)
	}
}

// appliedTxns observes transactions of source region that this region
// just applied (peers.ServerConfig.Applied).
func (d *delays) appliedTxns(source string, txns []*decode.Txn) {
	if d != nil {
		observe(d.applied, source, txns)
	}
}

// observe adds the time since each of txns' source commit to hv's
// histogram of source.
func observe(hv *prometheus.HistogramVec, source string, txns []*decode.Txn) {
	now := time.Now()
	h := hv.WithLabelValues(source)
	for _, t := range txns {
		if !t.CommitTime.IsZero() {
			h.Observe(nonNegative(now.Sub(t.CommitTime)))
		}
	}
}

// nonNegative is d in seconds, 0 when clocks made it negative.
func nonNegative(d time.Duration) float64 {
	return max(d.Seconds(), 0)
}

// Stages of StageDelay, in the order a transaction passes them.
const (
	StageSent     = "sent"
	StageRead     = "read"
	StageReceived = "received"
	StageBegan    = "began"
	StageApplied  = "applied"
)

// DelayWindow is how far back /status looks at the stage delays.
const DelayWindow = time.Minute

// StageDelay is what a stage's histogram observed over the last
// DelayWindow (less since the node started): the delays from the source
// commit of the transactions that passed it, interpolated within the
// histogram's buckets as Prometheus' histogram_quantile does.
type StageDelay struct {
	Stage string `json:"stage"`
	// Source is the source region of received, began and applied.
	Source string  `json:"source,omitempty"`
	Count  uint64  `json:"count"`
	P50    float64 `json:"p50_seconds"`
	P99    float64 `json:"p99_seconds"`
}

// stageCounts are the cumulative bucket counts of every stage series, by
// stage and source ("stage\x00source"), the last one +Inf's.
type stageCounts map[string][]uint64

// delayWindow keeps a snapshot of the histograms every HistoryEvery over
// the last DelayWindow; the monitor takes them.
type delayWindow struct {
	snaps [int(DelayWindow/HistoryEvery) + 1]stageCounts
	next  int
	n     int
}

// counts reads every stage series' cumulative bucket counts.
func (d *delays) counts() stageCounts {
	out := stageCounts{}
	if d == nil {
		return out
	}
	for _, s := range []struct {
		stage string
		c     prometheus.Collector
	}{{StageSent, d.sent}, {StageRead, d.read}, {StageReceived, d.peer}, {StageBegan, d.began}, {StageApplied, d.applied}} {
		ch := make(chan prometheus.Metric, 16)
		go func() { s.c.Collect(ch); close(ch) }()
		for m := range ch {
			var pb dto.Metric
			if m.Write(&pb) != nil || pb.Histogram == nil {
				continue
			}
			source := ""
			for _, l := range pb.Label {
				if l.GetName() == "source" {
					source = l.GetValue()
				}
			}
			cum := make([]uint64, 0, len(pb.Histogram.Bucket)+1)
			for _, b := range pb.Histogram.Bucket {
				cum = append(cum, b.GetCumulativeCount())
			}
			out[s.stage+"\x00"+source] = append(cum, pb.Histogram.GetSampleCount())
		}
	}
	return out
}

// recentDelays is what the stages observed over the last DelayWindow.
func (m *monitor) recentDelays() []StageDelay {
	now := m.n.delays.counts()
	m.mu.Lock()
	before := m.window.oldest()
	m.mu.Unlock()
	return recent(before, now)
}

// add records a snapshot, dropping the one it replaces.
func (w *delayWindow) add(c stageCounts) {
	w.snaps[w.next] = c
	w.next = (w.next + 1) % len(w.snaps)
	w.n = min(w.n+1, len(w.snaps))
}

// oldest is the oldest snapshot held (nil before the first).
func (w *delayWindow) oldest() stageCounts {
	if w.n == 0 {
		return nil
	}
	return w.snaps[(w.next+len(w.snaps)-w.n)%len(w.snaps)]
}

// recent returns what every stage observed between the snapshot before
// and the counts now, stages in order and sources sorted; a stage that
// observed nothing is left out.
func recent(before, now stageCounts) []StageDelay {
	order := map[string]int{StageSent: 0, StageRead: 1, StageReceived: 2, StageBegan: 3, StageApplied: 4}
	les := append(slices.Clone(delayBuckets), math.Inf(1))
	out := []StageDelay{}
	for key, cum := range now {
		stage, source, _ := strings.Cut(key, "\x00")
		prev := before[key]
		d := make([]float64, len(cum))
		for i, c := range cum {
			if i < len(prev) && prev[i] <= c {
				c -= prev[i]
			}
			d[i] = float64(c)
		}
		if len(d) == 0 || d[len(d)-1] == 0 {
			continue
		}
		out = append(out, StageDelay{Stage: stage, Source: source, Count: uint64(d[len(d)-1]),
			P50: BucketQuantile(0.5, les, d), P99: BucketQuantile(0.99, les, d)})
	}
	slices.SortFunc(out, func(a, b StageDelay) int {
		if a.Source != b.Source {
			return strings.Compare(a.Source, b.Source)
		}
		return order[a.Stage] - order[b.Stage]
	})
	return out
}

// BucketQuantile is the q-quantile of cumulative counts cum at upper
// bounds les (ascending, the last +Inf), linear within a bucket as
// Prometheus' histogram_quantile is; in the +Inf bucket it is the last
// finite bound.
func BucketQuantile(q float64, les, cum []float64) float64 {
	rank := q * cum[len(cum)-1]
	lower, below := 0.0, 0.0
	for i, le := range les {
		if cum[i] >= rank {
			if math.IsInf(le, 1) {
				return lower
			}
			if cum[i] == below {
				return le
			}
			return lower + (le-lower)*(rank-below)/(cum[i]-below)
		}
		lower, below = le, cum[i]
	}
	return lower
}
