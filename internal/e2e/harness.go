package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/logtest"
	"github.com/prism-cdc/prism-cdc/internal/node"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/internal/verify"
)

// Topology names the regions and their nodes, in failover order.
type Topology map[string][]string

// Deployment is a running multi-region test deployment.
type Deployment struct {
	t        *testing.T
	Bin      string
	Dir      string
	Regions  []string
	Clusters map[string]*pgtest.Cluster
	topo     Topology
	listen   map[string]string
	http     map[string]string
	// Delivery is written into every node's config.
	Delivery string
	// Extra, when set, returns more top-level YAML for node name's config.
	Extra func(name string) string
	// PeerAddr, when set, is the address a node of region from is given
	// for node to (e.g. a fault proxy in front of to's listen address);
	// nil or "" means to's listen address.
	PeerAddr func(from, to string) string
	// PeerDatabase, when set, is the fallback DSN a node of region from
	// is given for region to's database (e.g. through a fault proxy); nil
	// or "" means the cluster's own DSN.
	PeerDatabase func(from, to string) string
	// PeerScope, when set, returns the scope a node of region from gives
	// region to, as the YAML value of peers[].scope (flow style, e.g.
	// "{exclude_tables: [public.t]}"); nil or "" means none.
	PeerScope func(from, to string) string

	mu    sync.Mutex
	procs map[string]*Proc
}

// Proc is one node process.
type Proc struct {
	Name string
	Cmd  *exec.Cmd
	Done chan struct{}
	Err  error
}

// Build builds the prism-cdc binary into dir.
func Build(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "prism-cdc")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/prism-cdc/prism-cdc/cmd/prism-cdc")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build prism-cdc: %v\n%s", err, out)
	}
	return bin
}

// New starts one cluster per region with database app and schema, builds
// the binary and writes one config per node. Nodes are not started.
func New(t *testing.T, topo Topology, schema string) *Deployment {
	t.Helper()
	return NewWithSettings(t, topo, schema, nil)
}

// NewWithSettings is New with extra postgresql.conf settings for every
// region's cluster (pgtest.Options.Settings).
func NewWithSettings(t *testing.T, topo Topology, schema string, settings map[string]string) *Deployment {
	t.Helper()
	ctx := context.Background()
	d := &Deployment{
		t: t, Dir: t.TempDir(), topo: topo,
		Clusters: map[string]*pgtest.Cluster{}, listen: map[string]string{}, http: map[string]string{},
		procs:    map[string]*Proc{},
		Delivery: "{ack_timeout: 1s, retries: 3, backoff: 50ms, max_backoff: 500ms, max_in_flight: 16MiB}",
	}
	for r := range topo {
		d.Regions = append(d.Regions, r)
	}
	sortStrings(d.Regions)
	d.Bin = Build(t, d.Dir)
	for _, r := range d.Regions {
		c := pgtest.Start(t, pgtest.Options{Name: "e2e-" + r, Settings: settings})
		if err := c.CreateDatabase(ctx, "app"); err != nil {
			t.Fatal(err)
		}
		if schema != "" {
			if err := c.Exec(ctx, "app", schema); err != nil {
				t.Fatal(err)
			}
		}
		d.Clusters[r] = c
		for _, n := range topo[r] {
			d.listen[n] = pgtest.FreeAddr(t)
			d.http[n] = pgtest.FreeAddr(t)
		}
	}
	t.Cleanup(d.stopAll)
	return d
}

func sortStrings(s []string) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

func (d *Deployment) regionOf(name string) string {
	for r, ns := range d.topo {
		for _, n := range ns {
			if n == name {
				return r
			}
		}
	}
	return ""
}

// Config returns the YAML config of node name.
func (d *Deployment) Config(name string) string {
	r := d.regionOf(name)
	var b strings.Builder
	fmt.Fprintf(&b, "node: %s\nregion: %s\ndatabase: %q\nlisten: %q\nhttp: %q\n", name, r, d.Clusters[r].DSN("app"), d.listen[name], d.http[name])
	b.WriteString("auth: {token: \"${PRISM_TOKEN}\"}\n")
	fmt.Fprintf(&b, "delivery: %s\nlog: {level: debug, format: json}\npeers:\n", d.Delivery)
	for _, pr := range d.Regions {
		if pr == r {
			continue
		}
		dsn := d.Clusters[pr].DSN("app")
		if d.PeerDatabase != nil && d.PeerDatabase(r, pr) != "" {
			dsn = d.PeerDatabase(r, pr)
		}
		fmt.Fprintf(&b, "  - region: %s\n    database: %q\n    nodes:\n", pr, dsn)
		for _, n := range d.topo[pr] {
			addr := d.listen[n]
			if d.PeerAddr != nil && d.PeerAddr(r, n) != "" {
				addr = d.PeerAddr(r, n)
			}
			fmt.Fprintf(&b, "      - {name: %s, addr: %q}\n", n, addr)
		}
		if d.PeerScope != nil && d.PeerScope(r, pr) != "" {
			fmt.Fprintf(&b, "    scope: %s\n", d.PeerScope(r, pr))
		}
	}
	if d.Extra != nil {
		b.WriteString(d.Extra(name))
	}
	return b.String()
}

