#!/usr/bin/env bash
# backends/libuv/build-libuv.sh — fetch Debian's libuv1 source package, patch in the MegaPipe
# hooks (patches/libuv/), build a drop-in libuv.so.1 and libuv's own test runner
# (uv_run_tests) against it.  Called by cmake/libuv.cmake; safe to run again (each step is
# skipped when its stamp is newer than its inputs).
#
#   build-libuv.sh WORKDIR REPO_ROOT MEGAPIPE_INCLUDE_DIR MEGAPIPE_LIB_DIR OUT_LIB_DIR
#
# Network: only `apt-get source` talks to Debian's archive, and only when WORKDIR holds no
# .dsc yet.  Needs deb-src (scripts/setup.sh).
set -euo pipefail

work=$1 repo=$2 mpinc=$3 mplib=$4 out=$5
patches=("$repo"/patches/libuv/*.patch)
ours="$repo/backends/libuv"
jobs=${MP_LIBUV_JOBS:-$(nproc)}
mkdir -p "$work" "$out"
cd "$work"

# 1-2. The Debian source package, downloaded once, unpacked with our patches
# (scripts/debsrc.sh; again whenever the .dsc or one of our patches changes).
. "$repo/scripts/debsrc.sh"
debsrc_unpack libuv libuv1 build -- "${patches[@]}"

# 3. Configure once per unpack (libuv's own CMake).  Our sources stay in our tree: CMake
#    compiles them from there, so every edit is seen by the next make.
if [ ! -f build/CMakeCache.txt ]; then
  echo "libuv: configure"
  cmake -S src -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBUILD_TESTING=ON \
      -DLIBUV_BUILD_TESTS=ON -DLIBUV_BUILD_BENCH=OFF \
      "-DMEGAPIPE_UV_SOURCES=$ours/uv-megapipe.c;$ours/uv-megapipe-tcp.c" \
      "-DMEGAPIPE_UV_INCLUDE=$ours;$mpinc" \
      "-DMEGAPIPE_UV_LIBS=-L$mplib;-lmegapipe;-Wl,-rpath,$mplib" \
      >configure.log 2>&1 || { tail -n 40 configure.log >&2; exit 1; }
fi

# 4. Build the shared library and the test runner (incremental).
echo "libuv: make"
cmake --build build -j"$jobs" --target uv uv_run_tests >make.log 2>&1 || {
  tail -n 60 make.log >&2; exit 1; }

# 5. The drop-in library in OUT_LIB_DIR (point LD_LIBRARY_PATH there).  Replaced by rename,
#    and only when changed, so running programs never see a half-written file.
l=$(readlink -f build/libuv.so.1)
if ! cmp -s "$l" "$out/libuv.so.1"; then
  cp "$l" "$out/.libuv.so.1.tmp" && mv -f "$out/.libuv.so.1.tmp" "$out/libuv.so.1"
fi
ln -sfn libuv.so.1 "$out/libuv.so"
touch build.stamp
echo "libuv: library in $out"
