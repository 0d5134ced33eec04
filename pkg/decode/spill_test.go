package decode

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/jackc/pglogrepl"
)

func mTruncate(flags uint8, rels ...uint32) []byte {
	b := binary.BigEndian.AppendUint32([]byte{'T'}, uint32(len(rels)))
	b = append(b, flags)
	for _, r := range rels {
		b = binary.BigEndian.AppendUint32(b, r)
	}
	return b
}

func mDelete(rel uint32, key ...string) []byte {
	b := binary.BigEndian.AppendUint32([]byte{'D'}, rel)
	return appendTuple(append(b, 'K'), key...)
}

// bigStream is a transaction of n changes over two relations, with a
// relation replaced halfway, every value kind, a delete and a truncate.
func bigStream(rnd *rand.Rand, n int) [][]byte {
	msgs := [][]byte{mRelation(1, "id", "v"), mRelation(2, "k"), mBegin(1000, 9)}
	for i := range n {
		v := fmt.Sprintf("%d-%s", i, bytes.Repeat([]byte{'x'}, rnd.Intn(300)))
		switch {
		case i == n/2:
			msgs = append(msgs, mRelation(1, "id", "v", "extra"))
		case i > n/2:
			msgs = append(msgs, mInsert(1, fmt.Sprint(i), v, "<null>"))
		case i%7 == 3:
			msgs = append(msgs, mUpdate(1, []string{fmt.Sprint(i), "<null>"}, fmt.Sprint(i), "<u>"))
		case i%11 == 5:
			msgs = append(msgs, mDelete(2, fmt.Sprint(i)))
		case i%97 == 50:
			msgs = append(msgs, mTruncate(TruncateCascade, 2, 1))
		default:
			msgs = append(msgs, mInsert(1, fmt.Sprint(i), v))
		}
	}
	return append(msgs, mCommit(1000, 1100))
}

func assemble(t *testing.T, a *Assembler, msgs [][]byte) *Txn {
	t.Helper()
	var out *Txn
	for i, m := range msgs {
		txn, err := a.Feed(pglogrepl.LSN(i+1), m)
		if err != nil {
			t.Fatalf("Feed(message %d) = %v", i, err)
		}
		if txn != nil {
			out = txn
		}
	}
	return out
}

// readSpill reads every change of a spilled transaction back.
func readSpill(t *testing.T, s *Spill) (all []Change, chunks int) {
	t.Helper()
	err := s.Each(func(c []Change) error {
		all = append(all, c...)
		chunks++
		return nil
	})
	if err != nil {
		t.Fatalf("Spill.Each = %v", err)
	}
	return all, chunks
}

