package e2e

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/faultproxy"
	"github.com/prism-cdc/prism-cdc/internal/scope"
	"github.com/prism-cdc/prism-cdc/internal/verify"
)

// Every row carries markers that tell where it may go: ssn values
// "SSN-SECRET-..." go nowhere, names "...-home-<home>..." only to the
// regions of that home (and everywhere for global), card tokens
// "TOKEN-SECRET-..." nowhere near region as.
//
// customers rows are written by the region that created them (moves
// between homes, TOASTed notes: REPLICA IDENTITY FULL); shared rows are
// updated by every region at once, so last-write-wins decides them with
// the ssn column left out; the filter reads a key column there.
const residencySchema = `
CREATE TABLE customers (id text PRIMARY KEY, home text NOT NULL, ssn text, name text NOT NULL, note text);
ALTER TABLE customers REPLICA IDENTITY FULL;
CREATE TABLE shared (id text, home text, ssn text, name text NOT NULL, PRIMARY KEY (id, home));
INSERT INTO shared SELECT 'shared-' || g, 'global', 'SSN-SECRET-shared', 'shared-' || g || '-home-global' FROM generate_series(1, 5) g;
CREATE TABLE card_tokens (id text PRIMARY KEY, token text NOT NULL);
`

// residencyScope is what region may hold: its own and global customers,
// never an ssn; region as never gets card tokens.
func residencyScope(region string) string {
	s := fmt.Sprintf(`{rows: {"public.customers": "home IN ('%[1]s', 'global')", "public.shared": "home IN ('%[1]s', 'global')"}, exclude_columns: {"public.customers": [ssn], "public.shared": [ssn]}`, region)
	if region == "as" {
		s += ", exclude_tables: [public.card_tokens]"
	}
	return s + "}"
}

// recorder keeps every byte a proxy forwarded.
type recorder struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (r *recorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.buf.Write(p)
}

func (r *recorder) Contains(s string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Contains(r.buf.Bytes(), []byte(s))
}

func (r *recorder) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.buf.Len()
}

