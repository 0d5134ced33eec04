#!/bin/sh
# chaos.sh [CYCLES] - run the reliability suite's long version: CYCLES fault
# cycles (default 200) on three regions with real nodes, then check every
# invariant. The seed is printed; PRISM_SEED=<seed> replays a run.
set -eu
cd "$(dirname "$0")/.."
cycles=${1:-200}
seed=${PRISM_SEED:-$(date +%s)}
echo "chaos: $cycles fault cycles, seed $seed (replay with PRISM_SEED=$seed scripts/chaos.sh $cycles)"
PRISM_SEED=$seed PRISM_CHAOS_CYCLES=$cycles exec go test -count=1 -v -timeout 0 -run '^TestChaos$' ./internal/chaos
