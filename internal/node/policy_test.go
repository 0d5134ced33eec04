package node

import (
	"bytes"
	"context"
	"fmt"
	"maps"
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
	"github.com/prism-cdc/prism-cdc/pkg/decode"
	"github.com/prism-cdc/prism-cdc/pkg/peers"
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
	// stop stops a region's node (and waits for it).
	stop map[string]func()
	logs *syncBuf
}

var policyRegionNames = []string{"as", "eu", "na"}

// startPolicyRegions starts the regions with on_apply_error policy in
// every node.
func startPolicyRegions(t *testing.T, policy string) *policyRegions {
	t.Helper()
	policies := map[string]string{}
	for _, r := range policyRegionNames {
		policies[r] = policy
	}
	return startPolicyRegionsWith(t, policies)
}

// startPolicyRegionsWith starts the regions with each node's
// on_apply_error from policies, by region.
func startPolicyRegionsWith(t *testing.T, policies map[string]string) *policyRegions {
	t.Helper()
	ctx := context.Background()
	d := &policyRegions{t: t, clusters: map[string]*pgtest.Cluster{}, nodes: map[string]*Node{}, stop: map[string]func(){}, logs: &syncBuf{}}
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
		fmt.Fprintf(&b, "on_apply_error: %s\npeers:\n", policies[r])
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
		nodeCtx, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		d.stop[r] = func() { stop(); <-done }
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(done)
			if err := n.Run(nodeCtx); err != nil && nodeCtx.Err() == nil {
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

// TestFallbackFollowsTargetPolicy: the direct-SQL fallback to a region
// handles a transaction that fails there by the on_apply_error that
// region's nodes recorded (dead_letter in eu), not by its own node's
// (halt in na), so the failure is handled the same way whichever path
// applied it.
func TestFallbackFollowsTargetPolicy(t *testing.T) {
	d := startPolicyRegionsWith(t, map[string]string{"na": "halt", "eu": "dead_letter", "as": "halt"})
	if got := d.query("eu", "SELECT p->>'region' || ' ' || (p->>'policy') || ' ' || (p->>'node') || ' ' || (p->>'conflicts') FROM prism.apply_policy() p"); got != "eu dead_letter eu1 last_write_wins" {
		t.Fatalf("eu's recorded apply policy = %q, want eu dead_letter eu1 last_write_wins", got)
	}
	d.stop["eu"]()
	d.exec("na", "INSERT INTO users VALUES (2, 'dup@example.com')")
	d.exec("na", "INSERT INTO users VALUES (4, 'na@example.com')")
	// na1 applies to eu's database itself, parks row 2 there and goes on.
	d.eventually(30*time.Second, "na's fallback to eu parks row 2 and applies row 4", func() bool {
		return d.usersIn("eu", "1=dup@example.com,4=na@example.com") &&
			d.query("eu", "SELECT status || ' ' || table_name FROM prism.dead_letters WHERE source_region = 'na'") == "parked public.users"
	})
	if p := d.target("na", "eu").Path; p != peers.PathFallback {
		t.Fatalf("na -> eu path = %q, want the fallback", p)
	}
	// Row 2 stays where it was written.
	d.eventually(30*time.Second, "as gets na's rows", func() bool {
		return d.usersIn("as", "1=dup@example.com,2=dup@example.com,4=na@example.com")
	})
}

// TestFallbackPolicyChoice: the fallback's policy by what the target
// region recorded: this node's own (and one warning) while nothing is
// recorded, the recorded policy and its table overrides once it is, and
// this node's own again for a recorded value it does not know.
func TestFallbackPolicyChoice(t *testing.T) {
	ctx := context.Background()
	c := pgtest.Start(t, pgtest.Options{Name: "fallback-policy"})
	pool, err := apply.NewPool(ctx, c.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	var logs bytes.Buffer
	a := apply.NewApplier(pool, zerolog.New(&logs))
	defer a.Close()
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	cfg := &config.Config{OnApplyError: config.Halt}
	p := newFallbackPolicy(cfg, zerolog.New(&logs), "eu")
	failure := func(table string) error { return &apply.Error{Table: table, Err: fmt.Errorf("fails")} }
	check := func(table string, want config.ApplyErrorPolicy) {
		t.Helper()
		if got := p.policyFor(ctx, a, failure(table)); got != want {
			t.Errorf("policy for %q = %s, want %s", table, got, want)
		}
	}
	check("public.t", config.Halt)
	check("public.t", config.Halt)
	if n := strings.Count(logs.String(), "no node of the region has recorded its on_apply_error"); n != 1 {
		t.Errorf("%d warnings about the missing record, want 1:\n%s", n, logs.String())
	}
	if err := a.RecordPolicy(ctx, apply.RegionPolicy{Region: "eu", Node: "eu1", OnApplyError: "dead_letter", ErrorTables: map[string]string{"public.t": "undo"}}); err != nil {
		t.Fatal(err)
	}
	check("public.t", config.Undo)
	check("public.other", config.DeadLetter)
	check("", config.DeadLetter)
	// The node that starts last records its own.
	if err := a.RecordPolicy(ctx, apply.RegionPolicy{Region: "eu", Node: "eu2", OnApplyError: "bogus"}); err != nil {
		t.Fatal(err)
	}
	check("public.t", config.Halt)
	if !strings.Contains(logs.String(), `"recorded":"bogus","node":"eu2"`) {
		t.Errorf("no warning naming the unknown recorded policy:\n%s", logs.String())
	}
	// A record of another region (a database a DSN mixed up) is not eu's.
	if err := a.RecordPolicy(ctx, apply.RegionPolicy{Region: "na", Node: "na1", OnApplyError: "dead_letter"}); err != nil {
		t.Fatal(err)
	}
	check("public.t", config.Halt)
	if !strings.Contains(logs.String(), "the database holds region na's (node na1)") {
		t.Errorf("no warning naming the other region's record:\n%s", logs.String())
	}
	// The node's own applier never reads the record.
	own := newErrorPolicy(&config.Config{OnApplyError: config.DeadLetter}, zerolog.Nop())
	if got := own.policyFor(ctx, a, failure("public.t")); got != config.DeadLetter {
		t.Errorf("own policy = %s, want dead_letter", got)
	}
}

// TestFallbackConflicts: the direct-SQL fallback to a region resolves
// conflicts by the policies that region's nodes recorded (keep_local in
// eu, with a table override), not by its own node's (source_wins in na),
// and applies schema changes by their ddl setting: this node's own only
// while nothing, nothing of the kind, or nothing it knows is recorded, and
// it says so. It never installs the region's DDL capture.
func TestFallbackConflicts(t *testing.T) {
	ctx := context.Background()
	c := pgtest.Start(t, pgtest.Options{Name: "fallback-conflicts"})
	if err := c.Exec(ctx, "postgres", "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE u (id int PRIMARY KEY, v text)"); err != nil {
		t.Fatal(err)
	}
	pool, err := apply.NewPool(ctx, c.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	rec := apply.NewApplier(pool, zerolog.Nop())
	defer rec.Close()
	if err := rec.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	own := config.Conflicts{Default: config.SourceWins, Tables: map[string]config.ConflictPolicy{"public.u": config.LastWriteWins}}
	var logs syncBuf
	record := func(p apply.RegionPolicy) {
		t.Helper()
		p.Region, p.OnApplyError = "eu", "halt"
		if err := rec.RecordPolicy(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	cfg := &config.Config{Region: "na", Node: "na1", Conflicts: own, DDL: config.DDLReplicate}
	choice := func(name string, want config.Conflicts, wantDDL config.DDLMode, warning string) {
		t.Helper()
		before := logs.String()
		got, ddl := fallbackSettings(ctx, pool, cfg, "eu", zerolog.New(&logs))
		if got.Default != want.Default || !maps.Equal(got.Tables, want.Tables) || ddl != wantDDL {
			t.Errorf("%s: conflicts %v %v, ddl %s; want %v %v, ddl %s", name, got.Default, got.Tables, ddl, want.Default, want.Tables, wantDDL)
		}
		if logged := strings.TrimPrefix(logs.String(), before); !strings.Contains(logged, warning) {
			t.Errorf("%s: logged %q, want %q", name, logged, warning)
		}
	}
	choice("nothing recorded", own, config.DDLReplicate, "no node of the region has recorded its conflict policies")
	record(apply.RegionPolicy{Node: "eu0"})
	choice("an earlier version's record", own, config.DDLReplicate, "recorded no ddl setting (an earlier version)")
	record(apply.RegionPolicy{Node: "eu1", Conflicts: "keep_local", ConflictTables: map[string]string{"public.u": "source_wins"}, DDL: "off"})
	choice("recorded", config.Conflicts{Default: config.KeepLocal, Tables: map[string]config.ConflictPolicy{"public.u": config.SourceWins}}, config.DDLOff,
		"the region resolves conflicts differently from this node")
	choice("recorded ddl", config.Conflicts{Default: config.KeepLocal, Tables: map[string]config.ConflictPolicy{"public.u": config.SourceWins}}, config.DDLOff,
		"the region's ddl setting differs from this node's")
	record(apply.RegionPolicy{Node: "eu2", Conflicts: "keep_local", ConflictTables: map[string]string{"public.u": "bogus"}, DDL: "sometimes"})
	choice("unknown ones recorded", own, config.DDLReplicate, `"recorded":"keep_local"`)
	choice("an unknown ddl recorded", own, config.DDLReplicate, `"recorded":"sometimes"`)

	// The fallback applies by the record: na's update, older than the row
	// eu wrote, keeps eu's row in t (keep_local) and takes na's in u
	// (source_wins); by na's own it would be the other way round.
	record(apply.RegionPolicy{Node: "eu1", Conflicts: "keep_local", ConflictTables: map[string]string{"public.u": "source_wins"}, DDL: "replicate"})
	if err := c.Exec(ctx, "postgres", "INSERT INTO t VALUES (1, 'eu'); INSERT INTO u VALUES (1, 'eu')"); err != nil {
		t.Fatal(err)
	}
	n := &Node{cfg: cfg, log: zerolog.New(&logs)}
	open := n.fallback(config.Peer{Region: "eu", Database: c.DSN("postgres")})
	app, closeFallback, err := open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFallback()
	row := func(table string) decode.Change {
		r := &decode.Relation{ID: 1, Schema: "public", Table: table, ReplicaIdentity: decode.IdentityDefault,
			Columns: []decode.Column{{Name: "id", Key: true}, {Name: "v"}}}
		return decode.Change{Op: decode.OpUpdate, Rel: r, New: []decode.Value{
			{Kind: decode.ValueText, Data: []byte("1")}, {Kind: decode.ValueText, Data: []byte("na")}}}
	}
	txn := &decode.Txn{Origin: "na", CommitLSN: 0x1000, EndLSN: 0x1008, CommitTime: time.Now().Add(-time.Hour),
		Changes: []decode.Change{row("t"), row("u")}}
	if err := app.(*apply.Applier).Apply(ctx, txn); err != nil {
		t.Fatal(err)
	}
	var got string
	if err := pool.QueryRow(ctx, "SELECT (SELECT v FROM t WHERE id = 1) || ',' || (SELECT v FROM u WHERE id = 1)").Scan(&got); err != nil {
		t.Fatal(err)
	}
	if got != "eu,na" {
		t.Fatalf("t, u after the fallback applied na's updates = %s, want eu,na (eu's keep_local, and source_wins for u)", got)
	}
	// ddl: replicate here and there, and still no capture installed by
	// the fallback: that is eu's nodes' to do.
	var capture bool
	if err := pool.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'prism_ddl')").Scan(&capture); err != nil || capture {
		t.Fatalf("event trigger prism_ddl in eu after the fallback opened: %v, %v; want none", capture, err)
	}
}
