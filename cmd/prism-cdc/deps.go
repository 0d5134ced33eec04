package main

import (
	_ "github.com/jackc/pglogrepl"
	_ "github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/rs/zerolog"
	_ "gopkg.in/yaml.v3"
)
