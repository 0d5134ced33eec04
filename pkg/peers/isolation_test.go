package peers

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// policyHandler carries out one apply error policy on the real Applier
// the way a node's on_apply_error does (halt records the transaction,
// dead_letter and undo park it), and counts which transactions it was
// asked to act on.
type policyHandler struct {
	act     Action
	mu      sync.Mutex
	handled map[pglogrepl.LSN]int
}

func (h *policyHandler) real(app Applier) *apply.Applier { return app.(*countingApplier).Applier }

func (h *policyHandler) Handle(ctx context.Context, app Applier, txn *decode.Txn, err error) (Action, error) {
	h.mu.Lock()
	h.handled[txn.EndLSN]++
	h.mu.Unlock()
	a := h.real(app)
	switch h.act {
	case ActionDeadLetter, ActionUndo:
		status := apply.StatusParked
		if h.act == ActionUndo {
			status = apply.StatusUndoRequested
		}
		if _, perr := a.Park(ctx, txn, err, status); perr != nil {
			return ActionHalt, perr
		}
		return h.act, nil
	}
	return ActionHalt, a.RecordHalt(ctx, txn, err)
}

func (h *policyHandler) PendingUndos(ctx context.Context, app Applier, source string) ([]UndoRequest, error) {
	dls, err := h.real(app).DeadLetters(ctx, source, apply.StatusUndoRequested)
	if err != nil {
		return nil, err
	}
	var reqs []UndoRequest
	for _, d := range dls {
		txn, err := d.Txn()
		if err != nil {
			return nil, err
		}
		reqs = append(reqs, UndoRequest{Txn: txn, SQLState: d.SQLState, Message: d.Message})
	}
	return reqs, nil
}

func (h *policyHandler) Undone(ctx context.Context, app Applier, source string, lsn pglogrepl.LSN, status, note string) error {
	return h.real(app).SetDeadLetterStatus(ctx, source, lsn, apply.StatusUndone, status+": "+note)
}

func (h *policyHandler) acted() map[pglogrepl.LSN]int {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := map[pglogrepl.LSN]int{}
	for k, v := range h.handled {
		out[k] = v
	}
	return out
}

// isolationCase is one run of TestOneFailureTouchesNoOther.
type isolationCase struct {
	path    string // "peer" or "fallback"
	act     Action
	pos     int    // index of the failing transaction among 100
	kind    string // "check": violates a constraint only the target has; "missing": table missing in the target
	spilled bool   // the transactions 10 before and 10 after the failing one are spilled
}

func (tc isolationCase) String() string {
	s := fmt.Sprintf("%s %s %s at %d", tc.path, tc.act, tc.kind, tc.pos)
	if tc.spilled {
		s += " between spilled"
	}
	return s
}

// TestOneFailureTouchesNoOther: invariant 9. One source ships 100
// transactions that the receiver applies in pipelined round trips (the
// node's server, or the shipper's direct-SQL fallback); exactly one of
// them fails, at position 0, 50 or 99, by a row that violates a CHECK
// only the target has or by a table missing in the target. Whatever the
// policy, exactly that transaction is acted on: dead_letter and undo park
// it alone (and undo asks the source to revert it alone) while the other
// 99 are applied at once; halt stops exactly at it with the ones before
// it durable, and `skip` of its LSN lets the rest through. No innocent
// transaction costs a retry, a halt or a second policy decision. One
// variant has spilled transactions (applied alone, streamed) among the
// others, before and after the failing one.
func TestOneFailureTouchesNoOther(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	// Every case has its own origin, and each origin that has progress
	// takes a replication state slot.
	c := pgtest.Start(t, pgtest.Options{Name: "isolation", Settings: map[string]string{"max_replication_slots": "64"}})
	var cases []isolationCase
	for _, path := range []string{"peer", "fallback"} {
		for _, act := range []Action{ActionHalt, ActionDeadLetter, ActionUndo} {
			for _, pos := range []int{0, 50, 99} {
				for _, kind := range []string{"check", "missing"} {
					cases = append(cases, isolationCase{path: path, act: act, pos: pos, kind: kind})
				}
			}
			cases = append(cases, isolationCase{path: path, act: act, pos: 50, kind: "missing", spilled: true})
		}
	}
	for k, tc := range cases {
		t.Run(tc.String(), func(t *testing.T) {
			// Origins are per cluster: every case has its own source
			// region and its own database.
			src, db := fmt.Sprintf("s%d", k), fmt.Sprintf("iso%d", k)
			if err := c.CreateDatabase(ctx, db); err != nil {
				t.Fatal(err)
			}
			handler := &policyHandler{act: tc.act, handled: map[pglogrepl.LSN]int{}}
			r := newRegion(t, ctx, c, "eu", db, func(cfg *ServerConfig) {
				cfg.AcceptRegions = []string{src}
				cfg.Errors = handler
			})
			if err := c.Exec(ctx, db, "ALTER TABLE items ADD CHECK (v NOT LIKE 'bad%')"); err != nil {
				t.Fatal(err)
			}
			runIsolationCase(t, ctx, r, tc, src, handler)
		})
	}
}

