// Package verify proves that regions hold the same rows, and repairs the
// rows that differ.
//
// Compare walks every replicated table in key order, in chunks of
// Options.ChunkRows rows whose boundaries come from the first region (keyset
// pagination, never OFFSET over the whole table). Each chunk is hashed in
// every region (row count and an ordered hash of the rows); only chunks
// whose hashes differ are narrowed to rows. Memory is bounded by one chunk
// and the differing keys kept (Options.MaxKeys), whatever the table's
// size. Differing keys are checked again after Options.Settle, so changes
// still in flight are not reported as divergence.
//
// Compare also compares the tables' shape (columns with their types,
// NOT NULL and defaults, key, indexes) across regions, and checks, in
// every region, the foreign keys declared on the
// replicated tables: applied rows skip foreign-key checks
// (session_replication_role = replica), so regions can converge on the
// same orphans. Each constraint costs one anti-join per region, whose
// output is bounded (a count and the first Options.FKKeys keys).
//
// Repair makes the other regions equal to one region for the differing
// rows only, through pkg/apply under the replication origin prism_repair.
// It never deletes orphans: which side of a violated foreign key is right
// is the operator's call.
package verify

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/scope"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Region is one region's database to compare.
type Region struct {
	Name string
	DSN  string
	// Scope is what the region may hold (data residency); nil holds
	// everything. Two regions are compared only within the scope they
	// share: tables either excludes are skipped, rows outside either's
	// filter and columns either excludes are not compared.
	Scope *scope.Scope
}

// TableResult is the comparison of one table across regions.
type TableResult struct {
	Table string
	// KeyColumns are the key (primary key or replica identity index)
	// columns; empty when the table has none and whole rows are compared.
	KeyColumns []string
	Rows       map[string]int64  // per region
	Hashes     map[string]string // per region: hash of the chunk hashes; empty when the table is missing
	Equal      bool
	Chunks     int // chunks compared
	DiffChunks int // chunks whose hashes differed at first
	// Keys are the differing rows that are still different after the
	// settle period, in key order, at most Options.MaxKeys.
	Keys []DiffKey
	// Truncated reports that more rows differ than Keys holds.
	Truncated bool
	// Diffs describes up to MaxDiffs differing keys (or an error) for an
	// operator, with the regions that hold each version.
	Diffs []string
	// Regions are the two regions compared when a scope limits the table
	// (each pair within its shared scope); nil when every region was
	// compared at once.
	Regions []string

	from    string   // the rows compared: table, or a subquery of the shared scope
	exclude []string // columns left out of the comparison
}

// source is the relation the comparison reads: the table or the shared
// scope's subquery.
func (r *TableResult) source() string {
	if r.from != "" {
		return r.from
	}
	return r.Table
}

// DiffKey is one differing row.
type DiffKey struct {
	Values []string          // key column values as text, in KeyColumns order
	Hashes map[string]string // per region: md5 of the row; absent when the row is missing there
}

// String formats the key as a JSON-like array, e.g. [1] or [1, "x"].
func (k DiffKey) String() string { return "[" + strings.Join(k.Values, ", ") + "]" }

// Report is the result of one comparison.
type Report struct {
	Regions []string
	Tables  []TableResult
	// Violations are the foreign keys violated in a region, one entry per
	// region and constraint, by region then table.
	Violations []FKViolation
	// Schema are the differences in the tables' shape (columns, key,
	// indexes) across regions, by table.
	Schema []SchemaDiff
}

// Equal reports whether every table is equal in every region. Regions can
// be equal and still hold rows that violate a foreign key; see OK.
func (r Report) Equal() bool {
	for _, t := range r.Tables {
		if !t.Equal {
			return false
		}
	}
	return true
}

// OK reports whether every table is equal in every region, no region
// violates a foreign key and every table has the same shape everywhere.
func (r Report) OK() bool { return r.Equal() && len(r.Violations) == 0 && len(r.Schema) == 0 }

// MaxDiffs bounds the differing keys described per table in Diffs.
const MaxDiffs = 10

