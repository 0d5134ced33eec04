package e2e

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/node"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

const schema = `
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, updated_by text NOT NULL);
CREATE TABLE ledger (id text PRIMARY KEY, region text NOT NULL, account int NOT NULL, amount bigint NOT NULL);
INSERT INTO accounts SELECT g, 0, 'seed' FROM generate_series(1, 20) g;
`

var threeRegions = Topology{"na": {"na1"}, "eu": {"eu1", "eu2"}, "as": {"as1"}}

func seed(t *testing.T) int64 {
	s := time.Now().UnixNano()
	if v := os.Getenv("PRISM_SEED"); v != "" {
		var err error
		if s, err = strconv.ParseInt(v, 10, 64); err != nil {
			t.Fatalf("PRISM_SEED=%q: %v", v, err)
		}
	}
	t.Logf("seed %d (replay with PRISM_SEED=%d)", s, s)
	return s
}

// writers runs one client per region: every write inserts one ledger row
// of its own and updates a shared account (rows all regions write).
type writers struct {
	written map[string]*atomic.Int64
	errs    chan error
	wg      sync.WaitGroup
	stop    context.CancelFunc
}

func startWriters(t *testing.T, d *Deployment, every time.Duration) *writers {
	ctx, cancel := context.WithCancel(context.Background())
	w := &writers{written: map[string]*atomic.Int64{}, errs: make(chan error, len(d.Regions)), stop: cancel}
	for _, r := range d.Regions {
		w.written[r] = new(atomic.Int64)
	}
	for _, r := range d.Regions {
		written := w.written[r]
		conn, err := d.Clusters[r].Connect(ctx, "app")
		if err != nil {
			t.Fatal(err)
		}
		w.wg.Add(1)
		go func(r string, conn *pgx.Conn) {
			defer w.wg.Done()
			defer conn.Close(context.Background())
			for seq := 1; ; seq++ {
				select {
				case <-ctx.Done():
					return
				case <-time.After(every):
				}
				account := 1 + (seq*7+len(r))%20
				// Not ctx: cancelling a write in flight could commit it
				// and still report an error, and it would go uncounted.
				_, err := conn.Exec(context.Background(), `WITH l AS (INSERT INTO ledger VALUES ($1, $2, $3, $4))
					UPDATE accounts SET balance = balance + $4, updated_by = $2 WHERE id = $3`,
					fmt.Sprintf("%s-%06d", r, seq), r, account, int64(seq%13+1))
				if err != nil {
					w.errs <- fmt.Errorf("writer %s: %w", r, err)
					return
				}
				written.Add(1)
			}
		}(r, conn)
	}
	return w
}

func (w *writers) Stop(t *testing.T) int64 {
	w.stop()
	w.wg.Wait()
	select {
	case err := <-w.errs:
		t.Fatal(err)
	default:
	}
	var total int64
	for _, n := range w.written {
		total += n.Load()
	}
	return total
}

func waitReaders(d *Deployment) {
	d.Eventually(60*time.Second, "one reader per region", func() bool {
		for _, r := range d.Regions {
			readers := 0
			for _, n := range d.topo[r] {
				if d.Role(n) == node.RoleReader {
					readers++
				}
			}
			if readers != 1 {
				return false
			}
		}
		return true
	})
}

// converged waits until every region holds the same rows and every ledger
// row written exactly once.
func converged(t *testing.T, d *Deployment, total int64) {
	t.Helper()
	ctx := context.Background()
	counts := map[string]int64{}
	deadline := time.Now().Add(120 * time.Second)
	for {
		ok := true
		for _, r := range d.Regions {
			var n int64
			c, err := d.Clusters[r].Connect(ctx, "app")
			if err != nil {
				ok = false
				continue
			}
			err = c.QueryRow(ctx, "SELECT count(*) FROM ledger").Scan(&n)
			c.Close(ctx)
			counts[r] = n
			if err != nil || n != total {
				ok = false
			}
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			var status []string
			for _, ns := range d.topo {
				for _, n := range ns {
					st, _ := d.Status(n)
					status = append(status, fmt.Sprintf("%s: role=%s targets=%+v", n, st.Role, st.Targets))
				}
			}
			t.Fatalf("ledger rows per region %v, want %d everywhere\nmissing: %s\n%s\n%s", counts, total, missingRows(d), strings.Join(status, "\n"), d.Logs())
		}
		time.Sleep(200 * time.Millisecond)
	}
	var rep = d.Verify(ctx)
	for _, tr := range rep.Tables {
		if !tr.Equal {
			t.Fatalf("table %s differs across regions: rows %v, diffs %v\n%s", tr.Table, tr.Rows, tr.Diffs, d.Logs())
		}
	}
	if len(rep.Tables) < 2 {
		t.Fatalf("verify compared %d tables, want at least accounts and ledger", len(rep.Tables))
	}
}

