# scripts/debsrc.sh — sourced by backends/*/build-*.sh: Debian's source package of one upstream
# part, downloaded once into the current directory (apt-get source: the only network access,
# needs deb-src, which scripts/setup.sh enables) and unpacked into src/ with Debian's own patches
# and ours applied — again whenever the .dsc or one of our patches is newer than src.stamp.
#
#   debsrc_unpack LABEL SRCPKG [EXTRA_TO_REMOVE...] -- [PATCH...]
#
# On a re-unpack src/, src.stamp, build.stamp and EXTRA_TO_REMOVE go first.  Sets $dsc.
debsrc_unpack() {
  local label=$1 pkg=$2
  shift 2
  local extra=() p f
  while [ $# -gt 0 ] && [ "$1" != -- ]; do extra+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  local patches=("$@")
  if ! ls "$pkg"_*.dsc >/dev/null 2>&1; then
    echo "$label: apt-get source $pkg"
    apt-get source --download-only "$pkg" >fetch.log 2>&1 || {
      cat fetch.log >&2
      echo "$label: apt-get source failed (deb-src enabled? run scripts/setup.sh)" >&2
      exit 1
    }
  fi
  dsc=$(ls "$pkg"_*.dsc | sort | tail -n1)
  local stamp=src.stamp redo=0
  [ -f "$stamp" ] && [ -d src ] || redo=1
  for f in "$dsc" "${patches[@]}"; do [ "$f" -nt "$stamp" ] && redo=1; done
  if [ $redo -eq 1 ]; then
    echo "$label: unpacking $dsc and applying ${#patches[@]} patch(es)"
    rm -rf src "$stamp" build.stamp "${extra[@]}"
    dpkg-source --no-check -x "$dsc" src >unpack.log 2>&1 || { cat unpack.log >&2; exit 1; }
    for p in "${patches[@]}"; do patch -d src -p1 --forward --quiet <"$p"; done
    touch "$stamp"
  fi
  return 0
}
