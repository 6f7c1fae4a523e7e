# genimg Triton image, cpu flavour: the real `tritonserver` binary that the nvidia-pytriton
# wheel carries (Triton 2.51), serving Python-backend models on ONNX Runtime (CPU). The same
# server and repository the tests, CI and the local stack use; for dev clusters and compose.
#
# The image serves the cpu model repository that `genimg models build-repo --flavor cpu` writes,
# copied in whole: whatever models (profiles) that directory holds are served, and a new model
# needs no change here. Build the repository first, then the image, from the repository root
# (`make images` does both, with podman):
#   genimg models build-repo --flavor cpu --out .cache/genimg/model_repository
#   podman build -f deploy/docker/triton-cpu.Dockerfile -t genimg/triton-cpu:0.1.0 .    (or docker build)
# MODEL_REPOSITORY: that directory, relative to the build context (.dockerignore lets only it in).
# PYTHON_IMAGE: any Python 3.11 with a shared libpython (Triton's Python-backend stub links it):
# the official python image, or Debian's python3 with libpython3.11 (scripts/ensure-python-base.sh).
# No `# syntax=` line and no BuildKit-only flags: Docker's legacy builder, BuildKit, podman and
# buildah all build it without reaching a registry for a frontend.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Stage 1: the serving environment: genimg core + the serve extra (no torch).
FROM ${PYTHON_IMAGE} AS serve
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/genimg
WORKDIR /src
# The dependency list first, as its own layer: it survives edits of the sources.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve']))" \
        > /tmp/requirements.txt \
 && /opt/genimg/bin/pip install -r /tmp/requirements.txt
COPY genimg ./genimg
COPY workers ./workers
COPY producer ./producer
# No torch; the Python-backend stub for this Python; a shared libpython for it to load.
RUN /opt/genimg/bin/pip install --no-deps ".[serve]" \
 && /opt/genimg/bin/python -c "import importlib.util as u, sys; sys.exit('no torch here' if u.find_spec('torch') else 0)" \
 && /opt/genimg/bin/python -c "import sys; from genimg.triton.server import python_libdir, stub_path; stub_path(); sys.exit(0 if python_libdir() else 'this base image has no shared libpython (Debian: install libpython3.11); Triton cannot load its Python models without one')"

FROM ${PYTHON_IMAGE}
ARG MODEL_REPOSITORY=.cache/genimg/model_repository
COPY --from=serve /opt/genimg /opt/genimg
COPY ${MODEL_REPOSITORY} /models/repository
RUN test -s /models/repository/genimg_repository.json \
 || { echo "no model repository in the build context at ${MODEL_REPOSITORY}: run 'genimg models build-repo --flavor cpu --out ${MODEL_REPOSITORY}' first" >&2; exit 1; }
RUN groupadd --system --gid 10001 genimg \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin genimg
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
