package node

import (
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/pkg/peers"
	"github.com/rs/zerolog"
)

// TestShipperConfigBySyncMode: a source that does not wait for the regions
// lets them gather acknowledgements and lingers; one in synchronous mode
// does neither, so each commit is answered as soon as it is durable; an ack
// timeout too short for a gathered ACK, or a window so small that waiting
// for them would slow shipping, keeps them prompt too.
func TestShipperConfigBySyncMode(t *testing.T) {
	for _, tc := range []struct {
		sync    config.SyncMode
		ack     time.Duration
		window  config.Size
		gather  bool
		lingers bool
	}{
		{config.SyncOff, config.DefaultAckTimeout, config.DefaultMaxInFlight, true, true},
		{config.SyncOff, 200 * time.Millisecond, config.DefaultMaxInFlight, false, true},
		{config.SyncOff, config.DefaultAckTimeout, peers.MinGatherWindow, true, true},
		{config.SyncOff, config.DefaultAckTimeout, peers.MinGatherWindow - 1, false, true},
		{config.SyncAll, config.DefaultAckTimeout, config.DefaultMaxInFlight, false, false},
		{config.SyncQuorum, config.DefaultAckTimeout, config.DefaultMaxInFlight, false, false},
	} {
		cfg := &config.Config{Region: "na", Node: "na1"}
		cfg.Delivery = config.DefaultDelivery()
		cfg.Delivery.AckTimeout, cfg.Delivery.MaxInFlight = tc.ack, tc.window
		cfg.Sync.Mode = tc.sync
		n := &Node{cfg: cfg, log: zerolog.Nop()}
		sc := n.shipperConfig("eu", []peers.NodeAddr{{Name: "eu1", Addr: "127.0.0.1:1"}})
		if sc.GatherAcks != tc.gather || (sc.Linger > 0) != tc.lingers {
			t.Errorf("sync %s, ack timeout %s, window %s: GatherAcks %t, Linger %s; want %t, lingering %t", tc.sync, tc.ack, tc.window, sc.GatherAcks, sc.Linger, tc.gather, tc.lingers)
		}
	}
}
