package peers

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Applier applies transactions idempotently and reports durable progress.
//
// Apply commits the transaction and advances the replication origin
// prism_<txn.Origin> to txn.EndLSN in the same database transaction; a
// transaction at or below the origin's progress is skipped and succeeds.
// Progress returns the origin's durable progress for a source region.
//
// An Applier may also offer, checked by type assertion:
//
//	ApplyBatch(ctx context.Context, txns []*decode.Txn) (int, error)
//	    applies consecutive transactions in order and returns n: txns[:n]
//	    are durable, and an error is about txns[n] alone (a failure that
//	    is no transaction's own, such as a lost connection, is
//	    retryable);
//	Fence(ctx context.Context, sourceRegion string) (int, error)
//	    terminates other sessions holding the source region's origin.
//
// Errors are classified by the methods they (or an error they wrap) offer:
// Temporary() bool says whether retrying can succeed, and SQLCode() string
// names the Postgres condition (SQLSTATE). A *pgconn.PgError is classified by its code.
// An error offering neither is treated as permanent, except network and
// timeout errors.
type Applier interface {
	Apply(ctx context.Context, txn *decode.Txn) error
	Progress(ctx context.Context, sourceRegion string) (pglogrepl.LSN, error)
}

// batchApplier is the optional batch capability of an Applier.
type batchApplier interface {
	ApplyBatch(ctx context.Context, txns []*decode.Txn) (int, error)
}

// fencer is the optional capability of an Applier to terminate a frozen
// previous holder of a source region's origin.
type fencer interface {
	Fence(ctx context.Context, sourceRegion string) (int, error)
}

// releaser is the optional capability of an Applier that keeps holding a
// source region's origin for a while after applying (to spare the next
// batch the session setup) to let go of it at once.
type releaser interface {
	Release(sourceRegion string)
}

// Fallback opens the direct-SQL path to the target region's database. It
// returns an Applier on that database and a function that releases it.
type Fallback func(ctx context.Context) (Applier, func(), error)

// temporary is implemented by errors that know whether a retry can help.
type temporary interface{ Temporary() bool }

// sqlStater is implemented by errors that carry a Postgres SQLSTATE.
type sqlStater interface{ SQLCode() string }

// classify returns the SQLSTATE of an apply error (empty when unknown) and
// whether retrying the same transaction can succeed.
func classify(err error) (sqlstate string, retryable bool) {
	var ss sqlStater
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &ss):
		sqlstate = ss.SQLCode()
	case errors.As(err, &pgErr):
		sqlstate = pgErr.Code
	}
	var tmp temporary
	if errors.As(err, &tmp) {
		return sqlstate, tmp.Temporary()
	}
	if sqlstate != "" {
		return sqlstate, retryableState(sqlstate)
	}
	var netErr net.Error
	switch {
	case errors.As(err, &netErr), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled),
		pgconn.SafeToRetry(err), pgconn.Timeout(err):
		return "", true
	}
	var connectErr *pgconn.ConnectError
	if errors.As(err, &connectErr) {
		return "", true
	}
	return "", false
}

// retryableState reports whether a Postgres condition is transient:
// connection loss, serialization failure and deadlock, lock and object in
// use, insufficient resources, operator intervention (shutdown), system
// errors.
func retryableState(s string) bool {
	switch {
	case strings.HasPrefix(s, "08"), // connection exception
		strings.HasPrefix(s, "40"), // transaction rollback
		strings.HasPrefix(s, "53"), // insufficient resources
		strings.HasPrefix(s, "57"), // operator intervention
		strings.HasPrefix(s, "58"), // system error
		s == "55P03",               // lock not available
		s == "55006":               // object in use (origin busy)
		return true
	}
	return false
}
