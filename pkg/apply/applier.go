package apply

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
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

// WithLazyFlush makes the row path's and batches' round trips end at
// their last COMMIT, without a barrier that flushes the WAL: ApplyBatch's
// txns[:n] are then committed, and durable once Progress (which flushes
// up to the origin's last commit) returned at least their end LSN, or the
// WAL writer flushed them. A caller that acknowledges by Progress keeps
// the apply session from waiting for a flush per round trip, and one
// flush covers every commit made meanwhile. Transactions streamed from a
// spill file still flush at their commit.
func WithLazyFlush() Option {
	return func(a *Applier) { a.lazy = true }
}

// LazyFlush reports whether ApplyBatch leaves the flush to Progress
// (WithLazyFlush).
func (a *Applier) LazyFlush() bool { return a.lazy }

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
	noCapture bool // WithoutDDLCapture
	lazy      bool // WithLazyFlush

	mu sync.Mutex
	// sessPool holds the apply sessions' connections (see sessions);
	// nil until the first one is needed and after Close.
	sessPool *pgxpool.Pool
	setup    bool
	targets  map[string]*target    // by schema.table
	stmts    map[string]*statement // by shapeKey
	shapes   map[string]*reshaping // by shapeOf; see reshape
	// renamed maps relations that name a table by a name it had before a
	// rename here onto the table's name now; see renamedTable.
	renamed map[*decode.Relation]*decode.Relation
	// idle are sessions that still hold their origin after a run, by
	// source region, waiting holdIdle for the next run of that source.
	idle map[string]*session
	// letting are the releases of idle sessions in progress, by source
	// region: closed once the origin is free.
	letting map[string]chan struct{}
	// holdIdle is holdIdle; tests change it.
	holdIdle time.Duration
	// upkeep is how CollectMarks and CompactStamps divide their work
	// (defaultUpkeep); tests change it.
	upkeep upkeep

	// testAfterSend, when set, runs after the last pipeline of a run was
	// sent (with the backend PID), before its results are read.
	testAfterSend func(pid uint32)
	// holds counts the sessions that set up an origin (see hold);
	// batches the batches sent (see tryBatch).
	holds, batches atomic.Int64
	// memos are the failures of recent batches, by source region.
	memos map[string]*batchMemo
	// clock is time.Now; tests change it (batchMemo's decay).
	clock func() time.Time
	// smallRuns batches every run of two transactions or more, however
	// many array statements it takes (see batchPlan.worthIt); benchmarks
	// set it to compare.
	smallRuns bool
	// stats count how each source region's transactions were applied.
	stats map[string]*Stats
	// staleRetried is, by source region, the end LSN of the transaction
	// last given one more try after a stale-schema error (see
	// staleSchema): per source, so that two sources failing in turn do
	// not give each other endless tries.
	staleRetried map[string]string
}

// NewApplier returns an Applier writing through pool.
func NewApplier(pool *pgxpool.Pool, log zerolog.Logger, opts ...Option) *Applier {
	a := &Applier{
		pool:      pool,
		log:       log.With().Str("pkg", "apply").Logger(),
		defPolicy: LastWriteWins,
		appName:   decode.AppName("apply"),
		targets:   map[string]*target{},
		stmts:     map[string]*statement{},
		shapes:    map[string]*reshaping{},
		renamed:   map[*decode.Relation]*decode.Relation{},
		idle:      map[string]*session{},
		letting:   map[string]chan struct{}{},
		memos:     map[string]*batchMemo{},
		clock:     time.Now,
		stats:     map[string]*Stats{},
		holdIdle:  holdIdle,
		upkeep:    defaultUpkeep,
	}
	for _, o := range opts {
		o(a)
	}
	return a
}

// Stats count how the transactions of one source region were applied
// since the Applier was made: which path committed them, and what became
// of the batches tried. A source whose batches keep rolling back (hot
// rows written in several regions, a table whose rows need the row path)
// shows it here.
type Stats struct {
	// Batched and ByRow are the transactions made durable in batches
	// and one by one (the row path; a transaction a batch could not
	// take, or one a rolled-back batch held). Transactions found
	// applied already (a replay) count in neither, nor do large ones
	// that arrived in chunks and were applied as they came (Streamed).
	Batched, ByRow, Streamed uint64
	// Batches committed; RolledBack were rolled back (a conflict, a
	// missing row, a serialization failure, an error) and their
	// transactions applied by rows; Skipped went straight to the row
	// path because the source's recent batches kept rolling back.
	Batches, RolledBack, Skipped uint64
	// Retries are the re-applies after a serialization failure or
	// deadlock with a local transaction.
	Retries uint64
}

// Stats returns the counters of every source region applied so far.
func (a *Applier) Stats() map[string]Stats {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string]Stats, len(a.stats))
	for src, st := range a.stats {
		out[src] = *st
	}
	return out
}

// count adds to the counters of source.
func (a *Applier) count(source string, add func(*Stats)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := a.stats[source]
	if st == nil {
		st = &Stats{}
		a.stats[source] = st
	}
	add(st)
}

