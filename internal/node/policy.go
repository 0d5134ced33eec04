package node

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync/atomic"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
	"github.com/prism-cdc/prism-cdc/pkg/peers"
)

// errorPolicy carries out on_apply_error (and on_apply_error_tables, by the
// table of the failing change) for a target database: the node's own
// applier, or a direct-SQL fallback's.
//
//   - halt: the failure is recorded in prism.dead_letters with status
//     halted (the origin does not move) and the source's shipper retries
//     until the cause is fixed or the transaction is skipped;
//   - dead_letter: the transaction is parked in prism.dead_letters and the
//     origin passes it in the same database transaction;
//   - undo: parked like dead_letter with status undo_requested, and the
//     source is asked to revert it.
//
// The direct-SQL fallback to a region follows that region's policy, which
// its nodes record in its database (apply.RecordPolicy) when they start:
// a transaction that fails in a region is handled as the region chose,
// whether its node or another region's fallback applied it. Only where no
// node of the region has recorded one does the fallback follow this
// node's own configuration (and says so once).
type errorPolicy struct {
	cfg *config.Config
	log zerolog.Logger
	// target is the region whose database a fallback applies to; empty
	// for the node's own applier.
	target string
	// unrecorded is set once the fallback warned that target has no
	// recorded policy.
	unrecorded atomic.Bool
}

func newErrorPolicy(cfg *config.Config, log zerolog.Logger) *errorPolicy {
	return &errorPolicy{cfg: cfg, log: log.With().Str("component", "policy").Logger()}
}

// newFallbackPolicy returns the errorPolicy of the direct-SQL fallback to
// region target.
func newFallbackPolicy(cfg *config.Config, log zerolog.Logger, target string) *errorPolicy {
	p := newErrorPolicy(cfg, log)
	p.target = target
	p.log = p.log.With().Str("target", target).Logger()
	return p
}

// failedTable returns the table of an apply failure's change, if known.
func failedTable(err error) string {
	var ae *apply.Error
	if errors.As(err, &ae) {
		return ae.Table
	}
	return ""
}

// policyFor returns the policy for an apply failure: this node's
// configuration, or for a fallback the one target's nodes recorded in the
// database a reads and writes.
func (p *errorPolicy) policyFor(ctx context.Context, a *apply.Applier, err error) config.ApplyErrorPolicy {
	table := failedTable(err)
	if p.target == "" {
		return p.cfg.ApplyErrorFor(table)
	}
	rec, found, rerr := a.RecordedPolicy(ctx, p.target)
	switch {
	case rerr != nil:
		p.log.Warn().Err(rerr).Str("on_apply_error", string(p.cfg.ApplyErrorFor(table))).
			Msg("cannot read the region's on_apply_error from its database; the direct-SQL fallback follows this node's")
		return p.cfg.ApplyErrorFor(table)
	case !found:
		if !p.unrecorded.Swap(true) {
			p.log.Warn().Str("on_apply_error", string(p.cfg.ApplyErrorFor(table))).
				Msg("no node of the region has recorded its on_apply_error in its database (prism.apply_policy(); a node records it when it starts): the direct-SQL fallback follows this node's")
		}
		return p.cfg.ApplyErrorFor(table)
	}
	chosen := config.ApplyErrorPolicy(rec.OnApplyError)
	if tp, ok := rec.ErrorTables[table]; ok && table != "" {
		chosen = config.ApplyErrorPolicy(tp)
	}
	if !chosen.Valid() {
		p.log.Warn().Str("recorded", string(chosen)).Str("node", rec.Node).Str("on_apply_error", string(p.cfg.ApplyErrorFor(table))).
			Msg("the region's recorded on_apply_error is not a policy this node knows; the direct-SQL fallback follows this node's")
		return p.cfg.ApplyErrorFor(table)
	}
	return chosen
}

