package apply

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Status of a transaction recorded in prism.dead_letters.
const (
	// StatusHalted: replication from the source halted at this transaction;
	// the origin's progress is below it. `prism-cdc skip` moves it to
	// StatusSkipped; a successful apply after a fix leaves it as a record.
	StatusHalted = "halted"
	// StatusParked: parked by the dead_letter policy; the origin passed it.
	StatusParked = "parked"
	// StatusRetried: a parked transaction applied later by Retry.
	StatusRetried = "retried"
	// StatusSkipped: a halted transaction the operator skipped.
	StatusSkipped = "skipped"
	// StatusResolved: a halted transaction applied after the cause was
	// fixed (the origin's progress passed it).
	StatusResolved = "resolved"
	// StatusUndoRequested: parked by the undo policy, waiting for the
	// source to revert it.
	StatusUndoRequested = "undo_requested"
	// StatusUndone: the source reverted it (see its prism.undo_log).
	StatusUndone = "undone"
	// StatusUndoConflict: the source could not revert every row because
	// they were changed again; see its prism.undo_log.
	StatusUndoConflict = "undo_conflict"
	// StatusUndoFailed: the source failed to revert it; see its
	// prism.undo_log.
	StatusUndoFailed = "undo_failed"
)

// policySetupSQL creates the tables of the apply error policies: the
// parked (or halted) transactions of other regions, and the undo log of
// this region's own transactions reverted on request. Both live in schema
// prism and are never shipped.
const policySetupSQL = `
CREATE TABLE IF NOT EXISTS prism.dead_letters (
	id            bigserial PRIMARY KEY,
	source_region text NOT NULL,
	commit_lsn    pg_lsn NOT NULL,
	end_lsn       pg_lsn NOT NULL,
	xid           bigint NOT NULL,
	commit_time   timestamptz NOT NULL,
	table_name    text,
	changes       jsonb NOT NULL,
	sqlstate      text,
	message       text NOT NULL,
	status        text NOT NULL,
	attempts      integer NOT NULL DEFAULT 1,
	parked_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
	retried_at    timestamptz,
	resolved_at   timestamptz,
	note          text,
	UNIQUE (source_region, end_lsn)
);
CREATE TABLE IF NOT EXISTS prism.undo_log (
	id             bigserial PRIMARY KEY,
	at             timestamptz NOT NULL DEFAULT clock_timestamp(),
	origin_region  text NOT NULL,
	end_lsn        pg_lsn NOT NULL UNIQUE,
	xid            bigint NOT NULL,
	commit_time    timestamptz,
	requested_by   text NOT NULL,
	sqlstate       text,
	message        text NOT NULL,
	status         text NOT NULL,
	changes        jsonb NOT NULL,
	detail         text
);
`

// DeadLetter is one row of prism.dead_letters.
type DeadLetter struct {
	ID           int64
	SourceRegion string
	CommitLSN    pglogrepl.LSN
	EndLSN       pglogrepl.LSN
	Xid          uint32
	CommitTime   time.Time
	Table        string // table of the failing change, if known
	SQLState     string
	Message      string
	Status       string
	Attempts     int
	ParkedAt     time.Time
	RetriedAt    *time.Time
	ResolvedAt   *time.Time
	Note         string
	// Changes is the readable JSON form of the transaction (see
	// MarshalChanges).
	Changes json.RawMessage
}

// Txn rebuilds the parked transaction.
func (d *DeadLetter) Txn() (*decode.Txn, error) {
	changes, err := UnmarshalChanges(d.Changes)
	if err != nil {
		return nil, fmt.Errorf("dead letter %d: %w", d.ID, err)
	}
	return &decode.Txn{Origin: d.SourceRegion, Xid: d.Xid, CommitLSN: d.CommitLSN, EndLSN: d.EndLSN,
		CommitTime: d.CommitTime, Changes: changes}, nil
}

