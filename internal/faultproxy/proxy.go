package faultproxy

import (
	"errors"
	"io"
	"math/rand"
	"net"
	"sync"
	"time"
)

// Proxy forwards TCP connections from its own loopback address to a target
// address, with faults switched on and off by its methods. It is safe for
// concurrent use.
type Proxy struct {
	target string
	ln     net.Listener

	mu        sync.Mutex
	rnd       *rand.Rand
	delay     time.Duration
	jitter    time.Duration
	blackhole bool
	refuse    bool
	bps       int64
	conns     map[net.Conn]struct{}
	closed    bool
	record    io.Writer

	wg sync.WaitGroup // accept loop and every pipe goroutine
}

// New starts a proxy to target on 127.0.0.1 with a free port. Its jitter is
// seeded with 1; use Seed to change it.
func New(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{target: target, ln: ln, rnd: rand.New(rand.NewSource(1)), conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr returns the address clients connect to.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Seed reseeds the jitter.
func (p *Proxy) Seed(seed int64) {
	p.mu.Lock()
	p.rnd = rand.New(rand.NewSource(seed))
	p.mu.Unlock()
}

// Delay holds every forwarded chunk for d plus a random duration up to
// jitter. Zero turns it off.
func (p *Proxy) Delay(d, jitter time.Duration) {
	p.mu.Lock()
	p.delay, p.jitter = d, jitter
	p.mu.Unlock()
}

// Blackhole makes the proxy accept connections and read from both sides
// but forward nothing, on current and new connections, while on. What is
// read meanwhile is lost.
func (p *Proxy) Blackhole(on bool) {
	p.mu.Lock()
	p.blackhole = on
	p.mu.Unlock()
}

// Refuse makes the proxy close new connections at once while on.
func (p *Proxy) Refuse(on bool) {
	p.mu.Lock()
	p.refuse = on
	p.mu.Unlock()
}

// Bandwidth limits each direction of each connection to bytesPerSec.
// Zero or negative removes the limit.
func (p *Proxy) Bandwidth(bytesPerSec int64) {
	p.mu.Lock()
	p.bps = bytesPerSec
	p.mu.Unlock()
}

// Record copies every forwarded chunk, in both directions, to w as well;
// nil stops it. w must be safe for concurrent use.
func (p *Proxy) Record(w io.Writer) {
	p.mu.Lock()
	p.record = w
	p.mu.Unlock()
}

// Reset closes every current connection, on both sides, with a TCP reset.
func (p *Proxy) Reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		abort(c)
	}
}

// Conns returns the number of open connections (each side counts once).
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

// Close stops the proxy, closes every connection and waits for its
// goroutines.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	err := p.ln.Close()
	p.wg.Wait()
	return err
}

func abort(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	c.Close()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(5 * time.Millisecond)
			continue
		}
		p.mu.Lock()
		refuse := p.refuse
		p.mu.Unlock()
		if refuse {
			abort(c)
			continue
		}
		if !p.track(c) {
			c.Close()
			return
		}
		p.wg.Add(1)
		go p.serve(c)
	}
}

// serve dials the target for client c and pipes both directions; when
// either direction ends, both connections close.
func (p *Proxy) serve(c net.Conn) {
	defer p.wg.Done()
	defer p.untrack(c)
	s, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		abort(c)
		return
	}
	if !p.track(s) {
		s.Close()
		return
	}
	defer p.untrack(s)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pipe(s, c) }()
	go func() { defer wg.Done(); p.pipe(c, s) }()
	wg.Wait()
}

// pipe copies src to dst chunk by chunk, applying the faults in force when
// each chunk arrives. When src ends, it closes both.
func (p *Proxy) pipe(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			blackhole, bps, record := p.blackhole, p.bps, p.record
			d := p.delay
			if p.jitter > 0 {
				d += time.Duration(p.rnd.Int63n(int64(p.jitter)))
			}
			p.mu.Unlock()
			if !blackhole {
				if bps > 0 {
					d += time.Duration(int64(n) * int64(time.Second) / bps)
				}
				if d > 0 {
					time.Sleep(d)
				}
				if record != nil {
					record.Write(buf[:n])
				}
				if _, werr := dst.Write(buf[:n]); werr != nil {
					return
				}
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				abort(dst)
			}
			return
		}
	}
}
