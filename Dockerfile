# syntax=docker/dockerfile:1
#
# toastgate container image: a static-ish Rust binary on distroless, non-root.
#
#   docker build -t toastgate:0.1.0 .
#   docker build --build-arg PGO=0 -t toastgate:0.1.0 .   # no profile-guided build
#
#   # The demo (gateway + built-in TOAST simulator, made-up credentials) needs
#   # the simulator, which production images leave out:
#   docker build --build-arg FEATURES=simulator -t toastgate:demo .
#   docker run --rm -p 8080:8080 -p 9090:9090 toastgate:demo \
#     demo --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:9090
#
#   # The gateway, with your config (secrets by *_file mounts or *_env variables):
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#     -v "$PWD/toastgate.yaml:/etc/toastgate/config.yaml:ro" toastgate:0.1.0
#
# Inside a container the config's `listen.public` / `listen.admin` must bind
# 0.0.0.0 (or [::]), not 127.0.0.1, to be reachable through published ports.
#
# Needs BuildKit (Docker's default builder since 23.0) for the cache mounts.
# For reproducible production builds, pin both base images by digest
# (`rust:1.95-bookworm@sha256:...`, `cc-debian12:nonroot@sha256:...`).

# The toolchain: at least Cargo.toml's rust-version (1.88); CI's clippy runs 1.95.
ARG RUST_VERSION=1.95

# ---------------------------------------------------------------------------
# Build stage: the official Rust image (Debian 12, gcc for aws-lc-sys; no cmake
# or clang needed). Its Debian release must match the runtime's (glibc): to
# move to Debian 13, change both (`rust:X-trixie` and `cc-debian13`).
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src

# Cargo features beyond the production set: empty for production (no
# simulator code in the binary), `simulator` for a demo image.
ARG FEATURES=""
# The commit built, for the `toastgate_build_info` metric (the build context
# has no .git): docker build --build-arg REVISION=$(git rev-parse HEAD) .
ARG REVISION=unknown

# The whole build context, minus .dockerignore (target/, .git/, helm/, ...).
# Copying everything rather than a hand-picked list keeps any target that
# Cargo.toml declares (benches, examples, tests) present, so the manifest
# always resolves. Dependency caching comes from the cache mounts below, not
# from a dummy-main layer.
COPY . .

# Profile-guided optimisation (PGO), on by default: bench/pgo.sh builds
# toastgate instrumented (with FEATURES: a profile applies only to a build
# of the same features), runs it as a gateway in front of the simulator (a
# debug build) on the demo's workload (listings with links rewritten, the
# v1.0 surface, a rate limit, refusals), then builds the binary with that
# profile and checks that the profile matched it: fewer instructions per
# proxied request (README, Benchmarks). It costs two more builds and needs
# rustup's llvm-tools component, downloaded here. PGO=0: a plain release
# build (an offline builder, or a quicker one).
ARG PGO=1

# The cargo registry and target/ are BuildKit cache mounts: a source change
# recompiles toastgate only, not its ~300 dependencies (with PGO, the
# dependencies are rebuilt with each new profile). The mounts are not part
# of any layer, so the binary is copied out in the same step.
RUN --mount=type=cache,id=toastgate-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=toastgate-target,target=/src/target,sharing=locked \
    if [ "${PGO}" = 1 ]; then \
        rustup component add llvm-tools \
        && TOASTGATE_COMMIT="${REVISION}" FEATURES="${FEATURES}" bash bench/pgo.sh /out/toastgate; \
    elif [ "${PGO}" = 0 ]; then \
        TOASTGATE_COMMIT="${REVISION}" \
        cargo build --release --locked --no-default-features --features "${FEATURES}" --bin toastgate \
        && install -D -m 0755 target/release/toastgate /out/toastgate; \
    else \
        echo "PGO must be 1 or 0 (got '${PGO}')" >&2; exit 2; \
    fi \
 && /out/toastgate --version

# The files of /etc/toastgate, staged with explicit modes (folders 0755,
# files 0444): COPY from the context would keep the checkout's permission
# bits (a umask-077 clone gives 0600 files the runtime user cannot read), and
# COPY --chmod also sets the mode of the folders it creates, on recent
# BuildKit only. Then the smoke check: the binary accepts the demo config
# where the image will have it. (.ci/deploy-checks runs this step, with /out
# elsewhere, to rehearse the image layout.)
RUN install -d -m 0755 /out/etc/toastgate /out/etc/toastgate/config \
                       /out/etc/toastgate/config/demo-secrets \
 && install -m 0444 config/demo.yaml config/toastgate.example.yaml /out/etc/toastgate/config/ \
 && install -m 0444 config/demo-secrets/* /out/etc/toastgate/config/demo-secrets/ \
 && /out/toastgate check-config --config /out/etc/toastgate/config/demo.yaml

# ---------------------------------------------------------------------------
# Runtime stage: glibc + libgcc (what the binary links: libc, libm, libgcc_s),
# no shell, no package manager. TLS roots: the web PKI roots compiled into
# the binary (webpki-roots), plus the base's CA bundle (the system store);
# a private CA goes in `upstream.ca_file`.
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="toastgate" \
      org.opencontainers.image.description="Authenticating API gateway for the NHN Cloud (TOAST) Compute API" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=build /out/toastgate /usr/local/bin/toastgate

# The repository's config/ files, laid out as there, under
# /etc/toastgate/config/: `toastgate demo` defaults to `config/demo.yaml`
# relative to the working directory, and demo.yaml names its secrets relative
# to itself (demo-secrets/...). The demo secrets are made-up values that work
# only against the built-in simulator. Root-owned, world-readable, read-only.
COPY --from=build /out/etc/toastgate/ /etc/toastgate/

# Your config goes to /etc/toastgate/config.yaml (a bind mount, or the Helm
# chart's ConfigMap); Kubernetes Secrets go under /etc/toastgate/secrets/.
WORKDIR /etc/toastgate

# distroless "nonroot" (65532:65532), numeric so that Kubernetes'
# runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532

# 8080: public listener (what teams call). 9090: admin listener (/healthz,
# /readyz, /metrics); keep it off the public network.
EXPOSE 8080 9090

# No HEALTHCHECK on purpose: the image has no shell or curl to run one, and
# the orchestrator probes the admin port itself (Kubernetes: liveness on
# /healthz, readiness on /readyz; see helm/toastgate). Docker's HEALTHCHECK is
# ignored by Kubernetes anyway.

# toastgate runs as PID 1: it handles SIGTERM/SIGINT itself (drain, then exit)
# and starts no child processes, so no init process (tini) is needed.
ENTRYPOINT ["/usr/local/bin/toastgate"]
CMD ["serve", "--config", "/etc/toastgate/config.yaml"]
