package node

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// TestScopeInProcess runs na and eu in this process (so the race detector
// sees the filtering): eu may receive only customers homed in eu, never an
// ssn, never a card token. na ships from a spool, large transactions spill,
// and a transaction eu cannot apply is parked in eu's dead letters with
// only what eu may hold.
func TestScopeInProcess(t *testing.T) {
	ctx := context.Background()
	clusters := map[string]*pgtest.Cluster{}
	listen := map[string]string{}
	for _, r := range []string{"eu", "na"} {
		c := pgtest.Start(t, pgtest.Options{Name: "scope-" + r})
		if err := c.CreateDatabase(ctx, "app"); err != nil {
			t.Fatal(err)
		}
		schema := `CREATE TABLE customers (id int PRIMARY KEY, home text NOT NULL, ssn text, name text NOT NULL);
			ALTER TABLE customers REPLICA IDENTITY FULL;
			CREATE TABLE card_tokens (id int PRIMARY KEY, token text NOT NULL);`
		if r == "eu" {
			schema += "ALTER TABLE customers ADD CHECK (name <> 'refused');"
		}
		if err := c.Exec(ctx, "app", schema); err != nil {
			t.Fatal(err)
		}
		clusters[r], listen[r] = c, pgtest.FreeAddr(t)
	}
	logs := &syncBuf{}
	dir := t.TempDir()
	runCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		if t.Failed() {
			t.Logf("node logs:\n%s", logs.String())
		}
	})
	nodes := map[string]*Node{}
	for r, peer := range map[string]string{"na": "eu", "eu": "na"} {
		var b strings.Builder
		fmt.Fprintf(&b, "node: %s1\nregion: %s\ndatabase: %q\nlisten: %q\n", r, r, clusters[r].DSN("app"), listen[r])
		b.WriteString("auth: {token: scope-test-token, insecure: true}\non_apply_error: dead_letter\nspill: {above: 1KiB}\n")
		b.WriteString("delivery: {ack_timeout: 1s, retries: 2, backoff: 50ms, max_backoff: 300ms}\n")
		fmt.Fprintf(&b, "peers:\n  - region: %s\n    database: %q\n    nodes: [{name: %s1, addr: %q}]\n", peer, clusters[peer].DSN("app"), peer, listen[peer])
		if r == "na" {
			fmt.Fprintf(&b, "    scope: {exclude_tables: [public.card_tokens], rows: {public.customers: \"home = 'eu'\"}, exclude_columns: {public.customers: [ssn]}}\n")
			fmt.Fprintf(&b, "spool: {dir: %q}\n", filepath.Join(dir, "spool"))
		}
		path := filepath.Join(dir, r+".yaml")
		if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := config.Load(path)
		if err != nil {
			t.Fatalf("config %s: %v\n%s", r, err, b.String())
		}
		n := New(cfg, zerolog.New(logs).With().Str("node", r+"1").Logger())
		nodes[r] = n
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := n.Run(runCtx); err != nil && runCtx.Err() == nil {
				logs.Write([]byte("node " + r + " stopped: " + err.Error() + "\n"))
			}
		}()
	}
	eventually := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(60 * time.Second); !cond(); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	eventually("both nodes read their slot", func() bool {
		for _, n := range nodes {
			if role, _ := n.currentRole(); role != RoleReader {
				return false
			}
		}
		return true
	})
	exec := func(sql string) {
		t.Helper()
		if err := clusters["na"].Exec(ctx, "app", sql); err != nil {
			t.Fatal(err)
		}
	}
	exec(`INSERT INTO customers SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'na' END, 'SSN-SECRET-' || g, 'c' || g FROM generate_series(1, 200) g`) // spilled
	exec(`INSERT INTO card_tokens VALUES (1, 'TOKEN-SECRET')`)
	exec(`UPDATE customers SET home = 'eu' WHERE id = 1`)                           // na -> eu: an INSERT for eu
	exec(`UPDATE customers SET home = 'na' WHERE id = 2`)                           // eu -> na: a DELETE for eu
	exec(`UPDATE customers SET name = 'renamed' WHERE id IN (3, 4)`)                // only 4 is eu's
	exec(`INSERT INTO customers VALUES (1000, 'eu', 'SSN-SECRET-1000', 'refused')`) // eu refuses: dead letter

	query := func(sql string) string {
		conn, err := clusters["eu"].Connect(ctx, "app")
		if err != nil {
			return err.Error()
		}
		defer conn.Close(ctx)
		var s string
		if err := conn.QueryRow(ctx, sql).Scan(&s); err != nil {
			return err.Error()
		}
		return s
	}
	// eu holds the even ids (but 2) and 1, renamed 4, no ssn, no token.
	want := "100 rows, min 1, 4=renamed, 0 ssn, 0 outside, 0 tokens, 1 dead letters"
	got := ""
	eventually("eu holds exactly its scope", func() bool {
		got = query(`SELECT format('%s rows, min %s, 4=%s, %s ssn, %s outside, %s tokens, %s dead letters',
			count(*), min(id), max(name) FILTER (WHERE id = 4), count(ssn), count(*) FILTER (WHERE home <> 'eu'),
			(SELECT count(*) FROM card_tokens), (SELECT count(*) FROM prism.dead_letters)) FROM customers`)
		return got == want
	})
	if dl := query(`SELECT d::text FROM prism.dead_letters d`); strings.Contains(dl, "SSN-SECRET") || !strings.Contains(dl, "refused") {
		t.Errorf("dead letter = %s, want the refused row without its ssn", dl)
	}
	// A transaction with nothing for eu still moves eu's progress (and
	// with it the slot) past it: it is the only one after before.
	conn, err := clusters["na"].Connect(ctx, "app")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var before string
	if err := conn.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&before); err != nil {
		t.Fatal(err)
	}
	exec(`INSERT INTO customers VALUES (1001, 'na', 'SSN-SECRET-1001', 'last')`)
	eventually("eu's progress passes na's last transaction, which had nothing for eu", func() bool {
		return query(fmt.Sprintf("SELECT (pg_replication_origin_progress('prism_na', true) > '%s'::pg_lsn)::text", before)) == "true"
	})

	// Tables renamed while the nodes run keep their scope: pgoutput names
	// the rows by the new names, which peers[].scope does not. eu renames
	// first; na's rows under the old names then go to the renamed tables.
	if err := clusters["eu"].Exec(ctx, "app", "ALTER TABLE customers RENAME TO clients; ALTER TABLE card_tokens RENAME TO tokens"); err != nil {
		t.Fatal(err)
	}
	exec(`INSERT INTO customers VALUES (1002, 'eu', 'SSN-SECRET-1002', 'before the rename')`)
	exec(`ALTER TABLE customers RENAME TO clients; ALTER TABLE card_tokens RENAME TO tokens`)
	exec(`INSERT INTO clients VALUES (2000, 'na', 'SSN-SECRET-2000', 'not eu''s'), (2001, 'eu', 'SSN-SECRET-2001', 'after the rename')`)
	exec(`INSERT INTO tokens VALUES (2, 'TOKEN-SECRET-2')`)
	exec(`INSERT INTO clients SELECT g, 'eu', 'SSN-SECRET-' || g, 'bulk' FROM generate_series(3000, 3199) g`) // spilled
	exec(`INSERT INTO clients VALUES (2002, 'eu', NULL, 'last')`)
	want = "303 rows, 0 ssn, 0 outside, 0 tokens, last: last"
	for deadline := time.Now().Add(60 * time.Second); got != want; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("eu after the renames: %s; want %s", got, want)
		}
		got = query(`SELECT format('%s rows, %s ssn, %s outside, %s tokens, last: %s', count(*), count(ssn), count(*) FILTER (WHERE home <> 'eu'),
			(SELECT count(*) FROM tokens), max(name) FILTER (WHERE id = 2002)) FROM clients`)
	}
	if got := query(`SELECT string_agg(name, ', ' ORDER BY id) FROM clients WHERE id > 1001 AND id < 3000`); got != "before the rename, after the rename, last" {
		t.Errorf("eu's rows after 1001: %s", got)
	}
	for _, table := range []string{"public.clients", "public.tokens"} {
		if n := strings.Count(logs.String(), `"table":"`+table+`","configured"`); n != 1 {
			t.Errorf("na warned %d times that %s was renamed, want once", n, table)
		}
	}
	if strings.Contains(logs.String(), "SSN-SECRET") {
		t.Errorf("a node logged an ssn value")
	}
}
