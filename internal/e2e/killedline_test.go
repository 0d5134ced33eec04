package e2e

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/prism-cdc/prism-cdc/internal/logtest"
)

// TestEndKilledLine: a log whose last line a killed node left incomplete
// is ended before the next start appends to it, so the next node's first
// line stays a line of its own and logtest passes the file; complete and
// missing logs stay as they are.
func TestEndKilledLine(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "n1.log")
	if err := endKilledLine(path); err != nil {
		t.Fatalf("missing log: %v", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("missing log created: %v", err)
	}
	complete := `{"level":"info","message":"one"}` + "\n"
	if err := os.WriteFile(path, []byte(complete+`{"level":"debug","comp`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := endKilledLine(path); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"level":"info","message":"restarted"}` + "\n")
	f.Close()
	data, _ := os.ReadFile(path)
	want := complete + "incomplete line of a killed process: {\"level\":\"debug\",\"comp\n" + `{"level":"info","message":"restarted"}` + "\n"
	if string(data) != want {
		t.Fatalf("log = %q, want %q", data, want)
	}
	logtest.CheckFile(t, path)
	// A complete log is left alone.
	if err := endKilledLine(path); err != nil {
		t.Fatal(err)
	}
	if again, _ := os.ReadFile(path); string(again) != want {
		t.Fatalf("complete log changed: %q", again)
	}
}
