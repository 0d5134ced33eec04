package apply

import (
	"errors"
	"strings"
	"testing"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

func TestRows(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "rows"})
	mustExec(t, ctx, c, "postgres", `
		CREATE TABLE items (id int PRIMARY KEY, name text, qty int, note text);
		CREATE TABLE reordered (note text, id int PRIMARY KEY, extra int DEFAULT 7, name text);
		CREATE TABLE full_t (a int, b text);
		ALTER TABLE full_t REPLICA IDENTITY FULL;
		CREATE TABLE nokey (a int, b text);
		CREATE TABLE big (id int PRIMARY KEY, body text, n int);
		CREATE TABLE t1 (id serial PRIMARY KEY, v text);
		CREATE TABLE t2 (id int PRIMARY KEY, t1 int REFERENCES t1(id));
		CREATE TABLE t3 (id int);
		CREATE TABLE missing_col (id int PRIMARY KEY);
	`)
	a := newApplier(t, ctx, c, "postgres", WithLocalRegion("eu"))
	pool := a.pool
	items := rel("public", "items", decode.IdentityDefault, "id*", "name", "qty", "note")
	lsn := uint64(1000)
	apply := func(changes ...decode.Change) error {
		t.Helper()
		lsn += 100
		return a.Apply(ctx, txn("na", lsn, float64(lsn), changes...))
	}
	mustApply := func(changes ...decode.Change) {
		t.Helper()
		if err := apply(changes...); err != nil {
			t.Fatalf("Apply: %v", err)
		}
	}
	check := func(table, want string) {
		t.Helper()
		if got := tableRows(t, ctx, pool, table); got != want {
			t.Fatalf("%s rows:\n%s\nwant:\n%s", table, got, want)
		}
	}

	t.Run("insert update delete", func(t *testing.T) {
		mustApply(ins(items, "1", "apple", "3", `\N`), ins(items, "2", "pear", "5", "it's"))
		check("items", `{"id":1,"name":"apple","qty":3,"note":null}`+"\n"+`{"id":2,"name":"pear","qty":5,"note":"it's"}`)
		mustApply(upd(items, nil, "1", "apple", "4", "ripe"), del(items, "2", `\N`, `\N`, `\N`))
		check("items", `{"id":1,"name":"apple","qty":4,"note":"ripe"}`)
		// Key change: the old key arrives in Old.
		mustApply(upd(items, vals("1", `\N`, `\N`, `\N`), "10", "apple", "4", "moved"))
		check("items", `{"id":10,"name":"apple","qty":4,"note":"moved"}`)
	})

	t.Run("column order differs", func(t *testing.T) {
		r := rel("public", "reordered", decode.IdentityDefault, "id*", "name", "note")
		mustApply(ins(r, "1", "x", "n1"))
		mustApply(upd(r, nil, "1", "y", `\U`))
		check("reordered", `{"note":"n1","id":1,"extra":7,"name":"y"}`)
	})

	t.Run("toast unchanged survives", func(t *testing.T) {
		r := rel("public", "big", decode.IdentityDefault, "id*", "body", "n")
		body := strings.Repeat("prism-", 200<<10/6)
		mustApply(ins(r, "1", body, "1"))
		mustApply(upd(r, nil, "1", `\U`, "2"))
		got := queryString(t, ctx, pool, "SELECT md5(body) || ' ' || length(body) || ' ' || n FROM big WHERE id = 1")
		want := queryString(t, ctx, pool, "SELECT md5($1::text) || ' ' || length($1::text) || ' 2'", body)
		if got != want {
			t.Fatalf("big row = %s, want %s", got, want)
		}
	})

	t.Run("replica identity full duplicates", func(t *testing.T) {
		r := rel("public", "full_t", decode.IdentityFull, "a", "b")
		mustApply(ins(r, "1", "dup"), ins(r, "1", "dup"), ins(r, "2", `\N`))
		mustApply(del(r, "1", "dup"))
		check("full_t", `{"a":1,"b":"dup"}`+"\n"+`{"a":2,"b":null}`)
		mustApply(upd(r, vals("2", `\N`), "2", "two"))
		check("full_t", `{"a":1,"b":"dup"}`+"\n"+`{"a":2,"b":"two"}`)
		mustApply(upd(r, vals("1", "dup"), "3", "three"))
		check("full_t", `{"a":2,"b":"two"}`+"\n"+`{"a":3,"b":"three"}`)
	})

	t.Run("table without key", func(t *testing.T) {
		r := rel("public", "nokey", decode.IdentityNothing, "a", "b")
		mustApply(ins(r, "1", "x"))
		err := apply(del(r, "1", "x"))
		var ae *Error
		if !errors.As(err, &ae) || ae.Retryable || ae.Table != "public.nokey" || ae.Op != decode.OpDelete || !strings.Contains(err.Error(), "public.nokey") {
			t.Fatalf("delete without key: err = %#v (%v), want permanent error naming public.nokey", err, err)
		}
	})

	t.Run("key on the source only", func(t *testing.T) {
		r := rel("public", "nokey", decode.IdentityDefault, "a*", "b")
		err := apply(ins(r, "5", "x"))
		var ae *Error
		if !errors.As(err, &ae) || ae.Retryable || ae.SQLState != "42P10" || !strings.Contains(err.Error(), "give the table in this region the same primary key") {
			t.Fatalf("insert by a key the target lacks: err = %#v (%v), want permanent 42P10 telling to add the key", err, err)
		}
	})

	t.Run("missing column", func(t *testing.T) {
		r := rel("public", "missing_col", decode.IdentityDefault, "id*", "ghost")
		err := apply(ins(r, "1", "boo"))
		var ae *Error
		if !errors.As(err, &ae) || ae.Retryable || ae.SQLState != "42703" || !strings.Contains(err.Error(), `"ghost"`) || !strings.Contains(err.Error(), "public.missing_col") {
			t.Fatalf("missing column: err = %v, want permanent 42703 naming ghost and public.missing_col", err)
		}
		// The failed transaction left nothing behind, and the next one
		// (a different table) applies.
		check("missing_col", "")
		mustApply(ins(items, "20", "later", "1", `\N`))
	})

	t.Run("truncate several tables", func(t *testing.T) {
		mustExec(t, ctx, c, "postgres", "INSERT INTO t1 (v) VALUES ('a'), ('b'); INSERT INTO t2 VALUES (1, 1); INSERT INTO t3 VALUES (1)")
		r1 := rel("public", "t1", decode.IdentityDefault, "id*", "v")
		r3 := rel("public", "t3", decode.IdentityDefault, "id")
		mustApply(decode.Change{Op: decode.OpTruncate, Rel: r1, Truncated: []*decode.Relation{r1, r3},
			TruncateFlags: decode.TruncateCascade | decode.TruncateRestartIdentity})
		for _, tb := range []string{"t1", "t2", "t3"} {
			check(tb, "")
		}
		mustExec(t, ctx, c, "postgres", "INSERT INTO t1 (v) VALUES ('c')")
		check("t1", `{"id":1,"v":"c"}`)
	})
}
