package apply

import "github.com/prism-cdc/prism-cdc/pkg/decode"

// markSQL upserts the mark (prism.key_marks) of key k of table tbl, in
// PL/pgSQL with variables of those names.
const markSQL = "INSERT INTO prism.key_marks (h) VALUES (prism.mark_hash(tbl, k)) ON CONFLICT (h) DO UPDATE SET at = EXCLUDED.at"

// BootstrapStateSQL creates the table in which prism-cdc bootstrap records
// its runs in the target region. The bootstrap writes it; appliers read it
// (prism.bootstrap_check).
const BootstrapStateSQL = `CREATE SCHEMA IF NOT EXISTS prism;
CREATE TABLE IF NOT EXISTS prism.bootstrap (
	id          bigserial PRIMARY KEY,
	source      text NOT NULL,
	state       text NOT NULL,
	started_at  timestamptz NOT NULL DEFAULT now(),
	finished_at timestamptz,
	snapshot    pg_lsn,
	origins     jsonb
)`

// setupSQL creates what the applier keeps in the target database. It is
// idempotent and serialised by an advisory lock so that appliers starting
// together do not race on CREATE ... IF NOT EXISTS.
//
// prism.resolve decides a conflict on an existing row and records it;
// prism.missing records a change whose row is not there. Both read the
// incoming transaction's commit time and regions from transaction-local
// settings (prism.remote_ts, prism.remote_region, prism.local_region,
// prism.remote_lsn) set at the start of every apply transaction.
const setupSQL = `
SELECT pg_advisory_xact_lock(hashtext('prism.apply.setup'));
CREATE SCHEMA IF NOT EXISTS prism;
CREATE TABLE IF NOT EXISTS prism.conflicts (
	id                 bigserial PRIMARY KEY,
	at                 timestamptz NOT NULL DEFAULT clock_timestamp(),
	source_region      text NOT NULL,
	source_lsn         pg_lsn,
	table_name         text NOT NULL,
	key                jsonb,
	kind               text NOT NULL,
	policy             text NOT NULL,
	resolution         text NOT NULL,
	winner             text NOT NULL,
	local_commit_time  timestamptz,
	local_origin       text,
	remote_commit_time timestamptz,
	remote_origin      text
);
-- The node deletes old records by time (conflicts.keep): a BRIN index
-- costs an insert next to nothing, and records are written in time order.
CREATE INDEX IF NOT EXISTS conflicts_at ON prism.conflicts USING brin (at);
-- bootstrap_check refuses applied transactions while the region's last
-- bootstrap (prism.bootstrap, written by prism-cdc bootstrap) has not
-- finished. A run that was killed leaves half-copied tables and no lock:
-- a transaction applied into them would move the origin and let its
-- source confirm its slot, and the next run, which empties the tables
-- and sets the origins from its own snapshot, would lose it. PR003 is
-- retryable: deliveries wait until a run finishes.
CREATE OR REPLACE FUNCTION prism.bootstrap_check() RETURNS void
LANGUAGE plpgsql STABLE AS $f$
DECLARE
	r record;
BEGIN
	IF to_regclass('prism.bootstrap') IS NULL THEN
		RETURN;
	END IF;
	EXECUTE 'SELECT id, source, state, started_at FROM prism.bootstrap ORDER BY id DESC LIMIT 1' INTO r;
	IF r.id IS NOT NULL AND r.state IS DISTINCT FROM 'done' THEN
		RAISE EXCEPTION 'bootstrap run % of this region (from region %, started %) has not finished: run prism-cdc bootstrap for this region again; replication into it resumes when a run finishes',
			r.id, r.source, r.started_at USING ERRCODE = 'PR003';
	END IF;
END
$f$;
-- region_of is PL/pgSQL for the reason prism.stamp is (see clockSetupSQL).
CREATE OR REPLACE FUNCTION prism.region_of(ident oid) RETURNS text
LANGUAGE plpgsql STABLE AS $f$
DECLARE
	r text;
BEGIN
	IF ident IS NULL OR ident = 0 THEN
		RETURN current_setting('prism.local_region', true);
	END IF;
	SELECT ` + decode.OriginRegionSQL + ` INTO r FROM pg_catalog.pg_replication_origin WHERE roident = ident;
	RETURN r;
END
$f$;
CREATE OR REPLACE FUNCTION prism.resolve(kind text, policy text, tbl text, key jsonb, row_xmin xid)
RETURNS boolean LANGUAGE plpgsql AS $f$
DECLARE
	rts     timestamptz := current_setting('prism.remote_ts')::timestamptz;
	rregion text := current_setting('prism.remote_region');
	lts     timestamptz;
	lident  oid;
	lregion text;
	win     boolean;
BEGIN
	-- A row this transaction wrote is not a conflict.
	IF row_xmin = xid(pg_current_xact_id_if_assigned()) THEN
		RETURN true;
	END IF;
	SELECT prism.row_stamp(tbl, key, row_xmin), c.roident INTO lts, lident FROM pg_xact_commit_timestamp_origin(row_xmin) c;
	lregion := prism.region_of(lident);
	IF kind <> 'insert_exists' THEN
		-- An update or delete conflicts only with a local version written by
		-- another region at or after the incoming commit.
		IF lts IS NULL OR lregion IS NOT DISTINCT FROM rregion OR lts < rts THEN
			RETURN true;
		END IF;
	END IF;
	IF policy = 'error' THEN
		RAISE EXCEPTION 'prism conflict % on % key % (local % from %, remote % from %)',
			kind, tbl, key, lts, lregion, rts, rregion USING ERRCODE = 'PR001';
	END IF;
	win := CASE policy
		WHEN 'source_wins' THEN true
		WHEN 'keep_local' THEN false
		ELSE prism.remote_newer(rts, rregion, lts, lregion)
	END;
	INSERT INTO prism.conflicts (source_region, source_lsn, table_name, key, kind, policy,
		resolution, winner, local_commit_time, local_origin, remote_commit_time, remote_origin)
	VALUES (rregion, current_setting('prism.remote_lsn')::pg_lsn, tbl, key, kind, policy,
		CASE WHEN win THEN 'apply_remote' ELSE 'keep_local' END,
		CASE WHEN win THEN 'remote' ELSE 'local' END,
		lts, lregion, rts, rregion);
	RETURN win;
END
$f$;
-- missing decides a change whose row is not there. A keyed table's
-- tombstone (the key's last delete) takes part under last_write_wins and
-- keep_local: an update older than the delete does not re-insert the row,
-- and a delete of a missing key leaves its stamp in the tombstone when it
-- is the newer delete.
CREATE OR REPLACE FUNCTION prism.missing(kind text, policy text, tbl text, k jsonb, complete boolean, keyed boolean)
RETURNS boolean LANGUAGE plpgsql AS $f$
DECLARE
	rts     timestamptz := current_setting('prism.remote_ts')::timestamptz;
	rregion text := current_setting('prism.remote_region');
	tts     timestamptz;
	tregion text;
	buried  boolean := false;
	ins     boolean;
BEGIN
	IF policy = 'error' THEN
		RAISE EXCEPTION 'prism conflict % on % key % (remote % from %)',
			kind, tbl, k, rts, rregion USING ERRCODE = 'PR001';
	END IF;
	IF keyed THEN
		SELECT prism.row_stamp(tbl, k, t.xmin), prism.region_of(o.roident) INTO tts, tregion
		FROM prism.tombstones t, pg_xact_commit_timestamp_origin(t.xmin) o
		WHERE t.table_name = tbl AND t.key = k;
		buried := FOUND AND NOT prism.remote_newer(rts, rregion, tts, tregion);
		IF kind = 'delete_missing' AND NOT buried THEN
			` + markSQL + `;
			INSERT INTO prism.tombstones (table_name, key) VALUES (tbl, k)
			ON CONFLICT (table_name, key) DO UPDATE SET key = EXCLUDED.key;
		END IF;
	END IF;
	ins := kind = 'update_missing' AND complete AND (policy = 'source_wins' OR (policy = 'last_write_wins' AND NOT buried));
	IF ins AND keyed THEN
		` + markSQL + `;
	END IF;
	INSERT INTO prism.conflicts (source_region, source_lsn, table_name, key, kind, policy,
		resolution, winner, local_commit_time, local_origin, remote_commit_time, remote_origin)
	VALUES (rregion, current_setting('prism.remote_lsn')::pg_lsn, tbl, k, kind, policy,
		CASE WHEN ins THEN 'insert_remote' WHEN buried AND kind = 'update_missing' THEN 'keep_deleted' ELSE 'skip' END,
		CASE WHEN ins THEN 'remote' WHEN buried AND kind = 'update_missing' THEN 'local' ELSE 'none' END,
		tts, tregion, rts, rregion);
	RETURN ins;
END
$f$;
-- update_missing handles an update of a keyed table's missing row: when
-- prism.missing says to insert it, it runs ins (an INSERT of the row) with
-- the row's values as $1.
CREATE OR REPLACE FUNCTION prism.update_missing(policy text, tbl text, k jsonb, complete boolean, ins text, vals text[])
RETURNS integer LANGUAGE plpgsql AS $f$
BEGIN
	IF prism.missing('update_missing', policy, tbl, k, complete, true) AND ins IS NOT NULL THEN
		EXECUTE ins USING vals;
		RETURN 1;
	END IF;
	RETURN 0;
END
$f$;
`
