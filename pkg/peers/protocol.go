package peers

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/jackc/pglogrepl"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// ProtocolVersion is the version of the peer protocol this package speaks.
// Version 2 added the streamed transaction frames (TxnBegin, TxnChunk,
// TxnEnd). Version 3 replaced the token in the Hello with a
// challenge-response: the server opens every connection with a Challenge
// (a random nonce) and the Hello carries HelloMAC over it, so the shared
// token never crosses the wire. Servers and shippers of version 3 refuse
// older peers with a clear reason; there is no fallback to a clear token.
// Version 4 added a refusal code to Reject (see rejectCode), so that a
// shipper tells refused credentials from other refusals without reading
// the reason. The two ends speak the lower of their versions: a shipper
// answers a version 3 Challenge with a version 3 Hello, and a server sends
// a version 3 shipper its Reject without the code.
const ProtocolVersion = 4

// minProtocolVersion is the oldest shipper version a server accepts.
const minProtocolVersion = 3

// DefaultChunkBytes is the change data a shipper puts in one TxnChunk
// frame of a streamed transaction (a single larger change goes alone).
const DefaultChunkBytes = 1 << 20

// DefaultMaxFrame is the default limit on one frame's length: a length
// prefix above it is rejected before anything is allocated. It is the
// largest encoded transaction decode reads in one piece.
const DefaultMaxFrame = decode.MaxEncodedSize

// magic opens every Hello so that a stray client is told apart from an old
// prism-cdc node at once.
const magic = "PRSM"

// Frame types. A frame on the wire is a 4-byte big-endian length n, then n
// bytes: a 1-byte type and the payload.
const (
	frameHello     byte = 'H'
	frameWelcome   byte = 'W'
	frameReject    byte = 'R'
	frameTxn       byte = 'T'
	frameAck       byte = 'A'
	frameNack      byte = 'N'
	frameHeartbeat byte = 'B'
	frameUndo      byte = 'U' // receiver to shipper: revert a transaction at the source
	frameUndone    byte = 'D' // shipper to receiver: the outcome of an undo
	frameTxnBegin  byte = 'S' // a streamed transaction's header
	frameTxnChunk  byte = 'C' // the next changes of the streamed transaction
	frameTxnEnd    byte = 'E' // the streamed transaction is complete
	frameChallenge byte = 'K' // server to client, first: a nonce to sign
)

// helloProbe marks a Hello that only checks health: the receiver answers
// with Welcome and closes, and takes no other action for the source.
const helloProbe uint8 = 1

// helloGatherAcks marks a Hello from a source whose commits do not wait
// for the acknowledgements (it is not in synchronous mode): a receiver
// that commits lazily may then gather the acknowledgements of
// ServerConfig.AckGather into one WAL flush instead of flushing after
// every applied round trip. Receivers that predate it ignore the bit.
const helloGatherAcks uint8 = 2

// errFrame is wrapped by every decoding error: the peer sent something that
// is not a valid frame.
var errFrame = errors.New("malformed frame")

// hello opens a connection from a shipper.
type hello struct {
	Version uint16
	Flags   uint8
	Region  string // source region
	Node    string // source node
	MAC     []byte // HelloMAC over the server's nonce; empty without a token
}

// welcome accepts a connection and reports the durable progress of the
// origin prism_<source region> in the receiver's database.
type welcome struct {
	Region   string
	Node     string
	Progress pglogrepl.LSN
}

// reject refuses a connection; the receiver closes it after sending.
// Code is on the wire from protocol version 4 on (absent, it reads as
// rejectUnspecified).
type reject struct {
	Reason string
	Code   rejectCode
}

// rejectCode classifies a Reject for the refused shipper.
type rejectCode uint8

// The refusal codes. Only rejectAuth means "this node's credentials are
// wrong"; the others are reported with the node's reason.
const (
	rejectUnspecified rejectCode = iota // malformed first frame, progress unreadable, ...
	rejectAuth                          // no or wrong token (HelloMAC)
	rejectVersion                       // protocol version not spoken
	rejectRegion                        // source region not accepted here
)