// changeJSON is the readable form of one change: the operation, the table,
// its columns and the old and new values by column name. A text value is a
// JSON string, NULL is null, a binary value is {"base64": "..."} and an
// unchanged TOASTed value is left out.
type changeJSON struct {
	Op        string          `json:"op"`
	Table     string          `json:"table,omitempty"`
	Schema    string          `json:"schema,omitempty"`
	Name      string          `json:"name,omitempty"`
	Identity  string          `json:"replica_identity,omitempty"`
	Columns   []columnJSON    `json:"columns,omitempty"`
	Old       map[string]any  `json:"old,omitempty"`
	New       map[string]any  `json:"new,omitempty"`
	Truncated []truncatedJSON `json:"truncated,omitempty"`
	Flags     uint8           `json:"truncate_flags,omitempty"`
	DDL       *ddlJSON        `json:"ddl,omitempty"`
}

type ddlJSON struct {
	Command    string `json:"command"`
	SearchPath string `json:"search_path"`
	Role       string `json:"role"`
}

type columnJSON struct {
	Name     string `json:"name"`
	TypeOID  uint32 `json:"type_oid"`
	TypeName string `json:"type_name,omitempty"`
	TypeMod  int32  `json:"typmod"`
	Key      bool   `json:"key,omitempty"`
}

type truncatedJSON struct {
	Schema string `json:"schema"`
	Name   string `json:"name"`
}

type binaryJSON struct {
	Base64 string `json:"base64"`
}

// MarshalChanges returns the readable JSON form of a transaction's
// changes, as stored in prism.dead_letters.changes. UnmarshalChanges turns
// it back into changes.
func MarshalChanges(changes []decode.Change) ([]byte, error) {
	out := make([]changeJSON, 0, len(changes))
	for i := range changes {
		c := &changes[i]
		cj := changeJSON{Op: c.Op.String(), Flags: c.TruncateFlags}
		if c.DDL != nil {
			cj.DDL = &ddlJSON{Command: c.DDL.Command, SearchPath: c.DDL.SearchPath, Role: c.DDL.Role}
		}
		if c.Rel != nil {
			cj.Table = c.Rel.Schema + "." + c.Rel.Table
			cj.Schema, cj.Name = c.Rel.Schema, c.Rel.Table
			cj.Identity = string(rune(c.Rel.ReplicaIdentity))
			for _, col := range c.Rel.Columns {
				cj.Columns = append(cj.Columns, columnJSON{Name: col.Name, TypeOID: col.TypeOID, TypeName: col.TypeName, TypeMod: col.TypeMod, Key: col.Key})
			}
			var err error
			if cj.Old, err = rowJSON(c.Rel, c.Old); err != nil {
				return nil, err
			}
			if cj.New, err = rowJSON(c.Rel, c.New); err != nil {
				return nil, err
			}
		}
		for _, r := range c.Truncated {
			cj.Truncated = append(cj.Truncated, truncatedJSON{Schema: r.Schema, Name: r.Table})
		}
		out = append(out, cj)
	}
	return json.Marshal(out)
}

func rowJSON(rel *decode.Relation, row []decode.Value) (map[string]any, error) {
	if row == nil {
		return nil, nil
	}
	if len(row) != len(rel.Columns) {
		return nil, fmt.Errorf("marshal changes: %d values for %d columns of %s.%s", len(row), len(rel.Columns), rel.Schema, rel.Table)
	}
	m := make(map[string]any, len(row))
	for i, v := range row {
		name := rel.Columns[i].Name
		switch v.Kind {
		case decode.ValueNull:
			m[name] = nil
		case decode.ValueText:
			m[name] = string(v.Data)
		case decode.ValueBinary:
			m[name] = binaryJSON{Base64: base64.StdEncoding.EncodeToString(v.Data)}
		case decode.ValueUnchanged:
		}
	}
	return m, nil
}

