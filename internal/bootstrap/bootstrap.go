package bootstrap

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/scope"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Peer is another region: its database and its replication slot.
type Peer struct {
	Region string
	DSN    string // may hold a password; never logged
	Slot   string // default "prism_<region>"
}

// Config describes one run: copy Source into the target region's database.
type Config struct {
	Region      string // the target region
	DSN         string // the target region's database
	Slot        string // the target region's slot (dropped by Force); default "prism_<region>"
	Publication string // default "prism"
	// Source is the region copied from; it must be one of Peers.
	Source string
	// Peers are every other region. The target's origin of each is set so
	// that streaming from it resumes exactly after the copy.
	Peers []Peer
	// Force replaces a target whose published tables hold rows.
	Force bool
	// Jobs is the number of tables copied in parallel (default 4).
	Jobs int
	// MaxRate limits the rows copied per second over all jobs (0: none).
	MaxRate int
	// Scope is what the target region may hold; nil copies everything.
	// Excluded tables are not copied, excluded columns keep the target's
	// defaults, and only rows that satisfy the row filter are copied.
	Scope *scope.Scope
}

// Result describes a finished run.
type Result struct {
	Source string
	// Snapshot is the source's consistent point: every source transaction
	// ending at or before it is in the copy, none after it.
	Snapshot pglogrepl.LSN
	// Origins is the progress set on the target per source region.
	Origins map[string]pglogrepl.LSN
	Tables  []TableStats
	// SchemaLoaded reports whether the schema was copied.
	SchemaLoaded bool
	// Replaced lists what Force replaced; Restarted reports that an
	// interrupted run was found and started over.
	Replaced  []string
	Restarted bool
	Elapsed   time.Duration
}

// TableStats is the copy of one table.
type TableStats struct {
	Table   string
	Rows    int64 // all rows copied
	Timed   int64 // rows written with their source commit time
	Bytes   int64 // binary COPY bytes read from the source
	Elapsed time.Duration
	Latest  time.Time // latest source commit time of a copied row
}

// ErrNotEmpty means the target's published tables hold rows and Force was
// not given.
var ErrNotEmpty = errors.New("target region is not empty")

// ErrNoKey means a published table has neither a primary key nor a
// replica identity, so changes to it cannot be applied by key.
var ErrNoKey = errors.New("table has no primary key or replica identity")

// ErrUnreachable means a database could not be reached.
var ErrUnreachable = errors.New("database unreachable")

// setupLockSQL is the key of the advisory lock apply's Setup takes; holding
// it keeps every new applier of the target waiting in Setup.
const setupLockSQL = "hashtext('prism.apply.setup')"

// epoch is the commit time given to rows whose source commit time is
// unknown: older than every real write, so any incoming write wins, as it
// does on the source for such rows. (Not 2000-01-01: that is PostgreSQL's
// zero timestamp, which means "now" to pg_replication_origin_xact_setup.)
var epoch = time.Date(1970, 1, 1, 0, 0, 0, 0, time.UTC)

func (c *Config) setDefaults() {
	if c.Publication == "" {
		c.Publication = "prism"
	}
	if c.Slot == "" {
		c.Slot = decode.SlotName(c.Region)
	}
	if c.Jobs <= 0 {
		c.Jobs = 4
	}
	for i := range c.Peers {
		if c.Peers[i].Slot == "" {
			c.Peers[i].Slot = decode.SlotName(c.Peers[i].Region)
		}
	}
}

func (c *Config) source() (Peer, bool) {
	for _, p := range c.Peers {
		if p.Region == c.Source {
			return p, true
		}
	}
	return Peer{}, false
}

