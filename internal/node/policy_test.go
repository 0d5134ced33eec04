package node

import (
	"bytes"
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
	"github.com/prism-cdc/prism-cdc/internal/logtest"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
)

// syncBuf collects log output across goroutines.
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

// policyRegions is three regions with one in-process node each. Table
// users exists everywhere with REPLICA IDENTITY FULL and row (1, dup);
// only eu has a unique index on email.
type policyRegions struct {
	t        *testing.T
	clusters map[string]*pgtest.Cluster
	nodes    map[string]*Node
	logs     *syncBuf
}

var policyRegionNames = []string{"as", "eu", "na"}

func startPolicyRegions(t *testing.T, policy string) *policyRegions {
	t.Helper()
	ctx := context.Background()
	d := &policyRegions{t: t, clusters: map[string]*pgtest.Cluster{}, nodes: map[string]*Node{}, logs: &syncBuf{}}
	listen := map[string]string{}
	for _, r := range policyRegionNames {
		c := pgtest.Start(t, pgtest.Options{Name: "pol-" + r})
		if err := c.CreateDatabase(ctx, "app"); err != nil {
			t.Fatal(err)
		}
		schema := `CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL);
			ALTER TABLE users REPLICA IDENTITY FULL;
			INSERT INTO users VALUES (1, 'dup@example.com');`
		if r == "eu" {
			schema += "CREATE UNIQUE INDEX users_email ON users (email);"
		}
		if err := c.Exec(ctx, "app", schema); err != nil {
			t.Fatal(err)
		}
		d.clusters[r] = c
		listen[r] = pgtest.FreeAddr(t)
	}
	dir := t.TempDir()
	checked := logtest.New(t, d.logs) // reports after the nodes stopped
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		if t.Failed() {
			t.Logf("node logs:\n%s", d.logs.String())
		}
	})
	for _, r := range policyRegionNames {
		var b strings.Builder
		fmt.Fprintf(&b, "node: %s1\nregion: %s\ndatabase: %q\nlisten: %q\n", r, r, d.clusters[r].DSN("app"), listen[r])
		b.WriteString("auth: {token: policy-test-token, insecure: true}\n")
		b.WriteString("delivery: {ack_timeout: 1s, retries: 2, backoff: 50ms, max_backoff: 300ms}\n")
		fmt.Fprintf(&b, "on_apply_error: %s\npeers:\n", policy)
		for _, p := range policyRegionNames {
			if p != r {
				fmt.Fprintf(&b, "  - region: %s\n    database: %q\n    nodes: [{name: %s1, addr: %q}]\n", p, d.clusters[p].DSN("app"), p, listen[p])
			}
		}
		path := filepath.Join(dir, r+".yaml")
		if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := config.Load(path)
		if err != nil {
			t.Fatalf("config %s: %v\n%s", r, err, b.String())
		}
		log := zerolog.New(checked).With().Timestamp().Str("node", r+"1").Str("region", r).Logger()
		n := New(cfg, log)
		d.nodes[r] = n
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := n.Run(ctx); err != nil && ctx.Err() == nil {
				d.logs.Write([]byte("node " + r + " stopped: " + err.Error() + "\n"))
			}
		}()
	}
	d.eventually(60*time.Second, "every node reads its slot", func() bool {
		for _, n := range d.nodes {
			if role, _ := n.currentRole(); role != RoleReader {
				return false
			}
		}
		return true
	})
	return d
}

