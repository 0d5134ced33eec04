package peers

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/rawconn"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// ServerConfig configures the receiving side of the peer protocol.
type ServerConfig struct {
	Region string // the region this node serves
	Node   string // this node's name
	// Token is the shared secret every peer must prove it holds: its Hello
	// carries HelloMAC over this connection's challenge nonce, never the
	// token. It may be empty only when Insecure is set; a server without a
	// token accepts any Hello.
	Token string
	// TLS, when set, wraps every connection (set ClientAuth to
	// tls.RequireAndVerifyClientCert for mutual TLS; see TLSConfigs).
	TLS *tls.Config
	// Insecure allows plaintext connections without TLS, and an empty
	// Token.
	Insecure bool
	// AcceptRegions are the source regions allowed to ship here.
	AcceptRegions []string
	// The settings below arrive resolved (NewServerConfig chooses them);
	// every value is used as given and Serve refuses one out of range.

	// MaxFrame limits one frame's length.
	MaxFrame int
	// HelloTimeout bounds the TLS handshake, the first frame and the
	// Welcome.
	HelloTimeout time.Duration
	// Heartbeat is how often the server sends a heartbeat, also while an
	// apply is running. It must be well below the shippers' AckTimeout.
	Heartbeat time.Duration
	// IdleTimeout drops a peer that sent nothing for that long.
	IdleTimeout time.Duration
	// MaxBatch bounds how many queued transactions one ApplyBatch call
	// takes. A batch's fixed costs (statement start-up, commit, WAL
	// flush, one transaction for the region's own walsender to decode)
	// shrink per change up to about 256 transactions.
	MaxBatch int
	// FenceTimeout bounds fencing a previous holder of the origin when a
	// source connects.
	FenceTimeout time.Duration
	// AckGather is how long an Applier that commits lazily waits, after a
	// commit, before it flushes the WAL and acknowledges everything
	// committed meanwhile, for sources that allow it (their commits do not
	// wait: helloGatherAcks); at most MaxAckGather, 0 acknowledges after
	// every applied round trip. Gathering replaces a WAL flush per applied
	// round trip (a few hundred a second for a source writing at that
	// rate, each a disk flush the region's own commits queue behind) with
	// at most one per AckGather.
	AckGather time.Duration
	// Errors carries out the apply error policy for transactions that
	// fail permanently; nil halts on every such failure.
	Errors ErrorHandler
	// Applied, when set, is called with the transactions of source region
	// region that were just applied (committed and visible, durable or
	// not yet), in order. It must not block.
	Applied func(region string, txns []*decode.Txn)
	// Received, when set, is called with every transaction of source
	// region region as its frame (or a streamed one's first frame) is
	// read, before it is queued. It must not block.
	Received func(region string, txn *decode.Txn)
	// Applying, when set, is called with the transactions of source
	// region region that the Server hands its Applier next, in order,
	// before it does. It must not block.
	Applying func(region string, txns []*decode.Txn)
}

// Server receives update messages from other regions' shippers and applies
// them in order through its Applier, acknowledging each by LSN once it is
// committed.
type Server struct {
	cfg ServerConfig
	app Applier // set once, before ready is closed
	log zerolog.Logger
	// ready is closed once the Server has its Applier; until then it
	// refuses every authenticated peer with waiting as the reason.
	ready   chan struct{}
	waiting string
	once    sync.Once

	mu     sync.Mutex
	active map[string]*stream // by source region
}

// stream is one accepted connection of a source region.
type stream struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// NewServer returns a Server that applies through app.
func NewServer(cfg ServerConfig, app Applier, log zerolog.Logger) *Server {
	s := NewWaitingServer(cfg, "", log)
	s.Ready(app)
	return s
}

// NewWaitingServer returns a Server that has no Applier yet: it can Serve
// at once, and refuses every peer that authenticates with a Reject giving
// reason (for example that the node waits for its database) until Ready.
// A peer so moves on at once, to the region's next node or the direct-SQL
// fallback, instead of waiting for a handshake timeout.
func NewWaitingServer(cfg ServerConfig, reason string, log zerolog.Logger) *Server {
	return &Server{
		cfg:     cfg,
		log:     log.With().Str("pkg", "peers").Str("role", "server").Logger(),
		active:  map[string]*stream{},
		ready:   make(chan struct{}),
		waiting: reason,
	}
}

