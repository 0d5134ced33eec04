package bootstrap

import (
	"context"
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/scope"
)

// scopeTables limits the copy to what the target region may hold: tables
// its scope excludes are left out, excluded columns are not copied (the
// target keeps its defaults) and a row filter becomes the source query's
// WHERE, typed with the source's catalog. A scope naming a table or column
// the source lacks is an error.
func scopeTables(ctx context.Context, src *pgx.Conn, tables []*table, s *scope.Scope, log zerolog.Logger) ([]*table, error) {
	if s == nil {
		return tables, nil
	}
	var out []*table
	for _, t := range tables {
		name := t.name()
		if s.Excludes(name) {
			log.Info().Str("table", name).Msg("outside the region's scope: not copied")
			continue
		}
		for _, c := range s.ExcludedColumns(name) {
			i := slices.Index(t.columns, c)
			if i < 0 {
				return nil, fmt.Errorf("%s: excluded column %q does not exist in the source", name, c)
			}
			t.columns = slices.Delete(t.columns, i, i+1)
		}
		if e := s.Filter(name); e != nil {
			info, err := scope.Inspect(ctx, src, name)
			if err != nil {
				return nil, err
			}
			p, err := e.Bind(info.Columns)
			if err != nil {
				return nil, fmt.Errorf("%s: row filter %q: %w", name, e, err)
			}
			t.where = p.SQLOn("t")
		}
		out = append(out, t)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("the scope excludes every published table")
	}
	return out, nil
}
