// Package faultproxy is a TCP proxy for tests that injects network faults
// between a client and a server: delay with seeded jitter, a black hole
// that swallows traffic in both directions, connection resets, refused
// connections and a bandwidth limit. Bytes that are forwarded keep their
// order within each direction of a connection.
package faultproxy
