// Command prism-demo runs a local multi-region prism-cdc deployment on
// throwaway PostgreSQL clusters: three regions (na, eu, as), four nodes
// (na1, eu1, eu2, as1) with the configs in configs/, a steady write workload
// in every region, and the failure sequences of the design played live:
// a lost update (retry), a stopped node (failover), a stopped region
// (direct-SQL fallback) and the return to normal. It ends by proving the
// regions hold identical rows, and cleans everything up.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/node"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/internal/scope"
	"github.com/prism-cdc/prism-cdc/internal/verify"
)

func main() {
	bin := flag.String("bin", "bin/prism-cdc", "the prism-cdc binary")
	configs := flag.String("configs", "configs", "directory with na1.yaml, eu1.yaml, eu2.yaml, as1.yaml")
	keep := flag.Bool("keep-logs", false, "keep the node logs directory after the demo")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	d := &demo{bin: *bin, configs: *configs, start: time.Now()}
	err := d.run(ctx)
	d.cleanup(*keep || err != nil)
	if err != nil {
		fmt.Fprintf(os.Stderr, "\ndemo FAILED: %v\n", err)
		if d.logDir != "" {
			fmt.Fprintf(os.Stderr, "node logs: %s\n", d.logDir)
		}
		os.Exit(1)
	}
}

var regions = []string{"na", "eu", "as"}

type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
}

type demo struct {
	bin, configs string
	start        time.Time
	logDir       string
	clusters     map[string]*pgtest.Cluster
	env          []string

	mu    sync.Mutex
	procs map[string]*proc

	written map[string]*atomic.Int64

	// scopes is what each region may hold (data residency): region as
	// never receives card_tokens.
	scopes map[string]*scope.Scope

	// startup holds each shipping node's path counters when the steady
	// state began: the retries of a node whose peers were not started yet.
	// The table counts from there.
	startup baseline
}

// baseline is path counters by "node/target region".
type baseline map[string]node.TargetStatus

// since returns t's retries, failovers and fallbacks counted from b. A
// counter below its baseline belongs to a restarted node and counts
// whole.
func (b baseline) since(nodeName string, t node.TargetStatus) (retries, failovers, fallbacks int) {
	base := b[nodeName+"/"+t.Region]
	sub := func(cur, was int) int {
		if cur < was {
			return cur
		}
		return cur - was
	}
	return sub(t.Retries, base.Retries), sub(t.Failovers, base.Failovers), sub(t.Fallbacks, base.Fallbacks)
}

func (d *demo) say(format string, args ...any) {
	fmt.Printf("[%5.1fs] %s\n", time.Since(d.start).Seconds(), fmt.Sprintf(format, args...))
}

func (d *demo) step(title string) {
	fmt.Printf("\n[%5.1fs] === %s ===\n", time.Since(d.start).Seconds(), title)
}

func (d *demo) run(ctx context.Context) error {
	if _, err := os.Stat(d.bin); err != nil {
		return fmt.Errorf("prism-cdc binary %s: %w (build it with: make build)", d.bin, err)
	}
	var err error
	d.logDir, err = os.MkdirTemp("", "prism-demo-")
	if err != nil {
		return err
	}
	if err := d.startRegions(ctx); err != nil {
		return err
	}
	if err := d.startNodes(ctx); err != nil {
		return err
	}
	stopWorkload := d.startWorkload(ctx)
	defer stopWorkload()
	d.recordStartup()
	for _, scene := range []func(context.Context) error{d.steadyState, d.lostUpdate, d.failover, d.fallback, d.recovery, d.residency, d.schemaChange} {
		if err := scene(ctx); err != nil {
			return err
		}
	}
	d.step("Stopping the workload and draining")
	stopWorkload()
	if err := d.drain(ctx); err != nil {
		return err
	}
	d.step("Verifying: every table compared across na, eu and as (card_tokens between na and eu only)")
	total, conflicts, err := d.compareRegions(ctx)
	if err != nil {
		return err
	}
	d.summary(total, conflicts)
	return nil
}

