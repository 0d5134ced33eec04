package verify

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Foreign keys are not enforced on applied rows: regions apply with
// session_replication_role = replica, as PostgreSQL's own subscriber does.
// So two regions can together break a constraint that each respected
// locally (one deletes a parent while another inserts a child of it), and
// every region ends up with the same orphan: equal, and broken. Checking
// them is part of verifying.

// FKViolation is one foreign key violated in one region: rows of Table
// whose key columns reference no row of Referenced.
type FKViolation struct {
	Region     string
	Table      string // the referencing table, schema.table quoted as needed
	Constraint string
	Columns    []string // referencing columns, in the constraint's order
	Referenced string   // the referenced table, schema.table
	RefColumns []string // referenced columns, in the same order
	MatchFull  bool     // MATCH FULL; otherwise MATCH SIMPLE
	// Count is the number of offending rows; Keys holds the referencing
	// column values (nil for NULL) of the first of them in key order, at
	// most Options.FKKeys.
	Count int64
	Keys  [][]*string
	// FindSQL selects every offending row; DeleteSQL deletes them. Both
	// are for the operator to run, in one region (the change replicates).
	FindSQL   string
	DeleteSQL string
}

// KeyString formats key i as PostgreSQL's own error does: (a, b)=(1, 2).
func (v FKViolation) KeyString(i int) string {
	vals := make([]string, len(v.Keys[i]))
	for j, p := range v.Keys[i] {
		if p == nil {
			vals[j] = "NULL"
		} else {
			vals[j] = *p
		}
	}
	return "(" + strings.Join(v.Columns, ", ") + ")=(" + strings.Join(vals, ", ") + ")"
}

// foreignKey is one constraint as a region's catalog describes it, with
// the SQL that finds its violations.
type foreignKey struct {
	table, name, ref   string
	cols, refCols      []string
	matchFull          bool
	orphans            string // FROM ... WHERE ... over alias t, without SELECT
	selectCols         string // the referencing columns of t as text
	orderBy            string
	findSQL, deleteSQL string
}

// foreignKeys lists the foreign keys declared on tables in region c's
// catalog. A constraint PostgreSQL cloned onto a partition of the
// referenced table is left out: its parent constraint, which references
// the whole partitioned table, is checked instead.
func foreignKeys(ctx context.Context, c *pgx.Conn, tables []string) ([]foreignKey, error) {
	rows, err := c.Query(ctx, `
		SELECT format('%I.%I', cn.nspname, cl.relname), cl.relkind = 'p',
		       c.conname, format('%I.%I', fn.nspname, fl.relname), fl.relkind = 'p', c.confmatchtype = 'f',
		       array(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
		             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.i),
		       array(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, i)
		             JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.i),
		       array(SELECT format('OPERATOR(%I.%s)', opn.nspname, o.oprname) FROM unnest(c.conpfeqop) WITH ORDINALITY p(op, i)
		             JOIN pg_operator o ON o.oid = p.op JOIN pg_namespace opn ON opn.oid = o.oprnamespace ORDER BY p.i)
		FROM pg_constraint c
		JOIN pg_class cl ON cl.oid = c.conrelid JOIN pg_namespace cn ON cn.oid = cl.relnamespace
		JOIN pg_class fl ON fl.oid = c.confrelid JOIN pg_namespace fn ON fn.oid = fl.relnamespace
		WHERE c.contype = 'f'
		  AND c.conrelid IN (SELECT to_regclass(x) FROM unnest($1::text[]) x)
		  AND NOT EXISTS (SELECT 1 FROM pg_constraint pc WHERE pc.oid = c.conparentid AND pc.conrelid = c.conrelid)
		ORDER BY 1, 3`, tables)
	if err != nil {
		return nil, fmt.Errorf("list foreign keys: %w", err)
	}
	defer rows.Close()
	var out []foreignKey
	for rows.Next() {
		var fk foreignKey
		var partitioned, refPartitioned bool
		var ops []string
		if err := rows.Scan(&fk.table, &partitioned, &fk.name, &fk.ref, &refPartitioned, &fk.matchFull, &fk.cols, &fk.refCols, &ops); err != nil {
			return nil, fmt.Errorf("list foreign keys: %w", err)
		}
		if len(fk.cols) == 0 || len(fk.cols) != len(fk.refCols) || len(ops) != len(fk.cols) {
			return nil, fmt.Errorf("list foreign keys: %s on %s: %d columns reference %d with %d operators", fk.name, fk.table, len(fk.cols), len(fk.refCols), len(ops))
		}
		fk.build(partitioned, refPartitioned, ops)
		out = append(out, fk)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list foreign keys: %w", err)
	}
	return out, nil
}

