#!/usr/bin/env bash
# Make podman and buildah usable here; print the CONTAINERS_CONF file every podman call must use.
#
#   CONTAINERS_CONF="$(scripts/ensure-podman.sh)" && export CONTAINERS_CONF && podman info
#   scripts/ensure-podman.sh --probe     # also run a real container; exit 0 only if that works
#
# 1. Installs Debian's podman, buildah, runc, fuse-overlayfs, slirp4netns, uidmap, catatonit,
#    debootstrap and busybox-static when one is missing (root and apt-get only).
# 2. Writes a containers.conf under .cache/genimg/containers/ (the system files are left alone):
#    - runtime "runc" when installed: the default crun cannot run a RUN step on a cgroup v1 or
#      "hybrid" host (`cgroups in hybrid mode not supported`); runc works on v1, v2 and hybrid;
#    - default_ulimits no higher than this shell's hard limits: podman's defaults (nofile
#      1048576) fail with `error setting rlimit ... operation not permitted` where the hard
#      limit is lower.
# 3. --probe: `podman run` of a one-file root file system (a static busybox) with a read-only
#    root, host networking, a non-root user and no capabilities: the things the deploy check
#    needs, tried for real, without pulling or building an image.
#
# Exit codes: 0 ready; 3 podman cannot be installed or cannot run a container here (the reason
# is on stderr); 1 anything else. Stdout is only the containers.conf path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
conf_dir="${GENIMG_CONTAINERS_DIR:-$root/.cache/genimg/containers}"
conf="$conf_dir/containers.conf"
probe=0
[[ "${1:-}" == "--probe" ]] && probe=1

say() { echo "ensure-podman: $*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

busybox=/bin/busybox  # busybox-static: the probe's whole root file system
if ! have podman || ! have buildah || ! have debootstrap || [[ ! -x "$busybox" ]]; then
    if [[ "$(id -u)" -ne 0 ]] || ! have apt-get; then
        say "podman/buildah/debootstrap missing and this is not root with apt-get; install them yourself"
        exit 3
    fi
    say "installing podman, buildah, runc and friends from Debian (about a minute)"
    mkdir -p "$root/.cache/genimg"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            podman buildah runc crun fuse-overlayfs slirp4netns uidmap catatonit conmon containernetworking-plugins \
            debootstrap busybox-static ca-certificates; } > "$root/.cache/genimg/apt-podman.log" 2>&1; then
        say "apt-get could not install podman: $(tail -n 5 "$root/.cache/genimg/apt-podman.log")"
        exit 3
    fi
fi

cap() {  # $1: a hard limit (a number or "unlimited"), $2: the value wanted
    if [[ "$1" == unlimited ]] || (( $1 >= $2 )); then echo "$2"; else echo "$1"; fi
}
nofile="$(cap "$(ulimit -Hn)" 65536)"
nproc="$(cap "$(ulimit -Hu)" 8192)"
runtime=""
have runc && runtime="runc"

mkdir -p "$conf_dir"
tmp="$(mktemp "$conf_dir/.containers.conf.XXXXXX")"
{
    echo "# Written by scripts/ensure-podman.sh; used through CONTAINERS_CONF (system files untouched)."
    echo "[containers]"
    echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
    echo "[engine]"
    [[ -n "$runtime" ]] && echo "runtime = \"$runtime\""
    echo "cgroup_manager = \"cgroupfs\""
    echo "events_logger = \"file\""
} > "$tmp"
mv -f "$tmp" "$conf"
export CONTAINERS_CONF="$conf"

if ! podman info >/dev/null 2>"$conf_dir/podman-info.err"; then
    say "podman info fails: $(tail -n 3 "$conf_dir/podman-info.err")"
    exit 3
fi

if (( probe )); then
    rootfs="$conf_dir/probe-rootfs"
    mkdir -p "$rootfs/bin"
    cp -f "$busybox" "$rootfs/bin/busybox"
    if ! out="$(timeout 120 podman run --rm --read-only --network host --user 65534:65534 \
                 --security-opt no-new-privileges --cap-drop ALL --rootfs "$rootfs" /bin/busybox id -u 2>&1)"; then
        say "podman cannot run a container here: $(tail -n 3 <<<"$out")"
        exit 3
    fi
    if [[ "$(tail -n 1 <<<"$out")" != "65534" ]]; then
        say "the probe container did not run as uid 65534: $out"
        exit 3
    fi
    say "podman $(podman version --format '{{.Client.Version}}') runs containers here (runtime ${runtime:-default})"
fi
echo "$conf"
