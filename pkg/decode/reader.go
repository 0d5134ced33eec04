package decode

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/rs/zerolog"
)

// ErrSlotLost means the replication slot can no longer deliver every change:
// Postgres invalidated it (wal_status 'lost'), or it disappeared after this
// Reader had used it. It is not retryable: a new slot would silently skip
// the changes in between, so an operator must resynchronise the regions.
var ErrSlotLost = errors.New("replication slot lost")

// ErrPublicationMissing means the slot exists but its publication does not
// (it was dropped after the slot was created). Decoding cannot continue;
// it is not retryable.
var ErrPublicationMissing = errors.New("publication missing for an existing slot")

// ErrSlotBusy means another session (normally another node of the region)
// is reading the slot. It is retryable: the slot's single active consumer is
// the region's reader lock, and Next tries again when called again.
var ErrSlotBusy = errors.New("replication slot is active in another session")

// ErrClosed is returned by Next after Close.
var ErrClosed = errors.New("reader closed")

// ReaderConfig tells a Reader where to read.
type ReaderConfig struct {
	// DSN is a normal connection string for the region's database; the
	// Reader adds replication=database for its streaming connection.
	DSN    string
	Region string
	// Slot is the logical replication slot; default "prism_<region>".
	Slot string
	// Publication is created when missing; default "prism".
	Publication string
	// Plugin is the output plugin the Reader creates the slot with:
	// PluginAuto (default), PluginPgoutput or PluginPrism. An existing
	// slot is read with the plugin it was created with.
	Plugin string
	// Tables are the published tables ("schema.table" or "table") when the
	// Reader creates the publication; empty means FOR ALL TABLES.
	Tables []string
	// AppName is the streaming connection's application_name, the name
	// synchronous_standby_names refers to; default "prism_<region>".
	AppName string
	// StatusInterval is how often standby status updates are sent, also
	// while the consumer is not calling Next; default 1s. Keep it well
	// below the server's wal_sender_timeout.
	StatusInterval time.Duration
	// MaxStall is how long the stream may stay unread while the consumer
	// is behind (not calling Next) before the Reader closes the
	// replication connection; it reconnects once the consumer takes a
	// transaction again, and the server resends what was not handed out.
	// A walsender blocked writing to a client that does not read cannot
	// be ended by the server, which then cannot invalidate the slot and
	// holds up checkpoints. Default 30s.
	MaxStall time.Duration
	// SpillBytes is the size of a transaction's changes (estimated like
	// Txn.Size) above which they are written to a spill file instead of
	// held in memory; default DefaultSpillBytes, negative never spills.
	SpillBytes int
	// SpillDir holds the spill files (unlinked at once: nothing is left
	// behind); default prism-spill in the system's temporary directory.
	SpillDir string
	// SkipSchemas are schemas whose changes are dropped while decoding
	// (the transactions still pass).
	SkipSchemas []string
	// Linger is how long a read of the running stream waits after one
	// that found no more data, so that the messages arriving meanwhile
	// are read in one call instead of one call and one wake-up each (see
	// lingerConn). It delays a transaction by at most that much, rounded
	// up to the Go runtime's timer resolution: a sleep under a
	// millisecond in an otherwise idle process ends after about one
	// (1.07 ms measured for 20-500 us). Default DefaultLinger, negative
	// never waits.
	Linger time.Duration
	// Received, when set, is called from the stream's goroutine for every
	// local transaction the stream completes (resent ones included), with
	// the time the walsender sent the message that completed it (its
	// send time, by the server's clock) and the time it arrived (by this
	// host's). It must not block.
	Received func(txn *Txn, sent, arrived time.Time)
}

// Output plugins a slot can be created with (ReaderConfig.Plugin).
const (
	// PluginAuto is PluginPrism where the server needs it (before
	// PostgreSQL 16) and can load it, PluginPgoutput otherwise.
	PluginAuto = "auto"
	// PluginPgoutput is PostgreSQL's pgoutput. From PostgreSQL 16 on the
	// Reader asks it for origin 'none' (see pluginArgs); before 16 it
	// sends the transactions applied here, and the Assembler drops them.
	PluginPgoutput = "pgoutput"
	// PluginPrism is contrib/prism_pgoutput, pgoutput with the server
	// skipping the changes of applied transactions while decoding on any
	// version. It has to be built and installed into the server.
	PluginPrism = "prism_pgoutput"
)

// ValidPlugin reports whether p is a ReaderConfig.Plugin ("" is
// PluginAuto).
func ValidPlugin(p string) bool {
	switch p {
	case "", PluginAuto, PluginPgoutput, PluginPrism:
		return true
	}
	return false
}