// build writes the anti-join that finds the constraint's violations, as
// PostgreSQL's own check does: ONLY the tables themselves unless
// partitioned, each column compared with the constraint's own equality
// operator. MATCH SIMPLE: a row with a NULL in any referencing column
// references nothing and is no violation. MATCH FULL: a row with every
// referencing column NULL is none either, one with only some NULL is one.
func (fk *foreignKey) build(partitioned, refPartitioned bool, ops []string) {
	only := func(p bool) string {
		if p {
			return ""
		}
		return "ONLY "
	}
	n := len(fk.cols)
	tc := make([]string, n)
	sel := make([]string, n)
	eq := make([]string, n)
	notNull := make([]string, n)
	isNull := make([]string, n)
	for i := range fk.cols {
		tc[i] = "t." + pgx.Identifier{fk.cols[i]}.Sanitize()
		sel[i] = tc[i] + "::text"
		eq[i] = "p." + pgx.Identifier{fk.refCols[i]}.Sanitize() + " " + ops[i] + " " + tc[i]
		notNull[i] = tc[i] + " IS NOT NULL"
		isNull[i] = tc[i] + " IS NULL"
	}
	missing := fmt.Sprintf("%s AND NOT EXISTS (SELECT 1 FROM %s%s p WHERE %s)",
		strings.Join(notNull, " AND "), only(refPartitioned), fk.ref, strings.Join(eq, " AND "))
	cond := missing
	if fk.matchFull && n > 1 {
		cond = fmt.Sprintf("((%s) OR (NOT (%s) AND NOT (%s)))", missing, strings.Join(notNull, " AND "), strings.Join(isNull, " AND "))
	}
	from := fmt.Sprintf("%s%s t", only(partitioned), fk.table)
	fk.orphans = from + " WHERE " + cond
	fk.selectCols = strings.Join(sel, ", ")
	fk.orderBy = strings.Join(tc, ", ")
	fk.findSQL = "SELECT t.* FROM " + fk.orphans + " ORDER BY " + fk.orderBy
	fk.deleteSQL = "DELETE FROM " + fk.orphans
}

// check runs the anti-join in one region: the number of violating rows and
// the referencing values of the first max of them, in one query.
func (fk *foreignKey) check(ctx context.Context, c *pgx.Conn, region string, max int) (FKViolation, error) {
	v := FKViolation{
		Region: region, Table: fk.table, Constraint: fk.name, Columns: fk.cols,
		Referenced: fk.ref, RefColumns: fk.refCols, MatchFull: fk.matchFull,
		FindSQL: fk.findSQL, DeleteSQL: fk.deleteSQL,
	}
	q := fmt.Sprintf("SELECT count(*) OVER (), %s FROM %s ORDER BY %s LIMIT %d", fk.selectCols, fk.orphans, fk.orderBy, max)
	rows, err := c.Query(ctx, q)
	if err != nil {
		return v, fmt.Errorf("check foreign key %s on %s: %w", fk.name, fk.table, err)
	}
	defer rows.Close()
	for rows.Next() {
		key := make([]*string, len(fk.cols))
		dst := make([]any, 0, len(key)+1)
		dst = append(dst, &v.Count)
		for i := range key {
			dst = append(dst, &key[i])
		}
		if err := rows.Scan(dst...); err != nil {
			return v, fmt.Errorf("check foreign key %s on %s: %w", fk.name, fk.table, err)
		}
		v.Keys = append(v.Keys, key)
	}
	if err := rows.Err(); err != nil {
		return v, fmt.Errorf("check foreign key %s on %s: %w", fk.name, fk.table, err)
	}
	return v, nil
}

// checkForeignKeys finds the violated foreign keys of tables in every
// region, each region against its own catalog. Violations still present
// after the settle period (up to Rechecks times) are returned: a child
// whose parent is still in flight to a region is not an orphan.
func checkForeignKeys(ctx context.Context, regions []Region, conns []*pgx.Conn, tables []string, opts Options) ([]FKViolation, error) {
	type pending struct {
		region int
		fk     foreignKey
	}
	var checks []pending
	for i, r := range regions {
		fks, err := foreignKeys(ctx, conns[i], tables)
		if err != nil {
			return nil, fmt.Errorf("verify: region %s: %w", r.Name, err)
		}
		for _, fk := range fks {
			checks = append(checks, pending{region: i, fk: fk})
		}
	}
	var found []FKViolation
	for attempt := 0; ; attempt++ {
		found = found[:0]
		var still []pending
		for _, p := range checks {
			v, err := p.fk.check(ctx, conns[p.region], regions[p.region].Name, opts.FKKeys)
			if err != nil {
				return nil, fmt.Errorf("verify: region %s: %w", regions[p.region].Name, err)
			}
			if v.Count > 0 {
				found = append(found, v)
				still = append(still, p)
			}
		}
		if len(found) == 0 || opts.Settle <= 0 || attempt >= opts.Rechecks {
			return found, nil
		}
		opts.Log.Info().Int("constraints", len(found)).Dur("settle", opts.Settle).
			Msg("foreign keys violated; checking them again after the settle period")
		checks = still
		t := time.NewTimer(opts.Settle)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}
