package peers

import (
	"strings"
	"testing"
	"time"
)

// TestWaitingServerRefuses: a node that waits for its database serves its
// address at once and refuses peers with the reason, so a shipper moves
// to the region's next node right away instead of waiting out its
// handshake timeout (a minute here) on a connection nobody answers; once
// the node is ready, the shipper returns to it (its preferred node).
func TestWaitingServerRefuses(t *testing.T) {
	ctx := testCtx(t)
	waiting := NewWaitingServer(serverConfig("eu", "eu1"), "node eu1 of region eu is waiting for its database", (newLogBuf(t)).logger())
	addr1 := serve(t, waiting)
	app2 := newMemApplier()
	addr2 := serve(t, NewServer(serverConfig("eu", "eu2"), app2, (newLogBuf(t)).logger()))

	// A peer's probe gets the reason.
	if _, err := Probe(ctx, ProbeConfig{SourceRegion: "na", SourceNode: "na1", TargetRegion: "eu", Addr: addr1, Token: testToken, Insecure: true, Timeout: time.Minute}); err == nil ||
		!strings.Contains(err.Error(), "waiting for its database") {
		t.Fatalf("probe of the waiting node = %v, want a refusal giving the reason", err)
	}

	logs := newLogBuf(t)
	cfg := shipperConfig(NodeAddr{Name: "eu1", Addr: addr1}, NodeAddr{Name: "eu2", Addr: addr2})
	cfg.HandshakeTimeout = time.Minute
	sh := NewShipper(cfg, nil, logs.logger())
	runShipper(t, sh)
	if err := sh.Send(ctx, mkTxn(1, 0)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "failover to eu2", 20*time.Second, func() bool { return sh.Acked() == lsnOf(1) })
	if st := sh.Status(); st.Path != "eu2" || !strings.Contains(st.LastError, "waiting for its database") {
		t.Fatalf("Status = %+v, want eu2 with the waiting node's reason as last error", st)
	}

	app1 := newMemApplier()
	waiting.Ready(app1)
	waitFor(t, "return to eu1", 20*time.Second, func() bool { return sh.Status().Path == "eu1" })
	if err := sh.Send(ctx, mkTxn(2, 0)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "txn 2 applied by eu1", 20*time.Second, func() bool { return sh.Acked() == lsnOf(2) })
	if got := app1.appliedLSNs(); len(got) == 0 || got[len(got)-1] != lsnOf(2) {
		t.Fatalf("eu1 applied %v, want txn 2 last", got)
	}
}
