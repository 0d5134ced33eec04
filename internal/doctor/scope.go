package doctor

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/scope"
)

// scopes shows what each peer region may receive (peers[].scope) and this
// region's own scope (the top-level scope key), checks each against this
// region's database as a starting node does, and warns about filters that
// make regions diverge by design.
//
// The divergence check is deliberately simple: when this region's own
// scope filters or excludes a table, rows the application writes here
// outside that scope stay here, and this region never receives later
// changes to them from other regions (they are outside its scope there),
// so its copies of them drift from the copies elsewhere.
func (d *doctor) scopes(ctx context.Context, conn *pgx.Conn, db string) {
	for _, p := range d.cfg.Peers {
		d.scope(ctx, conn, db, "scope of region "+p.Region, "peers[].scope of region "+p.Region, p.Scope)
	}
	if d.cfg.Scope.IsZero() {
		return
	}
	own := d.cfg.Scope
	d.scope(ctx, conn, db, "scope of this region ("+d.cfg.Region+")", "the top-level scope", own)
	for _, t := range own.ExcludeTables {
		d.rep.add(Warn, db+": scope of this region ("+d.cfg.Region+")",
			fmt.Sprintf("%s is outside this region's scope, but the application can still write it here: those rows are shipped to the regions whose scope holds the table, and this region receives nobody else's", t),
			"do not write "+t+" in region "+d.cfg.Region+", or take it out of exclude_tables")
	}
	for _, t := range slices.Sorted(maps.Keys(own.Rows)) {
		f := own.Rows[t]
		d.rep.add(Warn, db+": scope of this region ("+d.cfg.Region+")",
			fmt.Sprintf("rows of %s written here that fail %q stay here, and this region receives no later change to them from other regions: such rows diverge by design (verify reports them as rows outside the region's scope)", t, f),
			"write rows of "+t+" in a region whose scope holds them")
	}
}

// scope reports one scope and its problems against the database.
func (d *doctor) scope(ctx context.Context, conn *pgx.Conn, db, check, key string, s config.Scope) {
	if s.IsZero() {
		d.rep.ok(db+": "+check, "everything")
		return
	}
	d.rep.ok(db+": "+check, describe(s))
	problems, err := scope.Check(ctx, conn, s.Rules())
	if err != nil {
		d.rep.add(Problem, db+": "+check, "check: "+err.Error(), "")
		return
	}
	for _, p := range problems {
		sev := Problem
		if p.Warning {
			sev = Warn
		}
		d.rep.add(sev, db+": "+check, p.String(), "fix "+key+" in "+d.cfg.Path+" or the table")
	}
}

// describe summarizes a scope in one line.
func describe(s config.Scope) string {
	var parts []string
	if len(s.ExcludeTables) > 0 {
		parts = append(parts, "without tables "+strings.Join(s.ExcludeTables, ", "))
	}
	for _, t := range slices.Sorted(maps.Keys(s.Rows)) {
		parts = append(parts, fmt.Sprintf("%s rows where %s", t, s.Rows[t]))
	}
	for _, t := range slices.Sorted(maps.Keys(s.ExcludeColumns)) {
		parts = append(parts, fmt.Sprintf("%s without %s", t, strings.Join(s.ExcludeColumns[t], ", ")))
	}
	return strings.Join(parts, "; ")
}
