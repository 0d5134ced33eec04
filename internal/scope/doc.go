// Package scope decides what one target region may receive (data
// residency): tables it never gets, rows outside a row filter, and
// columns whose values it never gets.
//
// A row filter is a small expression over the row's own columns (Parse):
// comparisons of a column with a literal, IN lists, IS [NOT] NULL, AND,
// OR, NOT and parentheses. Bind types it against a table's columns;
// values then compare by the column's type: numbers numerically, text
// byte by byte (collation "C"), booleans as booleans, other types by their
// text form (equality only). Logic is SQL's: a comparison with NULL is
// unknown, and only a true filter lets a row through.
//
// Scope.Txn filters one source transaction for one target, on the source
// node, before anything is encoded for that target:
//
//  1. changes to excluded tables are dropped, TRUNCATE included;
//  2. row changes are kept, dropped or turned into an INSERT or a DELETE
//     when an UPDATE moves a row into or out of the scope (see
//     relScope.transition), as PostgreSQL's publication row filters do;
//  3. excluded columns are removed from the relation and the rows.
//
// The source transaction is never modified: every target shares it. A
// transaction left without changes is still shipped, empty, so that the
// target's progress passes its LSN. A spilled transaction is filtered
// chunk by chunk (decode.Spill.Filtered), so memory stays bounded.
package scope
