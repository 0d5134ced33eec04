package main

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/node"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// TestCommandsGiveUpOnSilentDatabase: the command-line tools connect with
// the node's bound (node.ConnectTimeout) when the DSN sets none, so a
// database that accepts the connection and never answers fails them with
// a timeout instead of hanging a script for ever.
func TestCommandsGiveUpOnSilentDatabase(t *testing.T) {
	defer func(d time.Duration) { node.ConnectTimeout = d }(node.ConnectTimeout)
	node.ConnectTimeout = time.Second
	port := pgtest.SilentListener(t)
	cfg := writeFile(t, "eu1.yaml", strings.Replace(goodConfig,
		`database: "host=127.0.0.1 port=5433 user=postgres dbname=app"`,
		fmt.Sprintf(`database: "host=127.0.0.1 port=%d user=postgres dbname=app sslmode=disable"`, port), 1))
	for _, args := range [][]string{
		{"verify", "--config", cfg},
		{"deadletters", "list", "--config", cfg},
		{"sequences", "--config", cfg},
	} {
		t.Run(args[0], func(t *testing.T) {
			// Without the bound the command waits until this context ends.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var stdout, stderr bytes.Buffer
			t0 := time.Now()
			code := run(ctx, args, &stdout, &stderr)
			took := time.Since(t0)
			if code == exitOK || took > 15*time.Second || !strings.Contains(stderr.String(), "timeout") {
				t.Fatalf("%s against a silent database: exit %d after %s, stderr:\n%s\nwant a failure naming the timeout within seconds",
					strings.Join(args[:len(args)-2], " "), code, took.Round(time.Millisecond), stderr.String())
			}
		})
	}
}
