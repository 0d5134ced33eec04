package main

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// The contenders.
const (
	recvText   = "pg_recvlogical text (1 slot)"
	recvBinary = "pg_recvlogical binary (1 slot)"
	native     = "native subscriptions (2 regions)"
	prism      = "prism-cdc (2 regions)"
	// pglogical is pglogical in the backlog and lag scenarios: the
	// source's two subscribers of a three-node mesh.
	pglogical = "pglogical (2 regions)"
)

// drain is one contender's catch-up to a target position.
type drain struct {
	contender string
	// confirmed is the time until every slot of the contender had
	// confirmed_flush_lsn at or past the target position.
	confirmed time.Duration
	// applied is the time until the marker row was visible in every
	// region; 0 for pg_recvlogical, which applies nothing.
	applied   time.Duration
	clientCPU float64            // CPU s of the contender's own processes (pg_recvlogical, prism-cdc)
	serverCPU float64            // CPU s of every PostgreSQL cluster during the drain
	perServer map[string]float64 // CPU s per cluster during the drain
	peakKB    map[string]int64   // peak RSS per client process
	note      string
}

// drainRecv runs pg_recvlogical on slot until it passes end and times it.
func (e *env) drainRecv(ctx context.Context, slot string, binary bool, end pglogrepl.LSN) (drain, error) {
	name := recvText
	args := []string{"-d", e.src.DSN(db), "--slot", slot, "--start", "-E", end.String(), "-f", "/dev/null",
		"--no-loop", "-F", "0", "-s", "1", "-o", "proto_version=1", "-o", "publication_names=prism"}
	if binary {
		name = recvBinary
		args = append(args, "-o", "binary=true")
	}
	d := drain{contender: name, peakKB: map[string]int64{}}
	cpu0, err := e.cpuSnapshot()
	if err != nil {
		return d, err
	}
	cmd := exec.CommandContext(ctx, filepath.Join(e.pgBin, "pg_recvlogical"), args...)
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	d.confirmed = time.Since(t0)
	if err != nil {
		return d, fmt.Errorf("pg_recvlogical on %s: %w\n%s", slot, err, tail(string(out), 10))
	}
	// Let the postmaster reap the walsender, so its CPU time is counted.
	time.Sleep(200 * time.Millisecond)
	cpu1, err := e.cpuSnapshot()
	if err != nil {
		return d, err
	}
	d.serverCPU, d.perServer = cpu1.since(cpu0)
	st := cmd.ProcessState
	d.clientCPU = (st.UserTime() + st.SystemTime()).Seconds()
	if ru, ok := st.SysUsage().(*syscall.Rusage); ok {
		d.peakKB["pg_recvlogical"] = ru.Maxrss
	}
	got, err := queryLSN(ctx, e.src, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot)
	if err != nil {
		return d, err
	}
	if got < end {
		// pg_recvlogical stops at the end position without always
		// reporting it; advance the slot untimed so the next run starts
		// where the others do.
		if err := e.src.Exec(ctx, db, fmt.Sprintf("SELECT pg_replication_slot_advance('%s', '%s')", slot, end)); err != nil {
			return d, err
		}
	}
	return d, nil
}

// watcher polls the source slots and the regions' marker rows.
type watcher struct {
	src     *pgx.Conn
	regions []*pgx.Conn
}

func (e *env) newWatcher(ctx context.Context, regions []*pgtest.Cluster) (*watcher, error) {
	w := &watcher{}
	var err error
	if w.src, err = e.src.Connect(ctx, db); err != nil {
		return nil, err
	}
	for _, c := range regions {
		conn, err := c.Connect(ctx, db)
		if err != nil {
			w.close(ctx)
			return nil, err
		}
		w.regions = append(w.regions, conn)
	}
	return w, nil
}

func (w *watcher) close(ctx context.Context) {
	ctx = context.WithoutCancel(ctx)
	if w.src != nil {
		w.src.Close(ctx)
	}
	for _, c := range w.regions {
		c.Close(ctx)
	}
}

// confirmed reports whether every slot has confirmed end.
func (w *watcher) confirmed(ctx context.Context, end pglogrepl.LSN, slots ...string) (bool, error) {
	for _, s := range slots {
		got, err := slotConfirmed(ctx, w.src, s)
		if err != nil || got < end {
			return false, err
		}
	}
	return true, nil
}

// applied reports whether marker is visible in every region.
func (w *watcher) applied(ctx context.Context, marker int) (bool, error) {
	for _, c := range w.regions {
		ok, err := hasMarker(ctx, c, marker)
		if err != nil || !ok {
			return false, err
		}
	}
	return true, nil
}

// pollInterval is how often drains check progress.
const pollInterval = 50 * time.Millisecond

// waitDrain polls until the slots confirmed end and marker is applied,
// recording both times from t0. tick runs at every poll and may fail.
func (w *watcher) waitDrain(ctx context.Context, d *drain, t0 time.Time, timeout time.Duration, end pglogrepl.LSN, marker int, slots []string, tick func() error) error {
	return pollUntil(ctx, timeout, pollInterval, d.contender+" to catch up to "+end.String(), func() (bool, error) {
		if tick != nil {
			if err := tick(); err != nil {
				return false, err
			}
		}
		if d.applied == 0 {
			ok, err := w.applied(ctx, marker)
			if err != nil {
				return false, err
			}
			if ok {
				d.applied = time.Since(t0)
			}
		}
		if d.confirmed == 0 {
			ok, err := w.confirmed(ctx, end, slots...)
			if err != nil {
				return false, err
			}
			if ok {
				d.confirmed = time.Since(t0)
			}
		}
		return d.applied > 0 && d.confirmed > 0, nil
	})
}