// Handle implements peers.ErrorHandler.
func (p *errorPolicy) Handle(ctx context.Context, app peers.Applier, txn *decode.Txn, err error) (peers.Action, error) {
	a, ok := app.(*apply.Applier)
	if !ok {
		return peers.ActionHalt, nil
	}
	switch p.policyFor(ctx, a, err) {
	case config.DeadLetter:
		if _, perr := a.Park(ctx, txn, err, apply.StatusParked); perr != nil {
			return peers.ActionHalt, perr
		}
		return peers.ActionDeadLetter, nil
	case config.Undo:
		if _, perr := a.Park(ctx, txn, err, apply.StatusUndoRequested); perr != nil {
			return peers.ActionHalt, perr
		}
		return peers.ActionUndo, nil
	default:
		if rerr := a.RecordHalt(ctx, txn, err); rerr != nil {
			p.log.Warn().Err(rerr).Stringer("lsn", txn.EndLSN).Msg("record halted transaction in prism.dead_letters")
		}
		return peers.ActionHalt, nil
	}
}

// PendingUndos implements peers.ErrorHandler.
func (p *errorPolicy) PendingUndos(ctx context.Context, app peers.Applier, source string) ([]peers.UndoRequest, error) {
	a, ok := app.(*apply.Applier)
	if !ok {
		return nil, nil
	}
	dls, err := a.DeadLetters(ctx, source, apply.StatusUndoRequested)
	if err != nil {
		return nil, err
	}
	reqs := make([]peers.UndoRequest, 0, len(dls))
	for _, d := range dls {
		txn, err := d.Txn()
		if err != nil {
			return nil, err
		}
		reqs = append(reqs, peers.UndoRequest{Txn: txn, SQLState: d.SQLState, Message: d.Message})
	}
	return reqs, nil
}

// Undone implements peers.ErrorHandler.
func (p *errorPolicy) Undone(ctx context.Context, app peers.Applier, source string, lsn pglogrepl.LSN, status, note string) error {
	a, ok := app.(*apply.Applier)
	if !ok {
		return fmt.Errorf("record undo outcome: applier %T cannot", app)
	}
	st := apply.StatusUndoFailed
	switch status {
	case apply.UndoDone:
		st = apply.StatusUndone
	case apply.UndoConflict:
		st = apply.StatusUndoConflict
	}
	return a.SetDeadLetterStatus(ctx, source, lsn, st, status+": "+note)
}

// undoFunc reverts this region's transactions on request of a target
// region, in this region's database. It refuses unless this node's own
// configuration chooses undo for a table the transaction changed, so a
// misconfigured peer cannot revert writes here.
func (p *errorPolicy) undoFunc(a *apply.Applier) peers.UndoFunc {
	return func(ctx context.Context, target string, req peers.UndoRequest) (string, string, error) {
		allowed := p.cfg.OnApplyError == config.Undo
		for _, c := range req.Txn.Changes {
			if c.Rel != nil && p.cfg.ApplyErrorFor(c.Rel.Schema+"."+c.Rel.Table) == config.Undo {
				allowed = true
			}
		}
		if !allowed {
			return "", "", fmt.Errorf("undo %s requested by %s: on_apply_error is not undo for its tables in %s", req.Txn.EndLSN, target, p.cfg.Path)
		}
		res, err := a.Undo(ctx, req.Txn, apply.UndoRequest{Target: target, SQLState: req.SQLState, Message: req.Message})
		if err != nil {
			return "", "", err
		}
		return res.Status, res.Detail, nil
	}
}

