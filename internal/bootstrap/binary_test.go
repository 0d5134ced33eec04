package bootstrap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand"
	"strings"
	"testing"
)

// encodeTuple builds one binary COPY tuple; nil fields are NULL.
func encodeTuple(fields ...[]byte) []byte {
	b := binary.BigEndian.AppendUint16(nil, uint16(len(fields)))
	for _, f := range fields {
		if f == nil {
			b = binary.BigEndian.AppendUint32(b, 0xffffffff)
			continue
		}
		b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}

func TestParseTuple(t *testing.T) {
	full := encodeTuple([]byte("ab"), nil, []byte{})
	cases := []struct {
		name    string
		in      []byte
		n       int
		trailer bool
		fields  int
		err     bool
	}{
		{"empty", nil, 0, false, 0, false},
		{"one byte", []byte{0}, 0, false, 0, false},
		{"trailer", []byte{0xff, 0xff}, 2, true, 0, false},
		{"full", full, len(full), false, 3, false},
		{"cut in a length", full[:4], 0, false, 0, false},
		{"cut in a value", full[:7], 0, false, 0, false},
		{"negative count", []byte{0xff, 0xfe}, 0, false, 0, true},
		{"bad length", append([]byte{0, 1}, 0xff, 0xff, 0xff, 0xfe), 0, false, 0, true},
		{"zero fields", []byte{0, 0}, 2, false, 0, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var tp tuple
			n, trailer, err := parseTuple(tc.in, &tp)
			if (err != nil) != tc.err || n != tc.n || trailer != tc.trailer {
				t.Fatalf("parseTuple(%x) = %d, %v, %v; want %d, %v, error %v", tc.in, n, trailer, err, tc.n, tc.trailer, tc.err)
			}
			if err != nil && !errors.Is(err, errCopyFormat) {
				t.Fatalf("parseTuple(%x) error %v does not wrap errCopyFormat", tc.in, err)
			}
			if n > 0 && !trailer && len(tp.fields) != tc.fields {
				t.Fatalf("parseTuple(%x) = %d fields, want %d", tc.in, len(tp.fields), tc.fields)
			}
		})
	}
	var tp tuple
	if _, _, err := parseTuple(full, &tp); err != nil {
		t.Fatal(err)
	}
	if string(tp.fields[0]) != "ab" || tp.fields[1] != nil || tp.fields[2] == nil || len(tp.fields[2]) != 0 {
		t.Fatalf("parseTuple fields = %q, want [ab <nil> \"\"]", tp.fields)
	}
	if !bytes.Equal(tp.raw[tp.starts[1]:], full[8:]) {
		t.Fatalf("starts[1] = %d, want 8", tp.starts[1])
	}
}

func TestParseHeader(t *testing.T) {
	withExt := append(append([]byte{}, copySignature...), 0, 0, 0, 0, 0, 0, 0, 3, 'x', 'y', 'z')
	cases := []struct {
		name string
		in   []byte
		n    int
		err  bool
	}{
		{"ours", copyHeader, len(copyHeader), false},
		{"partial", copyHeader[:5], 0, false},
		{"extension", withExt, len(withExt), false},
		{"extension cut", withExt[:len(withExt)-1], 0, false},
		{"not copy", []byte("hello world, this is text"), 0, true},
		{"short garbage", []byte("XY"), 0, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			n, err := parseHeader(tc.in)
			if (err != nil) != tc.err || n != tc.n {
				t.Fatalf("parseHeader(%q) = %d, %v; want %d, error %v", tc.in, n, err, tc.n, tc.err)
			}
		})
	}
}

// TestSplitterChunks feeds one stream in random chunks and checks every
// tuple arrives once, whole and in order.
func TestSplitterChunks(t *testing.T) {
	rng := rand.New(rand.NewSource(7))
	var stream []byte
	stream = append(stream, copyHeader...)
	var want []string
	for i := 0; i < 200; i++ {
		v := strings.Repeat("v", rng.Intn(40))
		want = append(want, v)
		stream = append(stream, encodeTuple([]byte(v), nil)...)
	}
	stream = append(stream, copyTrailer...)
	for round := 0; round < 20; round++ {
		var got []string
		sp := &splitter{onTuple: func(tp *tuple) error {
			got = append(got, string(tp.fields[0]))
			return nil
		}}
		for rest := stream; len(rest) > 0; {
			n := 1 + rng.Intn(50)
			n = min(n, len(rest))
			if _, err := sp.Write(rest[:n]); err != nil {
				t.Fatalf("round %d: Write: %v", round, err)
			}
			rest = rest[n:]
		}
		if err := sp.done(); err != nil {
			t.Fatalf("round %d: done: %v", round, err)
		}
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Fatalf("round %d: got %d tuples, want %d in order", round, len(got), len(want))
		}
	}
	sp := &splitter{onTuple: func(*tuple) error { return nil }}
	if _, err := sp.Write(stream[:len(stream)-1]); err != nil {
		t.Fatal(err)
	}
	if err := sp.done(); err == nil {
		t.Fatal("done() = nil on a stream without its trailer")
	}
}

func TestConnArgsHidePassword(t *testing.T) {
	cases := []struct {
		dsn, arg string
	}{
		{"host=db port=5432 user=u password=s3cret dbname=app", "host=db port=5432 user=u  dbname=app"},
		{"host=db password='s3 cret' dbname=app", "host=db  dbname=app"},
		{"postgres://u:s3cret@db:5432/app?sslmode=disable", "postgres://u@db:5432/app?sslmode=disable"},
		{"host=db dbname=app", "host=db dbname=app"},
	}
	for _, tc := range cases {
		arg, env, err := connArgs(tc.dsn)
		if err != nil {
			t.Fatalf("connArgs(%q): %v", tc.dsn, err)
		}
		if arg != tc.arg {
			t.Errorf("connArgs(%q) = %q, want %q", tc.dsn, arg, tc.arg)
		}
		if strings.Contains(arg, "s3") {
			t.Errorf("connArgs(%q) leaks the password: %q", tc.dsn, arg)
		}
		if strings.Contains(tc.dsn, "s3") && (len(env) != 1 || !strings.HasPrefix(env[0], "PGPASSWORD=s3")) {
			t.Errorf("connArgs(%q) env = %q, want PGPASSWORD", tc.dsn, env)
		}
	}
}
