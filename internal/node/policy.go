package node

import (
	"context"
	"errors"
	"fmt"

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
type errorPolicy struct {
	cfg *config.Config
	log zerolog.Logger
}

func newErrorPolicy(cfg *config.Config, log zerolog.Logger) *errorPolicy {
	return &errorPolicy{cfg: cfg, log: log.With().Str("component", "policy").Logger()}
}

// policyFor returns the configured policy for an apply failure.
func (p *errorPolicy) policyFor(err error) config.ApplyErrorPolicy {
	var ae *apply.Error
	if errors.As(err, &ae) {
		return p.cfg.ApplyErrorFor(ae.Table)
	}
	return p.cfg.OnApplyError
}

// Handle implements peers.ErrorHandler.
func (p *errorPolicy) Handle(ctx context.Context, app peers.Applier, txn *decode.Txn, err error) (peers.Action, error) {
	a, ok := app.(*apply.Applier)
	if !ok {
		return peers.ActionHalt, nil
	}
	switch p.policyFor(err) {
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