// Ready gives the Server its Applier; from then on it accepts peers. Only
// the first call counts.
func (s *Server) Ready(app Applier) {
	s.once.Do(func() {
		s.app = app
		close(s.ready)
	})
}

// Serve accepts connections on ln until ctx is done, then closes ln and
// every connection and returns after all of its goroutines have exited.
// It returns nil when stopped by ctx.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if s.cfg.TLS == nil && !s.cfg.Insecure {
		ln.Close()
		return errors.New("serve: no TLS configuration and not insecure")
	}
	if s.cfg.Token == "" && !s.cfg.Insecure {
		ln.Close()
		return errors.New("serve: empty token and not insecure")
	}
	if err := checkServer(&s.cfg); err != nil {
		ln.Close()
		return fmt.Errorf("serve: settings: %w", err)
	}
	if s.cfg.TLS != nil {
		ln = tls.NewListener(ln, s.cfg.TLS)
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()

	s.log.Info().Str("addr", ln.Addr().String()).Msg("serving peers")
	var delay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn().Err(err).Dur("retry_in", delay).Msg("accept")
				select {
				case <-time.After(delay):
				case <-ctx.Done():
					return nil
				}
				continue
			}
			return fmt.Errorf("serve %s: %w", ln.Addr(), err)
		}
		delay = 0
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.handle(ctx, nc)
		}()
	}
}

// handle runs one connection: handshake, then the stream.
func (s *Server) handle(ctx context.Context, nc net.Conn) {
	nc = rawconn.Wrap(nc)
	defer nc.Close()
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	defer stop()
	log := s.log.With().Str("remote", nc.RemoteAddr().String()).Logger()

	fc, h := s.greet(ctx, nc, log)
	if h == nil {
		return
	}
	select {
	case <-s.ready:
	default:
		log.Debug().Str("source", h.Region).Str("source_node", h.Node).Str("reason", s.waiting).Msg("peer refused: not ready")
		_ = fc.write(time.Second, &reject{Reason: s.waiting})
		return
	}
	// refuse tags its line with the source itself: it gets the logger
	// from before the source was known.
	unknown := log
	log = log.With().Str("source", h.Region).Str("source_node", h.Node).Logger()

	if h.Flags&helloProbe != 0 {
		pctx, cancel := context.WithTimeout(ctx, s.cfg.HelloTimeout)
		progress, err := s.app.Progress(pctx, h.Region)
		cancel()
		if err != nil {
			s.refuse(fc, unknown, h, &reject{Reason: fmt.Sprintf("progress: %v", err)})
			return
		}
		_ = fc.write(s.cfg.HelloTimeout, &welcome{Region: s.cfg.Region, Node: s.cfg.Node, Progress: progress})
		return
	}

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st := &stream{cancel: cancel, done: make(chan struct{})}
	defer close(st.done)
	if !s.takeOver(ctx, h.Region, st) {
		return
	}
	defer s.release(h.Region, st)

	s.fence(sctx, h.Region, log)
	pctx, pcancel := context.WithTimeout(sctx, s.cfg.HelloTimeout)
	progress, err := s.app.Progress(pctx, h.Region)
	pcancel()
	if err != nil {
		s.refuse(fc, unknown, h, &reject{Reason: fmt.Sprintf("progress: %v", err)})
		return
	}
	if err := fc.write(s.cfg.HelloTimeout, &welcome{Region: s.cfg.Region, Node: s.cfg.Node, Progress: progress}); err != nil {
		log.Warn().Err(err).Msg("send welcome")
		return
	}
	log.Info().Stringer("progress", progress).Msg("peer connected")
	if err := s.resendUndos(sctx, fc, h.Region, log); err != nil {
		log.Warn().Err(err).Msg("send pending undo requests")
		return
	}
	var gather time.Duration
	if h.Flags&helloGatherAcks != 0 {
		gather = s.cfg.AckGather
	}
	err = s.stream(sctx, fc, h.Region, gather, log)
	if r, ok := s.app.(releaser); ok {
		// The stream ended: free the source region's origin for
		// whichever path carries it next.
		r.Release(h.Region)
	}
	log.Info().AnErr("reason", err).Msg("peer disconnected")
}

