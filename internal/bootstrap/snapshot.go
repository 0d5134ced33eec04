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
	"github.com/jackc/pgx/v5/pgproto3"

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
	slot     string
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
// else: importers use the snapshot first, then resolveOrigins.
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
	return &snapshot{name: res.SnapshotName, slot: slot, lsn: lsn, repl: repl, progress: map[string]pglogrepl.LSN{}}, nil
}

// markerPrefix prefixes the logical message that ends resolveOrigins'
// decoding; a node's reader drops messages of any prefix but its own
// (decode.FloorPrefix, decode.DDLPrefix), and this one is not
// transactional.
const markerPrefix = appName

// resolveOrigins finds, for every other region X, the source's progress of
// origin prism_X as of the snapshot. The progress is not MVCC, so it is
// derived from the WAL: each transaction the source applied from X carries
// an Origin message with X's end LSN. After the snapshot was imported:
//
//  1. hold prism_X on the source for a moment and read its progress P:
//     the hold waits out an applier between its commit record and the
//     progress update, so every X transaction at or below P has its commit
//     record in the WAL now;
//  2. emit a marker message, and decode the temporary slot from the
//     consistent point L to the marker;
//  3. if an X transaction follows L, the first one (origin LSN o) is the
//     first one not in the snapshot, and every earlier one is in it: the
//     progress as of the snapshot is o-1. Otherwise none of X's commits
//     lies between L and the marker, so the snapshot holds exactly those
//     at or below P.
//
// Empty transactions are not decoded by pgoutput; skipping or applying one
// changes nothing. It must be called after every importer has set its
// snapshot, and ends the exported snapshot.
func (s *snapshot) resolveOrigins(ctx context.Context, dsn, pub string, others []string) error {
	held := map[string]pglogrepl.LSN{}
	for _, r := range others {
		var lsn pglogrepl.LSN
		var err error
		for attempt := 1; ; attempt++ {
			lsn, err = readHeld(ctx, dsn, decode.OriginName(r))
			if err == nil || attempt == 5 || ctx.Err() != nil {
				break
			}
		}
		if err != nil {
			return fmt.Errorf("bootstrap: source: %w", err)
		}
		held[r] = lsn
	}
	token := fmt.Sprintf("%s %d", s.slot, time.Now().UnixNano())
	mconn, err := dial(ctx, dsn, nil)
	if err != nil {
		return fmt.Errorf("bootstrap: source: %w", err)
	}
	_, err = mconn.ExecParams(ctx, "SELECT pg_logical_emit_message(false, $1, $2)", [][]byte{[]byte(markerPrefix), []byte(token)}, nil, nil, nil).Close()
	mconn.Close(context.Background())
	if err != nil {
		return fmt.Errorf("bootstrap: source: emit marker: %w", err)
	}
	first, err := s.decodeOrigins(ctx, pub, token)
	if err != nil {
		return err
	}
	for _, r := range others {
		if o, ok := first[decode.OriginName(r)]; ok && o > 0 {
			s.progress[r] = o - 1
		} else {
			s.progress[r] = held[r]
		}
	}
	return nil
}

// readHeld holds origin on the source just long enough to read its
// progress; an origin that does not exist has progress 0. A node of the
// source region keeps the origin while its stream is busy, so the holder
// is terminated (its open apply transaction rolls back and is applied
// again after the read).
func readHeld(ctx context.Context, dsn, origin string) (pglogrepl.LSN, error) {
	g, err := holdOrigin(ctx, dsn, origin, true, nil)
	if err != nil {
		return 0, err
	}
	defer g.close()
	return g.progress(ctx)
}

// decodeOrigins streams the temporary slot from the consistent point to
// the marker and returns the origin LSN of the first transaction of each
// origin.
func (s *snapshot) decodeOrigins(ctx context.Context, pub, token string) (map[string]pglogrepl.LSN, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	err := pglogrepl.StartReplication(ctx, s.repl, s.slot, s.lsn, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names '" + strings.ReplaceAll(pub, "'", "''") + "'", "messages 'true'"},
	})
	if err != nil {
		return nil, fmt.Errorf("bootstrap: source: decode temporary slot: %w", err)
	}
	first := map[string]pglogrepl.LSN{}
	for {
		msg, err := s.repl.ReceiveMessage(ctx)
		if err != nil {
			return nil, fmt.Errorf("bootstrap: source: decode temporary slot: %w", err)
		}
		cd, ok := msg.(*pgproto3.CopyData)
		if !ok {
			if e, ok := msg.(*pgproto3.ErrorResponse); ok {
				return nil, fmt.Errorf("bootstrap: source: decode temporary slot: %w", pgconn.ErrorResponseToPgError(e))
			}
			continue
		}
		if len(cd.Data) == 0 {
			continue
		}
		switch cd.Data[0] {
		case pglogrepl.PrimaryKeepaliveMessageByteID:
			ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
			if err == nil && ka.ReplyRequested {
				_ = pglogrepl.SendStandbyStatusUpdate(ctx, s.repl, pglogrepl.StandbyStatusUpdate{
					WALWritePosition: s.lsn, WALFlushPosition: s.lsn, WALApplyPosition: s.lsn})
			}
		case pglogrepl.XLogDataByteID:
			xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
			if err != nil {
				return nil, fmt.Errorf("bootstrap: source: decode temporary slot: %w", err)
			}
			m, err := pglogrepl.Parse(xld.WALData)
			if err != nil {
				// Only Origin and the marker matter here.
				continue
			}
			switch m := m.(type) {
			case *pglogrepl.OriginMessage:
				if _, seen := first[m.Name]; !seen {
					first[m.Name] = m.CommitLSN
				}
			case *pglogrepl.LogicalDecodingMessage:
				if m.Prefix == markerPrefix && string(m.Content) == token {
					return first, nil
				}
			}
		}
	}
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
