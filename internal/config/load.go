package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Load reads the node configuration at path, expands ${VAR} references from
// the environment ($$ is a literal $), decodes it strictly, fills in defaults
// and validates it. On failure the error joins one *Error per problem found.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	return parse(path, data, os.LookupEnv)
}

// parse is Load on data already read, with lookup for the environment.
func parse(file string, data []byte, lookup func(string) (string, bool)) (*Config, error) {
	expanded, secrets, errs := expand(file, data, lookup)
	if len(errs) > 0 {
		return nil, maskAll(errs, secrets)
	}

	var doc yaml.Node
	if err := yaml.Unmarshal(expanded, &doc); err != nil {
		return nil, maskAll(fromYAML(file, err), secrets)
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) == 0 {
		return nil, maskAll([]error{&Error{File: file,
			Msg: "the file is empty; write node, region, database, listen, auth and peers (see configs/ for examples)"}}, secrets)
	}
	lines := map[string]int{}
	if errs := walk(file, doc.Content[0], reflect.TypeFor[rawConfig](), "", lines); len(errs) > 0 {
		return nil, maskAll(errs, secrets)
	}

	var raw rawConfig
	dec := yaml.NewDecoder(bytes.NewReader(expanded))
	dec.KnownFields(true)
	if err := dec.Decode(&raw); err != nil {
		return nil, maskAll(fromYAML(file, err), secrets)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, maskAll([]error{&Error{File: file, Line: extra.Line,
			Msg: "more than one YAML document; write one node's configuration per file, without ---"}}, secrets)
	}

	cfg, errs := raw.config(file, lines)
	if err := cfg.Validate(); err != nil {
		errs = append(errs, unjoin(err)...)
	}
	if len(errs) > 0 {
		return nil, maskAll(errs, secrets)
	}
	return cfg, nil
}

// unjoin returns the errors joined in err.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// rawConfig mirrors the YAML schema with plain types, so that typed values
// are parsed with errors that name their key and defaults can tell an
// absent key from a zero value.
type rawConfig struct {
	Node         string       `yaml:"node"`
	Region       string       `yaml:"region"`
	Database     string       `yaml:"database"`
	Publication  string       `yaml:"publication"`
	Slot         string       `yaml:"slot"`
	OutputPlugin string       `yaml:"output_plugin"`
	Listen       string       `yaml:"listen"`
	Auth         rawAuth      `yaml:"auth"`
	Peers        []rawPeer    `yaml:"peers"`
	Scope        rawScope     `yaml:"scope"`
	Delivery     rawDelivery  `yaml:"delivery"`
	Conflicts    rawConflicts `yaml:"conflicts"`
	OnApplyError string       `yaml:"on_apply_error"`
	// OnApplyErrorTables overrides on_apply_error per table.
	OnApplyErrorTables map[string]string `yaml:"on_apply_error_tables"`
	Sync               string            `yaml:"sync"`
	Spool              rawSpool          `yaml:"spool"`
	DDL                string            `yaml:"ddl"`
	Spill              rawSpill          `yaml:"spill"`
	HTTP               string            `yaml:"http"`
	Log                rawLog            `yaml:"log"`
	Procs              int               `yaml:"procs"`
}

type rawAuth struct {
	Token    string `yaml:"token"`
	TLS      rawTLS `yaml:"tls"`
	Insecure bool   `yaml:"insecure"`
}

type rawTLS struct {
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
	CA   string `yaml:"ca"`
}

type rawPeer struct {
	Region   string    `yaml:"region"`
	Nodes    []rawNode `yaml:"nodes"`
	Database string    `yaml:"database"`
	Scope    rawScope  `yaml:"scope"`
}

type rawScope struct {
	ExcludeTables  []string            `yaml:"exclude_tables"`
	Rows           map[string]string   `yaml:"rows"`
	ExcludeColumns map[string][]string `yaml:"exclude_columns"`
}

type rawNode struct {
	Name string `yaml:"name"`
	Addr string `yaml:"addr"`
}

type rawDelivery struct {
	AckTimeout  string `yaml:"ack_timeout"`
	Retries     *int   `yaml:"retries"`
	Backoff     string `yaml:"backoff"`
	MaxBackoff  string `yaml:"max_backoff"`
	MaxInFlight string `yaml:"max_in_flight"`
}

type rawConflicts struct {
	Default string            `yaml:"default"`
	Tables  map[string]string `yaml:"tables"`
	Keep    string            `yaml:"keep"`
}

type rawSpool struct {
	Dir      string `yaml:"dir"`
	MaxBytes string `yaml:"max_bytes"`
}

type rawSpill struct {
	Dir   string `yaml:"dir"`
	Above string `yaml:"above"`
}

