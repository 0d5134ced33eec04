package apply

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Policy says how a conflict on a table is resolved.
type Policy string

// The conflict policies.
const (
	// LastWriteWins keeps the version with the later source commit time;
	// exact ties go to the lexically greater region name. Convergent.
	LastWriteWins Policy = "last_write_wins"
	// SourceWins always applies the incoming change. Not convergent when
	// two regions write the same row concurrently.
	SourceWins Policy = "source_wins"
	// KeepLocal keeps a local version written at or after the incoming
	// change. Not convergent when two regions write the same row
	// concurrently.
	KeepLocal Policy = "keep_local"
	// ErrorOnConflict fails the transaction with a permanent error.
	ErrorOnConflict Policy = "error"
)

func (p Policy) valid() bool {
	switch p {
	case LastWriteWins, SourceWins, KeepLocal, ErrorOnConflict:
		return true
	}
	return false
}

// Option tunes an Applier.
type Option func(*Applier)

// WithConflicts sets the default conflict policy and per-table overrides
// keyed by "schema.table". Unknown policies fall back to LastWriteWins.
func WithConflicts(def Policy, perTable map[string]Policy) Option {
	return func(a *Applier) {
		if def.valid() {
			a.defPolicy = def
		}
		a.tables = make(map[string]Policy, len(perTable))
		for k, v := range perTable {
			if v.valid() {
				a.tables[k] = v
			}
		}
	}
}

// WithLocalRegion names the target region. It breaks exact commit-time
// ties and names the local origin in prism.conflicts.
func WithLocalRegion(name string) Option {
	return func(a *Applier) { a.local = name }
}

// WithApplicationName sets the application_name prefix of apply sessions;
// the default is "prism_apply", and sessions are named
// "<prefix>_<source region>".
func WithApplicationName(name string) Option {
	return func(a *Applier) {
		if name != "" {
			a.appName = name
		}
	}
}

// Applier applies source transactions to one target database exactly once.
// It is safe for concurrent use; concurrent applies of the same source
// region serialise on the replication origin (one gets ErrBusy).
type Applier struct {
	pool      *pgxpool.Pool
	log       zerolog.Logger
	defPolicy Policy
	tables    map[string]Policy
	local     string
	appName   string
	ddl       bool // WithDDL

	mu      sync.Mutex
	setup   bool
	targets map[string]*target    // by schema.table
	stmts   map[string]*statement // by shapeKey
	shapes  map[string]*reshaping // by shapeOf; see reshape
	// idle are sessions that still hold their origin after a run, by
	// source region, waiting holdIdle for the next run of that source.
	idle map[string]*session
	// letting are the releases of idle sessions in progress, by source
	// region: closed once the origin is free.
	letting map[string]chan struct{}
	// holdIdle is holdIdle; tests change it.
	holdIdle time.Duration

	// testAfterSend, when set, runs after the last pipeline of a run was
	// sent (with the backend PID), before its results are read.
	testAfterSend func(pid uint32)
}

// NewApplier returns an Applier writing through pool.
func NewApplier(pool *pgxpool.Pool, log zerolog.Logger, opts ...Option) *Applier {
	a := &Applier{
		pool:      pool,
		log:       log.With().Str("pkg", "apply").Logger(),
		defPolicy: LastWriteWins,
		appName:   "prism_apply",
		targets:   map[string]*target{},
		stmts:     map[string]*statement{},
		shapes:    map[string]*reshaping{},
		idle:      map[string]*session{},
		letting:   map[string]chan struct{}{},
		holdIdle:  holdIdle,
	}
	for _, o := range opts {
		o(a)
	}
	return a
}

func originName(region string) string { return "prism_" + region }

// BootstrapApplicationName is the application_name of a bootstrap's
// sessions. Fence does not terminate them: they hold origins on purpose.
const BootstrapApplicationName = "prism_bootstrap"

func (a *Applier) policy(rel *decode.Relation) Policy {
	if p, ok := a.tables[rel.Schema+"."+rel.Table]; ok {
		return p
	}
	return a.defPolicy
}

