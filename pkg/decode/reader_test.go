package decode

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/rs/zerolog"
)

func testLogger(t *testing.T) zerolog.Logger {
	return zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel)
}

func newTestReader(t *testing.T, c *pgtest.Cluster, cfg ReaderConfig) *Reader {
	t.Helper()
	if cfg.DSN == "" {
		cfg.DSN = c.DSN("postgres")
	}
	if cfg.Region == "" {
		cfg.Region = "na"
	}
	if cfg.StatusInterval == 0 {
		cfg.StatusInterval = 200 * time.Millisecond
	}
	r := NewReader(cfg, testLogger(t))
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close() = %v", err)
		}
	})
	return r
}

// result is one Next outcome, passed from a collector goroutine.
type result struct {
	txn *Txn
	err error
}

// collect calls Next in a goroutine until it fails; the test owns the
// goroutine through its cleanup, which cancels and waits for it.
func collect(t *testing.T, r *Reader) <-chan result {
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan result, 1024)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			txn, err := r.Next(ctx)
			ch <- result{txn, err}
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return ch
}

// recv waits for the next transaction, failing the test on an error or at
// the deadline.
func recv(t *testing.T, ch <-chan result, deadline time.Time) *Txn {
	t.Helper()
	select {
	case res := <-ch:
		if res.err != nil {
			t.Fatalf("Next() = %v", res.err)
		}
		return res.txn
	case <-time.After(time.Until(deadline)):
		t.Fatalf("no transaction before the deadline")
	}
	return nil
}

// query returns one value from the cluster.
func query[T any](ctx context.Context, t *testing.T, c *pgtest.Cluster, sql string, args ...any) T {
	t.Helper()
	conn, err := c.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var v T
	if err := conn.QueryRow(ctx, sql, args...).Scan(&v); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return v
}

// poll calls cond until it is true or the deadline passes.
func poll(t *testing.T, deadline time.Time, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func exec(ctx context.Context, t *testing.T, c *pgtest.Cluster, sql string) {
	t.Helper()
	if err := c.Exec(ctx, "postgres", sql); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func slotActive(ctx context.Context, t *testing.T, c *pgtest.Cluster, slot string) bool {
	return query[bool](ctx, t, c, "SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)", slot)
}

func confirmedFlush(ctx context.Context, t *testing.T, c *pgtest.Cluster, slot string) pglogrepl.LSN {
	t.Helper()
	s := query[string](ctx, t, c, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot)
	lsn, err := pglogrepl.ParseLSN(s)
	if err != nil {
		t.Fatal(err)
	}
	return lsn
}

// batchOf returns the batch column (the second) of a transaction's rows,
// checking they all agree.
func batchOf(t *testing.T, txn *Txn) int {
	t.Helper()
	b := -1
	for _, c := range txn.Changes {
		n, err := strconv.Atoi(string(c.New[1].Data))
		if err != nil || (b != -1 && n != b) {
			t.Fatalf("txn %s mixes batches or has no batch: %v", txn.EndLSN, c.New)
		}
		b = n
	}
	return b
}

// TestReaderConfirm checks that the slot's confirmed_flush_lsn never passes
// what the caller confirmed, and that it moves past idle WAL once nothing is
// in flight. It also checks that the publication is created.
func TestReaderConfirm(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "confirm"})
	exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int)")
	exec(ctx, t, c, "CREATE DATABASE other")
	r := newTestReader(t, c, ReaderConfig{Slot: "prism_na", AppName: "prism_na1"})
	ch := collect(t, r)
	deadline := time.Now().Add(time.Minute)
	poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })
	if !query[bool](ctx, t, c, "SELECT puballtables FROM pg_publication WHERE pubname = 'prism'") {
		t.Fatalf("publication prism was not created FOR ALL TABLES")
	}
	if n := query[int](ctx, t, c, "SELECT count(*)::int FROM pg_stat_replication WHERE application_name = 'prism_na1'"); n != 1 {
		t.Fatalf("%d walsenders named prism_na1, want 1", n)
	}

	var txns []*Txn
	for i := 1; i <= 20; i++ {
		exec(ctx, t, c, fmt.Sprintf("INSERT INTO t (batch) VALUES (%d), (%d)", i, i))
	}
	for len(txns) < 20 {
		txn := recv(t, ch, deadline)
		if got := batchOf(t, txn); got != len(txns)+1 {
			t.Fatalf("got batch %d, want %d", got, len(txns)+1)
		}
		txns = append(txns, txn)
	}

	// Confirm half. The slot must reach exactly that position and stay
	// there over several further status updates.
	half := txns[9].EndLSN
	r.Confirm(half)
	poll(t, deadline, "confirmed_flush_lsn to reach the confirmed position", func() bool {
		return confirmedFlush(ctx, t, c, "prism_na") >= half
	})
	for i := 0; i < 3; i++ {
		before := query[time.Time](ctx, t, c, "SELECT reply_time FROM pg_stat_replication WHERE application_name = 'prism_na1'")
		poll(t, deadline, "another status update", func() bool {
			return query[time.Time](ctx, t, c, "SELECT reply_time FROM pg_stat_replication WHERE application_name = 'prism_na1'").After(before)
		})
		if got := confirmedFlush(ctx, t, c, "prism_na"); got != half {
			t.Fatalf("confirmed_flush_lsn = %s while only %s was confirmed (last txn ends at %s)", got, half, txns[19].EndLSN)
		}
	}
	if s := r.Stats(); s.Confirmed != half || s.LastEndLSN != txns[19].EndLSN || s.Received != 20 {
		t.Fatalf("Stats() = %+v, want Confirmed %s LastEndLSN %s Received 20", s, half, txns[19].EndLSN)
	}

	// Confirm everything; then WAL that holds nothing for this slot (another
	// database) must not stay pinned.
	r.Confirm(txns[19].EndLSN)
	poll(t, deadline, "confirmed_flush_lsn to reach the last transaction", func() bool {
		return confirmedFlush(ctx, t, c, "prism_na") >= txns[19].EndLSN
	})
	if err := c.Exec(ctx, "other", "CREATE TABLE idle (id int); INSERT INTO idle SELECT generate_series(1, 1000)"); err != nil {
		t.Fatal(err)
	}
	walEnd, err := pglogrepl.ParseLSN(query[string](ctx, t, c, "SELECT pg_current_wal_lsn()::text"))
	if err != nil {
		t.Fatal(err)
	}
	poll(t, deadline, "the slot to advance past idle WAL", func() bool {
		return confirmedFlush(ctx, t, c, "prism_na") >= walEnd
	})
	t.Logf("idle advance: last txn end %s, idle WAL end %s, slot confirmed %s", txns[19].EndLSN, walEnd, confirmedFlush(ctx, t, c, "prism_na"))

	// A local transaction after the idle advance still arrives.
	exec(ctx, t, c, "INSERT INTO t (batch) VALUES (21)")
	if txn := recv(t, ch, deadline); batchOf(t, txn) != 21 || txn.EndLSN <= walEnd {
		t.Fatalf("after idle advance got batch %d ending %s, want batch 21 after %s", batchOf(t, txn), txn.EndLSN, walEnd)
	}
}

