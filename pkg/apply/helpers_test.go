package apply

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func newPool(t testing.TB, ctx context.Context, c *pgtest.Cluster, db string) *pgxpool.Pool {
	t.Helper()
	pool, err := NewPool(ctx, c.DSN(db))
	if err != nil {
		t.Fatalf("pool: %v", err)
	}
	t.Cleanup(pool.Close)
	return pool
}

func newApplier(t testing.TB, ctx context.Context, c *pgtest.Cluster, db string, opts ...Option) *Applier {
	t.Helper()
	a := NewApplier(newPool(t, ctx, c, db), zerolog.Nop(), opts...)
	t.Cleanup(a.Close)
	return a
}

func mustExec(t testing.TB, ctx context.Context, c *pgtest.Cluster, db, sql string) {
	t.Helper()
	if err := c.Exec(ctx, db, sql); err != nil {
		t.Fatalf("exec %q: %v", sql, err)
	}
}

// queryString returns the single text value of a query (NULL as "<null>").
func queryString(t testing.TB, ctx context.Context, pool *pgxpool.Pool, sql string, args ...any) string {
	t.Helper()
	var s *string
	if err := pool.QueryRow(ctx, sql, args...).Scan(&s); err != nil {
		t.Fatalf("query %q: %v", sql, err)
	}
	if s == nil {
		return "<null>"
	}
	return *s
}

// tableRows returns all rows of table as JSON text lines ordered by their
// text form, so two databases can be compared.
func tableRows(t testing.TB, ctx context.Context, pool *pgxpool.Pool, table string) string {
	t.Helper()
	return queryString(t, ctx, pool, fmt.Sprintf(
		"SELECT coalesce(string_agg(r::text, E'\\n' ORDER BY r::text), '') FROM (SELECT row_to_json(x) AS r FROM %s x) s", table))
}

// rel builds a relation; key columns are marked with a trailing '*'.
func rel(schema, table string, identity byte, cols ...string) *decode.Relation {
	r := &decode.Relation{ID: 1, Schema: schema, Table: table, ReplicaIdentity: identity}
	for _, c := range cols {
		key := strings.HasSuffix(c, "*")
		r.Columns = append(r.Columns, decode.Column{Name: strings.TrimSuffix(c, "*"), Key: key || identity == decode.IdentityFull})
	}
	return r
}

// vals builds a row: "\\N" is NULL, "\\U" is an unchanged TOASTed value.
func vals(vs ...string) []decode.Value {
	out := make([]decode.Value, len(vs))
	for i, v := range vs {
		switch v {
		case `\N`:
			out[i] = decode.Value{Kind: decode.ValueNull}
		case `\U`:
			out[i] = decode.Value{Kind: decode.ValueUnchanged}
		default:
			out[i] = decode.Value{Kind: decode.ValueText, Data: []byte(v)}
		}
	}
	return out
}

func ins(r *decode.Relation, v ...string) decode.Change {
	return decode.Change{Op: decode.OpInsert, Rel: r, New: vals(v...)}
}

func upd(r *decode.Relation, old []decode.Value, v ...string) decode.Change {
	return decode.Change{Op: decode.OpUpdate, Rel: r, Old: old, New: vals(v...)}
}

func del(r *decode.Relation, old ...string) decode.Change {
	return decode.Change{Op: decode.OpDelete, Rel: r, Old: vals(old...)}
}

var baseTime = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

// txn builds a transaction of origin ending at lsn, committed at
// baseTime + sec seconds.
func txn(origin string, lsn uint64, sec float64, changes ...decode.Change) *decode.Txn {
	return &decode.Txn{
		Origin:     origin,
		CommitLSN:  pglogrepl.LSN(lsn - 8),
		EndLSN:     pglogrepl.LSN(lsn),
		CommitTime: baseTime.Add(time.Duration(sec * float64(time.Second))),
		Changes:    changes,
	}
}

func decodeLSN(v uint64) pglogrepl.LSN { return pglogrepl.LSN(v) }

// localTxn begins a transaction on a connection of its own (a local
// writer), runs sql in it and returns it open; the connection closes
// when the test ends.
func localTxn(t *testing.T, ctx context.Context, c *pgtest.Cluster, sql string) pgx.Tx {
	t.Helper()
	conn, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatalf("begin: %v", err)
	}
	if _, err := tx.Exec(ctx, sql); err != nil {
		t.Fatalf("local %s: %v", sql, err)
	}
	return tx
}

// batchResult is what ApplyBatch returned.
type batchResult struct {
	n   int
	err error
}

// applyUntilLocked runs ApplyBatch(txns) in the background and returns once
// its session waits for a lock (a local transaction holds one); the
// channel then gets its result. It fails the test if ApplyBatch returns
// first.
func applyUntilLocked(t *testing.T, ctx context.Context, a *Applier, txns []*decode.Txn) <-chan batchResult {
	t.Helper()
	return runUntilLocked(t, ctx, a, txns[0].Origin, func() (int, error) { return a.ApplyBatch(ctx, txns) })
}

// runUntilLocked runs fn in the background and returns once a's session
// holding the origin of source waits for a lock (a local transaction
// holds one); the channel then gets fn's result. It fails the test if fn
// returns first. pg_stat_activity is asked through a's pool, outside any
// local transaction: within one it stays as the transaction first read it.
func runUntilLocked(t *testing.T, ctx context.Context, a *Applier, source string, fn func() (int, error)) <-chan batchResult {
	t.Helper()
	done := make(chan batchResult, 1)
	go func() {
		n, err := fn()
		done <- batchResult{n, err}
	}()
	for {
		var waiting bool
		if err := a.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
			WHERE application_name = $1 AND wait_event_type = 'Lock')`, a.appName+"_"+source).Scan(&waiting); err != nil {
			t.Fatalf("pg_stat_activity: %v", err)
		}
		if waiting {
			return done
		}
		select {
		case r := <-done:
			t.Fatalf("%d, %v before the local transaction ended", r.n, r.err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}
