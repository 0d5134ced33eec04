package node

import (
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
)

// TestHistoryRing: the ring keeps the last HistoryLen samples, oldest
// first, and the apply rate is the acknowledged WAL per second since the
// previous sample (0 when the position goes back).
func TestHistoryRing(t *testing.T) {
	var r ring
	start := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	total := HistoryLen + 20
	for i := 0; i < total; i++ {
		r.add(Sample{At: start.Add(time.Duration(i) * HistoryEvery), LagBytes: uint64(i)}, pglogrepl.LSN(1000*(i+1)))
	}
	s := r.samples()
	if len(s) != HistoryLen || HistoryLen != 180 {
		t.Fatalf("samples() holds %d (HistoryLen %d), want 180: 15 minutes at one per 5 s", len(s), HistoryLen)
	}
	for i, p := range s {
		if want := uint64(20 + i); p.LagBytes != want {
			t.Fatalf("samples()[%d].LagBytes = %d, want %d (oldest first)", i, p.LagBytes, want)
		}
		if p.ApplyRate != 200 {
			t.Fatalf("samples()[%d].ApplyRate = %v, want 200 (1000 bytes per 5 s)", i, p.ApplyRate)
		}
	}
	r.add(Sample{At: start.Add(time.Duration(total) * HistoryEvery)}, 10)
	s = r.samples()
	if last := s[len(s)-1]; last.ApplyRate != 0 || len(s) != HistoryLen || s[0].LagBytes != 21 {
		t.Errorf("after the position went back: last rate %v, %d samples from %d; want 0, 180 from 21", last.ApplyRate, len(s), s[0].LagBytes)
	}
	var first ring
	first.add(Sample{At: start}, 5000)
	if got := first.samples(); len(got) != 1 || got[0].ApplyRate != 0 {
		t.Errorf("first sample = %+v, want one with rate 0", got)
	}
}
