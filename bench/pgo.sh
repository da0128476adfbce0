#!/usr/bin/env bash
# bench/pgo.sh: toastgate built with profile-guided optimisation (PGO), for
# measuring against the plain release build (bench/run.sh and
# bench/callgrind.sh with TOASTGATE_BIN=target/pgo/toastgate).
#
#   1. an instrumented release build (-Cprofile-generate), in its own target
#      directory (other RUSTFLAGS rebuild every dependency);
#   2. training: that binary in front of the benchmark's static upstream
#      serves, one after the other, the v2 listing with its 16 links
#      ((d)'s request, with either header for the token), the same as a
#      team with a rate-limit rule ((e)), the v1.0 listing ((g)), another
#      v2 route (the static upstream answers every path alike), and
#      refusals (an unknown route, no token, a bad token, an unknown
#      project, an Action the team may not do);
#   3. llvm-profdata merges the profile (the LLVM of rustc's major version:
#      Debian's llvm-N package, installed when missing);
#   4. the optimised build (-Cprofile-use), copied to target/pgo/toastgate.
#
# A profile trained on the benchmark's own requests flatters the benchmark:
# the README says so next to every PGO figure.
#
# Usage: bench/pgo.sh   (two release builds: about 10 minutes)
# Knobs: REQUESTS=3000 (per training request) KEEP_TMP=1
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
REQUESTS=${REQUESTS:-3000}
[[ $REQUESTS =~ ^[1-9][0-9]*$ ]] || { echo "bench/pgo.sh: REQUESTS must be a positive integer (got '$REQUESTS')" >&2; exit 2; }
START=$(date +%s)
# shellcheck source=bench/common.sh
. "$BENCH/common.sh"

# llvm-profdata must read what rustc's LLVM writes: rustup's llvm-tools
# component when installed (it always matches), else Debian's llvm-N of
# rustc's LLVM major version.
LLVM_MAJOR=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$LLVM_MAJOR" ] || die "cannot tell rustc's LLVM version (rustc -vV)"
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata
if [ -x "$PROFDATA" ]; then
    bench_tools nginx curl python3
else
    PROFDATA=llvm-profdata-$LLVM_MAJOR
    bench_tools nginx curl python3 "$PROFDATA:llvm-$LLVM_MAJOR"
fi
# The profile goes where -Cprofile-generate says, not where a leftover
# LLVM_PROFILE_FILE would send it.
unset LLVM_PROFILE_FILE
bench_scratch toastgate-pgo
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

# A fixed directory for the raw profiles, so that a second run's
# instrumented build is the first's (other flags would rebuild everything).
# The user's RUSTFLAGS (say, -Ctarget-cpu) apply to both builds.
PROFRAW="$TARGET_DIR/pgo-generate/profraw"
log "instrumented build (-Cprofile-generate)"
(cd "$ROOT" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$PROFRAW" \
    cargo build --release --locked --bin toastgate --target-dir "$TARGET_DIR/pgo-generate")
TOASTGATE="$TARGET_DIR/pgo-generate/release/toastgate"

read -r P_UP P_PROXY P_ADMIN < <(free_ports 3)
bench_configs "$P_UP" "$P_PROXY" "$P_ADMIN"
nginx -p "$TMP" -e "$TMP/nginx-upstream.error.log" -c "$TMP/nginx-upstream.conf" &
PIDS+=($!)
wait_ready "http://127.0.0.1:$P_UP/v2/$TENANT/servers/detail"
mint() { RUST_LOG=error "$TOASTGATE" mint-token --config "$TMP/toastgate.yaml" --team "$1" --ttl 2h; }
JWT=$(mint bench)
JWT_LIMITED=$(mint bench-limited)
# mint-token is the instrumented binary too: its profile is not the
# gateway's, so it goes before the gateway starts (with any earlier run's).
rm -rf "$PROFRAW"

RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$TOASTGATE" serve --config "$TMP/toastgate.yaml" 2>"$TMP/toastgate.log" &
GATEWAY=$!
PIDS+=("$GATEWAY")
wait_ready "http://127.0.0.1:$P_ADMIN/readyz" 60
BASE="http://127.0.0.1:$P_PROXY"

# train EXPECTED_STATUS [oha args...]: REQUESTS requests, all answered
# EXPECTED_STATUS (a training run that silently got errors would train the
# error path instead).
train() {
    local status=$1 out
    shift
    TRAINED=$((${TRAINED:-0} + 1))
    out="$TMP/oha-$TRAINED.txt"
    oha --no-tui -n "$REQUESTS" -c 8 "$@" >"$out" || die "oha failed on ${*: -1} (KEEP_TMP=1 keeps $out)"
    grep -q "\[$status\] $REQUESTS responses" "$out" ||
        die "${*: -1}: not all $REQUESTS answered $status: $(grep -o '\[[0-9]*\] [0-9]* responses' "$out" | tr '\n' ' ')"
    log "trained: $status x $REQUESTS: ${*: -1}"
}
train 200 -H "Authorization: Bearer $JWT" "$BASE/v2/bench/servers/detail"
train 200 -H "X-Auth-Token: $JWT" "$BASE/v2/bench/servers/detail"
train 200 -H "Authorization: Bearer $JWT_LIMITED" "$BASE/v2/bench/servers/detail"
train 200 -H "Authorization: Bearer $JWT" "$BASE/v1.0/appkeys/BenchAppKey/instances"
train 200 -H "Authorization: Bearer $JWT" "$BASE/v2/bench/flavors/detail"
train 404 -H "Authorization: Bearer $JWT" "$BASE/v2/bench/no-such-route"
train 401 "$BASE/v2/bench/servers/detail"
train 401 -H "Authorization: Bearer not.a.jwt" "$BASE/v2/bench/servers/detail"
train 404 -H "Authorization: Bearer $JWT" "$BASE/v2/someone-else/servers/detail"
train 403 -m DELETE -H "Authorization: Bearer $JWT" "$BASE/v2/bench/servers/0000"

# The profile is written when the gateway exits.
kill -TERM "$GATEWAY"
wait "$GATEWAY" || die "the instrumented gateway did not exit cleanly (its log: KEEP_TMP=1 keeps $TMP/toastgate.log)"
ls "$PROFRAW"/*.profraw >/dev/null 2>&1 || die "no profile written in $PROFRAW"
mkdir -p "$TARGET_DIR/pgo"
"$PROFDATA" merge -o "$TMP/toastgate.profdata" "$PROFRAW"/*.profraw
# Named by its hash: the optimised build's flags change with the profile,
# so nothing built with an older one is reused. Training counts vary from
# run to run, so each run rebuilds the optimised binary in full.
rm -f "$TARGET_DIR"/pgo/toastgate-*.profdata
PROFILE="$TARGET_DIR/pgo/toastgate-$(sha256sum "$TMP/toastgate.profdata" | cut -c1-16).profdata"
cp "$TMP/toastgate.profdata" "$PROFILE"

log "optimised build (-Cprofile-use)"
(cd "$ROOT" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILE" \
    cargo build --release --locked --bin toastgate --target-dir "$TARGET_DIR/pgo-use")
cp "$TARGET_DIR/pgo-use/release/toastgate" "$TARGET_DIR/pgo/toastgate"
log "done: $TARGET_DIR/pgo/toastgate (profile: $PROFILE)"
