package peers

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/rawconn"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// NodeAddr is one node of a target region, in preference order.
type NodeAddr struct {
	Name string
	Addr string // host:port of its peer listener
}

// ShipperConfig configures the delivery of one source region's
// transactions to one target region.
type ShipperConfig struct {
	SourceRegion string
	SourceNode   string
	TargetRegion string
	// Nodes of the target region, in preference order: the first healthy
	// one carries the traffic.
	Nodes []NodeAddr
	// Token is the shared secret; only HelloMAC over the node's challenge
	// is sent, never the token.
	Token string
	// TLS is the client configuration (see TLSConfigs). When nil the
	// connection is plaintext, which needs Insecure.
	TLS      *tls.Config
	Insecure bool

	// Every setting below arrives resolved (NewShipperConfig chooses
	// them; prism-cdc resolves the delivery settings once, when its
	// configuration is loaded). Every value is used as given; Run
	// refuses one out of range instead of replacing it.

	// AckTimeout is how long the shipper waits for the receiver (an Ack
	// or a heartbeat) while transactions are unacknowledged; it must be
	// positive.
	AckTimeout time.Duration
	// Retries is how often a failed node is tried again before failing
	// over to the next one; 0 fails over after the first failed attempt.
	Retries int
	// Backoff and MaxBackoff bound the exponential backoff between
	// attempts; each wait is jittered. Both must be positive, Backoff at
	// most MaxBackoff.
	Backoff    time.Duration
	MaxBackoff time.Duration
	// MaxInFlight bounds the bytes (Txn.Size) of unacknowledged
	// transactions; Send blocks above it. It must be positive.
	MaxInFlight int64
	// DialTimeout bounds the TCP connection to a node.
	DialTimeout time.Duration
	// HandshakeTimeout bounds the TLS handshake, and separately the
	// Challenge, Hello and Welcome exchange.
	HandshakeTimeout time.Duration
	// ReadTimeout drops a connection on which the receiver sent nothing
	// (not even a heartbeat) for that long.
	ReadTimeout time.Duration
	// WriteTimeout bounds writing one control frame: a heartbeat or the
	// outcome of an undo.
	WriteTimeout time.Duration
	// ProbeInterval is how often the preferred nodes are probed while a
	// less preferred path carries the traffic.
	ProbeInterval time.Duration
	// Heartbeat is how often an idle connection sends a heartbeat.
	Heartbeat time.Duration
	// MaxFrame limits one frame's length; it must not exceed the
	// receivers' limit.
	MaxFrame int
	// ChunkBytes is the change data per TxnChunk frame of a spilled
	// transaction.
	ChunkBytes int
	// Linger is how long the writer waits, after a write of several
	// transactions that took every one there was, before it takes the
	// next ones: a busy source's transactions then go out several to a
	// write (and are read several to a read) instead of one write, one
	// read and two goroutine wake-ups each. A write of one transaction
	// (a quiet source) is not followed by a wait, which would only add a
	// wake-up, and latency, per transaction. It delays a transaction by
	// at most that much (a sleep under a millisecond lasts about one in an
	// otherwise idle process: the Go runtime's timer resolution); zero
	// writes each as soon as it is sent.
	Linger time.Duration
	// GatherAcks lets the receiver acknowledge up to
	// MaxAckGather late (helloGatherAcks), so that one WAL flush there
	// covers the transactions applied meanwhile. A source whose commits
	// wait for the acknowledgements (synchronous mode) leaves it off, and
	// NewShipperConfig turns it on only for an AckTimeout of at least
	// MinGatherAckTimeout; a MaxInFlight below MinGatherWindow should
	// leave it off too.
	GatherAcks bool
	// FenceTimeout bounds fencing a previous holder of the origin before
	// the direct-SQL fallback applies.
	FenceTimeout time.Duration
	// Seed seeds the backoff jitter; 0 seeds from the clock.
	Seed int64
	// Errors carries out the apply error policy on the direct-SQL
	// fallback; nil halts on every permanent failure.
	Errors ErrorHandler
	// Undo reverts a source transaction the target region could not
	// apply, when the target asks; nil refuses such requests (they stay
	// pending in the target's prism.dead_letters).
	Undo UndoFunc
	// OnAck, when set, is called each time Acked advances, outside the
	// shipper's locks, so that the caller can confirm the new position
	// to its slot at once instead of at its next poll. It must not block.
	OnAck func()
}

// PathFallback is Status.Path while the direct-SQL fallback carries the
// traffic; PathConnecting while no path is established.
const (
	PathFallback   = "sql fallback"
	PathConnecting = "connecting"
)

