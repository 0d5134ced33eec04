package spool

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/jackc/pglogrepl"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// ErrCorrupt reports a record that fails its checksum or length check
// where a crash cannot have left it.
var ErrCorrupt = errors.New("spool corrupt")

const (
	headerSize = 8
	// SegmentSize is the size at which a new segment is started.
	SegmentSize = 64 << 20
	// maxRecord bounds one record: the largest encoded transaction decode
	// reads in one piece (the peer protocol's frame limit too).
	maxRecord = decode.MaxEncodedSize
	// spilledFlag, set in a record's length word, marks the record of a
	// spilled transaction: its body is the transaction's header and the
	// changes are in the file spillName(end LSN) next to the segments.
	spilledFlag = 1 << 31
)

func spillName(end pglogrepl.LSN) string { return fmt.Sprintf("txn-%016X.spill", uint64(end)) }

// bigFile is the copy of a spilled transaction's changes.
type bigFile struct {
	end  pglogrepl.LSN
	size int64
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

type segment struct {
	name     string
	firstEnd pglogrepl.LSN // end LSN of its first record (from the name)
	size     int64         // bytes durable (flushed and fsynced)
}

// Spool is an open spool directory. Its methods are safe for concurrent
// use: one goroutine appends, any number read.
type Spool struct {
	dir      string
	maxBytes int64
	segSize  int64
	log      zerolog.Logger
	lock     *os.File

	mu       sync.Mutex
	segs     []*segment
	w        *os.File // active (last) segment, nil before the first append
	bw       *bufio.Writer
	written  int64 // bytes written to the active segment, durable or not
	lastEnd  pglogrepl.LSN
	pending  pglogrepl.LSN // last appended, not yet durable
	durable  pglogrepl.LSN
	total    int64     // durable bytes in all segments
	bigs     []bigFile // spilled transactions' files, by end LSN
	bigBytes int64
	cursors  map[string]pglogrepl.LSN
	changed  chan struct{} // closed and replaced when something becomes durable or space frees
	full     bool
	closed   bool
	flushErr error

	// kick wakes the flusher after an append; syncing is set while the
	// flusher fsyncs the active segment with mu released, and synced
	// (on mu) is broadcast when it ends.
	kick        chan struct{}
	syncing     bool
	synced      *sync.Cond
	stopFlusher chan struct{}
	flusherDone chan struct{}
}

// Open opens (creating it when missing) the spool in dir for the given peer
// regions. maxBytes bounds its size: Append blocks while it is full.
func Open(dir string, maxBytes int64, regions []string, log zerolog.Logger) (*Spool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("spool %s: %w", dir, err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("spool %s: %w", dir, err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("spool %s is in use by another process (only the node that reads the region's slot writes it): %w", dir, err)
	}
	s := &Spool{
		dir: dir, maxBytes: maxBytes, segSize: SegmentSize, log: log, lock: lock,
		cursors: map[string]pglogrepl.LSN{}, changed: make(chan struct{}),
		kick: make(chan struct{}, 1), stopFlusher: make(chan struct{}), flusherDone: make(chan struct{}),
	}
	s.synced = sync.NewCond(&s.mu)
	if err := s.load(regions); err != nil {
		lock.Close()
		return nil, err
	}
	go s.flusher()
	return s, nil
}

func segName(firstEnd pglogrepl.LSN) string { return fmt.Sprintf("seg-%016X.log", uint64(firstEnd)) }

func (s *Spool) load(regions []string) error {
	for _, r := range regions {
		b, err := os.ReadFile(filepath.Join(s.dir, "cursor-"+r))
		switch {
		case errors.Is(err, os.ErrNotExist):
			s.cursors[r] = 0
		case err != nil:
			return fmt.Errorf("spool cursor %s: %w", r, err)
		default:
			v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 16, 64)
			if err != nil {
				return fmt.Errorf("spool cursor %s: %q: %w: %v", r, b, ErrCorrupt, err)
			}
			s.cursors[r] = pglogrepl.LSN(v)
		}
	}
	names, err := filepath.Glob(filepath.Join(s.dir, "seg-*.log"))
	if err != nil {
		return err
	}
	sort.Strings(names)
	for _, n := range names {
		base := filepath.Base(n)
		v, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(base, "seg-"), ".log"), 16, 64)
		if err != nil {
			return fmt.Errorf("spool segment %s: bad name: %w", base, ErrCorrupt)
		}
		fi, err := os.Stat(n)
		if err != nil {
			return err
		}
		s.segs = append(s.segs, &segment{name: base, firstEnd: pglogrepl.LSN(v), size: fi.Size()})
		s.total += fi.Size()
	}
	if len(s.segs) == 0 {
		return s.loadBigs()
	}
	// Scan the last segment: find its last end LSN and cut a torn tail.
	last := s.segs[len(s.segs)-1]
	path := filepath.Join(s.dir, last.name)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	good, lastEnd, err := scan(f, last.size)
	if err != nil {
		f.Close()
		return fmt.Errorf("spool segment %s: %w", last.name, err)
	}
	if good < last.size {
		s.log.Warn().Str("segment", last.name).Int64("bytes", last.size-good).
			Msg("spool: truncated a torn record at the tail (a crash while writing); it is read again from the slot")
		if err := f.Truncate(good); err != nil {
			f.Close()
			return err
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return err
		}
		s.total -= last.size - good
		last.size = good
	}
	f.Close()
	if lastEnd == 0 && len(s.segs) > 1 {
		// An empty last segment: the previous one holds the last record.
		prev := s.segs[len(s.segs)-2]
		pf, err := os.Open(filepath.Join(s.dir, prev.name))
		if err != nil {
			return err
		}
		_, lastEnd, err = scan(pf, prev.size)
		pf.Close()
		if err != nil {
			return fmt.Errorf("spool segment %s: %w", prev.name, err)
		}
	}
	s.lastEnd, s.durable, s.pending = lastEnd, lastEnd, lastEnd
	return s.loadBigs()
}

