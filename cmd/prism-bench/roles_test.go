package main

import (
	"testing"
	"time"
)

func TestRoleOf(t *testing.T) {
	for _, c := range []struct{ bt, app, want string }{
		{"walsender", "prism_na1", roleWalSender},
		{"walsender", "", roleWalSender},
		{"client backend", "pgbench", roleApp},
		{"client backend", "prism_apply_na", roleApply},
		{"logical replication worker", "", roleApply},
		{"pglogical apply 16384:1", "", roleApply},
		{"client backend", "", roleSessions},
		{"client backend", "psql", roleSessions},
		{"walwriter", "", roleServer},
		{"autovacuum worker", "", roleServer},
		{"", "", roleServer},
	} {
		if got := roleOf(c.bt, c.app); got != c.want {
			t.Errorf("roleOf(%q, %q) = %q, want %q", c.bt, c.app, got, c.want)
		}
	}
}

func TestRolesSinceSummary(t *testing.T) {
	order := roleNames([]side{{name: "source"}, {name: "regions"}})
	s0 := procCPUSnap{
		10: {role: "source " + roleWalSender, cpu: 1.0},
		11: {role: "regions " + roleApply, cpu: 5.0},
		12: {role: roleNodes, cpu: 2.0},
		13: {role: "regions " + roleServer, cpu: 9.0}, // ended meanwhile
	}
	s1 := procCPUSnap{
		10: {role: "source " + roleWalSender, cpu: 2.0},
		11: {role: "regions " + roleApply, cpu: 8.0},
		12: {role: roleNodes, cpu: 2.5},
		20: {role: "source " + roleApp, cpu: 4.0}, // started meanwhile
		21: {role: "regions " + roleServer, cpu: 0.001},
	}
	r := rolesSince(order, s0, s1)
	if r.cpu["regions "+roleApply] != 3.0 || r.cpu["source "+roleApp] != 4.0 || r.cpu["regions "+roleServer] != 0.001 {
		t.Fatalf("rolesSince = %v", r.cpu)
	}
	// Over 20 s on 2 CPUs: 8.501 s in all is 4.25 s per 10 s, 21%; the
	// roles in order, the negligible one left out of the list.
	got := r.summary(20*time.Second, 2)
	want := "source application sessions 2.00, source walsenders 0.50, regions apply 1.50, prism-cdc nodes 0.25; total 4.25 (21% of 2 CPUs)"
	if got != want {
		t.Fatalf("summary =\n%s\nwant\n%s", got, want)
	}
}
