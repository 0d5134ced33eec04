package apply

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// pgbenchTxns builds n pgbench-like transactions (update accounts,
// tellers, branches; insert history) from a seeded generator.
func pgbenchTxns(n int, seed int64) []*decode.Txn {
	return pgbenchTxnsFrom(n, seed, 0)
}

// pgbenchTxnsFrom is pgbenchTxns with end LSNs after first.
func pgbenchTxnsFrom(n int, seed int64, first uint64) []*decode.Txn {
	rng := rand.New(rand.NewSource(seed))
	accounts := rel("public", "pgbench_accounts", decode.IdentityDefault, "aid*", "bid", "abalance", "filler")
	tellers := rel("public", "pgbench_tellers", decode.IdentityDefault, "tid*", "bid", "tbalance", "filler")
	branches := rel("public", "pgbench_branches", decode.IdentityDefault, "bid*", "bbalance", "filler")
	history := rel("public", "pgbench_history", decode.IdentityDefault, "tid", "bid", "aid", "delta", "mtime", "filler")
	filler := strings.Repeat(" ", 84)
	// Commit times are the source's, just past: a commit time ahead of
	// the target's clock (clock skew) would make every transaction raise
	// prism.horizon, which is not what a benchmark of the steady state
	// means to measure.
	start := time.Now()
	txns := make([]*decode.Txn, n)
	for i := range txns {
		aid, tid, delta := 1+rng.Intn(100000), 1+rng.Intn(10), rng.Intn(10001)-5000
		d := strconv.Itoa(delta)
		ts := start.Add(time.Duration(i) * time.Microsecond)
		txns[i] = &decode.Txn{
			Origin: "bench", EndLSN: decodeLSN(first + uint64(1000+100*i)), CommitTime: ts,
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

// pgbenchSchema creates the tables and data of pgbench -i -s 1.
func pgbenchSchema(b *testing.B, ctx context.Context, c *pgtest.Cluster) {
	mustExec(b, ctx, c, "postgres", `
		CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance int, filler char(88));
		CREATE TABLE pgbench_tellers (tid int PRIMARY KEY, bid int, tbalance int, filler char(84));
		CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int, abalance int, filler char(84));
		CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22));
		INSERT INTO pgbench_branches SELECT 1, 0;
		INSERT INTO pgbench_tellers SELECT t, 1, 0 FROM generate_series(1, 10) t;
		INSERT INTO pgbench_accounts SELECT a, 1, 0, '' FROM generate_series(1, 100000) a;`)
	mustExec(b, ctx, c, "postgres", "VACUUM ANALYZE")
}

// freshPgbenchRun returns b.N pgbench transactions whose LSNs follow
// *lsn (which it advances), after vacuuming pgbench's tables and a
// checkpoint: every variant of a benchmark starts from tables without
// dead rows.
func freshPgbenchRun(b *testing.B, ctx context.Context, c *pgtest.Cluster, lsn *uint64) []*decode.Txn {
	txns := pgbenchTxnsFrom(b.N, int64(*lsn), *lsn)
	*lsn += uint64(100*b.N + 1000)
	mustExec(b, ctx, c, "postgres", "VACUUM pgbench_branches, pgbench_tellers, pgbench_accounts")
	mustExec(b, ctx, c, "postgres", "CHECKPOINT")
	return txns
}

// pgbenchApplier starts cluster name with pgbench's tables (pgbenchSchema)
// and autovacuum off, and sets up an applier of region bench-target on it.
func pgbenchApplier(b *testing.B, ctx context.Context, name string) (*pgtest.Cluster, *Applier) {
	c := pgtest.Start(b, pgtest.Options{Name: name})
	pgbenchSchema(b, ctx, c)
	mustExec(b, ctx, c, "postgres", "ALTER SYSTEM SET autovacuum = off")
	mustExec(b, ctx, c, "postgres", "SELECT pg_reload_conf()")
	a := newApplier(b, ctx, c, "postgres", WithLocalRegion("bench-target"))
	if err := a.Setup(ctx); err != nil {
		b.Fatal(err)
	}
	return c, a
}

// BenchmarkApplyPgbench reports rows/s applying a pgbench-like stream in
// batches of 100 transactions to a real cluster.
func BenchmarkApplyPgbench(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := pgtest.Start(b, pgtest.Options{Name: "bench"})
	pgbenchSchema(b, ctx, c)
	a := newApplier(b, ctx, c, "postgres", WithLocalRegion("bench-target"))
	txns := pgbenchTxns(b.N, 1)
	if err := a.Setup(ctx); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	start, cpu := time.Now(), processCPU(b)
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
	b.ReportMetric((processCPU(b)-cpu)/float64(b.N)*1e6, "client-us/txn")
	got := queryString(b, ctx, a.pool, "SELECT count(*)::text FROM pgbench_history")
	if got != strconv.Itoa(b.N) {
		b.Fatalf("history has %s rows, want %d", got, b.N)
	}
}

// processCPU returns the CPU seconds this process (the applier's side)
// used so far.
func processCPU(b *testing.B) float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// clusterCPU returns the CPU seconds the cluster's processes used so far:
// the postmaster's own and reaped children's, and every live child's.
func clusterCPU(b *testing.B, c *pgtest.Cluster) float64 {
	pid, err := os.ReadFile(filepath.Join(c.Dir, "data", "postmaster.pid"))
	if err != nil {
		b.Fatal(err)
	}
	pm := strings.Fields(string(pid))[0]
	ents, err := os.ReadDir("/proc")
	if err != nil {
		b.Fatal(err)
	}
	// A live process's CPU time comes from its schedstat, in nanoseconds:
	// the 10 ms ticks of /proc/<pid>/stat blur the few microseconds per
	// transaction that variants differ by. Children that exited count by
	// the postmaster's cutime and cstime, in ticks.
	var secs float64
	for _, e := range ents {
		st, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(st)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:]) // from field 3, state
		if len(f) < 15 || (e.Name() != pm && f[1] != pm) {
			continue
		}
		if e.Name() == pm {
			for _, v := range f[13:15] { // cutime, cstime
				n, _ := strconv.ParseFloat(v, 64)
				secs += n / 100 // USER_HZ
			}
		}
		ss, err := os.ReadFile("/proc/" + e.Name() + "/schedstat")
		if err != nil {
			continue
		}
		if ns := strings.Fields(string(ss)); len(ns) > 0 {
			n, _ := strconv.ParseFloat(ns[0], 64)
			secs += n / 1e9
		}
	}
	return secs
}

// bareSession connects to c's database postgres with replication origin
// origin set up and asynchronous commits, and prepares pgbench's four
// statements as bare statements (no conflict checks), for benchmarks to
// compare the applier with. The connection closes with the benchmark.
func bareSession(b *testing.B, ctx context.Context, c *pgtest.Cluster, origin string) (*pgx.Conn, []*pgconn.StatementDescription) {
	conn, err := c.Connect(ctx, "postgres")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close(context.Background()) })
	if _, err := conn.PgConn().Exec(ctx, fmt.Sprintf("SELECT pg_replication_origin_create(%s); SELECT pg_replication_origin_session_setup(%s); SET synchronous_commit = off",
		lit(origin), lit(origin))).ReadAll(); err != nil {
		b.Fatal(err)
	}
	bare := []string{
		"UPDATE pgbench_accounts SET bid = $2::int, abalance = $3::int, filler = $4::bpchar WHERE aid = $1::int",
		"UPDATE pgbench_tellers SET bid = $2::int, tbalance = $3::int, filler = $4::bpchar WHERE tid = $1::int",
		"UPDATE pgbench_branches SET bbalance = $2::int, filler = $3::bpchar WHERE bid = $1::int",
		"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, filler) VALUES ($1::int, $2::int, $3::int, $4::int, $5::timestamp, $6::bpchar)",
	}
	sds := make([]*pgconn.StatementDescription, len(bare))
	for i, sql := range bare {
		if sds[i], err = conn.Prepare(ctx, fmt.Sprintf("bare_%d", i), sql); err != nil {
			b.Fatal(err)
		}
	}
	return conn, sds
}

