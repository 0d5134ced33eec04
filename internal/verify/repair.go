package verify

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// RepairOrigin is the source name repairs are applied under: the
// replication origin prism_repair. Rows a repair wrote carry that origin
// (pg_xact_commit_timestamp_origin), so nodes never ship them again, and
// every overwritten row is logged in prism.conflicts with source_region
// 'repair'.
const RepairOrigin = "repair"

// RepairBatch is the number of rows per repair transaction.
const RepairBatch = 500

// TableRepair counts what a repair changed in one table of one region.
type TableRepair struct {
	Table    string
	Region   string
	Upserted int // rows inserted or overwritten with the source's version
	Deleted  int // rows the source does not have
}

// Repair makes every region other than from hold from's version of each
// differing row of rep (as found by Compare): rows from has are upserted,
// rows it lacks are deleted. Only the differing rows are touched.
//
// It writes through pkg/apply, as a peer region's transaction would be
// applied, under the replication origin prism_repair with the source_wins
// policy: the repair is exactly the apply path (same statements, same
// conflict log), it is not shipped again by the target's nodes (it carries
// an origin), and it does not depend on the nodes running. Rows are read
// fresh from from when they are repaired. Tables without a key cannot be
// repaired and are returned as an error after the others are done.
func Repair(ctx context.Context, regions []Region, from string, rep Report, log zerolog.Logger) ([]TableRepair, error) {
	src := slices.IndexFunc(regions, func(r Region) bool { return r.Name == from })
	if src < 0 {
		return nil, fmt.Errorf("repair: region %s is not among the compared regions", from)
	}
	conns, err := connectAll(ctx, regions[src:src+1])
	defer closeAll(conns)
	if err != nil {
		return nil, err
	}
	source := conns[0]
	targets := &repairTargets{log: log, appliers: map[string]*apply.Applier{}}
	defer targets.close()
	var out []TableRepair
	var unkeyed []string
	for _, t := range rep.Tables {
		if t.Equal || len(t.Regions) == 1 {
			// Rows a region holds outside its scope are the operator's
			// call, like orphans.
			continue
		}
		if len(t.KeyColumns) == 0 {
			unkeyed = append(unkeyed, t.Table)
			continue
		}
		if len(t.Keys) == 0 {
			continue
		}
		if t.Regions != nil && !slices.Contains(t.Regions, from) {
			continue // a pair without from: another pair's result carries it
		}
		rel, cols, err := relation(ctx, source, t.Table, t.KeyColumns)
		if err != nil {
			return out, fmt.Errorf("repair %s: region %s: %w", t.Table, from, err)
		}
		rel = withoutColumns(rel, t.exclude)
		for _, r := range regions {
			if r.Name == from || (t.Regions != nil && !slices.Contains(t.Regions, r.Name)) {
				continue
			}
			keys := differingKeys(t, from, r.Name)
			if len(keys) == 0 {
				continue
			}
			a, err := targets.applier(ctx, r)
			if err != nil {
				return out, err
			}
			tr := TableRepair{Table: t.Table, Region: r.Name}
			for start := 0; start < len(keys); start += RepairBatch {
				batch := keys[start:min(start+RepairBatch, len(keys))]
				changes, ups, dels, err := repairChanges(ctx, source, t.source(), rel, cols, t.KeyColumns, batch)
				if err != nil {
					return out, fmt.Errorf("repair %s: read region %s: %w", t.Table, from, err)
				}
				if err := applyRepair(ctx, a, changes); err != nil {
					return out, fmt.Errorf("repair %s in region %s: %w", t.Table, r.Name, err)
				}
				tr.Upserted += ups
				tr.Deleted += dels
			}
			log.Info().Str("table", t.Table).Str("target", r.Name).Str("from", from).
				Int("upserted", tr.Upserted).Int("deleted", tr.Deleted).Msg("repaired")
			out = append(out, tr)
		}
	}
	if len(unkeyed) > 0 {
		return out, fmt.Errorf("repair: tables without a key cannot be repaired row by row: %s", strings.Join(unkeyed, ", "))
	}
	return out, nil
}

// differingKeys returns the keys of t whose rows differ between regions
// from and target (or exist in only one of them).
func differingKeys(t TableResult, from, target string) []DiffKey {
	var keys []DiffKey
	for _, k := range t.Keys {
		hs, hasSrc := k.Hashes[from]
		ht, hasTgt := k.Hashes[target]
		if hasSrc != hasTgt || hs != ht {
			keys = append(keys, k)
		}
	}
	return keys
}

// repairTargets opens an applier per target region when it is first
// needed; close closes their pools.
type repairTargets struct {
	log      zerolog.Logger
	appliers map[string]*apply.Applier
	pools    []*pgxpool.Pool
}