// Options tune a comparison. The zero value is usable.
type Options struct {
	// Settle is how long to wait before checking differing rows again;
	// zero reports differences at once.
	Settle time.Duration
	// Rechecks is how often differing rows are checked again (default 3).
	Rechecks int
	// ChunkRows is the number of rows per hashed chunk (default 10000).
	ChunkRows int
	// MaxKeys bounds the differing keys kept per table (default 100000).
	MaxKeys int
	// FKKeys bounds the offending keys kept per violated foreign key and
	// region (default 10); the count is always exact.
	FKKeys int
	// Log receives progress for large tables; the zero Logger logs nothing.
	Log zerolog.Logger
	// ProgressEvery is how often progress is logged (default 10s).
	ProgressEvery time.Duration
}

func (o *Options) setDefaults() {
	if o.Rechecks <= 0 {
		o.Rechecks = 3
	}
	if o.ChunkRows <= 0 {
		o.ChunkRows = 10000
	}
	if o.MaxKeys <= 0 {
		o.MaxKeys = 100000
	}
	if o.FKKeys <= 0 {
		o.FKKeys = 10
	}
	if o.ProgressEvery <= 0 {
		o.ProgressEvery = 10 * time.Second
	}
}

// Compare compares every table of publication pub (as the first region
// lists it) in every region, with default options and the given settle
// period.
func Compare(ctx context.Context, regions []Region, pub string, settle time.Duration) (Report, error) {
	return CompareWith(ctx, regions, pub, Options{Settle: settle})
}

// CompareWith compares every table of publication pub (as the first region
// lists it) in every region, and checks the foreign keys declared on those
// tables in every region.
func CompareWith(ctx context.Context, regions []Region, pub string, opts Options) (Report, error) {
	opts.setDefaults()
	if len(regions) < 2 {
		return Report{}, fmt.Errorf("verify: need at least two regions, have %d", len(regions))
	}
	conns, err := connectAll(ctx, regions)
	defer closeAll(conns)
	if err != nil {
		return Report{}, err
	}
	tables, err := publicationTables(ctx, conns[0], pub)
	if err != nil {
		return Report{}, fmt.Errorf("verify: region %s: %w", regions[0].Name, err)
	}
	rep := Report{}
	for _, r := range regions {
		rep.Regions = append(rep.Regions, r.Name)
	}
	for _, t := range tables {
		if scoped(regions, t) {
			res, err := comparePairs(ctx, regions, conns, t, opts)
			if err != nil {
				return Report{}, err
			}
			rep.Tables = append(rep.Tables, res...)
			continue
		}
		res, err := compareTable(ctx, regions, conns, t, view{}, opts)
		if err != nil {
			return Report{}, err
		}
		rep.Tables = append(rep.Tables, res)
	}
	rep.Violations, err = checkForeignKeys(ctx, regions, conns, tables, opts)
	if err != nil {
		return Report{}, err
	}
	rep.Schema, err = compareSchemas(ctx, regions, conns, pub)
	if err != nil {
		return Report{}, err
	}
	return rep, nil
}

func connectAll(ctx context.Context, regions []Region) ([]*pgx.Conn, error) {
	conns := make([]*pgx.Conn, len(regions))
	for i, r := range regions {
		// Rows are hashed by their text form: every region must print
		// values alike.
		c, err := decode.Connect(ctx, r.DSN)
		if err != nil {
			return conns, fmt.Errorf("verify: connect region %s: %w", r.Name, err)
		}
		conns[i] = c
	}
	return conns, nil
}

