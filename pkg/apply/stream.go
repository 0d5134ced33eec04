package apply

import (
	"context"
	"errors"
	"io"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
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
	if txn == nil {
		return &Error{Err: permanent("22023", "nil transaction")}
	}
	if txn.Origin == "" || txn.CommitTime.IsZero() || txn.EndLSN == 0 {
		return newError(txn, "", 0, permanent("22023", "transaction lacks origin, end LSN or commit time"))
	}
	if err := a.ensureSetup(ctx); err != nil {
		return newError(txn, "", 0, err)
	}
	s, progress, err := a.holdSession(ctx, txn.Origin)
	if err != nil {
		return newError(txn, "", 0, err)
	}
	// From here the origin is held: after a commit (or a skip) the
	// session is parked for the next run, on every other path it lets go
	// of the origin (rolling back what is open).
	done, err := a.streamHeld(ctx, s, progress, txn, next)
	if err != nil {
		s.unhold()
		return err
	}
	a.park(s, done)
	return nil
}

// streamHeld applies the streamed transaction txn on s, which holds its
// origin with the given progress, and returns the origin's progress
// after it.
func (a *Applier) streamHeld(ctx context.Context, s *session, progress pglogrepl.LSN, txn *decode.Txn, next func() ([]decode.Change, error)) (pglogrepl.LSN, error) {
	if txn.EndLSN <= progress {
		a.log.Debug().Str("origin", txn.Origin).Stringer("progress", progress).Stringer("end_lsn", txn.EndLSN).Msg("streamed transaction already applied")
		return progress, drain(txn, next)
	}
	st := &stream{a: a, s: s, txn: txn, b: &pgconn.Batch{}}
	if err := st.begin(ctx); err != nil {
		return 0, err
	}
	for {
		chunk, err := next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return 0, newError(txn, "", 0, err)
		}
		for j := range chunk {
			if err := st.change(ctx, &chunk[j]); err != nil {
				return 0, err
			}
		}
	}
	if err := st.commit(ctx); err != nil {
		return 0, err
	}
	a.count(txn.Origin, func(s *Stats) { s.Streamed++ })
	a.log.Debug().Str("origin", txn.Origin).Int("changes", st.count).Stringer("end_lsn", txn.EndLSN).Msg("applied streamed transaction")
	return txn.EndLSN, nil
}

// drain reads next to the end, applying nothing.
func drain(txn *decode.Txn, next func() ([]decode.Change, error)) error {
	for {
		if _, err := next(); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return newError(txn, "", 0, err)
		}
	}
}

// stream is one streamed transaction being applied on a held session:
// the commands queued for the next round trip and what each one is
// about. Unlike a pipeline, its one transaction stays open across round
// trips; a failing command fails the whole transaction.
type stream struct {
	a    *Applier
	s    *session
	txn  *decode.Txn
	ts   []byte // the commit time as the statements take it
	b    *pgconn.Batch
	cmds []streamCmd // one per command in b
	size int
	// count is the number of changes queued so far.
	count int
}

// streamCmd says what one queued command of a stream is about.
type streamCmd struct {
	table   string
	op      decode.Op
	barrier bool
}