// Setup creates schema prism, tables prism.conflicts, prism.dead_letters
// and prism.undo_log, and the conflict functions. It is idempotent; Apply calls it once lazily.
func (a *Applier) Setup(ctx context.Context) error {
	// A database that is restarting (or a connection cut meanwhile) is
	// waited for, not reported: a node started while its Postgres
	// recovers must come up once it is back.
	deadline := time.Now().Add(2 * time.Minute)
	for attempt := 1; ; attempt++ {
		err := a.setup1(ctx)
		if err == nil || ctx.Err() != nil || time.Now().After(deadline) || !IsRetryable(err) {
			return err
		}
		a.log.Warn().Err(err).Int("attempt", attempt).Msg("database not ready for setup; retrying")
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(min(time.Duration(attempt)*500*time.Millisecond, 5*time.Second)):
		}
	}
}

func (a *Applier) setup1(ctx context.Context) error {
	conn, err := a.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("apply setup: %w", err)
	}
	defer conn.Release()
	// Setup's own schema changes are not replicated (event trigger
	// prism_ddl lets them pass).
	if _, err := conn.Exec(ctx, "SET prism.ddl = 'local'"); err != nil {
		return fmt.Errorf("apply setup: %w", err)
	}
	defer conn.Exec(ctx, "RESET prism.ddl")
	var track string
	if err := conn.QueryRow(ctx, "SHOW track_commit_timestamp").Scan(&track); err != nil {
		return fmt.Errorf("apply setup: %w", err)
	}
	if track != "on" {
		return fmt.Errorf("apply setup: %w", permanent("55000", "track_commit_timestamp is off in the target database; set track_commit_timestamp = on and restart PostgreSQL"))
	}
	if _, err := conn.Conn().PgConn().Exec(ctx, setupSQL+policySetupSQL+clockSetupSQL).ReadAll(); err != nil {
		return fmt.Errorf("apply setup: %w", err)
	}
	installed, err := installTriggers(ctx, conn.Conn())
	if err != nil {
		return fmt.Errorf("apply setup: %w", err)
	}
	if _, err := conn.Exec(ctx, eventTriggerSQL); err != nil {
		a.log.Warn().Err(err).Msg("cannot create event trigger prism_install (needs a superuser): tables created from now on get their conflict triggers only at the next start")
	} else {
		a.log.Debug().Int("tables", installed).Msg("conflict triggers installed")
	}
	if err := a.setupDDL(ctx, conn.Conn()); err != nil {
		return fmt.Errorf("apply setup: %w", err)
	}
	a.mu.Lock()
	a.setup = true
	a.mu.Unlock()
	return nil
}

func (a *Applier) ensureSetup(ctx context.Context) error {
	a.mu.Lock()
	done := a.setup
	a.mu.Unlock()
	if done {
		return nil
	}
	return a.Setup(ctx)
}

// Progress returns the durable progress of origin prism_<sourceRegion> in
// the target database: the end LSN of the last applied transaction, or 0
// when nothing was applied yet.
func (a *Applier) Progress(ctx context.Context, sourceRegion string) (pglogrepl.LSN, error) {
	var s *string
	err := a.pool.QueryRow(ctx,
		"SELECT pg_replication_origin_progress(roname, true)::text FROM pg_catalog.pg_replication_origin WHERE roname = $1",
		originName(sourceRegion)).Scan(&s)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("apply progress %s: %w", sourceRegion, err)
	}
	if s == nil {
		return 0, nil
	}
	lsn, err := pglogrepl.ParseLSN(*s)
	if err != nil {
		return 0, fmt.Errorf("apply progress %s: %w", sourceRegion, err)
	}
	return lsn, nil
}

// Apply applies one source transaction in one target transaction, with
// the origin's progress advanced to txn.EndLSN in the same commit. A
// transaction at or below the recorded progress is skipped and is a
// success. A spilled transaction (txn.Spill) is read from its file as
// ApplyStream applies it. Errors are *Error.
func (a *Applier) Apply(ctx context.Context, txn *decode.Txn) error {
	if txn != nil && txn.Spill != nil {
		return a.applySpilled(ctx, txn)
	}
	_, err := a.ApplyBatch(ctx, []*decode.Txn{txn})
	return err
}

