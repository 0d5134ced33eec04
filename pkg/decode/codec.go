package decode

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pglogrepl"
)

// The binary encoding of a Txn and of its changes, the one form in which a
// change leaves memory: peer protocol frames carry it, spill files and the
// spool store it. All integers are big-endian.
//
//	txn:      header, changes
//	header:   origin string, xid u32, commit LSN u64, end LSN u64,
//	          commit time flag u8 (0: zero time, then 0 u64; 1: set),
//	          commit time u64 (Unix nanoseconds)
//	changes:  u32 count of the relations defined here, each: id u32,
//	          schema string, table string, replica identity u8, u32 column
//	          count, each column: name string, type oid u32, type name
//	          string, typmod u32, key u8 (0 or 1);
//	          then u32 change count, each change: op u8, relation index
//	          u32 (^0: none), old row, new row, u32 truncated count and
//	          their relation indexes, truncate flags u8
//	row:      u8 0 (nil) or 1, u32 value count, each value: kind u8 and,
//	          for text and binary values, u32 length and the bytes
//	string:   u32 length and the bytes
//
// A DDL change (op 5) has no relation, no old row and no truncate data;
// its new row holds three text values: the command, the search_path and
// the role (see DDL). Encodings of the other ops are unchanged by it.
//
// Relations are numbered in order of definition and defined in order of
// first use, each once. A changes block stands alone (its relations are
// numbered from 0) except in a spill file, where numbering runs over the
// whole file and a chunk defines only the relations that earlier chunks
// did not.

// MaxEncodedSize is the largest encoded transaction (or block of changes)
// a reader takes in one piece: the peer protocol's default frame limit and
// the spool's record limit. A larger transaction is streamed in chunks.
const MaxEncodedSize = 64 << 20

// noRelation is the relation index of a change without a relation.
const noRelation = ^uint32(0)

// Minimum encoded sizes, for bounding counts before allocation.
const (
	minRelation = 4 + 4 + 4 + 1 + 4
	minColumn   = 4 + 4 + 4 + 4 + 1
	minChange   = 1 + 4 + 1 + 1 + 4 + 1
	minValue    = 1
)

// AppendTxn appends the encoding of t (header, then changes) to b. A
// spilled transaction has no changes in memory to encode: it is an error,
// and so is a nil t; b is returned unchanged then.
func AppendTxn(b []byte, t *Txn) ([]byte, error) {
	if t == nil {
		return b, errors.New("encode txn: nil")
	}
	if t.Spill != nil {
		return b, errors.New("encode txn: changes are spilled; stream it")
	}
	return AppendChanges(AppendTxnHeader(b, t), t.Changes), nil
}

// ParseTxn parses a transaction AppendTxn encoded at the start of p and
// returns it and the bytes after it. It checks every length and every
// change (see AppendChanges) and never panics; the Txn does not share
// memory with p.
func ParseTxn(p []byte) (*Txn, []byte, error) {
	return (*Relations)(nil).ParseTxn(p)
}

// Relations interns the relations that parsed changes define: a relation
// defined again with the same encoding (every transaction of a stream
// defines the relations it uses) is the *Relation parsed the first time,
// shared and never mutated, so it is neither allocated nor parsed again.
// A Relations is not safe for concurrent use; the zero value is ready, and
// a nil *Relations interns nothing.
type Relations struct {
	m map[string]*Relation
	// arena holds the parsed transactions' values (see arena): a region's
	// server parses one stream's transactions on one goroutine.
	arena arena
}

// maxInterned bounds a Relations: when it is full, it starts over.
const maxInterned = 4096

// arenaOf is rs's arena; none for a nil rs (the package's ParseTxn).
func (rs *Relations) arenaOf() *arena {
	if rs == nil {
		return nil
	}
	return &rs.arena
}

// ParseTxn is the package's ParseTxn, with the relations interned in rs.
func (rs *Relations) ParseTxn(p []byte) (*Txn, []byte, error) {
	r := &buf{b: p, interned: rs, arena: rs.arenaOf()}
	t := r.txnHeader()
	r.own() // one copy for every value
	t.Changes, _ = r.changes(nil)
	if r.err != nil {
		return nil, p, r.err
	}
	return t, p[len(p)-len(r.b):], nil
}

// ParseChanges is the package's ParseChanges, with the relations interned
// in rs.
func (rs *Relations) ParseChanges(p []byte) ([]Change, []byte, error) {
	r := &buf{b: p, interned: rs, arena: rs.arenaOf()}
	r.own() // one copy for every value
	changes, _ := r.changes(nil)
	if r.err != nil {
		return nil, p, r.err
	}
	return changes, p[len(p)-len(r.b):], nil
}

