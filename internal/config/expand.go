package config

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
)

// expand replaces ${VAR} with the value lookup returns for VAR and $$ with a
// single $. Any other $ is kept as written. Lines whose first non-blank
// character is # are comments and are left alone, so a commented-out line
// does not need its variables set.
//
// It returns the expanded text, the substituted values (so they can be
// masked in error messages) and one *Error per unset variable or malformed
// reference.
func expand(file string, data []byte, lookup func(string) (string, bool)) ([]byte, map[string]string, []error) {
	var (
		out     bytes.Buffer
		secrets = map[string]string{}
		errs    []error
	)
	out.Grow(len(data))
	for lineNo, line := range bytes.SplitAfter(data, []byte("\n")) {
		if t := bytes.TrimLeft(line, " \t"); len(t) > 0 && t[0] == '#' {
			out.Write(line)
			continue
		}
		for i := 0; i < len(line); i++ {
			c := line[i]
			if c != '$' || i+1 >= len(line) {
				out.WriteByte(c)
				continue
			}
			switch line[i+1] {
			case '$':
				out.WriteByte('$')
				i++
				continue
			case '{':
			default:
				out.WriteByte(c)
				continue
			}
			end := bytes.IndexByte(line[i+2:], '}')
			if end < 0 {
				errs = append(errs, &Error{File: file, Line: lineNo + 1,
					Msg: "unterminated ${ reference; write ${NAME}, or $$ for a literal dollar sign"})
				out.Write(line[i:])
				break
			}
			name := string(line[i+2 : i+2+end])
			i += 2 + end
			if !validVarName(name) {
				errs = append(errs, &Error{File: file, Line: lineNo + 1,
					Msg: fmt.Sprintf("${%s} is not a valid variable reference; write ${NAME} with letters, digits and underscores, or $$ for a literal dollar sign", name)})
				continue
			}
			val, ok := lookup(name)
			if !ok {
				errs = append(errs, &Error{File: file, Line: lineNo + 1,
					Msg: fmt.Sprintf("environment variable %s is not set; export %s, or write $$ for a literal dollar sign", name, name)})
				continue
			}
			if len(strings.TrimSpace(val)) >= minMasked {
				secrets[val] = name
			}
			out.WriteString(val)
		}
	}
	return out.Bytes(), secrets, errs
}

func validVarName(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		switch {
		case r == '_', r >= 'A' && r <= 'Z', r >= 'a' && r <= 'z':
		case r >= '0' && r <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}

// mask replaces every substituted value in msg with the ${VAR} it came from,
// longest values first so that overlapping values are masked whole.
func mask(msg string, secrets map[string]string) string {
	if len(secrets) == 0 {
		return msg
	}
	vals := make([]string, 0, len(secrets))
	for v := range secrets {
		vals = append(vals, v)
	}
	// Longest first; ties in lexical order for a deterministic result.
	sortByLenDesc(vals)
	for _, v := range vals {
		msg = strings.ReplaceAll(msg, v, "${"+secrets[v]+"}")
	}
	return msg
}

func sortByLenDesc(s []string) {
	slices.SortFunc(s, func(a, b string) int {
		if len(a) != len(b) {
			return len(b) - len(a)
		}
		return strings.Compare(a, b)
	})
}

// minMasked is the length from which substituted values are masked in
// messages; shorter values are too common to replace without garbling them.
const minMasked = 4