// slotPlugins are the plugins to try, in order, when creating a slot
// under setting plugin on a server of major version major.
func slotPlugins(plugin string, major int) []string {
	switch {
	case plugin == PluginPgoutput, plugin == PluginPrism:
		return []string{plugin}
	case major >= 16:
		return []string{PluginPgoutput}
	default:
		return []string{PluginPrism, PluginPgoutput}
	}
}

// DefaultLinger is the default ReaderConfig.Linger.
const DefaultLinger = 500 * time.Microsecond

// DefaultSpillBytes is the default ReaderConfig.SpillBytes.
const DefaultSpillBytes = 32 << 20

// ReaderStats are counters for status pages and metrics.
type ReaderStats struct {
	Received   uint64        // local transactions decoded (resent ones included)
	Filtered   uint64        // transactions dropped because they carried a replication origin
	LastEndLSN pglogrepl.LSN // end of the last transaction queued for Next
	Confirmed  pglogrepl.LSN // position last reported to the server as flushed
	Reconnects uint64        // streams lost after they were established
	// Streaming reports that the reader holds the slot and streams from
	// it right now.
	Streaming bool
}

// Reader streams one region's committed local transactions from its
// logical replication slot. Next returns them in commit order; Confirm
// tells it how far the slot may advance.
//
// A Reader owns one goroutine, started by the first Next and stopped by
// Close, which alone uses the replication connection. It reads, assembles
// and queues transactions in a small buffer, and keeps sending standby
// status updates while the consumer does not take them.
type Reader struct {
	cfg ReaderConfig
	log zerolog.Logger

	out chan *Txn

	mu        sync.Mutex
	closed    bool
	cancel    context.CancelFunc
	done      chan struct{} // closed when the current loop exits; nil when none runs
	loopErr   error
	confirmed pglogrepl.LSN // from Confirm
	stats     ReaderStats
	// wake is the replication connection while the loop reads from the
	// server with the read deadline it set: Confirm moves the deadline
	// to now and clears wake, so that a new confirmed position is
	// reported at once and the loop sets its deadline again.
	wake net.Conn
	// poked is signalled by Confirm for a loop that waits for the
	// consumer instead of the server.
	poked chan struct{}
	// changed is closed when Stats().Streaming or Failed() changes; nil
	// until Changed hands one out.
	changed chan struct{}

	// Owned by the loop goroutine.
	lastQueued pglogrepl.LSN // EndLSN of the last Txn put into out: never queue one at or below it
	idle       pglogrepl.LSN // highest keepalive position confirmed while nothing was in flight
	streamed   bool          // a session reached START_REPLICATION once
	slotPlugin string        // the slot's output plugin, as prepare found it ("" when it did not exist)
}

// NewReader returns a Reader; it connects on the first Next.
func NewReader(cfg ReaderConfig, log zerolog.Logger) *Reader {
	if cfg.Slot == "" {
		cfg.Slot = SlotName(cfg.Region)
	}
	if cfg.Publication == "" {
		cfg.Publication = "prism"
	}
	if cfg.AppName == "" {
		cfg.AppName = AppName(cfg.Region)
	}
	if cfg.StatusInterval <= 0 {
		cfg.StatusInterval = time.Second
	}
	if cfg.MaxStall <= 0 {
		cfg.MaxStall = 30 * time.Second
	}
	if cfg.SpillBytes == 0 {
		cfg.SpillBytes = DefaultSpillBytes
	}
	if cfg.SpillDir == "" {
		cfg.SpillDir = filepath.Join(os.TempDir(), "prism-spill")
	}
	if cfg.Linger == 0 {
		cfg.Linger = DefaultLinger
	}
	return &Reader{
		cfg:   cfg,
		log:   log.With().Str("pkg", "decode").Str("slot", cfg.Slot).Logger(),
		out:   make(chan *Txn, 4),
		poked: make(chan struct{}, 1),
	}
}

// Next returns the next committed local transaction, in commit order. A
// transaction whose EndLSN is at or below one already returned is never
// returned again, even when the server resends it after a reconnect.
// Errors wrapping ErrSlotLost or ErrPublicationMissing are permanent;
// ErrSlotBusy is returned when another session holds the slot, and the
// next call tries again.
func (r *Reader) Next(ctx context.Context) (*Txn, error) {
	done, err := r.ensureRunning()
	if err != nil {
		return nil, err
	}
	select {
	case txn := <-r.out:
		return txn, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-done:
		select {
		case txn := <-r.out:
			return txn, nil
		default:
		}
		return nil, r.takeErr()
	}
}

func (r *Reader) ensureRunning() (chan struct{}, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	if r.done != nil {
		return r.done, nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	r.cancel, r.done, r.loopErr = cancel, done, nil
	go func() {
		defer close(done)
		err := r.run(ctx)
		r.mu.Lock()
		r.loopErr = err
		r.signalLocked()
		r.mu.Unlock()
	}()
	return done, nil
}

// takeErr returns the error the loop stopped with. A busy slot lets the
// next Next start over; other errors stick.
func (r *Reader) takeErr() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	err := r.loopErr
	if r.closed {
		return ErrClosed
	}
	if errors.Is(err, ErrSlotBusy) {
		r.done = nil
	}
	return err
}

