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

// sequencesCommand prints (or with --apply carries out) the plan that
// interleaves this region's sequences with the other regions'.
func sequencesCommand(fs *flag.FlagSet) nodeAction {
	apply := fs.Bool("apply", false, "alter the sequences (without it the plan is only printed)")
	return func(ctx context.Context, _ string, cfg *config.Config, _ zerolog.Logger, stdout, stderr io.Writer) int {
		var plan doctor.SequencePlan
		var err error
		if *apply {
			plan, err = doctor.ApplySequences(ctx, cfg)
		} else {
			plan, err = doctor.PlanSequences(ctx, cfg)
		}
		if err != nil {
			fmt.Fprintf(stderr, "prism-cdc sequences: %s\n", config.RedactDSN(err.Error()))
			return exitFail
		}
		if err := plan.Write(stdout); err != nil {
			fmt.Fprintf(stderr, "prism-cdc sequences: %v\n", err)
			return exitFail
		}
		switch n := plan.Changes(); {
		case n == 0:
			fmt.Fprintln(stdout, "nothing to change")
		case *apply:
			fmt.Fprintf(stdout, "altered %d sequences; run the same command in every other region\n", n)
		default:
			fmt.Fprintf(stdout, "%d sequences to change; run again with --apply (in every region)\n", n)
		}
		return exitOK
	}
}
