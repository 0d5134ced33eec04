package apply

import (
	"context"
	"math/rand"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// pgbenchTxns builds n pgbench-like transactions (update accounts,
// tellers, branches; insert history) from a seeded generator.
func pgbenchTxns(n int, seed int64) []*decode.Txn {
	rng := rand.New(rand.NewSource(seed))
	accounts := rel("public", "pgbench_accounts", decode.IdentityDefault, "aid*", "bid", "abalance", "filler")
	tellers := rel("public", "pgbench_tellers", decode.IdentityDefault, "tid*", "bid", "tbalance", "filler")
	branches := rel("public", "pgbench_branches", decode.IdentityDefault, "bid*", "bbalance", "filler")
	history := rel("public", "pgbench_history", decode.IdentityDefault, "tid", "bid", "aid", "delta", "mtime", "filler")
	filler := strings.Repeat(" ", 84)
	start := time.Now().Add(time.Hour)
	txns := make([]*decode.Txn, n)
	for i := range txns {
		aid, tid, delta := 1+rng.Intn(100000), 1+rng.Intn(10), rng.Intn(10001)-5000
		d := strconv.Itoa(delta)
		ts := start.Add(time.Duration(i) * time.Microsecond)
		txns[i] = &decode.Txn{
			Origin: "bench", EndLSN: decodeLSN(uint64(1000 + 100*i)), CommitTime: ts,
			Changes: []decode.Change{
				upd(accounts, nil, strconv.Itoa(aid), "1", d, filler),
				upd(tellers, nil, strconv.Itoa(tid), "1", d, `\N`),
				upd(branches, nil, "1", d, `\N`),
				ins(history, strconv.Itoa(tid), "1", strconv.Itoa(aid), d, ts.UTC().Format("2006-01-02 15:04:05.999999"), `\N`),
			},
		}
	}
	return txns
}

// BenchmarkApplyPgbench reports rows/s applying a pgbench-like stream in
// batches of 100 transactions to a real cluster.
func BenchmarkApplyPgbench(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := pgtest.Start(b, pgtest.Options{Name: "bench"})
	// The tables and data of pgbench -i -s 1.
	mustExec(b, ctx, c, "postgres", `
		CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance int, filler char(88));
		CREATE TABLE pgbench_tellers (tid int PRIMARY KEY, bid int, tbalance int, filler char(84));
		CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int, abalance int, filler char(84));
		CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22));
		INSERT INTO pgbench_branches SELECT 1, 0;
		INSERT INTO pgbench_tellers SELECT t, 1, 0 FROM generate_series(1, 10) t;
		INSERT INTO pgbench_accounts SELECT a, 1, 0, '' FROM generate_series(1, 100000) a;`)
	mustExec(b, ctx, c, "postgres", "VACUUM ANALYZE")
	a := newApplier(b, ctx, c, "postgres", WithLocalRegion("bench-target"))
	txns := pgbenchTxns(b.N, 1)
	if err := a.Setup(ctx); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < len(txns); i += 100 {
		end := min(len(txns), i+100)
		if n, err := a.ApplyBatch(ctx, txns[i:end]); err != nil || n != end-i {
			b.Fatalf("ApplyBatch = %d, %v", n, err)
		}
	}
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(4*b.N)/elapsed.Seconds(), "rows/s")
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "txns/s")
	got := queryString(b, ctx, a.pool, "SELECT count(*)::text FROM pgbench_history")
	if got != strconv.Itoa(b.N) {
		b.Fatalf("history has %s rows, want %d", got, b.N)
	}
}