// TestReaderOriginFiltered checks that a transaction applied with a
// replication origin is not returned, while a later local one is, and
// that the slot moves past applied transactions once nothing is in
// flight. PostgreSQL 15's pgoutput sends the applied transaction and the
// Assembler drops it (Filtered 1); PostgreSQL 16 leaves it out itself
// (origin 'none'), and so does prism_pgoutput on 15, which the reader
// creates its slot with where the server can load it: the reader never
// sees it (Filtered 0).
func TestReaderOriginFiltered(t *testing.T) {
	type variant struct {
		pgtest.Server
		settings func(t *testing.T) map[string]string
		plugin   string // the slot's plugin
	}
	variants := []variant{{
		Server:   pgtest.Server{Name: "prism_pgoutput", Bin: func(pgtest.TB) string { return "" }},
		settings: func(t *testing.T) map[string]string { return pgtest.PrismPgoutput(t) },
		plugin:   PluginPrism,
	}}
	for _, v := range pgtest.Servers() {
		variants = append(variants, variant{Server: v, settings: func(*testing.T) map[string]string { return nil }, plugin: PluginPgoutput})
	}
	for _, v := range variants {
		t.Run(v.Name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			c := pgtest.Start(t, pgtest.Options{Name: "origin", Bin: v.Bin(t), Settings: v.settings(t)})
			exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int)")
			r := newTestReader(t, c, ReaderConfig{})
			ch := collect(t, r)
			deadline := time.Now().Add(time.Minute)
			poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })
			if got := query[string](ctx, t, c, "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = 'prism_na'"); got != v.plugin {
				t.Fatalf("the reader created its slot with plugin %s, want %s", got, v.plugin)
			}

			conn, err := c.Connect(ctx, "postgres")
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			version := conn.PgConn().ParameterStatus("server_version")
			t.Logf("server %s", version)
			major := serverMajor(version)
			if v.Major != 0 && major != v.Major {
				t.Fatalf("server %s; want major version %d", version, v.Major)
			}
			filtered := uint64(1) // the Assembler drops it
			if major >= 16 || v.plugin == PluginPrism {
				filtered = 0 // the server left it out
			}
			run := func(sqls ...string) {
				t.Helper()
				for _, sql := range sqls {
					if _, err := conn.Exec(ctx, sql); err != nil {
						t.Fatalf("%s: %v", sql, err)
					}
				}
			}
			run("SELECT pg_replication_origin_create('prism_eu')",
				"SELECT pg_replication_origin_session_setup('prism_eu')",
				"INSERT INTO t (batch) VALUES (1)",
				"SELECT pg_replication_origin_session_reset()",
				"INSERT INTO t (batch) VALUES (2)")
			txn := recv(t, ch, deadline)
			if batchOf(t, txn) != 2 {
				t.Fatalf("first transaction is batch %d, want the local batch 2", batchOf(t, txn))
			}
			if s := r.Stats(); s.Filtered != filtered || s.Received != 1 {
				t.Fatalf("Stats() = %+v, want Filtered %d Received 1", s, filtered)
			}
			// Applied transactions after the last local one do not pin
			// the slot.
			r.Confirm(txn.EndLSN)
			run("SELECT pg_replication_origin_session_setup('prism_eu')",
				"INSERT INTO t (batch) VALUES (3)",
				"SELECT pg_replication_origin_session_reset()")
			walEnd, err := pglogrepl.ParseLSN(query[string](ctx, t, c, "SELECT pg_current_wal_lsn()::text"))
			if err != nil {
				t.Fatal(err)
			}
			poll(t, deadline, "the slot to advance past the applied transaction", func() bool {
				return confirmedFlush(ctx, t, c, "prism_na") >= walEnd
			})
			if s := r.Stats(); s.Filtered != 2*filtered || s.Received != 1 {
				t.Fatalf("Stats() = %+v, want Filtered %d Received 1", s, 2*filtered)
			}
		})
	}
}

