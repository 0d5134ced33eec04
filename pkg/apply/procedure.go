package apply

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// The apply procedure (contrib/prism_apply, optional).
//
// A run of transactions that go one by one (the row path: a lone
// transaction, the runs a batch does not take) is sent as one CALL of
// prism.apply_copy(flush), which reads the run over COPY: the statements
// the row path prepared, each defined once per CALL, and every
// transaction as a list of statements and their parameters, exactly as
// the row path would send them. The procedure runs them through saved SPI
// plans and commits each transaction on its own. What it saves is the
// protocol: a Bind, an Execute and a portal per statement and a Sync per
// transaction, about a third of a lone transaction's apply in the
// backend (docs/performance.md). The conflict rules are the same SQL.
//
// Any error ends the CALL. The origin's progress, read under the origin
// the session holds, says which of the run's transactions committed; the
// rest go the usual way, so the failing transaction fails there again
// and its error is pinned on its change and handled as always (or it
// commits, when the failure was a passing one). A procedure that cannot
// be called (dropped, its library missing) is not tried again by the
// Applier, which says so.
//
// A node whose role is a superuser creates the procedure when it starts,
// where the server can load the library (see procSetupSQL); otherwise a
// superuser creates it (README). WithoutApplyProcedure turns it off.

// procSetupSQL creates prism.apply_copy where it is missing, the role is
// a superuser and prism_apply's library is in one of
// dynamic_library_path's directories (looked for first, so that a
// server without it logs no error).
const procSetupSQL = `DO $prism$
BEGIN
	IF pg_catalog.to_regprocedure('prism.apply_copy(boolean)') IS NULL
		AND (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)
		AND EXISTS (SELECT 1 FROM pg_catalog.unnest(pg_catalog.string_to_array(pg_catalog.current_setting('dynamic_library_path'), ':')) AS d(dir)
			WHERE (pg_catalog.pg_stat_file(pg_catalog.replace(d.dir, '$libdir',
				(SELECT setting FROM pg_catalog.pg_config WHERE name = 'PKGLIBDIR')) || '/prism_apply.so', true)).size IS NOT NULL)
	THEN
		CREATE PROCEDURE prism.apply_copy(flush boolean) LANGUAGE c AS 'prism_apply', 'prism_apply_copy';
	END IF;
END
$prism$`

// procCheckSQL says whether the session's role can call prism.apply_copy.
const procCheckSQL = `SELECT CASE WHEN pg_catalog.to_regprocedure('prism.apply_copy(boolean)') IS NULL THEN false
	ELSE pg_catalog.has_function_privilege('prism.apply_copy(boolean)', 'EXECUTE') END`

// WithoutApplyProcedure keeps the Applier from using prism.apply_copy:
// every statement goes over the protocol.
func WithoutApplyProcedure() Option {
	return func(a *Applier) { a.noProc = true }
}

// ApplyProcedure reports whether the Applier applies the row path's runs
// through prism.apply_copy (known after Setup).
func (a *Applier) ApplyProcedure() bool { return a.proc.Load() }

// setupProcedure creates the procedure where it may and finds out
// whether the Applier can use it.
func (a *Applier) setupProcedure(ctx context.Context, conn *pgx.Conn) error {
	if a.noProc {
		return nil
	}
	if _, err := conn.Exec(ctx, procSetupSQL); err != nil {
		a.log.Warn().Err(err).Msg("cannot create procedure prism.apply_copy; transactions are applied statement by statement")
	}
	var ok bool
	if err := conn.QueryRow(ctx, procCheckSQL).Scan(&ok); err != nil {
		return err
	}
	if ok && !a.proc.Load() {
		a.log.Info().Msg("applying through procedure prism.apply_copy (contrib/prism_apply)")
	}
	a.proc.Store(ok)
	return nil
}

// maxCopyBytes bounds a run sent through the procedure; a larger one
// goes statement by statement (it is rare, and the pipeline's writes
// then interleave with reading the replies).
const maxCopyBytes = 256 << 10

