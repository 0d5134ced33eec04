package apply

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// WithDDL turns DDL replication on (ddl: replicate): Setup installs event
// trigger prism_ddl, which captures this region's schema changes as
// transactional prism_ddl messages, the applier runs the schema changes
// of other regions (decode.OpDDL), and a value of a column the target no
// longer has (dropped here while the source still wrote it) is discarded
// with a warning instead of failing the transaction.
func WithDDL(on bool) Option {
	return func(a *Applier) { a.ddl = on }
}

// WithoutDDLCapture keeps Setup from installing event trigger prism_ddl
// even WithDDL(true): an applier into another region's database (the
// direct-SQL fallback) applies schema changes there as that region's
// nodes would, but whether that region's own schema changes are captured
// is its nodes' configuration, not this one's.
func WithoutDDLCapture() Option {
	return func(a *Applier) { a.noCapture = true }
}

// ddlSetupSQL creates what DDL replication needs in a database.
//
// prism.ddl_words splits a query string into tokens the way the server's
// lexer does, as far as telling statements apart needs: unquoted words
// lower-cased, quoted identifiers as '"' and their name, each string
// constant (also escape strings and dollar-quoted ones) as one "'",
// comments dropped, other characters one by one.
//
// prism.ddl_capture, the function of event trigger prism_ddl
// (ddl_command_end), emits the transactional logical message prism_ddl
// (decode.DDLPrefix) with the statement, search_path and role of the
// session, so the schema change travels in its transaction at its place
// among the rows. It lets pass without a message: publications,
// subscriptions and event triggers (each region's own replication setup),
// the applier's own transactions (prism.applying: the change came from
// another region; this also stops loops - there it installs the conflict
// triggers of the tables the change made), sessions that SET prism.ddl =
// 'local' (prism-cdc's own setup, and operators who run a change by hand
// in every region), and changes of temporary objects only. It refuses
// (SQLSTATE 0A000) what another region cannot reproduce from the
// statement text: commands outside the replicated list, CREATE TABLE AS /
// SELECT INTO, query strings with several statements, schema changes made
// inside a function, procedure or DO block, CONCURRENTLY, and statements
// naming a temporary table of the session.
//
// prism.ddl_renames records column renames (prism.ddl_capture) and
// dropped columns (prism.ddl_dropped, event trigger prism_ddl_drop on
// sql_drop), in every session, so that rows a region still sends under an
// old name find the new one and values of a dropped column are discarded
// knowingly (see reshape).
//
// prism.ddl_run runs a replicated schema change in the applier's
// transaction with the source's search_path and role, and with
// session_replication_role = origin so that event triggers (prism_install,
// which gives a new table its conflict triggers) fire as they did at the
// source; a failure names the statement and keeps its SQLSTATE.
var ddlSetupSQL = strings.ReplaceAll(`
SELECT pg_advisory_xact_lock(hashtext('prism.apply.setup'));
CREATE TABLE IF NOT EXISTS prism.ddl_renames (
	id       bigserial PRIMARY KEY,
	at       timestamptz NOT NULL DEFAULT clock_timestamp(),
	relid    oid NOT NULL,
	kind     text NOT NULL,
	old_name text NOT NULL,
	new_name text NOT NULL
);
CREATE OR REPLACE FUNCTION prism.ddl_words(q text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE AS $f$
DECLARE
	c     text[] := string_to_array(q, NULL);
	n     int := coalesce(array_length(c, 1), 0);
	i     int := 1;
	j     int;
	p     int;
	depth int;
	esc   boolean;
	s     text;
	w     text[] := '{}';
BEGIN
	WHILE i <= n LOOP
		IF c[i] ~ '\s' THEN
			i := i + 1;
		ELSIF c[i] = '-' AND i < n AND c[i+1] = '-' THEN
			WHILE i <= n AND c[i] <> E'\n' LOOP i := i + 1; END LOOP;
		ELSIF c[i] = '/' AND i < n AND c[i+1] = '*' THEN
			depth := 1;
			i := i + 2;
			WHILE i <= n AND depth > 0 LOOP
				IF c[i] = '/' AND i < n AND c[i+1] = '*' THEN
					depth := depth + 1; i := i + 2;
				ELSIF c[i] = '*' AND i < n AND c[i+1] = '/' THEN
					depth := depth - 1; i := i + 2;
				ELSE
					i := i + 1;
				END IF;
			END LOOP;
		ELSIF c[i] = '''' OR (c[i] IN ('E', 'e') AND i < n AND c[i+1] = '''') THEN
			esc := c[i] <> '''';
			IF esc THEN i := i + 1; END IF;
			i := i + 1;
			WHILE i <= n LOOP
				IF esc AND c[i] = '\' THEN
					i := i + 2;
				ELSIF c[i] = '''' THEN
					IF i < n AND c[i+1] = '''' THEN
						i := i + 2;
					ELSE
						i := i + 1;
						EXIT;
					END IF;
				ELSE
					i := i + 1;
				END IF;
			END LOOP;
			w := array_append(w, ''''::text);
		ELSIF c[i] = '"' THEN
			s := '';
			i := i + 1;
			WHILE i <= n LOOP
				IF c[i] = '"' THEN
					IF i < n AND c[i+1] = '"' THEN
						s := s || '"'; i := i + 2;
					ELSE
						i := i + 1;
						EXIT;
					END IF;
				ELSE
					s := s || c[i]; i := i + 1;
				END IF;
			END LOOP;
			w := array_append(w, ('"' || s)::text);
		ELSIF c[i] = '$' AND i < n AND c[i+1] ~ '[[:alpha:]_$]' THEN
			j := i + 1;
			WHILE j <= n AND c[j] ~ '[[:alnum:]_]' LOOP j := j + 1; END LOOP;
			IF j <= n AND c[j] = '$' THEN
				s := array_to_string(c[i:j], '');
				p := strpos(substr(q, j + 1), s);
				IF p = 0 THEN
					i := n + 1;
				ELSE
					i := j + p + length(s);
				END IF;
				w := array_append(w, ''''::text);
			ELSE
				w := array_append(w, '$'::text);
				i := i + 1;
			END IF;
		ELSIF c[i] ~ '[[:alnum:]_]' THEN
			j := i;
			WHILE j <= n AND c[j] ~ '[[:alnum:]_$]' LOOP j := j + 1; END LOOP;
			w := array_append(w, lower(array_to_string(c[i:j-1], ''))::text);
			i := j;
		ELSE
			w := array_append(w, c[i]::text);
			i := i + 1;
		END IF;
	END LOOP;
	RETURN w;
END
$f$;
-- ddl_ident turns a token of ddl_words into the name it stands for.
CREATE OR REPLACE FUNCTION prism.ddl_ident(t text) RETURNS text
LANGUAGE sql IMMUTABLE AS $f$
	SELECT CASE WHEN left(t, 1) = '"' THEN substr(t, 2) ELSE t END
$f$;
-- ddl_record_rename records ALTER TABLE ... RENAME [COLUMN] a TO b of
-- relation rel.
CREATE OR REPLACE FUNCTION prism.ddl_record_rename(rel oid, w text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
	k int := array_position(w, 'rename');
BEGIN
	IF k IS NULL THEN
		RETURN;
	END IF;
	-- RENAME TO (the table) and RENAME CONSTRAINT are not columns.
	IF w[k+1] IN ('to', 'constraint') THEN
		RETURN;
	END IF;
	IF w[k+1] = 'column' THEN
		k := k + 1;
	END IF;
	IF w[k+2] = 'to' AND w[k+3] IS NOT NULL THEN
		INSERT INTO prism.ddl_renames (relid, kind, old_name, new_name)
		VALUES (rel, 'column', prism.ddl_ident(w[k+1]), prism.ddl_ident(w[k+3]));
	END IF;
END
$f$;
CREATE OR REPLACE FUNCTION prism.ddl_capture() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $f$
DECLARE
	-- The caller's search_path, which the change is replicated with; the
	-- function itself runs with pg_catalog's (below).
	sp       text := pg_catalog.current_setting('search_path');
	q        text := pg_catalog.current_query();
	w        text[];
	stmts    int := 0;
	seen     boolean := false;
	t        text;
	verb     text := pg_catalog.lower(pg_catalog.split_part(TG_TAG, ' ', 1));
	objs     int;
	temps    int;
	tmpname  text;
	who      text := pg_catalog.current_setting('role');
	replicated CONSTANT text[] := ARRAY['CREATE SCHEMA', 'DROP SCHEMA', 'CREATE TABLE', 'ALTER TABLE', 'DROP TABLE',
		'CREATE INDEX', 'ALTER INDEX', 'DROP INDEX',
		'CREATE TYPE', 'ALTER TYPE', 'DROP TYPE',
		'CREATE SEQUENCE', 'ALTER SEQUENCE', 'DROP SEQUENCE'];
	hint CONSTANT text := 'prism-cdc runs with ddl: replicate. To make this change, run it by hand in every region with SET prism.ddl = ''local'' (see README, Schema changes).';
BEGIN
	-- The function is SECURITY DEFINER (the application's roles need no
	-- rights on schema prism), so it runs with search_path pg_catalog,
	-- pg_temp until it returns: a function or operator of the caller's
	-- schemas would otherwise run with its owner's rights. (A SET clause
	-- would hide the caller's search_path, which the change needs.) An
	-- error rolls the setting back with the change.
	PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
	-- The role that ran the change is the session's, or the one it SET
	-- ROLE to.
	IF who = 'none' THEN
		who := session_user;
	END IF;
	IF current_setting('prism.applying', true) = 'on' THEN
		q := nullif(current_setting('prism.ddl_command', true), '');
	END IF;
	IF TG_TAG = 'ALTER TABLE' AND q IS NOT NULL THEN
		w := prism.ddl_words(q);
		IF 'rename' = ANY (w) THEN
			PERFORM prism.ddl_record_rename(c.objid, w) FROM pg_event_trigger_ddl_commands() c
				WHERE c.classid = 'pg_catalog.pg_class'::regclass AND c.object_type IN ('table', 'table column');
		END IF;
	END IF;
	IF current_setting('prism.ddl', true) = 'local' THEN
		PERFORM pg_catalog.set_config('search_path', sp, true);
		RETURN;
	END IF;
	IF current_setting('prism.applying', true) = 'on' THEN
		-- A change from another region, run by prism-cdc's applier as the
		-- role that ran it there, which may not create prism-cdc's
		-- conflict triggers (prism_install warns then): this function
		-- may.
		PERFORM prism.install(k.oid) FROM pg_event_trigger_ddl_commands() c
			JOIN pg_catalog.pg_class k ON k.oid = c.objid
			JOIN pg_catalog.pg_namespace s ON s.oid = k.relnamespace
			WHERE c.classid = 'pg_catalog.pg_class'::regclass AND {{app_table}};
		PERFORM pg_catalog.set_config('search_path', sp, true);
		RETURN;
	END IF;
	-- Each region's own replication setup (prism-cdc's reader creates the
	-- region's publication) is not the application's schema.
	IF TG_TAG ~ '^(CREATE|ALTER|DROP) (PUBLICATION|SUBSCRIPTION|EVENT TRIGGER)$' THEN
		PERFORM pg_catalog.set_config('search_path', sp, true);
		RETURN;
	END IF;
	-- Temporary objects live in one session: nothing to replicate.
	IF TG_TAG LIKE 'DROP %' THEN
		IF current_setting('prism.ddl_dropped_temp', true) = 'on' THEN
			PERFORM set_config('prism.ddl_dropped_temp', '', true);
			PERFORM pg_catalog.set_config('search_path', sp, true);
			RETURN;
		END IF;
	ELSE
		SELECT count(*), count(*) FILTER (WHERE c.schema_name = 'pg_temp' OR c.schema_name LIKE 'pg\_temp\_%')
			INTO objs, temps FROM pg_event_trigger_ddl_commands() c;
		IF objs > 0 AND temps = objs THEN
			PERFORM pg_catalog.set_config('search_path', sp, true);
			RETURN;
		END IF;
	END IF;
	IF NOT (TG_TAG = ANY (replicated)) THEN
		RAISE EXCEPTION 'prism-cdc cannot replicate %: schema changes replicated by prism-cdc are CREATE/ALTER/DROP of tables, indexes, types and sequences, and CREATE/DROP SCHEMA', TG_TAG
			USING ERRCODE = '0A000', HINT = hint;
	END IF;
	IF q IS NULL THEN
		RAISE EXCEPTION 'prism-cdc cannot replicate %: the statement text is not known', TG_TAG USING ERRCODE = '0A000', HINT = hint;
	END IF;
	IF w IS NULL THEN
		w := prism.ddl_words(q);
	END IF;
	FOREACH t IN ARRAY w || ARRAY[';'] LOOP
		IF t = ';' THEN
			IF seen THEN
				stmts := stmts + 1;
			END IF;
			seen := false;
		ELSE
			seen := true;
		END IF;
	END LOOP;
	IF stmts > 1 THEN
		RAISE EXCEPTION 'prism-cdc cannot replicate %: the query string holds % statements; send the schema change as a statement of its own', TG_TAG, stmts
			USING ERRCODE = '0A000', HINT = 'psql -f, and migration tools that split files into statements, do so; so does one statement per Exec call.';
	END IF;
	IF w[1] IS DISTINCT FROM verb THEN
		RAISE EXCEPTION 'prism-cdc cannot replicate %: schema changes made inside a function, procedure or DO block cannot be replicated; run the statement itself', TG_TAG
			USING ERRCODE = '0A000', HINT = hint;
	END IF;
	IF 'concurrently' = ANY (w) THEN
		RAISE EXCEPTION 'prism-cdc cannot replicate % CONCURRENTLY: the other regions apply a schema change inside a transaction', TG_TAG
			USING ERRCODE = '0A000', HINT = hint;
	END IF;
	IF pg_my_temp_schema() <> 0 THEN
		SELECT k.relname INTO tmpname FROM pg_catalog.pg_class k
			WHERE k.relnamespace = pg_my_temp_schema() AND k.relname = ANY (SELECT prism.ddl_ident(x) FROM unnest(w) x) LIMIT 1;
		IF tmpname IS NOT NULL THEN
			RAISE EXCEPTION 'prism-cdc cannot replicate %: it names temporary table %, which the other regions do not have', TG_TAG, quote_ident(tmpname)
				USING ERRCODE = '0A000', HINT = hint;
		END IF;
	END IF;
	PERFORM pg_logical_emit_message(true, 'prism_ddl', json_build_object(
		'command', q, 'search_path', sp, 'role', who)::text);
	PERFORM pg_catalog.set_config('search_path', sp, true);
END
$f$;
-- ddl_dropped records dropped columns and notes, before ddl_command_end,
-- that a DROP dropped only temporary objects.
CREATE OR REPLACE FUNCTION prism.ddl_dropped() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
	-- Rows of regions that have not dropped a column yet still carry it.
	INSERT INTO prism.ddl_renames (relid, kind, old_name, new_name)
	SELECT d.objid, 'drop', d.address_names[3], '' FROM pg_event_trigger_dropped_objects() d
	WHERE d.object_type = 'table column' AND NOT d.is_temporary AND array_length(d.address_names, 1) = 3;
	PERFORM set_config('prism.ddl_dropped_temp',
		CASE WHEN bool_and(d.is_temporary) THEN 'on' ELSE '' END, true)
	FROM pg_event_trigger_dropped_objects() d WHERE d.original;
END
$f$;
CREATE OR REPLACE FUNCTION prism.ddl_run(sp text, r text, cmd text) RETURNS void
LANGUAGE plpgsql AS $f$
DECLARE
	prev text := current_setting('search_path');
BEGIN
	PERFORM set_config('session_replication_role', 'origin', true);
	PERFORM set_config('search_path', sp, true);
	IF r <> '' AND r <> current_user THEN
		IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
			RAISE EXCEPTION 'schema change from another region: role % ran it there and does not exist here: %', quote_ident(r), cmd
				USING ERRCODE = '42704', HINT = 'Create the role in this region (with the same rights); replication then resumes.';
		END IF;
		PERFORM set_config('role', r, true);
	END IF;
	-- prism_ddl reads the statement from here: current_query() is this call.
	PERFORM set_config('prism.ddl_command', cmd, true);
	BEGIN
		EXECUTE cmd;
	EXCEPTION WHEN OTHERS THEN
		RAISE EXCEPTION 'schema change from another region failed here: %: %', SQLERRM, cmd USING ERRCODE = SQLSTATE;
	END;
	PERFORM set_config('prism.ddl_command', '', true);
	PERFORM set_config('role', 'none', true);
	PERFORM set_config('session_replication_role', 'replica', true);
	PERFORM set_config('search_path', prev, true);
END
$f$;
-- ddl_renamed follows the renames of column col of table rel and returns
-- its name now (NULL when it was never renamed).
CREATE OR REPLACE FUNCTION prism.ddl_renamed(rel oid, col text) RETURNS text
LANGUAGE plpgsql STABLE AS $f$
DECLARE
	cur  text := col;
	nxt  text;
	hops int := 0;
BEGIN
	LOOP
		SELECT new_name INTO nxt FROM prism.ddl_renames
			WHERE relid = rel AND kind = 'column' AND old_name = cur ORDER BY id DESC LIMIT 1;
		EXIT WHEN nxt IS NULL OR hops > 16;
		cur := nxt;
		hops := hops + 1;
	END LOOP;
	RETURN CASE WHEN hops = 0 THEN NULL ELSE cur END;
END
$f$;
`, "{{app_table}}", appTableSQL)

