package main

import (
	"testing"

	"github.com/prism-cdc/prism-cdc/internal/node"
)

// TestBaselineSince: the demo's tables count path events from the steady
// state, not the retries of startup; a restarted node's counters (below
// the baseline) count whole.
func TestBaselineSince(t *testing.T) {
	b := baseline{"na1/eu": {Region: "eu", Retries: 4, Failovers: 0, Fallbacks: 1}}
	tests := []struct {
		name                         string
		node                         string
		status                       node.TargetStatus
		retries, failovers, fallback int
	}{
		{"steady, startup retries only", "na1", node.TargetStatus{Region: "eu", Retries: 4, Fallbacks: 1}, 0, 0, 0},
		{"two retries since", "na1", node.TargetStatus{Region: "eu", Retries: 6, Failovers: 1, Fallbacks: 1}, 2, 1, 0},
		{"restarted node", "na1", node.TargetStatus{Region: "eu", Retries: 1}, 1, 0, 0},
		{"no baseline", "eu2", node.TargetStatus{Region: "as", Retries: 3}, 3, 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, f, fb := b.since(tc.node, tc.status)
			if r != tc.retries || f != tc.failovers || fb != tc.fallback {
				t.Fatalf("since(%s, %+v) = %d %d %d, want %d %d %d", tc.node, tc.status, r, f, fb, tc.retries, tc.failovers, tc.fallback)
			}
		})
	}
}
