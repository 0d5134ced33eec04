package verify

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/scope"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// view is the part of a table two regions share: a subquery (from) with
// the shared rows and without the excluded columns, or the whole table
// when from is empty.
type view struct {
	from    string
	exclude []string
}

// scoped reports whether any region's scope limits table.
func scoped(regions []Region, table string) bool {
	for _, r := range regions {
		s := r.Scope
		if s.Excludes(table) || s.Filter(table) != nil || len(s.ExcludedColumns(table)) > 0 {
			return true
		}
	}
	return false
}

// comparePairs compares a table that a scope limits pair by pair, each
// pair within the scope both regions share; a pair where either region
// excludes the table is not compared.
func comparePairs(ctx context.Context, regions []Region, conns []*pgx.Conn, table string, opts Options) ([]TableResult, error) {
	var out []TableResult
	for i := range regions {
		for j := i + 1; j < len(regions); j++ {
			a, b := regions[i], regions[j]
			if a.Scope.Excludes(table) || b.Scope.Excludes(table) {
				continue
			}
			v, err := sharedView(ctx, conns[i], table, a.Scope, b.Scope)
			if err != nil {
				return nil, fmt.Errorf("verify %s between %s and %s: %w", table, a.Name, b.Name, err)
			}
			res, err := compareTable(ctx, []Region{a, b}, []*pgx.Conn{conns[i], conns[j]}, table, v, opts)
			if err != nil {
				return nil, err
			}
			res.Regions = []string{a.Name, b.Name}
			out = append(out, res)
		}
	}
	for i, r := range regions {
		res, err := outOfScope(ctx, r, conns[i], table)
		if err != nil {
			return nil, err
		}
		if res != nil {
			out = append(out, *res)
		}
	}
	return out, nil
}

// outOfScope counts the rows of table a region holds outside its own row
// filter: rows that reached it some other way (written there, or copied
// before the scope was set). It returns nil when there are none.
func outOfScope(ctx context.Context, r Region, c *pgx.Conn, table string) (*TableResult, error) {
	e := r.Scope.Filter(table)
	if e == nil {
		return nil, nil
	}
	info, err := scope.Inspect(ctx, c, table)
	if err != nil || !info.Exists {
		return nil, err
	}
	p, err := e.Bind(info.Columns)
	if err != nil {
		return nil, fmt.Errorf("verify %s in region %s: row filter %q: %w", table, r.Name, e, err)
	}
	var n int64
	q := fmt.Sprintf("SELECT count(*) FROM %s WHERE (%s) IS NOT TRUE", scope.Ident(table), p.SQL())
	if err := c.QueryRow(ctx, q).Scan(&n); err != nil {
		return nil, fmt.Errorf("verify %s in region %s: rows outside the scope: %w", table, r.Name, err)
	}
	if n == 0 {
		return nil, nil
	}
	return &TableResult{Table: table, Regions: []string{r.Name}, Rows: map[string]int64{r.Name: n},
		Diffs: []string{fmt.Sprintf("region %s holds %d rows outside its scope (%s): written there, or copied before the scope was set; delete them there if they must not be held", r.Name, n, e)}}, nil
}

// sharedView builds the subquery of the rows and columns both scopes
// hold, typed with the catalog of c: both row filters must hold, and the
// columns either scope excludes are left out.
func sharedView(ctx context.Context, c *pgx.Conn, table string, a, b *scope.Scope) (view, error) {
	info, err := scope.Inspect(ctx, c, table)
	if err != nil {
		return view{}, err
	}
	if !info.Exists {
		return view{}, nil // compareTable reports the missing table
	}
	var v view
	for _, s := range []*scope.Scope{a, b} {
		for _, col := range s.ExcludedColumns(table) {
			if !slices.Contains(v.exclude, col) {
				v.exclude = append(v.exclude, col)
			}
		}
	}
	var conds []string
	for _, s := range []*scope.Scope{a, b} {
		e := s.Filter(table)
		if e == nil {
			continue
		}
		p, err := e.Bind(info.Columns)
		if err != nil {
			return view{}, fmt.Errorf("row filter %q: %w", e, err)
		}
		conds = append(conds, p.SQL())
	}
	var cols []string
	for _, col := range info.Columns {
		if !slices.Contains(v.exclude, col.Name) {
			cols = append(cols, pgx.Identifier{col.Name}.Sanitize())
		}
	}
	if len(cols) == 0 {
		return view{}, fmt.Errorf("the scopes exclude every column")
	}
	where := "true"
	if len(conds) > 0 {
		where = strings.Join(conds, " AND ")
	}
	v.from = fmt.Sprintf("(SELECT %s FROM %s WHERE %s)", strings.Join(cols, ", "), scope.Ident(table), where)
	return v, nil
}

// withoutColumns returns rel without the excluded columns: a repair writes
// only what both regions share.
func withoutColumns(rel *decode.Relation, exclude []string) *decode.Relation {
	if len(exclude) == 0 {
		return rel
	}
	out := *rel
	out.Columns = nil
	for _, c := range rel.Columns {
		if !slices.Contains(exclude, c.Name) {
			out.Columns = append(out.Columns, c)
		}
	}
	return &out
}
