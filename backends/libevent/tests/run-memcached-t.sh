#!/usr/bin/env bash
# run-memcached-t.sh WORKDIR LIBEVENT_LIBDIR EXCLUDE_FILE [TEST...] — memcached's own t/ suite
# (from Debian's memcached source package) against Debian's unmodified /usr/bin/memcached,
# running on our libevent (megapipe method) through LD_LIBRARY_PATH, inside a private network
# namespace with only loopback up.  Tests named in EXCLUDE_FILE (reasons in docs/libevent.md)
# are left out.  Network: `apt-get source memcached` once, when WORKDIR has no .dsc yet.
set -euo pipefail
work=$(realpath -m "$1") lelib=$(realpath "$2") excl=$(realpath "$3")
shift 3
exe=${MEMCACHED_EXE:-/usr/bin/memcached}
[ -x "$exe" ] || { echo "no $exe (scripts/setup.sh --full installs Debian's memcached)"; exit 1; }
mkdir -p "$work"
cd "$work"
if ! ls memcached_*.dsc >/dev/null 2>&1; then
  apt-get source --download-only memcached >fetch.log 2>&1 || { cat fetch.log >&2; exit 1; }
fi
dsc=$(ls memcached_*.dsc | sort | tail -n1)
if [ ! -f src.stamp ] || [ "$dsc" -nt src.stamp ]; then
  rm -rf src
  dpkg-source --no-check -x "$dsc" src >unpack.log 2>&1 || { cat unpack.log >&2; exit 1; }
  touch src.stamp
fi
cd src
# The suite runs "$builddir/memcached-debug" (and timedrun); ours is Debian's binary on our
# libevent.  exec keeps the pid the suite kills.  The suite always adds "-o
# relaxed_privileges", an option only debug builds know (it relaxes their seccomp sandbox,
# which release builds do not turn on by default): drop it.
cat >memcached-debug <<WRAP
#!/bin/bash
args=()
while [ \$# -gt 0 ]; do
  if [ "\$1" = -o ] && [ "\${2:-}" = relaxed_privileges ]; then shift 2; continue; fi
  args+=("\$1"); shift
done
LD_LIBRARY_PATH="$lelib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$exe" "\${args[@]}"
WRAP
chmod +x memcached-debug
[ timedrun -nt timedrun.c ] || cc -O2 -o timedrun timedrun.c

# Proof that the binary really runs on the megapipe method: it resolves our libevent and,
# once started, holds an io_uring instance.
# (ldd's output is taken whole first: `ldd | grep -q` under pipefail fails at random, when
# grep exits before ldd has written everything and ldd dies of SIGPIPE.)
deps=$(LD_LIBRARY_PATH="$lelib" ldd "$exe")
grep -qF "$lelib/libevent-2.1.so.7" <<<"$deps" ||
  { echo "memcached does not pick up $lelib/libevent-2.1.so.7"; exit 1; }

tests=()
if [ $# -gt 0 ]; then
  tests=("$@")
else
  skip=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$excl")
  for t in t/*.t; do
    n=$(basename "$t")
    grep -qxF "$n" <<<"$skip" && { echo "excluded: $n"; continue; }
    tests+=("$t")
  done
fi

unshare -n bash -c '
  set -e
  ip link set lo up
  # one server started by hand: it must hold an io_uring fd (the megapipe channel)
  ./memcached-debug -u root -l 127.0.0.1 -p 21299 -U 0 & pid=$!
  sleep 0.5
  n=0
  for f in /proc/$pid/fd/*; do
    case "$(readlink "$f")" in *io_uring*) n=$((n + 1));; esac
  done
  kill $pid; wait $pid 2>/dev/null || true
  [ $n -gt 0 ] || { echo "memcached holds no io_uring fd: not on the megapipe method"; exit 1; }
  echo "memcached on megapipe: $n io_uring instance(s) (one per libevent base)"
  exec timeout -k 10 1500 prove "$@"
' prove "${tests[@]}"
