package decode

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"sync"
)

// ErrSpillReleased is returned by Spill.Iter and Spill.WriteTo after
// Release.
var ErrSpillReleased = errors.New("spilled transaction released")

// errSpillIO wraps a failure to write a spill file. It is not a decoding
// error: reconnecting (the server resends the transaction) may succeed.
var errSpillIO = errors.New("spill")

// Spill file layout. The file starts with a fixed header written when the
// transaction is complete, then chunks:
//
//	header: magic[8] count u64 bytes u64 chunks u32 crc32c(previous 28 bytes) u32
//	chunk:  length u32, crc32c(payload) u32, payload
//	payload: a block of changes in the encoding of AppendChanges (codec.go)
//
// Relations are numbered in order of definition over the whole file; a
// chunk defines the relations its changes use first.
const (
	spillMagic      = "PRSMSPL1"
	spillHeaderSize = 32
	// DefaultSpillChunk is the change data written per spill chunk: the
	// unit a spilled transaction is read back in.
	DefaultSpillChunk = 1 << 20
)

var spillCRC = crc32.MakeTable(crc32.Castagnoli)

// Spill holds the changes of a transaction too large to keep in memory, in
// a file. A Txn with a Spill has nil Changes; its changes are read back in
// chunks, in order, by any number of concurrent iterators.
//
// A Spill made by the Assembler owns an unlinked temporary file: its disk
// space is freed when the Spill is released (or the process exits). A
// Spill opened with OpenSpill reads a file another owner (the spool) keeps
// and deletes.
type Spill struct {
	f     *os.File // shared descriptor; nil for a Spill opened by path
	path  string   // for a Spill opened by path
	size  int64    // file size
	count int
	bytes int64

	mu       sync.Mutex
	readers  int
	released bool

	// A filtered view (Filtered) reads base's file through filter.
	base   *Spill
	filter func([]Change) ([]Change, error)
}