// BootstrapApplicationName is the application_name of a bootstrap's
// sessions. Fence does not terminate them: they hold origins on purpose.
const BootstrapApplicationName = decode.NamePrefix + "bootstrap"

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
	var earlier int
	if err := conn.QueryRow(ctx, earlierTriggersSQL).Scan(&earlier); err != nil {
		return fmt.Errorf("apply setup: %w", err)
	}
	if earlier > 0 {
		a.log.Warn().Int("tables", earlier).Msg("conflict triggers kept as an earlier version made them (the same work, at a higher cost per write): " +
			"their tables were locked by other transactions for 1 s; they are replaced at a later start")
	}
	if _, err := conn.Exec(ctx, eventTriggerSQL); err != nil {
		a.log.Warn().Err(err).Msg("cannot create event trigger prism_install (needs a superuser): tables created from now on get their conflict triggers within a minute (a running node looks for them), not at once")
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
	return OriginProgress(ctx, a.pool, sourceRegion)
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
// trips. On error, txns[:applied] are durable and the error (an *Error)
// is about txns[applied] alone; the ones after it were not executed (see
// "One failure touches no other" in the package documentation).
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
		n, err := a.applyRun(ctx, txns[applied:end], &conflictRetries)
		applied += n
		if err != nil && concurrent(err) && conflictRetries > 0 {
			// A local transaction changed a row of this one after its
			// snapshot, and the session that held the origin is gone:
			// apply it again, at once, on fresh data and a new session
			// (a live one retries itself; see pipeline.run).
			conflictRetries--
			a.count(txns[applied].Origin, func(st *Stats) { st.Retries++ })
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

// concurrent reports a serialization failure or deadlock, as an *Error
// or as the server's error itself.
func concurrent(err error) bool {
	var e *Error
	if errors.As(err, &e) {
		return concurrentState(e.SQLState)
	}
	state, _ := classify(err)
	return concurrentState(state)
}

// concurrentState reports whether a SQLSTATE is a serialization failure
// or a deadlock: the transaction met a concurrent write and applying it
// again on a fresh snapshot may succeed.
func concurrentState(state string) bool { return state == "40001" || state == "40P01" }

// Limits of one pipeline: the statements of one round trip. They bound
// the memory a batch holds besides the transactions themselves.
const (
	maxPipelineBytes = 4 << 20
	maxPipelineCmds  = 4096
)

// txnSetupSQL is the first statement of every apply transaction: the
// settings the conflict functions read, prism.floors, whether the transaction's snapshot has any clock
// floor (the row statements look a row's floor up only then), and
// prism.applying, which keeps trigger prism_clock off the transaction's
// writes. A commit time at or after the local clock (another region's
// clock ahead of this one) raises prism.horizon first (see clockSetupSQL).
const txnSetupSQL = `SELECT pg_current_xact_id(),
	set_config('prism.remote_lsn', $1::pg_lsn::text, true), set_config('prism.remote_ts', $2::timestamptz::text, true),
	set_config('prism.remote_region', $3::text, true), set_config('prism.local_region', $4::text, true),
	set_config('prism.floors', (EXISTS (SELECT 1 FROM prism.clock_floors))::text, true),
	set_config('prism.applying', 'on', true),
	CASE WHEN $2::timestamptz >= clock_timestamp() THEN prism.raise_horizon($2::timestamptz) END`

// batchSetupSQL is txnSetupSQL for the transaction of a batch. Where
// the role may set log_min_messages (a superuser, or GRANT SET ON
// PARAMETER log_min_messages), it also keeps the server from logging
// the transaction's errors (LOG messages, such as slow statements, still
// go out). A failed batch is expected - a row that needs the row path
// (prism.batch_check), a key a concurrent transaction inserted, a
// serialization failure - and on rows written in several regions it is
// common (about 90 in 20 s at 200 transactions a second per region);
// its transactions are always applied again by the row path, whose
// errors the server logs as before. Each such failure was an ERROR in
// the server log, with up to 1,000 row places in its DETAIL.
const batchSetupSQL = txnSetupSQL + `,
	CASE WHEN pg_catalog.has_parameter_privilege('log_min_messages', 'SET') THEN pg_catalog.set_config('log_min_messages', 'log', true) END`

// txnSetupName is the name txnSetupSQL is prepared under on every apply
// connection, by the pipeline and by the stream path alike.
const txnSetupName = "prism_txn_setup"

// originSQL gives the transaction the source's end LSN and commit time:
// its COMMIT then moves the origin's progress. It is the last statement
// before COMMIT, after immediateSQL, because from PostgreSQL 16 on a
// transaction that aborts after it (and has written) moves the progress
// too: a failed transaction would count as applied and be skipped. On 15
// only COMMIT moves it.
const originSQL = "SELECT pg_replication_origin_xact_setup($1::pg_lsn, $2::timestamptz)"

// immediateSQL runs the transaction's deferred constraint checks and
// triggers before originSQL, so that COMMIT has nothing left that can
// fail on the data.
const immediateSQL = "SET CONSTRAINTS ALL IMMEDIATE"

// cmd is one command of a pipeline: a prepared statement with its
// parameters, or SQL text without any. Commands stay plain values until
// the pipeline is sent, so a transaction whose statements cannot all be
// built is left out whole.
type cmd struct {
	txn    int // index into the run
	change int // index into Changes; -1 for transaction control
	commit bool
	// barrier flushes the WAL up to the session's last commit: the
	// commits before it in the pipeline are durable once it succeeds.
	barrier bool
	sd      *pgconn.StatementDescription // nil: sql
	sql     string
	vals    [][]byte
	formats []int16
}

// barrierSQL makes every commit of this session durable: with a true
// argument, pg_replication_origin_session_progress flushes the WAL up to
// the session's last commit. Commits themselves run with
// synchronous_commit = off, so a pipeline of transactions pays for one
// WAL flush instead of one per transaction.
const barrierSQL = "SELECT pg_replication_origin_session_progress(true)"

// holdIdle is how long a session keeps holding its origin after a run
// that succeeded, waiting for the next run of the same source region. A
// stream so pays for the session setup (application name, bootstrap
// check, origin, progress: one round trip, and the origin's release
// later) once instead of once per run. It is long enough for a source
// that writes now and then (a transaction every few seconds), for which
// the setup was a third of a lone transaction's apply time. Holding
// longer locks nobody out: whoever takes a source region over fences
// first (a peer stream's start, the direct-SQL fallback, which call Fence,
// whose own Applier's idle session lets go at once), a stream that ends
// lets go (Release), the dead-letter commands retry a busy origin for 30
// s, and a bootstrap terminates an applier holding it.
const holdIdle = 10 * time.Second

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

// sessionSettingsSQL sets up a connection of the apply sessions (see
// sessions) once, when it opens. Besides synchronous_commit (see
// barrierSQL), idle_in_transaction_session_timeout and
// session_replication_role (applied rows fire no ordinary triggers, as
// in PostgreSQL's own apply worker), it pins the planner to what apply
// statements need: they are prepared once per connection and run with
// new values of the same kind for every row, so plan_cache_mode =
// force_generic_plan plans each once instead of five custom plans
// first (and a cost comparison per execution after that), and jit = off
// keeps a plan whose estimate crosses jit_above_cost (a table without
// statistics, a REPLICA IDENTITY FULL scan) from compiling code to
// change one row.
//
// It also lowers deadlock_timeout to DeadlockTimeout when the role
// may set it (a superuser, or GRANT SET ON PARAMETER deadlock_timeout)
// and the server's is longer. Two sources' transactions that write the
// same rows in opposite orders deadlock in a region that applies both,
// as one applied and one local transaction can; PostgreSQL breaks a
// deadlock in the session whose deadlock_timeout runs out first, and
// both sessions wait until then. So an apply session finds the deadlock
// after DeadlockTimeout instead of the server's (1 s by default),
// gives way to the application's transaction, and is applied again at
// once (40P01 is a concurrent-update failure, see concurrentState).
// Without the privilege the server's setting stays.
const sessionSettingsSQL = `SELECT set_config('synchronous_commit', 'off', false),
	set_config('idle_in_transaction_session_timeout', '10s', false), set_config('session_replication_role', 'replica', false),
	set_config('plan_cache_mode', 'force_generic_plan', false), set_config('jit', 'off', false),
	CASE WHEN pg_catalog.has_parameter_privilege('deadlock_timeout', 'SET')
		AND pg_catalog.current_setting('deadlock_timeout')::interval > '` + DeadlockTimeout + `'::interval
		THEN pg_catalog.set_config('deadlock_timeout', '` + DeadlockTimeout + `', false) END`

// DeadlockTimeout is the deadlock_timeout an apply session sets when its
// role may (see sessionSettingsSQL).
const DeadlockTimeout = "100ms"

// sessions returns the pool of the apply sessions' connections, made on
// first use from the Applier's pool's configuration. They are
// connections of their own, set up once (sessionSettingsSQL) and never
// reset: changing session_replication_role makes PostgreSQL drop every
// cached plan of the session, so an apply session that set it up on a
// shared connection for each run, and reset it for the pool's other users
// (dead letters, undo, Progress), planned all its statements again in
// every run that followed an idle time (holdIdle): 1.5-3 ms more for
// the first transaction after a pause of half a second, the common case
// of a source that writes now and then. The Applier's pool keeps the
// server's settings for everything else.
func (a *Applier) sessions(ctx context.Context) (*pgxpool.Pool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.sessPool != nil {
		return a.sessPool, nil
	}
	cfg := a.pool.Config()
	next := cfg.AfterConnect
	cfg.AfterConnect = func(ctx context.Context, conn *pgx.Conn) error {
		if next != nil {
			if err := next(ctx, conn); err != nil {
				return err
			}
		}
		_, err := conn.PgConn().Exec(ctx, sessionSettingsSQL).ReadAll()
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42501" {
			// Of the settings only session_replication_role needs a
			// privilege without the CASE around it.
			return fmt.Errorf("%w (applied transactions run with session_replication_role = replica; as a superuser: GRANT SET ON PARAMETER session_replication_role TO %s)",
				err, pgx.Identifier{conn.Config().User}.Sanitize())
		}
		return err
	}
	cfg.MinConns = 0
	p, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	a.sessPool = p
	return p, nil
}

// OpenSessions opens up to n connections of the apply sessions (see
// sessions) ahead of the first run, so that a node that just started
// does not make its first transactions wait for backends to start and
// set up. A failure is left to the runs, which open what they need.
func (a *Applier) OpenSessions(ctx context.Context, n int) {
	p, err := a.sessions(ctx)
	if err != nil {
		return
	}
	conns := make([]*pgxpool.Conn, 0, n)
	for range n {
		conn, err := p.Acquire(ctx)
		if err != nil {
			break
		}
		conns = append(conns, conn)
	}
	for _, conn := range conns {
		conn.Release()
	}
}

// acquireSession takes a connection of the apply sessions for origin
// prism_<source>; hold then sets it up for a run.
func (a *Applier) acquireSession(ctx context.Context, source string) (*session, error) {
	p, err := a.sessions(ctx)
	if err != nil {
		return nil, err
	}
	conn, err := p.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	return &session{a: a, conn: conn, origin: decode.OriginName(source), source: source}, nil
}

// release returns the session's connection to its pool, or closes it
// when it broke. application_name goes back to the connection's own (hold
// names the source region in it); the other settings stay, see sessions.
func (s *session) release() {
	if !s.broken && s.source != "" && !s.conn.Conn().PgConn().IsClosed() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if _, err := s.conn.Conn().PgConn().Exec(ctx, "RESET application_name").ReadAll(); err != nil {
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

// holdOriginSQL takes origin $1 for the session, creating it first when
// it does not exist yet (the first run of a source region): asking
// pg_replication_origin_session_setup for a missing origin would be an
// ERROR in the server log.
const holdOriginSQL = `SELECT pg_replication_origin_session_setup($1)
	FROM (SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = $1)
		THEN pg_replication_origin_create($1) END) AS created`

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
		b.ExecParams("SELECT set_config('application_name', $1, false)", [][]byte{[]byte(s.a.appName + "_" + source)}, nil, nil, nil)
		// Every hold, not only Setup, checks for an unfinished bootstrap:
		// a run takes the origins from sessions set up before it started.
		b.ExecParams("SELECT prism.bootstrap_check()", nil, nil, nil, nil)
		b.ExecParams(holdOriginSQL, [][]byte{[]byte(s.origin)}, nil, nil, nil)
		b.ExecParams("SELECT pg_replication_origin_session_progress(true)::text", nil, nil, nil, nil)
		res, err := pc.ExecBatch(ctx, b).ReadAll()
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && attempt == 0 && (pgErr.Code == "42710" || pgErr.Code == "23505" || pgErr.Code == "42704") {
			// Another session created the origin meanwhile (or dropped
			// it): once more.
			continue
		}
		if err != nil {
			if errors.As(err, &pgErr) {
				if pgErr.Code == "55006" {
					return 0, fmt.Errorf("%w: %w", ErrBusy, err)
				}
			} else {
				s.broken = true
			}
			return 0, err
		}
		if len(res) != 4 || len(res[3].Rows) != 1 || len(res[3].Rows[0]) != 1 {
			s.broken = true
			return 0, errors.New("unexpected reply to origin session setup")
		}
		s.a.holds.Add(1)
		if res[3].Rows[0][0] == nil {
			return 0, nil
		}
		lsn, err := pglogrepl.ParseLSN(string(res[3].Rows[0][0]))
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
		s, err := a.acquireSession(ctx, source)
		if err != nil {
			return nil, 0, err
		}
		progress, err := s.hold(ctx, source)
		if err == nil {
			return s, progress, nil
		}
		closed := s.conn.Conn().PgConn().IsClosed()
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
		pc := s.conn.Conn().PgConn()
		if _, err := pc.Exec(ctx, rollback(pc)+"SELECT pg_replication_origin_session_reset()").ReadAll(); err != nil {
			s.broken = true
		}
		cancel()
	}
	s.release()
}

// rollback is "ROLLBACK; " while pc's session has a transaction open (or
// failed), and "" otherwise: a ROLLBACK outside a transaction is a
// WARNING in the server log, and an idle session lets go of its origin
// after every run.
func rollback(pc *pgconn.PgConn) string {
	if pc.TxStatus() == 'I' {
		return ""
	}
	return "ROLLBACK; "
}

// Release lets go of the origin prism_<sourceRegion> when an idle
// session of this Applier still holds it (see holdIdle). Callers release
// when a source's stream ends, so another path need not wait.
func (a *Applier) Release(sourceRegion string) {
	if s := a.takeIdle(sourceRegion); s != nil {
		s.unhold()
	}
}

// Close lets go of every origin idle sessions hold and closes the apply
// sessions' connections (see sessions), once runs in progress return
// theirs. The Applier remains usable: it opens new ones when needed.
// Close it before its pool, whose Close waits for them.
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
	a.mu.Lock()
	p := a.sessPool
	a.sessPool = nil
	a.mu.Unlock()
	if p != nil {
		p.Close()
	}
}

