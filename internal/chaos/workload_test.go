package chaos

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/e2e"
	"github.com/prism-cdc/prism-cdc/internal/node"
)

// schema is created in every region. Keys never collide across regions
// except on the pgbench tables and docs, which every region updates, and
// contested, where every region inserts, updates and deletes the same 20
// keys (conflicts resolved by last_write_wins, with tombstones for the
// deletes); scratch is written by region "as" only, so its TRUNCATEs have
// one well-defined outcome.
const schema = `
CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance bigint NOT NULL, filler text);
CREATE TABLE pgbench_tellers (tid int PRIMARY KEY, bid int NOT NULL, tbalance bigint NOT NULL, filler text);
CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int NOT NULL, abalance bigint NOT NULL, filler text);
CREATE TABLE pgbench_history (id text PRIMARY KEY, tid int, bid int, aid int, delta int, mtime timestamptz);
INSERT INTO pgbench_branches SELECT b, 0, '' FROM generate_series(1, 2) b;
INSERT INTO pgbench_tellers SELECT t, 1 + (t - 1) / 10, 0, '' FROM generate_series(1, 20) t;
INSERT INTO pgbench_accounts SELECT a, 1 + (a - 1) / 5000, 0, '' FROM generate_series(1, 10000) a;
CREATE TABLE ledger (id text PRIMARY KEY, region text NOT NULL, writer int NOT NULL, seq int NOT NULL, amount bigint NOT NULL);
CREATE INDEX ledger_writer ON ledger (region, writer, seq);
CREATE TABLE docs (id int PRIMARY KEY, counter bigint NOT NULL, touched_by text NOT NULL, body text NOT NULL);
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
INSERT INTO docs SELECT i, 0, 'seed', (SELECT string_agg(md5(i::text || '/' || g::text), '') FROM generate_series(1, 6250) g)
  FROM generate_series(1, 6) i;
CREATE TABLE items (id text PRIMARY KEY, region text NOT NULL, payload text NOT NULL);
CREATE TABLE scratch (id int PRIMARY KEY, v text NOT NULL);
CREATE TABLE bulk (id bigint PRIMARY KEY, region text NOT NULL, v int NOT NULL);
CREATE TABLE contested (id int PRIMARY KEY, v text NOT NULL, region text NOT NULL);
INSERT INTO contested SELECT g, 'seed', 'seed' FROM generate_series(1, 20) g;
`

// skewRegion's database runs skewOffset ahead of the others (see
// skewClock for why by seconds, not minutes).
const (
	skewRegion = "eu"
	skewOffset = "+20s"
)

// scratchRegion is the only region that writes (and truncates) scratch.
const scratchRegion = "as"

// write is one acknowledged ledger write.
type write struct {
	seq int
	// upper is pg_current_wal_insert_lsn() read on the source right after
	// the commit returned: the commit's end LSN is at or below it. Zero
	// when it could not be read.
	upper pglogrepl.LSN
	at    time.Time
}

// ledgerWriter is one client connection of one region. Every write is one
// transaction: a pgbench tpcb-like update (accounts, tellers, branches,
// history) plus one ledger row of its own.
type ledgerWriter struct {
	region string
	id     int

	mu        sync.Mutex
	acked     []write // in seq order
	ambiguous []int   // commit errored: may or may not have committed
	failed    []int   // errored before COMMIT: must not exist anywhere
}

func ledgerID(region string, writer, seq int) string {
	return fmt.Sprintf("%s-%d-%07d", region, writer, seq)
}

// snapshot returns copies of the writer's records.
func (w *ledgerWriter) snapshot() (acked []write, ambiguous, failed []int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]write(nil), w.acked...), append([]int(nil), w.ambiguous...), append([]int(nil), w.failed...)
}

// upTo returns the highest seq among acknowledged writes whose upper bound
// is at or below lsn, how many acknowledged writes have a seq at or below
// it, and the ambiguous seqs (to exclude from a count).
func (w *ledgerWriter) upTo(lsn pglogrepl.LSN) (seq, n int, amb []int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	// upper grows with seq (one connection, one commit after the other);
	// writes without an upper bound are skipped.
	for i := len(w.acked) - 1; i >= 0; i-- {
		if u := w.acked[i].upper; u != 0 && u <= lsn {
			return w.acked[i].seq, i + 1, append([]int(nil), w.ambiguous...)
		}
	}
	return 0, 0, nil
}

// firstAfter returns when the first acknowledged write with a seq above
// seq was acknowledged.
func (w *ledgerWriter) firstAfter(seq int) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	i := sort.Search(len(w.acked), func(i int) bool { return w.acked[i].seq > seq })
	if i == len(w.acked) {
		return time.Time{}, false
	}
	return w.acked[i].at, true
}

