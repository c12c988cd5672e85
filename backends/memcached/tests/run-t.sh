#!/usr/bin/env bash
# run-t.sh MODE SRCDIR EXE EXCLUDE_FILE [TEST...] — memcached's own t/ suite (SRCDIR: the
# patched Debian source tree cmake/memcached.cmake built) against EXE (memcached-megapipe),
# inside a private network namespace with only loopback up.  Tests named in EXCLUDE_FILE
# (reasons in docs/memcached.md) are left out.
#
# MODE tcp:  the suite connects over TCP for every test (the worker channels' partitioned
#            listeners).  The suite picks unix sockets whenever `memcached -h` mentions
#            "unix-socket"; the wrapper hides that one help line, nothing else.
# MODE unix: the suite as upstream runs it (most tests over a unix socket: accepted by the
#            dispatcher thread, handed to a worker, served through its channel).
set -euo pipefail
mode=$1 src=$(realpath "$2") exe=$(realpath "$3") excl=$(realpath "$4")
shift 4
case $mode in tcp|unix) ;; *) echo "MODE is tcp or unix"; exit 2;; esac
cd "$src"
# The suite runs "$builddir/memcached-debug"; ours is the release binary.  exec keeps the pid
# the suite kills.  "-o relaxed_privileges" (always added by the suite) exists only in debug
# builds, to relax their seccomp sandbox, which release builds do not turn on: dropped.
cat >memcached-debug <<WRAP
#!/bin/bash
args=()
while [ \$# -gt 0 ]; do
  if [ "\$1" = -o ] && [ "\${2:-}" = relaxed_privileges ]; then shift 2; continue; fi
  args+=("\$1"); shift
done
if [ "$mode" = tcp ] && [ "\${args[*]}" = -h ]; then
  "$exe" -h | grep -vi unix-socket; exit \${PIPESTATUS[0]}
fi
exec "$exe" "\${args[@]}"
WRAP
chmod +x memcached-debug
[ -x timedrun ] || cc -O2 -o timedrun timedrun.c

# The unix run: the tests that exercise a connection's whole life (hand-off, reads of every
# size, pipelining, -R yields, watch/crawler side threads, idle kicks, close) and unixsocket.t.
unix_set=(unixsocket.t binary-extstore.t getset.t binary.t noreply.t incrdecr.t cas.t touch.t flush-all.t
  issue_61.t issue_70.t chunked-items.t item_size_max.t metaget.t multiversioning.t
  watcher.t lru-crawler.t idle-timeout.t stats-conns.t conn-limits.t maxconns.t)
tests=()
if [ $# -gt 0 ]; then
  tests=("$@")
elif [ "$mode" = unix ]; then
  for n in "${unix_set[@]}"; do tests+=("t/$n"); done
else
  skip=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$excl")
  for t in t/*.t; do
    n=$(basename "$t")
    grep -qxF "$n" <<<"$skip" && { echo "excluded: $n"; continue; }
    # unixsocket.t checks that a binary without unix-socket support refuses -s: in tcp mode the
    # help line is hidden, so it belongs to the unix run.
    [ "$mode" = tcp ] && [ "$n" = unixsocket.t ] && continue
    # binary-extstore.t takes 193 s over TCP (the same on stock memcached: the test's own
    # small writes), 18 s over a unix socket: it runs in the unix set.
    [ "$mode" = tcp ] && [ "$n" = binary-extstore.t ] && continue
    tests+=("$t")
  done
fi

unshare -n bash -c '
  set -e
  ip link set lo up
  # Proof that the binary under test runs on channels: one started by hand holds one io_uring
  # instance per worker thread (-t 4).
  ./memcached-debug -u root -l 127.0.0.1 -p 21299 -U 0 -t 4 & pid=$!
  sleep 0.5
  n=0
  for f in /proc/$pid/fd/*; do
    case "$(readlink "$f")" in *io_uring*) n=$((n + 1));; esac
  done
  kill $pid; wait $pid 2>/dev/null || true
  [ $n -ge 4 ] || { echo "memcached-megapipe holds $n io_uring fds, not 4: not on channels"; exit 1; }
  echo "memcached-megapipe: $n io_uring instances (one per worker)"
  exec timeout -k 10 1100 prove --timer "$@"
' prove "${tests[@]}"
