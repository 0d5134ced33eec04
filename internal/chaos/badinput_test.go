package chaos

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"math/rand"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/e2e"
	"github.com/prism-cdc/prism-cdc/pkg/peers"
)

// recorder forwards TCP connections to target and keeps each
// connection's client-to-server bytes (up to limit each), so a test can
// replay what a real shipper sent: the longest of them (a shipper's
// first connections may be refused while the node waits for its
// database).
type recorder struct {
	ln     net.Listener
	target string
	limit  int

	mu    sync.Mutex
	bufs  []*bytes.Buffer
	conns []net.Conn
	wg    sync.WaitGroup
}

func newRecorder(t *testing.T, target string, limit int) *recorder {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &recorder{ln: ln, target: target, limit: limit}
	r.wg.Add(1)
	go r.accept()
	t.Cleanup(r.close)
	return r
}

func (r *recorder) accept() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", r.target)
		if err != nil {
			c.Close()
			continue
		}
		r.mu.Lock()
		buf := &bytes.Buffer{}
		r.bufs = append(r.bufs, buf)
		rec := &limited{buf: buf, mu: &r.mu, max: r.limit}
		r.conns = append(r.conns, c, s)
		r.mu.Unlock()
		r.wg.Add(2)
		go func() { defer r.wg.Done(); io.Copy(s, io.TeeReader(c, rec)); s.Close(); c.Close() }()
		go func() { defer r.wg.Done(); io.Copy(c, s); c.Close(); s.Close() }()
	}
}

func (r *recorder) close() {
	r.ln.Close()
	r.mu.Lock()
	for _, c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

func (r *recorder) recorded() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	var longest []byte
	for _, b := range r.bufs {
		if b.Len() > len(longest) {
			longest = b.Bytes()
		}
	}
	return append([]byte(nil), longest...)
}

type limited struct {
	buf *bytes.Buffer
	mu  *sync.Mutex
	max int
}

func (l *limited) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if room := l.max - l.buf.Len(); room > 0 {
		l.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

// frame encodes one peer-protocol frame: a 4-byte big-endian length, then
// the type byte and the payload.
func frame(typ byte, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(1+len(payload)))
	return append(append(b, typ), payload...)
}

func str(s string) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(s))), s...)
}

// hello encodes a Hello of the current protocol version from source
// region and node, signed with token over the server's challenge nonce.
func hello(nonce []byte, region, node, token string) []byte {
	p := []byte("PRSM")
	p = binary.BigEndian.AppendUint16(p, peers.ProtocolVersion)
	p = append(p, 0)
	p = append(p, str(region)...)
	p = append(p, str(node)...)
	p = append(p, str(string(peers.HelloMAC(token, nonce, region, node, 0)))...)
	return frame('H', p)
}

// readChallenge reads the Challenge frame a server opens every connection
// with and returns its nonce: the last peers.NonceSize bytes.
func readChallenge(t *testing.T, c net.Conn) []byte {
	t.Helper()
	var hdr [4]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		t.Fatalf("read challenge: %v", err)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n < 1+peers.NonceSize || n > 1024 {
		t.Fatalf("challenge frame of %d bytes", n)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(c, p); err != nil {
		t.Fatalf("read challenge: %v", err)
	}
	if p[0] != 'K' {
		t.Fatalf("first frame of type %q, want a challenge", p[0])
	}
	return p[len(p)-peers.NonceSize:]
}

// signedExchange reads the server's challenge, sends what build returns
// for its nonce, and returns the server's answer after the challenge until
// it closes the connection or a deadline passes.
func signedExchange(t *testing.T, addr string, build func(nonce []byte) []byte, wait time.Duration) []byte {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(wait))
	nonce := readChallenge(t, c)
	c.Write(build(nonce)) // the server may close before reading everything
	out, _ := io.ReadAll(c)
	return out
}

// exchange sends b to addr and returns what comes back until the server
// closes the connection or a deadline passes.
func exchange(t *testing.T, addr string, b []byte, wait time.Duration) []byte {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(wait))
	c.Write(b) // the server may close before reading everything
	out, _ := io.ReadAll(c)
	return out
}