// BenchmarkApplyCost reports the server CPU per pgbench transaction of
// the applier next to the same rows as bare prepared statements (no
// conflict checks, same transaction set-up, pipelines of 100 transactions
// and one WAL flush each), with and without the prism_clock trigger on
// the tables:
//
//	go test ./pkg/apply -run '^$' -bench ApplyCost -benchtime 4000x
//
// The difference is what conflict handling costs the region's server.
func BenchmarkApplyCost(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c, a := pgbenchApplier(b, ctx, "cost")
	conn, sds := bareSession(b, ctx, c, "prism_bare")
	pc := conn.PgConn()
	setup, err := conn.Prepare(ctx, "bare_setup", txnSetupSQL)
	if err != nil {
		b.Fatal(err)
	}
	bareEvery := func(per int) func([]*decode.Txn) {
		return func(txns []*decode.Txn) {
			for i := 0; i < len(txns); i += per {
				batch := &pgconn.Batch{}
				for _, t := range txns[i:min(len(txns), i+per)] {
					batch.ExecParams(beginSQL, nil, nil, nil, nil)
					ts := []byte(t.CommitTime.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
					batch.ExecStatement(setup, [][]byte{[]byte(t.EndLSN.String()), ts, []byte("bench"), []byte("bench-target")}, nil, nil)
					for j, ch := range t.Changes {
						vals := make([][]byte, len(ch.New))
						for k, v := range ch.New {
							if v.Kind == decode.ValueText {
								vals[k] = v.Data
							}
						}
						batch.ExecStatement(sds[j], vals, nil, nil)
					}
					batch.ExecParams("COMMIT", nil, nil, nil, nil)
				}
				batch.ExecParams(barrierSQL, nil, nil, nil, nil)
				if _, err := pc.ExecBatch(ctx, batch).ReadAll(); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	applyBare := bareEvery(100)
	// applyArray applies each pipeline of 100 transactions as ONE target
	// transaction with one array statement per table and operation,
	// keeping the last version of a key (no conflict checks): what batch
	// apply could cost at best. With stamps, every statement also records
	// its rows' keys and source commit times in one row of a stamp table,
	// as the applier's prism.batch_stamps, which a batch needs to keep
	// conflict stamps exact (see docs/performance.md).
	arraySQL := []string{
		"UPDATE pgbench_accounts x SET bid = u.bid, abalance = u.abalance, filler = u.filler FROM unnest($1::int[], $2::int[], $3::int[], $4::bpchar[]) AS u(aid, bid, abalance, filler) WHERE x.aid = u.aid",
		"UPDATE pgbench_tellers x SET bid = u.bid, tbalance = u.tbalance, filler = u.filler FROM unnest($1::int[], $2::int[], $3::int[], $4::bpchar[]) AS u(tid, bid, tbalance, filler) WHERE x.tid = u.tid",
		"UPDATE pgbench_branches x SET bbalance = u.bbalance, filler = u.filler FROM unnest($1::int[], $2::int[], $3::bpchar[]) AS u(bid, bbalance, filler) WHERE x.bid = u.bid",
		"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime, filler) SELECT * FROM unnest($1::int[], $2::int[], $3::int[], $4::int[], $5::timestamp[], $6::bpchar[])",
	}
	mustExec(b, ctx, c, "postgres", `CREATE TABLE prism.bench_stamps (id bigserial PRIMARY KEY, xact xid, table_name text, keys text[], ts timestamptz[])`)
	stampSQL := func(i int, sql string) string {
		if i == 3 {
			return sql // no key: no stamps
		}
		tbl := []string{"pgbench_accounts", "pgbench_tellers", "pgbench_branches"}[i]
		k := []string{"aid", "tid", "bid"}[i]
		n := []int{5, 5, 4}[i]
		return "WITH w AS (" + sql + " RETURNING x." + k + ") INSERT INTO prism.bench_stamps (xact, table_name, keys, ts) SELECT xid(pg_current_xact_id()), '" + tbl +
			"', array_agg(jsonb_build_object('" + k + "', w." + k + "::text)::text), array_agg(s.ts) FROM w JOIN unnest($1::int[], $" + strconv.Itoa(n) +
			"::timestamptz[]) AS s(k, ts) ON s.k = w." + k
	}
	arrayArg := func(vs [][]byte) []byte {
		var sb strings.Builder
		sb.WriteByte('{')
		for i, v := range vs {
			if i > 0 {
				sb.WriteByte(',')
			}
			if v == nil {
				sb.WriteString("NULL")
				continue
			}
			sb.WriteByte('"')
			sb.WriteString(strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(string(v)))
			sb.WriteByte('"')
		}
		sb.WriteByte('}')
		return []byte(sb.String())
	}
	applyArray := func(stamps bool) func([]*decode.Txn) {
		ads := make([]*pgconn.StatementDescription, len(arraySQL))
		for i, sql := range arraySQL {
			if stamps {
				sql = stampSQL(i, sql)
			}
			var err error
			if ads[i], err = conn.Prepare(ctx, fmt.Sprintf("array_%t_%d", stamps, i), sql); err != nil {
				b.Fatal(err)
			}
		}
		return func(txns []*decode.Txn) {
			for i := 0; i < len(txns); i += 100 {
				batch := &pgconn.Batch{}
				run := txns[i:min(len(txns), i+100)]
				last := run[len(run)-1]
				batch.ExecParams(beginSQL, nil, nil, nil, nil)
				ts := []byte(last.CommitTime.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
				batch.ExecStatement(setup, [][]byte{[]byte(last.EndLSN.String()), ts, []byte("bench"), []byte("bench-target")}, nil, nil)
				for j := range arraySQL {
					// The last version of each key, in source order.
					var cols [][][]byte
					var times [][]byte
					seen := map[string]int{}
					for _, t := range run {
						ch := t.Changes[j]
						if cols == nil {
							cols = make([][][]byte, len(ch.New))
						}
						row := len(times)
						if j < 3 {
							if r, ok := seen[string(ch.New[0].Data)]; ok {
								row = r
							} else {
								seen[string(ch.New[0].Data)] = row
							}
						}
						if row == len(times) {
							times = append(times, nil)
							for k := range cols {
								cols[k] = append(cols[k], nil)
							}
						}
						times[row] = []byte(t.CommitTime.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
						for k, v := range ch.New {
							if v.Kind == decode.ValueText {
								cols[k][row] = v.Data
							}
						}
					}
					args := make([][]byte, 0, len(cols)+1)
					for _, col := range cols {
						args = append(args, arrayArg(col))
					}
					if stamps && j < 3 {
						args = append(args, arrayArg(times))
					}
					batch.ExecStatement(ads[j], args, nil, nil)
				}
				batch.ExecParams("COMMIT", nil, nil, nil, nil)
				batch.ExecParams(barrierSQL, nil, nil, nil, nil)
				if _, err := pc.ExecBatch(ctx, batch).ReadAll(); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	applierEvery := func(per int) func([]*decode.Txn) {
		return func(txns []*decode.Txn) {
			for i := 0; i < len(txns); i += per {
				end := min(len(txns), i+per)
				if n, err := a.ApplyBatch(ctx, txns[i:end]); err != nil || n != end-i {
					b.Fatalf("ApplyBatch = %d, %v", n, err)
				}
			}
		}
	}
	applier := applierEvery(100)
	var lsn uint64
	run := func(name string, apply func([]*decode.Txn)) {
		b.Run(name, func(b *testing.B) {
			txns := freshPgbenchRun(b, ctx, c, &lsn)
			cpu, client := clusterCPU(b, c), processCPU(b)
			b.ResetTimer()
			apply(txns)
			b.StopTimer()
			b.ReportMetric((clusterCPU(b, c)-cpu)/float64(b.N)*1e6, "server-us/txn")
			b.ReportMetric((processCPU(b)-client)/float64(b.N)*1e6, "client-us/txn")
		})
	}
	arrays, stamped := applyArray(false), applyArray(true)
	for round := 1; round <= 2; round++ {
		run(fmt.Sprintf("applier/%d", round), applier)
		run(fmt.Sprintf("bare/%d", round), applyBare)
		run(fmt.Sprintf("array/%d", round), arrays)
		run(fmt.Sprintf("array-stamps/%d", round), stamped)
		run(fmt.Sprintf("applier-lone/%d", round), applierEvery(1))
		run(fmt.Sprintf("bare-lone/%d", round), bareEvery(1))
	}
	// The hourly compaction of the applier's batch stamps (see
	// prism.batch_stamps), per stamp it checks.
	// The first call of the function compacts; every call reports it.
	var total, dropped int64
	var wall, server float64
	b.Run("compact-stamps", func(b *testing.B) {
		if total == 0 {
			if err := a.pool.QueryRow(ctx, "SELECT coalesce(sum(cardinality(keys)), 0) FROM prism.batch_stamps WHERE NOT compacted").Scan(&total); err != nil {
				b.Fatal(err)
			}
			cpu := clusterCPU(b, c)
			start := time.Now()
			var err error
			if dropped, err = a.CompactStamps(ctx, 0); err != nil {
				b.Fatal(err)
			}
			wall = float64(time.Since(start).Microseconds())
			server = (clusterCPU(b, c) - cpu) * 1e6
		}
		b.ReportMetric(wall/float64(max(total, 1)), "us/stamp")
		b.ReportMetric(server/float64(max(total, 1)), "server-us/stamp")
		b.ReportMetric(float64(total), "stamps")
		b.ReportMetric(float64(dropped), "dropped")
	})
	mustExec(b, ctx, c, "postgres", `ALTER TABLE pgbench_accounts DISABLE TRIGGER prism_clock;
		ALTER TABLE pgbench_tellers DISABLE TRIGGER prism_clock; ALTER TABLE pgbench_branches DISABLE TRIGGER prism_clock`)
	run("bare-disabled-trigger", applyBare)
	mustExec(b, ctx, c, "postgres", "DROP TRIGGER prism_clock ON pgbench_accounts; DROP TRIGGER prism_clock ON pgbench_tellers; DROP TRIGGER prism_clock ON pgbench_branches")
	run("bare-no-trigger", applyBare)
}

// BenchmarkApplyInsertCost reports the server CPU per transaction of the
// applier for transactions that insert 4 rows into a keyed table (4 int
// and text columns), applied 100 at a time (batches of 100):
//
//	go test ./pkg/apply -run '^$' -bench ApplyInsertCost -benchtime 20000x
func BenchmarkApplyInsertCost(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := pgtest.Start(b, pgtest.Options{Name: "inscost"})
	mustExec(b, ctx, c, "postgres", "CREATE TABLE orders (id bigint PRIMARY KEY, customer int, amount numeric, note text, at timestamptz)")
	mustExec(b, ctx, c, "postgres", "ALTER SYSTEM SET autovacuum = off")
	mustExec(b, ctx, c, "postgres", "SELECT pg_reload_conf()")
	a := newApplier(b, ctx, c, "postgres", WithLocalRegion("bench-target"))
	if err := a.Setup(ctx); err != nil {
		b.Fatal(err)
	}
	orders := rel("public", "orders", decode.IdentityDefault, "id*", "customer", "amount", "note", "at")
	var next, lsn uint64
	for round := 1; round <= 2; round++ {
		b.Run(fmt.Sprintf("applier/%d", round), func(b *testing.B) {
			start := time.Now().Add(time.Hour)
			txns := make([]*decode.Txn, b.N)
			for i := range txns {
				ts := start.Add(time.Duration(i) * time.Microsecond)
				t := &decode.Txn{Origin: "bench", EndLSN: decodeLSN(lsn + uint64(1000+100*i)), CommitTime: ts}
				for j := 0; j < 4; j++ {
					next++
					id := strconv.FormatUint(next, 10)
					t.Changes = append(t.Changes, ins(orders, id, strconv.Itoa(int(next%1000)), id+".25", "order "+id, ts.UTC().Format(time.RFC3339Nano)))
				}
				txns[i] = t
			}
			lsn += uint64(100*b.N + 1000)
			applyMeasured(b, ctx, c, a, txns, 100)
		})
	}
}

// applyMeasured applies txns per at a time, after a checkpoint, and
// reports the cluster's CPU per transaction as server-us/txn.
func applyMeasured(b *testing.B, ctx context.Context, c *pgtest.Cluster, a *Applier, txns []*decode.Txn, per int) {
	mustExec(b, ctx, c, "postgres", "CHECKPOINT")
	cpu := clusterCPU(b, c)
	b.ResetTimer()
	for i := 0; i < len(txns); i += per {
		end := min(len(txns), i+per)
		if n, err := a.ApplyBatch(ctx, txns[i:end]); err != nil || n != end-i {
			b.Fatalf("ApplyBatch = %d, %v", n, err)
		}
	}
	b.StopTimer()
	b.ReportMetric((clusterCPU(b, c)-cpu)/float64(len(txns))*1e6, "server-us/txn")
}

// BenchmarkApplyHotCost reports the server CPU per transaction of the
// applier for lone transactions (the row path) that cycle 100 hot keys
// through delete, re-insert (which meets the key's tombstone) and update,
// as an active-active workload does:
//
//	go test ./pkg/apply -run '^$' -bench ApplyHotCost -benchtime 6000x
func BenchmarkApplyHotCost(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := pgtest.Start(b, pgtest.Options{Name: "hotcost"})
	mustExec(b, ctx, c, "postgres", "CREATE TABLE hot (id bigint PRIMARY KEY, v bigint NOT NULL, rid int NOT NULL)")
	a := newApplier(b, ctx, c, "postgres", WithLocalRegion("bench-target"))
	if err := a.Setup(ctx); err != nil {
		b.Fatal(err)
	}
	hot := rel("public", "hot", decode.IdentityDefault, "id*", "v", "rid")
	var lsn uint64
	start := time.Now().Add(-time.Hour)
	// The hot rows come from the same source, an hour ago: no change
	// meets a newer version.
	seed := &decode.Txn{Origin: "bench", EndLSN: decodeLSN(1000), CommitTime: start}
	for k := 1; k <= 100; k++ {
		seed.Changes = append(seed.Changes, ins(hot, strconv.Itoa(k), "0", "1"))
	}
	if err := a.Apply(ctx, seed); err != nil {
		b.Fatal(err)
	}
	seq := 100
	for round := 1; round <= 2; round++ {
		b.Run(fmt.Sprintf("applier/%d", round), func(b *testing.B) {
			txns := make([]*decode.Txn, b.N)
			for i := range txns {
				seq++
				k := strconv.Itoa(1 + seq%100)
				var ch decode.Change
				switch (seq / 100) % 3 {
				case 0:
					ch = del(hot, k)
				case 1:
					ch = ins(hot, k, strconv.Itoa(seq), "1")
				default:
					ch = upd(hot, nil, k, strconv.Itoa(seq), "1")
				}
				lsn += 100
				txns[i] = &decode.Txn{Origin: "bench", EndLSN: decodeLSN(2000 + lsn), CommitTime: start.Add(time.Duration(seq) * time.Microsecond), Changes: []decode.Change{ch}}
			}
			applyMeasured(b, ctx, c, a, txns, 1)
		})
	}
}

// BenchmarkPlan reports the node's CPU and allocations for planning
// batches of 100 pgbench transactions (the tables' descriptions are
// cached after the first):
//
//	go test ./pkg/apply -run '^$' -bench Plan -benchmem
func BenchmarkPlan(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := pgtest.Start(b, pgtest.Options{Name: "plan"})
	pgbenchSchema(b, ctx, c)
	a := newApplier(b, ctx, c, "postgres", WithLocalRegion("bench-target"))
	if err := a.Setup(ctx); err != nil {
		b.Fatal(err)
	}
	conn, err := a.pool.Acquire(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Release()
	txns := pgbenchTxns(100, 1)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		bp, n := a.plan(ctx, conn.Conn(), txns)
		if n != len(txns) {
			b.Fatalf("plan took %d of %d", n, len(txns))
		}
		if _, err := bp.statements(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkApplyConflictCost reports the server CPU and the time per
// transaction of a catch-up (pgbench-like transactions, 200 to an
// ApplyBatch call) in which a share of the transactions update an
// account that another region wrote later: each of those needs the row
// path, which keeps the later version and records the conflict.
//
//	go test ./pkg/apply -run '^$' -bench ApplyConflictCost -benchtime 4000x
func BenchmarkApplyConflictCost(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c, a := pgbenchApplier(b, ctx, "conflictcost")
	accounts := rel("public", "pgbench_accounts", decode.IdentityDefault, "aid*", "bid", "abalance", "filler")
	var lsn, otherLSN uint64
	for _, percent := range []int{0, 1, 5} {
		b.Run(fmt.Sprintf("conflicts=%d%%", percent), func(b *testing.B) {
			txns := pgbenchTxnsFrom(b.N, int64(percent)+1, lsn)
			lsn += uint64(100*b.N + 1000)
			// Region "other" wrote the accounts of every conflicting
			// transaction an hour after the source did.
			rng := rand.New(rand.NewSource(int64(percent)))
			other := &decode.Txn{Origin: "other", CommitTime: time.Now().Add(2 * time.Hour)}
			conflicting := 0
			for _, t := range txns {
				if rng.Intn(100) < percent {
					conflicting++
					other.Changes = append(other.Changes, upd(accounts, nil, string(t.Changes[0].New[0].Data), "1", "7", "other"))
				}
			}
			if len(other.Changes) > 0 {
				otherLSN += 1000
				other.EndLSN = decodeLSN(otherLSN)
				if err := a.Apply(ctx, other); err != nil {
					b.Fatal(err)
				}
			}
			before := queryString(b, ctx, a.pool, "SELECT count(*)::text FROM prism.conflicts")
			st0 := a.Stats()["bench"]
			applyMeasured(b, ctx, c, a, txns, 200)
			after := queryString(b, ctx, a.pool, "SELECT count(*)::text FROM prism.conflicts")
			nb, _ := strconv.Atoi(before)
			na, _ := strconv.Atoi(after)
			if na-nb < conflicting {
				b.Fatalf("%d conflicts recorded, want at least %d", na-nb, conflicting)
			}
			st := a.Stats()["bench"]
			b.ReportMetric(float64(st.ByRow-st0.ByRow), "by-row")
			b.ReportMetric(float64(st.RolledBack-st0.RolledBack), "rolled-back")
		})
	}
}

// BenchmarkApplySmallRuns reports the server CPU per transaction of runs
// of 2, 3 and 4 transactions (one ApplyBatch call each, as a node gets
// them when a few queue up) applied as one batch (batched), one by one
// in one pipeline (rows), and as the applier decides (default: by rows
// when the run has fewer transactions than its batch's array statements
// less one, see batchPlan.worthIt), for pgbench transactions (four
// tables) and one-row inserts into one table:
//
//	go test ./pkg/apply -run '^$' -bench ApplySmallRuns -benchtime 3000x
func BenchmarkApplySmallRuns(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c, a := pgbenchApplier(b, ctx, "smallruns")
	mustExec(b, ctx, c, "postgres", "CREATE TABLE lagt (id bigint PRIMARY KEY, at timestamptz, note text)")
	now := time.Now()
	a.clock = func() time.Time { return now }
	lagt := rel("public", "lagt", decode.IdentityDefault, "id*", "at", "note")
	var lsn, next uint64
	inserts := func(n int, first uint64) []*decode.Txn {
		start := time.Now().Add(time.Hour)
		txns := make([]*decode.Txn, n)
		for i := range txns {
			next++
			ts := start.Add(time.Duration(i) * time.Microsecond)
			txns[i] = &decode.Txn{Origin: "bench", EndLSN: decodeLSN(first + uint64(1000+100*i)), CommitTime: ts,
				Changes: []decode.Change{ins(lagt, strconv.FormatUint(next, 10), ts.UTC().Format(time.RFC3339Nano), "n")}}
		}
		return txns
	}
	shapes := []struct {
		name string
		txns func(n int, first uint64) []*decode.Txn
	}{
		{"pgbench", func(n int, first uint64) []*decode.Txn { return pgbenchTxnsFrom(n, int64(first), first) }},
		{"insert", inserts},
	}
	// Two rounds: the first also warms the caches.
	for round := 1; round <= 2; round++ {
		for _, shape := range shapes {
			for _, per := range []int{2, 3, 4} {
				for _, how := range []string{"batched", "rows", "default"} {
					smallRun(b, fmt.Sprintf("%s/per=%d/%s/%d", shape.name, per, how, round), func(b *testing.B) {
						a.mu.Lock()
						delete(a.memos, "bench")
						if how == "rows" {
							// A source whose batches failed lately: runs under 32 go by rows.
							a.memos["bench"] = &batchMemo{recent: 10, last: now}
						}
						a.smallRuns = how == "batched"
						a.mu.Unlock()
						txns := shape.txns(b.N, lsn)
						lsn += uint64(100*b.N + 1000)
						mustExec(b, ctx, c, "postgres", "VACUUM pgbench_branches, pgbench_tellers, pgbench_accounts")
						before := a.Stats()["bench"]
						applyMeasured(b, ctx, c, a, txns, per)
						b.ReportMetric(float64(a.Stats()["bench"].Batched-before.Batched)/float64(b.N), "batched/txn")
					})
				}
			}
		}
	}
}

func smallRun(b *testing.B, name string, f func(b *testing.B)) { b.Run(name, f) }

// BenchmarkLocalWriteCost reports what prism-cdc's triggers cost the
// application's own writes while the regions' clocks agree (trigger
// prism_clock's WHEN test, and the row lock of a BEFORE trigger): the
// server CPU per one-row UPDATE, INSERT and DELETE in an application
// session (a DELETE also writes the key's tombstone), on a table with
// prism-cdc's triggers next to the same table without them, in
// alternating rounds:
//
//	go test ./pkg/apply -run '^$' -bench LocalWriteCost -benchtime 20000x
func BenchmarkLocalWriteCost(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := pgtest.Start(b, pgtest.Options{Name: "localwrite"})
	const rows = 100000
	for _, t := range []string{"kv_prism", "kv_plain"} {
		mustExec(b, ctx, c, "postgres", fmt.Sprintf("CREATE TABLE %s (id bigint PRIMARY KEY, v int NOT NULL, note text); "+
			"INSERT INTO %[1]s SELECT g, 0, 'row ' || g FROM generate_series(1, %d) g", t, rows))
	}
	a := newApplier(b, ctx, c, "postgres", WithLocalRegion("eu"))
	if err := a.Setup(ctx); err != nil {
		b.Fatal(err)
	}
	mustExec(b, ctx, c, "postgres", "DROP TRIGGER prism_clock ON kv_plain; DROP TRIGGER prism_tombstone ON kv_plain")
	if n := queryString(b, ctx, a.pool, "SELECT count(*)::text FROM pg_trigger WHERE tgrelid = 'kv_prism'::regclass AND tgname IN ('prism_clock', 'prism_tombstone')"); n != "2" {
		b.Fatalf("kv_prism has %s of prism-cdc's triggers, want 2", n)
	}
	next := int64(rows)
	for round := 1; round <= 2; round++ {
		for _, t := range []string{"kv_plain", "kv_prism"} {
			inserted := next
			for _, op := range []string{"update", "insert", "delete"} {
				b.Run(fmt.Sprintf("%s/%s/%d", op, t, round), func(b *testing.B) {
					stmt := fmt.Sprintf("UPDATE %s SET v = v + 1 WHERE id = (i %% %d) + 1", t, rows)
					switch op {
					case "insert":
						inserted = next
						stmt = fmt.Sprintf("INSERT INTO %s VALUES (%d + i, i, 'new')", t, next)
						next += int64(b.N)
					case "delete":
						// The rows the insert just wrote.
						stmt = fmt.Sprintf("DELETE FROM %s WHERE id = %d + i", t, inserted)
					}
					mustExec(b, ctx, c, "postgres", "VACUUM "+t)
					cpu := clusterCPU(b, c)
					b.ResetTimer()
					mustExec(b, ctx, c, "postgres", fmt.Sprintf("DO $$ BEGIN FOR i IN 1..%d LOOP %s; END LOOP; END $$", b.N, stmt))
					b.StopTimer()
					b.ReportMetric((clusterCPU(b, c)-cpu)/float64(b.N)*1e6, "server-us/write")
				})
			}
		}
	}
}

// BenchmarkApplyAfterIdle reports the wall time and server CPU of a lone
// pgbench-like transaction applied right after the previous one and
// after pauses of 0.6 and 2 s, a source that writes now and then (the
// session still holds the origin: see holdIdle), and after a pause longer
// than holdIdle (the session let go of the origin and takes it again, on
// a connection whose cached plans should survive: see sessions):
//
//	go test ./pkg/apply -run '^$' -bench ApplyAfterIdle -benchtime 10x
func BenchmarkApplyAfterIdle(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c, a := pgbenchApplier(b, ctx, "afteridle")
	next := uint64(0)
	apply := func(b *testing.B) {
		// Commit times an hour ahead and rising: every change wins.
		txns := pgbenchTxnsFrom(1, int64(next), next*1000)
		txns[0].CommitTime = txns[0].CommitTime.Add(time.Duration(next) * time.Millisecond)
		if n, err := a.ApplyBatch(ctx, txns); err != nil || n != 1 {
			b.Fatalf("ApplyBatch = %d, %v", n, err)
		}
		next++
	}
	apply(b) // the first run prepares the statements
	for _, pause := range []time.Duration{0, 600 * time.Millisecond, 2 * time.Second, holdIdle + 100*time.Millisecond} {
		b.Run(fmt.Sprintf("pause=%s", pause), func(b *testing.B) {
			var wall time.Duration
			var cpu float64
			for i := 0; i < b.N; i++ {
				time.Sleep(pause)
				before, start := clusterCPU(b, c), time.Now()
				apply(b)
				wall += time.Since(start)
				cpu += clusterCPU(b, c) - before
			}
			b.ReportMetric(float64(wall.Microseconds())/float64(b.N), "wall-us/txn")
			b.ReportMetric(cpu/float64(b.N)*1e6, "server-us/txn")
		})
	}
}

// BenchmarkLocalTxnCost is BenchmarkLocalWriteCost for whole
// transactions, one to a round trip, as an application runs them: costs
// that PostgreSQL pays once per transaction (a PL/pgSQL function's first
// call sets up its expressions; a cached plan found invalid is planned
// again) are spread over 20,000 writes in a DO loop, and not here. Server
// CPU per transaction, on tables with prism-cdc's triggers next to the
// same tables without them, in alternating rounds: a one-row UPDATE, and
// a one-row INSERT into a table whose deferred constraint trigger
// records the row in a second table at COMMIT (both tables with the
// triggers, or both without), the shape of prism-bench's lag tables,
// and the DELETE of that row, whose deferred trigger deletes the record.
// The trigger functions have a search_path of their own, so each
// transaction writes under two:
//
//	go test ./pkg/apply -run '^$' -bench LocalTxnCost -benchtime 4000x
func BenchmarkLocalTxnCost(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := pgtest.Start(b, pgtest.Options{Name: "localtxn"})
	for _, p := range []string{"prism", "plain"} {
		mustExec(b, ctx, c, "postgres", strings.ReplaceAll(`CREATE TABLE X_hot (id bigint PRIMARY KEY, v bigint NOT NULL);
INSERT INTO X_hot SELECT g, 0 FROM generate_series(1, 100) g;
CREATE SEQUENCE X_seq;
CREATE TABLE X_lag (id bigint PRIMARY KEY);
CREATE TABLE X_seen (id bigint PRIMARY KEY, at timestamptz NOT NULL);
CREATE FUNCTION X_seen() RETURNS trigger LANGUAGE plpgsql SET search_path = public, pg_catalog AS $$
BEGIN
	INSERT INTO X_seen VALUES (NEW.id, clock_timestamp()) ON CONFLICT DO NOTHING;
	RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER X_seen AFTER INSERT ON X_lag DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION X_seen();
CREATE FUNCTION X_unseen() RETURNS trigger LANGUAGE plpgsql SET search_path = public, pg_catalog AS $$
BEGIN
	DELETE FROM X_seen WHERE id = OLD.id;
	RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER X_unseen AFTER DELETE ON X_lag DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION X_unseen();`, "X_", p+"_"))
	}
	// The delete removes the rows the insert wrote, oldest first.
	deleted := map[string]int{}
	a := newApplier(b, ctx, c, "postgres", WithLocalRegion("eu"))
	if err := a.Setup(ctx); err != nil {
		b.Fatal(err)
	}
	for _, t := range []string{"plain_hot", "plain_lag", "plain_seen"} {
		mustExec(b, ctx, c, "postgres", "DROP TRIGGER prism_clock ON "+t+"; DROP TRIGGER prism_tombstone ON "+t)
	}
	conn, err := c.Connect(ctx, "postgres")
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close(context.Background())
	rng := rand.New(rand.NewSource(1))
	for round := 1; round <= 2; round++ {
		for _, op := range []string{"update", "insert-deferred", "delete-deferred"} {
			for _, p := range []string{"plain", "prism"} {
				b.Run(fmt.Sprintf("%s/%s/%d", op, p, round), func(b *testing.B) {
					cpu := clusterCPU(b, c)
					for i := 0; i < b.N; i++ {
						var err error
						switch op {
						case "update":
							_, err = conn.Exec(ctx, "UPDATE "+p+"_hot SET v = $1 WHERE id = $2", rng.Intn(1000000), 1+rng.Intn(100))
						case "insert-deferred":
							err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
								_, err := tx.Exec(ctx, "INSERT INTO "+p+"_lag VALUES (nextval('"+p+"_seq'))")
								return err
							})
						default:
							deleted[p]++
							err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
								tag, err := tx.Exec(ctx, "DELETE FROM "+p+"_lag WHERE id = $1", deleted[p])
								if err == nil && tag.RowsAffected() != 1 {
									err = fmt.Errorf("deleted %d rows of %s_lag with id %d, want 1", tag.RowsAffected(), p, deleted[p])
								}
								return err
							})
						}
						if err != nil {
							b.Fatal(err)
						}
					}
					b.ReportMetric((clusterCPU(b, c)-cpu)/float64(b.N)*1e6, "server-us/txn")
				})
			}
		}
	}
}