// ConfigPath writes node name's config and returns its path.
func (d *Deployment) ConfigPath(name string) string {
	p := filepath.Join(d.Dir, name+".yaml")
	if err := os.WriteFile(p, []byte(d.Config(name)), 0o600); err != nil {
		d.t.Fatal(err)
	}
	return p
}

// Start starts node name.
func (d *Deployment) Start(name string) *Proc {
	d.t.Helper()
	if err := endKilledLine(d.LogPath(name)); err != nil {
		d.t.Fatal(err)
	}
	logf, err := os.OpenFile(d.LogPath(name), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		d.t.Fatal(err)
	}
	cmd := exec.Command(d.Bin, "run", "--config", d.ConfigPath(name))
	cmd.Env = append(os.Environ(), "PRISM_TOKEN=e2e-secret-token")
	cmd.Stdout, cmd.Stderr = logf, logf
	// A test binary killed from outside must not leave nodes running.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		d.t.Fatalf("start %s: %v", name, err)
	}
	p := &Proc{Name: name, Cmd: cmd, Done: make(chan struct{})}
	go func() {
		p.Err = cmd.Wait()
		logf.Close()
		close(p.Done)
	}()
	d.mu.Lock()
	d.procs[name] = p
	d.mu.Unlock()
	return p
}

// StartAll starts every node.
func (d *Deployment) StartAll() {
	for _, r := range d.Regions {
		for _, n := range d.topo[r] {
			d.Start(n)
		}
	}
}

// Listen returns node name's peer listen address.
func (d *Deployment) Listen(name string) string { return d.listen[name] }

// Nodes returns region's nodes in failover order.
func (d *Deployment) Nodes(region string) []string { return d.topo[region] }

// endKilledLine ends a log file whose last line a killed process left
// incomplete (SIGKILL can cut a write short), so that the next process's
// first line does not continue it: the fragment moves to a line of its
// own that says what it is, which logtest does not take for a log line.
func endKilledLine(path string) error {
	data, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil || len(data) == 0 || data[len(data)-1] == '\n' {
		return err
	}
	start := bytes.LastIndexByte(data, '\n') + 1
	fixed := append(data[:start:start], "incomplete line of a killed process: "...)
	fixed = append(append(fixed, data[start:]...), '\n')
	return os.WriteFile(path, fixed, 0o644)
}

// LogPath returns the path of node name's log file.
func (d *Deployment) LogPath(name string) string { return filepath.Join(d.Dir, name+".log") }

// Proc returns node name's current process, or nil.
func (d *Deployment) Proc(name string) *Proc {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.procs[name]
}

// Running reports whether node name's process is alive.
func (d *Deployment) Running(name string) bool {
	p := d.Proc(name)
	if p == nil {
		return false
	}
	select {
	case <-p.Done:
		return false
	default:
		return true
	}
}

// Kill sends SIGKILL to node name and waits for it to exit.
func (d *Deployment) Kill(name string) {
	p := d.Proc(name)
	if p == nil {
		return
	}
	p.Cmd.Process.Signal(syscall.SIGKILL)
	<-p.Done
}

// Status fetches node name's /status; ok is false when it does not answer.
func (d *Deployment) Status(name string) (node.Status, bool) {
	var st node.Status
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + d.http[name] + "/status")
	if err != nil {
		return st, false
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || json.Unmarshal(b, &st) != nil {
		return st, false
	}
	return st, true
}

