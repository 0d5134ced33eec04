package config

import (
	"errors"
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Error is one problem in a configuration file. Load and Validate return
// every problem they find, joined with errors.Join; use errors.As to get the
// first one, or unwrap the joined error to get all of them.
type Error struct {
	File string // the file as given to Load; empty for a Config built in code
	Line int    // 1-based line of the key, 0 when unknown
	Key  string // key path such as peers[1].nodes[0].addr; empty for the whole file
	Msg  string // what is wrong and what to write instead
}

// Error formats the problem as "file:line: key: message".
func (e *Error) Error() string {
	var b strings.Builder
	file := e.File
	if file == "" {
		file = "config"
	}
	b.WriteString(file)
	if e.Line > 0 {
		b.WriteByte(':')
		b.WriteString(strconv.Itoa(e.Line))
	}
	b.WriteString(": ")
	if e.Key != "" {
		b.WriteString(e.Key)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// yamlLine matches the "line N: message" form of yaml.v3 error texts.
func yamlLine() *regexp.Regexp { return regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`) }

// parserProblem reports whether msg is one of the problems yaml.v3's
// parser (not its scanner) reports. yaml.v3 prints the parser's 0-based
// mark as the line ("line 1" for an error on line 2, no line at all on
// line 1), while scanner and decode errors carry 1-based lines; yaml.v3
// has no error type that tells them apart, so the parser's fixed problem
// texts do.
func parserProblem(msg string) bool {
	switch msg {
	case "did not find expected ',' or ']'",
		"did not find expected ',' or '}'",
		"did not find expected '-' indicator",
		"did not find expected <document start>",
		"did not find expected <stream-start>",
		"did not find expected key",
		"did not find expected node content",
		"found duplicate %TAG directive",
		"found duplicate %YAML directive",
		"found incompatible YAML document",
		"found undefined tag handle":
		return true
	}
	return false
}

// fromYAML turns a yaml.v3 parse or decode error into one *Error per
// problem, with the line split out (1-based, see parserProblem).
func fromYAML(file string, err error) []error {
	var msgs []string
	var te *yaml.TypeError
	if errors.As(err, &te) {
		msgs = te.Errors
	} else {
		msgs = []string{err.Error()}
	}
	re := yamlLine()
	out := make([]error, 0, len(msgs))
	for _, m := range msgs {
		m = strings.TrimPrefix(m, "yaml: ")
		e := &Error{File: file, Msg: m}
		if sub := re.FindStringSubmatch(m); sub != nil {
			e.Line, _ = strconv.Atoi(sub[1])
			e.Msg = sub[2]
		}
		if te == nil && parserProblem(e.Msg) {
			e.Line++
		}
		out = append(out, e)
	}
	return out
}

// maskAll joins errs after masking substituted environment values in each
// *Error message.
func maskAll(errs []error, secrets map[string]string) error {
	for _, err := range errs {
		var e *Error
		if errors.As(err, &e) {
			e.Msg = mask(e.Msg, secrets)
			e.Key = mask(e.Key, secrets)
		}
	}
	return errors.Join(errs...)
}