// applyRun applies txns of one origin on one connection. A session
// taken over from an earlier run whose connection turns out dead (a fence
// or a server restart while it waited) is replaced by a fresh one once;
// that is safe in any case, since the fresh session reads the origin's
// progress and skips what committed.
func (a *Applier) applyRun(ctx context.Context, txns []*decode.Txn, retries *int) (int, error) {
	s, progress, err := a.holdSession(ctx, txns[0].Origin)
	if err != nil {
		return 0, newError(txns[0], "", 0, err)
	}
	n, err := a.applyHeld(ctx, s, progress, txns, retries)
	if err == nil || !s.died || ctx.Err() != nil || n >= len(txns) {
		return n, err
	}
	a.log.Debug().Err(err).Str("origin", s.origin).Msg("held apply session died while idle; retrying on a fresh one")
	s, progress, err = a.holdSession(ctx, txns[0].Origin)
	if err != nil {
		return n, newError(txns[n], "", 0, err)
	}
	m, err := a.applyHeld(ctx, s, progress, txns[n:], retries)
	return n + m, err
}

// applyHeld applies txns of one origin on s, which holds the origin
// with the given progress. It parks s after a clean run and lets go of
// the origin otherwise. On error it returns how many of txns are durable
// (n) and an error about txns[n]; see pipeline. Serialization failures
// and deadlocks are retried on s, up to *retries.
func (a *Applier) applyHeld(ctx context.Context, s *session, progress pglogrepl.LSN, txns []*decode.Txn, retries *int) (int, error) {
	source := txns[0].Origin
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

	p := &pipeline{a: a, s: s, txns: txns, skip: make([]bool, len(txns))}
	pending, last := p.skipApplied(progress)
	if pending == 0 {
		a.log.Debug().Str("origin", source).Stringer("progress", progress).Int("skipped", len(txns)).Msg("already applied")
		ok = true
		return len(txns), nil
	}
	if err := p.prepare(ctx); err != nil {
		return 0, a.fail(s, txns[0], "", 0, err)
	}
	p.durable(-1, false)
	if n, err := p.run(ctx, retries); err != nil {
		return n, err
	}
	ok, done = true, last
	a.log.Debug().Str("origin", source).Int("applied", pending).Int("skipped", len(txns)-pending).
		Stringer("end_lsn", txns[len(txns)-1].EndLSN).Msg("applied")
	return len(txns), nil
}