// ack says every transaction up to LSN is durable in the receiver's region.
type ack struct {
	LSN pglogrepl.LSN
}

// nack says the transaction ending at LSN failed; the receiver applies no
// later transaction on this connection.
type nack struct {
	LSN       pglogrepl.LSN
	SQLState  string
	Message   string
	Retryable bool
}

// heartbeat keeps an idle or busy connection alive, in both directions.
type heartbeat struct{}

// txnFrame carries one update message.
type txnFrame struct {
	Txn *decode.Txn
}

// txnBegin opens a streamed transaction: a transaction too large for one
// frame is sent as TxnBegin, TxnChunk frames in order, and TxnEnd, with
// nothing else of that connection's shipper in between (heartbeats
// aside). Txn has no changes; Count is how many the chunks carry.
type txnBegin struct {
	Txn   *decode.Txn
	Count uint64
}

// txnChunk carries the next changes of the open streamed transaction,
// with the relations they use.
type txnChunk struct {
	Changes []decode.Change
}

// txnEnd closes the streamed transaction ending at LSN.
type txnEnd struct {
	LSN pglogrepl.LSN
}

// encoder appends big-endian values to a byte slice.
type encoder struct {
	b []byte
}

func (e *encoder) u8(v uint8)   { e.b = append(e.b, v) }
func (e *encoder) u16(v uint16) { e.b = binary.BigEndian.AppendUint16(e.b, v) }
func (e *encoder) u32(v uint32) { e.b = binary.BigEndian.AppendUint32(e.b, v) }
func (e *encoder) u64(v uint64) { e.b = binary.BigEndian.AppendUint64(e.b, v) }
func (e *encoder) str(s string) {
	e.u32(uint32(len(s)))
	e.b = append(e.b, s...)
}
func (e *encoder) bytes(p []byte) {
	e.u32(uint32(len(p)))
	e.b = append(e.b, p...)
}

// appendFrame appends the encoding of f (one of the frame structs above),
// length prefix included, to b.
func appendFrame(b []byte, f any) ([]byte, error) {
	e := encoder{b: b}
	start := len(e.b)
	e.u32(0) // length, patched below
	if err := e.frame(f); err != nil {
		return b, err
	}
	n := len(e.b) - start - 4
	if uint64(n) > 1<<32-1 {
		return b, fmt.Errorf("encode frame: %d bytes is too large", n)
	}
	binary.BigEndian.PutUint32(e.b[start:], uint32(n))
	return e.b, nil
}

// frame appends f's type and body: the control frames here, those that
// carry transactions or changes in txnFrame.
func (e *encoder) frame(f any) error {
	switch f := f.(type) {
	case *hello:
		e.u8(frameHello)
		e.b = append(e.b, magic...)
		e.u16(f.Version)
		e.u8(f.Flags)
		e.str(f.Region)
		e.str(f.Node)
		e.bytes(f.MAC)
	case *challenge:
		e.u8(frameChallenge)
		e.b = append(e.b, magic...)
		e.u16(f.Version)
		e.b = append(e.b, f.Nonce[:]...)
	case *welcome:
		e.u8(frameWelcome)
		e.str(f.Region)
		e.str(f.Node)
		e.u64(uint64(f.Progress))
	case *reject:
		e.u8(frameReject)
		e.str(f.Reason)
		if f.Code != rejectUnspecified {
			e.u8(uint8(f.Code))
		}
	case *ack:
		e.u8(frameAck)
		e.u64(uint64(f.LSN))
	case *nack:
		e.u8(frameNack)
		e.u64(uint64(f.LSN))
		e.str(f.SQLState)
		e.str(f.Message)
		if f.Retryable {
			e.u8(1)
		} else {
			e.u8(0)
		}
	case *heartbeat:
		e.u8(frameHeartbeat)
	case *undoneFrame:
		e.u8(frameUndone)
		e.u64(uint64(f.LSN))
		e.str(f.Status)
		e.str(f.Note)
	case *txnEnd:
		e.u8(frameTxnEnd)
		e.u64(uint64(f.LSN))
	default:
		return e.txnFrame(f)
	}
	return nil
}

