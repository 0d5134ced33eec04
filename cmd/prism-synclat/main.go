// Command prism-synclat measures commit latency on a source database with
// prism-cdc's synchronous modes (off, quorum:1, all) side by side with
// PostgreSQL's own synchronous physical standby on the same machine.
//
// Every cluster runs with fsync on. For each setup it makes the same
// number of single-row commits from one client and prints p50, p99 and
// the mean commit time.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

func main() {
	bin := flag.String("bin", "bin/prism-cdc", "the prism-cdc binary")
	commits := flag.Int("commits", 1000, "commits measured per setup")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *bin, *commits); err != nil {
		fmt.Fprintln(os.Stderr, "prism-synclat:", err)
		os.Exit(1)
	}
}

type result struct {
	name          string
	p50, p99, avg time.Duration
	n             int
}

const table = `CREATE TABLE IF NOT EXISTS lat (id bigint PRIMARY KEY, region text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())`

// measure makes n single-row commits on c and returns their latencies.
func measure(ctx context.Context, c *pgtest.Cluster, name string, from, n int) (result, error) {
	conn, err := c.Connect(ctx, "app")
	if err != nil {
		return result{}, err
	}
	defer conn.Close(ctx)
	// Warm up the connection and the statement.
	if _, err := conn.Exec(ctx, "INSERT INTO lat (id, region) VALUES ($1, 'src')", -from-1); err != nil {
		return result{}, fmt.Errorf("%s: %w", name, err)
	}
	lat := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		t0 := time.Now()
		_, err := conn.Exec(cctx, "INSERT INTO lat (id, region) VALUES ($1, 'src')", from+i)
		d := time.Since(t0)
		cancel()
		if err != nil {
			return result{}, fmt.Errorf("%s: commit %d: %w", name, i, err)
		}
		lat = append(lat, d)
	}
	slices.Sort(lat)
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	return result{name: name, p50: lat[len(lat)/2], p99: lat[len(lat)*99/100], avg: sum / time.Duration(len(lat)), n: len(lat)}, nil
}

func setSyncNames(ctx context.Context, c *pgtest.Cluster, names string) error {
	if err := c.SetConf("synchronous_standby_names", "'"+names+"'"); err != nil {
		return err
	}
	if err := c.Reload(); err != nil {
		return err
	}
	// The reload is asynchronous: wait until the setting is visible.
	conn, err := c.Connect(ctx, "app")
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	deadline := time.Now().Add(30 * time.Second)
	for {
		var v string
		if err := conn.QueryRow(ctx, "SELECT current_setting('synchronous_standby_names')").Scan(&v); err != nil {
			return err
		}
		if v == names {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("synchronous_standby_names still %q", v)
		}
		time.Sleep(50 * time.Millisecond)
		conn.Close(ctx)
		if conn, err = c.Connect(ctx, "app"); err != nil {
			return err
		}
	}
	if names == "" {
		return nil
	}
	for {
		var n int
		if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')").Scan(&n); err != nil {
			return err
		}
		if n > 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no synchronous standby connected for %q", names)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func newCluster(ctx context.Context, name string) (*pgtest.Cluster, error) {
	c, err := pgtest.New(pgtest.Options{Name: name, Durable: true})
	if err != nil {
		return nil, err
	}
	if err := c.CreateDatabase(ctx, "app"); err != nil {
		c.Close()
		return nil, err
	}
	if err := c.Exec(ctx, "app", table); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func run(ctx context.Context, bin string, n int) error {
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("%s: %w (build it with: make build)", bin, err)
	}
	physical, err := measurePhysical(ctx, n)
	if err != nil {
		return err
	}
	logical, err := measurePrism(ctx, bin, n)
	if err != nil {
		return err
	}
	fmt.Printf("\ncommit latency on the source, %d single-row commits each, fsync on, one client\n", n)
	fmt.Printf("%-42s %9s %9s %9s\n", "setup", "p50 ms", "p99 ms", "mean ms")
	for _, r := range append(physical, logical...) {
		fmt.Printf("%-42s %9.2f %9.2f %9.2f\n", r.name, ms(r.p50), ms(r.p99), ms(r.avg))
	}
	return nil
}

