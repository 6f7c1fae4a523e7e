"""Helpers shared by the converters of fetched models (``convert_*.py``).

Nothing here imports torch; :func:`run_with_tensors` needs ``onnx`` and
``onnxruntime``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from genimg.errors import ModelError


def load_source_file(path: Path, module_name: str) -> ModuleType:
    """Import one ``.py`` file of a fetched package on its own, without the package's ``__init__``.

    Used only to build the package's own network for a parity check (the
    packages' ``__init__`` modules import things this machine lacks, e.g.
    torchvision). The file is one whose sha256 was verified before.

    Raises:
        ModelError: the file cannot be imported.
    """
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # third-party code: any failure is "cannot import"
        raise ModelError(f"cannot import {path}: {e}") from e
    finally:
        sys.modules.pop(module_name, None)
    return module


def quantize_pm1(x: np.ndarray) -> np.ndarray:
    """Reference float [-1, 1] → uint8: ``clip(round((x + 1) * 127.5), 0, 255)`` in float32 (round half to even)."""
    y = (x.astype(np.float32) + np.float32(1.0)) * np.float32(127.5)
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def quantize_255(x: np.ndarray) -> np.ndarray:
    """Reference float [0, 255] → uint8: ``clip(round(x), 0, 255)`` (round half to even)."""
    return np.clip(np.round(x.astype(np.float32)), 0, 255).astype(np.uint8)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference of two arrays of equal shape, computed in float64."""
    if a.shape != b.shape:
        raise ModelError(f"shape mismatch in parity check: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def last_output_of(model_path: Path, op_type: str) -> str:
    """Name of the output tensor of the last ``op_type`` node in an ONNX file (e.g. the final ``Tanh``).

    Raises:
        ModelError: the graph has no such node.
    """
    import onnx

    graph = onnx.load(str(model_path)).graph
    names = [n.output[0] for n in graph.node if n.op_type == op_type]
    if not names:
        raise ModelError(f"{model_path} has no {op_type} node")
    return names[-1]


def run_with_tensors(model_path: Path, feeds: dict[str, np.ndarray], extra: list[str]) -> dict[str, np.ndarray]:
    """Run an ONNX file with ONNX Runtime (CPU), also returning intermediate tensors named in ``extra``.

    The file itself is not changed: a copy of the graph with ``extra`` added
    as outputs is run from memory.

    Returns:
        ``{name: array}`` for every graph output and every name in ``extra``.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    for name in extra:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))
