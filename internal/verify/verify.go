// Package verify proves that regions hold the same rows: it hashes every
// replicated table in every region, and for tables whose hashes differ it
// names the differing keys.
package verify

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Region is one region's database to compare.
type Region struct {
	Name string
	DSN  string
}

// TableResult is the comparison of one table across regions.
type TableResult struct {
	Table  string
	Rows   map[string]int64  // per region
	Hashes map[string]string // per region; empty when the table is missing
	Equal  bool
	// Diffs names up to MaxDiffs keys whose rows differ, with the regions
	// that hold each version.
	Diffs []string
}

// Report is the result of one comparison.
type Report struct {
	Tables []TableResult
}

// Equal reports whether every table is equal in every region.
func (r Report) Equal() bool {
	for _, t := range r.Tables {
		if !t.Equal {
			return false
		}
	}
	return true
}

// MaxDiffs bounds the differing keys reported per table.
const MaxDiffs = 10

// Compare hashes every table of publication pub (as the first region
// lists it) in every region. Tables that differ are compared again after
// settle has passed, up to three times, so changes still in flight are not
// reported as divergence.
func Compare(ctx context.Context, regions []Region, pub string, settle time.Duration) (Report, error) {
	if len(regions) < 2 {
		return Report{}, fmt.Errorf("verify: need at least two regions, have %d", len(regions))
	}
	conns := make([]*pgx.Conn, len(regions))
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close(context.Background())
			}
		}
	}()
	for i, r := range regions {
		c, err := pgx.Connect(ctx, r.DSN)
		if err != nil {
			return Report{}, fmt.Errorf("verify: connect region %s: %w", r.Name, err)
		}
		if _, err := c.Exec(ctx, "SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET DateStyle = 'ISO'; SET IntervalStyle = 'postgres'"); err != nil {
			return Report{}, fmt.Errorf("verify: region %s: %w", r.Name, err)
		}
		conns[i] = c
	}
	tables, err := publicationTables(ctx, conns[0], pub)
	if err != nil {
		return Report{}, fmt.Errorf("verify: region %s: %w", regions[0].Name, err)
	}
	var rep Report
	for _, t := range tables {
		var res TableResult
		for attempt := 0; ; attempt++ {
			res, err = compareTable(ctx, regions, conns, t)
			if err != nil {
				return Report{}, err
			}
			if res.Equal || attempt >= 3 || settle <= 0 {
				break
			}
			select {
			case <-ctx.Done():
				return Report{}, ctx.Err()
			case <-time.After(settle):
			}
		}
		rep.Tables = append(rep.Tables, res)
	}
	return rep, nil
}

func publicationTables(ctx context.Context, c *pgx.Conn, pub string) ([]string, error) {
	rows, err := c.Query(ctx, `SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables
		WHERE pubname = $1 AND schemaname <> 'prism' ORDER BY 1`, pub)
	if err != nil {
		return nil, fmt.Errorf("list tables of publication %s: %w", pub, err)
	}
	tables, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("list tables of publication %s: %w", pub, err)
	}
	if len(tables) == 0 {
		var exists bool
		if err := c.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", pub).Scan(&exists); err != nil {
			return nil, err
		}
		if !exists {
			return nil, fmt.Errorf("publication %s does not exist (has a node of this region run yet?)", pub)
		}
	}
	return tables, nil
}

// keyExpr returns an ORDER BY / key expression for table: its primary key
// or replica identity index columns, else the whole row.
func keyExpr(ctx context.Context, c *pgx.Conn, table string) (string, error) {
	rows, err := c.Query(ctx, `SELECT quote_ident(a.attname) FROM pg_index i
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
		WHERE i.indrelid = $1::regclass AND (i.indisprimary OR i.indisreplident)
		ORDER BY i.indisprimary DESC, array_position(i.indkey::int2[], a.attnum)`, table)
	if err != nil {
		return "", err
	}
	cols, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return "", err
	}
	if len(cols) == 0 {
		return "to_jsonb(t)::text", nil
	}
	// Keep only the first index's columns (primary key preferred).
	seen := map[string]bool{}
	var out []string
	for _, c := range cols {
		if !seen[c] {
			seen[c] = true
			out = append(out, "t."+c)
		}
	}
	return "jsonb_build_array(" + strings.Join(out, ", ") + ")::text", nil
}

func compareTable(ctx context.Context, regions []Region, conns []*pgx.Conn, table string) (TableResult, error) {
	res := TableResult{Table: table, Rows: map[string]int64{}, Hashes: map[string]string{}, Equal: true}
	key, err := keyExpr(ctx, conns[0], table)
	if err != nil {
		return res, fmt.Errorf("verify %s: key of table: %w", table, err)
	}
	q := fmt.Sprintf(`SELECT count(*), coalesce(md5(string_agg(md5(to_jsonb(t)::text), '' ORDER BY %s)), '')
		FROM %s t`, key, table)
	first := ""
	for i, r := range regions {
		var n int64
		var h string
		if err := conns[i].QueryRow(ctx, q).Scan(&n, &h); err != nil {
			res.Equal = false
			res.Diffs = append(res.Diffs, fmt.Sprintf("region %s: %v", r.Name, err))
			continue
		}
		res.Rows[r.Name] = n
		res.Hashes[r.Name] = h
		if i == 0 {
			first = h
		} else if h != first {
			res.Equal = false
		}
	}
	if !res.Equal && len(res.Hashes) == len(regions) {
		diffs, err := diffRows(ctx, regions, conns, table, key)
		if err != nil {
			return res, err
		}
		res.Diffs = diffs
	}
	return res, nil
}

// diffRows lists keys whose row hash is not the same in every region.
func diffRows(ctx context.Context, regions []Region, conns []*pgx.Conn, table, key string) ([]string, error) {
	q := fmt.Sprintf(`SELECT %s, md5(to_jsonb(t)::text) FROM %s t`, key, table)
	byKey := map[string]map[string]string{} // key -> region -> hash
	for i, r := range regions {
		rows, err := conns[i].Query(ctx, q)
		if err != nil {
			return nil, fmt.Errorf("verify %s in region %s: %w", table, r.Name, err)
		}
		for rows.Next() {
			var k, h string
			if err := rows.Scan(&k, &h); err != nil {
				rows.Close()
				return nil, fmt.Errorf("verify %s in region %s: %w", table, r.Name, err)
			}
			if byKey[k] == nil {
				byKey[k] = map[string]string{}
			}
			byKey[k][r.Name] = h
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("verify %s in region %s: %w", table, r.Name, err)
		}
	}
	keys := make([]string, 0)
	for k, hs := range byKey {
		same := len(hs) == len(regions)
		var h0 string
		for _, r := range regions {
			if h0 == "" {
				h0 = hs[r.Name]
			} else if hs[r.Name] != h0 {
				same = false
			}
		}
		if !same {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var out []string
	for _, k := range keys {
		if len(out) == MaxDiffs {
			out = append(out, fmt.Sprintf("... and %d more", len(keys)-MaxDiffs))
			break
		}
		var parts []string
		for _, r := range regions {
			h, ok := byKey[k][r.Name]
			if !ok {
				parts = append(parts, r.Name+"=missing")
			} else {
				parts = append(parts, r.Name+"="+h[:8])
			}
		}
		out = append(out, fmt.Sprintf("key %s: %s", k, strings.Join(parts, " ")))
	}
	return out, nil
}