// skipApplied marks the transactions the origin already has (at or
// below progress; the rest must go in LSN order) and returns how many
// are left and the end LSN of the last one.
func (p *pipeline) skipApplied(progress pglogrepl.LSN) (pending int, last pglogrepl.LSN) {
	last = progress
	for i, t := range p.txns {
		if t.EndLSN <= last {
			p.skip[i] = true
			continue
		}
		last = t.EndLSN
		pending++
	}
	return pending, last
}

// run applies the transactions not skipped, in order: a run of them that
// can be batched as one batch, the others (and those of a batch that
// failed) one by one in pipelined round trips. It returns len(p.txns)
// once everything is durable, else n and an error about txns[n].
//
// A transaction that fails with a serialization failure or a deadlock (a
// concurrent local write to one of its rows) is applied again at once on
// the same session, which still holds the origin, up to *retries times:
// see again.
func (p *pipeline) run(ctx context.Context, retries *int) (int, error) {
	for {
		err := p.runFrom(ctx, p.committed)
		if err == nil {
			return len(p.txns), nil
		}
		if !concurrent(err) || p.s.broken || *retries <= 0 || ctx.Err() != nil {
			return p.committed, err
		}
		*retries--
		p.a.count(p.s.source, func(st *Stats) { st.Retries++ })
		p.a.log.Debug().Err(err).Msg("concurrent local write; applying again")
		if aerr := p.again(ctx); aerr != nil {
			return p.committed, aerr
		}
	}
}

