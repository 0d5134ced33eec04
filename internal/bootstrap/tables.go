package bootstrap

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/config"
)

// table is one published table of the source.
type table struct {
	schema, rel string
	columns     []string // copied columns: not dropped, not generated, not excluded by the scope
	size        int64    // bytes on the source, to copy the largest first
	where       string   // the target's row filter on alias t, or ""
	// keys are the key columns (primary key or replica identity index)
	// when the source keeps row stamps: a version that a batch applied
	// there has its stamp in prism.batch_stamps (prism.row_stamps on a
	// source of an earlier version), not in its commit time.
	keys []string
	// stamps is the row stamps of the table on the source: a relation
	// of (xact, key, ts), or "" when the table has no keys.
	stamps string
	// floors tells that the source keeps clock floors
	// (prism.clock_floors): a local version written over one stamped
	// ahead of the source's clock stamps one microsecond past its floor,
	// not at its commit time (prism.stamp).
	floors bool
}

// stampsSQL returns the relation of the row stamps kept under name (see
// prism.table_names) on a source that keeps them in table kind
// ("batch_stamps" or "row_stamps").
func stampsSQL(kind, name string) string {
	lit := "'" + strings.ReplaceAll(name, "'", "''") + "'"
	if kind == "row_stamps" {
		// A row stamp's key is jsonb on a source of an earlier version.
		return "(SELECT r.xact, r.key::text AS key, r.ts FROM prism.row_stamps r WHERE r.table_name = " + lit + ")"
	}
	return "(SELECT b.xact, u.key, u.ts FROM prism.batch_stamps b, unnest(b.keys, b.ts) AS u(key, ts) WHERE b.table_name = " + lit + ")"
}

func (t *table) name() string  { return t.schema + "." + t.rel }
func (t *table) ident() string { return pgx.Identifier{t.schema, t.rel}.Sanitize() }

func (t *table) columnList() string {
	cols := make([]string, len(t.columns))
	for i, c := range t.columns {
		cols[i] = pgx.Identifier{c}.Sanitize()
	}
	return strings.Join(cols, ", ")
}

// sourceQuery selects the commit time and origin of every row's version,
// then the row. A version that a batch applied takes its row stamp.
func (t *table) sourceQuery() string {
	cols := make([]string, len(t.columns))
	for i, c := range t.columns {
		cols[i] = "t." + pgx.Identifier{c}.Sanitize()
	}
	where := ""
	if t.where != "" {
		where = " WHERE " + t.where
	}
	if len(t.keys) == 0 {
		return fmt.Sprintf(`COPY (SELECT c.timestamp, o.roname, %s FROM ONLY %s t
	LEFT JOIN LATERAL pg_xact_commit_timestamp_origin(t.xmin) c ON true
	LEFT JOIN pg_catalog.pg_replication_origin o ON o.roident = c.roident AND c.roident <> 0%s) TO STDOUT (FORMAT binary)`,
			strings.Join(cols, ", "), t.ident(), where)
	}
	names := make([]string, len(t.keys))
	vals := make([]string, len(t.keys))
	for i, k := range t.keys {
		names[i] = "'" + strings.ReplaceAll(k, "'", "''") + "'"
		vals[i] = "t." + pgx.Identifier{k}.Sanitize() + "::text"
	}
	// The version's stamp as prism.row_stamp reads it on the source: its
	// batch stamp, else its commit time raised past its transaction's
	// clock floor (prism.stamp).
	stamp, floors := "c.timestamp", ""
	if t.floors {
		stamp = "greatest(c.timestamp, fl.floor)"
		floors = `
	LEFT JOIN LATERAL (SELECT max(f.floor) + interval '1 microsecond' AS floor FROM prism.clock_floors f
		WHERE f.top IN (SELECT g.top FROM prism.clock_floors g WHERE g.xact = t.xmin)) fl ON true`
	}
	return fmt.Sprintf(`COPY (SELECT coalesce(s.ts, %s), o.roname, %s FROM ONLY %s t
	LEFT JOIN LATERAL pg_xact_commit_timestamp_origin(t.xmin) c ON true
	LEFT JOIN pg_catalog.pg_replication_origin o ON o.roident = c.roident AND c.roident <> 0
	LEFT JOIN %s s ON s.key = jsonb_object(ARRAY[%s]::text[], ARRAY[%s]::text[])::text AND s.xact = t.xmin%s%s) TO STDOUT (FORMAT binary)`,
		stamp, strings.Join(cols, ", "), t.ident(), t.stamps, strings.Join(names, ", "), strings.Join(vals, ", "), floors, where)
}

// insertSQL inserts one copied row.
func (t *table) insertSQL() string {
	ph := make([]string, len(t.columns))
	for i := range ph {
		ph[i] = fmt.Sprintf("$%d", i+1)
	}
	return fmt.Sprintf("INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE VALUES (%s)", t.ident(), t.columnList(), strings.Join(ph, ", "))
}