// TestReaderPluginChoice checks the output_plugin settings on PostgreSQL
// 15: prism_pgoutput asked for where the server cannot load it is a
// permanent error that says how to install it, with no slot left behind;
// pgoutput is used when asked for even where prism_pgoutput could be
// loaded; and a slot whose plugin the server can no longer load stops
// the reader with an error that names the plugin, instead of retrying.
func TestReaderPluginChoice(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "plugin"})
	if major := serverMajor(query[string](ctx, t, c, "SHOW server_version")); major >= 16 {
		t.Fatalf("server major version %d: this test needs one older than 16, whose pgoutput has no origin filter", major)
	}
	exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int)")
	slotPlugin := func(slot string) string {
		return query[string](ctx, t, c, "SELECT coalesce((SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1), 'none')", slot)
	}
	var perm *permanentError

	r := newTestReader(t, c, ReaderConfig{Slot: "explicit", Plugin: PluginPrism})
	_, err := r.Next(ctx)
	if !errors.As(err, &perm) || !strings.Contains(err.Error(), "install contrib/prism_pgoutput") {
		t.Fatalf("Next() with prism_pgoutput not installed = %v, want a permanent error saying to install it", err)
	}
	t.Logf("not installed: %v", err)
	if got := slotPlugin("explicit"); got != "none" {
		t.Fatalf("slot explicit has plugin %s after the failed creation, want no slot", got)
	}

	dir, err := pgtest.PrismPgoutputDir("")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetConf("dynamic_library_path", pgtest.LibraryPath(dir)["dynamic_library_path"]); err != nil {
		t.Fatal(err)
	}
	if err := c.Reload(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for _, tc := range []struct{ slot, plugin, want string }{
		{"plain", PluginPgoutput, PluginPgoutput},
		{"installed", PluginAuto, PluginPrism},
	} {
		r := newTestReader(t, c, ReaderConfig{Slot: tc.slot, Plugin: tc.plugin})
		ch := collect(t, r)
		poll(t, deadline, "slot "+tc.slot+" active", func() bool { return slotActive(ctx, t, c, tc.slot) })
		if got := slotPlugin(tc.slot); got != tc.want {
			t.Fatalf("output_plugin %s: slot %s has plugin %s, want %s", tc.plugin, tc.slot, got, tc.want)
		}
		exec(ctx, t, c, "INSERT INTO t (batch) VALUES (1)")
		if txn := recv(t, ch, deadline); batchOf(t, txn) != 1 {
			t.Fatalf("slot %s: got batch %d, want 1", tc.slot, batchOf(t, txn))
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		poll(t, deadline, "slot "+tc.slot+" released", func() bool { return !slotActive(ctx, t, c, tc.slot) })
	}

	// The library goes away under the slot that uses it.
	if err := c.SetConf("dynamic_library_path", "'$libdir'"); err != nil {
		t.Fatal(err)
	}
	if err := c.Reload(); err != nil {
		t.Fatal(err)
	}
	r = newTestReader(t, c, ReaderConfig{Slot: "installed"})
	_, err = r.Next(ctx)
	if !errors.As(err, &perm) || !strings.Contains(err.Error(), "cannot load the slot's output plugin") || !strings.Contains(err.Error(), "prism_pgoutput") {
		t.Fatalf("Next() on a slot whose plugin is gone = %v, want a permanent error naming prism_pgoutput", err)
	}
	t.Logf("plugin gone: %v", err)
	if got := slotPlugin("installed"); got != PluginPrism {
		t.Fatalf("slot installed has plugin %s after the failure, want it kept (%s)", got, PluginPrism)
	}
}

// TestPluginArgs: origin 'none' is asked of PostgreSQL 16 and later only
// (15's pgoutput refuses options it does not know).
func TestPluginArgs(t *testing.T) {
	for version, want := range map[string]bool{
		"15.18 (Debian 15.18-0+deb12u1)": false,
		"16.14":                          true,
		"17beta1":                        true,
		"18.1 (Ubuntu 18.1-1)":           true,
		"9.6.24":                         false,
		"":                               false,
	} {
		args := strings.Join(pluginArgs(`"prism"`, serverMajor(version)), ", ")
		if got := strings.Contains(args, "origin 'none'"); got != want {
			t.Errorf("server %q: plugin args %s, want origin 'none' %v", version, args, want)
		}
		if !strings.HasPrefix(args, `proto_version '1', publication_names '"prism"', messages 'true'`) {
			t.Errorf("server %q: plugin args %s", version, args)
		}
	}
}

// TestReaderReconnect crashes the server and kills the walsender while
// transactions flow: every committed transaction arrives once, in order.
func TestReaderReconnect(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "reconnect", Settings: map[string]string{"logical_decoding_work_mem": "64kB"}})
	exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int, pad text)")
	r := newTestReader(t, c, ReaderConfig{AppName: "prism_na1"})
	ch := collect(t, r)
	deadline := time.Now().Add(2 * time.Minute)
	poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })

	const batches = 30
	insert := func(b, rows int) {
		exec(ctx, t, c, fmt.Sprintf("INSERT INTO t (batch, pad) SELECT %d, repeat('x', 50) FROM generate_series(1, %d)", b, rows))
	}
	var got []*Txn
	next := func() {
		txn := recv(t, ch, deadline)
		b := batchOf(t, txn)
		if b != len(got)+1 {
			t.Fatalf("got batch %d after %d batches: lost, reordered or duplicated", b, len(got))
		}
		if len(got) > 0 && txn.EndLSN <= got[len(got)-1].EndLSN {
			t.Fatalf("batch %d ends at %s, not after %s", b, txn.EndLSN, got[len(got)-1].EndLSN)
		}
		got = append(got, txn)
		if len(got)%3 == 0 {
			r.Confirm(txn.EndLSN) // confirm some, so restarts resume from both sides of it
		}
	}
	for b := 1; b <= 10; b++ {
		insert(b, b*100)
	}
	for len(got) < 5 {
		next()
	}
	if err := c.Restart("immediate"); err != nil {
		t.Fatal(err)
	}
	for b := 11; b <= 20; b++ {
		insert(b, 10)
	}
	for len(got) < 12 {
		next()
	}
	// A big transaction, and the walsender killed while it is decoded or sent.
	insert(21, 20000)
	if n := query[int](ctx, t, c, "SELECT count(pg_terminate_backend(pid))::int FROM pg_stat_replication WHERE application_name = 'prism_na1'"); n != 1 {
		t.Fatalf("terminated %d walsenders, want 1", n)
	}
	for b := 22; b <= batches; b++ {
		insert(b, 5)
	}
	for len(got) < batches {
		next()
	}
	if n := len(got[20].Changes); n != 20000 {
		t.Fatalf("batch 21 has %d changes, want 20000", n)
	}
	if s := r.Stats(); s.Reconnects < 2 {
		t.Fatalf("Stats().Reconnects = %d after a crash and a kill, want at least 2", s.Reconnects)
	}
	// Nothing more is pending: a resend of an old transaction would show up.
	insert(batches+1, 1)
	next()
	t.Logf("Stats() = %+v (received includes resends after the crash and the kill)", r.Stats())
}

