package main

import (
	"math"
	"strings"
	"testing"
)

func TestBucketQuantile(t *testing.T) {
	les := []float64{.001, .002, .005, math.Inf(1)}
	cum := []float64{50, 90, 100, 100}
	for _, c := range []struct{ q, want float64 }{
		{0.5, .001},  // the 50th of 100 ends the first bucket
		{0.7, .0015}, // halfway into the second
		{0.99, .0047},
	} {
		if got := bucketQuantile(c.q, les, cum); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("bucketQuantile(%v) = %v, want %v", c.q, got, c.want)
		}
	}
	// Above the last finite bound: that bound.
	if got := bucketQuantile(0.99, les, []float64{0, 0, 10, 20}); got != .005 {
		t.Errorf("bucketQuantile in +Inf = %v, want 0.005", got)
	}
}

func TestStageSummaryDelta(t *testing.T) {
	before := stageCounts{"prism_apply_delay_seconds": {.001: 10, .002: 10, math.Inf(1): 10}}
	after := stageCounts{"prism_apply_delay_seconds": {.001: 10, .002: 110, math.Inf(1): 110}}
	got := stageSummary(before, after)
	if !strings.Contains(got, "applied: 100, p50 1.5 ms, p99 2.0 ms") || !strings.Contains(got, "walsender sent: none") {
		t.Errorf("stageSummary = %q", got)
	}
}
