package verify

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
)

// SchemaDiff is one difference in the shape of a replicated table across
// regions: its columns (name, type, NOT NULL, default), its key (primary
// key or replica identity) or its indexes. Regions maps each region to its
// description of that aspect; "missing" when it lacks the table.
type SchemaDiff struct {
	Table   string
	Aspect  string // "table", "columns", "key" or "indexes"
	Regions map[string]string
}

// String describes the difference on one line per region.
func (s SchemaDiff) String() string {
	names := make([]string, 0, len(s.Regions))
	for r := range s.Regions {
		names = append(names, r)
	}
	sort.Strings(names)
	var b strings.Builder
	switch s.Aspect {
	case "table":
		fmt.Fprintf(&b, "%s: exists in some regions only", s.Table)
	case "key":
		fmt.Fprintf(&b, "%s: key differs", s.Table)
	default:
		fmt.Fprintf(&b, "%s: %s differ", s.Table, s.Aspect)
	}
	for _, r := range names {
		fmt.Fprintf(&b, "\n    region %s: %s", r, s.Regions[r])
	}
	return b.String()
}

// tableShape is one region's description of one table.
type tableShape struct {
	columns, key, indexes string
}

// schemaSQL describes the tables named in $1: columns in name order, so regions that added the same
// columns in another order compare equal; the key; the index definitions
// without their names' schema.
const schemaSQL = `
SELECT format('%I.%I', n.nspname, c.relname),
	coalesce((SELECT string_agg(format('%I %s%s%s', a.attname, format_type(a.atttypid, a.atttypmod),
			CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END,
			coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')), ', ' ORDER BY a.attname)
		FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
		WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), ''),
	CASE c.relreplident WHEN 'f' THEN 'REPLICA IDENTITY FULL' WHEN 'n' THEN 'REPLICA IDENTITY NOTHING' ELSE
	coalesce((SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY u.ord)
		FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS u(attnum, ord)
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.attnum
		WHERE i.indexrelid = (SELECT j.indexrelid FROM pg_index j WHERE j.indrelid = c.oid AND (j.indisreplident OR j.indisprimary)
			ORDER BY j.indisreplident DESC LIMIT 1)), '') END,
	coalesce((SELECT string_agg(pg_get_indexdef(i.indexrelid), '; ' ORDER BY pg_get_indexdef(i.indexrelid))
		FROM pg_index i WHERE i.indrelid = c.oid), '')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND format('%I.%I', n.nspname, c.relname) = ANY ($1)`

// publishedSQL lists the tables of a publication (none when it does not
// exist) outside schema prism.
const publishedSQL = `SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables
	WHERE pubname = $1 AND schemaname <> 'prism'`

// CompareSchemas compares the shape of every table of publication pub
// (in any region) in every region and returns the differences, by table. Column order does not count: prism-cdc matches
// columns by name.
func CompareSchemas(ctx context.Context, regions []Region, pub string) ([]SchemaDiff, error) {
	conns, err := connectAll(ctx, regions)
	defer closeAll(conns)
	if err != nil {
		return nil, err
	}
	return compareSchemas(ctx, regions, conns, pub)
}

func compareSchemas(ctx context.Context, regions []Region, conns []*pgx.Conn, pub string) ([]SchemaDiff, error) {
	tables, err := publishedTables(ctx, regions, conns, pub)
	if err != nil {
		return nil, err
	}
	shapes, err := describeTables(ctx, regions, conns, tables)
	if err != nil {
		return nil, err
	}
	var diffs []SchemaDiff
	for _, t := range tables {
		diffs = append(diffs, diffTable(t, regions, shapes)...)
	}
	return diffs, nil
}

// publishedTables returns, sorted, the tables any region publishes (a
// region whose node has not run yet has no publication).
func publishedTables(ctx context.Context, regions []Region, conns []*pgx.Conn, pub string) ([]string, error) {
	all := map[string]bool{}
	for i, c := range conns {
		rows, err := c.Query(ctx, publishedSQL, pub)
		if err != nil {
			return nil, fmt.Errorf("verify: tables of region %s: %w", regions[i].Name, err)
		}
		names, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return nil, fmt.Errorf("verify: tables of region %s: %w", regions[i].Name, err)
		}
		for _, n := range names {
			all[n] = true
		}
	}
	tables := make([]string, 0, len(all))
	for t := range all {
		tables = append(tables, t)
	}
	sort.Strings(tables)
	return tables, nil
}

// describeTables describes tables in every region, by name: shapes[i]
// holds the tables region i has.
func describeTables(ctx context.Context, regions []Region, conns []*pgx.Conn, tables []string) ([]map[string]tableShape, error) {
	shapes := make([]map[string]tableShape, len(regions))
	for i, c := range conns {
		rows, err := c.Query(ctx, schemaSQL, tables)
		if err != nil {
			return nil, fmt.Errorf("verify: schema of region %s: %w", regions[i].Name, err)
		}
		shapes[i] = map[string]tableShape{}
		var name string
		var s tableShape
		_, err = pgx.ForEachRow(rows, []any{&name, &s.columns, &s.key, &s.indexes}, func() error {
			shapes[i][name] = s
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("verify: schema of region %s: %w", regions[i].Name, err)
		}
	}
	return shapes, nil
}

// diffTable compares table t across regions: one diff when some region
// lacks it, else one per aspect (columns, key, indexes) that differs.
func diffTable(t string, regions []Region, shapes []map[string]tableShape) []SchemaDiff {
	d := SchemaDiff{Table: t, Aspect: "table", Regions: map[string]string{}}
	missing := false
	for i, r := range regions {
		if _, ok := shapes[i][t]; ok {
			d.Regions[r.Name] = "present"
		} else {
			d.Regions[r.Name] = "missing"
			missing = true
		}
	}
	if missing {
		return []SchemaDiff{d}
	}
	var diffs []SchemaDiff
	for _, aspect := range []struct {
		name string
		get  func(tableShape) string
	}{
		{"columns", func(s tableShape) string { return s.columns }},
		{"key", func(s tableShape) string { return orNone(s.key) }},
		{"indexes", func(s tableShape) string { return orNone(s.indexes) }},
	} {
		d := SchemaDiff{Table: t, Aspect: aspect.name, Regions: map[string]string{}}
		differ := false
		for i, r := range regions {
			d.Regions[r.Name] = aspect.get(shapes[i][t])
			if d.Regions[r.Name] != d.Regions[regions[0].Name] {
				differ = true
			}
		}
		if differ {
			diffs = append(diffs, d)
		}
	}
	return diffs
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
