package apply

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// ErrBusy reports that another session holds the replication origin of the
// source region in the target database. It is retryable: the holder either
// finishes its transaction and releases the origin, or is fenced.
var ErrBusy = errors.New("replication origin busy")

// Error is a failed apply of one source transaction. Nothing of the
// transaction is committed when Apply returns an Error, except when the
// error is about releasing the origin after a successful commit (then
// Apply returns nil instead).
type Error struct {
	Origin   string        // source region
	EndLSN   pglogrepl.LSN // end LSN of the failed transaction
	Xid      uint32        // its transaction id in the source region
	Table    string        // schema.table of the failing change; empty if not about a table
	Op       decode.Op     // operation of the failing change; 0 if not about a change
	SQLState string        // Postgres SQLSTATE when the server reported the error
	// Retryable reports whether applying the same transaction again may
	// succeed (lost connection, serialization failure, busy origin, ...).
	Retryable bool
	Err       error
}

// Error describes the failure with the source position and the table.
func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "apply %s/%s", e.Origin, e.EndLSN)
	if e.Table != "" {
		b.WriteString(" ")
		b.WriteString(e.Table)
	}
	if e.Op != 0 {
		b.WriteString(" ")
		b.WriteString(e.Op.String())
	}
	b.WriteString(": ")
	if e.Err != nil {
		b.WriteString(e.Err.Error())
	}
	if e.SQLState == "42P10" && e.Table != "" {
		// ON CONFLICT found no unique index on the source's key columns.
		fmt.Fprintf(&b, " (the source identifies rows of %s by its primary key or replica identity index; "+
			"give the table in this region the same primary key or unique index, then replication resumes)", e.Table)
	}
	return b.String()
}

// Unwrap returns the underlying error.
func (e *Error) Unwrap() error { return e.Err }

// Temporary reports whether the failure is retryable; it lets callers that
// only know the behaviour classify it.
func (e *Error) Temporary() bool { return e.Retryable }

// IsRetryable reports whether err (from Apply, ApplyBatch, Setup, Progress
// or Fence) is worth retrying with the same input.
func IsRetryable(err error) bool {
	if err == nil {
		return false
	}
	var ae *Error
	if errors.As(err, &ae) {
		return ae.Retryable
	}
	_, retry := classify(err)
	return retry
}

// permanentError is a failure found by the applier itself (no key, missing
// column) that no retry can fix; it carries a SQLSTATE for the caller.
type permanentError struct {
	code string
	msg  string
}

func (e *permanentError) Error() string { return e.msg }

func permanent(code, format string, args ...any) error {
	return &permanentError{code: code, msg: fmt.Sprintf(format, args...)}
}

// classify returns the SQLSTATE of err (empty when the server did not
// report one) and whether a retry may succeed.
//
// The rule, the same wherever prism-cdc decides whether to retry (here, in
// the peers server and shipper through Temporary(), and when a node waits
// for its database):
//   - an error that knows says so: ErrBusy and the failures the applier
//     finds itself here, Temporary() (which *Error offers) in peers;
//   - an error the server reported with a SQLSTATE is retryable exactly
//     when RetryableState lists the code;
//   - any other error is retryable: it came from the connection, the
//     context or the machine, not from the transaction, so the server's
//     state is unknown, and replaying is safe because apply is idempotent.
//     Calling it permanent would halt or park a transaction that may be
//     fine.
func classify(err error) (string, bool) {
	if errors.Is(err, ErrBusy) {
		return "55006", true
	}
	var pe *permanentError
	if errors.As(err, &pe) {
		return pe.code, false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code, RetryableState(pgErr.Code)
	}
	return "", true
}

// RetryableState reports whether a Postgres condition, named by its
// SQLSTATE, is transient: applying the same transaction again may
// succeed. It is the one table of retryable conditions; every other
// SQLSTATE is about the transaction or the schema and is permanent.
func RetryableState(code string) bool {
	switch code {
	case "25P03", // idle_in_transaction_session_timeout
		"55006", // object_in_use: the origin is held by another session
		"55P03", // lock_not_available
		"57000", // operator_intervention
		"57014", // query_canceled
		"57P01", // admin_shutdown
		"57P02", // crash_shutdown
		"57P03", // cannot_connect_now
		"57P05", // idle_session_timeout
		"58000", // system_error
		"58030", // io_error
		"PR003": // prism-cdc: the target region's bootstrap has not finished
		return true
	}
	if len(code) != 5 {
		return false
	}
	switch code[:2] {
	case "08", // connection_exception
		"40", // transaction_rollback: serialization failure, deadlock, ...
		"53": // insufficient_resources: disk full, out of memory, too many connections
		return true
	}
	return false
}

// OriginHolder returns the process ID of the session that holds a
// replication origin, from the error pg_replication_origin_session_setup
// raises when the origin is busy (SQLSTATE 55006). PostgreSQL names the
// holder only in the message ("... is already active for PID 1234"), so
// the message is read for the number, never to classify the error.
//
// Why the message: PostgreSQL 15 exposes the holder nowhere else.
// pg_replication_origin_status has no pid column, pg_stat_activity does
// not say which origin a backend set up, and an origin takes no lock
// that pg_locks would show; the error carries no field for it either.
//
// The message is in the server session's lc_messages. It reads the
// number after the last "PID ", which the English text and most of
// PostgreSQL 15's translations (de, es, it, ja, ru, sv, uk, zh_CN) have;
// where a translation words it otherwise (ka "PID-სთვის 1234", ko
// "1234 PID 프로세스") or a future one drops the word, ok is false: it
// never guesses a number. Callers then do without the PID: Fence
// terminates nobody and returns ErrBusy saying it found no PID (its
// callers log that and apply retries on the busy origin), and a
// bootstrap waits for the origin instead of terminating its holder.
func OriginHolder(err error) (pid int, ok bool) {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "55006" {
		return 0, false
	}
	i := strings.LastIndex(pgErr.Message, "PID ")
	if i < 0 {
		return 0, false
	}
	digits := pgErr.Message[i+len("PID "):]
	if end := strings.IndexFunc(digits, func(r rune) bool { return r < '0' || r > '9' }); end >= 0 {
		digits = digits[:end]
	}
	pid, perr := strconv.Atoi(digits)
	if perr != nil || pid <= 0 {
		return 0, false
	}
	return pid, true
}

func newError(txn *decode.Txn, table string, op decode.Op, err error) *Error {
	code, retry := classify(err)
	return &Error{Origin: txn.Origin, EndLSN: txn.EndLSN, Xid: txn.Xid, Table: table, Op: op, SQLState: code, Retryable: retry, Err: err}
}

// lostError is the error of a failure that is not txn's own (a broken
// connection, a failed WAL flush after its commit): retryable, and about
// none of its changes.
func lostError(txn *decode.Txn, err error) *Error {
	e := newError(txn, "", 0, err)
	e.Retryable = true
	return e
}

// errTable returns the schema-qualified table a server error names (a
// deferred constraint failing at COMMIT does), or "".
func errTable(err error) string {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.TableName == "" {
		return ""
	}
	if pgErr.SchemaName == "" {
		return pgErr.TableName
	}
	return pgErr.SchemaName + "." + pgErr.TableName
}

// SQLCode returns the SQLSTATE of the failure ("" when it has none), for
// callers that classify errors by behaviour.
func (e *Error) SQLCode() string { return e.SQLState }
