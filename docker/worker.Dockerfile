# gpuscale inference worker on a CUDA runtime base. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t ghcr.io/gpuscale/inference-worker:0.1.0 .
# No nvcc is needed: kernels/ are compiled at start by NVRTC (cudarc loads libcuda,
# libnvrtc and libcublas dynamically), with the compiled result cached on disk.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p gpuscale-inference-worker

FROM nvidia/cuda:12.9.1-runtime-ubuntu24.04
RUN useradd --uid 65532 --create-home worker
COPY --from=build /src/target/release/inference-worker /usr/local/bin/inference-worker
COPY kernels /opt/gpuscale/kernels
ENV GPUSCALE_KERNELS_DIR=/opt/gpuscale/kernels \
    GPUSCALE_KERNEL_CACHE=/tmp/gpuscale-kernels \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/inference-worker"]
