package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// base is a valid configuration that the validation cases modify.
const base = `node: eu1
region: eu
database: "host=127.0.0.1 port=5433 user=postgres dbname=app"
listen: "127.0.0.1:7201"
auth:
  token: "${PRISM_TOKEN}"
peers:
  - region: na
    nodes:
      - {name: na1, addr: "127.0.0.1:7101"}
    database: "host=127.0.0.1 port=5432 user=postgres dbname=app"
  - region: as
    nodes:
      - {name: as1, addr: "127.0.0.1:7301"}
      - {name: as2, addr: "127.0.0.1:7302"}
    database: "postgres://postgres@127.0.0.1:5434/app"
`

func env(vars map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) {
		v, ok := vars[k]
		return v, ok
	}
}

var testEnv = env(map[string]string{"PRISM_TOKEN": "tok-1234567890"})

func TestDefaults(t *testing.T) {
	c, err := parse("eu1.yaml", []byte(base), testEnv)
	if err != nil {
		t.Fatalf("parse(base) = %v, want nil", err)
	}
	checks := []struct {
		name string
		got  any
		want any
	}{
		{"publication", c.Publication, "prism"},
		{"output_plugin", c.OutputPlugin, "auto"},
		{"slot", c.Slot, "prism_eu"},
		{"token", c.Auth.Token, "tok-1234567890"},
		{"ack_timeout", c.Delivery.AckTimeout, 2 * time.Second},
		{"retries", c.Delivery.Retries, 5},
		{"backoff", c.Delivery.Backoff, 200 * time.Millisecond},
		{"max_backoff", c.Delivery.MaxBackoff, 5 * time.Second},
		{"max_in_flight", c.Delivery.MaxInFlight, Size(64 << 20)},
		{"spill.above", c.Spill.Above, Size(32 << 20)},
		{"spill.dir", c.Spill.Dir, ""},
		{"conflicts.default", c.Conflicts.Default, LastWriteWins},
		{"conflicts.keep", c.Conflicts.Keep, 30 * 24 * time.Hour},
		{"on_apply_error", c.OnApplyError, Halt},
		{"sync", c.Sync, Sync{Mode: SyncOff}},
		{"ddl", c.DDL, DDLOff},
		{"spool.max_bytes", c.Spool.MaxBytes, Size(10 << 30)},
		{"log.level", c.Log.Level, "info"},
		{"log.format", c.Log.Format, LogJSON},
		{"path", c.Path, "eu1.yaml"},
		{"peers", len(c.Peers), 2},
		{"peer nodes", c.Peers[1].Nodes[1], PeerNode{Name: "as2", Addr: "127.0.0.1:7302"}},
	}
	for _, tc := range checks {
		if tc.got != tc.want {
			t.Errorf("%s = %v, want %v", tc.name, tc.got, tc.want)
		}
	}
}

// TestParseDuration: Go durations and whole days.
func TestParseDuration(t *testing.T) {
	for s, want := range map[string]time.Duration{"0": 0, "90d": 90 * 24 * time.Hour, "72h": 72 * time.Hour, "1h30m": 90 * time.Minute} {
		if got, err := ParseDuration(s); err != nil || got != want {
			t.Errorf("ParseDuration(%q) = %s, %v; want %s", s, got, err, want)
		}
	}
	for _, s := range []string{"d", "1.5d", "-1d", "30 days", "99999999d"} {
		if got, err := ParseDuration(s); err == nil {
			t.Errorf("ParseDuration(%q) = %s, want an error", s, got)
		}
	}
	if got := FormatDuration(30 * 24 * time.Hour); got != "30d" {
		t.Errorf("FormatDuration(30 days) = %s", got)
	}
}

