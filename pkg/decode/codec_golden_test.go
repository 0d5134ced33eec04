package decode

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
)

// goldenTxn is the transaction behind the files in testdata/codec: every
// op, every value kind (null, unchanged TOAST, text, empty text, binary),
// a nil old row, relations shared between changes and a TRUNCATE of two
// tables with both flags.
func goldenTxn() *Txn {
	items := &Relation{ID: 16384, Schema: "public", Table: "items", ReplicaIdentity: IdentityDefault, Columns: []Column{
		{Name: "id", TypeOID: 23, TypeMod: -1, Key: true},
		{Name: "v", TypeOID: 25, TypeMod: -1},
		{Name: "mood", TypeOID: 70000, TypeName: "public.mood", TypeMod: -1},
	}}
	other := &Relation{ID: 16390, Schema: "s", Table: "other", ReplicaIdentity: IdentityFull, Columns: []Column{
		{Name: "k", TypeOID: 1043, TypeMod: 14, Key: true},
	}}
	text := func(s string) Value { return Value{Kind: ValueText, Data: []byte(s)} }
	null := Value{Kind: ValueNull}
	return &Txn{
		Origin:     "na",
		Xid:        742,
		CommitLSN:  pglogrepl.LSN(0x16B3748),
		EndLSN:     pglogrepl.LSN(0x16B3778),
		CommitTime: time.Date(2024, 5, 6, 7, 8, 9, 123456000, time.UTC),
		Changes: []Change{
			{Op: OpInsert, Rel: items, New: []Value{text("1"), text(""), null}},
			{Op: OpUpdate, Rel: items, Old: []Value{text("1"), null, null},
				New: []Value{text("1"), {Kind: ValueUnchanged}, {Kind: ValueBinary, Data: []byte{0, 1, 2, 255}}}},
			{Op: OpDelete, Rel: other, Old: []Value{text("k1")}},
			{Op: OpTruncate, Rel: items, Truncated: []*Relation{items, other}, TruncateFlags: TruncateCascade | TruncateRestartIdentity},
		},
	}
}

// goldenSpillChunks is how testdata/codec/txn.spill splits the changes: the
// second chunk uses a relation the first defined and defines another.
var goldenSpillChunks = []int{2, 2}

// writeSpill writes a spill file, one chunk per entry of chunks.
func writeSpill(t *testing.T, chunks ...[]Change) *Spill {
	t.Helper()
	w, err := newSpillWriter(t.TempDir(), 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	for _, chunk := range chunks {
		for _, c := range chunk {
			if err := w.add(c); err != nil {
				t.Fatal(err)
			}
		}
		if err := w.flushChunk(); err != nil {
			t.Fatal(err)
		}
	}
	s, err := w.finish()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// writeGoldenSpill writes changes as a spill file, split as
// goldenSpillChunks says, and returns the file's bytes.
func writeGoldenSpill(t *testing.T, changes []Change) []byte {
	t.Helper()
	var chunks [][]Change
	for _, n := range goldenSpillChunks {
		chunks, changes = append(chunks, changes[:n]), changes[n:]
	}
	s := writeSpill(t, chunks...)
	defer s.Release()
	var b bytes.Buffer
	if _, err := s.WriteTo(&b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestGoldenSpill reads testdata/codec/txn.spill, written before the
// change encoding was shared with the peer protocol, and writes the same
// changes back: the spill format must not drift. The header's third field
// (and so its checksum) is the writer's estimate of the changes' memory
// (Spill.Bytes, see Txn.Size), which is no part of the format: it is
// checked against the current estimate instead.
func TestGoldenSpill(t *testing.T) {
	path := filepath.Join("testdata", "codec", "txn.spill")
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s, err := OpenSpill(path)
	if err != nil {
		t.Fatalf("OpenSpill(%s) = %v", path, err)
	}
	defer s.Release()
	all, chunks := readSpill(t, s)
	if chunks != len(goldenSpillChunks) {
		t.Fatalf("%s: %d chunks, want %d", path, chunks, len(goldenSpillChunks))
	}
	if !reflect.DeepEqual(all, goldenTxn().Changes) {
		t.Fatalf("%s decodes to\n%+v\nwant\n%+v", path, all, goldenTxn().Changes)
	}
	if all[3].Truncated[0] != all[0].Rel {
		t.Fatalf("%s: a relation of the first chunk is not shared with the second", path)
	}
	got := writeGoldenSpill(t, all)
	var est int
	for i := range all {
		est += changeSize(&all[i])
	}
	if len(got) != len(want) || !bytes.Equal(got[:16], want[:16]) || !bytes.Equal(got[24:28], want[24:28]) || !bytes.Equal(got[32:], want[32:]) ||
		binary.BigEndian.Uint64(got[16:24]) != uint64(est) {
		t.Fatalf("re-encoding %s differs (beyond the memory estimate %d in bytes 16-24 and the header checksum):\n got %x\nwant %x", path, est, got, want)
	}
}

// TestGoldenTxn reads testdata/codec/txn.bin, a transaction as the peer
// protocol and the spool encoded it before the codec moved here, and
// encodes it back to the same bytes.
func TestGoldenTxn(t *testing.T) {
	path := filepath.Join("testdata", "codec", "txn.bin")
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	txn, rest, err := ParseTxn(want)
	if err != nil || len(rest) != 0 {
		t.Fatalf("ParseTxn(%s) = %d bytes left, %v", path, len(rest), err)
	}
	if !reflect.DeepEqual(txn, goldenTxn()) {
		t.Fatalf("%s decodes to\n%+v\nwant\n%+v", path, txn, goldenTxn())
	}
	got, err := AppendTxn(nil, txn)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("re-encoding %s = %v:\n got %x\nwant %x", path, err, got, want)
	}
}
