package decode

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
)

// errShort reports a message that ends before one of its fields.
var errShort = errors.New("message too short")

// buf reads the fields of one pgoutput message. Every read checks the
// remaining length first; on a short message the first failure sticks in
// err and later reads return zero values.
type buf struct {
	b   []byte
	err error
	// interned, when set, interns the relations of encoded changes.
	interned *Relations
	// owned reports that b is a copy made for the values read from it:
	// bytes then returns sub-slices of b instead of copying.
	owned bool
	// arena, when set, holds that copy and the tuples' values.
	arena *arena
}

// own copies the rest of the message once, so that the values read from
// it afterwards point into the copy instead of each getting its own.
func (r *buf) own() {
	if r.owned || len(r.b) == 0 {
		return
	}
	if r.arena != nil {
		r.b = r.arena.copy(r.b)
	} else {
		r.b = append([]byte(nil), r.b...)
	}
	r.owned = true
}

// arena hands out the value bytes and value slices of decoded rows from
// chunks that consecutive rows share, instead of two allocations a row:
// a reader of a busy slot decodes tens of thousands of rows a second, and
// each allocation costs more in the garbage collector than in the
// decoder. A chunk lives as long as any row in it; transactions are
// released in commit order, so it holds back at most about one chunk more
// than the rows in use. Every piece is capped at its length, so an
// append to one never writes into the next.
type arena struct {
	vals []Value
	data []byte
}

const (
	arenaValues = 512      // values a chunk (16 KiB)
	arenaBytes  = 32 << 10 // bytes a chunk
)

// values returns n zero values.
func (a *arena) values(n int) []Value {
	if n > arenaValues/4 {
		return make([]Value, n)
	}
	if n > cap(a.vals)-len(a.vals) {
		a.vals = make([]Value, 0, arenaValues)
	}
	i := len(a.vals)
	a.vals = a.vals[:i+n]
	return a.vals[i : i+n : i+n]
}

// copy returns a copy of b.
func (a *arena) copy(b []byte) []byte {
	if len(b) > arenaBytes/4 {
		return append([]byte(nil), b...)
	}
	if len(b) > cap(a.data)-len(a.data) {
		a.data = make([]byte, 0, arenaBytes)
	}
	i := len(a.data)
	a.data = append(a.data, b...)
	return a.data[i:len(a.data):len(a.data)]
}

func (r *buf) fail(err error) {
	if r.err == nil {
		r.err = err
	}
}

func (r *buf) need(n int) bool {
	if r.err != nil {
		return false
	}
	if n < 0 || len(r.b) < n {
		r.fail(errShort)
		return false
	}
	return true
}

func (r *buf) u8() uint8 {
	if !r.need(1) {
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *buf) u16() uint16 {
	if !r.need(2) {
		return 0
	}
	v := binary.BigEndian.Uint16(r.b)
	r.b = r.b[2:]
	return v
}

func (r *buf) u32() uint32 {
	if !r.need(4) {
		return 0
	}
	v := binary.BigEndian.Uint32(r.b)
	r.b = r.b[4:]
	return v
}

func (r *buf) u64() uint64 {
	if !r.need(8) {
		return 0
	}
	v := binary.BigEndian.Uint64(r.b)
	r.b = r.b[8:]
	return v
}

func (r *buf) lsn() pglogrepl.LSN { return pglogrepl.LSN(r.u64()) }

// time reads a timestamp in microseconds since 2000-01-01 UTC.
func (r *buf) time() time.Time {
	us := int64(r.u64())
	return pgEpoch.Add(time.Duration(us%1e6) * time.Microsecond).Add(time.Duration(us/1e6) * time.Second)
}

var pgEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// str reads a NUL-terminated string; the result is a copy.
func (r *buf) str() string {
	if r.err != nil {
		return ""
	}
	for i, c := range r.b {
		if c == 0 {
			s := string(r.b[:i])
			r.b = r.b[i+1:]
			return s
		}
	}
	r.fail(errors.New("unterminated string"))
	return ""
}

// skipStr skips a NUL-terminated string.
func (r *buf) skipStr() {
	if r.err != nil {
		return
	}
	for i, c := range r.b {
		if c == 0 {
			r.b = r.b[i+1:]
			return
		}
	}
	r.fail(errors.New("unterminated string"))
}

// bytes reads n bytes into a new slice, so the caller's buffer can be
// reused; after own, the bytes are a capacity-limited slice of the copy.
func (r *buf) bytes(n uint32) []byte {
	if uint64(n) > uint64(len(r.b)) {
		r.fail(errShort)
		return nil
	}
	if !r.need(int(n)) {
		return nil
	}
	var v []byte
	if r.owned {
		v = r.b[:n:n]
	} else {
		v = make([]byte, n)
		copy(v, r.b[:n:n])
	}
	r.b = r.b[n:]
	return v
}

// end reports trailing bytes as an error, and returns the first error.
func (r *buf) end() error {
	if r.err == nil && len(r.b) != 0 {
		r.err = fmt.Errorf("%d unexpected trailing bytes", len(r.b))
	}
	return r.err
}

// tuple reads a TupleData: a column count and one value per column.
func (r *buf) tuple() []Value {
	n := int(r.u16())
	if r.err != nil {
		return nil
	}
	// Each column takes at least one byte: refuse counts the message
	// cannot hold before allocating for them.
	if n > len(r.b) {
		r.fail(fmt.Errorf("tuple claims %d columns in %d bytes", n, len(r.b)))
		return nil
	}
	var vals []Value
	if r.arena != nil {
		vals = r.arena.values(n)
	} else {
		vals = make([]Value, n)
	}
	for i := range vals {
		switch kind := r.u8(); kind {
		case 'n':
			vals[i] = Value{Kind: ValueNull}
		case 'u':
			vals[i] = Value{Kind: ValueUnchanged}
		case 't':
			vals[i] = Value{Kind: ValueText, Data: r.bytes(r.u32())}
		case 'b':
			vals[i] = Value{Kind: ValueBinary, Data: r.bytes(r.u32())}
		default:
			if r.err == nil {
				r.fail(fmt.Errorf("column %d: unknown value kind %q", i, kind))
			}
		}
		if r.err != nil {
			return nil
		}
	}
	return vals
}
