package main

import (
	"math"
	"strings"
	"testing"
)

func TestStageSummaryDelta(t *testing.T) {
	before := stageCounts{"prism_apply_delay_seconds": {.001: 10, .002: 10, math.Inf(1): 10}}
	after := stageCounts{"prism_apply_delay_seconds": {.001: 10, .002: 110, math.Inf(1): 110}}
	got := stageSummary(before, after)
	if !strings.Contains(got, "applied: 100, p50 1.5 ms, p99 2.0 ms") || !strings.Contains(got, "walsender sent: none") {
		t.Errorf("stageSummary = %q", got)
	}
}

// TestApplyCounts: the apply counters of two nodes and two source regions
// add up by path and result, other lines are ignored, and the summary is
// the difference.
func TestApplyCounts(t *testing.T) {
	before, after := applyCounts{}, applyCounts{}
	for _, line := range []string{
		`prism_apply_txns_total{node="eu1",path="batch",region="eu",source="na"} 100`,
		`prism_apply_txns_total{node="eu1",path="row",region="eu",source="na"} 7`,
		`prism_apply_batches_total{node="eu1",region="eu",result="committed",source="na"} 4`,
		`prism_apply_retries_total{node="eu1",region="eu",source="na"} 1`,
	} {
		before.add(line)
	}
	for _, line := range []string{
		`# TYPE prism_apply_txns_total counter`,
		`prism_apply_txns_total{node="eu1",path="batch",region="eu",source="na"} 150`,
		`prism_apply_txns_total{node="eu1",path="row",region="eu",source="na"} 9`,
		`prism_apply_txns_total{node="as1",path="batch",region="as",source="na"} 40`,
		`prism_apply_txns_total{node="as1",path="stream",region="as",source="eu"} 1`,
		`prism_apply_batches_total{node="eu1",region="eu",result="committed",source="na"} 6`,
		`prism_apply_batches_total{node="as1",region="as",result="committed",source="na"} 2`,
		`prism_apply_batches_total{node="as1",region="as",result="rolled_back",source="na"} 3`,
		`prism_apply_batches_total{node="as1",region="as",result="skipped",source="eu"} 5`,
		`prism_apply_retries_total{node="eu1",region="eu",source="na"} 1`,
		`prism_apply_retries_total{node="as1",region="as",source="eu"} 2`,
		`prism_applied_lsn{node="as1",region="as",source="na"} 256`,
	} {
		after.add(line)
	}
	want := "90 transactions in 4 batches, 2 by rows, 1 streamed; batches rolled back 3, skipped 5; retries after serialization failures 2"
	if got := applySummary(before, after); got != want {
		t.Fatalf("applySummary = %q, want %q", got, want)
	}
}
