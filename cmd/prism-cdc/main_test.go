package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/logtest"
)

const goodConfig = `node: eu1
region: eu
database: "host=127.0.0.1 port=5433 user=postgres dbname=app"
listen: "127.0.0.1:7201"
auth: {insecure: true}
peers:
  - region: na
    nodes: [{name: na1, addr: "127.0.0.1:7101"}]
    database: "host=127.0.0.1 port=5432 user=postgres dbname=app"
log: {level: debug, format: json}
`

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestRun(t *testing.T) {
	// run sets the process's soft memory limit; the test binary gets its
	// own back.
	prevLimit := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(prevLimit) })
	good := writeFile(t, "eu1.yaml", goodConfig)
	smallWindow := writeFile(t, "small.yaml", goodConfig+"delivery: {max_in_flight: 1MiB}\n")
	badKey := writeFile(t, "bad.yaml", strings.Replace(goodConfig, `listen: "127.0.0.1:7201"`, `listen: "nowhere"`, 1))
	unknownKey := writeFile(t, "unknown.yaml", goodConfig+"delivery: {ack_timout: 1s}\n")
	notPEM := writeFile(t, "node.pem", "not a certificate\n")
	badTLS := writeFile(t, "tls.yaml", strings.Replace(goodConfig, "auth: {insecure: true}",
		fmt.Sprintf("auth: {token: t, tls: {cert: %q, key: %q, ca: %q}}", notPEM, notPEM, notPEM), 1))
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string // substrings; empty means no check
		wantStderr string
	}{
		{"no arguments", nil, exitUsage, "", "Usage:"},
		{"unknown command", []string{"bogus"}, exitUsage, "", `unknown command "bogus"`},
		{"top help", []string{"--help"}, exitOK, "Commands:", ""},
		{"top -h", []string{"-h"}, exitOK, "Commands:", ""},
		{"help command", []string{"help"}, exitOK, "Commands:", ""},
		{"help run", []string{"help", "run"}, exitOK, "Usage: prism-cdc run --config FILE", ""},
		{"help unknown", []string{"help", "bogus"}, exitUsage, "", `unknown command "bogus"`},
		{"version", []string{"version"}, exitOK, "prism-cdc dev " + runtime.Version(), ""},
		{"--version", []string{"--version"}, exitOK, "prism-cdc dev", ""},
		{"version help", []string{"version", "--help"}, exitOK, "Usage: prism-cdc version", ""},
		{"version extra", []string{"version", "x"}, exitUsage, "", `unexpected argument "x"`},
		{"version bad flag", []string{"version", "--nope"}, exitUsage, "", "flag provided but not defined: -nope"},
		{"run help", []string{"run", "--help"}, exitOK, "--config FILE", ""},
		{"doctor help", []string{"doctor", "-h"}, exitOK, "Usage: prism-cdc doctor --config FILE", ""},
		{"status help", []string{"status", "--help"}, exitOK, "Usage: prism-cdc status", ""},
		{"verify help", []string{"verify", "--help"}, exitOK, "Usage: prism-cdc verify", ""},
		{"run without config", []string{"run"}, exitUsage, "", "--config FILE is required"},
		{"run bad flag", []string{"run", "--conf", good}, exitUsage, "", "flag provided but not defined: -conf"},
		{"run extra argument", []string{"run", "--config", good, "extra"}, exitUsage, "", `unexpected argument "extra"`},
		{"run missing file", []string{"run", "--config", "/nonexistent/x.yaml"}, exitUsage, "", "no such file or directory"},
		{"run bad config", []string{"run", "--config", badKey}, exitUsage, "", `bad.yaml:4: listen: "nowhere" is not host:port`},
		{"doctor unknown key", []string{"doctor", "--config", unknownKey}, exitUsage, "", `delivery.ack_timout: unknown key`},
		// The node waits for its database until it is stopped (exit 0).
		{"run database unreachable", []string{"run", "--config", good}, exitOK, "", `"message":"database unavailable; waiting for it"`},
		{"doctor database unreachable", []string{"doctor", "--config=" + good}, exitFail, "[PROBLEM] database eu: unreachable", ""},
		{"status without http", []string{"status", "-config", good}, exitUsage, "", "has no http address"},
		{"verify database unreachable", []string{"verify", "--config", good}, exitFail, "", "verify: connect region eu"},
		// Files that exist but hold no certificate pass the validation;
		// loading them fails at once, as a configuration error.
		{"run unreadable tls files", []string{"run", "--config", badTLS}, exitUsage, "", `tls.yaml: auth.tls: `},
		{"logger from config", []string{"run", "--config", good}, exitOK, "", `"message":"configuration loaded"`},
		// 1 MiB of window plus 64 MiB of headroom.
		{"memory limit from the window", []string{"run", "--config", smallWindow}, exitOK, "", `"memory_limit_bytes":68157440,`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			// A signal after 1.5 s stops the commands that wait (run
			// waits for its database); the others are done by then.
			ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
			defer cancel()
			code := run(ctx, tc.args, &stdout, &stderr)
			logtest.CheckOutput(t, "stderr", stderr.Bytes())
			if code != tc.wantCode {
				t.Errorf("run(%q) = %d, want %d\nstdout: %s\nstderr: %s", tc.args, code, tc.wantCode, &stdout, &stderr)
			}
			if tc.wantStdout != "" && !strings.Contains(stdout.String(), tc.wantStdout) {
				t.Errorf("run(%q) stdout = %q, want it to contain %q", tc.args, &stdout, tc.wantStdout)
			}
			if tc.wantStderr != "" && !strings.Contains(stderr.String(), tc.wantStderr) {
				t.Errorf("run(%q) stderr = %q, want it to contain %q", tc.args, &stderr, tc.wantStderr)
			}
		})
	}
}