// Status is a snapshot of a Shipper.
type Status struct {
	Target string
	// Path is the name of the node carrying the traffic, PathFallback,
	// PathConnecting, or "halted: <sqlstate> <message> at <lsn>".
	Path  string
	Acked pglogrepl.LSN // see Shipper.Acked
	Sent  pglogrepl.LSN // EndLSN of the last transaction passed to Send
	// WindowBytes and WindowTxns measure the unacknowledged window.
	WindowBytes int64
	WindowTxns  int
	// Path switches since the start, each logged once.
	Retries    int
	Failovers  int
	Fallbacks  int
	Recoveries int
	Halts      int
	// LastError is the last failure of any path and LastErrorAt when it
	// happened; both are cleared when the preferred node takes the
	// traffic again.
	LastError   string
	LastErrorAt time.Time
	LastAckAt   time.Time
	// AuthRefused names the region's nodes that refused this node's
	// credentials (auth.token, or the TLS certificates) at their last
	// handshake, in node order; empty when none did. Another node or the
	// direct-SQL fallback may carry the traffic meanwhile.
	AuthRefused []string
}

// Shipper delivers one source region's transactions to one target region
// in Send order, through the region's nodes or the direct-SQL fallback.
type Shipper struct {
	cfg      ShipperConfig
	fallback Fallback
	log      zerolog.Logger

	mu          sync.Mutex
	window      []entry // unacknowledged, in Send order
	bytes       int64
	busySince   time.Time     // when the window last became non-empty
	changed     chan struct{} // closed and replaced whenever the window changes
	watched     bool          // changed was handed to a waiter since it was made
	acked, sent pglogrepl.LSN
	path        string
	halted      string        // non-empty while halted
	haltedAt    pglogrepl.LSN // the transaction the halt is about
	st          Status        // counters, LastError, LastAckAt
	refused     []bool        // by node index: refused this node's credentials at the last handshake
}

type entry struct {
	txn  *decode.Txn
	size int64
}

// NewShipper returns a Shipper for cfg.TargetRegion. fallback opens the
// direct-SQL path to the region's database; nil means there is none and an
// unreachable region waits for its nodes.
func NewShipper(cfg ShipperConfig, fallback Fallback, log zerolog.Logger) *Shipper {
	if cfg.Seed == 0 {
		cfg.Seed = time.Now().UnixNano()
	}
	return &Shipper{
		cfg:      cfg,
		fallback: fallback,
		log:      log.With().Str("pkg", "peers").Str("target", cfg.TargetRegion).Logger(),
		changed:  make(chan struct{}),
		path:     PathConnecting,
	}
}

// Send appends txn to the window of unacknowledged transactions; Run
// delivers it after everything sent before. Transactions must come in
// commit order. A transaction whose EndLSN is at or below one already sent
// is a redelivery from the source and is ignored. Send blocks while the
// window is full (MaxInFlight bytes); a transaction larger than
// MaxInFlight is admitted alone into an empty window.
func (s *Shipper) Send(ctx context.Context, txn *decode.Txn) error {
	size := int64(txn.Size())
	s.mu.Lock()
	for s.bytes > 0 && s.bytes+size > s.cfg.MaxInFlight {
		ch := s.changed
		s.watched = true
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
		s.mu.Lock()
	}
	defer s.mu.Unlock()
	if txn.EndLSN <= s.sent {
		return nil
	}
	if len(s.window) == 0 {
		s.busySince = time.Now()
	}
	s.window = append(s.window, entry{txn: txn, size: size})
	s.bytes += size
	s.sent = txn.EndLSN
	s.signalLocked()
	return nil
}

// signalLocked wakes the waiters on changed. A channel nobody took yet
// is kept (whoever takes it waits for the next change): a busy stream's
// Sends then neither allocate nor close a channel each.
func (s *Shipper) signalLocked() {
	if !s.watched {
		return
	}
	close(s.changed)
	s.changed = make(chan struct{})
	s.watched = false
}

// Acked returns the highest EndLSN such that it and every transaction
// sent before it are durable in the target region.
func (s *Shipper) Acked() pglogrepl.LSN {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.acked
}

// Status returns a snapshot of the shipper's state.
func (s *Shipper) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	st.Target = s.cfg.TargetRegion
	st.Path = s.path
	if s.halted != "" {
		st.Path = s.halted
	}
	st.Acked = s.acked
	st.Sent = s.sent
	st.WindowBytes = s.bytes
	st.WindowTxns = len(s.window)
	st.AuthRefused = nil
	for i, r := range s.refused {
		if r {
			st.AuthRefused = append(st.AuthRefused, s.cfg.Nodes[i].Name)
		}
	}
	return st
}

// ackUpTo drops the window's transactions at or below lsn: they are
// durable in the target region. It reports how many were dropped.
func (s *Shipper) ackUpTo(lsn pglogrepl.LSN) int {
	n := s.dropAcked(lsn)
	if n > 0 && s.cfg.OnAck != nil {
		s.cfg.OnAck()
	}
	return n
}

