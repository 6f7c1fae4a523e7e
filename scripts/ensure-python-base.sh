#!/usr/bin/env bash
# Print a Python 3.11 base image the Dockerfiles in deploy/docker/ can build FROM, making one if needed.
#
#   export CONTAINERS_CONF="$(scripts/ensure-podman.sh)"
#   base="$(scripts/ensure-python-base.sh)" && podman build --build-arg PYTHON_IMAGE="$base" ...
#
# First match wins:
#   1. $GENIMG_PYTHON_IMAGE, pulled if it is not here yet;
#   2. the official image (docker.io/library/python:3.11-slim-bookworm) if it is already here;
#   3. the Debian base this script built before (localhost/genimg/python-base:3.11-bookworm);
#   4. the official image, if a registry answers a pull;
#   5. a new Debian base: `debootstrap --variant=minbase` of bookworm with python3, python3-venv,
#      python-is-python3, ca-certificates and libpython3.11 (Triton's Python-backend stub links
#      a shared libpython, which Debian's python3 lacks unless libpython3.11 is installed),
#      imported with `podman import` (about 2 minutes; Debian's Python is /usr/bin/python3).
# Stdout is only the image reference. Exit 1 when none can be had (the reason is on stderr).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
official="docker.io/library/python:3.11-slim-bookworm"
local_base="localhost/genimg/python-base:3.11-bookworm"
mirror="${GENIMG_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
pull_timeout_s="${GENIMG_PULL_TIMEOUT_S:-120}"
say() { echo "ensure-python-base: $*" >&2; }
here() { podman image exists "$1"; }

if [[ -n "${GENIMG_PYTHON_IMAGE:-}" ]]; then
    here "$GENIMG_PYTHON_IMAGE" || timeout "$pull_timeout_s" podman pull -q "$GENIMG_PYTHON_IMAGE" >&2
    echo "$GENIMG_PYTHON_IMAGE"; exit 0
fi
if here "$official"; then echo "$official"; exit 0; fi
if here "$local_base"; then echo "$local_base"; exit 0; fi
mkdir -p "$root/.cache/genimg"
if timeout "$pull_timeout_s" podman pull -q "$official" >/dev/null 2>"$root/.cache/genimg/pull.err"; then
    echo "$official"; exit 0
fi
say "cannot pull $official ($(tail -n 1 "$root/.cache/genimg/pull.err")); building $local_base with debootstrap"

command -v debootstrap >/dev/null 2>&1 || { say "debootstrap is not installed (scripts/ensure-podman.sh installs it)"; exit 1; }
work="$(mktemp -d "${TMPDIR:-/var/tmp}/genimg-python-base.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log="$root/.cache/genimg/debootstrap.log"
if ! debootstrap --variant=minbase \
        --include=python3,python3-venv,python-is-python3,ca-certificates,libpython3.11 \
        bookworm "$work/rootfs" "$mirror" > "$log" 2>&1; then
    say "debootstrap failed; see $log: $(tail -n 3 "$log")"
    exit 1
fi
# What an image does not need: apt's downloaded lists and packages, logs, man pages.
rm -rf "$work/rootfs"/var/lib/apt/lists/* "$work/rootfs"/var/cache/apt/* "$work/rootfs"/var/log/* \
       "$work/rootfs"/usr/share/man/* "$work/rootfs"/usr/share/doc/*
# The stub's shared libpython must be there (checked in the new root, as the image will run it).
if ! chroot "$work/rootfs" /usr/bin/python3 -c 'import sysconfig, pathlib, sys
lib = pathlib.Path(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"))
sys.exit(0 if lib.exists() else f"no shared libpython at {lib}")' >&2; then
    say "the debootstrapped Python has no shared libpython"
    exit 1
fi
tar -C "$work/rootfs" --numeric-owner -c . \
    | podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        --message "genimg: debootstrap --variant=minbase bookworm + python3, python3-venv, libpython3.11" \
        - "$local_base" >&2
echo "$local_base"
