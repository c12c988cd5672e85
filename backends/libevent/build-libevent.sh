#!/usr/bin/env bash
# backends/libevent/build-libevent.sh — fetch Debian's libevent source package, patch in the
# megapipe event method, build drop-in libevent-2.1.so.7 / libevent_core-2.1.so.7 (and
# test/regress).  Called by cmake/libevent.cmake; safe to run again (each step is skipped when
# its stamp is newer than its inputs).
#
#   build-libevent.sh WORKDIR REPO_ROOT MEGAPIPE_INCLUDE_DIR MEGAPIPE_LIB_DIR OUT_LIB_DIR
#
# Network: only `apt-get source` talks to Debian's archive, and only when WORKDIR holds no
# .dsc yet.  Needs deb-src (scripts/setup.sh) and autoconf/automake/libtool.
set -euo pipefail

work=$1 repo=$2 mpinc=$3 mplib=$4 out=$5
patches=("$repo"/patches/libevent/*.patch)
method="$repo/backends/libevent/megapipe_event.c"
jobs=${MP_LIBEVENT_JOBS:-$(nproc)}
mkdir -p "$work" "$out"
cd "$work"

# 1-2. The Debian source package, downloaded once, unpacked with our patches
# (scripts/debsrc.sh; again whenever the .dsc or one of our patches changes).
. "$repo/scripts/debsrc.sh"
debsrc_unpack libevent libevent -- "${patches[@]}"
# The method's source lives in our tree; a symlink lets make see every edit.
ln -sfn "$method" src/megapipe_event.c

# 3. autoreconf + configure once per unpack.
if [ ! -f src/config.status ]; then
  echo "libevent: autoreconf + configure"
  (cd src && autoreconf -fi >../autoreconf.log 2>&1) || { cat autoreconf.log >&2; exit 1; }
  (cd src && ./configure --disable-samples --disable-static --enable-shared \
      >../configure.log 2>&1) || { tail -n 40 configure.log >&2; exit 1; }
fi

# 4. make (incremental).  The method is switched on and libmegapipe linked through make
#    variables the patched Makefile.am reads; rpath lets the libraries find libmegapipe in the
#    build tree without LD_LIBRARY_PATH.
echo "libevent: make"
make -C src -j"$jobs" \
  MEGAPIPE_CPPFLAGS="-DEVENT__HAVE_MEGAPIPE=1 -I$mpinc" \
  MEGAPIPE_LIBS="-L$mplib -lmegapipe -Wl,-rpath,$mplib" \
  >make.log 2>&1 || { tail -n 60 make.log >&2; exit 1; }

# 5. Drop-in libraries, side by side in OUT_LIB_DIR (point LD_LIBRARY_PATH there).  Replaced
#    by rename, and only when changed, so running programs never see a half-written file.
for l in src/.libs/libevent*-2.1.so.7; do
  [ -e "$l" ] || continue
  n=$(basename "$l")
  cmp -s "$l" "$out/$n" && continue
  cp -L "$l" "$out/.$n.tmp" && mv -f "$out/.$n.tmp" "$out/$n"
done
for l in "$out"/libevent*-2.1.so.7; do
  b=$(basename "$l" -2.1.so.7)
  ln -sfn "$(basename "$l")" "$out/$b.so"
done
touch build.stamp
echo "libevent: libraries in $out"
