package e2e

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// fkSchema: orders reference customers, which live in another schema,
// through a composite key. Order 2 has no customer: with MATCH SIMPLE a
// NULL in the key references nothing and violates nothing.
const fkSchema = `
CREATE SCHEMA crm;
CREATE TABLE crm.customers (tenant int, id int, name text, PRIMARY KEY (tenant, id));
CREATE TABLE orders (id int PRIMARY KEY, tenant int NOT NULL, customer_id int,
	CONSTRAINT orders_customer_fk FOREIGN KEY (tenant, customer_id) REFERENCES crm.customers (tenant, id));
`

// verifyCLI runs prism-cdc verify with node name's config and returns its
// exit status and output.
func verifyCLI(t *testing.T, d *Deployment, name string) (int, string) {
	t.Helper()
	out, err := osExec(d, "verify", "--config", d.ConfigPath(name), "--settle", "200ms").CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, string(out)
	case errors.As(err, &ee):
		return ee.ExitCode(), string(out)
	}
	t.Fatalf("prism-cdc verify: %v\n%s", err, out)
	return 0, ""
}

// TestVerifyReportsOrphansFromConcurrentWrites: na deletes a customer
// while eu, which still has it, inserts an order for it. Each region's
// foreign key accepted its own write, and applied rows skip the check
// (session_replication_role = replica), so both regions converge on the
// same rows: equal, with an order whose customer exists nowhere. verify
// reports the violation in each region with the key and the repair, and
// exits 1; once the orphan is deleted in one region it exits 0.
func TestVerifyReportsOrphansFromConcurrentWrites(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	d := New(t, Topology{"na": {"na1"}, "eu": {"eu1"}}, fkSchema)
	d.StartAll()
	waitReaders(d)

	sql := func(region, sql string) {
		t.Helper()
		if err := d.Clusters[region].Exec(ctx, "app", sql); err != nil {
			t.Fatalf("%s: %s: %v", region, sql, err)
		}
	}
	count := func(region, sql string) int {
		c, err := d.Clusters[region].Connect(ctx, "app")
		if err != nil {
			return -1
		}
		defer c.Close(ctx)
		var n int
		if err := c.QueryRow(ctx, sql).Scan(&n); err != nil {
			return -1
		}
		return n
	}
	sql("na", `INSERT INTO crm.customers VALUES (1, 1, 'ann'), (1, 2, 'bob');
		INSERT INTO orders VALUES (1, 1, 1), (2, 1, NULL)`)
	d.Eventually(60*time.Second, "customers and orders in eu", func() bool {
		return count("eu", "SELECT count(*) FROM crm.customers") == 2 && count("eu", "SELECT count(*) FROM orders") == 2
	})
	if code, out := verifyCLI(t, d, "na1"); code != 0 || !strings.Contains(out, "2 tables equal in 2 regions") || strings.Contains(out, "foreign keys violated") {
		t.Fatalf("verify before the conflict = %d, want 0 and no violation\n%s", code, out)
	}

	// Stop delivery, write on both sides, resume.
	d.Kill("na1")
	d.Kill("eu1")
	sql("na", "DELETE FROM crm.customers WHERE tenant = 1 AND id = 2")
	sql("eu", "INSERT INTO orders VALUES (3, 1, 2)")
	d.StartAll()
	d.Eventually(60*time.Second, "both regions with order 3 and without customer (1, 2)", func() bool {
		for _, r := range d.Regions {
			if count(r, "SELECT count(*) FROM orders WHERE id = 3") != 1 ||
				count(r, "SELECT count(*) FROM crm.customers WHERE (tenant, id) = (1, 2)") != 0 {
				return false
			}
		}
		return true
	})

	rep := d.Verify(ctx)
	if !rep.Equal() {
		t.Fatalf("regions differ after the conflict: %+v", rep.Tables)
	}
	code, out := verifyCLI(t, d, "na1")
	t.Logf("verify after the conflict (exit %d):\n%s", code, out)
	for _, want := range []string{
		"2 tables equal in 2 regions, but foreign keys are violated: 1 constraints in 2 regions",
		"public.orders: constraint orders_customer_fk: (tenant, customer_id) references crm.customers (tenant, id)",
		"region na: 1 rows reference no row of crm.customers",
		"region eu: 1 rows reference no row of crm.customers",
		"key (tenant, customer_id)=(1, 2)",
		"find them:  SELECT t.* FROM ONLY public.orders t WHERE",
		"re-insert the missing rows of crm.customers",
		"delete the orphans:  DELETE FROM ONLY public.orders t WHERE",
	} {
		if !strings.Contains(out, want) {
			t.Fatalf("verify after the conflict lacks %q (exit %d):\n%s", want, code, out)
		}
	}
	if code != 1 {
		t.Fatalf("verify after the conflict = %d, want 1\n%s", code, out)
	}
	if n := strings.Count(out, "key (tenant, customer_id)="); n != 2 {
		t.Fatalf("verify lists %d offending keys, want order 3 once per region (order 2's NULL violates nothing)\n%s", n, out)
	}

	// --repair --from has no differing row to rewrite and leaves the
	// orphan alone.
	cmd := osExec(d, "verify", "--config", d.ConfigPath("na1"), "--settle", "200ms", "--repair", "--from", "na")
	if out, err := cmd.CombinedOutput(); err == nil || count("na", "SELECT count(*) FROM orders WHERE id = 3") != 1 {
		t.Fatalf("verify --repair --from na = %v with order 3 %d times in na, want exit 1 and the order kept\n%s",
			err, count("na", "SELECT count(*) FROM orders WHERE id = 3"), out)
	}

	// The operator chooses to delete the orphan, in one region.
	sql("eu", "DELETE FROM orders WHERE id = 3")
	d.Eventually(60*time.Second, "order 3 deleted in na", func() bool {
		return count("na", "SELECT count(*) FROM orders WHERE id = 3") == 0
	})
	if code, out := verifyCLI(t, d, "na1"); code != 0 || !strings.Contains(out, "2 tables equal in 2 regions") {
		t.Fatalf("verify after deleting the orphan = %d, want 0\n%s", code, out)
	}
}

// osExec returns the command running the prism-cdc binary with args.
func osExec(d *Deployment, args ...string) *exec.Cmd {
	cmd := exec.Command(d.Bin, args...)
	cmd.Env = append(os.Environ(), "PRISM_TOKEN=e2e-secret-token")
	return cmd
}