// TestDeliveryResolved: each delivery key is resolved once, at load: an
// absent key gets its default, an explicit one keeps its value (zero
// included) while the other keys keep their defaults.
func TestDeliveryResolved(t *testing.T) {
	def := DefaultDelivery()
	with := func(f func(*Delivery)) Delivery { d := def; f(&d); return d }
	cases := []struct {
		name string
		yaml string
		want Delivery
	}{
		{"no delivery section", "", def},
		{"empty delivery section", "delivery: {}\n", def},
		{"null retries", "delivery: {retries: ~}\n", def},
		{"retries 0", "delivery: {retries: 0}\n", with(func(d *Delivery) { d.Retries = 0 })},
		{"retries 2", "delivery: {retries: 2}\n", with(func(d *Delivery) { d.Retries = 2 })},
		{"ack_timeout", "delivery: {ack_timeout: 750ms}\n", with(func(d *Delivery) { d.AckTimeout = 750 * time.Millisecond })},
		{"backoff", "delivery: {backoff: 1s}\n", with(func(d *Delivery) { d.Backoff = time.Second })},
		{"max_backoff", "delivery: {max_backoff: 1m}\n", with(func(d *Delivery) { d.MaxBackoff = time.Minute })},
		{"max_in_flight", "delivery: {max_in_flight: 1MiB}\n", with(func(d *Delivery) { d.MaxInFlight = MiB })},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := parse("eu1.yaml", []byte(base+tc.yaml), testEnv)
			if err != nil {
				t.Fatalf("parse(%q) = %v, want nil", tc.yaml, err)
			}
			if c.Delivery != tc.want {
				t.Fatalf("parse(%q).Delivery = %+v, want %+v", tc.yaml, c.Delivery, tc.want)
			}
		})
	}
	want := Delivery{AckTimeout: 2 * time.Second, Retries: 5, Backoff: 200 * time.Millisecond, MaxBackoff: 5 * time.Second, MaxInFlight: 64 * MiB}
	if def != want {
		t.Fatalf("DefaultDelivery() = %+v, want the documented %+v", def, want)
	}
}

func TestExplicitValues(t *testing.T) {
	yml := base + `publication: pub
slot: my_slot
output_plugin: prism_pgoutput
delivery: {ack_timeout: 500ms, retries: 0, backoff: 1s, max_backoff: 1m, max_in_flight: 2MB}
conflicts:
  default: source_wins
  tables: {"public.accounts": keep_local}
on_apply_error: dead_letter
on_apply_error_tables: {"public.orders": undo, "public.audit": halt}
sync: quorum:2
spool: {dir: /var/lib/prism, max_bytes: 512KiB}
spill: {dir: /tmp, above: 1MiB}
ddl: replicate
http: "127.0.0.1:9201"
log: {level: debug, format: console}
procs: 3
`
	c, err := parse("eu1.yaml", []byte(yml), testEnv)
	if err != nil {
		t.Fatalf("parse = %v, want nil", err)
	}
	checks := []struct {
		name string
		got  any
		want any
	}{
		{"publication", c.Publication, "pub"},
		{"slot", c.Slot, "my_slot"},
		{"output_plugin", c.OutputPlugin, "prism_pgoutput"},
		{"ack_timeout", c.Delivery.AckTimeout, 500 * time.Millisecond},
		{"retries", c.Delivery.Retries, 0},
		{"max_backoff", c.Delivery.MaxBackoff, time.Minute},
		{"max_in_flight", c.Delivery.MaxInFlight, Size(2000000)},
		{"spill", c.Spill, Spill{Dir: "/tmp", Above: Size(1 << 20)}},
		{"conflicts.default", c.Conflicts.Default, SourceWins},
		{"conflicts.For(accounts)", c.Conflicts.For("public.accounts"), KeepLocal},
		{"conflicts.For(other)", c.Conflicts.For("public.other"), SourceWins},
		{"on_apply_error", c.OnApplyError, DeadLetter},
		{"ApplyErrorFor(orders)", c.ApplyErrorFor("public.orders"), Undo},
		{"ApplyErrorFor(audit)", c.ApplyErrorFor("public.audit"), Halt},
		{"ApplyErrorFor(other)", c.ApplyErrorFor("public.other"), DeadLetter},
		{"ApplyErrorFor(no table)", c.ApplyErrorFor(""), DeadLetter},
		{"sync", c.Sync, Sync{Mode: SyncQuorum, Quorum: 2}},
		{"ddl", c.DDL, DDLReplicate},
		{"spool", c.Spool, Spool{Dir: "/var/lib/prism", MaxBytes: 512 * KiB}},
		{"http", c.HTTP, "127.0.0.1:9201"},
		{"log", c.Log, Log{Level: "debug", Format: LogConsole}},
		{"procs", c.Procs, 3},
	}
	for _, tc := range checks {
		if tc.got != tc.want {
			t.Errorf("%s = %v, want %v", tc.name, tc.got, tc.want)
		}
	}
}

