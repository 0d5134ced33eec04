package bootstrap

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"
)

// appName is the application_name of every bootstrap session.
const appName = "prism_bootstrap"

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

var busyPID = regexp.MustCompile(`PID (\d+)`)

// dial opens a plain connection as prism_bootstrap; errors hide passwords.
func dial(ctx context.Context, dsn string, params map[string]string) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("bad DSN: %s", redact(err.Error()))
	}
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
			if m := busyPID.FindStringSubmatch(pgErr.Message); terminate && m != nil {
				if pid, err := strconv.Atoi(m[1]); err == nil {
					_, _ = conn.ExecParams(ctx, "SELECT pg_terminate_backend($1::int, 5000)", [][]byte{[]byte(strconv.Itoa(pid))}, nil, nil, nil).Close()
				}
			}
			select {
			case <-ctx.Done():
				conn.Close(context.Background())
				return nil, ctx.Err()
			case <-time.After(50 * time.Millisecond):
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

// takeSnapshot holds the source's origins of the other regions, reads
// their progress, creates a temporary logical slot exporting its snapshot,
// and checks that no origin was lost meanwhile (else it starts over).
func takeSnapshot(ctx context.Context, dsn, target string, others []string, log zerolog.Logger) (*snapshot, error) {
	var lastErr error
	for attempt := 1; attempt <= 5; attempt++ {
		snap, err := trySnapshot(ctx, dsn, target, others, attempt)
		if err == nil {
			return snap, nil
		}
		if ctx.Err() != nil || !errors.Is(err, errGuardLost) {
			return nil, err
		}
		lastErr = err
		log.Warn().Err(err).Int("attempt", attempt).Msg("snapshot not consistent with the origins; taking it again")
	}
	return nil, lastErr
}

var errGuardLost = errors.New("a source origin was released while the snapshot was taken")

func trySnapshot(ctx context.Context, dsn, target string, others []string, attempt int) (*snapshot, error) {
	var guards []*originSession
	defer func() {
		for _, g := range guards {
			g.close()
		}
	}()
	snap := &snapshot{progress: map[string]pglogrepl.LSN{}}
	for _, r := range others {
		g, err := holdOrigin(ctx, dsn, originName(r), false, nil)
		if err != nil {
			return nil, fmt.Errorf("bootstrap: source: %w", err)
		}
		guards = append(guards, g)
		lsn, err := g.progress(ctx)
		if err != nil {
			return nil, fmt.Errorf("bootstrap: source: %w", err)
		}
		snap.progress[r] = lsn
	}
	repl, err := dial(ctx, dsn, map[string]string{"replication": "database"})
	if err != nil {
		return nil, fmt.Errorf("bootstrap: source replication connection: %w", err)
	}
	slot := fmt.Sprintf("prism_bootstrap_%s_%d_%d", slotSafe(target), time.Now().UnixNano()%1000000, attempt)
	res, err := pglogrepl.CreateReplicationSlot(ctx, repl, slot, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Temporary: true, SnapshotAction: "EXPORT_SNAPSHOT"})
	if err != nil {
		repl.Close(context.Background())
		return nil, fmt.Errorf("bootstrap: source: create temporary slot: %w", err)
	}
	for _, g := range guards {
		if !g.held(ctx) {
			repl.Close(context.Background())
			return nil, fmt.Errorf("%w (%s)", errGuardLost, g.origin)
		}
	}
	snap.lsn, err = pglogrepl.ParseLSN(res.ConsistentPoint)
	if err != nil {
		repl.Close(context.Background())
		return nil, fmt.Errorf("bootstrap: source: consistent point %q: %w", res.ConsistentPoint, err)
	}
	snap.name = res.SnapshotName
	snap.repl = repl
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
