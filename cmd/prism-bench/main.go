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
	"strings"
	"syscall"
	"time"
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
	contenders map[string]bool // contenders to run: recv, native, prism, pglogical
	// The active-active scenario: transactions per second in each region
	// (one phase per rate), seconds of writes per phase, hot keys.
	activeRates   []int
	activeSeconds int
	activeKeys    int
	keep          bool
	nodeEnv       func(name string) []string
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func parseArgs(args []string, stderr io.Writer) (benchConfig, error) {
	var cfg benchConfig
	fs := flag.NewFlagSet("prism-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&cfg.scale, "scale", 10, "pgbench scale factor (100,000 accounts each)")
	fs.IntVar(&cfg.txns, "txns", 100000, "pgbench transactions in each backlog run")
	fs.IntVar(&cfg.clients, "clients", 4, "pgbench clients")
	fs.IntVar(&cfg.runs, "runs", 3, "backlog runs (contender order alternates)")
	conts := fs.String("contenders", "recv,native,prism", "comma-separated contenders: recv (both pg_recvlogical modes), native, prism, pglogical (needs the Debian package postgresql-15-pglogical)")
	scen := fs.String("scenarios", "backlog,lag,large,active", "comma-separated scenarios: backlog, lag, large, active (prism-cdc and pglogical meshes, every region writing the same rows)")
	rates := fs.String("active-rates", "50,200", "active scenario: comma-separated transactions per second in each region, one phase each")
	fs.IntVar(&cfg.activeSeconds, "active-seconds", 60, "active scenario: seconds of writes in each phase")
	fs.IntVar(&cfg.activeKeys, "active-keys", 100, "active scenario: hot rows every region writes")
	fs.IntVar(&cfg.lagRate, "lag-rate", 300, "pgbench transactions per second in the lag scenario")
	fs.IntVar(&cfg.lagSeconds, "lag-seconds", 60, "duration of each contender's lag phase")
	fs.IntVar(&cfg.largeMB, "large-mb", 1024, "row data in the large transaction, in MB")
	fs.IntVar(&cfg.largeCapMB, "large-cap-mb", 4096, "kill a prism-cdc node whose RSS passes this in the large scenario")
	fs.StringVar(&cfg.pprof, "pprof", "", "host:port: start na1, eu1, as1 with PRISM_PPROF on this port and the next two")
	fs.BoolVar(&cfg.pgss, "pgss", false, "load pg_stat_statements in every cluster and log the source's and prism regions' top statements after each prism-cdc drain (adds overhead)")
	fs.BoolVar(&cfg.keep, "keep", false, "keep the work directory (node logs and configs)")
	quick := fs.Bool("quick", false, "small run: scale 1, 5000 transactions, 1 run, 10s lag, 32 MB large transaction, 10s active phases")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if *quick {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		for name, v := range map[string]string{"scale": "1", "txns": "5000", "runs": "1", "lag-rate": "100", "lag-seconds": "10", "large-mb": "32", "active-seconds": "10"} {
			if !set[name] {
				fs.Set(name, v)
			}
		}
	}
	cfg.scenarios = map[string]bool{}
	for _, s := range strings.Split(*scen, ",") {
		s = strings.TrimSpace(s)
		switch s {
		case "backlog", "lag", "large", "active":
			cfg.scenarios[s] = true
		case "":
		default:
			return cfg, fmt.Errorf("unknown scenario %q", s)
		}
	}
	cfg.contenders = map[string]bool{}
	for _, s := range strings.Split(*conts, ",") {
		s = strings.TrimSpace(s)
		switch s {
		case "recv", "native", "prism", "pglogical":
			cfg.contenders[s] = true
		case "":
		default:
			return cfg, fmt.Errorf("unknown contender %q", s)
		}
	}
	for _, r := range strings.Split(*rates, ",") {
		var n int
		if _, err := fmt.Sscanf(strings.TrimSpace(r), "%d", &n); err != nil || n < 1 {
			return cfg, fmt.Errorf("active-rates: %q is not a positive number", r)
		}
		cfg.activeRates = append(cfg.activeRates, n)
	}
	if cfg.activeSeconds < 1 || cfg.activeKeys < 1 || cfg.activeKeys > 400000 {
		return cfg, errors.New("active-seconds must be positive and active-keys between 1 and 400000")
	}
	if cfg.scale < 1 || cfg.txns < 1 || cfg.clients < 1 || cfg.runs < 1 || cfg.lagRate < 1 || cfg.lagSeconds < 1 || cfg.largeMB < 1 {
		return cfg, errors.New("scale, txns, clients, runs, lag-rate, lag-seconds and large-mb must be positive")
	}
	if cfg.pprof != "" {
		host, port, err := splitHostPort(cfg.pprof)
		if err != nil {
			return cfg, err
		}
		cfg.nodeEnv = func(name string) []string {
			off := map[string]int{"na1": 0, "eu1": 1, "as1": 2}[name]
			return []string{fmt.Sprintf("PRISM_PPROF=%s:%d", host, port+off)}
		}
	}
	return cfg, nil
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
	start := time.Now()
	e := &env{cfg: cfg, dir: dir, logf: func(format string, args ...any) {
		fmt.Fprintf(stderr, "%7.1fs  %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}}
	defer func() {
		if cfg.keep {
			fmt.Fprintf(stderr, "work directory kept: %s\n", dir)
		} else {
			os.RemoveAll(dir)
		}
	}()
	defer e.Close()
	if err := e.setup(ctx); err != nil {
		fmt.Fprintf(stderr, "prism-bench: setup: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "## prism-bench results\n\n%s\n\n", machine(cfg, len(e.all())))
	failed := false
	if cfg.scenarios["backlog"] {
		runs, err := e.backlog(ctx)
		if len(runs) > 0 {
			fmt.Fprintf(stdout, "### Backlog catch-up: %d pgbench transactions (%d row changes), %d runs, median\n\n", cfg.txns, 4*cfg.txns, len(runs))
			writeBacklogTable(stdout, summarize(runs, 4*cfg.txns))
			fmt.Fprintln(stdout)
		}
		if err != nil {
			fmt.Fprintf(stderr, "prism-bench: backlog: %v\n", err)
			failed = true
		}
	}
	if cfg.scenarios["lag"] && !failed {
		ls, err := e.lag(ctx)
		if len(ls) > 0 {
			fmt.Fprintf(stdout, "### Steady-state lag: pgbench at %d tps for %d s, source commit to region apply (both regions)\n\n", cfg.lagRate, cfg.lagSeconds)
			writeLagTable(stdout, ls)
			fmt.Fprintln(stdout)
		}
		if err != nil {
			fmt.Fprintf(stderr, "prism-bench: lag: %v\n", err)
			failed = true
		}
	}
	if cfg.scenarios["large"] && !failed {
		r, err := e.large(ctx)
		if err != nil {
			fmt.Fprintf(stderr, "prism-bench: large: %v\n", err)
			failed = true
		} else {
			fmt.Fprintf(stdout, "### Large transaction\n\n")
			writeLargeTable(stdout, r)
			fmt.Fprintln(stdout)
			failed = failed || !r.replicated
		}
	}
	if cfg.scenarios["active"] && !failed {
		rs, err := e.active(ctx)
		if len(rs) > 0 {
			fmt.Fprintf(stdout, "### Active-active: every region writes the same %d hot rows for %d s per phase, then quiesces\n\n", cfg.activeKeys, cfg.activeSeconds)
			writeActiveTable(stdout, rs)
			fmt.Fprintln(stdout)
		}
		if err != nil {
			fmt.Fprintf(stderr, "prism-bench: active: %v\n", err)
			failed = true
		}
	}
	e.logf("done")
	if failed {
		return 1
	}
	return 0
}

// machine describes the machine the benchmark ran on.
func machine(cfg benchConfig, clusters int) string {
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
	return fmt.Sprintf("Machine: %s, %d CPUs%s, %s/%s, %s. Clusters: PostgreSQL with fsync on, shared_buffers 128MB, %d clusters on one disk. pgbench scale %d, %d clients.",
		cpu, runtime.NumCPU(), mem, runtime.GOOS, runtime.GOARCH, runtime.Version(), clusters, cfg.scale, cfg.clients)
}
