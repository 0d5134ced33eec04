package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// Limits on names: a slot or origin name is at most 63 bytes, and a region
// name becomes one after the "prism_" prefix.
const (
	maxNameLen   = 63
	maxRegionLen = maxNameLen - len(decode.NamePrefix)
)

// validator collects problems for one file.
type validator struct {
	file  string
	lines map[string]int
	errs  []error
}

// add records a problem at key; the line is the key's own line, or the
// closest enclosing key's when the key itself is absent.
func (v *validator) add(key, format string, args ...any) {
	v.errs = append(v.errs, &Error{File: v.file, Line: v.line(key), Key: key, Msg: clip(fmt.Sprintf(format, args...))})
}

// maxMsg bounds one problem's message: a value of megabytes quoted back
// would bury the problem.
const maxMsg = 1024

// clip shortens a message longer than maxMsg in its middle.
func clip(s string) string {
	if len(s) <= maxMsg {
		return s
	}
	return fmt.Sprintf("%s ...(%d bytes left out)... %s", strings.ToValidUTF8(s[:maxMsg/2], ""), len(s)-maxMsg*3/4, strings.ToValidUTF8(s[len(s)-maxMsg/4:], ""))
}

func (v *validator) line(key string) int {
	for key != "" {
		if l, ok := v.lines[key]; ok {
			return l
		}
		i := strings.LastIndexAny(key, ".[")
		if i < 0 {
			return 0
		}
		key = key[:i]
	}
	return 0
}

// Validate reports every impossible setting in c, joined with errors.Join.
// Each problem is an *Error naming the file, the key path and what to write
// instead. It never includes the auth token or a DSN password.
func (c *Config) Validate() error {
	v := &validator{file: c.Path, lines: c.lines}
	nodes := map[string]string{} // node name -> key path of its first use
	addrs := map[string]string{} // address -> key path of its first use
	v.node(c, nodes, addrs)
	v.auth(c.Auth)

	regions := map[string]string{}
	var scoped []string // key paths of the peers with a scope
	for i, p := range c.Peers {
		key := fmt.Sprintf("peers[%d]", i)
		switch {
		case p.Region == "":
			v.add(key+".region", "missing; write the name of the peer region, e.g. na")
		case p.Region == c.Region:
			v.add(key+".region", "%q is this node's own region; list only other regions under peers (nodes of the same region share the slot and need no peering)", p.Region)
		default:
			if v.name(key+".region", p.Region, "region name", "na", maxRegionLen, true) {
				v.unique(regions, key+".region", p.Region, "region", "list each peer region once, with all its nodes")
			}
		}
		if len(p.Nodes) == 0 {
			v.add(key+".nodes", `missing; list the region's nodes in failover order, e.g. nodes: [{name: na1, addr: "127.0.0.1:7101"}]`)
		}
		for j, n := range p.Nodes {
			nk := fmt.Sprintf("%s.nodes[%d]", key, j)
			if v.name(nk+".name", n.Name, "node name", "na1", maxNameLen, true) {
				v.unique(nodes, nk+".name", n.Name, "node name", "give every node a unique name")
			}
			if n.Addr == "" {
				v.add(nk+".addr", `missing; write the node's listen address as host:port, e.g. "127.0.0.1:7101"`)
			} else if v.addr(nk+".addr", n.Addr, false) {
				v.unique(addrs, nk+".addr", n.Addr, "address", "give every node its own listen address")
			}
		}
		if p.Database == "" {
			v.add(key+".database", "missing; write the DSN of the region's database, used for the direct-SQL fallback when none of its nodes answers")
		} else {
			v.dsn(key+".database", p.Database)
		}
		v.scope(key+".scope", p.Scope)
		if !p.Scope.IsZero() {
			scoped = append(scoped, key+".scope")
		}
	}
	v.scopeUndo(c, scoped)
	v.scope("scope", c.Scope)

	v.delivery(c.Delivery)
	v.policies(c)
	v.sync(c)
	v.storage(c)
	v.log(c.Log)
	if c.Procs < 0 || c.Procs > maxProcs {
		v.add("procs", "%d is not a number of CPUs; write a number from 1 to %d, or 0 (the default) to let the node choose", c.Procs, maxProcs)
	}
	return errors.Join(v.errs...)
}

