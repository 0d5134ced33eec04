package decode

import (
	"encoding/binary"
	"runtime"
	"strings"
	"testing"

	"github.com/jackc/pglogrepl"
)

// Message builders for hand-written pgoutput streams.

func mBegin(final uint64, xid uint32) []byte {
	b := []byte{'B'}
	b = binary.BigEndian.AppendUint64(b, final)
	b = binary.BigEndian.AppendUint64(b, 1)
	return binary.BigEndian.AppendUint32(b, xid)
}

func mCommit(lsn, end uint64) []byte {
	b := []byte{'C', 0}
	b = binary.BigEndian.AppendUint64(b, lsn)
	b = binary.BigEndian.AppendUint64(b, end)
	return binary.BigEndian.AppendUint64(b, 1)
}

func withXid(typ byte, xid uint32, stream bool) []byte {
	b := []byte{typ}
	if stream {
		b = binary.BigEndian.AppendUint32(b, xid)
	}
	return b
}

func mRelation(id uint32, cols ...string) []byte {
	b := []byte{'R'}
	b = binary.BigEndian.AppendUint32(b, id)
	b = append(b, "public\x00t\x00d"...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(cols)))
	for i, c := range cols {
		flag := byte(0)
		if i == 0 {
			flag = 1
		}
		b = append(b, flag)
		b = append(b, c+"\x00"...)
		b = binary.BigEndian.AppendUint32(b, 25)
		b = binary.BigEndian.AppendUint32(b, 0xffffffff)
	}
	return b
}

func appendTuple(b []byte, vals ...string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(vals)))
	for _, v := range vals {
		switch v {
		case "<null>":
			b = append(b, 'n')
		case "<u>":
			b = append(b, 'u')
		default:
			b = append(b, 't')
			b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
			b = append(b, v...)
		}
	}
	return b
}

func mInsert(rel uint32, vals ...string) []byte {
	b := binary.BigEndian.AppendUint32([]byte{'I'}, rel)
	return appendTuple(append(b, 'N'), vals...)
}

// mInsertX is an Insert inside a stream block, made by (sub)transaction xid.
func mInsertX(xid, rel uint32, vals ...string) []byte {
	b := binary.BigEndian.AppendUint32(withXid('I', xid, true), rel)
	return appendTuple(append(b, 'N'), vals...)
}

func mUpdate(rel uint32, old []string, vals ...string) []byte {
	b := binary.BigEndian.AppendUint32([]byte{'U'}, rel)
	if old != nil {
		b = appendTuple(append(b, 'K'), old...)
	}
	return appendTuple(append(b, 'N'), vals...)
}

func mStreamStart(xid uint32) []byte {
	return append(binary.BigEndian.AppendUint32([]byte{'S'}, xid), 1)
}

func mStreamCommit(xid uint32, lsn, end uint64) []byte {
	b := append(binary.BigEndian.AppendUint32([]byte{'c'}, xid), 0)
	b = binary.BigEndian.AppendUint64(b, lsn)
	b = binary.BigEndian.AppendUint64(b, end)
	return binary.BigEndian.AppendUint64(b, 1)
}

func mStreamAbort(xid, sub uint32) []byte {
	return binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32([]byte{'A'}, xid), sub)
}

func mOrigin() []byte {
	return append(binary.BigEndian.AppendUint64([]byte{'O'}, 5), "prism_eu\x00"...)
}

func mMessage() []byte {
	b := append([]byte{'M', 0}, make([]byte, 8)...)
	b = append(b, "prism_heartbeat\x00"...)
	return binary.BigEndian.AppendUint32(b, 0)
}

