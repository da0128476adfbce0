#!/usr/bin/env bash
# bench/pgo.sh: toastgate built with profile-guided optimisation (PGO), the
# way the Docker image builds it (the Dockerfile runs this script) and the
# way bench/run.sh measures it.
#
#   1. an instrumented release build (-Cprofile-generate) with the cargo
#      features of the optimised build, in its own target directory (other
#      RUSTFLAGS rebuild every dependency). The same features, because
#      cargo hashes a crate's features into its symbol names: a profile of a
#      build with other features matches none of toastgate's functions, and
#      LLVM says nothing (step 4 checks);
#   2. training: that binary, as the gateway, in front of the simulator (a
#      plain debug build with the `simulator` feature, the instrumented one
#      may have none) on a copy of config/demo.yaml, logging as the Helm
#      chart has it (a JSON line per request, at info). It creates a key pair and eight servers, then
#      serves the v2 and v1.0 listings (with their links rewritten), single
#      servers, flavors and key pairs, a team over its rate limit, and refusals
#      (no token, a bad token, an unknown route or project, an Action the
#      team may not do). Every answer's status is checked: a training run that
#      silently got errors would train the error path instead;
#   3. llvm-profdata merges the profile (rustup's llvm-tools component when
#      installed, else Debian's llvm-N of rustc's LLVM major version,
#      installed when missing and apt-get is there);
#   4. the optimised build (-Cprofile-use) with FEATURES, installed at OUT,
#      once at least half of its toastgate functions are found in the
#      profile.
#
# The training is the demo's workload, not the benchmark's requests: the
# benchmark's upstream is a static nginx with another body, so what it
# measures is not what the profile saw (README, Benchmarks).
#
# Usage: bench/pgo.sh [OUT]   (two release builds: 10-20 minutes from scratch)
#   OUT defaults to TARGET/pgo/toastgate.
# Needs: bash, curl, cargo, nm (binutils); llvm-profdata as above.
# Knobs: FEATURES="" (cargo features of the optimised build beside none of the
#        defaults: "" is the production build, "simulator" the demo's)
#        REQUESTS=2000 (per training request) CARGO_TARGET_DIR KEEP_TMP=1
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
START=$(date +%s)
REQUESTS=${REQUESTS:-2000}
FEATURES=${FEATURES:-}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${1:-$TARGET_DIR/pgo/toastgate}
PATH="$HOME/.cargo/bin:$PATH"

log() { printf '[%3ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $REQUESTS =~ ^[1-9][0-9]*$ ]] || die "REQUESTS must be a positive integer (got '$REQUESTS')"
[[ $FEATURES =~ ^[a-z0-9_,\ -]*$ ]] || die "FEATURES must be a list of cargo features (got '$FEATURES')"
command -v curl >/dev/null || die "curl is needed for the training"
command -v nm >/dev/null || die "nm (binutils) is needed to check the profile applies"

# llvm-profdata must read what rustc's LLVM writes: rustup's llvm-tools
# component when installed (it always matches), else Debian's llvm-N of
# rustc's LLVM major version.
LLVM_MAJOR=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$LLVM_MAJOR" ] || die "cannot tell rustc's LLVM version (rustc -vV)"
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata
if [ ! -x "$PROFDATA" ]; then
    PROFDATA=llvm-profdata-$LLVM_MAJOR
    if ! command -v "$PROFDATA" >/dev/null; then
        command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ] ||
            die "no llvm-profdata for LLVM $LLVM_MAJOR: run 'rustup component add llvm-tools' (or install Debian's llvm-$LLVM_MAJOR)"
        log "installing llvm-$LLVM_MAJOR (for llvm-profdata)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$LLVM_MAJOR"
    fi
fi

TMP=$(mktemp -d -t toastgate-pgo.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "${KEEP_TMP:-0}" = 1 ]; then log "temp files kept in $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The simulator the training runs against: a debug build (quick to build,
# fast enough to answer the training).
log "the simulator (debug build, feature simulator)"
(cd "$ROOT" && cargo build --locked --no-default-features --features simulator \
    --bin toastgate --target-dir "$TARGET_DIR")
