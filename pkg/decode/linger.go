package decode

import (
	"context"
	"crypto/tls"
	"net"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/internal/rawconn"
)

// lingerConn is the network connection of a replication stream. A
// walsender sends every pgoutput message as soon as it is decoded, one
// send each, so a consumer that keeps up reads them one at a time: a read
// system call, another that finds the socket empty, a wait in the poller
// and a goroutine wake-up per message, which cost more CPU than decoding
// the message. Once the stream runs (linger set) and is busy (more than
// busyReads reads in the last busyWindow), a read that drained the socket
// makes the next read wait linger first, so that it takes what arrived
// meanwhile in one call. A quiet stream (a few transactions a second) is
// read at once: there a wait would only add a wake-up, and latency, per
// transaction. A read whose buffer filled waits for nothing, and the read
// deadline (Confirm's and Close's wake-up) is late by at most linger.
//
// Reads come from one goroutine at a time (the stream's, or pgconn's
// background reader while it writes), writes from any.
type lingerConn struct {
	net.Conn
	linger  atomic.Int64 // nanoseconds; 0 while the stream does not run
	drained atomic.Bool  // the last read drained the socket
	busy    atomic.Bool  // the last full busyWindow had more than busyReads reads
	window  atomic.Int64 // when the current busyWindow started, unix nanoseconds
	reads   atomic.Int64 // reads in the current busyWindow
}

// A stream is busy while it takes more than busyReads reads in
// busyWindow (4,000 a second: about 650 pgbench transactions).
const (
	busyWindow = 10 * time.Millisecond
	busyReads  = 40
)

// Read reads like net.Conn.Read, after waiting linger when the stream is
// busy and the previous read drained the socket.
func (c *lingerConn) Read(p []byte) (int, error) {
	d := time.Duration(c.linger.Load())
	if d > 0 && c.drained.Load() && c.busy.Load() {
		time.Sleep(d)
	}
	n, err := c.Conn.Read(p)
	c.drained.Store(n < len(p))
	if d > 0 {
		c.count(time.Now())
	}
	return n, err
}

// count notes a read at now and decides at the end of each busyWindow
// whether the stream is busy.
func (c *lingerConn) count(now time.Time) {
	reads := c.reads.Add(1)
	if start := c.window.Load(); now.UnixNano()-start >= int64(busyWindow) {
		c.busy.Store(reads > busyReads && now.UnixNano()-start < 2*int64(busyWindow))
		c.window.Store(now.UnixNano())
		c.reads.Store(0)
	}
}

// setLinger sets how long a read waits after one that drained the socket;
// 0 turns the wait off.
func (c *lingerConn) setLinger(d time.Duration) {
	c.linger.Store(int64(d))
}

// lingerDial wraps dial so that the connections it makes are lingerConns.
func lingerDial(dial pgconn.DialFunc) pgconn.DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &lingerConn{Conn: rawconn.Wrap(nc)}, nil
	}
}

// lingerOf returns the lingerConn under a connection made with lingerDial
// (also under TLS), or nil.
func lingerOf(nc net.Conn) *lingerConn {
	if tc, ok := nc.(*tls.Conn); ok {
		nc = tc.NetConn()
	}
	lc, _ := nc.(*lingerConn)
	return lc
}