func TestDataResidency(t *testing.T) {
	rng := rand.New(rand.NewSource(seed(t)))
	topo := Topology{"na": {"na1"}, "eu": {"eu1"}, "as": {"as1"}}
	d := New(t, topo, residencySchema)
	spoolDir := filepath.Join(d.Dir, "spool-na")

	// Every path out of a region goes through a recording proxy: peer
	// frames to each node, and the direct-SQL fallback to each database.
	recs := map[string]*recorder{} // "from>to" and "from>to sql"
	proxy := func(key, target string) string {
		p, err := faultproxy.New(target)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		r := &recorder{}
		recs[key] = r
		p.Record(r)
		return p.Addr()
	}
	peerAddr, dbDSN := map[string]string{}, map[string]string{}
	for _, from := range d.Regions {
		for _, to := range d.Regions {
			if from == to {
				continue
			}
			peerAddr[from+">"+to] = proxy(from+">"+to, d.Listen(topo[to][0]))
			c := d.Clusters[to]
			addr := proxy(from+">"+to+" sql", net.JoinHostPort(c.Host, fmt.Sprint(c.Port)))
			host, port, _ := net.SplitHostPort(addr)
			dbDSN[from+">"+to] = fmt.Sprintf("host=%s port=%s user=postgres dbname=app sslmode=disable", host, port)
		}
	}
	d.PeerAddr = func(from, to string) string { return peerAddr[from+">"+d.regionOf(to)] }
	d.PeerDatabase = func(from, to string) string { return dbDSN[from+">"+to] }
	d.PeerScope = func(_, to string) string { return residencyScope(to) }
	d.Extra = func(name string) string {
		// Small spill threshold: batches and large notes take the
		// spilled (chunked) path; na1 ships from a spool.
		s := "scope: " + residencyScope(d.regionOf(name)) + "\nspill: {above: 2KiB}\n"
		if name == "na1" {
			s += fmt.Sprintf("spool: {dir: %q}\n", spoolDir)
		}
		return s
	}
	d.StartAll()
	waitReaders(d)

	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, len(d.Regions))
	for _, r := range d.Regions {
		conn, err := d.Clusters[r].Connect(context.Background(), "app")
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func(r string, conn *pgx.Conn, rnd *rand.Rand) {
			defer wg.Done()
			defer conn.Close(context.Background())
			if err := residencyWriter(ctx, r, conn, rnd); err != nil {
				errs <- fmt.Errorf("writer %s: %w", r, err)
			}
		}(r, conn, rand.New(rand.NewSource(rng.Int63())))
	}

	// kill -9 eu1: na1 and as1 fall back to direct SQL into eu's database
	// until it is back.
	time.Sleep(3 * time.Second)
	t.Log("kill -9 eu1")
	d.Kill("eu1")
	d.Eventually(60*time.Second, "na and as ship to eu through the direct-SQL fallback", func() bool {
		return recs["na>eu sql"].Contains("-home-global") && recs["as>eu sql"].Contains("-home-global")
	})
	d.Start("eu1")
	time.Sleep(2 * time.Second)
	// kill -9 na1, which ships from its spool.
	t.Log("kill -9 na1")
	d.Kill("na1")
	time.Sleep(time.Duration(500+rng.Intn(1000)) * time.Millisecond)
	d.Start("na1")
	time.Sleep(3 * time.Second)
	stop()
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}

	// Every region converges to exactly its scope.
	for deadline := time.Now().Add(120 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		last := residencyMismatch(t, d)
		if last == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("regions do not hold exactly their scope after 2m:\n%s\n%s", last, d.Logs())
		}
	}

	var regions []verify.Region
	for _, r := range d.Regions {
		s, err := scope.New(scopeRules(r))
		if err != nil {
			t.Fatal(err)
		}
		regions = append(regions, verify.Region{Name: r, DSN: d.Clusters[r].DSN("app"), Scope: s})
	}
	rep, err := verify.Compare(context.Background(), regions, "prism", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	pairs := map[string]int{}
	for _, tr := range rep.Tables {
		if !tr.Equal {
			t.Errorf("verify: %s %v differs: %v", tr.Table, tr.Regions, tr.Diffs)
		}
		pairs[tr.Table]++
	}
	// customers and shared: 3 pairs each; card_tokens: na~eu only.
	if pairs["public.customers"] != 3 || pairs["public.shared"] != 3 || pairs["public.card_tokens"] != 1 || len(rep.Tables) != 7 {
		t.Errorf("verify compared %v (%d results), want 3 pairs of customers and shared, 1 of card_tokens", pairs, len(rep.Tables))
	}
	for _, r := range d.Regions {
		if n := count(t, d, r, "SELECT count(*) FROM shared WHERE ssn IS NOT NULL"); n != 5 {
			t.Errorf("region %s: %d shared rows keep their own ssn, want 5 (excluded columns are never written)", r, n)
		}
	}

	// Card tokens: as holds only its own; na and eu hold everyone's.
	tokens := map[string]int{}
	for _, r := range d.Regions {
		tokens[r] = count(t, d, r, "SELECT count(*) FROM card_tokens")
	}
	if own := count(t, d, "as", "SELECT count(*) FROM card_tokens WHERE id LIKE 'as-%'"); tokens["as"] != own || tokens["na"] != tokens["eu"] || tokens["na"] <= own {
		t.Errorf("card tokens per region %v (as's own %d): want as to hold only its own, na and eu all", tokens, own)
	}

	// Nothing out of scope ever left a region: not in peer frames, not
	// through the fallback, not in logs.
	for key, r := range recs {
		from, to, _ := strings.Cut(strings.TrimSuffix(key, " sql"), ">")
		if r.Contains("SSN-SECRET") {
			t.Errorf("%s carried an ssn value", key)
		}
		if r.Contains("-home-" + from) {
			t.Errorf("%s carried a row homed in %s", key, from)
		}
		if to == "as" && r.Contains("TOKEN-SECRET") {
			t.Errorf("%s carried a card token", key)
		}
		if !strings.HasSuffix(key, " sql") && !r.Contains("-home-global") {
			t.Errorf("%s recorded %d bytes without an in-scope row: the recording misses the traffic", key, r.Len())
		}
	}
	for _, r := range d.Regions {
		for _, n := range topo[r] {
			if b, _ := os.ReadFile(d.LogPath(n)); bytes.Contains(b, []byte("SSN-SECRET")) {
				t.Errorf("log of %s holds an ssn value", n)
			}
		}
	}
	// The spool holds na's own transactions, unfiltered, like its WAL: it
	// never leaves the node, and what it hands a region is filtered.
	if !dirContains(t, spoolDir, "SSN-SECRET") {
		t.Errorf("spool %s holds no ssn value: na1 did not ship from its spool", spoolDir)
	}
	if t.Failed() {
		t.Log(d.Logs())
	}
}

func scopeRules(region string) scope.Rules {
	f := fmt.Sprintf("home IN ('%s', 'global')", region)
	r := scope.Rules{
		Rows:           map[string]string{"public.customers": f, "public.shared": f},
		ExcludeColumns: map[string][]string{"public.customers": {"ssn"}, "public.shared": {"ssn"}},
	}
	if region == "as" {
		r.ExcludeTables = []string{"public.card_tokens"}
	}
	return r
}

