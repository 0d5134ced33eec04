package apply

import (
	"context"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// NewPool opens a connection pool on dsn for an Applier. Appliers pass
// values to the server as text, so the pool's sessions use the text form
// every prism-cdc connection uses (decode.PinTextForm), whatever the
// server's or the DSN's own settings.
func NewPool(ctx context.Context, dsn string) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	decode.PinTextForm(&cfg.ConnConfig.Config)
	return pgxpool.NewWithConfig(ctx, cfg)
}