// Run copies the source region into the target region's database and sets
// the target's replication origins; see the package documentation for the
// order and the guarantees. It is safe to run again after it failed or was
// killed: an interrupted run is detected and started over.
func Run(ctx context.Context, cfg Config, log zerolog.Logger) (*Result, error) {
	cfg.setDefaults()
	start := time.Now()
	log = log.With().Str("component", "bootstrap").Str("source", cfg.Source).Logger()
	src, err := cfg.sourcePeer()
	if err != nil {
		return nil, err
	}
	tgt, err := connect(ctx, cfg.DSN, "target region "+cfg.Region)
	if err != nil {
		return nil, err
	}
	defer tgt.Close(context.Background())
	srcConn, err := connect(ctx, src.DSN, "source region "+cfg.Source)
	if err != nil {
		return nil, err
	}
	defer srcConn.Close(context.Background())
	if err := checkClusters(ctx, srcConn, tgt, cfg); err != nil {
		return nil, err
	}
	tables, err := publishedTables(ctx, srcConn, cfg.Publication)
	if err != nil {
		return nil, fmt.Errorf("bootstrap: source region %s: %w", cfg.Source, err)
	}
	if tables, err = scopeTables(ctx, srcConn, tables, cfg.Scope, log); err != nil {
		return nil, fmt.Errorf("bootstrap: scope of region %s: %w", cfg.Region, err)
	}

	t, res, err := claimTarget(ctx, tgt, cfg, tables, log)
	if err != nil {
		return nil, err
	}
	runID, err := recordStart(ctx, tgt, cfg.Source)
	if err != nil {
		return nil, err
	}
	ws := newWriters(cfg.DSN, log)
	defer ws.close()
	if err := guardOrigins(ctx, cfg, ws); err != nil {
		return nil, err
	}
	if res.SchemaLoaded, err = prepareTarget(ctx, tgt, cfg, src, t, tables, log); err != nil {
		return nil, err
	}

	others := cfg.otherRegions()
	snap, srcs, err := snapshotSource(ctx, cfg, src, others, min(cfg.Jobs, len(tables)))
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, c := range srcs {
			c.Close(context.Background())
		}
	}()
	res.Snapshot = snap.lsn
	log.Info().Stringer("consistent_point", snap.lsn).Interface("origins", lsnStrings(snap.progress)).Msg("snapshot taken")

	if res.Tables, err = copyTables(ctx, cfg, srcs, tables, ws, log); err != nil {
		return nil, err
	}
	if err := ws.finish(); err != nil {
		return nil, err
	}
	if err := setOrigins(ctx, cfg, ws, snap, others, res, log); err != nil {
		return nil, err
	}
	if err := raiseHorizon(ctx, tgt, cfg, res.Tables); err != nil {
		return nil, err
	}
	if err := recordDone(ctx, tgt, runID, snap.lsn, res.Origins); err != nil {
		return nil, err
	}
	res.Elapsed = time.Since(start)
	log.Info().Stringer("consistent_point", snap.lsn).Interface("origins", lsnStrings(res.Origins)).
		Dur("elapsed", res.Elapsed).Msg("bootstrap done")
	return res, nil
}

// sourcePeer returns the peer to copy from, which must have a database.
func (c *Config) sourcePeer() (Peer, error) {
	src, ok := c.source()
	if !ok {
		var names []string
		for _, p := range c.Peers {
			names = append(names, p.Region)
		}
		return Peer{}, fmt.Errorf("bootstrap: region %q is not a peer of region %s (peers: %s)", c.Source, c.Region, strings.Join(names, ", "))
	}
	if src.DSN == "" {
		return Peer{}, fmt.Errorf("bootstrap: peer region %s has no database DSN to copy from", c.Source)
	}
	return src, nil
}

// otherRegions are the peer regions other than the source.
func (c *Config) otherRegions() []string {
	var others []string
	for _, p := range c.Peers {
		if p.Region != c.Source {
			others = append(others, p.Region)
		}
	}
	return others
}

