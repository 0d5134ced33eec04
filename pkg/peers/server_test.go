package peers

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// rawDial connects to addr and sends the given bytes.
func rawDial(t *testing.T, addr string, data []byte) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if len(data) > 0 {
		if _, err := c.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// reply reads the server's first frame after its Challenge (nil frame and
// an error when the server closed without one).
func reply(t *testing.T, c net.Conn) (any, error) {
	t.Helper()
	fc := newFrameConn(c, DefaultMaxFrame)
	f, err := fc.read(5 * time.Second)
	if _, ok := f.(*challenge); ok && err == nil {
		return fc.read(5 * time.Second)
	}
	return f, err
}

// goodPeer checks that the server still welcomes a correct peer and acks
// its transaction.
func goodPeer(t *testing.T, addr string, app *memApplier, i int) {
	t.Helper()
	_, fc := authDial(t, addr, hello{Region: "na", Node: "na1"}, testToken)
	f, err := fc.read(5 * time.Second)
	if _, ok := f.(*welcome); !ok || err != nil {
		t.Fatalf("good peer: first reply %T %+v, %v; want welcome", f, f, err)
	}
	if err := fc.write(time.Second, &txnFrame{Txn: mkTxn(i, 0)}); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := fc.read(5 * time.Second)
		if err != nil {
			t.Fatalf("good peer: read = %v, want ack", err)
		}
		if a, ok := f.(*ack); ok {
			if a.LSN != lsnOf(i) {
				t.Fatalf("good peer: ack %s, want %s", a.LSN, lsnOf(i))
			}
			return
		}
	}
}

func TestServerRejects(t *testing.T) {
	logs := newLogBuf(t)
	app := newMemApplier()
	cfg := serverConfig("eu", "eu1")
	cfg.HelloTimeout = 300 * time.Millisecond
	cfg.MaxFrame = 1 << 20
	addr := serve(t, NewServer(cfg, app, logs.logger()))
	goodPeer(t, addr, app, 1)

	helloFrame := func(h hello) []byte { return encode(t, &h) }
	cases := []struct {
		name string
		send []byte
		// signed, when set, is a Hello sent after reading the challenge,
		// signed with token.
		signed *hello
		token  string
		reason string // substring of the Reject reason; "" when no Reject is expected
	}{
		{name: "wrong token", signed: &hello{Region: "na", Node: "x"}, token: "wrong-secret", reason: "wrong token"},
		{name: "no token", signed: &hello{Region: "na", Node: "x"}, reason: "no token"},
		{name: "mac of another node", send: helloFrame(hello{Version: ProtocolVersion, Region: "na", Node: "x", MAC: HelloMAC(testToken, make([]byte, NonceSize), "na", "y", 0)}), reason: "wrong token"},
		{name: "clear token in the mac field", send: helloFrame(hello{Version: ProtocolVersion, Region: "na", Node: "x", MAC: []byte(testToken)}), reason: "wrong token"},
		{name: "unaccepted region", signed: &hello{Region: "mars", Node: "x"}, token: testToken, reason: "not accepted"},
		{name: "own region", signed: &hello{Region: "eu", Node: "x"}, token: testToken, reason: "own region"},
		{name: "newer version", signed: &hello{Version: ProtocolVersion + 1, Region: "na", Node: "x"}, token: testToken, reason: "upgrade both sides"},
		{name: "version 2 with a clear token", send: helloFrame(hello{Version: 2, Region: "na", Node: "x", MAC: []byte(testToken)}), reason: "peer speaks protocol 2"},
		{name: "txn before hello", send: encode(t, &txnFrame{Txn: mkTxn(2, 0)}), reason: "not hello"},
		{name: "garbage", send: []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), reason: "first frame"},
		{name: "oversized", send: []byte{0x7f, 0xff, 0xff, 0xff, 'H'}, reason: "exceeds the limit"},
		{name: "zero length", send: []byte{0, 0, 0, 0}, reason: "zero length"},
		{name: "bad frame", send: []byte{0, 0, 0, 3, 'H', 'P', 'R'}, reason: "first frame"},
		{name: "truncated then silent", send: []byte{0, 0, 0, 50, 'H', 'P'}, reason: "first frame"},
		{name: "silent", send: nil, reason: "first frame"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var f any
			var err error
			var c net.Conn
			if tc.signed != nil {
				var fc *frameConn
				c, fc = authDial(t, addr, *tc.signed, tc.token)
				f, err = fc.read(5 * time.Second)
			} else {
				c = rawDial(t, addr, tc.send)
				f, err = reply(t, c)
			}
			r, ok := f.(*reject)
			if !ok || !strings.Contains(r.Reason, tc.reason) {
				t.Fatalf("reply = %T %+v, %v; want reject containing %q", f, f, err, tc.reason)
			}
			// The server closes the connection after a Reject.
			if f, err := reply(t, c); err == nil {
				t.Fatalf("after reject: got %T, want closed connection", f)
			}
		})
	}
	// A peer that disconnects mid-frame does not disturb the server.
	c := rawDial(t, addr, []byte{0, 0, 0, 9, 'A'})
	c.Close()

	goodPeer(t, addr, app, 2)
	if got := app.appliedLSNs(); len(got) != 2 {
		t.Fatalf("applied %v, want the good peer's two transactions", got)
	}
	out := logs.String()
	if strings.Contains(out, testToken) || strings.Contains(out, "wrong-secret") {
		t.Fatalf("a token appears in the log:\n%s", out)
	}
	if n := strings.Count(out, `"peer rejected"`); n < len(cases) {
		t.Fatalf("%d rejections logged, want %d:\n%s", n, len(cases), out)
	}
}

