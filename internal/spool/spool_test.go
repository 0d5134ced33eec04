package spool

import (
	"context"
	"errors"
	"os"
	"path/filepath"
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