// TestReaderSlotBusy checks that a second reader of the same slot gets
// ErrSlotBusy, and gets the slot once the first one is gone.
func TestReaderSlotBusy(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "busy"})
	exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int)")
	first := newTestReader(t, c, ReaderConfig{AppName: "prism_na1"})
	ch := collect(t, first)
	deadline := time.Now().Add(time.Minute)
	poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })

	second := newTestReader(t, c, ReaderConfig{AppName: "prism_na2"})
	if _, err := second.Next(ctx); !errors.Is(err, ErrSlotBusy) {
		t.Fatalf("second reader Next() = %v, want ErrSlotBusy", err)
	}
	exec(ctx, t, c, "INSERT INTO t (batch) VALUES (1)")
	if txn := recv(t, ch, deadline); batchOf(t, txn) != 1 {
		t.Fatalf("first reader got batch %d, want 1", batchOf(t, txn))
	}
	first.Confirm(0) // nothing confirmed: the second reader must see batch 1 again
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	var txn *Txn
	poll(t, deadline, "the second reader to take over", func() bool {
		nctx, ncancel := context.WithTimeout(ctx, 2*time.Second)
		defer ncancel()
		var err error
		txn, err = second.Next(nctx)
		if err != nil && !errors.Is(err, ErrSlotBusy) && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("second reader Next() = %v", err)
		}
		return err == nil
	})
	if batchOf(t, txn) != 1 {
		t.Fatalf("second reader got batch %d, want the unconfirmed batch 1", batchOf(t, txn))
	}
}

