package faultproxy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// echoServer echoes every line back until the test ends.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func newProxy(t *testing.T) *Proxy {
	t.Helper()
	p, err := New(echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func roundTrip(c net.Conn, msg string, timeout time.Duration) (string, error) {
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return line, err
}

func TestForwardAndFaults(t *testing.T) {
	p := newProxy(t)
	p.Delay(time.Millisecond, time.Millisecond)
	p.Bandwidth(1 << 20)
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := roundTrip(c, "hello", 5*time.Second); err != nil || got != "hello\n" {
		t.Fatalf("roundTrip = %q, %v, want hello", got, err)
	}

	// Black hole: nothing comes back, and what was sent is lost.
	p.Blackhole(true)
	if got, err := roundTrip(c, "lost", 300*time.Millisecond); !isTimeout(err) {
		t.Fatalf("roundTrip through black hole = %q, %v, want timeout", got, err)
	}
	p.Blackhole(false)
	if got, err := roundTrip(c, "back", 5*time.Second); err != nil || got != "back\n" {
		t.Fatalf("roundTrip after black hole = %q, %v, want back", got, err)
	}

	// Reset: the client sees the connection end.
	p.Reset()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("Read after Reset = %v, want connection error", err)
	}

	// Refuse: a new connection is closed at once.
	p.Refuse(true)
	c2, err := net.Dial("tcp", p.Addr())
	if err == nil {
		defer c2.Close()
		if _, err := roundTrip(c2, "x", 5*time.Second); err == nil || isTimeout(err) {
			t.Fatalf("roundTrip on refused connection = %v, want connection error", err)
		}
	}
	p.Refuse(false)
	c3, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c3.Close()
	if got, err := roundTrip(c3, "again", 5*time.Second); err != nil || got != "again\n" {
		t.Fatalf("roundTrip after Refuse(false) = %q, %v, want again", got, err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