// ddlTriggerSQL creates event triggers prism_ddl and prism_ddl_drop; it
// needs a superuser.
const ddlTriggerSQL = `
DO $d$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'prism_ddl') THEN
		CREATE EVENT TRIGGER prism_ddl ON ddl_command_end EXECUTE FUNCTION prism.ddl_capture();
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'prism_ddl_drop') THEN
		CREATE EVENT TRIGGER prism_ddl_drop ON sql_drop EXECUTE FUNCTION prism.ddl_dropped();
	END IF;
END
$d$`

// ddlTriggerDropSQL removes them.
const ddlTriggerDropSQL = "DROP EVENT TRIGGER IF EXISTS prism_ddl; DROP EVENT TRIGGER IF EXISTS prism_ddl_drop;"

// setupDDL installs the capture triggers (ddl: replicate). It needs a
// superuser; without one it returns an error that says what to run, and
// Setup fails: schema changes would not be captured. With DDL
// replication off it changes nothing (another tool of the same database,
// a dead-letter retry or a repair, may run with it off) and only warns
// when the triggers are installed: schema changes are then still
// captured and replicated.
func (a *Applier) setupDDL(ctx context.Context, conn *pgx.Conn) error {
	if !a.ddl {
		var present bool
		if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'prism_ddl')").Scan(&present); err != nil {
			return err
		}
		if present {
			a.log.Warn().Msg("ddl is off but event trigger prism_ddl is installed, so this region's schema changes are still replicated; to stop that, as a superuser: " + ddlTriggerDropSQL)
		}
		return nil
	}
	if _, err := conn.PgConn().Exec(ctx, ddlSetupSQL).ReadAll(); err != nil {
		return fmt.Errorf("ddl functions: %w", err)
	}
	if a.noCapture {
		return nil
	}
	if _, err := conn.Exec(ctx, ddlTriggerSQL); err != nil {
		return fmt.Errorf("create event trigger prism_ddl (ddl: replicate needs a superuser for it, once; or a superuser runs: %s): %w", DDLTriggerFix, err)
	}
	return nil
}

