package node

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

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
	// Decoded counts local transactions decoded from the slot since the
	// node started, over every reader term.
	Decoded uint64 `json:"decoded_txns"`
	// Switches are the last MaxSwitches path changes, oldest first.
	Switches []Switch `json:"switches"`
	// Peers lists every peer region's nodes in failover order.
	Peers []PeerNodes `json:"peers"`
	// Delays are where transactions' time went over the last
	// DelayWindow, per stage (see StageDelay): this node's own
	// transactions (sent, read) and, per source region, those it applied
	// here (received, began, applied).
	Delays []StageDelay `json:"delays"`
}

// PeerNodes names a peer region's nodes.
type PeerNodes struct {
	Region string   `json:"region"`
	Nodes  []string `json:"nodes"`
}

// TargetStatus is the state of shipping to one peer region.
type TargetStatus struct {
	Region string `json:"region"`
	// State sums the target up for an operator: see the State constants.
	State       string `json:"state"`
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
	// LastErrorAt is when LastError happened; the error is cleared when
	// the region's preferred node carries the traffic again.
	LastErrorAt *time.Time `json:"last_error_at,omitempty"`
	// AuthRefused names the region's nodes that refuse this node's
	// credentials (auth.token or TLS certificates): a configuration error
	// on one of the two sides, whatever path carries the data meanwhile.
	AuthRefused []string `json:"auth_refused,omitempty"`
	// LagSeconds is the time since the source commit of the oldest
	// transaction sent to the region and not yet acknowledged; 0 when
	// everything sent is acknowledged.
	LagSeconds float64 `json:"lag_seconds"`
	// LastHour counts path events of the last 60 minutes (over every
	// reader term of this node).
	LastHour HourCounts `json:"last_hour"`
}

// The target states, worst first: a refused credential outranks the path,
// since it does not mend itself.
const (
	StateAuthRefused = "auth refused" // a node refuses this node's credentials
	StateHalted      = "halted"       // a permanent apply error
	StateFallback    = "fallback"     // the direct-SQL fallback carries the traffic
	StateRetrying    = "retrying"     // no path is established
	StateStandby     = "standby"      // this node does not ship
	StateOK          = "ok"
)

// targetState returns the State of a target with path and the nodes that
// refuse this node's credentials.
func targetState(path string, refused []string) string {
	switch {
	case len(refused) > 0:
		return StateAuthRefused
	case strings.HasPrefix(path, "halted"):
		return StateHalted
	case path == peers.PathFallback:
		return StateFallback
	case path == peers.PathConnecting:
		return StateRetrying
	case strings.HasPrefix(path, "not shipping"):
		return StateStandby
	}
	return StateOK
}

// HourCounts are path events of the last hour.
type HourCounts struct {
	Retries    int `json:"retries"`
	Failovers  int `json:"failovers"`
	Fallbacks  int `json:"fallbacks"`
	Recoveries int `json:"recoveries"`
	Halts      int `json:"halts"`
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
			path := "not shipping (" + string(role) + ")"
			st.Targets = append(st.Targets, TargetStatus{Region: p.Region, State: targetState(path, nil), Path: path})
		}
	}
	for _, s := range shippers {
		ss := s.Status()
		ts := TargetStatus{
			Region:      ss.Target,
			State:       targetState(ss.Path, ss.AuthRefused),
			Path:        ss.Path,
			Acked:       ss.Acked.String(),
			WindowTxns:  ss.WindowTxns,
			WindowBytes: ss.WindowBytes,
			Retries:     ss.Retries,
			Failovers:   ss.Failovers,
			Fallbacks:   ss.Fallbacks,
			Recoveries:  ss.Recoveries,
			LastError:   ss.LastError,
			AuthRefused: ss.AuthRefused,
		}
		if !ss.LastErrorAt.IsZero() {
			at := ss.LastErrorAt.UTC()
			ts.LastErrorAt = &at
		}
		if last > ss.Acked {
			ts.LagBytes = uint64(last - ss.Acked)
		}
		st.Targets = append(st.Targets, ts)
	}
	return st
}

