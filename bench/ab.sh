#!/usr/bin/env bash
# bench/ab.sh: two toastgate builds compared within the same minutes.
#
# bench/run.sh's ratios against the bare proxy move by several per cent
# from one hour to the next on these shared machines, more than a small
# change to the request path does: two runs an hour apart cannot say
# whether a change helped. This script runs both builds side by side, in
# interleaved rounds with the bare proxy (closed loop as run.sh's (d):
# wrk -t1 -cCONNS on GET servers/detail, one worker each, the order
# rotating by round), and reports B against A within each round.
#
#   (b) the bare proxy (plain release, as run.sh's);
#   (A) toastgate, the binary BIN_A;
#   (B) toastgate, the binary BIN_B.
# Both toastgates run run.sh's config (bench/toastgate.yaml: the full
# stack of (d)), on ports of their own, with the same JWT secret.
#
# Usage: bench/ab.sh BIN_A BIN_B   (about 4 minutes; builds the bare proxy
#        unless SKIP_BUILD=1). For a change: bench/pgo.sh OUT on each
#        commit (a git worktree per commit), then the two OUTs here.
# Knobs: ROUNDS=9 DURATION=8 WARMUP=2 CONNS=64 SKIP_BUILD=1
#        BARE_PROXY_BIN=path KEEP_TMP=1
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
ROUNDS=${ROUNDS:-9}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
usage() { echo "usage: bench/ab.sh BIN_A BIN_B (two toastgate binaries)" >&2; exit 2; }
(($# == 2)) || usage
BIN_A=$(realpath -e "$1" 2>/dev/null) || { echo "bench/ab.sh: no file at $1" >&2; usage; }
BIN_B=$(realpath -e "$2" 2>/dev/null) || { echo "bench/ab.sh: no file at $2" >&2; usage; }
for knob in ROUNDS DURATION WARMUP CONNS; do
    [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || { echo "bench/ab.sh: $knob must be a positive integer (got '${!knob}')" >&2; exit 2; }
done
((ROUNDS % 2 == 1)) || { echo "bench/ab.sh: ROUNDS must be odd, for a median (got $ROUNDS)" >&2; exit 2; }
START=$(date +%s)
# shellcheck source=bench/common.sh
. "$BENCH/common.sh"

bench_tools nginx wrk curl python3
# The bare proxy only: the toastgates are the arguments.
TOASTGATE_BIN=$BIN_A bench_build
for bin in "$BIN_A" "$BIN_B"; do
    [ -x "$bin" ] || die "$bin is not executable"
    "$bin" --version >/dev/null 2>&1 || die "$bin does not run as toastgate (--version failed)"
done
bench_scratch toastgate-ab
read -r P_UP P_A P_ADMIN_A P_B P_ADMIN_B P_BARE < <(free_ports 6)
bench_configs "$P_UP" "$P_A" "$P_ADMIN_A"
# B's config: A's on B's ports (its links point back at B).
sed -e "s|127.0.0.1:$P_A\$|127.0.0.1:$P_B|" -e "s|127.0.0.1:$P_ADMIN_A\$|127.0.0.1:$P_ADMIN_B|" \
    "$TMP/toastgate.yaml" >"$TMP/toastgate-b.yaml"
if ! grep -q "127.0.0.1:$P_B" "$TMP/toastgate-b.yaml" || ! grep -q "127.0.0.1:$P_ADMIN_B" "$TMP/toastgate-b.yaml"; then
    die "B's config did not get B's ports"
fi

bench_upstream "$P_UP"
bench_bare_proxy "$TMP/bare_proxy.log" "$P_BARE" "$P_UP"
BARE_PID=$STARTED
bench_toastgate "$BIN_A" "$TMP/toastgate.yaml" "$TMP/toastgate-a.log"
A_PID=$STARTED
bench_toastgate "$BIN_B" "$TMP/toastgate-b.yaml" "$TMP/toastgate-b.log"
B_PID=$STARTED
wait_ready "http://127.0.0.1:$P_ADMIN_A/readyz" 60
wait_ready "http://127.0.0.1:$P_ADMIN_B/readyz" 60
# One token for both: the same secret, issuer and audience.
JWT=$(RUST_LOG=error "$BIN_A" mint-token --config "$TMP/toastgate.yaml" --team bench --ttl 2h)

TARGETS=(b A B)
declare -A NAME=([b]="(b) bare hyper proxy" [A]="(A) toastgate $BIN_A" [B]="(B) toastgate $BIN_B")
declare -A PID=([b]=$BARE_PID [A]=$A_PID [B]=$B_PID)
declare -A URL=(
    [b]="http://127.0.0.1:$P_BARE/v2/$TENANT/servers/detail"
    [A]="http://127.0.0.1:$P_A/v2/bench/servers/detail"
    [B]="http://127.0.0.1:$P_B/v2/bench/servers/detail"
)
wait_ready "${URL[b]}"
# Both answer the same document, links pointed at each one's own port.
for t in A B; do
    curl -fsS --max-time 5 -H "Authorization: Bearer $JWT" "${URL[$t]}" >"$TMP/answer-$t.json" ||
        die "${NAME[$t]} did not answer GET servers/detail"
done
sed "s|127.0.0.1:$P_B/|127.0.0.1:$P_A/|g" "$TMP/answer-B.json" | cmp -s - "$TMP/answer-A.json" ||
    die "(A) and (B) answer different documents: not the same request path to compare (KEEP_TMP=1 keeps $TMP/answer-*.json)"

# shellcheck source=bench/rounds.sh
. "$BENCH/rounds.sh"

log "measuring: $ROUNDS rounds of (b) (A) (B), ${DURATION}s each, each round starting one target later"
run_rounds

cat <<EOF

## Two toastgate builds side by side: (B) against (A)

GET servers/detail (7.9 KB, 16 links), closed loop \`wrk -t1 -c$CONNS\`, ${WARMUP} s warm-up + ${DURATION} s, $ROUNDS interleaved rounds of (b), (A), (B); one worker each, the order rotating by round. Each cell is the median of that figure's rounds, every round's in brackets, in order (one row's cells may come from different rounds). User and system time are sampled at the kernel's tick: their sum is steadier than the split.

- (A): \`$BIN_A\` ($(sha256sum "$BIN_A" | cut -c1-12))
- (B): \`$BIN_B\` ($(sha256sum "$BIN_B" | cut -c1-12))

EOF
targets_table short
cat <<EOF

Taken within each round (the median of the rounds', then every round's):

| comparison | median (rounds) |
|---|---|
| throughput (B)/(A) | $(within RPS "B / A") |
| CPU per request (B)/(A) | $(within CPU "B / A") |
| CPU per request (B) - (A) | $(within CPU "B - A") us |
| user CPU per request (B) - (A) | $(within USR "B - A") us |
| throughput (A)/(b), (B)/(b) (run.sh's target: >= 0.90) | $(within RPS "A / b"); $(within RPS "B / b") |
| CPU per request (A)/(b), (B)/(b) (run.sh's target: <= 1.15) | $(within CPU "A / b"); $(within CPU "B / b") |

Rounds in which (B) had the lower CPU per request: $(for r in $(seq 1 "$ROUNDS"); do awk -v a="${CPU[A,$r]}" -v b="${CPU[B,$r]}" 'BEGIN { if (b < a) print 1 }'; done | wc -l) of $ROUNDS.

Bare proxy: plain release.
EOF
machine_lines
