package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/logging"
	"github.com/prism-cdc/prism-cdc/internal/node"
)

// nodeAction is the work of a subcommand that acts for one node, called once
// its configuration is loaded and validated and the root logger is built. It
// returns the exit status. Logs go to stderr; results for the operator go to
// stdout.
type nodeAction func(ctx context.Context, name string, cfg *config.Config, log zerolog.Logger, stdout, stderr io.Writer) int

// nodeCommand returns the runner of a subcommand that takes --config FILE:
// it parses the flags, loads and validates the configuration (exit 2 with
// every problem on stderr when it is bad), builds the root logger from the
// log section and calls action.
func nodeCommand(name string, action nodeAction) func(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return nodeCommandWith(name, func(*flag.FlagSet) nodeAction { return action })
}

// loadNode loads and validates the configuration at path (with its
// connection attempts bounded, node.BoundConnect) and builds the root
// logger. When it cannot, it reports why on stderr and returns
// ok=false with the exit status.
func loadNode(name, path string, stderr io.Writer) (cfg *config.Config, log zerolog.Logger, code int, ok bool) {
	cfg, err := config.Load(path)
	if err != nil {
		fmt.Fprintf(stderr, "prism-cdc %s: bad config %s:\n%s\n", name, path, indent(err))
		return nil, log, exitUsage, false
	}
	log, err = logging.New(stderr, cfg.Log)
	if err != nil {
		fmt.Fprintf(stderr, "prism-cdc %s: bad config %s: %v\n", name, path, err)
		return nil, log, exitUsage, false
	}
	log = log.With().Str("node", cfg.Node).Str("region", cfg.Region).Logger()
	log.Debug().Str("command", name).Object("config", cfg).Msg("configuration loaded")
	// A database that accepts the connection and never answers fails a
	// command after node.ConnectTimeout instead of hanging it.
	return node.BoundConnect(cfg), log, exitOK, true
}

// indent lists each problem of a (joined) error on its own indented line.
func indent(err error) string {
	var lines []string
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			lines = append(lines, "  "+e.Error())
		}
	} else if err != nil {
		lines = append(lines, "  "+err.Error())
	}
	return strings.Join(lines, "\n")
}
