package chaos

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/e2e"
)

// TestSlotRetentionWarnsThenLostSlotStopsLoudly keeps region eu down
// (node and database) while region na writes far more WAL than
// max_slot_wal_keep_size. na1 must warn as the slot's retained WAL leaves
// max_wal_size, and when Postgres invalidates the slot it must stop with a
// non-zero status and say that the slot is lost, instead of quietly
// creating a new slot that would skip the changes in between.
func TestSlotRetentionWarnsThenLostSlotStopsLoudly(t *testing.T) {
	d := e2e.New(t, e2e.Topology{"na": {"na1"}, "eu": {"eu1"}}, `
		CREATE TABLE filler (id int PRIMARY KEY, v text NOT NULL);
		ALTER TABLE filler ALTER COLUMN v SET STORAGE EXTERNAL;`)
	ctx := context.Background()
	na := d.Clusters["na"]
	for k, v := range map[string]string{"max_wal_size": "'32MB'", "min_wal_size": "'32MB'", "max_slot_wal_keep_size": "'64MB'", "wal_keep_size": "0"} {
		if err := na.SetConf(k, v); err != nil {
			t.Fatal(err)
		}
	}
	if err := na.Restart("fast"); err != nil {
		t.Fatal(err)
	}
	d.StartAll()
	waitReaders(d)
	if err := na.Exec(ctx, "app", "INSERT INTO filler VALUES (0, 'first')"); err != nil {
		t.Fatal(err)
	}
	d.Eventually(60*time.Second, "na's first row on eu", func() bool {
		n, err := count(ctx, d, "eu", "SELECT count(*) FROM filler")
		return err == nil && n == 1
	})

	// Region eu goes away, database included: nothing can acknowledge.
	d.Kill("eu1")
	if err := d.Clusters["eu"].Stop("immediate"); err != nil {
		t.Fatal(err)
	}
	next := 1
	fill := func(mb int) {
		t.Helper()
		for i := 0; i < mb; i++ {
			// About 1 MB of incompressible text per row, stored out of line.
			if err := na.Exec(ctx, "app", "INSERT INTO filler SELECT "+strconv.Itoa(next)+", string_agg(md5(random()::text), '') FROM generate_series(1, 32768)"); err != nil {
				t.Fatal(err)
			}
			next++
		}
	}
	slot := func() (status string) {
		conn, err := na.Connect(ctx, "app")
		if err != nil {
			return ""
		}
		defer conn.Close(ctx)
		var retained int64
		conn.QueryRow(ctx, `SELECT coalesce(wal_status, ''), coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, -1)
			FROM pg_replication_slots WHERE slot_name = 'prism_na'`).Scan(&status, &retained)
		t.Logf("slot prism_na: wal_status %q, %d bytes retained", status, retained)
		return status
	}

	fill(48)
	d.Eventually(60*time.Second, "slot prism_na past max_wal_size", func() bool {
		fill(4)
		s := slot()
		return s == "extended" || s == "unreserved"
	})
	d.Eventually(60*time.Second, "na1 warns about the slot's retained WAL", func() bool {
		b, _ := os.ReadFile(d.LogPath("na1"))
		return strings.Contains(string(b), `"wal_status":"extended"`) || strings.Contains(string(b), `"wal_status":"unreserved"`)
	})
	if !d.Running("na1") {
		t.Fatalf("na1 stopped before the slot was lost\n%s", d.Logs())
	}

	deadline := time.Now().Add(2 * time.Minute)
	for slot() != "lost" {
		if time.Now().After(deadline) {
			t.Fatalf("slot prism_na not invalidated (wal_status %q)", slot())
		}
		fill(16)
		if err := na.Exec(ctx, "app", "CHECKPOINT"); err != nil {
			t.Fatal(err)
		}
	}
	p := d.Proc("na1")
	select {
	case <-p.Done:
	case <-time.After(60 * time.Second):
		t.Fatalf("na1 still runs 60s after its slot was lost\n%s", d.Logs())
	}
	var exit *exec.ExitError
	if !errors.As(p.Err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("na1 exit = %v, want status 1\n%s", p.Err, d.Logs())
	}
	b, _ := os.ReadFile(d.LogPath("na1"))
	log := string(b)
	if !strings.Contains(log, "replication slot lost") || !strings.Contains(log, "resynchronised") {
		t.Fatalf("na1 did not say clearly that the slot is lost:\n%s", d.Logs())
	}
	if strings.Contains(log, "created replication slot\"") && strings.Count(log, "created replication slot") > 1 {
		t.Fatalf("na1 created a new slot after losing the old one:\n%s", d.Logs())
	}
}