// loadBigs finds the spilled transactions' files. Files of transactions
// every region acknowledged, and files whose record never became durable
// (a crash between the copy and the record; the slot resends them), are
// deleted.
func (s *Spool) loadBigs() error {
	tmps, _ := filepath.Glob(filepath.Join(s.dir, "txn-*.spill.tmp"))
	for _, t := range tmps {
		os.Remove(t)
	}
	names, err := filepath.Glob(filepath.Join(s.dir, "txn-*.spill"))
	if err != nil {
		return err
	}
	sort.Strings(names)
	minCursor := s.minCursorLocked()
	for _, n := range names {
		base := filepath.Base(n)
		v, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(base, "txn-"), ".spill"), 16, 64)
		if err != nil {
			return fmt.Errorf("spool file %s: bad name: %w", base, ErrCorrupt)
		}
		end := pglogrepl.LSN(v)
		if end > s.lastEnd || end <= minCursor {
			if err := os.Remove(n); err != nil {
				return fmt.Errorf("spool remove %s: %w", base, err)
			}
			continue
		}
		fi, err := os.Stat(n)
		if err != nil {
			return err
		}
		s.bigs = append(s.bigs, bigFile{end: end, size: fi.Size()})
		s.bigBytes += fi.Size()
	}
	return nil
}

func (s *Spool) minCursorLocked() pglogrepl.LSN {
	minCursor := pglogrepl.LSN(1<<64 - 1)
	for _, c := range s.cursors {
		minCursor = min(minCursor, c)
	}
	return minCursor
}

// scan reads records from f up to size. It returns the offset after the
// last good record and that record's end LSN. A bad record followed only
// by garbage up to the end is a torn tail (good < size, no error); a bad
// record followed by a good one is corruption.
func scan(f *os.File, size int64) (good int64, lastEnd pglogrepl.LSN, err error) {
	var off int64
	for off < size {
		txn, n, _, rerr := readRecord(f, off, size)
		if rerr != nil {
			if tailOnlyGarbage(f, off, size) {
				return off, lastEnd, nil
			}
			return off, lastEnd, fmt.Errorf("record at offset %d: %w", off, rerr)
		}
		lastEnd = txn.EndLSN
		off += n
	}
	return off, lastEnd, nil
}

// tailOnlyGarbage reports whether no valid record starts anywhere after
// off: then the bad bytes are a write cut short by a crash.
func tailOnlyGarbage(f *os.File, off, size int64) bool {
	tail := make([]byte, size-off)
	if _, err := f.ReadAt(tail, off); err != nil {
		return false
	}
	r := bytes.NewReader(tail)
	for p := int64(1); p+headerSize <= int64(len(tail)); p++ {
		n := int64(binary.BigEndian.Uint32(tail[p : p+4]))
		if n == 0 || n > int64(len(tail))-p-headerSize {
			continue
		}
		if _, _, _, err := readRecord(r, p, int64(len(tail))); err == nil {
			return false
		}
	}
	return true
}

