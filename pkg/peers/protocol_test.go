package peers

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// sampleTxn has every op and every value kind, relations shared between
// changes, a nil old row and an empty string value.
func sampleTxn() *decode.Txn {
	items := &decode.Relation{ID: 16384, Schema: "public", Table: "items", ReplicaIdentity: decode.IdentityDefault, Columns: []decode.Column{
		{Name: "id", TypeOID: 23, TypeMod: -1, Key: true},
		{Name: "v", TypeOID: 25, TypeMod: -1},
		{Name: "mood", TypeOID: 70000, TypeName: "public.mood", TypeMod: -1},
	}}
	other := &decode.Relation{ID: 16390, Schema: "s", Table: "other", ReplicaIdentity: decode.IdentityFull, Columns: []decode.Column{
		{Name: "k", TypeOID: 1043, TypeMod: 14, Key: true},
	}}
	return &decode.Txn{
		Origin:     "na",
		Xid:        742,
		CommitLSN:  pglogrepl.LSN(0x16B3748),
		EndLSN:     pglogrepl.LSN(0x16B3778),
		CommitTime: time.Date(2024, 5, 6, 7, 8, 9, 123456000, time.UTC),
		Changes: []decode.Change{
			{Op: decode.OpInsert, Rel: items, New: []decode.Value{{Kind: decode.ValueText, Data: []byte("1")}, {Kind: decode.ValueText, Data: []byte{}}, {Kind: decode.ValueNull}}},
			{Op: decode.OpUpdate, Rel: items,
				Old: []decode.Value{{Kind: decode.ValueText, Data: []byte("1")}, {Kind: decode.ValueNull}, {Kind: decode.ValueNull}},
				New: []decode.Value{{Kind: decode.ValueText, Data: []byte("1")}, {Kind: decode.ValueUnchanged}, {Kind: decode.ValueBinary, Data: []byte{0, 1, 2, 255}}}},
			{Op: decode.OpDelete, Rel: other, Old: []decode.Value{{Kind: decode.ValueText, Data: []byte("k1")}}},
			{Op: decode.OpTruncate, Rel: items, Truncated: []*decode.Relation{items, other}, TruncateFlags: decode.TruncateCascade | decode.TruncateRestartIdentity},
		},
	}
}

func encode(t testing.TB, f any) []byte {
	t.Helper()
	b, err := appendFrame(nil, f)
	if err != nil {
		t.Fatalf("appendFrame(%T) = %v", f, err)
	}
	return b
}

func TestTxnRoundTrip(t *testing.T) {
	in := sampleTxn()
	b := encode(t, &txnFrame{Txn: in})
	if n := binary.BigEndian.Uint32(b); int(n) != len(b)-4 {
		t.Fatalf("length prefix %d, want %d", n, len(b)-4)
	}
	f, err := decodeFrame(b[4:])
	if err != nil {
		t.Fatalf("decodeFrame = %v", err)
	}
	out := f.(*txnFrame).Txn
	if !out.CommitTime.Equal(in.CommitTime) {
		t.Fatalf("CommitTime = %v, want %v", out.CommitTime, in.CommitTime)
	}
	out.CommitTime = in.CommitTime
	if !reflect.DeepEqual(out, in) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", out, in)
	}
	// Relations stay shared within a frame.
	if out.Changes[0].Rel != out.Changes[1].Rel || out.Changes[3].Truncated[1] != out.Changes[2].Rel {
		t.Fatalf("relations are not shared after decoding")
	}
	// A zero commit time stays zero.
	in.CommitTime = time.Time{}
	f, err = decodeFrame(encode(t, &txnFrame{Txn: in})[4:])
	if err != nil || !f.(*txnFrame).Txn.CommitTime.IsZero() {
		t.Fatalf("zero commit time: %v, %v", err, f)
	}
}