// again prepares the session to apply the transactions not known durable
// once more after a concurrent write failed one: it rolls back what is
// open and reads the origin's progress under the lock it still holds
// (flushing the WAL up to its last commit), and marks what that progress
// covers as skipped, exactly as a fresh session would.
func (p *pipeline) again(ctx context.Context) error {
	pc := p.s.conn.Conn().PgConn()
	res, err := pc.Exec(ctx, rollback(pc)+"SELECT pg_replication_origin_session_progress(true)::text").ReadAll()
	if err == nil && (len(res) == 0 || len(res[len(res)-1].Rows) != 1 || len(res[len(res)-1].Rows[0]) != 1) {
		err = errors.New("unexpected reply to origin progress")
	}
	var progress pglogrepl.LSN
	if err == nil && res[len(res)-1].Rows[0][0] != nil {
		progress, err = pglogrepl.ParseLSN(string(res[len(res)-1].Rows[0][0]))
	}
	if err != nil {
		p.s.broken = true
		return p.lost(err)
	}
	clear(p.skip)
	p.committed = 0
	p.skipApplied(progress)
	p.durable(-1, false)
	return nil
}

// runFrom is run from transaction from on, once: its error is about
// txns[p.committed].
func (p *pipeline) runFrom(ctx context.Context, from int) error {
	// rows: the transactions before it go one by one (a batch of them
	// was not tried).
	rows := 0
	for i := from; i < len(p.txns); {
		if p.skip[i] {
			i++
			continue
		}
		if i >= rows && !p.isNamed(i) {
			batched, byRows, err := p.tryBatch(ctx, i)
			if err != nil {
				return err
			}
			if batched == 0 && byRows == 0 {
				continue // a failed batch named transactions: look again
			}
			i += batched
			rows = i + byRows
			if batched > 0 {
				continue
			}
		}
		err := p.queue(ctx, i)
		var be *buildError
		if errors.As(err, &be) {
			return p.cut(ctx, i, be)
		}
		if err != nil {
			return err
		}
		i++
	}
	return p.send(ctx, true)
}

// tryBatch applies the transactions from i on that form a batch (see
// plan), after sending what is queued before them. It returns how many
// of them are durable as a batch, or how many go to the row path: too
// few to batch, not tried because the source's batches keep failing (see
// batchMemo), or rolled back. A batch whose failure prism.batch_check
// pinned on rows returns neither: the transactions of those rows' first
// changes are named (p.named) and go by rows, and the runs between them
// are tried as batches of their own, with at least minPrefix
// transactions, however the source's batches went lately: their rows
// took the batch's way up to the failing statement already. So a
// conflict in a catch-up costs a failed round trip and a transaction by
// rows, not the whole batch by rows.
func (p *pipeline) tryBatch(ctx context.Context, i int) (batched, byRows int, err error) {
	run := i + 1
	for run < len(p.txns) && !p.skip[run] && !p.isNamed(run) {
		run++
	}
	if run == i+1 {
		// A lone transaction (the steady state of a quiet stream):
		// nothing to plan.
		return 0, 1, nil
	}
	bp, n := p.a.plan(ctx, p.s.conn.Conn(), p.txns[i:run])
	if n <= 1 {
		return 0, 1, nil
	}
	if !p.a.smallRuns && !bp.worthIt(n) {
		return 0, n, nil
	}
	if i+n == run && p.isNamed(run) {
		if n < minPrefix {
			p.a.count(p.s.source, func(st *Stats) { st.Skipped++ })
			return 0, n, nil
		}
	} else if n < p.a.minBatch(p.s.source) || p.a.skipBatch(p.s.source) {
		p.a.count(p.s.source, func(st *Stats) { st.Skipped++ })
		return 0, n, nil
	}
	// Queued transactions commit before the batch.
	if err := p.send(ctx, false); err != nil {
		return 0, 0, err
	}
	p.a.batches.Add(1)
	ok, conflict, named, err := p.batch(ctx, i, i+n, bp)
	if ok || conflict {
		p.a.batchDone(p.s.source, ok)
	}
	switch {
	case err != nil:
		return 0, 0, err
	case ok:
		return n, 0, nil
	case len(named) == 0:
		return 0, n, nil
	}
	if p.named == nil {
		p.named = make([]bool, len(p.txns))
	}
	for _, t := range named {
		p.named[t] = true
	}
	return 0, 0, nil
}