// UnmarshalChanges parses what MarshalChanges wrote. Changes of the same
// table share one Relation.
func UnmarshalChanges(data []byte) ([]decode.Change, error) {
	var in []struct {
		changeJSON
		Old map[string]json.RawMessage `json:"old"`
		New map[string]json.RawMessage `json:"new"`
	}
	if err := json.Unmarshal(data, &in); err != nil {
		return nil, fmt.Errorf("unmarshal changes: %w", err)
	}
	rels := map[string]*decode.Relation{}
	relOf := func(schema, name, identity string, cols []columnJSON) *decode.Relation {
		key := schema + "." + name
		if r, ok := rels[key]; ok && (cols == nil || len(r.Columns) == len(cols)) {
			return r
		}
		r := &decode.Relation{Schema: schema, Table: name, ReplicaIdentity: decode.IdentityDefault}
		if identity != "" {
			r.ReplicaIdentity = identity[0]
		}
		for _, c := range cols {
			r.Columns = append(r.Columns, decode.Column{Name: c.Name, TypeOID: c.TypeOID, TypeName: c.TypeName, TypeMod: c.TypeMod, Key: c.Key})
		}
		if cols != nil {
			rels[key] = r
		}
		return r
	}
	out := make([]decode.Change, 0, len(in))
	for i, cj := range in {
		var c decode.Change
		switch cj.Op {
		case "INSERT":
			c.Op = decode.OpInsert
		case "UPDATE":
			c.Op = decode.OpUpdate
		case "DELETE":
			c.Op = decode.OpDelete
		case "TRUNCATE":
			c.Op = decode.OpTruncate
		case "DDL":
			if cj.DDL == nil || cj.DDL.Command == "" {
				return nil, fmt.Errorf("unmarshal changes: change %d: DDL without its statement", i)
			}
			c.Op = decode.OpDDL
			c.DDL = &decode.DDL{Command: cj.DDL.Command, SearchPath: cj.DDL.SearchPath, Role: cj.DDL.Role}
		default:
			return nil, fmt.Errorf("unmarshal changes: change %d: unknown op %q", i, cj.Op)
		}
		c.TruncateFlags = cj.Flags
		if cj.Name != "" {
			c.Rel = relOf(cj.Schema, cj.Name, cj.Identity, cj.Columns)
			var err error
			if c.Old, err = rowValues(c.Rel, cj.Old); err != nil {
				return nil, fmt.Errorf("unmarshal changes: change %d: %w", i, err)
			}
			if c.New, err = rowValues(c.Rel, cj.New); err != nil {
				return nil, fmt.Errorf("unmarshal changes: change %d: %w", i, err)
			}
		}
		for _, t := range cj.Truncated {
			if c.Rel != nil && t.Schema == c.Rel.Schema && t.Name == c.Rel.Table {
				c.Truncated = append(c.Truncated, c.Rel)
				continue
			}
			c.Truncated = append(c.Truncated, relOf(t.Schema, t.Name, "", nil))
		}
		out = append(out, c)
	}
	return out, nil
}

func rowValues(rel *decode.Relation, m map[string]json.RawMessage) ([]decode.Value, error) {
	if m == nil {
		return nil, nil
	}
	row := make([]decode.Value, len(rel.Columns))
	for i, col := range rel.Columns {
		raw, ok := m[col.Name]
		switch {
		case !ok:
			row[i] = decode.Value{Kind: decode.ValueUnchanged}
		case string(raw) == "null":
			row[i] = decode.Value{Kind: decode.ValueNull}
		case len(raw) > 0 && raw[0] == '"':
			var s string
			if err := json.Unmarshal(raw, &s); err != nil {
				return nil, fmt.Errorf("column %s: %w", col.Name, err)
			}
			row[i] = decode.Value{Kind: decode.ValueText, Data: []byte(s)}
		default:
			var b binaryJSON
			if err := json.Unmarshal(raw, &b); err != nil {
				return nil, fmt.Errorf("column %s: %w", col.Name, err)
			}
			data, err := base64.StdEncoding.DecodeString(b.Base64)
			if err != nil {
				return nil, fmt.Errorf("column %s: %w", col.Name, err)
			}
			row[i] = decode.Value{Kind: decode.ValueBinary, Data: data}
		}
	}
	return row, nil
}

