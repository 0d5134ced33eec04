package doctor

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"net"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
	"github.com/prism-cdc/prism-cdc/pkg/peers"
)

// RetainedWALWarn is the WAL a slot may retain before doctor warns.
const RetainedWALWarn = 1 << 30

// Options tune a doctor run. The zero value is the default.
type Options struct {
	// Timeout bounds each connection and probe (default 5s).
	Timeout time.Duration
	// ClientTLS is the peer client TLS configuration; nil builds it from
	// the configuration's auth.tls files.
	ClientTLS *tls.Config
}

// Run checks the node described by cfg and returns every finding. It does
// not fail: a check that cannot be made is itself a finding.
func Run(ctx context.Context, cfg *config.Config, opts Options) Report {
	if opts.Timeout <= 0 {
		opts.Timeout = 5 * time.Second
	}
	var r Report
	d := &doctor{cfg: cfg, opts: opts, rep: &r}
	localID := d.local(ctx)
	d.ddl(ctx)
	d.fallbacks(ctx, localID)
	d.schemas(ctx)
	d.peerNodes(ctx)
	return r
}

type doctor struct {
	cfg  *config.Config
	opts Options
	rep  *Report
}

func (d *doctor) connect(ctx context.Context, dsn string) (*pgx.Conn, error) {
	cctx, cancel := context.WithTimeout(ctx, d.opts.Timeout)
	defer cancel()
	c, err := pgx.Connect(cctx, dsn)
	if err != nil {
		return nil, errors.New(config.RedactDSN(err.Error()))
	}
	return c, nil
}

// local checks this region's database and returns its system identifier
// ("" when unknown).
func (d *doctor) local(ctx context.Context) string {
	db := "database " + d.cfg.Region
	conn, err := d.connect(ctx, d.cfg.Database)
	if err != nil {
		d.rep.add(Problem, db, "unreachable: "+err.Error(),
			"check the database key in "+d.cfg.Path+", that PostgreSQL runs and that pg_hba.conf admits this host and role")
		return ""
	}
	defer conn.Close(context.Background())
	d.rep.ok(db, "reachable")

	s, err := readServerFacts(ctx, conn, d.cfg.Slot)
	if err != nil {
		d.rep.add(Problem, db, "read settings: "+err.Error(), "")
		return ""
	}
	d.serverVersion(db, s.version)
	d.walSettings(db, s)
	slot := d.readSlot(ctx, conn, db)
	d.capacity(db, s, slot)
	d.replicationRole(db, s)
	d.applyPrivilege(ctx, conn, db, s.role, s.super)
	d.publication(ctx, conn, db, s.super)
	d.slotHealth(db, slot)
	d.outputPlugin(ctx, conn, db, slot, s)

	tables := d.tables(ctx, conn, db)
	d.identities(ctx, conn, db, tables)
	d.ownKeys(ctx, conn, db)
	d.triggers(ctx, conn, db, tables)
	owners := d.privileges(ctx, conn, db, s.role, tables)
	d.schemaPrivilege(ctx, conn, db, s.role, owners)
	d.eventTrigger(ctx, conn, db, s.super)
	d.applyPolicy(ctx, conn, db)
	d.sequences(ctx, conn, db)
	d.sync(ctx, conn, db)
	d.scopes(ctx, conn, db)
	return d.systemID(ctx, conn, db)
}

// serverFacts are the server settings and role attributes local judges.
type serverFacts struct {
	version                        int
	walLevel, trackTS, role        string
	maxSlots, maxSenders, usedSlot int // usedSlot: slots other than slot
	senders                        int
	repl, super                    bool
}

// readServerFacts reads the server's settings and the current role's
// attributes; slot is this region's slot, not counted in usedSlot.
func readServerFacts(ctx context.Context, conn *pgx.Conn, slot string) (serverFacts, error) {
	var s serverFacts
	err := conn.QueryRow(ctx, `SELECT current_setting('server_version_num')::int, current_setting('wal_level'),
		current_setting('track_commit_timestamp'), current_user,
		current_setting('max_replication_slots')::int, current_setting('max_wal_senders')::int,
		(SELECT count(*) FROM pg_replication_slots WHERE slot_name <> $1)::int,
		(SELECT count(*) FROM pg_stat_replication)::int,
		r.rolreplication, r.rolsuper FROM pg_roles r WHERE r.rolname = current_user`, slot).
		Scan(&s.version, &s.walLevel, &s.trackTS, &s.role, &s.maxSlots, &s.maxSenders, &s.usedSlot, &s.senders, &s.repl, &s.super)
	return s, err
}

// serverVersion checks the PostgreSQL version (server_version_num).
func (d *doctor) serverVersion(db string, version int) {
	switch {
	case version < 140000:
		d.rep.add(Problem, db+": server version", fmt.Sprintf("PostgreSQL %d.%d is too old; prism-cdc needs 14 or later (tested on 15)", version/10000, version%10000), "upgrade PostgreSQL to 15 or later")
	case version < 150000:
		d.rep.add(Warn, db+": server version", fmt.Sprintf("PostgreSQL %d; prism-cdc is tested on 15", version/10000), "upgrade PostgreSQL to 15 or later")
	default:
		d.rep.ok(db+": server version", fmt.Sprintf("PostgreSQL %d.%d", version/10000, version%10000))
	}
}

// walSettings checks wal_level and track_commit_timestamp.
func (d *doctor) walSettings(db string, s serverFacts) {
	if s.walLevel != "logical" {
		d.rep.add(Problem, db+": wal_level", fmt.Sprintf("wal_level is %q; logical replication needs logical", s.walLevel),
			"ALTER SYSTEM SET wal_level = logical;  -- then restart PostgreSQL")
	} else {
		d.rep.ok(db+": wal_level", "logical")
	}
	if s.trackTS != "on" {
		d.rep.add(Warn, db+": track_commit_timestamp", "off: last_write_wins cannot compare the local commit time of a conflicting row (the incoming change wins)",
			"ALTER SYSTEM SET track_commit_timestamp = on;  -- then restart PostgreSQL")
	} else {
		d.rep.ok(db+": track_commit_timestamp", "on")
	}
}

// slotFacts describe this region's slot; exists is false when there is
// none (or it could not be read).
type slotFacts struct {
	exists, active    bool
	plugin, walStatus string
	retained          *int64 // bytes of WAL behind restart_lsn
}

