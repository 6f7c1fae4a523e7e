"""One shard, end to end: seeds → Triton → encode → commit (no Celery here; ``workers/`` wraps it).

Within a shard the sub-batches flow through two thread pools: up to
``infer_inflight`` Triton requests are in flight at once (so Triton's dynamic
batcher can merge them and the model never waits on encoding), and each
answered sub-batch is encoded by ``encode_threads`` threads while the next
is being inferred (PIL's zlib/libwebp release the GIL). The shard's tar and
index are uploaded once all items are encoded; with several worker processes
one process uploads while the others keep Triton busy.

Every item's seed depends on ``(job seed, item index)`` only (case C11), so a
shard computed twice, or with another sub-batch size, gives the same bytes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from genimg import imaging, metrics
from genimg.errors import NonFiniteOutputError
from genimg.inputs import decode_prompt_chunk, prompt_chunk_key, prompt_chunks_for_items
from genimg.shards import Layout, ShardItem, commit_shard
from genimg.seeds import batch_noise, item_seeds
from genimg.spec import JobSpec, item_to_prompt_index
from genimg.storage import ObjectStore

log = logging.getLogger(__name__)

NON_FINITE = NonFiniteOutputError.reason


def ensemble_for(spec: JobSpec) -> str:
    """The Triton ensemble that serves ``spec``: ``txt2img``/``noise2img``, or their ``_base`` (28×28) forms."""
    return spec.model if spec.upscale else f"{spec.model}_base"


@dataclass(frozen=True)
class ShardResult:
    """What :func:`run_shard` did."""

    job_id: str
    shard_index: int
    items_ok: int
    items_failed: int
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_written: int = 0
    model: str = ""
    failed_by_reason: dict[str, int] = field(default_factory=dict)


def count_committed(result: ShardResult, image_format: str) -> None:
    """Add a newly committed shard to the metrics (call once per shard, not per run)."""
    metrics.SHARDS_COMMITTED.inc()
    metrics.IMAGES_WRITTEN.labels(result.model, image_format).inc(result.items_ok)
    metrics.BYTES_WRITTEN.labels(result.model).inc(result.bytes_written)
    for reason, n in result.failed_by_reason.items():
        metrics.ITEMS_FAILED.labels(reason).inc(n)


def result_from_index(spec: JobSpec, shard_index: int, index) -> ShardResult:
    """What a committed shard holds, read back from its index (a shard committed by an earlier run).

    Args:
        spec: the job.
        shard_index: the shard.
        index: the shard's index (:data:`genimg.shards.INDEX_SCHEMA` table).
    """
    rows = index.select(["status", "reason", "tar_size", "model"]).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    return ShardResult(spec.job_id, shard_index, len(ok), len(rows) - len(ok),
                       bytes_written=sum(int(r["tar_size"] or 0) for r in ok),
                       model=rows[0]["model"] if rows else ensemble_for(spec),
                       failed_by_reason=dict(Counter(str(r["reason"]) for r in rows if r["status"] != "ok")))


class Infer:
    """A callable ``(model, inputs) -> outputs`` bound to an InferenceClient, asking for the outputs the model has."""

    def __init__(self, client) -> None:
        self.client = client

    def __call__(self, model: str, inputs: dict) -> dict[str, np.ndarray]:
        declared = self.client.model_metadata(model).outputs
        wanted = [n for n in ("IMAGE", "LABEL", "SCORE", "FINITE") if n in declared]
        return self.client.infer(model, inputs, outputs=wanted)


def load_prompts(store: ObjectStore, layout: Layout, spec: JobSpec, start: int, stop: int) -> list[str | None]:
    """Prompts of items ``[start, stop)``, read from the stored chunks (``None`` for noise2img)."""
    if spec.model != "txt2img":
        return [None] * (stop - start)
    chunk = spec.prompt_chunk_size
    prompts: dict[int, str] = {}
    for c in prompt_chunks_for_items(start, stop, spec.images_per_prompt, chunk):
        for j, p in enumerate(decode_prompt_chunk(store.get_bytes(f"{layout.job_prefix}/{prompt_chunk_key(c)}"))):
            prompts[c * chunk + j] = p
    return [prompts[item_to_prompt_index(i, spec.images_per_prompt)] for i in range(start, stop)]


def _images(out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [B, H, W, C] images and a bool [B] finiteness mask from one Triton answer.

    Float images (a user's own model) are checked and converted here; uint8
    images carry their finiteness in the model's ``FINITE`` output, if any.
    """
    img = out["IMAGE"]
    if img.dtype == np.uint8:
        finite = out["FINITE"].reshape(len(img)).astype(bool) if "FINITE" in out else np.ones(len(img), bool)
        return img, finite
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(img.reshape(len(img), -1)).all(axis=1)
        safe = np.where(np.isfinite(img), img, 0.0)
    return imaging.to_uint8(safe, -1.0, 1.0), finite


