// Package decode owns the update message: it streams a region's WAL from a
// logical replication slot (pgoutput) and assembles each committed
// transaction into one Txn.
//
// Ordering: Txns are produced in commit order. The position reported back to
// the server is only ever the one the caller declares durable everywhere.
package decode