// TestReaderSlotTakenOver loses the first reader's stream while a second
// reader of the region takes the slot: the first one's Next must return
// ErrSlotBusy (so its node stops shipping what it read) instead of
// retrying for good, while a stale walsender of its own is ended and
// retried.
func TestReaderSlotTakenOver(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "takeover"})
	exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int)")
	first := newTestReader(t, c, ReaderConfig{AppName: "prism_na1"})
	ch := collect(t, first)
	deadline := time.Now().Add(time.Minute)
	poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })
	exec(ctx, t, c, "INSERT INTO t (batch) VALUES (1)")
	if txn := recv(t, ch, deadline); batchOf(t, txn) != 1 {
		t.Fatalf("first reader got batch %d, want 1", batchOf(t, txn))
	}
	// The first reader's walsender dies; the second reader keeps trying
	// until it holds the slot (the first reconnects too and may win a
	// round: then its walsender is ended again).
	second := newTestReader(t, c, ReaderConfig{AppName: "prism_na2"})
	poll(t, deadline, "the second reader to hold the slot", func() bool {
		exec(ctx, t, c, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'prism_na' AND active_pid IN (SELECT pid FROM pg_stat_activity WHERE application_name = 'prism_na1')")
		nctx, ncancel := context.WithTimeout(ctx, 500*time.Millisecond)
		defer ncancel()
		_, err := second.Next(nctx)
		if err != nil && !errors.Is(err, ErrSlotBusy) && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("second reader Next() = %v", err)
		}
		return query[string](ctx, t, c, "SELECT coalesce((SELECT a.application_name FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = 'prism_na'), '')") == "prism_na2"
	})
	select {
	case res := <-ch:
		if !errors.Is(res.err, ErrSlotBusy) {
			t.Fatalf("first reader Next() after the slot was taken over = %v, %v; want ErrSlotBusy", res.txn, res.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("first reader still waiting 30s after another reader took the slot, want ErrSlotBusy")
	}
}

// TestReaderSlotLost invalidates the slot (max_slot_wal_keep_size) and
// checks the reader stops with ErrSlotLost instead of creating a new slot.
func TestReaderSlotLost(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "lost", Settings: map[string]string{"max_slot_wal_keep_size": "1MB", "min_wal_size": "32MB", "max_wal_size": "64MB"}})
	exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int, pad text)")
	r := newTestReader(t, c, ReaderConfig{})
	ch := collect(t, r)
	deadline := time.Now().Add(time.Minute)
	poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if res := <-ch; !errors.Is(res.err, ErrClosed) {
		t.Fatalf("Next() after Close = %v, want ErrClosed", res.err)
	}
	poll(t, deadline, "slot inactive", func() bool { return !slotActive(ctx, t, c, "prism_na") })
	poll(t, deadline, "slot invalidation", func() bool {
		exec(ctx, t, c, "INSERT INTO t (batch, pad) SELECT 1, repeat('x', 200) FROM generate_series(1, 20000)")
		exec(ctx, t, c, "SELECT pg_switch_wal()")
		exec(ctx, t, c, "CHECKPOINT")
		return query[string](ctx, t, c, "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = 'prism_na'") == "lost"
	})
	again := newTestReader(t, c, ReaderConfig{})
	_, err := again.Next(ctx)
	if !errors.Is(err, ErrSlotLost) {
		t.Fatalf("Next() on an invalidated slot = %v, want ErrSlotLost", err)
	}
	t.Logf("invalidated slot: %v", err)
	if _, err2 := again.Next(ctx); !errors.Is(err2, ErrSlotLost) {
		t.Fatalf("second Next() = %v, want ErrSlotLost to stick", err2)
	}
	if n := query[int](ctx, t, c, "SELECT count(*)::int FROM pg_replication_slots"); n != 1 {
		t.Fatalf("%d slots after the invalidation, want the lost one only", n)
	}
}

// TestReaderPublicationDropped checks that a slot whose publication was
// dropped is reported, not papered over by creating a new publication.
func TestReaderPublicationDropped(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "nopub"})
	exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int)")
	exec(ctx, t, c, "CREATE TABLE u (id serial PRIMARY KEY, batch int)")
	r := newTestReader(t, c, ReaderConfig{Publication: "only_t", Tables: []string{"public.t"}})
	ch := collect(t, r)
	deadline := time.Now().Add(time.Minute)
	poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })
	exec(ctx, t, c, "INSERT INTO u (batch) VALUES (7); INSERT INTO t (batch) VALUES (8)")
	if txn := recv(t, ch, deadline); len(txn.Changes) != 1 || txn.Changes[0].Rel.Table != "t" {
		t.Fatalf("FOR TABLE publication delivered %d changes of %s, want one of t", len(txn.Changes), txn.Changes[0].Rel.Table)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	poll(t, deadline, "slot inactive", func() bool { return !slotActive(ctx, t, c, "prism_na") })
	exec(ctx, t, c, "DROP PUBLICATION only_t")
	again := newTestReader(t, c, ReaderConfig{Publication: "only_t", Tables: []string{"public.t"}})
	if _, err := again.Next(ctx); !errors.Is(err, ErrPublicationMissing) {
		t.Fatalf("Next() = %v, want ErrPublicationMissing", err)
	}
	if query[bool](ctx, t, c, "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'only_t')") {
		t.Fatalf("the dropped publication was created again")
	}
}

