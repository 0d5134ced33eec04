package apply

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Outcomes of an undo, as UndoResult.Status and prism.undo_log.status.
const (
	// UndoDone: every change was reverted.
	UndoDone = "undone"
	// UndoConflict: some rows were changed again after the transaction and
	// were left alone (the others were reverted).
	UndoConflict = "conflict"
	// UndoFailed: some change could not be reverted because of an error
	// (the others were reverted).
	UndoFailed = "failed"
)

// UndoRequest asks the source region to revert one of its transactions
// that a target region could not apply.
type UndoRequest struct {
	Target   string // the region that could not apply it
	SQLState string // why it failed there
	Message  string
}

// UndoChange is the outcome for one change of an undone transaction.
type UndoChange struct {
	Op     string         `json:"op"`
	Table  string         `json:"table"`
	Row    map[string]any `json:"row,omitempty"` // the values the transaction wrote (or deleted)
	Result string         `json:"result"`
}

// UndoResult is the outcome of Undo, as recorded in prism.undo_log.
type UndoResult struct {
	Status  string // UndoDone, UndoConflict or UndoFailed
	Detail  string
	Changes []UndoChange
}

// Undo reverts txn, a transaction of this (the source) region, in this
// database, because req.Target could not apply it. It writes one local
// transaction that compensates each change, last change first, from the
// before-images (the table needs REPLICA IDENTITY FULL for updates and
// deletes): an insert is undone by deleting the row, an update by
// restoring the old values, a delete by inserting the old row again. A
// change is compensated only where the row still holds exactly what txn
// wrote (and, for a delete, no row with its primary key exists again);
// otherwise it is an undo conflict and the newer data is left alone. The
// outcome of every change is recorded in prism.undo_log in the same
// transaction. The compensation carries no replication origin, so it is
// shipped to every region like any local write.
//
// Undo is idempotent: a transaction already in prism.undo_log is not
// reverted again, and its recorded result is returned.
func (a *Applier) Undo(ctx context.Context, txn *decode.Txn, req UndoRequest) (*UndoResult, error) {
	if txn == nil || txn.EndLSN == 0 {
		return nil, errors.New("undo: transaction lacks end LSN")
	}
	if err := a.ensureSetup(ctx); err != nil {
		return nil, fmt.Errorf("undo %s: %w", txn.EndLSN, err)
	}
	res, err := a.undo(ctx, txn, req)
	if err != nil {
		return nil, fmt.Errorf("undo %s/%s: %w", txn.Origin, txn.EndLSN, err)
	}
	a.log.Warn().Str("origin", txn.Origin).Stringer("end_lsn", txn.EndLSN).Uint32("xid", txn.Xid).
		Str("requested_by", req.Target).Str("status", res.Status).Str("detail", res.Detail).
		Msg("transaction reverted at the source on request; see prism.undo_log")
	return res, nil
}

func (a *Applier) undo(ctx context.Context, txn *decode.Txn, req UndoRequest) (*UndoResult, error) {
	conn, err := a.pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Release()
	tx, err := conn.Begin(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback(ctx)
	var id int64
	err = tx.QueryRow(ctx, `INSERT INTO prism.undo_log (origin_region, end_lsn, xid, commit_time, requested_by, sqlstate, message, status, changes)
		VALUES ($1, $2::pg_lsn, $3, $4, $5, NULLIF($6, ''), $7, 'pending', '[]') ON CONFLICT (end_lsn) DO NOTHING RETURNING id`,
		txn.Origin, txn.EndLSN.String(), int64(txn.Xid), nullTime(txn), req.Target, req.SQLState, req.Message).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		tx.Rollback(ctx)
		return a.undoRecorded(ctx, txn)
	}
	if err != nil {
		return nil, err
	}
	res := &UndoResult{Status: UndoDone}
	cache := map[string]*localTable{}
	conflicts, failures := 0, 0
	for i := len(txn.Changes) - 1; i >= 0; i-- {
		uc, failed, err := a.undoStep(ctx, tx, cache, &txn.Changes[i])
		if err != nil {
			return nil, err
		}
		switch {
		case failed:
			failures++
		case strings.HasPrefix(uc.Result, "conflict"):
			conflicts++
		}
		res.Changes = append(res.Changes, uc)
	}
	switch {
	case failures > 0:
		res.Status = UndoFailed
	case conflicts > 0:
		res.Status = UndoConflict
	}
	res.Detail = fmt.Sprintf("%d of %d changes reverted, %d conflicts, %d failures",
		len(res.Changes)-conflicts-failures, len(res.Changes), conflicts, failures)
	changes, err := json.Marshal(res.Changes)
	if err != nil {
		return nil, err
	}
	if _, err := tx.Exec(ctx, "UPDATE prism.undo_log SET status = $2, changes = $3::jsonb, detail = $4 WHERE id = $1",
		id, res.Status, string(changes), res.Detail); err != nil {
		return nil, err
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, err
	}
	return res, nil
}