// readRecord reads the record at off and returns it and its size. For a
// spilled transaction's record (spilled) the Txn is the header only.
func readRecord(r io.ReaderAt, off, limit int64) (txn *decode.Txn, size int64, spilled bool, err error) {
	var hdr [headerSize]byte
	if limit-off < headerSize {
		return nil, 0, false, fmt.Errorf("%w: short header", ErrCorrupt)
	}
	if _, err := r.ReadAt(hdr[:], off); err != nil {
		return nil, 0, false, fmt.Errorf("%w: read header: %v", ErrCorrupt, err)
	}
	word := binary.BigEndian.Uint32(hdr[0:4])
	spilled = word&spilledFlag != 0
	n := int64(word &^ spilledFlag)
	sum := binary.BigEndian.Uint32(hdr[4:8])
	if n == 0 || n > maxRecord || n > limit-off-headerSize {
		return nil, 0, false, fmt.Errorf("%w: record length %d", ErrCorrupt, n)
	}
	body := make([]byte, n)
	if _, err := r.ReadAt(body, off+headerSize); err != nil {
		return nil, 0, false, fmt.Errorf("%w: read record: %v", ErrCorrupt, err)
	}
	if crc32.Checksum(body, castagnoli) != sum {
		return nil, 0, false, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	txn, rest, err := decode.ParseTxn(body)
	if err != nil {
		return nil, 0, false, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if len(rest) != 0 {
		return nil, 0, false, fmt.Errorf("%w: %d bytes after the transaction", ErrCorrupt, len(rest))
	}
	if spilled && len(txn.Changes) != 0 {
		return nil, 0, false, fmt.Errorf("%w: spilled transaction record with changes", ErrCorrupt)
	}
	return txn, headerSize + n, spilled, nil
}

// Append adds txn to the spool. A transaction at or below the last one
// appended (a resend after a reconnect) is ignored. Append blocks while the
// spool is full, until space frees or ctx ends. The transaction becomes
// durable at the next flush (see Durable).
//
// A spilled transaction's changes are copied (and fsynced) to a file of
// their own first; its record holds the header and marks it, and readers
// hand it out with a Spill reading that file.
func (s *Spool) Append(ctx context.Context, txn *decode.Txn) error {
	bp := recordBufs.Get().(*[]byte)
	body, big, err := encodeRecord((*bp)[:0], txn)
	if err != nil {
		recordBufs.Put(bp)
		return err
	}
	defer func() {
		if cap(body) <= maxPooledRecord {
			*bp = body[:0]
			recordBufs.Put(bp)
		}
	}()
	s.mu.Lock()
	defer s.mu.Unlock()
	resend, err := s.waitRoomLocked(ctx, txn.EndLSN, int64(len(body))+big)
	if err != nil || resend {
		return err
	}
	var flag uint32
	if txn.Spill != nil {
		if err := s.copySpillLocked(txn); err != nil {
			return err
		}
		flag = spilledFlag
	}
	if s.w == nil || s.written >= s.segSize {
		if err := s.rollLocked(txn.EndLSN); err != nil {
			return err
		}
	}
	var rh [headerSize]byte
	binary.BigEndian.PutUint32(rh[0:4], uint32(len(body))|flag)
	binary.BigEndian.PutUint32(rh[4:8], crc32.Checksum(body, castagnoli))
	if _, err := s.bw.Write(rh[:]); err != nil {
		return s.failLocked(err)
	}
	if _, err := s.bw.Write(body); err != nil {
		return s.failLocked(err)
	}
	s.written += int64(headerSize + len(body))
	s.lastEnd = txn.EndLSN
	s.pending = txn.EndLSN
	select {
	case s.kick <- struct{}{}:
	default: // a kick is pending: that flush takes this record too
	}
	return nil
}

// recordBufs holds the buffers Append encodes records into; those above
// maxPooledRecord (a large transaction's) go back to the collector.
var recordBufs = sync.Pool{New: func() any { return new([]byte) }}

const maxPooledRecord = 1 << 20

// encodeRecord appends to b the body of txn's record and returns it and,
// for a spilled transaction (whose record holds only the header), the
// size of its changes' file.
func encodeRecord(b []byte, txn *decode.Txn) (body []byte, big int64, err error) {
	hdr := txn
	if txn.Spill != nil {
		h := *txn
		h.Changes, h.Spill = nil, nil
		hdr = &h
		big = txn.Spill.FileSize()
	}
	body, err = decode.AppendTxn(b, hdr)
	if err != nil {
		return nil, 0, fmt.Errorf("spool append %s: %w", txn.EndLSN, err)
	}
	if len(body) > maxRecord {
		return nil, 0, fmt.Errorf("spool append %s: transaction of %d bytes exceeds the %d byte record limit", txn.EndLSN, len(body), maxRecord)
	}
	return body, big, nil
}

// waitRoomLocked waits, with s.mu held (it is released while waiting),
// until the spool has room for need more bytes of the transaction ending
// at end, or ctx ends. It reports whether the transaction is a resend,
// at or below the last one appended.
func (s *Spool) waitRoomLocked(ctx context.Context, end pglogrepl.LSN, need int64) (resend bool, err error) {
	for {
		if s.closed {
			return false, errors.New("spool closed")
		}
		if s.flushErr != nil {
			return false, s.flushErr
		}
		if end <= s.lastEnd {
			return true, nil
		}
		if s.maxBytes <= 0 || s.total+s.bigBytes+s.written-s.activeDurable()+need <= s.maxBytes || s.total+s.bigBytes == 0 {
			break
		}
		if !s.full {
			s.full = true
			s.log.Warn().Int64("max_bytes", s.maxBytes).Msg("spool full: stopped reading the slot until a region acknowledges more (the slot keeps the rest)")
		}
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			s.mu.Lock()
			return false, ctx.Err()
		case <-ch:
		}
		s.mu.Lock()
	}
	if s.full {
		s.full = false
		s.log.Info().Msg("spool has room again")
	}
	return false, nil
}

// copySpillLocked copies a spilled transaction's changes into the spool
// (copySpill) and accounts for the file; s.mu is held, and released
// during the copy.
func (s *Spool) copySpillLocked(txn *decode.Txn) error {
	// Copied without the lock: the flusher and readers go on. Only the
	// reader's goroutine appends, so nothing else appends now.
	s.mu.Unlock()
	size, err := s.copySpill(txn)
	s.mu.Lock()
	if err == nil && s.closed {
		err = errors.New("spool closed")
	}
	if err != nil {
		return err
	}
	s.bigs = append(s.bigs, bigFile{end: txn.EndLSN, size: size})
	s.bigBytes += size
	return nil
}

// copySpill copies a spilled transaction's changes to its file in the
// spool, durably, and returns the file's size.
func (s *Spool) copySpill(txn *decode.Txn) (int64, error) {
	path := filepath.Join(s.dir, spillName(txn.EndLSN))
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, fmt.Errorf("spool append %s: %w", txn.EndLSN, err)
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	n, err := txn.Spill.WriteTo(bw)
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return 0, fmt.Errorf("spool append %s: copy spilled changes: %w", txn.EndLSN, err)
	}
	if d, err := os.Open(s.dir); err == nil {
		d.Sync()
		d.Close()
	}
	return n, nil
}