// greet runs the handshake up to an accepted Hello: TLS when it is
// configured, the challenge, the peer's Hello and its check. It returns a
// nil Hello when the peer was refused (and logged).
func (s *Server) greet(ctx context.Context, nc net.Conn, log zerolog.Logger) (*frameConn, *hello) {
	if tc, ok := nc.(*tls.Conn); ok {
		hctx, cancel := context.WithTimeout(ctx, s.cfg.HelloTimeout)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			log.Warn().Err(err).Msg("peer rejected: tls handshake")
			return nil, nil
		}
	}
	fc := newFrameConn(nc, s.cfg.MaxFrame)
	ch, err := newChallenge()
	if err != nil {
		log.Error().Err(err).Msg("peer rejected: challenge")
		return nil, nil
	}
	if err := fc.write(s.cfg.HelloTimeout, ch); err != nil {
		log.Warn().Err(err).Msg("peer rejected: send challenge")
		return nil, nil
	}
	f, err := fc.read(s.cfg.HelloTimeout)
	if err != nil {
		s.refuse(fc, log, nil, &reject{Reason: fmt.Sprintf("first frame: %v", err)})
		return nil, nil
	}
	h, ok := f.(*hello)
	if !ok {
		s.refuse(fc, log, nil, &reject{Reason: fmt.Sprintf("first frame is %T, not hello", f)})
		return nil, nil
	}
	if r := s.check(h, ch.Nonce[:]); r != nil {
		s.refuse(fc, log, h, r)
		return nil, nil
	}
	return fc, h
}

// fence terminates a previous holder of region's origin (a frozen node
// that may still apply) before this stream takes the region over, when
// the applier can.
func (s *Server) fence(ctx context.Context, region string, log zerolog.Logger) {
	f, ok := s.app.(fencer)
	if !ok {
		return
	}
	fctx, cancel := context.WithTimeout(ctx, s.cfg.FenceTimeout)
	n, err := f.Fence(fctx, region)
	cancel()
	switch {
	case err != nil:
		log.Warn().Err(err).Msg("fence previous origin holder")
	case n > 0:
		log.Warn().Int("sessions", n).Msg("fenced previous origin holder")
	}
}

// check validates a Hello answering the challenge nonce and returns the
// Reject that refuses it, or nil.
func (s *Server) check(h *hello, nonce []byte) *reject {
	if h.Version < minProtocolVersion || h.Version > ProtocolVersion {
		return &reject{Reason: versionMismatch(h.Version), Code: rejectVersion}
	}
	if reason := checkMAC(s.cfg.Token, nonce, h); reason != "" {
		return &reject{Reason: reason, Code: rejectAuth}
	}
	if h.Region == "" {
		return &reject{Reason: "no source region", Code: rejectRegion}
	}
	if h.Region == s.cfg.Region {
		return &reject{Reason: fmt.Sprintf("source region %q is this node's own region", h.Region), Code: rejectRegion}
	}
	if !slices.Contains(s.cfg.AcceptRegions, h.Region) {
		return &reject{Reason: fmt.Sprintf("source region %q is not accepted", h.Region), Code: rejectRegion}
	}
	return nil
}

// refuse logs why a peer is refused (never its token) and sends it r,
// best effort. h is the peer's Hello, nil when none was read; a peer of
// protocol version 3 or none gets the Reject without its code, which it
// could not decode.
func (s *Server) refuse(fc *frameConn, log zerolog.Logger, h *hello, r *reject) {
	var region, node string
	if h != nil {
		region, node = h.Region, h.Node
	}
	ev := log.Warn().Str("source", region).Str("source_node", node).Str("reason", r.Reason)
	if r.Code == rejectAuth {
		ev = ev.Str("fix", "give both nodes the same auth.token")
	}
	ev.Msg("peer rejected")
	if h == nil || h.Version < 4 {
		r = &reject{Reason: r.Reason}
	}
	_ = fc.write(time.Second, r)
}

// takeOver registers st as the stream of a source region, ending and
// waiting for a previous stream of the same region on this server (the
// source reconnected; the old connection is stale).
func (s *Server) takeOver(ctx context.Context, region string, st *stream) bool {
	for {
		s.mu.Lock()
		old := s.active[region]
		if old == nil {
			s.active[region] = st
			s.mu.Unlock()
			return true
		}
		s.mu.Unlock()
		old.cancel()
		select {
		case <-old.done:
		case <-ctx.Done():
			return false
		}
	}
}

func (s *Server) release(region string, st *stream) {
	s.mu.Lock()
	if s.active[region] == st {
		delete(s.active, region)
	}
	s.mu.Unlock()
}

