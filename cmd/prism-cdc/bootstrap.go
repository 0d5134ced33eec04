package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/prism-cdc/prism-cdc/internal/bootstrap"
	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/scope"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// bootstrapCommand copies a peer region into this node's region database
// and sets its replication origins: prism-cdc bootstrap --config FILE
// --from REGION [--force] [--jobs N] [--max-rate ROWS].
func bootstrapCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	const name = "bootstrap"
	c, _ := lookup(name)
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	path := fs.String("config", "", "YAML configuration `FILE` of a node of the region to fill")
	from := fs.String("from", "", "copy from peer `REGION`")
	force := fs.Bool("force", false, "replace the region's data when its tables hold rows (lists what it replaces)")
	jobs := fs.Int("jobs", 4, "tables copied in parallel")
	rate := fs.Int("max-rate", 0, "limit the copy to `ROWS` per second (0: no limit)")
	if code, done := parseFlags(fs, c, args, stdout, stderr); done {
		return code
	}
	if *path == "" || *from == "" {
		fmt.Fprintf(stderr, "prism-cdc %s: --config FILE and --from REGION are required\n\n", name)
		commandUsage(stderr, fs, c)
		return exitUsage
	}
	cfg, log, code, ok := loadNode(name, *path, stderr)
	if !ok {
		return code
	}
	bc := bootstrap.Config{
		Region:      cfg.Region,
		DSN:         cfg.Database,
		Slot:        cfg.Slot,
		Publication: cfg.Publication,
		Source:      *from,
		Force:       *force,
		Jobs:        *jobs,
		MaxRate:     *rate,
	}
	own, err := scope.New(cfg.Scope.Rules())
	if err != nil {
		fmt.Fprintf(stderr, "prism-cdc bootstrap: scope in %s: %v\n", cfg.Path, err)
		return exitUsage
	}
	bc.Scope = own
	known := false
	for _, p := range cfg.Peers {
		bc.Peers = append(bc.Peers, bootstrap.Peer{Region: p.Region, DSN: p.Database})
		known = known || p.Region == *from
	}
	if !known {
		fmt.Fprintf(stderr, "prism-cdc %s: region %q is not among the peers in %s\n", name, *from, *path)
		return exitUsage
	}
	res, err := bootstrap.Run(ctx, bc, log)
	if err != nil {
		fmt.Fprintf(stderr, "prism-cdc %s: %s\n", name, config.RedactDSN(err.Error()))
		if errors.Is(err, bootstrap.ErrNotEmpty) {
			fmt.Fprintf(stderr, "nothing was changed\n")
		}
		return exitFail
	}
	fmt.Fprintf(stdout, "region %s bootstrapped from %s at %s in %s\n", cfg.Region, res.Source, res.Snapshot, res.Elapsed.Round(1e6))
	if res.SchemaLoaded {
		fmt.Fprintln(stdout, "schema copied")
	}
	if res.Restarted {
		fmt.Fprintln(stdout, "an interrupted bootstrap was started over")
	}
	for _, r := range res.Replaced {
		fmt.Fprintf(stdout, "replaced %s\n", r)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TABLE\tROWS\tWITH COMMIT TIME\tMB\tMB/S")
	for _, t := range res.Tables {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.1f\t%.1f\n", t.Table, t.Rows, t.Timed, float64(t.Bytes)/1e6, float64(t.Bytes)/1e6/max(t.Elapsed.Seconds(), 1e-3))
	}
	fmt.Fprintln(tw, "\nORIGIN\tRESUMES AFTER")
	for _, p := range bc.Peers {
		fmt.Fprintf(tw, "%s\t%s\n", decode.OriginName(p.Region), res.Origins[p.Region])
	}
	tw.Flush()
	return exitOK
}