// isNamed reports whether a failed batch named txns[i] (see tryBatch).
func (p *pipeline) isNamed(i int) bool {
	return i < len(p.named) && p.named[i]
}

// minPrefix is the fewest transactions between those a failed batch
// named that are tried as a batch: with fewer, the round trip a batch
// saves is about what it costs.
const minPrefix = 4

// batchMemo remembers that the batches of one source region keep
// failing because a row needs the row path or a concurrent write (hot
// rows written in several regions: a conflict, a missing row or a
// tombstone in many batches; other errors do not count). A failed batch
// costs its round trip, a ROLLBACK and the row path's round trip, and
// buys nothing. Two things follow from failures:
//
//   - fails counts them in a row: after two or more, the next skip
//     batches of the source go straight to the row path, which decides
//     every row as the failed batch would have been decided. skip is
//     2^(fails-2) up to maxBatchSkip, and one batch that commits forgets
//     them.
//   - recent counts them lately, halving every batchMemory after the
//     last one, and a committed batch does not forget them: while it is
//     r, only runs of at least 2<<r transactions (up to maxMinBatch) are
//     batched (minBatch). In an active-active mesh that writes hot rows,
//     a quarter of the batches of two or three transactions failed,
//     with batches committing in between; small runs then go by rows,
//     where a batch would gain little, while a catch-up's long runs
//     still batch. The runs between the transactions a failed batch
//     named are not held to it (see tryBatch).
type batchMemo struct {
	fails, skip int
	recent      int
	last        time.Time // when recent last grew
}

// maxBatchSkip bounds the batches applied by rows between two tries.
const maxBatchSkip = 64

// batchMemory is how long a failed batch keeps raising the smallest run
// a source batches before it counts half (see batchMemo).
const batchMemory = time.Second

// maxMinBatch bounds the smallest run minBatch asks for. A catch-up
// that meets a conflict now and then fails a batch for each, so its
// recent failures climb; with 128, the runs of up to 128 transactions
// after the last conflict in an ApplyBatch call went by rows, and 1% of
// conflicting transactions cost 75 us a transaction instead of 47
// (BenchmarkApplyConflictCost).
const maxMinBatch = 32

// recentAt is m.recent at now, halved for every batchMemory since the
// last failure.
func (m *batchMemo) recentAt(now time.Time) int {
	shift := now.Sub(m.last) / batchMemory
	if m.recent == 0 || shift >= 31 {
		return 0
	}
	return m.recent >> max(shift, 0)
}

// minBatch returns the fewest transactions of source that make a batch.
func (a *Applier) minBatch(source string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.memos[source]
	if m == nil {
		return 2
	}
	return min(2<<min(m.recentAt(a.clock()), 7), maxMinBatch)
}

// skipBatch reports whether the next batch of source goes by rows, and
// counts it.
func (a *Applier) skipBatch(source string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.memos[source]
	if m == nil || m.skip == 0 {
		return false
	}
	m.skip--
	return true
}

// batchDone records whether a batch of source committed.
func (a *Applier) batchDone(source string, ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.clock()
	m := a.memos[source]
	if ok {
		if m != nil {
			m.fails, m.skip = 0, 0
			if m.recentAt(now) == 0 {
				delete(a.memos, source)
			}
		}
		return
	}
	if m == nil {
		m = &batchMemo{}
		a.memos[source] = m
	}
	m.fails++
	if m.fails > 1 {
		m.skip = min(1<<min(m.fails-2, 10), maxBatchSkip)
	}
	m.recent, m.last = m.recentAt(now)+1, now
}

// pipeline applies one run of transactions on a held session, many per
// round trip: BEGIN, origin setup, rows and COMMIT of each, and after
// the last COMMIT of a round trip a barrier that makes the commits
// durable (none with WithLazyFlush, where Progress does). One Sync ends
// each round trip, so after a failing command the server skips
// everything up to it; the results read map to commands one to one,
// which is how the failure is pinned on exactly one transaction:
//
//   - a command of transaction k fails (a row, its setup, its COMMIT):
//     the commits before it are made durable with a barrier of their own,
//     and the error is about k with the table and operation of its change;
//   - a change of k cannot be built into a statement (a table or column
//     missing in the target): k is left out of the round trip, what is
//     queued before it is sent and made durable, and the error is about k;
//   - the connection breaks or the barrier fails: no transaction is at
//     fault; the error is retryable and about the first transaction not
//     known durable, naming no change.
//
// So the caller always gets n, txns[:n] durable, and an error about
// txns[n] alone.
type pipeline struct {
	a    *Applier
	s    *session
	txns []*decode.Txn
	skip []bool // already applied
	// named are transactions that a failed batch's rows need the row
	// path for (nil until one does).
	named []bool

	begin, setup, commit, barrier *pgconn.StatementDescription
	// origin and immediate are originSQL and immediateSQL; batchSetup
	// is batchSetupSQL.
	origin, immediate, batchSetup *pgconn.StatementDescription

	cmds []cmd
	size int
	// first is the index in cmds of the first command of the transaction
	// being queued (0 once part of it was sent).
	first int
	// committed counts the leading durable transactions of txns (applied
	// or skipped).
	committed int
}