func (s *Spool) activeDurable() int64 {
	if len(s.segs) == 0 || s.w == nil {
		return 0
	}
	return s.segs[len(s.segs)-1].size
}

func (s *Spool) failLocked(err error) error {
	s.flushErr = fmt.Errorf("spool write: %w", err)
	return s.flushErr
}

// rollLocked starts a new segment whose first record ends at firstEnd.
func (s *Spool) rollLocked(firstEnd pglogrepl.LSN) error {
	if s.w != nil {
		if err := s.flushLocked(); err != nil {
			return err
		}
		s.w.Close()
		s.w = nil
	}
	name := segName(firstEnd)
	if n := len(s.segs); n > 0 && s.segs[n-1].name == name {
		// An empty segment left by a crash before its first record was
		// durable: start it again.
		s.segs = s.segs[:n-1]
	}
	f, err := os.OpenFile(filepath.Join(s.dir, name), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return s.failLocked(err)
	}
	if d, err := os.Open(s.dir); err == nil {
		d.Sync()
		d.Close()
	}
	s.w, s.bw, s.written = f, bufio.NewWriterSize(f, 1<<20), 0
	s.segs = append(s.segs, &segment{name: name, firstEnd: firstEnd})
	return nil
}

// flushLocked writes buffered records and fsyncs them; then they are
// durable and readers may see them. It waits for a flush of the flusher
// first, which may be using the active segment.
func (s *Spool) flushLocked() error {
	for s.syncing {
		s.synced.Wait()
	}
	if s.w == nil || s.pending == s.durable && s.bw.Buffered() == 0 {
		return nil
	}
	if err := s.bw.Flush(); err != nil {
		return s.failLocked(err)
	}
	if err := s.w.Sync(); err != nil {
		return s.failLocked(err)
	}
	s.syncedLocked(s.segs[len(s.segs)-1], s.written, s.pending)
	return nil
}