// undoStep reverts change c under a savepoint and returns its record. A
// change the database refuses is rolled back to the savepoint and
// recorded as failed; an error means the connection failed and nothing is
// recorded.
func (a *Applier) undoStep(ctx context.Context, tx pgx.Tx, cache map[string]*localTable, c *decode.Change) (uc UndoChange, failed bool, err error) {
	uc = UndoChange{Op: c.Op.String(), Table: relName(c)}
	if c.Rel != nil {
		row := c.New
		if c.Op == decode.OpDelete {
			row = c.Old
		}
		uc.Row, _ = rowJSON(c.Rel, row)
	}
	if _, err := tx.Exec(ctx, "SAVEPOINT prism_undo"); err != nil {
		return uc, false, err
	}
	result, err := a.undoChange(ctx, tx, cache, c)
	if err != nil {
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) && !errors.As(err, new(*permanentError)) {
			return uc, false, err
		}
		if _, rerr := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT prism_undo"); rerr != nil {
			return uc, false, rerr
		}
		result, failed = "failed: "+err.Error(), true
	}
	uc.Result = result
	if _, err := tx.Exec(ctx, "RELEASE SAVEPOINT prism_undo"); err != nil {
		return uc, false, err
	}
	return uc, failed, nil
}

func nullTime(txn *decode.Txn) any {
	if txn.CommitTime.IsZero() {
		return nil
	}
	return txn.CommitTime
}

// undoRecorded returns the recorded outcome of an earlier undo.
func (a *Applier) undoRecorded(ctx context.Context, txn *decode.Txn) (*UndoResult, error) {
	res := &UndoResult{}
	var changes string
	var detail *string
	err := a.pool.QueryRow(ctx, "SELECT status, changes::text, detail FROM prism.undo_log WHERE end_lsn = $1::pg_lsn",
		txn.EndLSN.String()).Scan(&res.Status, &changes, &detail)
	if err != nil {
		return nil, err
	}
	if detail != nil {
		res.Detail = *detail
	}
	if err := json.Unmarshal([]byte(changes), &res.Changes); err != nil {
		return nil, err
	}
	return res, nil
}

// localTable describes a table of this database for undo statements.
type localTable struct {
	name    string // quoted schema.table
	types   map[string]string
	pk      []string
	skipped map[string]bool // generated columns
	always  map[string]bool // GENERATED ALWAYS AS IDENTITY columns
}

