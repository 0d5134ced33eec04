package node

import (
	"context"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/config"
)

// Tombstones and clock floors (pkg/apply) are kept this long and swept
// this often. A region cut off for longer than tombstoneRetention may
// bring back a row deleted meanwhile; prism-cdc verify finds it.
// Row stamps of batches are checked for replaced versions once they are
// stampCompactAge old.
const (
	tombstoneRetention = 7 * 24 * time.Hour
	collectEvery       = time.Hour
	marksEvery         = time.Minute
	stampCompactAge    = 10 * time.Minute
)

// collectLoop removes old tombstones and clock floors from this region's
// database: once a minute after start, then every collectEvery; and the
// key marks no apply transaction can meet any more every marksEvery, when
// it also installs the conflict triggers on new tables that lack them.
func (n *Node) collectLoop(ctx context.Context) {
	t := time.NewTicker(marksEvery)
	defer t.Stop()
	var last time.Time // the last full collection
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if time.Since(last) >= collectEvery {
			last = time.Now()
			if err := n.collect(ctx, tombstoneRetention); err != nil && ctx.Err() == nil {
				n.log.Warn().Err(err).Msg("could not remove old tombstones, row stamps and clock floors; retrying in an hour")
			}
			continue
		}
		if _, err := n.applier.CollectMarks(ctx); err != nil && ctx.Err() == nil {
			n.log.Warn().Err(err).Msg("could not remove old key marks; retrying in a minute")
		}
		n.installMissing(ctx)
	}
}

// installMissing installs the conflict triggers on the tables with a key
// that have none, or whose key changed since (event trigger
// prism_install missing, or unable to install for their creator); tables
// prism-cdc's role may not alter are reported once an hour.
func (n *Node) installMissing(ctx context.Context) {
	installed, denied, err := n.applier.InstallMissing(ctx)
	switch {
	case err != nil && ctx.Err() == nil:
		n.log.Warn().Err(err).Msg("could not install the conflict triggers on new tables; retrying in a minute")
	case installed > 0:
		n.log.Info().Int("tables", installed).Msg("installed the conflict triggers on tables that had none or whose key changed (event trigger prism_install is missing or could not: see prism-cdc doctor)")
	}
	if denied > 0 && time.Since(n.deniedWarned) >= time.Hour {
		n.deniedWarned = time.Now()
		n.log.Warn().Int("tables", denied).Msg("tables with a key have no conflict triggers and prism-cdc's role may not create them: last_write_wins there does not see local deletes or a lagging clock, and the next start fails; prism-cdc doctor names them and prints the fix")
	}
}

// collect removes the tombstones, row stamps and clock floors older than
// keep once, the row stamps of replaced versions, and the conflict records
// older than conflicts.keep.
func (n *Node) collect(ctx context.Context, keep time.Duration) error {
	tomb, floors, err := n.applier.Collect(ctx, keep)
	if err != nil {
		return err
	}
	if tomb > 0 || floors > 0 {
		n.log.Info().Int64("tombstones", tomb).Int64("clock_floors", floors).Dur("older_than", keep).Msg("removed old tombstones and clock floors")
	}
	stamps, err := n.applier.CompactStamps(ctx, stampCompactAge)
	if err != nil {
		return err
	}
	if stamps > 0 {
		n.log.Info().Int64("row_stamps", stamps).Msg("removed the row stamps of replaced versions")
	}
	if n.cfg == nil || n.cfg.Conflicts.Keep <= 0 {
		return nil
	}
	conflicts, err := n.applier.CollectConflicts(ctx, n.cfg.Conflicts.Keep)
	if err != nil {
		return err
	}
	if conflicts > 0 {
		n.log.Info().Int64("conflicts", conflicts).Str("older_than", config.FormatDuration(n.cfg.Conflicts.Keep)).Msg("removed old conflict records (conflicts.keep)")
	}
	return nil
}
