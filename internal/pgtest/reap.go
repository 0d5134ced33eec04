package pgtest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ownerFile, in a cluster directory, holds the PID of the process that
// created the cluster. pg_ctl daemonizes the server, so a test process
// killed from outside (a timeout, kill -9) leaves its clusters running;
// the next process that creates a cluster stops and removes them.
const ownerFile = "owner.pid"

var reapOnce sync.Once

// makeDir creates c.Dir for a new cluster named c.Name, owned by the
// server's user, records this process as its owner, and (once per
// process) reaps the clusters of dead owners.
func (c *Cluster) makeDir() error {
	reapOnce.Do(func() { reapOrphans(os.TempDir()) })
	dir, err := os.MkdirTemp("", "prism-pg-"+c.Name+"-")
	if err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		os.RemoveAll(dir)
		return fmt.Errorf("pgtest: %w", err)
	}
	if err := c.chown(dir); err != nil {
		os.RemoveAll(dir)
		return err
	}
	c.Dir = dir
	return nil
}

// reapOrphans stops and removes every cluster under tmp whose owner
// process is gone. Directories without an owner file (being created right
// now, or made by something else) are left alone. It returns the
// directories it removed.
func reapOrphans(tmp string) []string {
	dirs, _ := filepath.Glob(filepath.Join(tmp, "prism-pg-*"))
	var reaped []string
	for _, dir := range dirs {
		b, err := os.ReadFile(filepath.Join(dir, ownerFile))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 || alive(pid) {
			continue
		}
		c := &Cluster{Name: filepath.Base(dir), Dir: dir}
		if os.Geteuid() == 0 {
			c.asUser = "postgres"
		}
		if bin, err := BinDir(); err == nil {
			c.bin = bin
		}
		if _, err := os.Stat(filepath.Join(c.dataDir(), "postmaster.pid")); err == nil {
			c.run(time.Minute, "pg_ctl", "-D", c.dataDir(), "-w", "-m", "immediate", "stop")
		}
		if os.RemoveAll(dir) == nil {
			reaped = append(reaped, dir)
		}
	}
	return reaped
}

// alive reports whether process pid exists.
func alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
