package bootstrap

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// loadSchema copies the source's schema (without schema prism, owners,
// privileges, publications and subscriptions) into the target in one
// transaction: pg_dump --schema-only piped into psql --single-transaction.
func loadSchema(ctx context.Context, srcDSN, tgtDSN string) error {
	dump, err := pgBinary("pg_dump")
	if err != nil {
		return err
	}
	psql, err := pgBinary("psql")
	if err != nil {
		return err
	}
	srcArg, srcEnv, err := connArgs(srcDSN)
	if err != nil {
		return fmt.Errorf("bootstrap: source DSN: %w", err)
	}
	tgtArg, tgtEnv, err := connArgs(tgtDSN)
	if err != nil {
		return fmt.Errorf("bootstrap: target DSN: %w", err)
	}
	d := exec.CommandContext(ctx, dump, "--schema-only", "--no-owner", "--no-privileges", "--no-publications",
		"--no-subscriptions", "--exclude-schema=prism", "-d", srcArg)
	d.Env = append(os.Environ(), srcEnv...)
	p := exec.CommandContext(ctx, psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-d", tgtArg)
	p.Env = append(os.Environ(), tgtEnv...)
	var dumpErr, psqlOut bytes.Buffer
	d.Stderr = &dumpErr
	p.Stdout, p.Stderr = &psqlOut, &psqlOut
	pipe, err := d.StdoutPipe()
	if err != nil {
		return fmt.Errorf("bootstrap: pg_dump: %w", err)
	}
	pr, pw := io.Pipe()
	p.Stdin = pr
	go func() { pw.CloseWithError(withoutPrismTriggers(pipe, pw)) }()
	if err := d.Start(); err != nil {
		return fmt.Errorf("bootstrap: start pg_dump: %w", err)
	}
	if err := p.Start(); err != nil {
		d.Process.Kill()
		d.Wait()
		return fmt.Errorf("bootstrap: start psql: %w", err)
	}
	perr := p.Wait()
	derr := d.Wait()
	if derr != nil {
		msg := redact(strings.TrimSpace(dumpErr.String()))
		return fmt.Errorf("bootstrap: pg_dump of the source schema: %w: %s%s", derr, msg, dumpHint(dump, msg))
	}
	if perr != nil {
		return fmt.Errorf("bootstrap: psql loading the schema into the target (nothing was created): %w: %s", perr, redact(strings.TrimSpace(psqlOut.String())))
	}
	return nil
}

// pgBinary finds a PostgreSQL client program the way the test clusters
// find the server: on PATH, else in the newest /usr/lib/postgresql/*/bin.
func pgBinary(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, name)); err == nil {
			return filepath.Join(d, name), nil
		}
	}
	return "", fmt.Errorf("bootstrap: %s not found on PATH or under /usr/lib/postgresql/*/bin; install the PostgreSQL client (apt-get install -y postgresql-client-15) or put it on PATH", name)
}

var serverVersion = regexp.MustCompile(`server version: (\d+)`)

// dumpHint says what to do when pg_dump (at path dump) refused a server
// newer than itself; msg is its error output.
func dumpHint(dump, msg string) string {
	if !strings.Contains(msg, "server version mismatch") {
		return ""
	}
	m := serverVersion.FindStringSubmatch(msg)
	if m == nil {
		return fmt.Sprintf(" (%s is older than the source server: put a pg_dump and psql of the server's major version or newer first on PATH)", dump)
	}
	return fmt.Sprintf(" (%s is older than the source server: install pg_dump and psql %s or newer, e.g. apt-get install -y postgresql-client-%s, and put their directory first on PATH)", dump, m[1], m[1])
}

func versionOf(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

var kvPassword = regexp.MustCompile(`(?i)\bpassword\s*=\s*(?:'(?:[^'\\]|\\.)*'|[^\s]*)`)

// connArgs splits a DSN into a connection argument for pg_dump and psql
// without its password, and the environment carrying the password, so the
// password never shows in a process list.
func connArgs(dsn string) (string, []string, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return "", nil, errors.New(redact(err.Error()))
	}
	var env []string
	if cfg.Password != "" {
		env = append(env, "PGPASSWORD="+cfg.Password)
	}
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return "", nil, errors.New(redact(err.Error()))
		}
		if u.User != nil {
			u.User = url.User(u.User.Username())
		}
		q := u.Query()
		q.Del("password")
		u.RawQuery = q.Encode()
		return u.String(), env, nil
	}
	return strings.TrimSpace(kvPassword.ReplaceAllString(dsn, "")), env, nil
}

// withoutPrismTriggers copies a pg_dump script from r to w without the
// statements that create prism-cdc's own triggers (prism_clock,
// prism_tombstone, event triggers prism_install, prism_ddl and
// prism_ddl_drop): their functions live in
// schema prism, which is not copied, and the target's node installs its
// own at start.
func withoutPrismTriggers(r io.Reader, w io.Writer) error {
	br := bufio.NewReaderSize(r, 64<<10)
	skipping := false
	for {
		line, err := br.ReadString('\n')
		if len(line) > 0 {
			if !skipping && prismTriggerStatement(line) {
				skipping = true
			}
			if !skipping {
				if _, werr := io.WriteString(w, line); werr != nil {
					return werr
				}
			} else if strings.HasSuffix(strings.TrimRight(line, "\r\n"), ";") {
				skipping = false
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func prismTriggerStatement(line string) bool {
	for _, p := range []string{"CREATE TRIGGER prism_clock ", "CREATE TRIGGER prism_tombstone ",
		"CREATE EVENT TRIGGER prism_install ", "ALTER EVENT TRIGGER prism_install ",
		"CREATE EVENT TRIGGER prism_ddl ", "ALTER EVENT TRIGGER prism_ddl ",
		"CREATE EVENT TRIGGER prism_ddl_drop ", "ALTER EVENT TRIGGER prism_ddl_drop "} {
		if strings.HasPrefix(line, p) {
			return true
		}
	}
	return strings.HasPrefix(line, "ALTER TABLE ") && strings.Contains(line, " TRIGGER prism_tombstone;")
}
