package scope

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"sync"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Rules is what one target region may receive, as configured under
// peers[].scope. Tables are "schema.table".
type Rules struct {
	// ExcludeTables are never shipped to the region.
	ExcludeTables []string
	// Rows maps a table to its row filter: only rows that satisfy it are
	// shipped.
	Rows map[string]string
	// ExcludeColumns maps a table to columns whose values are never
	// shipped; the region keeps its own default or value.
	ExcludeColumns map[string][]string
}

// Scope is one target region's scope, ready to filter transactions. A nil
// *Scope lets everything through. Its methods are safe for concurrent use.
type Scope struct {
	excluded map[string]bool
	rows     map[string]*Expr
	cols     map[string][]string

	// oids maps the source OIDs of the tables the rules name to those
	// names (Resolve): the rules follow a table renamed while the node
	// runs.
	oids     map[uint32]string
	onRename func(configured, now string)

	mu   sync.Mutex
	rels map[*decode.Relation]*relScope
}

// resolveSQL lists the OIDs of the named tables ($1, "schema.table" each)
// that exist.
const resolveSQL = `SELECT n.name, c.oid::int8 FROM unnest($1::text[]) AS n(name)
	JOIN pg_catalog.pg_class c ON c.oid = to_regclass(n.name)`

// Resolve records the OIDs that the tables the rules name have in the
// source database q, so that a table renamed later (ALTER TABLE ... RENAME
// TO or SET SCHEMA) keeps its scope under its new name: pgoutput names a
// relation as it is named when the change was made, and a rule matched
// only by name would let the renamed table's rows through. onRename (may
// be nil) is called the first time a relation meets a rule by its OID
// under a name other than the rule's.
func (s *Scope) Resolve(ctx context.Context, q Querier, onRename func(configured, now string)) error {
	if s == nil {
		return nil
	}
	names := s.Tables()
	idents := make([]string, len(names))
	for i, n := range names {
		idents[i] = Ident(n)
	}
	rows, err := q.Query(ctx, resolveSQL, idents)
	if err != nil {
		return fmt.Errorf("resolve the scope's tables: %w", err)
	}
	defer rows.Close()
	oids := map[uint32]string{}
	for rows.Next() {
		var ident string
		var oid int64
		if err := rows.Scan(&ident, &oid); err != nil {
			return fmt.Errorf("resolve the scope's tables: %w", err)
		}
		oids[uint32(oid)] = names[slices.Index(idents, ident)]
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("resolve the scope's tables: %w", err)
	}
	s.mu.Lock()
	s.oids, s.onRename = oids, onRename
	clear(s.rels)
	s.mu.Unlock()
	return nil
}

// maxCachedRels bounds the per-relation cache: spilled transactions decode
// fresh Relation values each time they are read.
const maxCachedRels = 4096

// New parses r; a row filter that does not parse is an error naming its
// table. It returns nil for empty rules.
func New(r Rules) (*Scope, error) {
	if len(r.ExcludeTables) == 0 && len(r.Rows) == 0 && len(r.ExcludeColumns) == 0 {
		return nil, nil
	}
	s := &Scope{excluded: map[string]bool{}, rows: map[string]*Expr{}, cols: map[string][]string{}, rels: map[*decode.Relation]*relScope{}}
	for _, t := range r.ExcludeTables {
		s.excluded[t] = true
	}
	for t, src := range r.Rows {
		e, err := Parse(src)
		if err != nil {
			return nil, fmt.Errorf("row filter of %s: %w", t, err)
		}
		s.rows[t] = e
	}
	for t, cols := range r.ExcludeColumns {
		s.cols[t] = slices.Clone(cols)
	}
	return s, nil
}

// Excludes reports whether the table is never shipped.
func (s *Scope) Excludes(table string) bool { return s != nil && s.excluded[table] }

// Filter returns the table's row filter, or nil.
func (s *Scope) Filter(table string) *Expr {
	if s == nil {
		return nil
	}
	return s.rows[table]
}

// ExcludedColumns returns the table's excluded columns, or nil.
func (s *Scope) ExcludedColumns(table string) []string {
	if s == nil {
		return nil
	}
	return slices.Clone(s.cols[table])
}

// Tables lists every table the scope names, sorted.
func (s *Scope) Tables() []string {
	if s == nil {
		return nil
	}
	seen := map[string]bool{}
	for t := range s.excluded {
		seen[t] = true
	}
	for t := range s.rows {
		seen[t] = true
	}
	for t := range s.cols {
		seen[t] = true
	}
	out := make([]string, 0, len(seen))
	for t := range seen {
		out = append(out, t)
	}
	sort.Strings(out)
	return out
}

// relScope is how the scope treats one source relation.
type relScope struct {
	drop bool
	rel  *decode.Relation // as shipped: without the excluded columns
	keep []int            // source column indexes shipped; nil keeps all
	pred *Pred            // row filter bound to the source columns; nil passes every row
	full bool             // REPLICA IDENTITY FULL: old rows are complete
	err  error
}