// status is the node's status with what only the monitor knows: lag in
// seconds, last-hour counts, decoded transactions and recent switches.
func (m *monitor) status(now time.Time) Status {
	views := m.observe(now)
	st := m.n.Status()
	for i := range st.Targets {
		t := &st.Targets[i]
		if v, ok := views[t.Region]; ok && v.hasUnacked && !v.oldest.IsZero() {
			t.LagSeconds = max(now.Sub(v.oldest).Seconds(), 0)
		}
		h := m.lastHour(t.Region, now)
		t.LastHour = HourCounts{Retries: h.Retries, Failovers: h.Failovers, Fallbacks: h.Fallbacks, Recoveries: h.Recoveries, Halts: h.Halts}
	}
	for _, p := range m.n.cfg.Peers {
		pn := PeerNodes{Region: p.Region, Nodes: []string{}}
		for _, node := range p.Nodes {
			pn.Nodes = append(pn.Nodes, node.Name)
		}
		st.Peers = append(st.Peers, pn)
	}
	st.Decoded = m.decodedTotal()
	st.Delays = m.recentDelays()
	st.Switches = m.recentSwitches()
	if st.Switches == nil {
		st.Switches = []Switch{}
	}
	return st
}

func parseLSN(s string) (pglogrepl.LSN, error) { return pglogrepl.ParseLSN(s) }

// isHalted reports whether a target's path is a halt on an apply error.
func isHalted(path string) bool { return strings.HasPrefix(path, "halted") }

// stalled returns why the node's process is not alive (its checkpoint loop
// stood still for longer than stallAfter, or never ran), or "".
func (n *Node) stalled(now time.Time) string {
	last := n.alive.Load()
	if last == 0 {
		return "not running"
	}
	if d := now.Sub(time.Unix(0, last)); d > n.stallAfter {
		return fmt.Sprintf("checkpoint loop stalled for %s", d.Round(time.Second))
	}
	return ""
}

// pingDatabase checks that this region's database answers, through the
// node's probe pool (nil before Run opened the database: the role reason
// says why).
func (n *Node) pingDatabase(ctx context.Context) error {
	n.mu.Lock()
	pool := n.probe
	n.mu.Unlock()
	if pool == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := pool.Ping(ctx); err != nil {
		return fmt.Errorf("database unreachable: %w", redactedError{err})
	}
	return nil
}

// notReady returns why the node cannot serve its region, one reason per
// entry, or none when it is ready: its database answers (dbErr is nil),
// it holds the region's slot or stands by for it (another node of the
// region holds it), and no target region is halted.
func notReady(st Status, dbErr error) []string {
	var why []string
	if dbErr != nil {
		why = append(why, strings.Join(strings.Fields(dbErr.Error()), " "))
	}
	reason := strings.Join(strings.Fields(st.RoleReason), " ")
	switch {
	case st.Role == RoleReader:
	case st.Role == RoleStandby && reason == "":
	case st.Role == RoleStarting && reason != "":
		why = append(why, "waiting for the database: "+reason)
	case reason != "":
		why = append(why, fmt.Sprintf("%s: %s", st.Role, reason))
	default:
		why = append(why, string(st.Role))
	}
	for _, t := range st.Targets {
		if isHalted(t.Path) {
			why = append(why, fmt.Sprintf("region %s %s", t.Region, strings.Join(strings.Fields(t.Path), " ")))
		}
	}
	return why
}

// handler serves /healthz (alive), /readyz (ready), /status (JSON),
// /history (JSON: the samples recordLoop keeps), /metrics (Prometheus) and
// / (the status page). /healthz and /readyz answer 200 or 503 with a
// plain-text body, one reason per line.
func (m *monitor) handler() http.Handler {
	n := m.n
	reg := prometheus.NewRegistry()
	reg.MustRegister(newCollector(m), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(n.delays.collectors()...)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		if why := n.stalled(time.Now()); why != "" {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, why)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		why := notReady(n.Status(), n.pingDatabase(r.Context()))
		if len(why) == 0 {
			fmt.Fprintln(w, "ready")
			return
		}
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, strings.Join(why, "\n"))
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(m.status(time.Now()))
	})
	mux.HandleFunc("GET /history", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		json.NewEncoder(w).Encode(m.historyOf())
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		io.WriteString(w, statusPage)
	})
	return mux
}