// startRegions starts a PostgreSQL cluster per region with database app
// and the demo's schema, and sets the nodes' environment.
func (d *demo) startRegions(ctx context.Context) error {
	d.step("Starting three regions: a PostgreSQL cluster each for na, eu and as")
	d.clusters = map[string]*pgtest.Cluster{}
	d.written = map[string]*atomic.Int64{}
	for _, r := range regions {
		c, err := pgtest.New(pgtest.Options{Name: "demo-" + r})
		if err != nil {
			return err
		}
		d.clusters[r] = c
		d.written[r] = new(atomic.Int64)
		if err := c.CreateDatabase(ctx, "app"); err != nil {
			return err
		}
		if err := c.Exec(ctx, "app", schema); err != nil {
			return err
		}
		d.say("region %s: PostgreSQL on 127.0.0.1:%d, database app with tables accounts, ledger and card_tokens", r, c.Port)
	}
	if err := d.residencyConfigs(); err != nil {
		return err
	}
	d.env = append(os.Environ(), "PRISM_TOKEN=demo-"+fmt.Sprint(time.Now().UnixNano()))
	for _, r := range regions {
		d.env = append(d.env, fmt.Sprintf("PRISM_%s_DSN=%s", strings.ToUpper(r), d.clusters[r].DSN("app")))
	}
	return nil
}

// startNodes starts the four nodes one after another and waits until
// every region has a reader.
func (d *demo) startNodes(ctx context.Context) error {
	d.step("Starting four nodes: na1, eu1, eu2, as1")
	d.procs = map[string]*proc{}
	for _, n := range []string{"na1", "eu1", "as1", "eu2"} {
		if err := d.startNode(n); err != nil {
			return err
		}
		if err := d.waitHealthy(ctx, n); err != nil {
			return err
		}
	}
	if err := d.waitFor(ctx, 30*time.Second, "every region has a reader", func() bool {
		return d.role("na1") == node.RoleReader && d.role("as1") == node.RoleReader &&
			(d.role("eu1") == node.RoleReader || d.role("eu2") == node.RoleReader)
	}); err != nil {
		return err
	}
	d.say("readers: na1 holds slot prism_na, %s holds prism_eu (the other eu node stands by), as1 holds prism_as", d.euReader())
	return nil
}

// startWorkload starts every region's workload; the function it returns
// stops them and waits for them to end (it may be called again).
func (d *demo) startWorkload(ctx context.Context) (stop func()) {
	wctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, r := range regions {
		wg.Add(1)
		go func(r string) { // owned by the returned stop
			defer wg.Done()
			d.workload(wctx, r)
		}(r)
	}
	return func() { cancel(); wg.Wait() }
}

// recordStartup keeps the path counters of the start as the baseline the
// tables count from.
func (d *demo) recordStartup() {
	d.startup = baseline{}
	var startupRetries int
	for _, n := range []string{"na1", "eu1", "eu2", "as1"} {
		for _, t := range d.status(n).Targets {
			d.startup[n+"/"+t.Region] = t
			startupRetries += t.Retries
		}
	}
	d.say("%d retries while the nodes came up one after another (a shipper retries a region whose node is not started yet); the tables count from here", startupRetries)
}

func (d *demo) steadyState(ctx context.Context) error {
	d.step("Steady state: every region writes; updates flow to every other region")
	if err := d.sleep(ctx, 5*time.Second); err != nil {
		return err
	}
	d.table()
	return nil
}

// lostUpdate freezes as1 until the shippers retry, then lets it go on.
func (d *demo) lostUpdate(ctx context.Context) error {
	d.step("1. A lost update to as: as1 freezes, updates to region as get no ACK")
	before := d.target("na1", "as").Retries + d.target(d.euReader(), "as").Retries
	if err := d.signal("as1", syscall.SIGSTOP); err != nil {
		return err
	}
	d.say("as1 frozen (SIGSTOP); na1 and %s wait %s for an ACK, then retry", d.euReader(), "ack_timeout")
	if err := d.waitFor(ctx, 30*time.Second, "a retry towards as", func() bool {
		return d.target("na1", "as").Retries+d.target(d.euReader(), "as").Retries > before
	}); err != nil {
		return err
	}
	d.say("retry counted: na1 -> as retries=%d, %s -> as retries=%d", d.target("na1", "as").Retries, d.euReader(), d.target(d.euReader(), "as").Retries)
	if err := d.signal("as1", syscall.SIGCONT); err != nil {
		return err
	}
	d.say("as1 resumes (SIGCONT); the retried updates are applied once and ACKed")
	if err := d.waitCaughtUp(ctx, "na1", "as"); err != nil {
		return err
	}
	d.table()
	return nil
}