func runIsolationCase(t *testing.T, ctx context.Context, r *region, tc isolationCase, src string, handler *policyHandler) {
	// Transaction index i is mkTxn(i+1): row i+1, EndLSN lsnOf(i+1).
	txns := make([]*decode.Txn, 100)
	spilledRows := 0
	for i := range txns {
		switch {
		case tc.spilled && (i == tc.pos-10 || i == tc.pos+10):
			txns[i], _ = spilledTxn(t, i+1, 20, 100)
			spilledRows += 20
		default:
			txns[i] = mkTxn(i+1, 0)
		}
		txns[i].Origin = src
	}
	bad := txns[tc.pos]
	switch tc.kind {
	case "check":
		bad.Changes[0].New[1] = decode.Value{Kind: decode.ValueText, Data: []byte(fmt.Sprintf("bad%d", tc.pos+1))}
	case "missing":
		bad.Changes[0].Rel = &decode.Relation{ID: 16390, Schema: "public", Table: "missing", ReplicaIdentity: decode.IdentityDefault, Columns: itemsCols}
	}
	wantTable, wantState := map[string]string{"check": "public.items", "missing": "public.missing"}[tc.kind], map[string]string{"check": "23514", "missing": "42P01"}[tc.kind]

	var undoMu sync.Mutex
	var undos []pglogrepl.LSN
	cfg := shipperConfig()
	if tc.path == "peer" {
		cfg = shipperConfig(r.nodes...)
	}
	cfg.SourceRegion, cfg.TargetRegion = src, r.name
	// The assertions below count retries: an ACK that is merely slow on a
	// loaded machine (100 transactions, a policy decision) must not pass
	// for a failure, so the timeouts are far above the helpers' 200 ms.
	slow := NewShipperConfig(10 * time.Second)
	cfg.AckTimeout, cfg.DialTimeout, cfg.HandshakeTimeout = slow.AckTimeout, slow.DialTimeout, slow.HandshakeTimeout
	cfg.ReadTimeout, cfg.WriteTimeout = slow.ReadTimeout, slow.WriteTimeout
	cfg.Errors = handler
	cfg.Undo = func(ctx context.Context, target string, req UndoRequest) (string, string, error) {
		undoMu.Lock()
		defer undoMu.Unlock()
		undos = append(undos, req.Txn.EndLSN)
		return apply.UndoDone, "reverted", nil
	}
	var fb Fallback
	if tc.path == "fallback" {
		fb = r.fallback()
	}
	logs := &logBuf{}
	sh := NewShipper(cfg, fb, logs.logger())
	// Everything is in the window before the shipper starts, so the
	// receiver gets it in as few round trips as it takes.
	for _, txn := range txns {
		if err := sh.Send(ctx, txn); err != nil {
			t.Fatal(err)
		}
	}
	runShipper(t, sh)
	defer func() {
		if t.Failed() {
			t.Logf("shipper log:\n%s", logs.String())
		}
	}()

	last := txns[99].EndLSN
	if tc.act == ActionHalt {
		waitFor(t, "the halt", 30*time.Second, func() bool { return strings.HasPrefix(sh.Status().Path, "halted:") })
		st := sh.Status()
		if !strings.HasSuffix(st.Path, " at "+bad.EndLSN.String()) || !strings.Contains(st.Path, wantState) || !strings.Contains(st.Path, fmt.Sprintf("xid %d", bad.Xid)) {
			t.Fatalf("halted path %q; want %s of xid %d at %s", st.Path, wantState, bad.Xid, bad.EndLSN)
		}
		before := pglogrepl.LSN(0)
		if tc.pos > 0 {
			before = txns[tc.pos-1].EndLSN
		}
		if sh.Acked() != before {
			t.Fatalf("acked %s at the halt, want %s (everything before the failing transaction)", sh.Acked(), before)
		}
		checkIsolation(t, ctx, r, tc, bad, wantTable, wantState, apply.StatusHalted, before, tc.pos, txns)
		for lsn := range handler.acted() {
			if lsn != bad.EndLSN {
				t.Fatalf("the policy acted on %s; want only %s", lsn, bad.EndLSN)
			}
		}
		// The operator skips exactly the halted transaction; the rest
		// follows at the next attempt.
		var err error
		waitFor(t, "skip (the origin is free between attempts)", 30*time.Second, func() bool {
			err = r.apps[0].Applier.Skip(ctx, src, bad.EndLSN, "test")
			return err == nil
		})
		waitFor(t, "the rest after the skip", 30*time.Second, func() bool { return sh.Acked() == last })
		checkIsolation(t, ctx, r, tc, bad, wantTable, wantState, apply.StatusSkipped, last, 99, txns)
		if st := sh.Status(); st.Halts != 1 || st.Failovers != 0 || st.Fallbacks != 0 && tc.path == "peer" {
			t.Fatalf("shipper status %+v; want exactly one halt, no failover or fallback", st)
		}
		return
	}

	waitFor(t, "every transaction acknowledged", 30*time.Second, func() bool { return sh.Acked() == last })
	status := apply.StatusParked
	if tc.act == ActionUndo {
		status = apply.StatusUndone
		waitFor(t, "the source's answer to the undo request", 30*time.Second, func() bool {
			var s string
			_ = r.pool.QueryRow(ctx, "SELECT coalesce(string_agg(status, ','), '') FROM prism.dead_letters WHERE source_region = $1", src).Scan(&s)
			return s == apply.StatusUndone
		})
		undoMu.Lock()
		got := append([]pglogrepl.LSN(nil), undos...)
		undoMu.Unlock()
		if len(got) != 1 || got[0] != bad.EndLSN {
			t.Fatalf("undo requested for %v; want once for %s", got, bad.EndLSN)
		}
	}
	checkIsolation(t, ctx, r, tc, bad, wantTable, wantState, status, last, 99, txns)
	if got := handler.acted(); len(got) != 1 || got[bad.EndLSN] != 1 {
		t.Fatalf("the policy acted on %v; want once on %s", got, bad.EndLSN)
	}
	// No crawl: nothing was retried, halted or failed over, and no
	// transaction reached the applier more than twice (once in the round
	// trip the failure cut short, once after it).
	if st := sh.Status(); st.Retries != 0 || st.Halts != 0 || st.Failovers != 0 || st.Fallbacks != 0 && tc.path == "peer" {
		t.Fatalf("shipper status %+v; want no retry, halt, failover or fallback", st)
	}
	for i, txn := range txns {
		if txn.Spill != nil {
			continue // streamed: not counted
		}
		if n := r.applyCalls(txn.EndLSN); n == 0 || n > 2 {
			t.Fatalf("transaction %d (%s) reached the applier %d times; want once or twice", i, txn.EndLSN, n)
		}
	}
}

