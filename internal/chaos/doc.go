// Package chaos is the reliability suite: it runs real prism-cdc node
// processes for three regions (na; eu with eu1 and eu2; as) under a mixed
// workload while it kills nodes, crashes and restarts Postgres, and breaks
// the network between regions through fault proxies, all chosen from a
// printed seed (PRISM_SEED replays a run). After every run it heals the
// faults, drains, and checks the DESIGN.md invariants: every region holds
// the same rows, every acknowledged client write is in every region exactly
// once, and no slot was ever confirmed past a transaction some region had
// not yet made durable.
//
// The package holds only tests. `go test ./internal/chaos` runs the short
// version with fixed seeds; scripts/chaos.sh N runs N fault cycles.
package chaos