// TestCheckSlot covers the slot decisions on catalog states that are hard
// to provoke on a real server.
func TestCheckSlot(t *testing.T) {
	ok := slotState{database: "app", pubExists: true, slotExists: true, slotType: "logical", plugin: "pgoutput", slotDatabase: "app", walStatus: "reserved"}
	with := func(f func(*slotState)) slotState { s := ok; f(&s); return s }
	tests := []struct {
		name       string
		s          slotState
		usedBefore bool
		want       slotAction
		wantErr    error
		permanent  bool
	}{
		{name: "usable", s: ok, want: slotUse},
		{name: "unreserved is still usable", s: with(func(s *slotState) { s.walStatus = "unreserved" }), want: slotUse},
		{name: "missing: create", s: slotState{database: "app"}, want: slotCreate},
		{name: "missing with publication: create", s: slotState{database: "app", pubExists: true}, want: slotCreate},
		{name: "vanished after use", s: slotState{database: "app", pubExists: true}, usedBefore: true, wantErr: ErrSlotLost, permanent: true},
		{name: "lost", s: with(func(s *slotState) { s.walStatus = "lost" }), wantErr: ErrSlotLost, permanent: true},
		{name: "lost and busy", s: with(func(s *slotState) { s.walStatus = "lost"; s.activePID = 9 }), wantErr: ErrSlotLost, permanent: true},
		{name: "publication dropped", s: with(func(s *slotState) { s.pubExists = false }), wantErr: ErrPublicationMissing, permanent: true},
		{name: "busy", s: with(func(s *slotState) { s.activePID = 4242 }), wantErr: ErrSlotBusy},
		{name: "physical slot", s: with(func(s *slotState) { s.slotType = "physical"; s.plugin = "" }), permanent: true},
		{name: "prism_pgoutput", s: with(func(s *slotState) { s.plugin = PluginPrism }), want: slotUse},
		{name: "other plugin", s: with(func(s *slotState) { s.plugin = "wal2json" }), permanent: true},
		{name: "other database", s: with(func(s *slotState) { s.slotDatabase = "postgres" }), permanent: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := checkSlot("prism_na", "prism", tc.s, tc.usedBefore)
			var perm *permanentError
			if isPerm := errors.As(err, &perm); isPerm != tc.permanent {
				t.Fatalf("checkSlot() = %v, permanent %v, want permanent %v", err, isPerm, tc.permanent)
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Fatalf("checkSlot() = %v, want %v", err, tc.wantErr)
			}
			if !tc.permanent && tc.wantErr == nil && (err != nil || got != tc.want) {
				t.Fatalf("checkSlot() = %v, %v, want %v", got, err, tc.want)
			}
		})
	}
}

// TestReaderKeepaliveWhileBlocked stops consuming for several times the
// server's wal_sender_timeout: the stream must survive on status updates.
func TestReaderKeepaliveWhileBlocked(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "keepalive", Settings: map[string]string{"wal_sender_timeout": "'2s'"}})
	exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int)")
	r := newTestReader(t, c, ReaderConfig{AppName: "prism_na1", StatusInterval: 300 * time.Millisecond})
	deadline := time.Now().Add(time.Minute)

	// Next with a short context until the slot exists; then one row.
	first := make(chan result, 1)
	nctx, ncancel := context.WithCancel(ctx)
	defer ncancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		txn, err := r.Next(nctx)
		first <- result{txn, err}
	}()
	defer func() { ncancel(); <-done }()
	poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })
	exec(ctx, t, c, "INSERT INTO t (batch) VALUES (1)")
	if txn := recv(t, first, deadline); batchOf(t, txn) != 1 {
		t.Fatalf("got batch %d, want 1", batchOf(t, txn))
	}
	pid := query[int](ctx, t, c, "SELECT pid FROM pg_stat_replication WHERE application_name = 'prism_na1'")

	// Fill the reader's buffer and more, and do not call Next while the
	// server's clock moves past three wal_sender_timeouts.
	for b := 2; b <= 12; b++ {
		exec(ctx, t, c, fmt.Sprintf("INSERT INTO t (batch) VALUES (%d)", b))
	}
	start := query[time.Time](ctx, t, c, "SELECT now()")
	poll(t, deadline, "6s of server time", func() bool {
		if got := query[int](ctx, t, c, "SELECT coalesce((SELECT pid FROM pg_stat_replication WHERE application_name = 'prism_na1'), 0)"); got != pid {
			t.Fatalf("walsender pid changed from %d to %d while the consumer was blocked", pid, got)
		}
		return query[bool](ctx, t, c, "SELECT clock_timestamp() > $1::timestamptz + interval '6s'", start)
	})
	for b := 2; b <= 12; b++ {
		txn, err := r.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if batchOf(t, txn) != b {
			t.Fatalf("got batch %d, want %d", batchOf(t, txn), b)
		}
	}
	if s := r.Stats(); s.Reconnects != 0 {
		t.Fatalf("Stats().Reconnects = %d, want 0: the stream was cut while blocked", s.Reconnects)
	}
}

