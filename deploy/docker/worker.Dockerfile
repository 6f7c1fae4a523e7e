# genimg worker image: the Celery worker (`genimg worker`) and the backlog exporter
# (`genimg exporter`). Core dependencies only: no torch, no ONNX Runtime, no Triton server.
#
# Build from the repository root (the .dockerignore there keeps the context small):
#   podman build -f deploy/docker/worker.Dockerfile -t genimg/worker:0.1.0 .     (or docker build)
# PYTHON_IMAGE: the official python image, or Debian's python3 (scripts/ensure-python-base.sh).
# No `# syntax=` line and no BuildKit-only flags (`COPY --chmod`): Docker's legacy builder,
# BuildKit, podman and buildah all build it without reaching a registry for a frontend.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/genimg
WORKDIR /src
# The core dependency list first, as its own layer: it survives edits of the sources.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && /opt/genimg/bin/pip install -r /tmp/requirements.txt
COPY genimg ./genimg
COPY workers ./workers
COPY producer ./producer
# The `worker` extra adds nothing to the core; --no-deps keeps the layer above authoritative.
RUN /opt/genimg/bin/pip install --no-deps ".[worker]"
# Refuse to build a worker image that carries the serving or training stack, and prove
# that everything the worker and the exporter import is there.
RUN /opt/genimg/bin/python -c "import importlib.util as u, sys; bad = [m for m in ('torch', 'onnxruntime', 'tokenizers', 'pytriton', 'tensorrt') if u.find_spec(m)]; sys.exit(f'worker image must not carry {bad}' if bad else 0)" \
 && /opt/genimg/bin/python -c "import workers.app, workers.tasks, genimg.exporter" \
 && /opt/genimg/bin/genimg worker --help > /dev/null \
 && /opt/genimg/bin/genimg exporter --help > /dev/null

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/genimg /opt/genimg
COPY deploy/docker/worker-prestop.sh /opt/genimg/bin/genimg-prestop
RUN groupadd --system --gid 10001 genimg \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin genimg \
 && chmod 0555 /opt/genimg/bin/genimg-prestop
ENV PATH=/opt/genimg/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GENIMG_METRICS_DIR=/tmp/genimg-metrics
WORKDIR /tmp
USER 10001:10001
EXPOSE 9101
# Celery's warm shutdown is SIGTERM: finish the running shard, take no new one, exit 0.
STOPSIGNAL SIGTERM
# Docker only; Kubernetes ignores HEALTHCHECK and uses the same command as its probes.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 CMD ["genimg", "worker", "--check"]
# Exec form: `genimg` (a Python console script) is PID 1 and receives SIGTERM itself (case C8).
# No shell in between, and no REMAP_SIGTERM (billiard would turn SIGTERM into a cold shutdown).
ENTRYPOINT ["genimg", "worker"]
