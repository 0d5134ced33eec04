package node

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/config"
)

// SlotCheckInterval is how often the node that reads the region's slot
// checks how much WAL the slot makes the server retain.
const SlotCheckInterval = 5 * time.Second

// RetainedWALWarn is the WAL the slot may retain before every check logs a
// warning (at most once a minute while it stays above).
const RetainedWALWarn = 1 << 30

// slotHealth is what pg_replication_slots says about the node's slot.
type slotHealth struct {
	walStatus string // reserved, extended, unreserved, lost
	retained  int64  // bytes between restart_lsn and the current WAL position
	safe      *int64 // safe_wal_size; nil without max_slot_wal_keep_size
}

// slotWatch remembers what was last reported, so a steady state is not
// logged at every check.
type slotWatch struct {
	status   string
	warnedAt time.Time
}

// watchSlot checks the slot every SlotCheckInterval while this node reads
// it, until ctx is done. Only the reader checks: the standby nodes of the
// region would repeat the same warnings.
func (n *Node) watchSlot(ctx context.Context) {
	var w slotWatch
	t := time.NewTicker(SlotCheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n.mu.Lock()
		reading := n.term != nil // this node holds the slot (its stream may be paused)
		n.mu.Unlock()
		if !reading {
			continue
		}
		qctx, cancel := context.WithTimeout(ctx, SlotCheckInterval)
		h, err := n.readSlotHealth(qctx)
		cancel()
		if err != nil {
			n.log.Debug().Str("error", config.RedactDSN(err.Error())).Msg("check slot WAL retention")
			continue
		}
		w.report(n, h, time.Now())
	}
}

func (n *Node) readSlotHealth(ctx context.Context) (slotHealth, error) {
	var h slotHealth
	err := n.withWatchConn(ctx, func(q querier) error {
		var status *string
		var retained *int64
		err := q.QueryRow(ctx, `SELECT wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, safe_wal_size
		FROM pg_replication_slots WHERE slot_name = $1`, n.cfg.Slot).Scan(&status, &retained, &h.safe)
		if err != nil {
			return err
		}
		if status != nil {
			h.walStatus = *status
		}
		if retained != nil {
			h.retained = *retained
		}
		return nil
	})
	return h, err
}

// querier is what the periodic checks ask of a connection.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// withWatchConn runs f on a connection to the region's database for the
// node's periodic checks (the slot's WAL retention, the database facts of
// /metrics): the probe pool's kept connection, or without a probe pool a
// connection opened for f and closed after it, so a check does not make
// the server start a backend every few seconds.
func (n *Node) withWatchConn(ctx context.Context, f func(q querier) error) error {
	n.mu.Lock()
	pool := n.probe
	n.mu.Unlock()
	if pool != nil {
		conn, err := pool.Acquire(ctx)
		if err != nil {
			return err
		}
		defer conn.Release()
		return f(conn)
	}
	conn, err := pgx.Connect(ctx, n.cfg.Database)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return f(conn)
}

// report logs a warning when the slot's WAL is no longer reserved by
// max_wal_size, or when it retains more than RetainedWALWarn.
func (w *slotWatch) report(n *Node, h slotHealth, now time.Time) {
	changed := h.walStatus != w.status
	w.status = h.walStatus
	ev := n.log.Warn()
	var msg string
	switch h.walStatus {
	case "extended":
		msg = "the slot retains WAL beyond max_wal_size for a region that has not acknowledged it; it is lost if it passes max_slot_wal_keep_size"
	case "unreserved":
		ev = n.log.Error()
		msg = "the slot retains more WAL than max_slot_wal_keep_size: the next checkpoint may remove it and invalidate the slot; bring the lagging region back now"
	case "lost":
		ev = n.log.Error()
		msg = "the server invalidated the slot (wal_status lost): replication stops and the regions must be resynchronised"
	default:
		if h.retained < RetainedWALWarn {
			if changed && w.warnedAt != (time.Time{}) {
				n.log.Info().Str("wal_status", h.walStatus).Int64("retained_bytes", h.retained).Msg("slot WAL retention back to normal")
				w.warnedAt = time.Time{}
			}
			return
		}
		msg = "the slot retains a lot of WAL: a region is not acknowledging"
	}
	if !changed && now.Sub(w.warnedAt) < time.Minute {
		return
	}
	w.warnedAt = now
	ev = ev.Str("slot", n.cfg.Slot).Str("wal_status", h.walStatus).Int64("retained_bytes", h.retained)
	if h.safe != nil {
		ev = ev.Int64("safe_wal_size", *h.safe)
	}
	ev.Msg(msg)
}