func TestAssemblerSpill(t *testing.T) {
	rnd := rand.New(rand.NewSource(7))
	msgs := bigStream(rnd, 3000)
	want := assemble(t, NewAssembler("na"), msgs)
	if want.Spill != nil || len(want.Changes) == 0 {
		t.Fatalf("without SpillOver: Spill %v, %d changes; want in memory", want.Spill, len(want.Changes))
	}

	dir := t.TempDir()
	a := NewAssembler("na", SpillOver(dir, 64<<10, 16<<10))
	got := assemble(t, a, msgs)
	if got.Spill == nil || got.Changes != nil {
		t.Fatalf("with SpillOver: Spill %v, %d changes; want spilled", got.Spill, len(got.Changes))
	}
	defer got.Spill.Release()
	if got.Size() > 200 {
		t.Fatalf("Size() of a spilled txn = %d, want the header only", got.Size())
	}
	if got.ChangeCount() != len(want.Changes) || got.Spill.Bytes() != int64(want.Size()-txnOverhead(want)) {
		t.Fatalf("Count %d Bytes %d, want %d and %d", got.ChangeCount(), got.Spill.Bytes(), len(want.Changes), want.Size()-txnOverhead(want))
	}
	if got.EndLSN != want.EndLSN || got.CommitLSN != want.CommitLSN || got.Xid != want.Xid || !got.CommitTime.Equal(want.CommitTime) {
		t.Fatalf("header %+v, want %+v", got, want)
	}
	changes, chunks := readSpill(t, got.Spill)
	if chunks < 10 {
		t.Fatalf("read back in %d chunks, want many chunks of 16 KiB", chunks)
	}
	if !reflect.DeepEqual(changes, want.Changes) {
		t.Fatalf("spilled changes differ from the in-memory ones")
	}
	// Relations stay shared across chunks, and the replaced one is new.
	if changes[0].Rel != changes[len(changes)/2-2].Rel || changes[0].Rel == changes[len(changes)-1].Rel {
		t.Fatalf("relation identity not kept across chunks")
	}
	// The temporary file is unlinked from the start.
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("spill dir holds %d entries, want none (unlinked files)", len(ents))
	}

	// Two iterators at once, then a copy opened by path.
	it1, err := got.Spill.Iter()
	if err != nil {
		t.Fatalf("Iter = %v", err)
	}
	it2, _ := got.Spill.Iter()
	c1, err1 := it1.Next()
	c2, err2 := it2.Next()
	if err1 != nil || err2 != nil || !reflect.DeepEqual(c1, c2) {
		t.Fatalf("concurrent iterators: %v %v", err1, err2)
	}
	it2.Close()
	path := filepath.Join(t.TempDir(), "copy.spill")
	f, _ := os.Create(path)
	if _, err := got.Spill.WriteTo(f); err != nil {
		t.Fatalf("WriteTo = %v", err)
	}
	f.Close()
	cp, err := OpenSpill(path)
	if err != nil {
		t.Fatalf("OpenSpill = %v", err)
	}
	if again, _ := readSpill(t, cp); !reflect.DeepEqual(again, want.Changes) {
		t.Fatalf("copied spill differs")
	}

	// Release waits for the open iterator, then refuses new ones.
	got.Spill.Release()
	if _, err := it1.Next(); err != nil {
		t.Fatalf("Next after Release with the iterator open = %v", err)
	}
	it1.Close()
	if _, err := got.Spill.Iter(); !errors.Is(err, ErrSpillReleased) {
		t.Fatalf("Iter after Release = %v, want ErrSpillReleased", err)
	}
}

func TestAssemblerSpillFilteredAndSkipped(t *testing.T) {
	dir := t.TempDir()
	a := NewAssembler("na", SpillOver(dir, 1024, 0), SkipSchemas("public"))
	msgs := bigStream(rand.New(rand.NewSource(1)), 200)
	txn := assemble(t, a, msgs)
	if txn.Spill != nil || len(txn.Changes) != 0 {
		t.Fatalf("skipped schema: Spill %v, %d changes; want an empty transaction", txn.Spill, len(txn.Changes))
	}
	// An Origin message after the transaction spilled drops the spill.
	a = NewAssembler("na", SpillOver(dir, 1024, 0))
	msgs = bigStream(rand.New(rand.NewSource(1)), 200)
	withOrigin := append(append(append([][]byte{}, msgs[:len(msgs)-1]...), mOrigin()), msgs[len(msgs)-1])
	if txn := assemble(t, a, withOrigin); txn != nil {
		t.Fatalf("origin-filtered spilled transaction returned: %+v", txn)
	}
	if a.spill != nil || a.Filtered() != 1 {
		t.Fatalf("spill kept after origin filtering (filtered %d)", a.Filtered())
	}
	// Close discards a transaction cut off mid-way.
	for i, m := range msgs[:len(msgs)-1] {
		if _, err := a.Feed(pglogrepl.LSN(i), m); err != nil {
			t.Fatalf("Feed = %v", err)
		}
	}
	if a.spill == nil {
		t.Fatalf("open transaction did not spill")
	}
	a.Close()
	if a.spill != nil {
		t.Fatalf("Close kept the spill")
	}
}

