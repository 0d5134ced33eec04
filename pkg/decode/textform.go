package decode

import (
	"context"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// textForm lists the session settings that decide the text form of a
// value, with the values every prism-cdc connection uses. pgoutput prints
// values in the walsender session's text form, and appliers, verify and
// the tools read and write values as text, so one region whose server has
// DateStyle = 'SQL, DMY' would otherwise ship 2024-01-05 as 05/01/2024
// (applied elsewhere as 1 May), extra_float_digits = 0 would round floats,
// IntervalStyle = sql_standard would ship '-1 days -02:03:04' as '-1 -2:03:04'
// (a time part of the opposite sign where read with IntervalStyle =
// postgres), and bytea_output, TimeZone and lc_monetary would change the
// text of bytea, timestamptz and money. The values are those of
// PostgreSQL's own subscriber (datestyle ISO, intervalstyle postgres,
// extra_float_digits 3) plus hex bytea, UTC and the C money format.
// standard_conforming_strings is pinned because statements quote literals
// for it.
func textForm() [][2]string {
	return [][2]string{
		{"datestyle", "ISO, MDY"},
		{"intervalstyle", "postgres"},
		{"extra_float_digits", "3"},
		{"bytea_output", "hex"},
		{"timezone", "UTC"},
		{"lc_monetary", "C"},
		{"standard_conforming_strings", "on"},
	}
}

// TextFormSettings returns the settings PinTextForm pins, as name and
// value pairs: for what sets them otherwise (a function's SET clauses).
func TextFormSettings() [][2]string { return textForm() }

// PinTextForm sets on cfg the session settings that decide the text form
// of values (DateStyle, IntervalStyle, extra_float_digits, bytea_output,
// TimeZone, lc_monetary, standard_conforming_strings) to the values every
// prism-cdc connection uses, so that every region reads and writes the
// same text for the same value whatever its server's settings. They are
// sent as startup parameters, which the server applies after a DSN's
// options=-c ... and over the database's and role's defaults; a DSN's own
// value of one of these settings, in any letter case, is replaced. Every
// connection that reads or writes values as text is configured through
// this function.
func PinTextForm(cfg *pgconn.Config) {
	if cfg.RuntimeParams == nil {
		cfg.RuntimeParams = map[string]string{}
	}
	pinned := textForm()
	for k := range cfg.RuntimeParams {
		for _, p := range pinned {
			if strings.EqualFold(k, p[0]) {
				delete(cfg.RuntimeParams, k)
			}
		}
	}
	for _, p := range pinned {
		cfg.RuntimeParams[p[0]] = p[1]
	}
}

// Connect opens a normal connection to dsn with the text form of values
// pinned (PinTextForm).
func Connect(ctx context.Context, dsn string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	PinTextForm(&cfg.Config)
	return pgx.ConnectConfig(ctx, cfg)
}
