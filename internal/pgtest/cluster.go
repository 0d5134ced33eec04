package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Options tune a cluster. The zero value is a fast cluster for tests.
type Options struct {
	// Name labels the cluster in its directory name and in errors.
	Name string
	// Durable keeps fsync and full_page_writes on. Tests that kill the
	// server and check what survived do not need it (the OS keeps the page
	// cache), but benchmarks comparing commit latency do.
	Durable bool
	// Settings are extra postgresql.conf lines, e.g.
	// {"logical_decoding_work_mem": "64kB"}.
	Settings map[string]string
	// Bin is the directory of the server binaries (initdb, pg_ctl,
	// postgres) to run; empty: BinDir's.
	Bin string
}

// Cluster is one running (or stopped) throwaway PostgreSQL server.
type Cluster struct {
	Name string
	Dir  string // root directory: data/ and server.log live here
	Host string
	Port int
	// Env is added to the environment of every server program run for
	// this cluster (pg_ctl start passes it on to the server), e.g.
	// LD_PRELOAD of libfaketime. It takes effect at the next (re)start.
	Env []string

	bin    string
	asUser string // run server commands as this OS user; "" for the current one

	mu      sync.Mutex
	running bool
	closed  bool
}

// BinDir finds the PostgreSQL server binaries: initdb on PATH, then the
// newest /usr/lib/postgresql/*/bin. The error says how to install them.
func BinDir() (string, error) {
	if p, err := exec.LookPath("initdb"); err == nil {
		if _, err := os.Stat(filepath.Join(filepath.Dir(p), "pg_ctl")); err == nil {
			return filepath.Dir(p), nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	return "", errors.New("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under /usr/lib/postgresql/*/bin; install them with: apt-get install -y postgresql-15")
}

func versionOf(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

// New creates and starts a cluster. The caller must Close it.
func New(opts Options) (*Cluster, error) {
	bin := opts.Bin
	if bin == "" {
		var err error
		if bin, err = BinDir(); err != nil {
			return nil, err
		}
	}
	name := opts.Name
	if name == "" {
		name = "pg"
	}
	c := &Cluster{Name: name, Host: "127.0.0.1", bin: bin}
	if os.Geteuid() == 0 {
		c.asUser = "postgres"
		if _, err := user.Lookup(c.asUser); err != nil {
			return nil, fmt.Errorf("pgtest: running as root needs an OS user %q to run the server (create it with: useradd -r postgres): %w", c.asUser, err)
		}
	}
	if err := c.makeDir(); err != nil {
		return nil, err
	}
	dir := c.Dir
	if err := c.initdb(opts); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := c.startOnFreePort(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return c, nil
}

// startOnFreePort starts the server on a free loopback port. A free port
// can be taken by someone else between probing and binding; it tries a
// few.
func (c *Cluster) startOnFreePort() error {
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := freePort()
		if err != nil {
			lastErr = err
			continue
		}
		c.Port = port
		if lastErr = c.Start(); lastErr == nil {
			return nil
		}
	}
	return lastErr
}

// Start runs a cluster for the test and stops and removes it when the test
// ends, whether it passed or not. Missing binaries fail the test with the
// install command; only -short skips.
func Start(t TB, opts Options) *Cluster {
	t.Helper()
	if shortMode() {
		t.Skip("pgtest: -short skips tests that need a PostgreSQL cluster")
	}
	if opts.Name == "" {
		opts.Name = sanitize(t.Name())
	}
	c, err := New(opts)
	if err != nil {
		t.Fatalf("pgtest: start cluster %s: %v", opts.Name, err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("pgtest: close cluster %s: %v", c.Name, err)
		}
	})
	return c
}

func sanitize(s string) string {
	s = strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			return r
		}
		return '-'
	}, s)
	if len(s) > 40 {
		s = s[:40]
	}
	return s
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pgtest: find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (c *Cluster) dataDir() string { return filepath.Join(c.Dir, "data") }

// LogFile is the server's log file.
func (c *Cluster) LogFile() string { return filepath.Join(c.Dir, "server.log") }

