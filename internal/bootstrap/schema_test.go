package bootstrap

import (
	"strings"
	"testing"
)

// TestWithoutPrismTriggers drops exactly prism-cdc's trigger statements
// from a pg_dump script (as PostgreSQL 15 prints them).
func TestWithoutPrismTriggers(t *testing.T) {
	dump := `CREATE TABLE public.kv (
    id integer NOT NULL,
    v text
);

CREATE TRIGGER prism_clock BEFORE INSERT OR DELETE OR UPDATE ON public.kv FOR EACH ROW WHEN ((NOT pg_replication_origin_session_is_setup())) EXECUTE FUNCTION prism.clock_16385();

CREATE TRIGGER prism_tombstone AFTER DELETE ON public.kv FOR EACH ROW EXECUTE FUNCTION prism.clock_16385();

ALTER TABLE public.kv ENABLE ALWAYS TRIGGER prism_tombstone;

CREATE TRIGGER audit AFTER UPDATE ON public.kv FOR EACH ROW EXECUTE FUNCTION public.audit();

CREATE EVENT TRIGGER prism_install ON ddl_command_end
         WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE TABLE AS', 'SELECT INTO')
   EXECUTE FUNCTION prism.on_ddl();

CREATE EVENT TRIGGER prism_ddl ON ddl_command_end
   EXECUTE FUNCTION prism.ddl_capture();

CREATE EVENT TRIGGER prism_ddl_drop ON sql_drop
   EXECUTE FUNCTION prism.ddl_dropped();

ALTER TABLE public.kv ENABLE ALWAYS TRIGGER audit;
`
	want := `CREATE TABLE public.kv (
    id integer NOT NULL,
    v text
);




CREATE TRIGGER audit AFTER UPDATE ON public.kv FOR EACH ROW EXECUTE FUNCTION public.audit();




ALTER TABLE public.kv ENABLE ALWAYS TRIGGER audit;
`
	var out strings.Builder
	if err := withoutPrismTriggers(strings.NewReader(dump), &out); err != nil {
		t.Fatal(err)
	}
	if out.String() != want {
		t.Fatalf("filtered dump:\n%s\nwant:\n%s", out.String(), want)
	}
}

func TestDumpHint(t *testing.T) {
	// What pg_dump 15.18 wrote against a PostgreSQL 16.14 source.
	msg := "pg_dump: error: aborting because of server version mismatch\npg_dump: detail: server version: 16.14; pg_dump version: 15.18 (Debian 15.18-0+deb12u1)"
	got := dumpHint("/usr/bin/pg_dump", msg)
	for _, want := range []string{"/usr/bin/pg_dump is older than the source server", "psql 16 or newer", "postgresql-client-16", "first on PATH"} {
		if !strings.Contains(got, want) {
			t.Errorf("dumpHint = %q; want it to contain %q", got, want)
		}
	}
	if got := dumpHint("pg_dump", "pg_dump: error: aborting because of server version mismatch"); !strings.Contains(got, "server's major version or newer") {
		t.Errorf("dumpHint without a version = %q", got)
	}
	if got := dumpHint("pg_dump", "pg_dump: error: connection to server failed"); got != "" {
		t.Errorf("dumpHint of another error = %q; want none", got)
	}
}
