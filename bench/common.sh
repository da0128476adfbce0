# shellcheck shell=bash disable=SC2034
# (SC2034: what this file sets is read by the script that sources it.)
# bench/common.sh: what the bench scripts share: logging, tools, the release
# build, a scratch directory cleaned up on exit, the upstream and toastgate
# configs, starting the upstream and the proxies, and waiting for a server.
# Sourced (not run) after ROOT, BENCH and START are set, under
# `set -euo pipefail`.

PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"

log() { printf '[%3ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# bench_tools COMMAND[:PACKAGE]...: installs the Debian packages of the
# commands that are missing (PACKAGE defaults to COMMAND), then oha, the
# open-loop load generator (wrk2 is not packaged; the first install compiles
# it, several minutes, once).
bench_tools() {
    local want command package sudo=""
    local -a missing=()
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    for want in "$@"; do
        command=${want%%:*}
        package=${want#*:}
        command -v "$command" >/dev/null || missing+=("$package")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! command -v oha >/dev/null; then
        log "installing oha (cargo install oha --locked; first time only)"
        cargo install oha --locked
    fi
}

# bench_build: builds the bare proxy (a plain release build) and toastgate
# as the Docker image ships it: the production features (no simulator),
# profile-guided by bench/pgo.sh (its training is the demo's workload, not
# the benchmark's requests), or a plain release build of the same features
# with TOASTGATE_BUILD=plain (quicker, for iterating). SKIP_BUILD=1 takes
# what was built last. Sets TOASTGATE (TOASTGATE_BIN, for an A/B
# experiment, or the build), BARE_PROXY (BARE_PROXY_BIN, likewise, or the
# build) and TOASTGATE_BUILT (how TOASTGATE was built, for the report).
bench_build() {
    local target_dir
    case "${TOASTGATE_BUILD:=pgo}" in
        pgo | plain) ;;
        *) die "TOASTGATE_BUILD must be pgo or plain (got '$TOASTGATE_BUILD')" ;;
    esac
    target_dir=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
    if [ "${SKIP_BUILD:-0}" = 1 ]; then
        log "SKIP_BUILD=1: using the binaries already built"
    else
        log "building bare_proxy (release)"
        (cd "$ROOT" && cargo build --release --locked --example bare_proxy)
        if [ -n "${TOASTGATE_BIN:-}" ]; then
            :
        elif [ "$TOASTGATE_BUILD" = plain ]; then
            log "building toastgate (release, production features)"
            (cd "$ROOT" && cargo build --release --locked --no-default-features --bin toastgate \
                --target-dir "$target_dir/plain")
        else
            log "building toastgate profile-guided (bench/pgo.sh, production features)"
            CARGO_TARGET_DIR="$target_dir" FEATURES="" bash "$BENCH/pgo.sh" "$target_dir/pgo/toastgate"
        fi
    fi
    if [ -n "${TOASTGATE_BIN:-}" ]; then
        TOASTGATE=$TOASTGATE_BIN
        TOASTGATE_BUILT="TOASTGATE_BIN=$TOASTGATE_BIN"
    elif [ "$TOASTGATE_BUILD" = pgo ]; then
        TOASTGATE="$target_dir/pgo/toastgate"
        TOASTGATE_BUILT="profile-guided (bench/pgo.sh, as the Docker image)"
    else
        TOASTGATE="$target_dir/plain/release/toastgate"
        TOASTGATE_BUILT="plain release, production features (TOASTGATE_BUILD=plain)"
    fi
    [ -x "$TOASTGATE" ] || die "no toastgate binary at $TOASTGATE"
    BARE_PROXY="${BARE_PROXY_BIN:-$target_dir/release/examples/bare_proxy}"
}

# bench_scratch NAME: TMP, a directory removed on exit (kept with
# KEEP_TMP=1), and PIDS, the processes stopped on exit (TERM, then KILL after
# 10 s: valgrind is slow to write its output).
bench_scratch() {
    TMP=$(mktemp -d -t "$1.XXXXXX")
    # nginx workers drop to `nobody` when started as root: they must be able
    # to reach the static file. Secret files stay 0600 (umask below).
    chmod 755 "$TMP"
    umask 077
    PIDS=()
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

bench_cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        timeout 10 tail --pid="$pid" -f /dev/null 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    done
    if [ "${KEEP_TMP:-0}" = 1 ]; then
        log "temp files kept in $TMP"
    else
        rm -rf "$TMP"
    fi
}