// copyable reports whether the queued commands are whole transactions of
// prepared statements the procedure can run.
func (p *pipeline) copyable() bool {
	if !p.a.proc.Load() || p.size > maxCopyBytes || len(p.cmds) < 2 {
		return false
	}
	if p.cmds[0].sd != p.begin || !p.cmds[len(p.cmds)-1].commit {
		return false
	}
	for i := range p.cmds {
		if p.cmds[i].sd == nil || p.cmds[i].barrier {
			return false
		}
	}
	return true
}

// sendCopy runs the queued commands (copyable) through the procedure.
// It returns true when they are all durable, or with an error whose
// session is broken. Otherwise (false, nil) it left in p.cmds the
// transactions that did not commit, for send to run the usual way.
func (p *pipeline) sendCopy(ctx context.Context, final bool) (bool, error) {
	pc := p.s.conn.Conn().PgConn()
	flush := "false"
	if p.barrier != nil {
		flush = "true"
	}
	fe := pc.Frontend()
	fe.Send(&pgproto3.Query{String: "CALL prism.apply_copy(" + flush + ")"})
	p.encodeCopy(fe)
	fe.Send(&pgproto3.CopyDone{})

	// The context ends a wait through the connection's deadline; the
	// session is then dropped.
	stop := context.AfterFunc(ctx, func() { _ = pc.Conn().SetDeadline(time.Unix(1, 0)) })
	err := fe.Flush()
	if err == nil && final && p.a.testAfterSend != nil {
		p.a.testAfterSend(pc.PID())
	}
	var pgErr *pgconn.PgError
	copying := false
	if err == nil {
		copying, pgErr, err = readCopyReply(fe)
	}
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		// The connection is out of step with pgconn, which must see it
		// closed (a session taken over after its connection died is
		// replaced, see applyRun).
		p.s.broken = true
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = pc.Close(cctx)
		cancel()
		p.cmds, p.size, p.first = p.cmds[:0], 0, 0
		return true, p.lost(fmt.Errorf("apply procedure: %w", err))
	}
	txns := 0
	for i := range p.cmds {
		if p.cmds[i].commit {
			txns++
		}
	}
	if pgErr == nil {
		p.a.count(p.s.source, func(st *Stats) { st.Procedure += uint64(txns) })
		p.durable(p.cmds[len(p.cmds)-1].txn, false)
		p.cmds, p.size, p.first = p.cmds[:0], 0, 0
		return true, nil
	}

	// What committed before the failure is what the origin has.
	res, err := pc.Exec(ctx, "SELECT pg_replication_origin_session_progress(true)::text").ReadAll()
	if err == nil && (len(res) != 1 || len(res[0].Rows) != 1 || len(res[0].Rows[0]) != 1) {
		err = errors.New("unexpected reply to origin progress")
	}
	var progress pglogrepl.LSN
	if err == nil && res[0].Rows[0][0] != nil {
		progress, err = pglogrepl.ParseLSN(string(res[0].Rows[0][0]))
	}
	if err != nil {
		p.s.broken = true
		p.cmds, p.size, p.first = p.cmds[:0], 0, 0
		return true, p.lost(fmt.Errorf("origin progress after %v: %w", pgErr, err))
	}
	from, done := 0, 0
	for i := range p.cmds {
		if p.cmds[i].commit && p.txns[p.cmds[i].txn].EndLSN <= progress {
			from = i + 1
			done++
		}
	}
	if from > 0 {
		p.a.count(p.s.source, func(st *Stats) { st.Procedure += uint64(done) })
		p.durable(p.cmds[from-1].txn, false)
	}
	if concurrentState(pgErr.Code) {
		// A serialization failure or deadlock with a local transaction:
		// applied again at once, as the row path's are (see run).
		p.cmds, p.size, p.first = p.cmds[:0], 0, 0
		return true, p.a.fail(p.s, p.txns[p.committed], errTable(pgErr), 0, pgErr)
	}
	if !copying || pgErr.Code == "08P01" {
		// The CALL itself failed (the procedure dropped, its library
		// missing), or the library and this side disagree on messages.
		p.a.proc.Store(false)
		p.a.log.Warn().Err(pgErr).Msg("cannot call procedure prism.apply_copy; applying statement by statement from now on (install contrib/prism_apply again, or set apply_procedure: off)")
	} else {
		p.a.log.Debug().Err(pgErr).Int("committed", done).Int("left", txns-done).Msg("apply procedure stopped at an error; the rest go statement by statement")
	}
	p.cmds = append(p.cmds[:0], p.cmds[from:]...)
	p.first = 0
	return false, nil
}