// DDLTriggerFix creates the capture triggers; doctor prints it.
const DDLTriggerFix = "CREATE EVENT TRIGGER prism_ddl ON ddl_command_end EXECUTE FUNCTION prism.ddl_capture(); CREATE EVENT TRIGGER prism_ddl_drop ON sql_drop EXECUTE FUNCTION prism.ddl_dropped();"

// ddlRunSQL runs a replicated schema change (see prism.ddl_run).
const ddlRunSQL = "SELECT prism.ddl_run($1, $2, $3)"

// queueDDL adds replicated schema change d to batch b. The caller flushes
// b right after it, before it builds any row statement that may depend on
// the new schema, and then calls forgetSchema.
func (a *Applier) queueDDL(b *pgconn.Batch, d *decode.DDL) error {
	sql, vals, err := a.ddlCommand(d)
	if err != nil {
		return err
	}
	b.ExecParams(sql, vals, nil, nil, nil)
	return nil
}

// ddlCommand returns the statement and parameters that run schema change
// d in the apply transaction, or why it cannot run here: every path that
// applies a schema change (the pipeline, the stream, a dead-letter retry)
// asks it, so ddl: off refuses them all alike.
func (a *Applier) ddlCommand(d *decode.DDL) (string, [][]byte, error) {
	if d == nil || d.Command == "" {
		return "", nil, permanent("22023", "DDL change without its statement")
	}
	if !a.ddl {
		return "", nil, permanent("55000", "a schema change arrived (%s) but ddl is off in this region; set ddl: replicate in every region's configuration", d.Command)
	}
	return ddlRunSQL, [][]byte{[]byte(d.SearchPath), []byte(d.Role), []byte(d.Command)}, nil
}