func TestControlFramesRoundTrip(t *testing.T) {
	for _, f := range []any{
		&hello{Version: ProtocolVersion, Flags: helloProbe, Region: "na", Node: "na1", MAC: HelloMAC("s3cret", make([]byte, NonceSize), "na", "na1", helloProbe)},
		&challenge{Version: ProtocolVersion, Nonce: [NonceSize]byte{1, 2, 3, 31: 9}},
		&welcome{Region: "eu", Node: "eu1", Progress: 0xABCDEF},
		&reject{Reason: "wrong token"},
		&ack{LSN: 42},
		&nack{LSN: 43, SQLState: "23505", Message: "duplicate key", Retryable: false},
		&nack{LSN: 44, SQLState: "40001", Message: "serialization", Retryable: true},
		&heartbeat{},
	} {
		got, err := decodeFrame(encode(t, f)[4:])
		if err != nil || !reflect.DeepEqual(got, f) {
			t.Errorf("decodeFrame(encode(%+v)) = %+v, %v", f, got, err)
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	txn := encode(t, &txnFrame{Txn: sampleTxn()})[4:]
	hello := encode(t, &hello{Version: ProtocolVersion, Region: "na", MAC: []byte("m")})[4:]
	chal := encode(t, &challenge{Version: ProtocolVersion})[4:]
	mutate := func(b []byte, i int, v byte) []byte {
		c := bytes.Clone(b)
		c[i] = v
		return c
	}
	cases := []struct {
		name string
		in   []byte
	}{
		{"empty", nil},
		{"unknown type", []byte{'Z'}},
		{"truncated ack", []byte{frameAck, 0, 0, 0}},
		{"trailing bytes", append(encode(t, &ack{LSN: 1})[4:], 0)},
		{"bad magic", mutate(hello, 1, 'X')},
		{"challenge bad magic", mutate(chal, 1, 'X')},
		{"challenge short nonce", chal[:len(chal)-1]},
		{"challenge trailing", append(bytes.Clone(chal), 0)},
		{"bad bool", append(encode(t, &nack{})[4:len(encode(t, &nack{}))-1], 7)},
		{"huge string", []byte{frameReject, 0xff, 0xff, 0xff, 0xff, 'a'}},
		{"truncated txn", txn[:len(txn)-1]},
		{"txn trailing", append(bytes.Clone(txn), 0)},
		{"huge relation count", func() []byte {
			d := encode(t, &txnFrame{Txn: &decode.Txn{Origin: "na"}})[4:]
			// header: type, origin (4+2), xid 4, lsns 16, time 1+8, then relation count.
			i := 1 + 6 + 4 + 16 + 9
			return append(mutate(d[:i], 0, frameTxn), 0x7f, 0xff, 0xff, 0xff)
		}()},
	}
	// Flip every byte of the Txn frame once: never a panic, and an error
	// always wraps errFrame (decode's tests check what does decode).
	for i := 1; i < len(txn); i++ {
		if _, err := decodeFrame(mutate(txn, i, txn[i]^0xff)); err != nil && !errors.Is(err, errFrame) {
			t.Fatalf("flip %d: decodeFrame error %v does not wrap errFrame", i, err)
		}
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f, err := decodeFrame(tc.in)
			if !errors.Is(err, errFrame) {
				t.Fatalf("decodeFrame(%x) = %+v, %v, want errFrame", tc.in, f, err)
			}
		})
	}
}

func TestReadFrameLimit(t *testing.T) {
	// A length prefix above the limit is refused before reading the body.
	r := bytes.NewReader([]byte{0x7f, 0xff, 0xff, 0xff, 'A'})
	if _, err := readFrame(r, nil, 1024); !errors.Is(err, errFrame) {
		t.Fatalf("readFrame(oversized) = %v, want errFrame", err)
	}
	if r.Len() != 1 {
		t.Fatalf("readFrame consumed the body of an oversized frame")
	}
	if _, err := readFrame(bytes.NewReader([]byte{0, 0, 0, 0}), nil, 1024); !errors.Is(err, errFrame) {
		t.Fatalf("readFrame(zero length) = %v, want errFrame", err)
	}
	b := encode(t, &ack{LSN: 7})
	p, err := readFrame(bytes.NewReader(b[:len(b)-2]), nil, 1024)
	if err == nil {
		t.Fatalf("readFrame(truncated) = %x, nil, want error", p)
	}
}

func FuzzDecodeFrame(f *testing.F) {
	for _, fr := range []any{
		&txnFrame{Txn: sampleTxn()},
		&hello{Version: ProtocolVersion, Region: "na", Node: "na1", MAC: HelloMAC("t", make([]byte, NonceSize), "na", "na1", 0)},
		&hello{Version: ProtocolVersion, Flags: helloProbe, Region: "na", Node: "na1"},
		&challenge{Version: ProtocolVersion, Nonce: [NonceSize]byte{7, 31: 1}},
		&welcome{Region: "eu", Node: "eu1", Progress: 9},
		&reject{Reason: "no"},
		&ack{LSN: 1},
		&nack{LSN: 2, SQLState: "23505", Message: "dup", Retryable: true},
		&heartbeat{},
		&txnBegin{Txn: &decode.Txn{Origin: "na", Xid: 7, CommitLSN: 8, EndLSN: 9, CommitTime: time.Unix(5, 0).UTC()}, Count: 4},
		&txnChunk{Changes: sampleTxn().Changes},
		&txnEnd{LSN: 9},
	} {
		f.Add(encode(f, fr)[4:])
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		fr, err := decodeFrame(p)
		if err != nil {
			if !errors.Is(err, errFrame) {
				t.Fatalf("decodeFrame error %v does not wrap errFrame", err)
			}
			return
		}
		// What decodes re-encodes to the same bytes (modulo the commit
		// time's location).
		b, err := appendFrame(nil, fr)
		if err != nil {
			t.Fatalf("appendFrame(decoded %T) = %v", fr, err)
		}
		if !bytes.Equal(b[4:], p) {
			t.Fatalf("re-encoding differs:\n got %x\nwant %x", b[4:], p)
		}
	})
}
