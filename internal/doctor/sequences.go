package doctor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/internal/config"
)

// SequencePlan interleaves the sequences of one region: with N regions
// (sorted by name) and this region at index k, every sequence that feeds a
// replicated table gets INCREMENT BY N and hands out only values v with
// v mod N = k, so two regions never generate the same key. Its START WITH
// is of residue k too: TRUNCATE ... RESTART IDENTITY, which is replicated,
// restarts the sequences of every region at their START WITH, and each
// must land on its own residue.
type SequencePlan struct {
	Region    string
	Index     int      // k: this region's position in Regions
	Regions   []string // every region, sorted
	Sequences []SequenceChange
}

// SequenceChange is the plan for one sequence.
type SequenceChange struct {
	Name      string // schema-qualified, quoted as needed
	Table     string // a replicated table it feeds
	Column    string
	Increment int64 // current INCREMENT BY
	Next      int64 // the value nextval would return now
	Start     int64 // current START WITH
	// StartTarget is the START WITH after SQL (the least value of this
	// region's residue at or above Start and MINVALUE); equal to Start
	// when nothing changes.
	StartTarget int64
	// Target is the value nextval returns after SQL; equal to Next when
	// nothing changes.
	Target int64
	// SQL is the ALTER SEQUENCE statement; empty when the sequence is
	// already interleaved (or Skip is set).
	SQL string
	// Skip says why the sequence cannot be interleaved (descending, or
	// MAXVALUE too low); empty otherwise.
	Skip string
}

// Changes returns the number of sequences the plan alters.
func (p SequencePlan) Changes() int {
	n := 0
	for _, s := range p.Sequences {
		if s.SQL != "" {
			n++
		}
	}
	return n
}