// claimTarget locks the target and inspects it: it refuses a target with
// rows unless Force is given or an interrupted run left them, and starts
// the Result with what will be replaced.
func claimTarget(ctx context.Context, tgt *pgx.Conn, cfg Config, tables []*table, log zerolog.Logger) (*target, *Result, error) {
	if err := lockTarget(ctx, tgt); err != nil {
		return nil, nil, err
	}
	t, err := inspectTarget(ctx, tgt, cfg, tables)
	if err != nil {
		return nil, nil, err
	}
	res := &Result{Source: cfg.Source, Origins: map[string]pglogrepl.LSN{}, Restarted: t.unfinished}
	if len(t.rows) > 0 || t.slotExists {
		res.Replaced = t.describe(cfg.Slot)
	}
	switch {
	case len(t.rows) > 0 && !t.unfinished && !cfg.Force:
		return nil, nil, fmt.Errorf("bootstrap: %w: %s; run again with --force to replace them", ErrNotEmpty, strings.Join(res.Replaced, ", "))
	case t.unfinished:
		log.Warn().Int64("run", t.lastRun).Msg("an interrupted bootstrap was found; starting over")
	case len(t.rows) > 0:
		log.Warn().Strs("replacing", res.Replaced).Msg("--force: replacing the target's data")
	}
	return t, res, nil
}

// guardOrigins holds every peer origin in the target for the whole run.
func guardOrigins(ctx context.Context, cfg Config, ws *writers) error {
	for _, p := range cfg.Peers {
		if _, err := ws.guard(ctx, decode.OriginName(p.Region)); err != nil {
			return err
		}
	}
	return nil
}

// prepareTarget copies the schema when the target has none of the tables
// (and reports that it did), drops the target region's slot under Force,
// and checks that the target's columns take the source's.
func prepareTarget(ctx context.Context, tgt *pgx.Conn, cfg Config, src Peer, t *target, tables []*table, log zerolog.Logger) (schemaLoaded bool, err error) {
	if t.missing == len(tables) {
		log.Info().Int("tables", len(tables)).Msg("target has none of the tables: copying the schema")
		if err := loadSchema(ctx, src.DSN, cfg.DSN); err != nil {
			return false, err
		}
		schemaLoaded = true
	}
	if cfg.Force && t.slotExists {
		if _, err := tgt.Exec(ctx, "SELECT pg_drop_replication_slot($1)", cfg.Slot); err != nil {
			return schemaLoaded, fmt.Errorf("bootstrap: drop slot %s of region %s: %w", cfg.Slot, cfg.Region, err)
		}
		log.Warn().Str("slot", cfg.Slot).Msg("dropped the target region's slot")
	}
	if err := checkTargetColumns(ctx, tgt, tables); err != nil {
		return schemaLoaded, err
	}
	return schemaLoaded, nil
}

// snapshotSource exports a snapshot of the source with the other
// regions' origin progress it contains (holding those origins while it is
// taken, see originsAt) and opens jobs connections reading in it. The
// exporting connection is closed on return; the caller closes the
// returned connections.
func snapshotSource(ctx context.Context, cfg Config, src Peer, others []string, jobs int) (*snapshot, []*pgconn.PgConn, error) {
	snap, err := originsAt(ctx, src.DSN, cfg.Region, others)
	if err != nil {
		return nil, nil, err
	}
	defer snap.close()
	srcs, err := importSnapshot(ctx, src.DSN, snap, jobs)
	if err != nil {
		return nil, nil, err
	}
	return snap, srcs, nil
}

// setOrigins sets the target's origin of every peer region exactly after
// the snapshot: the source's at the snapshot's consistent point, the
// others' at the progress the snapshot contains.
func setOrigins(ctx context.Context, cfg Config, ws *writers, snap *snapshot, others []string, res *Result, log zerolog.Logger) error {
	res.Origins[cfg.Source] = snap.lsn
	for _, r := range others {
		res.Origins[r] = snap.progress[r]
	}
	checkSlots(ctx, cfg, res.Origins, log)
	for _, p := range cfg.Peers {
		if err := ws.setProgress(ctx, decode.OriginName(p.Region), res.Origins[p.Region]); err != nil {
			return err
		}
	}
	return nil
}

