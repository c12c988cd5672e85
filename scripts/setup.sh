#!/usr/bin/env bash
# scripts/setup.sh — install every Debian package the project needs, enable deb-src.
#
# Idempotent and fast when everything is present: it checks with dpkg-query first and only
# calls apt-get when something is missing. Run as root (or with sudo available).
#   scripts/setup.sh            core build + tests + benchmarks
#   scripts/setup.sh --full     also the build dependencies of the upstream parts
set -euo pipefail

full=0
[ "${1:-}" = "--full" ] && full=1

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

core_pkgs=(build-essential cmake pkg-config liburing-dev libgtest-dev googletest
           iproute2 util-linux procps strace gnuplot-nox python3 dpkg-dev)
full_pkgs=(autoconf automake libtool libssl-dev zlib1g-dev libpcre2-dev libsasl2-dev
           libseccomp-dev perl memcached libevent-dev libmemcached-tools hddemux)
full_pkgs+=(nginx) # MP_WITH_NGINX: Debian's stock binary that loads ngx_megapipe_module
full_pkgs+=(curl)  # compat/tests (preload.nginx): HTTP GETs and keep-alive against Debian's nginx

want=("${core_pkgs[@]}")
[ $full -eq 1 ] && want+=("${full_pkgs[@]}")

missing=()
for p in "${want[@]}"; do
  st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$st" = "installed" ] || missing+=("$p")
done

# deb-src for Debian's source packages (libevent, ... are fetched with `apt-get source` by the
# build): derived from the archives apt already uses (scripts/deb-src.sh), so it works behind
# any mirror.  Nothing is written when source entries exist or are already current.
need_update=0
here=$(cd "$(dirname "$0")" && pwd)
if changed=$($SUDO bash "$here/deb-src.sh" /etc/apt); then
  if [ -n "$changed" ]; then
    echo "setup: source package entries written: $changed"
    need_update=1
  fi
else
  echo "setup: could not enable deb-src (see above); the upstream parts (MP_WITH_*) need it" >&2
fi

if [ ${#missing[@]} -gt 0 ] || [ $need_update -eq 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup: all packages present"
