package scope

import (
	"strings"

	"github.com/jackc/pgx/v5"
)

// SQL returns the predicate as a SQL condition for a WHERE clause that
// selects exactly the rows Eval accepts: text compared with COLLATE "C",
// numbers numerically, other types by their text form.
func (p *Pred) SQL() string { return p.SQLOn("") }

// SQLOn is SQL with every column qualified by alias (none when empty).
func (p *Pred) SQLOn(alias string) string {
	var b strings.Builder
	p.sql(&b, p.e.root, alias)
	return b.String()
}

func (p *Pred) sql(b *strings.Builder, n node, alias string) {
	switch n := n.(type) {
	case *boolNode:
		b.WriteByte('(')
		p.sql(b, n.l, alias)
		if n.and {
			b.WriteString(" AND ")
		} else {
			b.WriteString(" OR ")
		}
		p.sql(b, n.r, alias)
		b.WriteByte(')')
	case *notNode:
		b.WriteString("(NOT ")
		p.sql(b, n.x, alias)
		b.WriteByte(')')
	case *nullNode:
		b.WriteString(column(alias, n.col.name))
		if n.not {
			b.WriteString(" IS NOT NULL")
		} else {
			b.WriteString(" IS NULL")
		}
	case *cmpNode:
		cl := p.class(n.col.name)
		b.WriteByte('(')
		b.WriteString(operand(column(alias, n.col.name), cl))
		b.WriteString(" " + n.op + " ")
		b.WriteString(sqlLiteral(n.lit))
		b.WriteByte(')')
	case *inNode:
		cl := p.class(n.col.name)
		b.WriteByte('(')
		b.WriteString(operand(column(alias, n.col.name), cl))
		if n.not {
			b.WriteString(" NOT")
		}
		b.WriteString(" IN (")
		for i, l := range n.lits {
			if i > 0 {
				b.WriteString(", ")
			}
			b.WriteString(sqlLiteral(l))
		}
		b.WriteString("))")
	}
}

func (p *Pred) class(col string) class {
	for _, c := range p.cols {
		if c.Name == col {
			return classOf(c.TypeOID)
		}
	}
	return classOther
}

// column is the quoted column name, qualified by alias when set.
func column(alias, name string) string {
	id := pgx.Identifier{name}.Sanitize()
	if alias != "" {
		return alias + "." + id
	}
	return id
}

// operand is a column as the filter compares it.
func operand(id string, cl class) string {
	switch cl {
	case classText, classBPChar:
		return id + ` COLLATE "C"`
	case classOther:
		return id + `::text COLLATE "C"`
	}
	return id
}

func sqlLiteral(l literal) string {
	switch l.kind {
	case litNumber:
		return l.text
	case litBool:
		return l.text
	}
	return "'" + strings.ReplaceAll(l.text, "'", "''") + "'"
}
