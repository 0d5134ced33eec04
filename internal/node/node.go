package node

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/scope"
	"github.com/prism-cdc/prism-cdc/internal/spool"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
	"github.com/prism-cdc/prism-cdc/pkg/peers"
)

// DrainTimeout bounds how long a graceful stop waits for in-flight
// transactions to be acknowledged before it confirms the slot and exits.
const DrainTimeout = 15 * time.Second

// StallAfter is how long the checkpoint loop (which goes round every
// 200 ms, under the node's lock) may stand still before /healthz reports
// the process as stuck.
const StallAfter = 10 * time.Second

// Role is what a node currently does with its region's slot.
type Role string

// The roles of a node.
const (
	RoleStarting Role = "starting"
	RoleReader   Role = "reader"  // holds the slot and ships local writes
	RoleStandby  Role = "standby" // another node of the region holds the slot
	RoleStopped  Role = "stopped"
)

// Node is one prism-cdc node: applier server, reader and shippers.
type Node struct {
	cfg *config.Config
	log zerolog.Logger

	applier *apply.Applier // this region's database; set by Run before anything ships
	// applied is applier for the metrics, which are served before Run
	// sets applier.
	applied atomic.Pointer[apply.Applier]

	// scopes holds each peer region's scope, by peer index (nil ships
	// everything); set by Run before anything ships.
	scopes []*scope.Scope

	clientTLS *tls.Config // for shippers; nil without auth.tls

	mu        sync.Mutex
	probe     *pgxpool.Pool // one connection for /readyz; nil until Run opened the database
	term      *term         // shippers of the current reader term; nil while not reading
	role      Role
	reader    *decode.Reader
	lastSent  pglogrepl.LSN
	confirmed pglogrepl.LSN
	readerErr string
	startedAt time.Time

	// acked is signalled when a shipper's acknowledged position advanced:
	// the checkpoint loop confirms it to the slot at once.
	acked chan struct{}

	// alive is when the checkpoint loop last went round (unix nanoseconds);
	// /healthz fails when it is older than stallAfter.
	alive      atomic.Int64
	stallAfter time.Duration

	// delays are the stage delay histograms of /metrics.
	delays *delays

	// deniedWarned is when the collect loop last warned about tables
	// prism-cdc's role may not install the conflict triggers on; only
	// that loop reads and writes it.
	deniedWarned time.Time
}

// New returns a node for a validated configuration.
//
// Every connection the node opens gives up after ConnectTimeout when its
// DSN sets no connect_timeout (BoundConnect).
//
// Every session the node opens commits with synchronous_commit = local: it
// still flushes its own WAL (an ACK means durable), but never waits for
// synchronous standbys. In sync mode the standby named in
// synchronous_standby_names is the node's own reader, so a node that
// waited for it while starting (creating its tables) or while applying
// other regions' transactions would wait for itself.
func New(cfg *config.Config, log zerolog.Logger) *Node {
	c := *BoundConnect(cfg)
	c.Database = commitLocally(c.Database)
	for i := range c.Peers {
		c.Peers[i].Database = commitLocally(c.Peers[i].Database)
	}
	return &Node{cfg: &c, log: log, role: RoleStarting, acked: make(chan struct{}, 1), stallAfter: StallAfter,
		delays: newDelays(c.Node, c.Region)}
}

// commitLocally adds synchronous_commit=local to a DSN (key/value or URL)
// as a run-time parameter of every connection made with it.
func commitLocally(dsn string) string {
	if dsn == "" {
		return dsn
	}
	return addParam(dsn, "synchronous_commit", "local")
}

// ConnectTimeout bounds a connection attempt with a DSN that sets no
// connect_timeout (nor PGCONNECT_TIMEOUT): a server that accepts the
// connection and never answers (a hung server, a proxy whose backend is
// gone) would otherwise hold the node's first connection, or a pooled
// apply session's, for ever and in silence. Timed out, the attempt is
// retried and logged like any database that is down. The command-line
// tools connect with the same bound (BoundConnect), so a hung database
// fails them instead of hanging a script.
var ConnectTimeout = 15 * time.Second