func (s *Shipper) dropAcked(lsn pglogrepl.LSN) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for n < len(s.window) && s.window[n].txn.EndLSN <= lsn {
		s.bytes -= s.window[n].size
		s.acked = s.window[n].txn.EndLSN
		s.window[n] = entry{}
		n++
	}
	if n == 0 {
		return 0
	}
	s.window = s.window[n:]
	if len(s.window) == 0 {
		s.window = nil
	}
	s.busySince = time.Now()
	s.st.LastAckAt = s.busySince
	if s.halted != "" && s.acked >= s.haltedAt {
		s.log.Info().Stringer("lsn", s.haltedAt).Msg("halted transaction applied; replication resumed")
		s.halted = ""
	}
	s.signalLocked()
	return n
}

// unsent returns up to max transactions after cursor, and the channel
// that is closed when the window changes next.
func (s *Shipper) unsent(cursor pglogrepl.LSN, max int) ([]*decode.Txn, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := sort.Search(len(s.window), func(i int) bool { return s.window[i].txn.EndLSN > cursor })
	var out []*decode.Txn
	for ; i < len(s.window) && len(out) < max; i++ {
		out = append(out, s.window[i].txn)
	}
	s.watched = true
	return out, s.changed
}

// overdue reports whether the window has waited for the receiver longer
// than AckTimeout, given when the receiver was last heard from.
func (s *Shipper) overdue(heard time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.window) == 0 {
		return false
	}
	last := s.busySince
	if heard.After(last) {
		last = heard
	}
	return time.Since(last) > s.cfg.AckTimeout
}

// clearError forgets LastError.
func (s *Shipper) clearError() {
	s.mu.Lock()
	s.st.LastError, s.st.LastErrorAt = "", time.Time{}
	s.mu.Unlock()
}

func (s *Shipper) setPath(p string) {
	s.mu.Lock()
	s.path = p
	s.mu.Unlock()
}

// note records a failure as LastError and counts a path switch with
// count (nil for none).
func (s *Shipper) note(err error, count *int) {
	s.mu.Lock()
	if err != nil {
		s.st.LastError, s.st.LastErrorAt = err.Error(), time.Now()
	}
	if count != nil {
		*count++
	}
	s.mu.Unlock()
}

// haltError is a permanent apply failure of the transaction ending at LSN.
type haltError struct {
	LSN      pglogrepl.LSN
	SQLState string
	Message  string
	Table    string
}

func (e *haltError) Error() string {
	return fmt.Sprintf("halted: %s %s at %s", e.SQLState, e.Message, e.LSN)
}

// halt puts the region in the halted state; it logs at error once per
// transaction and reason.
func (s *Shipper) halt(h *haltError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	msg := h.Error()
	s.st.LastError, s.st.LastErrorAt = msg, time.Now()
	if s.halted == msg {
		return
	}
	s.halted = msg
	s.haltedAt = h.LSN
	s.st.Halts++
	ev := s.log.Error().Str("origin", s.cfg.SourceRegion).Stringer("lsn", h.LSN)
	if h.Table != "" {
		ev = ev.Str("table", h.Table)
	} else {
		// The error names no table (a COMMIT, the connection): the
		// transaction's first table helps find it, under its own name.
		for _, e := range s.window {
			if e.txn.EndLSN == h.LSN && len(e.txn.Changes) > 0 && e.txn.Changes[0].Rel != nil {
				ev = ev.Str("first_table", e.txn.Changes[0].Rel.Schema+"."+e.txn.Changes[0].Rel.Table)
				break
			}
		}
	}
	ev.Str("sqlstate", h.SQLState).Str("error", h.Message).
		Msg("replication to region halted; retrying until the cause is fixed")
}

// recovery ends a less preferred path because node is healthy again.
type recovery struct{ node int }

func (r *recovery) Error() string { return fmt.Sprintf("node %d answers again", r.node) }

