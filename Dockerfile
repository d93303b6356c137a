# syntax=docker/dockerfile:1
# Builds the recording-canary controller image:
#   docker build -t ghcr.io/recording-canary/recording-canary:0.1.0 .
# The runtime image is distroless (glibc, no shell) and runs as the nonroot user 65532,
# matching the Helm chart's securityContext (runAsNonRoot, readOnlyRootFilesystem).

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Everything the build needs (see .dockerignore for what is left out).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin recording-canary \
 && install -D -m 0755 target/release/recording-canary /out/recording-canary

# Same Debian release as the build image, so the glibc the binary links against is there.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="recording-canary" \
      org.opencontainers.image.description="Routes a share of a Service's traffic, through Istio, to a recording clone of its Deployment" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/recording-canary /recording-canary
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/recording-canary"]
CMD ["run"]
