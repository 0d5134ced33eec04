package main

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestSummarize(t *testing.T) {
	d := func(c string, conf int, cpu float64, kb int64) drain {
		return drain{contender: c, confirmed: time.Duration(conf) * time.Second, applied: time.Duration(conf) * time.Second,
			clientCPU: cpu, serverCPU: 2 * cpu, peakKB: map[string]int64{"p": kb}}
	}
	runs := [][]drain{
		{d(prism, 10, 4, 100<<10), d(native, 20, 0, 0), d(recvBinary, 8, 1, 10<<10)},
		{d(recvBinary, 6, 1, 12<<10), d(native, 30, 0, 0), d(prism, 12, 6, 120<<10)},
		{d(prism, 11, 5, 90<<10), d(native, 25, 0, 0), d(recvBinary, 7, 1, 11<<10)},
	}
	ss := summarize(runs, 500000)
	if len(ss) != 3 || ss[0].contender != recvBinary || ss[1].contender != native || ss[2].contender != prism {
		t.Fatalf("summarize order = %+v", ss)
	}
	p := ss[2]
	if p.confirmed != 11*time.Second || p.clientCPU != 10 || p.serverCPU != 20 || p.peakKB["p"] != 120<<10 {
		t.Fatalf("summarize(prism) = %+v, want median 11s, 10 CPU s/M, 20 server CPU s/M, peak 120 MB", p)
	}
	var b bytes.Buffer
	writeBacklogTable(&b, ss)
	out := b.String()
	for _, want := range []string{
		"| " + prism + " | 11.00 | 11.00 | 0.44x | 1.57x | 10.0 | 20.0 | p 120 MB |",
		"| " + native + " | 25.00 | 25.00 | 1.00x | 3.57x | - | 0.0 | p 0 MB |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("writeBacklogTable = \n%s\nwant a line %q", out, want)
		}
	}
}

func TestPercentile(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	for _, tc := range []struct {
		p    float64
		want time.Duration
	}{{0.5, 50 * time.Millisecond}, {0.99, 99 * time.Millisecond}, {1, 100 * time.Millisecond}, {0, time.Millisecond}} {
		if got := percentile(ds, tc.p); got != tc.want {
			t.Errorf("percentile(%v) = %v, want %v", tc.p, got, tc.want)
		}
	}
}

