package chaos

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/e2e"
)

const validConfig = `node: na1
region: na
database: "host=127.0.0.1 port=1 user=postgres dbname=app password=hunter2"
listen: "127.0.0.1:7101"
auth: {token: "s3cret-token-value"}
peers:
  - region: eu
    nodes: [{name: eu1, addr: "127.0.0.1:7201"}]
    database: "host=127.0.0.1 port=2 user=postgres dbname=app password=hunter2"
delivery: {ack_timeout: 2s, retries: 5, backoff: 200ms, max_backoff: 5s, max_in_flight: 64MiB}
http: "127.0.0.1:9101"
`

// TestHostileConfigs feeds the command broken and hostile YAML. Each must
// be refused with exit status 2 and a message naming the problem, quickly,
// without a panic, without echoing a huge value back and without the
// token or a DSN password.
func TestHostileConfigs(t *testing.T) {
	dir := t.TempDir()
	bin := e2e.Build(t, dir)
	rng := rand.New(rand.NewSource(11))
	garbage := make([]byte, 4096)
	rng.Read(garbage)
	huge := strings.Repeat("n", 5<<20)
	bomb := "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
	for i, prev := 1, "a"; i < 12; i++ {
		name := string(rune('a' + i))
		bomb += name + ": &" + name + " [*" + prev + ", *" + prev + ", *" + prev + ", *" + prev + ", *" + prev + ", *" + prev + ", *" + prev + ", *" + prev + ", *" + prev + ", *" + prev + "]\n"
		prev = name
	}
	cases := []struct {
		name, yaml string
		want       string // the message names this
	}{
		{"unknown key", validConfig + "nodee: x\n", "nodee"},
		{"unknown nested key", strings.Replace(validConfig, "retries: 5", "retries: 5, retires: 3", 1), "retires"},
		{"wrong type", strings.Replace(validConfig, `listen: "127.0.0.1:7101"`, "listen: [1, 2]", 1), "listen"},
		{"number too large", strings.Replace(validConfig, "retries: 5", "retries: 99999999999999999999999999", 1), "retries"},
		{"negative retries", strings.Replace(validConfig, "retries: 5", "retries: -3", 1), "retries"},
		{"size too large", strings.Replace(validConfig, "max_in_flight: 64MiB", "max_in_flight: 99999999999999PiB", 1), "max_in_flight"},
		{"duration too large", strings.Replace(validConfig, "ack_timeout: 2s", "ack_timeout: 99999999999999h", 1), "ack_timeout"},
		{"duration without unit", strings.Replace(validConfig, "ack_timeout: 2s", "ack_timeout: 2", 1), "ack_timeout"},
		{"huge node name", strings.Replace(validConfig, "node: na1", "node: "+huge, 1), "node"},
		{"alias bomb", validConfig + bomb, ""},
		{"deep nesting", validConfig + "x: " + strings.Repeat("[", 20000) + strings.Repeat("]", 20000) + "\n", ""},
		{"binary garbage", string(garbage), ""},
		{"empty file", "", ""},
		{"tab indentation", strings.Replace(validConfig, "  - region: eu", "\t- region: eu", 1), ""},
		{"duplicate key", validConfig + "node: na2\n", "node"},
		{"null everywhere", "node: null\nregion: ~\npeers: null\n", "region"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_")+".yaml")
			if err := os.WriteFile(path, []byte(tc.yaml), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := config.Load(path); err == nil {
				t.Fatalf("config.Load(%s) = nil error, want one", tc.name)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, "run", "--config", path)
			var stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stderr, &stderr
			err := cmd.Run()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 2 {
				t.Fatalf("prism-cdc run = %v, want exit status 2\n%.2000s", err, stderr.String())
			}
			out := stderr.String()
			if strings.Contains(out, "panic") || strings.Contains(out, "goroutine ") {
				t.Fatalf("prism-cdc run panicked:\n%.4000s", out)
			}
			if len(out) > 64<<10 {
				t.Fatalf("error output is %d bytes long; it should name the problem, not echo the input", len(out))
			}
			for _, secret := range []string{"s3cret-token-value", "hunter2"} {
				if strings.Contains(out, secret) {
					t.Fatalf("error output shows a secret %q:\n%s", secret, out)
				}
			}
			if !strings.Contains(out, "bad config") || (tc.want != "" && !strings.Contains(out, tc.want)) {
				t.Fatalf("error output does not name %q:\n%.2000s", tc.want, out)
			}
		})
	}
}
