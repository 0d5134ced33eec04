// Package peers carries update messages between regions: the binary peer
// protocol, the Server that receives a source region's transactions and
// applies them, and the Shipper that sends one source's transactions to one
// target region with acknowledgement by LSN, retries, failover to the
// region's other nodes and the direct-SQL fallback.
//
// Authentication: the server opens every connection (after TLS, when
// configured) with a Challenge carrying 32 random bytes; the shipper's Hello
// carries HelloMAC, an HMAC-SHA256 keyed with the shared token over the
// nonce, its region, node and flags, which the server checks in constant
// time. The token itself never crosses the wire, and a Hello captured from
// one connection is refused on any other. Peers of another protocol version
// are refused with a reason asking to upgrade both sides. A Reject carries a
// code (protocol 4), so that a shipper tells refused credentials (a wrong
// token; or, from the TLS handshake, certificates the other side does not
// trust) from other failures without reading text: Status.AuthRefused,
// logged once per target with the fix.
//
// Ordering guarantees, in the order things happen to one transaction:
//
//  1. The reader hands transactions to Shipper.Send in commit order; each
//     target region receives them in exactly that order, whichever path
//     (node, failover node, direct SQL) carries them, and a shipper never
//     applies through two paths at once.
//  2. The receiving side applies them strictly in order, one database
//     transaction each, and advances the replication origin
//     prism_<source region> in the same database transaction (the Applier's
//     duty), so a transaction at or below the origin's progress is skipped.
//  3. Only after Apply returned nil (the transaction is committed) does the
//     Server send Ack(EndLSN). An Ack is cumulative: everything up to it is
//     durable in the target region. An Applier that flushes lazily (a
//     node's: apply.WithLazyFlush) commits without waiting for the WAL
//     flush; the Server then acknowledges what Progress, which flushes,
//     reports durable, from a goroutine of its own (acker), so the next
//     transactions are applied meanwhile and one flush covers every
//     commit made during the last (for a source that does not wait for the
//     ACKs, helloGatherAcks, every commit of ServerConfig.AckGather after
//     the first not yet acknowledged); never past the last transaction whose
//     apply returned (the origin moves at the commit record, a moment
//     before the transaction is visible). Before it answers about a failed
//     transaction it flushes the same way, in line.
//  4. Shipper.Acked advances only over acknowledged transactions, in Send
//     order; MinAcked over all target regions is the position the reader may
//     confirm to its replication slot.
//  5. One failing transaction touches no other. The receiving side applies
//     many transactions per ApplyBatch call (one pipelined round trip);
//     when one fails, ApplyBatch returns n with txns[:n] durable and an
//     error about txns[n] alone. The Server acks txns[n-1], hands exactly
//     txns[n] to the ErrorHandler (or nacks exactly its EndLSN), and after
//     a park goes on at once with txns[n+1:]; the fallback does the same.
//     An innocent transaction never costs a retry, a backoff or a policy
//     decision, and a halt names the LSN `prism-cdc skip --lsn` must skip.
//     A retryable failure that is no transaction's own (a lost
//     connection) names the first transaction not known durable and
//     leaves the policy alone.
//
// A transaction that fails permanently is handed to the ErrorHandler (the
// apply error policy), on the Server and on the direct-SQL fallback alike.
// ActionHalt sends a Nack and the shipper retries until the cause is fixed;
// ActionDeadLetter and ActionUndo mean the transaction was parked and the
// origin passed it in one database transaction, so it is acknowledged like
// an applied one and the stream goes on. For ActionUndo the receiver also
// sends an undo request (the transaction and the error) to the shipper on
// the same connection, and again on every new connection until the shipper
// answers with the outcome of its UndoFunc.
//
// A spilled transaction (decode.Txn with a Spill) is never held in memory
// or sent as one frame: the shipper streams it from its spill file as
// TxnBegin, TxnChunk frames of about ChunkBytes of changes, and TxnEnd;
// the server applies the chunks as they arrive through the Applier's
// ApplyStream inside one database transaction and acks after the commit.
// A connection lost mid-stream rolls the transaction back; the shipper
// sends it again from the start. A streamed transaction that fails
// permanently halts the region (it is too large to park as a dead letter).
//
// A path switch never loses or duplicates a transaction: on every new
// connection the receiver reports the origin's durable progress (Welcome) and
// the shipper resends its window from just after it.
package peers
