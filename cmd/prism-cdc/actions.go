package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/node"
	"github.com/prism-cdc/prism-cdc/internal/verify"
)

// runAction runs one node until ctx is cancelled.
func runAction(ctx context.Context, _ string, cfg *config.Config, log zerolog.Logger, _, stderr io.Writer) int {
	if err := node.New(cfg, log).Run(ctx); err != nil {
		log.Error().Err(err).Msg("node stopped with an error")
		fmt.Fprintf(stderr, "prism-cdc run: %v\n", err)
		return exitFail
	}
	return exitOK
}

// statusAction asks the running node (its http address) for its status and
// prints one row per peer region.
func statusAction(ctx context.Context, _ string, cfg *config.Config, _ zerolog.Logger, stdout, stderr io.Writer) int {
	if cfg.HTTP == "" {
		fmt.Fprintf(stderr, "prism-cdc status: %s has no http address; set http: \"127.0.0.1:9102\" and restart the node\n", cfg.Path)
		return exitUsage
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, "http://"+cfg.HTTP+"/status", nil)
	if err != nil {
		fmt.Fprintf(stderr, "prism-cdc status: %v\n", err)
		return exitUsage
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "prism-cdc status: node %s does not answer on %s: %v (is `prism-cdc run` running?)\n", cfg.Node, cfg.HTTP, err)
		return exitFail
	}
	defer resp.Body.Close()
	var st node.Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		fmt.Fprintf(stderr, "prism-cdc status: bad answer from %s: %v\n", cfg.HTTP, err)
		return exitFail
	}
	fmt.Fprintf(stdout, "node %s (region %s): %s", st.Node, st.Region, st.Role)
	if st.RoleReason != "" {
		fmt.Fprintf(stdout, " (%s)", st.RoleReason)
	}
	fmt.Fprintf(stdout, ", up %s, last read %s, slot confirmed %s\n\n", st.Uptime, st.LastRead, st.Confirmed)
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TARGET\tPATH\tACKED LSN\tLAG BYTES\tIN FLIGHT\tRETRIES\tFAILOVERS\tFALLBACKS\tLAST ERROR")
	healthy := true
	for _, t := range st.Targets {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%s\n", t.Region, t.Path, t.Acked, t.LagBytes, t.WindowTxns, t.Retries, t.Failovers, t.Fallbacks, t.LastError)
		if len(t.Path) >= 6 && t.Path[:6] == "halted" {
			healthy = false
		}
	}
	tw.Flush()
	if !healthy {
		return exitFail
	}
	return exitOK
}

// verifyAction compares every replicated table of this region with every
// peer region's database.
func verifyAction(ctx context.Context, _ string, cfg *config.Config, log zerolog.Logger, stdout, stderr io.Writer) int {
	regions := []verify.Region{{Name: cfg.Region, DSN: cfg.Database}}
	for _, p := range cfg.Peers {
		regions = append(regions, verify.Region{Name: p.Region, DSN: p.Database})
	}
	rep, err := verify.Compare(ctx, regions, cfg.Publication, 2*time.Second)
	if err != nil {
		fmt.Fprintf(stderr, "prism-cdc verify: %s\n", config.RedactDSN(err.Error()))
		return exitFail
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprint(tw, "TABLE")
	for _, r := range regions {
		fmt.Fprintf(tw, "\tROWS %s", r.Name)
	}
	fmt.Fprintln(tw, "\tRESULT")
	for _, t := range rep.Tables {
		fmt.Fprint(tw, t.Table)
		for _, r := range regions {
			fmt.Fprintf(tw, "\t%d", t.Rows[r.Name])
		}
		if t.Equal {
			fmt.Fprintln(tw, "\tequal")
		} else {
			fmt.Fprintln(tw, "\tDIFFERENT")
		}
	}
	tw.Flush()
	for _, t := range rep.Tables {
		for _, d := range t.Diffs {
			fmt.Fprintf(stdout, "%s: %s\n", t.Table, d)
		}
	}
	if !rep.Equal() {
		fmt.Fprintln(stdout, "regions differ")
		return exitFail
	}
	fmt.Fprintf(stdout, "%d tables equal in %d regions\n", len(rep.Tables), len(regions))
	return exitOK
}
