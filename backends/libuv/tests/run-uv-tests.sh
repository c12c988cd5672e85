#!/bin/sh
# run-uv-tests.sh RUNNER SRC EXCLUDE_FILE — libuv's own test runner (uv_run_tests from the
# Debian source package), every test but the excluded ones, in parallel (MP_UV_JOBS, default
# 2 per CPU: most tests wait on timers), each inside its own network namespace with only
# loopback up (run-uv-one.sh).  libuv's suite refuses to run as root, so the tests run as
# nobody, each in a scratch directory that holds a link to the source's test/ (fixtures); all
# removed at the end.
# EXCLUDE_FILE: test names, one a line, '#' comments.  UV_USE_MEGAPIPE is passed through.
set -eu
runner=$(readlink -f "$1") src=$(readlink -f "$2") excl=$(readlink -f "$3")
here=$(cd "$(dirname "$0")" && pwd)
jobs=${MP_UV_JOBS:-$(( $(nproc) * 2 ))}
# Outside /tmp: each test gets a /tmp of its own, which would hide this directory.
work=$(mktemp -d /var/tmp/uv-tests.XXXXXX)
trap 'rm -rf "$work"' EXIT INT TERM
chmod 755 "$work"
# The build tree may itself be under /tmp (a checkout there): each test's private /tmp would hide
# it, so the runner, the libraries it loads from the build tree and the fixtures are staged here.
mkdir "$work/bin" "$work/src"
cp "$runner" "$work/bin/"
for lib in $(ldd "$runner" | awk '$3 ~ /^\// && $1 ~ /^lib(uv|megapipe)\./ {print $3}'); do
  cp "$lib" "$work/bin/"
done
cp -r "$src/test" "$work/src/test"
chmod -R a+rX "$work/bin" "$work/src"
runner="$work/bin/$(basename "$runner")" src="$work/src"
export LD_LIBRARY_PATH="$work/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/[[:space:]]//g' "$excl" | sort -u >"$work/excluded"
mkdir "$work/run" "$work/out"
chown -R 65534:65534 "$work/run" "$work/out"
setpriv --reuid=65534 --regid=65534 --clear-groups "$runner" --list | awk '{print $1}' | sort -u >"$work/all"
comm -23 "$work/all" "$work/excluded" >"$work/selected"
echo "libuv tests: $(wc -l <"$work/selected") of $(wc -l <"$work/all") (excluded: $(comm -12 "$work/all" "$work/excluded" | wc -l)), UV_USE_MEGAPIPE=${UV_USE_MEGAPIPE:-unset}, $jobs in parallel"
export RUNNER="$runner" OUT="$work/out" RUN="$work/run" SRC="$src" UV_TEST_TIMEOUT_MULTIPLIER=${UV_TEST_TIMEOUT_MULTIPLIER:-3}
xargs -P "$jobs" -n1 "$here/run-uv-one.sh" <"$work/selected" >"$work/results"
fail=$(grep -c '^FAILED' "$work/results" || true)
for t in $(sed -n 's/^FAILED //p' "$work/results" | sort); do
  echo "== FAILED $t"
  tail -n 30 "$work/out/$t"
done
for t in $(sed -n 's/^skip //p' "$work/results" | sort); do
  echo "skipped: $(grep -h "# SKIP" "$work/out/$t" | head -n1)"
done
echo "libuv tests: $(grep -c '^ok' "$work/results" || true) passed, $(grep -c '^skip' "$work/results" || true) skipped by themselves, $fail failed"
[ "$fail" -eq 0 ]
