package apply

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Querier is what OriginProgress and ReadRegionPolicy read through: a
// *pgx.Conn, a *pgxpool.Pool or a pgx.Tx.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// OriginProgress returns the durable progress of origin
// prism_<sourceRegion> (decode.OriginName) in the database q reads: the
// end LSN of the last transaction applied from that region, or 0 when
// nothing was applied yet. It is the one reading of that progress; the
// Applier (Progress) and the status command both use it.
func OriginProgress(ctx context.Context, q Querier, sourceRegion string) (pglogrepl.LSN, error) {
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

// lsnText is l in pg_lsn's text form, as l.String() writes it, without
// fmt: the apply statements take it as a parameter twice per transaction.
func lsnText(l pglogrepl.LSN) []byte {
	b := make([]byte, 0, 17)
	b = appendUpperHex(b, uint64(l)>>32)
	b = append(b, '/')
	return appendUpperHex(b, uint64(l)&0xFFFFFFFF)
}

func appendUpperHex(b []byte, v uint64) []byte {
	start := len(b)
	b = strconv.AppendUint(b, v, 16)
	for i := start; i < len(b); i++ {
		if b[i] >= 'a' {
			b[i] -= 'a' - 'A'
		}
	}
	return b
}
