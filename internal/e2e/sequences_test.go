package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/node"
)

// TestSequencesSurviveRestartIdentity interleaves a serial key across
// three regions with prism-cdc sequences --apply, then runs TRUNCATE ...
// RESTART IDENTITY in one region. The TRUNCATE is replicated with its
// RESTART IDENTITY, so every region's sequence restarts at its START WITH;
// each must still hand out only keys of its own residue, so the inserts
// that follow in every region neither collide nor conflict.
func TestSequencesSurviveRestartIdentity(t *testing.T) {
	d := New(t, Topology{"as": {"as1"}, "eu": {"eu1"}, "na": {"na1"}},
		"CREATE TABLE orders (id bigserial PRIMARY KEY, region text NOT NULL)")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	residue := map[string]int64{}
	for i, r := range d.Regions { // sorted: as 0, eu 1, na 2
		residue[r] = int64(i)
		n := d.Nodes(r)[0]
		cmd := exec.Command(d.Bin, "sequences", "--config", d.ConfigPath(n), "--apply")
		cmd.Env = append(os.Environ(), "PRISM_TOKEN=e2e-secret-token")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("prism-cdc sequences --apply in %s: %v\n%s", r, err, out)
		}
	}
	d.StartAll()
	d.Eventually(90*time.Second, "one reader per region", func() bool {
		for _, r := range d.Regions {
			if d.Role(d.Nodes(r)[0]) != node.RoleReader {
				return false
			}
		}
		return true
	})
	conns := map[string]*pgx.Conn{}
	for _, r := range d.Regions {
		c, err := d.Clusters[r].Connect(ctx, "app")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(context.Background())
		conns[r] = c
	}
	// insert writes n rows in every region and checks that each got a key
	// of its region's residue.
	insert := func(round string, n int) {
		t.Helper()
		for _, r := range d.Regions {
			for range n {
				var id int64
				if err := conns[r].QueryRow(ctx, "INSERT INTO orders (region) VALUES ($1) RETURNING id", r).Scan(&id); err != nil {
					t.Fatalf("%s: insert in %s: %v", round, r, err)
				}
				if id%3 != residue[r] {
					t.Fatalf("%s: region %s got key %d, want one with key mod 3 = %d", round, r, id, residue[r])
				}
			}
		}
	}
	// converged waits until every region holds want rows, want/3 from
	// each region.
	converged := func(what string, want int) {
		t.Helper()
		d.Eventually(60*time.Second, what, func() bool {
			for _, r := range d.Regions {
				var got string
				if err := conns[r].QueryRow(ctx, "SELECT coalesce(string_agg(region || '=' || n, ',' ORDER BY region), '') FROM (SELECT region, count(*) n FROM orders GROUP BY region) x").Scan(&got); err != nil {
					return false
				}
				if want == 0 && got != "" || want > 0 && got != fmt.Sprintf("as=%d,eu=%d,na=%d", want/3, want/3, want/3) {
					return false
				}
			}
			return true
		})
	}

	insert("before the truncate", 3)
	converged("9 orders in every region", 9)
	if _, err := conns["eu"].Exec(ctx, "TRUNCATE orders RESTART IDENTITY"); err != nil {
		t.Fatal(err)
	}
	converged("the truncate in every region", 0)
	insert("after the truncate", 3)
	converged("9 new orders in every region", 9)
	for _, r := range d.Regions {
		var conflicts string
		if err := conns[r].QueryRow(ctx, "SELECT coalesce(string_agg(kind || ' ' || key::text, '; '), '') FROM prism.conflicts WHERE table_name LIKE '%orders'").Scan(&conflicts); err != nil {
			t.Fatal(err)
		}
		if conflicts != "" {
			t.Errorf("region %s recorded conflicts on orders: %s", r, conflicts)
		}
	}
	if rep := d.Verify(ctx); !rep.Equal() {
		t.Fatalf("regions differ after the truncate: %+v", rep)
	}
}
