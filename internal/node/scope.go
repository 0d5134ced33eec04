package node

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/prism-cdc/prism-cdc/internal/scope"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// setupScopes prepares each peer region's scope (data residency) and checks
// it against this region's database: a table or column that does not
// exist, a filter that does not fit its table, or one that reads a column
// an UPDATE or DELETE may not carry stops the node before anything ships.
func (n *Node) setupScopes(ctx context.Context, q scope.Querier) error {
	n.scopes = make([]*scope.Scope, len(n.cfg.Peers))
	var errs []error
	for i, p := range n.cfg.Peers {
		if p.Scope.IsZero() {
			continue
		}
		s, err := scope.New(p.Scope.Rules())
		if err != nil {
			errs = append(errs, fmt.Errorf("peers[%d].scope (region %s): %w", i, p.Region, err))
			continue
		}
		problems, err := scope.Check(ctx, q, p.Scope.Rules())
		if err != nil {
			return fmt.Errorf("check the scope of region %s: %w", p.Region, err)
		}
		for _, pr := range problems {
			if pr.Warning {
				n.log.Warn().Str("target", p.Region).Str("table", pr.Table).Msg(pr.Msg)
				continue
			}
			errs = append(errs, fmt.Errorf("peers[%d].scope (region %s): %s", i, p.Region, pr))
		}
		region := p.Region
		var warned sync.Map // configured+" "+now: a spilled transaction's relations are decoded anew for every read
		if err := s.Resolve(ctx, q, func(configured, now string) {
			if _, seen := warned.LoadOrStore(configured+" "+now, true); seen {
				return
			}
			n.log.Warn().Str("target", region).Str("table", now).Str("configured", configured).
				Msg("a table of this region's scope was renamed: its rows keep the scope configured for its old name; update peers[].scope to the new name before the next restart, which refuses a scope that names a missing table")
		}); err != nil {
			return fmt.Errorf("scope of region %s: %w", p.Region, err)
		}
		n.scopes[i] = s
		n.log.Info().Str("target", p.Region).Str("scope", describeScope(s)).Msg("region receives a limited scope")
	}
	if len(errs) > 0 {
		return fmt.Errorf("scope in %s: %w", n.cfg.Path, errors.Join(errs...))
	}
	return nil
}

// scopeFor returns the scope of peer region i (nil ships everything).
func (t *term) scopeFor(i int) *scope.Scope {
	if i < len(t.scopes) {
		return t.scopes[i]
	}
	return nil
}

// scoped returns txn as peer region i may receive it. A filter that fails
// (a schema change the scope no longer fits, a filter column that was not
// sent) is an error: nothing is shipped to the region past it.
func (t *term) scoped(i int, txn *decode.Txn) (*decode.Txn, error) {
	out, err := t.scopeFor(i).Txn(txn)
	if err != nil {
		return nil, fmt.Errorf("scope of region %s: %w", t.regions[i], err)
	}
	return out, nil
}

// describeScope is a one-line summary of a scope for logs and doctor.
func describeScope(s *scope.Scope) string {
	if s == nil {
		return "everything"
	}
	var parts []string
	for _, t := range s.Tables() {
		switch {
		case s.Excludes(t):
			parts = append(parts, t+": excluded")
		default:
			var p []string
			if f := s.Filter(t); f != nil {
				p = append(p, "rows where "+f.String())
			}
			if c := s.ExcludedColumns(t); len(c) > 0 {
				p = append(p, "without "+strings.Join(c, ", "))
			}
			parts = append(parts, t+": "+strings.Join(p, ", "))
		}
	}
	return strings.Join(parts, "; ")
}
