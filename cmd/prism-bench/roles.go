package main

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// The roles a process's CPU is counted under in a phase's "CPU by role"
// line, in the order the line lists them.
const (
	roleApp       = "application sessions"
	roleWalSender = "walsenders"
	roleApply     = "apply"
	roleSessions  = "other sessions"
	roleServer    = "server background"
	roleNodes     = "prism-cdc nodes"
)

// sideRoles are the roles of a side's server processes; the nodes'
// (roleNodes) come after every side's.
var sideRoles = []string{roleApp, roleWalSender, roleApply, roleSessions, roleServer}

// roleOf names what a server process does, from its pg_stat_activity
// row (backend_type and application_name; both empty when it has none):
// the application's sessions (pgbench), walsenders, the apply of every
// contender (native and pglogical apply workers, prism-cdc's apply
// sessions), other client sessions (prism-cdc's acknowledgements and
// checks, prism-bench's own), and the server's background processes.
func roleOf(backendType, appName string) string {
	switch {
	case backendType == "walsender":
		return roleWalSender
	case appName == "pgbench":
		return roleApp
	case strings.HasPrefix(appName, "prism_apply"), strings.Contains(backendType, "logical replication worker"),
		strings.Contains(backendType, "pglogical apply"):
		return roleApply
	case backendType == "client backend":
		return roleSessions
	}
	return roleServer
}

// side is a group of clusters whose processes a phase's line counts
// together, e.g. the source, or the regions.
type side struct {
	name     string
	clusters []*pgtest.Cluster
}

// procCPUSnap is the CPU seconds of every process of a phase, by PID,
// with the role of each ("<side> <role>", or roleNodes).
type procCPUSnap map[int]procCPURole

type procCPURole struct {
	role string
	cpu  float64
}

// roleNames lists the roles of sides in the order a line shows them.
func roleNames(sides []side) []string {
	var names []string
	for _, sd := range sides {
		for _, r := range sideRoles {
			names = append(names, sd.name+" "+r)
		}
	}
	return append(names, roleNodes)
}

// roleSnapshot reads the CPU time of every server process of the sides'
// clusters (their postmasters' children) and of the nodes of m (nil:
// none), and the role of each.
func roleSnapshot(ctx context.Context, sides []side, m *mesh) (procCPUSnap, error) {
	procs, err := readAllProcTimes()
	if err != nil {
		return nil, err
	}
	snap := procCPUSnap{}
	for _, sd := range sides {
		if err := sd.snapshot(ctx, procs, snap); err != nil {
			return nil, err
		}
	}
	if m != nil {
		for _, p := range m.procs {
			if p.cmd.Process == nil {
				continue
			}
			cpu, err := procCPU(p.cmd.Process.Pid)
			if err != nil {
				return nil, err
			}
			snap[p.cmd.Process.Pid] = procCPURole{role: roleNodes, cpu: cpu}
		}
	}
	return snap, nil
}

// readAllProcTimes reads the CPU times of every process, by PID.
func readAllProcTimes() (map[int]procTimes, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("read /proc: %w", err)
	}
	procs := map[int]procTimes{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if t, err := readProcTimes(pid); err == nil { // else gone meanwhile
			procs[pid] = t
		}
	}
	return procs, nil
}

// snapshot adds the server processes of the side's clusters (among
// procs) to snap.
func (sd side) snapshot(ctx context.Context, procs map[int]procTimes, snap procCPUSnap) error {
	for _, c := range sd.clusters {
		pm, err := postmasterPID(filepath.Join(c.Dir, "data"))
		if err != nil {
			return err
		}
		roles, err := activityRoles(ctx, c)
		if err != nil {
			return err
		}
		for pid, t := range procs {
			if t.ppid != pm {
				continue // not this cluster's
			}
			role, ok := roles[pid]
			if !ok {
				role = roleServer
			}
			snap[pid] = procCPURole{role: sd.name + " " + role, cpu: t.self}
		}
	}
	return nil
}

