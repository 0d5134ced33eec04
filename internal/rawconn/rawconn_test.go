package rawconn

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// pair returns the two ends of a loopback TCP connection, the first
// wrapped.
func pair(t *testing.T) (*Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			t.Error(err)
		}
		acc <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	other := <-acc
	t.Cleanup(func() { c.Close(); other.Close() })
	w, ok := Wrap(c).(*Conn)
	if !ok {
		t.Fatalf("Wrap(%T) did not wrap", c)
	}
	return w, other
}

func TestReadWriteLarge(t *testing.T) {
	c, other := pair(t)
	// 8 MB is far more than the socket buffers hold: Write meets EAGAIN
	// and waits for the reader, which reads slowly at first.
	data := bytes.Repeat([]byte("0123456789abcdef"), 512<<10)
	got := make(chan []byte, 1)
	go func() {
		time.Sleep(100 * time.Millisecond)
		b, _ := io.ReadAll(other)
		got <- b
	}()
	n, err := c.Write(data)
	if err != nil || n != len(data) {
		t.Fatalf("Write = %d, %v; want %d", n, err, len(data))
	}
	c.Conn.(*net.TCPConn).CloseWrite()
	if b := <-got; !bytes.Equal(b, data) {
		t.Fatalf("the other end read %d bytes, not what was written", len(b))
	}
	// And back: reads until EOF.
	go func() {
		other.Write(data)
		other.Close()
	}()
	b, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(b, data) {
		t.Fatalf("ReadAll = %d bytes, %v", len(b), err)
	}
	if n, err := c.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Fatalf("Read after EOF = %d, %v", n, err)
	}
}

func TestReadDeadlineAndClose(t *testing.T) {
	c, other := pair(t)
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	_, err := c.Read(make([]byte, 10))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read past the deadline = %v, want a timeout", err)
	}
	if d := time.Since(start); d < 40*time.Millisecond {
		t.Fatalf("Read returned after %v, before its deadline", d)
	}
	// A read waiting for data returns once the other end writes.
	c.SetReadDeadline(time.Time{})
	go func() {
		time.Sleep(20 * time.Millisecond)
		other.Write([]byte("hello"))
	}()
	buf := make([]byte, 10)
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("Read = %q, %v", buf[:n], err)
	}
	// Close interrupts a waiting read with net.ErrClosed.
	go func() {
		time.Sleep(20 * time.Millisecond)
		c.Close()
	}()
	if _, err := c.Read(buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Read of a closed conn = %v, want net.ErrClosed", err)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Write to a closed conn = %v, want net.ErrClosed", err)
	}
}

func TestWriteToReset(t *testing.T) {
	c, other := pair(t)
	other.(*net.TCPConn).SetLinger(0)
	other.Close() // RST
	time.Sleep(20 * time.Millisecond)
	var err error
	for i := 0; i < 100 && err == nil; i++ {
		_, err = c.Write(make([]byte, 64<<10))
	}
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "write" {
		t.Fatalf("Write to a reset connection = %v, want a write *net.OpError", err)
	}
}

func TestWrapOther(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if Wrap(a) != a {
		t.Fatal("Wrap wrapped a net.Pipe, which has no file descriptor")
	}
}

// TestWriteHappensBeforeRead: what a goroutine set before it wrote to a
// Conn is what the goroutine that read the bytes from another Conn sees,
// to the race detector too (as with net.Conn): run with -race, this
// test fails when Conn's system calls say nothing to it.
func TestWriteHappensBeforeRead(t *testing.T) {
	a, other := pair(t)
	b, ok := Wrap(other).(*Conn)
	if !ok {
		t.Fatalf("Wrap(%T) did not wrap", other)
	}
	for round := 0; round < 20; round++ {
		var shared []int // written by one goroutine, read by the other
		done := make(chan error, 1)
		go func() {
			buf := make([]byte, 1)
			if _, err := io.ReadFull(b, buf); err != nil {
				done <- err
				return
			}
			if len(shared) != 3 {
				done <- errors.New("the reader does not see what the writer set")
				return
			}
			done <- nil
		}()
		time.Sleep(time.Millisecond) // the reader waits in the poller
		shared = []int{1, 2, 3}
		if _, err := a.Write([]byte{byte(round)}); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}
