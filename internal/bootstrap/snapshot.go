package bootstrap

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/prism-cdc/prism-cdc/pkg/apply"
	"github.com/prism-cdc/prism-cdc/pkg/decode"
)

// appName is the application_name of every bootstrap session; appliers
// do not fence origin holders of that name.
const appName = apply.BootstrapApplicationName

// writerParams configure the target sessions that write rows: the final
// commit flushes everything, and foreign keys and user triggers do not
// fire while tables are copied in parallel, as in PostgreSQL's own apply.
var writerParams = map[string]string{
	"synchronous_commit":       "off",
	"session_replication_role": "replica",
}

// originSession is a connection that holds one replication origin.
type originSession struct {
	origin string
	conn   *pgconn.PgConn
}

// dial opens a plain connection as prism_bootstrap; errors hide passwords.
func dial(ctx context.Context, dsn string, params map[string]string) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("bad DSN: %s", redact(err.Error()))
	}
	decode.PinTextForm(cfg)
	cfg.RuntimeParams["application_name"] = appName
	for k, v := range params {
		cfg.RuntimeParams[k] = v
	}
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	conn, err := pgconn.ConnectConfig(cctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("%w: %s", ErrUnreachable, redact(err.Error()))
	}
	return conn, nil
}

// holdOrigin connects and holds origin, creating it when missing. A busy
// origin is waited for; with terminate, its holder (an applier, whose
// transaction simply rolls back and is retried) is terminated instead.
func holdOrigin(ctx context.Context, dsn, origin string, terminate bool, params map[string]string) (*originSession, error) {
	conn, err := dial(ctx, dsn, params)
	if err != nil {
		return nil, fmt.Errorf("hold origin %s: %w", origin, err)
	}
	s := &originSession{origin: origin, conn: conn}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := conn.ExecParams(ctx, "SELECT pg_replication_origin_session_setup($1)", [][]byte{[]byte(origin)}, nil, nil, nil).Close()
		if err == nil {
			return s, nil
		}
		var pgErr *pgconn.PgError
		switch {
		case errors.As(err, &pgErr) && pgErr.Code == "42704":
			_, err := conn.ExecParams(ctx, "SELECT pg_replication_origin_create($1)", [][]byte{[]byte(origin)}, nil, nil, nil).Close()
			if err != nil && !isCode(err, "42710") && !isCode(err, "23505") {
				conn.Close(context.Background())
				return nil, fmt.Errorf("create origin %s: %w", origin, err)
			}
			continue
		case errors.As(err, &pgErr) && pgErr.Code == "55006":
			if time.Now().After(deadline) {
				conn.Close(context.Background())
				return nil, fmt.Errorf("hold origin %s: still busy after 30s: %w", origin, err)
			}
			pause := 50 * time.Millisecond
			if pid, ok := apply.OriginHolder(err); terminate && ok {
				// Without a timeout, so the origin is tried again the
				// moment the holder is gone: a busy applier reconnects
				// and holds it again within a few milliseconds, and
				// pg_terminate_backend's own wait (100 ms steps) lost
				// that race for minutes. Appliers do not fence a
				// bootstrap session (application_name), so once held
				// the origin stays held.
				res := conn.ExecParams(ctx, "SELECT pg_terminate_backend($1::int)", [][]byte{[]byte(strconv.Itoa(pid))}, nil, nil, nil).Read()
				if res.Err == nil && len(res.Rows) == 1 && string(res.Rows[0][0]) == "t" {
					pause = time.Millisecond
				}
			}
			select {
			case <-ctx.Done():
				conn.Close(context.Background())
				return nil, ctx.Err()
			case <-time.After(pause):
			}
		default:
			conn.Close(context.Background())
			return nil, fmt.Errorf("hold origin %s: %w", origin, err)
		}
	}
}

// progress returns the held origin's durable progress.
func (s *originSession) progress(ctx context.Context) (pglogrepl.LSN, error) {
	res := s.conn.ExecParams(ctx, "SELECT pg_replication_origin_session_progress(true)::text", nil, nil, nil, nil).Read()
	if err := res.Err; err != nil {
		return 0, fmt.Errorf("progress of origin %s: %w", s.origin, err)
	}
	if len(res.Rows) != 1 || res.Rows[0][0] == nil {
		return 0, nil
	}
	lsn, err := pglogrepl.ParseLSN(string(res.Rows[0][0]))
	if err != nil {
		return 0, fmt.Errorf("progress of origin %s: %w", s.origin, err)
	}
	return lsn, nil
}

// held reports whether the session is alive and still holds its origin:
// then it held it without a break since holdOrigin returned.
func (s *originSession) held(ctx context.Context) bool {
	res := s.conn.ExecParams(ctx, "SELECT pg_replication_origin_session_is_setup()", nil, nil, nil, nil).Read()
	return res.Err == nil && len(res.Rows) == 1 && string(res.Rows[0][0]) == "t"
}

