#!/bin/sh
# Install Debian's `prometheus` package (the `prometheus` and `promtool` binaries) if either is absent.
#
# Idempotent: exits 0 at once when both binaries are on PATH. Used by the test suite
# (tests/fixtures/prometheus.py) and by hand:
#
#     scripts/ensure-prometheus.sh && promtool --version
#
# Exit codes: 0 installed (or already there); 3 apt cannot reach its servers, or we may not
# install (not root and no password-less sudo): the tests skip, giving the reason; 1 anything else.
# Recommends (prometheus-node-exporter) are not installed. On a host running systemd,
# Debian's package starts a prometheus service on :9090; the tests use their own port.
set -eu

have() { command -v "$1" >/dev/null 2>&1; }
if have prometheus && have promtool; then
    exit 0
fi
if ! have apt-get; then
    echo "ensure-prometheus: apt-get not found; install prometheus and promtool another way" >&2
    exit 3
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ensure-prometheus: not root and no password-less sudo; cannot apt-get install prometheus" >&2
        exit 3
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they do not know the package yet (fresh image).
if ! apt-cache policy prometheus 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    $SUDO apt-get update -qq || { echo "ensure-prometheus: apt-get update failed" >&2; exit 3; }
fi
# A lock held by a concurrent apt run: wait for it (up to 5 minutes) instead of failing.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! $SUDO apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 prometheus >"$log" 2>&1; then
    cat "$log" >&2
    if grep -qiE "failed to fetch|temporary failure|could not resolve|unable to connect|network is unreachable" "$log"; then
        echo "ensure-prometheus: apt cannot reach its package servers" >&2
        exit 3
    fi
    echo "ensure-prometheus: apt-get install prometheus failed" >&2
    exit 1
fi
if ! have prometheus || ! have promtool; then
    echo "ensure-prometheus: the prometheus package is installed but prometheus/promtool are not on PATH" >&2
    exit 1
fi
