package bootstrap_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/bootstrap"
	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// TestCopiedRowsKeepCommitTimes checks that last_write_wins decides a
// write arriving after the bootstrap in the new region as it does in the
// source: a write from eu committed after a row's version in na (but not
// yet applied in na when the snapshot was taken) replaces that version in
// both, and an older one is dropped in both. A copy that stamped rows with
// the time of the copy would drop the newer write in the new region only.
// It runs on the machine's PostgreSQL and on 16: the snapshot's slot, the
// origins and the copied commit times on a newer server.
func TestCopiedRowsKeepCommitTimes(t *testing.T) {
	for _, v := range pgtest.Servers() {
		t.Run(v.Name, func(t *testing.T) {
			ctx := context.Background()
			na, as := kvRegions(t, "lww-"+v.Name, `(1, 'na-1'), (2, 'na-2')`, v.Bin(t))
			tv := query[time.Time](t, na, "SELECT pg_xact_commit_timestamp(xmin) FROM kv WHERE id = 1")

			res, err := bootstrap.Run(ctx, bootstrap.Config{
				Region: "as", DSN: as.DSN("app"), Source: "na",
				Peers: []bootstrap.Peer{{Region: "na", DSN: na.DSN("app")}, {Region: "eu"}},
			}, zerolog.Nop())
			if err != nil {
				t.Fatal(err)
			}
			if res.Snapshot == 0 || res.Origins["na"] != res.Snapshot || len(res.Tables) != 1 || res.Tables[0].Rows != 2 || res.Tables[0].Timed != 2 {
				t.Fatalf("Run = %+v, want 2 rows with their commit time and origin na at the snapshot", res)
			}
			if !res.Tables[0].Latest.Equal(tv) {
				t.Fatalf("latest copied commit time = %s, want %s", res.Tables[0].Latest, tv)
			}
			// The copied stamps bound prism.horizon in the new region, so its
			// application's writes over them check for clock floors.
			if h := query[bool](t, as, "SELECT pg_sequence_last_value('prism.horizon') >= (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::bigint FROM kv WHERE id = 1"); !h {
				t.Fatalf("prism.horizon in the new region is below the copied rows' commit time")
			}
			copied := query[time.Time](t, as, "SELECT pg_xact_commit_timestamp(xmin) FROM kv WHERE id = 1")
			if !copied.Equal(tv) {
				t.Fatalf("copied row's commit time = %s, want the source's %s", copied, tv)
			}
			if o := query[string](t, as, "SELECT o.roname FROM kv, pg_xact_commit_timestamp_origin(kv.xmin) c JOIN pg_replication_origin o ON o.roident = c.roident WHERE id = 1"); o != "prism_na" {
				t.Fatalf("copied row's origin = %q, want prism_na", o)
			}

			newer := euUpdate(0x1000, tv.Add(time.Millisecond), "1", "eu-newer")
			older := euUpdate(0x2000, tv.Add(-time.Hour), "2", "eu-older")
			for _, r := range []struct {
				name string
				c    *pgtest.Cluster
			}{{"na", na}, {"as", as}} {
				pool, err := pgxpool.New(ctx, r.c.DSN("app"))
				if err != nil {
					t.Fatal(err)
				}
				a := apply.NewApplier(pool, zerolog.Nop(), apply.WithLocalRegion(r.name))
				for _, txn := range []*decode.Txn{newer, older} {
					if err := a.Apply(ctx, txn); err != nil {
						pool.Close()
						t.Fatalf("apply in %s: %v", r.name, err)
					}
				}
				pool.Close()
				if v := query[string](t, r.c, "SELECT v FROM kv WHERE id = 1"); v != "eu-newer" {
					t.Errorf("%s: row 1 = %q after a newer write from eu, want eu-newer", r.name, v)
				}
				if v := query[string](t, r.c, "SELECT v FROM kv WHERE id = 2"); v != "na-2" {
					t.Errorf("%s: row 2 = %q after an older write from eu, want na-2", r.name, v)
				}
			}
		})
	}
}