// Run delivers the window until ctx is done, switching paths as described
// in the package documentation: the first node, retries with backoff,
// failover to the next nodes, the direct-SQL fallback, and back to the
// first healthy node. It owns every connection and goroutine of the
// shipper and returns after all have ended; it returns nil when stopped by
// ctx.
func (s *Shipper) Run(ctx context.Context) error {
	if len(s.cfg.Nodes) == 0 && s.fallback == nil {
		return fmt.Errorf("ship to %s: no nodes and no fallback", s.cfg.TargetRegion)
	}
	if s.cfg.TLS == nil && !s.cfg.Insecure {
		return fmt.Errorf("ship to %s: no TLS configuration and not insecure", s.cfg.TargetRegion)
	}
	if err := checkShipper(&s.cfg); err != nil {
		return fmt.Errorf("ship to %s: settings: %w", s.cfg.TargetRegion, err)
	}
	rnd := rand.New(rand.NewSource(s.cfg.Seed))
	backoff := func(attempt int) time.Duration {
		d := s.cfg.Backoff
		for i := 1; i < attempt && d < s.cfg.MaxBackoff; i++ {
			d *= 2
		}
		d = min(d, s.cfg.MaxBackoff)
		return d/2 + time.Duration(rnd.Int63n(int64(d/2)+1))
	}
	node, attempts := 0, 0
	for ctx.Err() == nil {
		if node >= len(s.cfg.Nodes) {
			if s.fallback == nil {
				s.setPath(PathConnecting)
				s.log.Warn().Dur("retry_in", s.cfg.MaxBackoff).Msg("every node of the region failed and there is no fallback; the region holds the slot back")
				sleep(ctx, s.cfg.MaxBackoff)
				node, attempts = 0, 0
				continue
			}
			node = s.runFallback(ctx, rnd, backoff)
			attempts = 0
			continue
		}
		progressed, err := s.session(ctx, node)
		if ctx.Err() != nil {
			break
		}
		var rec *recovery
		if errors.As(err, &rec) {
			s.note(nil, &s.st.Recoveries)
			s.log.Info().Str("peer", s.cfg.Nodes[rec.node].Name).Str("from", s.cfg.Nodes[node].Name).Msg("preferred node answers again; switching back")
			node, attempts = rec.node, 0
			continue
		}
		var h *haltError
		if errors.As(err, &h) {
			s.halt(h)
			sleep(ctx, s.cfg.MaxBackoff)
			attempts = 0
			continue
		}
		if progressed {
			attempts = 0
		}
		attempts++
		s.setPath(PathConnecting)
		if attempts <= s.cfg.Retries {
			d := backoff(attempts)
			s.note(err, &s.st.Retries)
			s.log.Warn().Err(err).Str("peer", s.cfg.Nodes[node].Name).Int("attempt", attempts).Dur("retry_in", d).Msg("node failed; retrying")
			sleep(ctx, d)
			continue
		}
		attempts = 0
		node++
		if node < len(s.cfg.Nodes) {
			s.note(err, &s.st.Failovers)
			s.log.Warn().Err(err).Str("from", s.cfg.Nodes[node-1].Name).Str("peer", s.cfg.Nodes[node].Name).Msg("node exhausted its retries; failing over")
		} else {
			s.note(err, nil)
		}
	}
	return nil
}

// sleep waits d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// dial connects to a node: TCP, TLS when configured.
func (s *Shipper) dial(ctx context.Context, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: s.cfg.DialTimeout}
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	nc = rawconn.Wrap(nc)
	if s.cfg.TLS == nil {
		return nc, nil
	}
	cfg := s.cfg.TLS
	if cfg.ServerName == "" {
		cfg = cfg.Clone()
		if host, _, err := net.SplitHostPort(addr); err == nil {
			cfg.ServerName = host
		}
	}
	tc := tls.Client(nc, cfg)
	hctx, cancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		nc.Close()
		return nil, tlsRefused(err)
	}
	return tc, nil
}

// handshake connects to node i and records whether it refused this
// node's credentials (see Status.AuthRefused).
func (s *Shipper) handshake(ctx context.Context, i int, flags uint8) (*frameConn, *welcome, error) {
	fc, w, err := s.hello(ctx, i, flags)
	switch {
	case err == nil:
		s.credentials(i, nil)
	case authRefused(err):
		s.credentials(i, err)
	}
	return fc, w, err
}

// credentials records that node i accepted (refusal nil) or refused this
// node's credentials. The first refusal while no node of the region
// refuses is logged once at error, with the fix; so is the end of the
// last refusal.
func (s *Shipper) credentials(i int, refusal error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refused == nil {
		s.refused = make([]bool, len(s.cfg.Nodes))
	}
	before := slices.Contains(s.refused, true)
	s.refused[i] = refusal != nil
	after := slices.Contains(s.refused, true)
	switch {
	case after && !before:
		meanwhile := "the region's other nodes, if they accept, or the direct-SQL fallback carry the changes meanwhile"
		if s.fallback == nil && len(s.cfg.Nodes) == 1 {
			meanwhile = "the region receives nothing meanwhile and the slot retains WAL"
		}
		s.log.Error().Str("peer", s.cfg.Nodes[i].Name).Str("error", refusal.Error()).
			Msg("the node refuses this node's credentials: give both nodes the same auth.token (and, with auth.tls, certificates signed by the CA the other trusts); " + meanwhile)
	case before && !after:
		s.log.Info().Str("peer", s.cfg.Nodes[i].Name).Msg("the region's nodes accept this node's credentials again")
	}
}

