package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

func TestDeadLettersAndSkipCommands(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "cli-dl"})
	if err := c.Exec(ctx, "postgres", `CREATE DATABASE app`); err != nil {
		t.Fatal(err)
	}
	if err := c.Exec(ctx, "app", `CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL);
		CREATE UNIQUE INDEX users_email ON users (email); INSERT INTO users VALUES (1, 'dup')`); err != nil {
		t.Fatal(err)
	}
	cfgPath := writeFile(t, "eu1.yaml", strings.Replace(goodConfig,
		`database: "host=127.0.0.1 port=5433 user=postgres dbname=app"`, fmt.Sprintf("database: %q", c.DSN("app")), 1))

	pool, err := pgxpool.New(ctx, c.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	a := apply.NewApplier(pool, zerolog.Nop(), apply.WithLocalRegion("eu"))
	rel := &decode.Relation{Schema: "public", Table: "users", ReplicaIdentity: decode.IdentityDefault,
		Columns: []decode.Column{{Name: "id", TypeOID: 23, TypeMod: -1, Key: true}, {Name: "email", TypeOID: 25, TypeMod: -1}}}
	mk := func(lsn pglogrepl.LSN, id string) *decode.Txn {
		return &decode.Txn{Origin: "na", Xid: 42, CommitLSN: lsn - 8, EndLSN: lsn, CommitTime: time.Now().UTC(),
			Changes: []decode.Change{{Op: decode.OpInsert, Rel: rel, New: []decode.Value{
				{Kind: decode.ValueText, Data: []byte(id)}, {Kind: decode.ValueText, Data: []byte("dup")}}}}}
	}
	parked := mk(0x1000, "2")
	aerr := a.Apply(ctx, parked)
	if aerr == nil {
		t.Fatal("Apply(duplicate) = nil")
	}
	if _, err := a.Park(ctx, parked, aerr, apply.StatusParked); err != nil {
		t.Fatal(err)
	}
	halted := mk(0x2000, "3")
	if err := a.RecordHalt(ctx, halted, errors.New("check violation")); err != nil {
		t.Fatal(err)
	}

	runCLI := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := run(ctx, args, &out, &errb)
		return code, out.String(), errb.String()
	}
	steps := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{"no subcommand", []string{"deadletters", "--config", cfgPath}, exitUsage, "", "write list or retry"},
		{"retry without id", []string{"deadletters", "retry", "--config", cfgPath}, exitUsage, "", "--id N or --all"},
		{"list", []string{"deadletters", "list", "--config", cfgPath, "--changes"}, exitOK, "parked", ""},
		{"list halted", []string{"deadletters", "list", "--config", cfgPath, "--status", "halted"}, exitOK, "0/2000", ""},
		{"retry before fix", []string{"deadletters", "retry", "--config", cfgPath, "--id", "1"}, exitFail, "still parked", ""},
		{"skip wrong lsn", []string{"skip", "--config", cfgPath, "--source", "na", "--lsn", "0/3000"}, exitFail, "", "no halted transaction"},
		{"skip bad lsn", []string{"skip", "--config", cfgPath, "--source", "na", "--lsn", "x"}, exitUsage, "", "--lsn LSN"},
		{"skip", []string{"skip", "--config", cfgPath, "--source", "na", "--lsn", "0/2000"}, exitOK, "skipped transaction 0/2000", ""},
	}
	for _, s := range steps {
		code, out, errOut := runCLI(s.args...)
		if code != s.wantCode || !strings.Contains(out, s.wantStdout) || !strings.Contains(errOut, s.wantStderr) {
			t.Fatalf("%s: run(%v) = %d\nstdout: %s\nstderr: %s\nwant %d, stdout with %q, stderr with %q",
				s.name, s.args, code, out, errOut, s.wantCode, s.wantStdout, s.wantStderr)
		}
	}
	if err := c.Exec(ctx, "app", "DROP INDEX users_email"); err != nil {
		t.Fatal(err)
	}
	if code, out, errOut := runCLI("deadletters", "retry", "--config", cfgPath, "--all"); code != exitOK || !strings.Contains(out, "1 retried, 0 still parked") {
		t.Fatalf("retry --all = %d\n%s\n%s", code, out, errOut)
	}
	code, out, _ := runCLI("deadletters", "list", "--config", cfgPath)
	if code != exitOK || !strings.Contains(out, "retried") || !strings.Contains(out, "skipped") {
		t.Fatalf("list after retry and skip = %d\n%s", code, out)
	}
	if p, err := a.Progress(ctx, "na"); err != nil || p != 0x2000 {
		t.Fatalf("progress = %s, %v; want 0/2000", p, err)
	}
}

// TestDeadLettersRetryDDL: deadletters retry runs a parked schema change
// only when the node's configuration says ddl: replicate, like the live
// apply path.
func TestDeadLettersRetryDDL(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := pgtest.Start(t, pgtest.Options{Name: "cli-dl-ddl"})
	if err := c.Exec(ctx, "postgres", `CREATE DATABASE app`); err != nil {
		t.Fatal(err)
	}
	if err := c.Exec(ctx, "app", `CREATE TABLE t (id int PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	off := strings.Replace(goodConfig,
		`database: "host=127.0.0.1 port=5433 user=postgres dbname=app"`, fmt.Sprintf("database: %q", c.DSN("app")), 1)
	offPath := writeFile(t, "off.yaml", off)
	onPath := writeFile(t, "on.yaml", off+"ddl: replicate\n")

	pool, err := pgxpool.New(ctx, c.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	// A region that once ran with ddl: replicate has prism.ddl_run.
	a := apply.NewApplier(pool, zerolog.Nop(), apply.WithLocalRegion("eu"), apply.WithDDL(true))
	if err := a.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	tx := &decode.Txn{Origin: "na", Xid: 42, CommitLSN: 0x1000 - 8, EndLSN: 0x1000, CommitTime: time.Now().UTC(),
		Changes: []decode.Change{{Op: decode.OpDDL, DDL: &decode.DDL{Command: "ALTER TABLE t ADD COLUMN b int", SearchPath: "public", Role: "postgres"}}}}
	if _, err := a.Park(ctx, tx, errors.New("parked for the test"), apply.StatusParked); err != nil {
		t.Fatal(err)
	}
	column := func() int {
		var n int
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'b'").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}

	var out, errb bytes.Buffer
	code := run(ctx, []string{"deadletters", "retry", "--config", offPath, "--id", "1"}, &out, &errb)
	if code != exitFail || !strings.Contains(out.String(), "still parked") || !strings.Contains(out.String(), "ddl is off") {
		t.Fatalf("retry with ddl off = %d\nstdout: %s\nstderr: %s\nwant %d, still parked because ddl is off", code, out.String(), errb.String(), exitFail)
	}
	if n := column(); n != 0 {
		t.Fatalf("column b exists after a retry with ddl off: the schema change ran")
	}
	out.Reset()
	errb.Reset()
	code = run(ctx, []string{"deadletters", "retry", "--config", onPath, "--id", "1"}, &out, &errb)
	if code != exitOK || !strings.Contains(out.String(), "1 retried, 0 still parked") {
		t.Fatalf("retry with ddl: replicate = %d\nstdout: %s\nstderr: %s", code, out.String(), errb.String())
	}
	if n := column(); n != 1 {
		t.Fatalf("column b count after a retry with ddl: replicate = %d, want 1", n)
	}
}
