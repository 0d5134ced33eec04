package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// clockTicks is USER_HZ, the unit of the times in /proc/<pid>/stat; it is
// 100 on every Linux architecture Go supports.
const clockTicks = 100

// procTimes are a process's CPU times in seconds, from /proc/<pid>/stat.
type procTimes struct {
	ppid     int
	self     float64 // utime + stime
	children float64 // cutime + cstime: waited-for children that exited
}

// readProcTimes reads /proc/<pid>/stat.
func readProcTimes(pid int) (procTimes, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procTimes{}, fmt.Errorf("read stat of %d: %w", pid, err)
	}
	return parseStat(b)
}

// parseStat parses the fields after the command name, which may contain
// spaces and parentheses, so it is skipped up to the last ')'.
func parseStat(b []byte) (procTimes, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procTimes{}, fmt.Errorf("parse stat: no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); ppid is field 4, utime..cstime 14..17.
	if len(f) < 15 {
		return procTimes{}, fmt.Errorf("parse stat: %d fields", len(f))
	}
	var v [4]float64
	for k := 0; k < 4; k++ {
		n, err := strconv.ParseInt(f[11+k], 10, 64)
		if err != nil {
			return procTimes{}, fmt.Errorf("parse stat: %w", err)
		}
		v[k] = float64(n) / clockTicks
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return procTimes{}, fmt.Errorf("parse stat: %w", err)
	}
	return procTimes{ppid: ppid, self: v[0] + v[1], children: v[2] + v[3]}, nil
}

// procCPU returns a process's own CPU seconds.
func procCPU(pid int) (float64, error) {
	t, err := readProcTimes(pid)
	return t.self, err
}

// procMemKB returns VmRSS and VmHWM (peak RSS) of a process in kB.
func procMemKB(pid int) (rss, hwm int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, fmt.Errorf("read status of %d: %w", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		var dst *int64
		switch {
		case strings.HasPrefix(line, "VmRSS:"):
			dst = &rss
		case strings.HasPrefix(line, "VmHWM:"):
			dst = &hwm
		default:
			continue
		}
		fs := strings.Fields(line)
		if len(fs) >= 2 {
			*dst, _ = strconv.ParseInt(fs[1], 10, 64)
		}
	}
	return rss, hwm, sc.Err()
}

// treeCPU returns the CPU seconds used so far by the process tree under
// root: the root's own and its exited children's time, plus every live
// child's own and exited children's time. For a postmaster this is the
// whole cluster, including backends that have exited since.
func treeCPU(root int) (float64, error) {
	rt, err := readProcTimes(root)
	if err != nil {
		return 0, err
	}
	total := rt.self + rt.children
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0, fmt.Errorf("read /proc: %w", err)
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == root {
			continue
		}
		t, err := readProcTimes(pid)
		if err != nil || t.ppid != root {
			continue // gone meanwhile, or not ours
		}
		total += t.self + t.children
	}
	return total, nil
}

// postmasterPID reads the postmaster's PID from a data directory.
func postmasterPID(dataDir string) (int, error) {
	b, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		return 0, fmt.Errorf("read postmaster.pid: %w", err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		return 0, fmt.Errorf("parse postmaster.pid: %w", err)
	}
	return pid, nil
}
