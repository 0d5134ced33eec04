// Command prism-bench measures prism-cdc against PostgreSQL's own logical
// replication on one machine.
//
// It starts a source cluster and four region clusters (six with pglogical) (two for native
// subscriptions, two for prism-cdc nodes, so neither contender's
// replication origins touch the other's data), loads pgbench data into
// all of them, creates every contender's slot before any load, and then
// runs up to four scenarios:
//
//   - backlog: a backlog of pgbench transactions is generated while every
//     contender is stopped, then each contender drains it in turn (order
//     alternating between runs): pg_recvlogical with pgoutput in text and
//     binary mode (the decoding limit of one slot), two native
//     subscriptions, and three prism-cdc node processes (na1 on the
//     source, eu1 and as1 on the regions). Catch-up is timed until the
//     slot's confirmed_flush_lsn passes the backlog's end, and until the
//     last row is visible in every region. After each drain both regions
//     are compared with the source.
//   - lag: pgbench at a fixed rate with replication running, for native
//     subscriptions, prism-cdc and pglogical (when it is a contender) in
//     turn; every transaction also inserts a row stamped on the source,
//     and a deferred trigger in each region records when it is applied
//     there.
//   - large: one large INSERT ... SELECT transaction drained by prism-cdc,
//     with the nodes' peak memory.
//   - active: every region of a three-region mesh (prism-cdc, and
//     pglogical when it is a contender) writes the same hot rows at a fixed
//     rate; then the time to quiesce, the rows that differ between the
//     regions and the lag between regions.
//
// With contender pglogical, two more region clusters and the source form
// a pglogical mesh; its two subscriptions to the source drain the backlog
// and replicate the lag scenario's workload.
//
// Every scenario but active (which runs last) leaves the regions equal to
// the source, so the next
// starts from the same state. Results are printed as Markdown tables.
package main
