package apply

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// seqTxns returns n transactions of origin, each inserting one row
// (first+i) into log, a table without key where a second apply would show
// as a duplicate row.
func seqTxns(origin string, first, n int) []*decode.Txn {
	r := rel("public", "log", decode.IdentityFull, "n", "origin")
	out := make([]*decode.Txn, n)
	for i := range out {
		k := first + i
		out[i] = txn(origin, uint64(1000+100*k), float64(k), ins(r, fmt.Sprint(k), origin))
	}
	return out
}

func countLog(t *testing.T, ctx context.Context, a *Applier, origin string) (rows, distinct int) {
	t.Helper()
	if err := a.pool.QueryRow(ctx, "SELECT count(*), count(DISTINCT n) FROM log WHERE origin = $1", origin).Scan(&rows, &distinct); err != nil {
		t.Fatalf("count log: %v", err)
	}
	return rows, distinct
}

func TestExactlyOnce(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "once"})
	mustExec(t, ctx, c, "postgres", "CREATE TABLE log (n int, origin text); ALTER TABLE log REPLICA IDENTITY FULL")
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))

	t.Run("replay applies nothing twice", func(t *testing.T) {
		if p, err := a.Progress(ctx, "r1"); err != nil || p != 0 {
			t.Fatalf("Progress before = %s, %v; want 0", p, err)
		}
		txns := seqTxns("r1", 0, 10)
		if n, err := a.ApplyBatch(ctx, txns[:6]); n != 6 || err != nil {
			t.Fatalf("ApplyBatch = %d, %v", n, err)
		}
		// Overlapping replay: 0..5 are skipped, 6..9 applied.
		if n, err := a.ApplyBatch(ctx, txns); n != 10 || err != nil {
			t.Fatalf("ApplyBatch replay = %d, %v", n, err)
		}
		for _, tx := range txns {
			if err := a.Apply(ctx, tx); err != nil {
				t.Fatalf("Apply replay: %v", err)
			}
		}
		if rows, distinct := countLog(t, ctx, a, "r1"); rows != 10 || distinct != 10 {
			t.Fatalf("log has %d rows (%d distinct), want 10", rows, distinct)
		}
		if p, err := a.Progress(ctx, "r1"); err != nil || p != txns[9].EndLSN {
			t.Fatalf("Progress = %s, %v; want %s", p, err, txns[9].EndLSN)
		}
		// Commit timestamps are the source's.
		got := queryString(t, ctx, a.pool, "SELECT max(pg_xact_commit_timestamp(xmin))::text FROM log WHERE origin = 'r1'")
		want := queryString(t, ctx, a.pool, "SELECT $1::timestamptz::text", txns[9].CommitTime)
		if got != want {
			t.Fatalf("commit timestamp = %s, want %s", got, want)
		}
	})

	t.Run("connection killed after commit", func(t *testing.T) {
		txns := seqTxns("r2", 0, 3)
		watch := newPool(t, ctx, c, "postgres")
		var hookErr error
		a.testAfterSend = func(pid uint32) {
			// Wait until the commit is durable, then kill the session before
			// the applier reads the reply.
			deadline := time.Now().Add(30 * time.Second)
			for {
				var p *string
				if err := watch.QueryRow(ctx, "SELECT pg_replication_origin_progress('prism_r2', true)::text").Scan(&p); err != nil {
					hookErr = err
					return
				}
				if p != nil {
					if lsn, _ := pglogrepl.ParseLSN(*p); lsn == txns[2].EndLSN {
						break
					}
				}
				if time.Now().After(deadline) {
					hookErr = errors.New("commit never became visible")
					return
				}
				time.Sleep(5 * time.Millisecond)
			}
			var ok bool
			hookErr = watch.QueryRow(ctx, "SELECT pg_terminate_backend($1, 5000)", int(pid)).Scan(&ok)
		}
		n, err := a.ApplyBatch(ctx, txns)
		a.testAfterSend = nil
		if hookErr != nil {
			t.Fatalf("hook: %v", hookErr)
		}
		if err != nil && !IsRetryable(err) {
			t.Fatalf("ApplyBatch with killed session = %d, %v; want success or a retryable error", n, err)
		}
		// The caller did not see (or did not trust) the reply: replay. The
		// pool may hand out the killed connection first; the applier
		// retries that itself.
		if n, err := a.ApplyBatch(ctx, txns); n != 3 || err != nil {
			t.Fatalf("replay = %d, %v", n, err)
		}
		if rows, distinct := countLog(t, ctx, a, "r2"); rows != 3 || distinct != 3 {
			t.Fatalf("log has %d rows (%d distinct), want 3", rows, distinct)
		}
		if p, err := a.Progress(ctx, "r2"); err != nil || p != txns[2].EndLSN {
			t.Fatalf("Progress = %s, %v; want %s", p, err, txns[2].EndLSN)
		}
	})

	t.Run("busy origin and fence", func(t *testing.T) {
		holder, err := c.Connect(ctx, "postgres")
		if err != nil {
			t.Fatal(err)
		}
		defer holder.Close(context.Background())
		if _, err := holder.Exec(ctx, "SELECT pg_replication_origin_create('prism_r3')"); err != nil {
			t.Fatal(err)
		}
		if _, err := holder.Exec(ctx, "BEGIN"); err != nil {
			t.Fatal(err)
		}
		if _, err := holder.Exec(ctx, "SELECT pg_replication_origin_session_setup('prism_r3')"); err != nil {
			t.Fatal(err)
		}
		txns := seqTxns("r3", 0, 2)
		err = a.Apply(ctx, txns[0])
		var ae *Error
		if !errors.Is(err, ErrBusy) || !IsRetryable(err) || !errors.As(err, &ae) || ae.SQLState != "55006" {
			t.Fatalf("Apply while held = %v; want retryable ErrBusy with SQLSTATE 55006", err)
		}
		n, err := a.Fence(ctx, "r3")
		if n != 1 || err != nil {
			t.Fatalf("Fence = %d, %v; want 1, nil", n, err)
		}
		if _, err := holder.Exec(ctx, "SELECT 1"); err == nil {
			t.Fatalf("fenced session still works")
		}
		if n, err := a.ApplyBatch(ctx, txns); n != 2 || err != nil {
			t.Fatalf("ApplyBatch after fence = %d, %v", n, err)
		}
		// Nobody holds it now: fencing is a no-op.
		if n, err := a.Fence(ctx, "r3"); n != 0 || err != nil {
			t.Fatalf("Fence of a free origin = %d, %v; want 0, nil", n, err)
		}
		if n, err := a.Fence(ctx, "never-seen"); n != 0 || err != nil {
			t.Fatalf("Fence of a missing origin = %d, %v; want 0, nil", n, err)
		}
		// ... without asking the server for it, an ERROR in its log.
		if log, err := os.ReadFile(c.LogFile()); err != nil || strings.Contains(string(log), `"prism_never-seen" does not exist`) {
			t.Errorf("server log (%v) has a missing origin asked for:\n%s", err, log)
		}
	})

	t.Run("fence spares a bootstrap", func(t *testing.T) {
		// A bootstrap holds origins on purpose; killing its session made
		// the source's progress unreadable under load.
		holder, err := c.Connect(ctx, "postgres")
		if err != nil {
			t.Fatal(err)
		}
		defer holder.Close(context.Background())
		if _, err := holder.Exec(ctx, "SET application_name = '"+BootstrapApplicationName+"'; SELECT pg_replication_origin_create('prism_r5'); SELECT pg_replication_origin_session_setup('prism_r5')"); err != nil {
			t.Fatal(err)
		}
		if n, err := a.Fence(ctx, "r5"); n != 0 || !errors.Is(err, ErrBusy) {
			t.Fatalf("Fence of a bootstrap session = %d, %v; want 0, ErrBusy", n, err)
		}
		if _, err := holder.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatalf("the bootstrap session was fenced: %v", err)
		}
		if _, err := holder.Exec(ctx, "SELECT pg_replication_origin_session_reset()"); err != nil {
			t.Fatal(err)
		}
		if n, err := a.ApplyBatch(ctx, seqTxns("r5", 0, 2)); n != 2 || err != nil {
			t.Fatalf("ApplyBatch once the bootstrap let go = %d, %v", n, err)
		}
	})

	t.Run("racing appliers", func(t *testing.T) {
		const total = 60
		txns := seqTxns("r4", 0, total)
		appliers := []*Applier{a, newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))}
		var wg sync.WaitGroup
		errs := make([]error, len(appliers))
		busy := make([]int, len(appliers))
		for w, ap := range appliers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewSource(int64(w + 1)))
				deadline := time.Now().Add(60 * time.Second)
				next := 0
				for next < total {
					if time.Now().After(deadline) {
						errs[w] = fmt.Errorf("applier %d stuck at %d", w, next)
						return
					}
					end := min(total, next+1+rng.Intn(5))
					n, err := ap.ApplyBatch(ctx, txns[next:end])
					next += n
					if err != nil {
						if !IsRetryable(err) {
							errs[w] = err
							return
						}
						if errors.Is(err, ErrBusy) {
							busy[w]++
						}
					}
				}
			}()
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if rows, distinct := countLog(t, ctx, a, "r4"); rows != total || distinct != total {
			t.Fatalf("log has %d rows (%d distinct), want %d", rows, distinct, total)
		}
		t.Logf("busy retries: %v", busy)
	})
}

