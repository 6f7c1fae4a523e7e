"""benchmarks/gpu_check.py: its no-GPU path, its plan, and that its inputs and chaining fit the served models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402


def _fits(shape: tuple[int, ...], profile: dict) -> bool:
    return len(shape) == len(profile["min"]) and all(
        lo <= d <= hi for d, lo, hi in zip(shape, profile["min"], profile["max"]))


def test_gpu_check_without_a_gpu_exits_0_with_one_json_line_and_its_plan():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: gpu_check would really measure")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--seconds", "0.1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["skipped"] == "no CUDA GPU is visible"
    plan = out["plan"]
    assert set(plan["models"]) == {"faces", "esrgan_slim_x4", "vintage", "terrain"}
    assert plan["pipelines"] == {"faces_x4": ["faces", "esrgan_slim_x4"],
                                 "faces_x4_vintage": ["faces", "esrgan_slim_x4", "vintage"]}
    for model, spec in plan["models"].items():  # every shape it would send lies inside the engine's profile
        assert set(spec["inputs"]) == set(spec["engine_profile"]), model
        for name, inp in spec["inputs"].items():
            for b in plan["batches"]:
                assert _fits((b, *inp["item_shape"]), spec["engine_profile"][name]), (model, name, b)


def test_gpu_check_inputs_and_step_chaining_fit_the_fetched_models():
    """What the GPU run feeds each model (names, dtypes, shapes) runs on the CPU, chained as the pipelines chain."""
    import onnxruntime as ort

    from genimg.models.fetch import fetch_model

    rng = np.random.default_rng(0)
    sessions = {m: ort.InferenceSession(str(fetch_model(m)), providers=["CPUExecutionProvider"])
                for m in gpu_check.MODELS}
    for m in ("faces", "terrain"):
        feed = gpu_check.make_inputs(m, 2, rng)
        assert {i.name for i in sessions[m].get_inputs()} == set(feed)
        outs = sessions[m].run(None, feed)
        assert all(o.shape[0] == 2 for o in outs)
    cur = gpu_check.make_inputs("faces", 1, rng)
    for step in gpu_check.PIPELINES["faces_x4_vintage"]:
        name_in, name_out = gpu_check.STEP_IO[step]
        assert list(cur) == [name_in]
        if step != "faces":
            want = gpu_check.make_inputs(step, 1, rng)[name_in]
            assert cur[name_in].shape == want.shape and cur[name_in].dtype == want.dtype, step
        cur = {"next": sessions[step].run([name_out], cur)[0]}
        nxt = gpu_check.PIPELINES["faces_x4_vintage"]
        k = nxt.index(step)
        if k + 1 < len(nxt):
            cur = {gpu_check.STEP_IO[nxt[k + 1]][0]: cur["next"]}
    assert cur["next"].shape == (1, 256, 256, 3) and cur["next"].dtype == np.uint8
