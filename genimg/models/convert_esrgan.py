"""Convert the UpscalerJS ESRGAN ×4 models (``@upscalerjs/esrgan-slim``/``-medium`` 1.0.0) to ONNX.

The packages hold TensorFlow.js *layers* models: ``models/x4/model.json``
(a Keras functional graph: Conv2D, Activation, Concatenate, Add,
UpSampling2D; an RDN-style residual dense network, Zhang et al. 2018,
https://arxiv.org/abs/1802.08797, as trained by UpscalerJS on DIV2K) and
``group1-shard*.bin`` (float32 weights, named with shapes in the manifest).
The ONNX graph is written directly with ``onnx.helper`` from that topology
and those weights — no TensorFlow, no torch.

ONNX interface (dynamic batch B, height H, width W):

* ``IMAGE`` uint8 [B, H, W, 3] RGB, fed to the net as float 0–255 (the
  packages' ``inputRange``);
* ``UPSCALED`` uint8 [B, 4H, 4W, 3]: ``clip(round(y), 0, 255)`` of the net's
  float output y (``outputRange`` 0–255), round half to even.

Parity: (1) ONNX Runtime against :func:`reference_forward`, an independent
numpy interpreter of the same ``model.json``; (2) against the TF.js output the
package ships (``assets/samples/4x/result.png``, the ×4 result for
``assets/fixture.png``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from genimg.errors import ModelError
from genimg.models.convert_util import max_abs_diff, quantize_255, run_with_tensors

PREFIX = "package/models/x4/"
FIXTURE = "package/assets/fixture.png"
SAMPLE_X4 = "package/assets/samples/4x/result.png"
OPSET = 17
FLOAT_TOL = 0.01
"""Largest float difference (0–255 scale) from the numpy reference the parity check accepts."""
SAMPLE_TOL = 1
"""Largest uint8 difference from the package's TF.js sample the parity check accepts."""
SR_OUTPUT = "SR_float"
"""Name of the float output tensor inside the ONNX graph (before rounding)."""


