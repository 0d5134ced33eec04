package decode

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"
)

// Assembler turns a stream of pgoutput messages into committed
// transactions. It does no I/O: it is fed one message at a time, in stream
// order, and returns a Txn at each commit. It understands protocol
// versions 1 and 2 (streamed transactions are assembled by xid and
// returned at their Stream Commit; aborted subtransactions are dropped).
//
// Transactions that carry an Origin message were applied by some
// replication (prism-cdc itself, or another tool) and are not returned;
// Filtered counts them.
//
// With SpillOver, a Begin ... Commit transaction whose changes grow past
// a threshold is written to a spill file as it arrives and returned with
// a Spill instead of Changes, so memory does not grow with transaction
// size. Streamed transactions (protocol 2) stay in memory.
//
// An Assembler is not safe for concurrent use. It never keeps a reference
// to the slices it is fed. Close discards a partly spilled transaction.
type Assembler struct {
	region string

	spillDir   string
	spillAt    int // change bytes above which the open transaction spills; 0: never
	spillChunk int
	skip       map[string]bool // schemas whose row changes are dropped

	curBytes int          // change bytes of cur held in memory
	spill    *spillWriter // cur's spill file once it spilled

	rels  map[uint32]*Relation
	types map[uint32]string

	cur         *Txn      // open Begin ... Commit transaction
	curFiltered bool      // cur carries an Origin message
	curFloor    time.Time // cur's clock floor (FloorPrefix messages)

	inStream  bool   // between Stream Start and Stream Stop
	streamXid uint32 // top-level xid of the open stream block
	streams   map[uint32]*streamTxn

	filtered uint64

	arena   arena // rows' values and bytes
	changes int   // changes of the last transaction kept: the next one's first capacity
}

// maxChangesHint caps the first capacity of a transaction's changes.
const maxChangesHint = 64

// streamTxn collects a streamed transaction's changes until its Stream
// Commit. subxids[i] is the (sub)transaction that made changes[i].
type streamTxn struct {
	changes  []Change
	subxids  []uint32
	filtered bool
	floor    time.Time
}

// AssemblerOption tunes an Assembler.
type AssemblerOption func(*Assembler)

// SpillOver makes transactions whose changes exceed bytes (estimated like
// Txn.Size) spill to an unlinked temporary file in dir, written in chunks
// of about chunk bytes (0: DefaultSpillChunk). bytes <= 0 never spills.
func SpillOver(dir string, bytes, chunk int) AssemblerOption {
	return func(a *Assembler) {
		a.spillDir, a.spillAt, a.spillChunk = dir, max(bytes, 0), chunk
	}
}

// SkipSchemas drops the row changes of tables in the given schemas (and
// TRUNCATEs of only such tables); the transactions themselves are still
// returned.
func SkipSchemas(schemas ...string) AssemblerOption {
	return func(a *Assembler) {
		for _, s := range schemas {
			a.skip[s] = true
		}
	}
}

// NewAssembler returns an Assembler whose transactions name region as
// their origin.
func NewAssembler(region string, opts ...AssemblerOption) *Assembler {
	a := &Assembler{
		region:  region,
		rels:    make(map[uint32]*Relation),
		types:   make(map[uint32]string),
		streams: make(map[uint32]*streamTxn),
		skip:    map[string]bool{},
	}
	for _, o := range opts {
		o(a)
	}
	return a
}

// Close discards the spill file of a transaction that has not committed.
func (a *Assembler) Close() {
	a.dropSpill()
}

func (a *Assembler) dropSpill() {
	if a.spill != nil {
		a.spill.abort()
		a.spill = nil
	}
	a.curBytes = 0
}

// Filtered returns how many committed transactions were dropped because
// they carried a replication origin.
func (a *Assembler) Filtered() uint64 { return a.filtered }

// inFlight reports whether a transaction has started but not yet ended.
func (a *Assembler) inFlight() bool {
	return a.cur != nil || a.inStream || len(a.streams) > 0
}

