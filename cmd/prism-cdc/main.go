package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	_ "net/http/pprof" // served only when PRISM_PPROF is set
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
)

// version is the release version, set at build time with
// -ldflags "-X main.version=v1.2.3".
var version = "dev"

// Exit statuses.
const (
	exitOK    = 0 // success
	exitFail  = 1 // a finding or a failure
	exitUsage = 2 // bad usage or a bad configuration
)

func main() {
	if addr := os.Getenv("PRISM_PPROF"); addr != "" {
		// Opt-in profiling endpoint for performance work, on its own
		// address; it lives as long as the process.
		go func() { fmt.Fprintf(os.Stderr, "pprof: %v\n", http.ListenAndServe(addr, nil)) }()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// command is one subcommand. run receives the arguments after the command
// name and returns the exit status; ctx is cancelled on SIGINT or SIGTERM.
type command struct {
	name     string
	synopsis string // arguments, as shown in usage
	summary  string // one line, as shown in usage
	run      func(ctx context.Context, args []string, stdout, stderr io.Writer) int
}

// commands returns the subcommands in the order usage lists them.
func commands() []command {
	return []command{
		{"run", "--config FILE", "run one node until SIGINT/SIGTERM (graceful stop)", nodeCommand("run", runAction)},
		{"doctor", "--config FILE", "check the database and peers; explain every problem", nodeCommandWith("doctor", doctorCommand)},
		{"status", "--config FILE", "per-region table: acked LSN, lag, active path", nodeCommandWith("status", statusCommand)},
		{"verify", "--config FILE", "compare every replicated table across regions", nodeCommandWith("verify", verifyCommand)},
		{"bootstrap", "--config FILE --from REGION", "copy a peer region into this region and join it to replication", bootstrapCommand},
		{"deadletters", "list|retry --config FILE", "list parked transactions, or retry them (--id N | --all)", deadLettersCommand},
		{"skip", "--config FILE --source REGION --lsn LSN", "skip the transaction a region halted at", skipCommand},
		{"sequences", "--config FILE", "interleave this region's sequences with the other regions' (--apply)", nodeCommandWith("sequences", sequencesCommand)},
		{"version", "", "print the version and the Go version", versionCommand},
	}
}

// run dispatches args to a subcommand and returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return exitUsage
	}
	name, rest := args[0], args[1:]
	switch name {
	case "-h", "-help", "--help", "help":
		if name == "help" && len(rest) > 0 {
			if _, ok := lookup(rest[0]); ok {
				return run(ctx, []string{rest[0], "--help"}, stdout, stderr)
			}
			fmt.Fprintf(stderr, "prism-cdc help: unknown command %q\n\n", rest[0])
			usage(stderr)
			return exitUsage
		}
		usage(stdout)
		return exitOK
	case "-v", "-version", "--version":
		name = "version"
	}
	cmd, ok := lookup(name)
	if !ok {
		fmt.Fprintf(stderr, "prism-cdc: unknown command %q\n\n", name)
		usage(stderr)
		return exitUsage
	}
	return cmd.run(ctx, rest, stdout, stderr)
}

func lookup(name string) (command, bool) {
	for _, c := range commands() {
		if c.name == name {
			return c, true
		}
	}
	return command{}, false
}

// usage writes the top-level help.
func usage(w io.Writer) {
	fmt.Fprintf(w, "prism-cdc keeps regional copies of one PostgreSQL database in sync.\n\n")
	fmt.Fprintf(w, "Usage:\n  prism-cdc <command> [flags]\n\nCommands:\n")
	// Two lines per command: the invocation, then what it does, so long
	// synopses never push the summaries out of line.
	for _, c := range commands() {
		fmt.Fprintf(w, "  %s\n      %s\n", strings.TrimSpace(c.name+" "+c.synopsis), c.summary)
	}
	fmt.Fprintf(w, "\nRun 'prism-cdc <command> --help' for a command's flags.\n")
	fmt.Fprintf(w, "Exit status: 0 success, 1 finding or failure, 2 bad usage or bad config.\n")
}

// parseFlags parses args into fs. It returns done=true with the exit status
// when the command must stop: after --help (usage on stdout, status 0) or on
// a usage error (message and usage on stderr, status 2). Positional
// arguments are usage errors.
func parseFlags(fs *flag.FlagSet, c command, args []string, stdout, stderr io.Writer) (code int, done bool) {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		commandUsage(stdout, fs, c)
		return exitOK, true
	case err != nil:
		fmt.Fprintf(stderr, "prism-cdc %s: %v\n\n", c.name, err)
		commandUsage(stderr, fs, c)
		return exitUsage, true
	case fs.NArg() > 0:
		fmt.Fprintf(stderr, "prism-cdc %s: unexpected argument %q\n\n", c.name, fs.Arg(0))
		commandUsage(stderr, fs, c)
		return exitUsage, true
	}
	return exitOK, false
}

// commandUsage writes one subcommand's help.
func commandUsage(w io.Writer, fs *flag.FlagSet, c command) {
	fmt.Fprintf(w, "Usage: prism-cdc %s\n\n", strings.TrimSpace(c.name+" "+c.synopsis))
	fmt.Fprintf(w, "%s%s.\n", strings.ToUpper(c.summary[:1]), c.summary[1:])
	var flags strings.Builder
	fs.VisitAll(func(f *flag.Flag) {
		arg, help := flag.UnquoteUsage(f)
		fmt.Fprintf(&flags, "  %-16s %s\n", strings.TrimSpace("--"+f.Name+" "+arg), help)
	})
	if flags.Len() > 0 {
		fmt.Fprintf(w, "\nFlags:\n%s", flags.String())
	}
}

// versionCommand prints the version and the Go version.
func versionCommand(_ context.Context, args []string, stdout, stderr io.Writer) int {
	c, _ := lookup("version")
	fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
	if code, done := parseFlags(fs, c, args, stdout, stderr); done {
		return code
	}
	fmt.Fprintf(stdout, "prism-cdc %s %s %s/%s\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return exitOK
}
