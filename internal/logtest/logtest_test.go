package logtest

import (
	"fmt"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

func TestCheck(t *testing.T) {
	tests := []struct {
		name, line, want string // want: a substring of the problem; "" for none
	}{
		{"fine", `{"level":"info","node":"us1","peer":"eu1","message":"connected"}`, ""},
		{"nested fine", `{"config":{"node":"a"},"node":"a","list":[{"k":1},{"k":2}]}`, ""},
		{"duplicate", `{"level":"info","node":"us1","target":"eu","node":"eu1","message":"connected"}`, `key "node" twice`},
		{"nested duplicate", `{"config":{"peers":[{"name":"a","name":"b"}]}}`, `key "config.peers.name" twice`},
		{"same key at two depths", `{"node":"a","config":{"node":"a"}}`, ""},
		{"not json", `prism-cdc run: database unreachable`, "not a JSON object"},
		{"array", `[1,2]`, "not a JSON object"},
		{"truncated", `{"level":"info","node":`, "not a JSON object"},
		{"two objects", `{"a":1}{"b":2}`, "data after the object"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := Check([]byte(tc.line))
			if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
				t.Errorf("Check(%s) = %q, want %q", tc.line, got, tc.want)
			}
		})
	}
}

// TestWriterFailsTheTest: a zerolog logger that adds a key its parent has
// fails the test that wrote the line.
func TestWriterFailsTheTest(t *testing.T) {
	rec := &recorder{TB: t}
	w := New(rec, nil)
	log := zerolog.New(w).With().Str("node", "us1").Logger()
	log.Info().Str("peer", "eu1").Msg("fine")
	log.Info().Str("node", "eu1").Msg("connected")
	rec.cleanup()
	if len(rec.errors) != 1 || !strings.Contains(rec.errors[0], `key "node" twice`) || strings.Contains(rec.errors[0], "fine") {
		t.Errorf("errors = %q, want one naming the connected line's node key", rec.errors)
	}
}

// recorder stands in for a testing.TB: it keeps cleanups and errors.
type recorder struct {
	testing.TB
	cleanups []func()
	errors   []string
}

func (r *recorder) Cleanup(f func()) { r.cleanups = append(r.cleanups, f) }
func (r *recorder) Errorf(format string, args ...any) {
	r.errors = append(r.errors, fmt.Sprintf(format, args...))
}
func (r *recorder) cleanup() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
}
