package apply

import (
	"testing"

	"github.com/prism-cdc/prism-cdc/internal/pgtest"
	"github.com/prism-cdc/prism-cdc/internal/rawconn"
)

// TestPoolConnsRaw: the pool's connections read and write their sockets
// with raw system calls (see rawconn), and work.
func TestPoolConnsRaw(t *testing.T) {
	ctx := testCtx(t)
	c := pgtest.Start(t, pgtest.Options{Name: "pool"})
	pool := newPool(t, ctx, c, "postgres")
	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	nc := conn.Conn().PgConn().Conn()
	if _, ok := nc.(*rawconn.Conn); !ok {
		t.Fatalf("a pool connection's socket is a %T, want a *rawconn.Conn", nc)
	}
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM generate_series(1, 100000) g, repeat('x', 10) r WHERE r <> ''").Scan(&n); err != nil || n != 100000 {
		t.Fatalf("query = %d, %v", n, err)
	}
}
