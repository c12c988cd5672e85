#!/bin/sh
# travel.sh — the `cores` and `txn` sweeps of bench/mpbench.py, driven from the two benchmark
# binaries alone, for a machine with many cores and nothing installed: no python, no packages,
# only a POSIX sh, awk and the usual utilities (head, tail, tr, wc, mktemp, date, sleep).
#
#   on the build machine:  cmake -S . -B build-static -DMP_STATIC_BENCH=ON -DMP_BUILD_TESTS=OFF
#                          cmake --build build-static -j
#                          copy build-static/bench/mpserver, build-static/bench/loadgen and
#                          bench/travel.sh into one directory on the big machine
#   on the big machine:    ./travel.sh [-b BINDIR] [-o OUTDIR] [cores] [txn]
#   back home:             bench/mpbench.py --results OUTDIR replot      (PNGs in docs/img/)
#
# Runs what `mpbench.py cores txn` runs, the same way: every point runs its variants
# interleaved (A B A B ...), REPS times; each run starts a fresh mpserver pinned to the server
# CPUs, waits for its "port N", runs loadgen pinned to the other CPUs with -S (server CPU from
# /proc/PID/task/*/schedstat) and -X (server CPUs' busy time), stops the server with SIGTERM
# and reads its totals.  Writes, in OUTDIR (default ./results), the files mpbench.py writes
# for these sweeps, same columns: fig1c_cores_raw.csv, fig1c_cores.csv (medians),
# fig1a_txn_raw.csv, fig1a_txn.csv, table3.csv, and machine.txt.
#
#   cores  Fig. 1(c)/3: k = 1, 2, 4, ... up to half the CPUs for the server, the rest for the
#          load generator; CONNS*k connections, CORES_TXN txn/conn; baseline vs megapipe.
#   txn    Fig. 1(a) + Table 3: one server CPU; 1..128 txn/conn; baseline, +P, +P+B, megapipe.
#
# Knobs (environment; defaults as mpbench.py's): REPS=3, SECS=3 (measured seconds per run),
# WARMUP=0.5, CONNS=256 (per server core), CORES_TXN=10, TXNS="1 2 4 8 16 32 64 128",
# KS="1 2 4 ..." (server core counts of the cores sweep), SERVER_CPUS / LOADGEN_CPUS (CPU
# lists such as 0-7; SERVER_CPUS applies where the server has one core, as in mpbench.py),
# NICE=-5 (run both at that priority; root).  Servers listen on 127.0.0.1 only.

# Lists of CPUs, counts and option words are split on purpose (numbers only, no globs).
# shellcheck disable=SC2086,SC2046
set -eu

usage() { # the comment block at the top of this file
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

here=$(cd "$(dirname "$0")" && pwd)
bindir="" out=./results
for a in "$@"; do
    if [ "$a" = --help ]; then usage; exit 0; fi
done
while getopts b:o:h opt; do
    case $opt in
    b) bindir=$OPTARG ;;
    o) out=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
exps=""
for e in "$@"; do
    case $e in
    cores | txn) exps="$exps $e" ;;
    *) echo "travel.sh: unknown sweep '$e' (cores, txn)" >&2; exit 2 ;;
    esac
done
[ -n "$exps" ] || exps="cores txn"

# The binaries: -b DIR (DIR or DIR/bench), else next to this script, else ./ or ./bench.
if [ -n "$bindir" ]; then set -- "$bindir" "$bindir/bench"; else set -- "$here" . ./bench "$here/../build-static/bench"; fi
for d in "$@"; do
    if [ -x "$d/mpserver" ] && [ -x "$d/loadgen" ]; then bindir=$(cd "$d" && pwd); break; fi
done
if [ ! -x "$bindir/mpserver" ] || [ ! -x "$bindir/loadgen" ]; then
    echo "travel.sh: mpserver and loadgen not found (put them next to this script, or -b DIR)" >&2
    exit 2
fi
MPSERVER=$bindir/mpserver LOADGEN=$bindir/loadgen

