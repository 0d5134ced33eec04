package apply

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// BenchmarkApplyStreamPrototype reports the server CPU per lone pgbench
// transaction of contrib/prism_apply_stream, a prototype of an apply loop
// inside the backend fed over COPY, next to the applier and the same
// statements sent over the protocol, back to back and with 3 ms between
// transactions (the pace of 300 tps, where every transaction wakes the
// server from idle). It is opt-in: build the prototype and point
// PRISM_APPLY_PROTOTYPE at it (a path the clusters' OS user can read):
//
//	make -C contrib/prism_apply_stream
//	PRISM_APPLY_PROTOTYPE=$PWD/contrib/prism_apply_stream/prism_apply_stream.so \
//	  go test ./pkg/apply -run '^$' -bench ApplyStreamPrototype -benchtime 4000x
func BenchmarkApplyStreamPrototype(b *testing.B) {
	lib := os.Getenv("PRISM_APPLY_PROTOTYPE")
	if lib == "" {
		b.Skip("set PRISM_APPLY_PROTOTYPE to the built contrib/prism_apply_stream library to run this benchmark (see its comment)")
	}
	if _, err := os.Stat(lib); err != nil {
		b.Fatalf("PRISM_APPLY_PROTOTYPE: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	c, a := pgbenchApplier(b, ctx, "stream")
	for _, proc := range []string{"prism_apply_copy", "prism_apply_copy_spi"} {
		mustExec(b, ctx, c, "postgres", fmt.Sprintf("CREATE PROCEDURE %s() AS %s, %s LANGUAGE C", proc, lit(lib), lit(proc)))
	}
	conn, sds := bareSession(b, ctx, c, "prism_proto")
	pc := conn.PgConn()
	var err error
	control := map[string]*pgconn.StatementDescription{}
	for name, sql := range map[string]string{"begin": beginSQL, "setup": txnSetupSQL, "commit": "COMMIT"} {
		if control[name], err = conn.Prepare(ctx, "proto_"+name, sql); err != nil {
			b.Fatal(err)
		}
	}
	textVals := func(ch decode.Change) [][]byte {
		vals := make([][]byte, len(ch.New))
		for k, v := range ch.New {
			if v.Kind == decode.ValueText {
				vals[k] = v.Data
			}
		}
		return vals
	}
	pause := func(gap time.Duration, i int) {
		if i > 0 && gap > 0 {
			time.Sleep(gap)
		}
	}
	// Over the protocol: BEGIN, the set-up, the four statements and
	// COMMIT in one round trip per transaction (no barrier: a node's
	// applier flushes lazily).
	protocol := func(gap time.Duration) func([]*decode.Txn) {
		return func(txns []*decode.Txn) {
			for i, t := range txns {
				pause(gap, i)
				batch := &pgconn.Batch{}
				batch.ExecStatement(control["begin"], nil, nil, nil)
				ts := []byte(t.CommitTime.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
				batch.ExecStatement(control["setup"], [][]byte{[]byte(t.EndLSN.String()), ts, []byte("bench"), []byte("bench-target")}, nil, nil)
				for j, ch := range t.Changes {
					batch.ExecStatement(sds[j], textVals(ch), nil, nil)
				}
				batch.ExecParams(originSQL, [][]byte{[]byte(t.EndLSN.String()), ts}, nil, nil, nil)
				batch.ExecStatement(control["commit"], nil, nil, nil)
				if _, err := pc.ExecBatch(ctx, batch).ReadAll(); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	// The applier as a node runs it: it leaves the WAL flush to its
	// acknowledgements (WithLazyFlush), as the streams do.
	lazy := newApplier(b, ctx, c, "postgres", WithLocalRegion("bench-target"), WithLazyFlush())
	applier := func(gap time.Duration) func([]*decode.Txn) {
		return func(txns []*decode.Txn) {
			for i := range txns {
				pause(gap, i)
				if n, err := lazy.ApplyBatch(ctx, txns[i:i+1]); err != nil || n != 1 {
					b.Fatalf("ApplyBatch = %d, %v", n, err)
				}
			}
		}
	}
	// Over COPY: one CopyData per transaction, into the CALL.
	stream := func(proc string, gap time.Duration) func([]*decode.Txn) {
		return func(txns []*decode.Txn) {
			lines := make([]string, len(txns))
			for i, t := range txns {
				var sb strings.Builder
				sb.WriteString(t.EndLSN.String())
				sb.WriteByte('\t')
				sb.WriteString(t.CommitTime.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
				for _, ch := range t.Changes {
					for _, v := range ch.New {
						sb.WriteByte('\t')
						if v.Kind == decode.ValueText {
							sb.Write(v.Data)
						} else {
							sb.WriteString(`\N`)
						}
					}
				}
				sb.WriteByte('\n')
				lines[i] = sb.String()
			}
			if _, err := pc.CopyFrom(ctx, &lineReader{lines: lines, gap: gap}, "CALL "+proc+"()"); err != nil {
				b.Fatal(err)
			}
			var progress string
			if err := conn.QueryRow(ctx, "SELECT pg_replication_origin_progress('prism_proto', false)::text").Scan(&progress); err != nil {
				b.Fatal(err)
			}
			if want := txns[len(txns)-1].EndLSN.String(); progress != want {
				b.Fatalf("origin progress %s after the stream, want %s", progress, want)
			}
		}
	}
	var lsn uint64
	run := func(name string, apply func([]*decode.Txn)) {
		b.Run(name, func(b *testing.B) {
			txns := freshPgbenchRun(b, ctx, c, &lsn)
			before := queryString(b, ctx, a.pool, "SELECT count(*)::text FROM pgbench_history")
			cpu := clusterCPU(b, c)
			b.ResetTimer()
			apply(txns)
			b.StopTimer()
			b.ReportMetric((clusterCPU(b, c)-cpu)/float64(b.N)*1e6, "server-us/txn")
			after := queryString(b, ctx, a.pool, "SELECT (count(*) - "+before+")::text FROM pgbench_history")
			if want := fmt.Sprint(b.N); strings.HasPrefix(name, "idle/") {
				if after != "0" {
					b.Fatalf("%s history rows added while idle", after)
				}
			} else if after != want {
				b.Fatalf("%s history rows added, want %d", after, b.N)
			}
		})
	}
	for round := 1; round <= 2; round++ {
		for _, gap := range []time.Duration{0, 3 * time.Millisecond} {
			suffix := fmt.Sprintf("gap=%v/%d", gap, round)
			if gap > 0 {
				// The cluster's own CPU over the same time with nothing
				// to apply (WAL writer, background writer, statistics).
				run("idle/"+suffix, func(txns []*decode.Txn) {
					for i := range txns {
						pause(gap, i)
					}
				})
			}
			run("applier/"+suffix, applier(gap))
			run("protocol/"+suffix, protocol(gap))
			run("stream-spi/"+suffix, stream("prism_apply_copy_spi", gap))
			run("stream-heap/"+suffix, stream("prism_apply_copy", gap))
		}
	}
}

// lineReader returns one line per Read (so each is one CopyData), after
// gap from the second on.
type lineReader struct {
	lines   []string
	gap     time.Duration
	started bool
}

func (r *lineReader) Read(p []byte) (int, error) {
	if len(r.lines) == 0 {
		return 0, io.EOF
	}
	if r.started && r.gap > 0 {
		time.Sleep(r.gap)
	}
	r.started = true
	n := copy(p, r.lines[0])
	r.lines = r.lines[1:]
	return n, nil
}