// hello reads the node's Challenge, sends the signed Hello and waits for
// Welcome.
func (s *Shipper) hello(ctx context.Context, i int, flags uint8) (*frameConn, *welcome, error) {
	n := s.cfg.Nodes[i]
	nc, err := s.dial(ctx, n.Addr)
	if err != nil {
		return nil, nil, fmt.Errorf("connect %s: %w", n.Name, err)
	}
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	fc := newFrameConn(nc, s.cfg.MaxFrame)
	f, err := clientHello(fc, s.cfg.HandshakeTimeout, flags, s.cfg.SourceRegion, s.cfg.SourceNode, s.cfg.Token)
	stop()
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("hello %s: %w", n.Name, err)
	}
	switch f := f.(type) {
	case *welcome:
		if f.Region != s.cfg.TargetRegion {
			nc.Close()
			return nil, nil, fmt.Errorf("hello %s: node serves region %q, want %q", n.Name, f.Region, s.cfg.TargetRegion)
		}
		return fc, f, nil
	case *reject:
		nc.Close()
		return nil, nil, fmt.Errorf("hello %s: %w", n.Name, &RejectedError{Reason: f.Reason, code: f.Code})
	default:
		nc.Close()
		return nil, nil, fmt.Errorf("hello %s: %w: %T instead of welcome", n.Name, errFrame, f)
	}
}

// probeNodes starts a goroutine, owned by the caller through wg, that
// probes nodes [0, limit) every ProbeInterval and cancels ctx with a
// *recovery for the first that answers.
func (s *Shipper) probeNodes(ctx context.Context, cancel context.CancelCauseFunc, limit int, wg *sync.WaitGroup) {
	if limit == 0 {
		return
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(s.cfg.ProbeInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			for i := 0; i < limit; i++ {
				fc, _, err := s.handshake(ctx, i, helloProbe)
				if err == nil {
					fc.close()
					cancel(&recovery{node: i})
					return
				}
			}
		}
	}()
}

// session carries the window over node i until the connection fails, the
// receiver nacks, a preferred node answers again, or ctx is done. It
// reports whether any transaction was acknowledged.
//
// Its goroutines, all owned by session and stopped through ctx (which
// also closes the connection): readAcks takes the receiver's frames,
// writeWindow sends the unacknowledged transactions, keepAlive sends
// heartbeats while the writer is idle, and session itself watches that
// the receiver is heard within AckTimeout.
func (s *Shipper) session(ctx context.Context, i int) (progressed bool, err error) {
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	s.probeNodes(ctx, cancel, i, &wg)

	var flags uint8
	if s.cfg.GatherAcks {
		flags |= helloGatherAcks
	}
	fc, w, err := s.handshake(ctx, i, flags)
	if err != nil {
		if c := context.Cause(ctx); c != nil {
			return false, c
		}
		return false, err
	}
	stop := context.AfterFunc(ctx, func() { fc.close() })
	defer stop()
	defer fc.close()
	progressed = s.connected(i, w)
	name := s.cfg.Nodes[i].Name

	var heard atomic.Int64
	heard.Store(time.Now().UnixNano())
	var acked, idle atomic.Bool
	wg.Add(3)
	go func() { // reader
		defer wg.Done()
		cancel(s.readAcks(ctx, fc, name, &heard, &acked))
	}()
	go func() { // writer
		defer wg.Done()
		if err := s.writeWindow(ctx, fc, name, w.Progress, &idle); err != nil {
			cancel(err)
		}
	}()
	go func() { // heartbeats
		defer wg.Done()
		if err := keepAlive(ctx, fc, s.cfg.Heartbeat, s.cfg.WriteTimeout, idle.Load); err != nil {
			cancel(fmt.Errorf("write %s: %w", name, err))
		}
	}()
	s.watchAcks(ctx, cancel, name, &heard)
	return progressed || acked.Load(), context.Cause(ctx)
}

// connected records a session's start on node i, whose welcome w reports
// the progress the receiver has durable, and reports whether that
// acknowledged anything.
func (s *Shipper) connected(i int, w *welcome) (progressed bool) {
	name := s.cfg.Nodes[i].Name
	progressed = s.ackUpTo(w.Progress) > 0
	s.setPath(name)
	if i == 0 {
		// The preferred node carries the traffic: earlier failures are
		// history (the path switches keep them).
		s.clearError()
	}
	s.log.Info().Str("peer", name).Stringer("progress", w.Progress).Msg("connected")
	return progressed
}