// Filtered returns a view of s whose chunks pass through fn, for a reader
// that must see only part of the changes. fn gets each chunk as read (it
// must not keep it) and returns what the view hands out; it may be called
// from several goroutines at once. Filtered reads the file once to count
// what the view holds, one chunk in memory at a time. The view shares s's
// file: it must not be used after s is released, its own Release does
// nothing, and WriteTo refuses it (the file holds unfiltered changes).
func (s *Spill) Filtered(fn func([]Change) ([]Change, error)) (*Spill, error) {
	base := s
	if s.base != nil {
		return nil, errors.New("filter a filtered spill")
	}
	v := &Spill{base: base, filter: fn, size: base.size}
	err := v.Each(func(changes []Change) error {
		v.count += len(changes)
		for i := range changes {
			v.bytes += int64(changeSize(&changes[i]))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return v, nil
}

// Count is the number of changes.
func (s *Spill) Count() int { return s.count }

// Bytes is the in-memory size of the changes, estimated like Txn.Size.
func (s *Spill) Bytes() int64 { return s.bytes }

// FileSize is the size of the spill file in bytes.
func (s *Spill) FileSize() int64 { return s.size }

// Release frees the spill: the file is closed (a temporary one is gone
// then) once the iterators still open are closed. Later Iter calls fail
// with ErrSpillReleased. Release is idempotent and safe for concurrent
// use.
func (s *Spill) Release() {
	if s == nil || s.base != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.released = true
	if s.readers == 0 && s.f != nil {
		s.f.Close()
		s.f = nil
	}
}

// acquire opens a reader of the file: the shared descriptor, or a new one.
func (s *Spill) acquire() (io.ReaderAt, func(), error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.released {
		return nil, nil, ErrSpillReleased
	}
	if s.f == nil {
		f, err := os.Open(s.path)
		if err != nil {
			return nil, nil, fmt.Errorf("open spill: %w", err)
		}
		return f, func() { f.Close() }, nil
	}
	s.readers++
	f := s.f
	return f, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.readers--
		if s.released && s.readers == 0 && s.f != nil {
			s.f.Close()
			s.f = nil
		}
	}, nil
}

// WriteTo copies the spill file, as OpenSpill reads it, to w.
func (s *Spill) WriteTo(w io.Writer) (int64, error) {
	if s.base != nil {
		return 0, errors.New("copy spill: a filtered view cannot be copied")
	}
	r, done, err := s.acquire()
	if err != nil {
		return 0, err
	}
	defer done()
	n, err := io.Copy(w, io.NewSectionReader(r, 0, s.size))
	if err != nil {
		return n, fmt.Errorf("copy spill: %w", err)
	}
	return n, nil
}

// OpenSpill opens a spill file written by WriteTo. The file must stay in
// place while the Spill is used; Release does not delete it.
func OpenSpill(path string) (*Spill, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open spill: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("open spill: %w", err)
	}
	var hdr [spillHeaderSize]byte
	if _, err := io.ReadFull(f, hdr[:]); err != nil {
		return nil, fmt.Errorf("open spill %s: header: %w", path, err)
	}
	count, bytes, err := parseSpillHeader(hdr[:])
	if err != nil {
		return nil, fmt.Errorf("open spill %s: %w", path, err)
	}
	return &Spill{path: path, size: fi.Size(), count: count, bytes: bytes}, nil
}

func parseSpillHeader(h []byte) (count int, bytes int64, err error) {
	if string(h[:8]) != spillMagic {
		return 0, 0, errors.New("not a spill file")
	}
	if crc32.Checksum(h[:28], spillCRC) != binary.BigEndian.Uint32(h[28:]) {
		return 0, 0, errors.New("spill header checksum mismatch")
	}
	c := binary.BigEndian.Uint64(h[8:])
	b := binary.BigEndian.Uint64(h[16:])
	if c > 1<<40 || b > 1<<62 {
		return 0, 0, errors.New("spill header out of range")
	}
	return int(c), int64(b), nil
}

// SpillIter reads a spilled transaction's changes back, chunk by chunk.
// It is not safe for concurrent use; several iterators may read one Spill
// at once.
type SpillIter struct {
	s    *Spill
	r    *bufio.Reader
	done func()
	rels []*Relation
	buf  []byte
	left int64 // bytes of chunks not read yet
	seen int
	err  error

	filter func([]Change) ([]Change, error) // of a filtered view
}

// Iter returns an iterator over the changes, from the first.
func (s *Spill) Iter() (*SpillIter, error) {
	if s.base != nil {
		it, err := s.base.Iter()
		if err != nil {
			return nil, err
		}
		it.filter = s.filter
		return it, nil
	}
	r, done, err := s.acquire()
	if err != nil {
		return nil, err
	}
	var hdr [spillHeaderSize]byte
	if _, err := r.ReadAt(hdr[:], 0); err != nil {
		done()
		return nil, fmt.Errorf("read spill header: %w", err)
	}
	if _, _, err := parseSpillHeader(hdr[:]); err != nil {
		done()
		return nil, err
	}
	left := s.size - spillHeaderSize
	return &SpillIter{
		s:    s,
		r:    bufio.NewReaderSize(io.NewSectionReader(r, spillHeaderSize, left), 256<<10),
		done: done,
		left: left,
	}, nil
}

// Next returns the next chunk of changes, or io.EOF after the last one.
// The changes do not share memory with the iterator or with earlier
// chunks, except their Relations.
func (it *SpillIter) Next() ([]Change, error) {
	if it.err != nil {
		return nil, it.err
	}
	changes, err := it.next()
	for err == nil && it.filter != nil {
		if changes, err = it.filter(changes); err == nil && len(changes) > 0 {
			break
		}
		if err == nil {
			changes, err = it.next()
		}
	}
	if err != nil {
		if !errors.Is(err, io.EOF) {
			err = fmt.Errorf("read spill: %w", err)
		}
		it.err = err
	}
	return changes, err
}

func (it *SpillIter) next() ([]Change, error) {
	if it.left == 0 {
		if it.seen != it.s.count {
			return nil, fmt.Errorf("%d changes, header says %d", it.seen, it.s.count)
		}
		return nil, io.EOF
	}
	var hdr [8]byte
	if it.left < 8 {
		return nil, errors.New("truncated chunk header")
	}
	if _, err := io.ReadFull(it.r, hdr[:]); err != nil {
		return nil, err
	}
	n := int64(binary.BigEndian.Uint32(hdr[:4]))
	if n == 0 || n > it.left-8 {
		return nil, fmt.Errorf("chunk length %d with %d bytes left", n, it.left-8)
	}
	if cap(it.buf) < int(n) {
		it.buf = make([]byte, n)
	}
	p := it.buf[:n]
	if _, err := io.ReadFull(it.r, p); err != nil {
		return nil, err
	}
	it.left -= 8 + n
	if crc32.Checksum(p, spillCRC) != binary.BigEndian.Uint32(hdr[4:]) {
		return nil, errors.New("chunk checksum mismatch")
	}
	if cap(it.buf) > 4<<20 {
		it.buf = nil
	}
	changes, rels, err := decodeSpillChunk(p, it.rels)
	if err != nil {
		return nil, err
	}
	it.rels = rels
	it.seen += len(changes)
	return changes, nil
}

// Close ends the iteration and releases its hold on the file.
func (it *SpillIter) Close() {
	if it.done != nil {
		it.done()
		it.done = nil
	}
	if it.err == nil {
		it.err = errors.New("spill iterator closed")
	}
}

// Each calls fn with every chunk of changes in order; it stops at the
// first error.
func (s *Spill) Each(fn func([]Change) error) error {
	it, err := s.Iter()
	if err != nil {
		return err
	}
	defer it.Close()
	for {
		chunk, err := it.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := fn(chunk); err != nil {
			return err
		}
	}
}

// spillWriter appends a transaction's changes to a new spill file.
type spillWriter struct {
	f          *os.File
	w          *bufio.Writer
	size       int64
	chunkBytes int
	rels       map[*Relation]uint32 // relations defined by earlier chunks
	pend       []Change
	pendBytes  int
	count      int
	bytes      int64
	chunks     int
	enc        []byte
}

// newSpillWriter creates an unlinked temporary file in dir.
func newSpillWriter(dir string, chunkBytes int) (*spillWriter, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: %w", errSpillIO, err)
	}
	f, err := os.CreateTemp(dir, "txn-*.spill")
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errSpillIO, err)
	}
	// Unlinked at once: the space is freed when the descriptor is closed,
	// also when the process dies.
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, fmt.Errorf("%w: %w", errSpillIO, err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	if _, err := w.Write(make([]byte, spillHeaderSize)); err != nil {
		f.Close()
		return nil, fmt.Errorf("%w: %w", errSpillIO, err)
	}
	if chunkBytes <= 0 {
		chunkBytes = DefaultSpillChunk
	}
	return &spillWriter{f: f, w: w, size: spillHeaderSize, chunkBytes: chunkBytes, rels: map[*Relation]uint32{}}, nil
}