func TestAssemblerFeed(t *testing.T) {
	tests := []struct {
		name    string
		msgs    [][]byte
		wantErr string // on the last message; "" for none
		want    string // rendered transactions
		filter  uint64
	}{
		{
			name: "insert and update with old key",
			msgs: [][]byte{mRelation(1, "id", "v"), mBegin(100, 7), mInsert(1, "1", "a"), mUpdate(1, []string{"1", "<null>"}, "2", "<u>"), mCommit(100, 120)},
			want: "BEGIN changes=2\n  INSERT public.t identity=d [id:25* v:25]\n    new: id=\"1\" v=\"a\"\n" +
				"  UPDATE public.t identity=d [id:25* v:25]\n    old: id=\"1\" v=NULL\n    new: id=\"2\" v=UNCHANGED\nCOMMIT\n",
		},
		{name: "insert before begin", msgs: [][]byte{mRelation(1, "id"), mInsert(1, "1")}, wantErr: "decode Insert message at 0/1: outside a transaction"},
		{name: "commit without begin", msgs: [][]byte{mCommit(100, 120)}, wantErr: "decode Commit message at 0/0: outside a transaction"},
		{name: "nested begin", msgs: [][]byte{mBegin(100, 7), mBegin(100, 7)}, wantErr: "inside an open transaction"},
		{name: "unknown message", msgs: [][]byte{{'Z', 1}}, wantErr: "decode unknown 'Z' message at 0/0"},
		{name: "unknown binary message", msgs: [][]byte{{0x01}}, wantErr: "unknown 0x01"},
		{name: "empty message", msgs: [][]byte{{}}, wantErr: "empty message"},
		{name: "short begin", msgs: [][]byte{mBegin(1, 2)[:10]}, wantErr: "decode Begin message at 0/0: message too short"},
		{name: "trailing bytes", msgs: [][]byte{append(mBegin(1, 2), 0)}, wantErr: "1 unexpected trailing bytes"},
		{name: "unknown relation", msgs: [][]byte{mBegin(100, 7), mInsert(9, "1")}, wantErr: "unknown relation 9"},
		{name: "column count mismatch", msgs: [][]byte{mRelation(1, "id", "v"), mBegin(100, 7), mInsert(1, "1")}, wantErr: "tuple has 1 columns, relation 2"},
		{name: "commit lsn mismatch", msgs: [][]byte{mBegin(100, 7), mCommit(101, 120)}, wantErr: "does not match"},
		{name: "huge column count", msgs: [][]byte{mRelation(1, "id"), mBegin(100, 7), append(binary.BigEndian.AppendUint32([]byte{'I'}, 1), 'N', 0xff, 0xff)}, wantErr: "tuple claims 65535 columns"},
		{name: "value longer than message", msgs: [][]byte{mRelation(1, "id"), mBegin(100, 7), append(binary.BigEndian.AppendUint32([]byte{'I'}, 1), 'N', 0, 1, 't', 0xff, 0xff, 0xff, 0xff, 'x')}, wantErr: "message too short"},
		{
			name:   "origin filters the transaction",
			msgs:   [][]byte{mRelation(1, "id"), mBegin(100, 7), mOrigin(), mInsert(1, "1"), mCommit(100, 120), mBegin(200, 8), mInsert(1, "2"), mCommit(200, 220)},
			want:   "BEGIN changes=1\n  INSERT public.t identity=d [id:25*]\n    new: id=\"2\"\nCOMMIT\n",
			filter: 1,
		},
		{name: "origin outside a transaction", msgs: [][]byte{mOrigin()}, wantErr: "decode Origin message at 0/0: outside a transaction"},
		{name: "logical message anywhere", msgs: [][]byte{mMessage(), mBegin(100, 7), mMessage(), mCommit(100, 120)}, want: "BEGIN changes=0\nCOMMIT\n"},
		{
			name: "streamed transaction with aborted subtransaction",
			msgs: [][]byte{
				mRelation(1, "id"),
				mStreamStart(10), mInsertX(10, 1, "1"), mInsertX(11, 1, "2"), {'E'},
				mBegin(300, 20), mInsert(1, "9"), mCommit(300, 320), // another transaction commits meanwhile
				mStreamStart(10), mInsertX(11, 1, "3"), mInsertX(12, 1, "4"), {'E'},
				mStreamAbort(10, 11),
				mStreamStart(10), mInsertX(10, 1, "5"), {'E'},
				mStreamCommit(10, 400, 420),
			},
			want: "BEGIN changes=1\n  INSERT public.t identity=d [id:25*]\n    new: id=\"9\"\nCOMMIT\n" +
				"BEGIN changes=3\n  INSERT public.t identity=d [id:25*]\n    new: id=\"1\"\n  INSERT public.t identity=d [id:25*]\n    new: id=\"4\"\n  INSERT public.t identity=d [id:25*]\n    new: id=\"5\"\nCOMMIT\n",
		},
		{name: "stream abort of an unknown transaction", msgs: [][]byte{mStreamAbort(10, 10), mStreamAbort(10, 11)}},
		{name: "stream abort with v4 fields", msgs: [][]byte{mStreamStart(10), {'E'}, append(mStreamAbort(10, 10), make([]byte, 16)...)}},
		{name: "aborted stream is not committed", msgs: [][]byte{mStreamStart(10), {'E'}, mStreamAbort(10, 10), mStreamCommit(10, 1, 2)}, wantErr: "commit of unknown streamed transaction 10"},
		{name: "stream stop without start", msgs: [][]byte{{'E'}}, wantErr: "decode Stream Stop message at 0/0: outside a stream block"},
		{name: "begin inside a stream block", msgs: [][]byte{mStreamStart(10), mBegin(1, 2)}, wantErr: "inside a stream block"},
		{
			name:   "streamed transaction with origin",
			msgs:   [][]byte{mRelation(1, "id"), mStreamStart(10), mOrigin(), mInsertX(10, 1, "1"), {'E'}, mStreamCommit(10, 400, 420)},
			filter: 1,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := NewAssembler("na")
			var txns []*Txn
			var err error
			for i, m := range tc.msgs {
				var txn *Txn
				txn, err = a.Feed(pglogrepl.LSN(i), m)
				if err != nil {
					if i != len(tc.msgs)-1 {
						t.Fatalf("Feed(%q) = %v at message %d, want no error", m, err, i)
					}
					break
				}
				if txn != nil {
					txns = append(txns, txn)
				}
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Feed(...) = %v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Feed(...) = %v, want no error", err)
			}
			if got := render(txns); got != tc.want {
				t.Fatalf("Feed(...) transactions:\n%s\nwant:\n%s", got, tc.want)
			}
			if a.Filtered() != tc.filter {
				t.Fatalf("Filtered() = %d, want %d", a.Filtered(), tc.filter)
			}
			for _, txn := range txns {
				if txn.Origin != "na" {
					t.Fatalf("Origin = %q, want na", txn.Origin)
				}
			}
		})
	}
}