func closeAll(conns []*pgx.Conn) {
	for _, c := range conns {
		if c != nil {
			c.Close(context.Background())
		}
	}
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

// keyCol is one key column with what comparing it needs.
type keyCol struct {
	name    string // quoted
	typ     string // format_type, for casting text parameters
	collate bool   // collatable: compared with COLLATE "C" so every region orders alike
}

// keyInfo reads table's key columns (primary key preferred, else the
// replica identity index); none when the table has neither.
func keyInfo(ctx context.Context, c *pgx.Conn, table string) ([]keyCol, []string, error) {
	rows, err := c.Query(ctx, `SELECT quote_ident(a.attname), a.attname, format_type(a.atttypid, a.atttypmod), t.typcollation <> 0
		FROM (SELECT * FROM pg_index WHERE indrelid = $1::regclass AND (indisprimary OR indisreplident)
		      ORDER BY indisprimary DESC LIMIT 1) i
		CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, pos)
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		JOIN pg_type t ON t.oid = a.atttypid
		ORDER BY k.pos`, table)
	if err != nil {
		return nil, nil, err
	}
	var cols []keyCol
	var names []string
	for rows.Next() {
		var k keyCol
		var name string
		if err := rows.Scan(&k.name, &name, &k.typ, &k.collate); err != nil {
			rows.Close()
			return nil, nil, err
		}
		cols = append(cols, k)
		names = append(names, name)
	}
	rows.Close()
	return cols, names, rows.Err()
}

// keySQL builds the SQL fragments over key columns.
type keySQL struct{ cols []keyCol }

// row is the key of alias t as a row value, e.g. ROW(t."id").
func (k keySQL) row() string {
	parts := make([]string, len(k.cols))
	for i, c := range k.cols {
		parts[i] = "t." + c.name
		if c.collate {
			parts[i] += ` COLLATE "C"`
		}
	}
	return "ROW(" + strings.Join(parts, ", ") + ")"
}

// params is a row value of parameters from $first, cast to the key types.
func (k keySQL) params(first int) string {
	parts := make([]string, len(k.cols))
	for i, c := range k.cols {
		parts[i] = fmt.Sprintf("$%d::%s", first+i, c.typ)
		if c.collate {
			parts[i] += ` COLLATE "C"`
		}
	}
	return "ROW(" + strings.Join(parts, ", ") + ")"
}

// order is the ORDER BY list.
func (k keySQL) order() string {
	parts := make([]string, len(k.cols))
	for i, c := range k.cols {
		parts[i] = "t." + c.name
		if c.collate {
			parts[i] += ` COLLATE "C"`
		}
	}
	return strings.Join(parts, ", ")
}

// text selects the key columns as text.
func (k keySQL) text() string {
	parts := make([]string, len(k.cols))
	for i, c := range k.cols {
		parts[i] = "t." + c.name + "::text"
	}
	return strings.Join(parts, ", ")
}

// rangeCond is the condition for lo < key <= hi (nil bounds are open),
// with its arguments.
func (k keySQL) rangeCond(lo, hi []string) (string, []any) {
	var conds []string
	var args []any
	if lo != nil {
		conds = append(conds, k.row()+" > "+k.params(len(args)+1))
		for _, v := range lo {
			args = append(args, v)
		}
	}
	if hi != nil {
		conds = append(conds, k.row()+" <= "+k.params(len(args)+1))
		for _, v := range hi {
			args = append(args, v)
		}
	}
	if len(conds) == 0 {
		return "true", nil
	}
	return strings.Join(conds, " AND "), args
}

const rowHash = "md5(to_jsonb(t)::text)"

func compareTable(ctx context.Context, regions []Region, conns []*pgx.Conn, table string, v view, opts Options) (TableResult, error) {
	res := TableResult{Table: table, Rows: map[string]int64{}, Hashes: map[string]string{}, Equal: true, from: v.from, exclude: v.exclude}
	cols, names, err := keyInfo(ctx, conns[0], table)
	if err != nil {
		return res, fmt.Errorf("verify %s: key of table: %w", table, err)
	}
	res.KeyColumns = names
	// A table missing in a region is a difference, not an error.
	for i, r := range regions {
		var ok bool
		if err := conns[i].QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", table).Scan(&ok); err != nil {
			return res, fmt.Errorf("verify %s in region %s: %w", table, r.Name, err)
		}
		if !ok {
			res.Equal = false
			res.Diffs = append(res.Diffs, fmt.Sprintf("region %s: table does not exist", r.Name))
		}
	}
	if !res.Equal {
		return res, nil
	}
	if len(cols) == 0 {
		return compareWhole(ctx, regions, conns, table, res)
	}
	k := keySQL{cols: cols}
	chunkHashes := make([]strings.Builder, len(regions))
	var lo []string
	lastLog := time.Now()
	for {
		// The chunk's upper bound: the ChunkRows-th key after lo in the
		// first region; none means the chunk runs to the end.
		cond, args := k.rangeCond(lo, nil)
		q := fmt.Sprintf("SELECT %s FROM %s t WHERE %s ORDER BY %s OFFSET %d LIMIT 1", k.text(), res.source(), cond, k.order(), opts.ChunkRows-1)
		hi, err := scanKey(ctx, conns[0], q, len(cols), args)
		if err != nil {
			return res, fmt.Errorf("verify %s in region %s: chunk bound: %w", table, regions[0].Name, err)
		}
		if err := compareChunk(ctx, regions, conns, table, k, lo, hi, &res, chunkHashes, opts); err != nil {
			return res, err
		}
		if hi == nil {
			break
		}
		lo = hi
		if time.Since(lastLog) >= opts.ProgressEvery {
			lastLog = time.Now()
			opts.Log.Info().Str("table", table).Int("chunks", res.Chunks).Int64("rows", res.Rows[regions[0].Name]).
				Int("differing_chunks", res.DiffChunks).Msg("verify progress")
		}
	}
	for i, r := range regions {
		res.Hashes[r.Name] = md5Hex(chunkHashes[i].String())
	}
	if len(res.Keys) > 0 && opts.Settle > 0 {
		opts.Log.Info().Str("table", table).Int("rows", len(res.Keys)).Dur("settle", opts.Settle).
			Msg("rows differ; checking them again after the settle period")
		if err := recheck(ctx, regions, conns, table, k, &res, opts); err != nil {
			return res, err
		}
	}
	if len(res.Keys) > 0 {
		res.Equal = false
	}
	res.Diffs = append(res.Diffs, describe(regions, res)...)
	return res, nil
}