// relationLen returns the length of the relation encoded at the start of
// b, or -1 when b does not hold a whole one.
func relationLen(b []byte) int {
	p := uint64(0)
	n := uint64(len(b))
	u32 := func() uint64 {
		if p+4 > n {
			p = n + 1
			return 0
		}
		v := uint64(binary.BigEndian.Uint32(b[p:]))
		p += 4
		return v
	}
	str := func() { p += u32() }
	u32()  // id
	str()  // schema
	str()  // table
	p += 1 // replica identity
	cols := u32()
	if p > n || cols*minColumn > n-p {
		return -1
	}
	for range cols {
		str()  // name
		u32()  // type oid
		str()  // type name
		u32()  // typmod
		p += 1 // key
		if p > n {
			return -1
		}
	}
	return int(p)
}

// AppendTxnHeader appends the encoding of t's header fields (everything
// but the changes) to b.
func AppendTxnHeader(b []byte, t *Txn) []byte {
	b = appendString(b, t.Origin)
	b = binary.BigEndian.AppendUint32(b, t.Xid)
	b = binary.BigEndian.AppendUint64(b, uint64(t.CommitLSN))
	b = binary.BigEndian.AppendUint64(b, uint64(t.EndLSN))
	if t.CommitTime.IsZero() {
		b = append(b, 0)
		return binary.BigEndian.AppendUint64(b, 0)
	}
	b = append(b, 1)
	return binary.BigEndian.AppendUint64(b, uint64(t.CommitTime.UnixNano()))
}

// ParseTxnHeader parses what AppendTxnHeader wrote at the start of p and
// returns a Txn without changes and the bytes after it.
func ParseTxnHeader(p []byte) (*Txn, []byte, error) {
	r := &buf{b: p}
	t := r.txnHeader()
	if r.err != nil {
		return nil, p, r.err
	}
	return t, r.b, nil
}

// AppendChanges appends the encoding of changes, with the relations they
// use, to b.
func AppendChanges(b []byte, changes []Change) []byte {
	return appendChanges(b, changes, map[*Relation]uint32{})
}

// ParseChanges parses what AppendChanges wrote at the start of p and
// returns the changes (nil for none) and the bytes after them. Every
// change is checked as appliers need it: a known op, a relation, rows as
// long as the relation's columns, truncate data only on a TRUNCATE, and no
// rows on one. Changes share the Relations they use.
func ParseChanges(p []byte) ([]Change, []byte, error) {
	return (*Relations)(nil).ParseChanges(p)
}

// appendChanges appends changes, with the relations they use that are not
// in rels yet; rels numbers the relations defined so far and gains the
// new ones.
func appendChanges(b []byte, changes []Change, rels map[*Relation]uint32) []byte {
	countAt := len(b)
	b = binary.BigEndian.AppendUint32(b, 0) // patched below
	var defined uint32
	define := func(r *Relation) {
		if r == nil {
			return
		}
		if _, ok := rels[r]; ok {
			return
		}
		rels[r] = uint32(len(rels))
		defined++
		b = appendRelation(b, r)
	}
	for i := range changes {
		define(changes[i].Rel)
		for _, r := range changes[i].Truncated {
			define(r)
		}
	}
	binary.BigEndian.PutUint32(b[countAt:], defined)
	index := func(r *Relation) uint32 {
		if r == nil {
			return noRelation
		}
		return rels[r]
	}
	b = binary.BigEndian.AppendUint32(b, uint32(len(changes)))
	for i := range changes {
		c := &changes[i]
		b = append(b, uint8(c.Op))
		b = binary.BigEndian.AppendUint32(b, index(c.Rel))
		b = appendRow(b, c.Old)
		if c.Op == OpDDL && c.DDL != nil {
			b = appendRow(b, ddlRow(c.DDL))
		} else {
			b = appendRow(b, c.New)
		}
		b = binary.BigEndian.AppendUint32(b, uint32(len(c.Truncated)))
		for _, r := range c.Truncated {
			b = binary.BigEndian.AppendUint32(b, index(r))
		}
		b = append(b, c.TruncateFlags)
	}
	return b
}

func appendRelation(b []byte, r *Relation) []byte {
	b = binary.BigEndian.AppendUint32(b, r.ID)
	b = appendString(b, r.Schema)
	b = appendString(b, r.Table)
	b = append(b, r.ReplicaIdentity)
	b = binary.BigEndian.AppendUint32(b, uint32(len(r.Columns)))
	for _, c := range r.Columns {
		b = appendString(b, c.Name)
		b = binary.BigEndian.AppendUint32(b, c.TypeOID)
		b = appendString(b, c.TypeName)
		b = binary.BigEndian.AppendUint32(b, uint32(c.TypeMod))
		if c.Key {
			b = append(b, 1)
		} else {
			b = append(b, 0)
		}
	}
	return b
}