// buildError is a change of the transaction being queued that cannot be
// turned into a statement.
type buildError struct {
	table string
	op    decode.Op
	err   error
}

func (e *buildError) Error() string { return e.err.Error() }
func (e *buildError) Unwrap() error { return e.err }

// prepare prepares the transaction control statements, once per
// connection, so no transaction parses them again.
func (p *pipeline) prepare(ctx context.Context) error {
	conn := p.s.conn.Conn()
	var err error
	if p.setup, err = conn.Prepare(ctx, txnSetupName, txnSetupSQL); err != nil {
		return err
	}
	if p.batchSetup, err = conn.Prepare(ctx, "prism_batch_setup", batchSetupSQL); err != nil {
		return err
	}
	if p.begin, err = conn.Prepare(ctx, "prism_begin", beginSQL); err != nil {
		return err
	}
	if p.commit, err = conn.Prepare(ctx, "prism_commit", "COMMIT"); err != nil {
		return err
	}
	if p.origin, err = conn.Prepare(ctx, "prism_origin", originSQL); err != nil {
		return err
	}
	if p.immediate, err = conn.Prepare(ctx, "prism_immediate", immediateSQL); err != nil {
		return err
	}
	if !p.a.lazy {
		// Lazy (WithLazyFlush): a COMMIT that succeeded is all a round
		// trip needs, and p.barrier stays nil.
		p.barrier, err = conn.Prepare(ctx, "prism_barrier", barrierSQL)
	}
	return err
}

// durable records that every transaction up to txns[lastCommit] is
// durable, and the skipped ones after it, and counts those it applied
// (not skipped) in batched (true: one batch) or by rows.
func (p *pipeline) durable(lastCommit int, batched bool) {
	n := uint64(0)
	for ; p.committed <= lastCommit; p.committed++ {
		if !p.skip[p.committed] {
			n++
		}
	}
	for p.committed < len(p.txns) && p.skip[p.committed] {
		p.committed++
	}
	if n == 0 {
		return
	}
	p.a.count(p.s.source, func(st *Stats) {
		if batched {
			st.Batches++
			st.Batched += n
		} else {
			st.ByRow += n
		}
	})
}