// readAcks reads the receiver's frames until the connection fails or
// the receiver nacks, noting when it was last heard and whether an ACK
// advanced the window. It returns why it stopped: a *haltError for a
// permanent NACK.
func (s *Shipper) readAcks(ctx context.Context, fc *frameConn, name string, heard *atomic.Int64, acked *atomic.Bool) error {
	for {
		f, err := fc.read(s.cfg.ReadTimeout)
		if err != nil {
			return fmt.Errorf("read %s: %w", name, err)
		}
		heard.Store(time.Now().UnixNano())
		switch f := f.(type) {
		case *heartbeat:
		case *ack:
			if s.ackUpTo(f.LSN) > 0 {
				acked.Store(true)
			}
		case *undoFrame:
			if err := s.undoRequested(ctx, fc, f); err != nil {
				return fmt.Errorf("write %s: %w", name, err)
			}
		case *nack:
			if f.Retryable {
				return fmt.Errorf("node %s: apply %s/%s: %s %s", name, s.cfg.SourceRegion, f.LSN, f.SQLState, f.Message)
			}
			return &haltError{LSN: f.LSN, SQLState: f.SQLState, Message: f.Message}
		default:
			return fmt.Errorf("read %s: %w: unexpected %T", name, errFrame, f)
		}
	}
}

// writeWindow sends the transactions after cursor as they come, until ctx
// is done (then it returns nil) or a write fails. idle is true while it
// waits for more.
func (s *Shipper) writeWindow(ctx context.Context, fc *frameConn, name string, cursor pglogrepl.LSN, idle *atomic.Bool) error {
	for {
		txns, changed := s.unsent(cursor, writeBatch)
		if len(txns) == 0 {
			idle.Store(true)
			select {
			case <-ctx.Done():
				return nil
			case <-changed:
			}
			idle.Store(false)
			continue
		}
		var err error
		if cursor, err = s.writeTxns(fc, name, txns, cursor); err != nil {
			return err
		}
		if len(txns) > 1 && len(txns) < writeBatch && s.cfg.Linger > 0 {
			sleep(ctx, s.cfg.Linger)
		}
	}
}

// writeBatch bounds how many transactions the writer takes at a time.
const writeBatch = 64

// writeTxns sends txns, those in memory in batches of frames and a
// spilled one streamed in chunks, and returns the end LSN of the last one
// sent. A transaction that cannot be sent (too large a frame, an
// unreadable spill file) halts the shipper at it.
func (s *Shipper) writeTxns(fc *frameConn, name string, txns []*decode.Txn, cursor pglogrepl.LSN) (pglogrepl.LSN, error) {
	for len(txns) > 0 {
		var frames []any
		for len(txns) > 0 && txns[0].Spill == nil {
			frames = append(frames, &txnFrame{Txn: txns[0]})
			txns = txns[1:]
		}
		var err error
		var at pglogrepl.LSN
		if len(frames) > 0 {
			at = frames[0].(*txnFrame).Txn.EndLSN
			if err = fc.write(0, frames...); err == nil {
				cursor = frames[len(frames)-1].(*txnFrame).Txn.EndLSN
			}
		} else {
			at = txns[0].EndLSN
			if err = s.streamTxn(fc, txns[0]); err == nil {
				cursor = txns[0].EndLSN
				txns = txns[1:]
			}
		}
		var se *spillError
		switch {
		case err == nil:
		case errors.Is(err, errTooLarge), errors.As(err, &se):
			return cursor, &haltError{LSN: at, SQLState: "", Message: err.Error()}
		default:
			return cursor, fmt.Errorf("write %s: %w", name, err)
		}
	}
	return cursor, nil
}

// watchAcks cancels the session when the receiver has not been heard
// within AckTimeout, and returns when ctx is done.
func (s *Shipper) watchAcks(ctx context.Context, cancel context.CancelCauseFunc, name string, heard *atomic.Int64) {
	tick := time.NewTicker(max(s.cfg.AckTimeout/8, time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			if s.overdue(time.Unix(0, heard.Load())) {
				cancel(fmt.Errorf("node %s: no ack within %s", name, s.cfg.AckTimeout))
			}
		}
	}
}

// spillError is a failure to read a spilled transaction back: not the
// connection's fault.
type spillError struct{ err error }

func (e *spillError) Error() string { return "read spilled transaction: " + e.err.Error() }
func (e *spillError) Unwrap() error { return e.err }

// streamTxn sends a spilled transaction as TxnBegin, TxnChunk frames of
// about ChunkBytes of changes each, and TxnEnd. A failure to read the
// spill is a *spillError; others are the connection's.
func (s *Shipper) streamTxn(fc *frameConn, t *decode.Txn) error {
	hdr := *t
	hdr.Changes, hdr.Spill = nil, nil
	if err := fc.write(0, &txnBegin{Txn: &hdr, Count: uint64(t.Spill.Count())}); err != nil {
		return err
	}
	var werr error
	err := t.Spill.Each(func(changes []decode.Change) error {
		for len(changes) > 0 {
			n, size := 0, 0
			for n < len(changes) && (n == 0 || size+changeBytes(&changes[n]) <= s.cfg.ChunkBytes) {
				size += changeBytes(&changes[n])
				n++
			}
			if werr = fc.write(0, &txnChunk{Changes: changes[:n]}); werr != nil {
				return werr
			}
			changes = changes[n:]
		}
		return nil
	})
	if werr != nil {
		return werr
	}
	if err != nil {
		return &spillError{err}
	}
	return fc.write(0, &txnEnd{LSN: t.EndLSN})
}

