package apply

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Limits of one batch: the rows and value bytes one target transaction
// applies for several source transactions.
const (
	maxBatchRows  = 20000
	maxBatchBytes = 4 << 20
)

// batchGroup kinds: what one array statement does to the rows of a
// table. Deletes go first, so a unique value they free is free for the
// rows written after them, as in the usual source order.
const (
	groupDelete = iota // keys the batch deletes (maybe after updates)
	groupUpdate        // keys that exist and the batch updates
	groupInsert        // keys the batch inserts (then maybe updates)
	groupAppend        // rows of a table without a key, insert only
	groupKinds
)

// batchRow is the batch's net change to one key: checked against the
// version before the batch with the commit time of its first change,
// written with the values of its last, stamped with the commit time of
// the transaction of its last.
type batchRow struct {
	first, last decode.Op
	check, ts   []byte // commit times: of the first change, of the last
	vals        []decode.Value
	txn         int // the transaction of the first change, from the batch's first (0)
}

// group is the statement kind that writes r's net change.
func (r *batchRow) group() int {
	switch {
	case r.last == decode.OpDelete:
		return groupDelete
	case r.first == decode.OpInsert:
		return groupInsert
	default:
		return groupUpdate
	}
}

// batchTable gathers the changes of one table.
type batchTable struct {
	t      *target
	rel    *decode.Relation // column names and keys of every change
	keyed  bool
	rows   map[string]*batchRow
	order  []string         // keys in order of first change
	append [][]decode.Value // groupAppend rows
	kbuf   []byte           // room for key's text
}

// batchPlan is the net effect of consecutive source transactions.
type batchPlan struct {
	tables map[string]*batchTable
	order  []string
	// byRel finds a change's table by its relation: a stream's relations
	// are interned (decode.Relations), so most changes find theirs here
	// without building the table's name.
	byRel map[*decode.Relation]*batchTable
	rows  int
	bytes int
	// journal records what the transaction being added changed in the
	// tables, so that undo can put the plan back (see mark).
	journal []undoEntry
}

// undoEntry is one change to a batch table: key's row replaced (prev is
// the row before), key added (prev nil; it was appended to order), or a
// row appended to append (app).
type undoEntry struct {
	bt   *batchTable
	key  string
	prev *batchRow
	app  bool
}

// planMark is a plan's size before a transaction is added.
type planMark struct {
	tables, rows, bytes int
}

// errNotBatchable says a transaction cannot join a batch; it is applied
// by the row path.
var errNotBatchable = errors.New("not batchable")

// plan returns how many of txns[i:] (none skipped) form one batch: a run
// of transactions whose changes the array statements apply exactly as
// the row path would when no row needs a conflict check. Anything else
// (TRUNCATE, a key written again after its delete or inserted twice, an
// insert then a delete of one key, a key change, an unchanged TOASTed or
// binary value, a table without a key that is not insert-only, identity
// ALWAYS columns, triggers of the table's own that fire on applied rows
// other than AFTER row ones, an update or delete of a table with those,
// a column the target lacks) ends the batch before that transaction.
func (a *Applier) plan(ctx context.Context, conn *pgx.Conn, txns []*decode.Txn) (*batchPlan, int) {
	bp := &batchPlan{tables: map[string]*batchTable{}, byRel: map[*decode.Relation]*batchTable{}}
	for n, t := range txns {
		m := bp.mark()
		if err := bp.add(ctx, a, conn, t, n); err != nil {
			bp.undo(m)
			return bp, n
		}
		if bp.rows > maxBatchRows || bp.bytes > maxBatchBytes {
			bp.undo(m)
			return bp, n
		}
	}
	return bp, len(txns)
}

// mark starts the journal of the next transaction and returns the plan's
// size before it.
func (bp *batchPlan) mark() planMark {
	bp.journal = bp.journal[:0]
	return planMark{tables: len(bp.order), rows: bp.rows, bytes: bp.bytes}
}

