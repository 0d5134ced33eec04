package apply

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// target is the applier's cached view of one table in the target database.
type target struct {
	ident string            // quoted "schema"."table"
	name  string            // schema.table, for messages and the conflicts log
	types map[string]string // column name -> quoted, schema-qualified type name
	// always marks GENERATED ALWAYS AS IDENTITY columns: an INSERT writes
	// them only with OVERRIDING SYSTEM VALUE, an UPDATE never.
	always map[string]bool
	// generated marks generated columns, which are never written.
	generated map[string]bool
	// stored lists the columns an INSERT can write (all but generated
	// ones), in table order.
	stored []string
	// key marks the columns of the target's replica identity index, or
	// of its primary key when the replica identity is not an index: what
	// rows are matched by under REPLICA IDENTITY FULL (see matchKey).
	key map[string]bool
	// meta is the name the table's conflict metadata (tombstones, batch
	// stamps, key marks, conflict records) is kept under: its name when
	// prism-cdc first installed it (prism.table_names), which stays when
	// the table is renamed.
	meta string
	// unbatched: the table's rows are never batched. It has triggers of
	// its own that fire on applied rows (ENABLE ALWAYS or REPLICA) other
	// than AFTER ... FOR EACH ROW ones without transition tables (a
	// BEFORE trigger may change or skip a row the array statement counts
	// and stamps; a statement trigger would fire once per batch), or
	// array columns, which an array parameter cannot carry one per
	// element.
	unbatched bool
	// insertsOnly: the table has AFTER row triggers that fire on applied
	// rows. Its inserts of new keys may join a batch: each source row is
	// then inserted once, as itself, and fires the triggers once, as on
	// the row path. Its updates and deletes may not, since a batch keeps
	// only a key's last version.
	insertsOnly bool
	// batchStatements are the array statements built for the table (see
	// batchTable.statement), guarded by batchMu: sessions of several
	// sources share a target.
	batchMu         sync.Mutex
	batchStatements map[batchStatementKey]*batchStatement
}

const loadTargetSQL = `
SELECT a.attname, quote_ident(n.nspname) || '.' || quote_ident(t.typname), a.attidentity = 'a', a.attgenerated <> '',
	EXISTS (SELECT 1 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
		WHERE i.indrelid = a.attrelid AND a.attnum = ANY (i.indkey)
			AND CASE WHEN c.relreplident = 'i' THEN i.indisreplident ELSE i.indisprimary END)
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum`

// targetBatchingSQL tells, for table $1, whether its rows are never
// batched (target.unbatched), whether only its inserts are
// (target.insertsOnly), and the name its conflict metadata is kept under
// ($2 when prism.table_names has none). The triggers that fire on
// applied rows are the table's own ENABLE ALWAYS and ENABLE REPLICA ones
// (not prism-cdc's): tgtype bit 0 is FOR EACH ROW, bit 1 BEFORE, bit 6
// INSTEAD OF.
const targetBatchingSQL = `WITH tg AS (SELECT (t.tgtype & 1) = 1 AND (t.tgtype & 66) = 0
		AND t.tgoldtable IS NULL AND t.tgnewtable IS NULL AS after_row
	FROM pg_catalog.pg_trigger t WHERE t.tgrelid = to_regclass($1)
		AND NOT t.tgisinternal AND t.tgenabled IN ('A', 'R') AND t.tgname NOT IN ('prism_clock', 'prism_tombstone'))
SELECT EXISTS (SELECT 1 FROM tg WHERE NOT tg.after_row)
		OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid
		WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped AND ty.typcategory = 'A'),
	EXISTS (SELECT 1 FROM tg),
	coalesce((SELECT n.name FROM prism.table_names n WHERE n.relid = to_regclass($1)), $2)`