// missingRows names ledger rows some region has and another lacks.
func missingRows(d *Deployment) string {
	ctx := context.Background()
	has := map[string]map[string]bool{}
	all := map[string]bool{}
	for _, r := range d.Regions {
		has[r] = map[string]bool{}
		c, err := d.Clusters[r].Connect(ctx, "app")
		if err != nil {
			return err.Error()
		}
		rows, err := c.Query(ctx, "SELECT id FROM ledger")
		if err == nil {
			for rows.Next() {
				var id string
				rows.Scan(&id)
				has[r][id] = true
				all[id] = true
			}
			rows.Close()
		}
		c.Close(ctx)
	}
	var out []string
	for _, r := range d.Regions {
		var miss []string
		for id := range all {
			if !has[r][id] {
				miss = append(miss, id)
			}
		}
		sort.Strings(miss)
		if len(miss) > 30 {
			miss = append(miss[:30], "...")
		}
		out = append(out, fmt.Sprintf("%s lacks %v", r, miss))
	}
	return strings.Join(out, "; ")
}

// TestActiveActiveWithRandomKills writes in every region while nodes are
// killed at random, and checks that the regions converge. Its regions'
// servers can load prism_pgoutput, so every slot uses it (the other tests
// run pgoutput, which before PostgreSQL 16 sends the applied transactions
// to the node to be dropped).
func TestActiveActiveWithRandomKills(t *testing.T) {
	rng := rand.New(rand.NewSource(seed(t)))
	d := NewWithSettings(t, threeRegions, schema, pgtest.PrismPgoutput(t))
	d.StartAll()
	waitReaders(d)
	w := startWriters(t, d, 15*time.Millisecond)

	nodes := []string{"na1", "eu1", "eu2", "as1"}
	kills := 0
	end := time.Now().Add(30 * time.Second)
	for time.Now().Before(end) {
		time.Sleep(time.Duration(2000+rng.Intn(2000)) * time.Millisecond)
		victim := nodes[rng.Intn(len(nodes))]
		t.Logf("kill -9 %s", victim)
		d.Kill(victim)
		kills++
		time.Sleep(time.Duration(200+rng.Intn(1500)) * time.Millisecond)
		d.Start(victim)
	}
	total := w.Stop(t)
	t.Logf("%d writes, %d kills", total, kills)
	if total < 100 {
		t.Fatalf("only %d writes went through", total)
	}
	converged(t, d, total)
	ctx := context.Background()
	for _, r := range d.Regions {
		conn, err := d.Clusters[r].Connect(ctx, "app")
		if err != nil {
			t.Fatal(err)
		}
		var plugin string
		err = conn.QueryRow(ctx, "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1", "prism_"+r).Scan(&plugin)
		conn.Close(ctx)
		if err != nil || plugin != "prism_pgoutput" {
			t.Errorf("region %s: slot prism_%s has plugin %q (%v), want prism_pgoutput", r, r, plugin, err)
		}
	}
}

func TestReaderFailoverWithinRegion(t *testing.T) {
	d := New(t, threeRegions, schema)
	d.Start("eu1")
	d.Eventually(30*time.Second, "eu1 reads slot prism_eu", func() bool { return d.Role("eu1") == node.RoleReader })
	d.Start("eu2")
	d.Start("na1")
	d.Start("as1")
	d.Eventually(30*time.Second, "eu2 stands by", func() bool { return d.Role("eu2") == node.RoleStandby })
	// Writes made before a region's slot exists are not in its stream
	// (that is what bootstrap is for): wait for every slot.
	waitReaders(d)
	w := startWriters(t, d, 10*time.Millisecond)
	time.Sleep(time.Second)
	d.Kill("eu1")
	d.Eventually(30*time.Second, "eu2 takes over slot prism_eu", func() bool { return d.Role("eu2") == node.RoleReader })
	time.Sleep(time.Second)
	total := w.Stop(t)
	converged(t, d, total)
}

func TestSigtermDrainsAndExitsZero(t *testing.T) {
	d := New(t, Topology{"na": {"na1"}, "eu": {"eu1"}}, schema)
	d.StartAll()
	waitReaders(d)
	w := startWriters(t, d, 5*time.Millisecond)
	time.Sleep(2 * time.Second)
	total := w.Stop(t)
	p := d.Proc("na1")
	p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.Done:
	case <-time.After(node.DrainTimeout + 15*time.Second):
		t.Fatalf("na1 still running %s after SIGTERM", node.DrainTimeout+15*time.Second)
	}
	if p.Err != nil {
		t.Fatalf("na1 exit after SIGTERM: %v, want status 0\n%s", p.Err, d.Logs())
	}
	d.Start("na1")
	converged(t, d, total)
}
