package node

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/peers"
)

// errDatabaseSettings reports a database that answers but lacks what
// prism-cdc needs (wal_level, REPLICATION); waiting does not fix it.
var errDatabaseSettings = errors.New("database not ready for prism-cdc")

// redactedError hides DSN passwords in an error's text and keeps its chain,
// so the error can still be classified by SQLSTATE.
type redactedError struct{ err error }

func (e redactedError) Error() string { return config.RedactDSN(e.err.Error()) }
func (e redactedError) Unwrap() error { return e.err }

// Preflight checks what the node needs from its region's database before it
// starts: reachable, wal_level=logical, a role that may replicate. Each
// error says how to fix it. Problems that do not stop replication are
// logged as warnings.
func Preflight(ctx context.Context, dsn string, log zerolog.Logger) error {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return fmt.Errorf("database unreachable: %w (check the database key and that Postgres runs)", redactedError{err})
	}
	defer conn.Close(ctx)
	var walLevel, trackTS string
	var repl, super bool
	err = conn.QueryRow(ctx, `SELECT current_setting('wal_level'), current_setting('track_commit_timestamp'),
		r.rolreplication, r.rolsuper FROM pg_roles r WHERE r.rolname = current_user`).Scan(&walLevel, &trackTS, &repl, &super)
	if err != nil {
		return fmt.Errorf("read database settings: %w", redactedError{err})
	}
	var problems []string
	if walLevel != "logical" {
		problems = append(problems, fmt.Sprintf("wal_level is %q: set wal_level = logical in postgresql.conf and restart Postgres", walLevel))
	}
	if !repl && !super {
		problems = append(problems, "the role has no REPLICATION privilege: ALTER ROLE <role> WITH REPLICATION")
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w:\n  - %s", errDatabaseSettings, strings.Join(problems, "\n  - "))
	}
	if trackTS != "on" {
		log.Warn().Msg("track_commit_timestamp is off: last_write_wins cannot compare local commit times; set track_commit_timestamp = on and restart Postgres")
	}
	return nil
}

// applyOptions are the options of an applier into localRegion's
// database that resolves conflicts by conflicts and applies schema
// changes by ddl.
func (n *Node) applyOptions(localRegion string, conflicts config.Conflicts, ddl config.DDLMode) []apply.Option {
	perTable := make(map[string]apply.Policy, len(conflicts.Tables))
	for t, p := range conflicts.Tables {
		perTable[t] = apply.Policy(p)
	}
	return []apply.Option{
		apply.WithLocalRegion(localRegion),
		apply.WithConflicts(apply.Policy(conflicts.Default), perTable),
		apply.WithDDL(ddl == config.DDLReplicate),
	}
}

// serverApplyOptions are applyOptions for the applier of the transactions
// other regions' nodes ship here: it flushes lazily (apply.WithLazyFlush),
// and the peer server acknowledges by the durable progress.
func (n *Node) serverApplyOptions() []apply.Option {
	return append(n.applyOptions(n.cfg.Region, n.cfg.Conflicts, n.cfg.DDL), apply.WithLazyFlush())
}

// fallback opens the direct-SQL path to a peer region's database: the same
// apply code and the same replication origin as that region's nodes use.
func (n *Node) fallback(p config.Peer) peers.Fallback {
	if p.Database == "" {
		return nil
	}
	return func(ctx context.Context) (peers.Applier, func(), error) {
		pool, err := apply.NewPool(ctx, p.Database)
		if err != nil {
			return nil, nil, fmt.Errorf("fallback database of region %s: %s", p.Region, config.RedactDSN(err.Error()))
		}
		if err := pool.Ping(ctx); err != nil {
			pool.Close()
			return nil, nil, fmt.Errorf("fallback database of region %s: %s", p.Region, config.RedactDSN(err.Error()))
		}
		log := n.log.With().Str("component", "fallback").Str("target", p.Region).Logger()
		conflicts, ddl := fallbackSettings(ctx, pool, n.cfg, p.Region, log)
		// Whether the region's own schema changes are captured is its
		// nodes' business: the fallback installs no event trigger there.
		a := apply.NewApplier(pool, log, append(n.applyOptions(p.Region, conflicts, ddl), apply.WithoutDDLCapture())...)
		if err := a.Setup(ctx); err != nil {
			pool.Close()
			return nil, nil, fmt.Errorf("fallback database of region %s: %w", p.Region, err)
		}
		return a, func() { a.Close(); pool.Close() }, nil
	}
}

// tlsConfigs loads the auth.tls files; a failure is a *config.Error.
func (n *Node) tlsConfigs() (server, client *tls.Config, err error) {
	t := n.cfg.Auth.TLS
	if !t.Enabled() {
		return nil, nil, nil
	}
	server, client, err = peers.TLSConfigs(t.Cert, t.Key, t.CA)
	if err != nil {
		return nil, nil, &config.Error{File: n.cfg.Path, Key: "auth.tls", Msg: err.Error()}
	}
	return server, client, nil
}

// plaintext reports whether peer traffic runs without TLS: with
// auth.insecure, or with a token but no auth.tls files. The token is still
// required and checked in the second case.
func (n *Node) plaintext() bool {
	return n.cfg.Auth.Insecure || !n.cfg.Auth.TLS.Enabled()
}
