"""Helpers shared by genimg's Triton Python-backend models (copied next to each ``model.py``).

Triton's Python backend appends a model's version directory to ``sys.path``,
so ``model.py`` imports this file as ``genimg_ort``. Self-contained: it runs in
Triton's stub process, which has numpy and onnxruntime but need not have genimg.

Model config parameters read here (``parameters { key: ... value { string_value } }``):
    onnx_file: ONNX file name in the version directory (default ``model.onnx``).
    intra_op_threads: ONNX Runtime intra-op threads per model instance (default 1).
    providers: comma-separated ONNX Runtime execution providers in order of
        preference; unavailable ones are skipped, CPU is the fallback.
"""

import os

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def params(config):
    """The model config's ``parameters`` as ``{key: string_value}``."""
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def version_file(args, name):
    """Path of ``name`` inside this model's version directory."""
    return os.path.join(args["model_repository"], args["model_version"], name)


def make_session(args, p):
    """An ONNX Runtime session for the ``onnx_file`` parameter's file, with the configured threads."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(p.get("intra_op_threads", "1"))
    opts.inter_op_num_threads = 1
    wanted = [x for x in p.get("providers", "CPUExecutionProvider").split(",") if x]
    available = ort.get_available_providers()
    providers = [x for x in wanted if x in available] or ["CPUExecutionProvider"]
    options = [{"device_id": args.get("model_instance_device_id", "0")} if x == "CUDAExecutionProvider" else {}
               for x in providers]
    return ort.InferenceSession(version_file(args, p.get("onnx_file", "model.onnx")), opts,
                                providers=providers, provider_options=options)


def error_response(message):
    """A failed response with code INVALID_ARG where this Python backend supports error codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)
