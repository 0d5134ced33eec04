package bootstrap

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Limits of the rows written with their source commit time.
const (
	maxRunRows     = 5000    // rows of one source transaction per target transaction
	maxRunBytes    = 4 << 20 // bytes of one run
	copyRunRows    = 32      // runs this long are written with COPY, shorter ones with INSERT
	maxBatchStmts  = 4000    // statements per round trip
	maxBatchBytes  = 4 << 20 // bytes per round trip
	timestamptzOID = 1184
)

// epochMicros is epoch in PostgreSQL's binary timestamptz (microseconds
// since 2000-01-01).
var epochMicros = epoch.Sub(pgEpoch).Microseconds()

// pgEpoch is the zero of PostgreSQL's binary timestamps.
var pgEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// run is rows of one table that share a source commit time and origin:
// written in one target transaction with that commit time.
type run struct {
	t    *table
	ts   []byte     // binary timestamptz
	rows [][][]byte // column values, binary; nil for NULL
	size int
}

// writers owns the target sessions that write rows under the origin of
// their source region. The sessions of the peer regions' origins are the
// guards of the run: they hold the origins from the start to the end.
type writers struct {
	dsn string
	log zerolog.Logger

	mu       sync.Mutex
	byOrigin map[string]*originWriter
	order    []*originWriter
	closed   bool
	wg       sync.WaitGroup
}

type originWriter struct {
	s        *originSession
	ch       chan []*run
	done     chan struct{}
	err      error // set before done is closed
	prepared map[*table]string
	guard    bool
	rows     int64
}

func newWriters(dsn string, log zerolog.Logger) *writers {
	return &writers{dsn: dsn, log: log, byOrigin: map[string]*originWriter{}}
}

// guard holds origin for the whole run; its holder is terminated if it is
// an applier.
func (ws *writers) guard(ctx context.Context, origin string) (*originWriter, error) {
	w, err := ws.get(ctx, origin)
	if err != nil {
		return nil, err
	}
	w.guard = true
	return w, nil
}

// get returns the writer of origin, holding it on first use. Its goroutine
// runs until finish or close.
func (ws *writers) get(ctx context.Context, origin string) (*originWriter, error) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if w, ok := ws.byOrigin[origin]; ok {
		return w, nil
	}
	if ws.closed {
		return nil, errors.New("bootstrap: writers already finished")
	}
	s, err := holdOrigin(ctx, ws.dsn, origin, true, writerParams)
	if err != nil {
		return nil, fmt.Errorf("bootstrap: target: %w", err)
	}
	w := &originWriter{s: s, ch: make(chan []*run, 4), done: make(chan struct{}), prepared: map[*table]string{}}
	ws.byOrigin[origin] = w
	ws.order = append(ws.order, w)
	ws.wg.Add(1)
	go func() {
		defer ws.wg.Done()
		defer close(w.done)
		w.err = w.loop(ctx)
		if w.err != nil {
			// Drain so senders never block on a dead writer.
			for range w.ch {
			}
		}
	}()
	return w, nil
}

