package spool

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

var rel = &decode.Relation{ID: 1, Schema: "public", Table: "t", ReplicaIdentity: decode.IdentityDefault,
	Columns: []decode.Column{{Name: "id", TypeOID: 23, Key: true}, {Name: "v", TypeOID: 25}}}

func txn(end uint64, payload string) *decode.Txn {
	return &decode.Txn{Origin: "na", Xid: uint32(end), CommitLSN: pglogrepl.LSN(end - 1), EndLSN: pglogrepl.LSN(end),
		CommitTime: time.Unix(1700000000, 0).UTC(),
		Changes: []decode.Change{{Op: decode.OpInsert, Rel: rel, New: []decode.Value{
			{Kind: decode.ValueText, Data: []byte("1")}, {Kind: decode.ValueText, Data: []byte(payload)}}}}}
}

func open(t *testing.T, dir string, max int64) *Spool {
	t.Helper()
	s, err := Open(dir, max, []string{"eu", "as"}, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func waitDurable(t *testing.T, s *Spool, lsn pglogrepl.LSN) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for s.Durable() < lsn {
		if time.Now().After(deadline) {
			t.Fatalf("Durable() = %s, want %s", s.Durable(), lsn)
		}
		time.Sleep(time.Millisecond)
	}
}

func readAll(t *testing.T, s *Spool, after pglogrepl.LSN, n int) []pglogrepl.LSN {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r := s.NewReader(after)
	defer r.Close()
	var got []pglogrepl.LSN
	for len(got) < n {
		tx, err := r.Next(ctx)
		if err != nil {
			t.Fatalf("Next after %d records: %v", len(got), err)
		}
		got = append(got, tx.EndLSN)
	}
	return got
}

func TestAppendReadReopen(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 0)
	ctx := context.Background()
	for i := uint64(1); i <= 100; i++ {
		if err := s.Append(ctx, txn(i*10, "value")); err != nil {
			t.Fatal(err)
		}
	}
	// A resend at or below the last end LSN is ignored.
	if err := s.Append(ctx, txn(500, "dup")); err != nil {
		t.Fatal(err)
	}
	waitDurable(t, s, 1000)
	got := readAll(t, s, 495, 51)
	if got[0] != 500 || got[50] != 1000 {
		t.Fatalf("read after 495 = %v..%v, want 500..1000", got[0], got[50])
	}
	if err := s.SetCursor("eu", 700); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = open(t, dir, 0)
	defer s.Close()
	if s.Durable() != 1000 || s.Cursor("eu") != 700 || s.Cursor("as") != 0 {
		t.Fatalf("after reopen Durable=%s eu=%s as=%s, want 0/3E8 0/2BC 0/0", s.Durable(), s.Cursor("eu"), s.Cursor("as"))
	}
	if err := s.Append(ctx, txn(1010, "after reopen")); err != nil {
		t.Fatal(err)
	}
	waitDurable(t, s, 1010)
	got = readAll(t, s, 700, 31)
	if got[0] != 710 || got[30] != 1010 {
		t.Fatalf("read after 700 = %v..%v, want 710..1010", got[0], got[30])
	}
}

