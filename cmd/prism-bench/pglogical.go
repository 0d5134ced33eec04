package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
)

// pglogicalSettings are added to the clusters of the pglogical mesh (the
// source and pgl-eu, pgl-as), which also preload pglogical.
var pglogicalSettings = map[string]string{
	"pglogical.conflict_resolution": "last_update_wins",
	"track_commit_timestamp":        "on",
	"max_worker_processes":          "24",
}

// pglTables are the tables in pglogical's replication set "default":
// what the backlog and lag scenarios change, the markers, and pglogical's
// active-active tables.
var pglTables = []string{"pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history",
	"bench_marker", "bench_lag", "aa_pgl_hot", "aa_pgl_lag"}

// pglogicalPackage names the Debian package that provides pglogical for
// PostgreSQL major version v.
func pglogicalPackage(v int) string { return fmt.Sprintf("postgresql-%d-pglogical", v) }

// checkPglogical reports whether pglogical is installed for the
// PostgreSQL whose binaries are in binDir.
func checkPglogical(binDir string) error {
	v := pgMajor(binDir)
	lib := filepath.Join(filepath.Dir(binDir), "lib", "pglogical.so")
	ctl := fmt.Sprintf("/usr/share/postgresql/%d/extension/pglogical.control", v)
	for _, f := range []string{lib, ctl} {
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("contender pglogical needs the pglogical extension (%s is missing): install it with apt-get install -y %s, or leave pglogical out of -contenders", f, pglogicalPackage(v))
		}
	}
	return nil
}

// pglNode is one node of the pglogical mesh.
type pglNode struct {
	name    string
	cluster *pgtest.Cluster
}

// pglMesh returns the mesh's nodes: the source as na, pgl-eu, pgl-as.
func (e *env) pglMesh() []pglNode {
	return []pglNode{{"na", e.src}, {"eu", e.pgl[0]}, {"as", e.pgl[1]}}
}

// pglSub names the subscription of node to provider. pglogical names a
// slot after the provider's database and node and the subscription only,
// so subscription names must be unique across the mesh.
func pglSub(provider, node string) string { return "pgl_" + provider + "_" + node }

// setupPglogical makes the source, pgl-eu and pgl-as a full pglogical
// mesh (one subscription per ordered pair, forwarding no origins) and
// leaves the source's two subscribers disabled, their slots created, for
// the backlog.
func (e *env) setupPglogical(ctx context.Context) error {
	nodes := e.pglMesh()
	e.logf("pglogical: creating the nodes and the replication set")
	if err := parallelNodes(nodes, func(n pglNode) error {
		var b strings.Builder
		fmt.Fprintf(&b, "CREATE EXTENSION pglogical;\nSELECT pglogical.create_node(node_name := '%s', dsn := '%s');\n", n.name, n.cluster.DSN(db))
		for _, t := range pglTables {
			fmt.Fprintf(&b, "SELECT pglogical.replication_set_add_table('default', '%s', false);\n", t)
		}
		return n.cluster.Exec(ctx, db, b.String())
	}); err != nil {
		return fmt.Errorf("pglogical: %w", err)
	}
	e.logf("pglogical: creating 6 subscriptions (full mesh)")
	if err := parallelNodes(nodes, func(n pglNode) error {
		var b strings.Builder
		for _, p := range nodes {
			if p.name == n.name {
				continue
			}
			fmt.Fprintf(&b, `SELECT pglogical.create_subscription(subscription_name := '%s', provider_dsn := '%s',
	replication_sets := ARRAY['default'], synchronize_structure := false, synchronize_data := false, forward_origins := '{}');
`, pglSub(p.name, n.name), p.cluster.DSN(db))
		}
		return n.cluster.Exec(ctx, db, b.String())
	}); err != nil {
		return fmt.Errorf("pglogical: %w", err)
	}
	if err := e.pglWaitReplicating(ctx, nodes); err != nil {
		return err
	}
	if err := e.pglSourceSubs(ctx, false); err != nil {
		return err
	}
	conn, err := e.src.Connect(ctx, db)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	rows, err := conn.Query(ctx, "SELECT slot_name FROM pg_replication_slots WHERE plugin = 'pglogical_output' ORDER BY slot_name")
	if err != nil {
		return fmt.Errorf("pglogical: list slots: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return fmt.Errorf("pglogical: list slots: %w", err)
		}
		e.pglSrcSlots = append(e.pglSrcSlots, s)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("pglogical: list slots: %w", err)
	}
	if len(e.pglSrcSlots) != 2 {
		return fmt.Errorf("pglogical: the source has slots %v, want one per subscriber", e.pglSrcSlots)
	}
	return nil
}

// parallelNodes is parallel over pglogical nodes, naming the node in
// each error.
func parallelNodes(nodes []pglNode, fn func(pglNode) error) error {
	return parallel(nodes, func(n pglNode) error {
		if err := fn(n); err != nil {
			return fmt.Errorf("node %s: %w", n.name, err)
		}
		return nil
	})
}

// pglWaitReplicating waits until every subscription of nodes is
// replicating.
func (e *env) pglWaitReplicating(ctx context.Context, nodes []pglNode) error {
	return pollUntil(ctx, 2*time.Minute, 200*time.Millisecond, "pglogical subscriptions to replicate", func() (bool, error) {
		for _, n := range nodes {
			conn, err := n.cluster.Connect(ctx, db)
			if err != nil {
				return false, err
			}
			var waiting int
			err = conn.QueryRow(ctx, "SELECT count(*) FROM pglogical.show_subscription_status() WHERE status <> 'replicating'").Scan(&waiting)
			conn.Close(context.WithoutCancel(ctx))
			if err != nil || waiting > 0 {
				return false, err
			}
		}
		return true, nil
	})
}

// pglSourceSubs enables or disables the subscriptions of pgl-eu and
// pgl-as to the source, both at once (each on its own node: pglogical
// starts the workers of subscriptions enabled one after another on one
// node about a second apart). Disabling waits until the source's slots
// are released.
func (e *env) pglSourceSubs(ctx context.Context, on bool) error {
	nodes := e.pglMesh()[1:]
	if err := parallelNodes(nodes, func(n pglNode) error {
		fn := "alter_subscription_disable"
		if on {
			fn = "alter_subscription_enable"
		}
		return n.cluster.Exec(ctx, db, fmt.Sprintf("SELECT pglogical.%s('%s', true)", fn, pglSub("na", n.name)))
	}); err != nil {
		return fmt.Errorf("pglogical: %w", err)
	}
	if on {
		return nil
	}
	return e.waitSlotsReleased(ctx, "pglogical to release the source's slots", "plugin = 'pglogical_output'")
}

// drainPglogical enables pgl-eu's and pgl-as's subscriptions to the
// source and times their catch-up to end. The mesh's other subscriptions
// run throughout, as in a full mesh.
func (e *env) drainPglogical(ctx context.Context, end pglogrepl.LSN, marker int, timeout time.Duration) (drain, error) {
	return e.drainSubscriptions(ctx, pglogical, e.pgl[:], e.pglSourceSubs, e.pglSrcSlots, end, marker, timeout)
}
