package node

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// delayBuckets are the upper bounds of the delay histograms, in seconds:
// 0.5 ms to a minute, about three per decade.
var delayBuckets = []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30, 60}

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
