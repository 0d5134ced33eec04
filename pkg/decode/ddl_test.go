package decode

import (
	"bytes"
	"encoding/binary"
	"reflect"
	"strings"
	"testing"
)

// mDDL is a DDLPrefix message; stream adds the xid of a stream block.
func mDDL(transactional bool, content string, stream bool, xid uint32) []byte {
	b := withXid('M', xid, stream)
	if transactional {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	b = append(b, make([]byte, 8)...)
	b = append(b, DDLPrefix+"\x00"...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(content)))
	return append(b, content...)
}

const ddlJSON = `{"command": "ALTER TABLE t ADD COLUMN c int", "search_path": "\"$user\", public", "role": "app"}`

// TestAssemblerDDL checks that a transactional DDL message becomes an
// OpDDL change at its place among the rows, in Begin ... Commit and in
// streamed transactions, and that malformed ones are errors.
func TestAssemblerDDL(t *testing.T) {
	want := &DDL{Command: "ALTER TABLE t ADD COLUMN c int", SearchPath: `"$user", public`, Role: "app"}
	for _, tc := range []struct {
		name string
		msgs [][]byte
		ops  []Op
		err  string
	}{
		{"between rows", [][]byte{mRelation(1, "id"), mBegin(100, 7), mInsert(1, "1"), mDDL(true, ddlJSON, false, 0), mInsert(1, "2"), mCommit(100, 120)},
			[]Op{OpInsert, OpDDL, OpInsert}, ""},
		{"streamed", [][]byte{mRelation(1, "id"), mStreamStart(9), mDDL(true, ddlJSON, true, 9), mInsertX(9, 1, "1"), {'E'}, mStreamCommit(9, 100, 120)},
			[]Op{OpDDL, OpInsert}, ""},
		{"non-transactional ignored", [][]byte{mBegin(100, 7), mDDL(false, ddlJSON, false, 0), mCommit(100, 120)}, nil, ""},
		{"filtered with its transaction", [][]byte{mBegin(100, 7), mOrigin(), mDDL(true, ddlJSON, false, 0), mCommit(100, 120)}, nil, "filtered"},
		{"not json", [][]byte{mBegin(100, 7), mDDL(true, "ALTER TABLE t", false, 0)}, nil, "prism_ddl message: invalid character"},
		{"no command", [][]byte{mBegin(100, 7), mDDL(true, `{"role": "x"}`, false, 0)}, nil, "prism_ddl message without a command"},
		{"outside a transaction", [][]byte{mDDL(true, ddlJSON, false, 0)}, nil, "outside a transaction"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := NewAssembler("eu")
			var got *Txn
			for i, m := range tc.msgs {
				txn, err := a.Feed(0, m)
				if err != nil {
					if tc.err == "" || tc.err == "filtered" || i != len(tc.msgs)-1 || !strings.Contains(err.Error(), tc.err) {
						t.Fatalf("Feed(message %d) = %v, want error %q on the last message", i, err, tc.err)
					}
					return
				}
				if txn != nil {
					got = txn
				}
			}
			if tc.err == "filtered" {
				if got != nil || a.Filtered() != 1 {
					t.Fatalf("Feed = %+v (filtered %d), want the transaction filtered", got, a.Filtered())
				}
				return
			}
			if tc.err != "" {
				t.Fatalf("Feed = nil, want error %q", tc.err)
			}
			if got == nil {
				t.Fatal("no transaction")
			}
			var ops []Op
			for _, c := range got.Changes {
				ops = append(ops, c.Op)
				if c.Op == OpDDL && !reflect.DeepEqual(c.DDL, want) {
					t.Errorf("DDL = %+v, want %+v", c.DDL, want)
				}
			}
			if !reflect.DeepEqual(ops, tc.ops) {
				t.Fatalf("ops = %v, want %v", ops, tc.ops)
			}
		})
	}
}

// TestCodecDDL round-trips a transaction with a DDL between rows through
// the shared codec and a spill file, and checks the DDL's encoding: no
// relation, no old row, a new row of three text values.
func TestCodecDDL(t *testing.T) {
	txn := goldenTxn()
	d := &DDL{Command: "CREATE INDEX ON items (name)", SearchPath: "app, public", Role: "owner"}
	txn.Changes = append(txn.Changes[:1:1], append([]Change{{Op: OpDDL, DDL: d}}, txn.Changes[1:]...)...)
	b, err := AppendTxn(nil, txn)
	if err != nil {
		t.Fatal(err)
	}
	back, rest, err := ParseTxn(b)
	if err != nil || len(rest) != 0 {
		t.Fatalf("ParseTxn = %v, %d bytes left, want nil, 0", err, len(rest))
	}
	if !reflect.DeepEqual(back.Changes, txn.Changes) {
		t.Fatalf("ParseTxn changes = %+v, want %+v", back.Changes, txn.Changes)
	}
	if again, _ := AppendTxn(nil, back); !bytes.Equal(again, b) {
		t.Fatal("re-encoding differs")
	}
	want := []byte{byte(OpDDL), 0xff, 0xff, 0xff, 0xff, 0, 1, 0, 0, 0, 3, byte(ValueText), 0, 0, 0, byte(len(d.Command))}
	want = append(want, d.Command...)
	if !bytes.Contains(b, want) {
		t.Fatalf("encoding %x does not hold the DDL as %x", b, want)
	}
	s := writeSpill(t, txn.Changes)
	defer s.Release()
	var spilled []Change
	if err := s.Each(func(cs []Change) error { spilled = append(spilled, cs...); return nil }); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(spilled, txn.Changes) {
		t.Fatalf("spilled changes = %+v, want %+v", spilled, txn.Changes)
	}
}