func TestServerBadFrameAfterHello(t *testing.T) {
	app := newMemApplier()
	addr := serve(t, NewServer(serverConfig("eu", "eu1"), app, zerolog.Nop()))
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"garbage", []byte{0, 0, 0, 5, 'T', 1, 2, 3, 4}},
		{"wrong origin", encode(t, &txnFrame{Txn: func() *decode.Txn { x := mkTxn(1, 0); x.Origin = "as"; return x }()})},
		{"ack from shipper", encode(t, &ack{LSN: 5})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, fc := authDial(t, addr, hello{Region: "na", Node: "na1"}, testToken)
			if f, err := fc.read(5 * time.Second); err != nil {
				t.Fatalf("welcome: %T %v", f, err)
			}
			if _, err := c.Write(tc.data); err != nil {
				t.Fatal(err)
			}
			for {
				f, err := fc.read(5 * time.Second)
				if err != nil {
					break // disconnected, as it should be
				}
				if _, ok := f.(*heartbeat); !ok {
					t.Fatalf("got %T after a bad frame, want heartbeats then disconnect", f)
				}
			}
		})
	}
	if got := app.appliedLSNs(); len(got) != 0 {
		t.Fatalf("applied %v from bad streams", got)
	}
	goodPeer(t, addr, app, 1)
}

