#!/usr/bin/env bash
# backends/nginx/build-nginx-module.sh — build ngx_megapipe_module.so against Debian's nginx
# source package, configured with the configure arguments of the installed /usr/sbin/nginx
# (`nginx -V`) plus --add-dynamic-module, so that the stock binary loads it.  Only the
# dynamic modules are built (`make modules`); nothing of nginx itself is rebuilt or patched.
# Called by cmake/nginx.cmake; safe to run again (steps are skipped when up to date).
#
#   build-nginx-module.sh WORKDIR REPO_ROOT MEGAPIPE_INCLUDE_DIR LIBMEGAPIPE_A OUT_SO
#
# Network: only `apt-get source` talks to Debian's archive, and only when WORKDIR holds no
# .dsc yet.  Needs deb-src (scripts/setup.sh), nginx, libpcre2-dev, libssl-dev, zlib1g-dev.
set -euo pipefail

work=$1 repo=$2 mpinc=$3 mplib=$4 out=$5
module="$repo/patches/nginx/ngx_megapipe_module"
nginx_bin=${MP_NGINX_BIN:-/usr/sbin/nginx}
jobs=${MP_NGINX_JOBS:-$(nproc)}
mkdir -p "$work" "$(dirname "$out")"
cd "$work"

if [ ! -x "$nginx_bin" ]; then
  echo "nginx module: $nginx_bin not found (scripts/setup.sh --full installs Debian's nginx)" >&2
  exit 1
fi

# 1. The source package.  The newest source version apt lists may be missing from the mirror
#    (a security update whose source was not mirrored): then the next one is tried.  The
#    binary's own version comes first.
if ! ls nginx_*.dsc >/dev/null 2>&1; then
  binver=$(dpkg-query -W -f='${Version}' nginx 2>/dev/null || true)
  versions=$( (echo "$binver"; apt-cache showsrc nginx 2>/dev/null | sed -n 's/^Version: //p' |
               sort -rV) | awk 'NF && !seen[$0]++')
  ok=0
  for v in $versions; do
    echo "nginx module: apt-get source nginx=$v"
    if apt-get source --download-only "nginx=$v" >fetch.log 2>&1; then ok=1; break; fi
    rm -f nginx_*.dsc
  done
  if [ $ok -eq 0 ]; then
    cat fetch.log >&2
    echo "nginx module: apt-get source failed (deb-src enabled? run scripts/setup.sh)" >&2
    exit 1
  fi
fi
dsc=$(ls nginx_*.dsc | sort -V | tail -n1)

# 2. Unpack (Debian's patches applied) once per .dsc.
if [ ! -f src.stamp ] || [ "$dsc" -nt src.stamp ] || [ ! -d src ]; then
  echo "nginx module: unpacking $dsc"
  rm -rf src src.stamp configure.stamp
  dpkg-source --no-check -x "$dsc" src >unpack.log 2>&1 || { cat unpack.log >&2; exit 1; }
  touch src.stamp
fi

# 3. configure with the binary's own arguments.  Dropped: the dynamic modules that need
#    libraries we do not build against (geoip, image_filter, perl, xslt) and the dynamic mail
#    and stream modules (not needed, and they only cost build time); none of them changes the
#    core's structures or the module signature.
eval "set -- $("$nginx_bin" -V 2>&1 | sed -n 's/^configure arguments: //p')"
args=()
for a in "$@"; do
  case $a in
    --with-http_geoip_module=dynamic|--with-http_image_filter_module=dynamic|\
    --with-http_perl_module=dynamic|--with-http_xslt_module=dynamic|\
    --with-mail=dynamic|--with-stream=dynamic|--with-stream_geoip_module=dynamic) ;;
    --with-mail_ssl_module|--with-stream_ssl_module|--with-stream_ssl_preread_module|\
    --with-stream_realip_module) ;;
    --add-dynamic-module=*|--add-module=*) ;;
    *) args+=("$a") ;;
  esac
done
case " ${args[*]} " in *" --with-compat "*) ;; *) args+=(--with-compat) ;; esac
args+=("--add-dynamic-module=$module")
sig="$(printf '%s\n' "${args[@]}" "$mpinc" "$mplib" | md5sum | cut -c1-32)"
if [ ! -f configure.stamp ] || [ "$(cat configure.stamp)" != "$sig" ] ||
   [ "$module/config" -nt configure.stamp ]; then
  echo "nginx module: configure (Debian's arguments + --add-dynamic-module)"
  printf '%q ' ./configure "${args[@]}" >configure.cmd
  (cd src && MEGAPIPE_INC="$mpinc" \
     MEGAPIPE_LIBS="$mplib -luring -lpthread -Wl,--exclude-libs,ALL" \
     ./configure "${args[@]}" >../configure.log 2>&1) ||
    { tail -n 40 configure.log >&2; exit 1; }
  echo "$sig" >configure.stamp
fi

# 4. Only the modules.  The object depends on our source through make's own rules; the
#    archive is a link input make does not know about, so a newer one forces the relink.
so=src/objs/ngx_megapipe_module.so
if [ -f "$so" ] && [ "$mplib" -nt "$so" ]; then rm -f "$so"; fi
echo "nginx module: make modules"
make -C src -f objs/Makefile -j"$jobs" modules >make.log 2>&1 || { tail -n 60 make.log >&2; exit 1; }

# 5. Install next to the build (replaced by rename: a running nginx never sees half a file).
if ! cmp -s "$so" "$out"; then
  cp "$so" "$out.tmp" && mv -f "$out.tmp" "$out"
fi
echo "nginx module: $out"
