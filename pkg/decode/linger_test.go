package decode

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/internal/rawconn"
)

// TestLingerBatchesReads: once the stream runs and is busy, a read that
// follows one which drained the socket waits the linger first, so that
// messages the server sends meanwhile come in one read; on a quiet stream
// or without a linger the first of them comes alone.
func TestLingerBatchesReads(t *testing.T) {
	for _, tc := range []struct {
		name   string
		linger time.Duration
		busy   bool
		want   string
	}{
		{"busy", time.Second, true, "bc"},
		{"quiet", time.Second, false, "b"},
		{"none", 0, true, "b"},
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
			if _, ok := lc.Conn.(*rawconn.Conn); !ok {
				t.Fatalf("the stream's socket is a %T, want a *rawconn.Conn", lc.Conn)
			}
			lc.setLinger(tc.linger)

			buf := make([]byte, 64)
			if _, err := srv.Write([]byte("a")); err != nil {
				t.Fatal(err)
			}
			if n, err := nc.Read(buf); err != nil || string(buf[:n]) != "a" {
				t.Fatalf("Read = %q, %v, want \"a\"", buf[:n], err)
			}
			lc.busy.Store(tc.busy)
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

// TestLingerBusy: a stream is busy after a window of busyWindow with more
// than busyReads reads, and quiet again after one with fewer, or after a
// pause.
func TestLingerBusy(t *testing.T) {
	c := &lingerConn{}
	t0 := time.Unix(1000, 0)
	step := busyWindow / (2 * busyReads)
	now := t0
	c.count(now) // opens the first window
	for i := 0; i < 2*busyReads; i++ {
		now = now.Add(step)
		c.count(now)
	}
	if !c.busy.Load() {
		t.Fatalf("busy = false after %d reads in %s, want true", 2*busyReads, busyWindow)
	}
	for i := 0; i < busyReads/2; i++ { // a read every 1/10 of the window
		now = now.Add(busyWindow / 10)
		c.count(now)
	}
	if c.busy.Load() {
		t.Fatalf("busy = true after windows of 10 reads, want false")
	}
	for i := 0; i < 2*busyReads; i++ {
		now = now.Add(step)
		c.count(now)
	}
	now = now.Add(time.Second)
	c.count(now)
	if c.busy.Load() {
		t.Fatal("busy = true after a pause of a second, want false")
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

// BenchmarkReaderLinger drains one backlog of pgbench-like transactions
// (three updates and an insert each) from four slots in turn, with and
// without a linger alternately, and reports the reader's CPU time (this
// process's user and system time) per transaction of each:
//
//	go test ./pkg/decode -run '^$' -bench ReaderLinger -benchtime 1x
func BenchmarkReaderLinger(b *testing.B) {
	const txns = 20000
	c := pgtest.Start(b, pgtest.Options{Name: "linger"})
	ctx := context.Background()
	setup := []string{
		`CREATE TABLE acc (id int PRIMARY KEY, bal int)`,
		`INSERT INTO acc SELECT g, 0 FROM generate_series(1, 1000) g`,
		`CREATE TABLE hist (id bigserial PRIMARY KEY, aid int, delta int)`,
		`CREATE PUBLICATION prism FOR ALL TABLES`,
		`CREATE PROCEDURE gen(n int) LANGUAGE plpgsql AS $$
		BEGIN
			FOR i IN 1..n LOOP
				UPDATE acc SET bal = bal + 1 WHERE id = i % 1000 + 1;
				UPDATE acc SET bal = bal - 1 WHERE id = (i * 7) % 1000 + 1;
				UPDATE acc SET bal = bal + 2 WHERE id = (i * 13) % 1000 + 1;
				INSERT INTO hist (aid, delta) VALUES (i % 1000, 1);
				COMMIT;
			END LOOP;
		END $$`,
	}
	runs := []struct {
		slot   string
		linger time.Duration
	}{{"l1", 0}, {"n1", -1}, {"l2", 0}, {"n2", -1}}
	for _, r := range runs {
		setup = append(setup, fmt.Sprintf("SELECT pg_create_logical_replication_slot('%s', 'pgoutput')", r.slot))
	}
	setup = append(setup, fmt.Sprintf("CALL gen(%d)", txns))
	for _, sql := range setup {
		if err := c.Exec(ctx, "postgres", sql); err != nil {
			b.Fatalf("%s: %v", sql, err)
		}
	}
	cpu := func() time.Duration {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			b.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	per := map[string][]float64{}
	b.ResetTimer()
	for _, run := range runs {
		rd := NewReader(ReaderConfig{DSN: c.DSN("postgres"), Region: "na", Slot: run.slot, Linger: run.linger}, zerolog.Nop())
		start, wall := cpu(), time.Now()
		for n := 0; n < txns; {
			txn, err := rd.Next(ctx)
			if err != nil {
				b.Fatal(err)
			}
			if len(txn.Changes) > 0 {
				n++
			}
		}
		used := cpu() - start
		rd.Close()
		name := "none"
		if run.linger >= 0 {
			name = "linger"
		}
		per[name] = append(per[name], float64(used.Microseconds())/txns)
		b.Logf("slot %s (%s): %v CPU, %v wall for %d transactions", run.slot, name, used, time.Since(wall).Round(time.Millisecond), txns)
	}
	for name, v := range per {
		b.ReportMetric((v[0]+v[1])/2, name+"-cpu-us/txn")
	}
}