// forgetSchema drops the cached table descriptions, statements and
// reshapings: the target's schema changed.
func (a *Applier) forgetSchema() {
	a.mu.Lock()
	a.targets = map[string]*target{}
	a.stmts = map[string]*statement{}
	a.shapes = map[string]*reshaping{}
	a.renamed = map[*decode.Relation]*decode.Relation{}
	a.mu.Unlock()
}

// reshaping maps a source relation onto a target table whose columns
// differ from it: columns the target lacks (dropped here) are left out,
// columns renamed here get their new name.
type reshaping struct {
	rel  *decode.Relation // the relation as the target has it
	keep []int            // for each of rel's columns, its index in the source relation
}

// reshape returns c as the target table can take it. A change whose
// relation names a table renamed here takes its name now (renamedTable).
// With DDL replication on, a change whose relation names columns the target does
// not have is rewritten without the ones dropped here, and with their new
// name for the ones renamed here (both recorded in prism.ddl_renames).
// Dropped columns' values are discarded with a warning, once per table
// and column set. Any other missing column is an error that
// schemaPending makes retryable: the schema change that adds it may still
// be on its way from another region. A change that fits is returned as it
// is.
func (a *Applier) reshape(ctx context.Context, conn *pgx.Conn, c *decode.Change) (*decode.Change, error) {
	if c.Rel == nil || c.Op == decode.OpTruncate || c.Op == decode.OpDDL {
		return c, nil
	}
	c, err := a.renamedTable(ctx, conn, c)
	if err != nil || !a.ddl {
		return c, err
	}
	t, err := a.target(ctx, conn, c.Rel, false)
	if err != nil {
		return nil, err
	}
	if fits(t, c.Rel) {
		return c, nil
	}
	key := shapeOf(c.Rel)
	a.mu.Lock()
	r := a.shapes[key]
	a.mu.Unlock()
	if r == nil {
		if t, err = a.target(ctx, conn, c.Rel, true); err != nil {
			return nil, err
		}
		if fits(t, c.Rel) {
			return c, nil
		}
		if r, err = a.reshaping(ctx, conn, t, c.Rel); err != nil {
			return nil, err
		}
		a.mu.Lock()
		a.shapes[key] = r
		a.mu.Unlock()
	}
	out := *c
	out.Rel = r.rel
	out.Old = pick(c.Old, r.keep)
	out.New = pick(c.New, r.keep)
	return &out, nil
}