// withOrigin holds origin prism_<source> on a pooled connection, calls fn
// with the origin's progress (read under the hold) and releases the
// origin. A busy origin is ErrBusy.
func (a *Applier) withOrigin(ctx context.Context, source string, fn func(conn *pgxpool.Conn, progress pglogrepl.LSN) error) error {
	if err := a.ensureSetup(ctx); err != nil {
		return err
	}
	s, err := a.acquireSession(ctx, source)
	if err != nil {
		return err
	}
	progress, err := s.hold(ctx, source)
	if err != nil {
		s.broken = s.broken || s.conn.Conn().PgConn().IsClosed()
		s.release()
		return err
	}
	ferr := fn(s.conn, progress)
	s.unhold()
	return ferr
}

// errorFields returns the SQLSTATE, message and table of an apply failure.
func errorFields(cause error) (state, msg, table string) {
	if cause == nil {
		return "", "", ""
	}
	msg = cause.Error()
	var ae *Error
	if errors.As(cause, &ae) {
		state, table = ae.SQLState, ae.Table
	} else {
		state, _ = classify(cause)
	}
	var pgErr *pgconn.PgError
	if errors.As(cause, &pgErr) && pgErr.Detail != "" {
		msg += " (" + pgErr.Detail + ")"
	}
	return state, msg, table
}

const upsertDeadLetterSQL = `INSERT INTO prism.dead_letters AS d (source_region, commit_lsn, end_lsn, xid, commit_time, table_name,
	changes, sqlstate, message, status)
VALUES ($1, $2::pg_lsn, $3::pg_lsn, $4, $5, NULLIF($6, ''), $7::jsonb, NULLIF($8, ''), $9, $10)
ON CONFLICT (source_region, end_lsn) DO UPDATE SET sqlstate = excluded.sqlstate, message = excluded.message,
	table_name = excluded.table_name, status = excluded.status, attempts = d.attempts + 1`

func (a *Applier) upsertDeadLetter(ctx context.Context, tx pgx.Tx, txn *decode.Txn, cause error, status string) error {
	changes, err := MarshalChanges(txn.Changes)
	if err != nil {
		return err
	}
	state, msg, table := errorFields(cause)
	_, err = tx.Exec(ctx, upsertDeadLetterSQL, txn.Origin, txn.CommitLSN.String(), txn.EndLSN.String(), int64(txn.Xid),
		txn.CommitTime, table, string(changes), state, msg, status)
	return err
}

