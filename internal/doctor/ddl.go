package doctor

import (
	"context"

	"github.com/prism-cdc/prism-cdc/internal/config"
	"github.com/prism-cdc/prism-cdc/internal/verify"
	"github.com/prism-cdc/prism-cdc/pkg/apply"
)

// ddl checks the capture of schema changes in this region's database:
// with ddl: replicate, event trigger prism_ddl must exist (the node
// creates it at start, which takes a superuser); with ddl: off it must
// not, or this region's schema changes are still replicated.
func (d *doctor) ddl(ctx context.Context) {
	db := "database " + d.cfg.Region
	check := db + ": ddl " + string(d.cfg.DDL)
	conn, err := d.connect(ctx, d.cfg.Database)
	if err != nil {
		return // reported by local
	}
	defer conn.Close(context.Background())
	var trigger, super bool
	err = conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'prism_ddl' AND evtenabled <> 'D'),
		(SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)`).Scan(&trigger, &super)
	switch {
	case err != nil:
		d.rep.add(Warn, check, "read event triggers: "+err.Error(), "")
	case d.cfg.DDL == config.DDLReplicate && trigger:
		d.rep.ok(check, "event trigger prism_ddl captures this region's schema changes")
	case d.cfg.DDL == config.DDLReplicate && super:
		d.rep.ok(check, "event trigger prism_ddl does not exist yet; the node creates it at its first start")
	case d.cfg.DDL == config.DDLReplicate:
		d.rep.add(Problem, check, "event trigger prism_ddl is missing, and the role is not a superuser, which creating it takes: schema changes made in this region are not replicated (the node does not start)",
			"-- start a node once as a superuser, or as a superuser in this database (after a node created schema prism's functions):\n"+apply.DDLTriggerFix)
	case trigger:
		d.rep.add(Warn, check, "event trigger prism_ddl is installed, so this region's schema changes are still replicated (and refused when prism-cdc cannot replicate them)",
			"DROP EVENT TRIGGER prism_ddl; DROP EVENT TRIGGER prism_ddl_drop;  -- as a superuser; or set ddl: replicate in every region")
	default:
		d.rep.ok(check, "schema changes are run by hand in every region")
	}
}

// schemas compares the shape of every replicated table (columns, key,
// indexes) across this region and the peer regions whose database is
// configured (peers[].database).
func (d *doctor) schemas(ctx context.Context) {
	regions := []verify.Region{{Name: d.cfg.Region, DSN: d.cfg.Database}}
	for _, p := range d.cfg.Peers {
		if p.Database != "" {
			regions = append(regions, verify.Region{Name: p.Region, DSN: p.Database})
		}
	}
	if len(regions) < 2 {
		return
	}
	check := "schemas"
	cctx, cancel := context.WithTimeout(ctx, 3*d.opts.Timeout)
	defer cancel()
	diffs, err := verify.CompareSchemas(cctx, regions, d.cfg.Publication)
	if err != nil {
		d.rep.add(Warn, check, "compare: "+config.RedactDSN(err.Error()), "")
		return
	}
	fix := "make the regions' tables alike: let a replicated schema change arrive (prism-cdc status), or run the missing change in the regions that lack it (with ddl: replicate, after SET prism.ddl = 'local'); see README, Schema changes"
	for _, df := range diffs {
		sev := Problem
		if df.Aspect == "indexes" {
			sev = Warn
		}
		d.rep.add(sev, check+": "+df.Table, df.String(), fix)
	}
	if len(diffs) == 0 {
		d.rep.ok(check, "every replicated table has the same columns, key and indexes in the regions doctor can reach")
	}
}
