#!/usr/bin/env bash
# scripts/deb-src.sh [APT_DIR] — enable Debian source packages (deb-src) from the archives apt
# already uses, so `apt-get source` works behind any mirror.  Called by scripts/setup.sh (as
# root); APT_DIR defaults to /etc/apt (another directory: for trying it on sample files).
#
# When no enabled deb-src entry exists in APT_DIR's sources, it derives them from the enabled
# binary (`deb`) entries:
#   - one-line files (sources.list, sources.list.d/*.list): each `deb ...` line becomes
#     `deb-src ...` (same options, URI, suite, components), in
#     sources.list.d/megapipe-deb-src.list;
#   - deb822 files (sources.list.d/*.sources): each enabled stanza whose Types has `deb` gives
#     a `Types: deb-src` stanza with the same URIs, Suites, Components and Signed-By, in
#     sources.list.d/megapipe-deb-src.sources.
# cdrom: entries are skipped.  When apt's own sources enable deb-src, nothing is derived (and
# files of an earlier run are removed).  Idempotent: a file is written only when its content
# changes (e.g. the mirror changed), and each file written or removed is named on stdout, so
# the caller knows to run `apt-get update`.  Prints nothing when nothing changed.
set -euo pipefail

apt=${1:-/etc/apt}
own_list=$apt/sources.list.d/megapipe-deb-src.list
own_sources=$apt/sources.list.d/megapipe-deb-src.sources

one_line=() deb822=()
[ -f "$apt/sources.list" ] && one_line+=("$apt/sources.list")
for f in "$apt"/sources.list.d/*.list; do
  [ -f "$f" ] && [ "$f" != "$own_list" ] && one_line+=("$f")
done
for f in "$apt"/sources.list.d/*.sources; do
  [ -f "$f" ] && [ "$f" != "$own_sources" ] && deb822+=("$f")
done

# deb822 stanzas (paragraphs) -> one record per enabled stanza: its fields, continuation lines
# kept.  MODE=check: print "yes" if a stanza enables deb-src.  MODE=gen: the deb-src stanzas.
# shellcheck disable=SC2016 # awk programs, not shell expansions
deb822_awk='
BEGIN { RS = ""; FS = "\n" }
{
    n = 0; delete_all()
    for (i = 1; i <= NF; i++) {
        line = $i
        if (line ~ /^#/) continue
        if (line ~ /^[ \t]/ && n > 0) { val[key[n]] = val[key[n]] "\n" line; continue }
        c = index(line, ":")
        if (c == 0) continue
        k = tolower(substr(line, 1, c - 1)); v = substr(line, c + 1)
        sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v)
        key[++n] = k; val[k] = v; name[k] = substr(line, 1, c - 1)
    }
    if (tolower(val["enabled"]) == "no") next
    types = " " val["types"] " "
    gsub(/[ \t]+/, " ", types)
    if (mode == "check") { if (index(types, " deb-src ")) found = 1; next }
    if (!index(types, " deb ") || val["uris"] ~ /^cdrom:/ || val["uris"] == "") next
    out = "Types: deb-src"
    split("uris suites components signed-by", want, " ")
    for (j = 1; j <= 4; j++)
        if (want[j] in val) out = out "\n" name[want[j]] ":" (val[want[j]] ~ /^\n/ ? "" : " ") val[want[j]]
    print out "\n"
}
function delete_all(   x) { for (x in val) delete val[x]; for (x in name) delete name[x] }
END { if (mode == "check" && found) print "yes" }'

# one-line entries: MODE=check: "yes" if a deb-src line is enabled; MODE=gen: deb -> deb-src
# shellcheck disable=SC2016
one_line_awk='
/^[ \t]*deb-src[ \t]/ { found = 1 }
mode == "gen" && /^[ \t]*deb[ \t]/ && $0 !~ /cdrom:/ { sub(/^[ \t]*deb/, "deb-src"); print }
END { if (mode == "check" && found) print "yes" }'

have=""
if [ ${#one_line[@]} -gt 0 ]; then have+=$(awk -v mode=check "$one_line_awk" "${one_line[@]}"); fi
if [ ${#deb822[@]} -gt 0 ]; then have+=$(awk -v mode=check "$deb822_awk" "${deb822[@]}"); fi
if [ -n "$have" ]; then
  # Source packages are enabled already (by the system or the user): leave those, and drop
  # our own copies if an earlier run wrote them (apt would warn about duplicates).
  for f in "$own_list" "$own_sources"; do
    if [ -e "$f" ]; then rm -f "$f"; echo "$f (removed)"; fi
  done
  exit 0
fi

want_list="" want_sources=""
if [ ${#one_line[@]} -gt 0 ]; then want_list=$(awk -v mode=gen "$one_line_awk" "${one_line[@]}"); fi
if [ ${#deb822[@]} -gt 0 ]; then want_sources=$(awk -v mode=gen "$deb822_awk" "${deb822[@]}"); fi
if [ -z "$want_list" ] && [ -z "$want_sources" ]; then
  echo "deb-src: apt has no enabled deb entries in $apt to derive source entries from" >&2
  exit 1
fi

hdr="# Written by megapipe's scripts/deb-src.sh: the source-package twins of apt's deb entries."
put() { # put FILE CONTENT: write (or remove when CONTENT is empty) only if it changes
  local f=$1 body=$2 cur=""
  if [ -z "$body" ]; then
    if [ -e "$f" ]; then rm -f "$f"; echo "$f (removed)"; fi
    return
  fi
  body="$hdr"$'\n'"$body"
  [ -f "$f" ] && cur=$(cat "$f")
  if [ "$cur" != "$body" ]; then
    printf '%s\n' "$body" >"$f.tmp" && mv -f "$f.tmp" "$f"
    echo "$f"
  fi
}
put "$own_list" "$want_list"
put "$own_sources" "$want_sources"
