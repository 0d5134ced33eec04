package apply

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// clockSetupSQL creates what last_write_wins needs beyond commit
// timestamps: tombstones for deleted keys and clock floors for local
// writes made on a clock that lags behind the version they overwrite.
// Both exist for tables with a key (primary key or replica identity
// index); a table with REPLICA IDENTITY FULL and no key has neither.
//
// The stamp of a row version is prism.stamp(xmin): the writing
// transaction's commit timestamp, raised to one microsecond past its
// clock floor when it has one. Transactions applied from another region
// carry the source's stamp as their commit timestamp
// (pg_replication_origin_xact_setup), so every region computes the same
// stamp for the same version.
//
// prism.tombstones holds one row per deleted key; its xmin is the
// deleting transaction, so its stamp is the delete's. Trigger
// prism_tombstone (AFTER DELETE, ENABLE ALWAYS; function
// prism.tombstone_<table oid>) writes it for local and applied deletes
// alike; prism.missing adds it for a delete of a key that is already gone.
//
// Trigger prism_clock (BEFORE INSERT OR UPDATE OR DELETE, skipped in
// prism-cdc's apply transactions) checks the stamp of the version a local
// write replaces: the row's for UPDATE and DELETE, the
// tombstone's for INSERT. When that stamp is not below clock_timestamp()
// (another region's clock is ahead of this one), the write's commit
// timestamp could end up below it, and the regions would disagree about
// which version is later. The trigger then records the stamp as the
// transaction's floor, in prism.clock_floors (read by prism.stamp here)
// and as a transactional logical message 'prism.floor' (read by the
// decoder, which raises the commit time it ships to the floor plus one
// microsecond). So a write made after another version always stamps
// later than it, whatever the clocks say.
//
// The trigger's WHEN clause calls it only while some version may carry a
// stamp at or after the current time: sequence prism.horizon holds (in
// microseconds since the epoch) an upper bound of every stamp written
// here. Apply transactions raise it before they write a version stamped
// at or after the local clock (another region's clock ahead of this one),
// raise_floor before a floored transaction commits. A version stamped earlier than the clock when it was written
// stays below every later reading of the clock, so it never needs a
// floor. While the clocks agree, a local write so pays for the WHEN test
// alone instead of a PL/pgSQL call and two index probes.
//
// The trigger functions are SECURITY DEFINER: the application's roles
// need no rights on schema prism. Every relation they name is
// schema-qualified, and they run with search_path pg_catalog, pg_temp
// (naming the key's equality operators with their schema), so a role
// that puts a schema of its own first in its search_path cannot have
// them call its functions or operators with their owner's rights.
//
// prism.install(table) (re)creates a table's trigger function and
// triggers from its current key; Setup runs it for every table and the
// event trigger prism_install for tables created or altered later.
var clockSetupSQL = strings.NewReplacer(
	"{{pinned_text_form}}", lit(pinnedTextForm()),
	// markSQL in the trigger function, over its table and new key.
	"{{mark}}", strings.Replace(markSQL, "prism.mark_hash(tbl, k)", "prism.mark_hash(%1$L, %3$s)", 1),
	"{{earlier_clock}}", earlierClock,
	"{{earlier_tombstone}}", earlierTombstone,
	"{{app_table}}", appTableSQL,
).Replace(clockSetupTemplate)

// appTableSQL is true of the tables prism-cdc installs its conflict
// triggers on, k a row of pg_class and s its schema's of pg_namespace:
// the application's tables and partitioned tables (whose partitions get
// the triggers from them), not those of schema prism or the system's.
const appTableSQL = `k.relkind IN ('r', 'p') AND NOT k.relispartition
		AND s.nspname NOT IN ('prism', 'pg_catalog', 'information_schema') AND s.nspname NOT LIKE 'pg\_%'`

// earlierClock and earlierTombstone are true of a row of pg_trigger, a
// table's prism_clock or prism_tombstone, that an earlier version made:
// prism_clock with its WHEN test written out (or none), prism_tombstone
// calling prism_clock's function instead of prism.tombstone_<table oid>.
// prism.install replaces such triggers and earlierTriggersSQL counts
// those it could not.
const (
	earlierClock     = "pg_catalog.pg_get_triggerdef(oid) NOT LIKE '%clock_due()%'"
	earlierTombstone = "tgfoid <> coalesce(pg_catalog.to_regproc('prism.tombstone_' || tgrelid::oid)::oid, 0)"
)

// pinnedTextForm is the SET clause of a function that must print values
// in the text form every prism-cdc connection pins (decode.PinTextForm).
func pinnedTextForm() string {
	var b strings.Builder
	for _, s := range decode.TextFormSettings() {
		b.WriteString(" SET " + s[0] + " = " + lit(s[1]))
	}
	return b.String()
}