func (rt *repairTargets) applier(ctx context.Context, r Region) (*apply.Applier, error) {
	if a, ok := rt.appliers[r.Name]; ok {
		return a, nil
	}
	pool, err := apply.NewPool(ctx, r.DSN)
	if err != nil {
		return nil, fmt.Errorf("repair: connect region %s: %w", r.Name, err)
	}
	rt.pools = append(rt.pools, pool)
	a := apply.NewApplier(pool, rt.log.With().Str("component", "repair").Str("target", r.Name).Logger(),
		apply.WithLocalRegion(r.Name), apply.WithConflicts(apply.SourceWins, nil))
	if err := a.Setup(ctx); err != nil {
		return nil, fmt.Errorf("repair: region %s: %w", r.Name, err)
	}
	rt.appliers[r.Name] = a
	return a, nil
}

func (rt *repairTargets) close() {
	// The appliers first: a pool's Close waits for their sessions.
	for _, a := range rt.appliers {
		a.Close()
	}
	for _, p := range rt.pools {
		p.Close()
	}
}

// relation describes table as the source has it: every stored column
// (generated columns are left out), key columns marked.
func relation(ctx context.Context, c *pgx.Conn, table string, keyCols []string) (*decode.Relation, []keyCol, error) {
	rel := &decode.Relation{ReplicaIdentity: decode.IdentityDefault}
	if err := c.QueryRow(ctx, `SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE c.oid = $1::regclass`, table).Scan(&rel.Schema, &rel.Table); err != nil {
		return nil, nil, err
	}
	rows, err := c.Query(ctx, `SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0
		AND NOT attisdropped AND attgenerated = '' ORDER BY attnum`, table)
	if err != nil {
		return nil, nil, err
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, nil, err
	}
	for _, n := range names {
		rel.Columns = append(rel.Columns, decode.Column{Name: n, Key: slices.Contains(keyCols, n)})
	}
	cols, _, err := keyInfo(ctx, c, table)
	if err != nil {
		return nil, nil, err
	}
	if len(cols) != len(keyCols) {
		return nil, nil, fmt.Errorf("key of %s changed during the repair", table)
	}
	return rel, cols, nil
}

// repairChanges reads the source's current version of keys and returns
// one upsert per row it has and one delete per row it lacks.
func repairChanges(ctx context.Context, c *pgx.Conn, table string, rel *decode.Relation, cols []keyCol, keyNames []string, keys []DiffKey) ([]decode.Change, int, int, error) {
	k := keySQL{cols: cols}
	var conds []string
	var args []any
	for _, d := range keys {
		conds = append(conds, k.params(len(args)+1))
		for _, v := range d.Values {
			args = append(args, v)
		}
	}
	sel := make([]string, len(rel.Columns))
	for i, col := range rel.Columns {
		sel[i] = "t." + pgx.Identifier{col.Name}.Sanitize() + "::text"
	}
	q := fmt.Sprintf("SELECT %s, %s FROM %s t WHERE %s IN (%s)", k.text(), strings.Join(sel, ", "), table, k.row(), strings.Join(conds, ", "))
	rows, err := c.Query(ctx, q, args...)
	if err != nil {
		return nil, 0, 0, err
	}
	defer rows.Close()
	found := map[string][]decode.Value{}
	nk := len(cols)
	for rows.Next() {
		vals := make([]*string, nk+len(rel.Columns))
		ptrs := make([]any, len(vals))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			return nil, 0, 0, err
		}
		id := make([]string, nk)
		for i := range id {
			id[i] = *vals[i]
		}
		row := make([]decode.Value, len(rel.Columns))
		for i, v := range vals[nk:] {
			if v == nil {
				row[i] = decode.Value{Kind: decode.ValueNull}
			} else {
				row[i] = decode.Value{Kind: decode.ValueText, Data: []byte(*v)}
			}
		}
		found[strings.Join(id, "\x00")] = row
	}
	if err := rows.Err(); err != nil {
		return nil, 0, 0, err
	}
	var changes []decode.Change
	ups, dels := 0, 0
	for _, d := range keys {
		if row, ok := found[strings.Join(d.Values, "\x00")]; ok {
			changes = append(changes, decode.Change{Op: decode.OpInsert, Rel: rel, New: row})
			ups++
			continue
		}
		old := make([]decode.Value, len(rel.Columns))
		for i, col := range rel.Columns {
			if j := slices.Index(keyNames, col.Name); j >= 0 && j < len(d.Values) {
				old[i] = decode.Value{Kind: decode.ValueText, Data: []byte(d.Values[j])}
			}
		}
		changes = append(changes, decode.Change{Op: decode.OpDelete, Rel: rel, Old: old})
		dels++
	}
	return changes, ups, dels, nil
}

// applyRepair applies changes in one transaction under origin
// prism_repair, just after the origin's progress in the target.
func applyRepair(ctx context.Context, a *apply.Applier, changes []decode.Change) error {
	if len(changes) == 0 {
		return nil
	}
	p, err := a.Progress(ctx, RepairOrigin)
	if err != nil {
		return err
	}
	next := p + 1
	return a.Apply(ctx, &decode.Txn{
		Origin:     RepairOrigin,
		CommitLSN:  next,
		EndLSN:     next,
		CommitTime: time.Now(),
		Changes:    changes,
	})
}
