# syntax=docker/dockerfile:1
# One image with both proxies: `ztunnel` (node proxy and, as `ztunnel ca`, the CA) and
# `waypoint`. The manifests choose the binary with `command:`.
#
#   docker build -t ambient-mesh:dev .
#
# Stage 1 builds them with the toolchain the workspace needs, with the `dist` profile (release
# with whole-program LTO: a smaller binary, so a smaller idle RSS; see Cargo.toml); the registry and target
# directories are BuildKit cache mounts, so a rebuild after a code change recompiles only the
# workspace's crates.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p ztunnel -p waypoint \
    && mkdir -p /out \
    && cp target/dist/ztunnel target/dist/waypoint /out/

# Stage 2: glibc and libgcc only (the binaries link nothing else: TLS is rustls with ring), no
# shell, no package manager. The default user is nonroot (65532); the ztunnel DaemonSet runs as
# root with NET_ADMIN and SYS_ADMIN, the CA and waypoints as 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ztunnel /out/waypoint /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ztunnel"]
CMD ["--help"]
