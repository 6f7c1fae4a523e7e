"""The tensor contract of genimg's Triton models: names, dtypes, shapes, value ranges.

This module is the one source of truth that the model tooling (:mod:`genimg.models`,
which trains and exports them), the repository builder (:mod:`genimg.triton.repo`),
the client helper (:mod:`genimg.triton.client`), the tests and
``docs/model-contract.md`` follow; it sits below both, so model tooling never
imports the serving code. It imports nothing heavy, so
a worker can use the names without protobuf, onnxruntime or torch.

Shapes here exclude the batch dimension: every model and ensemble batches
(``max_batch_size`` > 0), so on the wire each tensor is ``[B, *dims]``; ``-1``
is a variable-size dimension. Dtypes are Triton's names (``FP32``, ``UINT8``,
``INT32``, ``BYTES``).

| model | inputs | outputs |
| --- | --- | --- |
| ``text_encoder`` | ``PROMPT`` BYTES [1] | ``EMBEDDING`` FP32 [384] |
| ``generator`` | ``Z`` FP32 [100], ``COND`` FP32 [384] | ``IMAGE`` UINT8 [28, 28, 1], ``FINITE`` BOOL [1] |
| ``generator_uncond`` | ``Z`` FP32 [100] | ``IMAGE`` UINT8 [28, 28, 1], ``FINITE`` BOOL [1] |
| ``upscaler`` | ``IMAGE`` UINT8 [-1, -1, -1] | ``UPSCALED`` UINT8 [-1, -1, -1] (4H, 4W, C) |
| ``verifier`` | ``IMAGE`` UINT8 [28, 28, 1] | ``LABEL`` INT32 [1], ``SCORE`` FP32 [1] |

``FINITE`` is computed on the generator's float output before the uint8 cast
(which would hide NaN or inf): false means the image is not usable (case C9).
The ensembles that join these models (the digit pipelines, with and without
the upscaler) are declared by the digit profiles (``genimg/profiles/bundled/``).

The upscaler's output is ``UPSCALED`` (not ``IMAGE`` as in the first
design table) because a TensorRT engine cannot give an input and an output
the same name, and both flavours keep one contract.
"""

from __future__ import annotations

from dataclasses import dataclass

from genimg.limits import MAX_PROMPT_CHARS as MAX_PROMPT_CHARS

# MAX_PROMPT_CHARS (re-exported above, defined in genimg.limits): the longest prompt the client sends, in
# Unicode code points (UTF-8 on the wire: at most 8,000 bytes). Longer prompts are rejected with
# genimg.errors.ValidationError; the text encoder itself truncates to 256 word-piece tokens
# (genimg.models.text_encoder.MAX_TOKENS) whatever the length.