// failover kills eu1: region eu fails over to eu2, which also takes over
// the slot.
func (d *demo) failover(ctx context.Context) error {
	d.step("2. eu1 stops: region eu fails over to eu2")
	if err := d.kill("eu1"); err != nil {
		return err
	}
	d.say("eu1 killed (SIGKILL); na1 and as1 retry eu1 %d times, then fail over to eu2", 5)
	if err := d.waitFor(ctx, 60*time.Second, "na1 and as1 ship to eu2", func() bool {
		return d.target("na1", "eu").Path == "eu2" && d.target("as1", "eu").Path == "eu2"
	}); err != nil {
		return err
	}
	d.say("na1 -> eu path: %s, as1 -> eu path: %s", d.target("na1", "eu").Path, d.target("as1", "eu").Path)
	if err := d.waitFor(ctx, 30*time.Second, "eu2 reads slot prism_eu", func() bool { return d.role("eu2") == node.RoleReader }); err != nil {
		return err
	}
	d.say("eu2 took over slot prism_eu and ships EU's writes")
	d.table()
	return nil
}

// fallback kills eu2 as well: the other regions apply to the EU database
// over SQL.
func (d *demo) fallback(ctx context.Context) error {
	d.step("3. eu2 stops too: no eu node answers, direct-SQL fallback to the EU database")
	if err := d.kill("eu2"); err != nil {
		return err
	}
	d.say("eu2 killed; EU's own writes wait safely in slot prism_eu until an eu node returns")
	if err := d.waitFor(ctx, 60*time.Second, "na1 and as1 write to the EU database over SQL", func() bool {
		return d.target("na1", "eu").Path == "sql fallback" && d.target("as1", "eu").Path == "sql fallback"
	}); err != nil {
		return err
	}
	d.say("na1 -> eu path: %s, as1 -> eu path: %s (same apply code, same origin: nothing twice, nothing skipped)",
		d.target("na1", "eu").Path, d.target("as1", "eu").Path)
	if err := d.sleep(ctx, 3*time.Second); err != nil {
		return err
	}
	d.table()
	return nil
}

// recovery restarts eu1 and eu2: the traffic returns to eu1.
func (d *demo) recovery(ctx context.Context) error {
	d.step("4. eu1 and eu2 return: traffic goes back to eu1")
	if err := d.startNode("eu1"); err != nil {
		return err
	}
	if err := d.startNode("eu2"); err != nil {
		return err
	}
	if err := d.waitFor(ctx, 60*time.Second, "na1 and as1 ship to eu1 again", func() bool {
		return d.target("na1", "eu").Path == "eu1" && d.target("as1", "eu").Path == "eu1"
	}); err != nil {
		return err
	}
	if err := d.waitFor(ctx, 30*time.Second, "an eu node reads slot prism_eu", func() bool {
		return d.role("eu1") == node.RoleReader || d.role("eu2") == node.RoleReader
	}); err != nil {
		return err
	}
	d.say("na1 -> eu path: %s, as1 -> eu path: %s; %s reads prism_eu and ships the writes EU kept while it was cut off",
		d.target("na1", "eu").Path, d.target("as1", "eu").Path, d.euReader())
	if err := d.sleep(ctx, 3*time.Second); err != nil {
		return err
	}
	d.table()
	return nil
}

// drain waits until every reader's targets have acknowledged everything
// (the workload is stopped).
func (d *demo) drain(ctx context.Context) error {
	for _, r := range regions {
		d.say("region %s wrote %d transactions", r, d.written[r].Load())
	}
	for _, src := range []string{"na1", "as1", d.euReader()} {
		st := d.status(src)
		for _, t := range st.Targets {
			if err := d.waitCaughtUp(ctx, src, t.Region); err != nil {
				return err
			}
		}
	}
	d.table()
	return nil
}

