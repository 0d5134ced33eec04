#!/usr/bin/env bash
# Benchmark prism-cdc against pg_recvlogical and native logical replication
# on throwaway PostgreSQL clusters. Flags go to prism-bench, e.g.
#   scripts/bench.sh                      # full run (scale 10, 100k transactions, 3 runs)
#   scripts/bench.sh -quick               # a few minutes, small data
#   scripts/bench.sh -scenarios backlog -txns 20000 -runs 3
# Results (Markdown tables) go to stdout, progress to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
# prism-cdc's slots use contrib/prism_pgoutput where it is built for the
# servers' major version (-output-plugin auto); without it they use pgoutput.
scripts/build-prism-pgoutput.sh || echo "warning: contrib/prism_pgoutput not built; prism-cdc's slots use pgoutput" >&2
go build -o bin/prism-bench ./cmd/prism-bench
exec bin/prism-bench "$@"
