package node

import (
	"math"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

func TestBucketQuantile(t *testing.T) {
	les := []float64{.001, .002, .005, math.Inf(1)}
	cum := []float64{50, 90, 100, 100}
	for _, c := range []struct{ q, want float64 }{
		{0.5, .001},  // the 50th of 100 ends the first bucket
		{0.7, .0015}, // halfway into the second
		{0.99, .0047},
	} {
		if got := BucketQuantile(c.q, les, cum); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("BucketQuantile(%v) = %v, want %v", c.q, got, c.want)
		}
	}
	// Above the last finite bound: that bound.
	if got := BucketQuantile(0.99, les, []float64{0, 0, 10, 20}); got != .005 {
		t.Errorf("BucketQuantile in +Inf = %v, want 0.005", got)
	}
}

// TestRecentDelays: /status's stage delays count what the histograms
// observed after the window's oldest snapshot, stage by stage in path
// order and source by source, with their quantiles in the right buckets;
// a snapshot older than the window drops out of it.
func TestRecentDelays(t *testing.T) {
	d := newDelays("eu1", "eu")
	ago := func(d time.Duration) *decode.Txn { return &decode.Txn{CommitTime: time.Now().Add(-d)} }
	var w delayWindow
	// Before the window: a local transaction read after 30 ms.
	d.received(ago(30*time.Millisecond), time.Time{}, time.Now())
	w.add(d.counts())
	// In it: 100 local ones sent after 1.5 ms and read after 3 ms; from
	// na 100 received after 4 ms (99 of them) or 40 ms (1), beginning
	// after 6 ms, applied after 15 ms; from as one applied after 3 s.
	for range 100 {
		now := time.Now()
		d.received(&decode.Txn{CommitTime: now.Add(-3 * time.Millisecond)}, now.Add(-1500*time.Microsecond), now)
	}
	for i := range 100 {
		in := 4 * time.Millisecond
		if i == 99 {
			in = 40 * time.Millisecond
		}
		d.peerReceived("na", ago(in))
		d.applying("na", []*decode.Txn{ago(6 * time.Millisecond)})
		d.appliedTxns("na", []*decode.Txn{ago(15 * time.Millisecond)})
	}
	d.appliedTxns("as", []*decode.Txn{ago(3 * time.Second)})

	got := recent(w.oldest(), d.counts())
	want := []struct {
		stage, source string
		count         uint64
		p50lo, p50hi  float64 // the bucket the median falls in
		p99lo, p99hi  float64
	}{
		{StageSent, "", 100, .001, .002, .001, .002},
		{StageRead, "", 100, .002, .005, .002, .005},
		{StageApplied, "as", 1, 2, 5, 2, 5},
		{StageReceived, "na", 100, .002, .005, .002, .005},
		{StageBegan, "na", 100, .005, .01, .005, .01},
		{StageApplied, "na", 100, .01, .02, .01, .02},
	}
	if len(got) != len(want) {
		t.Fatalf("recent = %+v, want %d stages", got, len(want))
	}
	for i, w := range want {
		g := got[i]
		if g.Stage != w.stage || g.Source != w.source || g.Count != w.count ||
			g.P50 < w.p50lo || g.P50 > w.p50hi || g.P99 < w.p99lo || g.P99 > w.p99hi {
			t.Errorf("stage %d = %+v, want %s from %q: %d, p50 in [%v, %v], p99 in [%v, %v]", i, g, w.stage, w.source, w.count, w.p50lo, w.p50hi, w.p99lo, w.p99hi)
		}
	}
	// The one transaction received after 40 ms is the 100th: above p99.
	// A window full of later snapshots no longer counts these.
	for range len(w.snaps) {
		w.add(d.counts())
	}
	if got := recent(w.oldest(), d.counts()); len(got) != 0 {
		t.Errorf("after the window moved on: %+v, want nothing", got)
	}
	// A node without delays (not made by New) reports nothing.
	var none *delays
	if got := recent(nil, none.counts()); len(got) != 0 {
		t.Errorf("nil delays: %+v", got)
	}
}