// queue adds transaction i to the pipeline, sending the pipeline whenever
// it is full. A change that cannot be built is a *buildError.
func (p *pipeline) queue(ctx context.Context, i int) error {
	t := p.txns[i]
	p.first = len(p.cmds)
	ts := []byte(t.CommitTime.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
	lsn := lsnText(t.EndLSN)
	p.cmds = append(p.cmds, cmd{txn: i, change: -1, sd: p.begin},
		cmd{txn: i, change: -1, sd: p.setup, vals: [][]byte{lsn, ts, []byte(t.Origin), []byte(p.a.local)}})
	for j := range t.Changes {
		c := &t.Changes[j]
		if c.Op == decode.OpDDL {
			// Run it now: the row statements after it are built from the
			// schema it leaves.
			sql, vals, err := p.a.ddlCommand(c.DDL)
			if err != nil {
				return &buildError{op: c.Op, err: err}
			}
			p.cmds = append(p.cmds, cmd{txn: i, change: j, sql: sql, vals: vals})
			err = p.send(ctx, false)
			p.a.forgetSchema()
			if err != nil {
				return err
			}
			continue
		}
		sd, sql, vals, formats, err := p.a.changeCommand(ctx, p.s.conn.Conn(), c, j, ts)
		if err != nil {
			return err
		}
		if sd == nil {
			p.cmds = append(p.cmds, cmd{txn: i, change: j, sql: sql})
			p.size += len(sql)
		} else {
			p.cmds = append(p.cmds, cmd{txn: i, change: j, sd: sd, vals: vals, formats: formats})
			p.size += 32
			for _, v := range vals {
				p.size += len(v) + 8
			}
		}
		if p.size > maxPipelineBytes || len(p.cmds) > maxPipelineCmds {
			if err := p.send(ctx, false); err != nil {
				return err
			}
		}
	}
	p.cmds = append(p.cmds, cmd{txn: i, change: -1, sd: p.immediate},
		cmd{txn: i, change: -1, sd: p.origin, vals: [][]byte{lsn, ts}},
		cmd{txn: i, change: -1, commit: true, sd: p.commit})
	return nil
}

// cut ends the run before transaction i, a change of which could not be
// built: the transactions queued before it are sent and made durable, so
// the error is about i alone. What i had already sent (when the pipeline
// filled up inside it) is rolled back when the session lets go.
func (p *pipeline) cut(ctx context.Context, i int, be *buildError) error {
	p.cmds = p.cmds[:p.first]
	if err := p.send(ctx, true); err != nil {
		return err
	}
	if p.committed != i {
		return p.lost(be.err)
	}
	return p.a.fail(p.s, p.txns[i], be.table, be.op, be.err)
}

// send runs the queued commands in one round trip, with a barrier if
// there is a COMMIT among them, and accounts for the commits that became
// durable. Its error is about txns[p.committed].
func (p *pipeline) send(ctx context.Context, final bool) error {
	if len(p.cmds) == 0 {
		return nil
	}
	// The barrier goes after the last COMMIT, at the end: when a
	// transaction is still open it runs inside it harmlessly (right after
	// the COMMIT it would start an implicit transaction that the next
	// BEGIN, with its isolation level, could not join).
	for i := len(p.cmds) - 1; i >= 0 && p.barrier != nil; i-- {
		if p.cmds[i].commit {
			p.cmds = append(p.cmds, cmd{txn: p.cmds[i].txn, change: -1, barrier: true, sd: p.barrier})
			break
		}
	}
	b := &pgconn.Batch{}
	for i := range p.cmds {
		if c := &p.cmds[i]; c.sd != nil {
			b.ExecStatement(c.sd, c.vals, c.formats, nil)
		} else {
			b.ExecParams(c.sql, c.vals, nil, nil, nil)
		}
	}
	pc := p.s.conn.Conn().PgConn()
	mrr := pc.ExecBatch(ctx, b)
	if final && p.a.testAfterSend != nil {
		p.a.testAfterSend(pc.PID())
	}
	res, err := mrr.ReadAll()
	failed := len(res)
	for i, r := range res {
		if r.Err != nil {
			failed, err = i, r.Err
			break
		}
	}
	// Commits count as durable once a barrier after them succeeded, or
	// at once without barriers (lazy).
	lastCommit := -1
	for i := 0; i < failed && i < len(p.cmds); i++ {
		if p.cmds[i].commit {
			lastCommit = p.cmds[i].txn
		}
		if p.cmds[i].barrier || p.cmds[i].commit && p.barrier == nil {
			p.durable(lastCommit, false)
		}
	}
	var at *cmd
	if failed < len(p.cmds) {
		c := p.cmds[failed]
		at = &c
	}
	p.cmds, p.size, p.first = p.cmds[:0], 0, 0
	if err == nil {
		return nil
	}
	return p.failed(ctx, at, lastCommit, err)
}

// failed turns the failure of command c (nil when every command
// succeeded) into an error about txns[p.committed], after making the
// commits of the round trip before c durable.
func (p *pipeline) failed(ctx context.Context, c *cmd, lastCommit int, err error) error {
	pc := p.s.conn.Conn().PgConn()
	if p.committed >= len(p.txns) {
		// Everything is durable; only the end of the reply is missing.
		p.s.broken = true
		return nil
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pc.IsClosed() {
		// The connection broke (or was terminated): nothing says which
		// transaction, if any, is at fault.
		p.s.broken = true
		return p.lost(err)
	}
	if c == nil || c.barrier {
		return p.lost(err)
	}
	if lastCommit >= p.committed {
		// Commits whose barrier did not run: make them durable now (the
		// failed transaction is still open).
		if _, ferr := pc.Exec(ctx, rollback(pc)+barrierSQL).ReadAll(); ferr != nil {
			if !errors.As(ferr, &pgErr) || pc.IsClosed() {
				p.s.broken = true
			}
			return p.lost(fmt.Errorf("flush the commits before a failed statement: %w (the statement: %v)", ferr, err))
		}
		p.durable(lastCommit, false)
	}
	if p.committed != c.txn {
		return p.lost(err)
	}
	t := p.txns[c.txn]
	table, op := "", decode.Op(0)
	if c.change >= 0 && c.change < len(t.Changes) {
		ch := &t.Changes[c.change]
		table, op = relName(ch), ch.Op
	} else {
		table = errTable(err)
	}
	return p.a.fail(p.s, t, table, op, err)
}

// lost is the error of a failure that is no transaction's own (a broken
// connection, a failed barrier): retryable, about the first transaction
// not known durable and none of its changes.
func (p *pipeline) lost(err error) error {
	return lostError(p.txns[min(p.committed, len(p.txns)-1)], err)
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
		a.staleSchema(e, t)
	}
	return e
}

// staleSchema makes e retryable the first time a transaction meets it when
// e may come from descriptions cached before a local schema change (a
// column's type changed, 42804; a prepared statement's plan or result no
// longer fits, 0A000; a statement gone with its connection, 26000; a
// table renamed here, 42P01 from the server, whose rows renamedTable then
// maps): the
// caches are dropped by then, so applying the transaction again builds its
// statements from the catalog as it is now. If the same transaction fails
// so again, the error stands and its policy decides.
func (a *Applier) staleSchema(e *Error, t *decode.Txn) {
	if e.Retryable || t == nil || (e.SQLState != "42804" && e.SQLState != "0A000" && e.SQLState != "26000" && e.SQLState != "42P01") {
		return
	}
	var pgErr *pgconn.PgError
	if e.SQLState == "42P01" && !errors.As(e.Err, &pgErr) {
		// Found missing in the catalog just now, not by a statement
		// prepared before: nothing stale to refresh.
		return
	}
	lsn := t.EndLSN.String()
	a.mu.Lock()
	if a.staleRetried == nil {
		a.staleRetried = map[string]string{}
	}
	again := a.staleRetried[t.Origin] == lsn
	a.staleRetried[t.Origin] = lsn
	a.mu.Unlock()
	if again {
		return
	}
	e.Retryable = true
	e.Err = fmt.Errorf("%w (the target's schema may have changed since it was read; applying again with a fresh description)", e.Err)
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
	s := &session{a: a, conn: conn, origin: decode.OriginName(sourceRegion)}
	defer s.release()
	pc := conn.Conn().PgConn()
	killed := 0
	for attempt := 0; attempt < 20; attempt++ {
		// An origin that does not exist yet has no holder; asking for it
		// would be an ERROR in the server log.
		res := pc.ExecParams(ctx, "SELECT pg_replication_origin_session_setup($1) FROM pg_catalog.pg_replication_origin WHERE roname = $1",
			[][]byte{[]byte(s.origin)}, nil, nil, nil).Read()
		err := res.Err
		if err == nil && len(res.Rows) == 0 {
			return killed, nil
		}
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
		pid, found := OriginHolder(err)
		if !found {
			return killed, fmt.Errorf("apply fence %s: no PID in %q: %w", sourceRegion, pgErr.Message, ErrBusy)
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