func TestReaderFollowsAppends(t *testing.T) {
	s := open(t, t.TempDir(), 0)
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got := make(chan pglogrepl.LSN, 10)
	errc := make(chan error, 1)
	go func() {
		r := s.NewReader(0)
		defer r.Close()
		for i := 0; i < 3; i++ {
			tx, err := r.Next(ctx)
			if err != nil {
				errc <- err
				return
			}
			got <- tx.EndLSN
		}
		errc <- nil
	}()
	for _, end := range []uint64{5, 6, 7} {
		if err := s.Append(ctx, txn(end, "x")); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	for _, want := range []pglogrepl.LSN{5, 6, 7} {
		if g := <-got; g != want {
			t.Fatalf("Next = %s, want %s", g, want)
		}
	}
}

func segFiles(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "seg-*.log"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestTornTailTruncated(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 0)
	for i := uint64(1); i <= 5; i++ {
		if err := s.Append(context.Background(), txn(i, "v")); err != nil {
			t.Fatal(err)
		}
	}
	waitDurable(t, s, 5)
	s.Close()
	seg := segFiles(t, dir)[0]
	fi, _ := os.Stat(seg)
	// A crash in the middle of writing a sixth record.
	f, _ := os.OpenFile(seg, os.O_APPEND|os.O_WRONLY, 0)
	f.Write([]byte{0, 0, 0, 200, 1, 2, 3, 4, 5, 6, 7})
	f.Close()

	s = open(t, dir, 0)
	defer s.Close()
	if s.Durable() != 5 {
		t.Fatalf("Durable() = %s after torn tail, want 0/5", s.Durable())
	}
	if fi2, _ := os.Stat(seg); fi2.Size() != fi.Size() {
		t.Fatalf("segment size %d after open, want %d (torn tail cut)", fi2.Size(), fi.Size())
	}
	if got := readAll(t, s, 0, 5); got[4] != 5 {
		t.Fatalf("records %v, want 1..5", got)
	}
}

func TestCorruptRecordDetected(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 0)
	for i := uint64(1); i <= 5; i++ {
		if err := s.Append(context.Background(), txn(i, "some value")); err != nil {
			t.Fatal(err)
		}
	}
	waitDurable(t, s, 5)
	s.Close()
	seg := segFiles(t, dir)[0]
	b, _ := os.ReadFile(seg)
	b[len(b)/3] ^= 0xff // inside the second record, good records follow
	os.WriteFile(seg, b, 0o600)
	if _, err := Open(dir, 0, []string{"eu"}, zerolog.Nop()); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open(corrupt spool) = %v, want ErrCorrupt", err)
	}
}

func TestGCAndFullBlocks(t *testing.T) {
	dir := t.TempDir()
	big := string(make([]byte, 1000))
	s := open(t, dir, 20_000)
	defer s.Close()
	ctx := context.Background()
	for i := uint64(1); i <= 15; i++ {
		if err := s.Append(ctx, txn(i, big)); err != nil {
			t.Fatal(err)
		}
	}
	waitDurable(t, s, 15)
	// The spool is near full: the next appends block until regions ACK.
	actx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	var err error
	for i := uint64(16); i <= 40 && err == nil; i++ {
		err = s.Append(actx, txn(i, big))
	}
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Append into a full spool = %v, want it to block until the deadline", err)
	}
	if s.Bytes() > 20_000+2_000 {
		t.Fatalf("spool holds %d bytes, limit 20000", s.Bytes())
	}
}

func TestSegmentsDeletedWhenEveryRegionAcked(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 0)
	defer s.Close()
	s.segSize = 2_000
	ctx := context.Background()
	big := string(make([]byte, 500))
	for i := uint64(1); i <= 40; i++ {
		if err := s.Append(ctx, txn(i, big)); err != nil {
			t.Fatal(err)
		}
	}
	waitDurable(t, s, 40)
	before := len(segFiles(t, dir))
	if before < 5 {
		t.Fatalf("%d segments, want several", before)
	}
	if err := s.SetCursor("eu", 40); err != nil {
		t.Fatal(err)
	}
	if n := len(segFiles(t, dir)); n != before {
		t.Fatalf("%d segments after only eu acked, want %d (as still needs them)", n, before)
	}
	if err := s.SetCursor("as", 20); err != nil {
		t.Fatal(err)
	}
	after := len(segFiles(t, dir))
	if after >= before {
		t.Fatalf("%d segments after every region acked 20, want fewer than %d", after, before)
	}
	// as still reads everything above its cursor.
	if got := readAll(t, s, 20, 20); got[0] != 21 || got[19] != 40 {
		t.Fatalf("as reads %v..%v, want 21..40", got[0], got[19])
	}
}

func TestSecondOpenRefused(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 0)
	defer s.Close()
	if _, err := Open(dir, 0, nil, zerolog.Nop()); err == nil {
		t.Fatalf("second Open of %s succeeded, want in-use error", dir)
	}
}