// undo puts the plan back as it was at m, before the transaction that
// the journal records: its changes are reverted newest first (so a key
// it added is the last of its table's order), its new tables dropped.
func (bp *batchPlan) undo(m planMark) {
	for i := len(bp.journal) - 1; i >= 0; i-- {
		e := bp.journal[i]
		switch {
		case e.app:
			e.bt.append = e.bt.append[:len(e.bt.append)-1]
		case e.prev == nil:
			delete(e.bt.rows, e.key)
			e.bt.order = e.bt.order[:len(e.bt.order)-1]
		default:
			e.bt.rows[e.key] = e.prev
		}
	}
	bp.journal = bp.journal[:0]
	if len(bp.order) > m.tables {
		for rel, bt := range bp.byRel {
			if bp.added(bt, m.tables) {
				delete(bp.byRel, rel)
			}
		}
	}
	for _, name := range bp.order[m.tables:] {
		delete(bp.tables, name)
	}
	bp.order = bp.order[:m.tables]
	bp.rows, bp.bytes = m.rows, m.bytes
}

// added reports whether bt is one of the tables the plan added after its
// first n.
func (bp *batchPlan) added(bt *batchTable, n int) bool {
	for _, name := range bp.order[n:] {
		if bp.tables[name] == bt {
			return true
		}
	}
	return false
}

// key is the text of a keyed row's key columns, or false when one is not
// a plain value. It is built in bt.kbuf, so a key costs one allocation.
func (bt *batchTable) key(vs []decode.Value) (string, bool) {
	b := bt.kbuf[:0]
	for i, col := range bt.rel.Columns {
		if !col.Key {
			continue
		}
		if i >= len(vs) || vs[i].Kind != decode.ValueText {
			return "", false
		}
		b = strconv.AppendInt(b, int64(len(vs[i].Data)), 10)
		b = append(b, ':')
		b = append(b, vs[i].Data...)
	}
	bt.kbuf = b
	return string(b), true
}

func sameColumns(a, b *decode.Relation) bool {
	if a == b {
		return true
	}
	if len(a.Columns) != len(b.Columns) || a.ReplicaIdentity != b.ReplicaIdentity {
		return false
	}
	for i := range a.Columns {
		if a.Columns[i].Name != b.Columns[i].Name || a.Columns[i].Key != b.Columns[i].Key {
			return false
		}
	}
	return true
}

// plainRow reports whether every value is text or NULL.
func plainRow(vs []decode.Value, n int) bool {
	if len(vs) != n {
		return false
	}
	for _, v := range vs {
		if v.Kind != decode.ValueText && v.Kind != decode.ValueNull {
			return false
		}
	}
	return true
}

