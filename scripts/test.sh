#!/usr/bin/env bash
# scripts/test.sh — README command 2: install what is missing, build everything (every
# optional part on), run the whole test suite through ctest; then the same suite again in an
# AddressSanitizer + UndefinedBehaviorSanitizer build.  Idempotent.
#   MP_TEST_SANITIZE=0 skips the sanitizer pass.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh" --full
parts=(-DMP_WITH_LIBEVENT=ON -DMP_WITH_LIBUV=ON -DMP_WITH_MEMCACHED=ON -DMP_WITH_NGINX=ON)
jobs=$(nproc)

echo "== build (RelWithDebInfo, -Werror)"
"$here/scripts/build.sh" "$here/build" "${parts[@]}"
echo "== ctest"
(cd "$here/build" && ctest --output-on-failure -j"$jobs")

if [ "${MP_TEST_SANITIZE:-1}" != 0 ]; then
  echo "== build (ASan + UBSan)"
  BUILD_TYPE=Debug "$here/scripts/build.sh" "$here/build-asan" -DMP_SANITIZE=ON -DMP_BUILD_BENCH=OFF
  echo "== ctest (ASan + UBSan)"
  (cd "$here/build-asan" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
     UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j"$jobs")
fi
echo "== all tests passed"
