package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/node"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// statusReport is what prism-cdc status prints: the node's live view and
// the databases' own facts.
type statusReport struct {
	Node      *node.Status `json:"node,omitempty"`
	NodeError string       `json:"node_error,omitempty"`
	Region    string       `json:"region"`
	// CurrentLSN is this region's current WAL position.
	CurrentLSN string         `json:"current_wal_lsn,omitempty"`
	Slot       slotFacts      `json:"slot"`
	Targets    []targetReport `json:"targets"`
	DBError    string         `json:"database_error,omitempty"`
}

type slotFacts struct {
	Name           string `json:"name"`
	Exists         bool   `json:"exists"`
	Active         bool   `json:"active"`
	Plugin         string `json:"plugin,omitempty"` // output plugin: pgoutput or prism_pgoutput
	ConfirmedFlush string `json:"confirmed_flush_lsn,omitempty"`
	WALStatus      string `json:"wal_status,omitempty"`
	RetainedBytes  int64  `json:"retained_wal_bytes"`
}

// targetReport is one peer region as seen by this region's node and by the
// peer's database.
type targetReport struct {
	Region string `json:"region"`
	// From the node (empty when it does not answer; the lag is then
	// unknown and absent).
	State       string          `json:"state,omitempty"`
	Path        string          `json:"path,omitempty"`
	AckedLSN    string          `json:"acked_lsn,omitempty"`
	LagBytes    *uint64         `json:"lag_bytes,omitempty"`
	LagSeconds  *float64        `json:"lag_seconds,omitempty"`
	InFlight    int             `json:"in_flight_txns"`
	LastHour    node.HourCounts `json:"last_hour"`
	LastError   string          `json:"last_error,omitempty"`
	LastErrorAt *time.Time      `json:"last_error_at,omitempty"`
	AuthRefused []string        `json:"auth_refused,omitempty"`
	// From the peer region's database: the progress of origin
	// prism_<this region>, and the WAL this region wrote since it.
	AppliedLSN      string `json:"applied_lsn,omitempty"`
	WALSinceApplied int64  `json:"wal_since_applied_bytes"`
	DBError         string `json:"database_error,omitempty"`
}

// statusCommand prints this region's replication status: the running
// node's view (path, acknowledged LSN, lag, in-flight, last-hour events)
// and the databases' facts (slot and retained WAL here, applied position
// in every peer region). It still reports the database facts when the
// node is down, and then exits 1.
func statusCommand(fs *flag.FlagSet) nodeAction {
	asJSON := fs.Bool("json", false, "print the status as JSON")
	return func(ctx context.Context, _ string, cfg *config.Config, _ zerolog.Logger, stdout, stderr io.Writer) int {
		if cfg.HTTP == "" {
			fmt.Fprintf(stderr, "prism-cdc status: %s has no http address; set http: \"127.0.0.1:9102\" and restart the node\n", cfg.Path)
			return exitUsage
		}
		rep := statusReport{Region: cfg.Region, Slot: slotFacts{Name: cfg.Slot}}
		st, err := fetchStatus(ctx, cfg.HTTP)
		if err != nil {
			rep.NodeError = fmt.Sprintf("node %s does not answer on %s: %v", cfg.Node, cfg.HTTP, err)
		} else {
			rep.Node = &st
		}
		dbFacts(ctx, cfg, &rep)
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			if err := enc.Encode(rep); err != nil {
				fmt.Fprintf(stderr, "prism-cdc status: %v\n", err)
				return exitFail
			}
		} else {
			printStatus(stdout, rep)
		}
		if rep.Node == nil {
			return exitFail
		}
		for _, t := range rep.Targets {
			if t.State == node.StateHalted || t.State == node.StateAuthRefused {
				return exitFail
			}
		}
		return exitOK
	}
}

func fetchStatus(ctx context.Context, addr string) (node.Status, error) {
	var st node.Status
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, "http://"+addr+"/status", nil)
	if err != nil {
		return st, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("HTTP %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return st, fmt.Errorf("bad answer: %w", err)
	}
	return st, nil
}

