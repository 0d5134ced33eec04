package config

import (
	"fmt"
	"net/url"
	"regexp"
	"strings"

	"github.com/rs/zerolog"
)

// redacted replaces a secret in redacted output.
const redacted = "xxxxx"

// RedactDSN returns dsn with its password hidden: the value of password= and
// sslpassword= in a key/value DSN, and the userinfo password and password
// query parameters in a postgres:// or postgresql:// URL. It is safe to log
// the result.
func RedactDSN(dsn string) string {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		return redactURL(dsn)
	}
	kv := regexp.MustCompile(`(?i)\b((?:ssl)?password)(\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|[^\s]*)`)
	return kv.ReplaceAllString(dsn, "${1}${2}"+redacted)
}

func redactURL(dsn string) string {
	if u, err := url.Parse(dsn); err == nil {
		if _, ok := u.User.Password(); ok {
			u.User = url.UserPassword(u.User.Username(), redacted)
		}
		if u.RawQuery != "" {
			parts := strings.Split(u.RawQuery, "&")
			for i, part := range parts {
				k, _, _ := strings.Cut(part, "=")
				if uk, err := url.QueryUnescape(k); err != nil || isPasswordKey(uk) {
					parts[i] = k + "=" + redacted
				}
			}
			u.RawQuery = strings.Join(parts, "&")
		}
		return u.String()
	}
	// Unparseable (e.g. several hosts): mask everything that could be a
	// password, over-masking rather than leaking.
	userinfo := regexp.MustCompile(`^(postgres(?:ql)?://[^:@/]*:)[^@]*@`)
	dsn = userinfo.ReplaceAllString(dsn, "${1}"+redacted+"@")
	query := regexp.MustCompile(`(?i)([?&](?:ssl)?password=)[^&]*`)
	return query.ReplaceAllString(dsn, "${1}"+redacted)
}

// Redacted returns a deep copy of c with the auth token and DSN passwords
// hidden, for printing and logging.
func (c *Config) Redacted() *Config {
	r := *c
	if r.Auth.Token != "" {
		r.Auth.Token = redacted
	}
	r.Database = RedactDSN(c.Database)
	r.Peers = make([]Peer, len(c.Peers))
	for i, p := range c.Peers {
		p.Nodes = append([]PeerNode(nil), p.Nodes...)
		p.Database = RedactDSN(p.Database)
		r.Peers[i] = p
	}
	if c.Conflicts.Tables != nil {
		r.Conflicts.Tables = make(map[string]ConflictPolicy, len(c.Conflicts.Tables))
		for k, v := range c.Conflicts.Tables {
			r.Conflicts.Tables[k] = v
		}
	}
	return &r
}

// String summarizes c on one line with secrets hidden.
func (c *Config) String() string {
	r := c.Redacted()
	var b strings.Builder
	fmt.Fprintf(&b, "node=%s region=%s listen=%s database=%q publication=%s slot=%s",
		r.Node, r.Region, r.Listen, r.Database, r.Publication, r.Slot)
	for _, p := range r.Peers {
		names := make([]string, len(p.Nodes))
		for i, n := range p.Nodes {
			names[i] = n.Name + "@" + n.Addr
		}
		fmt.Fprintf(&b, " peer=%s[%s] peer_database=%q", p.Region, strings.Join(names, ","), p.Database)
	}
	fmt.Fprintf(&b, " token_set=%t insecure=%t tls=%t sync=%s on_apply_error=%s conflicts=%s",
		c.Auth.Token != "", r.Auth.Insecure, r.Auth.TLS.Enabled(), r.Sync, r.OnApplyError, r.Conflicts.Default)
	return b.String()
}

// MarshalZerologObject writes c to a log event with secrets hidden.
func (c *Config) MarshalZerologObject(e *zerolog.Event) {
	r := c.Redacted()
	e.Str("file", r.Path).
		Str("node", r.Node).
		Str("region", r.Region).
		Str("listen", r.Listen).
		Str("database", r.Database).
		Str("publication", r.Publication).
		Str("slot", r.Slot).
		Str("output_plugin", r.OutputPlugin).
		Bool("token_set", c.Auth.Token != "").
		Bool("insecure", r.Auth.Insecure).
		Bool("tls", r.Auth.TLS.Enabled())
	regions := make([]string, len(r.Peers))
	for i, p := range r.Peers {
		regions[i] = p.Region
	}
	e.Strs("peers", regions).
		Stringer("sync", r.Sync).
		Str("on_apply_error", string(r.OnApplyError)).
		Str("conflicts", string(r.Conflicts.Default)).
		Str("http", r.HTTP).
		Str("spool", r.Spool.Dir).
		Int("procs", r.Procs)
}

func isPasswordKey(k string) bool {
	k = strings.ToLower(k)
	return k == "password" || k == "sslpassword"
}
