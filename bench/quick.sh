#!/bin/sh
# quick.sh — the README's first benchmark (under 2 minutes): server on CPU 0, load generator
# on CPU 1, 64 B messages, 256 connections, 1 / 8 / 128 transactions per connection; baseline
# vs MegaPipe (P+B+L) interleaved, 3 repetitions, medians, ratios, and the project's
# acceptance targets for this benchmark (docs/benchmarks.md).
#   bench/quick.sh [BUILD_DIR]        (default: $BUILD_DIR, else <repo>/build)
# scripts/bench.sh builds its own tree, <repo>/build-bench, and passes it here.
# Extra knobs: REPS, SECS (measured seconds per run), SERVER_CPUS, LOADGEN_CPUS.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-${BUILD_DIR:-$here/../build}}
exec python3 "$here/mpbench.py" --build "$build" --reps "${REPS:-3}" --secs "${SECS:-2}" \
    --warmup "${WARMUP:-0.5}" quick
