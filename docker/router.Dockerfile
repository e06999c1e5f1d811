# gpuscale request router. Build from the repository root:
#   docker build -f docker/router.Dockerfile -t ghcr.io/gpuscale/router:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p gpuscale-router

# distroless: no shell, non-root (uid 65532), matching the chart's securityContext.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/gpuscale-router /usr/local/bin/gpuscale-router
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/gpuscale-router"]
