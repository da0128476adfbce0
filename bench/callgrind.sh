#!/usr/bin/env bash
# bench/callgrind.sh: user-space instructions per request, toastgate against
# the bare hyper proxy, counted by valgrind's callgrind.
#
# Instructions, not seconds: the count is the same for the same binary and
# request whatever else this shared machine is doing, so a change of 1% shows
# (README, Benchmarks: every figure there called "callgrind" comes from here).
#
# The request is bench/run.sh's (d) and (b): GET /v2/bench/servers/detail
# with a JWT, 7.9 KB of JSON (compact) whose 16 links toastgate rewrites, from the same
# static nginx upstream. Each proxy runs twice under callgrind, one worker
# thread, serving N1 and then N2 requests one after the other (oha -c 1);
# per request = (count(N2) - count(N1)) / (N2 - N1), so start-up, shutdown
# and the first requests cancel out. quanta's one-time clock calibration
# (moka's clock, in toastgate only) runs for as long as its wall-clock window
# lasts, which varies: its instructions are taken out of each count.
#
# Usage: bench/callgrind.sh   (about 20 seconds after the build: bench/pgo.sh's
#                             6 minutes, or a plain release build's)
# toastgate is built as the Docker image builds it (bench/pgo.sh; see
# bench/run.sh), unless TOASTGATE_BUILD=plain.
#
# Knobs: N1=200 N2=3200 SKIP_BUILD=1 TOASTGATE_BUILD=pgo|plain
#        TOASTGATE_BIN=path BARE_PROXY_BIN=path KEEP_TMP=1
#        TEAM=bench-limited (run.sh's (e): the team with a rate-limit rule)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
N1=${N1:-200}
N2=${N2:-3200}
TEAM=${TEAM:-bench}
[[ $TEAM =~ ^(bench|bench-limited)$ ]] || { echo "bench/callgrind.sh: TEAM must be bench or bench-limited (got '$TEAM')" >&2; exit 2; }
for knob in N1 N2; do
    [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || { echo "bench/callgrind.sh: $knob must be a positive integer (got '${!knob}')" >&2; exit 2; }
done
((N2 > N1)) || { echo "bench/callgrind.sh: N2 must be larger than N1 (got $N1, $N2)" >&2; exit 2; }
START=$(date +%s)
# shellcheck source=bench/common.sh
. "$BENCH/common.sh"

bench_tools valgrind nginx curl python3
bench_build
bench_scratch toastgate-callgrind
read -r P_UP P_PROXY P_ADMIN < <(free_ports 3)
bench_configs "$P_UP" "$P_PROXY" "$P_ADMIN"

bench_upstream "$P_UP"
JWT=$(RUST_LOG=error "$TOASTGATE" mint-token --config "$TMP/toastgate.yaml" --team "$TEAM" --ttl 2h)
URL="http://127.0.0.1:$P_PROXY/v2/bench/servers/detail"

# NAME N: COUNT = the instructions of one whole run of NAME serving N
# requests, quanta's calibration taken out. (Not a $(...) subshell: the
# process it starts must stay in this shell's cleanup list and child.)
count_run() {
    local name=$1 n=$2 out="$TMP/callgrind-$1-$2.out" pid total calibration
    case $name in
    toastgate | toastgate_json_logs | toastgate_text_logs)
        # run.sh's toastgate logs at `warn` (no line per request); the
        # other two log as deployed: one line per request at `info`, JSON
        # (the Helm chart's default) or text (the binary's).
        local level=warn format=text
        case $name in
        toastgate_json_logs) level=info format=json ;;
        toastgate_text_logs) level=info format=text ;;
        esac
        bench_start "$TMP/$name-$n.log" \
            env RUST_LOG=$level TOASTGATE_LOG_FORMAT=$format TOKIO_WORKER_THREADS=1 \
            valgrind --tool=callgrind --callgrind-out-file="$out" \
            "$TOASTGATE" serve --config "$TMP/toastgate.yaml"
        pid=$STARTED
        wait_ready "http://127.0.0.1:$P_ADMIN/readyz" 120
        ;;
    bare_proxy)
        bench_start "$TMP/$name-$n.log" env TOKIO_WORKER_THREADS=1 \
            valgrind --tool=callgrind --callgrind-out-file="$out" \
            "$BARE_PROXY" "127.0.0.1:$P_PROXY" "127.0.0.1:$P_UP"
        pid=$STARTED
        # One request of its own: the same in both runs, so it cancels out.
        wait_ready "http://127.0.0.1:$P_PROXY/v2/$TENANT/servers/detail" 120
        ;;
    esac
    oha --no-tui -n "$n" -c 1 -H "Authorization: Bearer $JWT" "$URL" >"$TMP/oha-$name-$n.txt" ||
        die "$name: oha failed (see $TMP/oha-$name-$n.txt)"
    grep -q '\[200\] '"$n"' responses' "$TMP/oha-$name-$n.txt" ||
        die "$name: not all $n requests were answered 200 (see $TMP/oha-$name-$n.txt)"
    kill -TERM "$pid"
    wait "$pid" || true
    total=$(awk '/^(summary|totals):/ {print $2; exit}' "$out")
    [ -n "$total" ] || die "$name: no callgrind totals in $out"
    calibration=$(callgrind_annotate --inclusive=yes --threshold=100 "$out" 2>/dev/null |
        awk '!found && /quanta::Calibration::calibrate/ {gsub(",", "", $1); print $1; found = 1}')
    COUNT=$((total - ${calibration:-0}))
}

declare -A PER_REQUEST
for name in toastgate toastgate_json_logs toastgate_text_logs bare_proxy; do
    log "$name: $N1 requests under callgrind"
    count_run "$name" "$N1"
    c1=$COUNT
    log "$name: $N2 requests under callgrind"
    count_run "$name" "$N2"
    c2=$COUNT
    PER_REQUEST[$name]=$(((c2 - c1) / (N2 - N1)))
    log "$name: ${PER_REQUEST[$name]} instructions per request"
done

cat <<EOF

## callgrind: user-space instructions per request

GET /v2/bench/servers/detail as team $TEAM, one request at a time; (count of $N2 requests - count of $N1) / $((N2 - N1)).

| proxy | instructions per request |
|---|---:|
| toastgate, full stack (logs at warn, as bench/run.sh runs it) | ${PER_REQUEST[toastgate]} |
| toastgate, one JSON log line per request (info, the Helm chart's default) | ${PER_REQUEST[toastgate_json_logs]} |
| toastgate, one text log line per request (info, the binary's default) | ${PER_REQUEST[toastgate_text_logs]} |
| bare hyper proxy | ${PER_REQUEST[bare_proxy]} |
| toastgate / bare | $(awk -v a="${PER_REQUEST[toastgate]}" -v b="${PER_REQUEST[bare_proxy]}" 'BEGIN { printf "%.2f", a / b }') |

Builds: toastgate $TOASTGATE_BUILT; bare proxy plain release.
$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?") at $(date -u '+%Y-%m-%d %H:%M UTC'), valgrind $(valgrind --version | sed 's/^valgrind-//').
EOF