// spilledTxn makes a spilled transaction ending at end with n inserts,
// through the Assembler, and returns it with its changes.
func spilledTxn(t *testing.T, end uint64, n int) (*decode.Txn, []decode.Change) {
	t.Helper()
	relMsg := binary.BigEndian.AppendUint32([]byte{'R'}, 1)
	relMsg = append(relMsg, "public\x00t\x00d"...)
	relMsg = binary.BigEndian.AppendUint16(relMsg, 2)
	relMsg = binary.BigEndian.AppendUint32(append(append(relMsg, 1), "id\x00"...), 23)
	relMsg = binary.BigEndian.AppendUint32(relMsg, 0xffffffff)
	relMsg = binary.BigEndian.AppendUint32(append(append(relMsg, 0), "v\x00"...), 25)
	relMsg = binary.BigEndian.AppendUint32(relMsg, 0xffffffff)
	begin := binary.BigEndian.AppendUint64([]byte{'B'}, end-1)
	begin = binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(begin, 1), 7)
	commit := binary.BigEndian.AppendUint64([]byte{'C', 0}, end-1)
	commit = binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(commit, end), 1)
	msgs := [][]byte{relMsg, begin}
	for i := range n {
		b := append(binary.BigEndian.AppendUint32([]byte{'I'}, 1), 'N')
		b = binary.BigEndian.AppendUint16(b, 2)
		for _, v := range []string{fmt.Sprint(i), strings.Repeat("v", 100)} {
			b = binary.BigEndian.AppendUint32(append(b, 't'), uint32(len(v)))
			b = append(b, v...)
		}
		msgs = append(msgs, b)
	}
	msgs = append(msgs, commit)
	a := decode.NewAssembler("na", decode.SpillOver(t.TempDir(), 1, 4<<10))
	var out *decode.Txn
	for i, m := range msgs {
		tx, err := a.Feed(pglogrepl.LSN(i), m)
		if err != nil {
			t.Fatal(err)
		}
		if tx != nil {
			out = tx
		}
	}
	if out == nil || out.Spill == nil {
		t.Fatal("transaction did not spill")
	}
	t.Cleanup(out.Spill.Release)
	var all []decode.Change
	if err := out.Spill.Each(func(c []decode.Change) error { all = append(all, c...); return nil }); err != nil {
		t.Fatal(err)
	}
	return out, all
}

// TestSpilledTransaction: a spilled transaction is stored as a file next
// to the segments, read back lazily (also after reopening), counted in
// Bytes, and deleted once every region acknowledged it; a file whose
// record never became durable is removed at open.
func TestSpilledTransaction(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 0)
	ctx := context.Background()
	big, want := spilledTxn(t, 200, 2000)
	for _, tx := range []*decode.Txn{txn(100, "a"), big, txn(300, "b")} {
		if err := s.Append(ctx, tx); err != nil {
			t.Fatal(err)
		}
	}
	big.Spill.Release() // the spool has its own copy
	waitDurable(t, s, 300)
	file := filepath.Join(dir, spillName(200))
	fi, err := os.Stat(file)
	if err != nil || fi.Size() != big.Spill.FileSize() {
		t.Fatalf("spilled file: %v, %v; want %d bytes", fi, err, big.Spill.FileSize())
	}
	if s.Bytes() < fi.Size() {
		t.Fatalf("Bytes() = %d, want at least the spilled file's %d", s.Bytes(), fi.Size())
	}
	check := func(s *Spool) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		r := s.NewReader(0)
		defer r.Close()
		var got []*decode.Txn
		for range 3 {
			tx, err := r.Next(ctx)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, tx)
		}
		if got[0].Spill != nil || got[2].Spill != nil || got[1].Spill == nil || got[1].Changes != nil {
			t.Fatalf("read back: spill handles %v %v %v, want only the second", got[0].Spill, got[1].Spill, got[2].Spill)
		}
		if got[1].EndLSN != 200 || got[1].Xid != 7 || got[1].ChangeCount() != 2000 {
			t.Fatalf("spilled header %+v, %d changes", got[1], got[1].ChangeCount())
		}
		var all []decode.Change
		if err := got[1].Spill.Each(func(c []decode.Change) error { all = append(all, c...); return nil }); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(all, want) {
			t.Fatalf("spilled changes read back differ (%d, want %d)", len(all), len(want))
		}
	}
	check(s)
	s.Close()
	// An orphan copy (crash before its record was durable) goes at open.
	orphan := filepath.Join(dir, spillName(900))
	if err := os.WriteFile(orphan, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	s = open(t, dir, 0)
	defer s.Close()
	if _, err := os.Stat(orphan); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("orphan spill file kept: %v", err)
	}
	check(s)
	if err := s.SetCursor("eu", 300); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(file); err != nil {
		t.Fatalf("spilled file deleted before every region acknowledged it: %v", err)
	}
	if err := s.SetCursor("as", 250); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("spilled file kept after every region acknowledged it: %v", err)
	}
}