SIMULATOR="$TARGET_DIR/debug/toastgate"

# A fixed directory for the raw profiles, so that a second run's
# instrumented build is the first's (other flags would rebuild everything).
# The user's RUSTFLAGS (say, -Ctarget-cpu) apply to both builds.
PROFRAW="$TARGET_DIR/pgo-generate/profraw"
log "instrumented build (-Cprofile-generate, features: '${FEATURES}')"
(cd "$ROOT" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$PROFRAW" \
    cargo build --release --locked --no-default-features --features "$FEATURES" \
    --bin toastgate --target-dir "$TARGET_DIR/pgo-generate")
TOASTGATE="$TARGET_DIR/pgo-generate/release/toastgate"
rm -rf "$PROFRAW"

# Only the gateway's profile is kept: mint-token writes its own where it is
# thrown away.
aside() { LLVM_PROFILE_FILE="$TMP/discarded/%p.profraw" "$@"; }

# free_port: a loopback port nothing answered on a moment ago.
free_port() {
    local port _
    for _ in $(seq 1 50); do
        # Below Linux's ephemeral range (32768 and up), where no
        # connection of the training takes one in the meantime.
        port=$((20000 + RANDOM % 12000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
    done
    die "no free loopback port found"
}

# wait_ready URL PID LOG: polls URL until it answers 2xx, for at most 30 s,
# while process PID (its log: LOG) runs.
wait_ready() {
    local _
    for _ in $(seq 1 300); do
        curl --noproxy '*' -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || die "it exited before answering on $1: $(tail -c 600 "$3")"
        sleep 0.1
    done
    die "$1 not ready after 30 s (its log: KEEP_TMP=1 keeps $3)"
}

# The simulator (port chosen by the kernel, printed on its first line).
"$SIMULATOR" simulate --listen 127.0.0.1:0 >"$TMP/simulator.out" 2>"$TMP/simulator.log" &
SIMULATOR_PID=$!
PIDS+=("$SIMULATOR_PID")
for _ in $(seq 1 300); do
    SIM=$(sed -n 's/^simulator listening on //p' "$TMP/simulator.out")
    [ -n "$SIM" ] && break
    sleep 0.1
done
[ -n "$SIM" ] || die "the simulator did not start (its log: KEEP_TMP=1 keeps $TMP/simulator.log)"

# The demo config, its secrets beside it, pointed at this run's ports.
P_PUBLIC=$(free_port)
P_ADMIN=$(free_port)
[ "$P_PUBLIC" != "$P_ADMIN" ] || die "picked the same port twice; run again"
cp -r "$ROOT/config/demo-secrets" "$TMP/"
sed -e "s|http://127.0.0.1:18774|$SIM|g" \
    -e "s|127.0.0.1:8080|127.0.0.1:$P_PUBLIC|" \
    -e "s|127.0.0.1:9090|127.0.0.1:$P_ADMIN|" \
    "$ROOT/config/demo.yaml" >"$TMP/gateway.yaml"
mint() { aside "$TOASTGATE" mint-token --config "$TMP/gateway.yaml" --team "$1" --ttl 2h; }
PLATFORM=$(mint platform)
WEB=$(mint web-team)
BATCH=$(mint batch-team)

# Logs as the Helm chart deploys it: a JSON line per request, at info.
LLVM_PROFILE_FILE="$PROFRAW/gateway-%p.profraw" RUST_LOG=info TOASTGATE_LOG_FORMAT=json \
    "$TOASTGATE" serve --config "$TMP/gateway.yaml" 2>"$TMP/gateway.log" &
GATEWAY=$!
PIDS+=("$GATEWAY")
wait_ready "http://127.0.0.1:$P_ADMIN/readyz" "$GATEWAY" "$TMP/gateway.log"
BASE="http://127.0.0.1:$P_PUBLIC"

# call STATUSES COUNT CURL_ARGS... URL: COUNT requests to URL on one
# keep-alive connection (curl's -K list; -Z: up to --parallel-max
# connections at once), each answered with one of STATUSES (a |-separated
# list). The last answer's body is left in $TMP/body-$TRAINED, the statuses
# in $TMP/codes-$TRAINED. No proxy: the training talks to loopback only,
# whatever proxy a builder's environment names.
TRAINED=0
call() {
    local statuses=$1 count=$2 i
    shift 2
    local url=${*: -1}
    TRAINED=$((TRAINED + 1))
    for ((i = 1; i < count; i++)); do printf 'url = "%s"\noutput = "/dev/null"\n' "$url"; done >"$TMP/urls-$TRAINED"
    printf 'url = "%s"\noutput = "%s"\n' "$url" "$TMP/body-$TRAINED" >>"$TMP/urls-$TRAINED"
    curl --noproxy '*' -sS --no-progress-meter --max-time 300 -w '%{http_code}\n' -K "$TMP/urls-$TRAINED" "${@:1:$#-1}" >"$TMP/codes-$TRAINED" ||
        die "curl failed on $url"
    [ "$(grep -cEx "$statuses" "$TMP/codes-$TRAINED")" -eq "$count" ] ||
        die "$url: not all $count answered $statuses: $(sort "$TMP/codes-$TRAINED" | uniq -c | tr -s ' \n' ' ')(last body: $(head -c 300 "$TMP/body-$TRAINED"))"
    # The URL only: the arguments hold a token.
    log "trained: $statuses x $count: $url"
}
bearer() { echo "Authorization: Bearer $1"; }

# What the listings show: a key pair and eight servers in project web.
call 200 1 -H "$(bearer "$PLATFORM")" -H 'Content-Type: application/json' \
    --data-binary '{"keypair": {"name": "pgo"}}' "$BASE/v2/web/os-keypairs"
call 202 8 -H "$(bearer "$PLATFORM")" -H 'Content-Type: application/json' \
    --data-binary '{"server": {"name": "pgo", "imageRef": "9956f822-29c9-4f81-9410-0c392d9c8c24", "flavorRef": "7c5f1a0e-8a7d-4e57-9d4b-0f6d3b1e2a21", "networks": [{"uuid": "e7a1c3f5-2b4d-4e6f-8a0c-1e3f5a7c9b01"}], "key_name": "pgo"}}' \
    "$BASE/v2/web/servers"
SERVER=$(sed -n 's/.*"id": *"\([0-9a-f-]*\)".*/\1/p' "$TMP/body-$TRAINED")
[[ $SERVER =~ ^[0-9a-f-]{36}$ ]] || die "no server id in the create answer"

# Reads, the bulk of a gateway's traffic.
call 200 "$REQUESTS" -H "$(bearer "$PLATFORM")" "$BASE/v2/web/servers/detail"
call 200 "$REQUESTS" -Z --parallel-max 8 -H "X-Auth-Token: $PLATFORM" "$BASE/v2/web/servers/detail"
call 200 "$REQUESTS" -H "$(bearer "$PLATFORM")" "$BASE/v2/web/servers"
call 200 "$REQUESTS" -H "$(bearer "$PLATFORM")" "$BASE/v2/web/servers/$SERVER"
call 200 "$((REQUESTS / 4))" -H "$(bearer "$PLATFORM")" "$BASE/v2/web/flavors/detail"
call 200 "$((REQUESTS / 4))" -H "$(bearer "$PLATFORM")" "$BASE/v2/web/os-keypairs"
call 200 "$REQUESTS" -H "$(bearer "$PLATFORM")" "$BASE/v1.0/appkeys/WebAppKey0001/instances"
call 200 "$((REQUESTS / 4))" -H "$(bearer "$PLATFORM")" "$BASE/v1.0/appkeys/WebAppKey0001/flavors"
# web-team has a rate limit on reads (20/s, burst 40): both answers, each
# at least once (all 200: the limit did not apply; all 429: nothing passed).
call '200|429' "$REQUESTS" -H "$(bearer "$WEB")" "$BASE/v2/web/servers/detail"
grep -qx 200 "$TMP/codes-$TRAINED" && grep -qx 429 "$TMP/codes-$TRAINED" ||
    die "web-team's reads were not both passed and limited: $(sort "$TMP/codes-$TRAINED" | uniq -c | tr -s ' \n' ' ')"
# Refusals.
call 401 "$((REQUESTS / 4))" "$BASE/v2/web/servers/detail"
call 401 "$((REQUESTS / 4))" -H "Authorization: Bearer not.a.jwt" "$BASE/v2/web/servers/detail"
call 404 "$((REQUESTS / 4))" -H "$(bearer "$PLATFORM")" "$BASE/v2/web/no-such-route"
call 404 "$((REQUESTS / 4))" -H "$(bearer "$PLATFORM")" "$BASE/v2/someone-else/servers/detail"
call 403 "$((REQUESTS / 4))" -X DELETE -H "$(bearer "$BATCH")" "$BASE/v2/batch/servers/$SERVER"

# The profile is written when the gateway exits.
kill -TERM "$GATEWAY" "$SIMULATOR_PID"
wait "$GATEWAY" || die "the instrumented gateway did not exit cleanly (its log: KEEP_TMP=1 keeps $TMP/gateway.log)"
wait "$SIMULATOR_PID" || true
PIDS=()
ls "$PROFRAW"/gateway-*.profraw >/dev/null 2>&1 || die "no profile written in $PROFRAW"
"$PROFDATA" merge -o "$TMP/toastgate.profdata" "$PROFRAW"/gateway-*.profraw
# Named by its hash: the optimised build's flags change with the profile,
# so nothing built with an older one is reused.
mkdir -p "$TARGET_DIR/pgo"
rm -f "$TARGET_DIR"/pgo/toastgate-*.profdata
PROFILE="$TARGET_DIR/pgo/toastgate-$(sha256sum "$TMP/toastgate.profdata" | cut -c1-16).profdata"
cp "$TMP/toastgate.profdata" "$PROFILE"

log "optimised build (-Cprofile-use, features: '${FEATURES}')"
# Nothing built with an older profile is ever reused (the flags differ):
# without this, each run would add a full set of dependencies.
rm -rf "$TARGET_DIR/pgo-use"
(cd "$ROOT" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILE" \
    cargo build --release --locked --no-default-features --features "$FEATURES" \
    --bin toastgate --target-dir "$TARGET_DIR/pgo-use")
BUILT="$TARGET_DIR/pgo-use/release/toastgate"

# LLVM applies a profile by symbol name and says nothing about functions it
# finds none for: check that at least half of toastgate's own functions in
# the optimised binary were in the profile (most are when both builds had
# the same source and features; none when they had not).
"$PROFDATA" show --all-functions "$PROFILE" | sed -n 's/^  \(.*;\)\{0,1\}\(_ZN9toastgate[^:]*\):$/\2/p' | sort -u >"$TMP/profiled"
nm --defined-only "$BUILT" | awk '$3 ~ /^_ZN9toastgate/ { print $3 }' | sort -u >"$TMP/built"
BUILT_N=$(wc -l <"$TMP/built")
FOUND_N=$(comm -12 "$TMP/profiled" "$TMP/built" | wc -l)
log "toastgate functions in the optimised binary found in the profile: $FOUND_N of $BUILT_N"
((BUILT_N > 0 && FOUND_N * 2 >= BUILT_N)) ||
    die "the profile does not match the optimised build ($FOUND_N of $BUILT_N toastgate functions found): were both built from the same source and features?"
install -D -m 0755 "$BUILT" "$OUT"
log "done: $OUT (profile: $PROFILE)"
