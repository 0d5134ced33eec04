package pgtest

import (
	"flag"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
)

// TB is the part of testing.TB that Start needs.
type TB interface {
	Helper()
	Name() string
	Skip(args ...any)
	Fatalf(format string, args ...any)
	Errorf(format string, args ...any)
	Cleanup(func())
}

func shortMode() bool {
	f := flag.Lookup("test.short")
	return f != nil && f.Value.String() == "true"
}

// nextPort walks the ports below the kernel's ephemeral range (32768 and
// up on Linux), so that an outgoing connection's source port cannot take
// a port between the moment it is chosen and the moment a node binds it,
// and one test process never hands out a port twice (the kernel may give
// a port it just freed to the next listener on port 0).
var nextPort atomic.Int64

// FreeAddr returns a loopback address on a port nothing listened on when
// it was chosen, for a node or server the test starts.
func FreeAddr(t TB) string {
	t.Helper()
	nextPort.CompareAndSwap(0, int64(20000+(os.Getpid()*97)%10000))
	for i := 0; i < 2000; i++ {
		p := nextPort.Add(1)
		if p >= 32000 {
			nextPort.Store(20000)
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		l.Close()
		return l.Addr().String()
	}
	t.Fatalf("no free port between 20000 and 32000")
	return ""
}

// SilentListener listens on a loopback port, accepts every connection and
// never reads or answers: a hung server, or a proxy whose backend is gone.
// It returns the port; the listener and its connections close when the
// test ends.
func SilentListener(t TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	var mu sync.Mutex
	var held []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			c.Close()
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}
