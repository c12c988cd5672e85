#!/usr/bin/env bash
# run-memcached-t.sh MEGAPIPE_RUN WORKDIR RUN_T_SH [TEST...] — preload.memcached_t (and, with
# MEGAPIPE_STREAMS=1 in the environment, preload.memcached_t_streams): a subset of
# memcached's own t/ suite against Debian's unmodified /usr/bin/memcached started by
# megapipe-run --stats.  The source (for t/ and timedrun.c) is Debian's memcached source
# package, fetched once into WORKDIR by scripts/debsrc.sh; the suite itself is run by
# backends/memcached/tests/run-t.sh (RUN_T_SH), in its TCP mode, inside a private network
# namespace, with memcached-preload (below) as the binary under test.  run-t.sh's own check
# (memcached -t 4 holds >= 4 io_uring instances) holds for the preload too: a channel per
# waiting thread.  Afterwards every memcached the suite started has left its statistics in
# WORKDIR/stats.err: the preload must have served epoll waits in them.
set -euo pipefail
launcher=$(realpath "$1") work=$(realpath -m "$2") run_t=$(realpath "$3")
shift 3
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
exe=${MEMCACHED_EXE:-/usr/bin/memcached}
[ -x "$exe" ] || { echo "SKIP: no $exe (scripts/setup.sh --full installs Debian's memcached)"; exit 77; }
command -v prove >/dev/null || { echo "SKIP: no prove (perl)"; exit 77; }

mkdir -p "$work"
cd "$work"
# The same source package may already be in the build tree (cmake/libevent.cmake's and
# cmake/memcached.cmake's work directories): copy it rather than fetch it again.
if ! ls memcached_*.dsc >/dev/null 2>&1; then
  for d in "$work/../../memcached" "$work/../../memcached-mp"; do
    if ls "$d"/memcached_*.dsc >/dev/null 2>&1; then
      cp "$d"/memcached_*.dsc "$d"/memcached_*.tar.* . && break
    fi
  done
fi
# shellcheck source=../../scripts/debsrc.sh
source "$top/scripts/debsrc.sh"
debsrc_unpack "preload.memcached_t" memcached --

# The binary under test: Debian's memcached under the launcher, its stderr (where the
# preload's statistics go at exit) appended to stats.err.  exec keeps the pid the suite kills.
stats=$work/stats.err
: >"$stats"
cat >memcached-preload <<WRAP
#!/bin/bash
exec "$launcher" --stats --no-lib-path "$exe" "\$@" 2>>"$stats"
WRAP
chmod +x memcached-preload

# The subset (about 35 s): values of every size up to the item limit (getset.t, 10 s),
# pipelining, noreply, counters, CAS, multi-versioning, item size limits, connection limits
# and per-connection stats, bad and malicious input, quit, daemonize (-d forks).  Left out:
# TLS, SASL, extstore, proxy, restart (other builds or files), unixsocket/udp (not epoll's
# job here), and the long ones measured at 5 - 19 s each (metaget, maxconns, idle-timeout,
# chunked-items, flush-all, shutdown, issue_14): CI has < 4 minutes for all preload.* tests.
subset=(getset.t incrdecr.t cas.t noreply.t flags.t multiversioning.t item_size_max.t
  issue_61.t issue_70.t issue_104.t issue_108.t line-lengths.t bogus-commands.t
  malicious-commands.t conn-limits.t stats-conns.t quit.t daemonize.t 64bit.t stats.t)
tests=()
if [ $# -gt 0 ]; then
  tests=("$@")
else
  for n in "${subset[@]}"; do tests+=("t/$n"); done
fi
rm -f "$work/empty-exclude.txt"
touch "$work/empty-exclude.txt"
bash "$run_t" tcp "$work/src" "$work/memcached-preload" "$work/empty-exclude.txt" "${tests[@]}"

# Proof that the suite's servers ran on the preload.
# (The whole subset starts about 30 memcached processes; a hand-picked list may start one.)
min=5
[ $# -gt 0 ] && min=1
MP_T_DIR=$here STATS=$stats MIN=$min python3 -c '
import os, sys
sys.path.insert(0, os.environ["MP_T_DIR"])
from preload_common import served_waits, stream_counts, streams_mode, log, fail
text = open(os.environ["STATS"], errors="replace").read()
w = served_waits(text)
active = [p for p, n in w.items() if n > 0]
if len(active) < int(os.environ["MIN"]):
    fail(f"memcached t/: only {len(active)} memcached process(es) had epoll waits served by "
         f"the preload: {w}; stats.err tail:\n" + "\n".join(text.splitlines()[-20:]))
log(f"memcached t/: {len(active)} memcached processes served by the preload, "
    f"{sum(w.values())} epoll waits in all")
if streams_mode():
    st = [p for p, n in stream_counts(text).items() if n > 0]
    if len(st) < int(os.environ["MIN"]):
        fail(f"memcached t/: stream mode, but only {len(st)} memcached process(es) served "
             f"connections as streams: {stream_counts(text)}")
    log(f"memcached t/: stream mode: {len(st)} processes served "
        f"{sum(stream_counts(text).values())} connections as streams")
'
echo "PASS: preload.memcached_t"
