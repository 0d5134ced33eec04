// Package e2e runs whole prism-cdc deployments for tests: real PostgreSQL
// clusters (internal/pgtest), the built prism-cdc binary as real node
// processes with generated configs on free ports, and helpers to kill,
// restart and inspect nodes.
package e2e