// scanKey runs q, which selects one key as text, and returns it (nil when
// there is no row).
func scanKey(ctx context.Context, c *pgx.Conn, q string, n int, args []any) ([]string, error) {
	rows, err := c.Query(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	if !rows.Next() {
		return nil, rows.Err()
	}
	vals := make([]string, n)
	ptrs := make([]any, n)
	for i := range vals {
		ptrs[i] = &vals[i]
	}
	if err := rows.Scan(ptrs...); err != nil {
		return nil, err
	}
	return vals, rows.Err()
}

// compareChunk hashes the rows lo < key <= hi in every region and, when
// the hashes differ, narrows the chunk to the differing rows.
func compareChunk(ctx context.Context, regions []Region, conns []*pgx.Conn, table string, k keySQL, lo, hi []string, res *TableResult, chunkHashes []strings.Builder, opts Options) error {
	cond, args := k.rangeCond(lo, hi)
	q := fmt.Sprintf("SELECT count(*), coalesce(md5(string_agg(%s, '' ORDER BY %s)), '') FROM %s t WHERE %s", rowHash, k.order(), res.source(), cond)
	res.Chunks++
	same := true
	var first string
	for i, r := range regions {
		var n int64
		var h string
		if err := conns[i].QueryRow(ctx, q, args...).Scan(&n, &h); err != nil {
			return fmt.Errorf("verify %s in region %s: %w", table, r.Name, err)
		}
		res.Rows[r.Name] += n
		chunkHashes[i].WriteString(h)
		if i == 0 {
			first = h
		} else if h != first {
			same = false
		}
	}
	if same {
		return nil
	}
	res.DiffChunks++
	if len(res.Keys) >= opts.MaxKeys {
		res.Truncated = true
		return nil
	}
	q = fmt.Sprintf("SELECT %s, %s FROM %s t WHERE %s", k.text(), rowHash, res.source(), cond)
	byKey := map[string]*DiffKey{}
	for i, r := range regions {
		if err := eachRow(ctx, conns[i], q, len(k.cols), args, func(vals []string, h string) {
			id := strings.Join(vals, "\x00")
			d := byKey[id]
			if d == nil {
				d = &DiffKey{Values: vals, Hashes: map[string]string{}}
				byKey[id] = d
			}
			d.Hashes[r.Name] = h
		}); err != nil {
			return fmt.Errorf("verify %s in region %s: %w", table, r.Name, err)
		}
	}
	ids := make([]string, 0, len(byKey))
	for id, d := range byKey {
		if differs(regions, d) {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids) // key order within the chunk is not needed; stable output is
	for _, id := range ids {
		if len(res.Keys) >= opts.MaxKeys {
			res.Truncated = true
			break
		}
		res.Keys = append(res.Keys, *byKey[id])
	}
	return nil
}

// eachRow runs q, which selects n key columns as text and a row hash.
func eachRow(ctx context.Context, c *pgx.Conn, q string, n int, args []any, fn func(key []string, hash string)) error {
	rows, err := c.Query(ctx, q, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		vals := make([]string, n)
		var h string
		ptrs := make([]any, n+1)
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		ptrs[n] = &h
		if err := rows.Scan(ptrs...); err != nil {
			return err
		}
		fn(vals, h)
	}
	return rows.Err()
}

func differs(regions []Region, d *DiffKey) bool {
	h0, ok0 := d.Hashes[regions[0].Name]
	for _, r := range regions[1:] {
		h, ok := d.Hashes[r.Name]
		if ok != ok0 || h != h0 {
			return true
		}
	}
	return false
}

// recheck waits Settle and reads the differing rows again, up to Rechecks
// times, dropping those that became equal (changes that were in flight).
func recheck(ctx context.Context, regions []Region, conns []*pgx.Conn, table string, k keySQL, res *TableResult, opts Options) error {
	const batch = 200
	for attempt := 0; attempt < opts.Rechecks && len(res.Keys) > 0; attempt++ {
		t := time.NewTimer(opts.Settle)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		var still []DiffKey
		for start := 0; start < len(res.Keys); start += batch {
			keys := res.Keys[start:min(start+batch, len(res.Keys))]
			fresh := make([]DiffKey, len(keys))
			index := map[string]int{}
			var conds []string
			var args []any
			for i, d := range keys {
				fresh[i] = DiffKey{Values: d.Values, Hashes: map[string]string{}}
				index[strings.Join(d.Values, "\x00")] = i
				conds = append(conds, k.params(len(args)+1))
				for _, v := range d.Values {
					args = append(args, v)
				}
			}
			q := fmt.Sprintf("SELECT %s, %s FROM %s t WHERE %s IN (%s)", k.text(), rowHash, res.source(), k.row(), strings.Join(conds, ", "))
			for i, r := range regions {
				if err := eachRow(ctx, conns[i], q, len(k.cols), args, func(vals []string, h string) {
					if j, ok := index[strings.Join(vals, "\x00")]; ok {
						fresh[j].Hashes[r.Name] = h
					}
				}); err != nil {
					return fmt.Errorf("verify %s in region %s: recheck: %w", table, r.Name, err)
				}
			}
			for i := range fresh {
				if differs(regions, &fresh[i]) {
					still = append(still, fresh[i])
				}
			}
		}
		opts.Log.Debug().Str("table", table).Int("before", len(res.Keys)).Int("after", len(still)).Msg("rechecked differing rows")
		res.Keys = still
	}
	return nil
}

// describe formats up to MaxDiffs differing keys.
func describe(regions []Region, res TableResult) []string {
	var out []string
	for i, d := range res.Keys {
		if i == MaxDiffs {
			more := fmt.Sprintf("... and %d more", len(res.Keys)-MaxDiffs)
			if res.Truncated {
				more += " (and more not listed)"
			}
			out = append(out, more)
			break
		}
		var parts []string
		for _, r := range regions {
			h, ok := d.Hashes[r.Name]
			if !ok {
				parts = append(parts, r.Name+"=missing")
			} else {
				parts = append(parts, r.Name+"="+h[:8])
			}
		}
		out = append(out, fmt.Sprintf("key %s: %s", d, strings.Join(parts, " ")))
	}
	return out
}

// compareWhole compares a table without a key: whole-row hashes in row
// order. It cannot be chunked by key or repaired; differing rows are named
// by their hash.
func compareWhole(ctx context.Context, regions []Region, conns []*pgx.Conn, table string, res TableResult) (TableResult, error) {
	q := fmt.Sprintf(`SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY h)), '') FROM (SELECT %s AS h FROM %s t) x`, rowHash, res.source())
	res.Chunks = 1
	var first string
	for i, r := range regions {
		var n int64
		var h string
		if err := conns[i].QueryRow(ctx, q).Scan(&n, &h); err != nil {
			return res, fmt.Errorf("verify %s in region %s: %w", table, r.Name, err)
		}
		res.Rows[r.Name] = n
		res.Hashes[r.Name] = h
		if i == 0 {
			first = h
		} else if h != first {
			res.Equal = false
		}
	}
	if !res.Equal {
		res.DiffChunks = 1
		res.Diffs = append(res.Diffs, "table has no key: rows are compared whole and cannot be named or repaired; give it a primary key")
	}
	return res, nil
}

func md5Hex(s string) string {
	sum := md5.Sum([]byte(s))
	return hex.EncodeToString(sum[:])
}