func TestErrorClassification(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "errs"})
	mustExec(t, ctx, c, "postgres", `
		CREATE TABLE chk (id int PRIMARY KEY, v int CHECK (v > 0));
		CREATE TABLE uniq (id int PRIMARY KEY, email text UNIQUE);
		INSERT INTO uniq VALUES (1, 'a@example.com');
		CREATE TABLE lockme (id int PRIMARY KEY, v int);
		INSERT INTO lockme VALUES (1, 1);
	`)
	a := newApplier(t, ctx, c, "postgres")
	chk := rel("public", "chk", decode.IdentityDefault, "id*", "v")
	uniq := rel("public", "uniq", decode.IdentityDefault, "id*", "email")
	for _, tc := range []struct {
		name  string
		txn   *decode.Txn
		state string
		table string
	}{
		{"check violation", txn("e1", 1000, 1, ins(chk, "1", "5"), ins(chk, "2", "-1")), "23514", "public.chk"},
		{"unique violation", txn("e1", 1000, 1, ins(uniq, "2", "a@example.com")), "23505", "public.uniq"},
		{"bad value", txn("e1", 1000, 1, ins(chk, "3", "many")), "22P02", "public.chk"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := a.Apply(ctx, tc.txn)
			var ae *Error
			if !errors.As(err, &ae) || ae.Retryable || IsRetryable(err) || ae.SQLState != tc.state || ae.Table != tc.table ||
				ae.Op != decode.OpInsert || ae.Origin != "e1" || ae.EndLSN != tc.txn.EndLSN {
				t.Fatalf("Apply = %#v (%v); want permanent %s on %s", err, err, tc.state, tc.table)
			}
			if p, err := a.Progress(ctx, "e1"); err != nil || p != 0 {
				t.Fatalf("Progress after failure = %s, %v; want 0", p, err)
			}
		})
	}
	if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM chk"); got != "0" {
		t.Fatalf("chk has %s rows after failed transactions, want 0", got)
	}

	t.Run("failure inside a batch", func(t *testing.T) {
		txns := []*decode.Txn{
			txn("b1", 1000, 1, ins(chk, "10", "1")),
			txn("b1", 1100, 2, ins(chk, "11", "1"), ins(chk, "12", "-1")),
			txn("b1", 1200, 3, ins(chk, "13", "1")),
		}
		n, err := a.ApplyBatch(ctx, txns)
		var ae *Error
		if n != 1 || !errors.As(err, &ae) || ae.EndLSN != txns[1].EndLSN || ae.SQLState != "23514" {
			t.Fatalf("ApplyBatch = %d, %v; want 1 and 23514 about the second transaction", n, err)
		}
		if got := queryString(t, ctx, a.pool, "SELECT string_agg(id::text, ',' ORDER BY id) FROM chk"); got != "10" {
			t.Fatalf("chk ids = %s, want 10", got)
		}
		if p, err := a.Progress(ctx, "b1"); err != nil || p != txns[0].EndLSN {
			t.Fatalf("Progress = %s, %v; want %s", p, err, txns[0].EndLSN)
		}
	})

	t.Run("large transaction spans pipelines", func(t *testing.T) {
		const rows = 3 * maxPipelineCmds
		changes := make([]decode.Change, 0, rows+1)
		for i := 0; i < rows; i++ {
			changes = append(changes, ins(chk, fmt.Sprint(1000+i), "1"))
		}
		bad := txn("big", 1000, 1, append(changes, ins(chk, "999999", "-1"))...)
		if err := a.Apply(ctx, bad); err == nil || IsRetryable(err) {
			t.Fatalf("Apply of a large failing transaction = %v; want a permanent error", err)
		}
		if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM chk WHERE id >= 1000"); got != "0" {
			t.Fatalf("%s rows of the failed large transaction are visible", got)
		}
		good := txn("big", 1000, 1, changes...)
		if err := a.Apply(ctx, good); err != nil {
			t.Fatalf("Apply large: %v", err)
		}
		if got := queryString(t, ctx, a.pool, "SELECT count(*)::text FROM chk WHERE id >= 1000"); got != fmt.Sprint(rows) {
			t.Fatalf("%s rows applied, want %d", got, rows)
		}
	})

	t.Run("killed connection", func(t *testing.T) {
		locker, err := c.Connect(ctx, "postgres")
		if err != nil {
			t.Fatal(err)
		}
		defer locker.Close(context.Background())
		if _, err := locker.Exec(ctx, "BEGIN; SELECT * FROM lockme WHERE id = 1 FOR UPDATE"); err != nil {
			t.Fatal(err)
		}
		lockme := rel("public", "lockme", decode.IdentityDefault, "id*", "v")
		tx := txn("k1", 1000, 1, upd(lockme, nil, "1", "2"))
		tx.CommitTime = time.Now().Add(time.Hour) // newer than the local row: no conflict
		done := make(chan error, 1)
		go func() { done <- a.Apply(ctx, tx) }()
		// Find the applier session waiting for the row lock and kill it.
		deadline := time.Now().Add(30 * time.Second)
		for {
			var killed bool
			err := a.pool.QueryRow(ctx, `SELECT coalesce(bool_or(pg_terminate_backend(pid)), false) FROM pg_stat_activity
				WHERE application_name = 'prism_apply_k1' AND wait_event_type = 'Lock'`).Scan(&killed)
			if err != nil {
				t.Fatal(err)
			}
			if killed {
				break
			}
			if time.Now().After(deadline) {
				t.Log(queryString(t, ctx, a.pool, "SELECT string_agg(format('%s %s %s %s %s', pid, application_name, state, wait_event_type, query), E'\n') FROM pg_stat_activity"))
				t.Fatal("applier session never waited for the lock")
			}
			time.Sleep(5 * time.Millisecond)
		}
		err = <-done
		if err == nil || !IsRetryable(err) {
			t.Fatalf("Apply on killed connection = %v; want a retryable error", err)
		}
		if _, err := locker.Exec(ctx, "COMMIT"); err != nil {
			t.Fatal(err)
		}
		// pg_terminate_backend only signals: the killed backend holds the
		// origin until it has exited (a retry before that gets ErrBusy,
		// which callers retry). Wait for it, as a caller's backoff would.
		for deadline := time.Now().Add(30 * time.Second); queryString(t, ctx, a.pool,
			"SELECT count(*)::text FROM pg_stat_activity WHERE application_name = 'prism_apply_k1'") != "0"; {
			if time.Now().After(deadline) {
				t.Fatal("the killed apply backend did not exit")
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err := a.Apply(ctx, tx); err != nil {
			t.Fatalf("retry: %v", err)
		}
		if got := queryString(t, ctx, a.pool, "SELECT v::text FROM lockme WHERE id = 1"); got != "2" {
			t.Fatalf("lockme.v = %s, want 2", got)
		}
	})
}

// TestFailedTxnKeepsProgress: a transaction that fails after it wrote a
// row, alone, in a pipeline after a committed one, or as a batch that
// rolls back, leaves the origin's progress where the last committed one
// put it, on PostgreSQL 15 and 16 alike. (From 16 on, a transaction
// that aborts after pg_replication_origin_xact_setup and a write moves
// the progress: the setup has to come last.) Then the corrected
// transactions apply, none skipped.
func TestFailedTxnKeepsProgress(t *testing.T) {
	for _, v := range pgtest.Servers() {
		t.Run(v.Name, func(t *testing.T) {
			ctx := testCtx(t)
			c := pgtest.Start(t, pgtest.Options{Name: "keepprogress", Bin: v.Bin(t)})
			mustExec(t, ctx, c, "postgres", `CREATE TABLE chk (id int PRIMARY KEY, v int CHECK (v > 0));
				CREATE TABLE kv (id int PRIMARY KEY, v text);
				INSERT INTO kv SELECT g, 'old' FROM generate_series(1, 4) g;
				CREATE TABLE late (id int PRIMARY KEY, v int, CONSTRAINT late_v CHECK (v > 0));
				CREATE FUNCTION late_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.v = 99 THEN RAISE EXCEPTION 'deferred failure'; END IF; RETURN NULL; END $$;
				CREATE CONSTRAINT TRIGGER late_fail AFTER INSERT ON late DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION late_fail();
				ALTER TABLE late ENABLE ALWAYS TRIGGER late_fail;`)
			a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
			defer a.Close()
			chk := rel("public", "chk", decode.IdentityDefault, "id*", "v")
			kv := rel("public", "kv", decode.IdentityDefault, "id*", "v")
			late := rel("public", "late", decode.IdentityDefault, "id*", "v")
			progress := func(want pglogrepl.LSN) {
				t.Helper()
				if p, err := a.Progress(ctx, "na"); err != nil || p != want {
					t.Fatalf("Progress = %s, %v; want %s", p, err, want)
				}
			}
			// Alone: a row written, the next one fails.
			if err := a.Apply(ctx, txn("na", 1000, 1, ins(chk, "1", "5"), ins(chk, "2", "-1"))); err == nil {
				t.Fatal("Apply of a failing transaction = nil")
			}
			progress(0)
			// In a pipeline after a committed one.
			if n, err := a.ApplyBatch(ctx, []*decode.Txn{txn("na", 1000, 1, ins(chk, "1", "5")),
				txn("na", 1100, 2, ins(chk, "2", "5"), ins(chk, "3", "-1"))}); n != 1 || err == nil {
				t.Fatalf("ApplyBatch = %d, %v; want 1 and an error", n, err)
			}
			progress(1000)
			// A deferred trigger that fails at the end of the transaction.
			if err := a.Apply(ctx, txn("na", 1100, 2, ins(late, "1", "99"))); err == nil {
				t.Fatal("Apply of a transaction whose deferred trigger fails = nil")
			}
			progress(1000)
			// A batch rolled back (a row is missing: the row path decides
			// it); its transactions then apply by rows, none skipped.
			mustExec(t, ctx, c, "postgres", "DELETE FROM kv WHERE id = 4")
			before := a.Stats()["na"].RolledBack
			t0 := time.Now().Add(time.Hour).Sub(baseTime).Seconds()
			txns := []*decode.Txn{
				txn("na", 1100, t0, upd(kv, nil, "1", "a")),
				txn("na", 1200, t0+1, upd(kv, nil, "2", "b")),
				txn("na", 1300, t0+2, upd(kv, nil, "4", "d")),
			}
			if n, err := a.ApplyBatch(ctx, txns); n != len(txns) || err != nil {
				t.Fatalf("ApplyBatch = %d, %v", n, err)
			}
			if st := a.Stats()["na"]; st.RolledBack != before+1 {
				t.Fatalf("stats %+v, want one more batch rolled back than %d", st, before)
			}
			progress(1300)
			if got := tableRows(t, ctx, a.pool, "(SELECT id, v FROM kv WHERE id <= 3)"); got != `{"id":1,"v":"a"}`+"\n"+`{"id":2,"v":"b"}`+"\n"+`{"id":3,"v":"old"}` {
				t.Fatalf("kv = %s", got)
			}
		})
	}
}