// ApplyBatch applies txns in order. Each one commits separately with its
// own origin LSN and commit time; consecutive transactions share round
// trips. On error, the first applied transactions are durable and the
// error (an *Error) is about txns[applied].
func (a *Applier) ApplyBatch(ctx context.Context, txns []*decode.Txn) (int, error) {
	if len(txns) == 0 {
		return 0, nil
	}
	for i, t := range txns {
		if t == nil {
			return 0, &Error{Err: permanent("22023", "nil transaction at %d", i)}
		}
		if t.Origin == "" || t.CommitTime.IsZero() || t.EndLSN == 0 {
			return 0, newError(t, "", 0, permanent("22023", "transaction lacks origin, end LSN or commit time"))
		}
		if t.Spill != nil {
			return 0, newError(t, "", 0, permanent("22023", "spilled transaction in a batch: apply it alone"))
		}
	}
	if err := a.ensureSetup(ctx); err != nil {
		return 0, newError(txns[0], "", 0, err)
	}
	applied, conflictRetries := 0, maxConflictRetries
	for applied < len(txns) {
		end := applied + 1
		for end < len(txns) && txns[end].Origin == txns[applied].Origin {
			end++
		}
		n, err := a.applyRun(ctx, txns[applied:end])
		applied += n
		if err != nil && concurrent(err) && conflictRetries > 0 {
			// A local transaction changed a row of this one after its
			// snapshot: apply it again, at once, on fresh data.
			conflictRetries--
			a.log.Debug().Err(err).Msg("concurrent local write; applying again")
			continue
		}
		if err != nil {
			return applied, err
		}
	}
	return applied, nil
}

// beginSQL starts every apply transaction. REPEATABLE READ makes every
// check of a transaction (conflict resolution, clock floors, tombstones,
// missing rows) read one snapshot, and a row changed by a concurrent local
// transaction after that snapshot fails the transaction with 40001
// instead of being decided on stale data; ApplyBatch then applies it
// again at once.
const beginSQL = "BEGIN ISOLATION LEVEL REPEATABLE READ"

// maxConflictRetries bounds the immediate re-applies of one ApplyBatch
// after serialization failures and deadlocks with local transactions.
const maxConflictRetries = 50

// concurrent reports a serialization failure or deadlock.
func concurrent(err error) bool {
	var e *Error
	return errors.As(err, &e) && (e.SQLState == "40001" || e.SQLState == "40P01")
}

// Limits of one pipeline: the statements of one round trip. They bound
// the memory a batch holds besides the transactions themselves.
const (
	maxPipelineBytes = 4 << 20
	maxPipelineCmds  = 4096
)

// txnSetupSQL is the first statement of every apply transaction: the
// origin's progress and commit time, the settings the conflict functions
// read, prism.floors, whether the transaction's snapshot has any clock
// floor (the row statements look a row's floor up only then), and
// prism.applying, which keeps trigger prism_clock off the transaction's
// writes. A commit time at or after the local clock (another region's
// clock ahead of this one) raises prism.horizon first (see clockSetupSQL).
const txnSetupSQL = `SELECT pg_replication_origin_xact_setup($1::pg_lsn, $2::timestamptz), pg_current_xact_id(),
	set_config('prism.remote_lsn', $1::pg_lsn::text, true), set_config('prism.remote_ts', $2::timestamptz::text, true),
	set_config('prism.remote_region', $3::text, true), set_config('prism.local_region', $4::text, true),
	set_config('prism.floors', (EXISTS (SELECT 1 FROM prism.clock_floors))::text, true),
	set_config('prism.applying', 'on', true),
	CASE WHEN $2::timestamptz >= clock_timestamp() THEN prism.raise_horizon($2::timestamptz) END`

// cmd describes one queued command of a pipeline.
type cmd struct {
	txn    int // index into the run
	change int // index into Changes; -1 for transaction control
	commit bool
	// barrier flushes the WAL up to the session's last commit: the
	// commits before it in the pipeline are durable once it succeeds.
	barrier bool
}

// barrierSQL makes every commit of this session durable: with a true
// argument, pg_replication_origin_session_progress flushes the WAL up to
// the session's last commit. Commits themselves run with
// synchronous_commit = off, so a pipeline of transactions pays for one
// WAL flush instead of one per transaction.
const barrierSQL = "SELECT pg_replication_origin_session_progress(true)"

// holdIdle is how long a session keeps holding its origin after a run
// that succeeded, waiting for the next run of the same source region. A
// busy stream so pays for the session setup (application name, origin,
// progress) once instead of once per batch, while an idle one frees the
// origin soon for whichever path takes the source region over.
const holdIdle = 500 * time.Millisecond