// raiseHorizon makes the target's clock floors consider the copied rows'
// source commit times, which may be ahead of the target's clock.
func raiseHorizon(ctx context.Context, tgt *pgx.Conn, cfg Config, stats []TableStats) error {
	var latest time.Time
	for _, st := range stats {
		if st.Latest.After(latest) {
			latest = st.Latest
		}
	}
	if latest.IsZero() {
		return nil
	}
	if err := apply.RaiseHorizon(ctx, tgt, latest); err != nil {
		return fmt.Errorf("bootstrap: target region %s: %w", cfg.Region, err)
	}
	return nil
}

func lsnStrings(m map[string]pglogrepl.LSN) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v.String()
	}
	return out
}

// connect opens a connection; errors never show the DSN's password.
func connect(ctx context.Context, dsn, what string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("bootstrap: %s: bad DSN: %s", what, redact(err.Error()))
	}
	decode.PinTextForm(&cfg.Config)
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(cctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("bootstrap: %s: %w: %s", what, ErrUnreachable, redact(err.Error()))
	}
	return conn, nil
}

// checkClusters refuses a source and target in one cluster (replication
// origins are per cluster) and settings the copy depends on.
func checkClusters(ctx context.Context, src, tgt *pgx.Conn, cfg Config) error {
	var sid, tid int64
	var sts, tts string
	if err := src.QueryRow(ctx, "SELECT system_identifier, current_setting('track_commit_timestamp') FROM pg_control_system()").Scan(&sid, &sts); err != nil {
		return fmt.Errorf("bootstrap: source region %s: %w", cfg.Source, err)
	}
	if err := tgt.QueryRow(ctx, "SELECT system_identifier, current_setting('track_commit_timestamp') FROM pg_control_system()").Scan(&tid, &tts); err != nil {
		return fmt.Errorf("bootstrap: target region %s: %w", cfg.Region, err)
	}
	if sid == tid {
		return fmt.Errorf("bootstrap: regions %s and %s use the same PostgreSQL cluster; replication origins are per cluster, so every region needs its own", cfg.Source, cfg.Region)
	}
	if sts != "on" {
		return fmt.Errorf("bootstrap: source region %s: track_commit_timestamp is off; set track_commit_timestamp = on and restart PostgreSQL", cfg.Source)
	}
	if tts != "on" {
		return fmt.Errorf("bootstrap: target region %s: track_commit_timestamp is off; set track_commit_timestamp = on and restart PostgreSQL", cfg.Region)
	}
	return nil
}

// lockTarget takes the advisory lock of apply's Setup for the life of the
// connection: new appliers of the target wait until the run ends.
func lockTarget(ctx context.Context, tgt *pgx.Conn) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		var ok bool
		if err := tgt.QueryRow(ctx, "SELECT pg_try_advisory_lock("+setupLockSQL+")").Scan(&ok); err != nil {
			return fmt.Errorf("bootstrap: lock target: %w", err)
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("bootstrap: lock target: another bootstrap (or a long applier setup) holds the lock")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// target is what the target holds before a run.
type target struct {
	missing    int              // published tables absent in the target
	rows       map[string]int64 // published tables holding rows
	slotExists bool
	unfinished bool
	lastRun    int64
}

func (t *target) describe(slot string) []string {
	var out []string
	names := make([]string, 0, len(t.rows))
	for n := range t.rows {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		out = append(out, fmt.Sprintf("table %s (%d rows)", n, t.rows[n]))
	}
	if t.slotExists {
		out = append(out, "replication slot "+slot)
	}
	return out
}

func inspectTarget(ctx context.Context, tgt *pgx.Conn, cfg Config, tables []*table) (*target, error) {
	if _, err := tgt.Exec(ctx, apply.BootstrapStateSQL); err != nil {
		return nil, fmt.Errorf("bootstrap: prepare prism.bootstrap in region %s: %w", cfg.Region, err)
	}
	t := &target{rows: map[string]int64{}}
	var state *string
	err := tgt.QueryRow(ctx, "SELECT id, state FROM prism.bootstrap ORDER BY id DESC LIMIT 1").Scan(&t.lastRun, &state)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("bootstrap: read prism.bootstrap: %w", err)
	}
	t.unfinished = state != nil && *state != "done"
	var active *bool
	err = tgt.QueryRow(ctx, "SELECT active FROM pg_replication_slots WHERE slot_name = $1", cfg.Slot).Scan(&active)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil:
		return nil, fmt.Errorf("bootstrap: read slot %s: %w", cfg.Slot, err)
	default:
		t.slotExists = true
		if active != nil && *active {
			return nil, fmt.Errorf("bootstrap: slot %s of region %s is in use: stop every node of region %s before the bootstrap", cfg.Slot, cfg.Region, cfg.Region)
		}
	}
	var missing []string
	for _, tb := range tables {
		var exists bool
		if err := tgt.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", tb.ident()).Scan(&exists); err != nil {
			return nil, fmt.Errorf("bootstrap: inspect target: %w", err)
		}
		if !exists {
			missing = append(missing, tb.name())
			continue
		}
		var n int64
		if err := tgt.QueryRow(ctx, "SELECT count(*) FROM "+tb.ident()).Scan(&n); err != nil {
			return nil, fmt.Errorf("bootstrap: count %s in target: %w", tb.name(), err)
		}
		if n > 0 {
			t.rows[tb.name()] = n
		}
	}
	t.missing = len(missing)
	if t.missing > 0 && t.missing < len(tables) {
		return nil, fmt.Errorf("bootstrap: target region %s has only some of the published tables (missing: %s); create them like in the source or drop the others", cfg.Region, strings.Join(missing, ", "))
	}
	return t, nil
}