// readCopyReply reads the server's reply to a CALL of the procedure up
// to ReadyForQuery: whether the CALL began reading the run (copying),
// and the error that ended it, if any.
func readCopyReply(fe *pgproto3.Frontend) (copying bool, pgErr *pgconn.PgError, err error) {
	for {
		msg, err := fe.Receive()
		if err != nil {
			return copying, nil, err
		}
		switch m := msg.(type) {
		case *pgproto3.CopyInResponse:
			copying = true
		case *pgproto3.CommandComplete, *pgproto3.NoticeResponse, *pgproto3.ParameterStatus:
		case *pgproto3.ErrorResponse:
			if pgErr == nil {
				pgErr = pgconn.ErrorResponseToPgError(m)
			}
		case *pgproto3.ReadyForQuery:
			if m.TxStatus != 'I' {
				return copying, nil, fmt.Errorf("transaction status %q after the CALL", m.TxStatus)
			}
			return copying, pgErr, nil
		default:
			return copying, nil, fmt.Errorf("unexpected %T in reply to the CALL", msg)
		}
	}
}

// encodeCopy queues the CopyData messages of the queued commands on fe:
// each statement's definition before its first use, then one message per
// transaction (see contrib/prism_apply).
func (p *pipeline) encodeCopy(fe *pgproto3.Frontend) {
	if p.copyIDs == nil {
		p.copyIDs = map[*pgconn.StatementDescription]int32{}
	}
	clear(p.copyIDs)
	b := p.copyBuf[:0]
	for start := 0; start < len(p.cmds); {
		end := start + 1
		for !p.cmds[end-1].commit {
			end++
		}
		// BEGIN and COMMIT are the procedure's own.
		body := p.cmds[start+1 : end-1]
		for i := range body {
			sd := body[i].sd
			if _, ok := p.copyIDs[sd]; ok {
				continue
			}
			id := int32(len(p.copyIDs))
			p.copyIDs[sd] = id
			b = append(b[:0], 'P')
			b = binary.BigEndian.AppendUint32(b, uint32(id))
			b = append(b, sd.SQL...)
			b = append(b, 0)
			b = binary.BigEndian.AppendUint16(b, uint16(len(sd.ParamOIDs)))
			for _, oid := range sd.ParamOIDs {
				b = binary.BigEndian.AppendUint32(b, oid)
			}
			fe.Send(&pgproto3.CopyData{Data: b})
		}
		b = append(b[:0], 'T')
		b = binary.BigEndian.AppendUint32(b, uint32(len(body)))
		for i := range body {
			c := &body[i]
			b = binary.BigEndian.AppendUint32(b, uint32(p.copyIDs[c.sd]))
			b = binary.BigEndian.AppendUint16(b, uint16(len(c.vals)))
			for j, v := range c.vals {
				b = binary.BigEndian.AppendUint16(b, uint16(paramFormat(c.formats, j)))
				if v == nil {
					b = binary.BigEndian.AppendUint32(b, 0xFFFFFFFF)
					continue
				}
				b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
				b = append(b, v...)
			}
		}
		fe.Send(&pgproto3.CopyData{Data: b})
		start = end
	}
	p.copyBuf = b[:0]
}

// paramFormat is parameter j's format code as Bind takes them: none for
// all text, one for all, or one each.
func paramFormat(formats []int16, j int) int16 {
	switch len(formats) {
	case 0:
		return 0
	case 1:
		return formats[0]
	}
	return formats[j]
}