// residencyWriter writes region's own customers until ctx is done: inserts
// homed in the region or global, updates, moves between the two homes
// (with the TOASTed note unchanged), deletes, batches large enough to
// spill, card tokens, and updates of the shared rows every region writes.
func residencyWriter(ctx context.Context, region string, conn *pgx.Conn, rnd *rand.Rand) error {
	homes := map[string]string{}
	var ids []string
	seq := 0
	bg := context.Background() // a write in flight is not cancelled
	insert := func(tx pgx.Tx) error {
		seq++
		id := fmt.Sprintf("%s-%06d", region, seq)
		home := region
		if rnd.Intn(2) == 0 {
			home = "global"
		}
		var note any
		if rnd.Intn(5) == 0 {
			b := make([]byte, 3000)
			rnd.Read(b)
			note = hex.EncodeToString(b) // incompressible: stored out of line
		}
		if _, err := tx.Exec(bg, "INSERT INTO customers VALUES ($1, $2, $3, $4, $5)", id, home, "SSN-SECRET-"+id, id+"-home-"+home, note); err != nil {
			return err
		}
		homes[id] = home
		ids = append(ids, id)
		return nil
	}
	for seq2 := 0; ctx.Err() == nil; seq2++ {
		time.Sleep(10 * time.Millisecond)
		tx, err := conn.Begin(bg)
		if err != nil {
			return err
		}
		op := rnd.Intn(100)
		switch {
		case op < 30 || len(ids) < 5:
			err = insert(tx)
		case op < 33:
			for i := 0; i < 30 && err == nil; i++ {
				err = insert(tx)
			}
		case op < 55:
			id := ids[rnd.Intn(len(ids))]
			_, err = tx.Exec(bg, "UPDATE customers SET name = $2 WHERE id = $1", id, fmt.Sprintf("%s-home-%s-v%d", id, homes[id], seq2))
		case op < 80:
			id := ids[rnd.Intn(len(ids))]
			to := "global"
			if homes[id] == "global" {
				to = region
			}
			_, err = tx.Exec(bg, "UPDATE customers SET home = $2, name = $3 WHERE id = $1", id, to, id+"-home-"+to)
			homes[id] = to
		case op < 85:
			i := rnd.Intn(len(ids))
			_, err = tx.Exec(bg, "DELETE FROM customers WHERE id = $1", ids[i])
			delete(homes, ids[i])
			ids = append(ids[:i], ids[i+1:]...)
		case op < 93:
			_, err = tx.Exec(bg, "UPDATE shared SET name = $2, ssn = $3 WHERE id = $1", fmt.Sprintf("shared-%d", 1+rnd.Intn(5)),
				fmt.Sprintf("shared-home-global-by-%s-%d", region, seq2), fmt.Sprintf("SSN-SECRET-%s-%d", region, seq2))
		default:
			_, err = tx.Exec(bg, "INSERT INTO card_tokens VALUES ($1, $2)", fmt.Sprintf("%s-tok-%d", region, seq2), fmt.Sprintf("TOKEN-SECRET-%s-%d", region, seq2))
		}
		if err != nil {
			tx.Rollback(bg)
			return err
		}
		if err := tx.Commit(bg); err != nil {
			return err
		}
	}
	return nil
}

// residencyMismatch describes how some region's customers differ from its
// scope, or returns "": region Y holds its own rows, the other regions'
// global rows, no other row, and no ssn but its own.
func residencyMismatch(t *testing.T, d *Deployment) string {
	t.Helper()
	rows := map[string]map[string]string{} // region -> id -> home|name|md5(note)|has ssn
	for _, r := range d.Regions {
		rows[r] = map[string]string{}
		conn, err := d.Clusters[r].Connect(context.Background(), "app")
		if err != nil {
			return err.Error()
		}
		res, err := conn.Query(context.Background(), "SELECT id, home, name, coalesce(md5(note), '-'), ssn IS NOT NULL FROM customers")
		if err != nil {
			conn.Close(context.Background())
			return err.Error()
		}
		for res.Next() {
			var id, home, name, note string
			var ssn bool
			if err := res.Scan(&id, &home, &name, &note, &ssn); err != nil {
				t.Fatal(err)
			}
			rows[r][id] = fmt.Sprintf("%s|%s|%s|%v", home, name, note, ssn)
		}
		res.Close()
		conn.Close(context.Background())
	}
	var out []string
	for _, y := range d.Regions {
		want := map[string]string{}
		for _, x := range d.Regions {
			for id, v := range rows[x] {
				switch {
				case !strings.HasPrefix(id, x+"-"):
				case x == y:
					want[id] = v
				case strings.HasPrefix(v, "global|"):
					want[id] = strings.TrimSuffix(v, "|true") + "|false"
				}
			}
		}
		var diff []string
		for id, v := range want {
			if rows[y][id] != v {
				diff = append(diff, fmt.Sprintf("%s: have %q want %q", id, rows[y][id], v))
			}
		}
		for id, v := range rows[y] {
			if _, ok := want[id]; !ok {
				diff = append(diff, fmt.Sprintf("%s: have %q, outside the scope", id, v))
			}
		}
		if len(diff) > 0 {
			sort.Strings(diff)
			if len(diff) > 5 {
				diff = append(diff[:5], fmt.Sprintf("... %d more", len(diff)-5))
			}
			out = append(out, y+": "+strings.Join(diff, "; "))
		}
	}
	return strings.Join(out, "\n")
}

func count(t *testing.T, d *Deployment, region, q string) int {
	t.Helper()
	conn, err := d.Clusters[region].Connect(context.Background(), "app")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(context.Background(), q).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func dirContains(t *testing.T, dir, s string) bool {
	t.Helper()
	found := false
	filepath.WalkDir(dir, func(path string, e os.DirEntry, err error) error {
		if err != nil || e.IsDir() || found {
			return nil
		}
		if b, err := os.ReadFile(path); err == nil && bytes.Contains(b, []byte(s)) {
			found = true
		}
		return nil
	})
	return found
}