// applyCalls returns how often a transaction reached the region's
// appliers, nodes and fallback together.
func (r *region) applyCalls(lsn pglogrepl.LSN) int {
	n := 0
	for _, a := range r.apps {
		n += a.callsFor(lsn)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.fallbacks {
		n += a.callsFor(lsn)
	}
	return n
}

// checkIsolation checks the target database: the one dead letter is the
// failing transaction with its xid, table and SQLSTATE in status; the
// origin's progress is progress; items holds exactly the rows of the
// other transactions up to index upTo.
func checkIsolation(t *testing.T, ctx context.Context, r *region, tc isolationCase, bad *decode.Txn, table, state, status string,
	progress pglogrepl.LSN, upTo int, txns []*decode.Txn) {
	t.Helper()
	var dl string
	if err := r.pool.QueryRow(ctx, `SELECT coalesce(string_agg(format('%s xid %s %s %s %s', end_lsn, xid, table_name, sqlstate, status), '; '), '')
		FROM prism.dead_letters WHERE source_region = $1`, bad.Origin).Scan(&dl); err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("%s xid %d %s %s %s", bad.EndLSN, bad.Xid, table, state, status); dl != want {
		t.Fatalf("dead letters %q; want exactly %q", dl, want)
	}
	if p, err := originProgress(ctx, r.pool, bad.Origin); err != nil || p != progress {
		t.Fatalf("origin progress %s, %v; want %s", p, err, progress)
	}
	wantRows, wantSum := 0, 0
	for i := 0; i <= upTo; i++ {
		if i == tc.pos {
			continue
		}
		if txns[i].Spill != nil {
			wantRows += txns[i].Spill.Count()
			continue
		}
		wantRows++
		wantSum += i + 1
	}
	var rows, small, sum int
	if err := r.pool.QueryRow(ctx, "SELECT count(*), count(*) FILTER (WHERE id <= 100), coalesce(sum(id) FILTER (WHERE id <= 100), 0) FROM items").Scan(&rows, &small, &sum); err != nil {
		t.Fatal(err)
	}
	if rows != wantRows || sum != wantSum {
		t.Fatalf("items has %d rows (%d small, id sum %d); want %d rows, id sum %d: every transaction up to %d but the failing one",
			rows, small, sum, wantRows, wantSum, upTo)
	}
}

// originProgress reads the durable progress of origin prism_<source>.
func originProgress(ctx context.Context, pool *pgxpool.Pool, source string) (pglogrepl.LSN, error) {
	return apply.NewApplier(pool, zerolog.Nop()).Progress(ctx, source)
}
