package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/node"
	"github.com/prism-cdc/prism-cdc/internal/scope"
	"github.com/prism-cdc/prism-cdc/internal/verify"
)

// runAction runs one node until ctx is cancelled. The node waits for its
// database; what waiting cannot fix ends it: exit 2 for a configuration
// problem found at start (a *config.Error), 1 for anything else. The error
// is logged once, on stderr like every log line.
func runAction(ctx context.Context, _ string, cfg *config.Config, log zerolog.Logger, _, _ io.Writer) int {
	if limit, set := memoryLimit(cfg, os.Getenv("GOMEMLIMIT")); set {
		debug.SetMemoryLimit(limit)
		log.Debug().Int64("memory_limit_bytes", limit).Msg("soft memory limit set from delivery.max_in_flight")
	}
	n, from := procs(cfg, os.Getenv("GOMAXPROCS"), runtime.GOMAXPROCS(0))
	if from != procsFromEnv {
		runtime.GOMAXPROCS(n)
	}
	log.Info().Int("procs", n).Str("from", from).Msg("Go runtime CPUs (GOMAXPROCS)")
	if err := node.New(cfg, log).Run(ctx); err != nil {
		log.Error().Err(err).Msg("node stopped with an error")
		var ce *config.Error
		if errors.As(err, &ce) {
			return exitUsage
		}
		return exitFail
	}
	return exitOK
}

// memoryHeadroom is what a node needs besides the transactions its
// delivery window holds: buffers, caches, one spill chunk per stream, the
// runtime.
const memoryHeadroom = 64 << 20

// memoryLimit returns the Go runtime's soft memory limit for a node and
// whether to set it: delivery.max_in_flight plus memoryHeadroom. Without a
// limit the collector lets the heap grow to twice what is live, so a
// source whose window is full (a backlog) could take twice its window;
// with it, the collector runs earlier as the node nears the limit (soft:
// a node that needs more still gets it). GOMEMLIMIT in the environment
// wins (the runtime has already read it), so the operator can raise or
// lower it.
func memoryLimit(cfg *config.Config, env string) (int64, bool) {
	if env != "" {
		return 0, false
	}
	return int64(cfg.Delivery.MaxInFlight) + memoryHeadroom, true
}

// Where procs came from.
const (
	procsFromConfig = "config"
	procsFromEnv    = "GOMAXPROCS"
	procsFromAuto   = "auto"
)

// procs returns how many CPUs a node's Go runtime runs goroutines on
// (GOMAXPROCS) and why: the config's procs when set; else GOMAXPROCS in
// the environment (env), which the runtime has already applied (avail);
// else a quarter of avail, the CPUs the runtime found (it honours CPU
// affinity and cgroup quotas), and at least 1. A node spends its time
// handing messages between goroutines and system calls: with more than
// one CPU, each hand-off wakes another thread that spins looking for work
// and then sleeps: the nodes on a 2-CPU machine used a third more CPU in
// a backlog with 2 than with 1 (docs/performance.md), CPU their
// PostgreSQL needed. procs raises it for a node that needs more.
func procs(cfg *config.Config, env string, avail int) (int, string) {
	switch {
	case cfg.Procs > 0:
		return cfg.Procs, procsFromConfig
	case env != "":
		return avail, procsFromEnv
	}
	return max(1, avail/4), procsFromAuto
}