// TestHostilePeersDoNotDisturbGoodOnes attacks a live node's peer port
// with garbage, truncated, oversized and replayed frames and unauthenticated
// or unknown peers, while a real source keeps shipping to it. The node must
// survive, say why it refuses, never leak the token, and apply every
// transaction exactly once.
func TestHostilePeersDoNotDisturbGoodOnes(t *testing.T) {
	const token = "e2e-secret-token" // what the harness gives every node
	d := e2e.New(t, e2e.Topology{"na": {"na1"}, "eu": {"eu1"}}, schema)
	rec := newRecorder(t, d.Listen("eu1"), 4<<20)
	d.PeerAddr = func(from, to string) string {
		if to == "eu1" {
			return rec.ln.Addr().String()
		}
		return ""
	}
	d.StartAll()
	waitReaders(d)
	ctx := context.Background()
	rng := rand.New(rand.NewSource(7))
	w := &ledgerWriter{region: "na", id: 1}
	wctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); w.run(wctx, d, rand.New(rand.NewSource(8)), 10*time.Millisecond) }()
	defer func() { stop(); wg.Wait() }()

	d.Eventually(60*time.Second, "na's writes reach eu", func() bool {
		n, err := count(ctx, d, "eu", "SELECT count(*) FROM ledger")
		return err == nil && n > 50
	})
	addr := d.Listen("eu1")
	garbage := make([]byte, 64<<10)
	rng.Read(garbage)
	signed := func(region, node, token string, after []byte) func([]byte) []byte {
		return func(nonce []byte) []byte { return append(hello(nonce, region, node, token), after...) }
	}
	cases := []struct {
		name string
		send []byte
		// build, when set, makes what is sent from the server's challenge
		// nonce; the answer checked is what follows the challenge.
		build func(nonce []byte) []byte
		// reject: the answer must be a Reject frame (type 'R') naming why.
		reject string
	}{
		{name: "garbage", send: garbage},
		{name: "http request", send: []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")},
		{name: "truncated frame", send: append(binary.BigEndian.AppendUint32(nil, 1000), "HPRSM"...)},
		{name: "oversized length", send: binary.BigEndian.AppendUint32(nil, 0xffffffff)},
		{name: "zero length", send: binary.BigEndian.AppendUint32(nil, 0)},
		{name: "hello with a lying string length", send: frame('H', append([]byte("PRSM\x00\x03\x00"), 0xff, 0xff, 0xff, 0xf0))},
		{name: "wrong token", build: signed("na", "mallory", "not-the-token", nil), reject: "token"},
		{name: "empty token", build: signed("na", "mallory", "", nil), reject: "token"},
		{name: "mac over another nonce", build: func([]byte) []byte { return hello(make([]byte, peers.NonceSize), "na", "mallory", token) }, reject: "token"},
		{name: "unknown region", build: signed("mars", "mallory", token, nil), reject: "mars"},
		{name: "own region", build: signed("eu", "mallory", token, nil), reject: "eu"},
		{name: "txn before hello", send: frame('T', garbage[:100])},
		{name: "valid hello then garbage frame", build: signed("na", "mallory", token, frame('T', garbage[:300]))},
		{name: "valid hello then ack frame", build: signed("na", "mallory", token, frame('A', make([]byte, 8)))},
	}
	for _, tc := range cases {
		var out []byte
		if tc.build != nil {
			out = signedExchange(t, addr, tc.build, 10*time.Second)
		} else {
			out = exchange(t, addr, tc.send, 10*time.Second)
		}
		if strings.Contains(string(out), token) {
			t.Errorf("%s: the answer contains the token: %q", tc.name, out)
		}
		if tc.reject != "" {
			if len(out) < 5 || out[4] != 'R' || !strings.Contains(string(out), tc.reject) {
				t.Errorf("%s: answer %q, want a Reject frame naming %q", tc.name, out, tc.reject)
			}
		}
		if !d.Running("eu1") {
			t.Fatalf("%s: eu1 exited\n%s", tc.name, d.Logs())
		}
	}

	// A flood of idle and half-open connections does not block the port.
	var idle []net.Conn
	for i := 0; i < 50; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("dial %s: %v", addr, err)
		}
		idle = append(idle, c)
	}
	out := signedExchange(t, addr, signed("na", "mallory", "wrong", nil), 10*time.Second)
	if len(out) < 5 || out[4] != 'R' {
		t.Errorf("with 50 idle connections open, a new peer got %q, want a Reject frame", out)
	}
	for _, c := range idle {
		c.Close()
	}

	// What the real shipper sent never contains the token, and replaying
	// it (a Hello signed over an earlier connection's nonce, then its
	// transactions) is refused: nothing applies twice.
	replay := rec.recorded()
	if len(replay) < 200 {
		t.Fatalf("recorded only %d bytes of the shipper's stream", len(replay))
	}
	if bytes.Contains(replay, []byte(token)) {
		t.Fatalf("the shipper's bytes contain the token")
	}
	for i := 0; i < 3; i++ {
		out := signedExchange(t, addr, func([]byte) []byte { return replay }, 3*time.Second)
		if len(out) < 5 || out[4] != 'R' || !strings.Contains(string(out), "wrong token") {
			t.Errorf("replayed stream answered %q, want a Reject naming the wrong token", out)
		}
	}

	stop()
	wg.Wait()
	acked, amb, _ := w.snapshot()
	if len(amb) > 0 {
		t.Fatalf("ambiguous writes without faults: %v", amb)
	}
	var onNA, onEU int
	d.Eventually(90*time.Second, "eu holds every na write once", func() bool {
		var err1, err2 error
		onNA, err1 = count(ctx, d, "na", "SELECT count(*) FROM ledger")
		onEU, err2 = count(ctx, d, "eu", "SELECT count(*) FROM ledger")
		if err1 != nil || err2 != nil || onNA != len(acked) || onEU != len(acked) {
			t.Logf("na holds %d (%v), eu %d (%v) ledger rows, %d acknowledged", onNA, err1, onEU, err2, len(acked))
		}
		return err1 == nil && err2 == nil && onNA == len(acked) && onEU == len(acked)
	})
	rep := d.Verify(ctx)
	if !rep.Equal() {
		t.Fatalf("regions differ after the attacks: %+v", rep)
	}
	if !d.Running("eu1") || !d.Running("na1") {
		t.Fatalf("a node exited during the attacks\n%s", d.Logs())
	}
	logs := d.Logs()
	if strings.Contains(logs, "panic") {
		t.Fatalf("a node log mentions a panic:\n%s", logs)
	}
}
