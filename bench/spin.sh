#!/usr/bin/env bash
# bench/spin.sh: what toastgate's own work costs at saturation, compared
# with the same amount of pure user-space work added to the bare proxy.
#
# bench/run.sh's closed loop runs each proxy as fast as it goes, on a
# machine whose 2 cores it shares with the load generator and the
# upstream. There toastgate pays more kernel time per request than the
# bare proxy although it makes the same system calls per request; at an
# equal offered rate it does not. This script asks whether that kernel
# time is the gateway's or the rate's: three targets, interleaved in each
# round, closed loop as in run.sh (wrk -t1 -cCONNS, one worker each):
#   (b)  the bare proxy;
#   (b+) the same bare proxy busy-waiting SPIN_NS in user space on every
#        request (bare_proxy.rs's SPIN_NS: no socket, no system call);
#   (d)  toastgate, full stack, as run.sh's (d).
# For each: req/s, user and system CPU per request (/proc/PID/stat), and
# the machine's inter-processor interrupts per request (RES + CAL in
# /proc/interrupts, all CPUs: waking a task on an idle CPU sends one). If
# (b+)'s system time rises over (b)'s by about what (d)'s does, the kernel
# time toastgate adds at saturation is the cost of running slower, not of
# anything the gateway does in the kernel.
#
# Usage: bench/spin.sh   (about 2.5 minutes after the build)
# Knobs: ROUNDS=5 DURATION=8 WARMUP=2 CONNS=64 SPIN_NS=2000 SKIP_BUILD=1
#        TOASTGATE_BUILD=pgo|plain TOASTGATE_BIN=path BARE_PROXY_BIN=path
#        KEEP_TMP=1
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
SPIN_NS=${SPIN_NS:-2000}
for knob in ROUNDS DURATION WARMUP CONNS SPIN_NS; do
    [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || { echo "bench/spin.sh: $knob must be a positive integer (got '${!knob}')" >&2; exit 2; }
done
((ROUNDS % 2 == 1)) || { echo "bench/spin.sh: ROUNDS must be odd, for a median (got $ROUNDS)" >&2; exit 2; }
START=$(date +%s)
# shellcheck source=bench/common.sh
. "$BENCH/common.sh"

bench_tools nginx wrk curl python3
bench_build
bench_scratch toastgate-spin
read -r P_UP P_PROXY P_ADMIN P_BARE P_SPIN < <(free_ports 5)
bench_configs "$P_UP" "$P_PROXY" "$P_ADMIN"

nginx -p "$TMP" -e "$TMP/nginx-upstream.error.log" -c "$TMP/nginx-upstream.conf" &
PIDS+=($!)
wait_ready "http://127.0.0.1:$P_UP/v2/$TENANT/servers/detail"
TOKIO_WORKER_THREADS=1 "$BARE_PROXY" "127.0.0.1:$P_BARE" "127.0.0.1:$P_UP" 2>"$TMP/bare_proxy.log" &
PIDS+=($!)
BARE_PID=$!
TOKIO_WORKER_THREADS=1 "$BARE_PROXY" "127.0.0.1:$P_SPIN" "127.0.0.1:$P_UP" "$SPIN_NS" 2>"$TMP/bare_proxy_spin.log" &
PIDS+=($!)
SPIN_PID=$!
RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$TOASTGATE" serve --config "$TMP/toastgate.yaml" 2>"$TMP/toastgate.log" &
PIDS+=($!)
TG_PID=$!
wait_ready "http://127.0.0.1:$P_ADMIN/readyz" 60
# A bare_proxy built before SPIN_NS would ignore it, and (b+) would be (b).
grep -q "spinning $SPIN_NS ns per request" "$TMP/bare_proxy_spin.log" ||
    die "$BARE_PROXY does not spin (no 'spinning $SPIN_NS ns per request' in its log): rebuild it (drop SKIP_BUILD)"
JWT=$(RUST_LOG=error "$TOASTGATE" mint-token --config "$TMP/toastgate.yaml" --team bench --ttl 2h)

TARGETS=(b s d)
declare -A NAME=([b]="(b) bare hyper proxy" [s]="(b+) bare hyper proxy + ${SPIN_NS} ns user-space spin per request" [d]="(d) toastgate, full stack")
declare -A PID=([b]=$BARE_PID [s]=$SPIN_PID [d]=$TG_PID)
declare -A URL=(
    [b]="http://127.0.0.1:$P_BARE/v2/$TENANT/servers/detail"
    [s]="http://127.0.0.1:$P_SPIN/v2/$TENANT/servers/detail"
    [d]="http://127.0.0.1:$P_PROXY/v2/bench/servers/detail"
)
# (d) answers only with a JWT: its readiness is /readyz, above.
wait_ready "${URL[b]}"
wait_ready "${URL[s]}"

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
# Rescheduling and function-call interrupts so far, all CPUs summed.
ipis() { awk '$1 == "RES:" || $1 == "CAL:" { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i } END { print s + 0 }' /proc/interrupts; }
grep -qE '^ *(RES|CAL):' /proc/interrupts || die "/proc/interrupts has no RES/CAL lines on this kernel"

declare -A RPS USR SYS CPU IPI
measure() {
    local t=$1 r=$2 out user0 sys0 user1 sys1 ipi0 ipi1 requests
    wrk -t1 -c"$CONNS" -d"${WARMUP}s" -H "Authorization: Bearer $JWT" "${URL[$t]}" >/dev/null
    read -r user0 sys0 < <(cpu_ticks "${PID[$t]}")
    ipi0=$(ipis)
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "Authorization: Bearer $JWT" "${URL[$t]}")
    ipi1=$(ipis)
    read -r user1 sys1 < <(cpu_ticks "${PID[$t]}")
    ! grep -q 'Non-2xx' <<<"$out" || die "${NAME[$t]}: non-2xx answers under load: $out"
    if grep -q 'Socket errors' <<<"$out"; then log "${NAME[$t]}: $(grep 'Socket errors' <<<"$out")"; fi
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    ((requests > 0)) || die "${NAME[$t]}: no requests answered"
    RPS[$t,$r]=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
    read -r "USR[$t,$r]" "SYS[$t,$r]" "CPU[$t,$r]" "IPI[$t,$r]" < <(awk \
        -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) -v i=$((ipi1 - ipi0)) -v n="$requests" -v hz="$CLK_TCK" \
        'BEGIN { printf "%.2f %.2f %.2f %.3f\n", u / hz * 1e6 / n, s / hz * 1e6 / n, (u + s) / hz * 1e6 / n, i / n }')
    log "round $r ${NAME[$t]}: ${RPS[$t,$r]} req/s; per request user ${USR[$t,$r]} us, sys ${SYS[$t,$r]} us, IPIs ${IPI[$t,$r]}"
}