// node checks this node's own keys: names, database and addresses. It
// records the node's name in nodes and its addresses in addrs.
func (v *validator) node(c *Config, nodes, addrs map[string]string) {
	v.name("node", c.Node, "node name", "eu1", maxNameLen, true)
	if c.Node != "" {
		nodes[c.Node] = "node"
	}
	v.name("region", c.Region, "region name", "eu", maxRegionLen, true)
	v.dsn("database", c.Database)
	v.name("publication", c.Publication, "publication name", DefaultPublication, maxNameLen, false)
	// The slot defaults to prism_<region>; a missing region is reported once.
	v.name("slot", c.Slot, "slot name", decode.SlotName("eu"), maxNameLen, validName(c.Region))
	if !decode.ValidPlugin(c.OutputPlugin) {
		v.add("output_plugin", "%q is not an output plugin prism-cdc reads; write auto (the default: prism_pgoutput where it is installed and the server is older than PostgreSQL 16, else pgoutput), pgoutput or prism_pgoutput", c.OutputPlugin)
	}
	if c.Listen == "" {
		v.add("listen", `missing; write the host:port where other regions reach this node, e.g. "127.0.0.1:7201"`)
	} else if v.addr("listen", c.Listen, true) {
		addrs[c.Listen] = "listen"
	}
	if c.HTTP != "" && v.addr("http", c.HTTP, true) {
		v.unique(addrs, "http", c.HTTP, "address", "use another port")
	}
}

// delivery checks the delivery settings.
func (v *validator) delivery(d Delivery) {
	v.positive("delivery.ack_timeout", d.AckTimeout.String(), d.AckTimeout > 0, DefaultAckTimeout.String())
	if d.AckTimeout > 0 && d.AckTimeout < MinAckTimeout {
		v.add("delivery.ack_timeout", "%s is too short: a round trip between regions plus one commit on the target must fit in it, "+
			"or every transaction is retried; write at least %s (default %s)", d.AckTimeout, MinAckTimeout, DefaultAckTimeout)
	}
	v.positive("delivery.backoff", d.Backoff.String(), d.Backoff > 0, DefaultBackoff.String())
	v.positive("delivery.max_backoff", d.MaxBackoff.String(), d.MaxBackoff > 0, DefaultMaxBackoff.String())
	if d.Backoff > 0 && d.MaxBackoff > 0 && d.Backoff > d.MaxBackoff {
		v.add("delivery.backoff", "%s is larger than delivery.max_backoff (%s); make backoff at most max_backoff", d.Backoff, d.MaxBackoff)
	}
	if d.Retries < 0 {
		v.add("delivery.retries", "%d is negative; write 0 or more: how often a node that failed is tried again before failing over to the region's next node (0 fails over at once; default %d)", d.Retries, DefaultRetries)
	}
	v.positive("delivery.max_in_flight", d.MaxInFlight.String(), d.MaxInFlight > 0, DefaultMaxInFlight.String())
}