func (d *policyRegions) eventually(timeout time.Duration, what string, cond func() bool) {
	d.t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			d.t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (d *policyRegions) exec(region, sql string) {
	d.t.Helper()
	if err := d.clusters[region].Exec(context.Background(), "app", sql); err != nil {
		d.t.Fatal(err)
	}
}

// query returns the single text value of sql in region ("" on error, so it
// can be polled).
func (d *policyRegions) query(region, sql string) string {
	ctx := context.Background()
	conn, err := d.clusters[region].Connect(ctx, "app")
	if err != nil {
		return ""
	}
	defer conn.Close(ctx)
	var s *string
	if err := conn.QueryRow(ctx, sql).Scan(&s); err != nil || s == nil {
		return ""
	}
	return *s
}

const usersSQL = "SELECT coalesce(string_agg(id || '=' || email, ',' ORDER BY id), '') FROM users"

// usersIn reports whether region holds exactly these users.
func (d *policyRegions) usersIn(region, want string) bool { return d.query(region, usersSQL) == want }

// allEqual waits until every region holds exactly want.
func (d *policyRegions) allEqual(want string) {
	d.t.Helper()
	d.eventually(60*time.Second, "every region holds users "+want, func() bool {
		for _, r := range policyRegionNames {
			if !d.usersIn(r, want) {
				return false
			}
		}
		return true
	})
}

func (d *policyRegions) target(source, target string) TargetStatus {
	for _, ts := range d.nodes[source].Status().Targets {
		if ts.Region == target {
			return ts
		}
	}
	return TargetStatus{}
}

func (d *policyRegions) applier(region string) *apply.Applier {
	return d.nodes[region].applier
}

func TestApplyErrorHalt(t *testing.T) {
	d := startPolicyRegions(t, "halt")
	d.exec("na", "INSERT INTO users VALUES (2, 'dup@example.com')")
	d.eventually(30*time.Second, "na1 reports eu halted", func() bool {
		return strings.HasPrefix(d.target("na", "eu").Path, "halted:")
	})
	path := d.target("na", "eu").Path
	for _, want := range []string{"23505", "public.users", "Key (email)=(dup@example.com) already exists", "origin na", "xid "} {
		if !strings.Contains(path, want) {
			t.Errorf("halted path %q does not name %q", path, want)
		}
	}
	// eu records the halted transaction; its origin stays below it.
	d.eventually(10*time.Second, "eu records the halted transaction", func() bool {
		return d.query("eu", "SELECT status || ' ' || table_name FROM prism.dead_letters WHERE source_region = 'na'") == "halted public.users"
	})
	// Other regions continue: as receives na's rows, as's rows reach everyone.
	d.exec("as", "INSERT INTO users VALUES (3, 'as@example.com')")
	d.exec("na", "INSERT INTO users VALUES (4, 'na@example.com')")
	d.eventually(30*time.Second, "as and na get each other's rows, eu gets as's", func() bool {
		return d.usersIn("as", "1=dup@example.com,2=dup@example.com,3=as@example.com,4=na@example.com") &&
			d.usersIn("na", "1=dup@example.com,2=dup@example.com,3=as@example.com,4=na@example.com") &&
			d.usersIn("eu", "1=dup@example.com,3=as@example.com")
	})
	if p := d.target("na", "eu").Path; !strings.HasPrefix(p, "halted:") {
		t.Fatalf("eu path = %q, want still halted", p)
	}
	// The operator fixes the cause: eu resumes by itself.
	d.exec("eu", "DROP INDEX users_email")
	d.allEqual("1=dup@example.com,2=dup@example.com,3=as@example.com,4=na@example.com")
	d.eventually(10*time.Second, "na1 reports eu no longer halted", func() bool {
		return !strings.HasPrefix(d.target("na", "eu").Path, "halted")
	})
	dls, err := d.applier("eu").DeadLetters(context.Background(), "na")
	if err != nil || len(dls) != 1 || dls[0].Status != apply.StatusResolved {
		t.Fatalf("dead letters after the fix = %+v, %v; want one resolved", dls, err)
	}
}

func TestApplyErrorHaltSkip(t *testing.T) {
	d := startPolicyRegions(t, "halt")
	d.exec("na", "INSERT INTO users VALUES (2, 'dup@example.com')")
	d.eventually(30*time.Second, "eu records the halted transaction", func() bool {
		return d.query("eu", "SELECT status FROM prism.dead_letters WHERE source_region = 'na'") == "halted"
	})
	d.exec("na", "INSERT INTO users VALUES (4, 'na@example.com')")
	dls, err := d.applier("eu").DeadLetters(context.Background(), "na", apply.StatusHalted)
	if err != nil || len(dls) != 1 {
		t.Fatalf("halted dead letters = %v, %v", dls, err)
	}
	ctx := context.Background()
	var skipErr error
	d.eventually(30*time.Second, "skip succeeds (the origin is free between retries)", func() bool {
		skipErr = d.applier("eu").Skip(ctx, "na", dls[0].EndLSN, "test")
		return skipErr == nil
	})
	// eu continues after the skipped transaction; na and as keep row 2.
	d.eventually(30*time.Second, "eu applies what follows the skipped transaction", func() bool {
		return d.usersIn("eu", "1=dup@example.com,4=na@example.com") &&
			d.usersIn("as", "1=dup@example.com,2=dup@example.com,4=na@example.com")
	})
	if got := d.query("eu", "SELECT status || ' ' || note FROM prism.dead_letters WHERE source_region = 'na'"); got != "skipped test" {
		t.Fatalf("dead letter after skip = %q", got)
	}
}

func TestApplyErrorDeadLetter(t *testing.T) {
	d := startPolicyRegions(t, "dead_letter")
	d.exec("na", "INSERT INTO users VALUES (2, 'dup@example.com')")
	d.exec("na", "INSERT INTO users VALUES (4, 'na@example.com')")
	d.exec("as", "INSERT INTO users VALUES (3, 'as@example.com')")
	// eu parks the failing transaction and continues with the next ones.
	d.eventually(30*time.Second, "eu parks row 2 and applies the rest", func() bool {
		return d.usersIn("eu", "1=dup@example.com,3=as@example.com,4=na@example.com") &&
			d.usersIn("na", "1=dup@example.com,2=dup@example.com,3=as@example.com,4=na@example.com")
	})
	if p := d.target("na", "eu").Path; strings.HasPrefix(p, "halted") {
		t.Fatalf("eu path = %q, want not halted", p)
	}
	ctx := context.Background()
	dls, err := d.applier("eu").DeadLetters(ctx, "", apply.StatusParked)
	if err != nil || len(dls) != 1 {
		t.Fatalf("parked dead letters = %v, %v; want one", dls, err)
	}
	if dl := dls[0]; dl.SourceRegion != "na" || dl.SQLState != "23505" || dl.Table != "public.users" ||
		!strings.Contains(string(dl.Changes), `"dup@example.com"`) || dl.Xid == 0 {
		t.Fatalf("dead letter = %+v, changes %s", dl, dl.Changes)
	}
	// A retry before the fix stays parked; after the fix it applies.
	if err := d.applier("eu").Retry(ctx, dls[0].ID); err == nil {
		t.Fatalf("Retry before the fix = nil")
	}
	d.exec("eu", "DROP INDEX users_email")
	if err := d.applier("eu").Retry(ctx, dls[0].ID); err != nil {
		t.Fatalf("Retry after the fix = %v", err)
	}
	d.allEqual("1=dup@example.com,2=dup@example.com,3=as@example.com,4=na@example.com")
	if got := d.query("eu", "SELECT status || ' ' || attempts FROM prism.dead_letters"); got != "retried 3" {
		t.Fatalf("dead letter after retry = %q, want retried 3", got)
	}
	// Replication goes on normally after the retry (it was not shipped again).
	d.exec("eu", "INSERT INTO users VALUES (5, 'eu@example.com')")
	d.allEqual("1=dup@example.com,2=dup@example.com,3=as@example.com,4=na@example.com,5=eu@example.com")
	if got := d.query("na", "SELECT count(*)::text FROM prism.conflicts"); got != "0" {
		t.Fatalf("na recorded %s conflicts, want 0 (the retry must not travel back)", got)
	}
}

func TestApplyErrorUndo(t *testing.T) {
	d := startPolicyRegions(t, "undo")
	d.exec("na", "INSERT INTO users VALUES (2, 'dup@example.com')")
	d.exec("as", "INSERT INTO users VALUES (3, 'as@example.com')")
	// The row disappears from na and as, never appears in eu.
	d.allEqual("1=dup@example.com,3=as@example.com")
	d.eventually(30*time.Second, "na's undo log and eu's dead letter show the undo", func() bool {
		return d.query("na", "SELECT status || ' ' || requested_by || ' ' || sqlstate FROM prism.undo_log") == "undone eu 23505" &&
			d.query("eu", "SELECT status FROM prism.dead_letters WHERE source_region = 'na'") == "undone"
	})
	if got := d.query("eu", "SELECT count(*)::text FROM users WHERE id = 2"); got != "0" {
		t.Fatalf("eu holds row 2")
	}
	// Replication continues in every direction.
	d.exec("na", "INSERT INTO users VALUES (4, 'na@example.com')")
	d.exec("eu", "INSERT INTO users VALUES (5, 'eu@example.com')")
	d.allEqual("1=dup@example.com,3=as@example.com,4=na@example.com,5=eu@example.com")
	for _, r := range policyRegionNames {
		if p := d.target(r, "eu").Path; strings.HasPrefix(p, "halted") {
			t.Fatalf("%s -> eu path = %q", r, p)
		}
	}
}
