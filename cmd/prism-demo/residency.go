package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prism-cdc/prism-cdc/internal/scope"
	"github.com/prism-cdc/prism-cdc/internal/verify"
)

// residencyRule is the demo's data residency rule: region as never
// receives the card_tokens table.
const residencyRule = "{exclude_tables: [public.card_tokens]}"

// residencyConfigs copies the node configs into the demo's directory with
// schema changes replicated (see schemaChange) and the residency rule added: under peer region as in the na and eu nodes'
// configs (what they ship to as), and as the top-level scope of as1 (what
// region as holds, for verify).
func (d *demo) residencyConfigs() error {
	dir := filepath.Join(d.logDir, "configs")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for _, n := range []string{"na1", "eu1", "eu2", "as1"} {
		b, err := os.ReadFile(filepath.Join(d.configs, n+".yaml"))
		if err != nil {
			return err
		}
		text := string(b)
		if n == "as1" {
			text += "\nscope: " + residencyRule + "   # demo: region as holds no card tokens\n"
		} else {
			const peer = "  - region: as"
			i := strings.Index(text, peer)
			if i < 0 {
				return fmt.Errorf("%s: no peer region as to add the residency rule to", n)
			}
			eol := i + strings.IndexByte(text[i:], '\n') + 1
			text = text[:eol] + "    scope: " + residencyRule + "   # demo: as receives no card tokens\n" + text[eol:]
		}
		if text, err = replicateDDL(n, text); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, n+".yaml"), []byte(text), 0o600); err != nil {
			return err
		}
	}
	d.configs = dir
	d.scopes = map[string]*scope.Scope{}
	s, err := scope.New(scope.Rules{ExcludeTables: []string{"public.card_tokens"}})
	if err != nil {
		return err
	}
	d.scopes["as"] = s
	return nil
}

// residency shows the rule at work: card tokens written in na and eu reach
// each other, never as.
func (d *demo) residency(ctx context.Context) error {
	d.step("5. Data residency: region as never receives card_tokens (peers[].scope)")
	for i, r := range []string{"na", "eu", "na"} {
		if err := d.clusters[r].Exec(ctx, "app", fmt.Sprintf("INSERT INTO card_tokens VALUES ('%s-%d', 'tok_%d_secret')", r, i, i)); err != nil {
			return err
		}
	}
	d.say("3 card tokens written (2 in na, 1 in eu) while every region keeps writing ledger rows")
	if err := d.waitFor(ctx, 30*time.Second, "na and eu hold every card token", func() bool {
		na, err1 := d.count(ctx, "na", "SELECT count(*) FROM card_tokens")
		eu, err2 := d.count(ctx, "eu", "SELECT count(*) FROM card_tokens")
		return err1 == nil && err2 == nil && na == 3 && eu == 3
	}); err != nil {
		return err
	}
	for _, src := range []string{"na1", d.euReader()} {
		if err := d.waitCaughtUp(ctx, src, "as"); err != nil {
			return err
		}
	}
	as, err := d.count(ctx, "as", "SELECT count(*) FROM card_tokens")
	if err != nil {
		return err
	}
	if as != 0 {
		return fmt.Errorf("region as holds %d card tokens, want none", as)
	}
	d.say("card_tokens: na=3 eu=3 as=0; as is caught up on everything else (its ledger keeps growing): the tokens were filtered out at the source, before anything was sent")
	return nil
}

// pairRows formats the row counts of a pair comparison, e.g. na=3 eu=3.
func pairRows(t verify.TableResult) string {
	parts := make([]string, len(t.Regions))
	for i, r := range t.Regions {
		parts[i] = fmt.Sprintf("%s=%d", r, t.Rows[r])
	}
	return strings.Join(parts, " ")
}
