package main

import (
	"io"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseArgsCases(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		check   func(benchConfig) string // "" when cfg is right
		wantErr string
	}{
		{name: "defaults", check: func(c benchConfig) string {
			if c.scale != 10 || c.txns != 100000 || c.runs != 3 || c.lagRate != 300 || c.lagSeconds != 60 || c.largeMB != 1024 || c.activeSeconds != 60 || c.activeWarmup != 2 {
				return "not the full-size defaults"
			}
			if !reflect.DeepEqual(c.scenarios, map[string]bool{"backlog": true, "lag": true, "large": true, "active": true}) ||
				!reflect.DeepEqual(c.contenders, map[string]bool{"recv": true, "native": true, "prism": true}) ||
				!reflect.DeepEqual(c.activeRates, []int{50, 200}) || c.nodeEnv != nil {
				return "not the default lists"
			}
			return ""
		}},
		{name: "quick keeps explicit flags", args: []string{"-quick", "-txns", "777", "-lag-seconds=3"}, check: func(c benchConfig) string {
			if c.scale != 1 || c.txns != 777 || c.runs != 1 || c.lagRate != 100 || c.lagSeconds != 3 || c.largeMB != 32 || c.activeSeconds != 10 {
				return "quick defaults not applied around the explicit flags"
			}
			return ""
		}},
		{name: "lists", args: []string{"-scenarios", " lag,,active ", "-contenders", "pglogical, native", "-active-rates", "5, 7"}, check: func(c benchConfig) string {
			if !reflect.DeepEqual(c.scenarios, map[string]bool{"lag": true, "active": true}) ||
				!reflect.DeepEqual(c.contenders, map[string]bool{"pglogical": true, "native": true}) ||
				!reflect.DeepEqual(c.activeRates, []int{5, 7}) {
				return "lists parsed wrong"
			}
			return ""
		}},
		{name: "pprof", args: []string{"-pprof", "127.0.0.1:6060"}, check: func(c benchConfig) string {
			if c.nodeEnv == nil || c.nodeEnv("as1")[0] != "PRISM_PPROF=127.0.0.1:6062" || c.nodeEnv("na1")[0] != "PRISM_PPROF=127.0.0.1:6060" {
				return "pprof ports not na1 +0, as1 +2"
			}
			return ""
		}},
		{name: "pairs", args: []string{"-active-pairs"}, check: func(c benchConfig) string {
			if !c.activePairs {
				return "active-pairs not set"
			}
			return ""
		}},
		{name: "pg-bin", args: []string{"-pg-bin", "/opt/pg16/bin", "-contenders", "native,prism"}, check: func(c benchConfig) string {
			if c.serverBin != "/opt/pg16/bin" {
				return "pg-bin not kept"
			}
			return ""
		}},
		{name: "pg-bin with pglogical", args: []string{"-pg-bin", "/opt/pg16/bin", "-contenders", "pglogical,prism"}, wantErr: "pglogical runs on the machine's PostgreSQL 15 only"},
		{name: "unknown scenario", args: []string{"-scenarios", "backlog,lagg"}, wantErr: `unknown scenario "lagg"`},
		{name: "unknown contender", args: []string{"-contenders", "slony"}, wantErr: `unknown contender "slony"`},
		{name: "bad rate", args: []string{"-active-rates", "50,0"}, wantErr: `active-rates: "0" is not a positive number`},
		{name: "bad keys", args: []string{"-active-keys", "0"}, wantErr: "active-keys between 1 and 400000"},
		{name: "bad warm-up", args: []string{"-active-warmup", "-1"}, wantErr: "active-warmup not negative"},
		{name: "no warm-up", args: []string{"-active-warmup", "0"}, check: func(c benchConfig) string {
			if c.activeWarmup != 0 {
				return "active-warmup 0 not kept"
			}
			return ""
		}},
		{name: "bad scale", args: []string{"-scale", "0"}, wantErr: "must be positive"},
		{name: "bad pprof", args: []string{"-pprof", "6060"}, wantErr: "want host:port"},
		{name: "argument", args: []string{"lag"}, wantErr: `unexpected argument "lag"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := parseArgs(tc.args, io.Discard)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseArgs(%q) = %v, want an error with %q", tc.args, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseArgs(%q) = %v", tc.args, err)
			}
			if msg := tc.check(cfg); msg != "" {
				t.Fatalf("parseArgs(%q) = %+v: %s", tc.args, cfg, msg)
			}
		})
	}
}

func TestWriteSection(t *testing.T) {
	var b strings.Builder
	writeSection(&b, []lagResult(nil), "Steady-state lag", writeLagTable)
	if b.Len() != 0 {
		t.Fatalf("writeSection(no results) wrote %q, want nothing", b.String())
	}
	writeSection(&b, []lagResult{{contender: pglogical, rows: 6000, p50: 1800 * time.Microsecond, p99: 10 * time.Millisecond, pmax: 25 * time.Millisecond}}, "Steady-state lag", writeLagTable)
	want := "### Steady-state lag\n\n| contender | samples | p50 lag | p99 lag | max lag | peak RSS |\n|---|---:|---:|---:|---:|---|\n" +
		"| pglogical (2 regions) | 6000 | 1.8 ms | 10.0 ms | 25.0 ms | - |\n\n"
	if b.String() != want {
		t.Fatalf("writeSection = %q, want %q", b.String(), want)
	}
}

// TestActiveScriptPairs: with pairs, the active transaction updates a
// second hot row of the phase's range after the first operation, before
// it ends; without, it writes one hot row.
func TestActiveScriptPairs(t *testing.T) {
	one := activeScript("prism", 1000, 10, false)
	two := activeScript("prism", 1000, 10, true)
	if strings.Contains(one, ":k2") {
		t.Errorf("script without pairs writes a second row:\n%s", one)
	}
	want := "\\endif\n\\set k2 1000 + random(1, 10)\nUPDATE aa_prism_hot SET v = :v, rid = :rid WHERE id = :k2;\nEND;\n"
	if !strings.HasSuffix(two, want) {
		t.Errorf("script with pairs ends\n%s\nwant it to end\n%s", two[strings.LastIndex(two, "\\endif"):], want)
	}
	if strings.Replace(two, "\\set k2 1000 + random(1, 10)\nUPDATE aa_prism_hot SET v = :v, rid = :rid WHERE id = :k2;\n", "", 1) != one {
		t.Errorf("the pairs script differs from the single-row one by more than the second update")
	}
}
