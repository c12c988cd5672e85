#!/usr/bin/env bash
# scripts/test.sh — README command 2: install what is missing, build everything (every
# optional part on) in build/, run the whole test suite through ctest; then the project's own
# suite again in an AddressSanitizer + UndefinedBehaviorSanitizer build (build-asan/): the
# core googletest suite on both engines.  The libevent part's tests (libevent's regress,
# memcached's t/, le_method_test) run in the first pass only: see the README for why.
# Idempotent; every build option is given, so scripts/bench.sh (build-bench/) and earlier
# hand configurations cannot change what runs here.
#   MP_TEST_SANITIZE=0 skips the sanitizer pass.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh" --full
parts=(-DMP_WITH_LIBEVENT=ON -DMP_WITH_LIBUV=ON -DMP_WITH_MEMCACHED=ON -DMP_WITH_NGINX=ON)
# Every option is given, so a build tree configured differently before (by hand, or by an
# older scripts/bench.sh that shared build/) is put back to what this script runs.
common=(-DMP_BUILD_TESTS=ON -DMP_BUILD_EXAMPLES=ON -DMP_STATIC_BENCH=OFF)
jobs=$(nproc)

echo "== build (RelWithDebInfo, -Werror)"
"$here/scripts/build.sh" "$here/build" "${common[@]}" -DMP_BUILD_BENCH=ON -DMP_SANITIZE=OFF "${parts[@]}"
echo "== ctest"
(cd "$here/build" && ctest --output-on-failure -j"$jobs")

if [ "${MP_TEST_SANITIZE:-1}" != 0 ]; then
  echo "== build (ASan + UBSan)"
  BUILD_TYPE=Debug "$here/scripts/build.sh" "$here/build-asan" "${common[@]}" -DMP_SANITIZE=ON \
    -DMP_BUILD_BENCH=OFF -DMP_WITH_LIBEVENT=OFF -DMP_WITH_LIBUV=OFF -DMP_WITH_MEMCACHED=OFF \
    -DMP_WITH_NGINX=OFF
  echo "== ctest (ASan + UBSan)"
  (cd "$here/build-asan" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
     UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j"$jobs")
fi
echo "== all tests passed"
