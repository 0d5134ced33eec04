// Package bootstrap brings a new or rebuilt region in: it copies the schema
// and every published table from a running source region into the target
// region's database at one consistent snapshot, while every region keeps
// writing, and sets the target's replication origins so that streaming from
// every region resumes exactly after what the copy holds: nothing is
// applied twice and nothing is skipped.
//
// # Order of a run
//
//  1. Target lock-out. The run takes, in the target database, the advisory
//     lock every applier's Setup takes (hashtext('prism.apply.setup')), so no new
//     applier (a peer's direct-SQL fallback, a node of the target region)
//     gets past Setup until the run ends. It then holds every peer region's
//     origin prism_<region> in a guard session of its own, so an applier
//     that passed Setup earlier cannot commit either (it gets ErrBusy and
//     returns to Setup). Appliers fence origin holders only right after
//     Setup, so the guards survive; a guard that dies anyway (fenced in the
//     instant before the lock was taken) is detected before the origins are
//     set, and the run fails and is started again.
//  2. Schema, when none of the published tables exists in the target:
//     pg_dump --schema-only of the source (without schema prism, owners,
//     privileges and publications, and without prism-cdc's conflict
//     triggers, which the target's node generates for itself at start)
//     piped into psql --single-transaction, so a crash leaves either all
//     of it or none. Tombstones (prism.tombstones) are not copied.
//  3. The source snapshot (see below); parallel workers, each in a
//     REPEATABLE READ transaction on the source that imports the exported
//     snapshot (SET TRANSACTION SNAPSHOT); the other regions' positions as
//     of the snapshot (see below); then the workers copy whole tables with
//     binary COPY streamed straight into the target.
//  4. The origins: on the target, prism_<source> is set to the snapshot's
//     consistent point L and prism_<other> to the source's progress of that
//     origin as of the snapshot; then the run is marked done and the lock is
//     released, and appliers resume exactly after the snapshot.
//
// # The boundary for the source region's own writes
//
// The snapshot is exported by CREATE_REPLICATION_SLOT ... TEMPORARY LOGICAL
// pgoutput EXPORT_SNAPSHOT on a replication connection to the source, as
// PostgreSQL's own table synchronisation does. The exported snapshot sees
// exactly the transactions whose commit record lies before the slot's
// consistent point L, and decoding from L sends exactly the others. A
// commit record before L ends at or before L; one after L starts at or
// after L, so it ends after L. prism-cdc keys progress by a transaction's
// EndLSN (the end of its commit record), so "EndLSN <= L" is exactly "in the
// snapshot": prism_<source> = L on the target skips the first and applies
// the second. pg_current_wal_lsn() read inside an ordinary snapshot would
// not do: transactions can commit in the WAL before it but become visible
// after the snapshot is taken, and they would be lost.
//
// # The boundary for the other regions' writes
//
// What the source had applied from region X is the source's origin
// prism_X, which is not MVCC: it moves when an applier commits, whatever
// the snapshot sees, so reading it next to the snapshot is not enough. The
// run holds prism_X on the source (for every other region X) while the
// snapshot is taken, and reads its progress before letting go: no applier
// of X can commit in between, so the snapshot holds exactly the X
// transactions up to that progress. The hold waits out an applier between
// its commit record and the progress update; a busy applier holding the
// origin is terminated (its open transaction rolls back and is applied
// again) and appliers do not fence a session named prism_bootstrap back.
// The source's appliers of the other regions pause while the slot is
// created (it waits for the transactions running on the source), not
// while the tables are copied.
//
// Reading the progress from the WAL after the snapshot instead (the first
// X transaction after L, minus one) loses transactions: the source applies
// queued transactions of X in batches, one target transaction that carries
// the origin LSN of its last member only, so a batch right after L would
// make the target skip its earlier members although the snapshot lacks
// them.
//
// # Commit times of the copied rows
//
// last_write_wins compares an incoming version with the commit time and
// region of the local one. Rows copied in one plain transaction would all
// carry the time of the copy, newer than every write still on its way, and
// the target would throw those writes away. So every copied row keeps the
// (commit time, region) it has on the source: rows whose source commit time
// is known are written in transactions tagged with the origin of their
// region and that commit time (pg_replication_origin_xact_setup with LSN
// 0/0, which does not move the origin's progress), grouped by runs of rows
// of one source transaction. Rows without a known commit time (frozen, or
// written before track_commit_timestamp) have none on the source either,
// where any incoming write wins; they are bulk-copied under origins
// prism_bootstrap_<n> with the time 1970-01-01, older than any write, so
// the same holds on the target. Every copied row thus carries a replication
// origin, so a slot of the target region never ships the copy back out.
//
// # Restart and --force
//
// The state of a run is recorded in prism.bootstrap in the target. A run
// that did not finish (crash, kill, lost guard) is detected by the next run
// and started over from scratch without --force: the published tables are
// emptied and copied again, and the origins are set only at the end. A
// target whose published tables hold rows and that has no unfinished run
// (an existing region, or a finished bootstrap) is refused unless --force,
// which lists the tables and their rows, empties them and drops the target
// region's replication slot (its unshipped local writes belong to the data
// being replaced). TRUNCATE runs under a replication origin too, so it is
// not shipped to other regions.
//
// Between a killed run and the next one the target has half-copied tables
// and nobody holds the lock or the guards. Appliers check prism.bootstrap
// whenever they take an origin (prism.bootstrap_check) and refuse every
// transaction with the retryable SQLSTATE PR003 while the last run is not
// done: the other regions keep their changes (their slots cannot confirm
// them) until a run finishes, and its origins decide what is applied.
// Without the check a region's direct-SQL fallback could apply into the
// half-copied tables and confirm its slot, and the next run, which empties
// the tables, would lose those transactions.
//
// # Preconditions (checked where possible)
//
// Every node of every other region must list the target region in its
// peers (and have been restarted with it) before the run starts: from then
// on their slots cannot confirm past what the target has acknowledged, so
// everything after the snapshot stays in their WAL until the target has it.
// Their shippers to the target halt while it has no tables (the direct-SQL
// fallback fails on the missing relation) and resume by themselves after
// the run; the origins decide what they skip. The run warns at the end when
// such a slot is confirmed past the position set for its region: unless
// that region was idle (nodes advance an idle slot), its nodes do not ship
// to the target. A slot position cannot prove more than that, so it is a
// warning, not an error. The target region's nodes must be stopped (its
// slot must not be active); a node started during the run waits in Setup
// until it ends.
//
// # Limits
//
// Binary COPY needs the same types on both sides; arrays, composites and
// ranges of user-defined types are refused with a clear error. Sequences
// are not copied (see the README on per-region key ranges). Rows of
// transactions still known by their commit time go through one session per
// origin: long runs of one transaction with COPY (about as fast as the
// bulk path), one-row transactions pipelined at some 20k rows/s. Memory is
// bounded by a few runs per origin (at most 5000 rows or 4 MB each) and
// one row per worker.
package bootstrap