const clockSetupTemplate = `
SELECT pg_advisory_xact_lock(hashtext('prism.apply.setup'));
CREATE TABLE IF NOT EXISTS prism.tombstones (
	table_name text  NOT NULL,
	key        jsonb NOT NULL,
	PRIMARY KEY (table_name, key)
);
-- key_marks makes two apply transactions of different sources that write
-- one key without a row meet in a row. Each source is applied on its own
-- REPEATABLE READ session; a newer delete of a key whose row is gone
-- leaves a tombstone, and an older insert of that key, on a session
-- whose snapshot predates the tombstone, finds neither row nor tombstone:
-- both would commit, and this region would keep the row while every
-- other region ends with the delete. So an applied insert (row by row,
-- in a batch, or for an update of a missing row) and an applied delete
-- of a missing key both upsert the key's mark (markSQL): the second
-- to commit fails with a serialization failure when its snapshot
-- predates the first, and is applied again on a snapshot that shows it.
-- A local insert meets an applied delete of its key the same way: when
-- that delete's stamp is ahead of this region's clock (the only case in
-- which an insert committed after the delete's snapshot could stamp
-- older than it), trigger prism_clock fires and upserts the mark before
-- it reads the key's tombstone, so it waits for the delete and floors
-- its stamp above the tombstone's.
-- A key is marked by a 64-bit hash of its table and key text: two keys
-- that share one only make a transaction be applied again. A mark
-- matters only while such a transaction runs; the node removes the
-- marks no transaction in progress can meet every minute (CollectMarks).
-- So the table is UNLOGGED: a crash ends every
-- transaction a mark could meet, its writes cost no WAL, and logical
-- decoding leaves them out (the region's walsender does not decode them
-- for its node to drop).
CREATE UNLOGGED TABLE IF NOT EXISTS prism.key_marks (
	h  bigint      PRIMARY KEY,
	at timestamptz NOT NULL DEFAULT now()
);
-- mark_hash is the mark of key k of table tbl; IMMUTABLE and plain SQL,
-- so the planner inlines it.
CREATE OR REPLACE FUNCTION prism.mark_hash(tbl text, k jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $f$
	SELECT pg_catalog.hashtextextended($1 || ' ' || $2::text, 0)
$f$;
-- xact is the (sub)transaction that wrote a floored row version (its
-- xmin), top its top-level transaction; a transaction's stamp takes the
-- greatest floor of the whole top-level transaction, like the commit time
-- the decoder ships. One transaction may record several floors for the
-- same xact, so the key is a column of its own: the publication (FOR ALL
-- TABLES) includes this table, and without a key PostgreSQL rejects the
-- DELETE of old floors (55000).
CREATE TABLE IF NOT EXISTS prism.clock_floors (
	id    bigserial   PRIMARY KEY,
	xact  xid         NOT NULL,
	top   xid         NOT NULL,
	floor timestamptz NOT NULL,
	at    timestamptz NOT NULL DEFAULT now()
);
-- A table created by an earlier version has no key: add it in place (a
-- rewrite of a table that holds a week of floors at most).
DO $k$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index WHERE indrelid = 'prism.clock_floors'::regclass AND indisprimary) THEN
		ALTER TABLE prism.clock_floors ADD COLUMN id bigserial PRIMARY KEY;
	END IF;
END
$k$;
CREATE INDEX IF NOT EXISTS clock_floors_xact ON prism.clock_floors USING hash (xact);
CREATE INDEX IF NOT EXISTS clock_floors_top ON prism.clock_floors USING hash (top);
CREATE INDEX IF NOT EXISTS clock_floors_at ON prism.clock_floors (at);
-- table_names keeps the name under which a table's conflict metadata
-- (its tombstones, batch stamps and key marks) is kept: its name when it
-- was first installed. Tombstones take their stamp from their own xmin,
-- so they cannot be moved when the table is renamed (an UPDATE would
-- stamp them with the rename's commit time); the metadata keeps the
-- first name instead, and the trigger functions and the applier look it
-- up here. A table that takes a name another table's metadata still uses
-- gets its own (the name and its OID). last is the table's name when it
-- was last installed, and table_renames the renames seen since (a
-- rename runs prism.install through event trigger prism_install): rows
-- another region still sends under an old name find the table by them.
CREATE TABLE IF NOT EXISTS prism.table_names (
	relid oid  PRIMARY KEY,
	name  text NOT NULL UNIQUE,
	last  text NOT NULL
);
CREATE TABLE IF NOT EXISTS prism.table_renames (
	id       bigserial   PRIMARY KEY,
	at       timestamptz NOT NULL DEFAULT clock_timestamp(),
	relid    oid         NOT NULL,
	old_name text        NOT NULL,
	new_name text        NOT NULL
);
CREATE INDEX IF NOT EXISTS table_renames_old ON prism.table_renames (old_name);
-- meta_name returns the name of rel's conflict metadata, recording its
-- current name (and a rename since the last call).
CREATE OR REPLACE FUNCTION prism.meta_name(rel regclass) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
	cur  text;
	meta text;
	was  text;
	held oid;
BEGIN
	SELECT n.nspname || '.' || c.relname INTO cur
	FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
	SELECT t.name, t.last INTO meta, was FROM prism.table_names t WHERE t.relid = rel;
	IF FOUND THEN
		IF was <> cur THEN
			INSERT INTO prism.table_renames (relid, old_name, new_name) VALUES (rel, was, cur);
			UPDATE prism.table_names t SET last = cur WHERE t.relid = rel;
		END IF;
		RETURN meta;
	END IF;
	meta := cur;
	SELECT t.relid INTO held FROM prism.table_names t WHERE t.name = cur;
	IF FOUND AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = held) THEN
		-- A dropped table's entry: the name is free again (its old
		-- tombstones apply to the new table, as before names were kept).
		DELETE FROM prism.table_names t WHERE t.relid = held;
	ELSIF FOUND THEN
		-- Renamed away, its metadata still under this name.
		meta := cur || '#' || rel::oid;
	END IF;
	INSERT INTO prism.table_names (relid, name, last) VALUES (rel, meta, cur);
	RETURN meta;
END
$f$;
-- meta_rel is the table whose conflict metadata is kept under name, or
-- NULL when none is.
CREATE OR REPLACE FUNCTION prism.meta_rel(name text) RETURNS regclass
LANGUAGE sql STABLE AS $f$
	SELECT coalesce(
		(SELECT t.relid::regclass FROM prism.table_names t JOIN pg_catalog.pg_class c ON c.oid = t.relid WHERE t.name = meta_rel.name),
		CASE WHEN NOT EXISTS (SELECT 1 FROM prism.table_names t WHERE t.relid = to_regclass(meta_rel.name)) THEN to_regclass(meta_rel.name) END)
$f$;
` + horizonSQL + `
-- stamp, row_stamp, own and region_of read tables, so they are PL/pgSQL:
-- PostgreSQL inlines no SQL function whose body has a subquery, and
-- plans such a function's body anew at every call (about 0.1 ms each),
-- while PL/pgSQL keeps its plans for the session.
CREATE OR REPLACE FUNCTION prism.stamp(x xid) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $f$
DECLARE
	fl timestamptz;
BEGIN
	SELECT max(t.floor) + interval '1 microsecond' INTO fl FROM prism.clock_floors t
	WHERE t.top IN (SELECT f.top FROM prism.clock_floors f WHERE f.xact = x);
	RETURN greatest(pg_catalog.pg_xact_commit_timestamp(x), fl);
END
$f$;
-- floored: did the transaction that wrote version x record a clock
-- floor? The apply statements call it only while the transaction's
-- snapshot has floors (prism.floors, see txnSetupSQL): a call is cheap
-- to start, where the same test as a subquery opened prism.clock_floors'
-- index for every statement and cost a one-row UPDATE a fifth of its
-- server CPU.
CREATE OR REPLACE FUNCTION prism.floored(x xid) RETURNS boolean
LANGUAGE plpgsql STABLE AS $f$
BEGIN
	RETURN EXISTS (SELECT 1 FROM prism.clock_floors f WHERE f.xact = x);
END
$f$;
-- batch_stamps holds the stamps of row versions (and tombstones) that a
-- batch wrote: one target transaction that applies several source
-- transactions has one commit timestamp, the greatest of theirs, so the
-- version of key keys[i] of table table_name whose xmin is xact carries
-- the source commit time ts[i] of the transaction that wrote it there. A
-- stamp of another xmin is stale (a later write replaced the version)
-- and ignored. The region is the xmin's origin: a batch applies one
-- source region.
--
-- Each array statement of a batch adds one row: the keys it wrote (the
-- text of the key's jsonb, whose text form is canonical: equal keys,
-- equal text) and their stamps, in two arrays. A batch writes a key in
-- one statement at most, so a key appears once per xact and table. One
-- row per statement instead of one per row written: a per-row upsert of
-- a keyed table cost the apply session about 40% of its CPU in a
-- backlog. A lookup (a conflict check, the copy of a new region) finds
-- the batch by its xact (a hash index) and the key by array_position.
-- newest is the greatest of ts; Collect removes a row once newest is
-- older than it keeps tombstones. A stamp is needed only while its
-- version (or tombstone) is the key's live one, so prism.compact_stamps
-- checks each row once, some minutes after it was written (at), and
-- keeps only those keys: the table stays about as large as the batched
-- versions still live, not as every batched write of a week.
CREATE TABLE IF NOT EXISTS prism.batch_stamps (
	id         bigserial           PRIMARY KEY,
	xact       xid                 NOT NULL,
	table_name text COLLATE "C"    NOT NULL,
	newest     timestamptz         NOT NULL,
	keys       text[]              NOT NULL,
	ts         timestamptz[]       NOT NULL,
	at         timestamptz         NOT NULL DEFAULT now(),
	compacted  boolean             NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS batch_stamps_xact ON prism.batch_stamps USING hash (xact);
-- A row's two arrays (a batch statement's keys and stamps, some kilobytes)
-- are compressed inline: lz4 where the server has it, which writes them in
-- about half pglz's time. A server built without lz4 keeps pglz.
DO $c$
BEGIN
	IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = 'prism.batch_stamps'::regclass AND attname IN ('keys', 'ts') AND attcompression <> 'l') THEN
		ALTER TABLE prism.batch_stamps ALTER COLUMN keys SET COMPRESSION lz4, ALTER COLUMN ts SET COMPRESSION lz4;
	END IF;
EXCEPTION WHEN feature_not_supported THEN
	NULL;
END
$c$;
-- compact_stamps_chunk keeps, in the rows of batch_stamps written before
-- before and not compacted yet, the stamps whose key's live row or
-- tombstone still has the row's xact as its xmin, deletes rows left with
-- none, and returns how many stamps it dropped. It takes the first
-- max_rows such rows after id after, so that a backlog's stamps are
-- compacted in short transactions, and returns the last id it took (NULL
-- when none was left). The key columns are the names in the keys' jsonb,
-- probed by their type; a table that no longer has them keeps its
-- stamps, one that is gone loses them (a renamed one keeps them: see
-- prism.table_names).
CREATE OR REPLACE FUNCTION prism.compact_stamps_chunk(before timestamptz, after bigint, max_rows integer,
	OUT dropped bigint, OUT last bigint)
LANGUAGE plpgsql AS $f$
DECLARE
	r     record;
	rel   regclass;
	probe text;
	known boolean;
	n     bigint;
BEGIN
	dropped := 0;
	SELECT max(c.id) INTO last FROM (SELECT b.id FROM prism.batch_stamps b
		WHERE b.id > after AND NOT b.compacted AND b.at < before ORDER BY b.id LIMIT max_rows) c;
	IF last IS NULL THEN
		RETURN;
	END IF;
	FOR r IN SELECT b.table_name, min(b.keys[1]) AS sample FROM prism.batch_stamps b
		WHERE b.id > after AND b.id <= last AND NOT b.compacted AND b.at < before GROUP BY b.table_name
	LOOP
		rel := prism.meta_rel(r.table_name);
		IF rel IS NULL THEN
			WITH d AS (DELETE FROM prism.batch_stamps b WHERE b.table_name = r.table_name
				AND b.id > after AND b.id <= last AND NOT b.compacted AND b.at < before
				RETURNING cardinality(b.keys) AS n)
			SELECT coalesce(sum(d.n), 0) INTO n FROM d;
			dropped := dropped + n;
			CONTINUE;
		END IF;
		SELECT string_agg(format('x.%I = (u.key::jsonb ->> %L)::%s', a.attname, a.attname, format_type(a.atttypid, a.atttypmod)), ' AND '),
			count(a.attname) = count(*)
		INTO probe, known
		FROM jsonb_object_keys(r.sample::jsonb) j(name)
		LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = rel AND a.attname = j.name AND a.attnum > 0 AND NOT a.attisdropped;
		IF known IS NOT TRUE THEN
			UPDATE prism.batch_stamps b SET compacted = true WHERE b.table_name = r.table_name
				AND b.id > after AND b.id <= last AND NOT b.compacted AND b.at < before;
			CONTINUE;
		END IF;
		EXECUTE format($q$
			WITH c AS (
				SELECT b.id, b.xact, b.keys, b.ts FROM prism.batch_stamps b
				WHERE b.table_name = $1 AND b.id > $3 AND b.id <= $4 AND NOT b.compacted AND b.at < $2 FOR UPDATE),
			k AS (
				SELECT c.id, array_agg(u.key ORDER BY u.i) AS keys, array_agg(u.ts ORDER BY u.i) AS ts, max(u.ts) AS newest
				FROM c, unnest(c.keys, c.ts) WITH ORDINALITY AS u(key, ts, i)
				WHERE EXISTS (SELECT 1 FROM %s x WHERE %s AND x.xmin = c.xact OFFSET 0)
				OR EXISTS (SELECT 1 FROM prism.tombstones t WHERE t.table_name = $1 AND t.key = u.key::jsonb AND t.xmin = c.xact OFFSET 0)
				GROUP BY c.id),
			d AS (DELETE FROM prism.batch_stamps b USING c WHERE b.id = c.id AND NOT EXISTS (SELECT 1 FROM k WHERE k.id = c.id)),
			u AS (UPDATE prism.batch_stamps b SET keys = k.keys, ts = k.ts, newest = k.newest, compacted = true FROM k WHERE b.id = k.id)
			SELECT (SELECT coalesce(sum(cardinality(c.keys)), 0) FROM c) - (SELECT coalesce(sum(cardinality(k.keys)), 0) FROM k)$q$,
			rel, probe) INTO n USING r.table_name, before, after, last;
		dropped := dropped + n;
	END LOOP;
END
$f$;
-- compact_stamps compacts every row written before before in one call
-- (see compact_stamps_chunk). A node compacts in paced chunks instead;
-- this stays for nodes of earlier versions in the same region, which
-- call it.
CREATE OR REPLACE FUNCTION prism.compact_stamps(before timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $f$
DECLARE
	c       record;
	after   bigint := 0;
	dropped bigint := 0;
BEGIN
	LOOP
		SELECT * INTO c FROM prism.compact_stamps_chunk(before, after, 1000);
		EXIT WHEN c.last IS NULL;
		dropped := dropped + c.dropped;
		after := c.last;
	END LOOP;
	RETURN dropped;
END
$f$;
-- Earlier versions kept one row per key in prism.row_stamps (keyed by
-- jsonb, later by text): fold it in and drop it.
DO $r$
BEGIN
	IF to_regclass('prism.row_stamps') IS NOT NULL THEN
		INSERT INTO prism.batch_stamps (xact, table_name, newest, keys, ts)
		SELECT xact, table_name, max(ts), array_agg(key::text), array_agg(ts) FROM prism.row_stamps GROUP BY xact, table_name;
		DROP TABLE prism.row_stamps;
	END IF;
END
$r$;
-- row_stamp is the stamp of the version (or tombstone) of key k of table
-- tbl whose xmin is x.
CREATE OR REPLACE FUNCTION prism.row_stamp(tbl text, k jsonb, x xid) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $f$
DECLARE
	ts timestamptz;
BEGIN
	SELECT s.ts[i] INTO ts FROM prism.batch_stamps s, array_position(s.keys, k::text) i
	WHERE s.xact = x AND s.table_name = tbl AND i IS NOT NULL LIMIT 1;
	RETURN coalesce(ts, prism.stamp(x));
END
$f$;
-- batch_check fails a batch (PR002) when one of its statements changed
-- fewer rows than it carries: a row that needs a conflict check, a
-- tombstone or a missing row, which the batch's source transactions then
-- get applied one by one.
CREATE OR REPLACE FUNCTION prism.batch_check(tbl text, got bigint, want bigint) RETURNS integer
LANGUAGE plpgsql AS $f$
BEGIN
	IF got <> want THEN
		RAISE EXCEPTION 'prism batch: % of % rows of % need the row path', want - got, want, tbl USING ERRCODE = 'PR002';
	END IF;
	RETURN 1;
END
$f$;
-- With rows, the positions (from 1) in the statement's arrays of the
-- rows that took another way (the first 1,000), it lists them in its
-- detail ("rows 3,17"): the batch's other transactions can still be
-- applied as batches around theirs.
CREATE OR REPLACE FUNCTION prism.batch_check(tbl text, got bigint, want bigint, rows bigint[]) RETURNS integer
LANGUAGE plpgsql AS $f$
BEGIN
	IF got <> want THEN
		RAISE EXCEPTION 'prism batch: % of % rows of % need the row path', want - got, want, tbl
			USING ERRCODE = 'PR002', DETAIL = 'rows ' || coalesce(array_to_string(rows, ','), 'unknown');
	END IF;
	RETURN 1;
END
$f$;
-- own: was version x written by this transaction (or one of its
-- subtransactions that raised a floor)? Its stamp is this transaction's
-- own, not one to raise a floor over.
CREATE OR REPLACE FUNCTION prism.own(x xid) RETURNS boolean
LANGUAGE plpgsql STABLE AS $f$
BEGIN
	RETURN x = xid(pg_current_xact_id())
		OR EXISTS (SELECT 1 FROM prism.clock_floors f WHERE f.xact = x AND f.top = xid(pg_current_xact_id()));
END
$f$;
CREATE OR REPLACE FUNCTION prism.raise_floor(s timestamptz) RETURNS void
LANGUAGE plpgsql AS $f$
DECLARE
	top xid := xid(pg_current_xact_id());
	sub xid;
BEGIN
	-- The row inserted here gets the current subtransaction's xid as its
	-- xmin, the same as the row version being written.
	INSERT INTO prism.clock_floors (xact, top, floor) VALUES (top, top, s) RETURNING xmin INTO sub;
	IF NOT sub = top THEN
		INSERT INTO prism.clock_floors (xact, top, floor) VALUES (sub, top, s);
	END IF;
	PERFORM prism.raise_horizon(s + interval '1 microsecond');
	PERFORM pg_logical_emit_message(true, 'prism.floor', ((extract(epoch FROM s) * 1000000)::bigint)::text);
END
$f$;
-- remote_newer: does the incoming version (rts, rregion) replace a local
-- version (lts, lregion) under last_write_wins?
CREATE OR REPLACE FUNCTION prism.remote_newer(rts timestamptz, rregion text, lts timestamptz, lregion text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $f$
	SELECT $3 IS NULL OR $4 IS NOT DISTINCT FROM $2 OR $1 > $3 OR ($1 = $3 AND $2 > $4)
$f$;
-- admit decides an incoming INSERT of a key that has a tombstone.
CREATE OR REPLACE FUNCTION prism.admit(policy text, tbl text, k jsonb)
RETURNS boolean LANGUAGE plpgsql AS $f$
DECLARE
	rts     timestamptz := current_setting('prism.remote_ts')::timestamptz;
	rregion text := current_setting('prism.remote_region');
	tts     timestamptz;
	tregion text;
	win     boolean;
BEGIN
	SELECT prism.row_stamp(tbl, k, t.xmin), prism.region_of(o.roident) INTO tts, tregion
	FROM prism.tombstones t, pg_xact_commit_timestamp_origin(t.xmin) o
	WHERE t.table_name = tbl AND t.key = k;
	IF NOT FOUND OR prism.remote_newer(rts, rregion, tts, tregion) THEN
		RETURN true;
	END IF;
	IF policy = 'error' THEN
		RAISE EXCEPTION 'prism conflict insert_deleted on % key % (deleted % by %, remote % from %)',
			tbl, k, tts, tregion, rts, rregion USING ERRCODE = 'PR001';
	END IF;
	win := policy = 'source_wins';
	INSERT INTO prism.conflicts (source_region, source_lsn, table_name, key, kind, policy,
		resolution, winner, local_commit_time, local_origin, remote_commit_time, remote_origin)
	VALUES (rregion, current_setting('prism.remote_lsn')::pg_lsn, tbl, k, 'insert_deleted', policy,
		CASE WHEN win THEN 'apply_remote' ELSE 'keep_deleted' END,
		CASE WHEN win THEN 'remote' ELSE 'local' END, tts, tregion, rts, rregion);
	RETURN win;
END
$f$;
-- key_signature names the columns and types of table rel's key as
-- prism.install reads it (NULL without one). install keeps it as the
-- comment of the table's prism.tombstone_<oid>, and install_missing
-- installs again where they differ: the triggers' functions name the key's
-- columns, so after a key column's rename they would fail every delete.
CREATE OR REPLACE FUNCTION prism.key_signature(rel regclass) RETURNS text
LANGUAGE sql STABLE AS $f$
	SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname) OPERATOR(pg_catalog.||) ' '
			OPERATOR(pg_catalog.||) pg_catalog.format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
	FROM pg_catalog.pg_class c
	JOIN pg_catalog.pg_index i ON i.indrelid OPERATOR(pg_catalog.=) c.oid
		AND CASE WHEN c.relreplident OPERATOR(pg_catalog.=) 'i' THEN i.indisreplident ELSE i.indisprimary END
	JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid
		AND a.attnum OPERATOR(pg_catalog.=) ANY (i.indkey)
	WHERE c.oid OPERATOR(pg_catalog.=) rel AND c.relreplident IN ('d', 'i', 'f')
$f$;
CREATE OR REPLACE FUNCTION prism.install(rel regclass) RETURNS text
LANGUAGE plpgsql AS $f$
DECLARE
	tbl   text;
	qrel  text;
	ident "char";
	keys  name[];
	fn    text := 'clock_' || rel::oid;
	tfn   text := 'tombstone_' || rel::oid;
	tkey  text;
	oldk  text;
	newk  text;
	cond  text;
	body  text;
	pin   boolean;
	lt    text;
	oldclock boolean;
	oldtomb  boolean;
BEGIN
	SELECT n.nspname || '.' || c.relname, quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relreplident
	INTO tbl, qrel, ident
	FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
	WHERE c.oid = rel AND c.relkind IN ('r', 'p');
	IF NOT FOUND THEN
		RETURN 'not a table';
	END IF;
	-- The function writes and reads the tombstones under the name the
	-- table's metadata keeps, also after a rename.
	tbl := prism.meta_name(rel);
	-- The key is the replica identity index, else the primary key (also
	-- under REPLICA IDENTITY FULL): the columns the applier matches rows by.
	IF ident IN ('d', 'i', 'f') THEN
		SELECT array_agg(a.attname ORDER BY a.attnum) INTO keys
		FROM pg_catalog.pg_index i
		JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
		WHERE i.indrelid = rel AND CASE WHEN ident = 'i' THEN i.indisreplident ELSE i.indisprimary END;
	END IF;
	IF keys IS NULL THEN
		EXECUTE format('DROP TRIGGER IF EXISTS prism_clock ON %s', rel);
		EXECUTE format('DROP TRIGGER IF EXISTS prism_tombstone ON %s', rel);
		RETURN 'no key';
	END IF;
	SELECT 'jsonb_object(ARRAY[' || string_agg(quote_literal(k), ', ') || ']::text[], ARRAY[' ||
			string_agg(format('OLD.%I::text', k), ', ') || ']::text[])',
		'jsonb_object(ARRAY[' || string_agg(quote_literal(k), ', ') || ']::text[], ARRAY[' ||
			string_agg(format('NEW.%I::text', k), ', ') || ']::text[])',
		'pg_catalog.jsonb_object(ARRAY[' || string_agg(quote_literal(k), ', ') || ']::pg_catalog.text[], ARRAY[' ||
			string_agg(format('OLD.%I::pg_catalog.text', k), ', ') || ']::pg_catalog.text[])'
	INTO oldk, newk, tkey FROM unnest(keys) k;
	-- The function runs with search_path pg_catalog (see below), so the
	-- key's equality operators are named with their schema: those of the
	-- key index's operator classes (an extension type's may live in
	-- any schema).
	SELECT string_agg(format('x.%I OPERATOR(%I.%s) OLD.%I', a.attname, opn.nspname, o.oprname, a.attname), ' AND ')
	INTO cond
	FROM pg_catalog.pg_index i
	CROSS JOIN LATERAL unnest(i.indkey::int2[], i.indclass::oid[]) AS u(attnum, opc)
	JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.attnum
	JOIN pg_catalog.pg_opclass oc ON oc.oid = u.opc
	JOIN pg_catalog.pg_amop ao ON ao.amopfamily = oc.opcfamily AND ao.amopmethod = oc.opcmethod
		AND ao.amoplefttype = oc.opcintype AND ao.amoprighttype = oc.opcintype AND ao.amopstrategy = 3
	JOIN pg_catalog.pg_operator o ON o.oid = ao.amopopr
	JOIN pg_catalog.pg_namespace opn ON opn.oid = o.oprnamespace
	WHERE i.indrelid = rel AND CASE WHEN ident = 'i' THEN i.indisreplident ELSE i.indisprimary END;
	-- The function runs for every local write of the table, so it reads
	-- the replaced version's stamp inline (cached plans) instead of
	-- through prism.stamp and prism.own, SQL functions that PostgreSQL
	-- plans anew at every call. Fast path: the version's xmin and commit
	-- time from one index probe, its floors from one hash index probe.
	body := format($b$
DECLARE
	xm   xid;
	s    timestamptz;
	fl   timestamptz;
	me   xid := xid(pg_catalog.pg_current_xact_id_if_assigned());
	mine boolean;
BEGIN
	IF TG_WHEN = 'AFTER' THEN
		INSERT INTO prism.tombstones (table_name, key) VALUES (%1$L, %2$s)
		ON CONFLICT (table_name, key) DO UPDATE SET key = EXCLUDED.key;
		RETURN NULL;
	END IF;
	IF TG_OP = 'INSERT' THEN
		-- The key's mark first: an applied delete of the key that is in
		-- progress (its snapshot predates this insert, so it finds no row)
		-- holds it, and this insert waits for it to commit and then reads
		-- its tombstone here, instead of committing under a stamp older
		-- than the delete's while every other region keeps the delete.
		{{mark}};
		SELECT t.xmin, pg_catalog.pg_xact_commit_timestamp(t.xmin) INTO xm, s FROM prism.tombstones t
		WHERE t.table_name = %1$L AND t.key = %3$s;
	ELSE
		SELECT x.xmin, pg_catalog.pg_xact_commit_timestamp(x.xmin) INTO xm, s FROM %4$s x
		WHERE %5$s LIMIT 1;
	END IF;
	-- A version this transaction wrote (itself or, with a floor, in a
	-- subtransaction) is its own, not one to raise a floor over.
	IF xm IS NOT NULL AND xm IS DISTINCT FROM me THEN
		SELECT max(t.floor), bool_or(f.top = me) INTO fl, mine
		FROM prism.clock_floors f JOIN prism.clock_floors t ON t.top = f.top
		WHERE f.xact = xm;
		IF mine IS NOT TRUE THEN
			s := greatest(s, fl + interval '1 microsecond');
			IF s >= clock_timestamp() THEN
				PERFORM prism.raise_floor(s);
			END IF;
		END IF;
	END IF;
	IF TG_OP = 'DELETE' THEN
		RETURN OLD;
	END IF;
	RETURN NEW;
END
$b$, tbl, oldk, newk, qrel, cond);
	-- The function writes and reads tombstones and marks by the key's
	-- text, in the application's sessions (local deletes and inserts):
	-- when the key has a column whose text depends on the session's
	-- settings (a date, a timestamp, a float, an interval, bytea, money;
	-- anything not plainly an integer, numeric, string, uuid or boolean),
	-- the function runs with the text form every prism-cdc session pins,
	-- so that its key text is the one applied changes carry.
	SELECT coalesce(bool_or(NOT coalesce(NULLIF(t.typbasetype, 0), t.oid) = ANY (ARRAY['int2', 'int4', 'int8', 'numeric',
			'text', 'varchar', 'bpchar', 'name', 'uuid', 'bool', 'oid']::regtype[]::oid[])), false)
	INTO pin
	FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
	WHERE a.attrelid = rel AND a.attname = ANY (keys) AND NOT a.attisdropped;
	-- SECURITY DEFINER with the caller's search_path would run a function
	-- or operator of the caller's schemas with the owner's rights: the
	-- function runs with pg_catalog's.
	EXECUTE format('CREATE OR REPLACE FUNCTION prism.%I() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp %s AS %L', fn,
		CASE WHEN pin THEN {{pinned_text_form}} ELSE '' END, body);
	-- prism_tombstone's function, which every delete calls (local and
	-- applied ones), has a body of its own that names every function and
	-- type with its schema and uses no operator. It still runs with a
	-- search_path of its own, like prism.clock_due: under a search_path
	-- other than its last call's, PostgreSQL would plan its INSERT again.
	EXECUTE format('CREATE OR REPLACE FUNCTION prism.%I() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp %s AS %L', tfn,
		CASE WHEN pin THEN {{pinned_text_form}} ELSE '' END, format($t$
BEGIN
	INSERT INTO prism.tombstones (table_name, key) VALUES (%1$L, %2$s)
	ON CONFLICT (table_name, key) DO UPDATE SET key = EXCLUDED.key;
	RETURN NULL;
END
$t$, tbl, tkey));
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = rel AND tgname = 'prism_clock') THEN
		EXECUTE format('CREATE TRIGGER prism_clock BEFORE INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW
			WHEN (prism.clock_due()) EXECUTE FUNCTION prism.%I()', rel, fn);
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = rel AND tgname = 'prism_tombstone') THEN
		EXECUTE format('CREATE TRIGGER prism_tombstone AFTER DELETE ON %s FOR EACH ROW EXECUTE FUNCTION prism.%I()', rel, tfn);
		EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER prism_tombstone', rel);
	END IF;
	oldclock := EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = rel AND tgname = 'prism_clock'
		AND {{earlier_clock}});
	oldtomb := EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = rel AND tgname = 'prism_tombstone'
		AND {{earlier_tombstone}});
	IF oldclock OR oldtomb THEN
		-- Made by an earlier version: prism_clock with its WHEN test
		-- written out (or none), prism_tombstone calling prism_clock's
		-- function. They do the same at a higher cost, and are replaced
		-- when the table's lock comes within a second, else at a later
		-- start, so that a start never holds the application's writes up
		-- behind a long transaction.
		lt := pg_catalog.current_setting('lock_timeout');
		BEGIN
			PERFORM pg_catalog.set_config('lock_timeout', '1s', true);
			IF oldclock THEN
				EXECUTE format('CREATE OR REPLACE TRIGGER prism_clock BEFORE INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW
					WHEN (prism.clock_due()) EXECUTE FUNCTION prism.%I()', rel, fn);
			END IF;
			IF oldtomb THEN
				EXECUTE format('CREATE OR REPLACE TRIGGER prism_tombstone AFTER DELETE ON %s FOR EACH ROW EXECUTE FUNCTION prism.%I()', rel, tfn);
				EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER prism_tombstone', rel);
			END IF;
			PERFORM pg_catalog.set_config('lock_timeout', lt, true);
		EXCEPTION WHEN lock_not_available THEN
			RAISE WARNING 'prism-cdc''s triggers on % stay as an earlier version made them until a later start: the table was locked for 1 s', rel;
		END;
	END IF;
	EXECUTE format('COMMENT ON FUNCTION prism.%I() IS %L', tfn, 'key: ' || prism.key_signature(rel));
	RETURN 'installed';
END
$f$;
-- install_missing installs the triggers on the tables with a key that
-- have none, or whose key changed since (see key_signature): tables
-- created or altered while event trigger prism_install was missing (it
-- takes a superuser), or that it could not install for. A running node
-- calls it now and then (Applier.InstallMissing), so such a table does not
-- wait for the next start. A table whose lock does not come within a
-- second (a long transaction writing it) is left for the next call, so
-- that the application's writes never queue behind it; one prism-cdc's
-- role may not alter is counted in denied. Nothing waits for a bootstrap
-- or a starting node (the setup lock): the call then installs nothing.
CREATE OR REPLACE FUNCTION prism.install_missing(OUT installed integer, OUT denied integer)
LANGUAGE plpgsql AS $f$
DECLARE
	r record;
BEGIN
	installed := 0;
	denied := 0;
	IF NOT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('prism.apply.setup')) THEN
		RETURN;
	END IF;
	PERFORM pg_catalog.set_config('prism.ddl', 'local', true);
	PERFORM pg_catalog.set_config('lock_timeout', '1s', true);
	FOR r IN SELECT k.oid FROM pg_catalog.pg_class k JOIN pg_catalog.pg_namespace s ON s.oid = k.relnamespace
		CROSS JOIN LATERAL prism.key_signature(k.oid) AS sig
		WHERE {{app_table}} AND sig IS NOT NULL
		AND (NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgrelid = k.oid AND t.tgname = 'prism_tombstone')
			OR pg_catalog.obj_description(pg_catalog.to_regproc('prism.tombstone_' || k.oid)::oid, 'pg_proc')
				IS DISTINCT FROM 'key: ' || sig)
	LOOP
		BEGIN
			IF prism.install(r.oid) = 'installed' THEN
				installed := installed + 1;
			END IF;
		EXCEPTION
			WHEN lock_not_available THEN NULL; -- the next call
			WHEN insufficient_privilege THEN denied := denied + 1;
		END;
	END LOOP;
END
$f$;
CREATE OR REPLACE FUNCTION prism.install_all() RETURNS integer
LANGUAGE plpgsql AS $f$
DECLARE
	r record;
	n integer := 0;
BEGIN
	-- Nodes of one region start together; one installs at a time.
	PERFORM pg_advisory_xact_lock(hashtext('prism.apply.setup'));
	FOR r IN SELECT k.oid FROM pg_catalog.pg_class k JOIN pg_catalog.pg_namespace s ON s.oid = k.relnamespace
		WHERE {{app_table}}
	LOOP
		IF prism.install(r.oid) = 'installed' THEN
			n := n + 1;
		END IF;
	END LOOP;
	-- The trigger functions of dropped tables: DROP TABLE takes the
	-- triggers, not their functions. (A table that is there may be
	-- installed concurrently, by event trigger prism_install.)
	FOR r IN SELECT p.oid::regprocedure AS fn FROM pg_catalog.pg_proc p
		WHERE p.pronamespace = 'prism'::regnamespace AND p.proname ~ '^(clock|tombstone)_[0-9]+$'
		AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = substring(p.proname FROM '[0-9]+$')::oid)
		AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgfoid = p.oid)
	LOOP
		BEGIN
			EXECUTE format('DROP FUNCTION %s', r.fn);
		EXCEPTION WHEN dependent_objects_still_exist THEN
			NULL; -- something of the application's uses it: it stays
		END;
	END LOOP;
	RETURN n;
END
$f$;
-- on_ddl installs the triggers on tables created or altered later. It
-- never fails the DDL: a problem is a warning. It runs as its owner, the
-- role prism-cdc connects as (SECURITY DEFINER): the application's roles
-- need no rights on schema prism, where the triggers' functions go, and
-- a table one of them creates gets its triggers at once, owned by the
-- same role as every other table's, instead of a warning and none until
-- a node's next start. Like every function of prism-cdc that runs as its
-- owner, it runs with search_path pg_catalog, pg_temp (prism.install
-- names what it uses with its schema).
CREATE OR REPLACE FUNCTION prism.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
	r record;
	ddl text := coalesce(current_setting('prism.ddl', true), '');
BEGIN
	-- Its own schema changes are not the application's (event trigger
	-- prism_ddl lets them pass).
	PERFORM set_config('prism.ddl', 'local', true);
	FOR r IN SELECT DISTINCT c.objid FROM pg_event_trigger_ddl_commands() c
		JOIN pg_catalog.pg_class k ON k.oid = c.objid
		JOIN pg_catalog.pg_namespace s ON s.oid = k.relnamespace
		WHERE c.classid = 'pg_catalog.pg_class'::regclass AND {{app_table}}
	LOOP
		BEGIN
			PERFORM prism.install(r.objid);
		EXCEPTION WHEN OTHERS THEN
			RAISE WARNING 'prism-cdc could not install its conflict triggers on %: %', r.objid::regclass, SQLERRM;
		END;
	END LOOP;
	PERFORM set_config('prism.ddl', ddl, true);
END
$f$;
`