// TestAssemblerRelationReplaced checks that a new Relation message makes a
// new Relation and leaves already built changes alone, and that values do
// not alias the fed buffer.
func TestAssemblerRelationReplaced(t *testing.T) {
	a := NewAssembler("na")
	feed := func(m []byte) *Txn {
		t.Helper()
		txn, err := a.Feed(1, m)
		if err != nil {
			t.Fatalf("Feed(%q) = %v", m, err)
		}
		for i := range m {
			m[i] = 0 // the caller reuses its buffer
		}
		return txn
	}
	feed(mRelation(1, "id"))
	feed(mBegin(100, 7))
	feed(mInsert(1, "one"))
	feed(mRelation(1, "id", "extra"))
	feed(mInsert(1, "two", "x"))
	txn := feed(mCommit(100, 120))
	before, after := txn.Changes[0].Rel, txn.Changes[1].Rel
	if before == after || len(before.Columns) != 1 || len(after.Columns) != 2 {
		t.Fatalf("relations: same %v, columns %d and %d; want distinct with 1 and 2", before == after, len(before.Columns), len(after.Columns))
	}
	if string(txn.Changes[0].New[0].Data) != "one" || before.Columns[0].Name != "id" || !before.Columns[0].Key {
		t.Fatalf("decoded data changed when the buffer was reused: %q %+v", txn.Changes[0].New[0].Data, before.Columns[0])
	}
	if txn.EndLSN != 120 || txn.CommitLSN != 100 || txn.Xid != 7 {
		t.Fatalf("txn lsn %s end %s xid %d, want 0/64 0/78 7", txn.CommitLSN, txn.EndLSN, txn.Xid)
	}
}

// BenchmarkAssembler decodes a 10,000-row transaction of three columns.
func BenchmarkAssembler(b *testing.B) {
	rel := mRelation(1, "id", "name", "note")
	ins := mInsert(1, "12345", "some name", strings.Repeat("n", 60))
	begin, commit := mBegin(100, 7), mCommit(100, 120)
	b.SetBytes(int64(10000 * len(ins)))
	b.ReportAllocs()
	for b.Loop() {
		a := NewAssembler("na")
		if _, err := a.Feed(1, rel); err != nil {
			b.Fatal(err)
		}
		if _, err := a.Feed(2, begin); err != nil {
			b.Fatal(err)
		}
		for range 10000 {
			if _, err := a.Feed(3, ins); err != nil {
				b.Fatal(err)
			}
		}
		if txn, err := a.Feed(4, commit); err != nil || len(txn.Changes) != 10000 {
			b.Fatalf("commit: %v", err)
		}
	}
}

// pgbenchTxn is the pgoutput stream of one pgbench TPC-B transaction:
// three UPDATEs of four-column rows and one INSERT of five columns.
func pgbenchTxn(origin bool) [][]byte {
	msgs := [][]byte{mBegin(100, 7)}
	if origin {
		msgs = append(msgs, mOrigin())
	}
	return append(msgs,
		mUpdate(1, nil, "41234", "3", "-2719", strings.Repeat(" ", 84)),
		mUpdate(2, nil, "27", "3", "-18345", "<null>"),
		mUpdate(3, nil, "3", "-42981", "<null>"),
		mInsert(4, "0a1b2c3d-0000-4000-8000-000000000001", "27", "3", "41234", "-2719", "2026-12-03 08:23:08.123456+00"),
		mCommit(100, 120))
}

