#!/usr/bin/env bash
# run-startup.sh EXE CERTDIR — startup.py in a private network namespace with loopback up.
set -euo pipefail
exe=$(realpath "$1") certs=$(realpath "$2") here=$(cd "$(dirname "$0")" && pwd)
exec unshare -n bash -c 'ip link set lo up && exec python3 "$0" "$1" "$2"' \
  "$here/startup.py" "$exe" "$certs"
