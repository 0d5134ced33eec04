package apply

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
)

// TestRetryRule: one rule decides whether a failure is retried. A SQLSTATE
// is retried exactly when RetryableState lists it; an error without one
// that does not say otherwise came from the connection or the context and
// is retried; what the applier finds itself is permanent.
func TestRetryRule(t *testing.T) {
	pg := func(code string) error { return &pgconn.PgError{Code: code, Message: "m"} }
	for _, tc := range []struct {
		name  string
		err   error
		state string
		retry bool
	}{
		{"serialization failure", pg("40001"), "40001", true},
		{"deadlock", pg("40P01"), "40P01", true},
		{"statement completion unknown", pg("40003"), "40003", true},
		{"connection failure", pg("08006"), "08006", true},
		{"too many connections", pg("53300"), "53300", true},
		{"disk full", pg("53100"), "53100", true},
		{"origin in use", pg("55006"), "55006", true},
		{"lock not available", pg("55P03"), "55P03", true},
		{"query canceled", pg("57014"), "57014", true},
		{"admin shutdown", pg("57P01"), "57P01", true},
		{"idle in transaction timeout", pg("25P03"), "25P03", true},
		{"io error", pg("58030"), "58030", true},
		{"database dropped", pg("57P04"), "57P04", false},
		{"undefined file", pg("58P01"), "58P01", false},
		{"unique violation", pg("23505"), "23505", false},
		{"no unique index for on conflict", pg("42P10"), "42P10", false},
		{"undefined column", pg("42703"), "42703", false},
		{"table without replica identity", pg("55000"), "55000", false},
		{"wrapped server error", fmt.Errorf("apply: %w", pg("40001")), "40001", true},
		{"busy origin", fmt.Errorf("%w: %w", ErrBusy, pg("55006")), "55006", true},
		{"applier's own finding", permanent("PR001", "no key"), "PR001", false},
		{"unexpected EOF", io.ErrUnexpectedEOF, "", true},
		{"refused connection", &net.OpError{Op: "dial", Err: errors.New("connection refused")}, "", true},
		{"deadline", context.DeadlineExceeded, "", true},
		{"unclassified", errors.New("something else"), "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state, retry := classify(tc.err)
			if state != tc.state || retry != tc.retry {
				t.Errorf("classify(%v) = %q, %v, want %q, %v", tc.err, state, retry, tc.state, tc.retry)
			}
			if got := IsRetryable(tc.err); got != tc.retry {
				t.Errorf("IsRetryable(%v) = %v, want %v", tc.err, got, tc.retry)
			}
			if state != "" && tc.err != nil {
				if _, isPg := tc.err.(*pgconn.PgError); isPg && RetryableState(state) != tc.retry {
					t.Errorf("RetryableState(%s) = %v, want %v", state, !tc.retry, tc.retry)
				}
			}
		})
	}
	if IsRetryable(nil) {
		t.Errorf("IsRetryable(nil) = true, want false")
	}
	for _, code := range []string{"", "4", "40", "0800", "080000"} {
		if RetryableState(code) {
			t.Errorf("RetryableState(%q) = true, want false", code)
		}
	}
}

// TestOriginHolder: the holder's PID comes only from a busy-origin error.
func TestOriginHolder(t *testing.T) {
	busy := func(msg string) error { return &pgconn.PgError{Code: "55006", Message: msg} }
	for _, tc := range []struct {
		name string
		err  error
		pid  int
		ok   bool
	}{
		{"busy", busy("replication origin with ID 1 is already active for PID 4242"), 4242, true},
		{"wrapped", fmt.Errorf("%w: %w", ErrBusy, busy("replication origin with ID 3 is already active for PID 7")), 7, true},
		{"no pid", busy("replication origin busy"), 0, false},
		{"no digits", busy("already active for PID x"), 0, false},
		{"other code", &pgconn.PgError{Code: "42704", Message: "is already active for PID 12"}, 0, false},
		{"not a server error", errors.New("is already active for PID 12"), 0, false},
		// PostgreSQL 15's own translations of the message (lc_messages),
		// from its message catalogs, with ID 1 and PID 4242.
		{"de", busy("Replication-Origin mit ID 1 ist bereits aktiv für PID 4242"), 4242, true},
		{"es", busy("el origen de replicación con ID 1 ya está activo para el PID 4242"), 4242, true},
		{"ja", busy("ID1のレプリケーション基点は既にPID 4242で使用中です"), 4242, true},
		{"ru", busy("источник репликации с ID 1 уже занят процессом с PID 4242"), 4242, true},
		{"zh_CN", busy("OID为1的复制源头已经被用于PID 4242"), 4242, true},
		// Worded otherwise: no PID rather than a wrong one.
		{"ka", busy("რეპლიკაციის წყარო ID-ით 1 უკვე აქტიურია PID-სთვის 4242"), 0, false},
		{"ko", busy("1 ID의 복제 오리진이 4242 PID 프로세스가 사용중입니다."), 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pid, ok := OriginHolder(tc.err)
			if pid != tc.pid || ok != tc.ok {
				t.Errorf("OriginHolder(%v) = %d, %v, want %d, %v", tc.err, pid, ok, tc.pid, tc.ok)
			}
		})
	}
}

// TestLSNText: lsnText writes what pglogrepl.LSN.String does.
func TestLSNText(t *testing.T) {
	for _, v := range []uint64{0, 1, 0xA, 0xFFFFFFFF, 0x100000000, 0x16B3748, 0xDEADBEEF00C0FFEE, ^uint64(0)} {
		l := pglogrepl.LSN(v)
		if got, want := string(lsnText(l)), l.String(); got != want {
			t.Errorf("lsnText(%#x) = %q, want %q", v, got, want)
		}
	}
}