// readSlot reads this region's slot; a failure to read it is a warning.
func (d *doctor) readSlot(ctx context.Context, conn *pgx.Conn, db string) slotFacts {
	var sl slotFacts
	err := conn.QueryRow(ctx, `SELECT true, coalesce(plugin, ''), active, coalesce(wal_status, ''),
		pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
		FROM pg_replication_slots WHERE slot_name = $1`, d.cfg.Slot).Scan(&sl.exists, &sl.plugin, &sl.active, &sl.walStatus, &sl.retained)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		d.rep.add(Warn, db+": slot "+d.cfg.Slot, "read slot: "+err.Error(), "")
	}
	return sl
}

// capacity checks that a slot and a WAL sender are free for the node.
func (d *doctor) capacity(db string, s serverFacts, slot slotFacts) {
	if !slot.exists && s.usedSlot >= s.maxSlots {
		d.rep.add(Problem, db+": max_replication_slots", fmt.Sprintf("all %d replication slots are taken by other consumers; slot %s cannot be created", s.maxSlots, d.cfg.Slot),
			fmt.Sprintf("ALTER SYSTEM SET max_replication_slots = %d;  -- then restart PostgreSQL (or drop an unused slot: SELECT pg_drop_replication_slot('<name>'))", s.usedSlot+2))
	} else {
		d.rep.ok(db+": max_replication_slots", fmt.Sprintf("%d, %d used by other consumers", s.maxSlots, s.usedSlot))
	}
	need := 1
	if slot.active {
		need = 0 // prism-cdc's own sender is already counted
	}
	if s.senders+need > s.maxSenders {
		d.rep.add(Problem, db+": max_wal_senders", fmt.Sprintf("all %d WAL senders are in use", s.maxSenders),
			fmt.Sprintf("ALTER SYSTEM SET max_wal_senders = %d;  -- then restart PostgreSQL", s.senders+2))
	} else {
		d.rep.ok(db+": max_wal_senders", fmt.Sprintf("%d, %d in use", s.maxSenders, s.senders))
	}
}

// replicationRole checks that the role may stream the slot.
func (d *doctor) replicationRole(db string, s serverFacts) {
	if !s.repl && !s.super {
		d.rep.add(Problem, db+": role "+s.role, "has no REPLICATION privilege; it cannot stream the slot",
			fmt.Sprintf("ALTER ROLE %s WITH REPLICATION;", qident(s.role)))
	} else {
		d.rep.ok(db+": role "+s.role, "may replicate")
	}
}

// publication checks the publication, or that the node can create it.
func (d *doctor) publication(ctx context.Context, conn *pgx.Conn, db string, super bool) {
	pub := d.cfg.Publication
	var exists, allTables bool
	err := conn.QueryRow(ctx, `SELECT true, puballtables FROM pg_publication WHERE pubname = $1`, pub).Scan(&exists, &allTables)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		d.rep.add(Warn, db+": publication "+pub, "read publication: "+err.Error(), "")
	}
	switch {
	case exists:
		d.rep.ok(db+": publication "+pub, map[bool]string{true: "exists, FOR ALL TABLES", false: "exists, with a table list"}[allTables])
	case super:
		d.rep.ok(db+": publication "+pub, "does not exist yet; the node creates it FOR ALL TABLES at its first start")
	default:
		d.rep.add(Problem, db+": publication "+pub, "does not exist, and the role is not a superuser, which PostgreSQL 15 requires to create it FOR ALL TABLES",
			fmt.Sprintf("CREATE PUBLICATION %s FOR ALL TABLES;  -- as a superuser", qident(pub)))
	}
}

// slotHealth checks the slot's plugin and how much WAL it retains.
func (d *doctor) slotHealth(db string, sl slotFacts) {
	cfg, check := d.cfg, db+": slot "+d.cfg.Slot
	switch {
	case !sl.exists:
		d.rep.ok(check, "does not exist yet; the node creates it at its first start")
	case sl.plugin != decode.PluginPgoutput && sl.plugin != decode.PluginPrism:
		d.rep.add(Problem, check, fmt.Sprintf("uses plugin %q, not pgoutput or prism_pgoutput", sl.plugin),
			fmt.Sprintf("SELECT pg_drop_replication_slot('%s');  -- the node recreates it (changes since it was last read are not shipped)", cfg.Slot))
	case sl.walStatus == "lost":
		d.rep.add(Problem, check, "wal_status is lost: WAL the slot needs was removed (max_slot_wal_keep_size); changes since were not shipped",
			fmt.Sprintf("SELECT pg_drop_replication_slot('%s');  -- then resynchronise the regions (prism-cdc verify --repair) and restart the nodes", cfg.Slot))
	default:
		msg := fmt.Sprintf("plugin %s, wal_status %s, retains %s of WAL", sl.plugin, orNone(sl.walStatus), bytesText(sl.retained))
		if sl.active {
			msg += ", streaming"
		} else {
			msg += ", not streaming (no node of the region reads it)"
		}
		switch {
		case sl.walStatus == "unreserved":
			d.rep.add(Warn, check, msg+"; the WAL it needs is about to be removed", "start a node of region "+cfg.Region+" and make sure every peer region acknowledges (prism-cdc status)")
		case sl.retained != nil && *sl.retained > RetainedWALWarn:
			d.rep.add(Warn, check, msg+"; a region that does not acknowledge pins WAL on disk", "prism-cdc status --config "+cfg.Path+"  -- find the region that lags and bring it back")
		default:
			// What pgoutput costs before PostgreSQL 16 is the output
			// plugin check's to say.
			d.rep.ok(check, msg)
		}
	}
}

