#!/usr/bin/env bash
# preloaded.sh MODE PRELOAD CMD [ARGS...] — run CMD under the epoll emulation and check that
# it both passed and was really served by it (or, MODE=aside, that the emulation stepped aside
# and CMD still passed on the real calls).
#   MODE=served: MEGAPIPE_STATS=1; some channel must report "epoll_waits N" with N > 0.
#   MODE=streams: served, with MEGAPIPE_STREAMS=1, and some channel must also report
#                "streams N" with N > 0 (connections served as streams).
#   MODE=aside:  MEGAPIPE_VERBOSE=1; the preload must say it uses the real epoll calls, and no
#                channel statistics may appear.
set -uo pipefail
mode=$1 preload=$2
shift 2
err=$(mktemp)
trap 'rm -f "$err"' EXIT
case $mode in
  served) LD_PRELOAD="$preload" MEGAPIPE_STATS=1 "$@" 2>"$err" ;;
  streams) LD_PRELOAD="$preload" MEGAPIPE_STATS=1 MEGAPIPE_STREAMS=1 "$@" 2>"$err" ;;
  aside) LD_PRELOAD="$preload" MEGAPIPE_VERBOSE=1 "$@" 2>"$err" ;;
  *) echo "bad mode $mode" >&2; exit 2 ;;
esac
rc=$?
grep -v "^megapipe-preload\[[0-9]*\] \(exit\|thread exit\): " "$err" >&2 || true
if [ $rc -ne 0 ]; then echo "FAIL: $* exited $rc" >&2; exit 1; fi
case $mode in
  served|streams)
    waits=$(sed -n 's/.*epoll_waits \([0-9]*\).*/\1/p' "$err" | awk '{s+=$1} END {print s+0}')
    echo "epoll waits served by channels: $waits"
    [ "$waits" -gt 0 ] || { echo "FAIL: no wait went through a channel (preload not active?)" >&2; exit 1; }
    if [ "$mode" = streams ]; then
      n=$(sed -n 's/.*: streams \([0-9]*\) (.*/\1/p' "$err" | awk '{s+=$1} END {print s+0}')
      echo "connections served as streams: $n"
      [ "$n" -gt 0 ] || { echo "FAIL: no connection was served as a stream" >&2; exit 1; }
    fi ;;
  aside)
    grep -q "real epoll calls" "$err" || { echo "FAIL: the preload did not say it stepped aside" >&2; exit 1; }
    if grep -q "epoll_waits" "$err"; then echo "FAIL: a channel served waits" >&2; exit 1; fi ;;
esac
echo "PASS"
