package config

import (
	"errors"
	"fmt"
	"slices"
	"strconv"

	"github.com/prism-cdc/prism-cdc/internal/scope"
)

// Scope is what one peer region may receive (peers[].scope): tables it
// never gets, a row filter per table (only rows for which it is true are
// shipped) and columns whose values it never gets. Tables are
// "schema.table". Load checks the filters' syntax; the tables and columns
// are checked against the database when a node starts and by doctor.
type Scope struct {
	ExcludeTables  []string
	Rows           map[string]string
	ExcludeColumns map[string][]string
}

// IsZero reports whether the scope lets everything through.
func (s Scope) IsZero() bool {
	return len(s.ExcludeTables) == 0 && len(s.Rows) == 0 && len(s.ExcludeColumns) == 0
}

// Rules converts the scope for package scope.
func (s Scope) Rules() scope.Rules {
	return scope.Rules{ExcludeTables: s.ExcludeTables, Rows: s.Rows, ExcludeColumns: s.ExcludeColumns}
}

// scope checks one peer's scope: table names, filter syntax, column lists.
func (v *validator) scope(key string, s Scope) {
	excluded := map[string]bool{}
	for i, t := range s.ExcludeTables {
		k := fmt.Sprintf("%s.exclude_tables[%d]", key, i)
		if !validTable(t) {
			v.add(k, `%q is not a table name; write it as schema.table, e.g. "public.card_tokens"`, t)
			continue
		}
		if excluded[t] {
			v.add(k, "%s is listed twice; list each table once", t)
		}
		excluded[t] = true
	}
	for t, f := range s.Rows {
		k := key + ".rows[" + strconv.Quote(t) + "]"
		if !validTable(t) {
			v.add(k, `%q is not a table name; write it as schema.table, e.g. "public.customers"`, t)
		}
		if excluded[t] {
			v.add(k, "%s is also in exclude_tables, so the region gets none of its rows; remove one of the two", t)
		}
		if _, err := scope.Parse(f); err != nil {
			var se *scope.SyntaxError
			if errors.As(err, &se) {
				v.add(k, "row filter %q does not parse %v; see the README's Data residency section for the filter language", f, err)
			} else {
				v.add(k, "row filter %q: %v", f, err)
			}
		}
	}
	for t, cols := range s.ExcludeColumns {
		k := key + ".exclude_columns[" + strconv.Quote(t) + "]"
		if !validTable(t) {
			v.add(k, `%q is not a table name; write it as schema.table, e.g. "public.customers"`, t)
		}
		if excluded[t] {
			v.add(k, "%s is also in exclude_tables; remove one of the two", t)
		}
		if len(cols) == 0 {
			v.add(k, "no columns; list the columns the region must not receive, e.g. [ssn]")
		}
		if e, err := scope.Parse(s.Rows[t]); err == nil && s.Rows[t] != "" {
			for _, c := range e.Columns() {
				if slices.Contains(cols, c) {
					v.add(k, "column %s is excluded but the row filter of %s reads it: the region would never hold the values its rows are selected by, so verify and bootstrap could not apply the filter there; filter on another column or ship this one", c, t)
				}
			}
		}
		for i, c := range cols {
			if c == "" {
				v.add(fmt.Sprintf("%s[%d]", k, i), "empty column name")
			} else if slices.Index(cols, c) != i {
				v.add(fmt.Sprintf("%s[%d]", k, i), "column %s is listed twice", c)
			}
		}
	}
}

// scopeUndo refuses on_apply_error: undo together with a scope. The
// source carries out an undo only when its own on_apply_error allows it,
// and an undo request carries the transaction as the region received it:
// reverting only that part at the source would split the source
// transaction.
func (v *validator) scopeUndo(c *Config, scoped []string) {
	if len(scoped) == 0 {
		return
	}
	if c.OnApplyError == Undo {
		v.add("on_apply_error", "undo cannot be combined with peers[].scope (set at %s): a region outside part of a transaction could only ask to revert part of it; use halt or dead_letter", scoped[0])
	}
	for table, p := range c.OnApplyErrorTables {
		if p == Undo {
			v.add("on_apply_error_tables["+strconv.Quote(table)+"]", "undo cannot be combined with peers[].scope (set at %s); use halt or dead_letter", scoped[0])
		}
	}
}