// BoundConnect returns a copy of cfg whose database DSNs (the region's,
// and every peer's fallback) give up a connection attempt after
// ConnectTimeout when they set no connect_timeout of their own.
func BoundConnect(cfg *config.Config) *config.Config {
	c := *cfg
	c.Database = boundConnect(cfg.Database)
	c.Peers = make([]config.Peer, len(cfg.Peers))
	for i, p := range cfg.Peers {
		p.Database = boundConnect(p.Database)
		c.Peers[i] = p
	}
	return &c
}

// boundConnect adds connect_timeout (ConnectTimeout, in seconds) to a DSN
// that does not set one; a DSN that does not parse is returned as it is
// (validation reports it).
func boundConnect(dsn string) string {
	if dsn == "" {
		return dsn
	}
	if cfg, err := pgconn.ParseConfig(dsn); err != nil || cfg.ConnectTimeout != 0 {
		return dsn
	}
	return addParam(dsn, "connect_timeout", strconv.Itoa(max(1, int(ConnectTimeout.Seconds()))))
}

// addParam adds key=value to a DSN, key/value or URL.
func addParam(dsn, key, value string) string {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		sep := "?"
		if strings.Contains(dsn, "?") {
			sep = "&"
		}
		return dsn + sep + key + "=" + value
	}
	return dsn + " " + key + "=" + value
}

// Run runs the node until ctx is done, then stops gracefully: it stops
// reading, waits up to DrainTimeout for in-flight transactions to be
// acknowledged, confirms the slot and closes.
//
// The HTTP endpoints answer from the start. While the region's database
// is unavailable the node waits for it (open), not ready, the same way it
// waits when the database goes away later. Run returns an error for what
// waiting cannot fix: a *config.Error (auth.tls files), an address it
// cannot listen on, a database without what prism-cdc needs, and failures
// that stop replication (a lost slot).
func (n *Node) Run(ctx context.Context) error {
	n.startedAt = time.Now()
	n.alive.Store(n.startedAt.UnixNano())
	serverTLS, clientTLS, err := n.tlsConfigs()
	if err != nil {
		return err
	}
	n.clientTLS = clientTLS
	// The peer address is taken at once, so a port in use fails the start.
	// Until the database is there the server refuses peers, saying so,
	// and they move on to the region's next node or the fallback.
	ln, err := net.Listen("tcp", n.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen %s (key listen in %s): %w", n.cfg.Listen, n.cfg.Path, err)
	}
	defer ln.Close()

	// runCtx outlives ctx: after a stop signal the shippers and the server
	// keep running until in-flight transactions are acknowledged. Every
	// goroutine below is owned by Run through wg; a failure that stops the
	// node arrives on fatal.
	runCtx, stopAll := context.WithCancel(context.WithoutCancel(ctx))
	defer stopAll()
	var wg sync.WaitGroup
	fatal := make(chan error, 4)
	if err := n.serveHTTP(runCtx, &wg, fatal); err != nil {
		return err
	}
	server := n.servePeers(runCtx, &wg, fatal, ln, serverTLS)
	wg.Add(1)
	go func() {
		defer wg.Done()
		n.checkpointLoop(runCtx)
	}()

	pool, applier, err := n.open(ctx)
	if err != nil || ctx.Err() != nil {
		stopAll()
		wg.Wait()
		n.setRole(RoleStopped, "")
		if err == nil {
			n.log.Info().Msg("node stopped before its database answered")
		}
		return err
	}
	defer pool.Close()
	defer applier.Close() // before pool.Close, which waits for the connections
	if err := n.setupScopes(ctx, pool); err != nil {
		stopAll()
		wg.Wait()
		n.setRole(RoleStopped, "")
		return err
	}
	n.applier = applier
	n.applied.Store(applier)
	defer n.startProbe(ctx)()
	server.Ready(applier)
	wg.Add(1)
	go func() {
		defer wg.Done()
		n.collectLoop(runCtx)
	}()
	n.log.Info().Str("listen", n.cfg.Listen).Str("http", n.cfg.HTTP).Int("peer_regions", len(n.cfg.Peers)).Msg("node started")

	runErr := n.readUntilStop(ctx, runCtx, fatal)
	n.shutdown(stopAll, &wg)
	return runErr
}

