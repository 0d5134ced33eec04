// Package spool is a node's durable on-disk log of decoded transactions.
//
// The reader appends every transaction it takes from the slot; a flusher
// fsyncs appends by group commit (at once, and everything appended during
// one fsync by the next) and only then reports them durable; only durable
// transactions are shipped and may let the slot advance. Each peer region's shipper
// reads the spool from its own cursor at its own pace, so a region that is
// down for long does not pin WAL on the source and a slow region does not
// slow the others. Segments every region has acknowledged are deleted.
//
// Layout: segment files seg-<first end LSN, 16 hex>.log holding records
// [length u32][crc32c u32][transaction as decode.AppendTxn encodes it],
// and one cursor-<region> file per region with the highest acknowledged
// end LSN. A lock file keeps a second process out. A spilled transaction
// (decode.Spill: too large for memory) is stored as a copy of its spill
// file, txn-<end LSN, 16 hex>.spill, fsynced before its record; the record
// holds the header, marked by the top bit of its length word, and readers
// return it with a Spill on that file, so it is never held in memory. The
// file is deleted once every region acknowledged the transaction.
//
// Ordering: records are in commit order with strictly increasing end LSNs.
// A torn record at the tail of the last segment (a crash while writing) is
// truncated at open: it was never reported durable, so the slot still holds
// it and it is read again. A bad record anywhere else is corruption: Open
// and readers fail with ErrCorrupt instead of skipping it.
package spool