func TestExpand(t *testing.T) {
	vars := env(map[string]string{"A": "alpha", "EMPTY": "", "B_2": "beta"})
	tests := []struct {
		name    string
		in      string
		want    string
		wantErr string // substring of the error; empty for success
	}{
		{"plain", "x: 1\n", "x: 1\n", ""},
		{"var", "x: ${A}\n", "x: alpha\n", ""},
		{"two vars", "x: ${A}-${B_2}\n", "x: alpha-beta\n", ""},
		{"empty var", "x: '${EMPTY}'\n", "x: ''\n", ""},
		{"escaped dollar", "x: a$$b\n", "x: a$b\n", ""},
		{"escaped reference", "x: $${A}\n", "x: ${A}\n", ""},
		{"lone dollar kept", "x: a$b $\n", "x: a$b $\n", ""},
		{"comment line untouched", "# ${UNSET}\nx: 1\n", "# ${UNSET}\nx: 1\n", ""},
		{"unset", "x: 1\ny: ${UNSET}\n", "", "f.yaml:2: environment variable UNSET is not set"},
		{"unterminated", "x: ${A\n", "", "f.yaml:1: unterminated ${"},
		{"bad name", "x: ${1A}\n", "", "${1A} is not a valid variable reference"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, _, errs := expand("f.yaml", []byte(tc.in), vars)
			err := errors.Join(errs...)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("expand(%q) error = %v, want %q", tc.in, err, tc.wantErr)
				}
				return
			}
			if err != nil || string(got) != tc.want {
				t.Fatalf("expand(%q) = %q, %v, want %q", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestUnsetVariableInLoad(t *testing.T) {
	_, err := parse("eu1.yaml", []byte(base), env(nil))
	if err == nil || !strings.Contains(err.Error(), "eu1.yaml:6: environment variable PRISM_TOKEN is not set") {
		t.Fatalf("parse without PRISM_TOKEN = %v, want it named with its line", err)
	}
}

func TestUnknownKey(t *testing.T) {
	tests := []struct {
		name string
		yml  string
		want []string
	}{
		{"top level", base + "listne: x\n", []string{"eu1.yaml:17: listne: unknown key \"listne\"", `did you mean "listen"?`}},
		{"nested", base + "delivery:\n  ack_timout: 1s\n", []string{"eu1.yaml:18: delivery.ack_timout: unknown key", `did you mean "ack_timeout"?`, "Valid keys under delivery:"}},
		{"in list", strings.Replace(base, "{name: na1,", "{nme: na1, name: na1,", 1), []string{"eu1.yaml:10: peers[0].nodes[0].nme: unknown key"}},
		{"wrong shape", base + "peers: na\n", []string{"eu1.yaml:17: peers: expected a list"}},
		{"int expected", base + "delivery: {retries: five}\n", []string{"eu1.yaml:17: delivery.retries: expected a whole number, found \"five\""}},
		{"bool expected", strings.Replace(base, "auth:\n", "auth:\n  insecure: yes\n", 1), []string{"eu1.yaml:6: auth.insecure: expected true or false"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parse("eu1.yaml", []byte(tc.yml), testEnv)
			if err == nil {
				t.Fatalf("parse = nil, want error containing %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("parse = %v, want it to contain %q", err, w)
				}
			}
		})
	}
}

func TestSyntaxErrors(t *testing.T) {
	tests := []struct {
		name, yml, want string
	}{
		{"empty", "", "eu1.yaml: the file is empty"},
		{"comments only", "# nothing\n", "eu1.yaml: the file is empty"},
		{"not a mapping", "- a\n", "expected a mapping of keys"},
		{"bad yaml", "node: eu1\n  region: eu\n", "eu1.yaml:2:"},
		{"duplicate key", "node: eu1\nnode: eu2\n", "eu1.yaml:2:"},
		{"two documents", base + "---\nnode: x\n", "more than one YAML document"},
		// The parser's errors, at known lines (yaml.v3 prints them one
		// line early, and none at all on line 1).
		{"sequence item in a mapping", "node: eu1\nregion: eu\nlisten: x\n- y\n", "eu1.yaml:4: did not find expected key"},
		{"key after a sequence", "- a\nnode: b\n", "eu1.yaml:2: did not find expected '-' indicator"},
		{"unclosed flow sequence", "node: eu1\nregion: [eu\nlisten: x\n", "eu1.yaml:2: did not find expected ',' or ']'"},
		{"unclosed flow mapping", "node: eu1\nregion: eu\ndelivery: {retries: 1\nlisten: x\n", "eu1.yaml:3: did not find expected ',' or '}'"},
		{"text after a flow sequence", "node: eu1\nregion: [eu] x\n", "eu1.yaml:2: did not find expected key"},
		{"text after a flow sequence on line 1", "node: [eu1] x\nregion: eu\n", "eu1.yaml:1: did not find expected key"},
		// The scanner's errors already carry 1-based lines.
		{"tab indentation", "node: eu1\n\tregion: eu\n", "eu1.yaml:2: found a tab character"},
		{"value after a value", "node: eu1\nregion: eu\nlisten: a: b\n", "eu1.yaml:3: mapping values are not allowed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parse("eu1.yaml", []byte(tc.yml), testEnv)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("parse(%q) = %v, want error containing %q", tc.yml, err, tc.want)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	dir := t.TempDir()
	pem := filepath.Join(dir, "node.pem")
	if err := os.WriteFile(pem, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	replace := func(old, new string) func(string) string {
		return func(s string) string {
			if !strings.Contains(s, old) {
				t.Fatalf("base does not contain %q", old)
			}
			return strings.Replace(s, old, new, 1)
		}
	}
	appendYAML := func(extra string) func(string) string {
		return func(s string) string { return s + extra }
	}
	tests := []struct {
		name string
		edit func(string) string
		want string // "key: message" substring
	}{
		{"missing node", replace("node: eu1\n", ""), "node: missing; write the node name"},
		{"missing region", replace("region: eu\n", ""), "region: missing; write the region name"},
		{"missing database", replace(`database: "host=127.0.0.1 port=5433 user=postgres dbname=app"`+"\n", ""), "database: missing"},
		{"missing listen", replace(`listen: "127.0.0.1:7201"`+"\n", ""), "listen: missing"},
		{"bad database", replace("port=5433", "port=notaport"), "eu1.yaml:3: database: not a valid PostgreSQL connection string"},
		{"bad node name", replace("node: eu1", "node: EU-1"), `eu1.yaml:1: node: "EU-1" is not a valid node name; use at most 63 lowercase letters`},
		{"bad region name", replace("region: eu", "region: Europe"), `region: "Europe" is not a valid region name`},
		{"region too long", replace("region: eu", "region: "+strings.Repeat("e", 58)), "is not a valid region name; use at most 57"},
		{"bad peer node name", replace("name: na1", "name: na.1"), `peers[0].nodes[0].name: "na.1" is not a valid node name`},
		{"bad slot", appendYAML("slot: prism-eu\n"), `slot: "prism-eu" is not a valid slot name`},
		{"bad publication", appendYAML("publication: Prism\n"), `publication: "Prism" is not a valid publication name`},
		{"duplicate own node name", replace("name: na1", "name: eu1"), `eu1.yaml:10: peers[0].nodes[0].name: node name "eu1" is already used at node`},
		{"duplicate peer node name", replace("name: as2", "name: na1"), `peers[1].nodes[1].name: node name "na1" is already used at peers[0].nodes[0].name`},
		{"duplicate peer region", replace("region: as", "region: na"), `eu1.yaml:12: peers[1].region: region "na" is already used at peers[0].region`},
		{"peer is own region", replace("region: na", "region: eu"), `peers[0].region: "eu" is this node's own region`},
		{"peer missing region", replace("  - region: na\n    nodes:", "  - nodes:"), "peers[0].region: missing"},
		{"peer without nodes", replace("    nodes:\n      - {name: na1, addr: \"127.0.0.1:7101\"}\n", ""), "peers[0].nodes: missing; list the region's nodes"},
		{"peer without database", replace("    database: \"postgres://postgres@127.0.0.1:5434/app\"\n", ""), "eu1.yaml:12: peers[1].database: missing; write the DSN"},
		{"peer bad database", replace("postgres://postgres@127.0.0.1:5434/app", "postgres://postgres@127.0.0.1:port/app"), "peers[1].database: not a valid PostgreSQL connection string"},
		{"peer node without addr", replace(`{name: na1, addr: "127.0.0.1:7101"}`, "{name: na1}"), "peers[0].nodes[0].addr: missing"},
		{"bad addr", replace(`addr: "127.0.0.1:7301"`, `addr: "127.0.0.1"`), `eu1.yaml:14: peers[1].nodes[0].addr: "127.0.0.1" is not host:port; write e.g. "127.0.0.1:7101"`},
		{"addr without host", replace(`addr: "127.0.0.1:7301"`, `addr: ":7301"`), `peers[1].nodes[0].addr: ":7301" has no host`},
		{"addr bad port", replace(`addr: "127.0.0.1:7301"`, `addr: "127.0.0.1:99999"`), `peers[1].nodes[0].addr: "127.0.0.1:99999" has no valid port`},
		{"duplicate addr", replace(`addr: "127.0.0.1:7302"`, `addr: "127.0.0.1:7301"`), `peers[1].nodes[1].addr: address "127.0.0.1:7301" is already used at peers[1].nodes[0].addr`},
		{"peer addr is own listen", replace(`addr: "127.0.0.1:7101"`, `addr: "127.0.0.1:7201"`), `peers[0].nodes[0].addr: address "127.0.0.1:7201" is already used at listen`},
		{"bad listen", replace(`listen: "127.0.0.1:7201"`, `listen: "localhost"`), `listen: "localhost" is not host:port`},
		{"bad http", appendYAML("http: nine\n"), `http: "nine" is not host:port`},
		{"http equals listen", appendYAML("http: \"127.0.0.1:7201\"\n"), `http: address "127.0.0.1:7201" is already used at listen`},
		{"zero ack_timeout", appendYAML("delivery: {ack_timeout: 0s}\n"), "eu1.yaml:17: delivery.ack_timeout: 0s must be greater than zero; write e.g. 2s"},
		{"tiny ack_timeout", appendYAML("delivery: {ack_timeout: 5ms}\n"), "eu1.yaml:17: delivery.ack_timeout: 5ms is too short"},
		{"spill dir missing", appendYAML("spill: {dir: /nonexistent/prism-spill}\n"), `spill.dir: "/nonexistent/prism-spill" is not a directory`},
		{"unknown output plugin", appendYAML("output_plugin: wal2json\n"), `output_plugin: "wal2json" is not an output plugin prism-cdc reads; write auto`},
		{"negative procs", appendYAML("procs: -1\n"), "procs: -1 is not a number of CPUs; write a number from 1 to 1024, or 0 (the default) to let the node choose"},
		{"spill above zero", appendYAML("spill: {above: 0}\n"), "spill.above: 0 must be greater than zero; write e.g. 32MiB"},
		{"negative backoff", appendYAML("delivery: {backoff: -1s}\n"), "delivery.backoff: -1s must be greater than zero"},
		{"zero max_backoff", appendYAML("delivery: {max_backoff: 0s}\n"), "delivery.max_backoff: 0s must be greater than zero"},
		{"unparsable duration", appendYAML("delivery: {ack_timeout: 2}\n"), `delivery.ack_timeout: "2" is not a duration; write a number with a unit, e.g. 2s`},
		{"backoff above max", appendYAML("delivery: {backoff: 10s, max_backoff: 5s}\n"), "delivery.backoff: 10s is larger than delivery.max_backoff (5s)"},
		{"negative retries", appendYAML("delivery: {retries: -1}\n"), "delivery.retries: -1 is negative; write 0 or more"},
		{"bad size", appendYAML("delivery: {max_in_flight: 64MB/s}\n"), `delivery.max_in_flight: "64MB/s" is not a size`},
		{"zero size", appendYAML("delivery: {max_in_flight: 0}\n"), "delivery.max_in_flight: 0 must be greater than zero"},
		{"bad spool size", appendYAML("spool: {max_bytes: lots}\n"), `spool.max_bytes: "lots" is not a size`},
		{"bad conflict default", appendYAML("conflicts: {default: newest}\n"), `conflicts.default: "newest" is not a conflict policy; write last_write_wins, source_wins, keep_local or error`},
		{"bad conflict table policy", appendYAML("conflicts: {tables: {public.t: newest}}\n"), `conflicts.tables["public.t"]: "newest" is not a conflict policy`},
		{"bad conflict table name", appendYAML("conflicts: {tables: {accounts: source_wins}}\n"), `eu1.yaml:17: conflicts.tables["accounts"]: "accounts" is not a table name; write it as schema.table`},
		{"bad conflicts keep", appendYAML("conflicts: {keep: 30 days}\n"), `conflicts.keep: "30 days" is not a duration; write a number with a unit, e.g. 30d`},
		{"negative conflicts keep", appendYAML("conflicts: {keep: -1h}\n"), "conflicts.keep: -1h0m0s is negative"},
		{"bad ddl", appendYAML("ddl: on\n"), `ddl: "on" is not a DDL mode; write off or replicate`},
		{"bad on_apply_error", appendYAML("on_apply_error: skip\n"), `on_apply_error: "skip" is not an apply error policy; write halt, dead_letter or undo`},
		{"bad on_apply_error table policy", appendYAML("on_apply_error_tables: {public.t: skip}\n"), `on_apply_error_tables["public.t"]: "skip" is not an apply error policy; write halt, dead_letter or undo`},
		{"bad on_apply_error table name", appendYAML("on_apply_error_tables: {t: undo}\n"), `on_apply_error_tables["t"]: "t" is not a table name; write it as schema.table`},
		{"on_apply_error_tables not a map", appendYAML("on_apply_error_tables: undo\n"), `on_apply_error_tables: expected a mapping`},
		{"bad sync", appendYAML("sync: always\n"), `sync: "always" is not a sync mode`},
		{"quorum too large", appendYAML("sync: quorum:3\n"), "sync: quorum:3 waits for 3 regions but there are 2 peer regions"},
		{"quorum zero", appendYAML("sync: quorum:0\n"), `sync: "quorum:0" is not a sync mode`},
		{"no auth", replace(`  token: "${PRISM_TOKEN}"`, `  token: ""`), "auth.token: missing; set a shared secret"},
		{"tls cert without key", replace("auth:\n", "auth:\n  tls: {cert: "+pem+"}\n"), "auth.tls.key: missing; auth.tls.cert is set"},
		{"tls key without cert", replace("auth:\n", "auth:\n  tls: {key: "+pem+"}\n"), "auth.tls.cert: missing; auth.tls.key is set"},
		{"tls ca only", replace("auth:\n", "auth:\n  tls: {ca: "+pem+"}\n"), "auth.tls.cert: missing; auth.tls.ca is set"},
		{"tls file missing", replace("auth:\n", "auth:\n  tls: {cert: "+pem+", key: "+pem+".missing}\n"), "auth.tls.key: cannot read \"" + pem + ".missing\": no such file or directory"},
		{"tls file is dir", replace("auth:\n", "auth:\n  tls: {cert: "+pem+", key: "+pem+", ca: "+dir+"}\n"), "auth.tls.ca: \"" + dir + "\" is a directory"},
		{"bad log level", appendYAML("log: {level: verbose}\n"), `log.level: "verbose" is not a log level; write trace, debug, info, warn or error`},
		{"bad log format", appendYAML("log: {format: text}\n"), `log.format: "text" is not a log format; write json or console`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parse("eu1.yaml", []byte(tc.edit(base)), testEnv)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("parse = %v\nwant error containing %q", err, tc.want)
			}
			var ce *Error
			if !errors.As(err, &ce) || ce.File != "eu1.yaml" {
				t.Errorf("parse error %v is not a *Error naming eu1.yaml", err)
			}
		})
	}
}

func TestBadRegionReportedOnce(t *testing.T) {
	for _, yml := range []string{strings.Replace(base, "region: eu\n", "", 1), strings.Replace(base, "region: eu", "region: Europe", 1)} {
		_, err := parse("eu1.yaml", []byte(yml), testEnv)
		if err == nil || strings.Contains(err.Error(), "slot") {
			t.Errorf("parse = %v, want a region error and no slot error", err)
		}
	}
}

func TestValidTLS(t *testing.T) {
	dir := t.TempDir()
	pem := filepath.Join(dir, "node.pem")
	if err := os.WriteFile(pem, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	yml := strings.Replace(base, "auth:\n", "auth:\n  tls: {cert: "+pem+", key: "+pem+", ca: "+pem+"}\n", 1)
	if _, err := parse("eu1.yaml", []byte(yml), testEnv); err != nil {
		t.Fatalf("parse with TLS = %v, want nil", err)
	}
}

func TestInsecureWithoutToken(t *testing.T) {
	yml := strings.Replace(base, `  token: "${PRISM_TOKEN}"`, "  insecure: true", 1)
	if _, err := parse("eu1.yaml", []byte(yml), env(nil)); err != nil {
		t.Fatalf("parse with insecure: true = %v, want nil", err)
	}
}

func TestAllErrorsCollected(t *testing.T) {
	yml := strings.NewReplacer("node: eu1", "node: EU1", `listen: "127.0.0.1:7201"`, `listen: "x"`).Replace(base) +
		"delivery: {retries: -2, ack_timeout: soon}\nlog: {level: loud}\n"
	_, err := parse("eu1.yaml", []byte(yml), testEnv)
	j, ok := err.(interface{ Unwrap() []error })
	if !ok {
		t.Fatalf("parse = %v, want joined errors", err)
	}
	if got := len(j.Unwrap()); got != 5 {
		t.Fatalf("parse reported %d errors, want 5:\n%v", got, err)
	}
}

func TestValidateBuiltInCode(t *testing.T) {
	c := &Config{}
	err := c.Validate()
	for _, want := range []string{"config: node: missing", "config: region: missing", "config: database: missing", "config: listen: missing",
		"config: auth.token: missing", "delivery.ack_timeout", `conflicts.default: ""`, `on_apply_error: ""`, `sync: ""`, `log.format: ""`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("(&Config{}).Validate() = %v, want it to contain %q", err, want)
		}
	}
}

func TestParseSize(t *testing.T) {
	tests := []struct {
		in      string
		want    Size
		wantErr bool
	}{
		{"1000", 1000, false},
		{"0", 0, false},
		{"512KiB", 512 << 10, false},
		{"64MiB", 64 << 20, false},
		{"10GiB", 10 << 30, false},
		{"1TiB", 1 << 40, false},
		{"2MB", 2000000, false},
		{"3KB", 3000, false},
		{"1GB", 1000000000, false},
		{"7B", 7, false},
		{"64 MiB", 64 << 20, false},
		{"", 0, true},
		{"MiB", 0, true},
		{"-1", 0, true},
		{"1.5GiB", 0, true},
		{"10gib", 0, true},
		{"10 parsecs", 0, true},
		{"99999999999999999999", 0, true},
		{"9000000TiB", 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseSize(tc.in)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Fatalf("ParseSize(%q) = %v, %v, want %v, error %t", tc.in, got, err, tc.want, tc.wantErr)
			}
		})
	}
}

func TestSizeString(t *testing.T) {
	tests := []struct {
		in   Size
		want string
	}{
		{0, "0"}, {1000, "1000"}, {64 * MiB, "64MiB"}, {10 * GiB, "10GiB"}, {1536 * KiB, "1536KiB"}, {2 * TiB, "2TiB"},
	}
	for _, tc := range tests {
		if got := tc.in.String(); got != tc.want {
			t.Errorf("Size(%d).String() = %q, want %q", int64(tc.in), got, tc.want)
		}
		if tc.in == 0 {
			continue
		}
		if back, err := ParseSize(tc.in.String()); err != nil || back != tc.in {
			t.Errorf("ParseSize(%q) = %v, %v, want %v", tc.in.String(), back, err, tc.in)
		}
	}
}

func TestParseSync(t *testing.T) {
	tests := []struct {
		in      string
		want    Sync
		wantErr bool
	}{
		{"", Sync{Mode: SyncOff}, false},
		{"off", Sync{Mode: SyncOff}, false},
		{"all", Sync{Mode: SyncAll}, false},
		{"quorum:1", Sync{Mode: SyncQuorum, Quorum: 1}, false},
		{"quorum:12", Sync{Mode: SyncQuorum, Quorum: 12}, false},
		{"quorum:0", Sync{}, true},
		{"quorum:-1", Sync{}, true},
		{"quorum:", Sync{}, true},
		{"quorum:x", Sync{}, true},
		{"quorum", Sync{}, true},
		{"on", Sync{}, true},
		{"ALL", Sync{}, true},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseSync(tc.in)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Fatalf("ParseSync(%q) = %v, %v, want %v, error %t", tc.in, got, err, tc.want, tc.wantErr)
			}
			if err == nil && tc.in != "" && got.String() != tc.in {
				t.Errorf("ParseSync(%q).String() = %q", tc.in, got.String())
			}
		})
	}
}