// tableRenamedSQL finds the table that was named $1 (schema.table) here
// before a rename, by its latest rename away from that name: its schema
// and name now.
const tableRenamedSQL = `SELECT n.nspname, c.relname FROM prism.table_renames r
	JOIN pg_catalog.pg_class c ON c.oid = r.relid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
	WHERE r.old_name = $1 ORDER BY r.id DESC LIMIT 1`

// renamedTable returns c with its relation named as the table is named
// here when the table c names does not exist here but a table of that
// name was renamed here (prism.table_renames): rows that another region
// sends under a table's old name, before the rename reached it, go to the
// renamed table, with or without ddl: replicate. Any other change is
// returned as it is.
func (a *Applier) renamedTable(ctx context.Context, conn *pgx.Conn, c *decode.Change) (*decode.Change, error) {
	rel, err := a.renamedRel(ctx, conn, c.Rel)
	if err != nil || rel == c.Rel {
		return c, err
	}
	out := *c
	out.Rel = rel
	return &out, nil
}

// renamedRel returns rel, or a copy named as the table is named here when
// the table rel names was renamed here (see renamedTable).
func (a *Applier) renamedRel(ctx context.Context, conn *pgx.Conn, rel *decode.Relation) (*decode.Relation, error) {
	a.mu.Lock()
	nr := a.renamed[rel]
	a.mu.Unlock()
	if nr != nil {
		return nr, nil
	}
	_, err := a.target(ctx, conn, rel, false)
	var pe *permanentError
	if err == nil || !errors.As(err, &pe) || pe.code != "42P01" {
		return rel, err
	}
	name := rel.Schema + "." + rel.Table
	var schema, table string
	switch qerr := conn.QueryRow(ctx, tableRenamedSQL, name).Scan(&schema, &table); {
	case errors.Is(qerr, pgx.ErrNoRows):
		return rel, err
	case qerr != nil:
		return rel, fmt.Errorf("look up renames of table %s: %w", name, qerr)
	}
	r := *rel
	r.Schema, r.Table = schema, table
	a.mu.Lock()
	a.renamed[rel] = &r
	a.mu.Unlock()
	a.log.Info().Str("table", name).Str("renamed_to", schema+"."+table).
		Msg("rows of another region name a table by its name before a rename here (a schema change not yet applied there); applying them to the renamed table")
	return &r, nil
}

