"""Upper bound: a profile's served ONNX models in this one Python process, no queue, no network.

Items ``[0, N)`` of the benchmark's job for ``--profile`` (text profiles: prompt
``i // images_per_prompt``) get exactly the inputs a genimg worker builds
(:func:`genimg.profiles.tensors.build_inputs` from :func:`genimg.seeds.item_seeds`),
run through the profile's ensemble steps (``serve.ensemble``: e.g. generator →
upscaler and verifier, or faces → ESRGAN) with ONNX Runtime — the same ONNX files
(the digit models exported from the committed weights, the fetched ones through
:func:`genimg.models.fetch.fetch_model`) and the same session options as Triton's
Python-backend models — and every image is read as genimg reads it
(:func:`~genimg.profiles.tensors.read_images`), encoded with :func:`genimg.imaging.encode`
(the bytes genimg stores), hashed with :func:`genimg.imaging.phashes` (the index's ``phash``
column, issue 18) and written as one tar per batch (:func:`genimg.shards.write_tar`)
to ``--out-dir/NNNNNNNN.tar`` (a file per image cost 0.7-1.0 ms of CPU per image here,
more than genimg's whole storage path: a bound must not pay it). Items are
cut into batches of ``--batch``; ``--threads`` threads each take a batch (ONNX
Runtime and zlib release the GIL). Sessions are created before the clock starts.

**Prompt stage** (a profile's ``[prompt_stage]``, the digits' text encoder): by
default each distinct prompt is embedded once for the whole job and its row reused
for every image of the prompt (threads share one cache; a batch embeds the prompts
no earlier batch has claimed and waits for the others), as genimg's worker does per
shard. ``--per-image-prompt`` embeds every item's prompt (the rule before issue 20).

**CPU per stage**: with one intra-op thread ONNX Runtime computes in the calling
thread, so ``time.thread_time()`` around each ``Session.run`` is that model's CPU
(the text encoder's includes tokenising, as in Triton's stub); the same for
building the inputs (noise), reading the images, PNG encoding and writing.

Prints one JSON object: ``images_per_s``, ``seconds``, per-batch stage seconds,
``cpu_s_by_stage``, ``t0_epoch``/``t1_epoch`` (the clock's window).

    python benchmarks/upper_bound.py --onnx-dir .cache/genimg/onnx --prompts P.txt --images-per-prompt 4 \\
        --count 5000 --batch 64 --threads 2 --intra-op 1 --out-dir /tmp/ub
    python benchmarks/upper_bound.py --profile faces_x4 --count 1000 --batch 16 --out-dir /tmp/ub
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402


class Pipeline:
    """A profile's models as in-process ONNX Runtime sessions; ``run`` is the served ensemble.

    Args:
        profile: the profile (its ``serve`` section names the steps).
        profiles_dir: where ``serve.models`` paths are relative to.
        onnx_dir: genimg's own digit models (``generator.onnx``, ...), for steps not in ``serve.models``.
        intra_op: ONNX Runtime intra-op threads per session.
        per_image_prompt: embed every item's prompt instead of each distinct prompt once.
    """

    def __init__(self, profile, profiles_dir: Path, onnx_dir: Path | None, intra_op: int,
                 per_image_prompt: bool = False) -> None:
        import onnxruntime as ort

        from genimg import contract
        from genimg.models.fetch import resolve_onnx

        self.profile, self.per_image_prompt = profile, per_image_prompt
        serve = profile.serve
        served = {m.name: m for m in (serve.models if serve else ())}
        steps = list(serve.ensemble) if serve and serve.ensemble else None
        names = [s.model for s in steps] if steps else [profile.triton_model]
        if profile.prompt_stage is not None:
            if profile.prompt_stage.model != "text_encoder":
                raise SystemExit(f"{profile.name}: only the text_encoder prompt stage runs in-process")
            names.append("text_encoder")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op
        opts.inter_op_num_threads = 1

        def path(name: str) -> Path:
            if name in served:
                return resolve_onnx(served[name], profiles_dir)
            if onnx_dir is None or name not in contract.MODELS:
                raise SystemExit(f"{profile.name}: no ONNX file for step {name}")
            return onnx_dir / str(contract.MODELS[name].onnx_file)

        self.sessions = {n: ort.InferenceSession(str(path(n)), opts, providers=["CPUExecutionProvider"])
                         for n in dict.fromkeys(names)}
        self.steps = steps
        self.tokenizer = None
        if profile.prompt_stage is not None:
            from genimg.models.text_encoder import make_tokenizer, package_model_dir

            self.tokenizer = make_tokenizer(package_model_dir() / "tokenizer.json")
        self._rows: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.embedded = 0
        self.cpu: dict[str, float] = {}
        self._cpu_lock = threading.Lock()

    def _add(self, stage: str, t: float) -> None:
        with self._cpu_lock:
            self.cpu[stage] = self.cpu.get(stage, 0.0) + t

    def _session(self, name: str, feed: dict) -> dict[str, np.ndarray]:
        sess = self.sessions[name]
        names = [o.name for o in sess.get_outputs()]
        t = time.thread_time()
        out = dict(zip(names, sess.run(names, feed)))
        self._add(name, time.thread_time() - t)
        return out

    def _embed(self, prompts: list[str]) -> np.ndarray:
        from genimg.models.text_encoder import tokenize

        t = time.thread_time()
        feed = tokenize(self.tokenizer, prompts)
        sess = self.sessions["text_encoder"]
        out = sess.run(["EMBEDDING"], {i.name: feed[i.name] for i in sess.get_inputs()})[0]
        self._add("text_encoder", time.thread_time() - t)
        with self._cpu_lock:
            self.embedded += len(prompts)
        return out

    def per_prompt(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The prompt stage's output rows for ``prompts`` (``{"EMBEDDING": [B, 384]}``)."""
        if self.per_image_prompt:
            return {"EMBEDDING": self._embed(prompts)}
        mine = []
        with self._lock:
            for p in dict.fromkeys(prompts):
                if p not in self._rows:
                    self._rows[p] = Future()
                    mine.append(p)
        if mine:
            try:
                emb = self._embed(mine)
            except BaseException as e:
                for p in mine:
                    self._rows[p].set_exception(e)
                raise
            for k, p in enumerate(mine):
                self._rows[p].set_result(emb[k])
        return {"EMBEDDING": np.stack([self._rows[p].result() for p in prompts])}

    def run(self, inputs: dict) -> dict[str, np.ndarray]:
        """The profile's served model on one batch: ``{ensemble output: array}``."""
        if self.steps is None:
            return self._session(self.profile.triton_model, inputs)
        tensors = dict(inputs)
        for s in self.steps:
            out = self._session(s.model, {k: tensors[v] for k, v in s.inputs.items()})
            for k, v in s.outputs.items():
                tensors[v] = out[k]
        return tensors


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="txt2img", help="model profile (GENIMG_PROFILES_DIR, else the bundled)")
    ap.add_argument("--onnx-dir", default=None, help="genimg's digit models (default: exported into the cache)")
    ap.add_argument("--prompts", help="text file, one prompt a line (text profiles)")
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--per-image-prompt", action="store_true", help="embed every item's prompt (no reuse)")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--intra-op", type=int, default=1)
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)

    from genimg import imaging
    from genimg.profiles import load_profiles
    from genimg.profiles.tensors import build_inputs, read_images
    from genimg.seeds import item_seeds
    from genimg.shards import write_tar

    profiles = load_profiles()
    profile = profiles.get(args.profile)
    onnx_dir = Path(args.onnx_dir) if args.onnx_dir else None
    if onnx_dir is None and any(s.model not in {m.name for m in profile.serve.models}
                                for s in (profile.serve.ensemble if profile.serve else ())):
        from genimg.triton.repo import ensure_onnx

        onnx_dir = ensure_onnx()
    pipe = Pipeline(profile, profiles.directory, onnx_dir, args.intra_op, args.per_image_prompt)
    prompts = Path(args.prompts).read_text(encoding="utf-8").splitlines() if profile.task == "text" else []
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ipp = args.images_per_prompt

    def batch(start: int, write: bool = True) -> dict[str, float]:
        idx = np.arange(start, min(start + args.batch, args.count), dtype=np.int64)
        t0 = time.perf_counter()
        texts = [prompts[int(i) // ipp] for i in idx] if prompts else [None] * len(idx)
        per_prompt = pipe.per_prompt(texts) if profile.prompt_stage is not None else None
        c1 = time.thread_time()
        inputs = build_inputs(profile, seeds=item_seeds(args.seed, idx), prompts=texts,
                              item_values=[{}] * len(idx), negative_prompt=None, per_prompt=per_prompt)
        c2 = time.thread_time()
        res = pipe.run(inputs)
        c3 = time.thread_time()
        images, _ = read_images(profile, res)
        t1, c4 = time.perf_counter(), time.thread_time()
        pngs = [imaging.encode(img, "png") for img in images]
        t2, c5 = time.perf_counter(), time.thread_time()
        hashes = imaging.phashes(images)  # the index's phash column (issue 18), as genimg's worker makes it
        t2, c5h = time.perf_counter(), time.thread_time()  # "encode" holds the pHashes, as in genimg's stats
        if write:  # one tar per batch (as genimg writes one per shard and Ray one per batch): no per-file cost
            members = [(f"{int(i):08d}.png", data) for i, data in zip(idx, pngs)]
            members.append((f"{int(idx[0]):08d}.phash", "\n".join(hashes).encode()))
            tar, _ = write_tar(members)
            (out / f"{int(idx[0]):08d}.tar").write_bytes(tar)
        t3, c6 = time.perf_counter(), time.thread_time()
        pipe._add("inputs", c2 - c1)
        pipe._add("read", c4 - c3)
        pipe._add("encode", c5 - c4)
        pipe._add("phash", c5h - c5)
        pipe._add("write", c6 - c5h)
        return {"infer": t1 - t0, "encode": t2 - t1, "write": t3 - t2, "bytes": sum(map(len, pngs))}

    warm = min(args.batch, args.count)  # first-run allocations of each session at the run's batch size
    batch_size, args.batch = args.batch, warm
    batch(0, write=False)
    args.batch = batch_size
    pipe.cpu.clear()
    pipe._rows.clear()
    pipe.embedded = 0
    setup_cpu_s = time.process_time()
    t0_epoch, t0 = time.time(), time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        stages = list(pool.map(batch, range(0, args.count, args.batch)))
    seconds = time.perf_counter() - t0
    report = {"images": args.count, "seconds": round(seconds, 3), "images_per_s": round(args.count / seconds, 2),
              "bytes": int(sum(s["bytes"] for s in stages)), "setup_cpu_s": round(setup_cpu_s, 3),
              "t0_epoch": round(t0_epoch, 3), "t1_epoch": round(t0_epoch + seconds, 3),
              "stage_samples": {k: [round(s[k], 5) for s in stages] for k in ("infer", "encode", "write")},
              "stage_unit": f"batch of {args.batch}",
              "cpu_s_by_stage": {k: round(v, 4) for k, v in sorted(pipe.cpu.items())},
              "prompts_embedded": pipe.embedded,
              "config": {"profile": profile.name, "batch": args.batch, "threads": args.threads,
                         "intra_op": args.intra_op, "per_image_prompt": args.per_image_prompt}}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