func TestRedactDSN(t *testing.T) {
	tests := []struct {
		in, want string
	}{
		{"host=a user=u password=secret dbname=d", "host=a user=u password=xxxxx dbname=d"},
		{"host=a password = 'se cret\\' x' dbname=d", "host=a password = xxxxx dbname=d"},
		{"password=secret", "password=xxxxx"},
		{"host=a sslpassword=secret", "host=a sslpassword=xxxxx"},
		{"host=a PASSWORD=secret", "host=a PASSWORD=xxxxx"},
		{"host=a password='unterminated secret", "host=a password=xxxxx"},
		{"host=a user=u", "host=a user=u"},
		{"postgres://u:secret@h:5432/d", "postgres://u:xxxxx@h:5432/d"},
		{"postgresql://u:secret@h/d?sslmode=disable", "postgresql://u:xxxxx@h/d?sslmode=disable"},
		{"postgres://u@h/d?password=secret", "postgres://u@h/d?password=xxxxx"},
		{"postgres://u@h/d?pass%77ord=secret&x=1", "postgres://u@h/d?pass%77ord=xxxxx&x=1"},
		{"postgres://u@h/d", "postgres://u@h/d"},
		{"postgres://u:secret@h1:5432,h2:5432/d", "postgres://u:xxxxx@h1:5432,h2:5432/d"},
		{"postgres://u@h1:5432,h2:5432/d?sslmode=require&password=secret", "postgres://u@h1:5432,h2:5432/d?sslmode=require&password=xxxxx"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got := RedactDSN(tc.in)
			if got != tc.want {
				t.Fatalf("RedactDSN(%q) = %q, want %q", tc.in, got, tc.want)
			}
			if strings.Contains(got, "secret") {
				t.Fatalf("RedactDSN(%q) = %q still holds the password", tc.in, got)
			}
		})
	}
}

