package scope

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Querier runs a query: *pgx.Conn, *pgxpool.Pool and pgx.Tx all do.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// TableInfo is what the catalog says about one table.
type TableInfo struct {
	Name            string // schema.table
	Exists          bool
	ReplicaIdentity byte // 'd', 'i', 'f' or 'n' (relreplident)
	Columns         []Column
	Key             []bool // by column: part of the replica identity key
	Varlena         []bool // by column: a type whose values may be TOASTed
}

// Column returns the index of the named column, or -1.
func (t *TableInfo) Column(name string) int {
	for i, c := range t.Columns {
		if c.Name == name {
			return i
		}
	}
	return -1
}

const tableInfoSQL = `SELECT c.relreplident::text, a.attname::text, a.atttypid, t.typlen,
  COALESCE(a.attnum = ANY(i.indkey::int2[]), false)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid
  AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident))
WHERE c.oid = to_regclass($1)
ORDER BY a.attnum`

// Ident quotes a "schema.table" name for SQL.
func Ident(table string) string {
	schema, name, _ := strings.Cut(table, ".")
	return pgx.Identifier{schema, name}.Sanitize()
}

// Inspect reads a table's columns and replica identity from the catalog.
func Inspect(ctx context.Context, q Querier, table string) (*TableInfo, error) {
	rows, err := q.Query(ctx, tableInfoSQL, Ident(table))
	if err != nil {
		return nil, fmt.Errorf("inspect %s: %w", table, err)
	}
	defer rows.Close()
	t := &TableInfo{Name: table}
	for rows.Next() {
		var ident, name string
		var oid uint32
		var typlen int16
		var key bool
		if err := rows.Scan(&ident, &name, &oid, &typlen, &key); err != nil {
			return nil, fmt.Errorf("inspect %s: %w", table, err)
		}
		t.Exists = true
		if ident != "" {
			t.ReplicaIdentity = ident[0]
		}
		t.Columns = append(t.Columns, Column{Name: name, TypeOID: oid})
		t.Key = append(t.Key, key)
		t.Varlena = append(t.Varlena, typlen == -1)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("inspect %s: %w", table, err)
	}
	return t, nil
}

// Problem is one finding about a scope against a database.
type Problem struct {
	Table   string
	Warning bool // false: replication cannot work this way
	Msg     string
}

func (p Problem) String() string { return p.Table + ": " + p.Msg }

// Check checks rules against a database: every named table and column
// exists, every row filter binds to its table's column types and reads
// only replica identity columns (any column with REPLICA IDENTITY FULL),
// and no replica identity column is excluded. It warns about a
// row-filtered table without REPLICA IDENTITY FULL that has columns whose
// values may be TOASTed (see the README's Data residency section), and
// about a table that references by foreign key a table the region does
// not receive, or receives only some rows of, while the referencing
// table's rows all go there (see references).
func Check(ctx context.Context, q Querier, r Rules) ([]Problem, error) {
	s, err := New(r)
	if err != nil {
		return nil, err
	}
	var out []Problem
	add := func(table string, warn bool, format string, args ...any) {
		out = append(out, Problem{Table: table, Warning: warn, Msg: fmt.Sprintf(format, args...)})
	}
	for _, table := range s.Tables() {
		t, err := Inspect(ctx, q, table)
		if err != nil {
			return nil, err
		}
		if !t.Exists {
			add(table, false, "the table does not exist; create it or fix the name in peers[].scope")
			continue
		}
		full := t.ReplicaIdentity == 'f'
		if e := s.Filter(table); e != nil {
			p, err := e.Bind(t.Columns)
			if err != nil {
				add(table, false, "row filter %q: %v", e, err)
			} else {
				var notKey []string
				for _, i := range p.Uses() {
					if !full && !t.Key[i] {
						notKey = append(notKey, t.Columns[i].Name)
					}
				}
				if len(notKey) > 0 {
					add(table, false, "row filter %q reads %s, not in the replica identity: a DELETE or an UPDATE does not carry it; run ALTER TABLE %s REPLICA IDENTITY FULL or filter on key columns", e, strings.Join(notKey, ", "), Ident(table))
				}
				if !full {
					var big []string
					for i, v := range t.Varlena {
						if v && !t.Key[i] {
							big = append(big, t.Columns[i].Name)
						}
					}
					if len(big) > 0 {
						sort.Strings(big)
						add(table, true, "row filter without REPLICA IDENTITY FULL: an UPDATE that moves a row into the region's scope becomes an INSERT, which cannot carry an unchanged out-of-line (TOASTed) value of %s; the region then refuses it (on_apply_error). Run ALTER TABLE %s REPLICA IDENTITY FULL if such values occur", strings.Join(big, ", "), Ident(table))
					}
				}
			}
		}
		for _, c := range s.ExcludedColumns(table) {
			i := t.Column(c)
			switch {
			case i < 0:
				add(table, false, "excluded column %q does not exist", c)
			case t.Key[i] && !full:
				add(table, false, "excluded column %q is in the replica identity: the region could not find rows to update or delete", c)
			}
		}
		if !s.Excludes(table) && s.Filter(table) == nil {
			continue
		}
		refs, err := references(ctx, q, table)
		if err != nil {
			return nil, err
		}
		for _, r := range refs {
			switch {
			case r.table == table || s.Excludes(r.table):
			case s.Excludes(table):
				add(r.table, true, "foreign key %s references %s, which the region does not receive: its rows there lack their parents (applied rows are not checked against foreign keys), and verify reports them; exclude %s too", r.name, table, r.table)
			case s.Filter(r.table) == nil:
				add(r.table, true, "foreign key %s references %s, which the region receives only where %s: rows of %s that reference its other rows lack their parents there (applied rows are not checked against foreign keys), and verify reports them; give %s a row filter that keeps the same rows", r.name, table, s.Filter(table), r.table, r.table)
			}
		}
	}
	return out, nil
}

// referencesSQL lists the foreign keys that reference table $1, with the
// "schema.table" of the table they are declared on (a partitioned
// table's, not its partitions' copies).
const referencesSQL = `SELECT c.conname, n.nspname || '.' || r.relname
FROM pg_catalog.pg_constraint c
JOIN pg_catalog.pg_class r ON r.oid = c.conrelid
JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace
WHERE c.contype = 'f' AND c.confrelid = to_regclass($1) AND c.conparentid = 0
ORDER BY 2, 1`

// reference is one foreign key that references a table.
type reference struct {
	name  string // the constraint's
	table string // "schema.table" it is declared on
}

// references lists the foreign keys that reference table.
func references(ctx context.Context, q Querier, table string) ([]reference, error) {
	rows, err := q.Query(ctx, referencesSQL, Ident(table))
	if err != nil {
		return nil, fmt.Errorf("foreign keys referencing %s: %w", table, err)
	}
	defer rows.Close()
	var out []reference
	for rows.Next() {
		var r reference
		if err := rows.Scan(&r.name, &r.table); err != nil {
			return nil, fmt.Errorf("foreign keys referencing %s: %w", table, err)
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("foreign keys referencing %s: %w", table, err)
	}
	return out, nil
}
