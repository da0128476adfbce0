#!/usr/bin/env bash
# bench/run.sh: toastgate against the floors, in one run, on one machine.
#
#   (a) nginx static upstream, direct         (what the load generator can do)
#   (b) bare hyper reverse proxy               (one proxy hop, no extra work)
#   (c) nginx proxy_pass, upstream keep-alive  (the usual reverse proxy)
#   (d) toastgate serve, full stack            (JWT, policy, token, links)
#   (e) (d) plus a per-team rate-limit rule on the request's Action, in process
#   (f) the same rule on Redis (a real redis-server started here)
#   (g) the v1.0 surface: GET /v1.0/appkeys/{appkey}/instances, translated
#   (h) (d) with 10,000 distinct caller JWTs in rotation
#   (i) (d) as deployed: one JSON log line per request at `info` (the Helm
#       chart's default; (d) and the others run at `warn`), to a file
#
# Every proxy gets one worker; the load generator gets one thread. Each target
# is warmed up, then measured closed-loop (wrk: max req/s, p50, p99) in
# ROUNDS interleaved rounds (a..i, a..i, ...): this shared machine's speed
# drifts by tens of percent within minutes, so each ratio is taken within a
# round (targets measured seconds apart) and the median round's is reported;
# then
# open-loop at half of (b)'s max rate (oha --latency-correction: p99 without
# coordinated omission; (b) and (d) in ROUNDS rounds, the p99 (d) adds taken
# within each), plus (b) and (d) at half of (d)'s max rate. Last, RSS
# with 10,000 idle keep-alive connections (toastgate; bare_proxy and nginx for
# reference), 3 s after they open and again after each is used once more,
# and toastgate's RSS 60 s after they close. Ends with a markdown
# table for the README, one check per target.
#
# toastgate is built as the Docker image builds it: the production features
# (no simulator), profile-guided by bench/pgo.sh (a debug build of the
# simulator, two release builds and about 15 s of training against it,
# about 6 minutes); the bare proxy is a plain release build.
#
# Usage: bench/run.sh   (measuring takes about 11 minutes; the first run also
#                        installs nginx, wrk and oha, and builds in release)
# Knobs: ROUNDS=5 DURATION=5 (closed loop, per round; open loop: 2x) WARMUP=2
#        CONNS=64 IDLE_CONNS=10000 KEEP_TMP=1 SKIP_BUILD=1
#        TOASTGATE_BUILD=pgo|plain (plain: a release build of the same
#        features, not profile-guided)
#        TOASTGATE_BIN=path, BARE_PROXY_BIN=path (other builds, for A/B
#        experiments)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
IDLE_CONNS=${IDLE_CONNS:-10000}
for knob in ROUNDS DURATION WARMUP CONNS IDLE_CONNS; do
    [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || { echo "bench/run.sh: $knob must be a positive integer (got '${!knob}')" >&2; exit 2; }
done
# An odd count, so that each median is one round's figure.
((ROUNDS % 2 == 1)) || { echo "bench/run.sh: ROUNDS must be odd (got $ROUNDS)" >&2; exit 2; }
OPEN_DURATION=$((DURATION * 2))
START=$(date +%s)
# shellcheck source=bench/common.sh
. "$BENCH/common.sh"

# --- tools, build, scratch space --------------------------------------------

bench_tools nginx wrk curl python3 redis-server redis-cli:redis-tools
bench_build
bench_scratch toastgate-bench

# 10,000 idle connections need a descriptor each, in toastgate and in the
# client; every process started below inherits this limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# Free loopback ports, chosen by the kernel.
read -r P_UP P_BARE P_NGX P_TG P_ADMIN P_TG2 P_ADMIN2 P_REDIS P_TG3 P_ADMIN3 < <(free_ports 10)

# --- configs ----------------------------------------------------------------

bench_configs "$P_UP" "$P_TG" "$P_ADMIN"
sed -e "s|@TMP@|$TMP|g" -e "s|@PORT@|$P_NGX|g" -e "s|@UPSTREAM@|127.0.0.1:$P_UP|g" \
    "$BENCH/nginx-proxy.conf.tmpl" >"$TMP/nginx-proxy.conf"
# (f): the same gateway with its rate limits on Redis.
sed -e "s|127.0.0.1:$P_TG|127.0.0.1:$P_TG2|g" -e "s|127.0.0.1:$P_ADMIN|127.0.0.1:$P_ADMIN2|g" \
    "$TMP/toastgate.yaml" >"$TMP/toastgate-redis.yaml"
sed -e "s|127.0.0.1:$P_TG|127.0.0.1:$P_TG3|g" -e "s|127.0.0.1:$P_ADMIN|127.0.0.1:$P_ADMIN3|g" \
    "$TMP/toastgate.yaml" >"$TMP/toastgate-logs.yaml"
printf '%s\n' 'rate_limit:' '  backend: redis' \
    '  redis: { url_env: TG_BENCH_REDIS_URL, timeout: 50ms, replicas: 1 }' >>"$TMP/toastgate-redis.yaml"

# --- processes --------------------------------------------------------------

log "starting nginx upstream :$P_UP, bare_proxy :$P_BARE, nginx proxy :$P_NGX, toastgate :$P_TG"
bench_upstream "$P_UP"
bench_bare_proxy "$TMP/bare_proxy.log" "$P_BARE" "$P_UP"
BARE_PID=$STARTED
bench_start - nginx -p "$TMP" -e "$TMP/nginx-proxy.error.log" -c "$TMP/nginx-proxy.conf"
NGX_PID=$STARTED
bench_toastgate "$TOASTGATE" "$TMP/toastgate.yaml" "$TMP/toastgate.log"
TG_PID=$STARTED
# (redis logs to its standard output unless given a file: this script's
# standard output is the report.)
bench_start "$TMP/redis.stderr" redis-server --port "$P_REDIS" --bind 127.0.0.1 \
    --save "" --appendonly no --daemonize no --logfile "$TMP/redis.log"
for _ in $(seq 1 100); do redis-cli -p "$P_REDIS" ping >/dev/null 2>&1 && break; sleep 0.1; done
bench_toastgate "$TOASTGATE" "$TMP/toastgate-redis.yaml" "$TMP/toastgate-redis.log" \
    TG_BENCH_REDIS_URL="redis://127.0.0.1:$P_REDIS"
TG2_PID=$STARTED
bench_toastgate "$TOASTGATE" "$TMP/toastgate-logs.yaml" "$TMP/toastgate-logs.log" \
    RUST_LOG=info TOASTGATE_LOG_FORMAT=json
TG3_PID=$STARTED

wait_ready "http://127.0.0.1:$P_BARE/v2/$TENANT/servers/detail"
wait_ready "http://127.0.0.1:$P_NGX/v2/$TENANT/servers/detail"
# readyz answers 200 once toastgate holds the project's upstream token.
wait_ready "http://127.0.0.1:$P_ADMIN/readyz"
wait_ready "http://127.0.0.1:$P_ADMIN2/readyz"
wait_ready "http://127.0.0.1:$P_ADMIN3/readyz"

mint() { RUST_LOG=error "$TOASTGATE" mint-token --config "$TMP/toastgate.yaml" --team "$1" --ttl 2h; }
JWT=$(mint bench)
JWT_LIMITED=$(mint bench-limited)
# (h): 10,000 distinct valid JWTs of team `bench`, one per line, HS256 with
# the run's secret (what mint-token does, without 10,000 process starts).
python3 "$BENCH/mint_many.py" "$TMP/jwt-hs256.key" 10000 >"$TMP/jwts.txt"
# wrk sends each request with the next JWT of the file.
sed -e "s|@JWTS@|$TMP/jwts.txt|" "$BENCH/rotate.lua.tmpl" >"$TMP/rotate.lua"
AUTH="Authorization: Bearer $JWT"
# Every target gets the same request, JWT included (ignored by a-c); (e) and
# (f) with the JWT of the rate-limited team, (h) with the rotating JWTs.
REQ_PATH=/v2/bench/servers/detail
declare -A URL=(
    [a]="http://127.0.0.1:$P_UP$REQ_PATH"
    [b]="http://127.0.0.1:$P_BARE$REQ_PATH"
    [c]="http://127.0.0.1:$P_NGX$REQ_PATH"
    [d]="http://127.0.0.1:$P_TG$REQ_PATH"
    [e]="http://127.0.0.1:$P_TG$REQ_PATH"
    [f]="http://127.0.0.1:$P_TG2$REQ_PATH"
    [g]="http://127.0.0.1:$P_TG/v1.0/appkeys/BenchAppKey/instances"
    [h]="http://127.0.0.1:$P_TG$REQ_PATH"
    [i]="http://127.0.0.1:$P_TG3$REQ_PATH"
)
declare -A HDR=(
    [a]="$AUTH" [b]="$AUTH" [c]="$AUTH" [d]="$AUTH"
    [e]="Authorization: Bearer $JWT_LIMITED" [f]="Authorization: Bearer $JWT_LIMITED"
    [g]="$AUTH" [h]="$AUTH" [i]="$AUTH"
)
declare -A WRK_ARGS=([h]="-s $TMP/rotate.lua")
# The process that does each target's work (nginx: its one worker, not the master).
declare -A WORKER=(
    [a]=$(pgrep -P "$UP_PID" | head -n1)
    [b]=$BARE_PID
    [c]=$(pgrep -P "$NGX_PID" | head -n1)
    [d]=$TG_PID [e]=$TG_PID [f]=$TG2_PID [g]=$TG_PID [h]=$TG_PID [i]=$TG3_PID
)
declare -A NAME=(
    [a]="(a) nginx upstream, direct"
    [b]="(b) bare hyper proxy"
    [c]="(c) nginx proxy_pass, keepalive 64"
    [d]="(d) toastgate, full stack"
    [e]="(e) (d) + rate-limit rule, in process"
    [f]="(f) (d) + rate-limit rule on Redis"
    [g]="(g) toastgate v1.0 instances"
    [h]="(h) (d), 10,000 JWTs in rotation"
    [i]="(i) (d) as deployed: a JSON log line per request"
)

# Check that each target answers what it should before timing anything.
for t in a b c d e f g h i; do
    body=$(curl -fsS --max-time 5 -H "${HDR[$t]}" "${URL[$t]}") || die "${NAME[$t]} does not answer 200 (see $TMP/*.log)"
    [ "${#body}" -gt 400 ] || die "${NAME[$t]} answered a short body: $body"
done
grep -q '"isSuccessful":true' <<<"$(curl -fsS -H "$AUTH" "${URL[g]}")" || die "(g) is not a v1.0 success"
for t in e f; do
    curl -fsS -D - -o /dev/null -H "${HDR[$t]}" "${URL[$t]}" | grep -qi '^ratelimit-policy:' ||
        die "${NAME[$t]} carries no RateLimit-Policy: no rule was applied"
done
body=$(curl -fsS -H "$AUTH" "${URL[d]}")
links=$({ grep -o "http://127.0.0.1:$P_TG/v2/bench/[a-z]*/" <<<"$body" || true; } | wc -l)
HREFS=$(grep -o '"href"' "$TMP/www/servers-detail.json" | wc -l)
if grep -q 'kr1-api-compute' <<<"$body" || [ "$links" -ne "$HREFS" ]; then
    die "toastgate rewrote $links of the $HREFS links"
fi
grep -q '"message":"request"' "$TMP/toastgate-logs.log" || die "(i) wrote no JSON request line"
log "all nine targets answer; toastgate rewrites all $HREFS links"

# --- measurements -----------------------------------------------------------

# "850.00us" / "1.25ms" / "1.02s" -> microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) u = n; else if (v ~ /ms$/) u = n * 1000; else if (v ~ /s$/) u = n * 1000000; else u = n
        printf "%.0f", u
    }'
}

