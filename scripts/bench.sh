#!/usr/bin/env bash
# scripts/bench.sh — README command 1: install what is missing, build, run the paper's
# ping-pong microbenchmark (baseline vs MegaPipe) and print the table.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
"$here/scripts/build.sh" "$here/build" -DMP_BUILD_TESTS=OFF
exec "$here/bench/quick.sh" "$here/build"