// TestReaderStreamLostWhileConsumerBehind loses the stream while a decoded
// transaction waits for room in the reader's buffer (the consumer is not
// calling Next). The server sends that transaction again after the
// reconnect, and it must be delivered then: it was never handed out, so it
// is not a resend to drop.
func TestReaderStreamLostWhileConsumerBehind(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "lostpending"})
	exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int)")
	r := newTestReader(t, c, ReaderConfig{AppName: "prism_na1", StatusInterval: 100 * time.Millisecond})
	deadline := time.Now().Add(time.Minute)
	first := make(chan result, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		txn, err := r.Next(ctx)
		first <- result{txn, err}
	}()
	defer func() { cancel(); <-done }()
	poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })
	exec(ctx, t, c, "INSERT INTO t (batch) VALUES (1)")
	if txn := recv(t, first, deadline); batchOf(t, txn) != 1 {
		t.Fatalf("got batch %d, want 1", batchOf(t, txn))
	}
	// Batches 2-5 fill the buffer, 6 waits for room, 7 stays unread.
	for b := 2; b <= 7; b++ {
		exec(ctx, t, c, fmt.Sprintf("INSERT INTO t (batch) VALUES (%d)", b))
	}
	poll(t, deadline, "batch 6 decoded", func() bool { return r.Stats().Received >= 6 })
	if n := query[int](ctx, t, c, "SELECT count(pg_terminate_backend(pid))::int FROM pg_stat_replication WHERE application_name = 'prism_na1'"); n != 1 {
		t.Fatalf("terminated %d walsenders, want 1", n)
	}
	poll(t, deadline, "stream lost and noticed", func() bool { return r.Stats().Reconnects >= 1 })
	for b := 2; b <= 7; b++ {
		nctx, ncancel := context.WithTimeout(ctx, 30*time.Second)
		txn, err := r.Next(nctx)
		ncancel()
		if err != nil {
			t.Fatalf("Next() for batch %d = %v (batches lost after the stream was cut)", b, err)
		}
		if got := batchOf(t, txn); got != b {
			t.Fatalf("got batch %d, want %d: a transaction decoded but not yet handed out was dropped as a resend", got, b)
		}
	}
}

// TestReaderReleasesStalledStream leaves the consumer behind for longer
// than MaxStall: the Reader must close the replication connection (a
// walsender blocked on a client that does not read holds up slot
// invalidation and checkpoints), come back once Next is called, and lose
// nothing.
func TestReaderReleasesStalledStream(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "stalled"})
	exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int)")
	r := newTestReader(t, c, ReaderConfig{AppName: "prism_na1", StatusInterval: 100 * time.Millisecond, MaxStall: time.Second})
	deadline := time.Now().Add(time.Minute)
	first := make(chan result, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		txn, err := r.Next(ctx)
		first <- result{txn, err}
	}()
	defer func() { cancel(); <-done }()
	poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })
	exec(ctx, t, c, "INSERT INTO t (batch) VALUES (1)")
	if txn := recv(t, first, deadline); batchOf(t, txn) != 1 {
		t.Fatalf("got batch %d, want 1", batchOf(t, txn))
	}
	for b := 2; b <= 9; b++ {
		exec(ctx, t, c, fmt.Sprintf("INSERT INTO t (batch) VALUES (%d)", b))
	}
	poll(t, deadline, "replication connection released", func() bool { return !slotActive(ctx, t, c, "prism_na") })
	for b := 2; b <= 9; b++ {
		nctx, ncancel := context.WithTimeout(ctx, 30*time.Second)
		txn, err := r.Next(nctx)
		ncancel()
		if err != nil {
			t.Fatalf("Next() for batch %d = %v", b, err)
		}
		if got := batchOf(t, txn); got != b {
			t.Fatalf("got batch %d, want %d", got, b)
		}
	}
	poll(t, deadline, "slot read again", func() bool { return slotActive(ctx, t, c, "prism_na") })
}

// syncBuf is a bytes.Buffer safe for a logger shared by goroutines.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestReaderLogsResumePosition: a reader that starts on an existing slot
// (its own position 0/0, as after a restart) logs the position the server
// resumes from, the slot's confirmed_flush_lsn, not 0/0.
func TestReaderLogsResumePosition(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "resume-log"})
	exec(ctx, t, c, "CREATE TABLE t (id serial PRIMARY KEY, batch int)")
	r := newTestReader(t, c, ReaderConfig{Slot: "prism_na", AppName: "prism_na1"})
	ch := collect(t, r)
	deadline := time.Now().Add(time.Minute)
	poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })
	exec(ctx, t, c, "INSERT INTO t (batch) VALUES (1)")
	txn := recv(t, ch, deadline)
	r.Confirm(txn.EndLSN)
	poll(t, deadline, "the slot to confirm the transaction", func() bool { return confirmedFlush(ctx, t, c, "prism_na") >= txn.EndLSN })
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	poll(t, deadline, "the slot to be released", func() bool { return !slotActive(ctx, t, c, "prism_na") })
	want := confirmedFlush(ctx, t, c, "prism_na")

	logs := &syncBuf{}
	r2 := NewReader(ReaderConfig{DSN: c.DSN("postgres"), Region: "na", Slot: "prism_na", AppName: "prism_na1", StatusInterval: 200 * time.Millisecond}, zerolog.New(logs))
	defer r2.Close()
	collect(t, r2)
	poll(t, deadline, "the second reader to stream", func() bool { return strings.Contains(logs.String(), `"message":"streaming"`) })
	if wantLine := fmt.Sprintf(`"start":"%s"`, want); !strings.Contains(logs.String(), wantLine) {
		t.Fatalf("streaming line lacks %s (the slot's confirmed_flush_lsn):\n%s", wantLine, logs.String())
	}
}

