#!/usr/bin/env bash
# run-stress.sh EXE MC_STRESS — the checksummed stress (10,000 short + 256 persistent
# connections, 1 B - 512 KiB values, every value compared byte for byte) against
# memcached-megapipe, once per engine (io_uring: buffered reads; epoll: mp_read() into the
# connection's buffer), in a private network namespace.  Afterwards the server must still be
# up, have no evictions (every value must stay readable) and have counted every connection.
set -euo pipefail
exe=$(realpath "$1") stress=$(realpath "$2")
exec unshare -n bash -s "$exe" "$stress" <<'INNER'
set -euo pipefail
exe=$1 stress=$2
ip link set lo up
tmp=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
stat() { # stat PORT NAME
  python3 - "$1" "$2" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"stats\r\n")
buf = b""
while not buf.endswith(b"END\r\n"):
    d = s.recv(65536)
    if not d: break
    buf += d
for l in buf.decode().split("\r\n"):
    p = l.split()
    if len(p) == 3 and p[1] == sys.argv[2]: print(p[2])
PY
}
for engine in uring epoll; do
  rm -f "$tmp/port"
  MP_ENGINE=$engine MEMCACHED_PORT_FILENAME=$tmp/port "$exe" -u root -l 127.0.0.1 -p -1 -U 0 \
    -t 4 -m 2048 -c 4096 2>"$tmp/err" & pid=$!
  for _ in $(seq 100); do [ -s "$tmp/port" ] && break; sleep 0.05; done
  port=$(awk '/TCP INET/ {print $3}' "$tmp/port")
  [ -n "$port" ] || { cat "$tmp/err"; echo "no port"; exit 1; }
  n=0
  for f in /proc/$pid/fd/*; do case "$(readlink "$f")" in *io_uring*) n=$((n + 1));; esac; done
  if [ $engine = uring ] && [ $n -lt 4 ]; then echo "not on io_uring channels ($n)"; exit 1; fi
  if [ $engine = epoll ] && [ $n -ne 0 ]; then echo "MP_ENGINE=epoll still holds io_uring"; exit 1; fi
  echo "== engine $engine, port $port, $n io_uring instances"
  "$stress" 127.0.0.1 "$port" -s 10000 -p 256 -o 100 -t 16
  kill -0 $pid || { echo "server died"; cat "$tmp/err"; exit 1; }
  ev=$(stat "$port" evictions) total=$(stat "$port" total_connections)
  echo "server: evictions $ev, total_connections $total"
  [ "$ev" = 0 ] || { echo "evictions: the stress cannot check evicted values"; exit 1; }
  [ "$total" -ge 10256 ] || { echo "server counted $total connections"; exit 1; }
  kill $pid; wait $pid || true; pid=
  if grep -q . "$tmp/err"; then echo "server stderr:"; cat "$tmp/err"; exit 1; fi
done
echo "stress OK"
INNER
