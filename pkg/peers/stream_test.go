package peers

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/prism-cdc/prism-cdc/internal/faultproxy"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// streamApp is a memApplier that also applies streamed transactions,
// keeping the changes of each applied one and counting chunks.
type streamApp struct {
	*memApplier
	smu     sync.Mutex
	streams map[pglogrepl.LSN][]decode.Change
	chunks  int
	// onChunk, when set, runs for every chunk received and may fail the
	// apply with its error.
	onChunk func(lsn pglogrepl.LSN, n int) error
}

func newStreamApp() *streamApp {
	return &streamApp{memApplier: newMemApplier(), streams: map[pglogrepl.LSN][]decode.Change{}}
}

func (s *streamApp) ApplyStream(ctx context.Context, txn *decode.Txn, next func() ([]decode.Change, error)) error {
	var got []decode.Change
	n := 0
	for {
		c, err := next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		n++
		s.smu.Lock()
		s.chunks++
		hook := s.onChunk
		s.smu.Unlock()
		if hook != nil {
			if err := hook(txn.EndLSN, n); err != nil {
				return err
			}
		}
		got = append(got, c...)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls++
	if txn.EndLSN <= s.progress[txn.Origin] {
		return nil
	}
	s.progress[txn.Origin] = txn.EndLSN
	s.applied = append(s.applied, txn.EndLSN)
	s.smu.Lock()
	s.streams[txn.EndLSN] = got
	s.smu.Unlock()
	return nil
}

func (s *streamApp) stream(lsn pglogrepl.LSN) []decode.Change {
	s.smu.Lock()
	defer s.smu.Unlock()
	return s.streams[lsn]
}

// pgoutput messages, enough to make the Assembler spill a transaction.
func pgRelation() []byte {
	b := binary.BigEndian.AppendUint32([]byte{'R'}, 16384)
	b = append(b, "public\x00items\x00d"...)
	b = binary.BigEndian.AppendUint16(b, 2)
	b = append(b, 1)
	b = binary.BigEndian.AppendUint32(append(b, "id\x00"...), 23)
	b = binary.BigEndian.AppendUint32(b, 0xffffffff)
	b = append(b, 0)
	b = binary.BigEndian.AppendUint32(append(b, "v\x00"...), 25)
	return binary.BigEndian.AppendUint32(b, 0xffffffff)
}

func pgInsert(id int, v string) []byte {
	b := append(binary.BigEndian.AppendUint32([]byte{'I'}, 16384), 'N')
	b = binary.BigEndian.AppendUint16(b, 2)
	for _, s := range []string{fmt.Sprint(id), v} {
		b = binary.BigEndian.AppendUint32(append(b, 't'), uint32(len(s)))
		b = append(b, s...)
	}
	return b
}

// spilledTxn returns transaction i (EndLSN lsnOf(i)) with n inserts of
// pad-byte values, spilled to a file in small chunks.
func spilledTxn(t *testing.T, i, n, pad int) (*decode.Txn, []decode.Change) {
	t.Helper()
	asm := decode.NewAssembler("na", decode.SpillOver(t.TempDir(), 1, 8<<10))
	end := lsnOf(i)
	begin := binary.BigEndian.AppendUint64([]byte{'B'}, uint64(end-0x30))
	begin = binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(begin, 1), uint32(1000+i))
	commit := binary.BigEndian.AppendUint64([]byte{'C', 0}, uint64(end-0x30))
	commit = binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(commit, uint64(end)), 1)
	msgs := [][]byte{pgRelation(), begin}
	for k := range n {
		msgs = append(msgs, pgInsert(i*100000+k, strings.Repeat("x", pad)))
	}
	msgs = append(msgs, commit)
	var txn *decode.Txn
	for j, m := range msgs {
		out, err := asm.Feed(pglogrepl.LSN(j), m)
		if err != nil {
			t.Fatalf("Feed = %v", err)
		}
		if out != nil {
			txn = out
		}
	}
	if txn == nil || txn.Spill == nil {
		t.Fatalf("transaction did not spill")
	}
	t.Cleanup(txn.Spill.Release)
	var all []decode.Change
	if err := txn.Spill.Each(func(c []decode.Change) error { all = append(all, c...); return nil }); err != nil {
		t.Fatal(err)
	}
	return txn, all
}

func TestStreamFramesRoundTrip(t *testing.T) {
	in := sampleTxn()
	hdr := *in
	hdr.Changes = nil
	for _, f := range []any{
		&txnBegin{Txn: &hdr, Count: 4},
		&txnChunk{Changes: in.Changes},
		&txnEnd{LSN: in.EndLSN},
	} {
		got, err := decodeFrame(encode(t, f)[4:])
		if err != nil {
			t.Fatalf("decodeFrame(%T) = %v", f, err)
		}
		if b, ok := got.(*txnBegin); ok {
			b.Txn.CommitTime = hdr.CommitTime
		}
		if !reflect.DeepEqual(got, f) {
			t.Fatalf("round trip %T:\n got %+v\nwant %+v", f, got, f)
		}
	}
	// A spilled transaction never goes into a single Txn frame.
	sp, _ := spilledTxn(t, 1, 10, 10)
	if _, err := appendFrame(nil, &txnFrame{Txn: sp}); err == nil {
		t.Fatalf("appendFrame(spilled txn) = nil error")
	}
}

