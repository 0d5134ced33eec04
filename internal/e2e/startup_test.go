package e2e

import (
	"context"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
)

// TestStartWhileDatabaseDown starts a node whose database is stopped: the
// node stays up, answers /healthz, says on /readyz why it is not ready,
// retries with a log line per attempt, and starts replicating once the
// database is started.
func TestStartWhileDatabaseDown(t *testing.T) {
	ctx := context.Background()
	d := New(t, Topology{"na": {"na1"}, "eu": {"eu1"}}, "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL);")
	if err := d.Clusters["eu"].Stop("fast"); err != nil {
		t.Fatal(err)
	}
	d.StartAll()

	var body string
	d.Eventually(30*time.Second, "eu1 /readyz says why it is not ready", func() bool {
		var code int
		code, body = d.Probe("eu1", "/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "waiting for the database: database unreachable")
	})
	if code, b := d.Probe("eu1", "/healthz"); code != http.StatusOK {
		t.Errorf("eu1 /healthz = %d %q while its database is down, want 200: the process is alive", code, b)
	}
	if st, _ := d.Status("eu1"); st.Role != "starting" || !strings.Contains(st.RoleReason, "database unreachable") {
		t.Errorf("eu1 status role = %q (%q), want starting with the reason", st.Role, st.RoleReason)
	}
	d.Eventually(30*time.Second, "eu1 logs a second attempt", func() bool {
		return attempts(t, d.LogPath("eu1")) >= 2
	})
	if !d.Running("eu1") {
		t.Fatalf("eu1 exited while its database was down\n%s", d.Logs())
	}

	if err := d.Clusters["eu"].Start(); err != nil {
		t.Fatal(err)
	}
	d.Eventually(60*time.Second, "eu1 ready once its database is up", func() bool {
		code, _ := d.Probe("eu1", "/readyz")
		return code == http.StatusOK
	})
	if err := d.Clusters["eu"].Exec(ctx, "app", "INSERT INTO items VALUES (1, 'written in eu')"); err != nil {
		t.Fatal(err)
	}
	d.Eventually(60*time.Second, "the row written in eu reaches na", func() bool {
		conn, err := d.Clusters["na"].Connect(ctx, "app")
		if err != nil {
			return false
		}
		defer conn.Close(ctx)
		var note string
		return conn.QueryRow(ctx, "SELECT note FROM items WHERE id = 1").Scan(&note) == nil && note == "written in eu"
	})
	if n := strings.Count(body, "\n"); n != 1 {
		t.Errorf("/readyz body has %d lines, want one reason:\n%s", n, body)
	}
}

// attempts counts the "waiting for the database" lines of a node's log and
// checks that each names its reason once.
func attempts(t *testing.T, path string) int {
	t.Helper()
	data, _ := os.ReadFile(path)
	n := 0
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.Contains(line, `"message":"database unavailable; waiting for it"`) {
			continue
		}
		n++
		if c := strings.Count(line, "connection refused"); c != 1 || !strings.Contains(line, `"attempt":`) {
			t.Errorf("attempt line names its reason %d times, want once with the attempt number: %s", c, line)
		}
	}
	return n
}
