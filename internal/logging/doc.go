// Package logging builds the root zerolog.Logger from the log section of a
// node's configuration. Only main calls it; every other package receives the
// logger in its constructor. It sets one zerolog global, the first time
// New runs (before the logger has any user): durations are written as
// strings with their unit ("3.2s", "150ms"), as configuration files write
// them, instead of zerolog's default of a bare number of milliseconds.
package logging