type rawLog struct {
	Level  string `yaml:"level"`
	Format string `yaml:"format"`
}

// config converts r into a Config with defaults filled in. A value that does
// not parse is reported and replaced by its default, so that Validate does
// not report it a second time.
func (r *rawConfig) config(file string, lines map[string]int) (*Config, []error) {
	c := &Config{
		Path:         file,
		Node:         r.Node,
		Region:       r.Region,
		Database:     r.Database,
		Publication:  orDefault(r.Publication, DefaultPublication),
		Slot:         r.Slot,
		OutputPlugin: orDefault(r.OutputPlugin, DefaultOutputPlugin),
		Listen:       r.Listen,
		Auth:         Auth{Token: r.Auth.Token, TLS: TLS(r.Auth.TLS), Insecure: r.Auth.Insecure},
		OnApplyError: ApplyErrorPolicy(orDefault(r.OnApplyError, string(DefaultOnApplyError))),
		DDL:          DDLMode(orDefault(r.DDL, string(DefaultDDL))),
		HTTP:         r.HTTP,
		Procs:        r.Procs,
		Scope:        Scope(r.Scope),
		Log: Log{
			Level:  orDefault(r.Log.Level, DefaultLogLevel),
			Format: LogFormat(orDefault(r.Log.Format, string(DefaultLogFormat))),
		},
		lines: lines,
	}
	if c.Slot == "" && validName(c.Region) && len(c.Region) <= maxRegionLen {
		c.Slot = decode.SlotName(c.Region)
	}
	for _, p := range r.Peers {
		peer := Peer{Region: p.Region, Database: p.Database, Scope: Scope(p.Scope)}
		for _, n := range p.Nodes {
			peer.Nodes = append(peer.Nodes, PeerNode(n))
		}
		c.Peers = append(c.Peers, peer)
	}
	c.Conflicts.Default = ConflictPolicy(orDefault(r.Conflicts.Default, string(DefaultConflict)))
	if len(r.Conflicts.Tables) > 0 {
		c.Conflicts.Tables = make(map[string]ConflictPolicy, len(r.Conflicts.Tables))
		for k, v := range r.Conflicts.Tables {
			c.Conflicts.Tables[k] = ConflictPolicy(v)
		}
	}

	if len(r.OnApplyErrorTables) > 0 {
		c.OnApplyErrorTables = make(map[string]ApplyErrorPolicy, len(r.OnApplyErrorTables))
		for k, v := range r.OnApplyErrorTables {
			c.OnApplyErrorTables[k] = ApplyErrorPolicy(v)
		}
	}

	v := &validator{file: file, lines: lines}
	c.Conflicts.Keep = v.duration("conflicts.keep", r.Conflicts.Keep, DefaultConflictKeep)
	c.Delivery = r.Delivery.resolve(v)
	c.Spool = Spool{Dir: r.Spool.Dir, MaxBytes: v.size("spool.max_bytes", r.Spool.MaxBytes, DefaultSpoolMax)}
	c.Spill = Spill{Dir: r.Spill.Dir, Above: v.size("spill.above", r.Spill.Above, DefaultSpillAbove)}
	sync, err := ParseSync(r.Sync)
	if err != nil {
		v.add("sync", "%q is not a sync mode; write off, all or quorum:N with N between 1 and the number of peer regions", r.Sync)
		sync = Sync{Mode: SyncOff}
	}
	c.Sync = sync
	return c, v.errs
}