// setProgress releases the origin and sets its progress to lsn (backwards
// too); 0 leaves it at 0/0.
func (s *originSession) setProgress(ctx context.Context, lsn pglogrepl.LSN) error {
	if _, err := s.conn.Exec(ctx, "SELECT pg_replication_origin_session_reset()").ReadAll(); err != nil {
		return fmt.Errorf("release origin %s: %w", s.origin, err)
	}
	if _, err := s.conn.ExecParams(ctx, "SELECT pg_replication_origin_advance($1, $2::pg_lsn)",
		[][]byte{[]byte(s.origin), []byte(lsn.String())}, nil, nil, nil).Close(); err != nil {
		return fmt.Errorf("set origin %s to %s: %w", s.origin, lsn, err)
	}
	return nil
}

func (s *originSession) close() {
	s.conn.Close(context.Background())
}

// snapshot is an exported snapshot of the source with the positions it
// corresponds to.
type snapshot struct {
	name     string
	lsn      pglogrepl.LSN            // consistent point of the temporary slot
	progress map[string]pglogrepl.LSN // the source's origin progress per other region
	repl     *pgconn.PgConn           // keeps the snapshot (and the temporary slot) alive
}

// close ends the snapshot: the temporary slot goes with the connection.
// Transactions that imported the snapshot keep it.
func (s *snapshot) close() {
	if s.repl != nil {
		s.repl.Close(context.Background())
		s.repl = nil
	}
}

// takeSnapshot creates a temporary logical slot on the source exporting
// its snapshot. Until close, the replication connection must run nothing
// else, so that importers can use the snapshot.
func takeSnapshot(ctx context.Context, dsn, target string) (*snapshot, error) {
	repl, err := dial(ctx, dsn, map[string]string{"replication": "database"})
	if err != nil {
		return nil, fmt.Errorf("bootstrap: source replication connection: %w", err)
	}
	slot := decode.SlotName(fmt.Sprintf("bootstrap_%s_%d", slotSafe(target), time.Now().UnixNano()%1000000000))
	res, err := pglogrepl.CreateReplicationSlot(ctx, repl, slot, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Temporary: true, SnapshotAction: "EXPORT_SNAPSHOT"})
	if err != nil {
		repl.Close(context.Background())
		return nil, fmt.Errorf("bootstrap: source: create temporary slot: %w", err)
	}
	lsn, err := pglogrepl.ParseLSN(res.ConsistentPoint)
	if err != nil {
		repl.Close(context.Background())
		return nil, fmt.Errorf("bootstrap: source: consistent point %q: %w", res.ConsistentPoint, err)
	}
	return &snapshot{name: res.SnapshotName, lsn: lsn, repl: repl, progress: map[string]pglogrepl.LSN{}}, nil
}

// originsAt takes the snapshot (takeSnapshot) while it holds, on the
// source, the origin prism_X of every other region X, and records their
// progress then: no applier of X can commit on the source between the
// snapshot and the reading, so the snapshot holds exactly the X
// transactions up to it. A busy applier holding an origin is terminated
// (its open transaction rolls back and is applied again later), and
// appliers do not fence a session named prism_bootstrap back. The origins
// are let go as soon as the snapshot is taken: the source's appliers of
// the other regions wait for that (CREATE_REPLICATION_SLOT waits for the
// transactions running on the source to end), not for the copy.
//
// The progress cannot be read from the WAL after the snapshot instead
// (the first X transaction after the consistent point, minus one): a
// transaction the source applied may be a batch of several X
// transactions that carries the origin LSN of its last one only.
func originsAt(ctx context.Context, dsn, target string, others []string) (*snapshot, error) {
	held := make([]*originSession, 0, len(others))
	defer func() {
		for _, g := range held {
			g.close()
		}
	}()
	for _, r := range others {
		var g *originSession
		var err error
		for attempt := 1; ; attempt++ {
			g, err = holdOrigin(ctx, dsn, decode.OriginName(r), true, nil)
			if err == nil || attempt == 5 || ctx.Err() != nil {
				break
			}
		}
		if err != nil {
			return nil, fmt.Errorf("bootstrap: source: %w", err)
		}
		held = append(held, g)
	}
	snap, err := takeSnapshot(ctx, dsn, target)
	if err != nil {
		return nil, err
	}
	for i, r := range others {
		p, err := held[i].progress(ctx)
		if err != nil {
			snap.close()
			return nil, fmt.Errorf("bootstrap: source: %w", err)
		}
		snap.progress[r] = p
	}
	return snap, nil
}

func slotSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_' {
			return r
		}
		if r >= 'A' && r <= 'Z' {
			return r + ('a' - 'A')
		}
		return '_'
	}, s)
}
