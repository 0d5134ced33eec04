package scope

import (
	"strings"

	"github.com/jackc/pgx/v5"
)

// SQL returns the predicate as a SQL condition for a WHERE clause that
// selects exactly the rows Eval accepts: text compared with COLLATE "C",
// numbers numerically, other types by their text form.
func (p *Pred) SQL() string {
	var b strings.Builder
	p.sql(&b, p.e.root)
	return b.String()
}

func (p *Pred) sql(b *strings.Builder, n node) {
	switch n := n.(type) {
	case *boolNode:
		b.WriteByte('(')
		p.sql(b, n.l)
		if n.and {
			b.WriteString(" AND ")
		} else {
			b.WriteString(" OR ")
		}
		p.sql(b, n.r)
		b.WriteByte(')')
	case *notNode:
		b.WriteString("(NOT ")
		p.sql(b, n.x)
		b.WriteByte(')')
	case *nullNode:
		b.WriteString(pgx.Identifier{n.col.name}.Sanitize())
		if n.not {
			b.WriteString(" IS NOT NULL")
		} else {
			b.WriteString(" IS NULL")
		}
	case *cmpNode:
		cl := p.class(n.col.name)
		b.WriteByte('(')
		b.WriteString(operand(n.col.name, cl))
		b.WriteString(" " + n.op + " ")
		b.WriteString(sqlLiteral(n.lit))
		b.WriteByte(')')
	case *inNode:
		cl := p.class(n.col.name)
		b.WriteByte('(')
		b.WriteString(operand(n.col.name, cl))
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

func operand(col string, cl class) string {
	id := pgx.Identifier{col}.Sanitize()
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
