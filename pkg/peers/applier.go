package peers

import (
	"context"
	"errors"
	"net"

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
// names the Postgres condition (SQLSTATE). An error that does not offer
// Temporary() is retried: an Applier reports a permanent failure (one that
// halts the stream or goes to the on_apply_error policy) with Temporary()
// false, as the apply package's *Error does.
type Applier interface {
	Apply(ctx context.Context, txn *decode.Txn) error
	Progress(ctx context.Context, sourceRegion string) (pglogrepl.LSN, error)
}

// batchApplier is the optional batch capability of an Applier.
type batchApplier interface {
	ApplyBatch(ctx context.Context, txns []*decode.Txn) (int, error)
}

// lazyFlusher is the optional capability of an Applier whose ApplyBatch
// commits without flushing the WAL: what it applied is durable once
// Progress, which flushes, reports it. The Server then acknowledges by
// Progress, from a goroutine of its own, so the next transactions are
// applied while the WAL is flushed.
type lazyFlusher interface {
	LazyFlush() bool
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
// whether retrying the same transaction can succeed. Whether to retry is
// the error's own word (Temporary(), which the apply package derives from
// its one table of retryable SQLSTATEs); an error that does not say is
// retried, as apply treats a failure that is not the transaction's own:
// replaying is safe because apply is idempotent, while calling it
// permanent would halt at or park a transaction that may be fine.
func classify(err error) (sqlstate string, retryable bool) {
	var ss sqlStater
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &ss):
		sqlstate = ss.SQLCode()
	case errors.As(err, &pgErr):
		sqlstate = pgErr.Code
	}
	// net.Error's Temporary is deprecated and says false for a refused
	// or reset connection: those are not the transaction's failure.
	var tmp temporary
	if errors.As(err, &tmp) {
		if _, isNet := tmp.(net.Error); !isNet {
			return sqlstate, tmp.Temporary()
		}
	}
	return sqlstate, true
}