// syncedLocked records that seg holds written durable bytes, up to the
// record that ends at end.
func (s *Spool) syncedLocked(seg *segment, written int64, end pglogrepl.LSN) {
	if written > seg.size {
		s.total += written - seg.size
		seg.size = written
	}
	if end > s.durable {
		s.durable = end
	}
	s.broadcastLocked()
}

func (s *Spool) broadcastLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// flusher makes appends durable as a group commit does: an append wakes
// it, and it writes and fsyncs at once everything appended so far. The
// fsync runs with mu released, so appends go on meanwhile and the next
// flush takes all of them: a lone transaction is durable one fsync after
// its append (a shipper, and in sync mode a commit, waits for that), and
// a busy stream gets one fsync per fsync's time of appends. It never
// waits for a timer: a tick would hold each record back until the next
// one, and in sync mode a committing client would wait a whole tick per
// commit.
func (s *Spool) flusher() {
	defer close(s.flusherDone)
	for {
		select {
		case <-s.stopFlusher:
			return
		case <-s.kick:
		}
		s.mu.Lock()
		if err := s.groupFlushLocked(); err != nil {
			s.log.Error().Err(err).Msg("spool flush failed; the slot stops advancing")
		}
		s.mu.Unlock()
	}
}

// groupFlushLocked is the flusher's flush: like flushLocked, but the
// fsync runs with mu released (syncing set: a roll or Close waits for it).
func (s *Spool) groupFlushLocked() error {
	if s.closed || s.flushErr != nil || s.syncing || s.w == nil || s.pending == s.durable && s.bw.Buffered() == 0 {
		return nil
	}
	if err := s.bw.Flush(); err != nil {
		return s.failLocked(err)
	}
	f, seg, written, end := s.w, s.segs[len(s.segs)-1], s.written, s.pending
	s.syncing = true
	s.mu.Unlock()
	err := f.Sync()
	s.mu.Lock()
	s.syncing = false
	s.synced.Broadcast()
	if err != nil {
		return s.failLocked(err)
	}
	s.syncedLocked(seg, written, end)
	return nil
}

// Durable is the end LSN of the last durable transaction: the slot may be
// confirmed up to it (unless synchronous mode asks for more).
func (s *Spool) Durable() pglogrepl.LSN {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.durable
}

// Cursor is region's persisted acknowledged position.
func (s *Spool) Cursor(region string) pglogrepl.LSN {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cursors[region]
}