log "measuring: $ROUNDS rounds of (b) (b+) (d), ${DURATION}s each, each round starting one target later"
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
MEASURE_START=$(date +%s)
for r in $(seq 1 "$ROUNDS"); do
    # The order rotates (b b+ d, b+ d b, d b b+, ...): no target always
    # follows the same one.
    for i in 0 1 2; do
        measure "${TARGETS[$(((r - 1 + i) % 3))]}" "$r"
    done
done
MEASURED=$(($(date +%s) - MEASURE_START))

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END { print v[(NR + 1) / 2] }'; }
# column ARRAY TARGET: the median of ARRAY's rounds for TARGET, then every
# round's in brackets, in order. Each figure is its own median: one row's
# figures may come from different rounds (user + system need not be CPU).
column() {
    local -n a=$1
    local t=$2 r
    local -a v=()
    for r in $(seq 1 "$ROUNDS"); do v+=("${a[$t,$r]}"); done
    echo "$(median "${v[@]}") (${v[*]})"
}
# within ARRAY EXPR: EXPR (awk, over b, s and d: the targets' figures in
# ARRAY) taken within each round; the median of the rounds', then every
# round's.
within() {
    local -n a=$1
    local expr=$2 r
    local -a v=()
    for r in $(seq 1 "$ROUNDS"); do
        v+=("$(awk -v b="${a[b,$r]}" -v s="${a[s,$r]}" -v d="${a[d,$r]}" "BEGIN { printf \"%.2f\", $expr }")")
    done
    echo "$(median "${v[@]}") (${v[*]})"
}

cat <<EOF

## What toastgate's work costs at saturation: (d) against the bare proxy with a spin

GET servers/detail (7.9 KB, 16 links), closed loop \`wrk -t1 -c$CONNS\`, ${WARMUP} s warm-up + ${DURATION} s, $ROUNDS interleaved rounds of (b), (b+), (d); one worker each, the order rotating by round. Each cell is the median of that figure's rounds, every round's in brackets, in order (one row's cells may come from different rounds: user + system need not equal CPU). User and system time are sampled at the kernel's tick (each tick counts whole for the mode it lands in): their sum is steadier than the split.

| target | req/s | user CPU/req (us) | system CPU/req (us) | CPU/req (us) | IPIs/req |
|---|---|---|---|---|---|
EOF
for t in "${TARGETS[@]}"; do
    echo "| ${NAME[$t]} | $(column RPS "$t") | $(column USR "$t") | $(column SYS "$t") | $(column CPU "$t") | $(column IPI "$t") |"
done
cat <<EOF

Taken within each round (the median of the rounds' differences, then every round's):

| comparison | median (rounds) |
|---|---|
| user CPU/req the spin adds, (b+) - (b) | $(within USR "s - b") us |
| system CPU/req that adds, (b+) - (b) | $(within SYS "s - b") us |
| user CPU/req toastgate adds, (d) - (b) | $(within USR "d - b") us |
| system CPU/req toastgate adds, (d) - (b) | $(within SYS "d - b") us |
| CPU/req the spin adds, (b+) - (b) | $(within CPU "s - b") us |
| CPU/req toastgate adds, (d) - (b) | $(within CPU "d - b") us |
| CPU/req (d) - (b+) | $(within CPU "d - s") us |
| throughput (d)/(b+) | $(within RPS "d / s") |
| throughput (d)/(b) | $(within RPS "d / b") |
| IPIs per request (d) - (b), (b+) - (b) | $(within IPI "d - b"); $(within IPI "s - b") |

Builds: toastgate $TOASTGATE_BUILT; bare proxy plain release (the same binary for (b) and (b+)).
Machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), Linux $(uname -r), $(date -u '+%Y-%m-%d %H:%M UTC');
load average before measuring: $LOAD; measuring took ${MEASURED}s.
EOF