// Confirm declares every transaction up to lsn durable in every region. The
// Reader reports it to the server as the write, flush and apply position
// right away (a position above the one last reported wakes the stream's
// loop, which sends a status update). It is safe to call from any
// goroutine; a lower lsn than before is ignored.
func (r *Reader) Confirm(lsn pglogrepl.LSN) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if lsn <= r.confirmed {
		return
	}
	r.confirmed = lsn
	if lsn <= r.stats.Confirmed {
		return
	}
	if r.wake != nil {
		r.wake.SetReadDeadline(time.Now())
		r.wake = nil
	}
	select {
	case r.poked <- struct{}{}:
	default:
	}
}

// reportDue reports whether the confirmed position (from Confirm or an
// idle advance) is above the one last sent to the server.
func (r *Reader) reportDue() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return max(r.confirmed, r.idle) > r.stats.Confirmed
}

// Failed returns the error the Reader stopped with for good (it wraps
// ErrSlotLost, ErrPublicationMissing or another permanent cause), or nil
// while it runs or can still run. A consumer blocked elsewhere (e.g. on a
// full window) checks it when Changed fires, since it is not calling Next
// to learn of it.
func (r *Reader) Failed() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var perm *permanentError
	if errors.As(r.loopErr, &perm) {
		return r.loopErr
	}
	return nil
}

// Stats returns a snapshot of the Reader's counters.
func (r *Reader) Stats() ReaderStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stats
}

// Close stops the Reader's goroutine, closes its connection and waits for
// both. Transactions not yet returned by Next are dropped (their spill
// files released); the slot resends them to the next reader.
func (r *Reader) Close() error {
	r.mu.Lock()
	r.closed = true
	cancel, done := r.cancel, r.done
	r.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	if done != nil {
		<-done
	}
	for {
		select {
		case txn := <-r.out:
			txn.Spill.Release()
		default:
			return nil
		}
	}
}

// errStalled ends a session whose consumer stayed behind for MaxStall.
var errStalled = errors.New("consumer behind: stream left unread too long")

// waitForRoom waits until the consumer has taken a transaction from the
// buffer. Meanwhile it checks the slot every few seconds, so a slot the
// server invalidates while the stream is released still stops the Reader
// (with the permanent error). It returns ErrClosed when ctx ends.
func (r *Reader) waitForRoom(ctx context.Context) error {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	check := time.Now().Add(slotCheckEvery)
	for len(r.out) == cap(r.out) {
		select {
		case <-ctx.Done():
			return ErrClosed
		case <-t.C:
		}
		if time.Now().After(check) {
			check = time.Now().Add(slotCheckEvery)
			if _, _, err := r.prepare(ctx); err != nil {
				var perm *permanentError
				if errors.As(err, &perm) {
					return err
				}
			}
		}
	}
	return nil
}

// slotCheckEvery is how often a released stream's slot is checked.
const slotCheckEvery = 5 * time.Second

// permanentError marks an error that reconnecting cannot fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

func permanent(err error) error { return &permanentError{err} }

// run connects, streams and reconnects with exponential backoff until ctx
// ends or an error that reconnecting cannot fix.
func (r *Reader) run(ctx context.Context) error {
	const minBackoff, maxBackoff = 100 * time.Millisecond, 10 * time.Second
	backoff := minBackoff
	for {
		progressed, err := r.session(ctx)
		if ctx.Err() != nil {
			return ErrClosed
		}
		var perm *permanentError
		if errors.As(err, &perm) {
			r.log.Error().Err(err).Msg("reader stopped")
			return err
		}
		// Another node holds the slot (a stale connection of this node is
		// ended in prepare, not reported as busy): stop, so the node ends
		// its term and stops shipping what it read before; otherwise two
		// nodes of one region would ship the same transactions.
		if errors.Is(err, ErrSlotBusy) {
			return err
		}
		if errors.Is(err, errStalled) {
			r.log.Info().Dur("stalled", r.cfg.MaxStall).Msg("consumer behind: replication connection released until it takes a transaction")
			if err := r.waitForRoom(ctx); err != nil {
				r.log.Error().Err(err).Msg("reader stopped")
				return err
			}
			backoff = minBackoff
			continue
		}
		// One warning per lost stream; the attempts that follow until it
		// is back are logged at debug.
		if progressed {
			backoff = minBackoff
			r.mu.Lock()
			r.stats.Reconnects++
			r.mu.Unlock()
			r.log.Warn().Err(err).Msg("replication stream lost; reconnecting")
		} else {
			r.log.Debug().Err(err).Dur("backoff", backoff).Msg("reconnect failed")
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return ErrClosed
		case <-t.C:
		}
		backoff = min(backoff*2, maxBackoff)
	}
}

