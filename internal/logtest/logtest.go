// Package logtest checks the JSON log lines tests produce: every line is
// one JSON object, and no object repeats a key. encoding/json keeps the
// last of two equal keys without a word, and zerolog appends a field even
// when a parent logger already carries it ("node":"us1",...,"node":"eu1"),
// which mislabels the line in every reader of it.
package logtest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
)

// maxReported bounds how many bad lines one test reports.
const maxReported = 5

// Writer passes log output on to its destination and checks each complete
// line. A test fails, when it ends, with the lines that were not a JSON
// object or repeated a key.
type Writer struct {
	t  testing.TB
	to io.Writer

	mu      sync.Mutex
	partial []byte   // an incomplete last line, until its newline arrives
	bad     []string // problems, at most maxReported
	nbad    int
}

// New returns a Writer that writes to w (nil for nowhere) and reports to t
// in t.Cleanup, so register it before anything that logs to it starts:
// cleanups run last-registered first.
func New(t testing.TB, w io.Writer) *Writer {
	c := &Writer{t: t, to: w}
	t.Cleanup(c.report)
	return c
}

// Write implements io.Writer; zerolog writes one whole line per call.
func (c *Writer) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.partial = append(c.partial, p...)
	for {
		i := bytes.IndexByte(c.partial, '\n')
		if i < 0 {
			break
		}
		if msg := Check(c.partial[:i]); msg != "" {
			c.nbad++
			if len(c.bad) < maxReported {
				c.bad = append(c.bad, msg)
			}
		}
		c.partial = c.partial[i+1:]
	}
	c.mu.Unlock()
	if c.to == nil {
		return len(p), nil
	}
	return c.to.Write(p)
}

func (c *Writer) report() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.nbad > 0 {
		c.t.Errorf("%d bad log lines, the first ones:\n%s", c.nbad, strings.Join(c.bad, "\n"))
	}
}

// CheckFile checks a log file with CheckOutput.
func CheckFile(t testing.TB, path string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		if !os.IsNotExist(err) {
			t.Errorf("check log %s: %v", path, err)
		}
		return
	}
	CheckOutput(t, path, data)
}

// CheckOutput checks every complete line of a program's output that
// starts with "{" (other lines, such as a Go panic or a message for the
// operator, are not log lines; an incomplete last line is from a killed
// process) and fails t with the bad ones; name says whose output it is.
func CheckOutput(t testing.TB, name string, data []byte) {
	t.Helper()
	var bad []string
	n := 0
	for {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			break
		}
		line := data[:i]
		data = data[i+1:]
		if !bytes.HasPrefix(line, []byte("{")) {
			continue
		}
		if msg := Check(line); msg != "" {
			n++
			if len(bad) < maxReported {
				bad = append(bad, msg)
			}
		}
	}
	if n > 0 {
		t.Errorf("%s: %d bad log lines, the first ones:\n%s", name, n, strings.Join(bad, "\n"))
	}
}

// Check returns what is wrong with one log line ("" when nothing): not
// one JSON object, or an object (at any depth) with a key twice.
func Check(line []byte) string {
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		return fmt.Sprintf("not a JSON object: %s", line)
	}
	dups, err := object(dec, "")
	if err == nil && dec.More() {
		err = fmt.Errorf("data after the object")
	}
	if err != nil {
		return fmt.Sprintf("not a JSON object (%v): %s", err, line)
	}
	if len(dups) > 0 {
		return fmt.Sprintf("key %s twice: %s", strings.Join(dups, ", "), line)
	}
	return ""
}

// object reads the rest of an object whose '{' was read and returns the
// paths of the keys it (or an object inside it) repeats.
func object(dec *json.Decoder, path string) ([]string, error) {
	var dups []string
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("key %v is not a string", tok)
		}
		if seen[key] {
			dups = append(dups, fmt.Sprintf("%q", path+key))
		}
		seen[key] = true
		d, err := value(dec, path+key+".")
		if err != nil {
			return nil, err
		}
		dups = append(dups, d...)
	}
	_, err := dec.Token() // '}'
	return dups, err
}

// value reads one value and returns the repeated keys of the objects in it.
func value(dec *json.Decoder, path string) ([]string, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch tok {
	case json.Delim('{'):
		return object(dec, path)
	case json.Delim('['):
		var dups []string
		for dec.More() {
			d, err := value(dec, path)
			if err != nil {
				return nil, err
			}
			dups = append(dups, d...)
		}
		_, err := dec.Token() // ']'
		return dups, err
	}
	return nil, nil
}