// TestSecretsNeverShown checks that no error message and no redacted
// output holds the token or a DSN password.
func TestSecretsNeverShown(t *testing.T) {
	const (
		token = "TOKEN-s3cr3t-value"
		pw1   = "PW1-s3cr3t"
		pw2   = "PW2-s3cr3t"
		pw3   = "PW3-s3cr3t"
	)
	secrets := []string{token, pw1, pw2, pw3}
	vars := env(map[string]string{
		"PRISM_TOKEN": token,
		"EU_DSN":      "host=127.0.0.1 port=5433 user=postgres password=" + pw1 + " dbname=app",
		"NA_DSN":      "postgres://postgres:" + pw2 + "@127.0.0.1:5432/app",
		"AS_PW":       pw3,
	})
	good := `node: eu1
region: eu
database: "${EU_DSN}"
listen: "127.0.0.1:7201"
auth: {token: "${PRISM_TOKEN}"}
peers:
  - region: na
    nodes: [{name: na1, addr: "127.0.0.1:7101"}]
    database: "${NA_DSN}"
  - region: as
    nodes: [{name: as1, addr: "127.0.0.1:7301"}]
    database: "host=127.0.0.1 port=5434 password=${AS_PW}"
`
	c, err := parse("eu1.yaml", []byte(good), vars)
	if err != nil {
		t.Fatalf("parse(good) = %v", err)
	}
	var logged bytes.Buffer
	logger := zerolog.New(&logged)
	logger.Info().Object("config", c).Msg("loaded")
	outputs := map[string]string{
		"String":               c.String(),
		"Redacted":             c.Redacted().String(),
		"Redacted token":       c.Redacted().Auth.Token,
		"Redacted database":    c.Redacted().Database,
		"Redacted peer db":     c.Redacted().Peers[0].Database + c.Redacted().Peers[1].Database,
		"MarshalZerologObject": logged.String(),
		"Redacted %+v":         fmt.Sprintf("%+v", *c.Redacted()),
	}
	if c.Auth.Token != token || c.Peers[1].Database != "host=127.0.0.1 port=5434 password="+pw3 {
		t.Fatalf("Redacted modified the original config")
	}

	bad := []struct{ name, yml string }{
		{"secret in a bad value", good + "delivery: {retries: ${PRISM_TOKEN}}\n"},
		{"secret as a key", good + "${PRISM_TOKEN}: 1\n"},
		{"secret in a duration", good + "delivery: {ack_timeout: ${PRISM_TOKEN}}\n"},
		{"secret in a name", strings.Replace(good, "node: eu1", "node: ${PRISM_TOKEN}", 1)},
		{"secret in an address", strings.Replace(good, `listen: "127.0.0.1:7201"`, `listen: "${PRISM_TOKEN}"`, 1)},
		{"secret in a policy", good + "on_apply_error: ${AS_PW}\n"},
		{"broken kv dsn", strings.Replace(good, "port=5434 password=${AS_PW}", "port=x password=${AS_PW}", 1)},
		{"broken url dsn", strings.Replace(good, `"${NA_DSN}"`, `"postgres://postgres:${AS_PW}@127.0.0.1:xx/app"`, 1)},
		{"broken yaml", good + "x: [${PRISM_TOKEN}\n"},
		{"tls path", strings.Replace(good, "auth: {", "auth: {tls: {cert: /nonexistent/${AS_PW}, key: /k}, ", 1)},
	}
	for _, tc := range bad {
		_, err := parse("eu1.yaml", []byte(tc.yml), vars)
		if err == nil {
			t.Errorf("%s: parse = nil, want an error", tc.name)
			continue
		}
		outputs["error: "+tc.name] = err.Error()
	}
	for name, out := range outputs {
		for _, s := range secrets {
			if strings.Contains(out, s) {
				t.Errorf("%s shows secret %q:\n%s", name, s, out)
			}
		}
	}
}