// horizonSQL creates sequence prism.horizon (starting at the current
// time), prism.raise_horizon and prism.clock_due. Setup and RaiseHorizon
// run it.
const horizonSQL = `
CREATE SCHEMA IF NOT EXISTS prism;
DO $h$
BEGIN
	IF to_regclass('prism.horizon') IS NULL THEN
		CREATE SEQUENCE prism.horizon AS bigint MINVALUE 0;
		PERFORM pg_catalog.setval('prism.horizon', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
	END IF;
END
$h$;
GRANT SELECT ON SEQUENCE prism.horizon TO PUBLIC;
-- raise_horizon makes prism.horizon at least s. setval is not
-- transactional: the lock keeps two sessions from lowering it.
CREATE OR REPLACE FUNCTION prism.raise_horizon(s timestamptz) RETURNS void
LANGUAGE plpgsql AS $f$
DECLARE
	v bigint := (extract(epoch FROM s) * 1000000)::bigint;
BEGIN
	IF v > pg_catalog.pg_sequence_last_value('prism.horizon') THEN
		PERFORM pg_catalog.pg_advisory_xact_lock(hashtext('prism.horizon'));
		IF v > pg_catalog.pg_sequence_last_value('prism.horizon') THEN
			PERFORM pg_catalog.setval('prism.horizon', v);
		END IF;
	END IF;
END
$f$;
-- clock_due is trigger prism_clock's WHEN test: a write outside an apply
-- transaction while some version may be stamped at or after the current
-- time. PostgreSQL reads a trigger's WHEN expression from the catalog and
-- plans it anew for every statement that writes the table: written out,
-- this test made a one-row UPDATE cost 21.6 us instead of 9.3; as a call
-- of this function, whose plan PL/pgSQL keeps for the session, 14.9 us.
-- It is SECURITY DEFINER because the application's roles may not use
-- schema prism, where its sequence is. It runs with a search_path of its
-- own: PostgreSQL plans a PL/pgSQL function's expressions again whenever
-- it is called under another search_path than the last time, so a
-- transaction that wrote under the application's search_path and in a
-- trigger function with a SET search_path of its own (or a session that
-- switches search_path, one per tenant) planned this test twice, for
-- 85-130 us; the SET clause costs each call about 5 us.
CREATE OR REPLACE FUNCTION prism.clock_due() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
	RETURN NOT coalesce(pg_catalog.current_setting('prism.applying', true) OPERATOR(pg_catalog.=) 'on', false)
		AND pg_catalog.pg_sequence_last_value('prism.horizon'::pg_catalog.regclass) OPERATOR(pg_catalog.>=)
			(extract(epoch FROM pg_catalog.clock_timestamp()) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8;
END
$f$;
GRANT EXECUTE ON FUNCTION prism.clock_due() TO PUBLIC;`