func (c *Cluster) chown(path string) error {
	if c.asUser == "" {
		return nil
	}
	u, err := user.Lookup(c.asUser)
	if err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(path, uid, gid); err != nil {
		return fmt.Errorf("pgtest: chown %s to %s: %w", path, c.asUser, err)
	}
	return nil
}

func (c *Cluster) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	path := c.binary(name)
	if c.asUser != "" {
		args = append([]string{"-u", c.asUser, "--", path}, args...)
		path = "runuser"
	}
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Dir = c.Dir
	cmd.Env = append(append(os.Environ(), "LC_ALL=C", "TZ=UTC"), c.Env...)
	return cmd
}

// binary finds a PostgreSQL program: next to initdb, else in the newest
// /usr/lib/postgresql/*/bin, else on PATH.
func (c *Cluster) binary(name string) string {
	path := filepath.Join(c.bin, name)
	if _, err := os.Stat(path); err == nil {
		return path
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, name)); err == nil {
			return filepath.Join(d, name)
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	return path
}

func (c *Cluster) run(timeout time.Duration, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := c.command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("pgtest: %s %s: %w\n%s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (c *Cluster) initdb(opts Options) error {
	if err := c.run(2*time.Minute, "initdb", "-D", c.dataDir(), "-U", "postgres", "--auth=trust",
		"--encoding=UTF8", "--locale=C", "--no-sync"); err != nil {
		return err
	}
	settings := map[string]string{
		"listen_addresses":                "'127.0.0.1'",
		"unix_socket_directories":         "''",
		"wal_level":                       "logical",
		"track_commit_timestamp":          "on",
		"max_replication_slots":           "20",
		"max_wal_senders":                 "20",
		"max_connections":                 "100",
		"shared_buffers":                  "32MB",
		"max_worker_processes":            "16",
		"max_logical_replication_workers": "8",
		"log_min_messages":                "warning",
		"log_line_prefix":                 "'%m [%p] %a '",
		"timezone":                        "'UTC'",
	}
	if !opts.Durable {
		settings["fsync"] = "off"
		settings["full_page_writes"] = "off"
		settings["synchronous_commit"] = "on"
	}
	for k, v := range opts.Settings {
		settings[k] = v
	}
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString("\n# pgtest\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "%s = %s\n", k, settings[k])
	}
	f, err := os.OpenFile(filepath.Join(c.dataDir(), "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	defer f.Close()
	if _, err := f.WriteString(b.String()); err != nil {
		return fmt.Errorf("pgtest: write postgresql.conf: %w", err)
	}
	hba := "local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n"
	if err := os.WriteFile(filepath.Join(c.dataDir(), "pg_hba.conf"), []byte(hba), 0o600); err != nil {
		return fmt.Errorf("pgtest: write pg_hba.conf: %w", err)
	}
	return c.chown(filepath.Join(c.dataDir(), "pg_hba.conf"))
}

// NewStandby creates a physical streaming standby of primary with
// pg_basebackup and starts it. The caller must Close it.
func NewStandby(primary *Cluster, opts Options) (*Cluster, error) {
	name := opts.Name
	if name == "" {
		name = primary.Name + "-standby"
	}
	c := &Cluster{Name: name, Host: "127.0.0.1", bin: primary.bin, asUser: primary.asUser}
	if err := c.makeDir(); err != nil {
		return nil, err
	}
	dir := c.Dir
	if err := c.run(5*time.Minute, "pg_basebackup", "-h", primary.Host, "-p", strconv.Itoa(primary.Port), "-U", "postgres",
		"-D", c.dataDir(), "-R", "-X", "stream", "--no-sync"); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := c.startOnFreePort(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return c, nil
}

// SetConf appends a setting to postgresql.conf; it takes effect at the next
// Reload or restart.
func (c *Cluster) SetConf(name, value string) error {
	f, err := os.OpenFile(filepath.Join(c.dataDir(), "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	defer f.Close()
	_, err = fmt.Fprintf(f, "%s = %s\n", name, value)
	return err
}

// Reload makes the server re-read its configuration.
func (c *Cluster) Reload() error {
	return c.run(time.Minute, "pg_ctl", "-D", c.dataDir(), "reload")
}

// Start starts a stopped cluster and waits until it accepts connections.
func (c *Cluster) Start() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return fmt.Errorf("pgtest: cluster %s is closed", c.Name)
	}
	if c.running {
		return nil
	}
	err := c.run(2*time.Minute, "pg_ctl", "-D", c.dataDir(), "-l", c.LogFile(), "-w", "-t", "60",
		"-o", fmt.Sprintf("-p %d", c.Port), "start")
	if err != nil {
		return fmt.Errorf("%w\nserver log:\n%s", err, c.tailLog(20))
	}
	c.running = true
	return nil
}

// Stop stops the server. mode is "fast", "smart" or "immediate" (a crash:
// no shutdown checkpoint, recovery at the next start).
func (c *Cluster) Stop(mode string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopLocked(mode)
}

func (c *Cluster) stopLocked(mode string) error {
	if !c.running {
		return nil
	}
	if err := c.run(2*time.Minute, "pg_ctl", "-D", c.dataDir(), "-w", "-t", "60", "-m", mode, "stop"); err != nil {
		return err
	}
	c.running = false
	return nil
}

// Restart stops the server with mode and starts it again.
func (c *Cluster) Restart(mode string) error {
	if err := c.Stop(mode); err != nil {
		return err
	}
	return c.Start()
}

// Running reports whether the server was started and not stopped since.
func (c *Cluster) Running() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.running
}

// Close stops the server (immediately) and removes its directory. It is safe
// to call more than once.
func (c *Cluster) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	err := c.stopLocked("immediate")
	if rmErr := os.RemoveAll(c.Dir); rmErr != nil && err == nil {
		err = fmt.Errorf("pgtest: remove %s: %w", c.Dir, rmErr)
	}
	return err
}

// DSN is a key/value connection string for database dbname as the
// superuser postgres.
func (c *Cluster) DSN(dbname string) string {
	if dbname == "" {
		dbname = "postgres"
	}
	return fmt.Sprintf("host=%s port=%d user=postgres dbname=%s sslmode=disable", c.Host, c.Port, dbname)
}

// Connect opens a connection to dbname.
func (c *Cluster) Connect(ctx context.Context, dbname string) (*pgx.Conn, error) {
	conn, err := pgx.Connect(ctx, c.DSN(dbname))
	if err != nil {
		return nil, fmt.Errorf("pgtest: connect %s: %w", c.Name, err)
	}
	return conn, nil
}

// Exec runs SQL statements (simple protocol, several allowed) in dbname.
func (c *Cluster) Exec(ctx context.Context, dbname, sql string) error {
	conn, err := c.Connect(ctx, dbname)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	if err := conn.PgConn().Exec(ctx, sql).Close(); err != nil {
		return fmt.Errorf("pgtest: exec on %s: %w", c.Name, err)
	}
	return nil
}

// CreateDatabase creates database name.
func (c *Cluster) CreateDatabase(ctx context.Context, name string) error {
	return c.Exec(ctx, "postgres", "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
}

// Command returns a command running one of the cluster's binaries (psql,
// pgbench, pg_dump, ...) as the server's OS user.
func (c *Cluster) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return c.command(ctx, name, args...)
}

func (c *Cluster) tailLog(n int) string {
	b, err := os.ReadFile(c.LogFile())
	if err != nil {
		return "(no server log: " + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// PG16BinDefault is where `make pg16` (scripts/fetch-pg16.sh) puts the
// PostgreSQL 16 server binaries that some tests run besides the default
// ones.
const PG16BinDefault = "/var/tmp/prism-cdc-pg16/bin"

// PG16Bin returns the directory of the PostgreSQL 16 server binaries:
// $PRISM_PG16_BIN, else PG16BinDefault. It fails t, saying how to get
// them, when initdb is not there.
func PG16Bin(t TB) string {
	t.Helper()
	dir := os.Getenv("PRISM_PG16_BIN")
	if dir == "" {
		dir = PG16BinDefault
	}
	if _, err := os.Stat(filepath.Join(dir, "initdb")); err != nil {
		t.Fatalf("pgtest: PostgreSQL 16 server binaries not found in %s (%v): run `make pg16`, which downloads them, or set PRISM_PG16_BIN to a directory holding initdb, pg_ctl and postgres", dir, err)
	}
	return dir
}

// Server is a PostgreSQL server build that tests which depend on the
// server's version run on, one subtest each (see Servers).
type Server struct {
	Name  string            // the subtest's name
	Major int               // the major version the build is (0: the machine's newest, any)
	Bin   func(t TB) string // Options.Bin for it; fails t when the build is missing
}

// Servers are the machine's newest PostgreSQL ("default") and 16
// ("pg16", PG16Bin).
func Servers() []Server {
	return []Server{
		{Name: "default", Bin: func(TB) string { return "" }},
		{Name: "pg16", Major: 16, Bin: PG16Bin},
	}
}

// PrismPgoutputDirDefault is where scripts/build-prism-pgoutput.sh builds
// contrib/prism_pgoutput, one directory per major version.
const PrismPgoutputDirDefault = "/var/tmp/prism-cdc-plugin"

// PrismPgoutput returns the postgresql.conf settings under which a
// cluster of the machine's default PostgreSQL (BinDir) can load
// contrib/prism_pgoutput: dynamic_library_path names the directory
// scripts/build-prism-pgoutput.sh built it into ($PRISM_PGOUTPUT_DIR,
// else PrismPgoutputDirDefault/<major>), then the server's own. It fails
// t, saying how to build it, when the library is not there.
func PrismPgoutput(t TB) map[string]string {
	t.Helper()
	dir, err := PrismPgoutputDir("")
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return LibraryPath(dir)
}

// LibraryPath is the postgresql.conf setting under which a server loads
// libraries from dir first, then from its own directory.
func LibraryPath(dir string) map[string]string {
	return map[string]string{"dynamic_library_path": "'" + dir + ":$libdir'"}
}

// PrismPgoutputDir is the directory holding prism_pgoutput.so built for
// the server binaries in bin (BinDir's when empty); the error says how
// to build it.
func PrismPgoutputDir(bin string) (string, error) {
	dir := os.Getenv("PRISM_PGOUTPUT_DIR")
	if dir == "" {
		if bin == "" {
			var err error
			if bin, err = BinDir(); err != nil {
				return "", err
			}
		}
		major, err := MajorOf(bin)
		if err != nil {
			return "", err
		}
		dir = filepath.Join(PrismPgoutputDirDefault, strconv.Itoa(major))
	}
	if _, err := os.Stat(filepath.Join(dir, "prism_pgoutput.so")); err != nil {
		return "", fmt.Errorf("contrib/prism_pgoutput is not built in %s (%v): run `make plugin` (scripts/build-prism-pgoutput.sh [pg_config]), or set PRISM_PGOUTPUT_DIR to a directory holding prism_pgoutput.so", dir, err)
	}
	return dir, nil
}

// MajorOf is the major version of the server binaries in bin, as their
// pg_ctl --version prints it ("pg_ctl (PostgreSQL) 15.18 (Debian ...)").
func MajorOf(bin string) (int, error) {
	pgctl := filepath.Join(bin, "pg_ctl")
	out, err := exec.Command(pgctl, "--version").Output()
	if err != nil {
		return 0, fmt.Errorf("pgtest: %s --version: %w", pgctl, err)
	}
	fields := strings.Fields(string(out))
	if len(fields) < 3 {
		return 0, fmt.Errorf("pgtest: %s --version printed %q", pgctl, out)
	}
	digits := fields[2]
	if i := strings.IndexFunc(digits, func(r rune) bool { return r < '0' || r > '9' }); i >= 0 {
		digits = digits[:i] // "15.18", "17beta1"
	}
	major, err := strconv.Atoi(digits)
	if err != nil {
		return 0, fmt.Errorf("pgtest: %s --version printed %q", pgctl, out)
	}
	return major, nil
}