REPS=${REPS:-3} SECS=${SECS:-3} WARMUP=${WARMUP:-0.5} CONNS=${CONNS:-256}
CORES_TXN=${CORES_TXN:-10} TXNS=${TXNS:-"1 2 4 8 16 32 64 128"}
mkdir -p "$out"
out=$(cd "$out" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/travel.XXXXXX")
spid=""
cleanup() {
    if [ -n "$spid" ]; then kill -KILL "$spid" 2>/dev/null || true; wait "$spid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

nap() { sleep 0.1 2>/dev/null || sleep 1; }
# "0-3,8" -> "0 1 2 3 8"
expand() {
    echo "$1" | awk -F, '{ s = ""; for (i = 1; i <= NF; i++) { n = split($i, r, "-");
        a = r[1] + 0; b = (n > 1 ? r[2] : r[1]) + 0;
        for (c = a; c <= b; c++) s = s (s == "" ? "" : " ") c } print s }'
}
commas() { echo "$*" | tr ' ' ','; }
count() { echo $#; }
allowed=$(expand "$(awk '/^Cpus_allowed_list:/ { print $2 }' /proc/self/status)")
nallowed=$(count $allowed)

# split K: the server gets the first K allowed CPUs, the load generator all the others (at
# least one); SERVER_CPUS / LOADGEN_CPUS override (SERVER_CPUS only for K = 1).  Sets srv, lg.
split_cpus() {
    if [ -n "${SERVER_CPUS:-}" ] && [ "$1" -eq 1 ]; then
        srv=$(expand "$SERVER_CPUS")
    else
        srv=$(echo $allowed | awk -v k="$1" '{ s = ""; for (i = 1; i <= k && i <= NF; i++) s = s (i > 1 ? " " : "") $i; print s }')
    fi
    if [ -n "${LOADGEN_CPUS:-}" ]; then
        lg=$(expand "$LOADGEN_CPUS")
    else
        lg=$(echo "$allowed" | awk -v srv=" $srv " '{ s = ""; for (i = 1; i <= NF; i++)
            if (index(srv, " " $i " ") == 0) s = s (s == "" ? "" : " ") $i; print s }')
    fi
    [ -n "$lg" ] || lg=$(echo $srv | awk '{ print $NF }')
}

variant_args() {
    case $1 in
    baseline) echo "-e baseline" ;;
    +P) echo "-e megapipe -P 1 -B 0 -L 0" ;;
    +P+B) echo "-e megapipe -P 1 -B 1 -L 0" ;;
    megapipe) echo "-e megapipe -P 1 -B 1 -L 1" ;;
    esac
}

nice_cmd() { if [ -n "${NICE:-}" ]; then echo "nice -n $NICE"; fi; }

# start_server CPUS EXTRA...: sets spid and port
start_server() {
    srv_cpus=$1
    shift
    : >"$tmp/srv.out" # before the server starts: never read a previous run's "port N"
    rm -f "$tmp/srv.res" "$tmp/lg.out"
    # shellcheck disable=SC2046
    $(nice_cmd) "$MPSERVER" "$@" -c "$srv_cpus" -d 300 -i 20 >"$tmp/srv.out" 2>"$tmp/srv.err" &
    spid=$!
    i=0
    while :; do
        line=$(head -n 1 "$tmp/srv.out")
        case $line in "port "*) port=${line#port }; return 0 ;; esac
        if ! kill -0 "$spid" 2>/dev/null || [ $i -ge 100 ]; then
            echo "server did not start: $line $(tail -n 3 "$tmp/srv.err")" >&2
            stop_server
            return 1
        fi
        i=$((i + 1))
        nap
    done
}

# stop_server: SIGTERM, wait (SIGKILL after 10 s); leaves the server's "result" line in $tmp/srv.res
stop_server() {
    kill -TERM "$spid" 2>/dev/null || true
    (
        i=0
        while [ $i -lt 100 ] && kill -0 "$spid" 2>/dev/null; do i=$((i + 1)); nap; done
        if [ $i -ge 100 ]; then kill -KILL "$spid" 2>/dev/null || true; fi
    ) &
    wd=$!
    wait "$spid" 2>/dev/null || true
    wait "$wd" 2>/dev/null || true
    spid=""
    grep '^result ' "$tmp/srv.out" | tail -n 1 >"$tmp/srv.res" || true
}

# Engine features, as mpbench.py's machine(): a one-shot megapipe server, stopped at once.
machine_txt() {
    nproc=$(count $(expand "$(cat /sys/devices/system/cpu/online)"))
    model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    engine="?" feats="?" miss="?"
    first=$(echo $allowed | awk '{ print $1 }')
    if start_server "$first" $(variant_args megapipe); then
        nap; nap # features such as the registered ring are set at the first submit
        stop_server
        set -- $(awk '{ e = "?"; f = 0; m = 0; for (i = 2; i <= NF; i++) { split($i, kv, "=");
            if (kv[1] == "mp_engine") e = kv[2]; else if (kv[1] == "features") f = kv[2];
            else if (kv[1] == "missing") m = kv[2] } print e, f, m }' "$tmp/srv.res")
        engine=${1:-?}
        feats=$(feature_names "${2:-0}") miss=$(feature_names "${3:-0}")
    fi
    printf 'machine: nproc=%s (allowed %s), kernel %s, CPU %s\n' "$nproc" "$nallowed" \
        "$(uname -r)" "${model:-?}"
    printf 'engine: %s; features: %s; missing: %s\n' "$engine" "$feats" "$miss"
}
feature_names() {
    fn=""
    for b in 0x001:SINGLE_ISSUER 0x002:DEFER_TASKRUN 0x004:REGISTERED_RING \
        0x008:DIRECT_DESCRIPTORS 0x010:MULTISHOT_ACCEPT 0x020:FIXED_FD_INSTALL 0x040:BUF_RING \
        0x080:RECV_MULTISHOT 0x100:NODROP 0x200:EXT_ARG 0x400:POLL_MULTISHOT; do
        if [ $(($1 & ${b%%:*})) -ne 0 ]; then fn="$fn${fn:+ }${b#*:}"; fi
    done
    echo "${fn:--}"
}

