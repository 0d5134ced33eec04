// Package pgtest runs throwaway PostgreSQL clusters for tests, benchmarks and
// the demo: initdb into a fresh directory, a free loopback port, logical
// decoding enabled, and a cleanup that always stops the server and removes
// the directory.
//
// When the process runs as root, the server runs as the postgres user
// (Postgres refuses to run as root), in a directory that user owns.
package pgtest
