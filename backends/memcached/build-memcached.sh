#!/usr/bin/env bash
# backends/memcached/build-memcached.sh — fetch Debian's memcached source package, apply
# patches/memcached/*.patch (hooks into memcached.c / thread.c / memcached.h / Makefile.am),
# link backends/memcached/mp_memcached.[ch] into the tree, build, and install the binary as
# OUT (memcached-megapipe).  Called by cmake/memcached.cmake; safe to run again (each step is
# skipped when its stamp is newer than its inputs).
#
#   build-memcached.sh WORKDIR REPO_ROOT MEGAPIPE_INCLUDE_DIR MEGAPIPE_LIB_DIR OUT
#
# Network: only `apt-get source` talks to Debian's archive, and only when WORKDIR holds no
# .dsc yet.  Needs deb-src (scripts/setup.sh) and autoconf/automake, libevent-dev,
# libsasl2-dev, libssl-dev (configured like Debian's package: --enable-sasl --enable-tls).
set -euo pipefail

work=$1 repo=$2 mpinc=$3 mplib=$4 out=$5
patches=("$repo"/patches/memcached/*.patch)
ours=("$repo"/backends/memcached/mp_memcached.c "$repo"/backends/memcached/mp_memcached.h)
jobs=${MP_MEMCACHED_JOBS:-$(nproc)}
mkdir -p "$work" "$(dirname "$out")"
cd "$work"

# 1-2. The Debian source package, downloaded once, unpacked with our patches
# (scripts/debsrc.sh; again whenever the .dsc or one of our patches changes).
. "$repo/scripts/debsrc.sh"
debsrc_unpack memcached memcached -- "${patches[@]}"
# Our files live in our tree; symlinks let make see every edit.
for f in "${ours[@]}"; do ln -sfn "$f" "src/$(basename "$f")"; done

# 3. autoreconf (Makefile.am lists mp_memcached.c) + configure once per unpack, with Debian's
#    options.  libmegapipe is found through the include/lib dirs of this build tree.
if [ ! -f src/config.status ]; then
  echo "memcached: autoreconf + configure"
  (cd src && autoreconf -fi >../autoreconf.log 2>&1) || { cat autoreconf.log >&2; exit 1; }
  (cd src && ./configure --enable-sasl --enable-tls >../configure.log 2>&1) ||
    { tail -n 40 configure.log >&2; exit 1; }
fi

# 4. Our file must also pass the project's own warning rules (memcached's flags are
#    -std=gnu99 -Wall -Werror -pedantic ...; ours add -Wextra under C11).
cc -std=c11 -D_GNU_SOURCE -DHAVE_CONFIG_H -Wall -Wextra -Werror -Wno-unused-parameter \
   -fsyntax-only -I src -I "$mpinc" src/mp_memcached.c

# 5. make (incremental): only the memcached binary (and timedrun for the t/ suite).
echo "memcached: make"
make -C src -j"$jobs" memcached timedrun \
  MEGAPIPE_CPPFLAGS="-I$mpinc" \
  MEGAPIPE_LIBS="-L$mplib -lmegapipe -Wl,-rpath,$mplib" \
  >make.log 2>&1 || { tail -n 60 make.log >&2; exit 1; }

# 6. The binary, replaced by rename and only when changed (running servers are safe).
if ! cmp -s src/memcached "$out"; then
  cp src/memcached "$out.tmp" && mv -f "$out.tmp" "$out"
fi
touch build.stamp
echo "memcached: $out"