RAWHDR="variant,conns,txn,size,srv_cores,rep,tps,p50_us,p99_us,p999_us,errors,srv_cpu_us_txn,srv_util,lg_cpu_us_txn,lg_util,sys_txn,core_us_txn,core_si_us_txn,others_cpus,sqes_per_submit,batch_hist"
MEDHDR="variant,conns,txn,size,srv_cores,reps,tps,p50_us,p99_us,p999_us,errors,srv_cpu_us_txn,srv_util,lg_cpu_us_txn,lg_util,sys_txn,core_us_txn,core_si_us_txn,others_cpus"

# run_point VARIANT CONNS TXN SIZE REP RAWCSV (srv, lg set): one run, one raw row
run_point() {
    start_server "$(commas $srv)" $(variant_args "$1") -s "$4" || return 1
    # shellcheck disable=SC2046
    $(nice_cmd) "$LOADGEN" -p "$port" -C "$(commas $lg)" -c "$2" -n "$3" -s "$4" -d "$SECS" \
        -w "$WARMUP" -S "$spid" -X "$(commas $srv)" >"$tmp/lg.out" 2>"$tmp/lg.err" || true
    stop_server
    if ! grep -q '^result ' "$tmp/lg.out"; then
        echo "loadgen failed: $(tail -n 3 "$tmp/lg.err")" >&2
        return 1
    fi
    if [ ! -s "$tmp/srv.res" ]; then
        echo "server printed no result: $(tail -n 3 "$tmp/srv.err")" >&2
        return 1
    fi
    grep '^result ' "$tmp/lg.out" | tail -n 1 | cat - "$tmp/srv.res" | awk -v variant="$1" \
        -v conns="$2" -v txn="$3" -v size="$4" -v rep="$5" -v ncores="$(count $srv)" '
        function num(s) { return s + 0 }
        NR == 1 { for (i = 2; i <= NF; i++) { split($i, kv, "="); L[kv[1]] = kv[2] } }
        NR == 2 { for (i = 2; i <= NF; i++) { split($i, kv, "="); S[kv[1]] = kv[2] } }
        END {
            errors = num(L["errors"]) + num(L["connect_errors"]) + num(L["timeouts"])
            util = num(L["server_cpu_s"]) / num(L["seconds"]) / ncores
            st = num(S["transactions"])
            sys = st ? sprintf("%.10g", num(S["syscalls"]) / st) : "nan"
            if ("sqes" in S) {
                sub_ = num(S["submits"])
                spb = sub_ ? sprintf("%.10g", num(S["sqes"]) / sub_) : "0"
                bh = S["batch_hist"]
                if (index(bh, ",")) bh = "\"" bh "\""
            } else { spb = ""; bh = "" }
            printf "%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%d,%s,%.10g,%s,%s,%s,%s,%s,%s,%s,%s\n",
                variant, conns, txn, size, ncores, rep, L["tps"], L["p50_us"], L["p99_us"],
                L["p999_us"], errors, L["server_cpu_us_per_txn"], util, L["lg_cpu_us_per_txn"],
                L["lg_util"], sys, L["core_us_per_txn"], L["core_softirq_us_per_txn"],
                L["others_cpus"], spb, bh
        }' >>"$6"
    # progress, as mpbench.py prints it
    tail -n 1 "$6" | awk -F, -v progress="$progress" '{ printf "  %s %-9s conns=%-5d txn=%-4d size=%-6d cores=%d  %9.0f txn/s  srv %6.2f us/txn  %5.2f sys/txn  lg %3.0f%%  p99 %.0f us  others %.2f CPUs%s\n",
        progress, $1, $2, $3, $4, $5, $7, $12, $16, 100 * $15, $9, $19, ($11 > 0 ? "  errors=" $11 : "") }' >&2
}