// session is one pooled connection holding the origin of a run.
type session struct {
	a      *Applier
	conn   *pgxpool.Conn
	origin string
	source string
	broken bool
	// reused marks a session taken over from a previous run: its
	// connection may have died while it waited; died records that it
	// had when the run failed.
	reused, died bool
	// progress is the origin's progress after the last run; it stays
	// exact while the session holds the origin.
	progress pglogrepl.LSN
	timer    *time.Timer // releases the idle session
}

func (s *session) release() {
	if !s.broken && !s.conn.Conn().PgConn().IsClosed() {
		// hold set these for the session; the pool's other users (dead
		// letters, undo, Progress) must commit durably again.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if _, err := s.conn.Conn().PgConn().Exec(ctx, "RESET synchronous_commit; RESET idle_in_transaction_session_timeout; RESET application_name; RESET session_replication_role").ReadAll(); err != nil {
			s.broken = true
		}
		cancel()
	}
	if s.broken {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		s.conn.Conn().Close(ctx)
		cancel()
	}
	s.conn.Release()
}

// hold sets the session up for origin and returns its progress, read
// while holding the origin so nobody can advance it meanwhile. An idle
// session of the same Applier that still holds the origin lets go of it
// first.
func (s *session) hold(ctx context.Context, source string) (pglogrepl.LSN, error) {
	if err := s.a.waitLetGo(ctx, source); err != nil {
		return 0, err
	}
	if idle := s.a.takeIdle(source); idle != nil {
		idle.unhold()
	}
	pc := s.conn.Conn().PgConn()
	for attempt := 0; ; attempt++ {
		b := &pgconn.Batch{}
		b.ExecParams(`SELECT set_config('application_name', $1, false), set_config('synchronous_commit', 'off', false),
			set_config('idle_in_transaction_session_timeout', '10s', false), set_config('session_replication_role', 'replica', false)`,
			[][]byte{[]byte(s.a.appName + "_" + source)}, nil, nil, nil)
		b.ExecParams("SELECT pg_replication_origin_session_setup($1)", [][]byte{[]byte(s.origin)}, nil, nil, nil)
		b.ExecParams("SELECT pg_replication_origin_session_progress(true)::text", nil, nil, nil, nil)
		res, err := pc.ExecBatch(ctx, b).ReadAll()
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42704" && attempt == 0 {
			// The origin does not exist yet; create it. Losing a race with
			// another creator is fine.
			_, cerr := pc.ExecParams(ctx, "SELECT pg_replication_origin_create($1)", [][]byte{[]byte(s.origin)}, nil, nil, nil).Close()
			var createErr *pgconn.PgError
			switch {
			case cerr == nil:
			case errors.As(cerr, &createErr) && (createErr.Code == "42710" || createErr.Code == "23505"):
			case errors.As(cerr, &createErr):
				return 0, cerr
			default:
				s.broken = true
				return 0, cerr
			}
			continue
		}
		if err != nil {
			if errors.As(err, &pgErr) {
				if pgErr.Code == "55006" {
					return 0, fmt.Errorf("%w: %w", ErrBusy, err)
				}
				if pgErr.Code == "42501" && strings.Contains(pgErr.Message, "session_replication_role") {
					return 0, fmt.Errorf("%w (applied transactions run with session_replication_role = replica; as a superuser: GRANT SET ON PARAMETER session_replication_role TO %s)",
						err, pgx.Identifier{s.conn.Conn().Config().User}.Sanitize())
				}
			} else {
				s.broken = true
			}
			return 0, err
		}
		if len(res) != 3 || len(res[2].Rows) != 1 || len(res[2].Rows[0]) != 1 {
			s.broken = true
			return 0, errors.New("unexpected reply to origin session setup")
		}
		if res[2].Rows[0][0] == nil {
			return 0, nil
		}
		lsn, err := pglogrepl.ParseLSN(string(res[2].Rows[0][0]))
		if err != nil {
			s.broken = true
			return 0, err
		}
		return lsn, nil
	}
}

