package logging

import (
	"fmt"
	"io"
	"time"

	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/config"
)

// New returns a logger writing to w at cfg.Level, as JSON lines or, for
// format console, as human-readable lines. Every event carries a timestamp.
// The logger may be used from several goroutines whatever w is.
func New(w io.Writer, cfg config.Log) (zerolog.Logger, error) {
	level, err := zerolog.ParseLevel(cfg.Level)
	if err != nil || cfg.Level == "" {
		return zerolog.Nop(), fmt.Errorf("log level %q: write trace, debug, info, warn or error", cfg.Level)
	}
	switch cfg.Format {
	case config.LogJSON:
	case config.LogConsole:
		w = zerolog.ConsoleWriter{Out: w, NoColor: true, TimeFormat: time.RFC3339}
	default:
		return zerolog.Nop(), fmt.Errorf("log format %q: write json or console", cfg.Format)
	}
	if zerolog.DurationFieldFormat != zerolog.DurationFormatString {
		// Written once, before any logger of the process logs; later calls
		// only read it.
		zerolog.DurationFieldFormat = zerolog.DurationFormatString
	}
	// A node logs from many goroutines at once: one event is one Write,
	// and SyncWriter keeps two Writes apart for a writer that is not safe
	// for concurrent use (a buffer, a pipe of the caller's).
	return zerolog.New(zerolog.SyncWriter(w)).Level(level).With().Timestamp().Logger(), nil
}