// txnFrame appends the type and body of a frame that carries a
// transaction or changes.
func (e *encoder) txnFrame(f any) error {
	var err error
	switch f := f.(type) {
	case *txnFrame:
		e.u8(frameTxn)
		e.b, err = decode.AppendTxn(e.b, f.Txn)
	case *undoFrame:
		e.u8(frameUndo)
		if e.b, err = decode.AppendTxn(e.b, f.Txn); err != nil {
			return err
		}
		e.str(f.SQLState)
		e.str(f.Message)
	case *txnBegin:
		e.u8(frameTxnBegin)
		if f.Txn == nil {
			return errors.New("encode txn: nil")
		}
		e.b = decode.AppendTxnHeader(e.b, f.Txn)
		e.u64(f.Count)
	case *txnChunk:
		e.u8(frameTxnChunk)
		e.b = decode.AppendChanges(e.b, f.Changes)
	default:
		return fmt.Errorf("encode frame: unknown frame %T", f)
	}
	return err
}

// decoder reads big-endian values from a payload; the first error sticks
// and every later read returns zero values.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s", errFrame, fmt.Sprintf(format, args...))
	}
}

func (d *decoder) take(n int, what string) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || n > len(d.b) {
		d.fail("%s: need %d bytes, have %d", what, n, len(d.b))
		return nil
	}
	p := d.b[:n:n]
	d.b = d.b[n:]
	return p
}

func (d *decoder) u8(what string) uint8 {
	p := d.take(1, what)
	if p == nil {
		return 0
	}
	return p[0]
}

func (d *decoder) u16(what string) uint16 {
	p := d.take(2, what)
	if p == nil {
		return 0
	}
	return binary.BigEndian.Uint16(p)
}

func (d *decoder) u32(what string) uint32 {
	p := d.take(4, what)
	if p == nil {
		return 0
	}
	return binary.BigEndian.Uint32(p)
}

func (d *decoder) u64(what string) uint64 {
	p := d.take(8, what)
	if p == nil {
		return 0
	}
	return binary.BigEndian.Uint64(p)
}

func (d *decoder) bool(what string) bool {
	switch v := d.u8(what); v {
	case 0:
		return false
	case 1:
		return true
	default:
		d.fail("%s: bad boolean %d", what, v)
		return false
	}
}

func (d *decoder) bytes(what string) []byte {
	n := d.u32(what)
	if d.err != nil {
		return nil
	}
	if uint64(n) > uint64(len(d.b)) {
		d.fail("%s: length %d exceeds the %d bytes left", what, n, len(d.b))
		return nil
	}
	p := d.take(int(n), what)
	// Copy so that the frame buffer can be reused and a decoded value
	// never pins a large buffer; an empty value stays non-nil.
	return append(make([]byte, 0, len(p)), p...)
}

func (d *decoder) str(what string) string {
	n := d.u32(what)
	if d.err != nil {
		return ""
	}
	if uint64(n) > uint64(len(d.b)) {
		d.fail("%s: length %d exceeds the %d bytes left", what, n, len(d.b))
		return ""
	}
	return string(d.take(int(n), what))
}

// parse reads what follows with one of decode's Parse functions.
func parse[T any](d *decoder, fn func([]byte) (T, []byte, error)) T {
	var v T
	if d.err != nil {
		return v
	}
	v, rest, err := fn(d.b)
	if err != nil {
		d.err = fmt.Errorf("%w: %w", errFrame, err)
		return v
	}
	d.b = rest
	return v
}

func (d *decoder) end() error {
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d trailing bytes", len(d.b))
	}
	return d.err
}