// TestMemoryLimit: a node's soft memory limit is its delivery window plus
// the headroom, and GOMEMLIMIT, when set, is left to the runtime.
func TestMemoryLimit(t *testing.T) {
	cfg, err := config.Load(writeFile(t, "eu1.yaml", goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	if got, set := memoryLimit(cfg, ""); !set || got != 128<<20 {
		t.Errorf("memoryLimit(default window) = %d, %v, want %d, true", got, set, 128<<20)
	}
	if got, set := memoryLimit(cfg, "300MiB"); set {
		t.Errorf("memoryLimit with GOMEMLIMIT = %d, true; want it left to the runtime", got)
	}
}

// TestProcs: the config's procs wins, GOMAXPROCS in the environment is
// left to the runtime, and otherwise a node takes a quarter of the CPUs,
// at least one.
func TestProcs(t *testing.T) {
	cfg, err := config.Load(writeFile(t, "eu1.yaml", goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		procs, avail int
		env          string
		want         int
		from         string
	}{
		{0, 1, "", 1, procsFromAuto},
		{0, 2, "", 1, procsFromAuto},
		{0, 8, "", 2, procsFromAuto},
		{0, 64, "", 16, procsFromAuto},
		{0, 6, "6", 6, procsFromEnv},
		{3, 6, "6", 3, procsFromConfig},
		{2, 64, "", 2, procsFromConfig},
	} {
		cfg.Procs = c.procs
		if n, from := procs(cfg, c.env, c.avail); n != c.want || from != c.from {
			t.Errorf("procs(procs %d, GOMAXPROCS %q, %d CPUs) = %d, %s; want %d, %s", c.procs, c.env, c.avail, n, from, c.want, c.from)
		}
	}
}

// TestUsageListsEveryCommand keeps usage and the command table in step.
func TestUsageListsEveryCommand(t *testing.T) {
	var buf bytes.Buffer
	usage(&buf)
	for _, c := range commands() {
		if !strings.Contains(buf.String(), "\n  "+strings.TrimSpace(c.name+" "+c.synopsis)+"\n      "+c.summary+"\n") {
			t.Errorf("usage does not list %q:\n%s", c.name, &buf)
		}
	}
}

// TestBinary builds the command with a version stamped in and checks the
// exit statuses a shell sees.
func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := filepath.Join(t.TempDir(), "prism-cdc")
	build := exec.Command("go", "build", "-ldflags", "-X main.version=v9.8.7", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	tests := []struct {
		args     []string
		wantCode int
		want     string
	}{
		{[]string{"version"}, exitOK, "prism-cdc v9.8.7 " + runtime.Version()},
		{[]string{"bogus"}, exitUsage, `unknown command "bogus"`},
		{[]string{"run", "--config", writeFile(t, "bad.yaml", "node: eu1\nnope: 1\n")}, exitUsage, `bad.yaml:2: nope: unknown key "nope"`},
	}
	for _, tc := range tests {
		out, err := exec.Command(bin, tc.args...).CombinedOutput()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("%s %q: %v", bin, tc.args, err)
		}
		if code != tc.wantCode || !strings.Contains(string(out), tc.want) {
			t.Errorf("prism-cdc %q = %d %q, want %d and %q", tc.args, code, out, tc.wantCode, tc.want)
		}
	}
}