// Feed decodes one pgoutput message (the WAL data of one XLogData message,
// which started at lsn). It returns the completed transaction at a Commit
// or Stream Commit, and nil otherwise. Malformed, unknown or out-of-place
// messages are errors naming the message type and lsn; after an error the
// Assembler should be discarded.
func (a *Assembler) Feed(lsn pglogrepl.LSN, walData []byte) (*Txn, error) {
	if len(walData) == 0 {
		return nil, fmt.Errorf("decode message at %s: empty message", lsn)
	}
	typ := walData[0]
	r := &buf{b: walData[1:], arena: &a.arena}
	txn, err := a.feed(typ, r)
	if err == nil {
		err = r.end()
		if err != nil {
			txn = nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("decode %s message at %s: %w", msgName(typ), lsn, err)
	}
	return txn, nil
}

func msgName(typ byte) string {
	switch typ {
	case 'B':
		return "Begin"
	case 'C':
		return "Commit"
	case 'O':
		return "Origin"
	case 'R':
		return "Relation"
	case 'Y':
		return "Type"
	case 'I':
		return "Insert"
	case 'U':
		return "Update"
	case 'D':
		return "Delete"
	case 'T':
		return "Truncate"
	case 'M':
		return "Message"
	case 'S':
		return "Stream Start"
	case 'E':
		return "Stream Stop"
	case 'c':
		return "Stream Commit"
	case 'A':
		return "Stream Abort"
	}
	if typ >= 0x20 && typ < 0x7f {
		return fmt.Sprintf("unknown %q", typ)
	}
	return fmt.Sprintf("unknown 0x%02x", typ)
}

var (
	errNoTxn     = errors.New("outside a transaction")
	errNested    = errors.New("inside an open transaction")
	errInStream  = errors.New("inside a stream block")
	errNoStream  = errors.New("outside a stream block")
	errUnknownTy = errors.New("unknown message type")
)

func (a *Assembler) feed(typ byte, r *buf) (*Txn, error) {
	switch typ {
	case 'B':
		return nil, a.begin(r)
	case 'C':
		return a.commit(r)
	case 'O':
		return nil, a.origin(r)
	case 'R':
		return nil, a.relation(r)
	case 'Y':
		return nil, a.typ(r)
	case 'I', 'U', 'D':
		return nil, a.row(typ, r)
	case 'T':
		return nil, a.truncate(r)
	case 'M':
		return nil, a.message(r)
	case 'S':
		return nil, a.streamStart(r)
	case 'E':
		if !a.inStream {
			return nil, errNoStream
		}
		a.inStream = false
		return nil, nil
	case 'c':
		return a.streamCommit(r)
	case 'A':
		return nil, a.streamAbort(r)
	}
	return nil, errUnknownTy
}

func (a *Assembler) begin(r *buf) error {
	finalLSN := r.lsn()
	commitTime := r.time()
	xid := r.u32()
	if r.err != nil {
		return r.err
	}
	if a.inStream {
		return errInStream
	}
	if a.cur != nil {
		return errNested
	}
	a.cur = &Txn{Origin: a.region, Xid: xid, CommitLSN: finalLSN, CommitTime: commitTime}
	a.curFiltered, a.curFloor = false, time.Time{}
	a.dropSpill()
	return nil
}

func (a *Assembler) commit(r *buf) (*Txn, error) {
	r.u8() // flags: unused
	commitLSN := r.lsn()
	endLSN := r.lsn()
	commitTime := r.time()
	if r.err != nil {
		return nil, r.err
	}
	if a.inStream {
		return nil, errInStream
	}
	if a.cur == nil {
		return nil, errNoTxn
	}
	txn, filtered, floor := a.cur, a.curFiltered, a.curFloor
	a.cur, a.curFiltered, a.curFloor = nil, false, time.Time{}
	if commitLSN != txn.CommitLSN {
		return nil, fmt.Errorf("commit lsn %s does not match begin's %s", commitLSN, txn.CommitLSN)
	}
	if endLSN < commitLSN {
		return nil, fmt.Errorf("end lsn %s before commit lsn %s", endLSN, commitLSN)
	}
	if filtered {
		a.dropSpill()
		a.filtered++
		return nil, nil
	}
	if a.spill != nil {
		sp, err := a.spill.finish()
		a.spill = nil
		a.curBytes = 0
		if err != nil {
			return nil, err
		}
		txn.Spill = sp
	}
	a.curBytes = 0
	if txn.Spill == nil && len(txn.Changes) > 0 {
		a.changes = len(txn.Changes)
	}
	txn.EndLSN = endLSN
	txn.CommitTime = stamp(commitTime, floor)
	return txn, nil
}

func (a *Assembler) origin(r *buf) error {
	r.lsn()
	r.skipStr() // the origin's name is not needed
	if r.err != nil {
		return r.err
	}
	switch {
	case a.inStream:
		st := a.streams[a.streamXid]
		st.filtered = true
		st.changes, st.subxids = nil, nil
	case a.cur != nil:
		a.curFiltered = true
		a.cur.Changes = nil
		a.dropSpill()
	default:
		return errNoTxn
	}
	return nil
}

// streamPrefix reads the xid that stream-block messages carry.
func (a *Assembler) streamPrefix(r *buf) uint32 {
	if !a.inStream {
		return 0
	}
	return r.u32()
}

func (a *Assembler) relation(r *buf) error {
	a.streamPrefix(r)
	rel := &Relation{ID: r.u32(), Schema: r.str(), Table: r.str(), ReplicaIdentity: r.u8()}
	n := int(r.u16())
	if r.err != nil {
		return r.err
	}
	// A column takes at least 10 bytes.
	if n*10 > len(r.b) {
		return fmt.Errorf("relation claims %d columns in %d bytes", n, len(r.b))
	}
	switch rel.ReplicaIdentity {
	case IdentityDefault, IdentityNothing, IdentityFull, IdentityIndex:
	default:
		return fmt.Errorf("relation %d: unknown replica identity %q", rel.ID, rel.ReplicaIdentity)
	}
	rel.Columns = make([]Column, n)
	for i := range rel.Columns {
		flags := r.u8()
		c := Column{Key: flags&1 != 0, Name: r.str(), TypeOID: r.u32(), TypeMod: int32(r.u32())}
		c.TypeName = a.types[c.TypeOID]
		rel.Columns[i] = c
	}
	if r.err != nil {
		return r.err
	}
	a.rels[rel.ID] = rel
	return nil
}

func (a *Assembler) typ(r *buf) error {
	a.streamPrefix(r)
	oid := r.u32()
	schema := r.str()
	name := r.str()
	if r.err != nil {
		return r.err
	}
	// pgoutput names the base type of a domain and sends an empty schema
	// for pg_catalog.
	if schema == "" {
		schema = "pg_catalog"
	}
	a.types[oid] = schema + "." + name
	return nil
}

// add appends a change to the open transaction: the stream block's
// transaction (made by subtransaction xid) or the Begin ... Commit one.
func (a *Assembler) add(xid uint32, c Change) error {
	switch {
	case a.inStream:
		st := a.streams[a.streamXid]
		if st.filtered || a.skipped(&c) {
			return nil
		}
		st.changes = append(st.changes, c)
		st.subxids = append(st.subxids, xid)
	case a.cur != nil:
		if a.curFiltered || a.skipped(&c) {
			return nil
		}
		if a.spill != nil {
			return a.spill.add(c)
		}
		if a.cur.Changes == nil && a.changes > 1 {
			// Transactions of one workload tend to have as many
			// changes as the one before: one allocation, not a
			// doubling series.
			a.cur.Changes = make([]Change, 0, min(a.changes, maxChangesHint))
		}
		a.cur.Changes = append(a.cur.Changes, c)
		a.curBytes += changeSize(&c)
		if a.spillAt > 0 && a.curBytes > a.spillAt {
			return a.spillCur()
		}
	default:
		return errNoTxn
	}
	return nil
}

// skipped reports whether c is a change to a skipped schema.
func (a *Assembler) skipped(c *Change) bool {
	if len(a.skip) == 0 {
		return false
	}
	if c.Op != OpTruncate {
		return c.Rel != nil && a.skip[c.Rel.Schema]
	}
	for _, r := range c.Truncated {
		if !a.skip[r.Schema] {
			return false
		}
	}
	return true
}

// spillCur moves the open transaction's changes to a spill file; the
// changes that follow go there directly.
func (a *Assembler) spillCur() error {
	w, err := newSpillWriter(a.spillDir, a.spillChunk)
	if err != nil {
		return err
	}
	for _, c := range a.cur.Changes {
		if err := w.add(c); err != nil {
			w.abort()
			return err
		}
	}
	a.spill = w
	clear(a.cur.Changes)
	a.cur.Changes = nil
	a.curBytes = 0
	return nil
}

func (a *Assembler) rel(id uint32) (*Relation, error) {
	rel, ok := a.rels[id]
	if !ok {
		return nil, fmt.Errorf("unknown relation %d", id)
	}
	return rel, nil
}

// dropping reports whether the changes of the open transaction are
// dropped because it carries a replication origin: their messages need
// not be parsed at all.
func (a *Assembler) dropping() bool {
	if a.inStream {
		st := a.streams[a.streamXid]
		return st != nil && st.filtered
	}
	return a.cur != nil && a.curFiltered
}

func (a *Assembler) row(typ byte, r *buf) error {
	if !a.inStream && a.cur == nil {
		return errNoTxn
	}
	if a.dropping() {
		r.b = r.b[len(r.b):]
		return nil
	}
	xid := a.streamPrefix(r)
	id := r.u32()
	if r.err != nil {
		return r.err
	}
	rel, err := a.rel(id)
	if err != nil {
		return err
	}
	if a.skip[rel.Schema] {
		// Dropped anyway (see add): its tuples are not worth parsing.
		r.b = r.b[len(r.b):]
		return nil
	}
	// One copy of the tuples for all their values.
	r.own()
	c := Change{Rel: rel}
	switch typ {
	case 'I':
		c.Op = OpInsert
		if k := r.u8(); r.err == nil && k != 'N' {
			return fmt.Errorf("relation %d: tuple marker %q, want 'N'", id, k)
		}
		c.New = r.tuple()
	case 'U':
		c.Op = OpUpdate
		k := r.u8()
		if r.err == nil && (k == 'K' || k == 'O') {
			c.Old = r.tuple()
			k = r.u8()
		}
		if r.err == nil && k != 'N' {
			return fmt.Errorf("relation %d: tuple marker %q, want 'N'", id, k)
		}
		c.New = r.tuple()
	case 'D':
		c.Op = OpDelete
		if k := r.u8(); r.err == nil && k != 'K' && k != 'O' {
			return fmt.Errorf("relation %d: tuple marker %q, want 'K' or 'O'", id, k)
		}
		c.Old = r.tuple()
	}
	if r.err != nil {
		return r.err
	}
	for _, t := range [][]Value{c.Old, c.New} {
		if t != nil && len(t) != len(rel.Columns) {
			return fmt.Errorf("relation %d (%s.%s): tuple has %d columns, relation %d", id, rel.Schema, rel.Table, len(t), len(rel.Columns))
		}
	}
	return a.add(xid, c)
}

func (a *Assembler) truncate(r *buf) error {
	if !a.inStream && a.cur == nil {
		return errNoTxn
	}
	if a.dropping() {
		r.b = r.b[len(r.b):]
		return nil
	}
	xid := a.streamPrefix(r)
	n := r.u32()
	flags := r.u8()
	if r.err != nil {
		return r.err
	}
	if n == 0 || uint64(n)*4 != uint64(len(r.b)) {
		return fmt.Errorf("truncate claims %d relations in %d bytes", n, len(r.b))
	}
	c := Change{Op: OpTruncate, TruncateFlags: flags, Truncated: make([]*Relation, n)}
	for i := range c.Truncated {
		rel, err := a.rel(r.u32())
		if err != nil {
			return err
		}
		c.Truncated[i] = rel
	}
	c.Rel = c.Truncated[0]
	return a.add(xid, c)
}

// FloorPrefix is the prefix of the transactional logical messages
// (pg_logical_emit_message) that carry a transaction's clock floor: the
// stamp, in microseconds since the Unix epoch, of a version the
// transaction replaced that is not older than its own clock (see
// pkg/apply, trigger prism_clock). The assembler raises the transaction's
// CommitTime to one microsecond past its greatest floor, so
// last_write_wins orders the write after the version it replaced.
const FloorPrefix = "prism.floor"

// DDLPrefix is the prefix of the transactional logical messages that
// carry a schema change (pkg/apply, event trigger prism_ddl): a JSON
// object with the keys command, search_path and role. The assembler turns
// each into an OpDDL change at its place among the transaction's changes.
const DDLPrefix = "prism_ddl"

// message reads a logical decoding message (pg_logical_emit_message).
// Transactional FloorPrefix messages raise their transaction's floor,
// transactional DDLPrefix messages become OpDDL changes; every other
// message is dropped.
func (a *Assembler) message(r *buf) error {
	xid := a.streamPrefix(r)
	flags := r.u8()
	r.lsn()
	prefix := r.str()
	content := r.bytes(r.u32())
	if r.err != nil {
		return r.err
	}
	if prefix == DDLPrefix && flags&1 != 0 {
		d, err := parseDDL(content)
		if err != nil {
			return err
		}
		return a.add(xid, Change{Op: OpDDL, DDL: d})
	}
	if prefix != FloorPrefix || flags&1 == 0 {
		return nil
	}
	us, err := strconv.ParseInt(string(content), 10, 64)
	if err != nil {
		return fmt.Errorf("%s message %q: %w", FloorPrefix, content, err)
	}
	floor := time.UnixMicro(us)
	switch {
	case a.inStream:
		if st := a.streams[xid]; st != nil && floor.After(st.floor) {
			st.floor = floor
		}
	case a.cur != nil:
		if floor.After(a.curFloor) {
			a.curFloor = floor
		}
	default:
		return errNoTxn
	}
	return nil
}

// parseDDL reads the content of a DDLPrefix message.
func parseDDL(content []byte) (*DDL, error) {
	var m struct {
		Command    *string `json:"command"`
		SearchPath string  `json:"search_path"`
		Role       string  `json:"role"`
	}
	if err := json.Unmarshal(content, &m); err != nil {
		return nil, fmt.Errorf("%s message: %w", DDLPrefix, err)
	}
	if m.Command == nil || *m.Command == "" {
		return nil, fmt.Errorf("%s message without a command", DDLPrefix)
	}
	return &DDL{Command: *m.Command, SearchPath: m.SearchPath, Role: m.Role}, nil
}

// stamp returns the commit time a transaction is shipped with: its commit
// timestamp, or one microsecond past its floor when that is not earlier.
func stamp(commit, floor time.Time) time.Time {
	if floor.IsZero() {
		return commit
	}
	if f := floor.Add(time.Microsecond); !f.Before(commit) {
		return f
	}
	return commit
}

func (a *Assembler) streamStart(r *buf) error {
	xid := r.u32()
	r.u8() // first segment
	if r.err != nil {
		return r.err
	}
	if a.inStream {
		return errInStream
	}
	if a.cur != nil {
		return errNested
	}
	a.inStream = true
	a.streamXid = xid
	if a.streams[xid] == nil {
		a.streams[xid] = &streamTxn{}
	}
	return nil
}

func (a *Assembler) streamCommit(r *buf) (*Txn, error) {
	xid := r.u32()
	r.u8() // flags
	commitLSN := r.lsn()
	endLSN := r.lsn()
	commitTime := r.time()
	if r.err != nil {
		return nil, r.err
	}
	if a.inStream {
		return nil, errInStream
	}
	if a.cur != nil {
		return nil, errNested
	}
	st, ok := a.streams[xid]
	if !ok {
		return nil, fmt.Errorf("commit of unknown streamed transaction %d", xid)
	}
	delete(a.streams, xid)
	if endLSN < commitLSN {
		return nil, fmt.Errorf("end lsn %s before commit lsn %s", endLSN, commitLSN)
	}
	if st.filtered {
		a.filtered++
		return nil, nil
	}
	return &Txn{Origin: a.region, Xid: xid, CommitLSN: commitLSN, EndLSN: endLSN, CommitTime: stamp(commitTime, st.floor), Changes: st.changes}, nil
}

// streamAbort drops an aborted streamed transaction, or the changes of an
// aborted subtransaction. Servers may send aborts for transactions this
// stream never saw; those are ignored.
func (a *Assembler) streamAbort(r *buf) error {
	xid := r.u32()
	subxid := r.u32()
	if r.err != nil {
		return r.err
	}
	// Protocol version 4 appends the abort LSN and time; they are not needed.
	r.b = r.b[:0:0]
	if a.inStream {
		return errInStream
	}
	st, ok := a.streams[xid]
	if !ok {
		return nil
	}
	if subxid == xid {
		delete(a.streams, xid)
		return nil
	}
	keep := 0
	for i, c := range st.changes {
		if st.subxids[i] != subxid {
			st.changes[keep] = c
			st.subxids[keep] = st.subxids[i]
			keep++
		}
	}
	clear(st.changes[keep:])
	st.changes, st.subxids = st.changes[:keep], st.subxids[:keep]
	return nil
}