// serveHTTP starts the HTTP endpoints (key http; none when it is empty)
// in goroutines owned by the caller through wg, until runCtx is done. A
// failure to serve arrives on fatal; one to listen is returned.
func (n *Node) serveHTTP(runCtx context.Context, wg *sync.WaitGroup, fatal chan<- error) error {
	if n.cfg.HTTP == "" {
		return nil
	}
	hl, err := net.Listen("tcp", n.cfg.HTTP)
	if err != nil {
		return fmt.Errorf("listen %s (key http in %s): %w", n.cfg.HTTP, n.cfg.Path, err)
	}
	m := newMonitor(n)
	hs := &http.Server{Handler: m.handler(), ReadHeaderTimeout: 5 * time.Second}
	wg.Add(1)
	go func() {
		defer wg.Done()
		m.recordLoop(runCtx)
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := hs.Serve(hl); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fatal <- fmt.Errorf("http: %w", err)
		}
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-runCtx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		hs.Shutdown(sctx)
	}()
	return nil
}

// startProbe opens the pool /readyz checks the database with and returns
// the function that closes it. Without it /readyz does not check the
// database.
func (n *Node) startProbe(ctx context.Context) (closeProbe func()) {
	probe, err := newProbePool(ctx, n.cfg.Database)
	if err != nil {
		n.log.Warn().Err(redactedError{err}).Msg("no readiness probe: /readyz does not check the database")
		return func() {}
	}
	n.mu.Lock()
	n.probe = probe
	n.mu.Unlock()
	return probe.Close
}

// servePeers starts the peer server on ln in a goroutine owned by the
// caller through wg, until runCtx is done; a failure to serve arrives on
// fatal. It refuses peers until Ready gives it the applier.
func (n *Node) servePeers(runCtx context.Context, wg *sync.WaitGroup, fatal chan<- error, ln net.Listener, serverTLS *tls.Config) *peers.Server {
	accept := make([]string, 0, len(n.cfg.Peers))
	for _, p := range n.cfg.Peers {
		accept = append(accept, p.Region)
	}
	sc := peers.NewServerConfig(n.cfg.Delivery.AckTimeout)
	sc.Region, sc.Node, sc.AcceptRegions = n.cfg.Region, n.cfg.Node, accept
	sc.Token, sc.TLS, sc.Insecure = n.cfg.Auth.Token, serverTLS, n.plaintext()
	sc.Errors = newErrorPolicy(n.cfg, n.log)
	sc.Received, sc.Applying, sc.Applied = n.delays.peerReceived, n.delays.applying, n.delays.appliedTxns
	server := peers.NewWaitingServer(sc, fmt.Sprintf("node %s of region %s is waiting for its database", n.cfg.Node, n.cfg.Region),
		n.log.With().Str("component", "server").Logger())
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := server.Serve(runCtx, ln); err != nil && runCtx.Err() == nil {
			fatal <- fmt.Errorf("peer server: %w", err)
		}
	}()
	return server
}

// readUntilStop reads the region's slot until ctx is done, reading fails
// for good or a failure arrives on fatal; then it stops reading and waits
// up to DrainTimeout for in-flight transactions to be acknowledged. It
// returns the failure, nil after a stop request.
func (n *Node) readUntilStop(ctx, runCtx context.Context, fatal <-chan error) error {
	readCtx, stopReading := context.WithCancel(ctx)
	defer stopReading()
	readDone := make(chan error, 1)
	go func() { readDone <- n.readLoop(readCtx, runCtx) }() // waited for below

	var runErr error
	select {
	case <-ctx.Done():
		n.log.Info().Msg("stop requested: draining in-flight transactions")
	case runErr = <-readDone:
		readDone <- runErr
	case runErr = <-fatal:
	}
	stopReading()
	<-readDone
	n.drain(DrainTimeout)
	return runErr
}

// shutdown stops the current term's shippers, then every goroutine of
// Run (stopAll, waited for through wg), and closes the reader.
func (n *Node) shutdown(stopAll context.CancelFunc, wg *sync.WaitGroup) {
	n.mu.Lock()
	t := n.term
	n.term = nil
	n.mu.Unlock()
	if t != nil {
		t.stop()
	}
	stopAll()
	wg.Wait()
	n.mu.Lock()
	r := n.reader
	n.reader = nil
	n.role = RoleStopped
	n.mu.Unlock()
	if r != nil {
		if err := r.Close(); err != nil {
			n.log.Warn().Err(err).Msg("close reader")
		}
	}
	n.log.Info().Stringer("confirmed", n.confirmedLSN()).Msg("node stopped")
}

