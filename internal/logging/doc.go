// Package logging builds the root zerolog.Logger from the log section of a
// node's configuration. Only main calls it; every other package receives the
// logger in its constructor. It sets no zerolog globals.
package logging