// TestGroupFlushWhileRolling appends many records to tiny segments, so
// segments roll and get deleted while the flusher fsyncs with the lock
// released, and two readers follow: each must read every record once, in
// order, and a reopened spool must hold all of them.
func TestGroupFlushWhileRolling(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, 0)
	s.segSize = 400 // a few records a segment
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const n = 2000
	errc := make(chan error, 2)
	for _, region := range []string{"eu", "as"} {
		go func() {
			r := s.NewReader(0)
			defer r.Close()
			for i := uint64(1); i <= n; i++ {
				tx, err := r.Next(ctx)
				if err != nil {
					errc <- fmt.Errorf("%s: Next after %d records: %w", region, i-1, err)
					return
				}
				if tx.EndLSN != pglogrepl.LSN(i*10) {
					errc <- fmt.Errorf("%s: record %d ends at %s, want %s", region, i, tx.EndLSN, pglogrepl.LSN(i*10))
					return
				}
				if i%50 == 0 {
					if err := s.SetCursor(region, tx.EndLSN); err != nil {
						errc <- err
						return
					}
				}
			}
			errc <- nil
		}()
	}
	for i := uint64(1); i <= n; i++ {
		if err := s.Append(ctx, txn(i*10, "value")); err != nil {
			t.Fatalf("append %d: %v", i, err)
		}
	}
	for range 2 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, dir, 0)
	defer s.Close()
	if s.Durable() != n*10 {
		t.Fatalf("after reopen Durable() = %s, want %s", s.Durable(), pglogrepl.LSN(n*10))
	}
}

// BenchmarkAppend reports what appending a pgbench-like transaction (four
// changes of five columns) costs the caller, who does not wait for the
// flush:
//
//	go test ./internal/spool -run '^$' -bench Append -benchmem
func BenchmarkAppend(b *testing.B) {
	s, err := Open(b.TempDir(), 0, []string{"eu", "as"}, zerolog.Nop())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	wide := &decode.Relation{ID: 2, Schema: "public", Table: "w", ReplicaIdentity: decode.IdentityDefault, Columns: []decode.Column{
		{Name: "id", TypeOID: 23, Key: true}, {Name: "a", TypeOID: 23}, {Name: "b", TypeOID: 23}, {Name: "c", TypeOID: 20}, {Name: "d", TypeOID: 25}}}
	vals := func() []decode.Value {
		return []decode.Value{{Kind: decode.ValueText, Data: []byte("12345")}, {Kind: decode.ValueText, Data: []byte("7")},
			{Kind: decode.ValueText, Data: []byte("42")}, {Kind: decode.ValueText, Data: []byte("-3150")}, {Kind: decode.ValueText, Data: []byte("2026-12-06 09:30:00.123456+00")}}
	}
	t := &decode.Txn{Origin: "na", CommitTime: time.Unix(1700000000, 0).UTC()}
	for range 4 {
		t.Changes = append(t.Changes, decode.Change{Op: decode.OpUpdate, Rel: wide, New: vals()})
	}
	ctx := context.Background()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		t.EndLSN = pglogrepl.LSN(1000 + i*100)
		t.CommitLSN = t.EndLSN - 1
		if err := s.Append(ctx, t); err != nil {
			b.Fatal(err)
		}
	}
}
