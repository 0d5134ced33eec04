package decode

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"
)

// TestLingerBatchesReads: once the stream runs, a read that follows one
// which drained the socket waits the linger first, so that messages the
// server sends meanwhile come in one read; without a linger the first of
// them comes alone.
func TestLingerBatchesReads(t *testing.T) {
	for _, tc := range []struct {
		name   string
		linger time.Duration
		want   string
	}{
		{"linger", time.Second, "bc"},
		{"none", 0, "b"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			var d net.Dialer
			nc, err := lingerDial(d.DialContext)(context.Background(), "tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			srv, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Close()
			lc := lingerOf(nc)
			if lc == nil {
				t.Fatalf("lingerOf(%T) = nil, want the lingerConn", nc)
			}
			lc.setLinger(tc.linger)

			buf := make([]byte, 64)
			if _, err := srv.Write([]byte("a")); err != nil {
				t.Fatal(err)
			}
			if n, err := nc.Read(buf); err != nil || string(buf[:n]) != "a" {
				t.Fatalf("Read = %q, %v, want \"a\"", buf[:n], err)
			}
			wrote := make(chan error, 1)
			go func() { // owned by the test, waited for below
				_, err := srv.Write([]byte("b"))
				time.Sleep(200 * time.Millisecond)
				if err == nil {
					_, err = srv.Write([]byte("c"))
				}
				wrote <- err
			}()
			n, err := nc.Read(buf)
			if err != nil || string(buf[:n]) != tc.want {
				t.Errorf("Read = %q, %v, want %q", buf[:n], err, tc.want)
			}
			if err := <-wrote; err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestLingerOfTLS: the lingerConn is found under TLS too, and a plain
// connection has none.
func TestLingerOfTLS(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	lc := &lingerConn{Conn: a}
	if got := lingerOf(tls.Client(lc, &tls.Config{})); got != lc {
		t.Errorf("lingerOf(tls over lingerConn) = %v, want the lingerConn", got)
	}
	if got := lingerOf(b); got != nil {
		t.Errorf("lingerOf(plain) = %v, want nil", got)
	}
}
