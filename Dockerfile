# syntax=docker/dockerfile:1
# The arcguard image. From the repository root:
#
#   docker build -t arcguard .
#
# The binary links glibc (and libgcc_s), so the final stage is distroless/cc on the same
# Debian release as the build stage (bookworm = debian12): the glibc the binary was linked
# against is the one it runs with. No shell, no package manager, non-root.

# Build stage: the toolchain the project is developed with (the MSRV, 1.89, is in Cargo.toml).
FROM rust:1.95-bookworm AS build
WORKDIR /build

# Dependencies first, in a layer of their own that is rebuilt only when Cargo.toml or
# Cargo.lock change. Stub sources stand in for the crate, and for every [[bench]], [[test]]
# or [[example]] target Cargo.toml declares (cargo rejects a manifest whose declared targets
# are missing; targets with an explicit `path` need that file added here). The stubs carry a
# crate doc so that lints such as missing_docs cannot fail the stub build.
COPY Cargo.toml Cargo.lock ./
RUN set -eu; \
    mkdir -p src; \
    printf '//! Dependency-layer stub.\nfn main() {}\n' > src/main.rs; \
    printf '//! Dependency-layer stub.\n' > src/lib.rs; \
    awk '/^\[\[(bench|test|example)\]\]/ { kind = $0; gsub(/[][]/, "", kind); next } \
         /^\[/ { kind = "" } \
         kind != "" && /^name *=/ { sub(/^name *= *"/, ""); sub(/".*/, ""); \
             dir = (kind == "bench") ? "benches" : (kind == "test") ? "tests" : "examples"; \
             print dir "/" $0 ".rs" }' Cargo.toml \
    | while read -r stub; do \
        mkdir -p "$(dirname "$stub")"; \
        printf '//! Dependency-layer stub.\nfn main() {}\n' > "$stub"; \
    done; \
    cargo build --release --locked; \
    rm -rf src

COPY src ./src
# COPY keeps the sources' modification times, which may be older than the stub build's
# outputs: touch them so cargo rebuilds the crate instead of shipping the stub.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="arcguard" \
      org.opencontainers.image.description="Kubernetes admission controller for hybrid Linux/Windows clusters" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /build/target/release/arcguard /usr/local/bin/arcguard
# The sample policies, for standalone `serve` and `check`; cluster mode reads policies from
# ClusterGuardPolicy and GuardPolicy objects instead (manifests/ overrides this CMD).
COPY policies/ /etc/arcguard/policies/
# distroless "nonroot" (65532), numerically, so runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
# 8443: HTTPS webhooks (/validate, /mutate). 9090: plain HTTP /metrics, /healthz, /readyz.
EXPOSE 8443 9090
ENTRYPOINT ["/usr/local/bin/arcguard"]
# Standalone default, so that `docker run -p 8443:8443 -p 9090:9090 arcguard` serves the
# sample policies. Without certificates arcguard generates a development CA and a serving
# certificate for localhost/127.0.0.1; they go under /tmp (world-writable in distroless), since
# the default certs/ is relative to the working directory `/`, which user 65532 cannot write.
# Fetch the CA with `docker cp <container>:/tmp/arcguard/ca.crt .`. With `docker run
# --read-only`, add `--tmpfs /tmp`; to serve your own certificate, mount it and pass
# --tls-cert/--tls-key (or ARCGUARD_TLS_CERT/ARCGUARD_TLS_KEY) pointing at the mount.
CMD ["serve", "--policies", "/etc/arcguard/policies", \
     "--addr", "0.0.0.0:8443", "--metrics-addr", "0.0.0.0:9090", \
     "--tls-cert", "/tmp/arcguard/tls.crt", "--tls-key", "/tmp/arcguard/tls.key", \
     "--ca-cert", "/tmp/arcguard/ca.crt"]