// open connects to the region's database and prepares schema prism. While
// the database is unavailable (not answering, shutting down, starting up,
// out of connections) it retries with the reader's backoff, logs each
// attempt once and reports the reason as the node's role reason; it
// returns nil values when ctx is done first, and an error for a database
// waiting cannot fix (wal_level, REPLICATION, authentication, ...).
func (n *Node) open(ctx context.Context) (*pgxpool.Pool, *apply.Applier, error) {
	backoff := n.cfg.Delivery.Backoff
	for attempt := 1; ; attempt++ {
		pool, applier, err := n.openOnce(ctx)
		if err == nil {
			n.setRole(RoleStarting, "")
			return pool, applier, nil
		}
		if ctx.Err() != nil {
			return nil, nil, nil
		}
		if errors.Is(err, errDatabaseSettings) || !apply.IsRetryable(err) {
			return nil, nil, err
		}
		wait := standbyPoll(backoff)
		n.setRole(RoleStarting, err.Error())
		n.log.Warn().Err(err).Int("attempt", attempt).Dur("retry_in", wait).Msg("database unavailable; waiting for it")
		backoff = min(backoff*2, n.cfg.Delivery.MaxBackoff)
		select {
		case <-ctx.Done():
			return nil, nil, nil
		case <-time.After(wait):
		}
	}
}

// newProbePool returns a pool of one connection for readiness checks, apart
// from the applier's pool: a busy applier must not make the node look
// unreachable. It connects at its first use.
func newProbePool(ctx context.Context, dsn string) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = 1
	return pgxpool.NewWithConfig(ctx, cfg)
}

// openOnce is one attempt of open.
func (n *Node) openOnce(ctx context.Context) (*pgxpool.Pool, *apply.Applier, error) {
	if err := Preflight(ctx, n.cfg.Database, n.log); err != nil {
		return nil, nil, err
	}
	pool, err := apply.NewPool(ctx, n.cfg.Database)
	if err != nil {
		return nil, nil, fmt.Errorf("database: %w", redactedError{err})
	}
	applier := apply.NewApplier(pool, n.log.With().Str("component", "apply").Logger(), n.serverApplyOptions()...)
	if err := applier.Setup(ctx); err != nil {
		applier.Close()
		pool.Close()
		return nil, nil, fmt.Errorf("prepare schema prism: %w", err)
	}
	// Another region's direct-SQL fallback follows this region's
	// on_apply_error (see errorPolicy).
	if err := applier.RecordPolicy(ctx, regionPolicy(n.cfg)); err != nil {
		n.log.Warn().Err(redactedError{err}).Msg("cannot record on_apply_error in the database: another region's direct-SQL fallback follows its own node's instead")
	}
	// One apply session for each region that sends here.
	applier.OpenSessions(ctx, len(n.cfg.Peers))
	return pool, applier, nil
}

// readLoop holds the region's slot when it can: the slot's single active
// consumer is the lock between the nodes of a region. It returns when ctx
// is done or the slot can no longer be used.
//
// While it holds the slot the node runs one shipper per peer region (a
// term); a node that stands by runs none, so two nodes of a region never
// ship at the same time. Shippers run under shipCtx, which outlives ctx so
// a graceful stop can drain them.
func (n *Node) readLoop(ctx, shipCtx context.Context) error {
	backoff := n.cfg.Delivery.Backoff
	for ctx.Err() == nil {
		r := decode.NewReader(decode.ReaderConfig{
			DSN:         n.cfg.Database,
			Region:      n.cfg.Region,
			Slot:        n.cfg.Slot,
			Publication: n.cfg.Publication,
			Plugin:      n.cfg.OutputPlugin,
			AppName:     decode.AppName(n.cfg.Node),
			// In sync mode commits on the source wait for the position
			// this reader reports: report it promptly.
			StatusInterval: n.statusInterval(),
			// Large transactions spill to disk; prism's own tables are
			// per region.
			SpillBytes:  int(min(n.cfg.Spill.Above, config.Size(math.MaxInt32))),
			SpillDir:    n.cfg.Spill.Dir,
			SkipSchemas: []string{"prism"},
			Linger:      n.readerLinger(),
			Received:    n.delays.received,
		}, n.log.With().Str("component", "reader").Logger())
		n.mu.Lock()
		n.reader = r
		n.mu.Unlock()
		err := n.readFrom(ctx, shipCtx, r)
		if ctx.Err() != nil {
			// Keep the reader: the drain confirms the slot through it.
			return nil
		}
		r.Close()
		n.mu.Lock()
		n.reader = nil
		n.mu.Unlock()
		switch {
		case errors.Is(err, decode.ErrSlotBusy):
			n.setRole(RoleStandby, "")
			n.log.Debug().Msg("slot held by another node of the region; standing by")
			backoff = n.cfg.Delivery.Backoff
		case errors.Is(err, decode.ErrSlotLost):
			n.setRole(RoleStopped, err.Error())
			return err
		default:
			n.setRole(RoleStandby, err.Error())
			n.log.Warn().Err(err).Dur("retry_in", backoff).Msg("reader stopped; retrying")
			backoff = min(backoff*2, n.cfg.Delivery.MaxBackoff)
		}
		select {
		case <-ctx.Done():
		case <-time.After(standbyPoll(backoff)):
		}
	}
	return nil
}