// TestShipStreamed ships a spilled transaction between in-memory ones:
// it arrives in many chunks, complete, in order; a retryable failure
// mid-stream and a connection reset mid-stream each make the shipper send
// it again from the start, and it is applied exactly once.
func TestShipStreamed(t *testing.T) {
	ctx := testCtx(t)
	app := newStreamApp()
	addr := serve(t, NewServer(serverConfig("eu", "eu1"), app, (newLogBuf(t)).logger()))
	proxy, err := faultproxy.New(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	// The reset below must cut transaction 4 while it is still being
	// sent: unthrottled, its 25 chunks can all sit in the server's socket
	// buffer by the time it applies the fifth, and the first attempt then
	// completes. At 512 KB/s the 320 KB after the fifth chunk take 0.6 s.
	proxy.Bandwidth(512 << 10)
	var mu sync.Mutex
	attempts := map[pglogrepl.LSN]int{}
	app.onChunk = func(lsn pglogrepl.LSN, n int) error {
		mu.Lock()
		defer mu.Unlock()
		if n != 5 {
			return nil
		}
		attempts[lsn]++
		switch {
		case lsn == lsnOf(2) && attempts[lsn] == 1:
			return &testErr{code: "40001", temp: true}
		case lsn == lsnOf(4) && attempts[lsn] == 1:
			proxy.Reset()
		}
		return nil
	}
	cfg := shipperConfig(NodeAddr{Name: "eu1", Addr: proxy.Addr()})
	cfg.ChunkBytes = 16 << 10
	cfg.Retries = 50
	// Throttled, a chunk's write and the ACK of a whole spilled
	// transaction take longer than the helpers' 200 ms.
	cfg.AckTimeout = 3 * time.Second
	sh := NewShipper(cfg, nil, (newLogBuf(t)).logger())
	runShipper(t, sh)

	big2, want2 := spilledTxn(t, 2, 3000, 100)
	big4, want4 := spilledTxn(t, 4, 2000, 200)
	for _, txn := range []*decode.Txn{mkTxn(1, 0), big2, mkTxn(3, 0), big4, mkTxn(5, 0)} {
		if err := sh.Send(ctx, txn); err != nil {
			t.Fatal(err)
		}
	}
	if w := sh.Status().WindowBytes; w > 10000 {
		t.Fatalf("window holds %d bytes with two spilled transactions, want only their headers", w)
	}
	waitFor(t, "all acked", 30*time.Second, func() bool { return sh.Acked() == lsnOf(5) })
	got := app.appliedLSNs()
	if !reflect.DeepEqual(got, []pglogrepl.LSN{lsnOf(1), lsnOf(2), lsnOf(3), lsnOf(4), lsnOf(5)}) {
		t.Fatalf("applied %v, want 1..5 once each in order", got)
	}
	if !reflect.DeepEqual(app.stream(lsnOf(2)), want2) || !reflect.DeepEqual(app.stream(lsnOf(4)), want4) {
		t.Fatalf("streamed changes differ from the spilled ones (%d and %d changes)", len(app.stream(lsnOf(2))), len(app.stream(lsnOf(4))))
	}
	mu.Lock()
	defer mu.Unlock()
	if attempts[lsnOf(2)] != 2 || attempts[lsnOf(4)] != 2 {
		t.Fatalf("stream attempts %v, want 2 each (failed once, then resent)", attempts)
	}
	app.smu.Lock()
	defer app.smu.Unlock()
	// 3000*~110 bytes in 16 KiB chunks is about 20 chunks per attempt.
	if app.chunks < 40 {
		t.Fatalf("%d chunks received, want many small ones", app.chunks)
	}
}

// TestShipStreamedHaltAndFallback: a permanent failure of a streamed
// transaction halts the region (it is never parked); through the
// direct-SQL fallback a spilled transaction is streamed into the same
// ApplyStream.
func TestShipStreamedHaltAndFallback(t *testing.T) {
	ctx := testCtx(t)
	app := newStreamApp()
	var broken sync.Mutex
	fixed := false
	app.onChunk = func(lsn pglogrepl.LSN, n int) error {
		broken.Lock()
		defer broken.Unlock()
		if !fixed && n == 2 {
			return &testErr{code: "23514", temp: false}
		}
		return nil
	}
	handler := &countingHandler{}
	cfg := shipperConfig()
	cfg.Errors = handler
	sh := NewShipper(cfg, func(ctx context.Context) (Applier, func(), error) { return app, func() {}, nil }, (newLogBuf(t)).logger())
	runShipper(t, sh)
	big, want := spilledTxn(t, 2, 500, 100)
	for _, txn := range []*decode.Txn{mkTxn(1, 0), big, mkTxn(3, 0)} {
		if err := sh.Send(ctx, txn); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "halt", 10*time.Second, func() bool { return strings.HasPrefix(sh.Status().Path, "halted: 23514") })
	if sh.Acked() != lsnOf(1) || handler.n() != 0 {
		t.Fatalf("acked %s, %d policy calls; want txn 1 acked and the streamed one halted without parking", sh.Acked(), handler.n())
	}
	broken.Lock()
	fixed = true
	broken.Unlock()
	waitFor(t, "resume", 10*time.Second, func() bool { return sh.Acked() == lsnOf(3) })
	if !reflect.DeepEqual(app.stream(lsnOf(2)), want) {
		t.Fatalf("fallback streamed %d changes, want %d", len(app.stream(lsnOf(2))), len(want))
	}
}

// countingHandler is an ErrorHandler that parks everything and counts.
type countingHandler struct {
	mu    sync.Mutex
	calls int
}

func (h *countingHandler) n() int { h.mu.Lock(); defer h.mu.Unlock(); return h.calls }

func (h *countingHandler) Handle(ctx context.Context, app Applier, txn *decode.Txn, err error) (Action, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls++
	return ActionDeadLetter, nil
}

func (h *countingHandler) PendingUndos(ctx context.Context, app Applier, source string) ([]UndoRequest, error) {
	return nil, nil
}

func (h *countingHandler) Undone(ctx context.Context, app Applier, source string, lsn pglogrepl.LSN, status, note string) error {
	return nil
}

// TestStreamProtocolViolations: the server refuses chunks outside a
// streamed transaction, an end with the wrong LSN or count, and a Txn
// frame inside a streamed transaction, by dropping the connection.
func TestStreamProtocolViolations(t *testing.T) {
	hdr := mkTxn(1, 0)
	changes := hdr.Changes
	hdr.Changes = nil
	cases := []struct {
		name   string
		frames []any
	}{
		{"chunk without begin", []any{&txnChunk{Changes: changes}}},
		{"end without begin", []any{&txnEnd{LSN: hdr.EndLSN}}},
		{"more changes than announced", []any{&txnBegin{Txn: hdr, Count: 0}, &txnChunk{Changes: changes}}},
		{"end before all changes", []any{&txnBegin{Txn: hdr, Count: 2}, &txnChunk{Changes: changes}, &txnEnd{LSN: hdr.EndLSN}}},
		{"end of another transaction", []any{&txnBegin{Txn: hdr, Count: 1}, &txnChunk{Changes: changes}, &txnEnd{LSN: hdr.EndLSN + 1}}},
		{"txn inside a stream", []any{&txnBegin{Txn: hdr, Count: 1}, &txnFrame{Txn: mkTxn(2, 0)}}},
		{"begin of another origin", []any{&txnBegin{Txn: &decode.Txn{Origin: "as", EndLSN: 5}, Count: 1}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			app := newStreamApp()
			addr := serve(t, NewServer(serverConfig("eu", "eu1"), app, (newLogBuf(t)).logger()))
			fc := dialHello(t, addr)
			if err := fc.write(time.Second, tc.frames...); err != nil {
				t.Fatal(err)
			}
			for {
				f, err := fc.read(5 * time.Second)
				if err != nil {
					break // dropped: what we want
				}
				if _, ok := f.(*heartbeat); !ok {
					t.Fatalf("server answered %T, want the connection dropped", f)
				}
			}
			if got := app.appliedLSNs(); len(got) != 0 {
				t.Fatalf("applied %v from a broken stream", got)
			}
		})
	}
}

// dialHello connects to a server as source na and reads the Welcome.
func dialHello(t *testing.T, addr string) *frameConn {
	t.Helper()
	sh := NewShipper(shipperConfig(NodeAddr{Name: "eu1", Addr: addr}), nil, (newLogBuf(t)).logger())
	fc, _, err := sh.handshake(testCtx(t), 0, 0)
	if err != nil {
		t.Fatalf("handshake = %v", err)
	}
	t.Cleanup(func() { fc.close() })
	return fc
}

// TestOlderShipperRejected: a shipper of protocol version 1 or 2 (it
// sends its token in the Hello without waiting for a challenge) is refused
// with a clear reason and nothing it sends is applied.
func TestOlderShipperRejected(t *testing.T) {
	logs := newLogBuf(t)
	app := newStreamApp()
	addr := serve(t, NewServer(serverConfig("eu", "eu1"), app, logs.logger()))
	for _, v := range []uint16{1, 2} {
		old := append(encode(t, &hello{Version: v, Region: "na", Node: "na1", MAC: []byte(testToken)}), encode(t, &txnFrame{Txn: mkTxn(1, 0)})...)
		c := rawDial(t, addr, old)
		f, err := reply(t, c)
		r, ok := f.(*reject)
		if !ok || err != nil || !strings.Contains(r.Reason, fmt.Sprintf("peer speaks protocol %d", v)) || !strings.Contains(r.Reason, "upgrade both sides") {
			t.Fatalf("version %d hello answered with %T %+v, %v; want a reject asking to upgrade", v, f, f, err)
		}
	}
	if got := app.appliedLSNs(); len(got) != 0 {
		t.Fatalf("applied %v from an older shipper", got)
	}
	if strings.Contains(logs.String(), testToken) {
		t.Fatalf("the older shipper's clear token is in the log:\n%s", logs.String())
	}
}
