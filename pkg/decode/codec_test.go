package decode

import (
	"bytes"
	"math/rand"
	"testing"

	"github.com/jackc/pglogrepl"
)

// invalidChanges are changes no Assembler produces and no applier may be
// handed: each one must be refused where it is read back.
func invalidChanges() []struct {
	name string
	c    Change
} {
	t := goldenTxn()
	items, other := t.Changes[0].Rel, t.Changes[2].Rel
	row := t.Changes[0].New
	return []struct {
		name string
		c    Change
	}{
		// pgoutput's Truncate message has no tuple: a TRUNCATE never
		// carries rows.
		{"truncate with new row", Change{Op: OpTruncate, Rel: items, Truncated: []*Relation{items}, New: row}},
		{"truncate with old row", Change{Op: OpTruncate, Rel: items, Truncated: []*Relation{items}, Old: row}},
		{"truncate without relations", Change{Op: OpTruncate, Rel: items}},
		{"truncate of a missing relation", Change{Op: OpTruncate, Rel: items, Truncated: []*Relation{items, nil}}},
		{"insert with truncated relations", Change{Op: OpInsert, Rel: items, New: row, Truncated: []*Relation{other}}},
		{"delete with truncate flags", Change{Op: OpDelete, Rel: items, Old: row, TruncateFlags: TruncateCascade}},
		{"insert without relation", Change{Op: OpInsert, New: row}},
		{"insert with a short row", Change{Op: OpInsert, Rel: items, New: row[:1]}},
		{"update with a long old row", Change{Op: OpUpdate, Rel: other, Old: row, New: row[:1]}},
		{"unknown op", Change{Op: 9, Rel: items}},
		{"ddl without its values", Change{Op: OpDDL}},
		{"ddl with a relation", Change{Op: OpDDL, Rel: items, DDL: &DDL{Command: "DROP TABLE t"}}},
		{"ddl with an old row", Change{Op: OpDDL, Old: row, DDL: &DDL{Command: "DROP TABLE t"}}},
		{"ddl without a command", Change{Op: OpDDL, DDL: &DDL{Role: "app"}}},
		{"ddl with a non-text value", Change{Op: OpDDL, New: []Value{{Kind: ValueText, Data: []byte("x")}, {Kind: ValueNull}, {Kind: ValueText}}}},
	}
}

// TestParseRejectsInvalidChanges encodes each invalid change (the encoder
// does not check) and expects ParseChanges to refuse it.
func TestParseRejectsInvalidChanges(t *testing.T) {
	for _, tc := range invalidChanges() {
		t.Run(tc.name, func(t *testing.T) {
			p := AppendChanges(nil, []Change{tc.c})
			if changes, _, err := ParseChanges(p); err == nil {
				t.Fatalf("ParseChanges(%+v) = %+v, nil, want an error", tc.c, changes)
			}
		})
	}
}

// TestSpillRejectsInvalidChanges writes each invalid change to a spill
// file (the writer does not check) and expects reading it back to fail.
func TestSpillRejectsInvalidChanges(t *testing.T) {
	for _, tc := range invalidChanges() {
		t.Run(tc.name, func(t *testing.T) {
			s := writeSpill(t, []Change{tc.c})
			defer s.Release()
			if err := s.Each(func([]Change) error { return nil }); err == nil {
				t.Fatalf("Spill.Each(%+v) = nil, want an error", tc.c)
			}
		})
	}
}

func TestParseRejectsMalformed(t *testing.T) {
	txn, err := AppendTxn(nil, goldenTxn())
	if err != nil {
		t.Fatal(err)
	}
	// Offsets into txn: the header is origin (4+2), xid 4, LSNs 16, time
	// flag 1 and time 8; then the relation count and the first relation:
	// id 4, schema (4+6), table (4+5), replica identity.
	const (
		timeFlag  = 6 + 4 + 16
		relations = timeFlag + 1 + 8
		identity  = relations + 4 + 4 + 10 + 9
		firstKey  = identity + 1 + 4 + 6 + 4 + 4 + 4
	)
	mutate := func(i int, v byte) []byte {
		c := bytes.Clone(txn)
		c[i] = v
		return c
	}
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"empty", nil},
		{"truncated", txn[:len(txn)-1]},
		{"bad time flag", mutate(timeFlag, 2)},
		{"commit time without flag", func() []byte {
			b, _ := AppendTxn(nil, &Txn{Origin: "na"})
			b[timeFlag+8] = 1
			return b
		}()},
		{"huge relation count", append(bytes.Clone(txn[:relations]), 0x7f, 0xff, 0xff, 0xff)},
		{"bad replica identity", mutate(identity, 'x')},
		{"bad key flag", mutate(firstKey, 7)},
		{"unused relation", func() []byte {
			b := bytes.Clone(txn[:relations])
			b = append(b, 0, 0, 0, 1)
			b = appendRelation(b, goldenTxn().Changes[0].Rel)
			return append(b, 0, 0, 0, 0)
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, _, err := ParseTxn(tc.in); err == nil {
				t.Fatalf("ParseTxn(%x) = %+v, nil, want an error", tc.in, got)
			}
		})
	}
	// Flip every byte once: never a panic, and a decoded result always
	// passes checkChange.
	for i := range txn {
		got, _, err := ParseTxn(mutate(i, txn[i]^0xff))
		if err != nil {
			continue
		}
		for j := range got.Changes {
			if err := checkChange(&got.Changes[j]); err != nil {
				t.Fatalf("flip %d: decoded an invalid change: %v", i, err)
			}
		}
	}
}

