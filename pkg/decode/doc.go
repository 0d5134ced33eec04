// Package decode owns the update message and the reading half of a node: it
// streams a region's WAL from a logical replication slot (pgoutput) and
// assembles each committed local transaction into one Txn.
//
// Assembler is the pure core: fed pgoutput messages in stream order, it
// returns a Txn at each commit. It never panics on any input and copies
// everything it keeps. Reader owns the I/O: the publication and slot setup,
// the replication connection, standby status updates and reconnects.
//
// Memory: a transaction whose changes grow past ReaderConfig.SpillBytes
// (default 32 MiB) is written to an unlinked temporary file while it is
// decoded and handed out with a Spill instead of Changes; Spill.Iter reads
// it back in chunks of about 1 MiB, and Release frees the file once every
// region acknowledged it. Memory therefore does not grow with transaction
// size (a handful of queued Txns, each at most SpillBytes in memory).
//
// Schema changes: a transactional logical message with prefix DDLPrefix
// (emitted by pkg/apply's event trigger when ddl: replicate is on) becomes
// an OpDDL change at its place among the transaction's row changes, so a
// target runs it exactly where the source did.
//
// Encoding: a Txn and its changes leave memory in one binary form only
// (AppendTxn, AppendTxnHeader and AppendChanges, read back by the Parse
// functions, which check every length and every change): peer protocol
// frames carry it, spill files and the spool store it. MaxEncodedSize is
// the most a reader takes in one piece.
//
// Ordering: Txns are produced in commit order, each with a strictly higher
// EndLSN than the one before; a transaction the server resends after a
// reconnect is not produced twice by the same Reader. Transactions that
// carry a replication origin (applied by replication) are never produced:
// PostgreSQL 16 and later leave them out (pgoutput's origin 'none'), and
// on 15 the Assembler drops them at their Origin message.
//
// Progress: the position reported to the server is only ever one the
// caller passed to Reader.Confirm (everything up to it is durable in every
// region), or, while nothing is in flight, the position of a server
// keepalive, which in a logical walsender covers only WAL already decoded
// and sent.
package decode
