#!/usr/bin/env bash
# scripts/bench.sh — README command 1: install what is missing, build, run the paper's
# ping-pong microbenchmark (baseline vs MegaPipe) and print the table.  Idempotent.
#
# It builds in its own tree, build-bench/ (library + bench/ only, every option given), so it
# never changes the configuration of build/ that scripts/test.sh uses, and the other way round.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
"$here/scripts/build.sh" "$here/build-bench" -DMP_BUILD_TESTS=OFF -DMP_BUILD_EXAMPLES=OFF \
  -DMP_BUILD_BENCH=ON -DMP_STATIC_BENCH=OFF -DMP_SANITIZE=OFF \
  -DMP_WITH_LIBEVENT=OFF -DMP_WITH_LIBUV=OFF -DMP_WITH_MEMCACHED=OFF -DMP_WITH_NGINX=OFF
exec "$here/bench/quick.sh" "$here/build-bench"
