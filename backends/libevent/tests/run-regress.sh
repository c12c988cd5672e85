#!/bin/sh
# run-regress.sh SRC EXCLUDE_FILE — libevent's own tests with the megapipe method, the way
# libevent's test/test.sh runs them for one backend (test-eof, test-closed, test-weof, test-time,
# test-changelist, test-fdleak, test-dumpevents, regress, regress in EVENT_DEBUG_MODE), inside a
# private network namespace with only loopback up (some tests aim at outside addresses).
# EXCLUDE_FILE: regress test names ("group/test"), one a line, '#' comments; each is skipped.
set -eu
src=$1 excl=$2
skips=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/^[[:space:]]*/:/' -e 's/[[:space:]]*$//' "$excl" | tr '\n' ' ')
# As test.sh does: every other method is switched off, so a base that could not get the
# megapipe method fails instead of quietly running on epoll.
export EVENT_NOEPOLL=1 EVENT_NOPOLL=1 EVENT_NOSELECT=1 EVENT_NODEVPOLL=1 EVENT_NOKQUEUE=1 \
  EVENT_NOEVPORT=1 EVENT_NOWIN32=1
unset EVENT_NOMEGAPIPE EVENT_EPOLL_USE_CHANGELIST EVENT_PRECISE_TIMER EVENT_DEBUG_MODE || true
export T="$src/test" SKIPS="$skips"
exec unshare -n sh -c '
  ip link set lo up || exit 1
  fail=0
  for t in test-eof test-closed test-weof test-time test-changelist test-fdleak test-dumpevents; do
    if timeout -k 5 60 "$T/$t" >/dev/null; then echo "$t: OK"; else echo "$t: FAILED"; fail=1; fi
  done
  echo "== regress"
  timeout -k 10 900 "$T/regress" $SKIPS || fail=1
  echo "== regress (EVENT_DEBUG_MODE=1)"
  EVENT_DEBUG_MODE=1 timeout -k 10 900 "$T/regress" --quiet $SKIPS || fail=1
  exit $fail
'
