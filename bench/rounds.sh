# shellcheck shell=bash disable=SC2034
# (SC2034: what this file sets is read by the script that sources it.)
# bench/rounds.sh: interleaved closed-loop rounds, what bench/spin.sh and
# bench/ab.sh share. Sourced after bench/common.sh, with these set:
#   TARGETS  the targets' one-letter keys, in the first round's order;
#   NAME PID URL  associative arrays by key: the name in the report, the
#            process whose CPU is counted, the URL wrk loads;
#   JWT CONNS WARMUP DURATION ROUNDS.
# Each target runs closed loop as bench/run.sh's (wrk -t1 -cCONNS): req/s,
# user and system CPU per request of its process (/proc/PID/stat), and the
# machine's inter-processor interrupts per request (RES + CAL in
# /proc/interrupts, all CPUs: waking a task on an idle CPU sends one).

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
# Rescheduling and function-call interrupts so far, all CPUs summed.
ipis() { awk '$1 == "RES:" || $1 == "CAL:" { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i } END { print s + 0 }' /proc/interrupts; }
grep -qE '^ *(RES|CAL):' /proc/interrupts || die "/proc/interrupts has no RES/CAL lines on this kernel"

declare -A RPS USR SYS CPU IPI
# measure TARGET ROUND: one closed-loop run of TARGET, its figures stored
# under [TARGET,ROUND].
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

# run_rounds: ROUNDS rounds of every target; the order rotates by one each
# round (a b c, b c a, c a b, ...): no target always follows the same one.
# Sets LOAD (the load average before) and MEASURED (seconds).
run_rounds() {
    local n=${#TARGETS[@]} r i
    LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
    local start
    start=$(date +%s)
    for r in $(seq 1 "$ROUNDS"); do
        for ((i = 0; i < n; i++)); do
            measure "${TARGETS[$(((r - 1 + i) % n))]}" "$r"
        done
    done
    MEASURED=$(($(date +%s) - start))
}

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
# within ARRAY EXPR: EXPR (awk, over the targets' keys as variables: their
# figures in ARRAY) taken within each round; the median of the rounds',
# then every round's.
within() {
    local -n a=$1
    local expr=$2 r t
    local -a v=() vars
    for r in $(seq 1 "$ROUNDS"); do
        vars=()
        for t in "${TARGETS[@]}"; do vars+=(-v "$t=${a[$t,$r]}"); done
        v+=("$(awk "${vars[@]}" "BEGIN { printf \"%.2f\", $expr }")")
    done
    echo "$(median "${v[@]}") (${v[*]})"
}

# targets_table [short]: the table of every target's figures, each cell
# the median of its rounds, every round's in brackets; `short` names a
# target by its tag alone ("(b)").
targets_table() {
    local t label
    echo "| target | req/s | user CPU/req (us) | system CPU/req (us) | CPU/req (us) | IPIs/req |"
    echo "|---|---|---|---|---|---|"
    for t in "${TARGETS[@]}"; do
        label=${NAME[$t]}
        [ "${1:-}" = short ] && label=${label%% *}
        echo "| $label | $(column RPS "$t") | $(column USR "$t") | $(column SYS "$t") | $(column CPU "$t") | $(column IPI "$t") |"
    done
}

# machine_lines: the machine, the time, the load average before measuring
# and how long measuring took.
machine_lines() {
    echo "Machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), Linux $(uname -r), $(date -u '+%Y-%m-%d %H:%M UTC');"
    echo "load average before measuring: $LOAD; measuring took ${MEASURED}s."
}
