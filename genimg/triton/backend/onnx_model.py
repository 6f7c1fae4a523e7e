"""Triton Python-backend model that runs one ONNX file with ONNX Runtime (genimg cpu flavour).

Copied by ``genimg.triton.repo.build_repository`` as ``<model>/1/model.py``
for ``generator``, ``generator_uncond``, ``upscaler`` and ``verifier``. It is
self-contained (imports only numpy, Triton's ``triton_python_backend_utils``
and the sibling ``genimg_ort``) because it runs inside Triton's stub
process, not inside genimg.

Tensor names: Triton's input and output names are the ONNX graph's names
(``config.pbtxt`` lists them). Requests that Triton's dynamic batcher hands
over together are concatenated along the batch axis and run in one ONNX
Runtime call per group of equal per-item shapes (the upscaler takes any
H x W x C), then split back per request.

Rank-1 tensors: an ONNX tensor of shape ``[batch]`` (e.g. a diffusion model's
``sigma``) is declared ``[1]`` in ``config.pbtxt`` (Triton needs a per-item
dim); it arrives as ``[B, 1]`` and is flattened to ``[B]`` here, and a rank-1
output is returned as ``[B, 1]``.

Model config parameters: ``onnx_file``, ``intra_op_threads``, ``providers``
(see ``genimg_ort.py``, copied next to this file).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from genimg_ort import error_response, make_session, params


class TritonPythonModel:
    """Runs ``onnx_file`` on each batch Triton's dynamic batcher forms."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.session = make_session(args, params(config))
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        onnx_inputs = {i.name for i in self.session.get_inputs()}
        onnx_outputs = {o.name for o in self.session.get_outputs()}
        self.flat_inputs = {i.name for i in self.session.get_inputs() if len(i.shape) == 1}
        self.flat_outputs = {o.name for o in self.session.get_outputs() if len(o.shape) == 1}
        missing = (set(self.input_names) - onnx_inputs) | (set(self.output_names) - onnx_outputs)
        if missing:
            raise pb_utils.TritonModelException(
                f"{args['model_name']}: ONNX graph lacks tensors {sorted(missing)} named in config.pbtxt")

    def execute(self, requests):
        feeds = []
        for request in requests:
            feed = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.input_names}
            for n in self.flat_inputs:
                feed[n] = feed[n].reshape(-1)
            feeds.append(feed)
        groups = {}
        for i, feed in enumerate(feeds):
            key = tuple(feed[n].shape[1:] + (feed[n].dtype.str,) for n in self.input_names)
            groups.setdefault(key, []).append(i)
        responses = [None] * len(requests)
        for members in groups.values():
            sizes = [feeds[i][self.input_names[0]].shape[0] for i in members]
            batch = {n: np.concatenate([feeds[i][n] for i in members]) for n in self.input_names}
            try:
                outs = self.session.run(self.output_names, batch)
            except Exception as e:  # noqa: BLE001 - reported to the caller as this request's error
                for i in members:
                    responses[i] = error_response(f"onnxruntime failed: {e}")
                continue
            start = 0
            for i, size in zip(members, sizes):
                tensors = [pb_utils.Tensor(n, np.ascontiguousarray(
                    o[start:start + size].reshape(size, 1) if n in self.flat_outputs else o[start:start + size]))
                    for n, o in zip(self.output_names, outs)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += size
        return responses

    def finalize(self):
        self.session = None
