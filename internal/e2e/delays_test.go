package e2e

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"testing"
	"time"
)

// metricSum adds up the samples of metric (any labels) in node name's
// /metrics; ok is false when the node does not answer or has none.
func metricSum(d *Deployment, name, metric string) (sum float64, ok bool) {
	code, body := d.Probe(name, "/metrics")
	if code != 200 {
		return 0, false
	}
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(metric) + `(?:\{[^}]*\})? (\S+)$`)
	for _, m := range re.FindAllStringSubmatch(body, -1) {
		v, err := strconv.ParseFloat(m[1], 64)
		if err != nil {
			return 0, false
		}
		sum, ok = sum+v, true
	}
	return sum, ok
}

// TestStageDelays: the nodes' /metrics show where a transaction's time
// went. For each of 20 transactions written in na, na1 observes the
// walsender's send and its own read of it, and eu1 its receipt, the
// start of its apply and its apply, labelled with the source region; the
// delays are those of a quiet machine, not zeros and not clock garbage,
// and they grow along the path.
func TestStageDelays(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	d := New(t, Topology{"na": {"na1"}, "eu": {"eu1"}}, `CREATE TABLE kv (id int PRIMARY KEY, v text);`)
	d.StartAll()
	waitReaders(d)
	const txns = 20
	for i := 1; i <= txns; i++ {
		if err := d.Clusters["na"].Exec(ctx, "app", fmt.Sprintf("INSERT INTO kv VALUES (%d, 'na')", i)); err != nil {
			t.Fatal(err)
		}
	}
	d.Eventually(60*time.Second, "the 20 rows in eu", func() bool {
		return count(t, d, "eu", "SELECT count(*)::int FROM kv") == txns
	})
	for _, c := range []struct{ node, metric, labels string }{
		{"na1", "prism_source_send_delay_seconds", ""},
		{"na1", "prism_source_read_delay_seconds", ""},
		{"eu1", "prism_peer_receive_delay_seconds", `source="na"`},
		{"eu1", "prism_apply_begin_delay_seconds", `source="na"`},
		{"eu1", "prism_apply_delay_seconds", `source="na"`},
	} {
		var n, sum float64
		for deadline := time.Now().Add(10 * time.Second); n < txns && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			n, _ = metricSum(d, c.node, c.metric+"_count")
			sum, _ = metricSum(d, c.node, c.metric+"_sum")
		}
		if n < txns {
			t.Errorf("%s observed %v transactions in %s, want %d (resent ones may add)", c.node, n, c.metric, txns)
		}
		if mean := sum / n; mean <= 0 || mean > 10 {
			t.Errorf("%s: mean %s is %.6f s, want a positive delay under 10 s", c.node, c.metric, mean)
		}
		if c.labels != "" {
			_, body := d.Probe(c.node, "/metrics")
			if !regexp.MustCompile(regexp.QuoteMeta(c.metric) + `_count\{[^}]*` + regexp.QuoteMeta(c.labels)).MatchString(body) {
				t.Errorf("%s's %s has no series with %s", c.node, c.metric, c.labels)
			}
		}
	}
	// Each transaction is received before its apply begins, and applied
	// after: the sums of its delays grow along the path.
	var last float64
	for _, m := range []string{"prism_peer_receive_delay_seconds_sum", "prism_apply_begin_delay_seconds_sum", "prism_apply_delay_seconds_sum"} {
		sum, _ := metricSum(d, "eu1", m)
		if sum < last {
			t.Errorf("eu1's %s is %.6f s, below the stage before it (%.6f s)", m, sum, last)
		}
		last = sum
	}
	// eu had no local transaction to send.
	if n, _ := metricSum(d, "eu1", "prism_source_send_delay_seconds_count"); n != 0 {
		t.Errorf("eu1 observed %v local transactions, want 0", n)
	}
}