// compareRegions compares every table across the regions and checks that each
// holds one ledger row per write. It returns the writes and na's resolved
// conflicts.
func (d *demo) compareRegions(ctx context.Context) (total, conflicts int64, err error) {
	var vr []verify.Region
	for _, r := range regions {
		vr = append(vr, verify.Region{Name: r, DSN: d.clusters[r].DSN("app"), Scope: d.scopes[r]})
	}
	rep, err := verify.Compare(ctx, vr, "prism", 2*time.Second)
	if err != nil {
		return 0, 0, err
	}
	for _, t := range rep.Tables {
		state := "EQUAL"
		if !t.Equal {
			state = "DIFFERENT"
		}
		if t.Regions != nil {
			d.say("%-16s rows %s  (%s within their shared scope)  %s", t.Table, pairRows(t), strings.Join(t.Regions, "~"), state)
		} else {
			d.say("%-16s rows na=%d eu=%d as=%d  hash %s  %s", t.Table, t.Rows["na"], t.Rows["eu"], t.Rows["as"], short(t.Hashes["na"]), state)
		}
		for _, diff := range t.Diffs {
			d.say("    %s", diff)
		}
	}
	if !rep.Equal() {
		return 0, 0, fmt.Errorf("regions differ")
	}
	total = d.written["na"].Load() + d.written["eu"].Load() + d.written["as"].Load()
	for _, r := range regions {
		n, err := d.count(ctx, r, "SELECT count(*) FROM ledger")
		if err != nil {
			return 0, 0, err
		}
		if n != total {
			return 0, 0, fmt.Errorf("region %s has %d ledger rows, want %d (one per write)", r, n, total)
		}
	}
	conflicts, err = d.count(ctx, "na", "SELECT count(*) FROM prism.conflicts")
	return total, conflicts, err
}

func (d *demo) summary(total, conflicts int64) {
	d.step("Summary")
	na, as := d.target("na1", "eu"), d.target("as1", "eu")
	d.say("transactions written: %d (na %d, eu %d, as %d); every region holds all %d ledger rows exactly once",
		total, d.written["na"].Load(), d.written["eu"].Load(), d.written["as"].Load(), total)
	d.say("to eu: retries na1=%d as1=%d, failovers na1=%d as1=%d, sql fallbacks na1=%d as1=%d, returns to eu1 na1=%d as1=%d",
		na.Retries, as.Retries, na.Failovers, as.Failovers, na.Fallbacks, as.Fallbacks, na.Recoveries, as.Recoveries)
	d.say("write conflicts resolved (last write wins) and logged in prism.conflicts on na: %d", conflicts)
	d.say("verdict: the three regions are identical")
}

const schema = `
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, updated_by text NOT NULL);
CREATE TABLE ledger (id text PRIMARY KEY, region text NOT NULL, account int NOT NULL, amount bigint NOT NULL);
INSERT INTO accounts SELECT g, 0, 'seed' FROM generate_series(1, 50) g;
CREATE TABLE card_tokens (id text PRIMARY KEY, token text NOT NULL);
`

// workload writes one transaction every 40ms: a ledger row of its own and
// an update of a shared account, so regions also write the same rows.
func (d *demo) workload(ctx context.Context, region string) {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	seq := 0
	t := time.NewTicker(40 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if conn == nil {
			c, err := d.clusters[region].Connect(ctx, "app")
			if err != nil {
				continue
			}
			conn = c
		}
		seq++
		account := 1 + (seq*7+len(region))%50
		_, err := conn.Exec(ctx, `WITH l AS (INSERT INTO ledger VALUES ($1, $2, $3, $4))
			UPDATE accounts SET balance = balance + $4, updated_by = $2 WHERE id = $3`,
			fmt.Sprintf("%s-%06d", region, seq), region, account, int64(seq%17+1))
		if err != nil {
			if ctx.Err() == nil {
				d.say("workload %s: %v", region, err)
			}
			seq--
			conn.Close(context.Background())
			conn = nil
			continue
		}
		d.written[region].Add(1)
	}
}

