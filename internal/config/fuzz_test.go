package config

import (
	"strings"
	"testing"
)

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"1000", "64MiB", "10GiB", "2MB", "512 KiB", "", "-1", "9223372036854775807", "1.5GB"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err != nil {
			return
		}
		if n < 0 {
			t.Fatalf("ParseSize(%q) = %d, want >= 0", s, n)
		}
		if back, err := ParseSize(n.String()); err != nil || back != n {
			t.Fatalf("ParseSize(%q) = %v, %v, want %d", n.String(), back, err, n)
		}
	})
}

// FuzzParse feeds arbitrary files to the loader: it must return a config or
// an error, never panic, and never show the token in an error.
func FuzzParse(f *testing.F) {
	f.Add([]byte(base))
	f.Add([]byte(base + "delivery: {retries: x}\n"))
	f.Add([]byte("node: [${PRISM_TOKEN}\n"))
	f.Add([]byte("a: &x {b: *x}\n<<: *x\n"))
	vars := env(map[string]string{"PRISM_TOKEN": "tok-1234567890"})
	f.Fuzz(func(t *testing.T, data []byte) {
		_, err := parse("f.yaml", data, vars)
		if err != nil && strings.Contains(err.Error(), "tok-1234567890") && !strings.Contains(string(data), "tok-1234567890") {
			t.Fatalf("parse error shows the token: %v", err)
		}
	})
}
