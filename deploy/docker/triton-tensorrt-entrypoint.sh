#!/usr/bin/env bash
# Entrypoint of the genimg Triton image, tensorrt flavour. Runs on the pod's GPU:
#
#   1. builds the TensorRT plans for this GPU model and TensorRT version with
#      `genimg models build-engines`, or reuses them from the engine cache;
#   2. writes the tensorrt model repository with `genimg models build-repo --flavor tensorrt`;
#   3. execs tritonserver with the arguments given to this script (they follow the defaults,
#      so a later flag wins) - tritonserver is then PID 1 and gets SIGTERM itself.
#
# Plans are built on the target GPU because a TensorRT plan only runs on the GPU model and
# TensorRT version that built it. The cache directory (GENIMG_ENGINE_CACHE_DIR) is an emptyDir
# by default (built once per pod start, a minute or two for genimg's small models); mount a
# PersistentVolume or a node-local path there to build once per GPU model instead. Entries
# are keyed by GPU name, compute capability and TensorRT version and written atomically.
set -euo pipefail

repo="${GENIMG_TRITON_REPO:-/models/repository}"
onnx_dir="${GENIMG_ONNX_DIR:-/opt/genimg/onnx}"
cache="${GENIMG_ENGINE_CACHE_DIR:-/var/cache/genimg/engines}"
instances="${GENIMG_TRITON_INSTANCES:-1}"
exit_timeout_s="${GENIMG_TRITON_EXIT_TIMEOUT_S:-30}"
genimg=/opt/genimg/bin/genimg
py=/opt/genimg/bin/python

log() { printf '%s genimg-triton-entrypoint: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }

# A plan from TensorRT X does not load in TensorRT Y: the Python API that builds must match
# the library that tritonserver's TensorRT backend loads.
trt_py="$("$py" -c 'import tensorrt; print(tensorrt.__version__)')"
trt_lib="$(find /usr/lib /usr/local -name 'libnvinfer.so.*.*.*' 2>/dev/null \
           | sed -n 's/.*libnvinfer\.so\.\([0-9]*\.[0-9]*\.[0-9]*\).*/\1/p' | sort -V | tail -n 1)"
if [[ -n "$trt_lib" && "$trt_py" != "$trt_lib"* ]]; then
    log "TensorRT mismatch: the builder is $trt_py but tritonserver loads $trt_lib; rebuild the image with TENSORRT_VERSION=$trt_lib"
    exit 1
fi

gpu="$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader --id=0 2>/dev/null || true)"
if [[ -z "$gpu" ]]; then
    log "no GPU visible (nvidia-smi found none); the tensorrt flavour needs one (nvidia.com/gpu: 1)"
    exit 1
fi
key="$(printf '%s-trt%s' "$gpu" "$trt_py" | tr -c 'A-Za-z0-9._-' '_')"
plans="$cache/$key"
models=(generator generator_uncond upscaler verifier)

have_all_plans() { local m; for m in "${models[@]}"; do [[ -s "$plans/$m.plan" ]] || return 1; done; }

if have_all_plans; then
    log "reusing TensorRT plans in $plans"
else
    log "building TensorRT plans for '$gpu' (TensorRT $trt_py) into $plans"
    mkdir -p "$cache"
    tmp="$(mktemp -d "$cache/.build-XXXXXX")"
    "$genimg" models build-engines --onnx-dir "$onnx_dir" --out "$tmp"
    for m in "${models[@]}"; do
        [[ -s "$tmp/$m.plan" ]] || { log "build-engines wrote no $m.plan (see its output above)"; exit 1; }
    done
    rm -rf "$plans" && mv -T "$tmp" "$plans"
fi

"$genimg" models build-repo --flavor tensorrt --onnx-dir "$onnx_dir" --plan-dir "$plans" \
    --instances "$instances" --out "$repo" --force
"$py" - "$repo" <<'PY'
import json, sys
missing = json.load(open(f"{sys.argv[1]}/genimg_repository.json")).get("plans_missing", [])
sys.exit(f"model repository lacks TensorRT plans for {missing}" if missing else 0)
PY

log "starting tritonserver on $repo"
exec tritonserver \
    --model-repository="$repo" \
    --strict-readiness=true \
    --exit-timeout-secs="$exit_timeout_s" \
    --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
    "$@"