func (d *demo) startNode(name string) error {
	cfg := filepath.Join(d.configs, name+".yaml")
	logf, err := os.OpenFile(filepath.Join(d.logDir, name+".log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(d.bin, "run", "--config", cfg)
	cmd.Env = d.env
	cmd.Stdout = logf
	cmd.Stderr = logf
	// An interrupted demo must not leave nodes running.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	d.mu.Lock()
	d.procs[name] = p
	d.mu.Unlock()
	d.say("%s started (pid %d, config %s)", name, cmd.Process.Pid, cfg)
	return nil
}

func (d *demo) proc(name string) *proc {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.procs[name]
}

func (d *demo) signal(name string, sig syscall.Signal) error {
	p := d.proc(name)
	if p == nil {
		return fmt.Errorf("%s is not running", name)
	}
	return p.cmd.Process.Signal(sig)
}

func (d *demo) kill(name string) error {
	if err := d.signal(name, syscall.SIGKILL); err != nil {
		return err
	}
	<-d.proc(name).done
	return nil
}

var httpAddr = map[string]string{"na1": "127.0.0.1:9101", "eu1": "127.0.0.1:9201", "eu2": "127.0.0.1:9202", "as1": "127.0.0.1:9301"}

func (d *demo) status(name string) node.Status {
	var st node.Status
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + httpAddr[name] + "/status")
	if err != nil {
		return st
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	json.Unmarshal(b, &st)
	return st
}

func (d *demo) role(name string) node.Role { return d.status(name).Role }

func (d *demo) euReader() string {
	if d.role("eu2") == node.RoleReader {
		return "eu2"
	}
	return "eu1"
}

func (d *demo) target(name, region string) node.TargetStatus {
	for _, t := range d.status(name).Targets {
		if t.Region == region {
			return t
		}
	}
	return node.TargetStatus{}
}

func (d *demo) waitHealthy(ctx context.Context, name string) error {
	return d.waitFor(ctx, 30*time.Second, name+" healthy", func() bool {
		select {
		case <-d.proc(name).done:
			return false
		default:
		}
		return d.status(name).Node == name
	})
}

func (d *demo) waitCaughtUp(ctx context.Context, src, region string) error {
	return d.waitFor(ctx, 60*time.Second, src+" -> "+region+" caught up", func() bool {
		t := d.target(src, region)
		return t.Region != "" && t.LagBytes == 0 && t.WindowTxns == 0
	})
}

func (d *demo) waitFor(ctx context.Context, timeout time.Duration, what string, cond func() bool) error {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s waiting for: %s", timeout, what)
		}
		if err := d.sleep(ctx, 200*time.Millisecond); err != nil {
			return err
		}
	}
	return nil
}

func (d *demo) sleep(ctx context.Context, dur time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(dur):
		return nil
	}
}

// table prints, per shipping node, each target region's path and lag.
func (d *demo) table() {
	fmt.Printf("          %-6s %-6s %-14s %10s %8s %9s %9s   (retries, failovers, fallbacks: since the steady state began)\n", "from", "to", "path", "lag bytes", "retries", "failovers", "fallbacks")
	for _, n := range []string{"na1", d.euReader(), "as1"} {
		st := d.status(n)
		if st.Node == "" {
			fmt.Printf("          %-6s (not answering)\n", n)
			continue
		}
		for _, t := range st.Targets {
			retries, failovers, fallbacks := d.startup.since(n, t)
			fmt.Printf("          %-6s %-6s %-14s %10d %8d %9d %9d\n", n, t.Region, t.Path, t.LagBytes, retries, failovers, fallbacks)
		}
	}
}

func (d *demo) count(ctx context.Context, region, q string) (int64, error) {
	c, err := d.clusters[region].Connect(ctx, "app")
	if err != nil {
		return 0, err
	}
	defer c.Close(ctx)
	var n int64
	if err := c.QueryRow(ctx, q).Scan(&n); err != nil {
		return 0, fmt.Errorf("region %s: %s: %w", region, q, err)
	}
	return n, nil
}

func short(h string) string {
	if len(h) > 12 {
		return h[:12]
	}
	return h
}

// cleanup stops every node (SIGTERM, then SIGKILL) and removes the
// clusters, whatever happened before.
func (d *demo) cleanup(keepLogs bool) {
	d.mu.Lock()
	procs := d.procs
	d.mu.Unlock()
	for _, p := range procs {
		p.cmd.Process.Signal(syscall.SIGCONT)
		p.cmd.Process.Signal(syscall.SIGTERM)
	}
	for _, p := range procs {
		select {
		case <-p.done:
		case <-time.After(20 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
	}
	for _, c := range d.clusters {
		c.Close()
	}
	if d.logDir != "" && !keepLogs {
		os.RemoveAll(d.logDir)
		d.logDir = ""
	}
	fmt.Printf("\n[%5.1fs] cleaned up: nodes stopped, clusters removed\n", time.Since(d.start).Seconds())
}