func standbyPoll(backoff time.Duration) time.Duration {
	if backoff < time.Second {
		return time.Second
	}
	return backoff
}

// readFrom ships what r reads until r or ctx stops, under the term that
// starts once r holds the slot: each transaction goes to the spool, or
// to every region's shipper, in commit order.
func (n *Node) readFrom(ctx, shipCtx context.Context, r *decode.Reader) error {
	// A reader that stops for good (a lost slot) while a full window
	// blocks Send is not asked for the next transaction: the watcher
	// cancels the wait with the reader's error.
	sendCtx, stopSend := context.WithCancelCause(ctx)
	defer stopSend(nil)
	stopWatch := n.watchReader(shipCtx, r, stopSend)
	defer func() {
		stopWatch()
		if ctx.Err() == nil {
			// Lost the slot: stop shipping. Unacknowledged transactions
			// stay in the slot and reach the regions through whichever
			// node reads it next.
			n.endTerm()
		}
	}()
	for {
		txn, err := r.Next(ctx)
		if err != nil {
			return err
		}
		if err := n.ship(sendCtx, shipCtx, txn); err != nil {
			if cause := context.Cause(sendCtx); cause != nil && ctx.Err() == nil {
				return cause
			}
			return err
		}
	}
}

// watchReader starts the term as soon as r holds the slot, even before
// the first transaction, so status shows the paths of an idle region, and
// calls stopSend with r's error when r stops for good. It runs in a
// goroutine until the returned function, which waits for it, is called.
func (n *Node) watchReader(shipCtx context.Context, r *decode.Reader, stopSend context.CancelCauseFunc) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			changed := r.Changed()
			if r.Stats().Streaming {
				if _, err := n.ensureTerm(shipCtx); err != nil {
					stopSend(err)
				}
			}
			if err := r.Failed(); err != nil {
				stopSend(err)
			}
			select {
			case <-done:
				return
			case <-changed:
			}
		}
	}()
	return func() {
		close(done)
		wg.Wait()
	}
}

// ship hands one transaction read from the slot to the current term: to
// the spool, or to every region's shipper filtered to its scope. It
// blocks while a window is full, until sendCtx ends.
func (n *Node) ship(sendCtx, shipCtx context.Context, txn *decode.Txn) error {
	dropInternal(txn)
	t, err := n.ensureTerm(shipCtx)
	if err != nil {
		txn.Spill.Release()
		return err
	}
	if t.spool != nil {
		// The shippers read the spool at their own pace (feed). The
		// spool keeps its own copy of a spilled transaction.
		err := t.spool.Append(sendCtx, txn)
		txn.Spill.Release()
		if err != nil {
			return err
		}
	} else {
		t.keepSpill(txn)
		for i, s := range t.shippers {
			// Each region gets only its scope, filtered here before
			// anything is encoded for it.
			st, err := t.scoped(i, txn)
			if err != nil {
				return err
			}
			if err := s.Send(sendCtx, st); err != nil {
				return err
			}
		}
	}
	n.mu.Lock()
	n.lastSent = txn.EndLSN
	n.mu.Unlock()
	return nil
}