// outputPlugin checks that the server can load prism_pgoutput where the
// configuration or the slot needs it, and says what it would spare where
// the node's slot will be created or is on pgoutput before PostgreSQL 16.
// It finds out with pluginLoads; a role that can neither LOAD nor create
// a slot gets nothing said unless the plugin is required.
func (d *doctor) outputPlugin(ctx context.Context, conn *pgx.Conn, db string, sl slotFacts, s serverFacts) {
	check := db + ": output plugin"
	required := d.cfg.OutputPlugin == decode.PluginPrism && !sl.exists || sl.plugin == decode.PluginPrism
	useful := s.version < 160000 && d.cfg.OutputPlugin != decode.PluginPgoutput && (!sl.exists || sl.plugin == decode.PluginPgoutput)
	if !required && !useful {
		return
	}
	loaded, known, err := pluginLoads(ctx, conn, s)
	if err != nil {
		d.rep.add(Warn, check, "could not check whether the server can load prism_pgoutput: "+err.Error(), "")
		return
	}
	const install = "make -C contrib/prism_pgoutput install  -- on the database's host, with the server's headers (README, \"Applied transactions on PostgreSQL 15\")"
	switch {
	case required && known && !loaded:
		what := "output_plugin is prism_pgoutput"
		if sl.exists {
			what = "slot " + d.cfg.Slot + " uses prism_pgoutput"
		}
		d.rep.add(Problem, check, what+", which the server cannot load: the node stops at its start", install)
	case required && !known:
		d.rep.add(Warn, check, "prism_pgoutput is needed, and only a superuser or a role with REPLICATION (where wal_level is logical) can check that the server can load it",
			"run doctor as such a role, or check that prism_pgoutput.so is in the server's pg_config --pkglibdir")
	case required:
		d.rep.ok(check, "the server loads prism_pgoutput")
	case !known:
		// Useful only: nothing to say without knowing.
	case loaded && !sl.exists:
		d.rep.ok(check, "prism_pgoutput is installed; the node creates its slot with it")
	case loaded:
		d.rep.ok(check, "prism_pgoutput is installed, but slot "+d.cfg.Slot+" uses pgoutput, which sends the node every transaction applied here to be dropped; "+
			"to move it, drop the slot at a quiet moment (README, \"Applied transactions on PostgreSQL 15\")")
	case sl.exists:
		d.rep.ok(check, "prism_pgoutput is not installed, and slot "+d.cfg.Slot+" uses pgoutput, which before PostgreSQL 16 sends the node every transaction applied here, to be dropped; "+
			"installed, and the slot dropped at a quiet moment, it skips them (README, \"Applied transactions on PostgreSQL 15\")")
	default:
		d.rep.ok(check, "prism_pgoutput is not installed: the region's walsender will send the node every transaction applied here, to be dropped; "+
			"installed before the node creates its slot, it skips them (README, \"Applied transactions on PostgreSQL 15\")")
	}
}

// pluginProbeTimeout bounds pluginLoads' temporary slot: creating one
// waits for the transactions running at the time to end, but the server
// loads the output plugin before it waits.
const pluginProbeTimeout = "1s"

