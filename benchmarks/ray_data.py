"""Ray Data baseline: ``map_batches`` with an actor pool running the same ONNX models, writing to the same S3 API.

Runs in its own virtual environment (``.cache/bench/ray-venv``, made by
``benchmarks/bench.py``: Ray's numpy pins clash with pytriton's ``numpy<2``),
so it imports nothing from genimg. What a Ray user would write:

    ray.data.range(N)
      .map_batches(Generate, batch_size=B, concurrency=A, num_cpus=(CPUS - 1) / A)   # actors: ONNX sessions
      .take_all()

``Generate`` holds ONNX Runtime sessions for the models of ``--pipeline``
(the files the cpu Triton repository serves, one intra-op thread each, as
there): ``txt2img`` runs the text encoder, generator, upscaler and verifier,
tokenising prompts with the same tokenizer settings and embedding each distinct
prompt of a batch once (the rows reused for every image of the prompt, as
genimg does per shard: batches are contiguous item ranges, so with
``images_per_prompt`` dividing the batch size every prompt is embedded once);
``faces_x4`` runs the fetched faces generator and ESRGAN slim x4
(``--faces-onnx``, ``--esrgan-onnx``). It derives each item's noise as genimg
does (so the images are the same), encodes PNGs with PIL at zlib level 6, hashes
each image with ``imagehash.phash`` (genimg's index has a ``phash`` column since
issue 18; a Ray user would call the library per image) and
uploads one WebDataset-style tar per batch (``NNNNNNNN.png`` +
``NNNNNNNN.json``) with boto3. Writing one tar per batch rather than one object
per image is the fair choice: it is what genimg does per shard, and per-image
PUTs to moto cost more CPU than the models.

Each ``--configs`` entry (``BATCHxACTORS``) is one timed run in the same Ray
session; the clock runs from the start of execution (actor start-up
included: a Ray Data job starts its own pool) to the last upload. Prints one
JSON object: ``{"ray_version", "init_s", "runs": [{...}, ...]}``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time

import numpy as np

MAX_TOKENS = 256


def noise(seed: int, index: int) -> np.ndarray:
    """genimg's per-item noise (``genimg.seeds.item_noise``)."""
    m = 0xFFFF_FFFF
    words = np.array([seed & m, seed >> 32, index & m, index >> 32], dtype=np.uint32)
    item_seed = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])
    return np.random.default_rng(item_seed).standard_normal(100, dtype=np.float32)


