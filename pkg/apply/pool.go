package apply

import (
	"context"
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prism-cdc/prism-cdc/internal/rawconn"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// NewPool opens a connection pool on dsn for an Applier. Appliers pass
// values to the server as text, so the pool's sessions use the text form
// every prism-cdc connection uses (decode.PinTextForm), whatever the
// server's or the DSN's own settings.
//
// Unless the DSN sets pool_max_conns, the pool opens up to
// minPoolConns connections (pgxpool's default is 4 on a machine with up
// to 4 CPUs): a node flushing lazily reads each source's durable
// progress on one, next to the conflict and housekeeping queries. The
// apply sessions, one per source region while it applies, take their
// connections from a second pool with the same limit that the Applier
// makes from this one (see Applier.sessions). Connections open only when
// needed.
func NewPool(ctx context.Context, dsn string) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	if !strings.Contains(dsn, "pool_max_conns") {
		cfg.MaxConns = max(cfg.MaxConns, minPoolConns)
	}
	decode.PinTextForm(&cfg.ConnConfig.Config)
	// Apply pipelines are many small writes and reads (see rawconn).
	cfg.ConnConfig.DialFunc = rawconn.WrapDial(cfg.ConnConfig.DialFunc)
	return pgxpool.NewWithConfig(ctx, cfg)
}

// minPoolConns is the least MaxConns NewPool gives a pool.
const minPoolConns = 16
