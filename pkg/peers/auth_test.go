package peers

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// authDial connects to addr, reads the server's Challenge and sends h
// (version ProtocolVersion unless set) signed with token over its nonce.
// The returned frameConn reads the server's answer.
func authDial(t *testing.T, addr string, h hello, token string) (net.Conn, *frameConn) {
	t.Helper()
	c := rawDial(t, addr, nil)
	fc := newFrameConn(c, DefaultMaxFrame)
	f, err := fc.read(5 * time.Second)
	if err != nil {
		t.Fatalf("read challenge: %v", err)
	}
	ch, ok := f.(*challenge)
	if !ok {
		t.Fatalf("first frame %T %+v, want challenge", f, f)
	}
	if h.Version == 0 {
		h.Version = ProtocolVersion
	}
	h.MAC = HelloMAC(token, ch.Nonce[:], h.Region, h.Node, h.Flags)
	if err := fc.write(time.Second, &h); err != nil {
		t.Fatal(err)
	}
	return c, fc
}

// recordingConn keeps every byte written through it.
type recordingConn struct {
	net.Conn
	mu  sync.Mutex
	out bytes.Buffer
}

func (c *recordingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.out.Write(p)
	c.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *recordingConn) written() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Clone(c.out.Bytes())
}

// pipeHello runs the client side of the handshake against srv over a
// net.Pipe and returns the server's answer and every byte the client
// wrote.
func pipeHello(t *testing.T, srv *Server, flags uint8, token string) (any, []byte, error) {
	t.Helper()
	client, server := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); srv.handle(ctx, server) }()
	defer func() { cancel(); client.Close(); wg.Wait() }()
	rc := &recordingConn{Conn: client}
	f, err := clientHello(newFrameConn(rc, DefaultMaxFrame), 5*time.Second, flags, "na", "na1", token)
	return f, rc.written(), err
}

