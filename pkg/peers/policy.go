package peers

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Action is what happened to a transaction that failed permanently in a
// target region.
type Action uint8

// The actions of the apply error policies.
const (
	// ActionHalt: nothing changed; the transaction stays pending and the
	// shipper retries it until the cause is fixed (or it is skipped).
	ActionHalt Action = iota
	// ActionDeadLetter: the transaction is parked in the target database
	// and the origin's progress passed it, durably; it is acknowledged.
	ActionDeadLetter
	// ActionUndo: like ActionDeadLetter, and the source region is asked to
	// revert the transaction.
	ActionUndo
)

// String names the action as the configuration does.
func (a Action) String() string {
	switch a {
	case ActionHalt:
		return "halt"
	case ActionDeadLetter:
		return "dead_letter"
	case ActionUndo:
		return "undo"
	}
	return fmt.Sprintf("Action(%d)", uint8(a))
}

// UndoRequest asks a source region to revert one of its transactions that
// a target region could not apply.
type UndoRequest struct {
	Txn      *decode.Txn // as the target received it
	SQLState string      // why it failed in the target region
	Message  string
}

// ErrorHandler carries out the apply error policy of a target database. It
// is given the Applier the transaction failed on: a node's own, or the
// direct-SQL fallback's.
type ErrorHandler interface {
	// Handle is called for a transaction that failed permanently with err.
	// It returns the action it took; ActionDeadLetter and ActionUndo mean
	// the transaction is parked and the origin passed it, in one database
	// transaction, so it is acknowledged. An error means nothing durable
	// changed; it is classified like an apply error.
	Handle(ctx context.Context, app Applier, txn *decode.Txn, err error) (Action, error)
	// PendingUndos returns the source's parked transactions whose undo
	// was requested and not answered yet, in order.
	PendingUndos(ctx context.Context, app Applier, source string) ([]UndoRequest, error)
	// Undone records the source's answer to an undo request.
	Undone(ctx context.Context, app Applier, source string, lsn pglogrepl.LSN, status, note string) error
}

// UndoFunc reverts, in the source region's database, a transaction that
// target could not apply, and returns the outcome (a status such as
// "undone" or "conflict", and a note). It must be idempotent: a request
// may arrive more than once.
type UndoFunc func(ctx context.Context, target string, req UndoRequest) (status, note string, err error)

// undoFrame carries an UndoRequest from a receiver to the source's shipper.
type undoFrame struct {
	Txn      *decode.Txn
	SQLState string
	Message  string
}

// undoneFrame answers an undoFrame: the source's outcome for the
// transaction ending at LSN.
type undoneFrame struct {
	LSN    pglogrepl.LSN
	Status string
	Note   string
}

// describeFailure says which transaction failed and why: the error, the
// server's detail (it names the key of a constraint violation) and the
// source transaction id.
func describeFailure(txn *decode.Txn, err error) string {
	var b strings.Builder
	b.WriteString(err.Error())
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Detail != "" {
		fmt.Fprintf(&b, " (%s)", pgErr.Detail)
	}
	fmt.Fprintf(&b, " [origin %s, end lsn %s, xid %d]", txn.Origin, txn.EndLSN, txn.Xid)
	return b.String()
}