// begin queues the transaction's start: BEGIN, the longer idle timeout
// and the origin setup.
func (st *stream) begin(ctx context.Context) error {
	setup, err := st.s.conn.Conn().Prepare(ctx, txnSetupName, txnSetupSQL)
	if err != nil {
		return st.a.fail(st.s, st.txn, "", 0, err)
	}
	st.ts = []byte(st.txn.CommitTime.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
	st.b.ExecParams(beginSQL, nil, nil, nil, nil)
	st.b.ExecParams("SET LOCAL idle_in_transaction_session_timeout = '"+streamIdleTimeout+"'", nil, nil, nil, nil)
	st.b.ExecStatement(setup, [][]byte{[]byte(st.txn.EndLSN.String()), st.ts, []byte(st.txn.Origin), []byte(st.a.local)}, nil, nil)
	st.cmds = append(st.cmds, streamCmd{}, streamCmd{}, streamCmd{})
	return nil
}

// change queues change c, sending the round trip when it is full. A
// schema change is sent at once: the row statements after it are built
// from the schema it leaves.
func (st *stream) change(ctx context.Context, c *decode.Change) error {
	st.count++
	if c.Op == decode.OpDDL {
		if err := st.a.queueDDL(st.b, c.DDL); err != nil {
			return st.a.fail(st.s, st.txn, "", c.Op, err)
		}
		st.cmds = append(st.cmds, streamCmd{op: c.Op})
		err := st.flush(ctx)
		st.a.forgetSchema()
		return err
	}
	sd, sql, vals, formats, err := st.a.changeCommand(ctx, st.s.conn.Conn(), c, st.count-1, st.ts)
	if err != nil {
		be := &buildError{err: err}
		errors.As(err, &be)
		return st.a.fail(st.s, st.txn, be.table, be.op, be.err)
	}
	if sd == nil {
		st.b.ExecParams(sql, nil, nil, nil, nil)
		st.size += len(sql)
	} else {
		st.b.ExecStatement(sd, vals, formats, nil)
		st.size += 32
		for _, v := range vals {
			st.size += len(v) + 8
		}
	}
	st.cmds = append(st.cmds, streamCmd{table: relName(c), op: c.Op})
	if st.size > maxPipelineBytes || len(st.cmds) > maxPipelineCmds {
		return st.flush(ctx)
	}
	return nil
}

// commit queues COMMIT and a barrier and sends them. The session commits
// with synchronous_commit = off: the barrier flushes the WAL up to the
// commit before it counts as applied.
func (st *stream) commit(ctx context.Context) error {
	st.b.ExecParams(immediateSQL, nil, nil, nil, nil)
	st.b.ExecParams(originSQL, [][]byte{[]byte(st.txn.EndLSN.String()), st.ts}, nil, nil, nil)
	st.b.ExecParams("COMMIT", nil, nil, nil, nil)
	st.b.ExecParams(barrierSQL, nil, nil, nil, nil)
	st.cmds = append(st.cmds, streamCmd{}, streamCmd{}, streamCmd{}, streamCmd{barrier: true})
	return st.flush(ctx)
}

// flush sends the queued commands in one round trip. A failing command
// of the transaction is its error, with the table and operation of the
// change; a broken connection or a failed WAL flush is not the
// transaction's own failure, and is retryable.
func (st *stream) flush(ctx context.Context) error {
	pc := st.s.conn.Conn().PgConn()
	res, err := pc.ExecBatch(ctx, st.b).ReadAll()
	failed := len(res)
	for i, r := range res {
		if r.Err != nil {
			failed, err = i, r.Err
			break
		}
	}
	if err == nil {
		st.b, st.cmds, st.size = &pgconn.Batch{}, st.cmds[:0], 0
		return nil
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pc.IsClosed() || failed >= len(st.cmds) || st.cmds[failed].barrier {
		st.s.broken = st.s.broken || pc.IsClosed() || !errors.As(err, &pgErr)
		return lostError(st.txn, err)
	}
	table := st.cmds[failed].table
	if table == "" {
		table = errTable(err)
	}
	return st.a.fail(st.s, st.txn, table, st.cmds[failed].op, err)
}

// changeCommand builds the command of row change c (a TRUNCATE or a row
// statement; not a schema change), the index-th of its transaction, with
// the commit time ts as the row statements take it: a prepared statement
// with its parameters, or, when sd is nil, SQL text without any. A change
// that cannot be built is a *buildError.
func (a *Applier) changeCommand(ctx context.Context, conn *pgx.Conn, c *decode.Change, index int, ts []byte) (sd *pgconn.StatementDescription, sql string, vals [][]byte, formats []int16, err error) {
	if c.Op == decode.OpTruncate {
		tc, err := a.renamedTruncate(ctx, conn, c)
		if err != nil {
			return nil, "", nil, nil, &buildError{table: relName(c), op: c.Op, err: err}
		}
		sql, err := truncateSQL(tc)
		if err != nil {
			return nil, "", nil, nil, &buildError{table: relName(c), op: c.Op, err: err}
		}
		return nil, sql, nil, nil, nil
	}
	if c.Rel == nil {
		return nil, "", nil, nil, &buildError{op: c.Op, err: permanent("22023", "change %d has no relation", index)}
	}
	rc, err := a.reshape(ctx, conn, c)
	if err != nil {
		return nil, "", nil, nil, &buildError{table: relName(c), op: c.Op, err: err}
	}
	st, sd, err := a.statementFor(ctx, conn, rc)
	if err != nil {
		return nil, "", nil, nil, &buildError{table: relName(rc), op: rc.Op, err: err}
	}
	vals, formats, err = bind(st, rc, ts)
	if err != nil {
		return nil, "", nil, nil, &buildError{table: relName(rc), op: rc.Op, err: err}
	}
	return sd, "", vals, formats, nil
}