// TestParseTrailing: ParseTxn hands back what follows the transaction.
func TestParseTrailing(t *testing.T) {
	b, err := AppendTxn(nil, goldenTxn())
	if err != nil {
		t.Fatal(err)
	}
	_, rest, err := ParseTxn(append(b, 'x', 'y'))
	if err != nil || string(rest) != "xy" {
		t.Fatalf("ParseTxn(txn+xy) rest = %q, %v, want \"xy\", nil", rest, err)
	}
	if _, err := AppendTxn(nil, &Txn{Spill: &Spill{}}); err == nil {
		t.Fatalf("AppendTxn(spilled) = nil, want an error")
	}
}

// TestParseRejectsRelationsOutOfOrder: a block whose relations are all
// defined and used, but not in order of first use, is not what an encoder
// writes (it would not re-encode to the same bytes) and is refused; so is
// one defining a relation no change uses. The canonical orders parse.
func TestParseRejectsRelationsOutOfOrder(t *testing.T) {
	g := goldenTxn()
	items, other := g.Changes[0].Rel, g.Changes[2].Rel
	if items == other || items == nil || other == nil {
		t.Fatal("the golden transaction needs two relations")
	}
	onItems, onOther := g.Changes[0], g.Changes[2]
	ab := AppendChanges(nil, []Change{onItems, onOther}) // defines items, other
	ba := AppendChanges(nil, []Change{onOther, onItems}) // defines other, items
	for _, b := range [][]byte{ab, ba} {
		if _, _, err := ParseChanges(b); err != nil {
			t.Fatalf("ParseChanges(canonical) = %v", err)
		}
	}
	// The definitions of ab (items 0, other 1) with changes that use
	// other first, then items, then other again: every definition is used,
	// not in order of first use.
	defs := 4 + len(appendRelation(nil, items)) + len(appendRelation(nil, other))
	bab := appendChanges(nil, []Change{onOther, onItems, onOther}, map[*Relation]uint32{items: 0, other: 1})
	spliced := append(append([]byte{}, ab[:defs]...), bab[4:]...)
	if _, _, err := ParseChanges(spliced); err == nil {
		t.Fatal("ParseChanges(relations out of order of first use) = nil, want an error")
	}
	// Both defined, only items used.
	one := appendChanges(nil, []Change{onItems}, map[*Relation]uint32{items: 0, other: 1})
	unused := append(append([]byte{}, ab[:defs]...), one[4:]...)
	if _, _, err := ParseChanges(unused); err == nil {
		t.Fatal("ParseChanges(a relation defined and not used) = nil, want an error")
	}
}