// run writes until ctx is done, reconnecting while the region's database
// is down.
func (w *ledgerWriter) run(ctx context.Context, d *e2e.Deployment, rng *rand.Rand, every time.Duration) {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	for seq := 1; ctx.Err() == nil; {
		if conn == nil {
			c, err := d.Clusters[w.region].Connect(ctx, "app")
			if err != nil {
				pause(ctx, 100*time.Millisecond)
				continue
			}
			conn = c
		}
		aid, tid, delta := 1+rng.Intn(10000), 1+rng.Intn(20), rng.Intn(9999)-4999
		ambiguous, err := w.one(ctx, conn, seq, aid, tid, delta)
		if err != nil {
			if ctx.Err() != nil && !ambiguous {
				return
			}
			w.mu.Lock()
			if ambiguous {
				w.ambiguous = append(w.ambiguous, seq)
			} else {
				w.failed = append(w.failed, seq)
			}
			w.mu.Unlock()
			conn.Close(context.Background())
			conn = nil
			seq++
			continue
		}
		wr := write{seq: seq, at: time.Now()}
		var upper pglogrepl.LSN
		if err := conn.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()").Scan(&upper); err == nil {
			wr.upper = upper
		}
		w.mu.Lock()
		w.acked = append(w.acked, wr)
		w.mu.Unlock()
		seq++
		pause(ctx, every)
	}
}

// one runs one write; ambiguous reports that the error came from COMMIT,
// so the write may have committed.
func (w *ledgerWriter) one(ctx context.Context, conn *pgx.Conn, seq, aid, tid, delta int) (ambiguous bool, err error) {
	id := ledgerID(w.region, w.id, seq)
	tx, err := conn.Begin(ctx)
	if err != nil {
		return false, err
	}
	defer tx.Rollback(context.Background())
	bid := 1 + (tid-1)/10
	stmts := []struct {
		sql  string
		args []any
	}{
		{"UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2", []any{delta, aid}},
		{"UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2", []any{delta, tid}},
		{"UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2", []any{delta, bid}},
		{"INSERT INTO pgbench_history VALUES ($1, $2, $3, $4, $5, now())", []any{id, tid, bid, aid, delta}},
		{"INSERT INTO ledger VALUES ($1, $2, $3, $4, $5)", []any{id, w.region, w.id, seq, delta}},
	}
	for _, s := range stmts {
		if _, err := tx.Exec(ctx, s.sql, s.args...); err != nil {
			return false, err
		}
	}
	// The commit runs to its end even when the run stops meanwhile, so a
	// stop never leaves a write whose fate is unknown.
	if err := tx.Commit(context.WithoutCancel(ctx)); err != nil {
		return true, err
	}
	return false, nil
}

func pause(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// client runs op for region over one connection until ctx ends, waiting
// wait() before each call (n counts the calls). A failed call costs the
// connection (reconnected next time); every call that succeeded is
// counted in ops. Errors are expected while faults run; what committed is
// compared across regions at the end.
func client(ctx context.Context, d *e2e.Deployment, region string, ops *atomic.Int64, wait func() time.Duration, op func(conn *pgx.Conn, n int) error) {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	for n := 0; ctx.Err() == nil; n++ {
		pause(ctx, wait())
		if conn == nil {
			c, err := d.Clusters[region].Connect(ctx, "app")
			if err != nil {
				pause(ctx, 100*time.Millisecond)
				continue
			}
			conn = c
		}
		err := op(conn, n)
		if ctx.Err() == nil {
			clients.add(region, err)
		}
		if err != nil {
			if !errors.Is(err, context.Canceled) {
				conn.Close(context.Background())
				conn = nil
			}
			continue
		}
		ops.Add(1)
	}
}

// clients counts the workload clients' writes and errors per region
// (reset by the tests that report it): a region whose clients stop
// writing, or fail, shows in the failure message of a test that does
// not converge.
var clients tally

type tally struct {
	mu   sync.Mutex
	ok   map[string]int
	errs map[string]map[string]int
}

func (t *tally) reset() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.ok, t.errs = map[string]int{}, map[string]map[string]int{}
}

func (t *tally) add(region string, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ok == nil {
		t.ok, t.errs = map[string]int{}, map[string]map[string]int{}
	}
	if err == nil {
		t.ok[region]++
		return
	}
	msg := err.Error()
	if len(msg) > 120 {
		msg = msg[:120]
	}
	if t.errs[region] == nil {
		t.errs[region] = map[string]int{}
	}
	t.errs[region][msg]++
}

