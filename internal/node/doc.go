// Package node wires one prism-cdc node together: the applier server that
// receives other regions' transactions, the reader that streams this
// region's WAL, one shipper per peer region, the LSN checkpoint that
// confirms the slot, and the HTTP status endpoints.
//
// Ordering: a transaction read from the slot is handed to every shipper in
// commit order; the slot is confirmed only up to the minimum position every
// region has acknowledged as durable (peers.MinAcked), never further.
package node
