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
// timeout too short for a gathered ACK keeps them prompt too.
func TestShipperConfigBySyncMode(t *testing.T) {
	for _, tc := range []struct {
		sync    config.SyncMode
		ack     time.Duration
		gather  bool
		lingers bool
	}{
		{config.SyncOff, config.DefaultAckTimeout, true, true},
		{config.SyncOff, 200 * time.Millisecond, false, true},
		{config.SyncAll, config.DefaultAckTimeout, false, false},
		{config.SyncQuorum, config.DefaultAckTimeout, false, false},
	} {
		cfg := &config.Config{Region: "na", Node: "na1"}
		cfg.Delivery = config.DefaultDelivery()
		cfg.Delivery.AckTimeout = tc.ack
		cfg.Sync.Mode = tc.sync
		n := &Node{cfg: cfg, log: zerolog.Nop()}
		sc := n.shipperConfig("eu", []peers.NodeAddr{{Name: "eu1", Addr: "127.0.0.1:1"}})
		if sc.GatherAcks != tc.gather || (sc.Linger > 0) != tc.lingers {
			t.Errorf("sync %s, ack timeout %s: GatherAcks %t, Linger %s; want %t, lingering %t", tc.sync, tc.ack, sc.GatherAcks, sc.Linger, tc.gather, tc.lingers)
		}
	}
}
