package bootstrap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
)

// PostgreSQL's binary COPY format: a header, tuples of int16 field count
// and per field an int32 length (-1 for NULL) and the value in its binary
// send format, and a trailer (field count -1).

var copySignature = []byte("PGCOPY\n\xff\r\n\x00")

// copyHeader is the header written to the target: signature, no flags, no
// extension.
var copyHeader = append(append([]byte{}, copySignature...), 0, 0, 0, 0, 0, 0, 0, 0)

// copyTrailer ends a binary COPY stream.
var copyTrailer = []byte{0xff, 0xff}

var errCopyFormat = errors.New("bad binary COPY data")

// parseHeader returns the length of the header at the start of b, 0 when b
// holds only part of it.
func parseHeader(b []byte) (int, error) {
	const fixed = 11 + 4 + 4
	if len(b) < fixed {
		if !bytes.HasPrefix(copySignature, b[:min(len(b), len(copySignature))]) {
			return 0, fmt.Errorf("%w: no signature", errCopyFormat)
		}
		return 0, nil
	}
	if !bytes.Equal(b[:11], copySignature) {
		return 0, fmt.Errorf("%w: no signature", errCopyFormat)
	}
	ext := binary.BigEndian.Uint32(b[15:19])
	if ext > 1<<20 {
		return 0, fmt.Errorf("%w: header extension of %d bytes", errCopyFormat, ext)
	}
	if len(b) < fixed+int(ext) {
		return 0, nil
	}
	return fixed + int(ext), nil
}

// tuple is one parsed tuple; its slices point into the parsed buffer.
type tuple struct {
	raw    []byte   // the whole tuple, count included
	fields [][]byte // values; nil for NULL
	starts []int    // offset in raw of each field's length word
}

// parseTuple parses the tuple at the start of b into t. It returns the
// bytes consumed, 0 when b holds only part of a tuple, and trailer=true
// (with 2 consumed) at the trailer. It never reads past b.
func parseTuple(b []byte, t *tuple) (n int, trailer bool, err error) {
	if len(b) < 2 {
		return 0, false, nil
	}
	count := int16(binary.BigEndian.Uint16(b[:2]))
	if count == -1 {
		return 2, true, nil
	}
	if count < 0 {
		return 0, false, fmt.Errorf("%w: field count %d", errCopyFormat, count)
	}
	t.fields = t.fields[:0]
	t.starts = t.starts[:0]
	off := 2
	for i := 0; i < int(count); i++ {
		if len(b)-off < 4 {
			return 0, false, nil
		}
		t.starts = append(t.starts, off)
		l := int32(binary.BigEndian.Uint32(b[off : off+4]))
		off += 4
		switch {
		case l == -1:
			t.fields = append(t.fields, nil)
		case l < 0:
			return 0, false, fmt.Errorf("%w: field length %d", errCopyFormat, l)
		default:
			if len(b)-off < int(l) {
				return 0, false, nil
			}
			t.fields = append(t.fields, b[off:off+int(l):off+int(l)])
			off += int(l)
		}
	}
	t.raw = b[:off:off]
	return off, false, nil
}

// splitter is the io.Writer a source COPY TO writes into: it parses the
// stream and hands every tuple to onTuple. The tuple's slices are valid
// only during the call.
type splitter struct {
	buf     []byte
	header  bool
	ended   bool
	bytes   int64
	t       tuple
	onTuple func(*tuple) error
}

// Write implements io.Writer.
func (s *splitter) Write(p []byte) (int, error) {
	s.bytes += int64(len(p))
	s.buf = append(s.buf, p...)
	off := 0
	if !s.header {
		n, err := parseHeader(s.buf)
		if err != nil {
			return 0, err
		}
		if n == 0 {
			return len(p), nil
		}
		s.header = true
		off = n
	}
	for off < len(s.buf) {
		if s.ended {
			return 0, fmt.Errorf("%w: data after the trailer", errCopyFormat)
		}
		n, trailer, err := parseTuple(s.buf[off:], &s.t)
		if err != nil {
			return 0, err
		}
		if n == 0 {
			break
		}
		off += n
		if trailer {
			s.ended = true
			continue
		}
		if err := s.onTuple(&s.t); err != nil {
			return 0, err
		}
	}
	rest := copy(s.buf, s.buf[off:])
	s.buf = s.buf[:rest]
	return len(p), nil
}

// done checks that the stream ended with its trailer.
func (s *splitter) done() error {
	if !s.ended || len(s.buf) > 0 {
		return fmt.Errorf("%w: stream ended without its trailer", errCopyFormat)
	}
	return nil
}