// renamedTruncate returns TRUNCATE c with each table that was renamed here
// under its name now (see renamedTable); a table missing here and never
// renamed is left for TRUNCATE itself to report.
func (a *Applier) renamedTruncate(ctx context.Context, conn *pgx.Conn, c *decode.Change) (*decode.Change, error) {
	rels := c.Truncated
	if len(rels) == 0 && c.Rel != nil {
		rels = []*decode.Relation{c.Rel}
	}
	var out []*decode.Relation
	for i, rel := range rels {
		nr, err := a.renamedRel(ctx, conn, rel)
		var pe *permanentError
		if err != nil && !(errors.As(err, &pe) && pe.code == "42P01") {
			return nil, err
		}
		if nr != rel && out == nil {
			out = append(make([]*decode.Relation, 0, len(rels)), rels[:i]...)
		}
		if out != nil {
			out = append(out, nr)
		}
	}
	if out == nil {
		return c, nil
	}
	t := *c
	t.Truncated, t.Rel = out, out[0]
	return &t, nil
}

// reshaping works out how rel maps onto target t and logs what it drops.
func (a *Applier) reshaping(ctx context.Context, conn *pgx.Conn, t *target, rel *decode.Relation) (*reshaping, error) {
	r := &reshaping{rel: &decode.Relation{ID: rel.ID, Schema: rel.Schema, Table: rel.Table, ReplicaIdentity: rel.ReplicaIdentity}}
	inSource := make(map[string]bool, len(rel.Columns))
	for _, col := range rel.Columns {
		inSource[col.Name] = true
	}
	var dropped, renamed []string
	for i, col := range rel.Columns {
		if _, ok := t.types[col.Name]; ok {
			r.rel.Columns = append(r.rel.Columns, col)
			r.keep = append(r.keep, i)
			continue
		}
		var now *string
		if err := conn.QueryRow(ctx, "SELECT prism.ddl_renamed($1::regclass, $2)", t.ident, col.Name).Scan(&now); err != nil {
			return nil, fmt.Errorf("look up renames of %s.%s: %w", t.name, col.Name, err)
		}
		if now != nil && !inSource[*now] {
			if _, ok := t.types[*now]; ok {
				col.Name = *now
				r.rel.Columns = append(r.rel.Columns, col)
				r.keep = append(r.keep, i)
				renamed = append(renamed, rel.Columns[i].Name+" -> "+*now)
				continue
			}
		}
		var gone bool
		if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM prism.ddl_renames WHERE relid = $1::regclass AND kind = 'drop' AND old_name = $2)", t.ident, col.Name).Scan(&gone); err != nil {
			return nil, fmt.Errorf("look up drops of %s.%s: %w", t.name, col.Name, err)
		}
		if !gone {
			return nil, permanent("42703", "column %q of table %s does not exist in this region (it was neither dropped nor renamed here)", col.Name, t.name)
		}
		if col.Key {
			return nil, permanent("42703", "key column %q of table %s was dropped in this region", col.Name, t.name)
		}
		dropped = append(dropped, col.Name)
	}
	ev := a.log.Warn()
	if len(dropped) == 0 {
		ev = a.log.Info()
	}
	ev.Str("table", t.name).Strs("discarded_columns", dropped).Strs("renamed_columns", renamed).
		Msg("rows of another region name columns this region dropped or renamed (a schema change not yet applied there); values of dropped columns are discarded")
	return r, nil
}

