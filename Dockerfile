# tickd container image.
#   docker build -t tickd:0.1.0 .
#   docker run -p 50051:50051 -p 9464:9464 -v tickd-data:/var/lib/tickd tickd:0.1.0
#
# The image also carries tickctl: `kubectl exec tickd-0 -- tickctl list` works without a shell.
#
# Stage 1 compiles the dependencies alone (cached until Cargo.toml or Cargo.lock change),
# stage 2 compiles tickd, stage 3 is a small distroless runtime running as a non-root user.

FROM rust:1.95-bookworm AS deps
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
# Stub targets, so that `cargo build` compiles every dependency without the real sources.
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && for bench in perf retention soak replicas; do echo 'fn main() {}' > benches/$bench.rs; done \
 && cargo build --release --locked \
 && rm -rf src

FROM deps AS build
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin tickd --bin tickctl \
 && mkdir -p /out/var/lib/tickd

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tickd /src/target/release/tickctl /usr/local/bin/
COPY --from=build --chown=65532:65532 /out/var/lib/tickd /var/lib/tickd
ENV TICKD_LISTEN=0.0.0.0:50051 \
    TICKD_METRICS_LISTEN=0.0.0.0:9464 \
    TICKD_DATA_DIR=/var/lib/tickd \
    TICKD_LOG_FORMAT=json
USER 65532:65532
# gRPC, then Prometheus /metrics.
EXPOSE 50051 9464
VOLUME ["/var/lib/tickd"]
ENTRYPOINT ["/usr/local/bin/tickd"]