// holdSession takes a pooled connection and holds origin prism_<source>
// on it, returning the origin's progress. A pooled connection may have
// died while idle (server restart, terminated backend); nothing was done
// on it, so it tries a fresh one once.
//
// The session an earlier run parked (see park) is taken as it is: it
// still holds the origin and knows its progress.
func (a *Applier) holdSession(ctx context.Context, source string) (*session, pglogrepl.LSN, error) {
	if s := a.takeIdle(source); s != nil {
		s.reused = true
		return s, s.progress, nil
	}
	for attempt := 0; ; attempt++ {
		conn, err := a.pool.Acquire(ctx)
		if err != nil {
			return nil, 0, err
		}
		s := &session{a: a, conn: conn, origin: originName(source), source: source}
		progress, err := s.hold(ctx, source)
		if err == nil {
			return s, progress, nil
		}
		closed := conn.Conn().PgConn().IsClosed()
		s.broken = s.broken || closed
		s.release()
		if !closed || attempt > 0 || ctx.Err() != nil {
			return nil, 0, err
		}
	}
}

// takeIdle removes and returns the idle session holding source's
// origin, or nil.
func (a *Applier) takeIdle(source string) *session {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.idle[source]
	if s == nil {
		return nil
	}
	delete(a.idle, source)
	s.timer.Stop()
	return s
}

// park keeps a session that finished a run cleanly holding its origin
// for holdIdle, for the next run of the same source; after that it lets
// go of the origin and returns the connection to the pool.
func (a *Applier) park(s *session, progress pglogrepl.LSN) {
	if s.broken {
		s.release()
		return
	}
	s.progress, s.reused = progress, false
	a.mu.Lock()
	if a.idle[s.source] != nil {
		// Cannot happen while the origin is exclusive; be safe anyway.
		a.mu.Unlock()
		s.unhold()
		return
	}
	a.idle[s.source] = s
	s.timer = time.AfterFunc(a.holdIdle, func() {
		a.mu.Lock()
		if a.idle[s.source] != s {
			a.mu.Unlock()
			return // taken by a run meanwhile
		}
		delete(a.idle, s.source)
		done := make(chan struct{})
		a.letting[s.source] = done
		a.mu.Unlock()
		s.unhold()
		a.mu.Lock()
		delete(a.letting, s.source)
		a.mu.Unlock()
		close(done)
	})
	a.mu.Unlock()
}

// waitLetGo waits until an idle session that is letting go of source's
// origin on its own (after holdIdle) is done, so that a new session does
// not find the origin busy because of this Applier.
func (a *Applier) waitLetGo(ctx context.Context, source string) error {
	a.mu.Lock()
	done := a.letting[source]
	a.mu.Unlock()
	if done == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// unhold lets go of the origin (rolling back anything left open) and
// releases the connection; a connection that cannot is dropped, which
// frees the origin too, but only once its backend has exited: a broken
// session whose connection is still open (dropped because the schema
// changed) lets go first, so the next session does not find the origin
// busy.
func (s *session) unhold() {
	if !s.conn.Conn().PgConn().IsClosed() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if _, err := s.conn.Conn().PgConn().Exec(ctx, "ROLLBACK; SELECT pg_replication_origin_session_reset()").ReadAll(); err != nil {
			s.broken = true
		}
		cancel()
	}
	s.release()
}

// Release lets go of the origin prism_<sourceRegion> when an idle
// session of this Applier still holds it (see holdIdle). Callers release
// when a source's stream ends, so another path need not wait.
func (a *Applier) Release(sourceRegion string) {
	if s := a.takeIdle(sourceRegion); s != nil {
		s.unhold()
	}
}

// Close lets go of every origin idle sessions hold and returns their
// connections to the pool. The Applier remains usable.
func (a *Applier) Close() {
	a.mu.Lock()
	sources := make([]string, 0, len(a.idle))
	for src := range a.idle {
		sources = append(sources, src)
	}
	a.mu.Unlock()
	for _, src := range sources {
		a.Release(src)
	}
}

// applyRun applies txns of one origin on one connection. A session
// taken over from an earlier run whose connection turns out dead (a fence
// or a server restart while it waited) is replaced by a fresh one once;
// that is safe in any case, since the fresh session reads the origin's
// progress and skips what committed.
func (a *Applier) applyRun(ctx context.Context, txns []*decode.Txn) (int, error) {
	s, progress, err := a.holdSession(ctx, txns[0].Origin)
	if err != nil {
		return 0, newError(txns[0], "", 0, err)
	}
	n, err := a.applyHeld(ctx, s, progress, txns)
	if err == nil || !s.died || ctx.Err() != nil || n >= len(txns) {
		return n, err
	}
	a.log.Debug().Err(err).Str("origin", s.origin).Msg("held apply session died while idle; retrying on a fresh one")
	s, progress, err = a.holdSession(ctx, txns[0].Origin)
	if err != nil {
		return n, newError(txns[n], "", 0, err)
	}
	m, err := a.applyHeld(ctx, s, progress, txns[n:])
	return n + m, err
}

