package peers

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"
)

// ProbeConfig says whom to probe and as whom.
type ProbeConfig struct {
	SourceRegion string // the prober's region, as a shipper would announce it
	SourceNode   string
	TargetRegion string // the region the probed node must serve
	Addr         string // host:port of the node's peer listener
	Token        string
	// TLS is the client configuration; nil means plaintext, which needs
	// Insecure (as for a Shipper).
	TLS      *tls.Config
	Insecure bool
	// Timeout bounds the connection, the TLS handshake and the answer
	// (default 2s).
	Timeout time.Duration
}

// ProbeResult is what a node answered to a probe.
type ProbeResult struct {
	Region   string        // the region the node serves
	Node     string        // the node's name
	Progress pglogrepl.LSN // durable progress of origin prism_<SourceRegion> there
	RTT      time.Duration // from dialling to the Welcome
}

// ErrUnreachable is wrapped by Probe's error when no connection could be
// made (refused, timed out, TLS handshake failed); ErrRejected when the
// node answered but refused the Hello (wrong token, region not accepted,
// protocol version), with its reason in the message (a *RejectedError).
// Whether either means that the node refused this node's credentials
// (token or TLS certificates) is told by AuthRefused.
var (
	ErrUnreachable = errors.New("node unreachable")
	ErrRejected    = errors.New("node rejected the hello")
)

// AuthRefused reports whether err (from Probe) says that the node refused
// this node's credentials: auth.token, or the TLS certificates. That is a
// configuration error of one of the two nodes, not an outage.
func AuthRefused(err error) bool { return authRefused(err) }

// Probe connects to one node, sends a Hello with the probe flag (the node
// answers with Welcome and does nothing else for the source) and returns
// its answer. It never sends a transaction.
func Probe(ctx context.Context, cfg ProbeConfig) (ProbeResult, error) {
	if cfg.TLS == nil && !cfg.Insecure {
		return ProbeResult{}, fmt.Errorf("probe %s: no TLS configuration and not insecure", cfg.Addr)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Second
	}
	sc := NewShipperConfig(cfg.Timeout)
	sc.SourceRegion, sc.SourceNode, sc.TargetRegion = cfg.SourceRegion, cfg.SourceNode, cfg.TargetRegion
	sc.Nodes = []NodeAddr{{Name: cfg.Addr, Addr: cfg.Addr}}
	sc.Token, sc.TLS, sc.Insecure = cfg.Token, cfg.TLS, cfg.Insecure
	sc.DialTimeout, sc.HandshakeTimeout = cfg.Timeout, cfg.Timeout
	sc.Seed = 1
	s := NewShipper(sc, nil, zerolog.Nop())
	start := time.Now()
	nc, err := s.dial(ctx, cfg.Addr)
	if err != nil {
		return ProbeResult{}, fmt.Errorf("probe %s: %w: %w", cfg.Addr, ErrUnreachable, err)
	}
	defer nc.Close()
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	defer stop()
	fc := newFrameConn(nc, DefaultMaxFrame)
	f, err := clientHello(fc, cfg.Timeout, helloProbe, cfg.SourceRegion, cfg.SourceNode, cfg.Token)
	if err != nil {
		if ctx.Err() != nil {
			return ProbeResult{}, fmt.Errorf("probe %s: %w", cfg.Addr, ctx.Err())
		}
		if errors.Is(err, errNoChallenge) {
			return ProbeResult{}, fmt.Errorf("probe %s: %w: %w", cfg.Addr, ErrRejected, err)
		}
		return ProbeResult{}, fmt.Errorf("probe %s: %w: hello: %w", cfg.Addr, ErrUnreachable, err)
	}
	switch f := f.(type) {
	case *welcome:
		res := ProbeResult{Region: f.Region, Node: f.Node, Progress: f.Progress, RTT: time.Since(start)}
		if cfg.TargetRegion != "" && f.Region != cfg.TargetRegion {
			return res, fmt.Errorf("probe %s: node %s serves region %q, want %q", cfg.Addr, f.Node, f.Region, cfg.TargetRegion)
		}
		return res, nil
	case *reject:
		return ProbeResult{}, fmt.Errorf("probe %s: %w", cfg.Addr, &RejectedError{Reason: f.Reason, code: f.Code})
	default:
		return ProbeResult{}, fmt.Errorf("probe %s: %w: %T instead of welcome", cfg.Addr, errFrame, f)
	}
}
