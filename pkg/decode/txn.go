package decode

import (
	"strconv"
	"time"
	"unsafe"

	"github.com/jackc/pglogrepl"
)

// Op is the kind of one row change.
type Op uint8

// The row operations a Change can carry.
const (
	OpInsert Op = 1 + iota
	OpUpdate
	OpDelete
	OpTruncate
	// OpDDL is a schema change (Change.DDL), captured at the source by
	// prism-cdc's event trigger when ddl: replicate is on.
	OpDDL
)

// String returns the SQL verb of the operation.
func (o Op) String() string {
	switch o {
	case OpInsert:
		return "INSERT"
	case OpUpdate:
		return "UPDATE"
	case OpDelete:
		return "DELETE"
	case OpTruncate:
		return "TRUNCATE"
	case OpDDL:
		return "DDL"
	}
	return "Op(" + strconv.Itoa(int(o)) + ")"
}

// Column describes one column of a relation as the source sent it.
type Column struct {
	Name string
	// TypeOID is the source's type OID. Built-in types (OID below 16384) have
	// the same OID in every cluster; for other types TypeName is set.
	TypeOID uint32
	// TypeName is the schema-qualified name of a non-built-in type (enum,
	// domain, composite, ...) from the pgoutput Type message; empty otherwise.
	TypeName string
	TypeMod  int32
	// Key reports whether the column is part of the replica identity.
	Key bool
}

// Replica identity settings, as pgoutput sends them in the Relation message.
const (
	IdentityDefault byte = 'd'
	IdentityNothing byte = 'n'
	IdentityFull    byte = 'f'
	IdentityIndex   byte = 'i'
)

// Relation is the source's description of one table. Changes of a
// transaction share Relation values; a Relation is never mutated after it
// was handed out (a schema change produces a new one).
type Relation struct {
	ID              uint32
	Schema          string
	Table           string
	ReplicaIdentity byte
	Columns         []Column
}

// ValueKind tells how a Value was sent.
type ValueKind uint8

// The kinds of column value pgoutput sends.
const (
	ValueNull      ValueKind = iota // SQL NULL
	ValueText                       // text representation in Data
	ValueUnchanged                  // unchanged TOASTed value: not sent, must not be written
	ValueBinary                     // binary representation in Data
)

// String names the value kind.
func (k ValueKind) String() string {
	switch k {
	case ValueNull:
		return "null"
	case ValueText:
		return "text"
	case ValueUnchanged:
		return "unchanged"
	case ValueBinary:
		return "binary"
	}
	return "ValueKind(" + strconv.Itoa(int(k)) + ")"
}

// Value is one column value. Data is nil unless Kind is ValueText or
// ValueBinary.
type Value struct {
	Kind ValueKind
	Data []byte
}

// Truncate flags, as pgoutput sends them.
const (
	TruncateCascade         uint8 = 1
	TruncateRestartIdentity uint8 = 2
)

// Change is one row change (or one TRUNCATE) of a transaction.
type Change struct {
	Op Op
	// Rel is the changed table. For OpTruncate it is the first truncated
	// table and Truncated lists all of them.
	Rel *Relation
	// Old is the old row when the WAL carries it: the replica identity
	// columns for UPDATE and DELETE (other columns ValueNull), or the whole
	// old row with REPLICA IDENTITY FULL. Nil when not sent. Same length as
	// Rel.Columns when set.
	Old []Value
	// New is the new row for INSERT and UPDATE, same length as Rel.Columns.
	New []Value
	// Truncated lists the truncated tables for OpTruncate.
	Truncated []*Relation
	// TruncateFlags is a combination of TruncateCascade and
	// TruncateRestartIdentity.
	TruncateFlags uint8
	// DDL is the schema change of an OpDDL (Rel, Old and New are nil
	// then); nil for every other op.
	DDL *DDL
}

// DDL is one schema change as the source committed it: the statement
// text and the settings it ran under, so another region runs the same
// statement resolving the same names as the same role.
type DDL struct {
	Command    string // one SQL statement, as the client sent it
	SearchPath string // the source session's search_path
	Role       string // the role that ran it (current_user)
}

// Txn is one committed source transaction, in commit order.
type Txn struct {
	// Origin is the source region; it names the replication origin
	// prism_<region> on the targets.
	Origin     string
	Xid        uint32
	CommitLSN  pglogrepl.LSN
	EndLSN     pglogrepl.LSN // idempotency key with Origin; what a region ACKs
	CommitTime time.Time
	Changes    []Change
	// Spill, when set, holds the changes of a transaction too large to
	// keep in memory; Changes is nil then. Whoever ends the transaction's
	// journey (every region acknowledged it) calls Spill.Release.
	Spill *Spill
}

// ChangeCount is the number of changes, spilled or not.
func (t *Txn) ChangeCount() int {
	if t.Spill != nil {
		return t.Spill.Count()
	}
	return len(t.Changes)
}

// Size is an estimate of the memory the transaction holds, in bytes. The
// shipper bounds its window of unacknowledged transactions with it, and
// the reader spills a transaction whose changes pass spill.above by it, so
// it counts what the decoder keeps: the transaction and its Changes slice,
// every change and its values, and each value's bytes with the five of
// its column header (the decoder keeps the message's tuple data, not
// copies of the values). TestTxnSizeHeld holds it to the heap a decoded
// transaction takes. A spilled transaction holds only its header in
// memory.
func (t *Txn) Size() int {
	n := txnOverhead(t)
	for i := range t.Changes {
		n += changeSize(&t.Changes[i])
	}
	return n
}

// txnOverhead is what t holds besides its changes: itself, its origin's
// name, and the room its Changes slice has for more changes.
func txnOverhead(t *Txn) int {
	return int(unsafe.Sizeof(*t)) + len(t.Origin) + (cap(t.Changes)-len(t.Changes))*int(unsafe.Sizeof(Change{}))
}

// changeSize estimates the memory one change holds, itself included.
func changeSize(c *Change) int {
	n := int(unsafe.Sizeof(*c)) + len(c.Truncated)*int(unsafe.Sizeof(c.Rel))
	for _, vals := range [2][]Value{c.Old, c.New} {
		n += len(vals) * int(unsafe.Sizeof(Value{}))
		for _, v := range vals {
			n += 5 + len(v.Data) // the column's kind byte and length
		}
	}
	if c.DDL != nil {
		n += int(unsafe.Sizeof(*c.DDL)) + len(c.DDL.Command) + len(c.DDL.SearchPath) + len(c.DDL.Role)
	}
	return n
}