// textFormServer is a server whose output settings all differ from the
// ones prism-cdc pins: without pinning, its walsender prints 2024-01-05 as
// 05/01/2024, rounds floats and prints intervals, bytea and timestamptz in
// other forms.
var textFormServer = map[string]string{
	"datestyle":          "'SQL, DMY'",
	"intervalstyle":      "'sql_standard'",
	"extra_float_digits": "0",
	"bytea_output":       "'escape'",
	"timezone":           "'Asia/Kolkata'",
}

// TestReaderTextForm checks that the replication connection prints values
// in the pinned text form whatever the server's settings, the database's
// defaults and the DSN's own options say.
func TestReaderTextForm(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "textform", Settings: textFormServer})
	exec(ctx, t, c, `ALTER DATABASE postgres SET extra_float_digits = -15;
		CREATE TABLE v (id int PRIMARY KEY, d date, d2 date, i interval, f8 float8, f8b float8, f8c float8, f4 real,
			tz timestamptz, b bytea)`)
	dsn := c.DSN("postgres") + " options='-c DateStyle=German -c IntervalStyle=iso_8601' DateStyle=Postgres"
	r := newTestReader(t, c, ReaderConfig{DSN: dsn})
	ch := collect(t, r)
	deadline := time.Now().Add(time.Minute)
	poll(t, deadline, "slot active", func() bool { return slotActive(ctx, t, c, "prism_na") })
	exec(ctx, t, c, `INSERT INTO v VALUES (1, '2024-01-05', '2024-01-31', '-1 days -02:03:04', 0.1, 1e-310, 1/3::float8,
		3.4028235e38, '2024-06-01 12:34:56.789+02', '\x00ff27'::bytea)`)
	txn := recv(t, ch, deadline)
	want := []string{"1", "2024-01-05", "2024-01-31", "-1 days -02:03:04", "0.1", "1e-310", "0.3333333333333333",
		"3.4028235e+38", "2024-06-01 10:34:56.789+00", `\x00ff27`}
	if len(txn.Changes) != 1 {
		t.Fatalf("transaction has %d changes, want 1", len(txn.Changes))
	}
	for i, v := range txn.Changes[0].New {
		if i >= len(want) || string(v.Data) != want[i] {
			t.Errorf("column %d = %q, want %q", i, v.Data, want[min(i, len(want)-1)])
		}
	}

	// A normal connection through Connect prints values the same way.
	conn, err := Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var got string
	if err := conn.QueryRow(ctx, "SELECT concat_ws('|', d, i, f8c, tz, b) FROM v").Scan(&got); err != nil {
		t.Fatal(err)
	}
	if w := `2024-01-05|-1 days -02:03:04|0.3333333333333333|2024-06-01 10:34:56.789+00|\x00ff27`; got != w {
		t.Errorf("Connect: row = %s, want %s", got, w)
	}
}

// TestReaderSignalsChanges: the Reader tells a waiting consumer through
// Changed when it starts streaming and when it stops, so the consumer
// need not poll Stats.
func TestReaderSignalsChanges(t *testing.T) {
	c := pgtest.Start(t, pgtest.Options{Name: "changed"})
	r := newTestReader(t, c, ReaderConfig{})
	collect(t, r)
	deadline := time.After(time.Minute)
	for {
		changed := r.Changed()
		if r.Stats().Streaming {
			break
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("Changed() not closed within a minute; Stats().Streaming = %v, want true", r.Stats().Streaming)
		}
	}
	changed := r.Changed()
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	default:
		t.Fatalf("Changed() still open after Close; Stats().Streaming = %v, want false", r.Stats().Streaming)
	}
	if r.Stats().Streaming {
		t.Fatalf("Stats().Streaming = true after Close, want false")
	}
}

// TestSlotPlugins: auto tries prism_pgoutput first before PostgreSQL 16
// only; a plugin set by name is the only one tried.
func TestSlotPlugins(t *testing.T) {
	for _, tc := range []struct {
		plugin string
		major  int
		want   string
	}{
		{"", 15, "prism_pgoutput,pgoutput"},
		{PluginAuto, 13, "prism_pgoutput,pgoutput"},
		{PluginAuto, 16, "pgoutput"},
		{PluginAuto, 17, "pgoutput"},
		{PluginPgoutput, 15, "pgoutput"},
		{PluginPrism, 15, "prism_pgoutput"},
		{PluginPrism, 16, "prism_pgoutput"},
	} {
		if got := strings.Join(slotPlugins(tc.plugin, tc.major), ","); got != tc.want {
			t.Errorf("slotPlugins(%q, %d) = %s, want %s", tc.plugin, tc.major, got, tc.want)
		}
	}
}