// measurePhysical measures a primary alone, then with a synchronous
// streaming standby.
func measurePhysical(ctx context.Context, n int) ([]result, error) {
	fmt.Println("physical: a primary and a streaming standby (pg_basebackup)")
	primary, err := newCluster(ctx, "lat-primary")
	if err != nil {
		return nil, err
	}
	defer primary.Close()
	standby, err := pgtest.NewStandby(primary, pgtest.Options{Name: "lat-standby"})
	if err != nil {
		return nil, err
	}
	defer standby.Close()
	local, err := measure(ctx, primary, "no replication (local commit)", 0, n)
	if err != nil {
		return nil, err
	}
	if err := setSyncNames(ctx, primary, "*"); err != nil {
		return nil, err
	}
	sync, err := measure(ctx, primary, "native synchronous physical standby", 1_000_000, n)
	if err != nil {
		return nil, err
	}
	return []result{local, sync}, nil
}

// measurePrism measures commits on region na with eu1 and as1 running
// and na1 in each sync mode.
func measurePrism(ctx context.Context, bin string, n int) ([]result, error) {
	fmt.Println("prism-cdc: regions na, eu, as; commits on na")
	m := &mesh{bin: bin, regions: map[string]*pgtest.Cluster{}, ports: map[string]int{"na1": 17501, "eu1": 17502, "as1": 17503}}
	for _, name := range []string{"na", "eu", "as"} {
		c, err := newCluster(ctx, "lat-"+name)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		m.regions[name] = c
	}
	var err error
	m.dir, err = os.MkdirTemp("", "prism-synclat-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(m.dir)
	var others []*exec.Cmd
	for _, nr := range [][2]string{{"eu1", "eu"}, {"as1", "as"}} {
		cmd, err := m.start(m.config(nr[0], nr[1], ""))
		if err != nil {
			return nil, err
		}
		others = append(others, cmd)
	}
	defer func() {
		for _, c := range others {
			stopNode(c)
		}
	}()
	var results []result
	for i, mode := range []string{"off", "quorum:1", "all"} {
		r, err := m.measureSync(ctx, mode, (i+2)*1_000_000, n)
		if err != nil {
			return nil, err
		}
		results = append(results, r)
	}
	return results, nil
}

// mesh is the three regions' clusters and the nodes' files.
type mesh struct {
	bin     string
	dir     string
	regions map[string]*pgtest.Cluster
	ports   map[string]int // peer listen port by node
}

// measureSync runs na1 with sync mode ("off" for none) and measures
// commits on na, with ids from from on.
func (m *mesh) measureSync(ctx context.Context, mode string, from, n int) (result, error) {
	sync := mode
	if mode == "off" {
		sync = ""
	}
	cmd, err := m.start(m.config("na1", "na", sync))
	if err != nil {
		return result{}, err
	}
	names := decode.AppName("na1")
	if mode == "off" {
		names = ""
	}
	if err := setSyncNames(ctx, m.regions["na"], names); err != nil {
		stopNode(cmd)
		return result{}, fmt.Errorf("sync %s: %w", mode, err)
	}
	r, err := measure(ctx, m.regions["na"], "prism-cdc sync: "+mode+" (2 regions)", from, n)
	// Release waiting commits before stopping the node.
	setSyncNames(ctx, m.regions["na"], "")
	stopNode(cmd)
	return r, err
}

// config writes the configuration of node in region, with sync mode sync
// (empty: off), and returns its path.
func (m *mesh) config(node, region, sync string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "node: %s\nregion: %s\ndatabase: %q\nlisten: \"127.0.0.1:%d\"\nauth: {token: bench-token}\nlog: {level: warn}\n",
		node, region, m.regions[region].DSN("app"), m.ports[node])
	if sync != "" {
		fmt.Fprintf(&b, "sync: %q\nspool: {dir: %q}\n", sync, filepath.Join(m.dir, "spool-"+node))
	}
	b.WriteString("peers:\n")
	for _, pr := range []string{"na", "eu", "as"} {
		if pr == region {
			continue
		}
		fmt.Fprintf(&b, "  - region: %s\n    database: %q\n    nodes: [{name: %s1, addr: \"127.0.0.1:%d\"}]\n", pr, m.regions[pr].DSN("app"), pr, m.ports[pr+"1"])
	}
	p := filepath.Join(m.dir, node+"-"+strings.ReplaceAll(sync, ":", "")+".yaml")
	os.WriteFile(p, []byte(b.String()), 0o600)
	return p
}

// start starts prism-cdc run with configuration cfg, logging next to it.
func (m *mesh) start(cfg string) (*exec.Cmd, error) {
	cmd := exec.Command(m.bin, "run", "--config", cfg)
	logf, err := os.Create(cfg + ".log")
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	return cmd, cmd.Start()
}

// stopNode stops a node gracefully and waits for it.
func stopNode(cmd *exec.Cmd) {
	cmd.Process.Signal(syscall.SIGTERM)
	cmd.Wait()
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
