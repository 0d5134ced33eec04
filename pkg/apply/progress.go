package apply

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// rowQuerier is what OriginProgress reads through: a *pgx.Conn, a
// *pgxpool.Pool or a pgx.Tx.
type rowQuerier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// OriginProgress returns the durable progress of origin
// prism_<sourceRegion> (decode.OriginName) in the database q reads: the
// end LSN of the last transaction applied from that region, or 0 when
// nothing was applied yet. It is the one reading of that progress; the
// Applier (Progress) and the status command both use it.
func OriginProgress(ctx context.Context, q rowQuerier, sourceRegion string) (pglogrepl.LSN, error) {
	var s *string
	err := q.QueryRow(ctx,
		"SELECT pg_replication_origin_progress(roname, true)::text FROM pg_catalog.pg_replication_origin WHERE roname = $1",
		decode.OriginName(sourceRegion)).Scan(&s)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("apply progress %s: %w", sourceRegion, err)
	}
	if s == nil {
		return 0, nil
	}
	lsn, err := pglogrepl.ParseLSN(*s)
	if err != nil {
		return 0, fmt.Errorf("apply progress %s: %w", sourceRegion, err)
	}
	return lsn, nil
}