// RaiseHorizon makes prism.horizon in conn's database at least ts (and
// creates it when missing). Whoever writes row versions stamped with
// another region's clock outside an apply transaction (a bootstrap copy)
// calls it, so the application's writes over those versions still check
// for a clock floor (trigger prism_clock).
func RaiseHorizon(ctx context.Context, conn *pgx.Conn, ts time.Time) error {
	if _, err := conn.Exec(ctx, horizonSQL); err != nil {
		return fmt.Errorf("create prism.horizon: %w", err)
	}
	if _, err := conn.Exec(ctx, "SELECT prism.raise_horizon($1)", ts); err != nil {
		return fmt.Errorf("raise prism.horizon: %w", err)
	}
	return nil
}

// eventTriggerSQL creates the event trigger; it needs a superuser, and
// Setup only warns without it (prism.install_all at every start still
// covers the tables that exist then).
const eventTriggerSQL = `
DO $d$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'prism_install') THEN
		CREATE EVENT TRIGGER prism_install ON ddl_command_end
			WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE TABLE AS', 'SELECT INTO')
			EXECUTE FUNCTION prism.on_ddl();
	END IF;
END
$d$`

// CollectConflicts deletes the records of conflicts (prism.conflicts)
// resolved more than keep ago and returns how many it deleted.
func (a *Applier) CollectConflicts(ctx context.Context, keep time.Duration) (int64, error) {
	if err := a.ensureSetup(ctx); err != nil {
		return 0, err
	}
	secs := strconv.FormatFloat(keep.Seconds(), 'f', 3, 64)
	tag, err := a.pool.Exec(ctx, "DELETE FROM prism.conflicts WHERE at < now() - make_interval(secs => $1::float8)", secs)
	if err != nil {
		return 0, fmt.Errorf("collect conflicts: %w", err)
	}
	return tag.RowsAffected(), nil
}