# bench_start LOG COMMAND [ARG...]: COMMAND in the background, its standard
# error into LOG (`-`: this script's), stopped on exit (added to PIDS);
# STARTED is its pid.
# Environment for it goes through env(1), which execs: STARTED is then the
# command's own pid, the one to sample or signal. Not a $(...) subshell
# either: the process must stay this shell's child, in its cleanup list.
bench_start() {
    local log=$1
    shift
    if [ "$log" = - ]; then
        "$@" &
    else
        "$@" 2>"$log" &
    fi
    STARTED=$!
    PIDS+=("$STARTED")
}

# bench_upstream PORT: the static nginx upstream bench_configs wrote, on
# PORT, started and answering. Sets UP_PID.
bench_upstream() {
    bench_start - nginx -p "$TMP" -e "$TMP/nginx-upstream.error.log" -c "$TMP/nginx-upstream.conf"
    UP_PID=$STARTED
    wait_ready "http://127.0.0.1:$1/v2/$TENANT/servers/detail"
}

# bench_bare_proxy LOG PORT UPSTREAM_PORT [SPIN_NS]: the bare proxy on PORT
# in front of UPSTREAM_PORT, one worker thread (as toastgate runs here),
# busy-waiting SPIN_NS per request when given. Sets STARTED.
bench_bare_proxy() {
    local log=$1
    shift
    bench_start "$log" env TOKIO_WORKER_THREADS=1 \
        "$BARE_PROXY" "127.0.0.1:$1" "127.0.0.1:$2" ${3:+"$3"}
}

# bench_toastgate BIN CONFIG LOG [NAME=VALUE...]: `BIN serve --config
# CONFIG`, one worker thread, logging at warn (no line per request) unless a
# NAME=VALUE says otherwise (the later assignment wins). Sets STARTED.
bench_toastgate() {
    local bin=$1 config=$2 log=$3
    shift 3
    bench_start "$log" env RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$@" "$bin" serve --config "$config"
}

# free_ports N: N loopback ports that were free a moment ago, on one line.
free_ports() {
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# bench_configs UPSTREAM_PORT TOASTGATE_PORT ADMIN_PORT: in TMP, the static
# upstream (the spec's servers document as compact JSON, as an API server
# sends it, and an identity answer) and toastgate's config pointed at it,
# with a fresh JWT secret and upstream password. Sets TENANT.
bench_configs() {
    local token_json
    TENANT=6cdebe3eb0094910bc41f1d42ebe4cb7
    mkdir -p "$TMP/www"
    python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1])), separators=(",", ":")), end="")' \
        "$BENCH/servers-detail.json" >"$TMP/www/servers-detail.json"
    chmod 755 "$TMP/www"
    chmod 644 "$TMP/www/servers-detail.json"
    token_json='{"access":{"token":{"id":"bench-token-0001","expires":"2099-01-01T00:00:00Z","issued_at":"2026-01-01T00:00:00.000000","tenant":{"id":"'$TENANT'","name":"bench","enabled":true}},"serviceCatalog":[],"user":{"id":"u","username":"bench","roles":[]}}}'
    sed -e "s|@TMP@|$TMP|g" -e "s|@PORT@|$1|g" -e "s|@TOKEN_JSON@|$token_json|g" \
        "$BENCH/nginx-upstream.conf.tmpl" >"$TMP/nginx-upstream.conf"
    # The committed config uses 127.0.0.1:4700x; point it at this run's ports.
    sed -e "s|127.0.0.1:47001|127.0.0.1:$1|g" \
        -e "s|127.0.0.1:47004|127.0.0.1:$2|g" \
        -e "s|127.0.0.1:47005|127.0.0.1:$3|g" \
        "$BENCH/toastgate.yaml" >"$TMP/toastgate.yaml"
    head -c 48 /dev/urandom | base64 >"$TMP/jwt-hs256.key"
    echo "bench-password" >"$TMP/keystone-password"
}

# wait_ready URL [SECONDS]: polls URL until it answers 2xx, for at most
# SECONDS (default 30).
wait_ready() {
    local url=$1 seconds=${2:-30} _
    for _ in $(seq 1 $((seconds * 10))); do
        curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null && return 0
        sleep 0.1
    done
    die "$url not ready after $seconds s"
}