// FuzzCodec reads arbitrary bytes as a transaction (a peer frame's or a
// spool record's payload) and as a spill chunk that follows one defining
// the golden relations. It must never panic; what decodes passes
// checkChange and encodes back to the same bytes.
func FuzzCodec(f *testing.F) {
	golden := goldenTxn()
	b, err := AppendTxn(nil, golden)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	big := assembleF(f, NewAssembler("na"), bigStream(rand.New(rand.NewSource(5)), 20))
	if b, err = AppendTxn(nil, big); err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	// A second spill chunk: it uses relations of the first and defines
	// another.
	index := map[*Relation]uint32{}
	first := appendChanges(nil, golden.Changes[:1], index)
	f.Add(appendChanges(nil, golden.Changes[1:], index))
	// A schema change between rows.
	ddl := *golden
	ddl.Changes = append(golden.Changes[:1:1], Change{Op: OpDDL, DDL: &DDL{Command: "ALTER TABLE t ADD c int", SearchPath: "public", Role: "app"}})
	if b, err = AppendTxn(nil, &ddl); err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	// Interned parsing, with the golden relations known, must decode
	// exactly what plain parsing does.
	rs := &Relations{}
	if _, _, err := rs.ParseTxn(b); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		txn, rest, err := ParseTxn(p)
		itxn, irest, ierr := rs.ParseTxn(p)
		if (err == nil) != (ierr == nil) || !bytes.Equal(rest, irest) {
			t.Fatalf("interned parse differs: %v, %v; rest %x, %x", err, ierr, rest, irest)
		}
		if err == nil {
			ib, _ := AppendTxn(nil, itxn)
			if b, _ := AppendTxn(nil, txn); !bytes.Equal(b, ib) {
				t.Fatalf("interned parse decodes differently:\n got %x\nwant %x", ib, b)
			}
		}
		if err == nil {
			checkChanges(t, txn.Changes)
			b, err := AppendTxn(nil, txn)
			if err != nil {
				t.Fatalf("AppendTxn(decoded) = %v", err)
			}
			if b = append(b, rest...); !bytes.Equal(b, p) {
				t.Fatalf("re-encoding differs:\n got %x\nwant %x", b, p)
			}
		}
		_, prior, err := decodeSpillChunk(first, nil)
		if err != nil {
			t.Fatal(err)
		}
		changes, _, err := decodeSpillChunk(p, prior)
		if err != nil {
			return
		}
		checkChanges(t, changes)
		index := map[*Relation]uint32{}
		for i, r := range prior {
			index[r] = uint32(i)
		}
		if b := appendChanges(nil, changes, index); !bytes.Equal(b, p) {
			t.Fatalf("re-encoding chunk differs:\n got %x\nwant %x", b, p)
		}
	})
}

func checkChanges(t *testing.T, changes []Change) {
	t.Helper()
	for i := range changes {
		if err := checkChange(&changes[i]); err != nil {
			t.Fatalf("decoded an invalid change: %v", err)
		}
	}
}

func assembleF(f *testing.F, a *Assembler, msgs [][]byte) *Txn {
	var out *Txn
	for i, m := range msgs {
		txn, err := a.Feed(pglogrepl.LSN(i+1), m)
		if err != nil {
			f.Fatalf("Feed = %v", err)
		}
		if txn != nil {
			out = txn
		}
	}
	return out
}

// TestRelationsInterned checks that a Relations parses a relation defined
// again with the same encoding into the same *Relation, allocating
// nothing for it, and that what it parses equals plain parsing.
func TestRelationsInterned(t *testing.T) {
	txn := goldenTxn()
	b, err := AppendTxn(nil, txn)
	if err != nil {
		t.Fatal(err)
	}
	rs := &Relations{}
	first, _, err := rs.ParseTxn(b)
	if err != nil {
		t.Fatal(err)
	}
	second, rest, err := rs.ParseTxn(b)
	if err != nil || len(rest) != 0 {
		t.Fatalf("ParseTxn again = %v, %d bytes left", err, len(rest))
	}
	plain, _, err := ParseTxn(b)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := render([]*Txn{second}), render([]*Txn{plain}); got != want {
		t.Fatalf("interned parse:\n%s\nwant:\n%s", got, want)
	}
	for i := range second.Changes {
		if second.Changes[i].Rel != first.Changes[i].Rel {
			t.Fatalf("change %d: relation parsed again instead of interned", i)
		}
	}
	withRels := testing.AllocsPerRun(50, func() { ParseTxn(b) })
	interned := testing.AllocsPerRun(50, func() { rs.ParseTxn(b) })
	if interned >= withRels {
		t.Fatalf("interned parse: %.0f allocations, plain %.0f; want fewer", interned, withRels)
	}
}

// BenchmarkParseTxn parses the peer frame of a pgbench transaction, as a
// region node does for every one it receives.
func BenchmarkParseTxn(b *testing.B) {
	a := NewAssembler("na")
	rels := [][]byte{mRelation(1, "aid", "bid", "abalance", "filler"), mRelation(2, "tid", "bid", "tbalance", "filler"),
		mRelation(3, "bid", "bbalance", "filler"), mRelation(4, "id", "tid", "bid", "aid", "delta", "mtime")}
	var txn *Txn
	for _, m := range append(rels, pgbenchTxn(false)...) {
		t, err := a.Feed(1, m)
		if err != nil {
			b.Fatal(err)
		}
		if t != nil {
			txn = t
		}
	}
	p, err := AppendTxn(nil, txn)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("plain", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, _, err := ParseTxn(p); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("interned", func(b *testing.B) {
		rs := &Relations{}
		b.ReportAllocs()
		for b.Loop() {
			if _, _, err := rs.ParseTxn(p); err != nil {
				b.Fatal(err)
			}
		}
	})
}
