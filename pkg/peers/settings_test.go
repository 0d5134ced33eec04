package peers

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"
)

// TestSettingsDerived: the settings derived from the ack timeout, and the
// defaults, are the values the protocol has always run with; each is a
// field of its own.
func TestSettingsDerived(t *testing.T) {
	const ack = 2 * time.Second
	sc := NewShipperConfig(ack)
	for _, tc := range []struct {
		name      string
		got, want time.Duration
	}{
		{"AckTimeout", sc.AckTimeout, ack},
		{"DialTimeout", sc.DialTimeout, ack},
		{"HandshakeTimeout", sc.HandshakeTimeout, ack},
		{"WriteTimeout", sc.WriteTimeout, ack},
		{"ReadTimeout", sc.ReadTimeout, 3*time.Second + time.Minute},
		{"Heartbeat", sc.Heartbeat, time.Second},
		{"ProbeInterval", sc.ProbeInterval, 2 * time.Second},
		{"FenceTimeout", sc.FenceTimeout, 5 * time.Second},
		{"server HelloTimeout", NewServerConfig(ack).HelloTimeout, 5 * time.Second},
		{"server Heartbeat", NewServerConfig(ack).Heartbeat, ack / 4},
		{"server Heartbeat, long ack timeout", NewServerConfig(time.Minute).Heartbeat, time.Second},
		{"server IdleTimeout", NewServerConfig(ack).IdleTimeout, 15 * time.Second},
		{"server FenceTimeout", NewServerConfig(ack).FenceTimeout, 5 * time.Second},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %s, want %s", tc.name, tc.got, tc.want)
		}
	}
	if sc.MaxFrame != DefaultMaxFrame || sc.ChunkBytes != DefaultChunkBytes {
		t.Errorf("MaxFrame, ChunkBytes = %d, %d, want %d, %d", sc.MaxFrame, sc.ChunkBytes, DefaultMaxFrame, DefaultChunkBytes)
	}
	srv := NewServerConfig(ack)
	if srv.MaxFrame != DefaultMaxFrame || srv.MaxBatch != 256 {
		t.Errorf("server MaxFrame, MaxBatch = %d, %d, want %d, 256", srv.MaxFrame, srv.MaxBatch, DefaultMaxFrame)
	}
	if srv.AckGather != DefaultAckGather || srv.AckGather > MaxAckGather {
		t.Errorf("server AckGather = %s, want %s (at most %s)", srv.AckGather, DefaultAckGather, MaxAckGather)
	}
	// Receivers may gather acknowledgements only for an ack timeout ten
	// times the longest gather.
	for _, tc := range []struct {
		ack  time.Duration
		want bool
	}{{ack, true}, {MinGatherAckTimeout, true}, {MinGatherAckTimeout - time.Millisecond, false}, {200 * time.Millisecond, false}} {
		if got := NewShipperConfig(tc.ack).GatherAcks; got != tc.want {
			t.Errorf("NewShipperConfig(%s).GatherAcks = %t, want %t", tc.ack, got, tc.want)
		}
	}
	for _, d := range []time.Duration{-time.Millisecond, MaxAckGather + time.Millisecond} {
		bad := serverConfig("eu", "eu1")
		bad.AckGather = d
		if err := checkServer(&bad); err == nil || !strings.Contains(err.Error(), "ack gather") {
			t.Errorf("AckGather %s: checkServer = %v, want an ack gather error", d, err)
		}
	}
}

// TestHandshakeTimeoutAlone: a node that accepts the connection and never
// sends its Challenge is given up after HandshakeTimeout, however long the
// ack timeout is.
func TestHandshakeTimeoutAlone(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() { // owned by the test: ends when ln is closed
		var held []net.Conn // silent until then
		defer func() {
			for _, nc := range held {
				nc.Close()
			}
		}()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, nc)
		}
	}()
	cfg := shipperConfig(NodeAddr{Name: "eu1", Addr: ln.Addr().String()})
	cfg.AckTimeout = time.Minute
	cfg.HandshakeTimeout = 100 * time.Millisecond
	cfg.Retries = 0
	sh := NewShipper(cfg, nil, newLogBuf(t).logger())
	start := time.Now()
	runShipper(t, sh)
	waitFor(t, "the silent node to be given up", 10*time.Second, func() bool { return sh.Status().LastError != "" })
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("gave up after %s, want about the handshake timeout", d)
	}
	if e := sh.Status().LastError; !strings.Contains(e, "hello eu1") {
		t.Fatalf("LastError = %q, want the hello to time out", e)
	}
}

// TestServerRefusesBadSettings: a server setting out of range is an error
// from Serve, never replaced by a default.
func TestServerRefusesBadSettings(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*ServerConfig)
		want   string
	}{
		{"zero heartbeat", func(c *ServerConfig) { c.Heartbeat = 0 }, "heartbeat 0s is not positive"},
		{"zero hello timeout", func(c *ServerConfig) { c.HelloTimeout = 0 }, "hello timeout 0s is not positive"},
		{"zero idle timeout", func(c *ServerConfig) { c.IdleTimeout = 0 }, "idle timeout 0s is not positive"},
		{"zero max batch", func(c *ServerConfig) { c.MaxBatch = 0 }, "max batch 0 is not positive"},
		{"zero max frame", func(c *ServerConfig) { c.MaxFrame = 0 }, "max frame 0 is not positive"},
		{"zero fence timeout", func(c *ServerConfig) { c.FenceTimeout = 0 }, "fence timeout 0s is not positive"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := serverConfig("eu", "eu1")
			tc.mutate(&cfg)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			err = NewServer(cfg, newMemApplier(), newLogBuf(t).logger()).Serve(ctx, ln)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Serve = %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
