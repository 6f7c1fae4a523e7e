#!/usr/bin/env bash
# `make deploy-check`: run the images the way the manifests run them, with a real job (tests/containers/).
#
#   scripts/deploy-check.sh [PYTEST ARGS...]          (after `make images`; the Makefile does both)
#
# Needs podman (scripts/ensure-podman.sh installs it), the images genimg/worker:TAG and
# genimg/triton-cpu:TAG (TAG = $GENIMG_IMAGE_TAG, default dev) and the host venv (.venv): the
# producer and the Redis/S3 servers run on this host, on loopback; the containers use the host's
# network and the manifests' ports (8000-8002, 9101, 9180), which must be free.
# Prints the job's item count, images/s, image sizes, both containers' exit codes and what
# `podman kube play` ignored; the same facts go to demo-out/deploy-check.json.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PY:-.venv/bin/python}"
CONTAINERS_CONF="$(scripts/ensure-podman.sh)"
export CONTAINERS_CONF GENIMG_DEPLOY_CHECK=1
exec "$py" -m pytest -q -p no:cacheprovider tests/containers "$@"