Z_DIM = 100
"""Length of the noise vector ``Z`` (float32, standard normal)."""
EMBED_DIM = 384
"""Length of the prompt embedding ``EMBEDDING`` / ``COND`` (float32, unit L2 norm)."""
IMAGE_SIDE = 28
"""Side in pixels of the generator's output."""
SCALE = 4
"""Upscaler factor per side."""
OUT_SIDE = IMAGE_SIDE * SCALE
"""Side in pixels of the ensembles' ``IMAGE`` (112)."""
NUM_CLASSES = 10
"""Digits the verifier classifies: ``LABEL`` is in ``[0, 10)``."""
MIN_MAX_BATCH_SIZE = 64
"""Every model and ensemble accepts at least this many items per request."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model, without the batch dimension.

    Attributes:
        name: Triton tensor name.
        dtype: Triton dtype name (``FP32``, ``UINT8``, ``INT32``, ``BYTES``).
        dims: shape without the batch axis; ``-1`` is variable.
        value_range: inclusive ``(low, high)`` of valid values, or ``None`` when unbounded.
        doc: one line for the docs.
    """

    name: str
    dtype: str
    dims: tuple[int, ...]
    value_range: tuple[float, float] | None = None
    doc: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """A served model: its tensors and, for single models, the ONNX file it runs.

    Attributes:
        name: Triton model name.
        inputs: input tensors, in order.
        outputs: output tensors, in order.
        onnx_file: file name in the export directory (``None`` for ensembles).
        steps: for ensembles, ``(model, {model_input: ensemble_tensor}, {model_output: ensemble_tensor})``.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    onnx_file: str | None = None
    steps: tuple[tuple[str, dict[str, str], dict[str, str]], ...] = ()

    @property
    def is_ensemble(self) -> bool:
        return bool(self.steps)

    def tensor(self, name: str) -> TensorSpec:
        """The input or output called ``name``; raises ``KeyError`` if there is none."""
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")


PROMPT = TensorSpec("PROMPT", "BYTES", (1,), None, "UTF-8 prompt text, at most 2,000 characters")
Z = TensorSpec("Z", "FP32", (Z_DIM,), None, "noise, standard normal (any finite value accepted)")
EMBEDDING = TensorSpec("EMBEDDING", "FP32", (EMBED_DIM,), (-1.0, 1.0), "prompt embedding, unit L2 norm")
COND = TensorSpec("COND", "FP32", (EMBED_DIM,), (-1.0, 1.0), "prompt embedding (zeros = no prompt)")
SMALL = TensorSpec("IMAGE", "UINT8", (IMAGE_SIDE, IMAGE_SIDE, 1), (0, 255), "grey image, HWC")
ANY_IMAGE = TensorSpec("IMAGE", "UINT8", (-1, -1, -1), (0, 255), "image HWC, C = 1 or 3")
UPSCALED = TensorSpec("UPSCALED", "UINT8", (-1, -1, -1), (0, 255), "image 4H x 4W x C")
LABEL = TensorSpec("LABEL", "INT32", (1,), (0, NUM_CLASSES - 1), "digit the verifier sees")
SCORE = TensorSpec("SCORE", "FP32", (1,), (0.0, 1.0), "softmax probability of LABEL")
BIG = TensorSpec("IMAGE", "UINT8", (OUT_SIDE, OUT_SIDE, 1), (0, 255), "upscaled grey image, HWC")
FINITE = TensorSpec("FINITE", "BOOL", (1,), (0, 1), "generator float output was all finite")

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("text_encoder", (PROMPT,), (EMBEDDING,), "text_encoder.onnx"),
        ModelSpec("generator", (Z, COND), (SMALL, FINITE), "generator.onnx"),
        ModelSpec("generator_uncond", (Z,), (SMALL, FINITE), "generator_uncond.onnx"),
        ModelSpec("upscaler", (ANY_IMAGE,), (UPSCALED,), "upscaler.onnx"),
        ModelSpec("verifier", (SMALL,), (LABEL, SCORE), "verifier.onnx"),
    )
}
"""The single models, by name."""

ALL: dict[str, ModelSpec] = dict(MODELS)
"""genimg's own single models, by name. Pipelines (ensembles) over them are declared by the model
profiles in ``genimg/profiles/bundled/`` and written by :mod:`genimg.triton.profile_repo`."""

# ---- the prompt expander (issue 15): a served language model, not part of an image ensemble

EXPANDER_MAX_NEW_TOKENS = 256
"""Most tokens the prompt expander writes per item (its config's ``max_new_tokens``)."""
EXPANDER = ModelSpec(
    "prompt_expander",
    (TensorSpec("TEXT", "BYTES", (1,), None, "UTF-8 source text (after template expansion)"),
     TensorSpec("INSTRUCTION", "BYTES", (1,), None, "UTF-8 user message with {text} where the text goes"),
     TensorSpec("SEED", "UINT64", (1,), None, "the sampler's seed (numpy default_rng)"),
     TensorSpec("MAX_NEW_TOKENS", "INT32", (1,), (1, EXPANDER_MAX_NEW_TOKENS), "tokens to write at most"),
     TensorSpec("TEMPERATURE", "FP32", (1,), (0.0, 2.0), "0 = greedy, else top-k sampling at this temperature")),
    (TensorSpec("DESCRIPTION", "BYTES", (1,), None, "the written image description, UTF-8"),
     TensorSpec("TOKENS", "INT32", (1,), (0, EXPANDER_MAX_NEW_TOKENS), "tokens written")),
)
"""SmolLM2-135M-Instruct behind ``prompt_expander`` (``genimg/triton/backend/prompt_expander.py``), fetched
and converted by ``genimg.models.fetch`` (``smollm2``)."""