// stream reads Txn frames and applies them in order until the connection
// ends. Order of duties per transaction: apply (commit, with the origin
// advanced in the same database transaction), then Ack. After any Nack no
// later transaction is applied on this connection.
//
// Three goroutines share the connection, all owned by stream: receive
// reads frames, checks their order and queues the transactions;
// keepAlive writes heartbeats; stream itself applies the queue and
// writes the ACKs.
func (s *Server) stream(ctx context.Context, fc *frameConn, region string, gather time.Duration, log zerolog.Logger) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	defer fc.close() // unblocks the reader before wg.Wait

	// Each element is a run of transactions that arrived together (see
	// readFrames): with the one being read, at most 3*MaxBatch wait.
	queue := make(chan []*queued, 2)
	var lazy *lazyAcks // see acker
	if lf, ok := s.app.(lazyFlusher); ok && lf.LazyFlush() {
		// Acknowledgements come from the durable progress (see acker).
		lazy = &lazyAcks{kick: make(chan struct{}, 1), gather: gather}
		wg.Add(1)
		go func() { // ends with ctx
			defer wg.Done()
			if err := s.acker(ctx, fc, region, lazy); err != nil {
				cancel(err)
			}
		}()
	}
	wg.Add(2)
	go func() { // reader; ends with the connection or ctx
		defer wg.Done()
		defer close(queue)
		s.receive(ctx, cancel, fc, region, queue, log)
	}()
	go func() { // heartbeats; end with ctx
		defer wg.Done()
		if err := keepAlive(ctx, fc, s.cfg.Heartbeat, s.cfg.IdleTimeout, nil); err != nil {
			cancel(fmt.Errorf("write heartbeat: %w", err))
		}
	}()
	cancel(s.applyQueue(ctx, fc, region, lazy, queue, log))
	return context.Cause(ctx)
}

// receive reads frames until the connection or ctx ends, then stops the
// stream with why, and only then cuts off a streamed transaction it was
// receiving: its applier sees the stream stopped, not a failure of the
// transaction.
func (s *Server) receive(ctx context.Context, cancel context.CancelCauseFunc, fc *frameConn, region string, queue chan<- []*queued, log zerolog.Logger) {
	open, err := s.readFrames(ctx, fc, region, queue, log)
	cancel(err)
	if open != nil {
		open.err = fmt.Errorf("streamed transaction %s/%s cut off: %w", region, open.txn.EndLSN, context.Cause(ctx))
		close(open.chunks)
	}
}