var slotNameRE = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

// slotState is what pg_replication_slots and pg_publication say.
type slotState struct {
	database       string // current database
	pubExists      bool
	slotExists     bool
	slotType       string
	plugin         string
	slotDatabase   string
	walStatus      string
	activePID      int    // 0 when inactive
	activeApp      string // application_name of the active walsender
	confirmedFlush string
}

// slotAction is what a session does about the slot before streaming.
type slotAction int

const (
	slotUse slotAction = iota
	slotCreate
)

// checkSlot decides from the catalog state whether the slot can be used,
// must be created, or must not be touched. usedBefore reports that this
// Reader already streamed from the slot.
func checkSlot(slot, pub string, s slotState, usedBefore bool) (slotAction, error) {
	if !s.slotExists {
		if usedBefore {
			return 0, permanent(fmt.Errorf("slot %s disappeared after it was used: %w", slot, ErrSlotLost))
		}
		return slotCreate, nil
	}
	if s.slotType != "logical" || (s.plugin != PluginPgoutput && s.plugin != PluginPrism) || s.slotDatabase != s.database {
		return 0, permanent(fmt.Errorf("slot %s is a %s slot with plugin %q in database %q, want a logical pgoutput or prism_pgoutput slot in %q; drop it or choose another slot name",
			slot, s.slotType, s.plugin, s.slotDatabase, s.database))
	}
	if s.walStatus == "lost" {
		return 0, permanent(fmt.Errorf("slot %s was invalidated by the server (wal_status lost): WAL it needed is gone, so regions must be resynchronised before replication can restart with a new slot: %w", slot, ErrSlotLost))
	}
	if !s.pubExists {
		return 0, permanent(fmt.Errorf("publication %s does not exist but slot %s does (confirmed up to %s): the publication was dropped after the slot was used; %w", pub, slot, s.confirmedFlush, ErrPublicationMissing))
	}
	if s.activePID != 0 {
		return 0, fmt.Errorf("slot %s is read by backend pid %d: %w", slot, s.activePID, ErrSlotBusy)
	}
	return slotUse, nil
}

