package main

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// replicateDDL turns on schema-change replication (ddl: replicate) in a
// node config that the demo copied.
func replicateDDL(node, text string) (string, error) {
	const off = "\nddl: off "
	if !strings.Contains(text, off) {
		return "", fmt.Errorf("%s: no 'ddl: off' line to turn into 'ddl: replicate'", node)
	}
	return strings.Replace(text, off, "\nddl: replicate ", 1), nil
}

// schemaChange shows a schema change travelling with the data: na adds a
// column while every region writes; the other regions run it at its place
// in na's stream, and a write to the new column in eu reaches na and as.
func (d *demo) schemaChange(ctx context.Context) error {
	d.step("6. A schema change travels with the data: na adds ledger.note while every region writes (ddl: replicate)")
	if err := d.clusters["na"].Exec(ctx, "app", "ALTER TABLE ledger ADD COLUMN note text NOT NULL DEFAULT ''"); err != nil {
		return err
	}
	d.say("na: ALTER TABLE ledger ADD COLUMN note text NOT NULL DEFAULT '' (run once, in na only)")
	hasNote := "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'ledger' AND column_name = 'note'"
	if err := d.waitFor(ctx, 30*time.Second, "eu and as have column ledger.note", func() bool {
		eu, err1 := d.count(ctx, "eu", hasNote)
		as, err2 := d.count(ctx, "as", hasNote)
		return err1 == nil && err2 == nil && eu == 1 && as == 1
	}); err != nil {
		return err
	}
	d.say("eu and as ran it at its place in na's stream, between na's rows, while all three kept writing")
	if err := d.clusters["eu"].Exec(ctx, "app", "UPDATE ledger SET note = 'noted in eu' WHERE id = (SELECT min(id) FROM ledger WHERE region = 'eu')"); err != nil {
		return err
	}
	noted := "SELECT count(*) FROM ledger WHERE note = 'noted in eu'"
	if err := d.waitFor(ctx, 30*time.Second, "na and as hold eu's write to ledger.note", func() bool {
		na, err1 := d.count(ctx, "na", noted)
		as, err2 := d.count(ctx, "as", noted)
		return err1 == nil && err2 == nil && na == 1 && as == 1
	}); err != nil {
		return err
	}
	d.say("eu wrote the new column; na and as hold the write: the regions share the new shape")
	return nil
}
