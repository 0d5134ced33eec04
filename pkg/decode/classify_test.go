package decode

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// TestServerCause: a server error is classified by its SQLSTATE and, for
// the codes that do not name the object at fault, by the catalog state
// the server reports afterwards; the message text plays no part, so a
// server with lc_messages in another language is classified the same,
// and a message that mentions a publication is no proof that it is gone.
func TestServerCause(t *testing.T) {
	ok := slotState{database: "app", pubExists: true, slotExists: true, slotType: "logical", plugin: "pgoutput", slotDatabase: "app", walStatus: "reserved"}
	with := func(f func(*slotState)) slotState { s := ok; f(&s); return s }
	pg := func(code, msg string) error { return &pgconn.PgError{Severity: "ERROR", Code: code, Message: msg} }
	for _, tc := range []struct {
		name      string
		err       error
		state     slotState
		stateErr  error
		want      error // a sentinel err must wrap; nil: none of them
		permanent bool
	}{
		{name: "publication dropped, German message", err: pg("42704", `Publikation »prism« existiert nicht`),
			state: with(func(s *slotState) { s.pubExists = false }), want: ErrPublicationMissing, permanent: true},
		{name: "publication there again", err: pg("42704", `publication "prism" does not exist`), state: ok},
		{name: "slot invalidated, French message", err: pg("55000", `ne peut plus obtenir les modifications`),
			state: with(func(s *slotState) { s.walStatus = "lost" }), want: ErrSlotLost, permanent: true},
		{name: "message names the slot, slot fine", err: pg("55000", `replication slot "prism_na" cannot be advanced`), state: ok},
		{name: "slot of another database", err: pg("55000", `x`), state: with(func(s *slotState) { s.slotDatabase = "other" }), permanent: true},
		{name: "busy, any message", err: fmt.Errorf("start replication: %w", pg("55006", "x")), state: ok, want: ErrSlotBusy},
		{name: "state unknown", err: pg("42704", `publication "prism" does not exist`), stateErr: errors.New("connection refused")},
		{name: "other code", err: pg("57P01", `publication slot`), state: with(func(s *slotState) { s.walStatus = "lost" })},
		{name: "not a server error", err: errors.New(`publication "prism" does not exist`), state: with(func(s *slotState) { s.pubExists = false })},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := serverCause(tc.err, "prism_na", "prism", true, func() (slotState, error) { return tc.state, tc.stateErr })
			if !errors.Is(got, tc.err) {
				t.Errorf("serverCause(%v) = %v, want it to wrap the server error", tc.err, got)
			}
			for _, sentinel := range []error{ErrSlotLost, ErrPublicationMissing, ErrSlotBusy} {
				if errors.Is(got, sentinel) != (sentinel == tc.want) {
					t.Errorf("serverCause(%v) = %v, wraps %v: %v, want %v", tc.err, got, sentinel, !(sentinel == tc.want), sentinel == tc.want)
				}
			}
			var perm *permanentError
			if errors.As(got, &perm) != tc.permanent {
				t.Errorf("serverCause(%v) = %v, permanent %v, want %v", tc.err, got, !tc.permanent, tc.permanent)
			}
		})
	}
}

// TestReaderPublicationDroppedWhileStreaming: pgoutput fails the stream
// with 42704 at the first change after the publication is dropped; the
// Reader stops with the permanent ErrPublicationMissing, found from the
// catalog, and does not create the publication again.
func TestReaderPublicationDroppedWhileStreaming(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "droppub"})
	exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int)")
	r := newTestReader(t, c, ReaderConfig{Publication: "only_t", Tables: []string{"public.t"}})
	ch := collect(t, r)
	deadline := time.Now().Add(time.Minute)
	poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })
	exec(ctx, t, c, "INSERT INTO t (batch) VALUES (1)")
	if txn := recv(t, ch, deadline); len(txn.Changes) != 1 {
		t.Fatalf("first transaction has %d changes, want 1", len(txn.Changes))
	}
	exec(ctx, t, c, "DROP PUBLICATION only_t")
	exec(ctx, t, c, "INSERT INTO t (batch) VALUES (2)")
	select {
	case res := <-ch:
		if !errors.Is(res.err, ErrPublicationMissing) {
			t.Fatalf("Next() after the publication was dropped = %v, %v; want ErrPublicationMissing", res.txn, res.err)
		}
		var pgErr *pgconn.PgError
		if !errors.As(res.err, &pgErr) || pgErr.Code != "42704" {
			t.Fatalf("Next() = %v, want it to carry the server's 42704", res.err)
		}
	case <-time.After(time.Until(deadline)):
		t.Fatalf("Next() still waiting after the publication was dropped, want ErrPublicationMissing")
	}
	if r.Failed() == nil {
		t.Fatalf("Failed() = nil after ErrPublicationMissing, want the permanent error")
	}
	if query[bool](ctx, t, c, "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'only_t')") {
		t.Fatalf("the dropped publication was created again")
	}
}