// decodeFrame parses one frame (type byte and payload, without the length
// prefix) into one of the frame structs. It never panics; anything but a
// complete, well-formed frame is an error wrapping errFrame.
func decodeFrame(p []byte) (any, error) {
	return decodeFrameWith(p, nil)
}

// decodeFrameWith is decodeFrame with the relations of transactions and
// chunks interned in rels (nil interns nothing).
func decodeFrameWith(p []byte, rels *decode.Relations) (any, error) {
	if len(p) == 0 {
		return nil, fmt.Errorf("%w: empty", errFrame)
	}
	d := &decoder{b: p[1:]}
	var f any
	switch p[0] {
	case frameHello:
		if m := d.take(len(magic), "magic"); d.err == nil && string(m) != magic {
			return nil, fmt.Errorf("%w: bad magic %q", errFrame, m)
		}
		f = &hello{
			Version: d.u16("version"),
			Flags:   d.u8("flags"),
			Region:  d.str("region"),
			Node:    d.str("node"),
			MAC:     d.bytes("mac"),
		}
	case frameChallenge:
		if m := d.take(len(magic), "magic"); d.err == nil && string(m) != magic {
			return nil, fmt.Errorf("%w: bad magic %q", errFrame, m)
		}
		c := &challenge{Version: d.u16("version")}
		copy(c.Nonce[:], d.take(NonceSize, "nonce"))
		f = c
	case frameWelcome:
		f = &welcome{
			Region:   d.str("region"),
			Node:     d.str("node"),
			Progress: pglogrepl.LSN(d.u64("progress")),
		}
	case frameReject:
		r := &reject{Reason: d.str("reason")}
		if d.err == nil && len(d.b) > 0 {
			// An unspecified refusal is written without a code (as a
			// node of protocol 3 writes every refusal), so each reject
			// has one encoding.
			if r.Code = rejectCode(d.u8("code")); r.Code == rejectUnspecified {
				d.fail("reject code 0: an unspecified refusal carries no code")
			}
		}
		f = r
	case frameAck:
		f = &ack{LSN: pglogrepl.LSN(d.u64("lsn"))}
	case frameNack:
		f = &nack{
			LSN:       pglogrepl.LSN(d.u64("lsn")),
			SQLState:  d.str("sqlstate"),
			Message:   d.str("message"),
			Retryable: d.bool("retryable"),
		}
	case frameHeartbeat:
		f = &heartbeat{}
	case frameTxn:
		f = &txnFrame{Txn: parse(d, rels.ParseTxn)}
	case frameUndo:
		f = &undoFrame{Txn: parse(d, rels.ParseTxn), SQLState: d.str("sqlstate"), Message: d.str("message")}
	case frameUndone:
		f = &undoneFrame{LSN: pglogrepl.LSN(d.u64("lsn")), Status: d.str("status"), Note: d.str("note")}
	case frameTxnBegin:
		f = &txnBegin{Txn: parse(d, decode.ParseTxnHeader), Count: d.u64("count")}
	case frameTxnChunk:
		f = &txnChunk{Changes: parse(d, rels.ParseChanges)}
	case frameTxnEnd:
		f = &txnEnd{LSN: pglogrepl.LSN(d.u64("lsn"))}
	default:
		return nil, fmt.Errorf("%w: unknown type %#x", errFrame, p[0])
	}
	if err := d.end(); err != nil {
		return nil, err
	}
	return f, nil
}

// readFrame reads one frame from r into buf (grown as needed) and returns
// the type-and-payload bytes. A length prefix of zero or above max is
// rejected before anything is allocated.
func readFrame(r io.Reader, buf []byte, max int) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return buf, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 {
		return buf, fmt.Errorf("%w: zero length", errFrame)
	}
	if uint64(n) > uint64(max) {
		return buf, fmt.Errorf("%w: length %d exceeds the limit of %d bytes", errFrame, n, max)
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return buf, err
	}
	return buf, nil
}
