package main

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"time"
)

// summary is one contender's backlog result over all runs.
type summary struct {
	contender string
	confirmed time.Duration // median
	applied   time.Duration // median; 0 when not applicable
	clientCPU float64       // median CPU s per million changes
	serverCPU float64       // median CPU s per million changes
	peakKB    map[string]int64
}

// summarize groups drains by contender (in first-seen order) and takes
// medians; changes is the number of row changes each drain carried.
func summarize(runs [][]drain, changes int) []summary {
	var names []string
	by := map[string][]drain{}
	for _, run := range runs {
		for _, d := range run {
			if _, ok := by[d.contender]; !ok {
				names = append(names, d.contender)
			}
			by[d.contender] = append(by[d.contender], d)
		}
	}
	sort.SliceStable(names, func(i, j int) bool { return rank(names[i]) < rank(names[j]) })
	perM := 1e6 / float64(max(changes, 1))
	var out []summary
	for _, n := range names {
		ds := by[n]
		s := summary{contender: n, peakKB: map[string]int64{}}
		var conf, app []time.Duration
		var ccpu, scpu []float64
		for _, d := range ds {
			conf = append(conf, d.confirmed)
			app = append(app, d.applied)
			ccpu = append(ccpu, d.clientCPU*perM)
			scpu = append(scpu, d.serverCPU*perM)
			for p, kb := range d.peakKB {
				s.peakKB[p] = max(s.peakKB[p], kb)
			}
		}
		s.confirmed, s.applied = medianDur(conf), medianDur(app)
		s.clientCPU, s.serverCPU = medianF(ccpu), medianF(scpu)
		out = append(out, s)
	}
	return out
}

func rank(c string) int {
	switch c {
	case recvText:
		return 0
	case recvBinary:
		return 1
	case native:
		return 2
	case prism:
		return 3
	case pglogical:
		return 4
	}
	return 5
}

func medianDur(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func medianF(fs []float64) float64 {
	if len(fs) == 0 {
		return 0
	}
	s := append([]float64(nil), fs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func ratio(a, b time.Duration) string {
	if a <= 0 || b <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", a.Seconds()/b.Seconds())
}

func secs(d time.Duration) string {
	if d <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", d.Seconds())
}

// rssList formats peak RSS per process, largest first by name order.
func rssList(m map[string]int64) string {
	if len(m) == 0 {
		return "-"
	}
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	parts := make([]string, len(names))
	for i, n := range names {
		parts[i] = fmt.Sprintf("%s %d MB", n, (m[n]+512)>>10)
	}
	return strings.Join(parts, ", ")
}

// writeBacklogTable writes the backlog results as a Markdown table.
func writeBacklogTable(w io.Writer, ss []summary) {
	var nat, bin time.Duration
	for _, s := range ss {
		switch s.contender {
		case native:
			nat = s.confirmed
		case recvBinary:
			bin = s.confirmed
		}
	}
	fmt.Fprintln(w, "| contender | median s (slot confirmed) | median s (last row applied) | vs native | vs pg_recvlogical binary | client CPU s / M changes | Postgres CPU s / M changes | peak RSS |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---|")
	for _, s := range ss {
		client := fmt.Sprintf("%.1f", s.clientCPU)
		if s.contender == native || s.contender == pglogical {
			client = "-" // no client process: it runs in the servers
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %.1f | %s |\n", s.contender, secs(s.confirmed), secs(s.applied),
			ratio(s.confirmed, nat), ratio(s.confirmed, bin), client, s.serverCPU, rssList(s.peakKB))
	}
}

// writeLagTable writes the steady-state lag results as a Markdown table.
func writeLagTable(w io.Writer, ls []lagResult) {
	fmt.Fprintln(w, "| contender | samples | p50 lag | p99 lag | max lag | peak RSS |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---|")
	for _, l := range ls {
		fmt.Fprintf(w, "| %s | %d | %s | %s | %s | %s |\n", l.contender, l.rows, ms(l.p50), ms(l.p99), ms(l.pmax), rssList(l.peakKB))
	}
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }

// writeLargeTable writes the large-transaction results.
func writeLargeTable(w io.Writer, r largeResult) {
	fmt.Fprintf(w, "One transaction of %d rows, %d MB of WAL.\n\n", r.rows, r.walBytes>>20)
	fmt.Fprintln(w, "| contender | s (slot confirmed) | s (applied) | peak RSS | result |")
	fmt.Fprintln(w, "|---|---:|---:|---|---|")
	row := func(d drain, err error, ok bool) {
		res := "replicated"
		switch {
		case err != nil:
			res = "failed: " + oneLine(err.Error())
		case !ok:
			res = "regions differ"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s |\n", d.contender, secs(d.confirmed), secs(d.applied), rssList(d.peakKB), res)
	}
	row(r.native, r.nativeErr, true)
	row(r.prism, r.prismErr, r.replicated)
}

func oneLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	if len(s) > 160 {
		s = s[:160] + "..."
	}
	return strings.ReplaceAll(s, "|", "/")
}

// writeActiveTable writes the active-active results as a Markdown table.
func writeActiveTable(w io.Writer, rs []activeResult) {
	fmt.Fprintln(w, "| contender | tps per region | transactions | quiesce s | hot rows | rows differing | p50 lag | p99 lag | max lag | peak RSS |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
	for _, r := range rs {
		q := secs(r.quiesce)
		if r.quiesce <= 0 {
			q = "did not quiesce"
		}
		fmt.Fprintf(w, "| %s | %d | %d | %s | %d | %d | %s | %s | %s | %s |\n", r.contender, r.rate, r.txns, q, r.rows, r.differ,
			ms(r.p50), ms(r.p99), ms(r.pmax), rssList(r.peakKB))
	}
}
