package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// benchToken is the peer token of the benchmark's throwaway nodes.
const benchToken = "prism-bench-token"

// nodeSpec is one prism-cdc node of the benchmark.
type nodeSpec struct {
	name, region string
	cluster      *pgtest.Cluster
	listen, http string
}

// prismNodes returns na1 (source), eu1 and as1 (prism regions) with
// free addresses.
func (e *env) prismNodes() ([]nodeSpec, error) {
	ns := []nodeSpec{{name: "na1", region: "na", cluster: e.src},
		{name: "eu1", region: "eu", cluster: e.prismc[0]}, {name: "as1", region: "as", cluster: e.prismc[1]}}
	addrs, err := freeAddrs(2 * len(ns))
	if err != nil {
		return nil, err
	}
	for i := range ns {
		ns[i].listen, ns[i].http = addrs[2*i], addrs[2*i+1]
	}
	return ns, nil
}

// freeAddrs returns n distinct free loopback addresses. It holds every
// listener until all are chosen: a listener closed at once frees its
// port, and the next one may get the same port back.
func freeAddrs(n int) ([]string, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	addrs := make([]string, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		ls = append(ls, l)
		addrs = append(addrs, l.Addr().String())
	}
	return addrs, nil
}

// nodeConfig is node n's YAML configuration in the full mesh ns, whose
// slots use output plugin plugin.
func nodeConfig(n nodeSpec, ns []nodeSpec, plugin string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "node: %s\nregion: %s\ndatabase: %q\noutput_plugin: %s\nlisten: %q\nhttp: %q\n", n.name, n.region, n.cluster.DSN(db), plugin, n.listen, n.http)
	b.WriteString("auth: {token: \"${PRISM_TOKEN}\"}\nlog: {level: info, format: json}\npeers:\n")
	for _, p := range ns {
		if p.region == n.region {
			continue
		}
		fmt.Fprintf(&b, "  - region: %s\n    database: %q\n    nodes:\n      - {name: %s, addr: %q}\n", p.region, p.cluster.DSN(db), p.name, p.listen)
	}
	return b.String()
}

// nodeProc is one running prism-cdc process.
type nodeProc struct {
	spec nodeSpec
	cmd  *exec.Cmd
	log  string // path of its log
	done chan struct{}
	err  error

	mu      sync.Mutex
	peakRSS int64   // kB, highest VmHWM seen
	cpu     float64 // CPU seconds at the last sample
}

// sample records the process's peak RSS and CPU time so far; it keeps
// the last values once the process is gone.
func (p *nodeProc) sample() {
	_, hwm, err := procMemKB(p.cmd.Process.Pid)
	if err != nil {
		return
	}
	cpu, err := procCPU(p.cmd.Process.Pid)
	if err != nil {
		return
	}
	p.mu.Lock()
	p.peakRSS = max(p.peakRSS, hwm)
	p.cpu = cpu
	p.mu.Unlock()
}

func (p *nodeProc) stats() (peakKB int64, cpu float64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.peakRSS, p.cpu
}

func (p *nodeProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// mesh is a running set of prism-cdc nodes.
type mesh struct {
	procs []*nodeProc
}

// startMesh starts one process per node. extraEnv is added to each
// node's environment (e.g. PRISM_PPROF).
func (e *env) startMesh(ctx context.Context, tag string, extraEnv func(name string) []string) (*mesh, error) {
	ns, err := e.prismNodes()
	if err != nil {
		return nil, err
	}
	m := &mesh{}
	for _, n := range ns {
		cfgPath := filepath.Join(e.dir, n.name+".yaml")
		if err := os.WriteFile(cfgPath, []byte(nodeConfig(n, ns, e.slotPlugin)), 0o600); err != nil {
			m.stop()
			return nil, fmt.Errorf("write config: %w", err)
		}
		logPath := filepath.Join(e.dir, n.name+".log")
		logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			m.stop()
			return nil, fmt.Errorf("open node log: %w", err)
		}
		fmt.Fprintf(logf, "{\"bench\":%q}\n", tag)
		// Not bound to ctx: stop ends the processes gracefully.
		cmd := exec.Command(e.prism, "run", "--config", cfgPath)
		cmd.Env = append(os.Environ(), "PRISM_TOKEN="+benchToken)
		if extraEnv != nil {
			cmd.Env = append(cmd.Env, extraEnv(n.name)...)
		}
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			logf.Close()
			m.stop()
			return nil, fmt.Errorf("start %s: %w", n.name, err)
		}
		p := &nodeProc{spec: n, cmd: cmd, log: logPath, done: make(chan struct{})}
		go func() {
			p.err = cmd.Wait()
			logf.Close()
			close(p.done)
		}()
		m.procs = append(m.procs, p)
	}
	return m, nil
}

// sample samples every process; it fails when one has exited.
func (m *mesh) sample() error {
	for _, p := range m.procs {
		if p.exited() {
			return fmt.Errorf("node %s exited: %v; the end of its log:\n%s", p.spec.name, p.err, logTail(p.log, 30))
		}
		p.sample()
	}
	return nil
}

// meshTick returns the tick of a wait loop while m runs: it samples m's
// nodes and fails when one has exited. Without a mesh it does nothing.
func meshTick(m *mesh) func() error {
	return func() error {
		if m == nil {
			return nil
		}
		return m.sample()
	}
}

// sampleEvery calls tick every interval in a goroutine until stop is
// called. The caller owns the goroutine: stop ends it, waits for it to
// exit and returns tick's first error.
func sampleEvery(interval time.Duration, tick func() error) (stop func() error) {
	quit, done := make(chan struct{}), make(chan struct{})
	var first error
	go func() {
		defer close(done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
				if err := tick(); err != nil && first == nil {
					first = err
				}
			}
		}
	}()
	return func() error {
		close(quit)
		<-done
		return first
	}
}

// stop sends SIGTERM to every process, waits for the graceful drain and
// kills what is left after 30s.
func (m *mesh) stop() {
	for _, p := range m.procs {
		p.sample()
		if !p.exited() {
			p.cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	deadline := time.After(30 * time.Second)
	for _, p := range m.procs {
		select {
		case <-p.done:
		case <-deadline:
			p.cmd.Process.Signal(syscall.SIGKILL)
			<-p.done
		}
	}
}

// peaks returns every process's peak RSS in kB, by node name.
func (m *mesh) peaks() map[string]int64 {
	kb := map[string]int64{}
	for _, p := range m.procs {
		kb[p.spec.name], _ = p.stats()
	}
	return kb
}

// kill ends every process at once.
func (m *mesh) kill() {
	for _, p := range m.procs {
		if !p.exited() {
			p.cmd.Process.Signal(syscall.SIGKILL)
		}
		<-p.done
	}
}

// errExited tells a wait loop that a node process died.
var errExited = errors.New("node exited")

// logTail returns the last n lines of the file at path (the work directory
// is removed at the end of a run without -keep, so an exit must show them).
func logTail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