// benchPgbench feeds 1,000 pgbench transactions per iteration.
func benchPgbench(b *testing.B, origin bool) {
	rels := [][]byte{mRelation(1, "aid", "bid", "abalance", "filler"), mRelation(2, "tid", "bid", "tbalance", "filler"),
		mRelation(3, "bid", "bbalance", "filler"), mRelation(4, "id", "tid", "bid", "aid", "delta", "mtime")}
	txn := pgbenchTxn(origin)
	var size int
	for _, m := range txn {
		size += len(m)
	}
	a := NewAssembler("na")
	for _, m := range rels {
		if _, err := a.Feed(1, m); err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(1000 * size))
	b.ReportAllocs()
	for b.Loop() {
		for range 1000 {
			var got *Txn
			for _, m := range txn {
				t, err := a.Feed(2, m)
				if err != nil {
					b.Fatal(err)
				}
				got = t
			}
			if (got == nil) != origin {
				b.Fatalf("commit returned %v", got)
			}
		}
	}
}

// BenchmarkAssemblerPgbench decodes local pgbench transactions.
func BenchmarkAssemblerPgbench(b *testing.B) { benchPgbench(b, false) }

// BenchmarkAssemblerOrigin decodes pgbench transactions that carry a
// replication origin (the changes a region's applier made), which are
// dropped.
func BenchmarkAssemblerOrigin(b *testing.B) { benchPgbench(b, true) }

// TestAssemblerOriginNotParsed checks that the rows of a transaction
// that carries a replication origin are dropped without being parsed: no
// allocation per row, even for rows of a relation never described.
func TestAssemblerOriginNotParsed(t *testing.T) {
	a := NewAssembler("na")
	for _, m := range [][]byte{mRelation(1, "id", "v"), mBegin(100, 7), mOrigin()} {
		if _, err := a.Feed(1, m); err != nil {
			t.Fatal(err)
		}
	}
	upd := mUpdate(1, nil, "1", strings.Repeat("x", 100))
	unknown := mInsert(99, "1")
	allocs := testing.AllocsPerRun(100, func() {
		for _, m := range [][]byte{upd, unknown} {
			if _, err := a.Feed(2, m); err != nil {
				t.Fatal(err)
			}
		}
	})
	if allocs != 0 {
		t.Fatalf("dropped rows: %.1f allocations per run, want 0", allocs)
	}
	txn, err := a.Feed(3, mCommit(100, 120))
	if err != nil || txn != nil || a.Filtered() != 1 {
		t.Fatalf("commit = %v, %v; Filtered() = %d; want nil, nil, 1", txn, err, a.Filtered())
	}
}

// TestAssemblerRowAllocs checks that a row's values share one copy of its
// message: the allocations of a transaction do not grow with its columns.
func TestAssemblerRowAllocs(t *testing.T) {
	cols := []string{"c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"}
	a := NewAssembler("na")
	if _, err := a.Feed(1, mRelation(1, cols...)); err != nil {
		t.Fatal(err)
	}
	msgs := [][]byte{mBegin(100, 7), mInsert(1, cols...), mCommit(100, 120)}
	var txn *Txn
	allocs := testing.AllocsPerRun(100, func() {
		for _, m := range msgs {
			got, err := a.Feed(2, m)
			if err != nil {
				t.Fatal(err)
			}
			if got != nil {
				txn = got
			}
		}
	})
	// The Txn, its change slice, the row's values and the one copy.
	if allocs > 4 {
		t.Fatalf("a transaction of one 10-column row: %.1f allocations, want at most 4", allocs)
	}
	if v := txn.Changes[0].New[9]; string(v.Data) != "c9" || cap(v.Data) != 2 {
		t.Fatalf("last value %q with capacity %d, want \"c9\" with capacity 2", v.Data, cap(v.Data))
	}
}

