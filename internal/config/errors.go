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

// fromYAML turns a yaml.v3 parse or decode error into one *Error per
// problem, with the line split out.
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