// policies checks the conflict and apply error policies.
func (v *validator) policies(c *Config) {
	if !c.Conflicts.Default.Valid() {
		v.add("conflicts.default", "%q is not a conflict policy; write %s", c.Conflicts.Default, conflictPolicies)
	}
	if c.Conflicts.Keep < 0 {
		v.add("conflicts.keep", "%s is negative; write how long resolved conflicts stay in prism.conflicts (e.g. 30d), or 0 to keep them for good", c.Conflicts.Keep)
	}
	for table, p := range c.Conflicts.Tables {
		key := "conflicts.tables[" + strconv.Quote(table) + "]"
		if !validTable(table) {
			v.add(key, `%q is not a table name; write it as schema.table, e.g. "public.accounts"`, table)
		}
		if !p.Valid() {
			v.add(key, "%q is not a conflict policy; write %s", p, conflictPolicies)
		}
	}
	if !c.DDL.Valid() {
		v.add("ddl", "%q is not a DDL mode; write off or replicate", c.DDL)
	}
	if !c.OnApplyError.Valid() {
		v.add("on_apply_error", "%q is not an apply error policy; write halt, dead_letter or undo", c.OnApplyError)
	}
	for table, p := range c.OnApplyErrorTables {
		key := "on_apply_error_tables[" + strconv.Quote(table) + "]"
		if !validTable(table) {
			v.add(key, `%q is not a table name; write it as schema.table, e.g. "public.accounts"`, table)
		}
		if !p.Valid() {
			v.add(key, "%q is not an apply error policy; write halt, dead_letter or undo", p)
		}
	}
}

// sync checks the sync mode against the peers and the spool.
func (v *validator) sync(c *Config) {
	switch c.Sync.Mode {
	case SyncOff, SyncAll:
	case SyncQuorum:
		if c.Sync.Quorum < 1 || c.Sync.Quorum > len(c.Peers) {
			v.add("sync", "%s waits for %d regions but there are %d peer regions; write quorum:N with N from 1 to %d, or all",
				c.Sync, c.Sync.Quorum, len(c.Peers), len(c.Peers))
		}
		if c.Spool.Dir == "" {
			v.add("sync", "%s lets the slot pass regions that have not applied a transaction yet, so they must be read from a spool; set spool.dir (e.g. /var/lib/prism-cdc/spool) or use sync: all", c.Sync)
		}
	default:
		v.add("sync", "%q is not a sync mode; write off, all or quorum:N", c.Sync.Mode)
	}
}

// storage checks the spool's and the spill files' settings.
func (v *validator) storage(c *Config) {
	v.positive("spool.max_bytes", c.Spool.MaxBytes.String(), c.Spool.MaxBytes > 0, DefaultSpoolMax.String())
	v.positive("spill.above", c.Spill.Above.String(), c.Spill.Above > 0, DefaultSpillAbove.String())
	if c.Spill.Dir != "" {
		if fi, err := os.Stat(c.Spill.Dir); err != nil || !fi.IsDir() {
			v.add("spill.dir", "%q is not a directory; create it (large transactions are written there while they ship) or leave spill.dir empty for the system's temporary directory", c.Spill.Dir)
		}
	}
}

// log checks the log settings.
func (v *validator) log(l Log) {
	if !validLogLevel(l.Level) {
		v.add("log.level", "%q is not a log level; write trace, debug, info, warn or error", l.Level)
	}
	if !l.Format.Valid() {
		v.add("log.format", "%q is not a log format; write json or console", l.Format)
	}
}

// maxProcs bounds procs: more CPUs than any machine a node runs on is a
// typo.
const maxProcs = 1024

const conflictPolicies = "last_write_wins, source_wins, keep_local or error"

// name checks an identifier: lowercase letters, digits and underscores, at
// most max bytes. It reports whether the name is valid.
func (v *validator) name(key, s, what, example string, max int, required bool) bool {
	if s == "" {
		if required {
			v.add(key, "missing; write the %s, e.g. %s", what, example)
		}
		return false
	}
	if !validName(s) || len(s) > max {
		v.add(key, "%q is not a valid %s; use at most %d lowercase letters, digits and underscores, e.g. %s", s, what, max, example)
		return false
	}
	return true
}

func validName(s string) bool {
	for _, r := range s {
		if (r < 'a' || r > 'z') && (r < '0' || r > '9') && r != '_' {
			return false
		}
	}
	return s != ""
}