// prepare checks the slot and creates the publication when needed, over a
// normal connection. It returns the slot's confirmed_flush_lsn (0/0 when
// the slot does not exist yet).
func (r *Reader) prepare(ctx context.Context) (slotAction, pglogrepl.LSN, error) {
	conn, err := Connect(ctx, r.cfg.DSN)
	if err != nil {
		return 0, 0, fmt.Errorf("connect %s: %w", r.cfg.Region, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	s, err := r.readSlotState(ctx, conn)
	if err != nil {
		return 0, 0, err
	}
	if s.activePID != 0 && r.cfg.AppName != "" && s.activeApp == r.cfg.AppName {
		// This Reader's own previous walsender, whose connection was lost
		// but which the server has not noticed yet: end it and retry.
		_, err := conn.Exec(ctx, "SELECT pg_terminate_backend($1, 5000)", s.activePID)
		return 0, 0, fmt.Errorf("slot %s is still held by this node's previous connection (backend pid %d); ended it (%v)", r.cfg.Slot, s.activePID, err)
	}
	action, err := checkSlot(r.cfg.Slot, r.cfg.Publication, s, r.streamed)
	if err != nil {
		return 0, 0, err
	}
	if action == slotCreate && !s.pubExists {
		if err := r.createPublication(ctx, conn); err != nil {
			return 0, 0, err
		}
	}
	confirmedLSN, _ := pglogrepl.ParseLSN(s.confirmedFlush) // 0/0 when the slot does not exist yet
	r.slotPlugin = s.plugin
	return action, confirmedLSN, nil
}

// readSlotState reads what the catalog says about the slot and the
// publication.
func (r *Reader) readSlotState(ctx context.Context, conn *pgx.Conn) (slotState, error) {
	var s slotState
	var slotType, plugin, slotDB, walStatus, confirmed *string
	var activePID *int32
	var activeApp *string
	err := conn.QueryRow(ctx, `SELECT current_database(),
			EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1),
			s.slot_name IS NOT NULL, s.slot_type, s.plugin, s.database::text, s.wal_status, s.active_pid, s.confirmed_flush_lsn::text,
			(SELECT a.application_name FROM pg_stat_activity a WHERE a.pid = s.active_pid)
		FROM (SELECT 1) x LEFT JOIN pg_replication_slots s ON s.slot_name = $2`,
		r.cfg.Publication, r.cfg.Slot).Scan(&s.database, &s.pubExists, &s.slotExists, &slotType, &plugin, &slotDB, &walStatus, &activePID, &confirmed, &activeApp)
	if err != nil {
		return slotState{}, fmt.Errorf("check slot %s: %w", r.cfg.Slot, err)
	}
	s.slotType, s.plugin, s.slotDatabase, s.walStatus, s.confirmedFlush = deref(slotType), deref(plugin), deref(slotDB), deref(walStatus), deref(confirmed)
	if activePID != nil {
		s.activePID = int(*activePID)
	}
	s.activeApp = deref(activeApp)
	return s, nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func (r *Reader) createPublication(ctx context.Context, conn *pgx.Conn) error {
	sql := "CREATE PUBLICATION " + pgx.Identifier{r.cfg.Publication}.Sanitize()
	if len(r.cfg.Tables) == 0 {
		sql += " FOR ALL TABLES"
	} else {
		names := make([]string, len(r.cfg.Tables))
		for i, t := range r.cfg.Tables {
			names[i] = pgx.Identifier(strings.Split(t, ".")).Sanitize()
		}
		sql += " FOR TABLE " + strings.Join(names, ", ")
	}
	if _, err := conn.Exec(ctx, sql); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42710" {
			return nil // created concurrently by another node
		}
		return fmt.Errorf("create publication %s: %w", r.cfg.Publication, err)
	}
	r.log.Info().Str("publication", r.cfg.Publication).Strs("tables", r.cfg.Tables).Msg("created publication")
	return nil
}

// classify turns server errors into the Reader's sentinels (see
// serverCause); the catalog state it may need is read over a new normal
// connection.
func (r *Reader) classify(ctx context.Context, err error) error {
	return serverCause(err, r.cfg.Slot, r.cfg.Publication, r.streamed, func() (slotState, error) {
		conn, err := Connect(ctx, r.cfg.DSN)
		if err != nil {
			return slotState{}, err
		}
		defer conn.Close(context.WithoutCancel(ctx))
		return r.readSlotState(ctx, conn)
	})
}

// serverCause classifies err, from a replication session on slot with
// publication pub, by its SQLSTATE and, where the SQLSTATE does not say
// which object is at fault, by the catalog state the server reports now
// (state), never by the message text:
//   - 55006 (object_in_use): another session reads the slot: ErrSlotBusy;
//   - 55000 (object_not_in_prerequisite_state, e.g. an invalidated slot)
//     and 42704 (undefined_object, e.g. a publication dropped while
//     streaming): whatever checkSlot finds wrong with the slot and the
//     publication (ErrSlotLost, ErrPublicationMissing, a slot of the
//     wrong kind), which is permanent, wrapping err;
//   - anything else, or nothing found wrong, or no state to be had: err
//     as it is (reconnecting may help).
//
// usedBefore reports that the Reader streamed from the slot before.
func serverCause(err error, slot, pub string, usedBefore bool, state func() (slotState, error)) error {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return err
	}
	switch pgErr.Code {
	case "55006":
		return fmt.Errorf("%w: %w", ErrSlotBusy, err)
	case "58P01":
		// undefined_file: the server cannot load the slot's output
		// plugin (a library removed after the slot was created with it).
		return permanent(fmt.Errorf("slot %s: the server cannot load the slot's output plugin; install contrib/prism_pgoutput into the server again (README), "+
			"or drop the slot so that the node creates it anew (changes since it was last read are then not shipped): %w", slot, err))
	case "55000", "42704":
		s, serr := state()
		if serr != nil {
			return err
		}
		_, cerr := checkSlot(slot, pub, s, usedBefore)
		var perm *permanentError
		if errors.As(cerr, &perm) {
			return permanent(fmt.Errorf("%w: %w", perm.err, err))
		}
	}
	return err
}