// verifyCommand compares every replicated table of this region with every
// peer region's database and checks their foreign keys in every region;
// with --repair --from REGION it then makes the other regions equal to
// REGION for the differing rows and compares again. Rows that violate a
// foreign key are reported, never repaired: it exits 1 while any remain.
func verifyCommand(fs *flag.FlagSet) nodeAction {
	repair := fs.Bool("repair", false, "make the other regions equal to --from for the differing rows")
	from := fs.String("from", "", "the `REGION` whose rows are right (with --repair)")
	chunk := fs.Int("chunk-rows", 10000, "rows per hashed chunk")
	settle := fs.Duration("settle", 2*time.Second, "wait before checking differing rows again (changes in flight)")
	return func(ctx context.Context, _ string, cfg *config.Config, log zerolog.Logger, stdout, stderr io.Writer) int {
		regions, err := verifyRegions(cfg)
		if err != nil {
			fmt.Fprintf(stderr, "prism-cdc verify: %v\n", err)
			return exitUsage
		}
		if *repair != (*from != "") {
			fmt.Fprintf(stderr, "prism-cdc verify: --repair and --from REGION go together\n")
			return exitUsage
		}
		if *repair && !slices.ContainsFunc(regions, func(r verify.Region) bool { return r.Name == *from }) {
			fmt.Fprintf(stderr, "prism-cdc verify: --from %s is not a region of %s\n", *from, cfg.Path)
			return exitUsage
		}
		opts := verify.Options{Settle: *settle, ChunkRows: *chunk, Log: log}
		rep, err := verify.CompareWith(ctx, regions, cfg.Publication, opts)
		if err != nil {
			fmt.Fprintf(stderr, "prism-cdc verify: %s\n", config.RedactDSN(err.Error()))
			return exitFail
		}
		printVerify(stdout, regions, rep)
		if rep.Equal() || !*repair {
			return verifyExit(rep)
		}
		fmt.Fprintf(stdout, "\nrepairing from region %s\n", *from)
		done, err := verify.Repair(ctx, regions, *from, rep, log)
		for _, r := range done {
			fmt.Fprintf(stdout, "%s in region %s: %d rows written, %d deleted\n", r.Table, r.Region, r.Upserted, r.Deleted)
		}
		if err != nil {
			fmt.Fprintf(stderr, "prism-cdc verify: %s\n", config.RedactDSN(err.Error()))
			return exitFail
		}
		fmt.Fprintln(stdout, "\nafter the repair:")
		rep, err = verify.CompareWith(ctx, regions, cfg.Publication, opts)
		if err != nil {
			fmt.Fprintf(stderr, "prism-cdc verify: %s\n", config.RedactDSN(err.Error()))
			return exitFail
		}
		printVerify(stdout, regions, rep)
		return verifyExit(rep)
	}
}

// verifyExit is verify's exit status: 1 while regions differ, their
// schemas differ or a foreign key is violated in any region.
func verifyExit(rep verify.Report) int {
	if !rep.OK() {
		return exitFail
	}
	return exitOK
}

// printVerify prints one row per table and the differing keys.
func printVerify(stdout io.Writer, regions []verify.Region, rep verify.Report) {
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprint(tw, "TABLE")
	for _, r := range regions {
		fmt.Fprintf(tw, "\tROWS %s", r.Name)
	}
	fmt.Fprintln(tw, "\tCHUNKS\tRESULT")
	for _, t := range rep.Tables {
		fmt.Fprint(tw, t.Table)
		switch len(t.Regions) {
		case 0:
		case 1:
			fmt.Fprintf(tw, " (outside %s's scope)", t.Regions[0])
		default:
			fmt.Fprintf(tw, " (%s within their shared scope)", strings.Join(t.Regions, "~"))
		}
		for _, r := range regions {
			if t.Regions != nil && !slices.Contains(t.Regions, r.Name) {
				fmt.Fprint(tw, "\t-")
				continue
			}
			fmt.Fprintf(tw, "\t%d", t.Rows[r.Name])
		}
		fmt.Fprintf(tw, "\t%d", t.Chunks)
		if t.Equal {
			fmt.Fprintln(tw, "\tequal")
		} else {
			fmt.Fprintf(tw, "\tDIFFERENT (%d rows)\n", len(t.Keys))
		}
	}
	tw.Flush()
	for _, t := range rep.Tables {
		for _, d := range t.Diffs {
			fmt.Fprintf(stdout, "%s: %s\n", t.Table, d)
		}
	}
	printViolations(stdout, rep.Violations)
	for _, d := range rep.Schema {
		fmt.Fprintf(stdout, "schema of %s\n", d)
	}
	switch {
	case !rep.Equal():
		fmt.Fprintln(stdout, "regions differ")
	case len(rep.Schema) > 0:
		fmt.Fprintf(stdout, "%d tables equal in %d regions, but their schemas differ (%d differences); see README, Schema changes\n", len(rep.Tables), len(regions), len(rep.Schema))
	case len(rep.Violations) > 0:
		constraints, where := map[string]bool{}, map[string]bool{}
		for _, v := range rep.Violations {
			constraints[v.Table+"\x00"+v.Constraint] = true
			where[v.Region] = true
		}
		fmt.Fprintf(stdout, "%d tables equal in %d regions, but foreign keys are violated: %d constraints in %d regions\n",
			len(rep.Tables), len(regions), len(constraints), len(where))
	default:
		fmt.Fprintf(stdout, "%d tables equal in %d regions\n", len(rep.Tables), len(regions))
	}
}

