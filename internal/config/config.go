package config

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Defaults filled in by Load for keys the file leaves out.
const (
	DefaultPublication  = "prism"
	DefaultOutputPlugin = "auto"
	DefaultAckTimeout   = 2 * time.Second
	MinAckTimeout       = 100 * time.Millisecond
	DefaultRetries      = 5
	DefaultBackoff      = 200 * time.Millisecond
	DefaultMaxBackoff   = 5 * time.Second
	DefaultMaxInFlight  = 64 * MiB
	DefaultSpoolMax     = 10 * GiB
	DefaultSpillAbove   = 32 * MiB
	DefaultConflict     = LastWriteWins
	DefaultConflictKeep = 30 * 24 * time.Hour
	DefaultOnApplyError = Halt
	DefaultDDL          = DDLOff
	DefaultLogLevel     = "info"
	DefaultLogFormat    = LogJSON
)

// Config is one node's configuration, as described in DESIGN.md.
type Config struct {
	// Path is the file the configuration was loaded from. It names the file
	// in every validation error; it is not read from the YAML.
	Path string

	Node        string // unique node name
	Region      string // the region this node serves
	Database    string // this region's Postgres (DSN, may hold a password)
	Publication string // default "prism"
	Slot        string // default "prism_<region>"
	// OutputPlugin is what the node creates its slot with: auto (the
	// default), pgoutput or prism_pgoutput (decode.ReaderConfig.Plugin).
	OutputPlugin string
	Listen       string // host:port where other regions ship to
	Auth         Auth
	Peers        []Peer // every other region
	Delivery     Delivery
	Conflicts    Conflicts
	// OnApplyError is what a node does with a transaction it cannot apply.
	OnApplyError ApplyErrorPolicy
	// OnApplyErrorTables overrides OnApplyError per table; keys are
	// "schema.table" and name the table of the failing change.
	OnApplyErrorTables map[string]ApplyErrorPolicy
	Sync               Sync
	Spool              Spool
	Spill              Spill
	DDL                DDLMode // whether schema changes travel with the data
	HTTP               string  // host:port for /metrics, /healthz, /readyz, /status, /history and the page; empty disables it
	Log                Log
	// Procs is how many CPUs the node's Go runtime runs goroutines on at
	// once (GOMAXPROCS); 0 chooses (see cmd/prism-cdc runAction).
	Procs int

	// Scope is what this node's own region may hold, as the other regions'
	// configurations give it (their peers[].scope): verify, bootstrap and
	// doctor use it. Shipping never does: what leaves this region is
	// decided by peers[].scope.
	Scope Scope

	// lines maps key paths to the line they were written on, for errors.
	lines map[string]int
}

// Auth holds how nodes authenticate each other.
type Auth struct {
	Token    string // shared secret; required unless Insecure
	TLS      TLS
	Insecure bool // allow peer traffic without a token
}

// TLS names the files for optional mutual TLS between nodes. Either all are
// empty or Cert and Key are set; CA is optional.
type TLS struct {
	Cert string
	Key  string
	CA   string
}

// Enabled reports whether TLS is configured.
func (t TLS) Enabled() bool { return t.Cert != "" || t.Key != "" || t.CA != "" }

// Peer is another region: its nodes in failover order and its database for
// the direct-SQL fallback.
type Peer struct {
	Region   string
	Nodes    []PeerNode
	Database string // DSN, may hold a password
	// Scope is what the region may receive (data residency); the zero
	// Scope lets everything through.
	Scope Scope
}

// PeerNode is one node of a peer region.
type PeerNode struct {
	Name string
	Addr string // host:port
}

// Delivery tunes shipping to peer regions. Load resolves every field once:
// a key the file leaves out gets its default (DefaultDelivery), a key
// written explicitly keeps its value, zero included, and is validated.
// Whoever uses a Delivery takes its values as they are.
type Delivery struct {
	AckTimeout  time.Duration // how long to wait for one ACK
	Retries     int           // retries of the same node before failing over; 0 fails over after the first failed attempt
	Backoff     time.Duration // first retry delay
	MaxBackoff  time.Duration // cap on the retry delay
	MaxInFlight Size          // bytes sent but not yet ACKed, per region
}

// DefaultDelivery returns the delivery settings of a file that has no
// delivery section.
func DefaultDelivery() Delivery {
	return Delivery{
		AckTimeout:  DefaultAckTimeout,
		Retries:     DefaultRetries,
		Backoff:     DefaultBackoff,
		MaxBackoff:  DefaultMaxBackoff,
		MaxInFlight: DefaultMaxInFlight,
	}
}

// Conflicts chooses how conflicting row changes are resolved.
type Conflicts struct {
	Default ConflictPolicy
	// Tables overrides Default per table; keys are "schema.table".
	Tables map[string]ConflictPolicy
	// Keep is how long the records of resolved conflicts stay in
	// prism.conflicts; 0 keeps them for good.
	Keep time.Duration
}

