package apply

import (
	"context"
	"errors"
	"io"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// streamIdleTimeout replaces the apply session's
// idle_in_transaction_session_timeout while a streamed transaction is
// open: between chunks the session waits for the network.
const streamIdleTimeout = "300s"

// applySpilled applies a spilled transaction from its spill file.
func (a *Applier) applySpilled(ctx context.Context, txn *decode.Txn) error {
	it, err := txn.Spill.Iter()
	if err != nil {
		return newError(txn, "", 0, permanent("58030", "read spilled transaction: %v", err))
	}
	defer it.Close()
	hdr := *txn
	hdr.Changes, hdr.Spill = nil, nil
	return a.ApplyStream(ctx, &hdr, it.Next)
}

// ApplyStream applies one source transaction whose changes are too many to
// hold in memory: next returns them in chunks, in order, and io.EOF after
// the last chunk. txn is the header (its Changes are ignored). It has
// Apply's semantics: one target transaction with the origin's progress
// advanced to txn.EndLSN in the same commit, skipped (next is still read
// to the end) when the origin already has it. Chunks are applied as they
// arrive through the same pipelined statements as Apply, so memory holds
// about one chunk and one pipeline. An error from next rolls everything
// back and is returned inside an *Error; errors are *Error.
func (a *Applier) ApplyStream(ctx context.Context, txn *decode.Txn, next func() ([]decode.Change, error)) error {
	drain := func() error {
		for {
			if _, err := next(); errors.Is(err, io.EOF) {
				return nil
			} else if err != nil {
				return newError(txn, "", 0, err)
			}
		}
	}
	if txn == nil {
		return &Error{Err: permanent("22023", "nil transaction")}
	}
	if txn.Origin == "" || txn.CommitTime.IsZero() || txn.EndLSN == 0 {
		return newError(txn, "", 0, permanent("22023", "transaction lacks origin, end LSN or commit time"))
	}
	if err := a.ensureSetup(ctx); err != nil {
		return newError(txn, "", 0, err)
	}
	source := txn.Origin
	s, progress, err := a.holdSession(ctx, source)
	if err != nil {
		return newError(txn, "", 0, err)
	}
	conn := s.conn
	// From here the origin is held: after a commit (or a skip) the
	// session is parked for the next run, on every other path it lets go
	// of the origin (rolling back what is open).
	ok := false
	done := progress
	defer func() {
		if ok {
			a.park(s, done)
		} else {
			s.unhold()
		}
	}()
	if txn.EndLSN <= progress {
		a.log.Debug().Str("origin", source).Stringer("progress", progress).Stringer("end_lsn", txn.EndLSN).Msg("streamed transaction already applied")
		err := drain()
		ok = err == nil
		return err
	}

	pc := conn.Conn().PgConn()
	setupSD, err := conn.Conn().Prepare(ctx, "prism_txn_setup", txnSetupSQL)
	if err != nil {
		return a.fail(s, txn, "", 0, err)
	}
	type scmd struct {
		table   string
		op      decode.Op
		barrier bool
	}
	b := &pgconn.Batch{}
	var cmds []scmd
	size := 0
	flush := func() error {
		res, err := pc.ExecBatch(ctx, b).ReadAll()
		failed := len(res)
		for i, r := range res {
			if r.Err != nil {
				failed, err = i, r.Err
				break
			}
		}
		if err == nil {
			b, cmds, size = &pgconn.Batch{}, cmds[:0], 0
			return nil
		}
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pc.IsClosed() || failed >= len(cmds) || cmds[failed].barrier {
			// A broken connection or a failed WAL flush is not the
			// transaction's own failure: retry it.
			s.broken = s.broken || pc.IsClosed() || !errors.As(err, &pgErr)
			return lostError(txn, err)
		}
		table := cmds[failed].table
		if table == "" {
			table = errTable(err)
		}
		return a.fail(s, txn, table, cmds[failed].op, err)
	}

	b.ExecParams(beginSQL, nil, nil, nil, nil)
	b.ExecParams("SET LOCAL idle_in_transaction_session_timeout = '"+streamIdleTimeout+"'", nil, nil, nil, nil)
	ts := txn.CommitTime.UTC().Format("2006-01-02 15:04:05.999999Z07:00")
	b.ExecStatement(setupSD, [][]byte{[]byte(txn.EndLSN.String()), []byte(ts), []byte(txn.Origin), []byte(a.local)}, nil, nil)
	cmds = append(cmds, scmd{}, scmd{}, scmd{})
	count := 0
	for {
		chunk, err := next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return newError(txn, "", 0, err)
		}
		for j := range chunk {
			c := &chunk[j]
			count++
			if c.Op == decode.OpDDL {
				// Run now: the row statements after it are built from the
				// schema it leaves.
				if err := a.queueDDL(b, c.DDL); err != nil {
					return a.fail(s, txn, "", c.Op, err)
				}
				cmds = append(cmds, scmd{op: c.Op})
				err := flush()
				a.forgetSchema()
				if err != nil {
					return err
				}
				continue
			}
			if c.Op == decode.OpTruncate {
				sql, err := truncateSQL(c)
				if err != nil {
					return a.fail(s, txn, relName(c), c.Op, err)
				}
				b.ExecParams(sql, nil, nil, nil, nil)
				size += len(sql)
			} else {
				if c.Rel == nil {
					return a.fail(s, txn, "", c.Op, permanent("22023", "change %d has no relation", count-1))
				}
				c, err := a.reshape(ctx, conn.Conn(), c)
				if err != nil {
					return a.fail(s, txn, relName(&chunk[j]), chunk[j].Op, err)
				}
				st, sd, err := a.statementFor(ctx, conn.Conn(), c)
				if err != nil {
					return a.fail(s, txn, relName(c), c.Op, err)
				}
				vals, formats, err := bind(st, c, []byte(ts))
				if err != nil {
					return a.fail(s, txn, relName(c), c.Op, err)
				}
				b.ExecStatement(sd, vals, formats, nil)
				size += 32
				for _, v := range vals {
					size += len(v) + 8
				}
			}
			cmds = append(cmds, scmd{table: relName(c), op: c.Op})
			if size > maxPipelineBytes || len(cmds) > maxPipelineCmds {
				if err := flush(); err != nil {
					return err
				}
			}
		}
	}
	b.ExecParams("COMMIT", nil, nil, nil, nil)
	// The session commits with synchronous_commit = off: flush the WAL up
	// to the commit before it counts as applied.
	b.ExecParams(barrierSQL, nil, nil, nil, nil)
	cmds = append(cmds, scmd{}, scmd{barrier: true})
	if err := flush(); err != nil {
		return err
	}
	ok, done = true, txn.EndLSN
	a.log.Debug().Str("origin", source).Int("changes", count).Stringer("end_lsn", txn.EndLSN).Msg("applied streamed transaction")
	return nil
}