// loadTarget reads the columns of schema.table from the catalog.
func loadTarget(ctx context.Context, conn *pgx.Conn, schema, table string) (*target, error) {
	ident := pgx.Identifier{schema, table}.Sanitize()
	rows, err := conn.Query(ctx, loadTargetSQL, ident)
	if err != nil {
		return nil, err
	}
	t := &target{ident: ident, name: schema + "." + table, types: map[string]string{}, always: map[string]bool{}, generated: map[string]bool{}, key: map[string]bool{}}
	for rows.Next() {
		var name, typ string
		var always, generated, key bool
		if err := rows.Scan(&name, &typ, &always, &generated, &key); err != nil {
			rows.Close()
			return nil, err
		}
		t.types[name] = typ
		if always {
			t.always[name] = true
		}
		if key {
			t.key[name] = true
		}
		if generated {
			t.generated[name] = true
		} else {
			t.stored = append(t.stored, name)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if len(t.types) == 0 {
		return nil, permanent("42P01", "table %s does not exist in the target database", t.name)
	}
	if err := conn.QueryRow(ctx, targetBatchingSQL, ident, t.name).Scan(&t.unbatched, &t.insertsOnly, &t.meta); err != nil {
		return nil, err
	}
	return t, nil
}

// tuple tells which row of a change a parameter comes from.
type tuple uint8

const (
	tupleNew tuple = iota
	tupleOld
	// tupleCommit is the incoming transaction's commit time, a parameter
	// of the conflict check.
	tupleCommit
)

// paramRef is where one statement parameter's value comes from.
type paramRef struct {
	from tuple
	col  int // index into Rel.Columns
}

// statement is one prepared row statement for a (table, op, column set,
// policy) shape.
type statement struct {
	name   string
	sql    string
	params []paramRef
}

// shapeKey identifies the statement a change needs. Values (and whether
// they are NULL) do not change the SQL; which columns are sent, unchanged
// or used as key does.
func shapeKey(c *decode.Change, policy Policy) string {
	var b strings.Builder
	rel := c.Rel
	b.Grow(64 + 16*len(rel.Columns))
	b.WriteString(strconv.Itoa(int(c.Op)))
	b.WriteByte('|')
	b.WriteString(string(policy))
	b.WriteByte('|')
	b.WriteByte(rel.ReplicaIdentity)
	b.WriteString(rel.Schema)
	b.WriteByte('.')
	b.WriteString(rel.Table)
	if c.Old != nil {
		b.WriteString("|old")
	}
	for i, col := range rel.Columns {
		b.WriteByte('|')
		b.WriteString(col.Name)
		if col.Key {
			b.WriteString("*")
		}
		if i < len(c.New) && c.New[i].Kind == decode.ValueUnchanged {
			b.WriteString("~n")
		}
		if i < len(c.Old) && c.Old[i].Kind == decode.ValueUnchanged {
			b.WriteString("~o")
		}
	}
	return b.String()
}

// lit quotes s as a SQL string literal (standard_conforming_strings=on).
func lit(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// builder assembles one statement's SQL and parameter list.
type builder struct {
	t      *target
	rel    *decode.Relation
	keys   []int // matchKey(t, rel)
	params []paramRef
	index  map[paramRef]int
}

// param returns the placeholder for a value, cast to the target column's
// type so the server parses the text exactly like the source printed it.
func (b *builder) param(from tuple, col int) (string, error) {
	name := b.rel.Columns[col].Name
	typ, ok := b.t.types[name]
	if !ok {
		return "", permanent("42703", "column %q of table %s does not exist in the target database", name, b.t.name)
	}
	ref := paramRef{from: from, col: col}
	n, ok := b.index[ref]
	if !ok {
		b.params = append(b.params, ref)
		n = len(b.params)
		b.index[ref] = n
	}
	return "$" + strconv.Itoa(n) + "::" + typ, nil
}

// commitTime returns the placeholder of the incoming commit time.
func (b *builder) commitTime() string {
	ref := paramRef{from: tupleCommit, col: -1}
	n, ok := b.index[ref]
	if !ok {
		b.params = append(b.params, ref)
		n = len(b.params)
		b.index[ref] = n
	}
	return "$" + strconv.Itoa(n) + "::timestamptz"
}

// buildStatement writes the SQL for change c under policy.
func buildStatement(t *target, c *decode.Change, policy Policy) (*statement, error) {
	b := &builder{t: t, rel: c.Rel, keys: matchKey(t, c.Rel), index: map[paramRef]int{}}
	var sql string
	var err error
	switch c.Op {
	case decode.OpInsert:
		sql, err = b.insert(c, policy)
	case decode.OpUpdate:
		sql, err = b.update(c, policy)
	case decode.OpDelete:
		sql, err = b.delete(c, policy)
	default:
		return nil, permanent("22023", "unsupported row operation %s on %s", c.Op, t.name)
	}
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(sql))
	return &statement{name: "prism_" + hex.EncodeToString(sum[:12]), sql: sql, params: b.params}, nil
}

func quote(name string) string { return pgx.Identifier{name}.Sanitize() }

// matchKey returns the columns of rel that identify a row of t, or nil
// when rows are matched by the whole old row. They are the relation's key
// columns (the source's primary key or replica identity index), except
// under REPLICA IDENTITY FULL, where pgoutput flags every column: then,
// like PostgreSQL's apply worker (GetRelationIdentityOrPK), the columns of
// the target's replica identity index or primary key, when the relation
// carries them all. Matching a keyed row by its whole old row would miss
// it after a concurrent local write of another column and insert it
// again, a duplicate key.
func matchKey(t *target, rel *decode.Relation) []int {
	var ks []int
	if rel.ReplicaIdentity != decode.IdentityFull {
		for i, col := range rel.Columns {
			if col.Key {
				ks = append(ks, i)
			}
		}
		return ks
	}
	for i, col := range rel.Columns {
		if t.key[col.Name] {
			ks = append(ks, i)
		}
	}
	if len(ks) == 0 || len(ks) != len(t.key) {
		return nil
	}
	return ks
}

// keyed reports whether rows are identified by key columns rather than by
// the whole old row.
func (b *builder) keyed() bool { return len(b.keys) > 0 }

// quoted returns the quoted names of the given columns.
func (b *builder) quoted(cols []int) []string {
	names := make([]string, len(cols))
	for i, c := range cols {
		names[i] = quote(b.rel.Columns[c].Name)
	}
	return names
}

// keyCols returns the columns that identify a row (matchKey).
func (b *builder) keyCols() []int { return b.keys }

// keyJSON builds a jsonb object of the given columns read from alias.
func (b *builder) keyJSON(alias string, cols []int) string {
	names := make([]string, len(cols))
	vals := make([]string, len(cols))
	for i, c := range cols {
		name := b.rel.Columns[c].Name
		names[i] = lit(name)
		vals[i] = alias + "." + quote(name) + "::text"
	}
	return "jsonb_object(ARRAY[" + strings.Join(names, ", ") + "]::text[], ARRAY[" + strings.Join(vals, ", ") + "]::text[])"
}

// keyJSONParams builds a jsonb object of the given columns' parameters.
func (b *builder) keyJSONParams(from tuple, cols []int) (string, error) {
	names := make([]string, len(cols))
	vals := make([]string, len(cols))
	for i, c := range cols {
		p, err := b.param(from, c)
		if err != nil {
			return "", err
		}
		names[i] = lit(b.rel.Columns[c].Name)
		vals[i] = "(" + p + ")::text"
	}
	return "jsonb_object(ARRAY[" + strings.Join(names, ", ") + "]::text[], ARRAY[" + strings.Join(vals, ", ") + "]::text[])", nil
}

// sentCols lists the columns of New that carry a value (not unchanged).
func sentCols(c *decode.Change) (cols []int, complete bool) {
	complete = true
	for i := range c.Rel.Columns {
		if i >= len(c.New) || c.New[i].Kind == decode.ValueUnchanged {
			complete = false
			continue
		}
		cols = append(cols, i)
	}
	return cols, complete
}

// values returns the quoted column names and the parameter references of
// a full-row INSERT from New.
func (b *builder) values(cols []int) (names, ps []string, err error) {
	names = make([]string, len(cols))
	ps = make([]string, len(cols))
	for i, c := range cols {
		if ps[i], err = b.param(tupleNew, c); err != nil {
			return nil, nil, err
		}
		names[i] = quote(b.rel.Columns[c].Name)
	}
	return names, ps, nil
}

// writable leaves out the columns the target generates itself: they are
// never written.
func (b *builder) writable(cols []int) []int {
	if len(b.t.generated) == 0 {
		return cols
	}
	out := make([]int, 0, len(cols))
	for _, c := range cols {
		if !b.t.generated[b.rel.Columns[c].Name] {
			out = append(out, c)
		}
	}
	return out
}

// isAlways reports whether column col is GENERATED ALWAYS AS IDENTITY in
// the target.
func (b *builder) isAlways(col int) bool { return b.t.always[b.rel.Columns[col].Name] }

// overriding is the clause an INSERT of cols needs to write identity
// ALWAYS columns with the source's values, as PostgreSQL's own apply
// worker does.
func (b *builder) overriding(cols []int) string {
	for _, c := range cols {
		if b.isAlways(c) {
			return " OVERRIDING SYSTEM VALUE"
		}
	}
	return ""
}

// sets returns the SET list of an UPDATE writing cols from New. Identity
// ALWAYS columns are left out (an UPDATE may not assign them), and
// returned as moved: the caller writes them by moving the row (move).
func (b *builder) sets(cols []int) (sets []string, moved []int, err error) {
	for _, col := range cols {
		if b.isAlways(col) {
			moved = append(moved, col)
			continue
		}
		p, err := b.param(tupleNew, col)
		if err != nil {
			return nil, nil, err
		}
		sets = append(sets, quote(b.rel.Columns[col].Name)+" = "+p)
	}
	return sets, moved, nil
}

// move writes the identity ALWAYS columns moved of an updated row x (an
// UPDATE cannot): when one of them differs from its new value, the row is
// deleted and inserted again, OVERRIDING SYSTEM VALUE, with the new values
// of cols and the old values of every other column (unchanged TOASTed
// ones). It returns the UPDATE's extra condition, and the CTEs d (DELETE
// ... RETURNING, with using and where after the target) and i (the
// INSERT), both in the statement's own snapshot. The new row version has
// this transaction's stamp like an updated one; the delete leaves a
// tombstone for the old key, as a delete of it would. With no UPDATE (sets
// empty) the row is always moved.
func (b *builder) move(cols, moved []int, using, where, resolve string, sets bool) (updateCond, ctes string, err error) {
	changed := make([]string, len(moved))
	for i, m := range moved {
		p, err := b.param(tupleNew, m)
		if err != nil {
			return "", "", err
		}
		changed[i] = "x." + quote(b.rel.Columns[m].Name) + " IS DISTINCT FROM " + p
	}
	cond := "(" + strings.Join(changed, " OR ") + ")"
	deleteCond := resolve
	if sets {
		updateCond = "CASE WHEN " + cond + " THEN false ELSE " + resolve + " END"
		deleteCond = "CASE WHEN " + cond + " THEN " + resolve + " ELSE false END"
	}
	sent := map[string]int{}
	for _, c := range cols {
		sent[b.rel.Columns[c].Name] = c
	}
	names := make([]string, len(b.t.stored))
	exprs := make([]string, len(b.t.stored))
	for i, n := range b.t.stored {
		names[i] = quote(n)
		exprs[i] = "d." + quote(n)
		if c, ok := sent[n]; ok {
			if exprs[i], err = b.param(tupleNew, c); err != nil {
				return "", "", err
			}
		}
	}
	ctes = "d AS (DELETE FROM " + b.t.ident + " AS x" + using + " WHERE " + where + " AND " + deleteCond + " RETURNING x.*), " +
		"i AS (INSERT INTO " + b.t.ident + " (" + strings.Join(names, ", ") + ") OVERRIDING SYSTEM VALUE SELECT " +
		strings.Join(exprs, ", ") + " FROM d RETURNING 1)"
	return updateCond, ctes, nil
}

func (b *builder) insert(c *decode.Change, policy Policy) (string, error) {
	cols, complete := sentCols(c)
	if !complete {
		return "", permanent("22023", "insert into %s carries an unchanged-value column", b.t.name)
	}
	cols = b.writable(cols)
	nameList, psList, err := b.values(cols)
	if err != nil {
		return "", err
	}
	names, ps := strings.Join(nameList, ", "), strings.Join(psList, ", ")
	if !b.keyed() {
		return "INSERT INTO " + b.t.ident + " AS x (" + names + ")" + b.overriding(cols) + " VALUES (" + ps + ")", nil
	}
	keys := b.keyCols()
	// A key with a tombstone is inserted only when the insert is newer
	// than the delete (prism.admit); the common cases, no tombstone or one
	// stamped before the insert (a hot key deleted and inserted again),
	// cost one index probe and no call.
	keyP, err := b.keyJSONParams(tupleNew, keys)
	if err != nil {
		return "", err
	}
	pol, tbl := lit(string(policy)), lit(b.t.meta)
	keyNames := b.quoted(keys)
	sets, moved := b.insertSets(cols, keys)
	resolve := "prism.resolve('insert_exists', " + pol + ", " + tbl + ", " + b.keyJSON("x", keys) + ", x.xmin)"
	conflictWhere := resolve
	with, from := "", ""
	if len(moved) > 0 || len(sets) == 0 {
		with, from, conflictWhere, err = b.insertReplacing(c, moved, resolve)
		if err != nil {
			return "", err
		}
	}
	// The version of the key the snapshot shows, if any, is locked first:
	// one that a local transaction deleted (or changed) after the
	// snapshot fails the statement with a serialization failure, and the
	// transaction is applied again on a snapshot that shows the delete's
	// tombstone. Without it the insert would find no conflict (the row is
	// gone) and no tombstone (the snapshot predates it), and win over a
	// newer delete.
	lock, err := b.lockKey(keys)
	if err != nil {
		return "", err
	}
	// The key's mark (prism.key_marks) meets an applied delete of the
	// missing key from another source, which the snapshot may not show; a
	// data-modifying WITH runs once, whatever the insert does.
	mark := "mk AS (INSERT INTO prism.key_marks (h) VALUES (prism.mark_hash(" + tbl + ", " + keyP + ")) ON CONFLICT (h) DO UPDATE SET at = EXCLUDED.at)"
	if with == "" {
		with = "WITH " + mark + " "
	} else {
		with = strings.Replace(with, "WITH ", "WITH "+mark+", ", 1)
	}
	sql := with + "INSERT INTO " + b.t.ident + " AS x (" + names + ")" + b.overriding(cols) + " SELECT " + ps + from +
		" WHERE " + lock + " AND (NOT EXISTS (SELECT 1 FROM prism.tombstones tb WHERE tb.table_name = " + tbl + " AND tb.key = " + keyP +
		" AND NOT " + stampedBefore("tb", b.commitTime()) + ")" +
		" OR prism.admit(" + pol + ", " + tbl + ", " + keyP + "))"
	if len(sets) == 0 {
		// Every column is an identity ALWAYS key: d replaced the row
		// if the insert won.
		return sql + " ON CONFLICT (" + strings.Join(keyNames, ", ") + ") DO NOTHING", nil
	}
	return sql + " ON CONFLICT (" + strings.Join(keyNames, ", ") + ") DO UPDATE SET " + strings.Join(sets, ", ") +
		" WHERE " + conflictWhere, nil
}

// lockKey is a condition that is always true and locks the row of the
// incoming key that the transaction's snapshot shows (FOR KEY SHARE: it
// blocks no local update of other columns). EXISTS reads the one row the
// key can have, so it locks it; IS NOT NULL keeps the planner from
// folding the condition away. Written as a count(*) over the locked rows,
// which is what it was, the aggregate's start-up cost an applied insert 5
// of its 41 us of server CPU.
func (b *builder) lockKey(keys []int) (string, error) {
	conds := make([]string, len(keys))
	for i, k := range keys {
		p, err := b.param(tupleNew, k)
		if err != nil {
			return "", err
		}
		conds[i] = "l." + quote(b.rel.Columns[k].Name) + " = " + p
	}
	return "(EXISTS (SELECT 1 FROM " + b.t.ident + " AS l WHERE " + strings.Join(conds, " AND ") + " FOR KEY SHARE) IS NOT NULL)", nil
}

// insertSets returns the assignments of insert's ON CONFLICT DO UPDATE
// and the identity ALWAYS columns among cols, which it cannot assign. The
// key is the same. With nothing else to assign, the first column that is
// not identity ALWAYS is assigned (none: sets is empty).
func (b *builder) insertSets(cols, keys []int) (sets []string, moved []int) {
	isKey := map[int]bool{}
	for _, k := range keys {
		isKey[k] = true
	}
	for _, col := range cols {
		n := quote(b.rel.Columns[col].Name)
		switch {
		case isKey[col]:
		case b.isAlways(col):
			moved = append(moved, col)
		default:
			sets = append(sets, n+" = EXCLUDED."+n)
		}
	}
	for _, col := range cols {
		if len(sets) == 0 && !b.isAlways(col) {
			n := quote(b.rel.Columns[col].Name)
			sets = append(sets, n+" = EXCLUDED."+n)
		}
	}
	return sets, moved
}

// insertReplacing returns the WITH and FROM clauses that delete an
// existing row before insert writes it, and the ON CONFLICT condition
// that goes with them. ON CONFLICT DO UPDATE cannot write identity ALWAYS
// columns (moved): an existing row whose values of them differ (or, with
// nothing else to update, any existing row) is deleted first when the
// insert wins, and the insert then finds no conflict; the INSERT reads d,
// so the DELETE runs before it.
func (b *builder) insertReplacing(c *decode.Change, moved []int, resolve string) (with, from, conflictWhere string, err error) {
	cond, _, _, err := b.match(c, "x")
	if err != nil {
		return "", "", "", err
	}
	deleteCond, conflictWhere := resolve, resolve
	if len(moved) > 0 {
		differs := make([]string, len(moved))
		differsExcluded := make([]string, len(moved))
		for i, m := range moved {
			p, err := b.param(tupleNew, m)
			if err != nil {
				return "", "", "", err
			}
			n := quote(b.rel.Columns[m].Name)
			differs[i] = "x." + n + " IS DISTINCT FROM " + p
			differsExcluded[i] = "x." + n + " IS DISTINCT FROM EXCLUDED." + n
		}
		deleteCond = "CASE WHEN " + strings.Join(differs, " OR ") + " THEN " + resolve + " ELSE false END"
		conflictWhere = "CASE WHEN " + strings.Join(differsExcluded, " OR ") + " THEN false ELSE " + resolve + " END"
	}
	with = "WITH d AS (DELETE FROM " + b.t.ident + " AS x WHERE " + cond + " AND " + deleteCond + " RETURNING 1) "
	from = " FROM (SELECT count(*) FROM d) AS d"
	return with, from, conflictWhere, nil
}

// match returns the row-identifying condition on alias and the columns it
// uses. Keyed tables (matchKey) match the key columns (from Old when sent,
// else from New); REPLICA IDENTITY FULL without a key matches every sent
// old column by its text form, which works for types without an equality
// operator too.
func (b *builder) match(c *decode.Change, alias string) (string, []int, tuple, error) {
	if b.keyed() {
		from := tupleNew
		vals := c.New
		if c.Old != nil {
			from, vals = tupleOld, c.Old
		}
		keys := b.keyCols()
		conds := make([]string, len(keys))
		for i, k := range keys {
			if k >= len(vals) || vals[k].Kind == decode.ValueUnchanged || vals[k].Kind == decode.ValueNull {
				return "", nil, 0, permanent("22023", "%s on %s lacks a value for key column %q", c.Op, b.t.name, b.rel.Columns[k].Name)
			}
			p, err := b.param(from, k)
			if err != nil {
				return "", nil, 0, err
			}
			conds[i] = alias + "." + quote(b.rel.Columns[k].Name) + " = " + p
		}
		return strings.Join(conds, " AND "), keys, from, nil
	}
	if b.rel.ReplicaIdentity != decode.IdentityFull {
		return "", nil, 0, permanent("55000", "table %s has no replica identity key (REPLICA IDENTITY NOTHING or no primary key): cannot %s", b.t.name, c.Op)
	}
	if c.Old == nil {
		return "", nil, 0, permanent("22023", "%s on %s with REPLICA IDENTITY FULL lacks the old row", c.Op, b.t.name)
	}
	var conds []string
	var cols []int
	for i := range b.rel.Columns {
		if i >= len(c.Old) || c.Old[i].Kind == decode.ValueUnchanged {
			continue
		}
		p, err := b.param(tupleOld, i)
		if err != nil {
			return "", nil, 0, err
		}
		n := quote(b.rel.Columns[i].Name)
		conds = append(conds, alias+"."+n+"::text IS NOT DISTINCT FROM ("+p+")::text")
		cols = append(cols, i)
	}
	if len(conds) == 0 {
		return "", nil, 0, permanent("22023", "%s on %s carries no old column to match", c.Op, b.t.name)
	}
	return strings.Join(conds, " AND "), cols, tupleOld, nil
}

// resolveCall is the conflict check of an update or delete of row x. It
// calls prism.resolve (PL/pgSQL) only when the cheap test that comes first
// fails: the local version's commit time is unknown (frozen, or written by
// this very transaction) or earlier than the incoming commit ts (a
// parameter), and its transaction has no clock floor (prism.stamp is then
// the commit time). The floor table is empty unless this region's clock
// lags; the transaction's setup statement records in prism.floors whether
// it has rows in the transaction's snapshot, so the common case costs no
// lookup. Then resolve would accept the change without recording
// anything, so the result is the same; skipping the call saves most of the
// server CPU of a replicated update. OR evaluates its arguments in order
// and stops at the first true.
func resolveCall(kind, pol, tbl, key, ts string) string {
	return "(" + stampedBefore("x", ts) + " OR prism.resolve(" + lit(kind) + ", " + pol + ", " + tbl + ", " + key + ", x.xmin))"
}

// stampedBefore is the cheap test that the version of row alias (a row
// of an application table or of prism.tombstones) is stamped before the
// incoming commit time ts, or written by this transaction: its commit
// time is earlier (a batch's stamps are at most its commit time) or
// unknown, and it has no clock floor (see resolveCall).
func stampedBefore(alias, ts string) string {
	return "(coalesce(pg_catalog.pg_xact_commit_timestamp(" + alias + ".xmin) < " + ts + ", true)" +
		" AND (pg_catalog.current_setting('prism.floors') = 'false' OR NOT prism.floored(" + alias + ".xmin)))"
}

// missingInsert is the INSERT prism.update_missing runs for an update
// whose row is missing: it takes the new row's sent values as one text
// array, cast back to the column types (text output and input are
// inverse for every type).
func (b *builder) missingInsert(cols []int) (sql string, arr string, err error) {
	names, params, err := b.values(cols)
	if err != nil {
		return "", "", err
	}
	ps := make([]string, len(cols))
	vs := make([]string, len(cols))
	for i, c := range cols {
		ps[i] = "$1[" + strconv.Itoa(i+1) + "]::" + b.t.types[b.rel.Columns[c].Name]
		vs[i] = "(" + params[i] + ")::text"
	}
	sql = "INSERT INTO " + b.t.ident + " (" + strings.Join(names, ", ") + ")" + b.overriding(cols) + " SELECT " + strings.Join(ps, ", ") +
		" ON CONFLICT (" + strings.Join(b.quoted(b.keyCols()), ", ") + ") DO NOTHING"
	return sql, "ARRAY[" + strings.Join(vs, ", ") + "]::text[]", nil
}

func (b *builder) update(c *decode.Change, policy Policy) (string, error) {
	cols, complete := sentCols(c)
	cols = b.writable(cols)
	if len(cols) == 0 {
		return "", permanent("22023", "update of %s carries no column value", b.t.name)
	}
	sets, moved, err := b.sets(cols)
	if err != nil {
		return "", err
	}
	pol := lit(string(policy))
	tbl := lit(b.t.meta)
	if b.keyed() {
		return b.updateKeyed(c, cols, complete, sets, moved, pol, tbl)
	}
	return b.updateFull(c, cols, complete, sets, moved, pol, tbl)
}

// updateKeyed is update for a table with a key: the row is found by its
// key, and a missing row goes to prism.update_missing.
func (b *builder) updateKeyed(c *decode.Change, cols []int, complete bool, sets []string, moved []int, pol, tbl string) (string, error) {
	var sb strings.Builder
	cond, keyCols, from, err := b.match(c, "x")
	if err != nil {
		return "", err
	}
	condY, _, _, _ := b.match(c, "y")
	keyP, err := b.keyJSONParams(from, keyCols)
	if err != nil {
		return "", err
	}
	// The common case, the row is there and the change wins, costs the
	// UPDATE alone: the CASE evaluates the existence probe and the
	// missing-row handling only when the UPDATE changed nothing.
	ins, arr := "NULL", "NULL"
	if complete {
		sql, a, err := b.missingInsert(cols)
		if err != nil {
			return "", err
		}
		ins, arr = lit(sql), a
	}
	resolve := resolveCall("update", pol, tbl, b.keyJSON("x", keyCols), b.commitTime())
	if c.Old == nil && len(sets) > 0 && b.allKeys(moved) {
		// The key did not change, so neither did identity
		// columns of the key.
		moved = nil
	}
	updateCond, found := resolve, "EXISTS (SELECT 1 FROM u)"
	sb.WriteString("WITH ")
	if len(moved) > 0 {
		uc, ctes, err := b.move(cols, moved, "", cond, resolve, len(sets) > 0)
		if err != nil {
			return "", err
		}
		updateCond = uc
		sb.WriteString(ctes)
		found = "EXISTS (SELECT 1 FROM i)"
		if len(sets) > 0 {
			sb.WriteString(", ")
			found = "EXISTS (SELECT 1 FROM u) OR " + found
		}
	}
	if len(sets) > 0 {
		sb.WriteString("u AS (UPDATE " + b.t.ident + " AS x SET " + strings.Join(sets, ", ") +
			" WHERE " + cond + " AND " + updateCond + " RETURNING 1)")
	}
	sb.WriteString(" SELECT CASE WHEN " + found + " THEN 1 WHEN EXISTS (SELECT 1 FROM " + b.t.ident + " AS y WHERE " + condY + ") THEN 0" +
		" ELSE prism.update_missing(" + pol + ", " + tbl + ", " + keyP + ", " + strconv.FormatBool(complete) + ", " + ins + ", " + arr + ") END")
	return sb.String(), nil
}

// updateFull is update for a table with REPLICA IDENTITY FULL: the row is
// found by its old values, and a missing row is inserted when the change
// carries every column.
func (b *builder) updateFull(c *decode.Change, cols []int, complete bool, sets []string, moved []int, pol, tbl string) (string, error) {
	var sb strings.Builder
	cond, matchCols, _, err := b.match(c, "y")
	if err != nil {
		return "", err
	}
	keyP, err := b.keyJSONParams(tupleOld, matchCols)
	if err != nil {
		return "", err
	}
	resolve := resolveCall("update", pol, tbl, keyP, b.commitTime())
	sb.WriteString("WITH target AS (SELECT y.ctid FROM " + b.t.ident + " AS y WHERE " + cond + " LIMIT 1 FOR UPDATE), ")
	updateCond, updated := resolve, "(SELECT count(*) FROM u)"
	if len(moved) > 0 {
		uc, ctes, err := b.move(cols, moved, " USING target", "x.ctid = target.ctid", resolve, len(sets) > 0)
		if err != nil {
			return "", err
		}
		updateCond = uc
		sb.WriteString(ctes + ", ")
		updated = "(SELECT count(*) FROM i)"
		if len(sets) > 0 {
			updated = "(SELECT count(*) FROM u) + " + updated
		}
	}
	if len(sets) > 0 {
		sb.WriteString("u AS (UPDATE " + b.t.ident + " AS x SET " + strings.Join(sets, ", ") + " FROM target WHERE x.ctid = target.ctid" +
			" AND " + updateCond + " RETURNING 1), ")
	}
	sb.WriteString("m AS (SELECT prism.missing('update_missing', " + pol + ", " + tbl + ", " + keyP + ", " + strconv.FormatBool(complete) + ", false) AS ins" +
		" WHERE NOT EXISTS (SELECT 1 FROM target)) ")
	if !complete {
		sb.WriteString("SELECT " + updated + ", (SELECT count(*) FROM m)")
		return sb.String(), nil
	}
	names, ps, err := b.values(cols)
	if err != nil {
		return "", err
	}
	sb.WriteString("INSERT INTO " + b.t.ident + " (" + strings.Join(names, ", ") + ")" + b.overriding(cols) + " SELECT " + strings.Join(ps, ", ") + " FROM m WHERE m.ins")
	return sb.String(), nil
}

// allKeys reports whether every column of cols is a key column.
func (b *builder) allKeys(cols []int) bool {
	for _, c := range cols {
		if !slices.Contains(b.keys, c) {
			return false
		}
	}
	return true
}

func (b *builder) delete(c *decode.Change, policy Policy) (string, error) {
	pol := lit(string(policy))
	tbl := lit(b.t.meta)
	if b.keyed() {
		cond, keyCols, from, err := b.match(c, "x")
		if err != nil {
			return "", err
		}
		condY, _, _, _ := b.match(c, "y")
		keyP, err := b.keyJSONParams(from, keyCols)
		if err != nil {
			return "", err
		}
		return "WITH d AS (DELETE FROM " + b.t.ident + " AS x WHERE " + cond +
			" AND " + resolveCall("delete", pol, tbl, b.keyJSON("x", keyCols), b.commitTime()) + " RETURNING 1) " +
			"SELECT CASE WHEN EXISTS (SELECT 1 FROM d) THEN 1 WHEN EXISTS (SELECT 1 FROM " + b.t.ident + " AS y WHERE " + condY + ") THEN 0" +
			" ELSE prism.missing('delete_missing', " + pol + ", " + tbl + ", " + keyP + ", false, true)::int END", nil
	}
	cond, matchCols, _, err := b.match(c, "y")
	if err != nil {
		return "", err
	}
	keyP, err := b.keyJSONParams(tupleOld, matchCols)
	if err != nil {
		return "", err
	}
	return "WITH target AS (SELECT y.ctid FROM " + b.t.ident + " AS y WHERE " + cond + " LIMIT 1 FOR UPDATE), " +
		"d AS (DELETE FROM " + b.t.ident + " AS x USING target WHERE x.ctid = target.ctid" +
		" AND " + resolveCall("delete", pol, tbl, keyP, b.commitTime()) + " RETURNING 1), " +
		"m AS (SELECT prism.missing('delete_missing', " + pol + ", " + tbl + ", " + keyP + ", false, false)" +
		" WHERE NOT EXISTS (SELECT 1 FROM target)) " +
		"SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM m)", nil
}

// truncateSQL is one TRUNCATE of every listed table with the source's
// flags.
func truncateSQL(c *decode.Change) (string, error) {
	rels := c.Truncated
	if len(rels) == 0 && c.Rel != nil {
		rels = []*decode.Relation{c.Rel}
	}
	if len(rels) == 0 {
		return "", permanent("22023", "truncate without tables")
	}
	names := make([]string, len(rels))
	for i, r := range rels {
		names[i] = pgx.Identifier{r.Schema, r.Table}.Sanitize()
	}
	sql := "TRUNCATE TABLE " + strings.Join(names, ", ")
	if c.TruncateFlags&decode.TruncateRestartIdentity != 0 {
		sql += " RESTART IDENTITY"
	}
	if c.TruncateFlags&decode.TruncateCascade != 0 {
		sql += " CASCADE"
	}
	return sql, nil
}

// bind returns the parameter values and formats of change c for s; ts is
// the transaction's commit time in text form.
func bind(s *statement, c *decode.Change, ts []byte) ([][]byte, []int16, error) {
	vals := make([][]byte, len(s.params))
	var formats []int16
	for i, ref := range s.params {
		if ref.from == tupleCommit {
			vals[i] = ts
			continue
		}
		row := c.New
		if ref.from == tupleOld {
			row = c.Old
		}
		if ref.col >= len(row) {
			return nil, nil, permanent("22023", "%s on %s.%s: row has %d values for %d columns", c.Op, c.Rel.Schema, c.Rel.Table, len(row), len(c.Rel.Columns))
		}
		v := row[ref.col]
		switch v.Kind {
		case decode.ValueNull:
		case decode.ValueText:
			vals[i] = v.Data
			if vals[i] == nil {
				vals[i] = []byte{}
			}
		case decode.ValueBinary:
			if formats == nil {
				formats = make([]int16, len(s.params))
			}
			formats[i] = 1
			vals[i] = v.Data
			if vals[i] == nil {
				vals[i] = []byte{}
			}
		default:
			return nil, nil, permanent("22023", "%s on %s.%s column %q: value kind %s cannot be bound", c.Op, c.Rel.Schema, c.Rel.Table, c.Rel.Columns[ref.col].Name, v.Kind)
		}
	}
	return vals, formats, nil
}