// applyHeld applies txns of one origin on s, which holds the origin
// with the given progress. It parks s after a clean run and lets go of
// the origin otherwise.
func (a *Applier) applyHeld(ctx context.Context, s *session, progress pglogrepl.LSN, txns []*decode.Txn) (int, error) {
	source := txns[0].Origin
	conn := s.conn
	// From here the origin is held: park the session or let go of the
	// origin on every path.
	ok := false
	done := progress
	defer func() {
		if ok {
			a.park(s, done)
			return
		}
		s.died = s.reused && s.conn.Conn().PgConn().IsClosed()
		s.unhold()
	}()

	// Skip what the origin already has; the rest must go in LSN order.
	skip := make([]bool, len(txns))
	last := progress
	pending := 0
	for i, t := range txns {
		if t.EndLSN <= last {
			skip[i] = true
			continue
		}
		last = t.EndLSN
		pending++
	}
	if pending == 0 {
		a.log.Debug().Str("origin", source).Stringer("progress", progress).Int("skipped", len(txns)).Msg("already applied")
		ok = true
		return len(txns), nil
	}

	pc := conn.Conn().PgConn()
	setupSD, err := conn.Conn().Prepare(ctx, "prism_txn_setup", txnSetupSQL)
	if err != nil {
		return 0, a.fail(s, txns[0], "", 0, err)
	}
	// Prepared once per connection, so no transaction parses them again.
	beginSD, err := conn.Conn().Prepare(ctx, "prism_begin", beginSQL)
	if err != nil {
		return 0, a.fail(s, txns[0], "", 0, err)
	}
	commitSD, err := conn.Conn().Prepare(ctx, "prism_commit", "COMMIT")
	if err != nil {
		return 0, a.fail(s, txns[0], "", 0, err)
	}

	committed := 0 // txns[:committed] are durable (applied or skipped)
	for committed < len(txns) && skip[committed] {
		committed++
	}
	b := &pgconn.Batch{}
	var cmds []cmd
	size := 0

	flush := func(final bool) error {
		// After the pipeline's last COMMIT (also when a transaction is
		// still open: the barrier runs inside it harmlessly).
		for i := len(cmds) - 1; i >= 0; i-- {
			if cmds[i].commit {
				b.ExecParams(barrierSQL, nil, nil, nil, nil)
				cmds = append(cmds, cmd{txn: cmds[i].txn, change: -1, barrier: true})
				break
			}
		}
		mrr := pc.ExecBatch(ctx, b)
		if final && a.testAfterSend != nil {
			a.testAfterSend(pc.PID())
		}
		res, err := mrr.ReadAll()
		failed := len(res)
		for i, r := range res {
			if r.Err != nil {
				failed, err = i, r.Err
				break
			}
		}
		// Commits count as done only once a barrier after them succeeded.
		lastCommit := -1
		durable := func() {
			if lastCommit < 0 {
				return
			}
			committed = lastCommit + 1
			for committed < len(txns) && skip[committed] {
				committed++
			}
		}
		for i := 0; i < failed && i < len(cmds); i++ {
			if cmds[i].commit {
				lastCommit = cmds[i].txn
			}
			if cmds[i].barrier {
				durable()
			}
		}
		if err == nil {
			b, cmds, size = &pgconn.Batch{}, cmds[:0], 0
			return nil
		}
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) {
			s.broken = true
		} else if lastCommit >= 0 && committed <= lastCommit {
			// A statement failed after commits whose barrier did not run;
			// the session is alive, so flush them now and report them, so
			// the error names the transaction that failed.
			if _, ferr := pc.Exec(ctx, "ROLLBACK; "+barrierSQL).ReadAll(); ferr == nil {
				durable()
			} else if !errors.As(ferr, &pgErr) {
				s.broken = true
			}
		}
		// Name the transaction the failing statement belongs to.
		at := committed
		if failed < len(cmds) {
			at = cmds[failed].txn
		}
		if at >= len(txns) {
			at = len(txns) - 1
		}
		t := txns[at]
		if failed < len(cmds) && cmds[failed].change >= 0 && cmds[failed].change < len(t.Changes) {
			c := &t.Changes[cmds[failed].change]
			return a.fail(s, t, relName(c), c.Op, err)
		}
		return a.fail(s, t, "", 0, err)
	}

	for i, t := range txns {
		if skip[i] {
			continue
		}
		b.ExecStatement(beginSD, nil, nil, nil)
		cmds = append(cmds, cmd{txn: i, change: -1})
		ts := []byte(t.CommitTime.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
		b.ExecStatement(setupSD, [][]byte{[]byte(t.EndLSN.String()), ts, []byte(t.Origin), []byte(a.local)}, nil, nil)
		cmds = append(cmds, cmd{txn: i, change: -1})
		for j := range t.Changes {
			c := &t.Changes[j]
			if c.Op == decode.OpDDL {
				// Run now: the row statements after it are built from the
				// schema it leaves.
				if err := a.queueDDL(b, c.DDL); err != nil {
					return committed, a.fail(s, t, "", c.Op, err)
				}
				cmds = append(cmds, cmd{txn: i, change: j})
				err := flush(false)
				a.forgetSchema()
				if err != nil {
					return committed, err
				}
				continue
			}
			if c.Op == decode.OpTruncate {
				sql, err := truncateSQL(c)
				if err != nil {
					return committed, a.fail(s, t, relName(c), c.Op, err)
				}
				b.ExecParams(sql, nil, nil, nil, nil)
				cmds = append(cmds, cmd{txn: i, change: j})
				size += len(sql)
			} else {
				if c.Rel == nil {
					return committed, a.fail(s, t, "", c.Op, permanent("22023", "change %d has no relation", j))
				}
				c, err := a.reshape(ctx, conn.Conn(), c)
				if err != nil {
					return committed, a.fail(s, t, relName(&t.Changes[j]), t.Changes[j].Op, err)
				}
				st, sd, err := a.statementFor(ctx, conn.Conn(), c)
				if err != nil {
					return committed, a.fail(s, t, relName(c), c.Op, err)
				}
				vals, formats, err := bind(st, c, ts)
				if err != nil {
					return committed, a.fail(s, t, relName(c), c.Op, err)
				}
				b.ExecStatement(sd, vals, formats, nil)
				cmds = append(cmds, cmd{txn: i, change: j})
				size += 32
				for _, v := range vals {
					size += len(v) + 8
				}
			}
			if size > maxPipelineBytes || len(cmds) > maxPipelineCmds {
				if err := flush(false); err != nil {
					return committed, err
				}
			}
		}
		b.ExecStatement(commitSD, nil, nil, nil)
		cmds = append(cmds, cmd{txn: i, change: -1, commit: true})
	}
	if err := flush(true); err != nil {
		return committed, err
	}
	ok, done = true, last
	a.log.Debug().Str("origin", source).Int("applied", pending).Int("skipped", len(txns)-pending).
		Stringer("end_lsn", txns[len(txns)-1].EndLSN).Msg("applied")
	return len(txns), nil
}

