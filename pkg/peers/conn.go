package peers

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// frameConn frames a net.Conn. Reads belong to one goroutine; writes may
// come from several and are serialised by mu.
type frameConn struct {
	nc       net.Conn
	maxFrame int

	r    *bufio.Reader
	buf  []byte
	rels decode.Relations // the relations of the frames read, interned

	mu  sync.Mutex
	w   *bufio.Writer
	out []byte
}

func newFrameConn(nc net.Conn, maxFrame int) *frameConn {
	return &frameConn{
		nc:       nc,
		maxFrame: maxFrame,
		r:        bufio.NewReaderSize(nc, 64<<10),
		w:        bufio.NewWriterSize(nc, 64<<10),
	}
}

// read reads and decodes the next frame, waiting at most timeout.
func (c *frameConn) read(timeout time.Duration) (any, error) {
	if err := c.nc.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	p, err := readFrame(c.r, c.buf, c.maxFrame)
	if cap(p) <= 1<<20 {
		c.buf = p[:0] // keep small buffers only
	} else {
		c.buf = nil
	}
	if err != nil {
		return nil, err
	}
	return decodeFrameWith(p, &c.rels)
}

// buffered reports whether a whole frame is buffered: the next read
// returns without waiting for the network.
func (c *frameConn) buffered() bool {
	n := c.r.Buffered()
	if n < 4 {
		return false
	}
	hdr, err := c.r.Peek(4)
	return err == nil && int(binary.BigEndian.Uint32(hdr))+4 <= n
}

// errTooLarge is returned by write for a frame above the frame limit; the
// connection is still usable.
var errTooLarge = errors.New("frame exceeds the frame limit")

// write encodes and sends frames, flushing once, waiting at most timeout
// (no deadline when timeout is zero).
func (c *frameConn) write(timeout time.Duration, frames ...any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var deadline time.Time
	if timeout > 0 {
		deadline = time.Now().Add(timeout)
	}
	if err := c.nc.SetWriteDeadline(deadline); err != nil {
		return err
	}
	for _, f := range frames {
		var err error
		c.out, err = appendFrame(c.out[:0], f)
		if err != nil {
			return err
		}
		if len(c.out)-4 > c.maxFrame {
			return fmt.Errorf("%w: %d bytes, limit %d", errTooLarge, len(c.out)-4, c.maxFrame)
		}
		if _, err := c.w.Write(c.out); err != nil {
			return err
		}
	}
	if cap(c.out) > 1<<20 {
		c.out = nil
	}
	return c.w.Flush()
}

func (c *frameConn) close() error { return c.nc.Close() }
