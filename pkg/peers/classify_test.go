package peers

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// TestClassify: the peers side takes an apply error's own word
// (Temporary()) and retries an error that does not give one, as apply
// does; it keeps no table of SQLSTATEs of its own.
func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		name  string
		err   error
		state string
		retry bool
	}{
		{"temporary", &testErr{code: "40001", temp: true}, "40001", true},
		{"permanent", &testErr{code: "23505"}, "23505", false},
		{"wrapped permanent", fmt.Errorf("apply: %w", &testErr{code: "42P10"}), "42P10", false},
		{"permanent without a SQLSTATE", &testErr{}, "", false},
		{"server error without a verdict", &pgconn.PgError{Code: "23505"}, "23505", true},
		{"refused connection", &net.OpError{Op: "dial", Err: errors.New("connection refused")}, "", true},
		{"unexpected EOF", io.ErrUnexpectedEOF, "", true},
		{"deadline", context.DeadlineExceeded, "", true},
		{"unclassified", errors.New("something else"), "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state, retry := classify(tc.err)
			if state != tc.state || retry != tc.retry {
				t.Errorf("classify(%v) = %q, %v, want %q, %v", tc.err, state, retry, tc.state, tc.retry)
			}
		})
	}
}