// Probe fetches node name's /healthz or /readyz (path) and returns the
// HTTP status and body; code is 0 when the node does not answer.
func (d *Deployment) Probe(name, path string) (code int, body string) {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + d.http[name] + path)
	if err != nil {
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// Role returns node name's role, or "" when it does not answer.
func (d *Deployment) Role(name string) node.Role {
	st, _ := d.Status(name)
	return st.Role
}

// Target returns node name's shipping status towards region.
func (d *Deployment) Target(name, region string) node.TargetStatus {
	st, _ := d.Status(name)
	for _, t := range st.Targets {
		if t.Region == region {
			return t
		}
	}
	return node.TargetStatus{}
}

// Eventually polls cond every 100ms until it holds or timeout passes.
func (d *Deployment) Eventually(timeout time.Duration, what string, cond func() bool) {
	d.t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			d.t.Fatalf("timed out after %s waiting for %s\n%s", timeout, what, d.Logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Logs returns, for every node, its last warnings and errors and the
// tail of its log at info level and above: the debug lines a busy node
// writes (one per skipped transaction) would push both out of a plain
// tail.
func (d *Deployment) Logs() string {
	var b strings.Builder
	for _, r := range d.Regions {
		for _, n := range d.topo[r] {
			data, _ := os.ReadFile(filepath.Join(d.Dir, n+".log"))
			var warns, infos []string
			debug := 0
			for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
				var l struct {
					Level string `json:"level"`
				}
				json.Unmarshal([]byte(line), &l)
				switch l.Level {
				case "debug", "trace":
					debug++
					continue
				case "warn", "error", "fatal", "panic":
					warns = append(warns, line)
				}
				infos = append(infos, line)
			}
			fmt.Fprintf(&b, "--- %s log: last warnings and errors (%d in all)\n%s\n", n, len(warns), strings.Join(lastN(warns, 10), "\n"))
			fmt.Fprintf(&b, "--- %s log: tail without the %d debug lines\n%s\n", n, debug, strings.Join(lastN(infos, 15), "\n"))
		}
	}
	return b.String()
}

func lastN(lines []string, n int) []string {
	if len(lines) > n {
		return lines[len(lines)-n:]
	}
	return lines
}

// State describes what a deployment is doing, for a failing test: every
// running node's targets (state, path, acknowledged LSN, last error) and
// every region's database sessions that are not idle (what they wait
// for, which sessions block them, since when their transaction runs).
func (d *Deployment) State() string {
	var b strings.Builder
	for _, r := range d.Regions {
		for _, n := range d.topo[r] {
			st, ok := d.Status(n)
			if !ok {
				fmt.Fprintf(&b, "--- %s: no status\n", n)
				continue
			}
			fmt.Fprintf(&b, "--- %s: role %s, read %s, confirmed %s\n", n, st.Role, st.LastRead, st.Confirmed)
			for _, t := range st.Targets {
				fmt.Fprintf(&b, "    to %s: %s via %s, acked %s, lag %d bytes, window %d txns, retries %d, last error %q\n",
					t.Region, t.State, t.Path, t.Acked, t.LagBytes, t.WindowTxns, t.Retries, t.LastError)
			}
		}
	}
	for _, r := range d.Regions {
		fmt.Fprintf(&b, "--- %s database sessions\n%s", r, d.sessions(r))
	}
	return b.String()
}

// sessions lists region's non-idle database sessions, one per line.
func (d *Deployment) sessions(region string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := d.Clusters[region].Connect(ctx, "postgres")
	if err != nil {
		return fmt.Sprintf("    %v\n", err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, `SELECT format('    pid %s %s %s: %s, waits %s/%s, blocked by %s, xact %s old, query %s',
		pid, application_name, backend_type, state, wait_event_type, wait_event, pg_blocking_pids(pid),
		date_trunc('milliseconds', clock_timestamp() - xact_start), left(regexp_replace(query, '\s+', ' ', 'g'), 160))
		FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND state IS DISTINCT FROM 'idle' AND backend_type IN ('client backend', 'walsender')
		ORDER BY xact_start NULLS LAST`)
	if err != nil {
		return fmt.Sprintf("    %v\n", err)
	}
	var b strings.Builder
	for rows.Next() {
		var line string
		if rows.Scan(&line) == nil {
			b.WriteString(line + "\n")
		}
	}
	if err := rows.Err(); err != nil {
		fmt.Fprintf(&b, "    %v\n", err)
	}
	return b.String()
}

// Verify compares every published table across all regions.
func (d *Deployment) Verify(ctx context.Context) verify.Report {
	d.t.Helper()
	var rs []verify.Region
	for _, r := range d.Regions {
		rs = append(rs, verify.Region{Name: r, DSN: d.Clusters[r].DSN("app")})
	}
	rep, err := verify.Compare(ctx, rs, "prism", time.Second)
	if err != nil {
		d.t.Fatalf("verify: %v", err)
	}
	return rep
}

func (d *Deployment) stopAll() {
	if d.t.Failed() {
		d.t.Log(d.State())
	}
	d.mu.Lock()
	procs := make([]*Proc, 0, len(d.procs))
	for _, p := range d.procs {
		procs = append(procs, p)
	}
	d.mu.Unlock()
	for _, p := range procs {
		p.Cmd.Process.Signal(syscall.SIGKILL)
		<-p.Done
	}
	// Every node's log lines are JSON objects without a repeated key.
	for _, r := range d.Regions {
		for _, n := range d.topo[r] {
			logtest.CheckFile(d.t, d.LogPath(n))
		}
	}
	if d.t.Failed() {
		d.t.Log(d.Logs())
	}
}