// SetCursor persists region's acknowledged position (a lower one is
// ignored) and deletes segments every region has acknowledged.
func (s *Spool) SetCursor(region string, lsn pglogrepl.LSN) error {
	s.mu.Lock()
	if lsn <= s.cursors[region] {
		s.mu.Unlock()
		return nil
	}
	s.mu.Unlock()
	path := filepath.Join(s.dir, "cursor-"+region)
	tmp := path + ".tmp"
	if err := writeSync(tmp, []byte(fmt.Sprintf("%016X\n", uint64(lsn)))); err != nil {
		return fmt.Errorf("spool cursor %s: %w", region, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("spool cursor %s: %w", region, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if lsn > s.cursors[region] {
		s.cursors[region] = lsn
	}
	return s.gcLocked()
}

func writeSync(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// gcLocked deletes segments whose every record every region acknowledged:
// segment i qualifies when the first record of segment i+1 is acknowledged.
func (s *Spool) gcLocked() error {
	minCursor := s.minCursorLocked()
	freed := false
	for len(s.bigs) > 0 && s.bigs[0].end <= minCursor {
		b := s.bigs[0]
		if err := os.Remove(filepath.Join(s.dir, spillName(b.end))); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("spool remove %s: %w", spillName(b.end), err)
		}
		s.bigBytes -= b.size
		s.bigs = s.bigs[1:]
		freed = true
	}
	for len(s.segs) > 1 && s.segs[1].firstEnd <= minCursor {
		seg := s.segs[0]
		if err := os.Remove(filepath.Join(s.dir, seg.name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("spool remove %s: %w", seg.name, err)
		}
		s.total -= seg.size
		s.segs = s.segs[1:]
		freed = true
	}
	if freed {
		s.broadcastLocked()
	}
	return nil
}

// Bytes is the spool's durable size, spilled transactions' files
// included.
func (s *Spool) Bytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.total + s.bigBytes
}

// Close flushes and closes the spool.
func (s *Spool) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	err := s.flushLocked()
	if s.w != nil {
		s.w.Close()
	}
	s.broadcastLocked()
	s.mu.Unlock()
	close(s.stopFlusher)
	<-s.flusherDone
	s.lock.Close()
	return err
}

// Reader reads the spool's durable transactions in order, following new
// appends.
type Reader struct {
	s     *Spool
	after pglogrepl.LSN // return records with EndLSN above this
	seg   string
	off   int64
	f     *os.File
}

// NewReader returns a reader of the transactions with end LSN above after.
func (s *Spool) NewReader(after pglogrepl.LSN) *Reader {
	return &Reader{s: s, after: after}
}

// Next returns the next durable transaction, waiting for one when the
// reader is at the end.
func (r *Reader) Next(ctx context.Context) (*decode.Txn, error) {
	for {
		txn, wait, err := r.step()
		if err != nil {
			return nil, err
		}
		if txn != nil {
			if txn.EndLSN <= r.after {
				continue
			}
			r.after = txn.EndLSN
			return txn, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-wait:
		}
	}
}

// step reads one record, or returns a channel to wait on.
func (r *Reader) step() (*decode.Txn, <-chan struct{}, error) {
	s := r.s
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, nil, errors.New("spool closed")
	}
	idx := -1
	for i, seg := range s.segs {
		if seg.name == r.seg {
			idx = i
		}
	}
	if idx < 0 {
		// Start, or our segment was deleted: pick the last segment whose
		// first record is at or below the position.
		r.closeFile()
		idx = -1
		for i, seg := range s.segs {
			if i == 0 || seg.firstEnd <= r.after+1 {
				idx = i
			}
		}
		if idx < 0 {
			wait := s.changed
			s.mu.Unlock()
			return nil, wait, nil
		}
		r.seg, r.off = s.segs[idx].name, 0
	}
	size := s.segs[idx].size
	if r.off >= size {
		if idx+1 < len(s.segs) && s.segs[idx+1].size > 0 {
			r.closeFile()
			r.seg, r.off = s.segs[idx+1].name, 0
			s.mu.Unlock()
			return r.step()
		}
		wait := s.changed
		s.mu.Unlock()
		return nil, wait, nil
	}
	s.mu.Unlock()
	if r.f == nil {
		f, err := os.Open(filepath.Join(s.dir, r.seg))
		if err != nil {
			return nil, nil, fmt.Errorf("spool read %s: %w", r.seg, err)
		}
		r.f = f
	}
	txn, n, spilled, err := readRecord(r.f, r.off, size)
	if err != nil {
		return nil, nil, fmt.Errorf("spool read %s at offset %d: %w", r.seg, r.off, err)
	}
	if spilled && txn.EndLSN > r.after {
		sp, err := decode.OpenSpill(filepath.Join(s.dir, spillName(txn.EndLSN)))
		if err != nil {
			return nil, nil, fmt.Errorf("spool read %s at offset %d: %w: %v", r.seg, r.off, ErrCorrupt, err)
		}
		txn.Spill = sp
	}
	r.off += n
	return txn, nil, nil
}

func (r *Reader) closeFile() {
	if r.f != nil {
		r.f.Close()
		r.f = nil
	}
}

// Close releases the reader's file.
func (r *Reader) Close() { r.closeFile() }