// session runs one replication connection until it fails. progressed
// reports that it reached streaming, so backoff can start over.
func (r *Reader) session(ctx context.Context) (progressed bool, err error) {
	if !slotNameRE.MatchString(r.cfg.Slot) {
		return false, permanent(fmt.Errorf("slot name %q: use 1-63 lower case letters, digits and underscores", r.cfg.Slot))
	}
	action, slotConfirmed, err := r.prepare(ctx)
	if err != nil {
		return false, r.classify(ctx, err)
	}
	pcfg, err := pgconn.ParseConfig(r.cfg.DSN)
	if err != nil {
		return false, permanent(fmt.Errorf("parse dsn: %w", err))
	}
	// pgoutput prints values in this session's text form.
	PinTextForm(pcfg)
	pcfg.RuntimeParams["replication"] = "database"
	pcfg.RuntimeParams["application_name"] = r.cfg.AppName
	pcfg.DialFunc = lingerDial(pcfg.DialFunc)
	conn, err := pgconn.ConnectConfig(ctx, pcfg)
	if err != nil {
		return false, fmt.Errorf("connect for replication: %w", err)
	}
	defer func() {
		closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		conn.Close(closeCtx)
	}()

	sys, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return false, fmt.Errorf("identify system: %w", err)
	}
	r.log.Debug().Str("system", sys.SystemID).Int32("timeline", sys.Timeline).Stringer("xlogpos", sys.XLogPos).Msg("connected")

	major := serverMajor(conn.ParameterStatus("server_version"))
	plugin := r.slotPlugin
	if action == slotCreate {
		if plugin, slotConfirmed, err = r.createSlot(ctx, conn, major); err != nil {
			return false, err
		}
	}

	// Start from our own durable position (0/0 the first time): the server
	// then starts at the slot's confirmed_flush_lsn, never skipping what the
	// slot has not confirmed. IDENTIFY_SYSTEM's position must not be used.
	start := r.Stats().Confirmed
	pubs := strings.ReplaceAll(pgx.Identifier{r.cfg.Publication}.Sanitize(), "'", "''")
	err = pglogrepl.StartReplication(ctx, conn, r.cfg.Slot, start, pglogrepl.StartReplicationOptions{
		Mode:       pglogrepl.LogicalReplication,
		PluginArgs: pluginArgs(pubs, major),
	})
	if err != nil {
		return false, r.classify(ctx, fmt.Errorf("start replication on %s: %w", r.cfg.Slot, err))
	}
	r.streamed = true
	if lc := lingerOf(conn.Conn()); lc != nil && r.cfg.Linger > 0 {
		lc.setLinger(r.cfg.Linger)
	}
	// The server resumes from the slot's confirmed_flush_lsn when start
	// is below it (start is 0/0 after a restart): log where it resumes.
	r.log.Info().Stringer("start", max(start, slotConfirmed)).Str("plugin", plugin).Msg("streaming")
	r.setStreaming(true)
	defer r.setStreaming(false)
	return true, r.stream(ctx, conn)
}

// createSlot creates the slot over replication connection conn to a
// server of major version major, with the first plugin of slotPlugins
// that the server can load. It returns the plugin and the slot's
// consistent point (0/0 when another node created it meanwhile, with the
// plugin unknown).
func (r *Reader) createSlot(ctx context.Context, conn *pgconn.PgConn, major int) (string, pglogrepl.LSN, error) {
	plugins := slotPlugins(r.cfg.Plugin, major)
	for i, plugin := range plugins {
		res, err := pglogrepl.CreateReplicationSlot(ctx, conn, r.cfg.Slot, plugin,
			pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.LogicalReplication, SnapshotAction: "NOEXPORT_SNAPSHOT"})
		var pgErr *pgconn.PgError
		switch {
		case errors.As(err, &pgErr) && pgErr.Code == "42710":
			// Created concurrently by another node: use it like any other.
			return "", 0, nil
		case errors.As(err, &pgErr) && pgErr.Code == "58P01" && i+1 < len(plugins):
			// undefined_file: the server cannot load the library. The
			// slot was not created (it is persisted only once its
			// decoding context is built), and the connection is usable.
			r.log.Warn().Str("plugin", plugin).Str("instead", plugins[i+1]).Str("error", pgErr.Message).
				Msgf("%s is not installed on this server: the region's walsender will decode every transaction applied here and send it to this node to be dropped; "+
					"install contrib/prism_pgoutput to skip them (README, \"Applied transactions on PostgreSQL 15\")", plugin)
			continue
		case errors.As(err, &pgErr) && pgErr.Code == "58P01":
			return "", 0, permanent(fmt.Errorf("create slot %s with output plugin %s: the server cannot load it; install contrib/prism_pgoutput into the server (README), or set output_plugin to auto or pgoutput: %w",
				r.cfg.Slot, plugin, err))
		case err != nil:
			return "", 0, fmt.Errorf("create slot %s: %w", r.cfg.Slot, err)
		}
		lsn, _ := pglogrepl.ParseLSN(res.ConsistentPoint)
		r.log.Info().Str("consistent_point", res.ConsistentPoint).Str("plugin", plugin).Msg("created replication slot")
		return plugin, lsn, nil
	}
	return "", 0, fmt.Errorf("create slot %s: no output plugin to try for setting %q", r.cfg.Slot, r.cfg.Plugin)
}

// pluginArgs are pgoutput's options for publications pubs (quoted) on
// a server of major version major. From PostgreSQL 16 on, origin 'none'
// has the server leave out the transactions that carry a replication
// origin (applied by prism-cdc, or by another replication): it skips
// their changes while decoding instead of sending them to be dropped
// here (the Assembler drops such a transaction at its Origin message
// either way). In a region that applies the others' streams, that
// spares the region's walsender and this reader every applied change.
func pluginArgs(pubs string, major int) []string {
	args := []string{"proto_version '1'", "publication_names '" + pubs + "'", "messages 'true'"}
	if major >= 16 {
		args = append(args, "origin 'none'")
	}
	return args
}

