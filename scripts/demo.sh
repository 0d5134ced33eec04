#!/usr/bin/env bash
# Runs the local multi-region demo: three throwaway PostgreSQL clusters
# (na, eu, as), four prism-cdc nodes with the configs in configs/, a write
# workload in every region and the failure sequences played live. It ends
# with the regions verified equal and leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"
go build -o bin/prism-cdc ./cmd/prism-cdc
go build -o bin/prism-demo ./cmd/prism-demo
exec bin/prism-demo --bin bin/prism-cdc --configs configs "$@"