// TestSpillCorrupt flips bytes of a spill file: reading it back fails
// cleanly (checksums), never panics, never returns wrong changes silently.
func TestSpillCorrupt(t *testing.T) {
	a := NewAssembler("na", SpillOver(t.TempDir(), 1, 4<<10))
	txn := assemble(t, a, bigStream(rand.New(rand.NewSource(3)), 300))
	defer txn.Spill.Release()
	var buf bytes.Buffer
	if _, err := txn.Spill.WriteTo(&buf); err != nil {
		t.Fatal(err)
	}
	orig := buf.Bytes()
	dir := t.TempDir()
	rnd := rand.New(rand.NewSource(4))
	for i := range 200 {
		b := bytes.Clone(orig)
		b[rnd.Intn(len(b))] ^= byte(1 + rnd.Intn(255))
		if i%5 == 0 {
			b = b[:rnd.Intn(len(b))]
		}
		path := filepath.Join(dir, fmt.Sprintf("c%d", i))
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := OpenSpill(path)
		if err != nil {
			continue
		}
		if err := s.Each(func([]Change) error { return nil }); err == nil {
			t.Fatalf("corruption %d read back without error", i)
		}
	}
}

func TestSpillFiltered(t *testing.T) {
	msgs := bigStream(rand.New(rand.NewSource(3)), 2000)
	want := assemble(t, NewAssembler("na"), msgs)
	a := NewAssembler("na", SpillOver(t.TempDir(), 64<<10, 16<<10))
	got := assemble(t, a, msgs)
	if got.Spill == nil {
		t.Fatal("transaction not spilled")
	}
	defer got.Spill.Release()
	// Keep the inserts whose id is even, drop everything else.
	calls := 0
	even := func(cs []Change) ([]Change, error) {
		calls++
		var out []Change
		for _, c := range cs {
			if c.Op == OpInsert && c.New[0].Kind == ValueText && (c.New[0].Data[len(c.New[0].Data)-1]-'0')%2 == 0 {
				out = append(out, c)
			}
		}
		return out, nil
	}
	var kept []Change
	for _, c := range want.Changes {
		if r, _ := even([]Change{c}); len(r) == 1 {
			kept = append(kept, c)
		}
	}
	calls = 0
	v, err := got.Spill.Filtered(even)
	if err != nil {
		t.Fatalf("Filtered = %v", err)
	}
	if v.Count() != len(kept) || calls < 10 {
		t.Fatalf("Filtered: Count %d after %d chunk calls, want %d changes counted chunk by chunk", v.Count(), calls, len(kept))
	}
	all, _ := readSpill(t, v)
	if !reflect.DeepEqual(all, kept) {
		t.Fatalf("filtered view yields %d changes, want the %d kept ones", len(all), len(kept))
	}
	v.Release() // a view's Release leaves the file to its owner
	if again, _ := readSpill(t, got.Spill); len(again) != len(want.Changes) {
		t.Fatalf("base after the view's Release: %d changes, want %d", len(again), len(want.Changes))
	}
	if _, err := v.WriteTo(io.Discard); err == nil {
		t.Fatal("WriteTo of a filtered view succeeded; it would copy unfiltered changes")
	}
	none, err := got.Spill.Filtered(func([]Change) ([]Change, error) { return nil, nil })
	if err != nil || none.Count() != 0 {
		t.Fatalf("Filtered(drop all) = %d changes, %v; want 0", none.Count(), err)
	}
	if all, _ := readSpill(t, none); len(all) != 0 {
		t.Fatalf("empty view yields %d changes", len(all))
	}
	boom := errors.New("boom")
	if _, err := got.Spill.Filtered(func([]Change) ([]Change, error) { return nil, boom }); !errors.Is(err, boom) {
		t.Fatalf("Filtered(failing) = %v, want boom", err)
	}
}