func relName(c *decode.Change) string {
	if c.Rel == nil {
		return ""
	}
	return c.Rel.Schema + "." + c.Rel.Table
}

// fail turns err into an *Error and forgets cached table descriptions
// when the error says the target schema changed.
func (a *Applier) fail(s *session, t *decode.Txn, table string, op decode.Op, err error) error {
	e := newError(t, table, op, err)
	switch e.SQLState {
	case "42703", "42P01", "42804", "0A000", "26000":
		a.forgetSchema()
		// The connection's prepared statements may reference the old
		// schema; drop the connection.
		s.broken = true
		a.schemaPending(e)
	}
	return e
}

// statementFor returns the prepared statement for change c on conn,
// building it from the cached target description (loaded, or reloaded
// once when a column is missing).
func (a *Applier) statementFor(ctx context.Context, conn *pgx.Conn, c *decode.Change) (*statement, *pgconn.StatementDescription, error) {
	policy := a.policy(c.Rel)
	key := shapeKey(c, policy)
	a.mu.Lock()
	st := a.stmts[key]
	a.mu.Unlock()
	if st == nil {
		var err error
		for attempt := 0; ; attempt++ {
			var t *target
			t, err = a.target(ctx, conn, c.Rel, attempt > 0)
			if err != nil {
				return nil, nil, err
			}
			st, err = buildStatement(t, c, policy)
			var pe *permanentError
			if err != nil && attempt == 0 && errors.As(err, &pe) && pe.code == "42703" {
				continue
			}
			break
		}
		if err != nil {
			return nil, nil, err
		}
		a.mu.Lock()
		a.stmts[key] = st
		a.mu.Unlock()
	}
	sd, err := conn.Prepare(ctx, st.name, st.sql)
	if err != nil {
		return nil, nil, err
	}
	return st, sd, nil
}