// TestAssemblerRowsIndependent checks that rows decoded from the shared
// chunks stay independent: appending to one row's values or to one
// value's bytes never changes another row.
func TestAssemblerRowsIndependent(t *testing.T) {
	a := NewAssembler("na")
	if _, err := a.Feed(1, mRelation(1, "id", "v")); err != nil {
		t.Fatal(err)
	}
	var txns []*Txn
	for i := range 3 {
		for _, m := range [][]byte{mBegin(uint64(100*i+10), uint32(i+1)), mInsert(1, "1", "one"), mInsert(1, "2", "two"), mCommit(uint64(100*i+10), uint64(100*i+20))} {
			txn, err := a.Feed(2, m)
			if err != nil {
				t.Fatal(err)
			}
			if txn != nil {
				txns = append(txns, txn)
			}
		}
	}
	if len(txns) != 3 {
		t.Fatalf("got %d transactions, want 3", len(txns))
	}
	first := txns[0].Changes[0]
	first.New = append(first.New, Value{Kind: ValueText, Data: []byte("extra")})
	first.New[1].Data = append(first.New[1].Data, "-and-more"...)
	for i, txn := range txns {
		for j, c := range txn.Changes {
			want := [][]string{{"1", "one"}, {"2", "two"}}[j]
			if len(c.New) != 2 || string(c.New[0].Data) != want[0] || string(c.New[1].Data) != want[1] {
				t.Fatalf("transaction %d change %d = %q after appending to the first row, want %q", i, j, c.New, want)
			}
		}
	}
}

// TestAssemblerAllocations checks that a pgbench transaction costs the
// reader two allocations (the transaction and its changes), not two a
// row: rows take their values and bytes from shared chunks.
func TestAssemblerAllocations(t *testing.T) {
	a := NewAssembler("na")
	for _, m := range [][]byte{mRelation(1, "aid", "bid", "abalance", "filler"), mRelation(2, "tid", "bid", "tbalance", "filler"),
		mRelation(3, "bid", "bbalance", "filler"), mRelation(4, "id", "tid", "bid", "aid", "delta", "mtime")} {
		if _, err := a.Feed(1, m); err != nil {
			t.Fatal(err)
		}
	}
	txn := pgbenchTxn(false)
	feed := func() {
		for _, m := range txn {
			if _, err := a.Feed(2, m); err != nil {
				t.Fatal(err)
			}
		}
	}
	feed() // the first sets the changes' capacity
	// Chunks are shared by many transactions: average over enough of them.
	per := testing.AllocsPerRun(2000, feed)
	if per > 2.1 {
		t.Fatalf("%.2f allocations per pgbench transaction, want 2 (the transaction and its changes) and a shared chunk now and then", per)
	}
}

// TestTxnSizeHeld: Txn.Size, which bounds a shipper's window
// (delivery.max_in_flight) and decides when a transaction spills, is
// within a quarter of the heap that the decoded transactions it measures
// hold, for narrow rows (where the values' headers and the Change and
// Value structs outweigh the data), wide ones, many changes to a
// transaction and old rows: an estimate of half the heap let a 64 MiB
// window hold 125 MB.
func TestTxnSizeHeld(t *testing.T) {
	rels := [][]byte{mRelation(1, "aid", "bid", "abalance", "filler"), mRelation(2, "tid", "bid", "tbalance", "filler"),
		mRelation(3, "bid", "bbalance", "filler"), mRelation(4, "id", "tid", "bid", "aid", "delta", "mtime")}
	a := NewAssembler("na")
	for _, m := range rels {
		if _, err := a.Feed(1, m); err != nil {
			t.Fatal(err)
		}
	}
	narrow := [][]byte{mBegin(100, 7)}
	for range 100 {
		narrow = append(narrow, mUpdate(2, nil, "27", "3", "-18345", "<null>"))
	}
	shapes := []struct {
		name string
		msgs [][]byte
	}{
		{"pgbench", pgbenchTxn(false)},
		{"one wide row", [][]byte{mBegin(100, 7), mUpdate(1, nil, "41234", "3", "-2719", strings.Repeat("x", 2000)), mCommit(100, 120)}},
		{"100 narrow rows", append(narrow, mCommit(100, 120))},
		{"old and new rows", [][]byte{mBegin(100, 7), mUpdate(3, []string{"3", "-42981", "<null>"}, "3", "-42982", "<null>"),
			mUpdate(3, []string{"4", "17", "<null>"}, "4", "18", "<null>"), mCommit(100, 120)}},
	}
	for _, sh := range shapes {
		const n = 20000
		keep := make([]*Txn, 0, n)
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		size := 0
		for range n {
			var txn *Txn
			for _, m := range sh.msgs {
				got, err := a.Feed(2, m)
				if err != nil {
					t.Fatal(err)
				}
				if got != nil {
					txn = got
				}
			}
			keep = append(keep, txn)
			size += txn.Size()
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		held := float64(after.HeapAlloc) - float64(before.HeapAlloc) - float64(cap(keep))*8
		runtime.KeepAlive(keep)
		if r := held / float64(size); r < 0.8 || r > 1.25 {
			t.Errorf("%s: the transactions hold %.0f bytes each, Size says %d: ratio %.2f, want 0.8-1.25", sh.name, held/n, size/n, r)
		}
	}
}
