// Package config loads and validates one node's YAML configuration.
//
// Load reads the file, expands ${VAR} references from the environment,
// decodes it strictly (an unknown key is an error that names the key and its
// line), fills in defaults and runs Validate. Every problem found is
// reported, not only the first: the returned error joins one *Error per
// problem, each naming the file, the line where known, the key path (for
// example peers[1].nodes[0].addr) and what to write instead.
//
// Secrets never appear in errors: values substituted from the environment are
// masked in every message, and DSN passwords and the auth token are hidden by
// RedactDSN, Config.Redacted, Config.String and Config.MarshalZerologObject.
//
// The package owns no goroutines and does no I/O beyond reading the file and
// checking that TLS files exist.
package config