func (a *Applier) target(ctx context.Context, conn *pgx.Conn, rel *decode.Relation, reload bool) (*target, error) {
	name := rel.Schema + "." + rel.Table
	a.mu.Lock()
	t := a.targets[name]
	a.mu.Unlock()
	if t != nil && !reload {
		return t, nil
	}
	t, err := loadTarget(ctx, conn, rel.Schema, rel.Table)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	a.targets[name] = t
	a.mu.Unlock()
	return t, nil
}

var busyPID = regexp.MustCompile(`PID (\d+)`)

// Fence terminates the other sessions that hold origin
// prism_<sourceRegion> in the target database and returns how many it
// terminated. After it returns, the origin is free (until someone takes
// it again). Callers fence before taking over a source region from a path
// that may be frozen; Fence must not run while this Applier itself
// applies the same source region.
func (a *Applier) Fence(ctx context.Context, sourceRegion string) (int, error) {
	// This Applier's own idle session lets go without being terminated.
	a.Release(sourceRegion)
	if err := a.waitLetGo(ctx, sourceRegion); err != nil {
		return 0, fmt.Errorf("apply fence %s: %w", sourceRegion, err)
	}
	conn, err := a.pool.Acquire(ctx)
	if err != nil {
		return 0, fmt.Errorf("apply fence %s: %w", sourceRegion, err)
	}
	s := &session{a: a, conn: conn, origin: originName(sourceRegion)}
	defer s.release()
	pc := conn.Conn().PgConn()
	killed := 0
	for attempt := 0; attempt < 20; attempt++ {
		_, err := pc.ExecParams(ctx, "SELECT pg_replication_origin_session_setup($1)", [][]byte{[]byte(s.origin)}, nil, nil, nil).Close()
		if err == nil {
			if _, err := pc.ExecParams(ctx, "SELECT pg_replication_origin_session_reset()", nil, nil, nil, nil).Close(); err != nil {
				s.broken = true
			}
			return killed, nil
		}
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) {
			s.broken = true
			return killed, fmt.Errorf("apply fence %s: %w", sourceRegion, err)
		}
		switch pgErr.Code {
		case "42704": // no such origin: nobody holds it
			return killed, nil
		case "55006":
		default:
			return killed, fmt.Errorf("apply fence %s: %w", sourceRegion, err)
		}
		m := busyPID.FindStringSubmatch(pgErr.Message)
		if m == nil {
			return killed, fmt.Errorf("apply fence %s: no PID in %q: %w", sourceRegion, pgErr.Message, ErrBusy)
		}
		pid, err := strconv.Atoi(m[1])
		if err != nil {
			return killed, fmt.Errorf("apply fence %s: %w", sourceRegion, err)
		}
		// A bootstrap's session holds the origin for a moment (in the
		// target database, for the whole copy): it is waited for, not
		// killed; the caller's apply gets ErrBusy and retries.
		var ok *bool
		if err := conn.QueryRow(ctx, `SELECT CASE WHEN (SELECT application_name FROM pg_stat_activity WHERE pid = $1) = $2
			THEN NULL ELSE pg_terminate_backend($1, 5000) END`, pid, BootstrapApplicationName).Scan(&ok); err != nil {
			return killed, fmt.Errorf("apply fence %s: terminate %d: %w", sourceRegion, pid, err)
		}
		if ok == nil {
			return killed, fmt.Errorf("apply fence %s: held by bootstrap session %d: %w", sourceRegion, pid, ErrBusy)
		}
		if *ok {
			killed++
			a.log.Warn().Str("origin", s.origin).Int("pid", pid).Msg("fenced origin holder")
		}
	}
	return killed, fmt.Errorf("apply fence %s: %w", sourceRegion, ErrBusy)
}
