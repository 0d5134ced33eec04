package chaos

import (
	"context"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/e2e"
)

// TestSkewUnderLoad runs three regions, eu's database 20 seconds ahead,
// with every region writing the same few rows as fast as it can
// (relative updates, upserts, deletes) and no other fault, then checks
// that every table converges: conflicts on one row meet every few
// milliseconds, so most local writes replace a version stamped ahead of
// their own clock.
func TestSkewUnderLoad(t *testing.T) {
	needFaketime(t)
	d := e2e.New(t, e2e.Topology{"na": {"na1"}, "eu": {"eu1"}, "as": {"as1"}}, `
CREATE TABLE acct (id int PRIMARY KEY, balance bigint NOT NULL);
INSERT INTO acct SELECT g, 0 FROM generate_series(1, 5) g;
CREATE TABLE contested (id int PRIMARY KEY, v text NOT NULL, region text NOT NULL);
INSERT INTO contested SELECT g, 'seed', 'seed' FROM generate_series(1, 20) g;`)
	skewClock(t, d.Clusters[skewRegion], skewOffset)
	clients.reset()
	d.StartAll()
	waitReaders(d)
	ctx, stop := context.WithTimeout(context.Background(), 20*time.Second)
	defer stop()
	var wg sync.WaitGroup
	var ops atomic.Int64
	for i, r := range d.Regions {
		wg.Add(2)
		go func(r string, seed int64) {
			defer wg.Done()
			contested(ctx, d, r, rand.New(rand.NewSource(seed)), &ops)
		}(r, int64(i))
		go func(r string, seed int64) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed))
			client(ctx, d, r, &ops, func() time.Duration { return 0 }, func(conn *pgx.Conn, _ int) error {
				_, err := conn.Exec(ctx, "UPDATE acct SET balance = balance + $1 WHERE id = $2", 1+rng.Intn(9), 1+rng.Intn(5))
				return err
			})
		}(r, int64(100+i))
	}
	wg.Wait()
	c := &chaos{t: t, d: d}
	var rep = d.Verify(context.Background())
	deadline := time.Now().Add(90 * time.Second)
	for !rep.Equal() && time.Now().Before(deadline) {
		pause(context.Background(), time.Second)
		rep = d.Verify(context.Background())
	}
	t.Logf("%d writes, %d clock floors; by region:\n%s", ops.Load(), c.floors(), clients.String())
	if !rep.Equal() {
		t.Fatalf("regions differ 90s after the writes stopped: %+v\n%s", rep, c.explain(rep))
	}
}