// setSubscriptions enables or disables the native subscriptions; when
// disabling, it waits until their slots are released.
func (e *env) setSubscriptions(ctx context.Context, on bool) error {
	verb := "DISABLE"
	if on {
		verb = "ENABLE"
	}
	for _, c := range e.native {
		if err := c.Exec(ctx, db, "ALTER SUBSCRIPTION bench_sub "+verb); err != nil {
			return err
		}
	}
	if on {
		return nil
	}
	return e.waitSlotsReleased(ctx, "native subscriptions to release their slots", "slot_name LIKE 'bench_sub_%'")
}

// waitSlotsReleased waits until no source slot that where selects in
// pg_replication_slots is active; what names the wait in its error.
func (e *env) waitSlotsReleased(ctx context.Context, what, where string) error {
	conn, err := e.src.Connect(ctx, db)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return pollUntil(ctx, time.Minute, pollInterval, what, func() (bool, error) {
		var n int
		err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_replication_slots WHERE "+where+" AND active").Scan(&n)
		return n == 0, err
	})
}

var nativeSlots = []string{"bench_sub_eu", "bench_sub_as"}

// drainNative enables both subscriptions and times their catch-up to end.
func (e *env) drainNative(ctx context.Context, end pglogrepl.LSN, marker int, timeout time.Duration) (drain, error) {
	return e.drainSubscriptions(ctx, native, e.native[:], e.setSubscriptions, nativeSlots, end, marker, timeout)
}

// drainSubscriptions times a subscription-based contender: it turns the
// subscriptions to the source on with enable, waits until slots reach end
// and the marker row is in every region, records the servers' CPU, and
// turns them off again.
func (e *env) drainSubscriptions(ctx context.Context, contender string, regions []*pgtest.Cluster,
	enable func(context.Context, bool) error, slots []string, end pglogrepl.LSN, marker int, timeout time.Duration) (drain, error) {
	d := drain{contender: contender, peakKB: map[string]int64{}}
	w, err := e.newWatcher(ctx, regions)
	if err != nil {
		return d, err
	}
	defer w.close(ctx)
	cpu0, err := e.cpuSnapshot()
	if err != nil {
		return d, err
	}
	t0 := time.Now()
	if err := enable(ctx, true); err != nil {
		return d, err
	}
	werr := w.waitDrain(ctx, &d, t0, timeout, end, marker, slots, nil)
	cpu1, err := e.cpuSnapshot()
	if err != nil {
		return d, err
	}
	d.serverCPU, d.perServer = cpu1.since(cpu0)
	if err := enable(ctx, false); err != nil {
		return d, err
	}
	return d, werr
}

// drainPrism starts the three prism-cdc nodes and times the catch-up of
// slot prism_na to end. A node whose RSS passes capKB (when > 0) is
// killed and the drain fails.
func (e *env) drainPrism(ctx context.Context, tag string, end pglogrepl.LSN, marker int, timeout time.Duration, capKB int64) (drain, error) {
	d := drain{contender: prism, peakKB: map[string]int64{}}
	w, err := e.newWatcher(ctx, e.prismc[:])
	if err != nil {
		return d, err
	}
	defer w.close(ctx)
	if err := e.resetStatements(ctx); err != nil {
		return d, err
	}
	cpu0, err := e.cpuSnapshot()
	if err != nil {
		return d, err
	}
	t0 := time.Now()
	m, err := e.startMesh(ctx, tag, e.cfg.nodeEnv)
	if err != nil {
		return d, err
	}
	tick := func() error {
		if err := m.sample(); err != nil {
			return err
		}
		if capKB <= 0 {
			return nil
		}
		for _, p := range m.procs {
			if rss, _, err := procMemKB(p.cmd.Process.Pid); err == nil && rss > capKB {
				return fmt.Errorf("node %s uses %d MB, over the %d MB cap; killed", p.spec.name, rss>>10, capKB>>10)
			}
		}
		return nil
	}
	werr := w.waitDrain(ctx, &d, t0, timeout, end, marker, []string{"prism_na"}, tick)
	cpu1, err := e.cpuSnapshot()
	if err != nil {
		m.kill()
		return d, err
	}
	d.serverCPU, d.perServer = cpu1.since(cpu0)
	if ac, err := m.applyCounts(ctx); err == nil {
		e.logf("%s: the regions applied %s", tag, applySummary(nil, ac))
	} else {
		e.logf("%s: apply counters: %v", tag, err)
	}
	e.logStatements(ctx, tag)
	e.logProcesses(tag)
	if werr != nil {
		m.kill()
	} else {
		m.stop()
	}
	for _, p := range m.procs {
		peak, cpu := p.stats()
		d.peakKB[p.spec.name] = peak
		d.clientCPU += cpu
	}
	return d, werr
}