// schemaPending makes e, a missing table or column (42P01, 42703),
// retryable when DDL replication is on: the schema change that creates
// it was made by another region and may not have arrived yet (region A
// adds a column, region B applies it and writes it, B's rows reach C
// before A's schema change does). The caches are dropped already (fail),
// so a retry sees the table as it is then.
func (a *Applier) schemaPending(e *Error) {
	if !a.ddl || (e.SQLState != "42703" && e.SQLState != "42P01") {
		return
	}
	e.Retryable = true
	e.Err = fmt.Errorf("%w (ddl: replicate: waiting for the schema change that makes it, which may still be on its way from another region; retrying)", e.Err)
}

// fits reports whether target t has every column of rel.
func fits(t *target, rel *decode.Relation) bool {
	for _, col := range rel.Columns {
		if _, ok := t.types[col.Name]; !ok {
			return false
		}
	}
	return true
}

// shapeOf names a relation's table and columns.
func shapeOf(rel *decode.Relation) string {
	var b strings.Builder
	b.WriteString(rel.Schema)
	b.WriteByte('.')
	b.WriteString(rel.Table)
	for _, col := range rel.Columns {
		b.WriteByte(0)
		b.WriteString(col.Name)
	}
	return b.String()
}

// pick returns the values of row at the indexes keep (nil for nil).
func pick(row []decode.Value, keep []int) []decode.Value {
	if row == nil {
		return nil
	}
	out := make([]decode.Value, len(keep))
	for i, k := range keep {
		out[i] = row[k]
	}
	return out
}
