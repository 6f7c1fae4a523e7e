# syntax=docker/dockerfile:1
# genimg Triton image, cpu flavour: the real `tritonserver` binary that the nvidia-pytriton
# wheel carries (Triton 2.51), serving Python-backend models on ONNX Runtime (CPU). The same
# server and repository the tests, CI and the local stack use; for dev clusters and compose.
#
# Build from the repository root:
#   docker build -f deploy/docker/triton-cpu.Dockerfile -t genimg/triton-cpu:0.1.0 .
# TORCH_INDEX_URL: where the model stage gets torch (only used to export ONNX, on the CPU).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Stage 1: the serving environment: genimg core + the serve extra (no torch).
FROM ${PYTHON_IMAGE} AS serve
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY genimg ./genimg
COPY workers ./workers
COPY producer ./producer
RUN python -m venv /opt/genimg \
 && /opt/genimg/bin/pip install ".[serve]" \
 && /opt/genimg/bin/python -c "import importlib.util as u, sys; sys.exit('no torch here' if u.find_spec('torch') else 0)"

# Stage 2: export ONNX from the committed weights and write the cpu model repository (torch, CPU).
FROM ${PYTHON_IMAGE} AS models
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
WORKDIR /src
COPY pyproject.toml ./
COPY genimg ./genimg
COPY workers ./workers
COPY producer ./producer
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" ".[train]"
RUN /opt/build/bin/genimg models export --out /out/onnx \
 && /opt/build/bin/genimg models build-repo --flavor cpu --onnx-dir /out/onnx --out /out/repository

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 genimg \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin genimg
COPY --from=serve /opt/genimg /opt/genimg
COPY --from=models /out/repository /models/repository
ENV PATH=/opt/genimg/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GENIMG_TRITON_REPO=/models/repository
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 \
    CMD ["genimg", "triton", "ready", "--url", "127.0.0.1:8001", "--timeout-s", "5"]
# Exec form: `genimg triton serve` is PID 1; on SIGTERM it stops tritonserver (its own process
# group, Python-backend stubs and shared memory included) and exits 0. It needs a writable /tmp
# (its work directory) and a /dev/shm large enough for the Python backend's batches.
ENTRYPOINT ["genimg", "triton", "serve", "--repo", "/models/repository", "--host", "0.0.0.0"]