// Write prints the plan.
func (p SequencePlan) Write(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "region %s is %d of %d (%s): its sequences hand out values v with v mod %d = %d\n",
		p.Region, p.Index, len(p.Regions), strings.Join(p.Regions, ", "), len(p.Regions), p.Index)
	if len(p.Sequences) == 0 {
		b.WriteString("no sequence feeds a replicated table\n")
	}
	for _, s := range p.Sequences {
		switch {
		case s.Skip != "":
			fmt.Fprintf(&b, "skip      %s (%s.%s): %s\n", s.Name, s.Table, s.Column, s.Skip)
		case s.SQL == "":
			fmt.Fprintf(&b, "ok        %s (%s.%s): INCREMENT BY %d, START WITH %d, next %d\n", s.Name, s.Table, s.Column, s.Increment, s.Start, s.Next)
		default:
			fmt.Fprintf(&b, "change    %s (%s.%s): INCREMENT BY %d, START WITH %d, next %d -> %s\n", s.Name, s.Table, s.Column, s.Increment, s.Start, s.Next, s.SQL)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// querier is what planning needs from a connection or a transaction.
type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// PlanSequences connects to cfg's database and plans its sequences. It
// changes nothing.
func PlanSequences(ctx context.Context, cfg *config.Config) (SequencePlan, error) {
	conn, err := pgx.Connect(ctx, cfg.Database)
	if err != nil {
		return SequencePlan{}, fmt.Errorf("connect region %s: %s", cfg.Region, config.RedactDSN(err.Error()))
	}
	defer conn.Close(context.Background())
	return planSequences(ctx, conn, cfg.Publication, Regions(cfg), cfg.Region)
}

// ApplySequences plans and alters cfg's sequences in one transaction that
// locks the tables they feed against writes, so no value is handed out
// between planning and altering. It returns the plan it carried out.
// Running it again changes nothing.
func ApplySequences(ctx context.Context, cfg *config.Config) (SequencePlan, error) {
	conn, err := pgx.Connect(ctx, cfg.Database)
	if err != nil {
		return SequencePlan{}, fmt.Errorf("connect region %s: %s", cfg.Region, config.RedactDSN(err.Error()))
	}
	defer conn.Close(context.Background())
	regions := Regions(cfg)
	// A first plan finds the tables to lock; the plan inside the
	// transaction is the one carried out.
	pre, err := planSequences(ctx, conn, cfg.Publication, regions, cfg.Region)
	if err != nil {
		return SequencePlan{}, err
	}
	if pre.Changes() == 0 {
		return pre, nil
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		return SequencePlan{}, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.Background())
	var lock []string
	for _, s := range pre.Sequences {
		if s.SQL != "" && !slices.Contains(lock, s.Table) {
			lock = append(lock, s.Table)
		}
	}
	if _, err := tx.Exec(ctx, "LOCK TABLE "+strings.Join(lock, ", ")+" IN SHARE ROW EXCLUSIVE MODE"); err != nil {
		return SequencePlan{}, fmt.Errorf("lock tables: %w", err)
	}
	plan, err := planSequences(ctx, tx, cfg.Publication, regions, cfg.Region)
	if err != nil {
		return SequencePlan{}, err
	}
	for _, s := range plan.Sequences {
		if s.SQL == "" {
			continue
		}
		if _, err := tx.Exec(ctx, s.SQL); err != nil {
			return SequencePlan{}, fmt.Errorf("alter sequence %s: %w", s.Name, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return SequencePlan{}, fmt.Errorf("commit: %w", err)
	}
	return plan, nil
}

// sequencesSQL lists each sequence that feeds a column of a table in
// $1 (oids): owned by it (serial, identity) or named in its default.
const sequencesSQL = `
WITH links AS (
	SELECT d.objid AS seq, d.refobjid AS tbl, d.refobjsubid::int2 AS col
	FROM pg_depend d
	WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
	  AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
	UNION
	SELECT d.refobjid, ad.adrelid, ad.adnum
	FROM pg_attrdef ad JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
	WHERE d.refclassid = 'pg_class'::regclass
)
SELECT format('%I.%I', sn.nspname, s.relname), format('%I.%I', tn.nspname, t.relname),
	a.attname, a.atttypid::regtype::text IN ('smallint', 'integer', 'bigint', 'numeric'),
	sq.seqincrement, sq.seqmax, sq.seqstart, sq.seqmin
FROM links l
JOIN pg_class s ON s.oid = l.seq AND s.relkind = 'S'
JOIN pg_namespace sn ON sn.oid = s.relnamespace
JOIN pg_sequence sq ON sq.seqrelid = s.oid
JOIN pg_class t ON t.oid = l.tbl
JOIN pg_namespace tn ON tn.oid = t.relnamespace
JOIN pg_attribute a ON a.attrelid = l.tbl AND a.attnum = l.col
WHERE l.tbl = ANY ($1::oid[])
ORDER BY 1, 2, 3`

func planSequences(ctx context.Context, q querier, pub string, regions []string, region string) (SequencePlan, error) {
	n := int64(len(regions))
	k := slices.Index(regions, region)
	if k < 0 {
		return SequencePlan{}, fmt.Errorf("region %s is not among %v", region, regions)
	}
	plan := SequencePlan{Region: region, Index: k, Regions: regions}
	names, bySeq, err := sequenceUses(ctx, q, pub)
	if err != nil {
		return plan, err
	}
	for _, name := range names {
		c, err := planSequence(ctx, q, name, bySeq[name], n, int64(k))
		if err != nil {
			return plan, err
		}
		plan.Sequences = append(plan.Sequences, c)
	}
	return plan, nil
}

// sequenceUse is one column of a replicated table that a sequence feeds.
type sequenceUse struct {
	seq, table, column string
	integer            bool
	inc, max           int64
	start, min         int64
}

// sequenceUses returns the sequences that feed columns of the replicated
// tables, sorted by name, and their uses.
func sequenceUses(ctx context.Context, q querier, pub string) ([]string, map[string][]sequenceUse, error) {
	tables, err := listTables(ctx, q, pub)
	if err != nil {
		return nil, nil, err
	}
	oids := make([]uint32, len(tables))
	for i, t := range tables {
		oids[i] = t.oid
	}
	rows, err := q.Query(ctx, sequencesSQL, oids)
	if err != nil {
		return nil, nil, fmt.Errorf("list sequences: %w", err)
	}
	uses, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (sequenceUse, error) {
		var u sequenceUse
		err := r.Scan(&u.seq, &u.table, &u.column, &u.integer, &u.inc, &u.max, &u.start, &u.min)
		return u, err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("list sequences: %w", err)
	}
	bySeq := map[string][]sequenceUse{}
	var names []string
	for _, u := range uses {
		if bySeq[u.seq] == nil {
			names = append(names, u.seq)
		}
		bySeq[u.seq] = append(bySeq[u.seq], u)
	}
	sort.Strings(names)
	return names, bySeq, nil
}

// planSequence plans sequence name, fed into the columns us, for region
// k of n: interleaved, it hands out only values of residue k modulo n,
// above every key already in its columns.
func planSequence(ctx context.Context, q querier, name string, us []sequenceUse, n, k int64) (SequenceChange, error) {
	c := SequenceChange{Name: name, Table: us[0].table, Column: us[0].column, Increment: us[0].inc, Start: us[0].start}
	c.StartTarget = c.Start
	var last int64
	var called bool
	if err := q.QueryRow(ctx, "SELECT last_value, is_called FROM "+name).Scan(&last, &called); err != nil {
		return c, fmt.Errorf("read sequence %s: %w", name, err)
	}
	c.Next = last
	if called {
		c.Next = last + c.Increment
	}
	c.Target = c.Next
	if c.Increment < 0 {
		c.Skip = "descending sequence; interleave it by hand or use UUID keys"
		return c, nil
	}
	// A restart (TRUNCATE ... RESTART IDENTITY) lands on START WITH:
	// it must be of this region's residue too, and not below MINVALUE.
	if low := max(c.Start, us[0].min); mod(low, n) != k || low != c.Start {
		c.StartTarget = low + mod(k-mod(low, n), n)
	}
	if c.StartTarget > us[0].max {
		c.Skip = fmt.Sprintf("the interleaved START WITH %d is above MAXVALUE %d", c.StartTarget, us[0].max)
		return c, nil
	}
	startWith := ""
	if c.StartTarget != c.Start {
		startWith = fmt.Sprintf(" START WITH %d", c.StartTarget)
	}
	interleaved := c.Increment == n && mod(c.Next, n) == k
	floor, err := keyFloor(ctx, q, us, n, k, interleaved, c.Next)
	if err != nil {
		return c, err
	}
	if interleaved && floor == c.Next {
		if startWith != "" {
			c.SQL = fmt.Sprintf("ALTER SEQUENCE %s%s;", name, startWith)
		}
		return c, nil
	}
	c.Target = floor + mod(k-mod(floor, n), n)
	if c.Target > us[0].max {
		c.Skip = fmt.Sprintf("the next interleaved value %d is above MAXVALUE %d", c.Target, us[0].max)
		return c, nil
	}
	c.SQL = fmt.Sprintf("ALTER SEQUENCE %s INCREMENT BY %d%s RESTART WITH %d;", name, n, startWith, c.Target)
	return c, nil
}

// keyFloor returns the lowest value, at least next, that cannot collide
// with a key already in the integer columns us. Before interleaving every
// existing key counts; after it only keys of this region's residue k (the
// others belong to other regions and never come from this sequence).
func keyFloor(ctx context.Context, q querier, us []sequenceUse, n, k int64, interleaved bool, next int64) (int64, error) {
	floor := next
	for _, u := range us {
		if !u.integer {
			continue
		}
		var maxAll, maxOwn *int64
		col := pgx.Identifier{u.column}.Sanitize()
		err := q.QueryRow(ctx, fmt.Sprintf("SELECT max(%s)::bigint, (max(%s) FILTER (WHERE mod(%s::bigint, $1) = $2))::bigint FROM %s", col, col, col, u.table), n, k).Scan(&maxAll, &maxOwn)
		if err != nil {
			return 0, fmt.Errorf("read keys of %s.%s: %w", u.table, u.column, err)
		}
		m := maxAll
		if interleaved {
			m = maxOwn
		}
		if m != nil && *m+1 > floor {
			floor = *m + 1
		}
	}
	return floor, nil
}

func mod(a, n int64) int64 { return ((a % n) + n) % n }

// listTables lists the replicated tables: the publication's, or every user
// table when the publication does not exist yet (it is created FOR ALL
// TABLES).
func listTables(ctx context.Context, q querier, pub string) ([]table, error) {
	var pubExists bool
	err := q.QueryRow(ctx, "SELECT true FROM pg_publication WHERE pubname = $1", pub).Scan(&pubExists)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("read publication %s: %w", pub, err)
	}
	sql := `SELECT c.oid, format('%I.%I', n.nspname, c.relname), c.relreplident::text,
		EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident))
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
		AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'prism') AND n.nspname NOT LIKE 'pg\_%'`
	var args []any
	if pubExists {
		sql += ` AND c.oid IN (SELECT format('%I.%I', schemaname, tablename)::regclass FROM pg_publication_tables WHERE pubname = $1)`
		args = append(args, pub)
	}
	rows, err := q.Query(ctx, sql+" ORDER BY 2", args...)
	if err != nil {
		return nil, fmt.Errorf("list replicated tables: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (table, error) {
		var t table
		var ident string
		err := r.Scan(&t.oid, &t.name, &ident, &t.hasKey)
		if ident != "" {
			t.identity = ident[0]
		}
		return t, err
	})
	if err != nil {
		return nil, fmt.Errorf("list replicated tables: %w", err)
	}
	return out, nil
}