// publishedTables lists the tables of publication pub with their columns,
// largest first. A table without a key is an error: its changes could not
// be applied by key afterwards.
func publishedTables(ctx context.Context, conn *pgx.Conn, pub string) ([]*table, error) {
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", pub).Scan(&exists); err != nil {
		return nil, fmt.Errorf("read publication %s: %w", pub, err)
	}
	if !exists {
		return nil, fmt.Errorf("publication %s does not exist: start a node of the region once (it creates it) or create it", pub)
	}
	var stamps string
	var named, floors bool
	if err := conn.QueryRow(ctx, `SELECT CASE WHEN to_regclass('prism.batch_stamps') IS NOT NULL THEN 'batch_stamps'
		WHEN to_regclass('prism.row_stamps') IS NOT NULL THEN 'row_stamps' ELSE '' END,
		to_regclass('prism.table_names') IS NOT NULL,
		EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = to_regclass('prism.clock_floors') AND attname = 'top' AND NOT attisdropped)`).Scan(&stamps, &named, &floors); err != nil {
		return nil, fmt.Errorf("read row stamps of the source: %w", err)
	}
	// The name the source keeps a table's stamps under: the one it had
	// when first installed (prism.table_names), on a source of an
	// earlier version its name.
	meta := "n.nspname || '.' || c.relname"
	if named {
		meta = "coalesce((SELECT m.name FROM prism.table_names m WHERE m.relid = c.oid), " + meta + ")"
	}
	rows, err := conn.Query(ctx, `SELECT n.nspname, c.relname, `+meta+`, pg_table_size(c.oid),
		c.relreplident = 'f' OR EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident)),
		array(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
			AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum),
		array(SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
			WHERE $2 AND i.indrelid = c.oid AND c.relreplident IN ('d', 'i')
			AND CASE WHEN c.relreplident = 'i' THEN i.indisreplident ELSE i.indisprimary END ORDER BY a.attnum)
		FROM pg_publication_tables p
		JOIN pg_namespace n ON n.nspname = p.schemaname
		JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
		WHERE p.pubname = $1 AND n.nspname <> 'prism'
		ORDER BY pg_table_size(c.oid) DESC, 1, 2`, pub, stamps != "")
	if err != nil {
		return nil, fmt.Errorf("list tables of publication %s: %w", pub, err)
	}
	defer rows.Close()
	var out []*table
	var noKey []string
	for rows.Next() {
		t := &table{}
		var keyed bool
		var metaName string
		if err := rows.Scan(&t.schema, &t.rel, &metaName, &t.size, &keyed, &t.columns, &t.keys); err != nil {
			return nil, fmt.Errorf("list tables of publication %s: %w", pub, err)
		}
		if !keyed {
			noKey = append(noKey, t.name())
		}
		if len(t.keys) > 0 {
			t.stamps = stampsSQL(stamps, metaName)
			t.floors = floors
		}
		out = append(out, t)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list tables of publication %s: %w", pub, err)
	}
	if len(noKey) > 0 {
		return nil, fmt.Errorf("%w: %s (add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL, in every region)", ErrNoKey, strings.Join(noKey, ", "))
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("publication %s has no tables outside schema prism", pub)
	}
	return out, nil
}

// checkTargetColumns refuses columns binary COPY cannot carry between
// clusters: arrays, composites and ranges of user-defined types embed type
// OIDs that differ from cluster to cluster.
func checkTargetColumns(ctx context.Context, tgt *pgx.Conn, tables []*table) error {
	var bad []string
	for _, t := range tables {
		rows, err := tgt.Query(ctx, `SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
			FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
			LEFT JOIN pg_type el ON el.oid = ty.typelem AND ty.typcategory = 'A'
			WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
			AND ((el.oid IS NOT NULL AND el.oid >= 16384) OR (ty.oid >= 16384 AND ty.typtype IN ('c', 'r', 'm')))`, t.ident())
		if err != nil {
			return fmt.Errorf("bootstrap: inspect columns of %s: %w", t.name(), err)
		}
		for rows.Next() {
			var col, typ string
			if err := rows.Scan(&col, &typ); err != nil {
				rows.Close()
				return fmt.Errorf("bootstrap: inspect columns of %s: %w", t.name(), err)
			}
			bad = append(bad, fmt.Sprintf("%s.%s (%s)", t.name(), col, typ))
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("bootstrap: inspect columns of %s: %w", t.name(), err)
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("bootstrap: binary COPY cannot carry arrays, composites or ranges of user-defined types between clusters: %s", strings.Join(bad, ", "))
	}
	return nil
}

// redact hides DSN passwords in a message.
func redact(msg string) string { return config.RedactDSN(msg) }
