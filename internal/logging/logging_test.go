package logging

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/config"
)

func TestNew(t *testing.T) {
	tests := []struct {
		name      string
		cfg       config.Log
		wantErr   bool
		wantDebug bool
		json      bool
	}{
		{"json info", config.Log{Level: "info", Format: config.LogJSON}, false, false, true},
		{"console debug", config.Log{Level: "debug", Format: config.LogConsole}, false, true, false},
		{"bad level", config.Log{Level: "loud", Format: config.LogJSON}, true, false, false},
		{"empty level", config.Log{Format: config.LogJSON}, true, false, false},
		{"bad format", config.Log{Level: "info", Format: "text"}, true, false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			log, err := New(&buf, tc.cfg)
			if (err != nil) != tc.wantErr {
				t.Fatalf("New(%+v) error = %v, want error %t", tc.cfg, err, tc.wantErr)
			}
			if err != nil {
				return
			}
			log.Debug().Msg("dbg")
			log.Info().Str("k", "v").Msg("hello")
			out := buf.String()
			if got := strings.Contains(out, "dbg"); got != tc.wantDebug {
				t.Errorf("debug line written = %t, want %t:\n%s", got, tc.wantDebug, out)
			}
			if !strings.Contains(out, "hello") {
				t.Fatalf("info line missing:\n%s", out)
			}
			if tc.json {
				var m map[string]any
				if err := json.Unmarshal(buf.Bytes(), &m); err != nil {
					t.Fatalf("json output %q: %v", out, err)
				}
				if m["level"] != "info" || m["k"] != "v" || m["time"] == nil {
					t.Errorf("json output = %v, want level, k and time", m)
				}
			}
		})
	}
}

// TestDurationsHaveUnits: a duration field carries its unit.
func TestDurationsHaveUnits(t *testing.T) {
	var buf bytes.Buffer
	log, err := New(&buf, config.Log{Level: "info", Format: config.LogJSON})
	if err != nil {
		t.Fatal(err)
	}
	log.Info().Dur("retry_in", 3200*time.Millisecond).Msg("retrying")
	if want := `"retry_in":"3.2s"`; !strings.Contains(buf.String(), want) {
		t.Fatalf("Dur(3.2s) wrote %s, want %s", buf.String(), want)
	}
}