// collectMarksSQL deletes the key marks (prism.key_marks) that no
// transaction in progress can meet. A mark matters to a transaction whose
// snapshot predates the mark's commit. A mark whose writer (its xmin)
// precedes the xmin of every session's snapshot and transaction finished
// before each of those snapshots was taken: it is deleted. Transaction
// ids, not clocks: an applied mark's commit timestamp is the source's
// commit time, and compared with this server's clock it made a region
// whose clock runs ahead of a source's delete that source's marks while
// the transactions they guard still ran. When pg_stat_activity hides some
// session's snapshot (this role lacks pg_read_all_stats), the marks
// written more than an hour ago go instead (at: this server's clock when
// the mark's writer started).
const collectMarksSQL = `WITH act AS (
	SELECT coalesce(bool_or(a.state IS NULL), false) AS hidden,
		max(greatest(pg_catalog.age(a.backend_xmin), pg_catalog.age(a.backend_xid))) AS horizon
	FROM pg_catalog.pg_stat_activity a WHERE a.backend_type = 'client backend' AND a.pid <> pg_catalog.pg_backend_pid())
DELETE FROM prism.key_marks k WHERE k.ctid = ANY (ARRAY(SELECT m.ctid FROM prism.key_marks m, act
	WHERE CASE WHEN act.hidden THEN m.at < now() - interval '1 hour'
	ELSE pg_catalog.age(m.xmin) > coalesce(act.horizon, 0) END
	LIMIT $1))`