func (a *Applier) localTable(ctx context.Context, tx pgx.Tx, cache map[string]*localTable, rel *decode.Relation) (*localTable, error) {
	key := rel.Schema + "." + rel.Table
	if t, ok := cache[key]; ok {
		return t, nil
	}
	t := &localTable{name: quote(rel.Schema) + "." + quote(rel.Table), types: map[string]string{}, skipped: map[string]bool{}, always: map[string]bool{}}
	rows, err := tx.Query(ctx, `SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '', a.attidentity = 'a',
			EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisprimary AND a.attnum = ANY (i.indkey))
		FROM pg_attribute a WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum`, t.name)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		var name, typ string
		var generated, always, pk bool
		if err := rows.Scan(&name, &typ, &generated, &always, &pk); err != nil {
			return nil, err
		}
		t.types[name] = typ
		if generated {
			t.skipped[name] = true
		}
		if always {
			t.always[name] = true
		}
		if pk {
			t.pk = append(t.pk, name)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	cache[key] = t
	return t, nil
}

// undoStmt builds one parameterised statement.
type undoStmt struct {
	t    *localTable
	args [][]byte
}

func (s *undoStmt) param(col string, v decode.Value) string {
	s.args = append(s.args, v.Data) // nil for NULL
	return "$" + strconv.Itoa(len(s.args)) + "::" + s.t.types[col]
}

// match is a condition that holds for rows whose columns have the given
// values (compared by their text form in this database, NULL equal to
// NULL); unchanged TOASTed values and generated columns are left out.
func (s *undoStmt) match(alias string, rel *decode.Relation, row []decode.Value, only []string) (string, error) {
	var conds []string
	for i, col := range rel.Columns {
		v := row[i]
		if v.Kind == decode.ValueUnchanged || s.t.skipped[col.Name] {
			continue
		}
		if only != nil && !contains(only, col.Name) {
			continue
		}
		if _, ok := s.t.types[col.Name]; !ok {
			return "", permanent("42703", "column %s of %s no longer exists", col.Name, s.t.name)
		}
		if v.Kind == decode.ValueBinary {
			return "", permanent("0A000", "binary values cannot be compared for undo")
		}
		conds = append(conds, fmt.Sprintf("(%s.%s)::text IS NOT DISTINCT FROM (%s)::text", alias, quote(col.Name), s.param(col.Name, v)))
	}
	if len(conds) == 0 {
		return "", permanent("42P10", "no column to find the row by")
	}
	return strings.Join(conds, " AND "), nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// undoChange compensates one change and returns its outcome: "reverted
// ..." or "conflict: ...".
func (a *Applier) undoChange(ctx context.Context, tx pgx.Tx, cache map[string]*localTable, c *decode.Change) (string, error) {
	if c.Op == decode.OpTruncate {
		return "conflict: a TRUNCATE cannot be undone", nil
	}
	if c.Op == decode.OpDDL {
		return "conflict: a schema change cannot be undone", nil
	}
	if c.Rel == nil {
		return "", permanent("22023", "change without relation")
	}
	t, err := a.localTable(ctx, tx, cache, c.Rel)
	if err != nil {
		return "", err
	}
	full := c.Rel.ReplicaIdentity == decode.IdentityFull && c.Old != nil
	s := &undoStmt{t: t}
	pc := tx.Conn().PgConn()
	switch c.Op {
	case decode.OpInsert:
		return undoInsert(ctx, pc, s, c)
	case decode.OpUpdate:
		if !full || c.New == nil {
			return "conflict: no before-image (set REPLICA IDENTITY FULL on the table); left as it is", nil
		}
		return undoUpdate(ctx, pc, s, c)
	case decode.OpDelete:
		if !full {
			return "conflict: no before-image (set REPLICA IDENTITY FULL on the table); left as it is", nil
		}
		return undoDelete(ctx, pc, s, c)
	}
	return "", permanent("22023", "unknown op %d", c.Op)
}

// exec runs one compensating statement: it returns reverted when it
// changed a row, conflict when it found none to change.
func (s *undoStmt) exec(ctx context.Context, pc *pgconn.PgConn, sql, reverted, conflict string) (string, error) {
	tag, err := pc.ExecParams(ctx, sql, s.args, nil, nil, nil).Close()
	if err != nil {
		return "", err
	}
	if tag.RowsAffected() == 0 {
		return conflict, nil
	}
	return reverted, nil
}

// restorable reports whether the old value v of column col is to be
// written back: it was sent, and the column is a stored one of the local
// table. A binary value cannot be.
func restorable(t *localTable, col string, v decode.Value) (bool, error) {
	if v.Kind == decode.ValueUnchanged || t.skipped[col] {
		return false, nil
	}
	if _, ok := t.types[col]; !ok {
		return false, nil
	}
	if v.Kind == decode.ValueBinary {
		return false, permanent("0A000", "binary values cannot be restored by undo")
	}
	return true, nil
}

// undoInsert deletes the row an INSERT added, if it is still as inserted.
func undoInsert(ctx context.Context, pc *pgconn.PgConn, s *undoStmt, c *decode.Change) (string, error) {
	t := s.t
	if c.New == nil {
		return "", permanent("22023", "INSERT without new row")
	}
	cond, err := s.match("t", c.Rel, c.New, nil)
	if err != nil {
		return "", err
	}
	sql := fmt.Sprintf("WITH r AS (SELECT t.ctid FROM %s t WHERE %s LIMIT 1 FOR UPDATE) DELETE FROM %s t USING r WHERE t.ctid = r.ctid",
		t.name, cond, t.name)
	return s.exec(ctx, pc, sql, "reverted: inserted row deleted", "conflict: the inserted row was changed or deleted since; left as it is")
}

// undoUpdate restores the old values of an UPDATE (with its before-image),
// if the row is still as updated.
func undoUpdate(ctx context.Context, pc *pgconn.PgConn, s *undoStmt, c *decode.Change) (string, error) {
	t := s.t
	written := make([]decode.Value, len(c.New))
	for i, v := range c.New {
		if v.Kind == decode.ValueUnchanged {
			v = c.Old[i]
		}
		written[i] = v
	}
	cond, err := s.match("t", c.Rel, written, nil)
	if err != nil {
		return "", err
	}
	var sets []string
	for i, col := range c.Rel.Columns {
		v := c.Old[i]
		if ok, err := restorable(t, col.Name, v); !ok {
			if err != nil {
				return "", err
			}
			continue
		}
		if t.always[col.Name] {
			// An UPDATE cannot assign an identity ALWAYS column; an
			// unchanged one needs no restoring.
			if w := written[i]; w.Kind != v.Kind || !bytes.Equal(w.Data, v.Data) {
				return "conflict: the update changed GENERATED ALWAYS identity column " + col.Name + ", which an UPDATE cannot restore; left as it is", nil
			}
			continue
		}
		sets = append(sets, quote(col.Name)+" = "+s.param(col.Name, v))
	}
	if len(sets) == 0 {
		return "reverted: no column to restore", nil
	}
	sql := fmt.Sprintf("WITH r AS (SELECT t.ctid FROM %s t WHERE %s LIMIT 1 FOR UPDATE) UPDATE %s t SET %s FROM r WHERE t.ctid = r.ctid",
		t.name, cond, t.name, strings.Join(sets, ", "))
	return s.exec(ctx, pc, sql, "reverted: old values restored", "conflict: the updated row was changed or deleted since; left as it is")
}

// undoDelete inserts a deleted row (its before-image) again, unless a row
// with its key exists again.
func undoDelete(ctx context.Context, pc *pgconn.PgConn, s *undoStmt, c *decode.Change) (string, error) {
	t := s.t
	var cols, vals []string
	overriding := ""
	for i, col := range c.Rel.Columns {
		v := c.Old[i]
		if ok, err := restorable(t, col.Name, v); !ok {
			if err != nil {
				return "", err
			}
			continue
		}
		cols = append(cols, quote(col.Name))
		vals = append(vals, s.param(col.Name, v))
		if t.always[col.Name] {
			// The deleted row comes back with its own identity value.
			overriding = " OVERRIDING SYSTEM VALUE"
		}
	}
	guard := ""
	if len(t.pk) > 0 {
		cond, err := s.match("t", c.Rel, c.Old, t.pk)
		if err != nil {
			return "", err
		}
		guard = fmt.Sprintf(" WHERE NOT EXISTS (SELECT 1 FROM %s t WHERE %s)", t.name, cond)
	}
	sql := fmt.Sprintf("INSERT INTO %s (%s)%s SELECT %s%s", t.name, strings.Join(cols, ", "), overriding, strings.Join(vals, ", "), guard)
	return s.exec(ctx, pc, sql, "reverted: deleted row inserted again", "conflict: a row with the deleted row's key exists again; left as it is")
}