// resolve returns the delivery settings with DefaultDelivery filled in for
// every key the file leaves out. A key written explicitly keeps its value,
// zero included (retries: 0 means no retry); Validate judges it.
func (r rawDelivery) resolve(v *validator) Delivery {
	d := DefaultDelivery()
	d.AckTimeout = v.duration("delivery.ack_timeout", r.AckTimeout, d.AckTimeout)
	if r.Retries != nil {
		d.Retries = *r.Retries
	}
	d.Backoff = v.duration("delivery.backoff", r.Backoff, d.Backoff)
	d.MaxBackoff = v.duration("delivery.max_backoff", r.MaxBackoff, d.MaxBackoff)
	d.MaxInFlight = v.size("delivery.max_in_flight", r.MaxInFlight, d.MaxInFlight)
	return d
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func (v *validator) duration(key, s string, def time.Duration) time.Duration {
	if s == "" {
		return def
	}
	d, err := ParseDuration(s)
	if err != nil {
		v.add(key, "%q is not a duration; write a number with a unit, e.g. %s", s, FormatDuration(def))
		return def
	}
	return d
}

// ParseDuration reads a duration as Go writes it (200ms, 1m30s, 720h) or
// a whole number of days (30d).
func ParseDuration(s string) (time.Duration, error) {
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.ParseUint(days, 10, 16)
		if err != nil {
			return 0, fmt.Errorf("invalid duration %q", s)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	return time.ParseDuration(s)
}

// FormatDuration writes d in days when it is a whole number of them.
func FormatDuration(d time.Duration) string {
	if d > 0 && d%(24*time.Hour) == 0 {
		return strconv.FormatInt(int64(d/(24*time.Hour)), 10) + "d"
	}
	return d.String()
}

func (v *validator) size(key, s string, def Size) Size {
	if s == "" {
		return def
	}
	n, err := ParseSize(s)
	if err != nil {
		v.add(key, "%q is not a size; write a whole number of bytes with an optional unit, e.g. %s, 512KiB or 1000", s, def)
		return def
	}
	return n
}

// walk checks node n against the Go type t it will be decoded into: every
// mapping key must be a known field, and every value must have the right
// shape. It records the line of every key path it visits in lines.
func walk(file string, n *yaml.Node, t reflect.Type, path string, lines map[string]int) []error {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
		return nil
	}
	bad := func(want string) []error {
		return []error{&Error{File: file, Line: n.Line, Key: path,
			Msg: fmt.Sprintf("expected %s, found %s", want, describe(n))}}
	}
	switch t.Kind() {
	case reflect.Pointer:
		return walk(file, n, t.Elem(), path, lines)
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			return bad("a mapping of keys (" + strings.Join(fieldNames(t), ", ") + ")")
		}
		var errs []error
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, val := n.Content[i], n.Content[i+1]
			if k.Value == "<<" {
				errs = append(errs, walkMerge(file, val, t, path, lines)...)
				continue
			}
			kp := join(path, k.Value)
			f, ok := fieldByTag(t, k.Value)
			if !ok {
				errs = append(errs, unknownKey(file, k, kp, path, t))
				continue
			}
			lines[kp] = k.Line
			errs = append(errs, walk(file, val, f.Type, kp, lines)...)
		}
		return errs
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			return bad(`a mapping such as {"public.accounts": source_wins}`)
		}
		var errs []error
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, val := n.Content[i], n.Content[i+1]
			kp := path + "[" + strconv.Quote(k.Value) + "]"
			lines[kp] = k.Line
			errs = append(errs, walk(file, val, t.Elem(), kp, lines)...)
		}
		return errs
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			return bad("a list (lines starting with -)")
		}
		var errs []error
		for i, item := range n.Content {
			ip := path + "[" + strconv.Itoa(i) + "]"
			lines[ip] = item.Line
			errs = append(errs, walk(file, item, t.Elem(), ip, lines)...)
		}
		return errs
	case reflect.String:
		if n.Kind != yaml.ScalarNode {
			return bad("a single value")
		}
	case reflect.Int:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" {
			return bad("a whole number")
		}
	case reflect.Bool:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!bool" {
			return bad("true or false")
		}
	}
	return nil
}

// walkMerge walks the value of a YAML merge key (<<).
func walkMerge(file string, n *yaml.Node, t reflect.Type, path string, lines map[string]int) []error {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if n.Kind == yaml.SequenceNode {
		var errs []error
		for _, item := range n.Content {
			errs = append(errs, walk(file, item, t, path, lines)...)
		}
		return errs
	}
	return walk(file, n, t, path, lines)
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	}
	return strconv.Quote(n.Value)
}

func fieldByTag(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		f := t.Field(i)
		if tagName(f) == name {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

func tagName(f reflect.StructField) string {
	name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	return name
}

func fieldNames(t reflect.Type) []string {
	names := make([]string, 0, t.NumField())
	for i := range t.NumField() {
		names = append(names, tagName(t.Field(i)))
	}
	return names
}

// unknownKey reports key k, which type t does not have, with the closest
// valid key and the full list of valid keys.
func unknownKey(file string, k *yaml.Node, keyPath, parent string, t reflect.Type) error {
	names := fieldNames(t)
	where := "at the top level"
	if parent != "" {
		where = "under " + parent
	}
	msg := "unknown key " + strconv.Quote(k.Value)
	best, bestDist := "", 3
	for _, n := range names {
		if d := editDistance(strings.ToLower(k.Value), n); d < bestDist {
			best, bestDist = n, d
		}
	}
	if best != "" {
		msg += fmt.Sprintf("; did you mean %q?", best)
	}
	sorted := slices.Clone(names)
	slices.Sort(sorted)
	msg += fmt.Sprintf(" Valid keys %s: %s", where, strings.Join(sorted, ", "))
	return &Error{File: file, Line: k.Line, Key: keyPath, Msg: msg}
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
