package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// benchConfig holds the command-line settings.
type benchConfig struct {
	scale      int
	txns       int
	clients    int
	runs       int
	scenarios  map[string]bool
	lagRate    int
	lagSeconds int
	largeMB    int
	largeCapMB int
	pprof      string          // host:port base for na1, eu1, as1 (ports +0, +1, +2); "" for none
	pgss       bool            // load pg_stat_statements and report prism-cdc's top statements after each drain
	lagDump    string          // directory: each lag phase's samples as CSV
	contenders map[string]bool // contenders to run: recv, native, prism, pglogical
	// The active-active scenario: transactions per second in each region
	// (one phase per rate), seconds of writes per phase, hot keys.
	activeRates   []int
	activeSeconds int
	activeWarmup  int // seconds of writes before each active phase's clock starts
	activeRuns    int
	lagRuns       int
	activeKeys    int
	activePairs   bool // each active transaction also updates a second hot row
	keep          bool
	nodeEnv       func(name string) []string
	// serverBin is the directory of the server binaries every cluster
	// runs (-pg-bin); empty: pgtest.BinDir's.
	serverBin string
	// outputPlugin is the prism-cdc slots' plugin: auto, pgoutput or
	// prism_pgoutput (-output-plugin).
	outputPlugin string
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// flagValues are the flags that parseArgs turns into benchConfig fields
// after parsing.
type flagValues struct {
	contenders, scenarios, activeRates string
	quick                              bool
}

// quickDefaults are the values -quick gives the flags not set explicitly.
var quickDefaults = map[string]string{"scale": "1", "txns": "5000", "runs": "1", "lag-rate": "100", "lag-seconds": "10", "large-mb": "32", "active-seconds": "10"}

func parseArgs(args []string, stderr io.Writer) (benchConfig, error) {
	var cfg benchConfig
	fs, fv := newFlagSet(&cfg, stderr)
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if fv.quick {
		applyQuick(fs)
	}
	var err error
	if cfg.scenarios, err = parseSet("scenario", fv.scenarios, "backlog", "lag", "large", "active"); err != nil {
		return cfg, err
	}
	if cfg.contenders, err = parseSet("contender", fv.contenders, "recv", "native", "prism", "pglogical"); err != nil {
		return cfg, err
	}
	if cfg.activeRates, err = parseRates(fv.activeRates); err != nil {
		return cfg, err
	}
	if err := cfg.check(); err != nil {
		return cfg, err
	}
	if !decode.ValidPlugin(cfg.outputPlugin) {
		return cfg, fmt.Errorf("output-plugin: %q is not auto, pgoutput or prism_pgoutput", cfg.outputPlugin)
	}
	if cfg.serverBin != "" && cfg.contenders["pglogical"] {
		return cfg, errors.New("pg-bin: pglogical runs on the machine's PostgreSQL 15 only (its Debian package); leave it out of -contenders")
	}
	if cfg.pprof != "" {
		cfg.nodeEnv, err = pprofEnv(cfg.pprof)
	}
	return cfg, err
}

// newFlagSet defines prism-bench's flags: most set cfg's fields, the
// others fv's.
func newFlagSet(cfg *benchConfig, stderr io.Writer) (*flag.FlagSet, *flagValues) {
	fv := &flagValues{}
	fs := flag.NewFlagSet("prism-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&cfg.scale, "scale", 10, "pgbench scale factor (100,000 accounts each)")
	fs.IntVar(&cfg.txns, "txns", 100000, "pgbench transactions in each backlog run")
	fs.IntVar(&cfg.clients, "clients", 4, "pgbench clients")
	fs.IntVar(&cfg.runs, "runs", 3, "backlog runs (contender order alternates)")
	fs.StringVar(&fv.contenders, "contenders", "recv,native,prism", "comma-separated contenders: recv (both pg_recvlogical modes), native, prism, pglogical (needs the Debian package postgresql-15-pglogical)")
	fs.StringVar(&fv.scenarios, "scenarios", "backlog,lag,large,active", "comma-separated scenarios: backlog, lag, large, active (prism-cdc and pglogical meshes, every region writing the same rows)")
	fs.StringVar(&fv.activeRates, "active-rates", "50,200", "active scenario: comma-separated transactions per second in each region, one phase each")
	fs.IntVar(&cfg.activeSeconds, "active-seconds", 60, "active scenario: seconds of writes in each phase")
	fs.IntVar(&cfg.activeWarmup, "active-warmup", 2, "active scenario: seconds of the same writes before each phase's clock starts, not measured (0: none), so that every contender is measured warm")
	fs.IntVar(&cfg.activeRuns, "active-runs", 1, "active scenario: phases per contender and rate, contender order alternating; the table shows their medians")
	fs.IntVar(&cfg.activeKeys, "active-keys", 100, "active scenario: hot rows every region writes")
	fs.BoolVar(&cfg.activePairs, "active-pairs", false, "active scenario: every transaction also updates a second hot row, so two rows in random order (transactions of different regions can deadlock where they meet)")
	fs.IntVar(&cfg.lagRuns, "lag-runs", 1, "lag scenario: phases per contender, contender order alternating; the table shows their medians")
	fs.IntVar(&cfg.lagRate, "lag-rate", 300, "pgbench transactions per second in the lag scenario")
	fs.IntVar(&cfg.lagSeconds, "lag-seconds", 60, "duration of each contender's lag phase")
	fs.IntVar(&cfg.largeMB, "large-mb", 1024, "row data in the large transaction, in MB")
	fs.IntVar(&cfg.largeCapMB, "large-cap-mb", 4096, "kill a prism-cdc node whose RSS passes this in the large scenario")
	fs.StringVar(&cfg.pprof, "pprof", "", "host:port: start na1, eu1, as1 with PRISM_PPROF on this port and the next two")
	fs.StringVar(&cfg.lagDump, "lag-dump", "", "directory: write each lag and active phase's samples to <contender>-<time>.csv there (region, id, source commit, lag in ms), to see when the slow ones came")
	fs.BoolVar(&cfg.pgss, "pgss", false, "load pg_stat_statements in every cluster and log the source's and prism regions' top statements after each prism-cdc drain, lag and active phase (adds overhead)")
	fs.StringVar(&cfg.serverBin, "pg-bin", "", "directory of the PostgreSQL server binaries (initdb, pg_ctl, postgres) every cluster runs, e.g. "+pgtest.PG16BinDefault+" after make pg16 (default: the machine's newest); pgbench and pg_recvlogical stay the machine's")
	fs.StringVar(&cfg.outputPlugin, "output-plugin", decode.PluginAuto, "prism-cdc's slots' output plugin: auto (prism_pgoutput where make plugin built it for the servers' major version and they are older than 16, else pgoutput), pgoutput, or prism_pgoutput")
	fs.BoolVar(&cfg.keep, "keep", false, "keep the work directory (node logs and configs)")
	fs.BoolVar(&fv.quick, "quick", false, "small run: scale 1, 5000 transactions, 1 run, 10s lag, 32 MB large transaction, 10s active phases")
	return fs, fv
}

// applyQuick sets quickDefaults on the flags of fs not set on the
// command line.
func applyQuick(fs *flag.FlagSet) {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for name, v := range quickDefaults {
		if !set[name] {
			fs.Set(name, v)
		}
	}
}

// parseSet parses a comma-separated list of names out of known; kind
// names a list element in the error.
func parseSet(kind, list string, known ...string) (map[string]bool, error) {
	set := map[string]bool{}
	for _, s := range strings.Split(list, ",") {
		s = strings.TrimSpace(s)
		switch {
		case s == "":
		case slices.Contains(known, s):
			set[s] = true
		default:
			return nil, fmt.Errorf("unknown %s %q", kind, s)
		}
	}
	return set, nil
}

// parseRates parses -active-rates: comma-separated positive numbers.
func parseRates(list string) ([]int, error) {
	var rates []int
	for _, r := range strings.Split(list, ",") {
		var n int
		if _, err := fmt.Sscanf(strings.TrimSpace(r), "%d", &n); err != nil || n < 1 {
			return nil, fmt.Errorf("active-rates: %q is not a positive number", r)
		}
		rates = append(rates, n)
	}
	return rates, nil
}

// check reports numeric settings out of range.
func (cfg benchConfig) check() error {
	if cfg.activeSeconds < 1 || cfg.activeWarmup < 0 || cfg.activeRuns < 1 || cfg.activeKeys < 1 || cfg.activeKeys > 400000 {
		return errors.New("active-seconds and active-runs must be positive, active-warmup not negative and active-keys between 1 and 400000")
	}
	if cfg.scale < 1 || cfg.txns < 1 || cfg.clients < 1 || cfg.runs < 1 || cfg.lagRate < 1 || cfg.lagSeconds < 1 || cfg.lagRuns < 1 || cfg.largeMB < 1 {
		return errors.New("scale, txns, clients, runs, lag-rate, lag-seconds and large-mb must be positive")
	}
	return nil
}

// pprofEnv returns the nodes' environment for -pprof addr: na1, eu1 and
// as1 serve pprof on addr's port and the next two.
func pprofEnv(addr string) (func(name string) []string, error) {
	host, port, err := splitHostPort(addr)
	if err != nil {
		return nil, err
	}
	return func(name string) []string {
		off := map[string]int{"na1": 0, "eu1": 1, "as1": 2}[name]
		return []string{fmt.Sprintf("PRISM_PPROF=%s:%d", host, port+off)}
	}, nil
}

func splitHostPort(s string) (string, int, error) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return "", 0, fmt.Errorf("pprof address %q: want host:port", s)
	}
	var port int
	if _, err := fmt.Sscanf(s[i+1:], "%d", &port); err != nil || port <= 0 || port > 65533 {
		return "", 0, fmt.Errorf("pprof address %q: bad port", s)
	}
	return s[:i], port, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cfg, err := parseArgs(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "prism-bench: %v\n", err)
		return 2
	}
	dir, err := os.MkdirTemp("", "prism-bench-")
	if err != nil {
		fmt.Fprintf(stderr, "prism-bench: %v\n", err)
		return 1
	}
	defer removeWorkDir(dir, cfg.keep, stderr)
	e := newEnv(cfg, dir, stderr)
	defer e.Close()
	if err := e.setup(ctx); err != nil {
		fmt.Fprintf(stderr, "prism-bench: setup: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "## prism-bench results\n\n%s\n\n", machine(cfg, len(e.all()), e.serverVersion(ctx)))
	ok := e.runScenarios(ctx, stdout, stderr)
	e.logf("done")
	if !ok {
		return 1
	}
	return 0
}

// newEnv returns the environment of a run in work directory dir; its
// progress lines go to stderr, stamped with the seconds since now.
func newEnv(cfg benchConfig, dir string, stderr io.Writer) *env {
	start := time.Now()
	return &env{cfg: cfg, dir: dir, logf: func(format string, args ...any) {
		fmt.Fprintf(stderr, "%7.1fs  %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}}
}

// removeWorkDir removes the work directory, or with -keep says where it is.
func removeWorkDir(dir string, keep bool, stderr io.Writer) {
	if keep {
		fmt.Fprintf(stderr, "work directory kept: %s\n", dir)
		return
	}
	os.RemoveAll(dir)
}

// errShown is a scenario's failure that its table already shows.
var errShown = errors.New("failure shown in the table")

// runScenarios runs the chosen scenarios in order, each writing its
// table to stdout, and stops at the first that fails (each leaves the
// regions equal for the next only when it succeeds). It reports whether
// all succeeded.
func (e *env) runScenarios(ctx context.Context, stdout, stderr io.Writer) bool {
	for _, s := range []struct {
		name string
		run  func(context.Context, io.Writer) error
	}{
		{"backlog", e.reportBacklog},
		{"lag", e.reportLag},
		{"large", e.reportLarge},
		{"active", e.reportActive},
	} {
		if !e.cfg.scenarios[s.name] {
			continue
		}
		if err := s.run(ctx, stdout); err != nil {
			if !errors.Is(err, errShown) {
				fmt.Fprintf(stderr, "prism-bench: %s: %v\n", s.name, err)
			}
			return false
		}
	}
	return true
}

// reportBacklog runs the backlog scenario and writes its table.
func (e *env) reportBacklog(ctx context.Context, w io.Writer) error {
	runs, err := e.backlog(ctx)
	writeSection(w, runs, fmt.Sprintf("Backlog catch-up: %d pgbench transactions (%d row changes), %d runs, median", e.cfg.txns, 4*e.cfg.txns, len(runs)),
		func(w io.Writer, runs [][]drain) { writeBacklogTable(w, summarize(runs, 4*e.cfg.txns)) })
	return err
}

// reportLag runs the lag scenario and writes its table.
func (e *env) reportLag(ctx context.Context, w io.Writer) error {
	ls, err := e.lag(ctx)
	heading := fmt.Sprintf("Steady-state lag: pgbench at %d tps for %d s, source commit to region apply (both regions)", e.cfg.lagRate, e.cfg.lagSeconds)
	if e.cfg.lagRuns > 1 {
		heading += fmt.Sprintf("; median of %d phases", e.cfg.lagRuns)
	}
	writeSection(w, medianLag(ls), heading, writeLagTable)
	return err
}

// reportLarge runs the large-transaction scenario and writes its table;
// a contender's failure is in the table, and fails the scenario when it
// is prism-cdc's.
func (e *env) reportLarge(ctx context.Context, w io.Writer) error {
	r, err := e.large(ctx)
	if err != nil {
		return err
	}
	writeSection(w, []largeResult{r}, "Large transaction", func(w io.Writer, rs []largeResult) { writeLargeTable(w, rs[0]) })
	if !r.replicated {
		return errShown
	}
	return nil
}

// reportActive runs the active-active scenario and writes its table.
func (e *env) reportActive(ctx context.Context, w io.Writer) error {
	rs, err := e.active(ctx)
	heading := fmt.Sprintf("Active-active: every region writes the same %d hot rows for %d s per phase (after %d s of warm-up), then quiesces", e.cfg.activeKeys, e.cfg.activeSeconds, e.cfg.activeWarmup)
	if e.cfg.activePairs {
		heading += " (two hot rows per transaction, in random order)"
	}
	if e.cfg.activeRuns > 1 {
		heading += fmt.Sprintf("; median of %d phases (rows differing: the most in any phase)", e.cfg.activeRuns)
	}
	writeSection(w, medianActive(rs), heading, writeActiveTable)
	return err
}

// writeSection writes a scenario's heading and table, unless it has no
// results.
func writeSection[T any](w io.Writer, rs []T, heading string, table func(io.Writer, []T)) {
	if len(rs) == 0 {
		return
	}
	fmt.Fprintf(w, "### %s\n\n", heading)
	table(w, rs)
	fmt.Fprintln(w)
}

// machine describes the machine the benchmark ran on.
func machine(cfg benchConfig, clusters int, version string) string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "model name") {
				_, v, _ := strings.Cut(line, ":")
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		if f := strings.Fields(line); len(f) >= 2 {
			var kb int64
			fmt.Sscanf(f[1], "%d", &kb)
			mem = fmt.Sprintf(", %d GB RAM", (kb+(1<<19))>>20)
		}
	}
	return fmt.Sprintf("Machine: %s, %d CPUs%s, %s/%s, %s. Clusters: PostgreSQL %s with fsync on, shared_buffers 128MB, %d clusters on one disk. pgbench scale %d, %d clients.",
		cpu, runtime.NumCPU(), mem, runtime.GOOS, runtime.GOARCH, runtime.Version(), version, clusters, cfg.scale, cfg.clients)
}