// pluginLoads reports whether the server can load prism_pgoutput (loaded)
// and whether it could find out (known). A superuser LOADs the library,
// which dlopens it in this session and checks its magic block
// (prism_pgoutput runs no code of its own when loaded); only a superuser
// may LOAD a library outside $libdir/plugins. A role with REPLICATION
// creates a temporary logical slot with the plugin instead, which loads
// it first: a missing library fails at once (58P01); a slot created, or
// a creation that outlasts pluginProbeTimeout waiting for running
// transactions, means it loaded. The slot is dropped at once, or with
// the rolled-back creation, and never outlives this session.
func pluginLoads(ctx context.Context, conn *pgx.Conn, s serverFacts) (loaded, known bool, err error) {
	var pgErr *pgconn.PgError
	switch {
	case s.super:
		_, err := conn.Exec(ctx, "LOAD 'prism_pgoutput'")
		switch {
		case err == nil:
			return true, true, nil
		case errors.As(err, &pgErr) && pgErr.Code == "58P01":
			return false, true, nil
		}
		return false, false, err
	case !s.repl || s.walLevel != "logical":
		return false, false, nil
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		return false, false, err
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	if _, err := tx.Exec(ctx, "SET LOCAL statement_timeout = '"+pluginProbeTimeout+"'"); err != nil {
		return false, false, err
	}
	_, err = tx.Exec(ctx, `SELECT pg_catalog.pg_create_logical_replication_slot('prism_doctor_' || pg_catalog.pg_backend_pid(), 'prism_pgoutput', true);
		SELECT pg_catalog.pg_drop_replication_slot('prism_doctor_' || pg_catalog.pg_backend_pid())`)
	switch {
	case err == nil:
		return true, true, tx.Commit(ctx)
	case errors.As(err, &pgErr) && pgErr.Code == "58P01":
		return false, true, nil
	case ctx.Err() != nil:
		return false, false, err
	case errors.As(err, &pgErr) && pgErr.Code == "57014":
		return true, true, nil // cancelled while it waited: the plugin loaded
	}
	return false, false, err
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

func bytesText(n *int64) string {
	if n == nil {
		return "no"
	}
	v := float64(*n)
	for _, u := range []string{"B", "KiB", "MiB", "GiB"} {
		if v < 1024 || u == "GiB" {
			if u == "B" {
				return fmt.Sprintf("%d B", *n)
			}
			return fmt.Sprintf("%.1f %s", v, u)
		}
		v /= 1024
	}
	return ""
}

// schemaPrivilege checks the role can create or use schema prism. owners
// are the roles the privileges check asks to grant to the role: when one
// of them has what is missing here, that grant covers it and no other fix
// is printed.
func (d *doctor) schemaPrivilege(ctx context.Context, conn *pgx.Conn, db, role string, owners []string) {
	var exists, usable, create bool
	err := conn.QueryRow(ctx, `SELECT n.oid IS NOT NULL,
		coalesce(has_schema_privilege(n.oid, 'USAGE,CREATE'), false),
		has_database_privilege(current_database(), 'CREATE')
		FROM (SELECT 1) x LEFT JOIN pg_namespace n ON n.nspname = 'prism'`).Scan(&exists, &usable, &create)
	if err != nil {
		d.rep.add(Warn, db+": schema prism", "read privileges: "+err.Error(), "")
		return
	}
	for _, o := range owners {
		if usable || (!exists && create) {
			break
		}
		var oUsable, oCreate bool
		err := conn.QueryRow(ctx, `SELECT coalesce(has_schema_privilege($1, n.oid, 'USAGE,CREATE'), false),
			has_database_privilege($1, current_database(), 'CREATE')
			FROM (SELECT 1) x LEFT JOIN pg_namespace n ON n.nspname = 'prism'`, o).Scan(&oUsable, &oCreate)
		if err == nil && (exists && oUsable || !exists && oCreate) {
			d.rep.ok(db+": schema prism", fmt.Sprintf("usable once role %s is granted %s (see the privileges above)", role, o))
			return
		}
	}
	ident := qident(role)
	switch {
	case exists && !usable:
		d.rep.add(Problem, db+": schema prism", "exists but role "+role+" may not use it", "GRANT USAGE, CREATE ON SCHEMA prism TO "+ident+";")
	case !exists && !create:
		d.rep.add(Problem, db+": schema prism", "does not exist and role "+role+" may not create it", "GRANT CREATE ON DATABASE "+qident(d.dbName(ctx, conn))+" TO "+ident+";")
	default:
		d.rep.ok(db+": schema prism", "usable")
	}
}

// originFuncs are the replication origin functions applying needs; by
// default only superusers may execute them.
var originFuncs = []string{
	"pg_replication_origin_create(text)",
	"pg_replication_origin_session_setup(text)",
	"pg_replication_origin_session_reset()",
	"pg_replication_origin_session_progress(boolean)",
	"pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone)",
	"pg_replication_origin_progress(text, boolean)",
	"pg_replication_origin_advance(text, pg_lsn)",
}

// applyPrivilege checks what applying other regions' transactions needs
// besides table privileges: the replication origin functions and setting
// session_replication_role (applied transactions run as replica, like
// PostgreSQL's own apply worker). A superuser has both.
func (d *doctor) applyPrivilege(ctx context.Context, conn *pgx.Conn, db, role string, super bool) {
	if super {
		d.rep.ok(db+": apply privileges", "superuser")
		return
	}
	var fixes, missing []string
	var grant []string
	for _, f := range originFuncs {
		var ok bool
		if err := conn.QueryRow(ctx, "SELECT has_function_privilege($1, 'EXECUTE')", f).Scan(&ok); err != nil {
			d.rep.add(Warn, db+": apply privileges", "read privileges: "+err.Error(), "")
			return
		}
		if !ok {
			missing = append(missing, "EXECUTE on "+f)
			grant = append(grant, f)
		}
	}
	if len(grant) > 0 {
		fixes = append(fixes, "GRANT EXECUTE ON FUNCTION "+strings.Join(grant, ", ")+" TO "+qident(role)+";")
	}
	// Which parameters the role may SET: session_replication_role is
	// needed; apply sessions lower deadlock_timeout when they may (see
	// apply.sessionSettingsSQL), and batches keep their expected failures
	// out of the server log when they may set log_min_messages (see
	// apply.batchSetupSQL), which is suggested with the other grants and,
	// alone, as the fix of an ok finding.
	may := map[string]bool{}
	for _, param := range []string{"session_replication_role", "deadlock_timeout", "log_min_messages"} {
		var ok bool
		if err := conn.QueryRow(ctx, "SELECT has_parameter_privilege($1, 'SET')", param).Scan(&ok); err != nil {
			d.rep.add(Warn, db+": apply privileges", "read privileges: "+err.Error(), "")
			return
		}
		may[param] = ok
		if !ok {
			fixes = append(fixes, "GRANT SET ON PARAMETER "+param+" TO "+qident(role)+";")
		}
	}
	if !may["session_replication_role"] {
		missing = append(missing, "SET on session_replication_role")
	}
	deadlock := may["deadlock_timeout"]
	if len(missing) > 0 {
		d.rep.add(Problem, db+": apply privileges", fmt.Sprintf("role %s lacks %s: transactions from other regions cannot be applied", role, strings.Join(missing, ", ")),
			strings.Join(fixes, "  ")+"  -- as a superuser")
		return
	}
	if !deadlock {
		d.rep.add(Warn, db+": apply privileges", fmt.Sprintf("role %s cannot set deadlock_timeout: a deadlock between an applied and a local transaction (or two applied ones) holds both for the server's deadlock_timeout, and may cancel the local one, instead of cancelling the applied one after %s", role, apply.DeadlockTimeout),
			strings.Join(fixes, "  ")+"  -- as a superuser")
		return
	}
	if !may["log_min_messages"] {
		d.rep.add(OK, db+": apply privileges", "replication origins, session_replication_role and deadlock_timeout granted; "+
			"without SET on log_min_messages, a batch of applied transactions that rolls back (expected on rows written in several regions) is an ERROR in the server log",
			strings.Join(fixes, "  ")+"  -- optional, as a superuser")
		return
	}
	d.rep.ok(db+": apply privileges", "replication origins, session_replication_role and deadlock_timeout granted")
}

func (d *doctor) dbName(ctx context.Context, conn *pgx.Conn) string {
	var name string
	_ = conn.QueryRow(ctx, "SELECT current_database()").Scan(&name)
	return name
}

// table is one replicated table.
type table struct {
	oid      uint32
	name     string // schema.table, quoted as needed
	identity byte   // relreplident
	hasKey   bool   // primary key or replica identity index
}

// tables lists the replicated tables.
func (d *doctor) tables(ctx context.Context, conn *pgx.Conn, db string) []table {
	out, err := listTables(ctx, conn, d.cfg.Publication)
	if err != nil {
		d.rep.add(Warn, db+": tables", err.Error(), "")
		return nil
	}
	if len(out) == 0 {
		d.rep.add(Warn, db+": tables", "no table is replicated", "create the application's tables in every region (schema changes are not replicated)")
	}
	return out
}

// identities checks that every replicated table can be replicated:
// without a key or replica identity the source refuses UPDATE and DELETE.
func (d *doctor) identities(_ context.Context, _ *pgx.Conn, db string, tables []table) {
	good := 0
	for _, t := range tables {
		check := db + ": table " + t.name
		switch {
		case t.identity == 'n':
			d.rep.add(Problem, check, "REPLICA IDENTITY NOTHING: UPDATE and DELETE on it fail while it is published, and no region could find the row",
				fmt.Sprintf("ALTER TABLE %s ADD PRIMARY KEY (<key columns>);  ALTER TABLE %s REPLICA IDENTITY DEFAULT;\n-- or, without a key: ALTER TABLE %s REPLICA IDENTITY FULL;", t.name, t.name, t.name))
		case t.identity == 'd' && !t.hasKey:
			d.rep.add(Problem, check, "has no primary key and no replica identity: UPDATE and DELETE on it fail while it is published",
				fmt.Sprintf("ALTER TABLE %s ADD PRIMARY KEY (<key columns>);\n-- or, without a key: ALTER TABLE %s REPLICA IDENTITY FULL;", t.name, t.name))
		case d.cfg.OnApplyError == config.Undo && t.identity != 'f':
			d.rep.add(Warn, check, "on_apply_error is undo, which needs the whole old row: the table's replica identity is not FULL",
				fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY FULL;", t.name))
		default:
			good++
		}
	}
	if good > 0 {
		d.rep.ok(db+": keys", fmt.Sprintf("%d replicated tables have a primary key or replica identity", good))
	}
}

// ownKeyFixes are the statements that give prism-cdc's own tables the key
// a node's start adds (pkg/apply) when an earlier version made them
// without one.
var ownKeyFixes = map[string]string{
	"prism.clock_floors": "ALTER TABLE prism.clock_floors ADD COLUMN id bigserial PRIMARY KEY;",
}

// ownKeys checks that every table of schema prism has a key or replica
// identity: the publication (FOR ALL TABLES) includes them, and without
// one PostgreSQL rejects their UPDATE and DELETE (55000), so old clock
// floors are never removed.
func (d *doctor) ownKeys(ctx context.Context, conn *pgx.Conn, db string) {
	rows, err := conn.Query(ctx, `SELECT format('%I.%I', n.nspname, c.relname), c.relreplident = 'f'
		OR (c.relreplident <> 'n' AND EXISTS (SELECT 1 FROM pg_catalog.pg_index i
			WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident)))
		FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'prism' AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1`)
	if err != nil {
		d.rep.add(Warn, db+": keys of schema prism", "read: "+err.Error(), "")
		return
	}
	type own struct {
		name  string
		keyed bool
	}
	tables, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (own, error) {
		var t own
		err := r.Scan(&t.name, &t.keyed)
		return t, err
	})
	if err != nil {
		d.rep.add(Warn, db+": keys of schema prism", "read: "+err.Error(), "")
		return
	}
	good := 0
	for _, t := range tables {
		if t.keyed {
			good++
			continue
		}
		fix, ok := ownKeyFixes[t.name]
		if !ok {
			fix = fmt.Sprintf("ALTER TABLE %s ADD PRIMARY KEY (<key columns>);\n-- or, without a key: ALTER TABLE %s REPLICA IDENTITY FULL;", t.name, t.name)
		}
		d.rep.add(Problem, db+": table "+t.name, "has no primary key and no replica identity, and the publication includes it: its UPDATE and DELETE fail (55000), so old entries are never removed",
			"restart a node of region "+d.cfg.Region+" (its start adds the key), or as the table's owner: "+fix)
	}
	if good > 0 {
		d.rep.ok(db+": keys of schema prism", fmt.Sprintf("%d tables of prism-cdc have a primary key or replica identity", good))
	}
}

// triggers checks the conflict triggers (prism_clock, prism_tombstone)
// that the node installs on every table with a key, whatever its replica
// identity: without them last_write_wins does not see local deletes or a
// lagging clock.
func (d *doctor) triggers(ctx context.Context, conn *pgx.Conn, db string, tables []table) {
	var schema bool
	if err := conn.QueryRow(ctx, "SELECT to_regnamespace('prism') IS NOT NULL").Scan(&schema); err != nil {
		d.rep.add(Warn, db+": conflict triggers", "read: "+err.Error(), "")
		return
	}
	if !schema {
		d.rep.ok(db+": conflict triggers", "not installed yet; the node installs them on every table with a key at its first start")
		return
	}
	var missing []string
	keyed := 0
	for _, t := range tables {
		if !t.hasKey || t.identity == 'n' {
			continue
		}
		keyed++
		var n int
		err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = $1::regclass AND tgname IN ('prism_clock', 'prism_tombstone')", t.name).Scan(&n)
		if err != nil {
			d.rep.add(Warn, db+": conflict triggers", "read: "+err.Error(), "")
			return
		}
		if n != 2 {
			missing = append(missing, t.name)
		}
	}
	switch {
	case len(missing) > 0:
		d.rep.add(Warn, db+": conflict triggers", fmt.Sprintf("missing on %s: last_write_wins there does not see local deletes or a lagging clock", strings.Join(missing, ", ")),
			"restart the node (it installs them at start), or as a superuser: SELECT prism.install_all();")
	default:
		d.rep.ok(db+": conflict triggers", fmt.Sprintf("on all %d tables with a key", keyed))
	}
}

// privileges checks that the role may read and write every replicated
// table (the applier writes other regions' changes into them) and may
// create the conflict triggers on every table with a key, which takes the
// table's owner or a member of it. It prints the smallest complete set of
// fixes in one pass: membership in a table's owner also gives the owner's
// privileges on it, so no GRANT on the table is asked for next to it, and
// tables that need the same statement share one finding. It returns the
// existing roles it asks to grant to the role.
func (d *doctor) privileges(ctx context.Context, conn *pgx.Conn, db, role string, tables []table) []string {
	fixes := &fixGroups{byKey: map[string]*fixGroup{}}
	var owners []string
	good := 0
	for _, t := range tables {
		missing, err := missingPrivileges(ctx, conn, t.oid)
		if err != nil {
			d.rep.add(Warn, db+": privileges on "+t.name, err.Error(), "")
			return owners
		}
		o, err := readOwner(ctx, conn, t.oid, missing)
		if err != nil {
			d.rep.add(Warn, db+": privileges on "+t.name, err.Error(), "")
			continue
		}
		if !fixes.plan(t, missing, o, role, &owners) {
			good++
		}
	}
	for _, k := range fixes.order {
		g := fixes.byKey[k]
		msg := g.msg
		if len(g.lacks) > 0 {
			msg += "; it also lacks " + strings.Join(g.lacks, "; ") + " (the fix gives those too)"
		}
		d.rep.add(Problem, db+": privileges on "+strings.Join(g.tables, ", "), msg, g.fix(g.tables))
	}
	if good > 0 {
		d.rep.ok(db+": privileges", fmt.Sprintf("role %s may read and write %d replicated tables", role, good))
	}
	return owners
}

// missingPrivileges returns which of SELECT, INSERT, UPDATE and DELETE the
// current role lacks on table oid.
func missingPrivileges(ctx context.Context, conn *pgx.Conn, oid uint32) ([]string, error) {
	var missing []string
	for _, p := range []string{"SELECT", "INSERT", "UPDATE", "DELETE"} {
		var ok bool
		if err := conn.QueryRow(ctx, "SELECT has_table_privilege($1::oid, $2)", oid, p).Scan(&ok); err != nil {
			return nil, err
		}
		if !ok {
			missing = append(missing, p)
		}
	}
	return missing, nil
}

// tableOwner is a table's owner as the fixes need it.
type tableOwner struct {
	name   string
	member bool // the current role is a member of the owner
	super  bool // the owner is a superuser
	has    bool // the owner holds every missing privilege
}

// readOwner reads table oid's owner. The node creates the conflict
// triggers on tables with a key, which takes the owner (or a member of it).
func readOwner(ctx context.Context, conn *pgx.Conn, oid uint32, missing []string) (tableOwner, error) {
	var o tableOwner
	err := conn.QueryRow(ctx, `SELECT c.relowner::regrole::text, pg_has_role(c.relowner, 'USAGE'), r.rolsuper,
			coalesce(bool_and(has_table_privilege(c.relowner, c.oid, p)), true)
		FROM pg_catalog.pg_class c JOIN pg_catalog.pg_roles r ON r.oid = c.relowner
		LEFT JOIN unnest($2::text[]) p ON true
		WHERE c.oid = $1 GROUP BY c.relowner, r.rolsuper`, oid, missing).Scan(&o.name, &o.member, &o.super, &o.has)
	return o, err
}

// fixGroups gathers the tables that need the same fix, in the order their
// fixes were first needed.
type fixGroups struct {
	order []string
	byKey map[string]*fixGroup
}

type fixGroup struct {
	tables []string
	lacks  []string // "INSERT, DELETE on public.t" per table that lacks privileges
	fix    func(tables []string) string
	msg    string
}

func (g *fixGroups) add(key, table string, missing []string, msg string, fix func([]string) string) {
	f := g.byKey[key]
	if f == nil {
		f = &fixGroup{msg: msg, fix: fix}
		g.byKey[key] = f
		g.order = append(g.order, key)
	}
	f.tables = append(f.tables, table)
	if len(missing) > 0 {
		f.lacks = append(f.lacks, strings.Join(missing, ", ")+" on "+table)
	}
}

// plan files the fix table t needs, given the privileges role lacks on it
// and its owner, and adds to owners an owner it asks to grant to role. It
// reports whether t needs a fix.
func (g *fixGroups) plan(t table, missing []string, o tableOwner, role string, owners *[]string) bool {
	ident := qident(role)
	switch {
	case t.hasKey && !o.member && o.super:
		// Membership in a superuser role is not what to hand out; the
		// new owner has every privilege on the table.
		g.add("app_owner", t.name, missing, fmt.Sprintf("role %s is not the owner %s nor a member of it, so it cannot create the conflict triggers, and applying fails", role, o.name),
			func(ts []string) string {
				var b strings.Builder
				for _, n := range ts {
					fmt.Fprintf(&b, "ALTER TABLE %s OWNER TO app_owner; ", n)
				}
				return b.String() + "GRANT app_owner TO " + ident + ";  -- app_owner: a role of your own that owns the application's tables"
			})
	case t.hasKey && !o.member:
		key := "owner " + o.name
		if len(missing) > 0 && !o.has {
			key += " grant " + strings.Join(missing, ", ")
		}
		if _, seen := g.byKey[key]; !seen && !slices.Contains(*owners, o.name) {
			*owners = append(*owners, o.name)
		}
		grant := missing
		if o.has {
			grant = nil // the membership gives them
		}
		g.add(key, t.name, missing, fmt.Sprintf("role %s is not the owner %s nor a member of it, so it cannot create the conflict triggers, and applying fails", role, o.name),
			func(ts []string) string {
				fix := fmt.Sprintf("GRANT %s TO %s;", o.name, ident)
				if len(grant) > 0 {
					fix += fmt.Sprintf("  GRANT %s ON %s TO %s;", strings.Join(grant, ", "), strings.Join(ts, ", "), ident)
				}
				return fix
			})
	case len(missing) > 0:
		g.add("grant "+strings.Join(missing, ", "), t.name, nil, fmt.Sprintf("role %s lacks %s: changes from other regions cannot be applied", role, strings.Join(missing, ", ")),
			func(ts []string) string {
				return fmt.Sprintf("GRANT %s ON %s TO %s;", strings.Join(missing, ", "), strings.Join(ts, ", "), ident)
			})
	default:
		return false
	}
	return true
}

// eventTrigger checks event trigger prism_install, which installs the
// conflict triggers on tables created (or altered) after the node
// started. Creating an event trigger takes a superuser: without it the
// node installs them on every table only when it starts
// (prism.install_all), so a table created meanwhile has none until a node
// of the region restarts.
func (d *doctor) eventTrigger(ctx context.Context, conn *pgx.Conn, db string, super bool) {
	check := db + ": event trigger prism_install"
	var exists, onDDL bool
	err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'prism_install'),
		to_regprocedure('prism.on_ddl()') IS NOT NULL`).Scan(&exists, &onDDL)
	switch {
	case err != nil:
		d.rep.add(Warn, check, "read: "+err.Error(), "")
	case exists:
		d.rep.ok(check, "installs the conflict triggers on tables created later")
	case super:
		d.rep.ok(check, "not installed yet; the node creates it at its first start")
	default:
		fix := "-- as a superuser, in this database:\n" + eventTriggerFix
		if !onDDL {
			fix = "-- start a node of region " + d.cfg.Region + " once (it creates prism.on_ddl()), then as a superuser, in this database:\n" + eventTriggerFix
		}
		d.rep.add(Warn, check, "missing, and the role is not a superuser, which creating it takes: a table created from now on gets its conflict triggers (prism_clock, prism_tombstone) only when a running node of the region next looks for such tables (once a minute); until then last_write_wins there does not see local deletes or a lagging clock (every node start warns \"cannot create event trigger prism_install\")",
			fix+"\n-- or, without it, leave a node of the region running: it installs them within a minute of a CREATE TABLE")
	}
}

// applyPolicy compares the on_apply_error recorded in the database (by the
// region's node that started last; other regions' direct-SQL fallbacks
// follow it) with this node's.
func (d *doctor) applyPolicy(ctx context.Context, conn *pgx.Conn, db string) {
	check := db + ": on_apply_error recorded for fallbacks"
	rec, found, err := apply.ReadRegionPolicy(ctx, conn, d.cfg.Region)
	switch {
	case err != nil:
		d.rep.add(Warn, check, err.Error(), "")
		return
	case !found:
		d.rep.ok(check, "not recorded yet; a node of region "+d.cfg.Region+" records its on_apply_error when it starts, and other regions' direct-SQL fallbacks follow it")
		return
	}
	own := config.Strings(d.cfg.OnApplyErrorTables)
	if rec.OnApplyError == string(d.cfg.OnApplyError) && maps.Equal(rec.ErrorTables, own) {
		d.rep.ok(check, fmt.Sprintf("%s (recorded by %s), as this node's", rec.OnApplyError, rec.Node))
		return
	}
	d.rep.add(Warn, check, fmt.Sprintf("node %s of region %s recorded on_apply_error %s, tables %v; this node's is %s, tables %v: other regions' direct-SQL fallbacks follow whichever node of the region started last",
		rec.Node, rec.Region, rec.OnApplyError, rec.ErrorTables, d.cfg.OnApplyError, own),
		"give every node of region "+d.cfg.Region+" the same on_apply_error and on_apply_error_tables, and restart them")
}

// peerConflicts compares the conflict policies region's nodes recorded in
// its database (conn) with this node's: regions that resolve the same
// conflict differently keep different versions of the row.
func (d *doctor) peerConflicts(ctx context.Context, conn *pgx.Conn, region, check string) {
	rec, found, err := apply.ReadRegionPolicy(ctx, conn, region)
	if err != nil || !found {
		return // nothing recorded to compare with
	}
	if rec.DDL != "" && rec.DDL != string(d.cfg.DDL) {
		d.rep.add(Warn, check, fmt.Sprintf("region %s's nodes run with ddl: %s (recorded by node %s); this node with ddl: %s: schema changes travel only between regions that all replicate them, and this node's direct-SQL fallback applies them there as region %s does",
			region, rec.DDL, rec.Node, d.cfg.DDL, region),
			"give every region's nodes the same ddl setting")
	}
	if rec.Conflicts == "" {
		return
	}
	own := config.Strings(d.cfg.Conflicts.Tables)
	if rec.Conflicts == string(d.cfg.Conflicts.Default) && maps.Equal(rec.ConflictTables, own) {
		return
	}
	d.rep.add(Warn, check, fmt.Sprintf("region %s resolves conflicts by %s, tables %v (recorded by node %s); this node by %s, tables %v: two regions that decide the same conflict differently keep different rows",
		region, rec.Conflicts, rec.ConflictTables, rec.Node, d.cfg.Conflicts.Default, own),
		"give every region the same conflicts: default and tables")
}

// eventTriggerFix is the statement the node runs at start to create event
// trigger prism_install (pkg/apply), for a superuser to run instead.
const eventTriggerFix = "CREATE EVENT TRIGGER prism_install ON ddl_command_end WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE TABLE AS', 'SELECT INTO') EXECUTE FUNCTION prism.on_ddl();"

// sequences warns about sequences that would hand out the same values in
// several regions.
func (d *doctor) sequences(ctx context.Context, conn *pgx.Conn, db string) {
	regions := Regions(d.cfg)
	if len(regions) < 2 {
		return
	}
	plan, err := planSequences(ctx, conn, d.cfg.Publication, regions, d.cfg.Region)
	if err != nil {
		d.rep.add(Warn, db+": sequences", "plan sequences: "+err.Error(), "")
		return
	}
	bad := 0
	for _, s := range plan.Sequences {
		if s.SQL == "" && s.Skip == "" {
			continue
		}
		bad++
		if s.Skip != "" {
			d.rep.add(Warn, db+": sequence "+s.Name, s.Skip, "use UUID keys for "+s.Table+"."+s.Column)
			continue
		}
		msg := fmt.Sprintf("feeds %s.%s with INCREMENT BY %d: keys generated in different regions collide", s.Table, s.Column, s.Increment)
		if s.Target == s.Next && s.StartTarget != s.Start {
			msg = fmt.Sprintf("feeds %s.%s and is interleaved, but its START WITH %d is not of this region's residue %d mod %d: after a TRUNCATE ... RESTART IDENTITY (replicated to every region) keys generated in different regions collide",
				s.Table, s.Column, s.Start, plan.Index, len(plan.Regions))
		}
		d.rep.add(Warn, db+": sequence "+s.Name, msg,
			s.SQL+"\n-- or for every sequence at once: prism-cdc sequences --config "+d.cfg.Path+" --apply (in every region)")
	}
	if bad == 0 && len(plan.Sequences) > 0 {
		d.rep.ok(db+": sequences", fmt.Sprintf("%d sequences interleaved across %d regions", len(plan.Sequences), len(regions)))
	}
}

// sync prints the synchronous_standby_names line the sync mode needs.
func (d *doctor) sync(ctx context.Context, conn *pgx.Conn, db string) {
	var names, commit string
	if err := conn.QueryRow(ctx, "SELECT current_setting('synchronous_standby_names'), current_setting('synchronous_commit')").Scan(&names, &commit); err != nil {
		d.rep.add(Warn, db+": sync", err.Error(), "")
		return
	}
	app := decode.AppName(d.cfg.Node)
	named := strings.Contains(names, app)
	check := db + ": sync " + d.cfg.Sync.String()
	if d.cfg.Sync.Mode == config.SyncOff || d.cfg.Sync.Mode == "" {
		if named {
			d.rep.add(Warn, check, fmt.Sprintf("sync is off but synchronous_standby_names = '%s' names %s: local commits wait for other regions", names, app),
				"ALTER SYSTEM SET synchronous_standby_names = '';  SELECT pg_reload_conf();")
			return
		}
		d.rep.ok(check, "commits do not wait for other regions")
		return
	}
	// Only the node holding the slot streams, so one standby is waited
	// for: the reader reports as flushed only what the regions the mode
	// requires have acknowledged.
	line := fmt.Sprintf("synchronous_standby_names = 'ANY 1 (%s)'", app)
	fix := fmt.Sprintf("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (%s)';  SELECT pg_reload_conf();\n-- list %s of every node of region %s, e.g. 'ANY 1 (%s, %s)'; synchronous_commit must be on or remote_apply",
		app, decode.AppName("<node>"), d.cfg.Region, app, decode.AppName("<other node>"))
	switch {
	case !named:
		d.rep.add(Warn, check, fmt.Sprintf("needs %s, but it is '%s': commits do not wait for other regions", line, names), fix)
	case commit != "on" && commit != "remote_apply" && commit != "remote_write":
		d.rep.add(Warn, check, fmt.Sprintf("synchronous_commit is %s: commits do not wait", commit), "ALTER SYSTEM SET synchronous_commit = on;  SELECT pg_reload_conf();")
	default:
		d.rep.ok(check, fmt.Sprintf("synchronous_standby_names = '%s'", names))
	}
}

// systemID returns the cluster's system identifier, or "".
func (d *doctor) systemID(ctx context.Context, conn *pgx.Conn, db string) string {
	var id string
	if err := conn.QueryRow(ctx, "SELECT system_identifier::text FROM pg_control_system()").Scan(&id); err != nil {
		d.rep.add(Warn, db+": cluster", "cannot read the system identifier ("+err.Error()+"); make sure every region has its own PostgreSQL cluster",
			"GRANT pg_monitor TO <role>;  -- lets doctor compare clusters")
		return ""
	}
	return id
}

// fallbacks checks every peer region's fallback database and that it is
// not the local cluster.
func (d *doctor) fallbacks(ctx context.Context, localID string) {
	for _, p := range d.cfg.Peers {
		check := "fallback database " + p.Region
		if p.Database == "" {
			d.rep.add(Warn, check, "none configured: when every node of region "+p.Region+" is down, the region waits and the source retains WAL",
				"set peers[].database for region "+p.Region+" in "+d.cfg.Path)
			continue
		}
		conn, err := d.connect(ctx, p.Database)
		if err != nil {
			d.rep.add(Warn, check, "unreachable: "+err.Error()+" (the direct-SQL fallback cannot be used)",
				"check peers[].database of region "+p.Region+" in "+d.cfg.Path+" and that this host may connect to it")
			continue
		}
		id := d.systemID(ctx, conn, check)
		d.peerConflicts(ctx, conn, p.Region, check)
		conn.Close(context.Background())
		if id != "" && id == localID {
			d.rep.add(Problem, check, fmt.Sprintf("is in the same PostgreSQL cluster as region %s's database (system identifier %s): replication origins are cluster-wide, so the regions would share progress and skip each other's changes", d.cfg.Region, id),
				"give region "+p.Region+" its own PostgreSQL cluster (initdb) and point peers[].database there")
			continue
		}
		d.rep.ok(check, "reachable")
	}
}

// peerNodes probes every node of every peer region.
func (d *doctor) peerNodes(ctx context.Context) {
	client := d.opts.ClientTLS
	if client == nil && d.cfg.Auth.TLS.Enabled() {
		var err error
		_, client, err = peers.TLSConfigs(d.cfg.Auth.TLS.Cert, d.cfg.Auth.TLS.Key, d.cfg.Auth.TLS.CA)
		if err != nil {
			d.rep.add(Problem, "auth.tls", err.Error(), "fix the certificate files named in auth.tls of "+d.cfg.Path)
			return
		}
	}
	plaintext := d.cfg.Auth.Insecure || !d.cfg.Auth.TLS.Enabled()
	for _, p := range d.cfg.Peers {
		answered, misconfigured := 0, 0
		for _, n := range p.Nodes {
			check := fmt.Sprintf("peer %s/%s (%s)", p.Region, n.Name, n.Addr)
			res, err := peers.Probe(ctx, peers.ProbeConfig{
				SourceRegion: d.cfg.Region, SourceNode: d.cfg.Node, TargetRegion: p.Region,
				Addr: n.Addr, Token: d.cfg.Auth.Token, TLS: client, Insecure: plaintext, Timeout: d.opts.Timeout,
			})
			var dnsErr *net.DNSError
			switch {
			case peers.AuthRefused(err):
				misconfigured++
				d.rep.add(Problem, check, "refuses this node's credentials: "+reason(err)+"; the region's other nodes or its fallback database carry the changes meanwhile, if they can",
					"give both nodes the same auth.token (and, with auth.tls, certificates signed by a CA the other trusts), then restart the node whose config changed")
			case errors.Is(err, peers.ErrRejected):
				misconfigured++
				fix := "give every node the same auth.token (and auth.tls CA); check that region " + p.Region + "'s configs list region " + d.cfg.Region + " under peers"
				d.rep.add(Problem, check, "refused our hello: "+reason(err), fix)
			case errors.As(err, &dnsErr):
				misconfigured++
				d.rep.add(Problem, check, fmt.Sprintf("host %s cannot be resolved: %v", dnsErr.Name, dnsErr),
					"fix the addr of node "+n.Name+" in "+d.cfg.Path+" (or the DNS entry for "+dnsErr.Name+")")
			case errors.Is(err, peers.ErrUnreachable):
				d.rep.add(Warn, check, "unreachable: "+reason(err)+"; shipping fails over to the region's next node or its fallback database",
					"start prism-cdc run on node "+n.Name+", or fix its addr in "+d.cfg.Path+" and the firewall")
			case err != nil:
				d.rep.add(Problem, check, err.Error(), "fix the addr of node "+n.Name+" in "+d.cfg.Path)
			default:
				answered++
				d.rep.ok(check, fmt.Sprintf("answers as %s/%s in %s, has applied %s up to %s", res.Region, res.Node, res.RTT.Round(time.Millisecond), d.cfg.Region, res.Progress))
			}
		}
		// A node that answered with a refusal, or an address that does not
		// resolve, is a configuration problem reported above: starting a
		// node would not help.
		if answered == 0 && misconfigured == 0 && len(p.Nodes) > 0 {
			d.rep.add(Warn, "region "+p.Region, "no node answers; changes go through the fallback database or wait",
				"start a prism-cdc node of region "+p.Region)
		}
	}
}

// reason returns the end of a probe error: what the node said or why it
// could not be reached.
func reason(err error) string {
	msg := err.Error()
	for _, sentinel := range []error{peers.ErrRejected, peers.ErrUnreachable} {
		if i := strings.Index(msg, sentinel.Error()+": "); i >= 0 {
			return msg[i+len(sentinel.Error())+2:]
		}
	}
	return msg
}

var plainIdent = regexp.MustCompile(`^[a-z_][a-z0-9_]*$`)

// qident quotes an SQL identifier when it needs quoting, as quote_ident
// does (reserved words aside), so that fixes read naturally.
func qident(s string) string {
	if plainIdent.MatchString(s) {
		return s
	}
	return pgx.Identifier{s}.Sanitize()
}

// Regions returns every region of the topology, sorted: the region index
// of PlanSequences is a position in this list.
func Regions(cfg *config.Config) []string {
	rs := []string{cfg.Region}
	for _, p := range cfg.Peers {
		rs = append(rs, p.Region)
	}
	sort.Strings(rs)
	return rs
}