// serverMajor is the major version in a server_version parameter
// ("15.18 (Debian 15.18-0+deb12u1)", "16.4", "17beta1"); 0 if there is
// none.
func serverMajor(version string) int {
	n := 0
	for _, c := range version {
		if c < '0' || c > '9' {
			break
		}
		n = n*10 + int(c-'0')
	}
	return n
}

// stream reads the replication stream until an error. It is the only user
// of conn.
func (r *Reader) stream(ctx context.Context, conn *pgconn.PgConn) error {
	s := &streamState{
		conn:       conn,
		nc:         conn.Conn(),
		asm:        NewAssembler(r.cfg.Region, SpillOver(r.cfg.SpillDir, r.cfg.SpillBytes, 0), SkipSchemas(r.cfg.SkipSchemas...)),
		nextStatus: time.Now(),
		ticker:     time.NewTicker(r.cfg.StatusInterval),
	}
	defer s.asm.Close()
	defer func() {
		if s.pending != nil {
			s.pending.Spill.Release() // resent by the server after the reconnect
		}
	}()
	defer s.ticker.Stop()
	// Closing the Reader interrupts a wait for the server.
	stop := context.AfterFunc(ctx, func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		s.nc.SetReadDeadline(time.Now())
	})
	defer stop()
	defer func() {
		r.mu.Lock()
		r.wake = nil
		r.mu.Unlock()
	}()

	for {
		if !time.Now().Before(s.nextStatus) {
			if err := r.sendStatus(ctx, conn); err != nil {
				return err
			}
			s.nextStatus = time.Now().Add(r.cfg.StatusInterval)
		}
		if s.pending != nil {
			if err := r.offer(ctx, s); err != nil {
				return err
			}
			continue
		}
		msg, err := r.receive(ctx, s)
		if err != nil {
			return err
		}
		switch m := msg.(type) {
		case nil:
			// Nothing arrived: a status update is due.
		case *pgproto3.CopyData:
			if err := r.copyData(s, m.Data); err != nil {
				return err
			}
		case *pgproto3.ErrorResponse:
			return r.classify(ctx, pgconn.ErrorResponseToPgError(m))
		case *pgproto3.CopyDone:
			return errors.New("server ended the replication stream")
		default:
			// NoticeResponse, ParameterStatus: nothing to do.
		}
	}
}

// streamState is the state of one replication stream, owned by the
// goroutine running stream.
type streamState struct {
	conn         *pgconn.PgConn
	nc           net.Conn // conn's network connection, for read deadlines
	asm          *Assembler
	pending      *Txn // completed, waiting for room in r.out
	stalledSince time.Time
	nextStatus   time.Time // when the next standby status update is due
	ticker       *time.Ticker
	// armed is the read deadline receive last set; while r.wake is still
	// nc, nobody has moved it since, and it need not be set again for
	// every message.
	armed time.Time
}

