"""Triton Python-backend text encoder: UTF-8 prompts → 384-d unit-norm embeddings (genimg).

Copied by ``genimg.triton.repo.build_repository`` as ``text_encoder/1/model.py``
next to ``model.onnx`` (all-MiniLM-L6-v2 with mean pooling and L2 norm, see
``genimg.models.text_encoder``) and ``tokenizer.json``. Self-contained: it
runs in Triton's stub process with numpy, onnxruntime and ``tokenizers``.

Input ``PROMPT`` BYTES [B, 1]: each element is UTF-8 text. Output
``EMBEDDING`` FP32 [B, 384]. Tokenisation is the same as
``genimg.models.text_encoder.make_tokenizer``: the package's
``tokenizer.json`` (BERT normaliser: lower case, control characters such as
NUL removed), truncation to ``max_tokens`` word pieces, padding to the
longest prompt of the batch. A request whose bytes are not valid UTF-8 fails
alone with INVALID_ARG; the other requests of the batch are answered.

Model config parameters: ``onnx_file``, ``intra_op_threads``, ``providers``
(see ``genimg_ort.py``), ``tokenizer_file`` (default ``tokenizer.json``)
and ``max_tokens`` (default 256).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from genimg_ort import error_response, make_session, params, version_file
from tokenizers import Tokenizer


class TritonPythonModel:
    """Tokenises a batch of prompts and runs the ONNX text encoder once per batch."""

    def initialize(self, args):
        p = params(json.loads(args["model_config"]))
        self.session = make_session(args, p)
        self.tokenizer = Tokenizer.from_file(version_file(args, p.get("tokenizer_file", "tokenizer.json")))
        self.tokenizer.enable_truncation(max_length=int(p.get("max_tokens", "256")))
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.onnx_inputs = [i.name for i in self.session.get_inputs()]

    def execute(self, requests):
        responses = [None] * len(requests)
        prompts, owners = [], []
        for i, request in enumerate(requests):
            raw = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)
            try:
                texts = [bytes(b).decode("utf-8") for b in raw]
            except UnicodeDecodeError as e:
                responses[i] = error_response(f"PROMPT is not valid UTF-8: {e}")
                continue
            owners.append((i, len(texts)))
            prompts.extend(texts)
        if not prompts:
            return responses
        enc = self.tokenizer.encode_batch(prompts)
        feed = {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
        }
        (emb,) = self.session.run(["EMBEDDING"], {k: feed[k] for k in self.onnx_inputs})
        start = 0
        for i, n in owners:
            out = pb_utils.Tensor("EMBEDDING", np.ascontiguousarray(emb[start:start + n], dtype=np.float32))
            responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
            start += n
        return responses

    def finalize(self):
        self.session = None
