package doctor

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

func TestDoctorScope(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "doctor-scope"})
	mustExec(t, c, `CREATE TABLE customers (id int PRIMARY KEY, home text NOT NULL, ssn text, bio text);
		CREATE TABLE keyed (id int, home text, PRIMARY KEY (id, home));
		CREATE TABLE card_tokens (id int PRIMARY KEY);
		CREATE TABLE orders (id int PRIMARY KEY, customer int REFERENCES customers, token int REFERENCES card_tokens);
		CREATE TABLE notes (id int PRIMARY KEY, customer int REFERENCES customers)`)
	cfg := loadConfig(t, fmt.Sprintf(`node: na1
region: na
database: %q
listen: "127.0.0.1:1"
auth: {insecure: true}
scope:
  rows: {"public.keyed": "home IN ('na', 'global')"}
peers:
  - region: eu
    nodes: [{name: eu1, addr: "127.0.0.1:2"}]
    database: %q
    scope:
      exclude_tables: [public.card_tokens, public.nope, public.notes]
      rows: {"public.customers": "home = 'eu'", "public.keyed": "home IN ('eu', 'global') AND id > 'x'"}
      exclude_columns: {"public.customers": [ssn, id, missing]}
`, c.DSN("postgres"), c.DSN("postgres")))
	rep := Run(ctx, cfg, Options{Timeout: 2 * time.Second})
	var out strings.Builder
	rep.Write(&out)
	find := func(sev Severity, parts ...string) {
		t.Helper()
		for _, f := range rep.Findings {
			ok := f.Severity == sev
			for _, p := range parts {
				ok = ok && strings.Contains(f.Check+" "+f.Message, p)
			}
			if ok {
				return
			}
		}
		t.Errorf("no %v finding with %q in:\n%s", sev, parts, out.String())
	}
	find(OK, "scope of region eu", "without tables public.card_tokens, public.nope", "public.customers rows where home = 'eu'", "public.customers without ssn, id, missing")
	find(Problem, "scope of region eu", "public.nope: the table does not exist")
	find(Problem, "scope of region eu", `reads home, not in the replica identity`)
	find(Problem, "scope of region eu", `column "id" is numeric`)
	find(Problem, "scope of region eu", `excluded column "missing" does not exist`)
	find(Problem, "scope of region eu", `excluded column "id" is in the replica identity`)
	// Orders reference a table eu does not get and one it gets some rows
	// of; notes, which eu does not get either, are no problem.
	find(Warn, "scope of region eu", "public.orders: foreign key orders_token_fkey references public.card_tokens, which the region does not receive", "exclude public.orders too")
	find(Warn, "scope of region eu", "public.orders: foreign key orders_customer_fkey references public.customers, which the region receives only where home = 'eu'")
	for _, f := range rep.Findings {
		if strings.Contains(f.Message, "notes_customer_fkey") {
			t.Errorf("a finding about a foreign key of an excluded table: %s", f.Message)
		}
	}
	find(OK, "scope of this region (na)", "public.keyed rows where home IN ('na', 'global')")
	find(Warn, "scope of this region (na)", "diverge by design")
	if !rep.Blocking() {
		t.Errorf("a scope naming a missing table is not blocking:\n%s", out.String())
	}
}
