#!/usr/bin/env bash
# Build genimg's container images with podman (`make images`): genimg/worker:TAG and genimg/triton-cpu:TAG.
#
#   scripts/build-images.sh            # TAG = $GENIMG_IMAGE_TAG, default "dev" (as deploy/docker-compose.yml)
#
# 1. podman, buildah and runc from Debian and a containers.conf for this host (scripts/ensure-podman.sh);
# 2. a Python 3.11 base: the official python image if it is here or can be pulled, else one built
#    from Debian's packages with debootstrap (scripts/ensure-python-base.sh);
# 3. the cpu model repository at $GENIMG_MODEL_REPOSITORY (default .cache/genimg/model_repository,
#    the Makefile builds it with `genimg models build-repo --flavor cpu`), copied whole into triton-cpu;
# 4. `podman build` of deploy/docker/worker.Dockerfile and triton-cpu.Dockerfile with host
#    networking (pip reaches PyPI) and podman's layer cache: a second run with unchanged sources
#    reuses every layer and takes seconds.
# Prints each image's size at the end. Exit: podman's (non-zero on the first failing build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tag="${GENIMG_IMAGE_TAG:-dev}"
repo="${GENIMG_MODEL_REPOSITORY:-.cache/genimg/model_repository}"
say() { echo "build-images: $*" >&2; }

CONTAINERS_CONF="$(scripts/ensure-podman.sh)"
export CONTAINERS_CONF
base="$(scripts/ensure-python-base.sh)"
say "base image $base"
if [[ ! -s "$repo/genimg_repository.json" ]]; then
    say "no cpu model repository at $repo; build it with: genimg models build-repo --flavor cpu --out $repo"
    exit 1
fi
case "$(realpath "$repo")/" in
    "$root"/*) ;;
    *) say "$repo must lie inside the build context $root"; exit 1 ;;
esac

# pip inside the build reaches PyPI through whatever this host's pip is told: its CA bundle (a
# TLS-intercepting proxy's CA lives there, not in pip's own certifi) and an http(s) index, if set.
# They are mounted into the RUN steps only (podman build -v) and never land in an image.
pip_mounts=()
host_pip=(python3 -m pip)
[[ -x .venv/bin/python ]] && host_pip=(.venv/bin/python -m pip)
ca="${PIP_CERT:-$("${host_pip[@]}" config get global.cert 2>/dev/null || true)}"
index="${PIP_INDEX_URL:-$("${host_pip[@]}" config get global.index-url 2>/dev/null || true)}"
conf_dir="$(dirname "$CONTAINERS_CONF")"
{
    echo "[global]"
    if [[ -n "$ca" && -s "$ca" ]]; then
        echo "cert = /etc/ssl/certs/genimg-build-ca.pem"
        pip_mounts+=(-v "$(realpath "$ca"):/etc/ssl/certs/genimg-build-ca.pem:ro")
    fi
    [[ "$index" == http* ]] && echo "index-url = $index"
} > "$conf_dir/build-pip.conf"
pip_mounts+=(-v "$conf_dir/build-pip.conf:/etc/pip.conf:ro")

build() {  # $1: Dockerfile stem, then extra podman build arguments
    local name="$1"; shift
    local t0=$SECONDS
    say "building genimg/$name:$tag"
    podman build --network host --layers --format docker --pull=never \
        --build-arg PYTHON_IMAGE="$base" "${pip_mounts[@]}" "$@" \
        -f "deploy/docker/$name.Dockerfile" -t "genimg/$name:$tag" . >&2
    say "genimg/$name:$tag built in $((SECONDS - t0)) s"
}

build worker
build triton-cpu --build-arg MODEL_REPOSITORY="$(realpath --relative-to="$root" "$repo")"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' --filter reference='genimg/*' \
    | sed 's/^/build-images: /' >&2