// term is one reader term: the shippers a node runs while it holds the
// slot.
type term struct {
	shippers []*peers.Shipper
	regions  []string
	// spool is open while the term runs (nil without spool.dir): only the
	// node that holds the slot writes it, so a spool directory shared by
	// the nodes of a region passes to the next reader with the slot.
	spool  *spool.Spool
	scopes []*scope.Scope // by peer index, see Node.scopes
	cancel context.CancelFunc
	wg     sync.WaitGroup
	log    zerolog.Logger

	spillMu sync.Mutex
	spilled []*decode.Txn // spilled transactions handed to the shippers, in order
}

// keepSpill holds a spilled transaction's file until every region
// acknowledged it (releaseAcked) or the term ends.
func (t *term) keepSpill(txn *decode.Txn) {
	if txn.Spill == nil {
		return
	}
	if len(t.shippers) == 0 {
		txn.Spill.Release()
		return
	}
	t.spillMu.Lock()
	t.spilled = append(t.spilled, txn)
	t.spillMu.Unlock()
}

// releaseAcked releases the spill files of transactions every region
// acknowledged; with all is set, every one (the shippers have stopped).
func (t *term) releaseAcked(all bool) {
	acked := peers.MinAcked(t.shippers...)
	t.spillMu.Lock()
	defer t.spillMu.Unlock()
	n := 0
	for n < len(t.spilled) && (all || t.spilled[n].EndLSN <= acked) {
		t.spilled[n].Spill.Release()
		t.spilled[n] = nil
		n++
	}
	t.spilled = t.spilled[n:]
}

func (t *term) stop() {
	t.cancel()
	t.wg.Wait()
	t.releaseAcked(true)
	if t.spool != nil {
		t.saveCursors()
		if err := t.spool.Close(); err != nil {
			t.log.Warn().Err(err).Msg("close spool")
		}
	}
}

// saveCursors persists each region's acknowledged position in the spool,
// which deletes the segments every region has.
func (t *term) saveCursors() {
	if t.spool == nil {
		return
	}
	for i, s := range t.shippers {
		if err := t.spool.SetCursor(t.regions[i], s.Acked()); err != nil {
			t.log.Warn().Err(err).Msg("save spool cursor")
		}
	}
}

// ensureTerm returns the current term, starting one when none runs.
func (n *Node) ensureTerm(ctx context.Context) (*term, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.term != nil {
		return n.term, nil
	}
	t := &term{log: n.log, scopes: n.scopes}
	for _, p := range n.cfg.Peers {
		t.regions = append(t.regions, p.Region)
	}
	if n.cfg.Spool.Dir != "" {
		sp, err := spool.Open(n.cfg.Spool.Dir, int64(n.cfg.Spool.MaxBytes), t.regions, n.log.With().Str("component", "spool").Logger())
		if err != nil {
			return nil, fmt.Errorf("spool (key spool.dir in %s): %w", n.cfg.Path, err)
		}
		t.spool = sp
	}
	tctx, cancel := context.WithCancel(ctx)
	t.cancel = cancel
	for _, p := range n.cfg.Peers {
		nodes := make([]peers.NodeAddr, 0, len(p.Nodes))
		for _, pn := range p.Nodes {
			nodes = append(nodes, peers.NodeAddr{Name: pn.Name, Addr: pn.Addr})
		}
		t.shippers = append(t.shippers, peers.NewShipper(n.shipperConfig(p.Region, nodes), n.fallback(p), n.log.With().Str("component", "shipper").Logger()))
	}
	for i, s := range t.shippers {
		t.wg.Add(1)
		go func(s *peers.Shipper) {
			defer t.wg.Done()
			if err := s.Run(tctx); err != nil && tctx.Err() == nil {
				n.log.Error().Err(err).Msg("shipper stopped")
			}
		}(s)
		if t.spool != nil {
			t.wg.Add(1)
			go func(i int, s *peers.Shipper) {
				defer t.wg.Done()
				n.feed(tctx, t, i, s)
			}(i, s)
		}
	}
	n.term = t
	n.role = RoleReader
	n.readerErr = ""
	n.log.Info().Str("slot", n.cfg.Slot).Int("peer_regions", len(t.shippers)).Msg("holding the region's slot: shipping local writes")
	return t, nil
}