// TestCopiedRowsKeepBatchStamps: rows that one target transaction applied
// for several source transactions (a batch) carry their own source commit
// times in prism.batch_stamps, not the batch's; the copy gives each row its
// own, so a later write is decided the same way in the new region.
func TestCopiedRowsKeepBatchStamps(t *testing.T) {
	ctx := context.Background()
	na, as := kvRegions(t, "lwwb", `(1, 'na-1'), (2, 'na-2')`, "")
	at := time.Now().Add(time.Hour).Truncate(time.Microsecond)
	pool, err := pgxpool.New(ctx, na.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	a := apply.NewApplier(pool, zerolog.Nop(), apply.WithLocalRegion("na"))
	n, err := a.ApplyBatch(ctx, []*decode.Txn{euUpdate(0x1000, at, "1", "eu-1"), euUpdate(0x2000, at.Add(time.Second), "2", "eu-2")})
	a.Close()
	pool.Close()
	if n != 2 || err != nil {
		t.Fatalf("ApplyBatch = %d, %v", n, err)
	}
	if got := query[int64](t, na, "SELECT count(DISTINCT xmin::text) FROM kv"); got != 1 {
		t.Fatalf("the batch wrote kv in %d target transactions, want 1", got)
	}
	if _, err := bootstrap.Run(ctx, bootstrap.Config{
		Region: "as", DSN: as.DSN("app"), Source: "na",
		Peers: []bootstrap.Peer{{Region: "na", DSN: na.DSN("app")}, {Region: "eu"}},
	}, zerolog.Nop()); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[int]time.Time{1: at, 2: at.Add(time.Second)} {
		if got := query[time.Time](t, as, "SELECT pg_xact_commit_timestamp(xmin) FROM kv WHERE id = $1", id); !got.Equal(want) {
			t.Errorf("copied row %d's commit time = %s, want its source transaction's %s", id, got, want)
		}
	}
}

// TestCopiedRowsKeepClockFloors: a local version written in the source over
// one stamped ahead of the source's clock (another region's clock runs
// ahead) stamps one microsecond past that version (its clock floor), not
// at its commit time; the copy gives it that stamp, so a write from the
// region ahead stamped between the two is dropped in the new region as it
// is in the source. A copy of the bare commit time would apply it there.
func TestCopiedRowsKeepClockFloors(t *testing.T) {
	ctx := context.Background()
	na, as := kvRegions(t, "floor", `(1, 'na-1')`, "")
	// applyIn sets prism-cdc up in c (region name) and applies txn there
	// when there is one.
	applyIn := func(name string, c *pgtest.Cluster, txn *decode.Txn) {
		t.Helper()
		pool, err := pgxpool.New(ctx, c.DSN("app"))
		if err != nil {
			t.Fatal(err)
		}
		defer pool.Close()
		a := apply.NewApplier(pool, zerolog.Nop(), apply.WithLocalRegion(name))
		defer a.Close()
		if err := a.Setup(ctx); err != nil {
			t.Fatalf("setup in %s: %v", name, err)
		}
		if txn == nil {
			return
		}
		if err := a.Apply(ctx, txn); err != nil {
			t.Fatalf("apply in %s: %v", name, err)
		}
	}
	// eu's clock runs an hour ahead: its version of row 1 is stamped an
	// hour from now, and na's application then writes over it.
	ahead := time.Now().Add(time.Hour).UTC().Truncate(time.Microsecond)
	applyIn("na", na, euUpdate(0x1000, ahead, "1", "eu-ahead"))
	if err := na.Exec(ctx, "app", "UPDATE kv SET v = 'na-local' WHERE id = 1"); err != nil {
		t.Fatal(err)
	}
	const stampSQL = "SELECT prism.row_stamp('public.kv', jsonb_object(ARRAY['id'], ARRAY[id::text]), xmin) FROM kv WHERE id = 1"
	want := query[time.Time](t, na, stampSQL)
	if !want.Equal(ahead.Add(time.Microsecond)) {
		t.Fatalf("na's local version stamps at %s, want one microsecond past eu's %s (its clock floor)", want, ahead)
	}

	if _, err := bootstrap.Run(ctx, bootstrap.Config{
		Region: "as", DSN: as.DSN("app"), Source: "na",
		Peers: []bootstrap.Peer{{Region: "na", DSN: na.DSN("app")}, {Region: "eu", DSN: ""}},
	}, zerolog.Nop()); err != nil {
		t.Fatal(err)
	}
	applyIn("as", as, nil)
	if got := query[time.Time](t, as, stampSQL); !got.Equal(want) {
		t.Fatalf("the copied version stamps at %s, want the source's %s", got, want)
	}
	// A write from eu stamped between na's commit and its floor is older
	// than na's version in both regions.
	between := euUpdate(0x2000, ahead.Add(-30*time.Minute), "1", "eu-between")
	for _, r := range []struct {
		name string
		c    *pgtest.Cluster
	}{{"na", na}, {"as", as}} {
		applyIn(r.name, r.c, between)
		if v := query[string](t, r.c, "SELECT v FROM kv WHERE id = 1"); v != "na-local" {
			t.Errorf("%s: row 1 = %q after an older write from eu, want na-local", r.name, v)
		}
	}
}

// kvRegions starts region na's and region as's clusters with database
// app, with the server binaries in bin (empty: the machine's); na has
// table kv with rows (a VALUES list) and publication prism, as is empty,
// ready for a bootstrap from na. With bin, as has table kv already: the
// bootstrap's schema step runs the machine's pg_dump, which refuses a
// server newer than itself, and leaves a target that has the tables alone.
func kvRegions(t *testing.T, name, rows, bin string) (na, as *pgtest.Cluster) {
	t.Helper()
	ctx := context.Background()
	na = pgtest.Start(t, pgtest.Options{Name: name + "-na", Bin: bin})
	as = pgtest.Start(t, pgtest.Options{Name: name + "-as", Bin: bin})
	for _, c := range []*pgtest.Cluster{na, as} {
		if err := c.CreateDatabase(ctx, "app"); err != nil {
			t.Fatal(err)
		}
	}
	const schema = "CREATE TABLE kv (id int PRIMARY KEY, v text NOT NULL);"
	if err := na.Exec(ctx, "app", schema+`
		INSERT INTO kv VALUES `+rows+`;
		CREATE PUBLICATION prism FOR ALL TABLES`); err != nil {
		t.Fatal(err)
	}
	if bin != "" {
		if err := as.Exec(ctx, "app", schema); err != nil {
			t.Fatal(err)
		}
	}
	return na, as
}

// kv is table kv of kvRegions as a source's stream describes it.
var kv = &decode.Relation{ID: 1, Schema: "public", Table: "kv", ReplicaIdentity: decode.IdentityDefault, Columns: []decode.Column{
	{Name: "id", TypeOID: 23, TypeName: "int4", TypeMod: -1, Key: true},
	{Name: "v", TypeOID: 25, TypeName: "text", TypeMod: -1},
}}

// euUpdate is a transaction of region eu, ending at lsn and committed at
// at, that sets row id of kv to v.
func euUpdate(lsn pglogrepl.LSN, at time.Time, id, v string) *decode.Txn {
	return &decode.Txn{Origin: "eu", CommitLSN: lsn - 8, EndLSN: lsn, CommitTime: at, Changes: []decode.Change{{
		Op: decode.OpUpdate, Rel: kv,
		New: []decode.Value{{Kind: decode.ValueText, Data: []byte(id)}, {Kind: decode.ValueText, Data: []byte(v)}},
	}}}
}
