package peers

import (
	"context"
	"time"
)

// keepAlive writes a heartbeat frame on fc every period, each write
// waiting at most timeout, until ctx is done (then it returns nil) or a
// write fails. When idle is not nil, a tick at which idle reports false
// sends nothing: the frames being written tell the peer the connection
// lives. Both ends use it, so a peer hears from the other at least every
// period; the caller owns the goroutine that runs it.
func keepAlive(ctx context.Context, fc *frameConn, period, timeout time.Duration, idle func() bool) error {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if idle != nil && !idle() {
				continue
			}
			if err := fc.write(timeout, &heartbeat{}); err != nil {
				return err
			}
		}
	}
}