declare -A RPS P50 P99 CPU_REQ USER_REQ SYS_REQ OL_RPS OL_P50 OL_P99 OL_CPU OL_USER OL_SYS
CLK_TCK=$(getconf CLK_TCK)
# User and system CPU ticks a process has used so far ("user sys").
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
# per_request TICKS REQUESTS -> microseconds per request, one decimal.
per_request() { awk -v k="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { printf "%.1f", k / hz * 1e6 / n }'; }

# Tokens (d)'s gateway verified, not found in its verified-token cache:
# during (h), how much of (h) measures the cache and how much HS256.
auth_cache_misses() {
    curl -fsS "http://127.0.0.1:$P_ADMIN/metrics" |
        awk '/^toastgate_auth_cache_total\{result="miss"\}/ {print $2}'
}
H_MISSES=0 H_REQUESTS=0

# Closed loop: wrk, 1 thread, CONNS connections, as fast as the target allows.
measure_closed() {
    local t=$1 r=$2 out non2xx user0 sys0 user1 sys1 requests misses=0
    local -a extra=()
    [ -z "${WRK_ARGS[$t]:-}" ] || read -r -a extra <<<"${WRK_ARGS[$t]}"
    wrk -t1 -c"$CONNS" -d"${WARMUP}s" "${extra[@]}" -H "${HDR[$t]}" "${URL[$t]}" >"$TMP/wrk-$t-$r-warm.txt"
    [ "$t" != h ] || misses=$(auth_cache_misses)
    read -r user0 sys0 < <(cpu_ticks "${WORKER[$t]}")
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${extra[@]}" -H "${HDR[$t]}" "${URL[$t]}")
    read -r user1 sys1 < <(cpu_ticks "${WORKER[$t]}")
    [ "$t" != h ] || misses=$(($(auth_cache_misses) - misses))
    echo "$out" >"$TMP/wrk-$t-$r.txt"
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    [ -z "$non2xx" ] || die "${NAME[$t]}: $non2xx non-2xx answers under load"
    if grep -q 'Socket errors' <<<"$out"; then log "${NAME[$t]}: $(grep 'Socket errors' <<<"$out")"; fi
    RPS[$t,$r]=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
    P50[$t,$r]=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    P99[$t,$r]=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    # CPU the target process spent per request: steadier than req/s on a
    # shared machine, and what a second worker would have to share. Split
    # too: user is the proxy's own code (and the vDSO clock), sys the
    # kernel's work for it (its sockets, epoll, futexes, page faults). The
    # sum is the process's measured run time; the split is sampled (each
    # tick counts for the mode it lands in), so it is noisier than the sum.
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    CPU_REQ[$t,$r]=$(per_request $((user1 - user0 + sys1 - sys0)) "$requests")
    USER_REQ[$t,$r]=$(per_request $((user1 - user0)) "$requests")
    SYS_REQ[$t,$r]=$(per_request $((sys1 - sys0)) "$requests")
    log "closed-loop round $r ${NAME[$t]}: ${RPS[$t,$r]} req/s, p50 ${P50[$t,$r]} us, p99 ${P99[$t,$r]} us, ${CPU_REQ[$t,$r]} us CPU/req (user ${USER_REQ[$t,$r]}, sys ${SYS_REQ[$t,$r]})"
    if [ "$t" = h ]; then
        H_MISSES=$((H_MISSES + misses)) H_REQUESTS=$((H_REQUESTS + requests))
    fi
}

# Open loop: oha sends at a fixed RATE whatever the answers do; with
# --latency-correction a stall counts against every request it delayed.
measure_open() {
    local t=$1 rate=$2 key=$3 json user0 sys0 user1 sys1 answered
    oha --worker-threads 1 --no-tui -z 2s -q "$rate" -c "$CONNS" -H "${HDR[$t]}" "${URL[$t]}" >/dev/null
    read -r user0 sys0 < <(cpu_ticks "${WORKER[$t]}")
    json=$(oha --worker-threads 1 --no-tui -w --output-format json -z "${OPEN_DURATION}s" -q "$rate" \
        --latency-correction -c "$CONNS" -H "${HDR[$t]}" "${URL[$t]}")
    read -r user1 sys1 < <(cpu_ticks "${WORKER[$t]}")
    echo "$json" >"$TMP/oha-$key.json"
    read -r "OL_RPS[$key]" "OL_P50[$key]" "OL_P99[$key]" answered < <(python3 -c '
import json, sys
d = json.loads(sys.stdin.read())
codes = d.get("statusCodeDistribution", {})
bad = {k: v for k, v in codes.items() if not k.startswith("2")}
if bad or d.get("errorDistribution"):
    sys.exit("non-2xx or errors: %r %r" % (bad, d.get("errorDistribution")))
p = d["latencyPercentiles"]
print(round(d["summary"]["requestsPerSec"]), round(p["p50"] * 1e6), round(p["p99"] * 1e6),
      sum(codes.values()))
' <<<"$json") || die "${NAME[$t]}: open-loop run failed (see $TMP/oha-$key.json)"
    # At the same offered rate, the CPU per request compares the proxies'
    # own work; in the closed loop each runs at its own rate, and the rate
    # changes what a request costs (requests per wake-up, whether the
    # peers it wakes are idle).
    OL_CPU[$key]=$(per_request $((user1 - user0 + sys1 - sys0)) "$answered")
    OL_USER[$key]=$(per_request $((user1 - user0)) "$answered")
    OL_SYS[$key]=$(per_request $((sys1 - sys0)) "$answered")
    log "open-loop @ $rate req/s ${NAME[$t]}: ${OL_RPS[$key]} req/s sent, p50 ${OL_P50[$key]} us, p99 ${OL_P99[$key]} us, CPU/req user ${OL_USER[$key]} us, sys ${OL_SYS[$key]} us"
}

# Other work on this shared machine skews everything: keep a record of it.
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
MEASURE_START=$(date +%s)
log "closed loop: wrk -t1 -c$CONNS, $ROUNDS rounds of ${WARMUP}s warm-up + ${DURATION}s per target"
# Only (f) talks to Redis: its script calls over all of (f)'s requests.
redis-cli -p "$P_REDIS" config resetstat >/dev/null
for r in $(seq 1 "$ROUNDS"); do
    for t in a b c d e f g h i; do measure_closed "$t" "$r"; done
done
# Script calls per request on Redis (one decision each = one round trip).
REDIS_CALLS=$(redis-cli -p "$P_REDIS" info commandstats |
    awk -F'[:=,]' '/^cmdstat_(evalsha|eval):/ {n += $3} END {print n + 0}')
F_ALL_REQUESTS=$(cat "$TMP"/wrk-f-*.txt | awk '/requests in/ {n += $1} END {print n + 0}')

# The median of an odd number of arguments, as given.
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END { print v[(NR + 1) / 2] }'; }
# A target's figure: the median over the rounds.
for t in a b c d e f g h i; do
    for m in RPS P50 P99 CPU_REQ USER_REQ SYS_REQ; do
        declare -n fig=$m
        vals=()
        for r in $(seq 1 "$ROUNDS"); do vals+=("${fig[$t,$r]}"); done
        fig[$t]=$(median "${vals[@]}")
        unset -n fig
    done
done
# paired OUT M X Y: X/Y of figure M within each round, then the median of
# those. Sets OUT (the median) and OUT_ROUNDS (each round's, in order).
paired() {
    local out=$1 m=$2 x=$3 y=$4 r
    local -a per=()
    declare -n fig=$m
    for r in $(seq 1 "$ROUNDS"); do
        per+=("$(awk -v a="${fig[$x,$r]}" -v b="${fig[$y,$r]}" 'BEGIN { printf "%.2f", a / b }')")
    done
    unset -n fig
    printf -v "$out" '%.2f' "$(median "${per[@]}")"
    printf -v "${out}_ROUNDS" '%s' "${per[*]}"
}

# The issue's latency target: every target at half of (b)'s max rate. If (d)
# cannot carry that rate, its p99 is queueing; so (b) and (d) also run at half
# of (d)'s own max rate: the latency (d) adds at a load it can sustain.
# (Pinning the proxy to one core and the rest to the other was tried: both
# proxies' p99 got worse and less steady, one core carrying two busy
# processes.)
RATE=$(awk -v r="${RPS[b]}" 'BEGIN { printf "%d", r / 2 }')
RATE_D=$(awk -v r="${RPS[d]}" 'BEGIN { printf "%d", r / 2 }')
log "open loop: oha -q RATE --latency-correction -c$CONNS, 2s warm-up + ${OPEN_DURATION}s per run"
# (b) and (d) back to back, as in the rounds after.
for t in a c b d; do measure_open "$t" "$RATE" "$t"; done
# The target's pair, (b) then (d), in ROUNDS rounds like the closed loop:
# one 10 s run's p99 is a few stalls of this shared machine, so what (d)
# adds is taken within each round and the median round's reported.
for r in $(seq 2 "$ROUNDS"); do
    for t in b d; do measure_open "$t" "$RATE" "$t@$r"; done
done
# (f)'s Redis round trips at that rate alone: its histogram before and after.
REDIS_HIST_BEFORE=$(curl -s "http://127.0.0.1:$P_ADMIN2/metrics" | grep '^toastgate_ratelimit_redis_seconds_bucket' || true)
for t in b d e; do measure_open "$t" "$RATE_D" "${t}2"; done
# The round trip itself, from a second client during (f)'s run (warm-up
# included): one paced script call at a time, so neither the gateway's worker
# nor a busy-looping client is in it.
python3 "$BENCH/redis_rtt.py" --port "$P_REDIS" --seconds $((OPEN_DURATION + 2)) >"$TMP/redis-rtt.json" &
RTT_PID=$!
measure_open f "$RATE_D" f2
wait "$RTT_PID" || die "the Redis round-trip client failed (see $TMP/redis-rtt.json)"
read -r RAW_RTT_N RAW_RTT_P50 RAW_RTT_P99 RAW_RTT_MAX < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(d["count"], d["p50_us"], d["p99_us"], d["max_us"])' "$TMP/redis-rtt.json") ||
    die "no Redis round-trip figures (see $TMP/redis-rtt.json)"
REDIS_HIST_AFTER=$(curl -s "http://127.0.0.1:$P_ADMIN2/metrics" | grep '^toastgate_ratelimit_redis_seconds_bucket' || true)

# --- memory with idle keep-alive connections --------------------------------

log "idle connections: $IDLE_CONNS keep-alive connections each to toastgate, bare_proxy, nginx proxy"
# NAME PORT PID -> one JSON line (see idle_conns.py)
idle() {
    python3 "$BENCH/idle_conns.py" --port "$2" --pid "$3" --count "$IDLE_CONNS" --hold 3 \
        --again --settle "$SETTLE" --after-close "${4:-0}" --deadline 300 ||
        die "idle connection test against $1 failed"
}
# Read 3 s after they are open, then each is used once more (toastgate
# had parked it: woken, served, parked again) and read again SETTLE s
# later, still open and idle: toastgate parks an idle HTTP/1.1 connection
# (1 to 2 s after its answer), and jemalloc returns freed pages after its
# 10 s decay.
SETTLE=15
# toastgate: and 60 s after they close, is the memory given back?
TG_IDLE=$(idle toastgate "$P_TG" "$TG_PID" 60)
log "toastgate: $TG_IDLE"
BARE_IDLE=$(idle bare_proxy "$P_BARE" "$BARE_PID")
log "bare_proxy: $BARE_IDLE"
NGX_IDLE=$(idle "nginx proxy" "$P_NGX" "${WORKER[c]}")
log "nginx proxy worker: $NGX_IDLE"
read -r TG_OPENED TG_RSS0 TG_RSS TG_RSS_SETTLED TG_RSS_AFTER BARE_RSS0 BARE_RSS BARE_RSS_SETTLED \
    NGX_RSS0 NGX_RSS NGX_RSS_SETTLED < <(python3 -c '
import json, sys
tg, bare, ngx = (json.loads(a) for a in sys.argv[1:])
for x in (tg, bare, ngx):
    if x["failed"]:
        sys.exit("some idle connections failed: %r" % x)
    # Still open when settled, or the settled figure says nothing.
    if x["open_fds_settled"] < x["open_fds"]:
        sys.exit("idle connections were closed before the settled reading: %r" % x)
print(tg["opened"], tg["rss_before_kib"], tg["rss_kib"], tg["rss_settled_kib"], tg["rss_after_close_kib"],
      bare["rss_before_kib"], bare["rss_kib"], bare["rss_settled_kib"],
      ngx["rss_before_kib"], ngx["rss_kib"], ngx["rss_settled_kib"])
' "$TG_IDLE" "$BARE_IDLE" "$NGX_IDLE") || die "idle connection test incomplete"

# --- report -----------------------------------------------------------------

# verdict MEASURED OP LIMIT -> "ok" / "MISS"
verdict() { awk -v m="$1" -v op="$2" -v l="$3" 'BEGIN { ok = (op == ">=") ? m >= l : m <= l; print ok ? "ok" : "MISS" }'; }
ratio() { awk -v x="$1" -v y="$2" 'BEGIN { printf "%.2f", x / y }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

paired R_DB RPS d b
paired R_DC RPS d c
paired R_CPU CPU_REQ d b
paired R_UCPU USER_REQ d b
paired R_SCPU SYS_REQ d b
paired R_ED RPS e d
paired R_GD RPS g d
paired R_HD RPS h d
paired R_ID RPS i d
paired R_ICPU CPU_REQ i d
CALLS_PER_REQ=$(ratio "$REDIS_CALLS" "$F_ALL_REQUESTS")
# Open-loop p99 (d) adds over (b) @ RATE, each round's (round 1's keys are
# b and d) and the median of them.
ADDED_PER=("$((OL_P99[d] - OL_P99[b]))")
for r in $(seq 2 "$ROUNDS"); do ADDED_PER+=("$((OL_P99[d@$r] - OL_P99[b@$r]))"); done
ADDED=$(median "${ADDED_PER[@]}")
# CPU per request at that equal rate, (d)/(b) within each round, in all
# and user and system apart; and the medians of each.
OL_KEYS=("")
for r in $(seq 2 "$ROUNDS"); do OL_KEYS+=("@$r"); done
OL_CR=() OL_UR=() OL_SR=() OL_UD=() OL_UB=() OL_SD=() OL_SB=() OL_SENT=()
for k in "${OL_KEYS[@]}"; do
    OL_CR+=("$(ratio "${OL_CPU[d$k]}" "${OL_CPU[b$k]}")")
    OL_SENT+=("${OL_RPS[b$k]}/${OL_RPS[d$k]}")
    OL_UR+=("$(ratio "${OL_USER[d$k]}" "${OL_USER[b$k]}")")
    OL_SR+=("$(ratio "${OL_SYS[d$k]}" "${OL_SYS[b$k]}")")
    OL_UD+=("${OL_USER[d$k]}") OL_UB+=("${OL_USER[b$k]}")
    OL_SD+=("${OL_SYS[d$k]}") OL_SB+=("${OL_SYS[b$k]}")
done
ADDED_D=$((OL_P99[d2] - OL_P99[b2]))
# What a Redis decision adds at the same load: (f) over (e), open loop.
REDIS_P99=$((OL_P99[f2] - OL_P99[e2]))
# The Redis round trip itself, from (f)'s own histogram during its open-loop
# run (the difference of the two snapshots): the upper bound of the bucket
# holding the 99th percentile.
REDIS_RTT_P99=$(python3 -c '
import sys
def buckets(text):
    out = []
    for line in text.splitlines():
        le = line.split("le=\"")[1].split("\"")[0]
        out.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
    return out
before, after = buckets(sys.argv[1]), buckets(sys.argv[2])
delta = [(le, n - m) for (le, n), (_, m) in zip(after, before)] if before else after
total = delta[-1][1] if delta else 0
if not total:
    sys.exit("no Redis decisions in the histogram")
bound = next(le for le, n in delta if n >= 0.99 * total)
print("inf" if bound == float("inf") else round(bound * 1e6))
' "$REDIS_HIST_BEFORE" "$REDIS_HIST_AFTER") || die "(f): no Redis round-trip histogram"
TG_MIB=$(mib "$TG_RSS")
# KiB per idle connection, each process against its own RSS before them.
TG_PER=$(awk -v a="$TG_RSS" -v b="$TG_RSS0" -v n="$TG_OPENED" 'BEGIN { printf "%.1f", (a - b) / n }')
BARE_PER=$(awk -v a="$BARE_RSS" -v b="$BARE_RSS0" -v n="$IDLE_CONNS" 'BEGIN { printf "%.1f", (a - b) / n }')
# The same, SETTLE s after their second request (toastgate's idle connections parked again by then).
per_conn() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { printf "%.1f", (a - b) / n }'; }
TG_PER_SETTLED=$(per_conn "$TG_RSS_SETTLED" "$TG_RSS0" "$TG_OPENED")
BARE_PER_SETTLED=$(per_conn "$BARE_RSS_SETTLED" "$BARE_RSS0" "$IDLE_CONNS")
NGX_PER_SETTLED=$(per_conn "$NGX_RSS_SETTLED" "$NGX_RSS0" "$IDLE_CONNS")
GIVEBACK=$(ratio "$TG_RSS_AFTER" "$TG_RSS0")
CPU=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
MEASURED=$(($(date +%s) - MEASURE_START))
ELAPSED=$(($(date +%s) - START))

cat <<EOF

## toastgate benchmark

GET /v2/bench/servers/detail (4 servers, $(wc -c <"$TMP/www/servers-detail.json") B of JSON, $HREFS links rewritten by toastgate), the same request and JWT for every target;
(e), (f): a rate-limited team's JWT; (g): GET /v1.0/appkeys/BenchAppKey/instances, translated from the same upstream answer; (h): 10,000 JWTs in rotation; (i): (d) logging one JSON line per request at info (to a file), as the Helm chart deploys it, where (d) and the others log at warn.
Closed loop: wrk -t1 -c$CONNS, $ROUNDS interleaved rounds (a..i, a..i, ...) of ${WARMUP}s warm-up + ${DURATION}s per target; each figure is the median round's, each ratio the median of the rounds' ratios (each round's in brackets); CPU/req is the target process's user+sys time per request (the checks split it; the split is tick-sampled). Open loop: oha -q RATE --latency-correction -c$CONNS, 2s warm-up + ${OPEN_DURATION}s; at half of (b)'s max, (b) and (d) in $ROUNDS rounds, the p99 (d) adds taken within each (each round's in brackets; the open-loop columns are round 1's).
One worker per proxy (nginx worker_processes 1, TOKIO_WORKER_THREADS=1 for bare_proxy and toastgate), one load-generator thread
(wrk -t1, oha --worker-threads 1); nothing pinned, so load generator, proxy and upstream share the $(nproc) cores.

| target | closed: req/s | p50 | p99 | CPU/req | open @ $RATE/s: sent/s | p50 | p99 |
|---|---:|---:|---:|---:|---:|---:|---:|
EOF
for t in a b c d; do
    printf '| %s | %s | %s us | %s us | %s us | %s | %s us | %s us |\n' "${NAME[$t]}" "${RPS[$t]}" \
        "${P50[$t]}" "${P99[$t]}" "${CPU_REQ[$t]}" "${OL_RPS[$t]}" "${OL_P50[$t]}" "${OL_P99[$t]}"
done
for t in e f g h i; do
    printf '| %s | %s | %s us | %s us | %s us | | | |\n' "${NAME[$t]}" "${RPS[$t]}" \
        "${P50[$t]}" "${P99[$t]}" "${CPU_REQ[$t]}"
done
cat <<EOF

Open loop at half of (d)'s max rate ($RATE_D/s): p99 (b) ${OL_P99[b2]} us, (d) ${OL_P99[d2]} us, (e) ${OL_P99[e2]} us, (f) ${OL_P99[f2]} us.

| check | measured | target | |
|---|---:|---:|---|
| throughput (d)/(b) ($R_DB_ROUNDS) | $R_DB | >= 0.90 | $(verdict "$R_DB" ">=" 0.9) |
| CPU per request (d)/(b) ($R_CPU_ROUNDS) | $R_CPU | <= 1.15 | $(verdict "$R_CPU" "<=" 1.15) |
| user-space CPU per request (d)/(b) ($R_UCPU_ROUNDS); medians (d) ${USER_REQ[d]} us, (b) ${USER_REQ[b]} us | $R_UCPU | (info) | |
| kernel (system) CPU per request (d)/(b) ($R_SCPU_ROUNDS); medians (d) ${SYS_REQ[d]} us, (b) ${SYS_REQ[b]} us | $R_SCPU | (info) | |
| throughput (d)/(c) ($R_DC_ROUNDS) | $R_DC | (info) | |
| open-loop p99 added by (d) over (b) @ $RATE/s (half of (b)'s max) (${ADDED_PER[*]}) | $ADDED us | <= 200 us | $(if [ "$ADDED" -lt 0 ]; then echo "noise: (b) p99 above (d)"; else verdict "$ADDED" "<=" 200; fi) |
| same @ $RATE_D/s (half of (d)'s max) | $ADDED_D us | (info) | |
| CPU per request (d)/(b) at an equal rate, the open-loop runs @ $RATE/s (${OL_CR[*]}; sent/s (b)/(d): ${OL_SENT[*]}) | $(median "${OL_CR[@]}") | (info) | |
| the same, user-space CPU per request (d)/(b) @ $RATE/s (${OL_UR[*]}); medians (d) $(median "${OL_UD[@]}") us, (b) $(median "${OL_UB[@]}") us | $(median "${OL_UR[@]}") | (info) | |
| the same, kernel (system) CPU per request (d)/(b) @ $RATE/s (${OL_SR[*]}); medians (d) $(median "${OL_SD[@]}") us, (b) $(median "${OL_SB[@]}") us | $(median "${OL_SR[@]}") | (info) | |
| (e) rate-limit rule in process: throughput (e)/(d) ($R_ED_ROUNDS) | $R_ED | >= 0.95 | $(verdict "$R_ED" ">=" 0.95) |
| (f) Redis script calls per request | $CALLS_PER_REQ | <= 1 | $(verdict "$CALLS_PER_REQ" "<=" 1) |
| (f) Redis round trip p99 on loopback during (f) @ $RATE_D/s (a second client, $RAW_RTT_N paced calls of a one-line script; p50 $RAW_RTT_P50 us, max $RAW_RTT_MAX us) | $RAW_RTT_P99 us | <= 1000 us | $(verdict "$RAW_RTT_P99" "<=" 1000) |
| (f) Redis decision round trip p99 as the gateway sees it @ $RATE_D/s (its histogram, bucket bound; waiting for its one worker included) | <= $REDIS_RTT_P99 us | <= 1000 us | $(if [ "$REDIS_RTT_P99" = inf ]; then echo MISS; else verdict "$REDIS_RTT_P99" "<=" 1000; fi) |
| (f) p99 a Redis decision adds to a request, open loop @ $RATE_D/s ((f) - (e)) | $REDIS_P99 us | (info) | $(if [ "$REDIS_P99" -lt 0 ]; then echo "noise: (e) p99 above (f)"; fi) |
| (g) v1.0 instances: throughput (g)/(d) ($R_GD_ROUNDS) | $R_GD | >= 0.50 | $(verdict "$R_GD" ">=" 0.5) |
| (h) 10,000 JWTs in rotation: throughput (h)/(d) ($R_HD_ROUNDS) | $R_HD | >= 0.80 | $(verdict "$R_HD" ">=" 0.8) |
| (h) tokens verified anew (verified-token cache misses) per request, all rounds | $(awk -v x="$H_MISSES" -v y="$H_REQUESTS" 'BEGIN { printf "%.4f", x / y }') | (info) | |
| (i) as deployed, a JSON log line per request: throughput (i)/(d) ($R_ID_ROUNDS); CPU per request (i)/(d) ($R_ICPU_ROUNDS) | $R_ID; $R_ICPU | (info) | |
| RSS per idle keep-alive conn, 3 s after they open: toastgate / bare_proxy | $TG_PER / $BARE_PER KiB | <= bare_proxy | $(verdict "$TG_PER" "<=" "$BARE_PER") |
| (stretch) the same, each used once more at 3 s (toastgate's woken from parking and parked again) and read $SETTLE s later, still idle: toastgate / bare_proxy / nginx proxy worker | $TG_PER_SETTLED / $BARE_PER_SETTLED / $NGX_PER_SETTLED KiB | a few KiB (<= 4) | $(verdict "$TG_PER_SETTLED" "<=" 4) |
| toastgate RSS 60 s after $TG_OPENED conns closed / before they opened | $(mib "$TG_RSS_AFTER") / $(mib "$TG_RSS0") MiB = $GIVEBACK | <= 1.25 | $(verdict "$GIVEBACK" "<=" 1.25) |

Same $IDLE_CONNS idle connections, 3 s after they open / $SETTLE s after their second request: toastgate $TG_MIB / $(mib "$TG_RSS_SETTLED") MiB, bare_proxy $(mib "$BARE_RSS") / $(mib "$BARE_RSS_SETTLED") MiB, nginx proxy worker $(mib "$NGX_RSS") / $(mib "$NGX_RSS_SETTLED") MiB.

Builds: toastgate $TOASTGATE_BUILT; bare_proxy plain release.
Machine: $(nproc) cores, $CPU, $(uname -sr), $(date -u '+%Y-%m-%d %H:%M UTC');
load average before measuring: $LOAD_AT_START; measuring took ${MEASURED}s, the whole script ${ELAPSED}s.
EOF
