package peers

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
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

// TestWrongTokenSurfacesOnShipper: a shipper whose token a real server
// refuses reports it as a refusal of its credentials (told by the Reject's
// code, not its text): Status.AuthRefused names the node, LastError says
// so with its time, one error line with the fix is logged however often
// it retries, and the fallback carries the data meanwhile. Once the node
// accepts the token, the refusal and the error clear.
func TestWrongTokenSurfacesOnShipper(t *testing.T) {
	ctx := testCtx(t)
	cfg := serverConfig("eu", "eu1")
	cfg.Token = "another-token"
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	sctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- NewServer(cfg, newMemApplier(), zerolog.Nop()).Serve(sctx, ln) }()

	logs := newLogBuf(t)
	fb := newMemApplier()
	sh := NewShipper(shipperConfig(NodeAddr{Name: "eu1", Addr: addr}), func(ctx context.Context) (Applier, func(), error) { return fb, func() {}, nil }, logs.logger())
	runShipper(t, sh)
	for i := 1; i <= 3; i++ {
		if err := sh.Send(ctx, mkTxn(i, 0)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the fallback to carry the data", 20*time.Second, func() bool { return sh.Acked() == lsnOf(3) })
	// Let it probe the node a few more times.
	waitFor(t, "retries and probes", 20*time.Second, func() bool {
		return strings.Count(logs.String(), `"node failed; retrying"`) >= 5
	})
	st := sh.Status()
	if len(st.AuthRefused) != 1 || st.AuthRefused[0] != "eu1" || st.Path != PathFallback {
		t.Fatalf("Status = %+v, want eu1 refusing the credentials and the fallback carrying the data", st)
	}
	if !strings.Contains(st.LastError, "wrong token") || st.LastErrorAt.IsZero() {
		t.Fatalf("LastError = %q at %v, want the refusal and its time", st.LastError, st.LastErrorAt)
	}
	out := logs.String()
	if n := strings.Count(out, "refuses this node's credentials"); n != 1 || !strings.Contains(out, "same auth.token") {
		t.Fatalf("%d credential lines (want 1, naming auth.token):\n%s", n, out)
	}
	if strings.Contains(out, testToken) {
		t.Fatalf("the token is in the log:\n%s", out)
	}
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// The operator fixes the token: the node comes back at the same
	// address, the shipper returns to it and forgets the refusal. The
	// shipper keeps dialing the closed port meanwhile, and a dial on
	// loopback can connect to itself (source port = the port dialed),
	// holding the port until it gives up: bind until the port is free.
	waitFor(t, "the port to be free again", 20*time.Second, func() bool {
		ln, err = net.Listen("tcp", addr)
		return err == nil
	})
	app := newMemApplier()
	serveOn(t, NewServer(serverConfig("eu", "eu1"), app, zerolog.Nop()), ln)
	waitFor(t, "return to eu1", 20*time.Second, func() bool { return sh.Status().Path == "eu1" })
	if st := sh.Status(); len(st.AuthRefused) != 0 || st.LastError != "" || !st.LastErrorAt.IsZero() {
		t.Fatalf("after the fix Status = %+v, want no refusal and no error", st)
	}
	if !strings.Contains(logs.String(), "accept this node's credentials again") {
		t.Fatalf("no line saying the credentials are accepted again:\n%s", logs.String())
	}
}

// TestRejectCodeOnlyForNewShippers: the refusal code is sent to shippers
// of protocol version 4 only; a version 3 shipper gets the Reject it can
// decode (no trailing code byte) and the handshake still negotiates down.
func TestRejectCodeOnlyForNewShippers(t *testing.T) {
	srv := NewServer(serverConfig("eu", "eu1"), newMemApplier(), zerolog.Nop())
	addr := serve(t, srv)
	for _, tc := range []struct {
		version uint16
		code    rejectCode
	}{{3, rejectUnspecified}, {4, rejectAuth}} {
		c, fc := authDial(t, addr, hello{Version: tc.version, Region: "na", Node: "na1"}, "wrong")
		f, err := fc.read(5 * time.Second)
		c.Close()
		r, ok := f.(*reject)
		if !ok || err != nil || r.Code != tc.code || r.Reason != "wrong token" {
			t.Fatalf("version %d: answer %T %+v, %v; want reject %q with code %d", tc.version, f, f, err, "wrong token", tc.code)
		}
	}
	// A version 3 server's challenge is answered with a version 3 Hello.
	c3, s3 := net.Pipe()
	defer c3.Close()
	go func() {
		defer s3.Close()
		fc := newFrameConn(s3, DefaultMaxFrame)
		_ = fc.write(time.Second, &challenge{Version: 3})
		f, _ := fc.read(time.Second)
		if h, ok := f.(*hello); ok && h.Version == 3 {
			_ = fc.write(time.Second, &welcome{Region: "eu", Node: "eu1"})
			return
		}
		_ = fc.write(time.Second, &reject{Reason: fmt.Sprintf("got %+v", f)})
	}()
	f, err := clientHello(newFrameConn(c3, DefaultMaxFrame), time.Second, 0, "na", "na1", testToken)
	if _, ok := f.(*welcome); !ok || err != nil {
		t.Fatalf("against a version 3 server: %T %+v, %v; want welcome", f, f, err)
	}
}

// TestSilentNodeNotCalledOld: a node that accepts the connection and says
// nothing is reported as not answering in time, not as an old version.
func TestSilentNodeNotCalledOld(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, _ = c.Read(make([]byte, 1)) // frozen: reads until the client gives up
	}()
	sh := NewShipper(shipperConfig(NodeAddr{Name: "ap1", Addr: ln.Addr().String()}), nil, zerolog.Nop())
	_, _, err = sh.handshake(testCtx(t), 0, 0)
	if err == nil || strings.Contains(err.Error(), "older") || strings.Contains(err.Error(), "protocol") ||
		!strings.Contains(err.Error(), "did not answer within") {
		t.Fatalf("handshake with a silent node = %v, want a 'did not answer' error that claims no version", err)
	}
	if AuthRefused(err) {
		t.Fatalf("a silent node counts as refusing the credentials: %v", err)
	}
}

// progressFails is an Applier whose Progress fails, as while the
// target's database is down.
type progressFails struct{ *memApplier }

func (progressFails) Progress(context.Context, string) (pglogrepl.LSN, error) {
	return 0, errors.New("database down")
}

// TestRefusalLogsSourceOnce: a hello refused after it was authenticated
// (the target cannot read its progress) is logged with the source once;
// the checked log fails the test on a key that appears twice.
func TestRefusalLogsSourceOnce(t *testing.T) {
	logs := newLogBuf(t)
	addr := serve(t, NewServer(serverConfig("eu", "eu1"), progressFails{newMemApplier()}, logs.logger()))
	sh := NewShipper(shipperConfig(NodeAddr{Name: "eu1", Addr: addr}), nil, newLogBuf(t).logger())
	runShipper(t, sh)
	waitFor(t, "a refused hello", 10*time.Second, func() bool {
		return strings.Contains(logs.String(), "progress: database down")
	})
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		if strings.Contains(line, "database down") && strings.Count(line, `"source":`) != 1 {
			t.Fatalf("refusal line names the source %d times: %s", strings.Count(line, `"source":`), line)
		}
	}
}
