// Package apply owns applying update messages (decode.Txn) to a region's
// database exactly once. It is the applier half of a node and the engine
// of the direct-SQL fallback; both use the same replication origin, so
// switching between them never applies twice and never skips.
//
// # Exactly once
//
// Progress per (source region, target cluster) is the replication origin
// prism_<source region>. A run of transactions from one source is applied
// on one connection in this order:
//
//  1. pg_replication_origin_session_setup(prism_<source>): the origin is
//     now held exclusively by this session (another holder makes it fail
//     with ErrBusy);
//  2. pg_replication_origin_session_progress(true): read under the lock, so
//     nobody can advance it before this session commits;
//  3. per transaction whose EndLSN is above that progress: BEGIN; the
//     row statements; SET CONSTRAINTS ALL IMMEDIATE (deferred checks and
//     triggers run now); pg_replication_origin_xact_setup(end_lsn,
//     commit_time) last, because from PostgreSQL 16 on a transaction
//     that aborts after it (and wrote) moves the origin's progress as a
//     commit would; COMMIT with synchronous_commit = off, and after the
//     last COMMIT of each pipelined round trip
//     pg_replication_origin_session_progress(true), which flushes this
//     database's WAL up to that commit: only then do the transactions
//     count as applied (durable), and one WAL flush serves a whole
//     pipeline. Neither waits for synchronous standbys - in sync mode the
//     standby named there is prism-cdc's own reader, which never ships
//     applied transactions and would make the applier wait for nothing.
//     Transactions at or below the progress are skipped. With
//     WithLazyFlush (a node's applier) a round trip ends at its last
//     COMMIT, with no barrier: the transactions are committed, and
//     durable once Progress, which flushes up to the origin's last commit
//     on another session, reports them - the peer server acknowledges by
//     it, so the apply session never waits for a flush;
//  4. pg_replication_origin_session_reset(): a session that finished a
//     run keeps the origin for an idle time (holdIdle, 10 s) so the next
//     run of the stream skips steps 1-2, and lets go after it;
//     Release (the stream ended), Fence and Close let go at once, so a
//     failover path is not locked out by an idle holder. Apply sessions
//     are connections of their own (a second pool, made from the
//     Applier's), set up once for apply (session_replication_role =
//     replica, generic plans, no JIT, asynchronous commits) and never
//     reset, because changing session_replication_role drops every plan
//     the session cached: the next run on the connection, for any source,
//     starts with its statements planned. The Applier's own pool (dead
//     letters, undo, Progress, upkeep) keeps the server's settings.
//
// The data and the origin's progress commit atomically, so a transaction
// committed before a crash or a lost reply is skipped when replayed.
// Fence terminates a stale holder (a frozen node) before a takeover.
// Note that replication origins are per cluster, not per database: two
// target databases in one cluster share the progress of a source region.
//
// # Isolation
//
// Apply transactions run at REPEATABLE READ: every check in one (conflict
// resolution, clock floors, tombstones, missing rows) reads one snapshot,
// and a row that a concurrent local transaction changes after that
// snapshot fails the apply transaction with a serialization failure
// instead of being decided on stale data (at READ COMMITTED, an UPDATE
// that waited for a local writer re-checks its condition on the new row
// version with the old snapshot, which cannot see that writer's clock
// floor or tombstone). ApplyBatch applies such a transaction again at
// once, on fresh data: on the same session, which still holds the origin
// (it rolls back, reads the origin's progress and skips what that
// covers, like a new session), and on a new session only when that one
// broke. An INSERT, which finds no conflict once a row is deleted and
// would check the tombstones of the snapshot, first locks the key's row
// that the snapshot shows (FOR KEY SHARE), so a local delete after the
// snapshot fails it the same way; a batch inserts no key whose row the
// snapshot shows.
//
// Sources are applied on sessions of their own, concurrently, and two of
// their transactions that find no row for a key would not meet in any
// row: a newer delete of the key leaves a tombstone, an older insert on
// the other session, whose snapshot predates it, finds no tombstone, and
// both commit. So an applied insert (row by row, in a batch, or for an
// update of a missing row) and an applied delete of a missing key both
// upsert the key's row in prism.key_marks: the one whose snapshot
// predates the other's commit fails with a serialization failure and is
// applied again, as above. A local insert and an applied delete of a
// missing key meet the same way: trigger prism_clock upserts the mark of
// a key it inserts before it reads the key's tombstone, so an insert that
// commits after the delete's snapshot waits for the delete and floors its
// stamp above the tombstone's. The trigger runs only while some stamp may
// be ahead of the local clock (prism.horizon), and that is the only case
// that needs it: otherwise the insert commits after the delete's
// snapshot and so after its stamp, and every region keeps the row.
//
// # Ordering
//
// ApplyBatch applies in slice order. A run of transactions that can be
// batched (below) commits as one target transaction; every other
// transaction commits separately, with its own origin LSN and commit
// timestamp, and several share one pipelined round trip. If transaction k
// fails, the ones before it are durable and nothing after it is executed.
//
// # Batches
//
// Transactions of one source that ApplyBatch receives together (already
// queued: catch-up, bursts; a lone transaction is applied at once by the
// row path) are applied many to one target transaction: BEGIN; one
// array statement per table and operation
// (UPDATE ... FROM unnest(...), INSERT ... SELECT FROM unnest(...),
// DELETE ... USING unnest(...); each column one
// typed array, parsed element by element by the type's input function
// like the row path's parameters); SET CONSTRAINTS ALL IMMEDIATE;
// pg_replication_origin_xact_setup(the last one's end LSN, the greatest
// of their commit times); COMMIT and the barrier. A batch ends on
// source transaction boundaries, so the origin's progress stays exact.
// A run with fewer transactions than its array statements less one goes
// by rows, which costs less there (batchPlan.worthIt): two pgbench
// transactions (four tables) cost 250 server us each as a batch and
// 197-233 by rows, three 167-170 and 217 (BenchmarkApplySmallRuns).
//
// Each key keeps its net change in source order: the values of its last
// change, checked against the version before the batch with the commit
// time of its first change (the changes in between replace versions of
// the same region, which never conflict), and stamped with the commit time
// of its last. Update then delete is a delete; insert then update an
// insert. Whatever the row path would decide differently ends a batch
// before the transaction that brings it: TRUNCATE (and any change that is
// not a row), a key written again after its delete, an insert of a key
// the batch already wrote, an insert then a delete of one key (the row
// path leaves a tombstone), a key change, an unchanged TOASTed or binary
// value, a table without a key that is not insert-only (REPLICA IDENTITY
// FULL), identity ALWAYS or array columns, triggers of the table's own
// that fire on applied rows (ENABLE ALWAYS or REPLICA) unless they are
// AFTER ... FOR EACH ROW without transition tables, an update or delete
// of a table that has such AFTER row triggers (they must see every
// version; its inserts of new keys join, each firing them once as the
// row path does, table by table rather than in source order), a relation
// whose columns change within the batch, a column the target lacks.
//
// Array statements only take the way that needs no conflict check: an
// update or delete of a row whose version is older than the incoming
// change and has no clock floor (the row path's cheap test, on the
// version's commit time, which for a version a batch wrote is at or after
// its stamp, so the test is conservative), an insert of a key without a
// row or tombstone (each checked by a probe of its index; a row that a
// concurrent transaction commits fails the INSERT with a unique
// violation). Each statement counts its rows, and
// prism.batch_check fails the batch (PR002) when one took another way. A
// batch that fails - a conflict, a missing row, a tombstone, any error of
// a statement or of COMMIT, a serialization failure - is rolled back and
// its transactions are applied one by one by the row path, which decides
// and records every conflict per row and pins a failure on exactly one
// transaction (invariant 9 holds as below). Only a broken connection or a
// failed barrier is reported as such, retryable, about the batch's first
// transaction.
//
// When prism.batch_check fails a batch it also names the statement's
// rows that took another way (their places in its arrays, the first
// 1,000; looked up only then, by an anti join of the arrays and the
// written rows). The transactions of those rows' first changes are the
// ones the row path must decide; only they go by rows, and each run
// between them is planned and tried as a batch of its own, with at least
// four transactions (minPrefix) whatever the memo below says, since its
// rows took the batch's way up to the failing statement; the run after
// the last is planned anew like any other. A statement that fails later in such a batch names
// its own rows the same way. So a conflict in a catch-up costs a failed
// round trip and one transaction by rows, not the whole batch by rows.
// A batch's INSERT that fails on a key a concurrent transaction committed
// after the batch's snapshot (a unique violation, which names no row) is
// named the same way, by a query after the ROLLBACK for the statement's
// keys that have a row now; it counts for the memo below as a conflict.
// In BenchmarkApplyConflictCost (4,000 pgbench-like transactions 200 to a
// call, 1% of them meeting a version another region wrote later) a
// transaction costs 47 us (by rows before: 212), with 5% 98 us (195),
// with none 24 us.
//
// A failed batch costs its round trip, a ROLLBACK and the row path's
// round trip, so after k >= 2 batches of a source in a row that a row
// needing the row path or a serialization failure rolled back, its next
// 2^(k-2) batches (at most 64) go straight to the row path; one batch
// that commits ends that. Hot rows written in several regions (a
// conflict, a missing row or a tombstone in nearly every batch) so pay
// for the row path about once. Failures also count while batches commit
// in between (a quarter of the small batches failing, say): with r
// failures lately, halved every second after the last, only runs of at
// least 2<<r transactions (at most 32) are batched, so small runs go by
// rows for a while and a catch-up's long runs still batch.
//
// Stamps stay exact (see Conflicts): the statement that writes versions
// also records, in one row of prism.batch_stamps, its xmin (the batch's
// transaction), the table, and two arrays: the keys it wrote and the
// source commit times of the transactions that wrote them; deletes record
// the stamp of the tombstone prism_tombstone writes. One row per
// statement, not one per row: a per-row upsert cost the apply session
// about 40% of its CPU in a backlog (BenchmarkApplyCost, 32-37.5 against
// 23-27 server us per pgbench transaction). CompactStamps (hourly, from
// the node) drops the stamps of versions replaced since, in paced chunks
// of rows (see upkeep), as CollectMarks deletes key marks.
//
// # One failure touches no other
//
// However many transactions share a round trip or a batch, a failure is
// pinned on exactly one of them (a failed batch is applied again by the
// row path first). ApplyBatch returns n and an *Error: txns[:n] are
// committed and flushed (their origin progress is durable), and the
// error is about txns[n] alone - its EndLSN, Xid, the table and operation
// of the failing change, the SQLSTATE - so a policy (park, halt, undo)
// acts on that transaction and the caller applies txns[n+1:] right away
// in the next call. The round trip has one Sync at its end, so after a
// failing command the server skips the rest; the results read map to the
// commands one to one:
//
//   - a row, setup or COMMIT of transaction k fails (a constraint only
//     the target has, a deferred constraint at COMMIT, whose table comes
//     from the server's error): the commits before it in the round trip
//     are flushed by a barrier of their own before ApplyBatch returns;
//   - a change of k cannot be turned into a statement (its table or a
//     column is missing in the target): k never enters the round trip,
//     the transactions queued before it are sent and flushed, and the
//     error is about k;
//   - the connection breaks, the backend is terminated or the barrier
//     fails: that is no transaction's fault, so the error is retryable,
//     names no change, and is about the first transaction not known to be
//     durable (applying it again is safe: the origin skips what did
//     commit).
//
// A spilled transaction is applied alone (Apply, ApplyStream), never in a
// shared round trip; its errors follow the same rules.
//
// # Large transactions
//
// ApplyStream applies a transaction whose changes arrive in chunks (a
// spilled decode.Txn, streamed by the peer protocol or read from its
// spill file by the fallback) with the same steps 1-4, in one target
// transaction that stays open while the chunks arrive; memory holds one
// chunk and one pipeline, not the transaction. Its
// idle_in_transaction_session_timeout is raised for that transaction
// (between chunks the session waits for the network). An error, also one
// from the chunk source, rolls everything back.
//
// # Rows
//
// Values arrive in the source's text representation and are sent as text
// parameters cast to the target column's type, so the server parses them
// exactly as the source printed them. Columns are matched by name.
// Unchanged TOASTed values (decode.ValueUnchanged) are never written. Rows
// are found by the replica identity key (old key when sent, else the new
// key columns). Under REPLICA IDENTITY FULL, which flags every column as
// key, they are found like PostgreSQL's apply worker finds them: by the
// target's replica identity index or primary key, so a concurrent local
// write of another column is a conflict decided by the policy, not a
// missing row; a table without either is matched by every old column
// compared by its text form, touching exactly one row (ctid ... LIMIT 1).
// Both the source's text and the applier's sessions use one pinned text
// form (decode.PinTextForm), whatever the servers' DateStyle,
// IntervalStyle, extra_float_digits, bytea_output or TimeZone.
//
// Identity ALWAYS columns get the source's values, as in PostgreSQL's own
// apply worker: INSERTs say OVERRIDING SYSTEM VALUE, and an UPDATE never
// assigns them; when such a value changes (the source ran SET id =
// DEFAULT, or the column is outside the key) the same statement moves the
// row instead (DELETE and INSERT OVERRIDING SYSTEM VALUE, one conflict
// check, the transaction's stamp). Generated columns are never written.
//
// # Conflicts
//
// A conflict is an INSERT of an existing key (insert_exists), an UPDATE or
// DELETE of a row whose local version was written by another region at or
// after the incoming commit (update, delete), or an UPDATE or DELETE of a
// missing row (update_missing, delete_missing). An UPDATE over an older
// version from another region is not a conflict and is not recorded. Detection is part of each
// row statement (ON CONFLICT, UPDATE ... WHERE key AND prism.resolve(...)),
// so the common no-conflict case costs no extra round trip; only a row
// that exists looks up its commit timestamp and origin with
// pg_xact_commit_timestamp_origin(xmin). Every conflict is recorded in
// prism.conflicts in the same transaction; the ErrorOnConflict policy
// fails the transaction instead.
//
// Convergence under LastWriteWins: every version of a row carries a
// stamp, the pair (time, region) of the transaction that wrote it, and
// every region computes the same pair for the same version. The time is
// prism.row_stamp(table, key, xmin): the stamp prism.batch_stamps holds
// for the key when it was recorded for that very xmin (a version, or a
// tombstone, that a batch wrote: a batch has one commit timestamp, but
// each of its rows keeps its own source transaction's), else
// prism.stamp(xmin): the commit timestamp, which for an applied
// transaction is the source's (pg_replication_origin_xact_setup), raised
// past the transaction's clock floor when it has one (see below); the
// region is the local one or the origin prism_<region> (a batch applies
// one source region). A later write of the key, local or applied by rows,
// has another xmin, so the row stamp is stale and ignored: a local write
// is stamped by its own commit timestamp. A batch's commit timestamp is
// the greatest of its transactions', so a check that reads only the
// commit timestamp (the cheap test of an update, a delete or an insert
// over a tombstone, prism_clock, Collect) sees at least the exact stamp
// and errs on the safe side: a local write over a batched version raises
// its floor at most to that commit time, and a change the cheap test does
// not accept goes to prism.resolve (prism.admit for an insert over a
// tombstone), which reads the row stamp. The copy of a new region (internal/bootstrap) takes a row's row
// stamp in preference to its commit time too. Pairs are totally
// ordered (ties broken by the greater region name). Two rules keep the
// greatest pair on every region:
//
//   - an incoming version replaces the local one exactly when its pair is
//     greater (or it comes from the same region, which delivers in commit
//     order), and is dropped otherwise;
//   - a local write always stamps greater than the version it replaces.
//     Commit timestamps give that when the clocks agree. When this
//     region's clock is behind the replaced version's stamp, trigger
//     prism_clock records that stamp as the transaction's floor (table
//     prism.clock_floors, and a logical message the decoder turns into a
//     shipped commit time of floor + 1µs), so the write still stamps
//     later, here and everywhere it is applied.
//
// So each region always holds the greatest pair it has seen, and two
// regions that received the same set of transactions hold the same
// version of every row, whatever the delivery order. Deletes take part
// through tombstones (prism.tombstones, one row per deleted key of a
// keyed table, whose xmin is the deleting transaction, keyed by the key
// columns' text in the pinned text form, also when an application
// session with other DateStyle, TimeZone or extra_float_digits deletes:
// prism.install gives the trigger function of a table with such a key
// column those settings as SET clauses): a delete replaces
// a version exactly like an update; an update or insert of a key whose
// tombstone is newer is dropped (update_missing or insert_deleted with
// resolution keep_deleted); an older one is applied (the row comes back,
// insert_remote). Limits: tables with REPLICA IDENTITY FULL and no key
// have no tombstones and no floors, so an update that arrives after a
// newer delete re-inserts the row there; TRUNCATE leaves no tombstones;
// an UPDATE with unchanged TOASTed columns of a missing row cannot be
// re-inserted and is skipped; tombstones and floors older than the
// collection horizon (Collect) are gone, and so are row stamps (the
// version then counts as written at its batch's commit time); a version whose commit timestamp
// is no longer known (track_commit_timestamp was off, or the xid is older
// than its retention) loses to any incoming version. All of these are
// recorded in prism.conflicts, and prism-cdc verify finds the rows.
//
// SourceWins and KeepLocal are not convergent under
// concurrent writes to the same row: each region keeps the remote (or the
// local) version, which differs between regions.
//
// # Schema changes
//
// With WithDDL (ddl: replicate), event trigger prism_ddl captures the
// region's schema changes as transactional prism_ddl messages, which the
// decoder turns into decode.OpDDL changes at their place among the rows.
// The applier runs one in the apply transaction with the source's
// search_path and role (prism.ddl_run), sends it at once (the pipeline is
// flushed: the row statements after it are built from the new schema) and
// forgets its cached table descriptions and statements. Rows that name a
// column dropped here lose its value (logged), a column renamed here is
// matched by its new name (prism.ddl_renames), and a table or column not
// known here at all is a retryable error: the change that makes it may
// still be on its way from another region.
//
// A renamed table (ALTER TABLE ... RENAME TO or SET SCHEMA, replicated or
// made by hand in every region) keeps its conflict metadata: tombstones,
// batch stamps, key marks and conflict records stay under the name the
// table had when Setup or event trigger prism_install first installed it
// (prism.table_names; the trigger functions and the applier's statements
// use that name). Tombstones could not be moved: a tombstone's stamp is
// the commit time of its own xmin, and an UPDATE would give every one the
// rename's. prism.install, which prism_install runs for every ALTER TABLE,
// records each name change in prism.table_renames, and rows (and
// TRUNCATEs) that another region still sends under an old name go to the
// table that had it (renamedTable), with DDL replication on or off. A table created later
// under a name whose metadata another table still uses gets a name of its
// own (the name and its OID).
//
// A schema change made in the region itself (by hand, or with ddl off)
// can leave cached descriptions stale: a statement fails with 42804 (a
// column's type changed), 0A000 (a prepared plan no longer fits) or 26000.
// The caches and the connection are dropped and the error is retryable
// the first time a transaction meets it, so the next try builds its
// statements from the catalog as it is; a second such failure of the
// same transaction goes to its policy.
//
// # Schema prism
//
// The tables Setup creates (conflicts, dead_letters, undo_log,
// tombstones, clock_floors, batch_stamps, key_marks, table_names,
// table_renames; BootstrapStateSQL adds bootstrap) belong to
// one region and are never applied elsewhere, but the publication, FOR
// ALL TABLES, includes them: PostgreSQL 15 cannot leave a schema out of
// such a publication. So each has a primary key (Setup adds clock_floors'
// to a table made by an earlier version): without one PostgreSQL rejects
// their UPDATE and DELETE (55000), and with REPLICA IDENTITY FULL every
// DELETE would log and send the whole old row instead of its key. Their
// changes still pass through the walsender; the node's decoder drops them
// before it parses their tuples (decode.SkipSchemas). None but one is UNLOGGED:
// an unlogged table is emptied by a crash and is empty on a promoted
// standby, and each of them must survive both - floors and tombstones
// decide last_write_wins in the same transaction as the row they stamp,
// dead letters and the undo and conflict logs are the record an operator
// relies on (nothing is dropped silently). Row stamps last as long as the
// versions they stamp, up to the collection horizon. The exception is
// key_marks, which matter only to transactions in progress: it is
// UNLOGGED.
package apply