// send queues runs for the writer of origin.
func (ws *writers) send(ctx context.Context, origin string, runs []*run) error {
	w, err := ws.get(ctx, origin)
	if err != nil {
		return err
	}
	select {
	case w.ch <- runs:
		return nil
	case <-w.done:
		return w.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// finish waits until every queued row is written and checks that every
// guard still holds its origin. The sessions stay open for setProgress.
func (ws *writers) finish() error {
	ws.mu.Lock()
	if !ws.closed {
		ws.closed = true
		for _, w := range ws.order {
			close(w.ch)
		}
	}
	order := ws.order
	ws.mu.Unlock()
	ws.wg.Wait()
	var errs []error
	for _, w := range order {
		if w.err != nil {
			errs = append(errs, fmt.Errorf("bootstrap: write rows of origin %s: %w", w.s.origin, w.err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, w := range order {
		if w.guard && !w.s.held(ctx) {
			return fmt.Errorf("bootstrap: origin %s in the target was taken from the run (an applier fenced it); nothing is lost, run bootstrap again", w.s.origin)
		}
	}
	return nil
}

// setProgress sets the progress of a guarded origin.
func (ws *writers) setProgress(ctx context.Context, origin string, lsn pglogrepl.LSN) error {
	ws.mu.Lock()
	w, ok := ws.byOrigin[origin]
	ws.mu.Unlock()
	if !ok {
		return fmt.Errorf("bootstrap: origin %s is not held", origin)
	}
	if err := w.s.setProgress(ctx, lsn); err != nil {
		return fmt.Errorf("bootstrap: target: %w", err)
	}
	return nil
}

// close stops the writers and closes their sessions.
func (ws *writers) close() {
	_ = ws.finish()
	for _, w := range ws.order {
		w.s.close()
	}
}

// loop writes the queued runs, short ones several per round trip, until
// the channel is closed.
func (w *originWriter) loop(ctx context.Context) error {
	b := &pgconn.Batch{}
	stmts, size := 0, 0
	exec := func() error {
		if stmts == 0 {
			return nil
		}
		_, err := w.s.conn.ExecBatch(ctx, b).ReadAll()
		b = &pgconn.Batch{}
		stmts, size = 0, 0
		return err
	}
	for runs := range w.ch {
		for _, r := range runs {
			if len(r.rows) >= copyRunRows {
				if err := exec(); err != nil {
					return err
				}
				if err := w.copyRun(ctx, r); err != nil {
					return err
				}
				continue
			}
			name, err := w.prepare(ctx, r.t)
			if err != nil {
				return err
			}
			b.ExecParams("BEGIN", nil, nil, nil, nil)
			b.ExecParams("SELECT pg_replication_origin_xact_setup('0/0', $1)", [][]byte{r.ts}, []uint32{timestamptzOID}, []int16{1}, nil)
			for _, row := range r.rows {
				b.ExecPrepared(name, row, []int16{1}, nil)
			}
			b.ExecParams("COMMIT", nil, nil, nil, nil)
			stmts += len(r.rows) + 3
			size += r.size
			w.rows += int64(len(r.rows))
			if stmts >= maxBatchStmts || size >= maxBatchBytes {
				if err := exec(); err != nil {
					return err
				}
			}
		}
		if err := exec(); err != nil {
			return err
		}
	}
	return nil
}

// copyRun writes a long run with binary COPY in one transaction carrying
// the run's commit time.
func (w *originWriter) copyRun(ctx context.Context, r *run) error {
	b := &pgconn.Batch{}
	b.ExecParams("BEGIN", nil, nil, nil, nil)
	b.ExecParams("SELECT pg_replication_origin_xact_setup('0/0', $1)", [][]byte{r.ts}, []uint32{timestamptzOID}, []int16{1}, nil)
	if _, err := w.s.conn.ExecBatch(ctx, b).ReadAll(); err != nil {
		return err
	}
	data := make([]byte, 0, len(copyHeader)+r.size+len(r.rows)*(2+4*len(r.t.columns))+len(copyTrailer))
	data = append(data, copyHeader...)
	for _, row := range r.rows {
		data = binary.BigEndian.AppendUint16(data, uint16(len(row)))
		for _, f := range row {
			if f == nil {
				data = binary.BigEndian.AppendUint32(data, 0xffffffff)
				continue
			}
			data = binary.BigEndian.AppendUint32(data, uint32(len(f)))
			data = append(data, f...)
		}
	}
	data = append(data, copyTrailer...)
	if _, err := w.s.conn.CopyFrom(ctx, bytes.NewReader(data), fmt.Sprintf("COPY %s (%s) FROM STDIN (FORMAT binary)", r.t.ident(), r.t.columnList())); err != nil {
		return fmt.Errorf("copy into %s: %w", r.t.name(), err)
	}
	if _, err := w.s.conn.Exec(ctx, "COMMIT").ReadAll(); err != nil {
		return err
	}
	w.rows += int64(len(r.rows))
	return nil
}

func (w *originWriter) prepare(ctx context.Context, t *table) (string, error) {
	if name, ok := w.prepared[t]; ok {
		return name, nil
	}
	name := fmt.Sprintf("%s_%d", appName, len(w.prepared))
	if _, err := w.s.conn.Prepare(ctx, name, t.insertSQL(), nil); err != nil {
		return "", fmt.Errorf("prepare insert into %s: %w", t.name(), err)
	}
	w.prepared[t] = name
	return name, nil
}

// importSnapshot opens n source connections in REPEATABLE READ
// transactions that use the exported snapshot.
func importSnapshot(ctx context.Context, srcDSN string, snap *snapshot, n int) ([]*pgconn.PgConn, error) {
	srcs := make([]*pgconn.PgConn, 0, n)
	for i := 0; i < n; i++ {
		c, err := dial(ctx, srcDSN, nil)
		if err == nil {
			srcs = append(srcs, c)
			_, err = c.Exec(ctx, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '"+strings.ReplaceAll(snap.name, "'", "''")+"'").ReadAll()
		}
		if err != nil {
			for _, c := range srcs {
				c.Close(context.Background())
			}
			return nil, fmt.Errorf("bootstrap: source: import snapshot %s: %w", snap.name, err)
		}
	}
	return srcs, nil
}

// copyTables copies every table with one worker per source connection
// (each in a transaction using the snapshot) and waits for every row to be
// written.
func copyTables(ctx context.Context, cfg Config, srcs []*pgconn.PgConn, tables []*table, ws *writers, log zerolog.Logger) ([]TableStats, error) {
	jobs := len(srcs)
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	bulk := make([]*originSession, 0, jobs)
	defer func() {
		for _, s := range bulk {
			s.close()
		}
	}()
	for i := 0; i < jobs; i++ {
		s, err := holdOrigin(ctx, cfg.DSN, decode.OriginName(fmt.Sprintf("bootstrap_%d", i+1)), true, writerParams)
		if err != nil {
			return nil, fmt.Errorf("bootstrap: target: %w", err)
		}
		bulk = append(bulk, s)
	}
	if err := truncate(ctx, bulk[0], tables); err != nil {
		return nil, err
	}

	var mu sync.Mutex
	next := 0
	stats := make([]TableStats, len(tables))
	var wg sync.WaitGroup
	for i := 0; i < jobs; i++ {
		wg.Add(1)
		go func(i int) { // worker; owned by copyTables
			defer wg.Done()
			for ctx.Err() == nil {
				mu.Lock()
				k := next
				next++
				mu.Unlock()
				if k >= len(tables) {
					return
				}
				st, err := copyTable(ctx, cfg, srcs[i], bulk[i], tables[k], jobs, ws, log)
				if err != nil {
					cancel(fmt.Errorf("bootstrap: copy %s: %w", tables[k].name(), err))
					return
				}
				stats[k] = st
			}
		}(i)
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		ws.finish()
		return nil, err
	}
	if err := ws.finish(); err != nil {
		return nil, err
	}
	return stats, nil
}

// truncate empties the tables in one transaction tagged with a bootstrap
// origin, so a slot of the target region does not ship the TRUNCATE.
func truncate(ctx context.Context, s *originSession, tables []*table) error {
	names := make([]string, len(tables))
	for i, t := range tables {
		names[i] = t.ident()
	}
	sql := "BEGIN; SELECT pg_replication_origin_xact_setup('0/0', '1970-01-01 00:00:00+00'); TRUNCATE ONLY " + strings.Join(names, ", ") + "; COMMIT"
	if _, err := s.conn.Exec(ctx, sql).ReadAll(); err != nil {
		return fmt.Errorf("bootstrap: empty the target's tables: %w", err)
	}
	return nil
}

// copyTable streams one table from the source's snapshot into the target:
// rows without a known commit time through binary COPY in one transaction
// (epoch commit time), the others through the writers of their origins.
func copyTable(ctx context.Context, cfg Config, src *pgconn.PgConn, tgt *originSession, t *table, jobs int, ws *writers, log zerolog.Logger) (TableStats, error) {
	start := time.Now()
	bulk, bulkDone, err := beginBulkCopy(ctx, tgt, t)
	if err != nil {
		return TableStats{}, err
	}
	c := &tableCopy{t: t, ws: ws, bulk: bulk, source: decode.OriginName(cfg.Source), start: start,
		head: make([]byte, 2), pending: map[string]*pendingRuns{}}
	if cfg.MaxRate > 0 {
		c.rate = float64(cfg.MaxRate) / float64(jobs)
	}
	sp := &splitter{onTuple: func(tp *tuple) error { return c.tuple(ctx, tp) }}
	err = c.stream(ctx, src, sp)
	bulk.CloseWithError(err)
	bulkErr := bulkDone()
	if err != nil {
		return TableStats{}, fmt.Errorf("source: %w", err)
	}
	if bulkErr != nil {
		return TableStats{}, fmt.Errorf("target: %w", bulkErr)
	}
	if _, err := tgt.conn.Exec(ctx, "COMMIT").ReadAll(); err != nil {
		return TableStats{}, fmt.Errorf("target: commit: %w", err)
	}
	st := TableStats{Table: t.name(), Rows: c.rows, Timed: c.timed, Bytes: sp.bytes, Elapsed: time.Since(start)}
	if c.timed > 0 {
		st.Latest = pgEpoch.Add(time.Duration(c.latest) * time.Microsecond)
	}
	log.Info().Str("table", st.Table).Int64("rows", st.Rows).Int64("rows_with_commit_time", st.Timed).
		Float64("mb", float64(st.Bytes)/1e6).Float64("mb_per_s", float64(st.Bytes)/1e6/max(st.Elapsed.Seconds(), 1e-3)).
		Dur("elapsed", st.Elapsed).Msg("table copied")
	return st, nil
}

// beginBulkCopy opens the target transaction, tagged with the epoch commit
// time, and a binary COPY into t fed from the returned pipe. Once the pipe
// is closed, done waits for the COPY and returns its error; the caller
// always calls it.
func beginBulkCopy(ctx context.Context, tgt *originSession, t *table) (bulk *io.PipeWriter, done func() error, err error) {
	if _, err := tgt.conn.Exec(ctx, "BEGIN; SELECT pg_replication_origin_xact_setup('0/0', '1970-01-01 00:00:00+00')").ReadAll(); err != nil {
		return nil, nil, fmt.Errorf("target: %w", err)
	}
	pr, pw := io.Pipe()
	copied := make(chan error, 1)
	go func() { // owned by copyTable, which waits for it through done
		_, err := tgt.conn.CopyFrom(ctx, pr, fmt.Sprintf("COPY %s (%s) FROM STDIN (FORMAT binary)", t.ident(), t.columnList()))
		pr.CloseWithError(fmt.Errorf("target COPY ended: %w", err))
		copied <- err
	}()
	return pw, func() error { return <-copied }, nil
}

// tableCopy is one table's copy in progress: rows without a commit time go
// to the bulk COPY, the others are gathered into runs and handed to the
// writers of their origins.
type tableCopy struct {
	t      *table
	ws     *writers
	bulk   *io.PipeWriter // the binary COPY into the target
	source string         // origin of timed rows that name none
	start  time.Time
	rate   float64 // rows per second for this job; 0: unlimited
	head   []byte  // a tuple's field count, for the bulk COPY

	cur       *run
	curOrigin string
	// Runs are handed to the writers in groups, per origin, so short runs
	// share round trips.
	pending map[string]*pendingRuns

	rows, timed int64
	latest      int64 // PostgreSQL binary timestamptz of the latest timed row
}

// pendingRuns are runs of one origin not handed to its writer yet.
type pendingRuns struct {
	runs        []*run
	rows, bytes int
}

// stream reads the table from the source through sp and writes the bulk
// COPY's header and trailer around it; the caller closes the pipe.
func (c *tableCopy) stream(ctx context.Context, src *pgconn.PgConn, sp *splitter) error {
	if _, err := c.bulk.Write(copyHeader); err != nil {
		return err
	}
	if _, err := src.CopyTo(ctx, sp, c.t.sourceQuery()); err != nil {
		return err
	}
	if err := sp.done(); err != nil {
		return err
	}
	if err := c.flushAll(ctx); err != nil {
		return err
	}
	_, err := c.bulk.Write(copyTrailer)
	return err
}

// tuple takes one row of the source query: commit time, origin, then the
// table's columns.
func (c *tableCopy) tuple(ctx context.Context, tp *tuple) error {
	if len(tp.fields) != len(c.t.columns)+2 {
		return fmt.Errorf("%w: %d fields, want %d", errCopyFormat, len(tp.fields), len(c.t.columns)+2)
	}
	c.rows++
	if err := c.throttle(ctx); err != nil {
		return err
	}
	ts := tp.fields[0]
	if ts == nil || len(ts) != 8 || int64(binary.BigEndian.Uint64(ts)) <= epochMicros {
		binary.BigEndian.PutUint16(c.head, uint16(len(c.t.columns)))
		if _, err := c.bulk.Write(c.head); err != nil {
			return err
		}
		_, err := c.bulk.Write(tp.raw[tp.starts[2]:])
		return err
	}
	return c.addTimed(ctx, ts, tp)
}

// throttle waits, every 100 rows, until the copy is no faster than rate.
func (c *tableCopy) throttle(ctx context.Context) error {
	if c.rate <= 0 || c.rows%100 != 0 {
		return nil
	}
	wait := time.Duration(float64(c.rows)/c.rate*float64(time.Second)) - time.Since(c.start)
	if wait <= 0 {
		return nil
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(wait):
		return nil
	}
}

// addTimed adds a row with a known commit time to the current run, after
// flushing that run when the row does not belong to it or it is full.
func (c *tableCopy) addTimed(ctx context.Context, ts []byte, tp *tuple) error {
	c.timed++
	if us := int64(binary.BigEndian.Uint64(ts)); us > c.latest {
		c.latest = us
	}
	origin := c.source
	if tp.fields[1] != nil {
		origin = string(tp.fields[1])
	}
	if c.cur != nil && (c.curOrigin != origin || !bytes.Equal(c.cur.ts, ts) || len(c.cur.rows) >= maxRunRows || c.cur.size >= maxRunBytes) {
		if err := c.flush(ctx); err != nil {
			return err
		}
	}
	if c.cur == nil {
		c.cur = &run{t: c.t, ts: bytes.Clone(ts)}
		c.curOrigin = origin
	}
	row := make([][]byte, len(c.t.columns))
	for i, f := range tp.fields[2:] {
		if f != nil {
			row[i] = bytes.Clone(f)
			c.cur.size += len(f)
		}
	}
	c.cur.rows = append(c.cur.rows, row)
	return nil
}

// flush ends the current run; its origin's pending runs go to the writer
// once they reach maxRunRows or maxRunBytes.
func (c *tableCopy) flush(ctx context.Context) error {
	if c.cur == nil {
		return nil
	}
	p := c.pending[c.curOrigin]
	if p == nil {
		p = &pendingRuns{}
		c.pending[c.curOrigin] = p
	}
	p.runs = append(p.runs, c.cur)
	p.rows += len(c.cur.rows)
	p.bytes += c.cur.size
	c.cur = nil
	if p.rows < maxRunRows && p.bytes < maxRunBytes {
		return nil
	}
	delete(c.pending, c.curOrigin)
	return c.ws.send(ctx, c.curOrigin, p.runs)
}

// flushAll ends the current run and hands every pending run to its
// writer.
func (c *tableCopy) flushAll(ctx context.Context) error {
	if err := c.flush(ctx); err != nil {
		return err
	}
	for origin, p := range c.pending {
		if err := c.ws.send(ctx, origin, p.runs); err != nil {
			return err
		}
		delete(c.pending, origin)
	}
	return nil
}