// readFrames checks the order of the frames it reads and hands the
// transactions to queue: those in memory in runs, as many as arrived
// together (up to MaxBatch; the run goes before the next read that would
// wait), a streamed one alone at its TxnBegin, its changes following on
// its chunks. It returns why it stopped and the streamed transaction open
// then, if any.
func (s *Server) readFrames(ctx context.Context, fc *frameConn, region string, queue chan<- []*queued, log zerolog.Logger) (open *queued, err error) {
	order := frameOrder{region: region}
	var run []*queued
	enqueue := func() error {
		if len(run) == 0 {
			return nil
		}
		select {
		case queue <- run:
			run = nil
			return nil
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	for {
		if len(run) >= s.cfg.MaxBatch || len(run) > 0 && !fc.buffered() {
			if err := enqueue(); err != nil {
				return open, err
			}
		}
		f, err := fc.read(s.cfg.IdleTimeout)
		if err != nil {
			return open, fmt.Errorf("read: %w", err)
		}
		if order, err = order.next(f); err != nil {
			return open, err
		}
		switch f := f.(type) {
		case *undoneFrame:
			s.undone(ctx, region, f, log)
		case *txnFrame:
			if s.cfg.Received != nil {
				s.cfg.Received(region, f.Txn)
			}
			run = append(run, &queued{txn: f.Txn})
		case *txnBegin:
			if s.cfg.Received != nil {
				s.cfg.Received(region, f.Txn)
			}
			if err = enqueue(); err == nil {
				open = &queued{txn: f.Txn, count: f.Count, chunks: make(chan []decode.Change, 2)}
				run = []*queued{open}
				err = enqueue()
			}
		case *txnChunk:
			select {
			case open.chunks <- f.Changes:
			case <-ctx.Done():
				err = context.Cause(ctx)
			}
		case *txnEnd:
			close(open.chunks)
			open = nil
		}
		if err != nil {
			return open, err
		}
	}
}

// applyQueue applies the queued transactions in order until the queue
// closes: those in memory in batches, a streamed one alone. After a Nack
// it drains the queue (the shipper decides what comes next). It returns
// a failure of the connection; otherwise ctx's cause once the queue is
// closed.
func (s *Server) applyQueue(ctx context.Context, fc *frameConn, region string, lazy *lazyAcks, queue <-chan []*queued, log zerolog.Logger) error {
	_, batches := s.app.(batchApplier)
	halted := false
	batch := make([]*decode.Txn, 0, s.cfg.MaxBatch)
	var pending []*queued // received, not yet applied
	for {
		if len(pending) == 0 {
			run, ok := <-queue
			if !ok {
				return context.Cause(ctx)
			}
			pending = run
		}
		if halted {
			for _, q := range pending {
				q.drain()
			}
			pending = nil
			continue
		}
		var carry *queued // a streamed transaction that ended the batch
		batch, carry, pending = gather(queue, pending, batch[:0], batches, s.cfg.MaxBatch)
		h, err := s.applyBatch(ctx, fc, region, lazy, batch, log)
		if err != nil {
			return err
		}
		halted = h
		if carry == nil {
			continue
		}
		if halted {
			carry.drain()
			continue
		}
		if halted, err = s.applyStreamed(ctx, fc, carry, log); err != nil {
			return err
		}
	}
}

// gather takes the next batch from pending, in order, and when the
// applier takes batches, adds the runs already queued behind it, up to
// limit transactions. A streamed transaction ends the batch and is
// returned as carry, to be applied after it (with an empty batch when it
// comes first). It returns the transactions it did not take.
func gather(queue <-chan []*queued, pending []*queued, batch []*decode.Txn, batches bool, limit int) ([]*decode.Txn, *queued, []*queued) {
	for {
		for len(pending) > 0 {
			q := pending[0]
			if q.chunks != nil {
				return batch, q, pending[1:]
			}
			if len(batch) > 0 && (!batches || len(batch) >= limit) {
				return batch, nil, pending
			}
			batch = append(batch, q.txn)
			pending = pending[1:]
		}
		if !batches || len(batch) >= limit {
			return batch, nil, nil
		}
		select {
		case run, ok := <-queue:
			if !ok {
				return batch, nil, nil
			}
			pending = run
		default:
			return batch, nil, nil
		}
	}
}

// applyBatch applies batch in order and acknowledges what is durable. A
// transaction that fails goes to the error policy: parked, it is
// acknowledged too and the rest follow; otherwise it is nacked and
// applyBatch reports that the stream halted.
func (s *Server) applyBatch(ctx context.Context, fc *frameConn, region string, lazy *lazyAcks, batch []*decode.Txn, log zerolog.Logger) (halted bool, err error) {
	if s.cfg.Applying != nil && len(batch) > 0 {
		s.cfg.Applying(region, batch) // once: what follows a parked failure is not begun again
	}
	for len(batch) > 0 && !halted {
		n, aerr := applyTxns(ctx, s.app, batch)
		if n > 0 && s.cfg.Applied != nil {
			s.cfg.Applied(region, batch[:n])
		}
		var frames []any
		if n > 0 && lazy != nil && aerr == nil {
			// Committed, not yet known durable: the acker acknowledges.
			lazy.committed(batch[n-1].EndLSN)
		} else if n > 0 {
			frames = append(frames, &ack{LSN: batch[n-1].EndLSN})
		}
		rest := batch[:0]
		if aerr != nil {
			if ctx.Err() != nil {
				return false, context.Cause(ctx)
			}
			var answer []any
			answer, halted = s.failed(ctx, batch[n], aerr, log)
			frames = append(frames, answer...)
			if !halted {
				rest = batch[n+1:]
			}
		}
		if len(frames) > 0 && lazy != nil {
			// Before an answer about a failed transaction, everything
			// before it (and a parked one) is made durable: Progress
			// flushes up to the origin's last commit.
			if _, perr := s.app.Progress(ctx, region); perr != nil {
				return false, fmt.Errorf("flush applied transactions: %w", perr)
			}
		}
		if len(frames) > 0 {
			if werr := fc.write(s.cfg.IdleTimeout, frames...); werr != nil {
				return false, fmt.Errorf("write ack: %w", werr)
			}
		}
		batch = rest
	}
	return halted, nil
}

// lazyAcks is what applyBatch tells the acker: the end LSN of the last
// transaction whose COMMIT returned, and a kick when it moved.
type lazyAcks struct {
	kick    chan struct{}
	applied atomic.Uint64 // pglogrepl.LSN
	gather  time.Duration // ServerConfig.AckGather, or 0 for this source
}

// committed records that the transactions up to lsn committed and wakes
// the acker; a kick already pending covers them too.
func (l *lazyAcks) committed(lsn pglogrepl.LSN) {
	l.applied.Store(uint64(lsn))
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// acker acknowledges, for an Applier that flushes lazily, what the
// origin's durable progress covers, each time applyBatch kicks it, but
// never past the last transaction whose COMMIT returned: the origin's
// progress moves when the commit record is written, a moment before the
// transaction becomes visible, and an ACK promises a region that holds
// it. A kick that comes while Progress runs (it flushes the WAL) is taken
// by the next round, so one flush covers every commit made meanwhile.
// With lazy.gather a round first waits that long, so one flush also
// covers the commits of that window (and the WAL writer's own flushes
// often leave it nothing to do). It returns when ctx ends, or why it
// could not acknowledge.
func (s *Server) acker(ctx context.Context, fc *frameConn, region string, lazy *lazyAcks) error {
	var acked pglogrepl.LSN
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-lazy.kick:
		}
		if lazy.gather > 0 {
			t := time.NewTimer(lazy.gather)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
			// This round covers the commits of the window: their
			// kicks need no round of their own (one stored after
			// applied is read below kicks again).
			select {
			case <-lazy.kick:
			default:
			}
		}
		applied := pglogrepl.LSN(lazy.applied.Load())
		lsn, err := s.app.Progress(ctx, region)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("read durable progress: %w", err)
		}
		lsn = min(lsn, applied)
		if lsn <= acked {
			continue
		}
		if err := fc.write(s.cfg.IdleTimeout, &ack{LSN: lsn}); err != nil {
			return fmt.Errorf("write ack: %w", err)
		}
		acked = lsn
	}
}