// InstallMissing installs the conflict triggers on the tables with a key
// that have none, or whose key changed since they were installed (see
// prism.install_missing): tables created or altered since the start while
// event trigger prism_install is missing, which would otherwise wait for
// the next start. It returns how many tables it installed on and how many
// prism-cdc's role may not alter.
func (a *Applier) InstallMissing(ctx context.Context) (installed, denied int, err error) {
	if err := a.ensureSetup(ctx); err != nil {
		return 0, 0, err
	}
	if err := a.pool.QueryRow(ctx, "SELECT installed, denied FROM prism.install_missing()").Scan(&installed, &denied); err != nil {
		return 0, 0, fmt.Errorf("install missing conflict triggers: %w", err)
	}
	return installed, denied, nil
}

// CollectMarks deletes the key marks no transaction in progress can meet
// any more (see collectMarksSQL) and returns how many it deleted. Marks last as long as the apply
// transactions that may meet them instead of an hour, so that the table
// every applied insert writes stays small. It deletes them in paced
// chunks (see upkeep): a backlog leaves a mark per applied insert.
func (a *Applier) CollectMarks(ctx context.Context) (int64, error) {
	if err := a.ensureSetup(ctx); err != nil {
		return 0, err
	}
	var deleted int64
	for {
		start := time.Now()
		tag, err := a.pool.Exec(ctx, collectMarksSQL, a.upkeep.marks)
		if err != nil {
			return deleted, fmt.Errorf("collect key marks: %w", err)
		}
		deleted += tag.RowsAffected()
		if tag.RowsAffected() < int64(a.upkeep.marks) {
			return deleted, nil
		}
		if err := a.upkeep.pause(ctx, time.Since(start)); err != nil {
			return deleted, fmt.Errorf("collect key marks: %w", err)
		}
	}
}

