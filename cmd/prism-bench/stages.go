package main

import (
	"bufio"
	"context"
	"fmt"
	"maps"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/node"
)

// The nodes' stage delay histograms (see the README's /metrics), in the
// order a transaction passes them.
var stageMetrics = []struct{ metric, name string }{
	{"prism_source_send_delay_seconds", "walsender sent"},
	{"prism_source_read_delay_seconds", "node read"},
	{"prism_peer_receive_delay_seconds", "peer received"},
	{"prism_apply_begin_delay_seconds", "apply began"},
	{"prism_apply_delay_seconds", "applied"},
}

// stageCounts are cumulative bucket counts by metric and upper bound,
// summed over a mesh's nodes (and, for applies, source regions).
type stageCounts map[string]map[float64]float64

var bucketLine = regexp.MustCompile(`^(prism_[a-z_]+)_bucket\{.*le="([^"]+)".*\} (\S+)$`)

// scrape calls line with every line of every node's /metrics.
func (m *mesh) scrape(ctx context.Context, line func(string)) error {
	c := http.Client{Timeout: 5 * time.Second}
	for _, p := range m.procs {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.spec.http+"/metrics", nil)
		if err != nil {
			return err
		}
		resp, err := c.Do(req)
		if err != nil {
			return fmt.Errorf("%s /metrics: %w", p.spec.name, err)
		}
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line(sc.Text())
		}
		resp.Body.Close()
		if err := sc.Err(); err != nil {
			return fmt.Errorf("%s /metrics: %w", p.spec.name, err)
		}
	}
	return nil
}

// waitReady waits until every node of m answers /readyz with 200 (its
// slot streamed, its peers reached), failing when one exits. A phase
// that starts its writes earlier measures the nodes' start-up, and its
// first scrape of /metrics can find a node not listening yet.
func (m *mesh) waitReady(ctx context.Context, timeout time.Duration) error {
	if m == nil {
		return nil
	}
	c := http.Client{Timeout: 2 * time.Second}
	return pollUntil(ctx, timeout, pollInterval, "the prism-cdc nodes to be ready", func() (bool, error) {
		if err := m.sample(); err != nil {
			return false, err
		}
		for _, p := range m.procs {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.spec.http+"/readyz", nil)
			if err != nil {
				return false, err
			}
			resp, err := c.Do(req)
			if err != nil {
				return false, nil // not listening yet
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return false, nil
			}
		}
		return true, nil
	})
}

// stageDelays reads the stage histograms of every node of m.
func (m *mesh) stageDelays(ctx context.Context) (stageCounts, error) {
	out := stageCounts{}
	if m == nil {
		return out, nil
	}
	err := m.scrape(ctx, func(line string) {
		f := bucketLine.FindStringSubmatch(line)
		if f == nil {
			return
		}
		le, err1 := strconv.ParseFloat(f[2], 64)
		v, err2 := strconv.ParseFloat(f[3], 64)
		if err1 != nil || err2 != nil {
			return
		}
		if out[f[1]] == nil {
			out[f[1]] = map[float64]float64{}
		}
		out[f[1]][le] += v
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// applyCounts are the nodes' apply counters (prism_apply_txns_total by
// path, prism_apply_batches_total by result, prism_apply_retries_total
// as "retries"), summed over a mesh's nodes and source regions.
type applyCounts map[string]float64

var applyLine = regexp.MustCompile(`^prism_apply_(txns|batches|retries)_total\{(.*)\} (\S+)$`)
var pathLabel = regexp.MustCompile(`(?:path|result)="([a-z_]+)"`)

// applyCounts reads the apply counters of every node of m.
func (m *mesh) applyCounts(ctx context.Context) (applyCounts, error) {
	out := applyCounts{}
	if m == nil {
		return out, nil
	}
	if err := m.scrape(ctx, out.add); err != nil {
		return nil, err
	}
	return out, nil
}

// add adds line's value to out if it is an apply counter.
func (out applyCounts) add(line string) {
	f := applyLine.FindStringSubmatch(line)
	if f == nil {
		return
	}
	v, err := strconv.ParseFloat(f[3], 64)
	if err != nil {
		return
	}
	key := "retries"
	if l := pathLabel.FindStringSubmatch(f[2]); l != nil {
		key = l[1]
	}
	out[key] += v
}

// applySummary describes how the regions applied what arrived between
// before and after.
func applySummary(before, after applyCounts) string {
	d := func(k string) int { return int(after[k] - before[k]) }
	return fmt.Sprintf("%d transactions in %d batches, %d by rows, %d streamed; batches rolled back %d, skipped %d; retries after serialization failures %d",
		d("batch"), d("committed"), d("row"), d("stream"), d("rolled_back"), d("skipped"), d("retries"))
}

// stageSummary describes the observations between before and after:
// each stage's count and its median and 99th percentile, interpolated
// within buckets as Prometheus's histogram_quantile does.
func stageSummary(before, after stageCounts) string {
	var parts []string
	for _, s := range stageMetrics {
		a, b := after[s.metric], before[s.metric]
		les := slices.Sorted(maps.Keys(a))
		cum := make([]float64, len(les))
		for i, le := range les {
			cum[i] = a[le] - b[le]
		}
		if len(cum) == 0 || cum[len(cum)-1] == 0 {
			parts = append(parts, s.name+": none")
			continue
		}
		parts = append(parts, fmt.Sprintf("%s: %d, p50 %s, p99 %s", s.name, int(cum[len(cum)-1]),
			fmtMS(node.BucketQuantile(0.5, les, cum)), fmtMS(node.BucketQuantile(0.99, les, cum))))
	}
	return strings.Join(parts, "; ")
}

func fmtMS(seconds float64) string {
	return fmt.Sprintf("%.1f ms", seconds*1000)
}
