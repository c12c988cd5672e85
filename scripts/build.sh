#!/usr/bin/env bash
# scripts/build.sh BUILD_DIR [cmake args...] — configure (once) and build.  Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bdir=${1:-"$here/build"}
shift || true
cmake -S "$here" -B "$bdir" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-RelWithDebInfo}" "$@" >/dev/null
cmake --build "$bdir" -j"$(nproc)"