// changeBytes estimates the encoded size of a change.
func changeBytes(c *decode.Change) int {
	n := 16 + 4*len(c.Truncated)
	for _, v := range c.Old {
		n += 5 + len(v.Data)
	}
	for _, v := range c.New {
		n += 5 + len(v.Data)
	}
	return n
}

// runFallback applies the window through the direct-SQL fallback until a
// node answers again (it returns that node's index) or ctx is done. A
// database that cannot be reached is retried forever: nothing is dropped,
// and Acked stays put so the source keeps its WAL.
func (s *Shipper) runFallback(ctx context.Context, rnd *rand.Rand, backoff func(int) time.Duration) int {
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	s.probeNodes(ctx, cancel, len(s.cfg.Nodes), &wg)

	s.note(nil, &s.st.Fallbacks)
	s.log.Warn().Str("reason", s.Status().LastError).Msg("every node of the region failed; applying through direct SQL")
	attempts := 0
	for {
		err := s.applyFallback(ctx)
		var rec *recovery
		if errors.As(context.Cause(ctx), &rec) {
			s.note(nil, &s.st.Recoveries)
			s.log.Info().Str("peer", s.cfg.Nodes[rec.node].Name).Msg("node answers again; leaving the direct-SQL fallback")
			return rec.node
		}
		if ctx.Err() != nil {
			return 0
		}
		var h *haltError
		if errors.As(err, &h) {
			s.halt(h)
			attempts = 0
			sleep(ctx, s.cfg.MaxBackoff)
			continue
		}
		attempts++
		s.setPath(PathConnecting)
		d := backoff(attempts)
		s.note(err, &s.st.Retries)
		s.log.Warn().Err(err).Int("attempt", attempts).Dur("retry_in", d).Msg("direct-SQL fallback failed; retrying")
		sleep(ctx, d)
	}
}

// applyFallback opens the fallback, fences a previous holder of the
// origin, skips what is durable and applies the window in order, acking
// each transaction as it commits, until an error or ctx is done.
func (s *Shipper) applyFallback(ctx context.Context) error {
	app, release, err := s.fallback(ctx)
	if err != nil {
		return fmt.Errorf("fallback %s: %w", s.cfg.TargetRegion, err)
	}
	defer release()
	if f, ok := app.(fencer); ok {
		fctx, cancel := context.WithTimeout(ctx, s.cfg.FenceTimeout)
		n, err := f.Fence(fctx, s.cfg.SourceRegion)
		cancel()
		switch {
		case err != nil:
			s.log.Warn().Err(err).Msg("fence previous origin holder")
		case n > 0:
			s.log.Warn().Int("sessions", n).Msg("fenced previous origin holder")
		}
	}
	progress, err := app.Progress(ctx, s.cfg.SourceRegion)
	if err != nil {
		return fmt.Errorf("fallback %s: progress: %w", s.cfg.TargetRegion, err)
	}
	if s.cfg.Errors != nil && s.cfg.Undo != nil {
		reqs, err := s.cfg.Errors.PendingUndos(ctx, app, s.cfg.SourceRegion)
		if err != nil {
			s.log.Warn().Err(err).Msg("read pending undo requests through the fallback")
		}
		for _, r := range reqs {
			s.undoLocal(ctx, app, r)
		}
	}
	s.ackUpTo(progress)
	s.setPath(PathFallback)
	var cursor pglogrepl.LSN
	for {
		txns, changed := s.unsent(cursor, fallbackBatch)
		if len(txns) == 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-changed:
			}
			continue
		}
		n, err := applyTxns(ctx, app, txns)
		if n > 0 {
			s.ackUpTo(txns[n-1].EndLSN)
			cursor = txns[n-1].EndLSN
		}
		if err != nil {
			t := txns[min(n, len(txns)-1)]
			if ctx.Err() != nil {
				return ctx.Err()
			}
			state, retryable := classify(err)
			if !retryable && s.cfg.Errors != nil && t.Spill == nil {
				act, herr := s.cfg.Errors.Handle(ctx, app, t, err)
				if herr != nil {
					return fmt.Errorf("fallback %s: apply error policy for %s/%s: %w", s.cfg.TargetRegion, t.Origin, t.EndLSN, herr)
				}
				if act != ActionHalt {
					s.log.Warn().Str("error", describeFailure(t, err)).Stringer("action", act).
						Msg("transaction could not be applied through the fallback; parked in prism.dead_letters")
					s.ackUpTo(t.EndLSN)
					cursor = t.EndLSN
					if act == ActionUndo {
						s.undoLocal(ctx, app, UndoRequest{Txn: t, SQLState: state, Message: describeFailure(t, err)})
					}
					continue
				}
			}
			if !retryable {
				return &haltError{LSN: t.EndLSN, SQLState: state, Message: describeFailure(t, err)}
			}
			return fmt.Errorf("fallback %s: apply %s/%s: %w", s.cfg.TargetRegion, t.Origin, t.EndLSN, err)
		}
	}
}

