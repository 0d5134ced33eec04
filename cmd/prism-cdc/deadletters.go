package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// deadLettersCommand runs `prism-cdc deadletters list|retry`, on this
// region's database (the database key of --config).
func deadLettersCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	c, _ := lookup("deadletters")
	sub := ""
	if len(args) > 0 && (args[0] == "list" || args[0] == "retry") {
		sub, args = args[0], args[1:]
	}
	fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
	path := fs.String("config", "", "YAML configuration `FILE` of a node of the region (see configs/)")
	source := fs.String("source", "", "list: only transactions of this source `REGION`")
	status := fs.String("status", "", "list: only this `STATUS` (halted, parked, retried, skipped, undo_requested, undone, undo_conflict, undo_failed)")
	changes := fs.Bool("changes", false, "list: print each transaction's changes")
	id := fs.Int64("id", 0, "retry: the dead letter `ID` to retry")
	all := fs.Bool("all", false, "retry: every parked transaction, oldest first")
	if code, done := parseFlags(fs, c, args, stdout, stderr); done {
		return code
	}
	usageErr := func(msg string) int {
		fmt.Fprintf(stderr, "prism-cdc deadletters: %s\n\n", msg)
		commandUsage(stderr, fs, c)
		return exitUsage
	}
	switch {
	case sub == "":
		return usageErr("write list or retry after deadletters")
	case *path == "":
		return usageErr("--config FILE is required")
	case sub == "retry" && (*id == 0) == !*all:
		return usageErr("retry needs either --id N or --all")
	}
	cfg, log, code, ok := loadNode("deadletters", *path, stderr)
	if !ok {
		return code
	}
	a, closeDB, err := openApplier(ctx, cfg, log)
	if err != nil {
		fmt.Fprintf(stderr, "prism-cdc deadletters: %v\n", err)
		return exitFail
	}
	defer closeDB()
	if sub == "list" {
		var statuses []string
		if *status != "" {
			statuses = []string{*status}
		}
		dls, err := a.DeadLetters(ctx, *source, statuses...)
		if err != nil {
			fmt.Fprintf(stderr, "prism-cdc deadletters: %s\n", config.RedactDSN(err.Error()))
			return exitFail
		}
		printDeadLetters(stdout, cfg.Region, dls, *changes)
		return exitOK
	}
	ids := []int64{*id}
	if *all {
		dls, err := a.DeadLetters(ctx, "", apply.StatusParked)
		if err != nil {
			fmt.Fprintf(stderr, "prism-cdc deadletters: %s\n", config.RedactDSN(err.Error()))
			return exitFail
		}
		ids = ids[:0]
		for _, d := range dls {
			ids = append(ids, d.ID)
		}
	}
	failed := 0
	for _, i := range ids {
		if err := retryBusy(ctx, func() error { return a.Retry(ctx, i) }); err != nil {
			failed++
			fmt.Fprintf(stdout, "dead letter %d: still parked: %s\n", i, config.RedactDSN(err.Error()))
			continue
		}
		fmt.Fprintf(stdout, "dead letter %d: applied\n", i)
	}
	fmt.Fprintf(stdout, "%d retried, %d still parked\n", len(ids)-failed, failed)
	if failed > 0 {
		return exitFail
	}
	return exitOK
}

// skipCommand runs `prism-cdc skip`: it skips the transaction at which
// replication from a source region halted, in this region's database.
func skipCommand(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	c, _ := lookup("skip")
	fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
	path := fs.String("config", "", "YAML configuration `FILE` of a node of the halted (target) region")
	source := fs.String("source", "", "the source `REGION` whose transaction is skipped")
	lsnFlag := fs.String("lsn", "", "end `LSN` of the halted transaction, as status and the logs show it")
	note := fs.String("note", "", "why it is skipped, recorded in prism.dead_letters")
	if code, done := parseFlags(fs, c, args, stdout, stderr); done {
		return code
	}
	lsn, lerr := pglogrepl.ParseLSN(*lsnFlag)
	if *path == "" || *source == "" || *lsnFlag == "" || lerr != nil {
		fmt.Fprintf(stderr, "prism-cdc skip: --config FILE, --source REGION and --lsn LSN (e.g. 0/1A2B3C4) are required\n\n")
		commandUsage(stderr, fs, c)
		return exitUsage
	}
	cfg, log, code, ok := loadNode("skip", *path, stderr)
	if !ok {
		return code
	}
	a, closeDB, err := openApplier(ctx, cfg, log)
	if err != nil {
		fmt.Fprintf(stderr, "prism-cdc skip: %v\n", err)
		return exitFail
	}
	defer closeDB()
	if err := retryBusy(ctx, func() error { return a.Skip(ctx, *source, lsn, *note) }); err != nil {
		fmt.Fprintf(stderr, "prism-cdc skip: %s\n", config.RedactDSN(err.Error()))
		if errors.Is(err, apply.ErrNotHalted) {
			fmt.Fprintf(stderr, "list the halted transactions with: prism-cdc deadletters list --config %s --status halted\n", cfg.Path)
		}
		return exitFail
	}
	fmt.Fprintf(stdout, "skipped transaction %s of region %s in region %s; it stays recorded in prism.dead_letters (status skipped)\n", lsn, *source, cfg.Region)
	return exitOK
}

// retryBusy runs fn until it does not fail with apply.ErrBusy (the origin
// is held by a node applying the same source right now), for up to 30s.
func retryBusy(ctx context.Context, fn func() error) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := fn()
		if !errors.Is(err, apply.ErrBusy) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// openApplier opens this region's database with the node's conflict
// settings.
func openApplier(ctx context.Context, cfg *config.Config, log zerolog.Logger) (*apply.Applier, func(), error) {
	pool, err := apply.NewPool(ctx, cfg.Database)
	if err != nil {
		return nil, nil, fmt.Errorf("database: %s", config.RedactDSN(err.Error()))
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, nil, fmt.Errorf("database: %s", config.RedactDSN(err.Error()))
	}
	perTable := make(map[string]apply.Policy, len(cfg.Conflicts.Tables))
	for t, p := range cfg.Conflicts.Tables {
		perTable[t] = apply.Policy(p)
	}
	a := apply.NewApplier(pool, log, apply.WithLocalRegion(cfg.Region),
		apply.WithConflicts(apply.Policy(cfg.Conflicts.Default), perTable), apply.WithApplicationName(decode.AppName("cli")),
		apply.WithDDL(cfg.DDL == config.DDLReplicate))
	return a, func() { a.Close(); pool.Close() }, nil
}

func printDeadLetters(w io.Writer, region string, dls []*apply.DeadLetter, changes bool) {
	if len(dls) == 0 {
		fmt.Fprintf(w, "no dead letters in region %s\n", region)
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSOURCE\tEND LSN\tXID\tCOMMITTED\tTABLE\tSTATUS\tATTEMPTS\tPARKED\tSQLSTATE\tERROR")
	for _, d := range dls {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", d.ID, d.SourceRegion, d.EndLSN, d.Xid,
			d.CommitTime.UTC().Format(time.RFC3339), d.Table, d.Status, d.Attempts, d.ParkedAt.UTC().Format(time.RFC3339), d.SQLState, d.Message)
	}
	tw.Flush()
	for _, d := range dls {
		if d.Note != "" {
			fmt.Fprintf(w, "%d: %s\n", d.ID, d.Note)
		}
		if changes {
			fmt.Fprintf(w, "%d changes: %s\n", d.ID, d.Changes)
		}
	}
}