// writeCert writes a certificate signed by parent (self-signed when
// parent is nil) and its key as PEM files and returns them.
func writeCert(t *testing.T, dir, name string, isCA bool, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (certFile, keyFile string, cert *x509.Certificate, key *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		IsCA:         isCA, BasicConstraintsValid: true,
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ = x509.ParseCertificate(der)
	kb, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	return certFile, keyFile, cert, key
}

func TestMutualTLS(t *testing.T) {
	dir := t.TempDir()
	caFile, _, ca, caKey := writeCert(t, dir, "ca", true, nil, nil)
	srvCert, srvKey, _, _ := writeCert(t, dir, "eu1", false, ca, caKey)
	cliCert, cliKey, _, _ := writeCert(t, dir, "na1", false, ca, caKey)
	rogueCAFile, _, rogueCA, rogueKey := writeCert(t, dir, "rogue-ca", true, nil, nil)
	rogueCert, rogueKeyFile, _, _ := writeCert(t, dir, "rogue", false, rogueCA, rogueKey)

	serverTLS, _, err := TLSConfigs(srvCert, srvKey, caFile)
	if err != nil {
		t.Fatal(err)
	}
	_, clientTLS, err := TLSConfigs(cliCert, cliKey, caFile)
	if err != nil {
		t.Fatal(err)
	}
	// The rogue client trusts the real CA for the server but presents a
	// certificate from an unknown CA.
	_, rogueTLS, err := TLSConfigs(rogueCert, rogueKeyFile, caFile)
	if err != nil {
		t.Fatal(err)
	}
	_ = rogueCAFile

	logs := newLogBuf(t)
	app := newMemApplier()
	cfg := serverConfig("eu", "eu1")
	cfg.Insecure = false
	cfg.TLS = serverTLS
	addr := serve(t, NewServer(cfg, app, logs.logger()))

	ctx := testCtx(t)
	ship := func(tlsCfg *tls.Config, n int) *Shipper {
		sc := shipperConfig(NodeAddr{Name: "eu1", Addr: addr})
		sc.Insecure = false
		sc.TLS = tlsCfg
		sh := NewShipper(sc, nil, zerolog.Nop())
		runShipper(t, sh)
		if err := sh.Send(ctx, mkTxn(n, 0)); err != nil {
			t.Fatal(err)
		}
		return sh
	}
	rogue := ship(rogueTLS, 1)
	waitFor(t, "rogue shipper to fail", 10*time.Second, func() bool { return rogue.Status().Retries >= 1 })
	// The refused certificate is a refusal of the credentials, as a
	// wrong token is.
	waitFor(t, "rogue shipper to report the refused certificate", 10*time.Second, func() bool {
		st := rogue.Status()
		return len(st.AuthRefused) == 1 && st.AuthRefused[0] == "eu1"
	})
	if got := app.appliedLSNs(); len(got) != 0 {
		t.Fatalf("applied %v from a client with an unknown CA", got)
	}
	// The client sees the failure before the server has logged it.
	waitFor(t, "tls handshake rejection logged", 10*time.Second, func() bool {
		return strings.Contains(logs.String(), "tls handshake")
	})
	good := ship(clientTLS, 2)
	waitFor(t, "good shipper's ack", 10*time.Second, func() bool { return good.Acked() == lsnOf(2) })

	// A plaintext client cannot talk to the TLS server.
	c := rawDial(t, addr, encode(t, &hello{Version: ProtocolVersion, Region: "na", Node: "na1"}))
	if f, err := reply(t, c); err == nil {
		t.Fatalf("plaintext client got %T %+v", f, f)
	}
}

// TestReadFramesRuns: the transactions of frames that arrive together go
// to the applier as one run, so that it takes them in one batch (and one
// wake-up) instead of one at a time; a run ends before the read that
// waits, and at MaxBatch.
func TestReadFramesRuns(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	cfg := serverConfig("eu", "eu1")
	cfg.MaxBatch = 4
	s := NewServer(cfg, newMemApplier(), zerolog.Nop())
	queue := make(chan []*queued, 10)
	done := make(chan error, 1)
	go func() { // owned by the test: ends when b is closed
		_, err := s.readFrames(testCtx(t), newFrameConn(a, DefaultMaxFrame), "na", queue, zerolog.Nop())
		done <- err
	}()
	w := newFrameConn(b, DefaultMaxFrame)
	send := func(from, to int) {
		t.Helper()
		var frames []any
		for i := from; i <= to; i++ {
			frames = append(frames, &txnFrame{Txn: mkTxn(i, 0)})
		}
		if err := w.write(5*time.Second, frames...); err != nil {
			t.Fatal(err)
		}
	}
	next := func() []pglogrepl.LSN {
		t.Helper()
		select {
		case run := <-queue:
			var lsns []pglogrepl.LSN
			for _, q := range run {
				lsns = append(lsns, q.txn.EndLSN)
			}
			return lsns
		case <-time.After(5 * time.Second):
			t.Fatal("no run queued")
			return nil
		}
	}
	send(1, 3)
	if got, want := next(), []pglogrepl.LSN{lsnOf(1), lsnOf(2), lsnOf(3)}; !slices.Equal(got, want) {
		t.Errorf("run after one write of 3 = %v, want %v", got, want)
	}
	send(4, 9)
	for _, want := range [][]pglogrepl.LSN{{lsnOf(4), lsnOf(5), lsnOf(6), lsnOf(7)}, {lsnOf(8), lsnOf(9)}} {
		if got := next(); !slices.Equal(got, want) {
			t.Errorf("run after one write of 6 with MaxBatch 4 = %v, want %v", got, want)
		}
	}
	b.Close()
	if err := <-done; err == nil {
		t.Error("readFrames = nil after the connection closed, want an error")
	}
}