func (s *Scope) relation(rel *decode.Relation) *relScope {
	s.mu.Lock()
	defer s.mu.Unlock()
	if rs, ok := s.rels[rel]; ok {
		return rs
	}
	if len(s.rels) >= maxCachedRels {
		clear(s.rels)
	}
	rs := s.build(rel)
	s.rels[rel] = rs
	return rs
}

func (s *Scope) build(rel *decode.Relation) *relScope {
	name := rel.Schema + "." + rel.Table
	rs := &relScope{rel: rel, full: rel.ReplicaIdentity == decode.IdentityFull}
	if configured, ok := s.oids[rel.ID]; ok && configured != name {
		// Renamed since the node started: the rules of its configured
		// name are its own. A rule of its new name as well would leave
		// the choice to chance: stop instead.
		if s.ruled(name) {
			rs.err = fmt.Errorf("table %s was renamed from %s, and the scope has rules for both names: fix peers[].scope (it must name the table by its name now) and restart", name, configured)
			return rs
		}
		if s.onRename != nil {
			s.onRename(configured, name)
		}
		name = configured
	}
	if s.excluded[name] {
		rs.drop = true
		return rs
	}
	if e := s.rows[name]; e != nil {
		cols := make([]Column, len(rel.Columns))
		for i, c := range rel.Columns {
			cols[i] = Column{Name: c.Name, TypeOID: c.TypeOID}
		}
		p, err := e.Bind(cols)
		if err != nil {
			rs.err = fmt.Errorf("row filter of %s: %w", name, err)
			return rs
		}
		if !rs.full {
			for _, i := range p.Uses() {
				if !rel.Columns[i].Key {
					rs.err = fmt.Errorf("row filter of %s reads column %q, which is not in the replica identity: a DELETE or UPDATE does not carry it; add it to the key or set REPLICA IDENTITY FULL", name, rel.Columns[i].Name)
					return rs
				}
			}
		}
		rs.pred = p
	}
	if ex := s.cols[name]; len(ex) > 0 {
		out := &decode.Relation{ID: rel.ID, Schema: rel.Schema, Table: rel.Table, ReplicaIdentity: rel.ReplicaIdentity}
		for i, c := range rel.Columns {
			if slices.Contains(ex, c.Name) {
				if c.Key && !rs.full {
					rs.err = fmt.Errorf("scope of %s excludes column %q, which is in the replica identity: the region could not find rows", name, c.Name)
					return rs
				}
				continue
			}
			rs.keep = append(rs.keep, i)
			out.Columns = append(out.Columns, c)
		}
		if rs.keep != nil && len(rs.keep) < len(rel.Columns) {
			rs.rel = out
		} else {
			rs.keep = nil
		}
	}
	return rs
}

// ruled reports whether any rule names table.
func (s *Scope) ruled(table string) bool {
	return s.excluded[table] || s.rows[table] != nil || len(s.cols[table]) > 0
}

func (rs *relScope) affects() bool {
	return rs.drop || rs.pred != nil || rs.keep != nil || rs.err != nil
}

// project returns the shipped columns of a row.
func (rs *relScope) project(row []decode.Value) []decode.Value {
	if row == nil || rs.keep == nil {
		return row
	}
	out := make([]decode.Value, 0, len(rs.keep))
	for _, i := range rs.keep {
		if i < len(row) {
			out = append(out, row[i])
		}
	}
	return out
}

func (rs *relScope) in(row []decode.Value) (bool, error) {
	return rs.pred.Eval(func(i int) ([]byte, bool, bool) {
		if i >= len(row) {
			return nil, false, false
		}
		switch row[i].Kind {
		case decode.ValueNull:
			return nil, true, true
		case decode.ValueText:
			return row[i].Data, false, true
		}
		return nil, false, false
	})
}

// Txn returns txn as the target region may receive it: excluded tables,
// rows outside the filters and excluded columns removed, and UPDATEs that
// move a row into or out of the scope turned into an INSERT or a DELETE.
// txn itself is not changed (other regions share it). A transaction left
// without changes keeps its LSNs, so the region's progress still passes
// it. A spilled transaction is filtered chunk by chunk as it is read.
func (s *Scope) Txn(txn *decode.Txn) (*decode.Txn, error) {
	if s == nil {
		return txn, nil
	}
	out := *txn
	if txn.Spill != nil {
		v, err := txn.Spill.Filtered(s.Changes)
		if err != nil {
			return nil, fmt.Errorf("scope %s/%s: %w", txn.Origin, txn.EndLSN, err)
		}
		if v.Count() == 0 {
			out.Spill = nil
			out.Changes = nil
		} else {
			out.Spill = v
		}
		return &out, nil
	}
	changes, err := s.Changes(txn.Changes)
	if err != nil {
		return nil, fmt.Errorf("scope %s/%s: %w", txn.Origin, txn.EndLSN, err)
	}
	out.Changes = changes
	return &out, nil
}