func validTable(s string) bool {
	schema, table, ok := strings.Cut(s, ".")
	return ok && schema != "" && table != "" && !strings.ContainsAny(s, " \t\n") && !strings.Contains(table, ".")
}

// unique records value under key in seen and reports a second use.
func (v *validator) unique(seen map[string]string, key, value, what, fix string) {
	if first, ok := seen[value]; ok {
		v.add(key, "%s %q is already used at %s; %s", what, value, first, fix)
		return
	}
	seen[value] = key
}

// addr checks host:port. The host may be empty (all interfaces) only where
// emptyHost is true. It reports whether the address is valid.
func (v *validator) addr(key, s string, emptyHost bool) bool {
	host, port, err := net.SplitHostPort(s)
	example := `"127.0.0.1:7101"`
	if err != nil {
		v.add(key, "%q is not host:port; write e.g. %s", s, example)
		return false
	}
	if host == "" && !emptyHost {
		v.add(key, "%q has no host; write the address other nodes dial, e.g. %s", s, example)
		return false
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		v.add(key, "%q has no valid port; write a port from 1 to 65535, e.g. %s", s, example)
		return false
	}
	return true
}

// dsn checks that s is a connection string pgx can parse. The DSN itself is
// never repeated: it may hold a password.
func (v *validator) dsn(key, s string) {
	if s == "" {
		v.add(key, `missing; write the region's database as key=value pairs, e.g. "host=127.0.0.1 port=5432 user=postgres dbname=app", or as a postgres:// URL`)
		return
	}
	_, err := pgconn.ParseConfig(s)
	if err == nil {
		return
	}
	// pgconn's message quotes the whole DSN before the reason; keep only
	// the reason, and mask anything in it that looks like a password.
	msg := err.Error()
	var pce *pgconn.ParseConfigError
	if errors.As(err, &pce) {
		if i := strings.LastIndex(msg, "`: "); i >= 0 {
			msg = msg[i+len("`: "):]
		} else {
			msg = ""
		}
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		msg = ue.Err.Error()
	}
	detail := ""
	if msg != "" {
		detail = " (" + RedactDSN(msg) + ")"
	}
	v.add(key, `not a valid PostgreSQL connection string%s; write key=value pairs, e.g. "host=127.0.0.1 port=5432 user=postgres dbname=app", or a postgres:// URL`, detail)
}

func (v *validator) positive(key, value string, ok bool, def string) {
	if !ok {
		v.add(key, "%s must be greater than zero; write e.g. %s (the default)", value, def)
	}
}

func (v *validator) auth(a Auth) {
	if a.Token == "" && !a.Insecure {
		v.add("auth.token", `missing; set a shared secret, e.g. token: "${PRISM_TOKEN}", or set auth.insecure: true to run without authentication`)
	}
	t := a.TLS
	if !t.Enabled() {
		return
	}
	switch {
	case t.Cert != "" && t.Key == "":
		v.add("auth.tls.key", "missing; auth.tls.cert is set, so also set auth.tls.key to its private key file")
	case t.Key != "" && t.Cert == "":
		v.add("auth.tls.cert", "missing; auth.tls.key is set, so also set auth.tls.cert to its certificate file")
	case t.Cert == "" && t.Key == "":
		v.add("auth.tls.cert", "missing; auth.tls.ca is set, so also set auth.tls.cert and auth.tls.key (every node presents a certificate)")
	}
	v.pemFile("auth.tls.cert", t.Cert)
	v.pemFile("auth.tls.key", t.Key)
	v.pemFile("auth.tls.ca", t.CA)
}

func (v *validator) pemFile(key, path string) {
	if path == "" {
		return
	}
	st, err := os.Stat(path)
	switch {
	case err != nil:
		v.add(key, "cannot read %q: %v; write the path of an existing PEM file", path, unwrapPath(err))
	case st.IsDir():
		v.add(key, "%q is a directory; write the path of a PEM file", path)
	}
}

// unwrapPath drops the path from an *os.PathError, which the message
// already names.
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