// offer waits until the consumer takes the pending transaction. The
// consumer is behind: stop reading, but keep the server's
// wal_sender_timeout from cutting the stream.
func (r *Reader) offer(ctx context.Context, s *streamState) error {
	select {
	case r.out <- s.pending:
		r.queued(s.pending)
		s.pending = nil
	case <-s.ticker.C:
		s.nextStatus = time.Now()
		if time.Since(s.stalledSince) > r.cfg.MaxStall {
			return errStalled
		}
	case <-r.poked:
		if r.reportDue() {
			s.nextStatus = time.Now()
		}
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

// receive waits for the server until the next status update is due, or
// until Confirm brings a position to report, and returns the message
// that arrived; nil when a status update is due instead. The wait is a
// read deadline on the connection, not a context per message: a
// context's watcher and timer for each of the many small messages of a
// busy stream cost more CPU than decoding them.
func (r *Reader) receive(ctx context.Context, s *streamState) (pgproto3.BackendMessage, error) {
	r.mu.Lock()
	due := max(r.confirmed, r.idle) > r.stats.Confirmed
	var derr error
	if !due && (r.wake == nil || !s.armed.Equal(s.nextStatus)) {
		derr = s.nc.SetReadDeadline(s.nextStatus)
		s.armed = s.nextStatus
		r.wake = s.nc
	}
	r.mu.Unlock()
	if derr != nil {
		return nil, fmt.Errorf("receive: %w", derr)
	}
	if due {
		s.nextStatus = time.Now()
		return nil, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// r.wake stays set while the message is handled: a Confirm in between
	// moves the deadline to now and clears it, so the next pass sees the
	// position due, or sets the deadline again. stream clears it when it
	// ends.
	msg, err := s.conn.ReceiveMessage(context.Background())
	if err != nil {
		if ctx.Err() == nil && pgconn.Timeout(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("receive: %w", err)
	}
	return msg, nil
}

// copyData handles one CopyData message of the stream: a keepalive, or
// WAL data for the assembler.
func (r *Reader) copyData(s *streamState, data []byte) error {
	if len(data) == 0 {
		return errors.New("receive: empty CopyData")
	}
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return fmt.Errorf("keepalive: %w", err)
		}
		r.maybeIdleAdvance(s.asm, ka.ServerWALEnd)
		if ka.ReplyRequested {
			s.nextStatus = time.Now()
		}
		return nil
	case pglogrepl.XLogDataByteID:
		xld, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return fmt.Errorf("xlogdata: %w", err)
		}
		return r.walData(s, xld)
	default:
		return fmt.Errorf("receive: unknown CopyData message %q", data[0])
	}
}

// walData feeds WAL data to the assembler and makes a completed
// transaction pending.
func (r *Reader) walData(s *streamState, xld pglogrepl.XLogData) error {
	filtered := s.asm.Filtered()
	txn, err := s.asm.Feed(xld.WALStart, xld.WALData)
	if errors.Is(err, errSpillIO) {
		return err // a disk problem: retried with the resend
	}
	if err != nil {
		return permanent(err)
	}
	if s.asm.Filtered() != filtered {
		r.mu.Lock()
		r.stats.Filtered++
		r.mu.Unlock()
		r.log.Debug().Stringer("lsn", xld.WALStart).Msg("skipped a transaction with a replication origin")
	}
	if txn != nil {
		if r.cfg.Received != nil {
			r.cfg.Received(txn, xld.ServerTime, time.Now())
		}
		s.pending = r.admit(txn)
		if s.pending == nil {
			txn.Spill.Release()
		} else if s.pending.Spill != nil {
			r.log.Info().Stringer("end", txn.EndLSN).Int("changes", txn.Spill.Count()).
				Int64("bytes", txn.Spill.Bytes()).Msg("large transaction spilled to disk")
		}
		s.stalledSince = time.Now()
	}
	return nil
}

func (r *Reader) setStreaming(on bool) {
	r.mu.Lock()
	if r.stats.Streaming != on {
		r.stats.Streaming = on
		r.signalLocked()
	}
	r.mu.Unlock()
}

// Changed returns a channel that is closed the next time the Reader
// starts or stops streaming (Stats().Streaming) or stops for good
// (Failed()). A consumer reads the state, then waits on the channel it
// took before reading, so that it misses no change.
func (r *Reader) Changed() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.changed == nil {
		r.changed = make(chan struct{})
	}
	return r.changed
}

// signalLocked wakes the waiters on Changed; r.mu is held.
func (r *Reader) signalLocked() {
	if r.changed != nil {
		close(r.changed)
		r.changed = nil
	}
}

// admit counts a decoded transaction and returns it unless it is a resend
// of one already queued. It does not mark it queued: until it is in r.out
// (queued), a lost stream must let the server's resend through.
func (r *Reader) admit(txn *Txn) *Txn {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stats.Received++
	if txn.EndLSN <= r.lastQueued {
		r.log.Debug().Stringer("end", txn.EndLSN).Msg("skipped a resent transaction")
		return nil
	}
	return txn
}

// queued records that txn is in r.out, where the consumer will take it.
func (r *Reader) queued(txn *Txn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lastQueued = txn.EndLSN
	r.stats.LastEndLSN = txn.EndLSN
}

// maybeIdleAdvance lets the slot advance past WAL that holds nothing for
// us. In a logical walsender a keepalive carries the position decoding has
// already sent (sentPtr): every transaction that committed before it has
// been streamed to us completely, or skipped by the server (other
// databases, unpublished tables, origin-filtered work). So when nothing is
// in flight - no transaction partly received, none queued for Next, and
// every one handed out already confirmed by the caller - confirming that
// position loses nothing and keeps an idle publication from pinning WAL.
func (r *Reader) maybeIdleAdvance(asm *Assembler, walEnd pglogrepl.LSN) {
	if asm.inFlight() || len(r.out) > 0 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.lastQueued <= r.confirmed && walEnd > r.idle {
		r.idle = walEnd
	}
}

// sendStatus reports the confirmed position as written, flushed and
// applied. All three are set explicitly: pglogrepl fills zero ones with
// the write position.
func (r *Reader) sendStatus(ctx context.Context, conn *pgconn.PgConn) error {
	r.mu.Lock()
	pos := max(r.confirmed, r.idle, r.stats.Confirmed)
	r.stats.Confirmed = pos
	r.mu.Unlock()
	err := pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: pos,
		WALFlushPosition: pos,
		WALApplyPosition: pos,
		ClientTime:       time.Now(),
	})
	if err != nil {
		return fmt.Errorf("send standby status: %w", err)
	}
	return nil
}
