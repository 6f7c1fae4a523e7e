"""Triton Python-backend ``prompt_expander``: a source text → an image description written by SmolLM2-135M-Instruct.

Copied by ``genimg.triton.repo.build_repository`` as ``prompt_expander/1/model.py``
next to ``model.onnx`` (the decoder step with KV cache that
``genimg.models.convert_smollm2`` exports, int8 weights), ``tokenizer.json`` and
``chat.json`` (the chat template around the user message, and the stop token
ids). Self-contained: it runs in Triton's stub process with numpy,
onnxruntime and ``tokenizers`` (no torch).

Inputs, each [B, 1]:
    ``TEXT`` BYTES: the source text (UTF-8);
    ``INSTRUCTION`` BYTES: the user message, with ``{text}`` where the text goes;
    ``SEED`` UINT64: the item's seed; the sampler is ``numpy.random.default_rng(SEED)``;
    ``MAX_NEW_TOKENS`` INT32: 1..``max_new_tokens`` (config parameter, default 256);
    ``TEMPERATURE`` FP32: 0 = greedy; else softmax(logits / T) over the ``top_k`` best tokens.
Outputs, each [B, 1]:
    ``DESCRIPTION`` BYTES: the generated text, whitespace collapsed, special tokens dropped;
    ``TOKENS`` INT32: tokens generated (the stop token not counted).

Determinism: every request is one ONNX Runtime batch (the model has no
dynamic batcher, so Triton never merges requests), rows are left-padded and
masked, and each row draws from its own generator, so the same request on the
same build gives the same text. A request whose bytes are not UTF-8 or whose
numbers are out of range fails alone with INVALID_ARG.

Model config parameters: ``onnx_file``, ``intra_op_threads``, ``providers``
(``genimg_ort.py``), ``tokenizer_file``, ``chat_file``, ``top_k`` (default 50),
``max_new_tokens`` (default 256), ``max_input_tokens`` (default 256).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from genimg_ort import error_response, make_session, params, version_file
from tokenizers import Tokenizer

PAD_POSITION = 0


class TritonPythonModel:
    """Greedy or seeded top-k sampling over the ONNX decoder step, one batch per request."""

    def initialize(self, args):
        p = params(json.loads(args["model_config"]))
        self.session = make_session(args, p)
        self.tokenizer = Tokenizer.from_file(version_file(args, p.get("tokenizer_file", "tokenizer.json")))
        with open(version_file(args, p.get("chat_file", "chat.json")), encoding="utf-8") as f:
            chat = json.load(f)
        self.prefix, self.suffix = chat["prefix"], chat["suffix"]
        self.stop_ids = np.array(chat["stop_ids"], dtype=np.int64)
        self.pad_id = int(self.stop_ids[0])
        self.top_k = int(p.get("top_k", "50"))
        self.max_new = int(p.get("max_new_tokens", "256"))
        self.max_input = int(p.get("max_input_tokens", "256"))
        self.past = [i.name for i in self.session.get_inputs() if i.name.startswith("past_")]
        shape = next(i.shape for i in self.session.get_inputs() if i.name.startswith("past_"))
        self.kv_shape = (int(shape[1]), int(shape[3]))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                rows = self._read(request)
            except ValueError as e:
                responses.append(error_response(str(e)))
                continue
            try:
                texts, counts = self._generate(rows)
            except Exception as e:  # noqa: BLE001 - onnxruntime's untyped errors, reported to the caller
                responses.append(error_response(f"generation failed: {e}"))
                continue
            out = np.empty((len(texts), 1), dtype=np.object_)
            for i, t in enumerate(texts):
                out[i, 0] = t.encode("utf-8")
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("DESCRIPTION", out),
                pb_utils.Tensor("TOKENS", np.array(counts, dtype=np.int32).reshape(-1, 1))]))
        return responses

    def _read(self, request):
        def get(name):
            return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)

        try:
            texts = [bytes(b).decode("utf-8") for b in get("TEXT")]
            instructions = [bytes(b).decode("utf-8") for b in get("INSTRUCTION")]
        except UnicodeDecodeError as e:
            raise ValueError(f"TEXT and INSTRUCTION must be UTF-8: {e}") from None
        seeds, max_new, temps = get("SEED"), get("MAX_NEW_TOKENS"), get("TEMPERATURE")
        if np.any(max_new < 1) or np.any(max_new > self.max_new):
            raise ValueError(f"MAX_NEW_TOKENS must be in 1..{self.max_new}")
        if not np.all(np.isfinite(temps)) or np.any(temps < 0):
            raise ValueError("TEMPERATURE must be finite and >= 0")
        rows = []
        for text, instr, seed, n, temp in zip(texts, instructions, seeds, max_new, temps):
            message = instr.replace("{text}", text) if "{text}" in instr else f"{instr} {text}".strip()
            ids = self.tokenizer.encode(message, add_special_tokens=False).ids[:self.max_input]
            head = self.tokenizer.encode(self.prefix, add_special_tokens=False).ids
            tail = self.tokenizer.encode(self.suffix, add_special_tokens=False).ids
            rows.append((head + ids + tail, int(seed), int(n), float(temp)))
        return rows

    def _pick(self, logits, temp, rng):
        if temp == 0.0:
            return int(np.argmax(logits))
        k = min(self.top_k, logits.shape[0])
        top = np.argpartition(-logits, k - 1)[:k]
        top = top[np.lexsort((top, -logits[top]))]  # best first, ties by token id: the same order every time
        z = logits[top].astype(np.float64) / temp
        probs = np.exp(z - z.max())
        cdf = np.cumsum(probs / probs.sum())
        return int(top[min(int(np.searchsorted(cdf, rng.random(), side="right")), k - 1)])

    def _generate(self, rows):
        b = len(rows)
        width = max(len(r[0]) for r in rows)
        ids = np.full((b, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        for i, (toks, _, _, _) in enumerate(rows):
            ids[i, width - len(toks):] = toks
            mask[i, width - len(toks):] = 1
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, PAD_POSITION)
        heads, dim = self.kv_shape
        feed = {"input_ids": ids, "position_ids": pos, "attention_mask": mask}
        feed.update({n: np.zeros((b, heads, 0, dim), dtype=np.float32) for n in self.past})
        rngs = [np.random.default_rng(seed) for _, seed, _, _ in rows]
        limits = [n for _, _, n, _ in rows]
        generated = [[] for _ in rows]
        done = [False] * b
        next_pos = pos[:, -1:] + 1
        for _ in range(max(limits)):
            outs = self.session.run(None, feed)
            logits = outs[0]
            step = np.full((b, 1), self.pad_id, dtype=np.int64)
            for i in range(b):
                if done[i]:
                    continue
                tok = self._pick(logits[i], rows[i][3], rngs[i])
                if tok in self.stop_ids:
                    done[i] = True
                    continue
                generated[i].append(tok)
                step[i, 0] = tok
                if len(generated[i]) >= limits[i]:
                    done[i] = True
            if all(done):
                break
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            feed = {"input_ids": step, "position_ids": next_pos, "attention_mask": mask}
            feed.update(zip(self.past, outs[1:]))
            next_pos = next_pos + 1
        texts = [" ".join(self.tokenizer.decode(g, skip_special_tokens=True).split()) for g in generated]
        return texts, [len(g) for g in generated]

    def finalize(self):
        self.session = None