// dbFacts fills in what the databases know, without the node.
func dbFacts(ctx context.Context, cfg *config.Config, rep *statusReport) {
	byRegion := map[string]node.TargetStatus{}
	if rep.Node != nil {
		for _, t := range rep.Node.Targets {
			byRegion[t.Region] = t
		}
	}
	var current pglogrepl.LSN
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, cfg.Database)
	if err != nil {
		rep.DBError = config.RedactDSN(err.Error())
	} else {
		var lsn string
		if err := conn.QueryRow(cctx, "SELECT pg_current_wal_lsn()::text").Scan(&lsn); err != nil {
			rep.DBError = err.Error()
		} else {
			rep.CurrentLSN = lsn
			current, _ = parseLSN(lsn)
		}
		var confirmed *string
		err := conn.QueryRow(cctx, `SELECT active, coalesce(plugin::text, ''), confirmed_flush_lsn::text, coalesce(wal_status, ''),
			coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint
			FROM pg_replication_slots WHERE slot_name = $1`, cfg.Slot).Scan(&rep.Slot.Active, &rep.Slot.Plugin, &confirmed, &rep.Slot.WALStatus, &rep.Slot.RetainedBytes)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
		case err != nil:
			rep.DBError = err.Error()
		default:
			rep.Slot.Exists = true
			if confirmed != nil {
				rep.Slot.ConfirmedFlush = *confirmed
			}
		}
		conn.Close(context.Background())
	}
	for _, p := range cfg.Peers {
		t := targetReport{Region: p.Region}
		if ns, ok := byRegion[p.Region]; ok {
			t.State, t.Path, t.AckedLSN = ns.State, ns.Path, ns.Acked
			t.LagBytes, t.LagSeconds = &ns.LagBytes, &ns.LagSeconds
			t.InFlight, t.LastHour = ns.WindowTxns, ns.LastHour
			t.LastError, t.LastErrorAt, t.AuthRefused = ns.LastError, ns.LastErrorAt, ns.AuthRefused
		}
		if p.Database != "" {
			applied, err := peerProgress(ctx, p.Database, cfg.Region)
			if err != nil {
				t.DBError = err.Error()
			} else {
				t.AppliedLSN = applied.String()
				if current > applied {
					t.WALSinceApplied = int64(current - applied)
				}
			}
		}
		rep.Targets = append(rep.Targets, t)
	}
}

// peerProgress reads, in a peer database, the durable progress of the
// transactions of source region source.
func peerProgress(ctx context.Context, dsn, source string) (pglogrepl.LSN, error) {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, dsn)
	if err != nil {
		return 0, errors.New(config.RedactDSN(err.Error()))
	}
	defer conn.Close(context.Background())
	return apply.OriginProgress(cctx, conn, source)
}

