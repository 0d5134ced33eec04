// Package rawconn makes a socket's reads and writes without the Go
// scheduler's system call bookkeeping.
//
// A node's network I/O is many small reads and writes: a walsender's
// messages, peers' frames, apply pipelines. net.Conn makes each through
// syscall.Syscall, which tells the scheduler it may block: the runtime's
// monitor thread (sysmon) is woken from its sleep whenever a process that
// was idle makes one, then polls every 20 us for a while, and may hand
// the processor to another thread meanwhile. At a few hundred small
// transactions a second a node goes idle and busy again thousands of
// times a second, and a CPU profile of a region's node (perf, whole
// process) put 31% of its CPU in that monitor's sleeps and wake-ups and
// more in the thread hand-offs. A read or write of a non-blocking socket
// never sleeps in the kernel, so Conn makes it with syscall.RawSyscall
// through the connection's syscall.RawConn, which still waits for the
// socket in the runtime's network poller, with the connection's
// deadlines, when it would block (EAGAIN).
package rawconn

import (
	"context"
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// Conn is a net.Conn whose Read and Write are raw system calls.
type Conn struct {
	net.Conn
	rc syscall.RawConn
}

// Wrap returns c as a Conn, or c itself when it has no file descriptor
// to read and write directly (not a TCP or Unix socket).
func Wrap(c net.Conn) net.Conn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return c
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return c
	}
	return &Conn{Conn: c, rc: rc}
}

// Read reads like net.Conn.Read.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var n uintptr
	var errno syscall.Errno
	err := c.rc.Read(func(fd uintptr) bool {
		for {
			n, _, errno = syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
			switch errno {
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false // wait until readable
			}
			return true
		}
	})
	switch {
	case err != nil:
		return 0, c.opError("read", err)
	case errno != 0:
		return 0, c.opError("read", os.NewSyscallError("read", errno))
	case n == 0:
		return 0, io.EOF
	}
	raceAcquire()
	return int(n), nil
}

// Write writes like net.Conn.Write: all of p, or an error.
func (c *Conn) Write(p []byte) (int, error) {
	raceReleaseMerge()
	var done int
	var errno syscall.Errno
	err := c.rc.Write(func(fd uintptr) bool {
		for done < len(p) {
			n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&p[done])), uintptr(len(p)-done))
			switch e {
			case 0:
				done += int(n)
			case syscall.EINTR:
			case syscall.EAGAIN:
				return false // wait until writable
			default:
				errno = e
				return true
			}
		}
		return true
	})
	switch {
	case err != nil:
		return done, c.opError("write", err)
	case errno != 0:
		return done, c.opError("write", os.NewSyscallError("write", errno))
	}
	return done, nil
}

// opError wraps err as net.Conn's methods do, so callers that look for
// timeouts (net.Error), net.ErrClosed or os.ErrDeadlineExceeded find them.
func (c *Conn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: c.LocalAddr().Network(), Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// DialFunc is how pgconn and a peer shipper dial (pgconn.DialFunc).
type DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error)

// WrapDial returns a dial function whose connections are wrapped.
func WrapDial(dial DialFunc) DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return Wrap(nc), nil
	}
}