class Generate:
    """One actor: ONNX sessions, a tokenizer and an S3 client, created once."""

    def __init__(self, pipeline: str, onnx_dir: str, tokenizer_json: str, prompts_file: str, ipp: int, seed: int,
                 endpoint: str, bucket: str, prefix: str, intra_op: int, faces_onnx: str = "",
                 esrgan_onnx: str = "") -> None:
        import boto3
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.started = time.time()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op
        opts.inter_op_num_threads = 1
        self.pipeline = pipeline
        if pipeline == "faces_x4":
            files = {"faces": faces_onnx, "esrgan": esrgan_onnx}
        else:
            files = {n: os.path.join(onnx_dir, f"{n}.onnx") for n in ("text_encoder", "generator", "upscaler",
                                                                      "verifier")}
            self.tok = Tokenizer.from_file(tokenizer_json)
            self.tok.enable_truncation(max_length=MAX_TOKENS)
            self.tok.enable_padding(pad_id=0, pad_token="[PAD]")
            with open(prompts_file, encoding="utf-8") as f:
                self.prompts = f.read().splitlines()
        self.s = {n: ort.InferenceSession(f, opts, providers=["CPUExecutionProvider"]) for n, f in files.items()}
        self.ipp, self.seed, self.bucket, self.prefix = ipp, seed, bucket, prefix
        self.s3 = boto3.client("s3", endpoint_url=endpoint)
        self.ready = time.time()

    def _txt2img(self, idx: list[int]) -> tuple[np.ndarray, list[dict]]:
        prompts = [self.prompts[i // self.ipp] for i in idx]
        unique = list(dict.fromkeys(prompts))  # each distinct prompt of the batch embedded once
        row = {p: k for k, p in enumerate(unique)}
        enc = self.tok.encode_batch(unique)
        feed = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
        te = self.s["text_encoder"]
        emb = te.run(["EMBEDDING"], {i.name: feed[i.name] for i in te.get_inputs()})[0]
        cond = emb[[row[p] for p in prompts]]
        z = np.stack([noise(self.seed, i) for i in idx])
        small = self.s["generator"].run(["IMAGE"], {"Z": z, "COND": cond})[0]
        big = self.s["upscaler"].run(["UPSCALED"], {"IMAGE": small})[0]
        label, score = self.s["verifier"].run(["LABEL", "SCORE"], {"IMAGE": small})
        return big, [{"prompt": prompts[j], "index": i, "label": int(label[j].reshape(-1)[0]),
                      "score": float(score[j].reshape(-1)[0])} for j, i in enumerate(idx)]

    def _faces_x4(self, idx: list[int]) -> tuple[np.ndarray, list[dict]]:
        z = np.stack([noise(self.seed, i) for i in idx])
        small = self.s["faces"].run(["IMAGE"], {"Z": z})[0]
        big = self.s["esrgan"].run(["UPSCALED"], {"IMAGE": small})[0]
        return big, [{"index": i} for i in idx]

    def __call__(self, batch: dict) -> dict:
        idx = [int(i) for i in batch["id"]]
        t0 = time.perf_counter()
        big, metas = self._faces_x4(idx) if self.pipeline == "faces_x4" else self._txt2img(idx)
        t1 = time.perf_counter()
        import imagehash
        from PIL import Image

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for j, i in enumerate(idx):
                png = io.BytesIO()
                img = big[j, :, :, 0] if big.shape[-1] == 1 else big[j]
                pil = Image.fromarray(np.ascontiguousarray(img))
                pil.save(png, format="PNG", compress_level=6)
                meta = json.dumps({**metas[j], "phash": str(imagehash.phash(pil))}).encode()
                for name, data in ((f"{i:08d}.png", png.getvalue()), (f"{i:08d}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        t2 = time.perf_counter()
        self.s3.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{idx[0]:08d}.tar", Body=buf.getvalue())
        t3 = time.perf_counter()
        return {"first": np.array([idx[0]]), "n": np.array([len(idx)]), "infer": np.array([t1 - t0]),
                "encode": np.array([t2 - t1]), "upload": np.array([t3 - t2]),
                "actor_started": np.array([self.started]), "actor_ready": np.array([self.ready]),
                "done": np.array([time.time()])}


def tree_cpu_s() -> float:
    """CPU seconds of this process and all its descendants so far (Ray's GCS, raylet, workers)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_once(args: argparse.Namespace, batch: int, actors: int, prefix: str) -> dict:
    import ray

    ds = ray.data.range(args.count, override_num_blocks=max(1, args.count // batch))
    kwargs = dict(pipeline=args.pipeline, onnx_dir=args.onnx_dir, tokenizer_json=args.tokenizer,
                  prompts_file=args.prompts, ipp=args.images_per_prompt, seed=args.seed, endpoint=args.endpoint,
                  bucket=args.bucket, prefix=prefix, intra_op=args.intra_op, faces_onnx=args.faces_onnx,
                  esrgan_onnx=args.esrgan_onnx)
    # Ray's CPU count is only its scheduler's bookkeeping (the physical budget is the CPU affinity the
    # benchmark sets): the read tasks feeding the actors need one logical CPU of their own, or the
    # executor waits for ever with every CPU held by actors.
    per_actor = max(0.1, (args.num_cpus - 1) / actors)
    ds = ds.map_batches(Generate, fn_constructor_kwargs=kwargs, batch_size=batch, concurrency=actors,
                        num_cpus=per_actor, batch_format="numpy")
    t0_wall = time.time()
    t0 = time.perf_counter()
    rows = ds.take_all()
    seconds = time.perf_counter() - t0
    t1_wall = t0_wall + seconds
    n = int(sum(int(r["n"]) for r in rows))
    ready = [float(r["actor_ready"]) - t0_wall for r in rows]
    started = [float(r["actor_started"]) - t0_wall for r in rows]
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2),
            "t0_epoch": round(t0_wall, 3), "t1_epoch": round(t1_wall, 3),
            "objects": len(rows), "stage_unit": f"batch of {batch}",
            "actor_start_s": round(min(started), 3), "actor_ready_s": round(max(ready), 3),
            "stage_samples": {k: [round(float(r[k]), 5) for r in rows] for k in ("infer", "encode", "upload")},
            "config": {"pipeline": args.pipeline, "batch": batch, "actors": actors, "intra_op": args.intra_op,
                       "actor_num_cpus": per_actor}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", choices=["txt2img", "faces_x4"], default="txt2img")
    ap.add_argument("--onnx-dir", default="", help="txt2img: the digit models")
    ap.add_argument("--tokenizer", default="", help="txt2img: tokenizer.json")
    ap.add_argument("--prompts", default="", help="txt2img: one prompt a line")
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--faces-onnx", default="", help="faces_x4: the fetched faces model")
    ap.add_argument("--esrgan-onnx", default="", help="faces_x4: the fetched ESRGAN slim x4 model")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--configs", default="64x2", help="comma-separated BATCHxACTORS, one timed run each")
    ap.add_argument("--intra-op", type=int, default=1)
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    t = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    init_s = time.perf_counter() - t
    setup_cpu_s = tree_cpu_s()
    runs = []
    for k, cfg in enumerate(args.configs.split(",")):
        batch, actors = (int(x) for x in cfg.split("x"))
        runs.append(run_once(args, batch, actors, f"{args.prefix}/c{k}"))
    ray.shutdown()
    print(json.dumps({"ray_version": ray.__version__, "init_s": round(init_s, 3), "setup_cpu_s": round(setup_cpu_s, 3),
                      "runs": runs}))


if __name__ == "__main__":
    main()
