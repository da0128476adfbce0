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

bench_upstream "$P_UP"
bench_bare_proxy "$TMP/bare_proxy.log" "$P_BARE" "$P_UP"
BARE_PID=$STARTED
bench_bare_proxy "$TMP/bare_proxy_spin.log" "$P_SPIN" "$P_UP" "$SPIN_NS"
SPIN_PID=$STARTED
bench_toastgate "$TOASTGATE" "$TMP/toastgate.yaml" "$TMP/toastgate.log"
TG_PID=$STARTED
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

# shellcheck source=bench/rounds.sh
. "$BENCH/rounds.sh"

log "measuring: $ROUNDS rounds of (b) (b+) (d), ${DURATION}s each, each round starting one target later"
run_rounds

cat <<EOF

## What toastgate's work costs at saturation: (d) against the bare proxy with a spin

GET servers/detail (7.9 KB, 16 links), closed loop \`wrk -t1 -c$CONNS\`, ${WARMUP} s warm-up + ${DURATION} s, $ROUNDS interleaved rounds of (b), (b+), (d); one worker each, the order rotating by round. Each cell is the median of that figure's rounds, every round's in brackets, in order (one row's cells may come from different rounds: user + system need not equal CPU). User and system time are sampled at the kernel's tick (each tick counts whole for the mode it lands in): their sum is steadier than the split.

EOF
targets_table
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
EOF
machine_lines