// CompactStamps drops the row stamps of batches written more than age
// ago whose versions were replaced since (see prism.batch_stamps), and
// returns how many it dropped. Each batch's stamps are checked once, in
// paced chunks of rows (see upkeep and prism.compact_stamps_chunk).
func (a *Applier) CompactStamps(ctx context.Context, age time.Duration) (int64, error) {
	if err := a.ensureSetup(ctx); err != nil {
		return 0, err
	}
	secs := strconv.FormatFloat(age.Seconds(), 'f', 3, 64)
	var dropped, after int64
	for {
		start := time.Now()
		var n int64
		var last *int64
		if err := a.pool.QueryRow(ctx, "SELECT dropped, last FROM prism.compact_stamps_chunk(now() - make_interval(secs => $1::float8), $2, $3)",
			secs, after, a.upkeep.stampRows).Scan(&n, &last); err != nil {
			return dropped, fmt.Errorf("compact row stamps: %w", err)
		}
		dropped += n
		if last == nil {
			return dropped, nil
		}
		after = *last
		if err := a.upkeep.pause(ctx, time.Since(start)); err != nil {
			return dropped, fmt.Errorf("compact row stamps: %w", err)
		}
	}
}

// upkeep divides the upkeep of the applier's tables (CollectMarks,
// CompactStamps) into chunks, each its own short transaction followed by
// a pause pace times as long as the chunk took. A backlog leaves a key
// mark per applied insert and a row stamp per batched key: removed in one
// statement, 100,000 of them kept the region's server busy for seconds
// while the apply sessions waited for a CPU, and live replication lagged
// by a quarter of a second (docs/performance.md). Paced, the upkeep uses
// at most 1/(pace+1) of one CPU of the server.
type upkeep struct {
	marks     int // key marks deleted per statement
	stampRows int // rows of prism.batch_stamps compacted per statement
	pace      int
}