// For returns the policy for the table "schema.table".
func (c Conflicts) For(table string) ConflictPolicy {
	if p, ok := c.Tables[table]; ok {
		return p
	}
	return c.Default
}

// Spool configures the optional on-disk log of decoded transactions.
type Spool struct {
	Dir      string // empty disables the spool
	MaxBytes Size
}

// Spill configures where the reader writes transactions too large to
// hold in memory while they are shipped.
type Spill struct {
	Dir   string // empty: the system's temporary directory
	Above Size   // a transaction whose changes exceed this spills
}

// Log configures the root logger.
type Log struct {
	Level  string // trace, debug, info, warn or error
	Format LogFormat
}

// ConflictPolicy says which version of a row wins when two regions changed it.
type ConflictPolicy string

// The conflict policies.
const (
	LastWriteWins ConflictPolicy = "last_write_wins" // later source commit timestamp wins, ties by region name
	SourceWins    ConflictPolicy = "source_wins"     // the incoming change always wins
	KeepLocal     ConflictPolicy = "keep_local"      // the local row is kept
	ConflictError ConflictPolicy = "error"           // the conflict is an apply error
)

// Valid reports whether p is one of the conflict policies.
func (p ConflictPolicy) Valid() bool {
	switch p {
	case LastWriteWins, SourceWins, KeepLocal, ConflictError:
		return true
	}
	return false
}

// ApplyErrorPolicy says what happens to a transaction that cannot be applied.
type ApplyErrorPolicy string

// The apply error policies.
const (
	Halt       ApplyErrorPolicy = "halt"        // stop replication from that source
	DeadLetter ApplyErrorPolicy = "dead_letter" // park it in prism.dead_letters and continue
	Undo       ApplyErrorPolicy = "undo"        // revert it at the source
)

// DDLMode says whether schema changes committed in this region are
// replicated to the others.
type DDLMode string

// The DDL modes.
const (
	DDLOff       DDLMode = "off"       // schema changes are run by hand in every region
	DDLReplicate DDLMode = "replicate" // schema changes travel with the data
)

// Valid reports whether m is one of the DDL modes.
func (m DDLMode) Valid() bool { return m == DDLOff || m == DDLReplicate }

// Valid reports whether p is one of the apply error policies.
func (p ApplyErrorPolicy) Valid() bool {
	switch p {
	case Halt, DeadLetter, Undo:
		return true
	}
	return false
}

// ApplyErrorFor returns the apply error policy for the table "schema.table"
// (empty when the failure is not about one table).
func (c *Config) ApplyErrorFor(table string) ApplyErrorPolicy {
	if p, ok := c.OnApplyErrorTables[table]; ok && table != "" {
		return p
	}
	return c.OnApplyError
}

// Strings returns a policy map (on_apply_error_tables, conflicts.tables)
// with its values as plain strings, never nil.
func Strings[V ~string](m map[string]V) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = string(v)
	}
	return out
}

// LogFormat is the encoding of log lines.
type LogFormat string

// The log formats.
const (
	LogJSON    LogFormat = "json"
	LogConsole LogFormat = "console"
)

// Valid reports whether f is one of the log formats.
func (f LogFormat) Valid() bool { return f == LogJSON || f == LogConsole }

// validLogLevel reports whether s is an accepted log.level value.
func validLogLevel(s string) bool {
	switch s {
	case "trace", "debug", "info", "warn", "error":
		return true
	}
	return false
}

// SyncMode says whether source commits wait for other regions.
type SyncMode string

// The sync modes.
const (
	SyncOff    SyncMode = "off"    // asynchronous replication
	SyncAll    SyncMode = "all"    // commits wait for every peer region
	SyncQuorum SyncMode = "quorum" // commits wait for Sync.Quorum peer regions
)

// Sync is the parsed sync setting: off, all or quorum:N.
type Sync struct {
	Mode   SyncMode
	Quorum int // number of peer regions to wait for; set only for SyncQuorum
}

// String returns the setting as written in YAML.
func (s Sync) String() string {
	if s.Mode == SyncQuorum {
		return "quorum:" + strconv.Itoa(s.Quorum)
	}
	return string(s.Mode)
}

// ParseSync parses "off", "all" or "quorum:N". An empty string is off. The
// upper bound of N depends on the peers and is checked by Validate.
func ParseSync(s string) (Sync, error) {
	switch s {
	case "", "off":
		return Sync{Mode: SyncOff}, nil
	case "all":
		return Sync{Mode: SyncAll}, nil
	}
	if n, ok := strings.CutPrefix(s, "quorum:"); ok {
		q, err := strconv.Atoi(n)
		if err != nil || q < 1 {
			return Sync{}, fmt.Errorf("sync %q: quorum needs a whole number of regions of at least 1, e.g. quorum:1", s)
		}
		return Sync{Mode: SyncQuorum, Quorum: q}, nil
	}
	return Sync{}, fmt.Errorf("sync %q: write off, all or quorum:N", s)
}