// failed decides what to answer for a transaction that failed with err:
// an ACK (and an undo request under the undo policy) when the error
// policy parked it, else a NACK, and then the stream halts.
func (s *Server) failed(ctx context.Context, txn *decode.Txn, err error, log zerolog.Logger) (frames []any, halted bool) {
	state, retryable := classify(err)
	if act, ok := s.resolve(ctx, txn, err, log); ok {
		// Parked durably: acknowledge it and go on with the rest.
		frames = append(frames, &ack{LSN: txn.EndLSN})
		if act == ActionUndo {
			frames = append(frames, &undoFrame{Txn: txn, SQLState: state, Message: describeFailure(txn, err)})
		}
		return frames, false
	}
	ev := log.Warn()
	if !retryable {
		ev = log.Error()
	}
	msg := describeFailure(txn, err)
	ev.Str("error", msg).Stringer("lsn", txn.EndLSN).Uint32("xid", txn.Xid).Str("sqlstate", state).
		Bool("retryable", retryable).Msg("apply failed; stream stopped")
	return append(frames, &nack{LSN: txn.EndLSN, SQLState: state, Message: msg, Retryable: retryable}), true
}

// queued is one transaction on its way from a connection's reader to its
// applier: in memory (txn has the changes), or streamed, when its changes
// arrive on chunks, closed after the last one (err set first when the
// stream broke off).
type queued struct {
	txn    *decode.Txn
	count  uint64
	chunks chan []decode.Change
	err    error
}

// drain discards the rest of a streamed transaction.
func (q *queued) drain() {
	if q.chunks != nil {
		for range q.chunks {
		}
	}
}

// streamApplier is the optional capability of an Applier to apply a
// transaction whose changes arrive in chunks: next returns them in order
// and io.EOF after the last. It has Apply's duties (one database
// transaction, the origin advanced in it, skipped when already applied).
type streamApplier interface {
	ApplyStream(ctx context.Context, txn *decode.Txn, next func() ([]decode.Change, error)) error
}