// shipperConfig returns the configuration of the shipper to region
// target: the delivery settings as resolved when the configuration was
// loaded, and the protocol's other settings as peers derives them.
func (n *Node) shipperConfig(target string, nodes []peers.NodeAddr) peers.ShipperConfig {
	d := n.cfg.Delivery
	sc := peers.NewShipperConfig(d.AckTimeout)
	sc.Retries, sc.Backoff, sc.MaxBackoff, sc.MaxInFlight = d.Retries, d.Backoff, d.MaxBackoff, int64(d.MaxInFlight)
	sc.SourceRegion, sc.SourceNode, sc.TargetRegion, sc.Nodes = n.cfg.Region, n.cfg.Node, target, nodes
	sc.Token, sc.TLS, sc.Insecure = n.cfg.Auth.Token, n.clientTLS, n.plaintext()
	sc.Errors = newFallbackPolicy(n.cfg, n.log, target)
	sc.Undo = newErrorPolicy(n.cfg, n.log).undoFunc(n.applier)
	sc.OnAck = n.signalAcked
	if n.cfg.Sync.Mode != config.SyncOff {
		// Commits wait for the regions: no linger, and every ACK as
		// soon as it is durable.
		sc.Linger, sc.GatherAcks = 0, false
	}
	if sc.MaxInFlight < peers.MinGatherWindow {
		sc.GatherAcks = false // a small window would wait for them
	}
	return sc
}

// feed hands peer region i's shipper the spooled transactions above the
// region's cursor, in order, each filtered to the region's scope; Send
// blocks while the shipper's window is full, so a slow region only slows
// its own feed.
//
// The spool holds the source's own transactions unfiltered, like the
// source's WAL: it never leaves the source node, and one copy serves every
// region. What it hands out is filtered here, before the shipper encodes
// anything, so a region never receives data outside its scope from it.
func (n *Node) feed(ctx context.Context, t *term, i int, s *peers.Shipper) {
	sp, region := t.spool, t.regions[i]
	r := sp.NewReader(sp.Cursor(region))
	defer r.Close()
	for {
		txn, err := r.Next(ctx)
		if err != nil {
			if ctx.Err() == nil {
				n.log.Error().Err(err).Str("target", region).Msg("reading the spool failed: shipping to this region stops; the spool needs repair")
			}
			return
		}
		st, err := t.scoped(i, txn)
		if err != nil {
			n.log.Error().Err(err).Str("target", region).Msg("filtering a spooled transaction for the region's scope failed: shipping to this region stops; fix the scope or the table and restart")
			return
		}
		if err := s.Send(ctx, st); err != nil {
			return
		}
	}
}

// endTerm stops the current term's shippers.
func (n *Node) endTerm() {
	n.mu.Lock()
	t := n.term
	n.term = nil
	n.mu.Unlock()
	if t != nil {
		t.stop()
		n.log.Info().Msg("no longer reading the slot: shippers stopped")
	}
}

// dropInternal removes changes to prism-cdc's own tables (schema prism)
// from a transaction: conflict logs and dead letters are per region. The
// transaction itself is still shipped, so every region's progress passes
// its LSN.
func dropInternal(txn *decode.Txn) {
	kept := txn.Changes[:0]
	for _, c := range txn.Changes {
		if c.Rel != nil && c.Rel.Schema == "prism" {
			continue
		}
		kept = append(kept, c)
	}
	clear(txn.Changes[len(kept):])
	txn.Changes = kept
}

// currentRole derives the role from the reader's state.
func (n *Node) currentRole() (Role, string) {
	n.mu.Lock()
	role, reason, r := n.role, n.readerErr, n.reader
	n.mu.Unlock()
	if role == RoleStopped {
		return role, reason
	}
	if r != nil && r.Stats().Streaming {
		return RoleReader, ""
	}
	return role, reason
}

func (n *Node) setRole(r Role, reason string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.role = r
	n.readerErr = reason
}