// Changes filters a sequence of changes (see Txn). It returns cs itself
// when the scope touches none of them, else a new slice; cs is never
// modified.
func (s *Scope) Changes(cs []decode.Change) ([]decode.Change, error) {
	if s == nil {
		return cs, nil
	}
	touched := false
	for i := range cs {
		if s.touches(&cs[i]) {
			touched = true
			break
		}
	}
	if !touched {
		return cs, nil
	}
	out := make([]decode.Change, 0, len(cs))
	for i := range cs {
		var err error
		if out, err = s.change(&cs[i], out); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func (s *Scope) touches(c *decode.Change) bool {
	if c.Op == decode.OpTruncate {
		for _, r := range c.Truncated {
			if s.relation(r).affects() {
				return true
			}
		}
		return false
	}
	return c.Rel != nil && s.relation(c.Rel).affects()
}

// change appends what the target receives of c to out.
func (s *Scope) change(c *decode.Change, out []decode.Change) ([]decode.Change, error) {
	if c.Op == decode.OpTruncate {
		t := *c
		t.Truncated = nil
		for _, r := range c.Truncated {
			rs := s.relation(r)
			if rs.err != nil {
				return nil, rs.err
			}
			if rs.drop {
				continue
			}
			t.Truncated = append(t.Truncated, rs.rel)
		}
		if len(t.Truncated) == 0 {
			return out, nil
		}
		t.Rel = t.Truncated[0]
		return append(out, t), nil
	}
	if c.Rel == nil {
		return append(out, *c), nil
	}
	rs := s.relation(c.Rel)
	if rs.err != nil {
		return nil, rs.err
	}
	if rs.drop {
		return out, nil
	}
	op, old, nw, err := rs.transition(c)
	if err != nil {
		return nil, fmt.Errorf("%s on %s.%s: %w", c.Op, c.Rel.Schema, c.Rel.Table, err)
	}
	if op == 0 {
		return out, nil
	}
	return append(out, decode.Change{Op: op, Rel: rs.rel, Old: rs.project(old), New: rs.project(nw)}), nil
}

// transition decides what the target receives of one row change, before
// projection: the operation (0 for nothing) and its old and new rows.
//
//	INSERT: shipped when the new row is in scope.
//	DELETE: shipped when the old row is in scope.
//	UPDATE: old in, new in   -> UPDATE
//	        old out, new in  -> INSERT of the whole new row
//	        old in, new out  -> DELETE of the old row
//	        old out, new out -> nothing
//
// An UPDATE without an old row did not change the key, so its old row is
// in scope when its new row is (the filter reads only key columns unless
// the table has REPLICA IDENTITY FULL, which always sends the old row).
// With REPLICA IDENTITY FULL an unchanged TOASTed value of the new row is
// taken from the old row, which is complete.
func (rs *relScope) transition(c *decode.Change) (decode.Op, []decode.Value, []decode.Value, error) {
	if rs.pred == nil {
		return c.Op, c.Old, c.New, nil
	}
	switch c.Op {
	case decode.OpInsert:
		in, err := rs.in(c.New)
		if err != nil || !in {
			return 0, nil, nil, err
		}
		return c.Op, c.Old, c.New, nil
	case decode.OpDelete:
		in, err := rs.in(c.Old)
		if err != nil || !in {
			return 0, nil, nil, err
		}
		return c.Op, c.Old, c.New, nil
	case decode.OpUpdate:
		nw := c.New
		if rs.full && c.Old != nil {
			nw = fillUnchanged(c.New, c.Old)
		}
		newIn, err := rs.in(nw)
		if err != nil {
			return 0, nil, nil, err
		}
		oldIn := newIn
		if c.Old != nil {
			if oldIn, err = rs.in(c.Old); err != nil {
				return 0, nil, nil, err
			}
		}
		switch {
		case oldIn && newIn:
			return decode.OpUpdate, c.Old, c.New, nil
		case newIn:
			return decode.OpInsert, nil, nw, nil
		case oldIn: // c.Old is set: without it oldIn == newIn
			return decode.OpDelete, c.Old, nil, nil
		}
		return 0, nil, nil, nil
	}
	return c.Op, c.Old, c.New, nil
}

// fillUnchanged returns row with its unchanged values taken from old.
func fillUnchanged(row, old []decode.Value) []decode.Value {
	var out []decode.Value
	for i, v := range row {
		if v.Kind == decode.ValueUnchanged && i < len(old) && old[i].Kind != decode.ValueUnchanged {
			if out == nil {
				out = slices.Clone(row)
			}
			out[i] = old[i]
		}
	}
	if out == nil {
		return row
	}
	return out
}