// fallbackBatch bounds how many transactions the direct-SQL fallback
// applies in one ApplyBatch call.
const fallbackBatch = 64

// applyTxns applies the leading transactions of txns through app, in
// order: consecutive in-memory ones in one ApplyBatch when app offers it,
// a spilled one alone. It returns how many are durable; on error the
// error is about txns[n].
func applyTxns(ctx context.Context, app Applier, txns []*decode.Txn) (int, error) {
	end := 1
	if txns[0].Spill == nil {
		for end < len(txns) && txns[end].Spill == nil {
			end++
		}
	}
	ba, ok := app.(batchApplier)
	if end == 1 || !ok {
		if err := applyOne(ctx, app, txns[0]); err != nil {
			return 0, err
		}
		return 1, nil
	}
	n, err := ba.ApplyBatch(ctx, txns[:end])
	if err == nil {
		return end, nil
	}
	return max(0, min(n, end-1)), err
}

// applyOne applies a transaction through app; a spilled one is streamed
// from its spill file into ApplyStream.
func applyOne(ctx context.Context, app Applier, t *decode.Txn) error {
	if t.Spill == nil {
		return app.Apply(ctx, t)
	}
	sa, ok := app.(streamApplier)
	if !ok {
		return fmt.Errorf("apply %s/%s: the applier cannot apply a spilled transaction", t.Origin, t.EndLSN)
	}
	it, err := t.Spill.Iter()
	if err != nil {
		return &spillError{err}
	}
	defer it.Close()
	hdr := *t
	hdr.Changes, hdr.Spill = nil, nil
	return sa.ApplyStream(ctx, &hdr, func() ([]decode.Change, error) {
		c, err := it.Next()
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, &spillError{err}
		}
		return c, err
	})
}

// MinAcked returns the position the reader may confirm to its replication
// slot: the minimum Acked over every target region's shipper (zero when
// there are none).
func MinAcked(shippers ...*Shipper) pglogrepl.LSN {
	var m pglogrepl.LSN
	for i, s := range shippers {
		if a := s.Acked(); i == 0 || a < m {
			m = a
		}
	}
	return m
}

// undoRequested runs an undo request from the receiver and answers it on
// fc. A failed undo is logged and not answered: the receiver asks again at
// the next connection.
func (s *Shipper) undoRequested(ctx context.Context, fc *frameConn, f *undoFrame) error {
	if f.Txn == nil || f.Txn.Origin != s.cfg.SourceRegion {
		return fmt.Errorf("%w: undo request for another source", errFrame)
	}
	if s.cfg.Undo == nil {
		s.log.Error().Stringer("lsn", f.Txn.EndLSN).Msg("undo requested but this node cannot undo; the request stays pending")
		return nil
	}
	status, note, err := s.cfg.Undo(ctx, s.cfg.TargetRegion, UndoRequest{Txn: f.Txn, SQLState: f.SQLState, Message: f.Message})
	if err != nil {
		s.log.Error().Err(err).Stringer("lsn", f.Txn.EndLSN).Msg("undo failed; it is requested again at the next connection")
		return nil
	}
	return fc.write(s.cfg.WriteTimeout, &undoneFrame{LSN: f.Txn.EndLSN, Status: status, Note: note})
}

// undoLocal reverts a transaction for the direct-SQL fallback path, which
// reaches the target database itself, and records the outcome there. A
// failure leaves the request pending in the target database.
func (s *Shipper) undoLocal(ctx context.Context, app Applier, r UndoRequest) {
	if s.cfg.Undo == nil || s.cfg.Errors == nil {
		s.log.Error().Stringer("lsn", r.Txn.EndLSN).Msg("undo requested but this node cannot undo; the request stays pending")
		return
	}
	status, note, err := s.cfg.Undo(ctx, s.cfg.TargetRegion, r)
	if err == nil {
		err = s.cfg.Errors.Undone(ctx, app, s.cfg.SourceRegion, r.Txn.EndLSN, status, note)
	}
	if err != nil {
		s.log.Error().Err(err).Stringer("lsn", r.Txn.EndLSN).Msg("undo through the fallback failed; it stays pending")
	}
}