// checkpoint is the position every region has made durable: the minimum
// acknowledged LSN over all peer regions (DESIGN invariant 2).
//
// With a spool, what is spooled durably no longer needs the slot, so the
// checkpoint is the spool's durable position - except in sync mode, where
// commits wait for the regions: "all" reports the minimum acknowledged LSN,
// "quorum:N" the N-th highest (both capped by the spool).
func (n *Node) checkpoint() pglogrepl.LSN {
	n.mu.Lock()
	t := n.term
	last := n.lastSent
	n.mu.Unlock()
	if t == nil {
		return 0
	}
	var durable pglogrepl.LSN
	if t.spool != nil {
		durable = t.spool.Durable()
	}
	if len(t.shippers) == 0 {
		if t.spool != nil {
			return durable
		}
		return last
	}
	acked := peers.MinAcked(t.shippers...)
	if n.cfg.Sync.Mode == config.SyncQuorum {
		acked = nthHighest(t.shippers, n.cfg.Sync.Quorum)
	}
	if t.spool == nil {
		return acked
	}
	if n.cfg.Sync.Mode == config.SyncOff {
		return durable
	}
	return min(acked, durable)
}

// nthHighest is the n-th highest acknowledged LSN over the shippers.
func nthHighest(shippers []*peers.Shipper, n int) pglogrepl.LSN {
	acks := make([]pglogrepl.LSN, len(shippers))
	for i, s := range shippers {
		acks[i] = s.Acked()
	}
	slices.Sort(acks)
	if n < 1 || n > len(acks) {
		return acks[0]
	}
	return acks[len(acks)-n]
}

// statusInterval is how often the reader reports its position; in sync
// mode commits wait for it.
func (n *Node) statusInterval() time.Duration {
	if n.cfg.Sync.Mode != config.SyncOff {
		return 10 * time.Millisecond
	}
	return time.Second
}

// readerLinger is how long the reader lets messages gather (see
// decode.ReaderConfig.Linger); in sync mode commits wait for them, and it
// reads each at once.
func (n *Node) readerLinger() time.Duration {
	if n.cfg.Sync.Mode != config.SyncOff {
		return -1
	}
	return decode.DefaultLinger
}

func (n *Node) checkpointLoop(ctx context.Context) {
	every := 200 * time.Millisecond
	if n.cfg.Sync.Mode != config.SyncOff {
		every = 5 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	// The slot's WAL retention is watched alongside; stopped with ctx.
	watched := make(chan struct{})
	go func() { defer close(watched); n.watchSlot(ctx) }()
	defer func() { <-watched }()
	lastCursor := time.Now()
	for {
		select {
		case <-ctx.Done():
			n.saveCursors()
			return
		case <-n.acked:
			// Without a spool the checkpoint moves only with the acks:
			// confirm it now, the reader reports it at once.
			n.confirm()
		case <-t.C:
			n.confirm()
			n.alive.Store(time.Now().UnixNano())
			n.mu.Lock()
			if n.term != nil {
				n.term.releaseAcked(false)
			}
			n.mu.Unlock()
			if time.Since(lastCursor) >= 500*time.Millisecond {
				n.saveCursors()
				lastCursor = time.Now()
			}
		}
	}
}

// signalAcked tells the checkpoint loop that an acknowledged position
// advanced; it never blocks.
func (n *Node) signalAcked() {
	select {
	case n.acked <- struct{}{}:
	default:
	}
}

// saveCursors persists the current term's acknowledged positions.
func (n *Node) saveCursors() {
	n.mu.Lock()
	t := n.term
	n.mu.Unlock()
	if t != nil {
		t.saveCursors()
	}
}

func (n *Node) confirm() {
	lsn := n.checkpoint()
	n.mu.Lock()
	r := n.reader
	if lsn > n.confirmed {
		n.confirmed = lsn
	}
	n.mu.Unlock()
	if r != nil && lsn > 0 {
		r.Confirm(lsn)
	}
}

func (n *Node) confirmedLSN() pglogrepl.LSN {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.confirmed
}

// drain waits until every shipper has acknowledged everything sent, or the
// timeout, then confirms the final checkpoint.
func (n *Node) drain(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	n.mu.Lock()
	last := n.lastSent
	n.mu.Unlock()
	for time.Now().Before(deadline) && n.checkpoint() < last {
		time.Sleep(50 * time.Millisecond)
	}
	n.confirm()
	n.saveCursors()
	n.mu.Lock()
	holding := n.reader != nil
	n.mu.Unlock()
	if holding {
		// The reader reports the confirmed position at its next status
		// update (every second).
		time.Sleep(1200 * time.Millisecond)
	}
	if cp := n.checkpoint(); cp < last {
		n.log.Warn().Stringer("sent", last).Stringer("acked_by_all", cp).
			Msg("stopped before every region acknowledged; the slot keeps the rest and it is resent at the next start")
	}
}
