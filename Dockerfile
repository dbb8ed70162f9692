# syntax=docker/dockerfile:1
# Hearth container image.
#   CPU:  docker build -t hearth:cpu .
#   CUDA: docker build -t hearth:cuda --build-arg FEATURES=cuda --build-arg CUDA_COMPUTE_CAP=90 .
#         (the same steps as scripts/build-cuda: NVIDIA's CUDA 13.4 toolchain from PyPI wheels; the
#         image carries the CUDA runtime libraries, the NVIDIA container runtime adds the driver)
# Text to speech (`tts`: espeak-ng and libavcodec, GPL, so the image is GPL-3.0 as a whole) and
# whisper.cpp as a second speech-to-text backend (`whisper-cpp`, MIT) are on by default;
# `--build-arg FEATURES="whisper-cpp"` builds an Apache-2.0-only image without text to speech.
# whisper.cpp is built for x86-64-v3 (AVX2, FMA, F16C) rather than for the build machine's own
# CPU; for older CPUs pass `--build-arg GGML_AVX2=OFF --build-arg GGML_FMA=OFF` (the `GGML_*`
# arguments below).
# OpenTelemetry trace export: add `otlp` to FEATURES (e.g. `FEATURES="tts otlp"`, `"cuda tts otlp"`).
# Run:  docker run -p 8080:8080 -v hearth-models:/var/lib/hearth/models -e HEARTH_API_KEY=... hearth:cpu
# Linted with hadolint in CI (scripts/check-deploy; .hadolint.yaml says what is ignored and why).
# Models are read from (and downloaded to) /var/lib/hearth/models; RAG's files and vector stores
# live in /var/lib/hearth/data; the config is /etc/hearth/hearth.toml (mount your own over it).

ARG BUILD_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG FEATURES="tts whisper-cpp"
ARG CUDA_COMPUTE_CAP="90"
# whisper.cpp's CPU code (whisper-rs-sys passes GGML_* variables to its cmake build): portable, not
# tuned to the machine that builds the image.
ARG GGML_NATIVE=OFF
ARG GGML_AVX=ON
ARG GGML_AVX2=ON
ARG GGML_FMA=ON
ARG GGML_F16C=ON
ENV GGML_NATIVE=${GGML_NATIVE} GGML_AVX=${GGML_AVX} GGML_AVX2=${GGML_AVX2} GGML_FMA=${GGML_FMA} \
    GGML_F16C=${GGML_F16C}
# Cargo's home where the official rust images keep it (and where rustup installs it otherwise), so
# the registry cache below is the one cargo uses.
ENV CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup
ENV PATH=/usr/local/cargo/bin:${PATH}
RUN if ! command -v cargo >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential \
      && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0; \
    fi
# libopus for Opus audio (ogg and webm uploads and speech), found through pkg-config; espeak-ng for
# text to speech's phonemes and libavcodec for its AAC output (bindings generated with libclang);
# pip for ONNX Runtime's wheel (scripts/fetch-models); cmake for whisper.cpp.
RUN apt-get update && apt-get install -y --no-install-recommends pkg-config libopus-dev libespeak-ng-dev \
       libavcodec-dev libclang-dev python3-pip cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# With `cuda` in FEATURES, scripts/build-cuda fetches the toolchain and builds (the other features
# go along); its CUDA runtime libraries are kept for the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    mkdir -p /out/cuda-lib \
    && case " ${FEATURES} " in \
         *" cuda "*) \
           apt-get update && apt-get install -y --no-install-recommends python3-pip unzip \
           && HEARTH_HOME=/opt/hearth HEARTH_FEATURES="${FEATURES}" scripts/build-cuda "${CUDA_COMPUTE_CAP}" \
           && cp -a /opt/hearth/cuda/13.4.3/nvidia/cu13/lib/lib*.so.* /out/cuda-lib/ ;; \
         *) cargo build --release --locked --features "${FEATURES}" ;; \
       esac \
    && install -D target/release/hearth /out/hearth \
    && mkdir -p /out/lib \
    && case " ${FEATURES} " in \
         *" tts "*) python3 scripts/fetch-models --lib-dir /out/lib --models-dir /tmp/unused onnxruntime ;; \
       esac

FROM ${RUNTIME_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libopus0 libespeak-ng1 \
       libavcodec59 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/hearth hearth \
    && install -d -o hearth -g hearth /var/lib/hearth/models /var/lib/hearth/data
COPY --from=build /out/hearth /usr/local/bin/hearth
COPY --from=build /out/cuda-lib/ /usr/local/lib/hearth-cuda/
COPY --from=build /out/lib/ /usr/local/lib/hearth/
COPY config/ /etc/hearth/
ENV LD_LIBRARY_PATH=/usr/local/lib/hearth-cuda \
    HEARTH_HOST=0.0.0.0 \
    HEARTH_PORT=8080 \
    HEARTH_MODELS_DIR=/var/lib/hearth/models \
    HEARTH_DATA_DIR=/var/lib/hearth/data \
    ORT_DYLIB_PATH=/usr/local/lib/hearth/libonnxruntime.so.1.31.1 \
    HEARTH_CONFIG=/etc/hearth/hearth.toml
USER 10001:10001
EXPOSE 8080
VOLUME ["/var/lib/hearth/models", "/var/lib/hearth/data"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/hearth"]
CMD ["serve"]
