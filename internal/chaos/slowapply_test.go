package chaos

import (
	"context"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/e2e"
)

// TestApplySlowerThanAckTimeout applies a transaction that takes three
// seconds on the target (a trigger sleeps) with a short delivery.ack_timeout.
// The receiving node must keep the shipper from giving up on a live apply
// (heartbeats more often than the ACK timeout); otherwise the shipper
// reconnects, the new session fences the one still applying, and the
// transaction starts over forever.
func TestApplySlowerThanAckTimeout(t *testing.T) {
	d := e2e.New(t, e2e.Topology{"na": {"na1"}, "eu": {"eu1"}},
		"CREATE TABLE slow (id int PRIMARY KEY, v text NOT NULL);")
	d.Delivery = "{ack_timeout: 800ms, retries: 3, backoff: 50ms, max_backoff: 300ms, max_in_flight: 16MiB}"
	ctx := context.Background()
	if err := d.Clusters["eu"].Exec(ctx, "app", `
		CREATE FUNCTION slow_apply() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN PERFORM pg_sleep(3); RETURN NEW; END $$;
		CREATE TRIGGER slow_apply BEFORE INSERT ON slow FOR EACH ROW EXECUTE FUNCTION slow_apply();
		ALTER TABLE slow ENABLE ALWAYS TRIGGER slow_apply;`); err != nil {
		t.Fatal(err)
	}
	d.StartAll()
	waitReaders(d)
	if err := d.Clusters["na"].Exec(ctx, "app", "INSERT INTO slow VALUES (1, 'x')"); err != nil {
		t.Fatal(err)
	}
	d.Eventually(60*time.Second, "the slow transaction applied on eu", func() bool {
		n, err := count(ctx, d, "eu", "SELECT count(*) FROM slow")
		return err == nil && n == 1
	})
}