# medians RAWCSV MEDCSV: one row per (point, variant), in the order first run (as mpbench.py)
medians() {
    echo "$MEDHDR" >"$2"
    awk -F, 'NR > 1 {
            k = $1 "," $2 "," $3 "," $4 "," $5
            if (!(k in n)) { order[++nk] = k; n[k] = 0 }
            n[k]++
            for (f = 7; f <= 19; f++) v[k, f, n[k]] = $f
        }
        END {
            for (o = 1; o <= nk; o++) {
                k = order[o]; c = n[k]; line = k "," c
                for (f = 7; f <= 19; f++) {
                    for (i = 1; i <= c; i++) a[i] = v[k, f, i] + 0
                    for (i = 2; i <= c; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
                    m = (c % 2) ? a[(c + 1) / 2] : (a[c / 2] + a[c / 2 + 1]) / 2
                    line = line "," sprintf("%.10g", m)
                }
                print line
            }
        }' "$1" >>"$2"
}

# sweep NAME "VARIANTS" then points from stdin ("K CONNS TXN SIZE" per line)
sweep() {
    name=$1 variants=$2
    raw=$out/${name}_raw.csv
    echo "$RAWHDR" >"$raw"
    cat >"$tmp/points"
    total=$(($(wc -l <"$tmp/points") * REPS * $(count $variants)))
    nrun=0 t0=$(date +%s)
    while read -r k conns txn size; do
        split_cpus "$k"
        rep=0
        while [ $rep -lt "$REPS" ]; do
            for v in $variants; do
                nrun=$((nrun + 1))
                progress="[$nrun/$total $(($(date +%s) - t0))s]"
                run_point "$v" "$conns" "$txn" "$size" "$rep" "$raw" </dev/null ||
                    echo "  $progress run failed ($v, $k server cores, $conns conns, $txn txn/conn)" >&2
            done
            rep=$((rep + 1))
        done
    done <"$tmp/points"
    medians "$raw" "$out/$name.csv"
    echo "medians: $out/$name.csv (raw runs: $raw)"
}

sweep_cores() {
    n=$nallowed
    half=$((n / 2))
    [ $half -ge 1 ] || half=1
    ks=${KS:-}
    if [ -z "$ks" ]; then
        for k in 1 2 4 8 16 32 64 128 256; do
            if [ $k -le $half ]; then ks="$ks${ks:+ }$k"; fi
        done
    fi
    echo "== cores: server cores $ks, $CONNS connections per server core, $CORES_TXN txn/conn"
    for k in $ks; do echo "$k $((CONNS * k)) $CORES_TXN 64"; done | sweep fig1c_cores "baseline megapipe"
    awk -F, 'NR > 1 { printf "  %2d cores  %-9s %10.0f txn/s  %7.2f us/txn  %6.3f sys/txn  srv CPU %3.0f%%  lg CPU %3.0f%%\n",
        $5, $1, $7, $12, $16, 100 * $13, 100 * $15 }' "$out/fig1c_cores.csv"
}

sweep_txn() {
    split_cpus 1
    echo "== txn: server CPU $(commas $srv), load generator CPUs $(commas $lg), $CONNS connections"
    for t in $TXNS; do echo "1 $CONNS $t 64"; done | sweep fig1a_txn "baseline +P +P+B megapipe"
    # Table 3: change against the baseline, %: throughput, then server CPU per txn saved
    awk -F, -v txns="$TXNS" 'NR > 1 { tps[$1, $3] = $7; cpu[$1, $3] = $12; have[$1, $3] = 1 }
        END {
            print "txn,metric,+P,+P+B,+P+B+L"
            nt = split(txns, T, " ")
            for (m = 1; m <= 2; m++) for (i = 1; i <= nt; i++) {
                t = T[i]; line = t "," (m == 1 ? "tps" : "srv_cpu_us_txn")
                for (j = 1; j <= 3; j++) {
                    v = (j == 1 ? "+P" : j == 2 ? "+P+B" : "megapipe")
                    if (!have["baseline", t] || !have[v, t]) { line = line ",nan"; continue }
                    if (m == 1) x = (tps["baseline", t] > 0) ? 100 * (tps[v, t] / tps["baseline", t] - 1) : "nan"
                    else x = (cpu["baseline", t] > 0) ? 100 * (1 - cpu[v, t] / cpu["baseline", t]) : "nan"
                    line = line "," (x == "nan" ? x : sprintf("%.1f", x))
                }
                print line
            }
        }' "$out/fig1a_txn.csv" >"$out/table3.csv"
    echo "Table 3 (improvement over baseline, %; throughput, then server CPU per txn saved): $out/table3.csv"
    cat "$out/table3.csv"
}

machine_txt >"$out/machine.txt"
cat "$out/machine.txt"
for e in $exps; do
    echo
    case $e in
    cores) sweep_cores ;;
    txn) sweep_txn ;;
    esac
done
echo
echo "done: $out  (plot it with: bench/mpbench.py --results DIR replot)"
