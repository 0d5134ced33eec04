package verify

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// hookWriter calls fn with each log line before it returns, so a test can
// act at an exact point of a comparison.
type hookWriter struct {
	mu sync.Mutex
	fn func(line string)
}

func (w *hookWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.fn(string(p))
	return len(p), nil
}

func TestCompareChunksAndRepair(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	schema := `CREATE TABLE items (shop text, n int, qty int, note text, PRIMARY KEY (shop, n));
		INSERT INTO items SELECT s, g, g % 7, 'row ' || g FROM unnest(ARRAY['Zed', 'alpha', 'Bee']) s, generate_series(1, 1000) g`
	a := pgtest.Start(t, pgtest.Options{Name: "verify-chunk-a"})
	b := pgtest.Start(t, pgtest.Options{Name: "verify-chunk-b"})
	c := pgtest.Start(t, pgtest.Options{Name: "verify-chunk-c"})
	mustExec(t, a, schema+"; CREATE PUBLICATION prism FOR ALL TABLES")
	mustExec(t, b, schema)
	mustExec(t, c, schema)
	regions := []Region{{Name: "a", DSN: a.DSN("postgres")}, {Name: "b", DSN: b.DSN("postgres")}, {Name: "c", DSN: c.DSN("postgres")}}
	opts := Options{ChunkRows: 100}

	rep, err := CompareWith(ctx, regions, "prism", opts)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Equal() || rep.Tables[0].Chunks != 31 || rep.Tables[0].Rows["c"] != 3000 {
		t.Fatalf("CompareWith(equal) = %+v, want equal in 31 chunks of 3000 rows", rep.Tables[0])
	}

	mustExec(t, b, `UPDATE items SET qty = 99 WHERE shop = 'alpha' AND n = 500`)
	mustExec(t, c, `DELETE FROM items WHERE shop = 'Zed' AND n = 7; INSERT INTO items VALUES ('Bee', 5000, 1, 'extra'); UPDATE items SET note = NULL WHERE shop = 'Bee' AND n = 1`)
	rep, err = CompareWith(ctx, regions, "prism", opts)
	if err != nil {
		t.Fatal(err)
	}
	tr := rep.Tables[0]
	got := strings.Join(tr.Diffs, "\n")
	if rep.Equal() || len(tr.Keys) != 4 || tr.DiffChunks != 3 {
		t.Fatalf("CompareWith(diverged) = %d keys in %d chunks, want 4 in 3 ([Bee, 5000] and [Zed, 7] share one):\n%s", len(tr.Keys), tr.DiffChunks, got)
	}
	for _, want := range []string{"key [alpha, 500]: a=", "key [Zed, 7]: a=", "c=missing", "key [Bee, 5000]: a=missing b=missing c="} {
		if !strings.Contains(got, want) {
			t.Errorf("Diffs lack %q:\n%s", want, got)
		}
	}

	repaired, err := Repair(ctx, regions, "a", rep, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string][2]int{}
	for _, r := range repaired {
		counts[r.Region] = [2]int{r.Upserted, r.Deleted}
	}
	if counts["b"] != [2]int{1, 0} || counts["c"] != [2]int{2, 1} {
		t.Fatalf("Repair = %+v, want b: 1 upsert, c: 2 upserts 1 delete", repaired)
	}
	rep, err = CompareWith(ctx, regions, "prism", opts)
	if err != nil || !rep.Equal() {
		t.Fatalf("CompareWith(after repair) = %v, %v; want equal", rep.Tables, err)
	}
	// The repair went through the apply path under origin prism_repair:
	// the overwritten row is in b's conflict log.
	conn, err := b.Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var logged int
	var progress string
	if err := conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM prism.conflicts WHERE source_region = 'repair' AND table_name = 'public.items'),
		pg_replication_origin_progress('prism_repair', true)::text`).Scan(&logged, &progress); err != nil {
		t.Fatal(err)
	}
	if logged != 1 || progress != "0/1" {
		t.Fatalf("region b: %d conflicts from repair, origin progress %s; want 1 and 0/1", logged, progress)
	}

	// A row that differs while the comparison runs but is equal after the
	// settle period is not reported.
	mustExec(t, c, `UPDATE items SET qty = -1 WHERE shop = 'Bee' AND n = 2`)
	var fixErr error
	fixed := false
	hook := &hookWriter{fn: func(line string) {
		if strings.Contains(line, "checking them again after the settle period") {
			fixed = true
			fixErr = c.Exec(context.Background(), "postgres", `UPDATE items SET qty = 2 WHERE shop = 'Bee' AND n = 2`)
		}
	}}
	rep, err = CompareWith(ctx, regions, "prism", Options{ChunkRows: 100, Settle: 10 * time.Millisecond, Log: zerolog.New(hook)})
	if !fixed || fixErr != nil {
		t.Fatalf("the settle hook did not run (%v) or failed: %v", fixed, fixErr)
	}
	if err != nil || !rep.Equal() || rep.Tables[0].DiffChunks != 1 {
		t.Fatalf("CompareWith(settling) = %+v, %v; want equal after one differing chunk", rep.Tables, err)
	}
}