// add adds the changes of t, the batch's transaction n (from 0), or
// returns errNotBatchable (or the error of loading a table) leaving the
// plan to be put back by the caller.
func (bp *batchPlan) add(ctx context.Context, a *Applier, conn *pgx.Conn, t *decode.Txn, n int) error {
	ts := []byte(t.CommitTime.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
	for j := range t.Changes {
		c := &t.Changes[j]
		if c.Rel == nil || (c.Op != decode.OpInsert && c.Op != decode.OpUpdate && c.Op != decode.OpDelete) {
			return errNotBatchable // TRUNCATE, and anything but rows, ends a batch
		}
		bt, err := bp.table(ctx, a, conn, c)
		if err != nil {
			return err
		}
		if bt.t.insertsOnly && c.Op != decode.OpInsert {
			return errNotBatchable // its triggers must see every version
		}
		if !bt.keyed {
			if c.Op != decode.OpInsert || c.Rel.ReplicaIdentity == decode.IdentityFull || !plainRow(c.New, len(c.Rel.Columns)) {
				return errNotBatchable
			}
			bt.append = append(bt.append, c.New)
			bp.journal = append(bp.journal, undoEntry{bt: bt, app: true})
			bp.count(c.New)
			continue
		}
		r, err := bt.change(c, ts, n, &bp.journal)
		if err != nil {
			return err
		}
		bp.count(r.vals)
	}
	return nil
}

// table returns the batch's table of change c, adding it on its first
// change, or errNotBatchable when its rows cannot be batched (or its
// columns changed within the batch).
func (bp *batchPlan) table(ctx context.Context, a *Applier, conn *pgx.Conn, c *decode.Change) (*batchTable, error) {
	if bt := bp.byRel[c.Rel]; bt != nil {
		return bt, nil
	}
	name := relName(c)
	if bt := bp.tables[name]; bt != nil {
		if !sameColumns(bt.rel, c.Rel) {
			return nil, errNotBatchable
		}
		bp.byRel[c.Rel] = bt
		return bt, nil
	}
	tg, err := a.target(ctx, conn, c.Rel, false)
	if err != nil {
		return nil, err
	}
	if tg.unbatched || len(tg.always) > 0 {
		return nil, errNotBatchable
	}
	for _, col := range c.Rel.Columns {
		if _, ok := tg.types[col.Name]; !ok {
			return nil, errNotBatchable
		}
	}
	bt := &batchTable{t: tg, rel: c.Rel, keyed: sourceKeyed(c.Rel), rows: map[string]*batchRow{}}
	bp.tables[name] = bt
	bp.order = append(bp.order, name)
	bp.byRel[c.Rel] = bt
	return bt, nil
}

// worthIt reports whether the plan's n transactions cost less as one
// batch than by rows: not when n is below its array statements (one
// per table and operation) less one. An array statement (unnest, the
// stamps, the check) costs more than row statements of the same rows,
// which the batch makes up for with the transaction control it saves
// (BEGIN, set-up, origin, COMMIT per transaction) only with enough
// transactions per statement. BenchmarkApplySmallRuns (warm round),
// server us per transaction as a batch and by rows: pairs of pgbench
// transactions (4 tables, 4 statements) 250 and 197-233, triples 167-170
// and 217, fours 137 and 217; pairs of one-row inserts 110-117 and 130.
func (bp *batchPlan) worthIt(n int) bool {
	g := 0
	for _, name := range bp.order {
		bt := bp.tables[name]
		var kinds [groupKinds]bool
		for _, r := range bt.rows {
			kinds[r.group()] = true
		}
		kinds[groupAppend] = len(bt.append) > 0
		for _, k := range kinds {
			if k {
				g++
			}
		}
	}
	return n >= g-1
}

// count adds one row with values vs to the batch's size.
func (bp *batchPlan) count(vs []decode.Value) {
	bp.rows++
	for _, v := range vs {
		bp.bytes += len(v.Data) + 8
	}
}

// change folds change c of a keyed table, of the batch's transaction txn
// committed at ts, into its key's net change and returns that, or
// errNotBatchable when the row path would decide it differently (then it
// changed nothing). What it changes it records in journal.
func (bt *batchTable) change(c *decode.Change, ts []byte, txn int, journal *[]undoEntry) (*batchRow, error) {
	var k string
	var ok bool
	switch c.Op {
	case decode.OpInsert, decode.OpUpdate:
		if c.Old != nil || !plainRow(c.New, len(c.Rel.Columns)) {
			return nil, errNotBatchable // a key change, or a value that is not plain
		}
		k, ok = bt.key(c.New)
	case decode.OpDelete:
		k, ok = bt.key(c.Old)
	default:
		return nil, errNotBatchable
	}
	if !ok {
		return nil, errNotBatchable
	}
	r := bt.rows[k]
	switch {
	case r == nil:
		r = &batchRow{first: c.Op, check: ts, txn: txn}
		bt.rows[k] = r
		bt.order = append(bt.order, k)
		*journal = append(*journal, undoEntry{bt: bt, key: k})
	case r.last == decode.OpDelete, c.Op == decode.OpInsert:
		// Written again after its delete, or inserted over a version:
		// the row path decides that.
		return nil, errNotBatchable
	case c.Op == decode.OpDelete && r.first == decode.OpInsert:
		// Inserted and deleted: the row path leaves the tombstone.
		return nil, errNotBatchable
	default:
		// A copy: the journal keeps the row as it was.
		*journal = append(*journal, undoEntry{bt: bt, key: k, prev: r})
		cp := *r
		r = &cp
		bt.rows[k] = r
	}
	r.last, r.ts = c.Op, ts
	if c.Op == decode.OpDelete {
		r.vals = c.Old
	} else {
		r.vals = c.New
	}
	return r, nil
}

// appendArrayLiteral appends vs as a PostgreSQL array literal of text
// elements: each element double-quoted, with its double quotes and
// backslashes escaped by a backslash, NULL where nulls says so.
func appendArrayLiteral(dst []byte, vs [][]byte, nulls []bool) []byte {
	dst = append(dst, '{')
	for i, v := range vs {
		if i > 0 {
			dst = append(dst, ',')
		}
		if nulls != nil && nulls[i] {
			dst = append(dst, "NULL"...)
			continue
		}
		dst = append(dst, '"')
		for len(v) > 0 {
			j := bytes.IndexAny(v, `"\`)
			if j < 0 {
				dst = append(dst, v...)
				break
			}
			dst = append(dst, v[:j]...)
			dst = append(dst, '\\', v[j])
			v = v[j+1:]
		}
		dst = append(dst, '"')
	}
	return append(dst, '}')
}

// literalSize is room for the array literal of vs without its escapes.
func literalSize(vs [][]byte) int {
	n := 2
	for _, v := range vs {
		n += len(v) + 3
	}
	return n
}

// column is one array parameter: the values of column col of rows.
func column(rows [][]decode.Value, col int) []byte {
	vs := make([][]byte, len(rows))
	nulls := make([]bool, len(rows))
	for i, r := range rows {
		if r[col].Kind == decode.ValueNull {
			nulls[i] = true
			continue
		}
		vs[i] = r[col].Data
	}
	return appendArrayLiteral(make([]byte, 0, literalSize(vs)+2*len(vs)), vs, nulls)
}

func times(ts [][]byte) []byte {
	return appendArrayLiteral(make([]byte, 0, literalSize(ts)), ts, nil)
}

// batchStatement is the array statement of one table and group kind.
type batchStatement struct {
	name, sql string
	cols      []int // the columns of the rows, one array each, in order
	withCheck bool  // then an array of the first changes' commit times
	withTS    bool  // then an array of the stamps
	// present, for a group of inserts, lists the places (from 1, "3,17")
	// of its rows whose keys have a row now; it takes the statement's
	// parameters but the last (the row count). A concurrent insert of one
	// of its keys fails the statement with a unique violation, which
	// names no row.
	present string
}

// maxNamedRows bounds the rows a failed batch statement names.
const maxNamedRows = 1000

// batchCall is one array statement of a plan with its parameter values.
type batchCall struct {
	st   *batchStatement
	args [][]byte
	// txns holds, per row of a keyed group, the batch's transaction of
	// its first change (from 0): where prism.batch_check's row points.
	txns []int
}

// statements returns the array statements of the plan with their
// parameter values, in a fixed order: per table in order of first change,
// deletes, updates, inserts (a key is in one group only).
func (bp *batchPlan) statements() ([]batchCall, error) {
	var calls []batchCall
	for _, name := range bp.order {
		bt := bp.tables[name]
		var groups [groupKinds][]*batchRow
		for _, k := range bt.order {
			r := bt.rows[k]
			groups[r.group()] = append(groups[r.group()], r)
		}
		for kind := 0; kind < groupKinds; kind++ {
			rows := make([][]decode.Value, 0, len(groups[kind]))
			var checks, stamps [][]byte
			var txns []int
			for _, r := range groups[kind] {
				rows = append(rows, r.vals)
				checks = append(checks, r.check)
				stamps = append(stamps, r.ts)
				txns = append(txns, r.txn)
			}
			if kind == groupAppend {
				rows = bt.append
			}
			if len(rows) == 0 {
				continue
			}
			st, err := bt.statement(kind)
			if err != nil {
				return nil, err
			}
			vals := make([][]byte, 0, len(st.cols)+3)
			for _, col := range st.cols {
				vals = append(vals, column(rows, col))
			}
			if st.withCheck {
				vals = append(vals, times(checks))
			}
			if st.withTS {
				vals = append(vals, times(stamps))
			}
			if kind != groupAppend {
				vals = append(vals, []byte(strconv.Itoa(len(rows))))
			}
			calls = append(calls, batchCall{st: st, args: vals, txns: txns})
		}
	}
	return calls, nil
}

// statement builds the array statement of one group kind of the table.
// Rows arrive as one typed array per column, parsed element by element
// by the column type's input function like the row path's parameters.
// A keyed group checks that every row took the way the row path takes
// without a conflict (prism.batch_check fails the batch otherwise, and
// names the rows, by their place in the arrays, that did not: only then
// are they looked up), and records the stamps of its rows in
// prism.batch_stamps (one row with two arrays) in the same statement.
func (bt *batchTable) statement(kind int) (*batchStatement, error) {
	key := batchStatementKey{rel: bt.rel, kind: kind}
	bt.t.batchMu.Lock()
	st := bt.t.batchStatements[key]
	bt.t.batchMu.Unlock()
	if st != nil {
		return st, nil
	}
	st, err := bt.build(kind)
	if err != nil {
		return nil, err
	}
	bt.t.batchMu.Lock()
	if bt.t.batchStatements == nil || len(bt.t.batchStatements) >= maxBatchStatements {
		bt.t.batchStatements = map[batchStatementKey]*batchStatement{}
	}
	bt.t.batchStatements[key] = st
	bt.t.batchMu.Unlock()
	return st, nil
}

// batchStatementKey names an array statement of a target: the relation
// of its changes (interned, never mutated) and its group kind. Every
// batch of a stream uses the same few.
type batchStatementKey struct {
	rel  *decode.Relation
	kind int
}

// maxBatchStatements bounds a target's statements: a stream that
// reconnects interns its relations again, and the old ones are then
// never asked for.
const maxBatchStatements = 64

// build builds the array statement of one group kind of the table (see
// statement).
func (bt *batchTable) build(kind int) (*batchStatement, error) {
	b := &builder{t: bt.t, rel: bt.rel, keys: matchKey(bt.t, bt.rel), index: map[paramRef]int{}}
	st := &batchStatement{cols: bt.groupColumns(b, kind)}
	st.withCheck = kind == groupUpdate || kind == groupDelete
	st.withTS = kind != groupAppend
	src := bt.unnest(st)
	tbl := lit(bt.t.meta)
	if kind == groupAppend {
		st.sql = "INSERT INTO " + bt.t.ident + " (" + strings.Join(src.names, ", ") + ") SELECT " + strings.Join(src.exprs, ", ") + " FROM " + src.v
		return st.named(), nil
	}
	k := bt.batchKeys(b, src)
	w, stampFrom := bt.write(b, kind, src, k)
	sts := "v.sts"
	if stampFrom == "w" {
		sts = "w.sts"
	}
	// The stamp's xact is the transaction's: the row version's xmin, and
	// for a delete the xmin of the tombstone prism_tombstone writes.
	marks := ""
	if kind == groupInsert {
		st.present = "SELECT array_to_string(array_agg(v.ord ORDER BY v.ord), ',') FROM " + src.ordinal +
			" WHERE EXISTS (SELECT 1 FROM " + bt.t.ident + " AS y WHERE " + bt.shown(k, src) + ")"
		// The inserted keys' marks (prism.key_marks), as the row path's.
		marks = ", m AS (INSERT INTO prism.key_marks (h) SELECT prism.mark_hash(" + tbl + ", " + k.json(k.vals) + ") FROM w" +
			" ON CONFLICT (h) DO UPDATE SET at = EXCLUDED.at)"
	}
	want := "$" + strconv.Itoa(src.n+1) + "::bigint"
	missed := "(SELECT array_agg(m.ord) FROM (SELECT v.ord FROM " + src.ordinal + " WHERE NOT EXISTS (SELECT 1 FROM w WHERE " + strings.Join(k.joinW, " AND ") +
		") ORDER BY v.ord LIMIT " + strconv.Itoa(maxNamedRows) + ") m)"
	st.sql = "WITH w AS (" + w + "), s AS (INSERT INTO prism.batch_stamps (xact, table_name, newest, keys, ts) SELECT xid(pg_catalog.pg_current_xact_id()), " +
		tbl + ", max(" + sts + "), array_agg(" + k.json(k.vals) + "::text), array_agg(" + sts + ") FROM " + stampFrom + " HAVING count(*) > 0)" + marks +
		" SELECT prism.batch_check(" + tbl + ", c.n, " + want + ", CASE WHEN c.n <> " + want + " THEN " + missed + " END) FROM (SELECT count(*) AS n FROM w) c"
	return st.named(), nil
}

// groupColumns returns the columns a group kind's statement takes, one
// array each: the key columns of a delete, the writable columns
// otherwise.
func (bt *batchTable) groupColumns(b *builder, kind int) []int {
	if kind == groupDelete {
		return b.keyCols()
	}
	cols := make([]int, len(bt.rel.Columns))
	for i := range cols {
		cols[i] = i
	}
	return b.writable(cols)
}

// batchSource is the row source of an array statement: v, the unnest of
// its array parameters, and the expressions for its columns.
type batchSource struct {
	v string // (SELECT * FROM unnest($1::type[], ...) AS v(...)) AS v
	// ordinal is v with the column ord, each row's position (from 1).
	ordinal string
	cols    []int          // the statement's columns (st.cols)
	n       int            // parameters taken, the row count's is n+1
	vcol    map[int]string // column -> v.v<i>
	names   []string       // the quoted column names of st.cols
	exprs   []string       // their values, v.v<i>
}

// unnest builds the row source of st: one typed array parameter per
// column, then the first changes' commit times and the stamps when st
// takes them.
func (bt *batchTable) unnest(st *batchStatement) batchSource {
	cols := st.cols
	params := make([]string, 0, len(cols)+2)
	alias := make([]string, 0, len(cols)+2)
	src := batchSource{cols: cols, vcol: map[int]string{}, n: len(cols)}
	for i, c := range cols {
		params = append(params, "$"+strconv.Itoa(i+1)+"::"+bt.t.types[bt.rel.Columns[c].Name]+"[]")
		alias = append(alias, "v"+strconv.Itoa(i))
		src.vcol[c] = "v.v" + strconv.Itoa(i)
	}
	if st.withCheck {
		src.n++
		params = append(params, "$"+strconv.Itoa(src.n)+"::timestamptz[]")
		alias = append(alias, "cts")
	}
	if st.withTS {
		src.n++
		params = append(params, "$"+strconv.Itoa(src.n)+"::timestamptz[]")
		alias = append(alias, "sts")
	}
	src.v = "(SELECT * FROM unnest(" + strings.Join(params, ", ") + ") AS v(" + strings.Join(alias, ", ") + ")) AS v"
	src.ordinal = "(SELECT * FROM unnest(" + strings.Join(params, ", ") + ") WITH ORDINALITY AS v(" + strings.Join(alias, ", ") + ", ord)) AS v"
	src.names = make([]string, len(cols))
	src.exprs = make([]string, len(cols))
	for i, c := range cols {
		src.names[i] = quote(bt.rel.Columns[c].Name)
		src.exprs[i] = src.vcol[c]
	}
	return src
}

// batchKeyExprs are the expressions over a keyed table's match key that
// an array statement needs.
type batchKeyExprs struct {
	cols  []int
	match []string // x.k = v.vi: the row of a change
	ret   []string // x.k AS ki: what the write returns
	names []string // the key column names, as literals
	vals  []string // w.ki::text: the written keys' values
	joinW []string // w.ki = v.vi: a written key's change
	tomb  []string // v.vi::text: a change's key values
}

func (bt *batchTable) batchKeys(b *builder, src batchSource) batchKeyExprs {
	keys := b.keyCols()
	k := batchKeyExprs{cols: keys, match: make([]string, len(keys)), ret: make([]string, len(keys)), names: make([]string, len(keys)),
		vals: make([]string, len(keys)), joinW: make([]string, len(keys)), tomb: make([]string, len(keys))}
	for i, c := range keys {
		q := quote(bt.rel.Columns[c].Name)
		k.match[i] = "x." + q + " = " + src.vcol[c]
		k.ret[i] = "x." + q + " AS k" + strconv.Itoa(i)
		k.names[i] = lit(bt.rel.Columns[c].Name)
		k.vals[i] = "w.k" + strconv.Itoa(i) + "::text"
		k.joinW[i] = "w.k" + strconv.Itoa(i) + " = " + src.vcol[c]
		k.tomb[i] = src.vcol[c] + "::text"
	}
	return k
}

// shown is the condition that row y of the table has the key of change v.
func (bt *batchTable) shown(k batchKeyExprs, src batchSource) string {
	conds := make([]string, len(k.cols))
	for i, c := range k.cols {
		conds[i] = "y." + quote(bt.rel.Columns[c].Name) + " = " + src.vcol[c]
	}
	return strings.Join(conds, " AND ")
}

// json is the key as prism.tombstones and prism.batch_stamps hold it.
func (k batchKeyExprs) json(vals []string) string {
	return "jsonb_object(ARRAY[" + strings.Join(k.names, ", ") + "]::text[], ARRAY[" + strings.Join(vals, ", ") + "]::text[])"
}

// write is the data-modifying statement of a keyed group kind, and what
// the stamps are recorded from: w (the written rows with their stamps)
// or w joined to the changes.
func (bt *batchTable) write(b *builder, kind int, src batchSource, k batchKeyExprs) (w, stampFrom string) {
	// The row path's cheap test: the local version is older than the
	// change (or its commit time is unknown) and has no clock floor.
	cheap := stampedBefore("x", "v.cts")
	switch kind {
	case groupInsert:
		// A key with a row or a tombstone is not inserted: the row path
		// decides it (insert_exists, prism.admit). That includes a row the
		// snapshot shows that a local transaction deleted since (the row
		// path then fails on its lock and applies the transaction again
		// on fresh data). A row the snapshot does not show, committed or
		// being written by a concurrent transaction, fails the INSERT
		// with a unique violation and the batch with it, which the row
		// path then decides: no ON CONFLICT, whose speculative insertion
		// costs every row an index probe more and two more WAL records'
		// worth of work.
		// OFFSET 0 keeps each test a probe of the key's index per row: as
		// an anti join the planner may hash the whole table (or every
		// tombstone) for each batch, which it costs below a probe per
		// row whose cached pages it counts as random reads.
		w = "INSERT INTO " + bt.t.ident + " AS x (" + strings.Join(src.names, ", ") + ") SELECT " + strings.Join(src.exprs, ", ") + " FROM " + src.v +
			" WHERE NOT EXISTS (SELECT 1 FROM prism.tombstones tb WHERE tb.table_name = " + lit(bt.t.meta) + " AND tb.key = " + k.json(k.tomb) + " OFFSET 0)" +
			" AND NOT EXISTS (SELECT 1 FROM " + bt.t.ident + " AS y WHERE " + bt.shown(k, src) + " OFFSET 0)" +
			" RETURNING " + strings.Join(k.ret, ", ")
		return w, "w JOIN " + src.v + " ON " + strings.Join(k.joinW, " AND ")
	case groupUpdate:
		sets := make([]string, len(src.names))
		for i, c := range src.cols {
			sets[i] = src.names[i] + " = " + src.vcol[c]
		}
		w = "UPDATE " + bt.t.ident + " AS x SET " + strings.Join(sets, ", ") + " FROM " + src.v +
			" WHERE " + strings.Join(k.match, " AND ") + " AND " + cheap + " RETURNING " + strings.Join(k.ret, ", ") + ", v.sts"
	case groupDelete:
		w = "DELETE FROM " + bt.t.ident + " AS x USING " + src.v +
			" WHERE " + strings.Join(k.match, " AND ") + " AND " + cheap + " RETURNING " + strings.Join(k.ret, ", ") + ", v.sts"
	}
	return w, "w"
}

func (st *batchStatement) named() *batchStatement {
	sum := sha256.Sum256([]byte(st.sql))
	st.name = "prism_b" + hex.EncodeToString(sum[:12])
	return st
}

// batched reports whether err is prism.batch_check's: a row of the batch
// needs the row path.
func batched(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "PR002"
}

// batch applies txns[i:end] (more than one, none skipped, nothing queued
// before them) in one target transaction: the origin set up with the
// last one's end LSN and the greatest commit time among them, the array
// statements of bp, COMMIT and a barrier. It returns true once that is
// durable. When the batch fails (a row that needs the row path, any
// error of a statement or of COMMIT) it is rolled back and it returns
// false, and whether a row needed the row path or a concurrent write
// failed it (conflict): the caller applies the transactions one by one,
// which pins a failure on exactly one of them. When prism.batch_check
// named the rows that need the row path, named holds the transactions of
// their first changes (indexes into txns, in order): the others may form
// batches again. A broken connection or a failed barrier is an error
// about txns[i], as in send.
func (p *pipeline) batch(ctx context.Context, i, end int, bp *batchPlan) (ok, conflict bool, named []int, err error) {
	calls, serr := bp.statements()
	if serr != nil {
		return false, false, nil, nil
	}
	conn := p.s.conn.Conn()
	pc := conn.PgConn()
	sds := make([]*pgconn.StatementDescription, len(calls))
	for k, call := range calls {
		if sds[k], err = conn.Prepare(ctx, call.st.name, call.st.sql); err != nil {
			if pc.IsClosed() {
				p.s.broken = true
				return false, false, nil, p.lost(err)
			}
			p.a.log.Debug().Err(err).Msg("batch statement not prepared; applying by rows")
			return false, false, nil, nil
		}
	}
	last := p.txns[end-1]
	commit := last.CommitTime
	for _, t := range p.txns[i:end] {
		if t.CommitTime.After(commit) {
			commit = t.CommitTime
		}
	}
	ts := []byte(commit.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
	b := &pgconn.Batch{}
	b.ExecStatement(p.begin, nil, nil, nil)
	lsn := lsnText(last.EndLSN)
	b.ExecStatement(p.batchSetup, [][]byte{lsn, ts, []byte(last.Origin), []byte(p.a.local)}, nil, nil)
	for k, call := range calls {
		b.ExecStatement(sds[k], call.args, nil, nil)
	}
	b.ExecStatement(p.immediate, nil, nil, nil)
	b.ExecStatement(p.origin, [][]byte{lsn, ts}, nil, nil)
	b.ExecStatement(p.commit, nil, nil, nil)
	if p.barrier != nil {
		b.ExecStatement(p.barrier, nil, nil, nil)
	}
	mrr := pc.ExecBatch(ctx, b)
	if end == len(p.txns) && p.a.testAfterSend != nil {
		p.a.testAfterSend(pc.PID())
	}
	res, err := mrr.ReadAll()
	failed := len(res)
	for k, r := range res {
		if r.Err != nil {
			failed, err = k, r.Err
			break
		}
	}
	if err == nil {
		p.durable(end-1, true)
		return true, false, nil, nil
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pc.IsClosed() {
		p.s.broken = true
		return false, false, nil, p.lost(err)
	}
	if failed > 4+len(calls) {
		// COMMIT succeeded, the barrier failed: not known durable.
		return false, false, nil, p.lost(err)
	}
	if rollback(pc) != "" {
		if _, rerr := pc.Exec(ctx, "ROLLBACK").ReadAll(); rerr != nil {
			if !errors.As(rerr, &pgErr) || pc.IsClosed() {
				p.s.broken = true
			}
			return false, false, nil, p.lost(rerr)
		}
	}
	conflict = batched(err) || concurrentState(pgErr.Code)
	if failed >= 2 && failed < 2+len(calls) {
		call := calls[failed-2]
		switch {
		case batched(err):
			named = namedTxns(pgErr.Detail, call.txns, i)
		case pgErr.Code == "23505" && call.st.present != "":
			// A key inserted concurrently (committed after the batch's
			// snapshot): the rows whose keys have a row now are the ones
			// to decide.
			conflict = true
			res := pc.ExecParams(ctx, call.st.present, call.args[:len(call.args)-1], nil, nil, nil).Read()
			switch {
			case res.Err != nil && pc.IsClosed():
				p.s.broken = true
				return false, false, nil, p.lost(res.Err)
			case res.Err != nil:
				p.a.log.Debug().Err(res.Err).Msg("rows of a batch's inserts not named")
			case len(res.Rows) == 1 && res.Rows[0][0] != nil:
				named = namedTxns("rows "+string(res.Rows[0][0]), call.txns, i)
			}
		}
	}
	p.a.count(p.s.source, func(st *Stats) { st.RolledBack++ })
	p.a.log.Debug().Err(err).Bool("conflict", conflict).Int("txns", end-i).Int("named", len(named)).Msg("batch rolled back")
	return false, conflict, named, nil
}

// namedTxns returns the transactions (from i on, in order, each once)
// of the rows that prism.batch_check's detail names ("rows 3,17": places
// from 1 in a statement whose rows' transactions, from 0, are txns), or
// nil when the detail names none or a place that is not there.
func namedTxns(detail string, txns []int, i int) []int {
	list, ok := strings.CutPrefix(detail, "rows ")
	if !ok {
		return nil
	}
	var named []int
	for _, f := range strings.Split(list, ",") {
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > len(txns) {
			return nil
		}
		named = append(named, i+txns[n-1])
	}
	slices.Sort(named)
	return slices.Compact(named)
}

// sourceKeyed reports whether rel's rows carry a key of the source's
// (not REPLICA IDENTITY FULL): only such rows can be collapsed by key in a
// batch. Rows of a FULL table, whose match key is the target's (matchKey),
// go through the row path.
func sourceKeyed(rel *decode.Relation) bool {
	if rel.ReplicaIdentity == decode.IdentityFull {
		return false
	}
	for _, col := range rel.Columns {
		if col.Key {
			return true
		}
	}
	return false
}
