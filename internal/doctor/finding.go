package doctor

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
)

// Severity grades a finding.
type Severity int

// The severities, from harmless to blocking.
const (
	OK      Severity = iota // as it should be
	Warn                    // works, but risky or degraded
	Problem                 // blocks replication (or the node's start)
)

// String returns ok, warn or problem.
func (s Severity) String() string {
	switch s {
	case OK:
		return "ok"
	case Warn:
		return "warn"
	case Problem:
		return "problem"
	}
	return fmt.Sprintf("Severity(%d)", int(s))
}

// MarshalText encodes the severity as its name.
func (s Severity) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Finding is one checked fact.
type Finding struct {
	Severity Severity `json:"severity"`
	// Check names what was checked, e.g. "database eu: wal_level".
	Check string `json:"check"`
	// Message says what was found and, when it is not OK, what is wrong.
	Message string `json:"message"`
	// Fix is the exact SQL or setting that fixes it; empty when OK.
	Fix string `json:"fix,omitempty"`
}

// Report is every finding of one doctor run, in check order.
type Report struct {
	Findings []Finding `json:"findings"`
}

func (r *Report) add(sev Severity, check, msg, fix string) {
	r.Findings = append(r.Findings, Finding{Severity: sev, Check: check, Message: msg, Fix: fix})
}

func (r *Report) ok(check, msg string) { r.add(OK, check, msg, "") }

// Blocking reports whether any finding is a Problem.
func (r Report) Blocking() bool { return r.Count(Problem) > 0 }

// Count returns the number of findings of severity s.
func (r Report) Count(s Severity) int {
	n := 0
	for _, f := range r.Findings {
		if f.Severity == s {
			n++
		}
	}
	return n
}

// Find returns the findings whose Check contains check.
func (r Report) Find(check string) []Finding {
	var out []Finding
	for _, f := range r.Findings {
		if strings.Contains(f.Check, check) {
			out = append(out, f)
		}
	}
	return out
}

// Write prints the report for an operator: one line per finding, the fix
// indented below it, and a summary line.
func (r Report) Write(w io.Writer) error {
	var b strings.Builder
	for _, f := range r.Findings {
		tag := map[Severity]string{OK: "[ok]     ", Warn: "[warn]   ", Problem: "[PROBLEM]"}[f.Severity]
		fmt.Fprintf(&b, "%s %s: %s\n", tag, f.Check, f.Message)
		if f.Fix != "" {
			for i, line := range strings.Split(f.Fix, "\n") {
				lead := "          fix: "
				if i > 0 {
					lead = "               "
				}
				fmt.Fprintf(&b, "%s%s\n", lead, line)
			}
		}
	}
	fmt.Fprintf(&b, "\n%d ok, %d warnings, %d problems", r.Count(OK), r.Count(Warn), r.Count(Problem))
	if r.Blocking() {
		b.WriteString(": replication is blocked until the problems are fixed\n")
	} else {
		b.WriteString("\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteJSON prints the report as one JSON document.
func (r Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}
