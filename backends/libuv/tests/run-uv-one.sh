#!/bin/sh
# run-uv-one.sh NAME — one test of libuv's runner ($RUNNER) as nobody, in its own network
# namespace with only loopback up, its own PID namespace, its own /tmp (a tmpfs in its own
# mount namespace) and its own scratch directory under $RUN as the current directory (libuv's
# tests use fixed ports, fixed socket paths in /tmp and fixed file names in the current
# directory: this lets them run in parallel); output to $OUT/NAME; prints "ok NAME",
# "skip NAME" or "FAILED NAME".  Used by run-uv-tests.sh.
d="$RUN/$1"
mkdir "$d" && ln -s "$SRC/test" "$d/test" && chown -h 65534:65534 "$d" "$d/test" || exit 1
cd "$d" || exit 1
# In the PID namespace this sh is the first process: when the test ends, or unshare is killed
# (--kill-child), the kernel kills whatever it left behind (a timed-out ipc test's helpers).
if unshare -n -m -p --fork --kill-child sh -c 'mount -t tmpfs -o mode=1777 uvtmp /tmp &&
      ip link set lo up &&
      setpriv --reuid=65534 --regid=65534 --clear-groups "$RUNNER" "$1"' sh "$1" \
      >"$OUT/$1" 2>&1; then
  echo "ok $1"
elif grep -q "^ok 1 - $1 # SKIP" "$OUT/$1"; then
  echo "skip $1"   # the test itself says it does not apply here (its reason is in its output)
else
  echo "FAILED $1"
fi