// activityRoles returns the role of every process pg_stat_activity
// shows in cluster c.
func activityRoles(ctx context.Context, c *pgtest.Cluster) (map[int]string, error) {
	conn, err := c.Connect(ctx, db)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, "SELECT pid, coalesce(backend_type, ''), coalesce(application_name, '') FROM pg_stat_activity")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	roles := map[int]string{}
	for rows.Next() {
		var pid int
		var bt, app string
		if err := rows.Scan(&pid, &bt, &app); err != nil {
			return nil, err
		}
		roles[pid] = roleOf(bt, app)
	}
	return roles, rows.Err()
}

// roleCPU is the CPU seconds each role used between two snapshots, and
// the order of the roles.
type roleCPU struct {
	order []string
	cpu   map[string]float64
}

// rolesSince returns the CPU each role used from s0 to s1: processes
// that started meanwhile count from zero, those that ended are left out.
func rolesSince(order []string, s0, s1 procCPUSnap) roleCPU {
	out := roleCPU{order: order, cpu: map[string]float64{}}
	for pid, p := range s1 {
		out.cpu[p.role] += p.cpu - s0[pid].cpu
	}
	return out
}

// summary prints the roles' CPU seconds per 10 s of a window of d, and
// how busy they kept the machine's CPUs.
func (r roleCPU) summary(d time.Duration, cpus int) string {
	var parts []string
	var total float64
	names := slices.Clone(r.order)
	for _, n := range slices.Sorted(maps.Keys(r.cpu)) {
		if !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	per10 := 10 / d.Seconds()
	for _, n := range names {
		v, ok := r.cpu[n]
		total += v
		if ok && v*per10 >= 0.005 {
			parts = append(parts, fmt.Sprintf("%s %.2f", n, v*per10))
		}
	}
	return fmt.Sprintf("%s; total %.2f (%.0f%% of %d CPUs)", strings.Join(parts, ", "), total*per10, 100*total/d.Seconds()/float64(cpus), cpus)
}

// roleWindow samples the CPU by role of the clusters' and m's processes
// from `from` after now to `to` after now, in the background (the
// window skips a phase's start and end, so every session of the
// application is there at both ends). wait returns the result, or an
// error when the window did not fit in the phase.
func roleWindow(ctx context.Context, sides []side, m *mesh, from, to time.Duration) (wait func() (roleCPU, time.Duration, error)) {
	type result struct {
		r   roleCPU
		d   time.Duration
		err error
	}
	ch := make(chan result, 1)
	start := time.Now()
	go func() {
		sleep := func(until time.Duration) error {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Until(start.Add(until))):
				return nil
			}
		}
		if err := sleep(from); err != nil {
			ch <- result{err: err}
			return
		}
		t0 := time.Now()
		s0, err := roleSnapshot(ctx, sides, m)
		if err != nil {
			ch <- result{err: err}
			return
		}
		if err := sleep(to); err != nil {
			ch <- result{err: err}
			return
		}
		s1, err := roleSnapshot(ctx, sides, m)
		ch <- result{r: rolesSince(roleNames(sides), s0, s1), d: time.Since(t0), err: err}
	}()
	return func() (roleCPU, time.Duration, error) {
		res := <-ch
		return res.r, res.d, res.err
	}
}

// cpuByRole starts a roleWindow over a write phase of the given seconds,
// from 2 s in to 2 s before its end; done logs "<what>: CPU by role ...".
// A phase under 6 s gets no line.
func (e *env) cpuByRole(ctx context.Context, sides []side, m *mesh, seconds int) (done func(what string) error) {
	if seconds < 6 {
		return func(string) error { return nil }
	}
	wait := roleWindow(ctx, sides, m, 2*time.Second, time.Duration(seconds-2)*time.Second)
	return func(what string) error {
		r, d, err := wait()
		if err != nil {
			return fmt.Errorf("%s: CPU by role: %w", what, err)
		}
		e.logf("%s: CPU by role, s per 10 s (over %.0f s of the writes): %s", what, d.Seconds(), r.summary(d, runtime.NumCPU()))
		return nil
	}
}
