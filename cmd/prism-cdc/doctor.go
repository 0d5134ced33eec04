package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/doctor"
)

// nodeCommandWith is nodeCommand for a subcommand with flags beyond
// --config: define adds them to the flag set and returns the action, which
// reads their values once they are parsed.
func nodeCommandWith(name string, define func(fs *flag.FlagSet) nodeAction) func(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) int {
		c, _ := lookup(name)
		fs := flag.NewFlagSet(name, flag.ContinueOnError)
		path := fs.String("config", "", "YAML configuration `FILE` of this node (see configs/)")
		action := define(fs)
		if code, done := parseFlags(fs, c, args, stdout, stderr); done {
			return code
		}
		if *path == "" {
			fmt.Fprintf(stderr, "prism-cdc %s: --config FILE is required\n\n", name)
			commandUsage(stderr, fs, c)
			return exitUsage
		}
		cfg, log, code, ok := loadNode(name, *path, stderr)
		if !ok {
			return code
		}
		return action(ctx, name, cfg, log, stdout, stderr)
	}
}

// doctorCommand checks the node's database, peers and fallbacks and prints
// every finding with its fix. Exit status 1 when a finding blocks
// replication.
func doctorCommand(fs *flag.FlagSet) nodeAction {
	asJSON := fs.Bool("json", false, "print the findings as JSON")
	return func(ctx context.Context, _ string, cfg *config.Config, _ zerolog.Logger, stdout, stderr io.Writer) int {
		rep := doctor.Run(ctx, cfg, doctor.Options{})
		var err error
		if *asJSON {
			err = rep.WriteJSON(stdout)
		} else {
			err = rep.Write(stdout)
		}
		if err != nil {
			fmt.Fprintf(stderr, "prism-cdc doctor: %v\n", err)
			return exitFail
		}
		if rep.Blocking() {
			return exitFail
		}
		return exitOK
	}
}