def load_layers_model(model_json: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Parse a TF.js layers model: its Keras layers and its float32 weights by name.

    Returns:
        (layers of ``modelTopology.model_config.config.layers``, ``{weight name: array}``).

    Raises:
        ModelError: malformed JSON, a non-float32 weight, or shard sizes that do not add up.
    """
    try:
        spec = json.loads(model_json.read_text())
        layers = spec["modelTopology"]["model_config"]["config"]["layers"]
        weights: dict[str, np.ndarray] = {}
        for group in spec["weightsManifest"]:
            blob = b"".join((model_json.parent / p).read_bytes() for p in group["paths"])
            offset = 0
            for w in group["weights"]:
                if w["dtype"] != "float32":
                    raise ModelError(f"{model_json}: weight {w['name']} is {w['dtype']}, expected float32")
                count = int(np.prod(w["shape"]))
                weights[w["name"]] = np.frombuffer(blob, np.float32, count, offset).reshape(w["shape"])
                offset += 4 * count
            if offset != len(blob):
                raise ModelError(f"{model_json}: manifest names {offset} bytes, shards hold {len(blob)}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{model_json}: not a TF.js layers model: {e}") from e
    return layers, weights


def _inputs_of(layer: dict) -> list[str]:
    nodes = layer.get("inbound_nodes") or []
    return [n[0] for n in nodes[0]] if nodes else []


def _check_conv(layer: dict) -> tuple[str, str]:
    c = layer["config"]
    if tuple(c["strides"]) != (1, 1) or tuple(c.get("dilation_rate", (1, 1))) != (1, 1) or not c["use_bias"]:
        raise ModelError(f"layer {layer['name']}: only stride 1, dilation 1 convolutions with bias are supported")
    if c.get("data_format", "channels_last") != "channels_last" or c["padding"] not in ("same", "valid"):
        raise ModelError(f"layer {layer['name']}: unsupported data_format/padding")
    if c["activation"] not in ("linear", "relu"):
        raise ModelError(f"layer {layer['name']}: unsupported activation {c['activation']!r}")
    return c["padding"], c["activation"]


def _conv_nhwc(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, padding: str) -> np.ndarray:
    kh, kw = kernel.shape[:2]
    if padding == "same":  # TF "same" with stride 1 and an odd kernel: (k - 1) / 2 zeros each side
        x = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    # windows: [B, H, W, C, kh, kw]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # type: ignore[call-overload]  # numpy stubs: no tuple axis
    return np.einsum("bhwcij,ijco->bhwo", windows, kernel, optimize=True) + bias


def reference_forward(layers: list[dict], weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Evaluate the Keras graph in numpy, NHWC float32, as Keras defines each layer.

    Args:
        x: float32 [B, H, W, 3], values 0–255.

    Returns:
        float32 [B, 4H, 4W, 3] (the last layer's output), values about 0–255.
    """
    t: dict[str, np.ndarray] = {}
    y = x
    for layer in layers:
        kind, name, ins = layer["class_name"], layer["name"], [t[n] for n in _inputs_of(layer)]
        if kind == "InputLayer":
            y = x
        elif kind == "Conv2D":
            padding, act = _check_conv(layer)
            y = _conv_nhwc(ins[0], weights[f"{name}/kernel"], weights[f"{name}/bias"], padding)
            y = np.maximum(y, 0) if act == "relu" else y
        elif kind == "Activation":
            y = np.maximum(ins[0], 0) if layer["config"]["activation"] == "relu" else ins[0]
        elif kind == "Concatenate":
            y = np.concatenate(ins, axis=-1)
        elif kind == "Add":
            y = np.sum(ins, axis=0)
        elif kind == "UpSampling2D":
            a, b = layer["config"]["size"]
            y = ins[0].repeat(a, axis=1).repeat(b, axis=2)
        else:
            raise ModelError(f"layer {name}: unsupported Keras layer {kind}")
        t[name] = y.astype(np.float32)
    return t[layers[-1]["name"]]


def build_onnx(layers: list[dict], weights: dict[str, np.ndarray], graph_name: str):  # -> onnx.ModelProto
    """The ONNX model (``IMAGE`` uint8 NHWC → ``UPSCALED`` uint8 NHWC) of a Keras graph, NCHW inside.

    Raises:
        ModelError: a layer kind or option outside the supported set (see :func:`reference_forward`).
    """
    from onnx import TensorProto, checker, helper, numpy_helper

    nodes, inits = [], []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    nodes += [helper.make_node("Cast", ["IMAGE"], ["image_f"], to=TensorProto.FLOAT),
              helper.make_node("Transpose", ["image_f"], [layers[0]["name"]], perm=[0, 3, 1, 2])]
    for layer in layers[1:]:
        kind, name, ins = layer["class_name"], layer["name"], _inputs_of(layer)
        if kind == "Conv2D":
            padding, act = _check_conv(layer)
            kernel = weights[f"{name}/kernel"]
            kh, kw = kernel.shape[:2]
            pads = [kh // 2, kw // 2, kh // 2, kw // 2] if padding == "same" else [0, 0, 0, 0]
            w = const(f"{name}/W", np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))  # HWIO → OIHW
            b = const(f"{name}/B", weights[f"{name}/bias"])
            out = f"{name}/pre" if act == "relu" else name
            nodes.append(helper.make_node("Conv", [ins[0], w, b], [out], kernel_shape=[kh, kw], pads=pads))
            if act == "relu":
                nodes.append(helper.make_node("Relu", [out], [name]))
        elif kind == "Activation":
            op = {"relu": "Relu", "linear": "Identity"}.get(layer["config"]["activation"])
            if op is None:
                raise ModelError(f"layer {name}: unsupported activation {layer['config']['activation']!r}")
            nodes.append(helper.make_node(op, ins, [name]))
        elif kind == "Concatenate":
            if layer["config"]["axis"] not in (-1, 3):
                raise ModelError(f"layer {name}: concatenation over axis {layer['config']['axis']}")
            nodes.append(helper.make_node("Concat", ins, [name], axis=1))
        elif kind == "Add":
            nodes.append(helper.make_node("Sum", ins, [name]))
        elif kind == "UpSampling2D":
            if layer["config"].get("interpolation", "nearest") != "nearest":
                raise ModelError(f"layer {name}: only nearest upsampling is supported")
            a, b = layer["config"]["size"]
            scales = const(f"{name}/scales", np.array([1, 1, a, b], np.float32))
            nodes.append(helper.make_node("Resize", [ins[0], "", scales], [name], mode="nearest",
                                          coordinate_transformation_mode="asymmetric", nearest_mode="floor"))
        else:
            raise ModelError(f"layer {name}: unsupported Keras layer {kind}")
    lo, hi = const("u8_lo", np.array(0, np.float32)), const("u8_hi", np.array(255, np.float32))
    nodes += [helper.make_node("Identity", [layers[-1]["name"]], [SR_OUTPUT]),
              helper.make_node("Round", [SR_OUTPUT], ["sr_round"]),
              helper.make_node("Clip", ["sr_round", lo, hi], ["sr_clip"]),
              helper.make_node("Transpose", ["sr_clip"], ["sr_nhwc"], perm=[0, 2, 3, 1]),
              helper.make_node("Cast", ["sr_nhwc"], ["UPSCALED"], to=TensorProto.UINT8)]
    graph = helper.make_graph(
        nodes, graph_name,
        [helper.make_tensor_value_info("IMAGE", TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("UPSCALED", TensorProto.UINT8, ["batch", "height_x4", "width_x4", 3])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="genimg")
    model.ir_version = 8
    checker.check_model(model, full_check=True)
    return model


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def convert(files: dict[str, Path], out: Path) -> dict:
    """Write the ESRGAN ×4 ONNX file to ``out`` and check it (see the module docstring).

    Args:
        files: ``{path in the package: extracted file}`` with ``model.json``, its shards,
            the fixture and the ×4 sample.
        out: the ONNX file to write.

    Returns:
        ``float_max_abs_diff`` (vs numpy, 0–255 scale), ``uint8_max_abs_diff`` (vs numpy, quantised),
        ``tfjs_sample_max_abs_diff`` and ``tfjs_sample_diff_fraction`` (vs the TF.js sample).

    Raises:
        ModelError: malformed model, unsupported layer, or a failed parity check.
    """
    model_json = files[PREFIX + "model.json"]
    layers, weights = load_layers_model(model_json)
    model = build_onnx(layers, weights, graph_name="esrgan_x4")
    out.write_bytes(model.SerializeToString())

    img = np.random.default_rng(0).integers(0, 256, (2, 24, 20, 3), dtype=np.uint8)
    expected = reference_forward(layers, weights, img.astype(np.float32))
    got = run_with_tensors(out, {"IMAGE": img}, [SR_OUTPUT])
    fixture = _rgb(files[FIXTURE])[None]
    sample = _rgb(files[SAMPLE_X4])[None]
    upscaled = run_with_tensors(out, {"IMAGE": fixture}, [])["UPSCALED"]
    diff = np.abs(upscaled.astype(np.int16) - sample.astype(np.int16))
    report = {
        "float_max_abs_diff": max_abs_diff(got[SR_OUTPUT].transpose(0, 2, 3, 1), expected),
        "uint8_max_abs_diff": max_abs_diff(got["UPSCALED"], quantize_255(expected)),
        "tfjs_sample_max_abs_diff": float(diff.max()),
        "tfjs_sample_diff_fraction": float((diff > 0).mean()),
    }
    if (report["float_max_abs_diff"] > FLOAT_TOL or report["uint8_max_abs_diff"] > 1
            or report["tfjs_sample_max_abs_diff"] > SAMPLE_TOL):
        raise ModelError(f"ESRGAN x4 from {model_json}: ONNX differs from the reference: {report}")
    return report
