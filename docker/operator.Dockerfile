# gpuscale operator and node agent (one binary). Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/gpuscale/operator:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p gpuscale-operator

# distroless: no shell, non-root (uid 65532), matching the chart's securityContext.
# The node agent finds libnvidia-ml.so through the NVIDIA container runtime.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/gpuscale-operator /usr/local/bin/gpuscale-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/gpuscale-operator"]
CMD ["run"]