func TestExampleConfigs(t *testing.T) {
	t.Setenv("PRISM_NA_DSN", "host=127.0.0.1 port=55001 user=postgres dbname=app")
	t.Setenv("PRISM_EU_DSN", "postgres://postgres:pw@127.0.0.1:55002/app")
	t.Setenv("PRISM_AS_DSN", "host=127.0.0.1 port=55003 user=postgres password=pw dbname=app")
	t.Setenv("PRISM_TOKEN", "demo-token-0123456789")
	files, err := filepath.Glob("../../configs/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 4 {
		t.Fatalf("found %d files in configs/, want at least 4", len(files))
	}
	nodes := map[string]string{}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			c, err := Load(f)
			if err != nil {
				t.Fatalf("Load(%s) = %v", f, err)
			}
			if want := strings.TrimSuffix(filepath.Base(f), ".yaml"); c.Node != want {
				t.Errorf("Load(%s).Node = %q, want %q (file named after its node)", f, c.Node, want)
			}
			nodes[c.Node] = c.Region
		})
	}
	// Every node must list every node of every other region.
	for _, f := range files {
		c, err := Load(f)
		if err != nil {
			continue
		}
		listed := map[string]bool{}
		for _, p := range c.Peers {
			for _, n := range p.Nodes {
				listed[n.Name] = true
			}
		}
		for node, region := range nodes {
			if region != c.Region && !listed[node] {
				t.Errorf("%s does not list node %s of region %s", f, node, region)
			}
		}
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"))
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "nope.yaml") {
		t.Fatalf("Load(missing) = %v, want an os.ErrNotExist naming the file", err)
	}
}
