package node

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/prism-cdc/prism-cdc/pkg/peers"
)

// Status is what /status reports: the node's role and, per peer region, the
// acknowledged position, the lag behind this region's reader and the path
// in use.
type Status struct {
	Node       string         `json:"node"`
	Region     string         `json:"region"`
	Role       Role           `json:"role"`
	RoleReason string         `json:"role_reason,omitempty"`
	Uptime     string         `json:"uptime"`
	LastRead   string         `json:"last_read_lsn"`
	Confirmed  string         `json:"confirmed_lsn"`
	Targets    []TargetStatus `json:"targets"`
}

// TargetStatus is the state of shipping to one peer region.
type TargetStatus struct {
	Region      string `json:"region"`
	Path        string `json:"path"`
	Acked       string `json:"acked_lsn"`
	LagBytes    uint64 `json:"lag_bytes"`
	WindowTxns  int    `json:"window_txns"`
	WindowBytes int64  `json:"window_bytes"`
	Retries     int    `json:"retries"`
	Failovers   int    `json:"failovers"`
	Fallbacks   int    `json:"fallbacks"`
	Recoveries  int    `json:"recoveries"`
	LastError   string `json:"last_error,omitempty"`
}

// Status returns the node's current status.
func (n *Node) Status() Status {
	role, reason := n.currentRole()
	n.mu.Lock()
	st := Status{
		Node:       n.cfg.Node,
		Region:     n.cfg.Region,
		Role:       role,
		RoleReason: reason,
		Uptime:     time.Since(n.startedAt).Round(time.Second).String(),
		LastRead:   n.lastSent.String(),
		Confirmed:  n.confirmed.String(),
	}
	last := n.lastSent
	var shippers []*peers.Shipper
	if n.term != nil {
		shippers = n.term.shippers
	}
	n.mu.Unlock()
	if shippers == nil {
		for _, p := range n.cfg.Peers {
			st.Targets = append(st.Targets, TargetStatus{Region: p.Region, Path: "not shipping (" + string(role) + ")"})
		}
	}
	for _, s := range shippers {
		ss := s.Status()
		ts := TargetStatus{
			Region:      ss.Target,
			Path:        ss.Path,
			Acked:       ss.Acked.String(),
			WindowTxns:  ss.WindowTxns,
			WindowBytes: ss.WindowBytes,
			Retries:     ss.Retries,
			Failovers:   ss.Failovers,
			Fallbacks:   ss.Fallbacks,
			Recoveries:  ss.Recoveries,
			LastError:   ss.LastError,
		}
		if last > ss.Acked {
			ts.LagBytes = uint64(last - ss.Acked)
		}
		st.Targets = append(st.Targets, ts)
	}
	return st
}

func (n *Node) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(n.Status())
	})
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		writeMetrics(w, n.Status())
	})
	return mux
}

// writeMetrics writes the status in the Prometheus text exposition format.
func writeMetrics(w http.ResponseWriter, st Status) {
	var b strings.Builder
	reader := 0
	if st.Role == RoleReader {
		reader = 1
	}
	fmt.Fprintf(&b, "# HELP prism_reader 1 when this node holds its region's slot.\n# TYPE prism_reader gauge\nprism_reader{node=%q,region=%q} %d\n", st.Node, st.Region, reader)
	type metric struct {
		name, help, kind string
		value            func(TargetStatus) float64
	}
	ms := []metric{
		{"prism_lag_bytes", "WAL bytes read but not yet acknowledged by the target region.", "gauge", func(t TargetStatus) float64 { return float64(t.LagBytes) }},
		{"prism_window_txns", "Transactions sent and not yet acknowledged.", "gauge", func(t TargetStatus) float64 { return float64(t.WindowTxns) }},
		{"prism_window_bytes", "Bytes sent and not yet acknowledged.", "gauge", func(t TargetStatus) float64 { return float64(t.WindowBytes) }},
		{"prism_retries_total", "Retries of the same node.", "counter", func(t TargetStatus) float64 { return float64(t.Retries) }},
		{"prism_failovers_total", "Failovers to the next node of a region.", "counter", func(t TargetStatus) float64 { return float64(t.Failovers) }},
		{"prism_fallbacks_total", "Switches to the direct-SQL fallback.", "counter", func(t TargetStatus) float64 { return float64(t.Fallbacks) }},
		{"prism_recoveries_total", "Returns from a secondary path to the first healthy node.", "counter", func(t TargetStatus) float64 { return float64(t.Recoveries) }},
	}
	for _, m := range ms {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", m.name, m.help, m.name, m.kind)
		for _, t := range st.Targets {
			fmt.Fprintf(&b, "%s{node=%q,region=%q,target=%q} %g\n", m.name, st.Node, st.Region, t.Region, m.value(t))
		}
	}
	w.Write([]byte(b.String()))
}