// Park stores txn, which failed with cause, in prism.dead_letters with
// status (StatusParked or StatusUndoRequested) and advances origin
// prism_<txn.Origin> to txn.EndLSN in the same database transaction, so
// the transaction is parked exactly once and replication continues after
// it. It reports false, and does nothing, when the origin's progress is
// already at or past txn.EndLSN.
func (a *Applier) Park(ctx context.Context, txn *decode.Txn, cause error, status string) (bool, error) {
	if txn == nil || txn.Origin == "" || txn.EndLSN == 0 || txn.CommitTime.IsZero() {
		return false, errors.New("park: transaction lacks origin, end LSN or commit time")
	}
	parked := false
	err := a.withOrigin(ctx, txn.Origin, func(conn *pgxpool.Conn, progress pglogrepl.LSN) error {
		if txn.EndLSN <= progress {
			return nil
		}
		tx, err := conn.Begin(ctx)
		if err != nil {
			return err
		}
		defer tx.Rollback(ctx)
		if err := a.upsertDeadLetter(ctx, tx, txn, cause, status); err != nil {
			return err
		}
		// Last before COMMIT (see originSQL).
		if _, err := tx.Exec(ctx, originSQL, txn.EndLSN.String(), txn.CommitTime); err != nil {
			return err
		}
		if err := tx.Commit(ctx); err != nil {
			return err
		}
		parked = true
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("park %s/%s: %w", txn.Origin, txn.EndLSN, err)
	}
	a.log.Warn().Str("origin", txn.Origin).Stringer("end_lsn", txn.EndLSN).Uint32("xid", txn.Xid).
		Str("status", status).Bool("parked", parked).Msg("failed transaction parked in prism.dead_letters")
	return parked, nil
}

// RecordHalt records txn, at which replication from its source halts
// because it failed with cause, in prism.dead_letters with StatusHalted.
// The origin's progress is not touched: the transaction is still pending.
// Repeated failures of the same transaction update the record.
func (a *Applier) RecordHalt(ctx context.Context, txn *decode.Txn, cause error) error {
	if err := a.ensureSetup(ctx); err != nil {
		return fmt.Errorf("record halt: %w", err)
	}
	tx, err := a.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("record halt: %w", err)
	}
	defer tx.Rollback(ctx)
	if err := a.upsertDeadLetter(ctx, tx, txn, cause, StatusHalted); err != nil {
		return fmt.Errorf("record halt %s/%s: %w", txn.Origin, txn.EndLSN, err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("record halt %s/%s: %w", txn.Origin, txn.EndLSN, err)
	}
	return nil
}

const deadLetterCols = `id, source_region, commit_lsn::text, end_lsn::text, xid, commit_time, coalesce(table_name, ''),
	coalesce(sqlstate, ''), message, status, attempts, parked_at, retried_at, resolved_at, coalesce(note, ''), changes::text`

func scanDeadLetter(row pgx.Row) (*DeadLetter, error) {
	var d DeadLetter
	var commitLSN, endLSN, changes string
	var xid int64
	if err := row.Scan(&d.ID, &d.SourceRegion, &commitLSN, &endLSN, &xid, &d.CommitTime, &d.Table, &d.SQLState,
		&d.Message, &d.Status, &d.Attempts, &d.ParkedAt, &d.RetriedAt, &d.ResolvedAt, &d.Note, &changes); err != nil {
		return nil, err
	}
	var err error
	if d.CommitLSN, err = pglogrepl.ParseLSN(commitLSN); err != nil {
		return nil, err
	}
	if d.EndLSN, err = pglogrepl.ParseLSN(endLSN); err != nil {
		return nil, err
	}
	d.Xid = uint32(xid)
	d.Changes = json.RawMessage(changes)
	return &d, nil
}

// DeadLetters lists prism.dead_letters in id order. With statuses, only
// rows in one of them; with source, only that source region's. Halted
// transactions the origin's progress has passed since are marked
// StatusResolved first.
func (a *Applier) DeadLetters(ctx context.Context, source string, statuses ...string) ([]*DeadLetter, error) {
	if err := a.ensureSetup(ctx); err != nil {
		return nil, fmt.Errorf("dead letters: %w", err)
	}
	// Halted transactions the origin has passed since were applied after
	// a fix.
	if _, err := a.pool.Exec(ctx, `UPDATE prism.dead_letters SET status = $1, resolved_at = clock_timestamp()
		WHERE status = $2 AND end_lsn <= CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin
			WHERE roname = `+decode.OriginNameSQL+`) THEN pg_replication_origin_progress(`+decode.OriginNameSQL+`, true) END`,
		StatusResolved, StatusHalted); err != nil {
		return nil, fmt.Errorf("dead letters: %w", err)
	}
	rows, err := a.pool.Query(ctx, "SELECT "+deadLetterCols+` FROM prism.dead_letters
		WHERE ($1 = '' OR source_region = $1) AND (coalesce(cardinality($2::text[]), 0) = 0 OR status = ANY($2)) ORDER BY id`,
		source, statuses)
	if err != nil {
		return nil, fmt.Errorf("dead letters: %w", err)
	}
	defer rows.Close()
	var out []*DeadLetter
	for rows.Next() {
		d, err := scanDeadLetter(rows)
		if err != nil {
			return nil, fmt.Errorf("dead letters: %w", err)
		}
		out = append(out, d)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("dead letters: %w", err)
	}
	return out, nil
}

// SetDeadLetterStatus sets the status of the dead letter of source's
// transaction ending at lsn, with a note, and marks it resolved.
func (a *Applier) SetDeadLetterStatus(ctx context.Context, source string, lsn pglogrepl.LSN, status, note string) error {
	if err := a.ensureSetup(ctx); err != nil {
		return fmt.Errorf("set dead letter status: %w", err)
	}
	_, err := a.pool.Exec(ctx, `UPDATE prism.dead_letters SET status = $3, note = NULLIF($4, ''), resolved_at = clock_timestamp()
		WHERE source_region = $1 AND end_lsn = $2::pg_lsn`, source, lsn.String(), status, note)
	if err != nil {
		return fmt.Errorf("set dead letter status %s/%s: %w", source, lsn, err)
	}
	return nil
}

// Retry applies the parked transaction id again, with its original
// replication origin and commit time but without checking the origin's
// progress (which already passed it), and marks it StatusRetried in the
// same database transaction. A retry that fails again stays parked with
// the new error and attempt count, and the error is returned. Only
// StatusParked rows can be retried. A schema change in it runs under the
// live apply path's rule: only with WithDDL(true) (ddl: replicate), else
// the retry fails with SQLSTATE 55000 and nothing of it is applied.
func (a *Applier) Retry(ctx context.Context, id int64) error {
	txn, err := a.parkedTxn(ctx, id)
	if err != nil {
		return fmt.Errorf("retry dead letter %d: %w", id, err)
	}
	var table string
	var op decode.Op
	err = a.withOrigin(ctx, txn.Origin, func(conn *pgxpool.Conn, _ pglogrepl.LSN) error {
		// A concurrent write (a local one, or another source's on the
		// live apply path) fails the replay with a serialization failure
		// or a deadlock; like the live path, apply it again at once on a
		// fresh snapshot.
		for tries := 0; ; tries++ {
			table, op, err = a.replayParked(ctx, conn, id, txn)
			if err == nil || !concurrent(err) || tries == maxConflictRetries || ctx.Err() != nil {
				return err
			}
			a.log.Debug().Err(err).Int64("id", id).Msg("concurrent write during a dead-letter retry; applying again")
		}
	})
	if err == nil {
		a.log.Info().Int64("id", id).Str("origin", txn.Origin).Stringer("end_lsn", txn.EndLSN).Msg("dead letter retried")
		return nil
	}
	aerr := newError(txn, table, op, err)
	if uerr := a.recordRetryFailure(ctx, id, aerr); uerr != nil {
		return fmt.Errorf("retry dead letter %d: %w", id, errors.Join(aerr, uerr))
	}
	return fmt.Errorf("retry dead letter %d: %w", id, aerr)
}

// parkedTxn reads dead letter id, which must be StatusParked, back into
// its transaction.
func (a *Applier) parkedTxn(ctx context.Context, id int64) (*decode.Txn, error) {
	if err := a.ensureSetup(ctx); err != nil {
		return nil, err
	}
	d, err := scanDeadLetter(a.pool.QueryRow(ctx, "SELECT "+deadLetterCols+" FROM prism.dead_letters WHERE id = $1", id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errors.New("no such dead letter")
	}
	if err != nil {
		return nil, err
	}
	if d.Status != StatusParked {
		return nil, fmt.Errorf("status is %s; only %s transactions can be retried", d.Status, StatusParked)
	}
	return d.Txn()
}

// replayParked applies txn, dead letter id, on conn, which holds its
// origin, and marks the dead letter StatusRetried in the same
// transaction. On error it returns the table and operation of the change
// that failed (none when the failure is not about a change).
func (a *Applier) replayParked(ctx context.Context, conn *pgxpool.Conn, id int64, txn *decode.Txn) (string, decode.Op, error) {
	// One snapshot for every check, like ApplyBatch (beginSQL).
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	if err != nil {
		return "", 0, err
	}
	defer tx.Rollback(ctx)
	ts := []byte(txn.CommitTime.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
	if _, err := tx.Exec(ctx, txnSetupSQL, txn.EndLSN.String(), string(ts), txn.Origin, a.local); err != nil {
		return "", 0, err
	}
	for j := range txn.Changes {
		c := &txn.Changes[j]
		if err := a.replayChange(ctx, conn, tx, c, j, ts); err != nil {
			return relName(c), c.Op, err
		}
	}
	tag, err := tx.Exec(ctx, `UPDATE prism.dead_letters SET status = $2, retried_at = clock_timestamp(),
		resolved_at = clock_timestamp(), attempts = attempts + 1 WHERE id = $1 AND status = $3`, id, StatusRetried, StatusParked)
	if err != nil {
		return "", 0, err
	}
	if tag.RowsAffected() != 1 {
		return "", 0, fmt.Errorf("dead letter %d changed meanwhile", id)
	}
	// Last before COMMIT (see originSQL).
	if _, err := tx.Exec(ctx, immediateSQL); err != nil {
		return "", 0, err
	}
	if _, err := tx.Exec(ctx, originSQL, txn.EndLSN.String(), string(ts)); err != nil {
		return "", 0, err
	}
	return "", 0, tx.Commit(ctx)
}

// replayChange runs change c, the index-th of its transaction, in tx on
// conn.
func (a *Applier) replayChange(ctx context.Context, conn *pgxpool.Conn, tx pgx.Tx, c *decode.Change, index int, ts []byte) error {
	if c.Op == decode.OpDDL {
		sql, vals, err := a.ddlCommand(c.DDL)
		if err != nil {
			return err
		}
		_, err = conn.Conn().PgConn().ExecParams(ctx, sql, vals, nil, nil, nil).Close()
		a.forgetSchema()
		return err
	}
	sd, sql, vals, formats, err := a.changeCommand(ctx, conn.Conn(), c, index, ts)
	var be *buildError
	if errors.As(err, &be) {
		return be.err
	}
	if err != nil {
		return err
	}
	if sd == nil {
		_, err = tx.Exec(ctx, sql)
		return err
	}
	_, err = conn.Conn().PgConn().ExecPrepared(ctx, sd.Name, vals, formats, nil).Close()
	return err
}

// recordRetryFailure records the failure aerr of a retry in dead letter
// id, which stays parked.
func (a *Applier) recordRetryFailure(ctx context.Context, id int64, aerr *Error) error {
	state, msg, _ := errorFields(aerr)
	_, err := a.pool.Exec(ctx, `UPDATE prism.dead_letters SET sqlstate = NULLIF($2, ''), message = $3,
		retried_at = clock_timestamp(), attempts = attempts + 1 WHERE id = $1 AND status = $4`, id, state, msg, StatusParked)
	return err
}

// ErrNotHalted reports that Skip found no halted transaction at the given
// position, or that the origin's progress is not right below it.
var ErrNotHalted = errors.New("no halted transaction there")

// Skip skips the transaction of source ending at lsn, at which replication
// from source halted: it advances origin prism_<source> to lsn and marks
// the transaction's record StatusSkipped, in one database transaction. It
// refuses (ErrNotHalted) unless prism.dead_letters records that
// transaction as halted and the origin's progress is below lsn, which
// makes it the next transaction to apply: a halted source applies nothing
// after the failing transaction.
func (a *Applier) Skip(ctx context.Context, source string, lsn pglogrepl.LSN, note string) error {
	err := a.withOrigin(ctx, source, func(conn *pgxpool.Conn, progress pglogrepl.LSN) error {
		if progress >= lsn {
			return fmt.Errorf("%w: origin %s is already at %s, at or past %s", ErrNotHalted, decode.OriginName(source), progress, lsn)
		}
		tx, err := conn.Begin(ctx)
		if err != nil {
			return err
		}
		defer tx.Rollback(ctx)
		var commitTime time.Time
		err = tx.QueryRow(ctx, `SELECT commit_time FROM prism.dead_letters
			WHERE source_region = $1 AND end_lsn = $2::pg_lsn AND status = $3 FOR UPDATE`, source, lsn.String(), StatusHalted).Scan(&commitTime)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("%w: prism.dead_letters has no halted transaction of %s ending at %s (origin progress %s)", ErrNotHalted, source, lsn, progress)
		}
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE prism.dead_letters SET status = $3, resolved_at = clock_timestamp(), note = NULLIF($4, '')
			WHERE source_region = $1 AND end_lsn = $2::pg_lsn`, source, lsn.String(), StatusSkipped, note); err != nil {
			return err
		}
		// Last before COMMIT (see originSQL).
		if _, err := tx.Exec(ctx, originSQL, lsn.String(), commitTime); err != nil {
			return err
		}
		return tx.Commit(ctx)
	})
	if err != nil {
		return fmt.Errorf("skip %s/%s: %w", source, lsn, err)
	}
	a.log.Warn().Str("origin", source).Stringer("end_lsn", lsn).Msg("halted transaction skipped by the operator")
	return nil
}

// RegionPolicy is what a region's nodes record in its database
// (RecordPolicy) for other regions' direct-SQL fallbacks and for doctor.
type RegionPolicy struct {
	Region string `json:"region"`
	Node   string `json:"node"` // the node that recorded it
	// OnApplyError and ErrorTables are on_apply_error and its overrides
	// by table ("schema.table").
	OnApplyError string            `json:"policy"`
	ErrorTables  map[string]string `json:"tables"`
	// Conflicts and ConflictTables are the conflict policy and its
	// overrides by table.
	Conflicts      string            `json:"conflicts,omitempty"`
	ConflictTables map[string]string `json:"conflict_tables,omitempty"`
	// DDL is the nodes' ddl setting: off or replicate.
	DDL        string    `json:"ddl,omitempty"`
	RecordedAt time.Time `json:"recorded_at"`
}

// RecordPolicy records p, the policies of the nodes of p.Region (this
// database's). Another region's node that applies here through the
// direct-SQL fallback reads it (RecordedPolicy), so a transaction that
// fails here is handled the same way whichever path applied it; the node
// that starts last records its own.
//
// The record is the body of function prism.apply_policy(), not a row: a
// row would be a write of this region that the slot may not pass before
// every other region acknowledged it (so a region whose peers are down
// could not stop its server with a fast shutdown, which waits for the
// slot's consumer to confirm it); a function is catalog state, which
// logical decoding does not carry.
func (a *Applier) RecordPolicy(ctx context.Context, p RegionPolicy) error {
	if p.ErrorTables == nil {
		p.ErrorTables = map[string]string{}
	}
	if p.RecordedAt.IsZero() {
		p.RecordedAt = time.Now().UTC()
	}
	js, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("record apply policy: %w", err)
	}
	tx, err := a.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("record apply policy: %w", err)
	}
	defer tx.Rollback(ctx)
	// Not a schema change to replicate (event trigger prism_ddl).
	if _, err := tx.Exec(ctx, "SELECT pg_catalog.set_config('prism.ddl', 'local', true)"); err != nil {
		return fmt.Errorf("record apply policy: %w", err)
	}
	body := "SELECT " + lit(string(js)) + "::pg_catalog.jsonb"
	if _, err := tx.Exec(ctx, "CREATE OR REPLACE FUNCTION prism.apply_policy() RETURNS pg_catalog.jsonb LANGUAGE sql IMMUTABLE AS "+lit(body)); err != nil {
		return fmt.Errorf("record apply policy: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("record apply policy: %w", err)
	}
	return nil
}

// RecordedPolicy returns the policy recorded for region; found is false
// when no node of the region has recorded one.
func (a *Applier) RecordedPolicy(ctx context.Context, region string) (p RegionPolicy, found bool, err error) {
	return ReadRegionPolicy(ctx, a.pool, region)
}

// ReadRegionPolicy reads the policy recorded (RecordPolicy) in the
// database q reads, which must be region's.
func ReadRegionPolicy(ctx context.Context, q Querier, region string) (p RegionPolicy, found bool, err error) {
	var js string
	err = q.QueryRow(ctx, "SELECT prism.apply_policy()::text").Scan(&js)
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && (pgErr.Code == "42883" || pgErr.Code == "3F000"):
		// No node of the region has recorded one (or none of this
		// version has started there).
		return RegionPolicy{}, false, nil
	case err != nil:
		return RegionPolicy{}, false, fmt.Errorf("read the apply policy of region %s: %w", region, err)
	}
	if err := json.Unmarshal([]byte(js), &p); err != nil {
		return RegionPolicy{}, false, fmt.Errorf("read the apply policy of region %s: %w", region, err)
	}
	if p.Region != region {
		return RegionPolicy{}, false, fmt.Errorf("read the apply policy of region %s: the database holds region %s's (node %s)", region, p.Region, p.Node)
	}
	return p, true, nil
}