// fallbackSettings returns the conflict policies and the ddl setting of
// the direct-SQL fallback to region: the ones region's nodes recorded in
// its database (apply.RecordPolicy, read through q), so that a row written
// in two regions ends as that region's own nodes would have decided it,
// and a schema change is applied there or refused as they would,
// whichever path applied it. Where nothing is recorded (or a node of an
// earlier version recorded less), or a recorded value is not one this node
// knows, it is this node's own (own), and it says so.
func fallbackSettings(ctx context.Context, q apply.Querier, own *config.Config, region string, log zerolog.Logger) (config.Conflicts, config.DDLMode) {
	rec, found, err := apply.ReadRegionPolicy(ctx, q, region)
	switch {
	case err != nil:
		log.Warn().Err(err).Msg("cannot read the region's conflict policies and ddl setting from its database; the direct-SQL fallback follows this node's")
		return own.Conflicts, own.DDL
	case !found:
		log.Warn().Msg("no node of the region has recorded its conflict policies and ddl setting in its database (prism.apply_policy(); a node records them when it starts): the direct-SQL fallback follows this node's")
		return own.Conflicts, own.DDL
	}
	return fallbackConflicts(rec, own.Conflicts, log), fallbackDDL(rec, own.DDL, log)
}

// fallbackConflicts is fallbackSettings' conflict policies from rec.
func fallbackConflicts(rec apply.RegionPolicy, own config.Conflicts, log zerolog.Logger) config.Conflicts {
	if rec.Conflicts == "" {
		log.Warn().Str("node", rec.Node).Msg("the region's node recorded no conflict policies (an earlier version): the direct-SQL fallback resolves conflicts as this node does")
		return own
	}
	c := config.Conflicts{Default: config.ConflictPolicy(rec.Conflicts), Tables: make(map[string]config.ConflictPolicy, len(rec.ConflictTables)), Keep: own.Keep}
	valid := c.Default.Valid()
	for t, p := range rec.ConflictTables {
		c.Tables[t] = config.ConflictPolicy(p)
		valid = valid && c.Tables[t].Valid()
	}
	if !valid {
		log.Warn().Str("recorded", rec.Conflicts).Interface("recorded_tables", rec.ConflictTables).Str("node", rec.Node).
			Msg("the region's recorded conflict policies are not all ones this node knows; the direct-SQL fallback resolves conflicts as this node does")
		return own
	}
	if c.Default != own.Default || !maps.Equal(rec.ConflictTables, config.Strings(own.Tables)) {
		log.Warn().Str("recorded", rec.Conflicts).Interface("recorded_tables", rec.ConflictTables).Str("node", rec.Node).
			Str("own", string(own.Default)).Interface("own_tables", config.Strings(own.Tables)).
			Msg("the region resolves conflicts differently from this node (regions that decide the same conflict differently keep different rows; prism-cdc doctor checks this); the direct-SQL fallback follows the region's")
	}
	return c
}

// fallbackDDL is fallbackSettings' ddl setting from rec.
func fallbackDDL(rec apply.RegionPolicy, own config.DDLMode, log zerolog.Logger) config.DDLMode {
	ddl := config.DDLMode(rec.DDL)
	switch {
	case rec.DDL == "":
		log.Warn().Str("node", rec.Node).Str("ddl", string(own)).Msg("the region's node recorded no ddl setting (an earlier version): the direct-SQL fallback applies schema changes there by this node's")
		return own
	case !ddl.Valid():
		log.Warn().Str("recorded", rec.DDL).Str("node", rec.Node).Str("ddl", string(own)).
			Msg("the region's recorded ddl setting is not one this node knows; the direct-SQL fallback follows this node's")
		return own
	case ddl != own:
		log.Warn().Str("recorded", rec.DDL).Str("node", rec.Node).Str("own", string(own)).
			Msg("the region's ddl setting differs from this node's (ddl: replicate must be in every region's configuration); the direct-SQL fallback follows the region's")
	}
	return ddl
}

// regionPolicy is what this node records in its database for other
// regions' direct-SQL fallbacks and doctor (apply.RecordPolicy).
func regionPolicy(cfg *config.Config) apply.RegionPolicy {
	return apply.RegionPolicy{Region: cfg.Region, Node: cfg.Node,
		OnApplyError: string(cfg.OnApplyError), ErrorTables: config.Strings(cfg.OnApplyErrorTables),
		Conflicts: string(cfg.Conflicts.Default), ConflictTables: config.Strings(cfg.Conflicts.Tables), DDL: string(cfg.DDL)}
}
