package peers

import (
	"errors"
	"fmt"
	"time"
)

// The settings of the peer protocol are chosen here and nowhere else.
//
// prism-cdc's configuration exposes one timing of the protocol,
// delivery.ack_timeout. Every other timeout and period has a meaning, and a
// field, of its own: NewShipperConfig and NewServerConfig derive those that
// follow from the ack timeout, in plain sight, and set the others to their
// defaults. A caller may change any field alone afterwards. The Shipper and
// the Server use every value as given: a zero is a zero, never "the
// default", and one out of range is refused (checkShipper, checkServer).

// NewShipperConfig returns the settings of a shipper that waits ackTimeout
// for its receiver (delivery.ack_timeout, resolved by the caller): the
// timeouts derived from it and the shipper's own tuning. The caller adds
// the target (regions, nodes, credentials) and the other delivery settings
// (Retries, Backoff, MaxBackoff, MaxInFlight), which have no default here.
func NewShipperConfig(ackTimeout time.Duration) ShipperConfig {
	const heartbeat = time.Second
	return ShipperConfig{
		AckTimeout: ackTimeout,
		// Reaching a node and being welcomed by it are part of the answer
		// the shipper waits for: each gets as long as one ACK.
		DialTimeout:      ackTimeout,
		HandshakeTimeout: ackTimeout,
		// A heartbeat or an undo outcome is one small frame: writing it
		// gets as long as one ACK.
		WriteTimeout: ackTimeout,
		// Silence on a connection is judged by the ack timeout while
		// transactions wait (see Shipper.overdue); an idle connection is
		// dropped only after a minute beyond the ack timeout and three
		// heartbeats.
		ReadTimeout:   max(ackTimeout, 3*heartbeat) + time.Minute,
		Heartbeat:     heartbeat,
		ProbeInterval: 2 * time.Second,
		MaxFrame:      DefaultMaxFrame,
		ChunkBytes:    DefaultChunkBytes,
		FenceTimeout:  5 * time.Second,
		Linger:        DefaultLinger,
		GatherAcks:    ackTimeout >= MinGatherAckTimeout,
	}
}

// MaxAckGather bounds ServerConfig.AckGather: how late a receiver may
// acknowledge a transaction it applied for a source that lets it gather
// acknowledgements (ShipperConfig.GatherAcks). DefaultAckGather is a
// node's.
const (
	MaxAckGather     = 100 * time.Millisecond
	DefaultAckGather = 50 * time.Millisecond
)

// MinGatherAckTimeout is the shortest AckTimeout for which
// NewShipperConfig lets receivers gather acknowledgements: ten times the
// longest gather, so a gathered ACK is never what makes a shipper give
// up on a node.
const MinGatherAckTimeout = 10 * MaxAckGather

// MinGatherWindow is the smallest MaxInFlight with which a source should
// let receivers gather acknowledgements: a window is acknowledged at most
// once per gather, so a smaller one would cap shipping below what a node
// applies (8 MiB per 100 ms is 80 MiB a second).
const MinGatherWindow = 8 << 20

// DefaultLinger is the writer's ShipperConfig.Linger by default: a
// transaction waits at most half a millisecond (about one in an otherwise
// idle process: the Go runtime's timer resolution) for others to share its
// write.
const DefaultLinger = 500 * time.Microsecond

// NewServerConfig returns the settings of a server whose shippers wait
// ackTimeout for an answer (delivery.ack_timeout, the same on every node).
// The caller adds the identity (region, node, credentials, accepted
// regions) and the error policy.
func NewServerConfig(ackTimeout time.Duration) ServerConfig {
	return ServerConfig{
		MaxFrame:     DefaultMaxFrame,
		HelloTimeout: 5 * time.Second,
		// Heartbeats during a long apply keep the shippers from giving up
		// on it: well below their ack timeout, and at most one a second.
		Heartbeat:    min(time.Second, ackTimeout/4),
		IdleTimeout:  15 * time.Second,
		MaxBatch:     256,
		FenceTimeout: 5 * time.Second,
		AckGather:    DefaultAckGather,
	}
}

// checkShipper reports a shipper setting out of range.
func checkShipper(c *ShipperConfig) error {
	errs := []error{
		positive("ack timeout", c.AckTimeout),
		positive("dial timeout", c.DialTimeout),
		positive("handshake timeout", c.HandshakeTimeout),
		positive("read timeout", c.ReadTimeout),
		positive("write timeout", c.WriteTimeout),
		positive("heartbeat", c.Heartbeat),
		positive("probe interval", c.ProbeInterval),
		positive("fence timeout", c.FenceTimeout),
		positiveInt("max frame", int64(c.MaxFrame)),
		positiveInt("chunk bytes", int64(c.ChunkBytes)),
		positive("backoff", c.Backoff),
		positiveInt("max in flight", c.MaxInFlight),
	}
	if c.Linger < 0 {
		errs = append(errs, fmt.Errorf("linger %s is negative", c.Linger))
	}
	if c.Retries < 0 {
		errs = append(errs, fmt.Errorf("retries %d is negative", c.Retries))
	}
	if c.MaxBackoff < c.Backoff {
		errs = append(errs, fmt.Errorf("max backoff %s is below backoff %s", c.MaxBackoff, c.Backoff))
	}
	return errors.Join(errs...)
}

// checkServer reports a server setting out of range.
func checkServer(c *ServerConfig) error {
	return errors.Join(
		positiveInt("max frame", int64(c.MaxFrame)),
		positive("hello timeout", c.HelloTimeout),
		positive("heartbeat", c.Heartbeat),
		positive("idle timeout", c.IdleTimeout),
		positiveInt("max batch", int64(c.MaxBatch)),
		positive("fence timeout", c.FenceTimeout),
		ackGather(c.AckGather),
	)
}

func ackGather(d time.Duration) error {
	if d < 0 || d > MaxAckGather {
		return fmt.Errorf("ack gather %s is not between 0 and %s", d, MaxAckGather)
	}
	return nil
}

func positive(name string, d time.Duration) error {
	if d <= 0 {
		return fmt.Errorf("%s %s is not positive", name, d)
	}
	return nil
}

func positiveInt(name string, n int64) error {
	if n <= 0 {
		return fmt.Errorf("%s %d is not positive", name, n)
	}
	return nil
}