func TestParseStat(t *testing.T) {
	// A command name with spaces and parentheses must not shift fields.
	line := "4242 (prism (x) y) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 12 0 100 1000 10"
	got, err := parseStat([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if got.ppid != 17 || got.self != 3 || got.children != 0.1 {
		t.Fatalf("parseStat = %+v, want ppid 17, self 3s, children 0.1s", got)
	}
}

func TestParseArgs(t *testing.T) {
	cfg, err := parseArgs([]string{"-quick", "-runs", "2", "-scenarios", "backlog,large"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.scale != 1 || cfg.txns != 5000 || cfg.runs != 2 || !cfg.scenarios["large"] || cfg.scenarios["lag"] {
		t.Fatalf("parseArgs(-quick -runs 2) = %+v", cfg)
	}
	if _, err := parseArgs([]string{"-scenarios", "nope"}, &bytes.Buffer{}); err == nil {
		t.Fatal("parseArgs accepted an unknown scenario")
	}
}

func TestActiveArgsAndTable(t *testing.T) {
	var errs bytes.Buffer
	cfg, err := parseArgs([]string{"-quick", "-contenders", "prism,pglogical", "-scenarios", "backlog,active", "-active-rates", "50, 200"}, &errs)
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.contenders["pglogical"] || !cfg.scenarios["active"] || len(cfg.activeRates) != 2 || cfg.activeRates[1] != 200 || cfg.activeSeconds != 10 {
		t.Fatalf("parseArgs = contenders %v, scenarios %v, rates %v, seconds %d", cfg.contenders, cfg.scenarios, cfg.activeRates, cfg.activeSeconds)
	}
	if _, err := parseArgs([]string{"-active-rates", "50,x"}, &errs); err == nil {
		t.Fatal("parseArgs accepted active rate x")
	}
	var b bytes.Buffer
	writeActiveTable(&b, []activeResult{
		{contender: prismMesh, rate: 50, txns: 1500, quiesce: 90 * time.Millisecond, rows: 204, differ: 0, p99: 64 * time.Millisecond},
		{contender: pglogicalMesh, rate: 200, txns: 6000, rows: 662, differ: 3},
	})
	out := b.String()
	for _, want := range []string{"| prism-cdc (3-region mesh) | 50 | 1500 | 0.09 | 204 | 0 |", "| 64.0 ms |", "| pglogical (3-region mesh) | 200 | 6000 | did not quiesce | 662 | 3 |"} {
		if !strings.Contains(out, want) {
			t.Fatalf("active table lacks %q:\n%s", want, out)
		}
	}
}

func TestCheckPglogicalNamesPackage(t *testing.T) {
	err := checkPglogical(t.TempDir() + "/15/bin")
	if err == nil || !strings.Contains(err.Error(), "apt-get install -y postgresql-15-pglogical") {
		t.Fatalf("checkPglogical(empty dir) = %v, want an error naming postgresql-15-pglogical", err)
	}
}

func TestMedianActive(t *testing.T) {
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	got := medianActive([]activeResult{
		{contender: prismMesh, rate: 200, txns: 100, rows: 10, quiesce: ms(30), p50: ms(5), p99: ms(90), pmax: ms(200), differ: 0, peakKB: map[string]int64{"na1": 20}},
		{contender: pglogicalMesh, rate: 200, txns: 98, rows: 9, quiesce: ms(80), p50: ms(1), p99: ms(15), pmax: ms(60)},
		{contender: pglogicalMesh, rate: 200, txns: 99, rows: 9, quiesce: 0, p50: ms(2), p99: ms(14), pmax: ms(70), note: "late"},
		{contender: prismMesh, rate: 200, txns: 102, rows: 12, quiesce: ms(40), p50: ms(3), p99: ms(30), pmax: ms(100), differ: 1, peakKB: map[string]int64{"na1": 25}},
		{contender: prismMesh, rate: 200, txns: 101, rows: 11, quiesce: ms(20), p50: ms(4), p99: ms(50), pmax: ms(150), differ: 0, peakKB: map[string]int64{"na1": 22}},
		{contender: pglogicalMesh, rate: 200, txns: 97, rows: 8, quiesce: ms(90), p50: ms(3), p99: ms(16), pmax: ms(50)},
	})
	if len(got) != 2 {
		t.Fatalf("medianActive = %d results, want 2: %+v", len(got), got)
	}
	p, g := got[0], got[1]
	if p.contender != prismMesh || p.txns != 101 || p.rows != 11 || p.quiesce != ms(30) || p.p50 != ms(4) || p.p99 != ms(50) || p.pmax != ms(150) || p.differ != 1 || p.peakKB["na1"] != 25 {
		t.Fatalf("prism-cdc median = %+v, want the medians, 1 row differing (the most) and na1 25 kB (the highest)", p)
	}
	if g.contender != pglogicalMesh || g.p99 != ms(15) || g.quiesce != 0 || g.note != "late" {
		t.Fatalf("pglogical median = %+v, want p99 15 ms, did not quiesce (one phase did not), note late", g)
	}
}

func TestMedianLag(t *testing.T) {
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	got := medianLag([]lagResult{
		{contender: native, rows: 100, p50: ms(1), p99: ms(4), pmax: ms(9)},
		{contender: prism, rows: 101, p50: ms(3), p99: ms(30), pmax: ms(60), peakKB: map[string]int64{"na1": 20}},
		{contender: prism, rows: 99, p50: ms(2), p99: ms(90), pmax: ms(100), peakKB: map[string]int64{"na1": 25}},
		{contender: native, rows: 98, p50: ms(2), p99: ms(20), pmax: ms(30)},
		{contender: native, rows: 99, p50: ms(3), p99: ms(5), pmax: ms(10)},
		{contender: prism, rows: 100, p50: ms(4), p99: ms(40), pmax: ms(50), peakKB: map[string]int64{"na1": 22}},
	})
	if len(got) != 2 {
		t.Fatalf("medianLag = %d results, want 2: %+v", len(got), got)
	}
	n, p := got[0], got[1]
	if n.contender != native || n.rows != 99 || n.p50 != ms(2) || n.p99 != ms(5) || n.pmax != ms(10) || n.peakKB != nil {
		t.Fatalf("native median = %+v, want 99 rows, p50 2 ms, p99 5 ms, max 10 ms, no RSS", n)
	}
	if p.contender != prism || p.rows != 100 || p.p50 != ms(3) || p.p99 != ms(40) || p.pmax != ms(60) || p.peakKB["na1"] != 25 {
		t.Fatalf("prism-cdc median = %+v, want 100 rows, p50 3 ms, p99 40 ms, max 60 ms and na1 25 kB (the highest)", p)
	}
}