// printStatus prints the report for an operator.
func printStatus(w io.Writer, rep statusReport) {
	if st := rep.Node; st != nil {
		fmt.Fprintf(w, "node %s (region %s): %s", st.Node, st.Region, st.Role)
		if st.RoleReason != "" {
			fmt.Fprintf(w, " (%s)", st.RoleReason)
		}
		confirmed := st.Confirmed
		if confirmed == "0/0" || confirmed == "" {
			confirmed = "nothing yet"
		}
		fmt.Fprintf(w, ", up %s, last read %s, confirmed by this node %s, %d txns decoded\n", st.Uptime, st.LastRead, confirmed, st.Decoded)
	} else {
		fmt.Fprintf(w, "NOTE: %s\nshowing the databases' facts only: no path, lag in seconds, in-flight or retry counts\n", rep.NodeError)
	}
	switch {
	case rep.DBError != "":
		fmt.Fprintf(w, "region %s database: %s\n", rep.Region, rep.DBError)
	case !rep.Slot.Exists:
		fmt.Fprintf(w, "region %s: WAL at %s, slot %s does not exist yet\n", rep.Region, rep.CurrentLSN, rep.Slot.Name)
	default:
		active := "not streaming"
		if rep.Slot.Active {
			active = "streaming"
		}
		fmt.Fprintf(w, "region %s: WAL at %s, slot %s (%s) %s, confirmed %s, retains %d bytes of WAL (wal_status %s)\n",
			rep.Region, rep.CurrentLSN, rep.Slot.Name, rep.Slot.Plugin, active, rep.Slot.ConfirmedFlush, rep.Slot.RetainedBytes, rep.Slot.WALStatus)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TARGET\tSTATE\tPATH\tACKED LSN\tLAG BYTES\tLAG SECONDS\tIN FLIGHT\tRETRIES 1H\tFAILOVERS 1H\tFALLBACKS 1H\tAPPLIED THERE\tWAL SINCE\tLAST ERROR")
	now := time.Now()
	var refused []targetReport
	for _, t := range rep.Targets {
		state, path, acked := t.State, t.Path, t.AckedLSN
		if rep.Node == nil {
			state, path, acked = "node down", "-", "-"
		}
		lagBytes, lagSeconds := "unknown", "unknown"
		if t.LagBytes != nil && t.LagSeconds != nil {
			lagBytes, lagSeconds = fmt.Sprint(*t.LagBytes), fmt.Sprintf("%.1f", *t.LagSeconds)
		}
		applied := t.AppliedLSN
		if t.DBError != "" {
			applied = "unreachable"
		}
		if len(t.AuthRefused) > 0 {
			refused = append(refused, t)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%s\t%d\t%s\n", t.Region, state, path, acked, lagBytes, lagSeconds, t.InFlight,
			t.LastHour.Retries, t.LastHour.Failovers, t.LastHour.Fallbacks, applied, t.WALSinceApplied, errorCell(t.LastError, t.LastErrorAt, now))
	}
	tw.Flush()
	for _, t := range refused {
		fmt.Fprintf(w, "\nAUTH REFUSED: node %s of region %s refuses this node's credentials. Give both nodes the same auth.token (and, with auth.tls, certificates signed by a CA the other trusts), then restart the node whose config changed.\n",
			strings.Join(t.AuthRefused, ", "), t.Region)
	}
	if rep.Node != nil {
		printDelays(w, rep.Node.Delays)
	} else {
		fmt.Fprintln(w, "\nLAG BYTES / LAG SECONDS: unknown while the node is down; WAL SINCE is the database's figure.")
	}
	fmt.Fprintln(w, "\nLAG SECONDS: time since the source commit of the oldest transaction the region has not acknowledged (0 when caught up).")
	fmt.Fprintln(w, "APPLIED THERE / WAL SINCE: origin "+decode.OriginName(rep.Region)+" in the region's database, and this region's WAL written after it (an upper bound on the lag: it includes WAL that is not shipped).")
}

// stageNames name the stages of node.StageDelay for the status text.
var stageNames = map[string]string{
	node.StageSent:     "walsender sent",
	node.StageRead:     "node read",
	node.StageReceived: "received here",
	node.StageBegan:    "apply began",
	node.StageApplied:  "applied",
}

// printDelays prints where transactions' time went over the last minute:
// this region's own transactions, then those of every source region
// applied here.
func printDelays(w io.Writer, ds []node.StageDelay) {
	if len(ds) == 0 {
		return
	}
	fmt.Fprintf(w, "\nDELAYS over the last %s, from the source commit, p50 / p99 (transactions):\n", node.DelayWindow)
	var line []string
	source := ds[0].Source
	flush := func() {
		who := "  this region's transactions: "
		if source != "" {
			who = "  from " + source + ", applied here: "
		}
		fmt.Fprintln(w, who+strings.Join(line, ", "))
		line = nil
	}
	for _, d := range ds {
		if d.Source != source {
			flush()
			source = d.Source
		}
		line = append(line, fmt.Sprintf("%s %s / %s (%d)", stageNames[d.Stage], fmtSeconds(d.P50), fmtSeconds(d.P99), d.Count))
	}
	flush()
}

// fmtSeconds renders a delay in ms below a second, else in seconds.
func fmtSeconds(s float64) string {
	if s < 1 {
		return strconv.FormatFloat(s*1000, 'f', 1, 64) + " ms"
	}
	return strconv.FormatFloat(s, 'f', 1, 64) + " s"
}

func parseLSN(s string) (pglogrepl.LSN, error) { return pglogrepl.ParseLSN(s) }

// maxErrorCell bounds the LAST ERROR cell, in runes.
const maxErrorCell = 100

// errorCell renders a last error for the table: how long ago it happened,
// then the message on one line (line breaks and tabs, which would break
// the table, become spaces), cut to maxErrorCell runes with an ellipsis.
func errorCell(msg string, at *time.Time, now time.Time) string {
	if msg == "" {
		return "-"
	}
	msg = strings.Join(strings.Fields(msg), " ")
	if r := []rune(msg); len(r) > maxErrorCell {
		msg = string(r[:maxErrorCell-1]) + "…"
	}
	if at != nil {
		msg = fmt.Sprintf("%s ago: %s", now.Sub(*at).Round(time.Second), msg)
	}
	return msg
}
