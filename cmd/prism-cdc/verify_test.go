package main

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/logtest"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// TestVerifyRepair: three regions, one row changed behind prism-cdc's back
// in one region; verify finds it (exit 1), verify --repair --from fixes it,
// and verify is clean again (exit 0).
func TestVerifyRepair(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	schema := `CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, owner text);
		INSERT INTO accounts SELECT g, g * 10, 'owner ' || g FROM generate_series(1, 500) g`
	clusters := map[string]*pgtest.Cluster{}
	for _, r := range []string{"na", "eu", "as"} {
		c := pgtest.Start(t, pgtest.Options{Name: "verify-cli-" + r})
		sql := schema
		if r == "na" {
			sql += "; CREATE PUBLICATION prism FOR ALL TABLES"
		}
		if err := c.Exec(ctx, "postgres", sql); err != nil {
			t.Fatal(err)
		}
		clusters[r] = c
	}
	cfg := writeFile(t, "na1.yaml", fmt.Sprintf(`node: na1
region: na
database: %q
listen: "127.0.0.1:7101"
auth: {insecure: true}
log: {level: info}
peers:
  - {region: eu, nodes: [{name: eu1, addr: "127.0.0.1:7201"}], database: %q}
  - {region: as, nodes: [{name: as1, addr: "127.0.0.1:7301"}], database: %q}
`, clusters["na"].DSN("postgres"), clusters["eu"].DSN("postgres"), clusters["as"].DSN("postgres")))

	verify := func(args ...string) (int, string) {
		var stdout, stderr bytes.Buffer
		code := run(ctx, append([]string{"verify", "--config", cfg, "--chunk-rows", "50", "--settle", "10ms"}, args...), &stdout, &stderr)
		logtest.CheckOutput(t, "verify stderr", stderr.Bytes())
		return code, stdout.String() + stderr.String()
	}
	if code, out := verify(); code != exitOK || !strings.Contains(out, "1 tables equal in 3 regions") {
		t.Fatalf("verify(equal) = %d\n%s", code, out)
	}
	if err := clusters["eu"].Exec(ctx, "postgres", "UPDATE accounts SET balance = 0 WHERE id = 321"); err != nil {
		t.Fatal(err)
	}
	code, out := verify()
	if code != exitFail || !strings.Contains(out, "public.accounts: key [321]: na=") || !strings.Contains(out, "DIFFERENT (1 rows)") {
		t.Fatalf("verify(diverged) = %d, want %d naming key [321]\n%s", code, exitFail, out)
	}
	if code, out := verify("--repair"); code != exitUsage || !strings.Contains(out, "--repair and --from REGION go together") {
		t.Fatalf("verify --repair without --from = %d\n%s", code, out)
	}
	code, out = verify("--repair", "--from", "na")
	if code != exitOK || !strings.Contains(out, "public.accounts in region eu: 1 rows written, 0 deleted") || !strings.Contains(out, "1 tables equal in 3 regions") {
		t.Fatalf("verify --repair --from na = %d, want %d\n%s", code, exitOK, out)
	}
	if code, out := verify(); code != exitOK {
		t.Fatalf("verify(after repair) = %d\n%s", code, out)
	}
	var balance int64
	conn, err := clusters["eu"].Connect(ctx, "postgres")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if err := conn.QueryRow(ctx, "SELECT balance FROM accounts WHERE id = 321").Scan(&balance); err != nil || balance != 3210 {
		t.Fatalf("eu balance of 321 = %d, %v; want 3210", balance, err)
	}
}
