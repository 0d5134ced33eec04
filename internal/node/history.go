package node

import (
	"context"
	"time"

	"github.com/jackc/pglogrepl"
)

// The status page charts the last HistorySpan of every target region from
// one sample every HistoryEvery, kept in memory: HistoryLen samples per
// region, whatever the node's uptime.
const (
	HistoryEvery = 5 * time.Second
	HistorySpan  = 15 * time.Minute
	HistoryLen   = int(HistorySpan / HistoryEvery)
)

// Sample is one point of a target region's recent history.
type Sample struct {
	At         time.Time `json:"at"`
	LagBytes   uint64    `json:"lag_bytes"`
	LagSeconds float64   `json:"lag_seconds"`
	// ApplyRate is the WAL the region acknowledged per second since the
	// previous sample (its apply rate in WAL bytes); 0 for the first one.
	ApplyRate float64 `json:"apply_rate"`
}

// History is what /history reports: per target region, its samples of the
// last HistorySpan, oldest first.
type History struct {
	EverySeconds float64         `json:"every_seconds"`
	SpanSeconds  float64         `json:"span_seconds"`
	Targets      []TargetHistory `json:"targets"`
}

// TargetHistory is one target region's samples, oldest first.
type TargetHistory struct {
	Region  string   `json:"region"`
	Samples []Sample `json:"samples"`
}

// ring holds a target region's last HistoryLen samples.
type ring struct {
	buf   [HistoryLen]Sample
	next  int // where the next sample goes
	n     int // samples held, at most HistoryLen
	acked pglogrepl.LSN
}

// add records a sample taken at now with the region's acknowledged
// position; the rate is the acknowledged WAL per second since the previous
// sample (0 when the position went back: a new reader term).
func (r *ring) add(s Sample, acked pglogrepl.LSN) {
	if r.n > 0 {
		prev := r.buf[(r.next+HistoryLen-1)%HistoryLen]
		if dt := s.At.Sub(prev.At).Seconds(); dt > 0 && acked > r.acked {
			s.ApplyRate = float64(acked-r.acked) / dt
		}
	}
	r.acked = acked
	r.buf[r.next] = s
	r.next = (r.next + 1) % HistoryLen
	r.n = min(r.n+1, HistoryLen)
}

// samples returns the held samples, oldest first.
func (r *ring) samples() []Sample {
	out := make([]Sample, 0, r.n)
	for i := r.n; i > 0; i-- {
		out = append(out, r.buf[(r.next+HistoryLen-i)%HistoryLen])
	}
	return out
}

// record takes one sample of every target region from the status.
func (m *monitor) record(now time.Time) {
	st := m.status(now)
	counts := m.n.delays.counts()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.window.add(counts)
	for _, t := range st.Targets {
		r := m.history[t.Region]
		if r == nil {
			r = &ring{}
			m.history[t.Region] = r
			m.order = append(m.order, t.Region)
		}
		acked, _ := parseLSN(t.Acked)
		r.add(Sample{At: now.UTC(), LagBytes: t.LagBytes, LagSeconds: t.LagSeconds}, acked)
	}
}

// recordLoop samples every HistoryEvery until ctx is done; Run owns it.
func (m *monitor) recordLoop(ctx context.Context) {
	t := time.NewTicker(HistoryEvery)
	defer t.Stop()
	m.record(time.Now())
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			m.record(now)
		}
	}
}

// historyOf returns every target region's samples, in the order the
// regions were first seen.
func (m *monitor) historyOf() History {
	m.mu.Lock()
	defer m.mu.Unlock()
	h := History{EverySeconds: HistoryEvery.Seconds(), SpanSeconds: HistorySpan.Seconds(), Targets: []TargetHistory{}}
	for _, region := range m.order {
		h.Targets = append(h.Targets, TargetHistory{Region: region, Samples: m.history[region].samples()})
	}
	return h
}