// appendRow appends a row: a nil row stays nil.
func appendRow(b []byte, row []Value) []byte {
	if row == nil {
		return append(b, 0)
	}
	b = append(b, 1)
	b = binary.BigEndian.AppendUint32(b, uint32(len(row)))
	for _, v := range row {
		b = append(b, uint8(v.Kind))
		if v.Kind == ValueText || v.Kind == ValueBinary {
			b = binary.BigEndian.AppendUint32(b, uint32(len(v.Data)))
			b = append(b, v.Data...)
		}
	}
	return b
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// txnHeader reads what AppendTxnHeader wrote.
func (r *buf) txnHeader() *Txn {
	t := &Txn{
		Origin:    r.lstr(),
		Xid:       r.u32(),
		CommitLSN: pglogrepl.LSN(r.u64()),
		EndLSN:    pglogrepl.LSN(r.u64()),
	}
	hasTime := r.flag("commit time flag")
	ns := int64(r.u64())
	if hasTime {
		t.CommitTime = time.Unix(0, ns).UTC()
	} else if ns != 0 {
		r.fail(errors.New("commit time without flag"))
	}
	return t
}

// changes reads what appendChanges wrote. rels are the relations defined
// before (by the earlier chunks of a spill file); the returned slice adds
// the ones defined here. The changes are nil after an error (and for
// none).
func (r *buf) changes(rels []*Relation) ([]Change, []*Relation) {
	base := len(rels)
	for i, n := 0, r.count(minRelation); i < n && r.err == nil; i++ {
		rels = append(rels, r.internedRelation(rels[base:]))
	}
	if r.err != nil {
		return nil, rels
	}
	ref := func() *Relation {
		i := r.u32()
		if r.err != nil || i == noRelation {
			return nil
		}
		if uint64(i) >= uint64(len(rels)) {
			r.fail(fmt.Errorf("relation index %d of %d", i, len(rels)))
			return nil
		}
		return rels[i]
	}
	var changes []Change
	if n := r.count(minChange); n > 0 {
		changes = make([]Change, n)
	}
	for i := range changes {
		c := &changes[i]
		c.Op = Op(r.u8())
		c.Rel = ref()
		c.Old = r.row()
		c.New = r.row()
		if m := r.count(4); m > 0 {
			c.Truncated = make([]*Relation, m)
			for j := range c.Truncated {
				c.Truncated[j] = ref()
			}
		}
		c.TruncateFlags = r.u8()
		if r.err != nil {
			return nil, rels
		}
		if c.Op == OpDDL {
			c.DDL, c.New = ddlFromRow(c.New), nil
		}
		if err := checkChange(c); err != nil {
			r.fail(fmt.Errorf("change %d: %w", i, err))
			return nil, rels
		}
	}
	// The relations defined here are listed in order of first use, each
	// once: anything else is not what an encoder produces. A reference to
	// one defined here and not used yet must be to the next one.
	pos := make(map[*Relation]int, len(rels)-base)
	for i, rel := range rels[base:] {
		pos[rel] = base + i
	}
	next := base
	use := func(rel *Relation) bool {
		if p, ok := pos[rel]; ok && p >= next {
			if p != next {
				return false
			}
			next++
		}
		return true
	}
	for i := range changes {
		ok := use(changes[i].Rel)
		for _, rel := range changes[i].Truncated {
			ok = ok && use(rel)
		}
		if !ok {
			r.fail(fmt.Errorf("change %d: relations out of order of first use", i))
			return nil, rels
		}
	}
	if next != len(rels) {
		r.fail(errors.New("relations defined and not used"))
		return nil, rels
	}
	return changes, rels
}

// internedRelation reads one relation definition, through r.interned
// when set. defined are the relations this block defined before: a
// repeated definition (which no encoder writes) gets a relation of its
// own, so the checks that follow see it as the encoding says.
func (r *buf) internedRelation(defined []*Relation) *Relation {
	rs := r.interned
	if rs == nil || r.err != nil {
		return r.relation()
	}
	n := relationLen(r.b)
	if n < 0 {
		return r.relation()
	}
	if rel, ok := rs.m[string(r.b[:n])]; ok && !slices.Contains(defined, rel) {
		r.b = r.b[n:]
		return rel
	}
	enc := r.b[:n]
	rel := r.relation()
	if r.err == nil {
		if rs.m == nil || len(rs.m) >= maxInterned {
			rs.m = make(map[string]*Relation)
		}
		rs.m[string(enc)] = rel
	}
	return rel
}

// relation reads one relation definition.
func (r *buf) relation() *Relation {
	rel := &Relation{ID: r.u32(), Schema: r.lstr(), Table: r.lstr(), ReplicaIdentity: r.u8()}
	switch rel.ReplicaIdentity {
	case IdentityDefault, IdentityNothing, IdentityFull, IdentityIndex:
	default:
		r.fail(fmt.Errorf("relation %s.%s: bad replica identity %#x", rel.Schema, rel.Table, rel.ReplicaIdentity))
	}
	rel.Columns = make([]Column, r.count(minColumn))
	for j := range rel.Columns {
		rel.Columns[j] = Column{
			Name:     r.lstr(),
			TypeOID:  r.u32(),
			TypeName: r.lstr(),
			TypeMod:  int32(r.u32()),
			Key:      r.flag("key"),
		}
	}
	return rel
}

// row reads what appendRow wrote.
func (r *buf) row() []Value {
	if !r.flag("row flag") {
		return nil
	}
	var row []Value
	if n := r.count(minValue); r.arena != nil {
		row = r.arena.values(n)
	} else {
		row = make([]Value, n)
	}
	for i := range row {
		k := ValueKind(r.u8())
		switch k {
		case ValueNull, ValueUnchanged:
			row[i] = Value{Kind: k}
		case ValueText, ValueBinary:
			row[i] = Value{Kind: k, Data: r.bytes(r.u32())}
		default:
			r.fail(fmt.Errorf("bad value kind %d", k))
		}
		if r.err != nil {
			return nil
		}
	}
	return row
}

// checkChange enforces what appliers rely on: a known op; for INSERT,
// UPDATE and DELETE a relation, rows as long as its column list and no
// truncate data; for TRUNCATE at least one relation, each present, and no
// rows (pgoutput's Truncate message carries none).
func checkChange(c *Change) error {
	switch c.Op {
	case OpInsert, OpUpdate, OpDelete:
		if c.Rel == nil {
			return fmt.Errorf("%s without relation", c.Op)
		}
		if len(c.Truncated) != 0 || c.TruncateFlags != 0 {
			return fmt.Errorf("%s with truncate data", c.Op)
		}
		for _, row := range [][]Value{c.Old, c.New} {
			if row != nil && len(row) != len(c.Rel.Columns) {
				return fmt.Errorf("%s on %s.%s: %d values for %d columns", c.Op, c.Rel.Schema, c.Rel.Table, len(row), len(c.Rel.Columns))
			}
		}
	case OpDDL:
		if c.DDL == nil {
			return errors.New("DDL without three text values")
		}
		if c.Rel != nil || c.Old != nil || c.New != nil || len(c.Truncated) != 0 || c.TruncateFlags != 0 {
			return errors.New("DDL with row or relation data")
		}
		if c.DDL.Command == "" {
			return errors.New("DDL without a command")
		}
	case OpTruncate:
		if len(c.Truncated) == 0 {
			return errors.New("TRUNCATE without relations")
		}
		for _, r := range c.Truncated {
			if r == nil {
				return errors.New("TRUNCATE of a missing relation")
			}
		}
		if c.Old != nil || c.New != nil {
			return errors.New("TRUNCATE with rows")
		}
	default:
		return fmt.Errorf("unknown op %d", c.Op)
	}
	return nil
}

// ddlRow is the new row that carries d in the encoding.
func ddlRow(d *DDL) []Value {
	return []Value{
		{Kind: ValueText, Data: []byte(d.Command)},
		{Kind: ValueText, Data: []byte(d.SearchPath)},
		{Kind: ValueText, Data: []byte(d.Role)},
	}
}

// ddlFromRow is the inverse of ddlRow; nil unless row is three text
// values.
func ddlFromRow(row []Value) *DDL {
	if len(row) != 3 {
		return nil
	}
	for _, v := range row {
		if v.Kind != ValueText {
			return nil
		}
	}
	return &DDL{Command: string(row[0].Data), SearchPath: string(row[1].Data), Role: string(row[2].Data)}
}

// lstr reads a string with a 4-byte length.
func (r *buf) lstr() string {
	n := r.u32()
	if r.err != nil {
		return ""
	}
	if uint64(n) > uint64(len(r.b)) {
		r.fail(errShort)
		return ""
	}
	s := string(r.b[:n])
	r.b = r.b[n:]
	return s
}

// flag reads a boolean byte: 0 or 1, anything else is an error.
func (r *buf) flag(what string) bool {
	switch v := r.u8(); v {
	case 0:
		return false
	case 1:
		return true
	default:
		r.fail(fmt.Errorf("%s: bad boolean %d", what, v))
		return false
	}
}

// count reads an element count that the bytes left can hold with at least
// minSize bytes per element, so that no allocation is larger than the
// input itself.
func (r *buf) count(minSize int) int {
	n := r.u32()
	if r.err != nil {
		return 0
	}
	if uint64(n)*uint64(minSize) > uint64(len(r.b)) {
		r.fail(fmt.Errorf("count %d exceeds the %d bytes left", n, len(r.b)))
		return 0
	}
	return int(n)
}