// printViolations prints the violated foreign keys, grouped by constraint,
// with the offending keys per region and the two ways to repair them.
func printViolations(stdout io.Writer, vs []verify.FKViolation) {
	if len(vs) == 0 {
		return
	}
	fmt.Fprintln(stdout, "\nforeign keys violated (applied rows skip foreign-key checks, so regions can agree on an orphan):")
	var order []string
	groups := map[string][]verify.FKViolation{}
	for _, v := range vs {
		id := v.Table + "\x00" + v.Constraint
		if _, ok := groups[id]; !ok {
			order = append(order, id)
		}
		groups[id] = append(groups[id], v)
	}
	for _, id := range order {
		g := groups[id]
		v := g[0]
		fmt.Fprintf(stdout, "%s: constraint %s: (%s) references %s (%s)\n",
			v.Table, v.Constraint, strings.Join(v.Columns, ", "), v.Referenced, strings.Join(v.RefColumns, ", "))
		for _, rv := range g {
			fmt.Fprintf(stdout, "  region %s: %d rows reference no row of %s\n", rv.Region, rv.Count, rv.Referenced)
			if rv.MatchFull {
				fmt.Fprintln(stdout, "    (MATCH FULL: a key that is only partly NULL counts too)")
			}
			for i := range rv.Keys {
				fmt.Fprintf(stdout, "    key %s\n", rv.KeyString(i))
			}
			if more := rv.Count - int64(len(rv.Keys)); more > 0 {
				fmt.Fprintf(stdout, "    ... and %d more\n", more)
			}
		}
		fmt.Fprintf(stdout, "  find them:  %s;\n", v.FindSQL)
		fmt.Fprintf(stdout, "  repair in ONE region while the nodes run (the change replicates to the others), either:\n")
		fmt.Fprintf(stdout, "    - re-insert the missing rows of %s (from a backup or the application), or\n", v.Referenced)
		fmt.Fprintf(stdout, "    - delete the orphans:  %s;\n", v.DeleteSQL)
	}
	fmt.Fprintln(stdout, "verify --repair does not change these rows: which side is right is your call. Run verify again afterwards.")
}

// verifyRegions lists this region and its peers with their scopes: the
// top-level scope for this region, peers[].scope for the others.
func verifyRegions(cfg *config.Config) ([]verify.Region, error) {
	own, err := scope.New(cfg.Scope.Rules())
	if err != nil {
		return nil, fmt.Errorf("scope in %s: %w", cfg.Path, err)
	}
	regions := []verify.Region{{Name: cfg.Region, DSN: cfg.Database, Scope: own}}
	for _, p := range cfg.Peers {
		s, err := scope.New(p.Scope.Rules())
		if err != nil {
			return nil, fmt.Errorf("scope of region %s in %s: %w", p.Region, cfg.Path, err)
		}
		regions = append(regions, verify.Region{Name: p.Region, DSN: p.Database, Scope: s})
	}
	return regions, nil
}