// defaultUpkeep: about 10-30 ms of server time per chunk.
var defaultUpkeep = upkeep{marks: 5000, stampRows: 50, pace: 3}

// pause waits pace times took, or until ctx ends.
func (u upkeep) pause(ctx context.Context, took time.Duration) error {
	t := time.NewTimer(time.Duration(u.pace) * took)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Collect deletes tombstones, row stamps and clock floors older than
// keep, and returns how many tombstones and floors it deleted. A change that arrives more than
// keep after a delete of its key (a region cut off that long) no longer
// sees the delete: an older update of the key re-inserts the row there.
func (a *Applier) Collect(ctx context.Context, keep time.Duration) (tombstones, floors int64, err error) {
	if err := a.ensureSetup(ctx); err != nil {
		return 0, 0, err
	}
	secs := strconv.FormatFloat(keep.Seconds(), 'f', 0, 64)
	tag, err := a.pool.Exec(ctx, "DELETE FROM prism.tombstones t WHERE prism.stamp(t.xmin) < now() - make_interval(secs => $1::float8)", secs)
	if err != nil {
		return 0, 0, fmt.Errorf("collect tombstones: %w", err)
	}
	tombstones = tag.RowsAffected()
	if _, err := a.CollectMarks(ctx); err != nil {
		return tombstones, 0, err
	}
	if _, err := a.pool.Exec(ctx, "DELETE FROM prism.batch_stamps WHERE newest < now() - make_interval(secs => $1::float8)", secs); err != nil {
		return tombstones, 0, fmt.Errorf("collect row stamps: %w", err)
	}
	tag, err = a.pool.Exec(ctx, "DELETE FROM prism.clock_floors WHERE at < now() - make_interval(secs => $1::float8)", secs)
	if err != nil {
		return tombstones, 0, fmt.Errorf("collect clock floors: %w", err)
	}
	return tombstones, tag.RowsAffected(), nil
}

// earlierTriggersSQL counts the tables whose prism_clock or
// prism_tombstone an earlier version made and prism.install could not
// replace (see there).
const earlierTriggersSQL = `SELECT count(DISTINCT tgrelid) FROM pg_catalog.pg_trigger
	WHERE tgname = 'prism_clock' AND ` + earlierClock + `
		OR tgname = 'prism_tombstone' AND ` + earlierTombstone

// installTriggers runs prism.install_all. It serialises with other nodes'
// Setup, but DDL of the application (and its event trigger) can still
// deadlock with it or race on a trigger function; such failures are
// retried.
func installTriggers(ctx context.Context, conn *pgx.Conn) (int, error) {
	for attempt := 1; ; attempt++ {
		var installed int
		err := conn.QueryRow(ctx, "SELECT prism.install_all()").Scan(&installed)
		if err == nil {
			return installed, nil
		}
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "42501" {
			// A table of a role prism-cdc's role is not a member of (one
			// a superuser created, say): name the way out.
			return 0, fmt.Errorf("install conflict triggers: %w (prism-cdc creates them on every table with a key, so the role it connects as must own each such table or be a member of its owner: ALTER TABLE ... OWNER TO the application's owner role, or GRANT that role to prism-cdc's; prism-cdc doctor prints the statements)", err)
		}
		if attempt == 5 || !errors.As(err, &pe) || !(pe.Code == "23505" || strings.HasPrefix(pe.Code, "40")) {
			return 0, fmt.Errorf("install conflict triggers: %w", err)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(time.Duration(attempt) * 100 * time.Millisecond):
		}
	}
}