// TestTokenNeverOnTheWire: the shared token appears nowhere in what a
// shipper or a probe writes, and the server still welcomes them.
func TestTokenNeverOnTheWire(t *testing.T) {
	srv := NewServer(serverConfig("eu", "eu1"), newMemApplier(), zerolog.Nop())
	for _, flags := range []uint8{0, helloProbe} {
		f, out, err := pipeHello(t, srv, flags, testToken)
		if err != nil {
			t.Fatalf("flags %d: handshake = %v", flags, err)
		}
		if w, ok := f.(*welcome); !ok || w.Region != "eu" {
			t.Fatalf("flags %d: answer %T %+v, want welcome from eu", flags, f, f)
		}
		if len(out) == 0 {
			t.Fatalf("flags %d: the client wrote nothing", flags)
		}
		if bytes.Contains(out, []byte(testToken)) {
			t.Fatalf("flags %d: the token is in the client's bytes %q", flags, out)
		}
	}

	// The same through a real Shipper: every byte it writes, transactions
	// included, is free of the token.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, NewServer(serverConfig("eu", "eu1"), newMemApplier(), zerolog.Nop()))
	var mu sync.Mutex
	var recorded []*recordingConn
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", addr)
			if err != nil {
				c.Close()
				continue
			}
			rc := &recordingConn{Conn: s}
			mu.Lock()
			recorded = append(recorded, rc)
			mu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); _, _ = copyConn(rc, c); s.Close() }()
			go func() { defer wg.Done(); _, _ = copyConn(c, s); c.Close() }()
		}
	}()
	defer func() {
		ln.Close()
		mu.Lock()
		for _, rc := range recorded {
			rc.Close()
		}
		mu.Unlock()
		wg.Wait()
	}()
	sh := NewShipper(shipperConfig(NodeAddr{Name: "eu1", Addr: ln.Addr().String()}), nil, zerolog.Nop())
	ctx, cancel := context.WithCancel(testCtx(t))
	done := make(chan error, 1)
	go func() { done <- sh.Run(ctx) }()
	defer func() { cancel(); <-done }()
	for i := 1; i <= 3; i++ {
		if err := sh.Send(ctx, mkTxn(i, 0)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the shipper's acks", 10*time.Second, func() bool { return sh.Acked() == lsnOf(3) })
	mu.Lock()
	defer mu.Unlock()
	if len(recorded) == 0 {
		t.Fatal("no connection recorded")
	}
	for _, rc := range recorded {
		if out := rc.written(); bytes.Contains(out, []byte(testToken)) {
			t.Fatalf("the token is in the shipper's bytes %q", out)
		}
	}
}

// copyConn copies src to dst until either fails.
func copyConn(dst, src net.Conn) (int64, error) {
	var n int64
	buf := make([]byte, 32<<10)
	for {
		m, err := src.Read(buf)
		if m > 0 {
			w, werr := dst.Write(buf[:m])
			n += int64(w)
			if werr != nil {
				return n, werr
			}
		}
		if err != nil {
			return n, err
		}
	}
}

// TestReplayedHelloRejected: a Hello captured from an earlier connection
// (signed over another nonce) is refused on a new one.
func TestReplayedHelloRejected(t *testing.T) {
	logs := newLogBuf(t)
	srv := NewServer(serverConfig("eu", "eu1"), newMemApplier(), logs.logger())
	f, captured, err := pipeHello(t, srv, 0, testToken)
	if _, ok := f.(*welcome); !ok || err != nil {
		t.Fatalf("original handshake: %T %+v, %v", f, f, err)
	}
	addr := serve(t, srv)
	var nonces [][]byte
	for i := 0; i < 2; i++ {
		c := rawDial(t, addr, nil)
		fc := newFrameConn(c, DefaultMaxFrame)
		f, err := fc.read(5 * time.Second)
		ch, ok := f.(*challenge)
		if !ok || err != nil {
			t.Fatalf("first frame %T, %v; want challenge", f, err)
		}
		nonces = append(nonces, bytes.Clone(ch.Nonce[:]))
		if _, err := c.Write(captured); err != nil {
			t.Fatal(err)
		}
		f, err = fc.read(5 * time.Second)
		if r, ok := f.(*reject); !ok || r.Reason != "wrong token" {
			t.Fatalf("replayed hello answered %T %+v, %v; want reject: wrong token", f, f, err)
		}
	}
	if bytes.Equal(nonces[0], nonces[1]) || bytes.Equal(nonces[0], make([]byte, NonceSize)) {
		t.Fatalf("nonces repeat or are zero: %x", nonces)
	}
	if strings.Contains(logs.String(), testToken) {
		t.Fatalf("the token is in the log:\n%s", logs.String())
	}
}

// TestWrongTokenShipperRejected: a shipper and a probe with the wrong or
// no token are refused; the server with no token (insecure) accepts any.
func TestWrongTokenShipperRejected(t *testing.T) {
	srv := NewServer(serverConfig("eu", "eu1"), newMemApplier(), zerolog.Nop())
	for _, tc := range []struct{ token, reason string }{{"not-the-token", "wrong token"}, {"", "no token"}} {
		f, _, err := pipeHello(t, srv, 0, tc.token)
		if r, ok := f.(*reject); !ok || err != nil || r.Reason != tc.reason {
			t.Fatalf("token %q: answer %T %+v, %v; want reject %q", tc.token, f, f, err, tc.reason)
		}
	}
	addr := serve(t, srv)
	_, err := Probe(testCtx(t), ProbeConfig{SourceRegion: "na", SourceNode: "na1", TargetRegion: "eu", Addr: addr, Token: "not-the-token", Insecure: true})
	if !errors.Is(err, ErrRejected) || !strings.Contains(err.Error(), "wrong token") {
		t.Fatalf("probe with a wrong token = %v, want ErrRejected: wrong token", err)
	}
	res, err := Probe(testCtx(t), ProbeConfig{SourceRegion: "na", SourceNode: "na1", TargetRegion: "eu", Addr: addr, Token: testToken, Insecure: true})
	if err != nil || res.Node != "eu1" {
		t.Fatalf("probe with the token = %+v, %v", res, err)
	}

	cfg := serverConfig("eu", "eu1")
	cfg.Token = ""
	open := NewServer(cfg, newMemApplier(), zerolog.Nop())
	for _, token := range []string{"", testToken} {
		f, _, err := pipeHello(t, open, 0, token)
		if _, ok := f.(*welcome); !ok || err != nil {
			t.Fatalf("server without token, client token %q: %T %+v, %v; want welcome", token, f, f, err)
		}
	}
}

// TestOlderServerClearError: against a node of protocol 2 (it sends no
// challenge and waits for a Hello, refusing a silent client) the shipper
// and the probe fail with a clear error, never sending the token.
func TestOlderServerClearError(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var got bytes.Buffer
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			// What a version 2 server does when its first-frame read
			// times out; it keeps what the client sent.
			fc := newFrameConn(c, DefaultMaxFrame)
			_ = fc.write(time.Second, &reject{Reason: "first frame: read tcp: i/o timeout"})
			_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			buf := make([]byte, 4096)
			n, _ := c.Read(buf)
			mu.Lock()
			got.Write(buf[:n])
			mu.Unlock()
			c.Close()
		}
	}()
	defer func() { ln.Close(); wg.Wait() }()

	sh := NewShipper(shipperConfig(NodeAddr{Name: "eu1", Addr: ln.Addr().String()}), nil, zerolog.Nop())
	_, _, err = sh.handshake(testCtx(t), 0, 0)
	if err == nil || !strings.Contains(err.Error(), "upgrade both sides") || !strings.Contains(err.Error(), "protocol 2") {
		t.Fatalf("handshake with a version 2 node = %v, want a protocol upgrade error", err)
	}
	_, err = Probe(testCtx(t), ProbeConfig{SourceRegion: "na", SourceNode: "na1", TargetRegion: "eu", Addr: ln.Addr().String(), Token: testToken, Insecure: true})
	if !errors.Is(err, ErrRejected) || !strings.Contains(err.Error(), "upgrade both sides") {
		t.Fatalf("probe of a version 2 node = %v, want ErrRejected with a protocol upgrade error", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if got.Len() != 0 {
		t.Fatalf("the client sent %q to a node without a challenge", got.Bytes())
	}
}
