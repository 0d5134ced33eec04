package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

func TestBootstrapCommand(t *testing.T) {
	good := writeFile(t, "eu1.yaml", goodConfig)
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{"help", []string{"bootstrap", "--help"}, exitOK, "Usage: prism-cdc bootstrap --config FILE --from REGION", ""},
		{"help lists force", []string{"bootstrap", "--help"}, exitOK, "--force", ""},
		{"without from", []string{"bootstrap", "--config", good}, exitUsage, "", "--config FILE and --from REGION are required"},
		{"without config", []string{"bootstrap", "--from", "na"}, exitUsage, "", "--config FILE and --from REGION are required"},
		{"unknown region", []string{"bootstrap", "--config", good, "--from", "mars"}, exitUsage, "", `region "mars" is not among the peers`},
		{"own region", []string{"bootstrap", "--config", good, "--from", "eu"}, exitUsage, "", `region "eu" is not among the peers`},
		{"target unreachable", []string{"bootstrap", "--config", good, "--from", "na"}, exitFail, "", "target region eu: database unreachable"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(context.Background(), tc.args, &stdout, &stderr)
			if code != tc.wantCode {
				t.Fatalf("run(%q) = %d, want %d\nstdout: %s\nstderr: %s", tc.args, code, tc.wantCode, &stdout, &stderr)
			}
			if !strings.Contains(stdout.String(), tc.wantStdout) {
				t.Errorf("run(%q) stdout = %q, want it to contain %q", tc.args, &stdout, tc.wantStdout)
			}
			if !strings.Contains(stderr.String(), tc.wantStderr) {
				t.Errorf("run(%q) stderr = %q, want it to contain %q", tc.args, &stderr, tc.wantStderr)
			}
		})
	}
}
