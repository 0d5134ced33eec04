// Package doctor checks what one prism-cdc node needs before and while it
// replicates, and says how to fix every problem it finds: the region's
// database (version, wal_level, track_commit_timestamp, free replication
// slots and WAL senders, the role's REPLICATION and table privileges, the
// publication and the slot with its retained WAL, a key or replica identity
// on every replicated table, one cluster per region), every peer node
// (reachable, Hello with the token accepted), every fallback database, the
// sync setting and the sequences that would collide across regions.
//
// It also plans region-interleaved sequences (PlanSequences): every region
// draws from the same sequence with INCREMENT BY the number of regions and
// its own residue, so keys generated in different regions never collide.
//
// Doctor only reads, except ApplySequences, which runs the ALTER SEQUENCE
// statements of a plan.
package doctor