@dataclass
class _SubBatch:
    indices: np.ndarray
    seeds: np.ndarray
    prompts: list[str | None]
    out: dict[str, np.ndarray] | None = None
    infer_s: float = 0.0


def run_shard(spec: JobSpec, shard_index: int, *, store: ObjectStore, layout: Layout,
              infer: Callable[[str, dict], dict[str, np.ndarray]], model_version: str = "1",
              infer_inflight: int = 2, encode_threads: int = 2) -> ShardResult:
    """Generate, encode and commit one shard; idempotent (same bytes on every run).

    Args:
        spec: the job.
        shard_index: which shard of ``spec.shard_plan()``.
        store: the job's object store; layout: its key layout.
        infer: ``(model, inputs) -> {IMAGE uint8 [B,H,W,C], LABEL int32 [B,1], SCORE fp32 [B,1], FINITE?}``.
        model_version: recorded in each item's metadata.
        infer_inflight: Triton requests in flight at once.
        encode_threads: encoder threads.

    Raises:
        RetryableError subclasses (Triton or storage unavailable): retry the shard.
        PermanentError subclasses: the shard cannot succeed.
    """
    t0 = time.perf_counter()
    start, stop = spec.shard_plan().shard_range(shard_index)
    model = ensemble_for(spec)
    prompts = load_prompts(store, layout, spec, start, stop)
    indices = np.arange(start, stop, dtype=np.int64)
    seeds = item_seeds(spec.seed, indices)
    step = spec.sub_batch_size
    batches = [_SubBatch(indices[i:i + step], seeds[i:i + step], prompts[i:i + step])
               for i in range(0, len(indices), step)]

    def run_infer(b: _SubBatch) -> _SubBatch:
        inputs: dict = {"Z": batch_noise(spec.seed, b.indices)}
        if spec.model == "txt2img":
            inputs["PROMPT"] = b.prompts
        t = time.perf_counter()
        b.out = infer(model, inputs)
        b.infer_s = time.perf_counter() - t
        metrics.STAGE_SECONDS.labels("infer").observe(b.infer_s)
        return b

    def encode(b: _SubBatch) -> list[ShardItem]:
        t = time.perf_counter()
        images, finite = _images(b.out)
        if not finite.all():  # retry the non-finite items once, alone (case C9)
            bad = np.flatnonzero(~finite)
            retry = run_infer(_SubBatch(b.indices[bad], b.seeds[bad], [b.prompts[i] for i in bad]))
            r_images, r_finite = _images(retry.out)
            images = images.copy()
            images[bad] = r_images
            finite = finite.copy()
            finite[bad] = r_finite
            for k in ("LABEL", "SCORE"):
                b.out[k] = b.out[k].copy()
                b.out[k][bad] = retry.out[k]
        items = []
        per_item_infer = b.infer_s / max(len(b.indices), 1)
        for j, idx in enumerate(b.indices):
            common = dict(item_index=int(idx), seed=int(b.seeds[j]), model=model, model_version=model_version,
                          prompt=b.prompts[j], infer_s=per_item_infer)
            if not finite[j]:
                items.append(ShardItem(reason=NON_FINITE, **common))
                continue
            te = time.perf_counter()
            data = imaging.encode(images[j], spec.image_format, spec.quality)
            items.append(ShardItem(image=data, format=spec.image_format, width=int(images.shape[2]),
                                   height=int(images.shape[1]), label=int(b.out["LABEL"][j].reshape(-1)[0]),
                                   score=float(b.out["SCORE"][j].reshape(-1)[0]),
                                   encode_s=time.perf_counter() - te, **common))
        metrics.STAGE_SECONDS.labels("encode").observe(time.perf_counter() - t)
        return items

    items: list[ShardItem] = []
    with ThreadPoolExecutor(max(1, infer_inflight), thread_name_prefix="infer") as ipool, \
            ThreadPoolExecutor(max(1, encode_threads), thread_name_prefix="encode") as epool:
        inferred = [ipool.submit(run_infer, b) for b in batches]
        encoded = [epool.submit(encode, f.result()) for f in inferred]
        for f in encoded:
            items.extend(f.result())
    gen_s = time.perf_counter() - t0
    commit = commit_shard(store, layout, shard_index, items, stage_seconds={"generate": gen_s})
    upload_s = float(commit.stats["seconds"].get("upload", 0.0))
    metrics.STAGE_SECONDS.labels("upload").observe(upload_s)
    ok = [it for it in items if it.ok]
    total_s = time.perf_counter() - t0
    metrics.STAGE_SECONDS.labels("shard").observe(total_s)
    return ShardResult(spec.job_id, shard_index, len(ok), len(items) - len(ok),
                       {"generate": gen_s, "upload": upload_s, "shard": total_s},
                       bytes_written=sum(len(it.image) for it in ok), model=model,
                       failed_by_reason=dict(Counter(it.reason for it in items if not it.ok)))