func (w *spillWriter) add(c Change) error {
	n := changeSize(&c)
	w.pend = append(w.pend, c)
	w.pendBytes += n
	w.count++
	w.bytes += int64(n)
	if w.pendBytes >= w.chunkBytes {
		return w.flushChunk()
	}
	return nil
}

func (w *spillWriter) flushChunk() error {
	if len(w.pend) == 0 {
		return nil
	}
	e, err := w.encodeChunk()
	if err != nil {
		return err
	}
	if _, err := w.w.Write(e); err != nil {
		return fmt.Errorf("%w: %w", errSpillIO, err)
	}
	w.size += int64(len(e))
	w.chunks++
	if cap(e) <= 4<<20 {
		w.enc = e[:0]
	} else {
		w.enc = nil
	}
	return nil
}

// encodeChunk encodes the pending changes as one chunk, length and
// checksum included, and clears them.
func (w *spillWriter) encodeChunk() ([]byte, error) {
	e := append(w.enc[:0], 0, 0, 0, 0, 0, 0, 0, 0) // length and checksum, patched below
	e = appendChanges(e, w.pend, w.rels)
	clear(w.pend)
	w.pend, w.pendBytes = w.pend[:0], 0
	payload := e[8:]
	if uint64(len(payload)) > 1<<32-1 {
		return nil, fmt.Errorf("%w: chunk of %d bytes", errSpillIO, len(payload))
	}
	binary.BigEndian.PutUint32(e[0:], uint32(len(payload)))
	binary.BigEndian.PutUint32(e[4:], crc32.Checksum(payload, spillCRC))
	return e, nil
}

// finish writes the last chunk and the header and returns the Spill.
func (w *spillWriter) finish() (*Spill, error) {
	if err := w.flushChunk(); err != nil {
		w.abort()
		return nil, err
	}
	if err := w.w.Flush(); err != nil {
		w.abort()
		return nil, fmt.Errorf("%w: %w", errSpillIO, err)
	}
	var h [spillHeaderSize]byte
	copy(h[:], spillMagic)
	binary.BigEndian.PutUint64(h[8:], uint64(w.count))
	binary.BigEndian.PutUint64(h[16:], uint64(w.bytes))
	binary.BigEndian.PutUint32(h[24:], uint32(w.chunks))
	binary.BigEndian.PutUint32(h[28:], crc32.Checksum(h[:28], spillCRC))
	if _, err := w.f.WriteAt(h[:], 0); err != nil {
		w.abort()
		return nil, fmt.Errorf("%w: %w", errSpillIO, err)
	}
	s := &Spill{f: w.f, size: w.size, count: w.count, bytes: w.bytes}
	w.f = nil
	return s, nil
}

// abort discards the file.
func (w *spillWriter) abort() {
	if w.f != nil {
		w.f.Close()
		w.f = nil
	}
	w.pend = nil
}

// decodeSpillChunk parses one chunk payload; rels are the relations
// defined by earlier chunks, and the returned slice adds this chunk's.
func decodeSpillChunk(p []byte, rels []*Relation) ([]Change, []*Relation, error) {
	r := &buf{b: p}
	changes, rels := r.changes(rels)
	if err := r.end(); err != nil {
		return nil, rels, err
	}
	return changes, rels, nil
}