func recordStart(ctx context.Context, tgt *pgx.Conn, source string) (int64, error) {
	var id int64
	if err := tgt.QueryRow(ctx, "INSERT INTO prism.bootstrap (source, state) VALUES ($1, 'copying') RETURNING id", source).Scan(&id); err != nil {
		return 0, fmt.Errorf("bootstrap: record start: %w", err)
	}
	return id, nil
}

func recordDone(ctx context.Context, tgt *pgx.Conn, id int64, lsn pglogrepl.LSN, origins map[string]pglogrepl.LSN) error {
	if _, err := tgt.Exec(ctx, "UPDATE prism.bootstrap SET state = 'done', finished_at = now(), snapshot = $2::pg_lsn, origins = $3 WHERE id = $1",
		id, lsn.String(), lsnStrings(origins)); err != nil {
		return fmt.Errorf("bootstrap: record done: %w", err)
	}
	return nil
}

// checkSlots warns when a peer region's slot is confirmed past the
// position set for it: unless nothing of that region's was written in
// between, its nodes do not ship to the target yet and the writes in
// between are missing there.
func checkSlots(ctx context.Context, cfg Config, origins map[string]pglogrepl.LSN, log zerolog.Logger) {
	for _, p := range cfg.Peers {
		at := origins[p.Region]
		if at == 0 || p.DSN == "" {
			continue
		}
		conn, err := connect(ctx, p.DSN, "region "+p.Region)
		if err != nil {
			log.Warn().Err(err).Str("peer_region", p.Region).Msg("cannot check the region's slot")
			continue
		}
		var s *string
		err = conn.QueryRow(ctx, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", p.Slot).Scan(&s)
		conn.Close(ctx)
		if err != nil || s == nil {
			log.Warn().AnErr("error", err).Str("peer_region", p.Region).Str("slot", p.Slot).Msg("cannot read the region's slot; make sure its nodes list region " + cfg.Region + " in their peers")
			continue
		}
		confirmed, err := pglogrepl.ParseLSN(*s)
		if err == nil && confirmed > at {
			log.Warn().Str("peer_region", p.Region).Str("slot", p.Slot).Stringer("confirmed", confirmed).Stringer("origin", at).
				Msg("the region's slot is confirmed past the copy: unless the region was idle, its nodes do not ship to " + cfg.Region + " and writes are missing there; add the region to their peers, restart them and run bootstrap again with --force")
		}
	}
}

// isCode reports whether err is a PostgreSQL error with SQLSTATE code.
func isCode(err error, code string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == code
}