// applyStreamed applies a streamed transaction as its chunks arrive, then
// acknowledges it, or nacks it and reports that the stream halted. A
// failure of the connection (err) ends the stream. Streamed transactions
// are too large to park: every permanent failure halts.
func (s *Server) applyStreamed(ctx context.Context, fc *frameConn, q *queued, log zerolog.Logger) (halted bool, err error) {
	next := func() ([]decode.Change, error) {
		select {
		case c, ok := <-q.chunks:
			if !ok {
				if q.err != nil {
					return nil, q.err
				}
				return nil, io.EOF
			}
			return c, nil
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
	}
	if s.cfg.Applying != nil {
		s.cfg.Applying(q.txn.Origin, []*decode.Txn{q.txn})
	}
	var aerr error
	if sa, ok := s.app.(streamApplier); ok {
		aerr = sa.ApplyStream(ctx, q.txn, next)
	} else {
		aerr = fmt.Errorf("apply %s/%s: this node cannot apply streamed transactions", q.txn.Origin, q.txn.EndLSN)
	}
	if aerr == nil {
		if s.cfg.Applied != nil {
			s.cfg.Applied(q.txn.Origin, []*decode.Txn{q.txn})
		}
		if werr := fc.write(s.cfg.IdleTimeout, &ack{LSN: q.txn.EndLSN}); werr != nil {
			return true, fmt.Errorf("write ack: %w", werr)
		}
		return false, nil
	}
	if ctx.Err() != nil {
		return true, context.Cause(ctx)
	}
	state, retryable := classify(aerr)
	msg := describeFailure(q.txn, aerr)
	ev := log.Warn()
	if !retryable {
		ev = log.Error()
	}
	ev.Str("error", msg).Stringer("lsn", q.txn.EndLSN).Uint32("xid", q.txn.Xid).Str("sqlstate", state).
		Bool("retryable", retryable).Msg("apply of a streamed transaction failed; stream stopped")
	if werr := fc.write(s.cfg.IdleTimeout, &nack{LSN: q.txn.EndLSN, SQLState: state, Message: msg, Retryable: retryable}); werr != nil {
		return true, fmt.Errorf("write nack: %w", werr)
	}
	q.drain()
	return true, nil
}

// resolve applies the error policy to a transaction that failed with err.
// It reports true when the transaction is parked durably (and must be
// acknowledged), false when the stream halts at it.
func (s *Server) resolve(ctx context.Context, txn *decode.Txn, err error, log zerolog.Logger) (Action, bool) {
	if _, retryable := classify(err); retryable || s.cfg.Errors == nil {
		return ActionHalt, false
	}
	act, herr := s.cfg.Errors.Handle(ctx, s.app, txn, err)
	if herr != nil {
		log.Warn().Err(herr).Stringer("lsn", txn.EndLSN).Msg("apply error policy failed; halting at the transaction")
		return ActionHalt, false
	}
	if act == ActionHalt {
		return act, false
	}
	log.Warn().Str("error", describeFailure(txn, err)).Stringer("lsn", txn.EndLSN).Uint32("xid", txn.Xid).
		Stringer("action", act).Msg("transaction could not be applied; parked in prism.dead_letters")
	return act, true
}

// resendUndos sends the undo requests the source has not answered yet, on
// a new connection of that source.
func (s *Server) resendUndos(ctx context.Context, fc *frameConn, region string, log zerolog.Logger) error {
	if s.cfg.Errors == nil {
		return nil
	}
	reqs, err := s.cfg.Errors.PendingUndos(ctx, s.app, region)
	if err != nil {
		log.Warn().Err(err).Msg("read pending undo requests")
		return nil
	}
	for _, r := range reqs {
		if err := fc.write(s.cfg.IdleTimeout, &undoFrame{Txn: r.Txn, SQLState: r.SQLState, Message: r.Message}); err != nil {
			return err
		}
		log.Info().Stringer("lsn", r.Txn.EndLSN).Msg("undo request sent again")
	}
	return nil
}

// undone records the source's answer to an undo request.
func (s *Server) undone(ctx context.Context, region string, f *undoneFrame, log zerolog.Logger) {
	if s.cfg.Errors == nil {
		return
	}
	if err := s.cfg.Errors.Undone(ctx, s.app, region, f.LSN, f.Status, f.Note); err != nil {
		log.Warn().Err(err).Stringer("lsn", f.LSN).Msg("record undo outcome; the request is sent again at the next connection")
		return
	}
	log.Info().Stringer("lsn", f.LSN).Str("status", f.Status).Str("note", f.Note).Msg("source answered undo request")
}