// String is one line per region: its writes, then its errors by message.
func (t *tally) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var regions []string
	for r := range t.ok {
		regions = append(regions, r)
	}
	for r := range t.errs {
		if _, ok := t.ok[r]; !ok {
			regions = append(regions, r)
		}
	}
	sort.Strings(regions)
	var b strings.Builder
	for _, r := range regions {
		fmt.Fprintf(&b, "%s: %d writes", r, t.ok[r])
		for msg, n := range t.errs[r] {
			fmt.Fprintf(&b, "; %d x %s", n, msg)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// misc runs the other writes of one region: TOAST rows updated in other
// columns, inserts and deletes, and (region "as" only) a table that is
// truncated now and then.
func misc(ctx context.Context, d *e2e.Deployment, region string, rng *rand.Rand, ops *atomic.Int64) {
	wait := func() time.Duration { return time.Duration(20+rng.Intn(40)) * time.Millisecond }
	client(ctx, d, region, ops, wait, func(conn *pgx.Conn, n int) error {
		var err error
		switch k := rng.Intn(10); {
		case k < 3:
			_, err = conn.Exec(ctx, "UPDATE docs SET counter = counter + 1, touched_by = $1 WHERE id = $2", region, 1+rng.Intn(6))
		case k < 6:
			_, err = conn.Exec(ctx, "INSERT INTO items VALUES ($1, $2, $3)", fmt.Sprintf("%s-%08d", region, n), region, fmt.Sprint(rng.Int63()))
		case k < 8:
			_, err = conn.Exec(ctx, `DELETE FROM items WHERE id IN (SELECT id FROM items WHERE region = $1 ORDER BY id LIMIT 2)
				AND (SELECT count(*) FROM items WHERE region = $1) > 10`, region)
		case region == scratchRegion && k == 8:
			_, err = conn.Exec(ctx, "INSERT INTO scratch SELECT g, md5(g::text) FROM generate_series($1::int, $1::int + 49) g", n*50)
		case region == scratchRegion && rng.Intn(6) == 0:
			_, err = conn.Exec(ctx, "TRUNCATE scratch")
		default:
			_, err = conn.Exec(ctx, "UPDATE items SET payload = payload || 'x' WHERE id = (SELECT max(id) FROM items WHERE region = $1)", region)
		}
		return err
	})
}

// contested writes the 20 keys of table contested from every region:
// upserts, updates and deletes of random keys, so that concurrent writes
// to one key from several regions (update against delete, re-insert
// against delete) meet all the time.
func contested(ctx context.Context, d *e2e.Deployment, region string, rng *rand.Rand, ops *atomic.Int64) {
	wait := func() time.Duration { return time.Duration(30+rng.Intn(60)) * time.Millisecond }
	client(ctx, d, region, ops, wait, func(conn *pgx.Conn, n int) error {
		id := 1 + rng.Intn(20)
		v := fmt.Sprintf("%s-%d", region, n)
		var err error
		switch k := rng.Intn(10); {
		case k < 4:
			_, err = conn.Exec(ctx, "INSERT INTO contested VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, region = EXCLUDED.region", id, v, region)
		case k < 7:
			_, err = conn.Exec(ctx, "UPDATE contested SET v = $2, region = $3 WHERE id = $1", id, v, region)
		default:
			_, err = conn.Exec(ctx, "DELETE FROM contested WHERE id = $1", id)
		}
		return err
	})
}

// bulkInsert inserts rows rows into bulk in one transaction on region,
// with keys from base up. It reports whether the commit returned; an
// error from COMMIT leaves it ambiguous (the caller checks the region).
func bulkInsert(ctx context.Context, d *e2e.Deployment, region string, base int64, rows int) error {
	conn, err := d.Clusters[region].Connect(ctx, "app")
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, "INSERT INTO bulk SELECT $1::bigint + g, $2, g FROM generate_series(1, $3::int) g", base, region, rows)
	return err
}

func logf(t *testing.T, format string, args ...any) {
	t.Helper()
	t.Logf("%s "+format, append([]any{time.Now().Format("15:04:05.000")}, args...)...)
}

// waitReaders waits until every region's slot exists and is read: writes
// committed before a region's slot exists are never replicated.
func waitReaders(d *e2e.Deployment) {
	d.Eventually(90*time.Second, "one reader per region", func() bool {
		for _, r := range d.Regions {
			ok := false
			for _, n := range d.Nodes(r) {
				ok = ok || d.Role(n) == node.RoleReader
			}
			if !ok {
				return false
			}
		}
		return true
	})
}
